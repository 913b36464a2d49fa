"""Benchmark: solid voxelization, miner3d against trimesh's and open3d's routes.

Each measurement runs in a fresh subprocess so its peak RSS is its own (the baseline of an
idle process with the same imports is printed too). Times exclude loading the mesh (reported)
and a warm-up voxelization at 16^3 that compiles numba's kernels or loads them from its disk
cache (reported); short runs are the median of --repeat runs. A route
that exceeds --cap seconds at one resolution is not run at higher ones: its time there is
extrapolated (x8 per doubling) and marked "~".

    python scripts/bench_voxelize.py                      # Lucy 100k and Lucy x3 subdivided
    python scripts/bench_voxelize.py --meshes meshes/fandisk.obj --resolutions 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _measure(mesh_path: str, route: str, resolution: int, repeat: int) -> dict:
    """Runs in the child: returns seconds (median), peak RSS, compile seconds, filled fraction."""
    import statistics

    import numpy as np

    from miner3d.io import load_mesh
    from miner3d.memory import peak_rss
    from miner3d.voxelizer import voxelize

    t0 = time.perf_counter()
    mesh = load_mesh(mesh_path)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "faces": len(mesh.faces)}
    times = []
    if route.startswith("miner3d-"):
        method = route.split("-", 1)[1]
        t0 = time.perf_counter()
        voxelize(mesh, 16, method=method)  # warm-up: numba compiles (or loads its cache)
        out["warmup_s"] = time.perf_counter() - t0
        for _ in range(repeat):
            t0 = time.perf_counter()
            grid = voxelize(mesh, resolution, method=method)
            times.append(time.perf_counter() - t0)
        out["filled"] = grid.filled_fraction
        out["shape"] = grid.shape
    elif route == "trimesh":
        from miner3d.grid import GridTransform

        t = GridTransform.fit_bounds(mesh.bounds, resolution)
        t0 = time.perf_counter()
        vox = mesh.voxelized(pitch=t.voxel_size, method="subdivide").fill()
        times.append(time.perf_counter() - t0)
        out["filled"] = float(vox.matrix.mean())
        out["shape"] = vox.matrix.shape
    elif route == "open3d":
        t0 = time.perf_counter()
        grid = voxelize(mesh, resolution, method="open3d")
        times.append(time.perf_counter() - t0)
        out["filled"] = grid.filled_fraction
        out["shape"] = grid.shape
    out["seconds"] = statistics.median(times)
    out["peak_rss"] = peak_rss()
    del np
    return out


def _child(args: list[str]) -> dict | None:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _baseline_rss() -> int:
    code = (
        "import miner3d.voxelizer, trimesh, numpy; from miner3d.memory import peak_rss;"
        "print(peak_rss())"
    )
    return int(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, text=True))


def _subdivided_lucy(times: int) -> Path:
    """Lucy subdivided ``times`` times with trimesh (x4 triangles each), cached as binary PLY."""
    path = Path(tempfile.gettempdir()) / f"miner3d-lucy-sub{times}.ply"
    if not path.exists():  # in a child, so this process stays small
        code = (
            f"import trimesh; m = trimesh.load({str(ROOT / 'meshes' / 'lucy.ply')!r}, "
            f"process=False)\nfor _ in range({times}): m = m.subdivide()\n"
            f"m.export({str(path)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="*", default=None)
    parser.add_argument("--resolutions", nargs="*", type=int, default=[256, 512, 1024])
    parser.add_argument(
        "--routes", nargs="*", default=["miner3d-robust", "miner3d-parity", "trimesh", "open3d"]
    )
    parser.add_argument(
        "--cap",
        type=float,
        default=60.0,
        help="seconds; higher resolutions of a route that exceeded it are extrapolated",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("MESH", "ROUTE", "RES", "REPEAT"))
    args = parser.parse_args()
    if args.child:
        mesh, route, res, repeat = args.child
        print(json.dumps(_measure(mesh, route, int(res), int(repeat))))
        return

    meshes = args.meshes or [str(ROOT / "meshes" / "lucy.ply"), str(_subdivided_lucy(3))]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"idle process with the same imports: peak RSS {_baseline_rss() / 2**20:.0f} MiB")
    print(
        f"{'mesh':24} {'faces':>9} {'route':16} {'res':>5} {'shape':>16} {'seconds':>9} "
        f"{'peak MiB':>9} {'x ours':>7}"
    )
    for mesh in meshes:
        ours: dict[int, float] = {}
        for route in args.routes:
            last = None
            for res in args.resolutions:
                if last is not None and last[1] > args.cap:
                    est = last[1] * (res / last[0]) ** 3
                    ratio = f"{est / ours[res]:.0f}" if res in ours else ""
                    print(
                        f"{Path(mesh).name:24} {'':>9} {route:16} {res:>5} {'':>16} "
                        f"{'~' + format(est, '.0f'):>9} {'':>9} {ratio:>7}  (extrapolated)"
                    )
                    last = (res, est)
                    continue
                repeat = args.repeat if route.startswith("miner3d") else 1
                r = _child([mesh, route, str(res), str(repeat)])
                if r is None:
                    break
                if route == "miner3d-robust":
                    ours[res] = r["seconds"]
                ratio = f"{r['seconds'] / ours[res]:.1f}" if res in ours else ""
                shape = "x".join(map(str, r["shape"]))
                note = f"  (load {r['load_s']:.1f} s" + (
                    f", warm-up at 16^3 incl. numba {r['warmup_s']:.1f} s)"
                    if "warmup_s" in r
                    else ")"
                )
                print(
                    f"{Path(mesh).name:24} {r['faces']:>9} {route:16} {res:>5} {shape:>16} "
                    f"{r['seconds']:>9.3f} {r['peak_rss'] / 2**20:>9.0f} {ratio:>7}{note}",
                    flush=True,
                )
                last = (res, r["seconds"])


if __name__ == "__main__":
    main()
