"""Benchmark: one process with N threads against ``torchrun --nproc_per_node N`` ranks of one
thread each, on the same input and flags (issue 15). Prints, per run, the fit's time to each
quality threshold, its fitting and total seconds, and each rank's fitting seconds, blocks and
peak RSS, from ``summary.json``. Runs one after the other, never side by side.

    python scripts/bench_ranks.py --mesh meshes/lucy.ply --resolution 512 --target 0.999
    python scripts/bench_ranks.py --image astronaut-16mp --target 35
    python scripts/bench_ranks.py --image gen108 --set fit.max_iters=3

``gen108`` writes a 12000 x 9000 RGB TIFF (108 MP, uncompressed, so memory-mapped) of waves
and seeded noise into the run's temporary directory first, band by band.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall"] = wall
    return summary


def write_gen108(path: Path, height: int = 9000, width: int = 12000) -> Path:
    """A 12000 x 9000 RGB TIFF of waves and noise (seeded), written band by band through a
    memory map (never the whole image in memory)."""
    import numpy as np
    import tifffile

    image = tifffile.memmap(path, shape=(height, width, 3), dtype=np.uint8, photometric="rgb")
    rng = np.random.default_rng(0)
    x = np.arange(width, dtype=np.float32)[None, :]
    for r0 in range(0, height, 500):
        y = np.arange(r0, min(r0 + 500, height), dtype=np.float32)[:, None]
        for c, (a, b) in enumerate([(300, 500), (700, 200), (150, 900)]):
            wave = 127.5 + 90 * np.sin(x / a + y / b) + 20 * np.cos(x / 37 - y / 53)
            noise = rng.normal(0.0, 8.0, wave.shape).astype(np.float32)
            image[r0 : r0 + len(y), :, c] = (wave + noise).clip(0, 255).astype(np.uint8)
    image.flush()
    del image
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=str(ROOT / "meshes" / "lucy.ply"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--image", help="a path, astronaut-4mp / astronaut-16mp, or gen108")
    parser.add_argument("--target", type=float, help="stop at this IoU / PSNR")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra --set field=value")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    if args.image == "gen108":
        source = [str(write_gen108(work / "gen108.tif"))]
    elif args.image:
        from bench_fit import _image

        source = [str(_image(args.image))]
    else:
        source = [args.mesh, "--resolution", str(args.resolution)]
    flags = [f"--set={s}" for s in args.set]
    if args.target is not None:
        flags += ["--target", str(args.target)]
    env = {**os.environ}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    n = args.ranks
    one = [sys.executable, "-m", "miner3d", "fit", *source, *flags, "--threads", str(n), "-q"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    many = [*torchrun, "--nproc_per_node", str(n), "-m", "miner3d", "fit", *source, *flags, "-q"]
    results = {
        f"1 process, {n} threads": run([*one, "-o", str(work / "one")], env, work / "one"),
        f"{n} ranks, 1 thread each": run(
            [*many, "-o", str(work / "many")], {**env, "OMP_NUM_THREADS": "1"}, work / "many"
        ),
    }
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs; input: {' '.join(source)} "
        f"{' '.join(flags)}"
    )
    metric = "psnr" if args.image else "iou"
    thresholds = list(next(iter(results.values()))[f"seconds_to_{metric}"])
    head = " | ".join(f"s to {metric} {t}" for t in thresholds)
    ranks = "ranks: fitting s, blocks, peak RSS"
    print(f"| run | {head} | final {metric} | fitting s | whole s | {ranks} |")
    print("|---|" + "---|" * (len(thresholds) + 4))
    for label, s in results.items():
        reached = " | ".join(
            "not reached" if v is None else f"{v:.1f}" for v in s[f"seconds_to_{metric}"].values()
        )
        ranks = "; ".join(
            f"{r['seconds_fitting']:.1f} s, {r['mlp_blocks']:,}, "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB"
            for r in s["ranks"]
        )
        print(
            f"| {label} | {reached} | {s[metric]:.5g} | {s['seconds_fit']:.1f} | "
            f"{s['wall']:.1f} | {ranks} |"
        )
    shutil.rmtree(work, ignore_errors=True)  # the runs and a generated TIFF: gigabytes


if __name__ == "__main__":
    main()
