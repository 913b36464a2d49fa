"""Benchmark: two CPU fits sharing the machine, against one alone.

``miner3d fit meshes/lucy.ply -r R`` (the ``cpu`` preset) as whole processes: (1) alone; (2)
two at once, each with torch's default threads (every CPU each: the threads oversubscribe the
cores); (3) two at once, each pinned to its own CPUs with ``taskset`` (miner3d then takes its
thread count from the CPUs it may use: the affinity mask, capped by a cgroup CPU quota).
Printed: each fit's ``seconds_fit`` and whole-process wall time, the median of ``--repeat``
rounds. Run it on an otherwise idle machine.

    python scripts/bench_threads.py
    python scripts/bench_threads.py --resolution 256 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(
    tmp: Path, name: str, resolution: int, cpus: str | None
) -> tuple[subprocess.Popen, Path]:
    out = tmp / name
    cmd = [sys.executable, "-m", "miner3d", "fit", str(ROOT / "meshes" / "lucy.ply")]
    cmd += ["-r", str(resolution), "-o", str(out), "--force", "--quiet"]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out


def run_together(tmp: Path, resolution: int, pins: list[str | None]) -> list[tuple[float, float]]:
    """Start one fit per entry of ``pins`` at once; ``(seconds_fit, wall)`` of each."""
    t0 = time.perf_counter()
    procs = [launch(tmp, f"r{i}", resolution, cpus) for i, cpus in enumerate(pins)]
    results = []
    for proc, out in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(err.decode())
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        results.append((summary["seconds_fit"], wall))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    first, second = ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))
    print(
        f"# {platform.machine()}, CPUs {cpus}, Lucy at {args.resolution}, median of {args.repeat}"
    )
    setups = {
        "alone (default threads)": [None],
        "two at once, default threads": [None, None],
        f"two at once, pinned to CPUs {first} and {second}": [first, second],
    }
    print("| setup | fit seconds (each) | whole process (each) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, pins in setups.items():
            rounds = [run_together(Path(tmp), args.resolution, pins) for _ in range(args.repeat)]
            fits = [statistics.median(r[i][0] for r in rounds) for i in range(len(pins))]
            walls = [statistics.median(r[i][1] for r in rounds) for i in range(len(pins))]
            print(
                f"| {name} | {' / '.join(f'{f:.1f} s' for f in fits)} | "
                f"{' / '.join(f'{w:.1f} s' for w in walls)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
