"""A high-genus test solid for benchmarks: a lattice of round beams inside a cube.

``cells`` x ``cells`` x ``cells`` cells of beams along the three axes (radius ``radius`` in a
[-1, 1] box, clipped to [-0.9, 0.9]), triangulated by marching cubes of the signed distance on
an ``n``^3 grid. The default (5 cells, radius 0.06, n = 200) is watertight with Euler number
-160 (genus 81) and 654k faces: a surface in nearly every block, where pruning cannot help.

    python scripts/lattice_mesh.py lattice.ply
    miner3d fit lattice.ply --resolution 512
"""

from __future__ import annotations

import argparse

import numpy as np
import trimesh
from skimage.measure import marching_cubes


def lattice_distance(n: int, cells: int, radius: float) -> tuple[np.ndarray, float]:
    """Signed distance (negative inside) on an ``(n, n, n)`` grid over [-1, 1]^3, and the
    grid's spacing. Memory: a few float64 arrays of ``n^3``."""
    x = np.linspace(-1.0, 1.0, n)
    xx, yy, zz = np.meshgrid(x, x, x, indexing="ij")

    def beam(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # distance to the nearest beam
        fa, fb = (a + 1) * cells / 2, (b + 1) * cells / 2
        return np.hypot((fa - np.round(fa)) * 2 / cells, (fb - np.round(fb)) * 2 / cells)

    inside = np.minimum(np.minimum(beam(xx, yy), beam(yy, zz)), beam(xx, zz)) - radius
    box = np.maximum(np.maximum(np.abs(xx), np.abs(yy)), np.abs(zz)) - 0.9
    return np.maximum(inside, box), float(x[1] - x[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--radius", type=float, default=0.06)
    parser.add_argument("-n", type=int, default=200, help="grid samples per axis")
    args = parser.parse_args()
    distance, spacing = lattice_distance(args.n, args.cells, args.radius)
    vertices, faces, _, _ = marching_cubes(-distance, 0.0, spacing=(spacing,) * 3)
    mesh = trimesh.Trimesh(vertices, faces)
    mesh.export(args.output)
    print(
        f"{args.output}: {len(faces):,} faces, watertight {mesh.is_watertight}, "
        f"Euler number {mesh.euler_number}"
    )


if __name__ == "__main__":
    main()
