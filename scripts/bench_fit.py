"""Benchmark harness: time to quality for MINER and the baselines, as configurations of
miner3d's own core (same data, loss, stopping rule and code path), for meshes or images.

Each method runs in a fresh subprocess (its own peak RSS) under a time cap; the clock starts
when fitting starts (voxelization excluded, reported separately) and includes the quality
measurements. Every measurement is of the whole model so far at full resolution (during the
finest scale, and at the end of every scale), so a threshold counts as reached at the first
one that meets it. A threshold not reached within the cap is reported as "not reached".

    python scripts/bench_fit.py                               # Lucy 128^3, default methods
    python scripts/bench_fit.py --mesh meshes/stanford-bunny.obj --resolution 256 --cap 300
    python scripts/bench_fit.py --methods miner miner-b16 --csv out.csv --plot out.png
    python scripts/bench_fit.py --image astronaut-4mp --cap 300   # 2D: time to 30/35/40 dB
    python scripts/bench_fit.py --resolution 256 --methods miner hashgrid hashgrid-t16

The hash-grid methods (``scripts/hashgrid.py``, instant-ngp's encoding in pure PyTorch) have
their own trainer; their clock counts training only, not their full-grid measurements.
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

# 3D: name -> FitConfig overrides on top of BASE; "siren" is sized at run time
METHODS: dict[str, dict] = {
    "miner": {},  # the cpu preset's shape: 3 scales of 8^3 blocks
    "miner-auto": {},  # what `miner3d fit` does: the preset it picks, none of BASE's changes
    "miner-b16": {"n_scales": 4, "block": 16, "prune_mse": 5e-4},  # the paper's layout
    "miner-gaussian": {"pyramid": "gaussian"},
    "miner-noprune": {"prune_mse": 0.0, "freeze_mse": 0.0},
    "miner-share": {"weight_sharing": True},
    "kilonerf": {"n_scales": 1},  # blocks at the finest scale only, no pyramid
    "siren": {"n_scales": 1, "hidden_layers": 3, "w0": 30.0, "points_per_block": 65536},
}
# the method users would pick instead (scripts/hashgrid.py): instant-ngp's defaults (tables
# of 2^19), and tables of 2^16 (about MINER's parameters at 256); its own trainer, fed the
# same grid, measured the same way, stopped by the same quality plateau rule
HASHGRID_METHODS: dict[str, dict] = {
    "hashgrid": {"log2_table": 19},
    "hashgrid-t16": {"log2_table": 16},
}
# every method starts from the `cpu` preset (configs/cpu.yaml: 3 scales of 8^3 blocks, 2 x 22
# features, prune 2e-3, freeze 1e-4) with every sample per iteration, lr 1e-3 and a 5000
# iteration cap: the setting of BENCHMARKS.md's tables. Every method keeps the preset's
# stopping rule: a scale ends when all its blocks are frozen, when its loss improves by less
# than 1 % over 200 iterations, or at max_iters
PRESET, BASE = "cpu", {"lr": 1e-3, "max_iters": 5000, "points_per_block": 0, "metric_every": 25}
THRESHOLDS = (0.99, 0.995, 0.999)

# 2D: the image preset's shape, and the baselines of the paper's Fig. 5
IMAGE_METHODS: dict[str, dict] = {  # one scale: the time cap, not max_iters, ends the run
    "miner": {},
    "kilonerf": {"n_scales": 1, "max_iters": 10**6},
    "siren": {
        "n_scales": 1,
        "hidden_layers": 3,
        "points_per_block": 65536,
        "iteration_samples": 0,
        "max_iters": 10**6,
    },
}
IMAGE_PRESET, IMAGE_BASE = "image", {"metric_every": 25}  # the `image` preset, measured more often
IMAGE_THRESHOLDS = (30.0, 35.0, 40.0)


def _siren_hidden(target_params: int, layers: int, inputs: int = 3, outputs: int = 1) -> int:
    """Width of one SIREN with ``layers`` hidden layers and about ``target_params``."""
    h = 8
    while inputs * h + h + (layers - 1) * (h * h + h) + outputs * (h + 1) < target_params:
        h += 1
    return h


def _image(spec: str) -> Path:
    """A file path, or astronaut-4mp / astronaut-16mp: skimage's astronaut upscaled (bicubic)
    to 2048^2 / 4096^2 and cached as PNG (no photo that large ships offline)."""
    if spec not in ("astronaut-4mp", "astronaut-16mp"):
        return Path(spec)
    import tempfile

    side = 2048 if spec == "astronaut-4mp" else 4096
    path = Path(tempfile.gettempdir()) / f"miner3d-{spec}.png"
    if not path.exists():
        import imageio.v3 as iio
        import numpy as np
        from skimage import data, transform

        big = transform.resize(data.astronaut(), (side, side), order=3, anti_aliasing=False)
        iio.imwrite(path, (np.clip(big, 0, 1) * 255).round().astype(np.uint8))
    return path


def _run_child(
    mesh: str,
    resolution: int,
    method: str,
    overrides: dict,
    cap: float,
    lr: float | None,
    image: str | None,
) -> dict:
    """One fit, in this (child) process, through the public API. Returns its figures and
    curve."""
    import time

    import numpy as np

    import miner3d

    miner3d.fit  # noqa: B018 -- import the API (and torch) before the clock starts
    t0 = time.perf_counter()
    if method in HASHGRID_METHODS:
        return _run_hashgrid(mesh, resolution, method, cap, lr, t0)
    if image is not None:
        from PIL import Image

        source = _image(image)
        width, height = Image.open(source).size
        shape, preset = (height, width), IMAGE_PRESET
        values = {**IMAGE_BASE, **IMAGE_METHODS[method]}
        metric, target_params = "psnr", 300_000
        io = (2, len(Image.open(source).getbands()))
    else:
        source = miner3d.voxelize(mesh, resolution)
        shape, preset = source.shape, PRESET
        values = {**BASE, **METHODS[method]}
        if method == "miner-auto":
            preset, values = None, {}
        metric, target_params = "iou", 190_000
        io = (3, 1)
    prepare_s = time.perf_counter() - t0
    values.update(overrides)
    values["time_limit"] = cap
    if lr is not None:
        values["lr"] = lr
    if method == "siren":  # one MLP over the whole (padded) grid, as many parameters as MINER
        values["block"] = 1 << int(np.ceil(np.log2(max(shape))))
        values["hidden"] = _siren_hidden(
            int(values.pop("params", target_params)), values["hidden_layers"], *io
        )
    values.pop("params", None)
    curve = []
    result = miner3d.fit(
        source,
        preset=preset,
        progress=lambda r: curve.append(r) if metric in r else None,
        **values,
    )
    s = result.summary
    if image is not None:
        prepare_s += s["seconds_load"]
    config = miner3d.effective_config(source, preset=preset, overrides=values)
    return {
        "method": method,
        "lr": config.fit.lr,
        "prepare_s": prepare_s,
        "fit_s": s["seconds"],
        "quality": s.get(metric),
        "finest_scale": s["finest_scale_fitted"],
        "params": s["params"],
        "reached": s[f"seconds_to_{metric}"],
        "curve": [(r["time"], r[metric], r["scale"]) for r in curve],
        "peak_rss": s["peak_rss_bytes"],
        "config": config.to_dict()["fit"],
        "shape": list(shape),
    }


def _run_hashgrid(
    mesh: str, resolution: int, method: str, cap: float, lr: float | None, t0: float
) -> dict:
    """One hash-grid fit (``scripts/hashgrid.py``), in this (child) process; the figures of
    :func:`_run_child`. Its clock counts training only (measurements excluded)."""
    import time

    import miner3d
    from miner3d.memory import peak_rss

    sys.path.insert(0, str(ROOT / "scripts"))
    from hashgrid import fit_hashgrid

    grid = miner3d.voxelize(mesh, resolution).occupancy
    prepare_s = time.perf_counter() - t0
    settings = {**HASHGRID_METHODS[method], "lr": lr or 1e-2}
    r = fit_hashgrid(grid, cap, thresholds=THRESHOLDS, **settings)
    return {
        "method": method,
        "lr": settings["lr"],
        "prepare_s": prepare_s,
        "fit_s": r["seconds"],
        "quality": r["iou"],
        "finest_scale": 0,
        "params": r["params"],
        "reached": r["reached"],
        "curve": [(h["time"], h["iou"], 0) for h in r["history"]],
        "peak_rss": peak_rss(),
        "config": {**settings, "batch": r["batch"], "stopped": r["stopped"]},
        "shape": list(grid.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=str(ROOT / "meshes" / "lucy.ply"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument(
        "--image", help="fit an image instead of a mesh: a path, or astronaut-4mp / astronaut-16mp"
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help=f"3D: {', '.join([*METHODS, *HASHGRID_METHODS])}; images: {', '.join(IMAGE_METHODS)}",
    )
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
        is_number = value[:1].isdigit() or value[:1] == "."
        overrides[key] = json.loads(value) if is_number or value in ("true", "false") else value
    if args.child:
        print(json.dumps(_run_child(**json.loads(args.child))))
        return

    image = args.image
    methods = args.methods or list(IMAGE_METHODS if image else METHODS)
    if image and set(methods) & set(HASHGRID_METHODS):
        parser.error("the hash-grid methods fit meshes only")
    thresholds = IMAGE_THRESHOLDS if image else THRESHOLDS
    what = f"image {image}" if image else f"mesh {Path(args.mesh).name} at {args.resolution}"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {what}; cap {args.cap:.0f} s per run"
    )
    quality = "final dB" if image else "final IoU"
    print(
        f"{'method':16} {'lr':>8} {'params':>9} {quality:>10} "
        + " ".join(f"{'t(' + str(t) + ')':>11}" for t in thresholds)
        + f" {'peak MiB':>9}"
    )
    rows = []
    for method in methods:
        for lr in args.lrs or [None]:
            spec = {
                "mesh": args.mesh,
                "resolution": args.resolution,
                "method": method,
                "overrides": overrides,
                "cap": args.cap,
                "lr": lr,
                "image": image,
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
            for t in thresholds:
                hit = r["reached"][str(t)]
                cells.append(f"{'not reached' if hit is None else f'{hit:.1f} s':>11}")
            q = r["quality"]
            q = "-" if q is None else (f"{q:.2f}" if image else f"{q:.5f}")
            print(
                f"{method:16} {r['lr']:>8.0e} {r['params']:>9,} {q:>10} {' '.join(cells)} "
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
                    "final_psnr" if image else "final_iou",
                    "finest_scale_fitted",
                    *[f"seconds_to_{t}" for t in thresholds],
                    "peak_rss_bytes",
                    "fit_seconds",
                    "prepare_seconds",
                ]
            )
            for r in rows:
                writer.writerow(
                    [
                        r["method"],
                        r["lr"],
                        r["params"],
                        r["quality"],
                        r["finest_scale"],
                        *[r["reached"][str(t)] for t in thresholds],
                        r["peak_rss"],
                        r["fit_s"],
                        r["prepare_s"],
                    ]
                )
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if r["curve"]:
                t, q, _ = zip(*r["curve"], strict=True)
                ax.plot(t, q, marker=".", label=f"{r['method']} (lr {r['lr']:.0e})")
        ax.set_xlabel("wall time (s)")
        if image:
            ax.set_ylabel("PSNR (dB)")
        else:
            ax.set_ylabel("full-grid IoU (threshold 0.5)")
            ax.set_ylim(0.9, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
