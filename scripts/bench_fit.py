"""Benchmark harness: time to quality for MINER and the baselines, as configurations of
miner3d's own core (same data, loss, stopping rule and code path).

Each method runs in a fresh subprocess (its own peak RSS) under a time cap; the clock starts
when fitting starts (voxelization excluded, reported separately) and includes the quality
measurements. A threshold not reached within the cap is reported as "not reached".

    python scripts/bench_fit.py                               # Lucy 128^3, default methods
    python scripts/bench_fit.py --mesh meshes/stanford-bunny.obj --resolution 256 --cap 300
    python scripts/bench_fit.py --methods miner miner-b16 --csv out.csv --plot out.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> FitConfig overrides (on top of the base below); "siren" is sized at run time
METHODS: dict[str, dict] = {
    "miner": {},  # the cpu preset: 3 scales of 8^3 blocks
    "miner-b16": {"n_scales": 4, "block": 16, "prune_mse": 5e-4},  # the paper's layout
    "miner-gaussian": {"pyramid": "gaussian"},
    "miner-noprune": {"prune_mse": 0.0, "freeze_mse": 0.0},
    "miner-share": {"weight_sharing": True},
    "kilonerf": {"n_scales": 1},  # blocks at the finest scale only, no pyramid
    "siren": {"n_scales": 1, "hidden_layers": 3, "w0": 30.0, "points_per_block": 65536},
}
BASE = {
    "n_scales": 3,
    "block": 8,
    "hidden": 22,
    "hidden_layers": 2,
    "lr": 1e-3,
    "prune_mse": 2e-3,
    "freeze_mse": 1e-4,
    "max_iters": 5000,
    "metric_every": 25,
}
# every method keeps FitConfig's stopping rule: a scale ends when all its blocks are frozen,
# when its loss improves by less than 1 % over 200 iterations, or at max_iters
THRESHOLDS = (0.99, 0.995, 0.999)


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _siren_hidden(target_params: int, layers: int) -> int:
    """Width of one SIREN with ``layers`` hidden layers and about ``target_params``."""
    h = 8
    while 3 * h + h + (layers - 1) * (h * h + h) + h + 1 < target_params:
        h += 1
    return h


def _run_child(
    mesh: str, resolution: int, method: str, overrides: dict, cap: float, lr: float | None
) -> dict:
    import time

    import numpy as np
    import torch

    from miner3d.train import FitConfig, fit
    from miner3d.voxelize import voxelize_file

    t0 = time.perf_counter()
    grid = voxelize_file(mesh, resolution)
    voxelize_s = time.perf_counter() - t0
    values = {**BASE, **METHODS[method], **overrides, "time_limit": cap}
    if lr is not None:
        values["lr"] = lr
    if method == "siren":
        from miner3d.blocks import BlockLayout

        padded = BlockLayout(grid.shape, 8, 1).padded
        values["block"] = 1 << int(np.ceil(np.log2(max(padded))))
        values["hidden"] = _siren_hidden(
            int(values.pop("params", 190_000)), values["hidden_layers"]
        )
    values.pop("params", None)
    curve = []
    fit_result = fit(
        grid.occupancy,
        FitConfig(**values),
        transform=grid.transform,
        callback=lambda r: curve.append(r) if "iou" in r else None,
    )
    reached = {}
    for t in THRESHOLDS:
        reached[str(t)] = next(
            (r["time"] for r in curve if r["scale"] == 0 and r["iou"] >= t), None
        )
    return {
        "method": method,
        "lr": values["lr"],
        "voxelize_s": voxelize_s,
        "fit_s": fit_result.summary["seconds"],
        "iou": fit_result.summary.get("iou"),
        "finest_scale": fit_result.summary["finest_scale_fitted"],
        "params": fit_result.model.n_params,
        "reached": reached,
        "curve": [(r["time"], r["iou"], r["scale"]) for r in curve],
        "peak_rss": _vm_hwm(),
        "device": str(fit_result.model.device),
        "torch_threads": torch.get_num_threads(),
        "config": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=str(ROOT / "meshes" / "lucy.ply"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--cap", type=float, default=120.0, help="seconds per run")
    parser.add_argument(
        "--lrs",
        nargs="*",
        type=float,
        default=None,
        help="learning rates to sweep (default: each method's own)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="FitConfig overrides for every method",
    )
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = (
            json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
        )
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_run_child(**spec)))
        return

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; mesh {Path(args.mesh).name} at {args.resolution}; "
        f"cap {args.cap:.0f} s per run"
    )
    header = (
        f"{'method':16} {'lr':>8} {'params':>9} {'final IoU':>10} "
        + " ".join(f"{'t(' + str(t) + ')':>10}" for t in THRESHOLDS)
        + f" {'peak MiB':>9}"
    )
    print(header)
    rows = []
    for method in args.methods:
        for lr in args.lrs or [None]:
            spec = {
                "mesh": args.mesh,
                "resolution": args.resolution,
                "method": method,
                "overrides": overrides,
                "cap": args.cap,
                "lr": lr,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            if proc.returncode != 0:
                print(f"{method:16} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            cells = []
            for t in THRESHOLDS:
                hit = r["reached"][str(t)]
                cells.append(f"{'not reached' if hit is None else f'{hit:.1f} s':>10}")
            times = " ".join(cells)
            iou = "-" if r["iou"] is None else f"{r['iou']:.5f}"
            print(
                f"{method:16} {r['lr']:>8.0e} {r['params']:>9,} {iou:>10} {times} "
                f"{r['peak_rss'] / 2**20:>9.0f}",
                flush=True,
            )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                [
                    "method",
                    "lr",
                    "params",
                    "final_iou",
                    "finest_scale_fitted",
                    *[f"seconds_to_{t}" for t in THRESHOLDS],
                    "peak_rss_bytes",
                    "fit_seconds",
                    "voxelize_seconds",
                ]
            )
            for r in rows:
                writer.writerow(
                    [
                        r["method"],
                        r["lr"],
                        r["params"],
                        r["iou"],
                        r["finest_scale"],
                        *[r["reached"][str(t)] for t in THRESHOLDS],
                        r["peak_rss"],
                        r["fit_s"],
                        r["voxelize_s"],
                    ]
                )
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            curve = [(t, q) for t, q, _ in r["curve"]]
            if curve:
                t, q = zip(*curve, strict=True)
                ax.plot(t, q, marker=".", label=f"{r['method']} (lr {r['lr']:.0e})")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("full-grid IoU (threshold 0.5)")
        ax.set_ylim(0.9, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
