"""Generated test meshes that stand in for real game assets: many overlapping closed bodies,
some with holes punched through them (what the robust voxelizer's fallback exists for).

    python scripts/meshgen.py multibody.ply                   # 44 bodies, about 120k triangles
    python scripts/meshgen.py small.ply --bodies 8 --subdivisions 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def multibody_mesh(
    bodies: int = 44,
    subdivisions: int = 4,
    holes: float = 0.4,
    hole_radius: float = 0.15,
    seed: int = 0,
):
    """A ``trimesh.Trimesh`` of ``bodies`` overlapping, outward-oriented closed bodies
    (alternately icospheres of ``subdivisions`` and capsules, scaled and rotated at random in
    a unit box) with a round hole punched through about ``holes`` of them: the faces within
    ``hole_radius`` times the body's half-diagonal of a random surface point removed (0.15:
    about 1 % of a sphere's surface; 0.35 opens a third of its radius). 44 bodies at
    subdivision 4: about 130k triangles."""
    import trimesh

    rng = np.random.default_rng(seed)
    parts = []
    for i in range(bodies):
        if i % 2 == 0:
            body = trimesh.creation.icosphere(subdivisions=subdivisions)
        else:
            count = 6 * 2 ** max(0, subdivisions - 2)
            body = trimesh.creation.capsule(height=1.5, radius=0.6, count=[count, count])
        body.apply_scale(rng.uniform(0.08, 0.22) * rng.uniform(0.6, 1.4, size=3))
        body.apply_transform(trimesh.transformations.random_rotation_matrix(rng.random(3)))
        body.apply_translation(rng.uniform(0.2, 0.8, size=3))
        if rng.random() < holes:
            centre = body.vertices[rng.integers(len(body.vertices))]
            radius = hole_radius * float(np.linalg.norm(body.extents)) / 2
            keep = np.linalg.norm(body.triangles_center - centre, axis=1) > radius
            body = trimesh.Trimesh(body.vertices, body.faces[keep], process=False)
        parts.append(body)
    return trimesh.util.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--bodies", type=int, default=44)
    parser.add_argument("--subdivisions", type=int, default=4)
    parser.add_argument("--holes", type=float, default=0.4, help="fraction of bodies holed")
    parser.add_argument("--hole-radius", type=float, default=0.15, help="of a body's half-diagonal")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mesh = multibody_mesh(args.bodies, args.subdivisions, args.holes, args.hole_radius, args.seed)
    mesh.export(args.output)
    print(f"{args.output}: {len(mesh.faces):,} triangles, {args.bodies} bodies")


if __name__ == "__main__":
    main()
