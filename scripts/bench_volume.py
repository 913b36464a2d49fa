"""Benchmark: scalar-volume fits with the `volume` preset, on generated volumes.

* ``torus``: a smooth signed distance field of a torus (float32);
* ``lucy-sdf``: the signed distance field of the bundled Lucy voxelized at ``--lucy``
  voxels (smooth, with the statue's detail);
* ``texture``: a volume with detail everywhere (sums of sines at several frequencies and
  directions, float32);
* ``ct-like``: ``texture`` plus Lucy's solid, quantised to int16 in Hounsfield-like units
  (PSNR's peak is then the int16 range, as for a CT scan).

Each is fitted with no flags but the kind (the ``volume`` preset), after one untimed warm-up
fit of a small volume; printed: the final PSNR (over the range PSNR uses), the time to 30, 35
and 40 dB, the fit's seconds, the parameters and the size of the model against the raw
samples.

    python scripts/bench_volume.py
    python scripts/bench_volume.py --size 128
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

import miner3d


def texture(n: int) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(0, 1, n, dtype=np.float32),) * 3, indexing="ij")
    out = np.sin(40 * x + 3 * np.sin(9 * y)) * np.cos(31 * y + 5 * z)
    out += 0.3 * np.sin(57 * z * x) + 0.2 * np.cos(23 * (x + y - z))
    return out.astype(np.float32)


def torus(n: int) -> np.ndarray:
    g = np.arange(n, dtype=np.float32) - (n - 1) / 2
    x, y, z = np.meshgrid(g, g, g[: n * 2 // 3], indexing="ij")
    ring = np.sqrt(x**2 + y**2) - 0.3 * n
    return (np.sqrt(ring**2 + z**2) - 0.12 * n).astype(np.float32)


def lucy_sdf(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    from miner3d.resources import default_mesh

    grid = miner3d.voxelize(default_mesh(), resolution)
    solid = grid.occupancy.astype(bool)
    sdf = ndimage.distance_transform_edt(~solid) - ndimage.distance_transform_edt(solid)
    return sdf.astype(np.float32), solid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="texture and torus side")
    parser.add_argument("--lucy", type=int, default=96, help="Lucy's voxels on its long axis")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch threads as miner3d picks")
    miner3d.fit(torus(24), kind="volume", max_iters=20)  # warm-up
    sdf, solid = lucy_sdf(args.lucy)
    tex = texture(args.size)
    ct_tex = texture(solid.shape[2])[: solid.shape[0], : solid.shape[1]]
    ct = np.where(solid, 900.0 + 150 * ct_tex, -1000.0 + 40 * ct_tex).astype(np.int16)
    volumes = {
        "torus": torus(args.size),
        "lucy-sdf": sdf,
        "texture": tex,
        "ct-like (int16)": ct,
    }
    print(
        "| volume | shape | dtype | PSNR | t(30 dB) | t(35 dB) | t(40 dB) | fit | params "
        "| model / raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, volume in volumes.items():
        s = miner3d.fit(volume, kind="volume").summary
        times = s["seconds_to_psnr"]
        cells = [
            f"{times[k]:.1f} s" if times.get(k) else "not reached" for k in ("30.0", "35.0", "40.0")
        ]
        print(
            f"| {name} | {'x'.join(map(str, volume.shape))} | {volume.dtype} | "
            f"{s['psnr']:.2f} dB | {' | '.join(cells)} | {s['seconds_fit']:.1f} s | "
            f"{s['params']:,} | {1 / s['compression_ratio']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
