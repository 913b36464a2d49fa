"""Large images: a memory-mapped TIFF is fitted block batch by block batch, with no float copy
of the full image and a peak RSS well below the image's float32 size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from miner3d.kinds import IMAGE, read_signal

# the child: open the TIFF, warm torch and the numba kernels up on a tiny fit, then fit the
# big image for a few iterations per scale and report the peak RSS above the RSS just before
# the fit
CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from miner3d.memory import peak_rss
from miner3d.io import read_image
from miner3d.config import FitConfig
from miner3d.train import fit

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))

data, mapped = read_image(Path(sys.argv[1]))
assert mapped and isinstance(data, np.memmap), type(data)
cfg = dict(n_scales=3, block=32, hidden=8, hidden_layers=1, max_iters=3, points_per_block=64,
           batch_samples=1 << 17, metric_every=3, prune_mse=1e-4, freeze_mse=0.0,
           plateau_tol=0.0, lr=1e-2)
tiny = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)  # trains
fit(tiny, FitConfig(**{**cfg, "block": 8}), kind="image", value_scale=1 / 255)
try:  # reset the high-water mark to now (Linux >= 4.0); if refused, the bound is stricter
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
base = rss()
res = fit(data, FitConfig(**cfg), kind="image", value_scale=1 / 255)
print(json.dumps({"base": base, "peak": peak_rss(), "psnr": res.summary["psnr"],
                  "finest": res.summary["finest_scale_fitted"],
                  "mlp_blocks": res.summary["mlp_blocks"],
                  "scale_psnr": [res.summary["scales"][str(j)].get("level_psnr")
                                 for j in (2, 1)] + [res.summary["scales"]["0"]["psnr"]]}))
"""


def _write_big_tiff(path, height: int, width: int) -> None:
    """An RGB TIFF of smooth waves plus texture, written band by band through a memory map
    (never the whole image in memory)."""
    mm = tifffile.memmap(path, shape=(height, width, 3), dtype=np.uint8, photometric="rgb")
    x = np.arange(width, dtype=np.float32)[None, :]
    for r0 in range(0, height, 500):
        y = np.arange(r0, min(r0 + 500, height), dtype=np.float32)[:, None]
        for c, (a, b) in enumerate([(300, 500), (700, 200), (150, 900)]):
            wave = 127.5 + 100 * np.sin(x / a + y / b) + 20 * np.cos(x / 37 - y / 53)
            mm[r0 : r0 + len(y), :, c] = wave.astype(np.uint8)
    mm.flush()
    del mm


@pytest.mark.slow
def test_64mp_memory_mapped_tiff_fits_under_rss_bound(tmp_path):
    height = width = 8000  # 64 MP, RGB: 192 MB of uint8, 768 MB as float32
    path = tmp_path / "big.tif"
    _write_big_tiff(path, height, width)
    float32_bytes = height * width * 3 * 4
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    grown = report["peak"] - report["base"]
    print(
        f"64 MP fit: peak RSS {grown / 2**20:.0f} MiB above the start "
        f"({grown / float32_bytes:.2f} of the float32 image), PSNR by scale "
        f"{report['scale_psnr']}"
    )
    # every scale was fitted over the whole image, and the fit learned something
    assert report["finest"] == 0 and report["mlp_blocks"]["0"] > 0
    psnr = report["scale_psnr"]  # scales 2 and 1 on their own grids, 0 on the full image
    assert all(p is not None and p > 0 for p in psnr) and psnr[2] == pytest.approx(report["psnr"])
    # the bound: the uint8 image itself is 0.25 of the float32 size; one float copy is 1.0
    assert grown < 0.5 * float32_bytes


def test_tiff_is_memory_mapped_when_possible_and_decoded_otherwise(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (20, 25), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "gray16.tif", gray16)
    tifffile.imwrite(tmp_path / "packed.tif", rgb, photometric="rgb", compression="zlib")
    for name, image, mapped in [
        ("rgb.tif", rgb, True),
        ("gray16.tif", gray16, True),
        ("packed.tif", rgb, False),  # compressed: cannot be mapped, decoded instead
    ]:
        sig = read_signal(tmp_path / name, IMAGE)
        assert isinstance(sig.data, np.memmap) == mapped and sig.info["memory_mapped"] == mapped
        expected = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        np.testing.assert_array_equal(np.asarray(sig.data), expected)
        assert sig.value_scale == pytest.approx(1 / np.iinfo(image.dtype).max)


def test_fit_preflight_applies_to_mapped_images(cli, tmp_path):
    _write_big_tiff(tmp_path / "big.tif", 1000, 1000)
    code, _, err = cli("fit", tmp_path / "big.tif", "--max-memory", "100M", "-o", tmp_path / "run")
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "needs ~" in err and "available" in err
