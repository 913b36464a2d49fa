"""Benchmark: voxelizing a game-asset-like mesh of many overlapping bodies with holes.

For each generated mesh (``scripts/meshgen.py``: 44 bodies, about 130k triangles; small or
large holes), ``miner3d voxelize MESH -r 512`` runs as a whole process: one warm-up, then the
median of ``--repeat`` runs (wall time from the shell's point of view, imports and writing the
grid included). The grid it wrote is compared with the generalised winding number's solid
(``|w| >= 1/2``, libigl's exact ``winding_number`` of the whole mesh, the truth the issue
names) at ``--samples`` uniformly drawn voxels (an estimate of the full-grid IoU) and as many
voxels next to the surface (where mistakes happen).

    python scripts/bench_multibody.py
    python scripts/bench_multibody.py --python /tmp/old/.venv/bin/python --pythonpath /tmp/old
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from meshgen import multibody_mesh  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["robust"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--python", default=sys.executable, help="the interpreter to time")
    parser.add_argument("--pythonpath", help="a checkout to time instead of this one")
    parser.add_argument("--holes", nargs="+", type=float, default=[0.15, 0.35])
    args = parser.parse_args()

    import igl

    from miner3d.grid import OccupancyGrid

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# {args.python} {args.pythonpath or ''}")
    print("| mesh | triangles | method | whole process (median) | uniform IoU | near-surface IoU |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for radius in args.holes:
            mesh = multibody_mesh(hole_radius=radius)
            path = Path(tmp) / f"multibody-{radius}.ply"
            mesh.export(path)
            truth = None
            for method in args.methods:
                out = Path(tmp) / f"{method}.npz"
                cmd = [args.python, "-m", "miner3d", "voxelize", str(path), "-r"]
                cmd += [str(args.resolution), "-o", str(out), "--force", "-q", "--method", method]
                times = []
                for run in range(args.repeat + 1):
                    t0 = time.perf_counter()
                    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(done.stderr)
                    if run:  # the first is the warm-up
                        times.append(time.perf_counter() - t0)
                grid = OccupancyGrid.load(out)
                occ = grid.occupancy.astype(bool)
                if truth is None:
                    rng = np.random.default_rng(0)
                    uniform = np.stack([rng.integers(0, n, args.samples) for n in grid.shape], 1)
                    edge = np.argwhere(occ ^ np.roll(occ, 1, axis=2))
                    near = edge[rng.choice(len(edge), args.samples, replace=False)]
                    idx = np.concatenate([uniform, near])
                    w = igl.winding_number(
                        np.asarray(mesh.vertices, dtype=np.float64),
                        np.asarray(mesh.faces, dtype=np.int64),
                        grid.transform.grid_to_world(idx + 0.5),
                    )
                    truth = np.abs(w) >= 0.5
                ours = occ[tuple(idx.T)]
                n = args.samples
                print(
                    f"| 44 bodies, hole radius {radius} | {len(mesh.faces):,} | {method} | "
                    f"{statistics.median(times):.2f} s | {iou(ours[:n], truth[:n]):.5f} | "
                    f"{iou(ours[n:], truth[n:]):.5f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
