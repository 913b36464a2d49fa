"""Fit and evaluate a list of meshes; one CSV row per mesh and level of detail.

    python scripts/eval_iou.py meshes/lucy.ply meshes/fandisk.obj --resolution 128 -o eval.csv

Each mesh is fitted with the given preset (and --set overrides), then `miner3d eval`'s metrics
are computed: iou_grid, iou_grid_04, iou_points, chamfer, chamfer_pct_diag, fscore.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLUMNS = [
    "mesh",
    "resolution",
    "scale",
    "params",
    "fit_seconds",
    "iou_grid",
    "iou_grid_04",
    "iou_points",
    "chamfer",
    "chamfer_pct_diag",
    "fscore",
]


def main() -> None:
    from miner3d.config import parse_assignments
    from miner3d.evaluate import evaluate
    from miner3d.grid import OccupancyGrid
    from miner3d.model import MinerModel
    from miner3d.runs import run_fit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meshes", nargs="+", type=Path)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--surface", type=int, default=100_000)
    parser.add_argument("-o", "--output", type=Path, default=Path("eval_iou.csv"))
    args = parser.parse_args()
    overrides = {
        "resolution": args.resolution,
        "mesh_scales": "none",
        **parse_assignments(args.set),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mesh in args.meshes:
            run_dir = Path(tmp) / mesh.stem
            t0 = time.perf_counter()
            summary = run_fit(mesh, preset=args.preset, overrides=overrides, output=run_dir)
            model = MinerModel.load(run_dir / "model.safetensors")
            grid = OccupancyGrid.load(run_dir / "grid.npz")
            results = evaluate(model, grid.occupancy, mesh, args.points, args.surface)
            for scale, metrics in results["scales"].items():
                rows.append(
                    {
                        "mesh": mesh.name,
                        "resolution": args.resolution,
                        "scale": scale,
                        "params": summary["params"],
                        "fit_seconds": summary["seconds_fit"],
                        **metrics,
                    }
                )
            print(
                f"{mesh.name}: iou_grid {results['scales']['0']['iou_grid']:.5f}, "
                f"iou_points {results['scales']['0']['iou_points']:.5f}, chamfer "
                f"{results['scales']['0']['chamfer_pct_diag']:.3f}% of diagonal "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    with open(args.output, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
