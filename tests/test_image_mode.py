"""The 2D image mode through the same core and the same fit command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data
from skimage import io as skio

FAST = ["--iters", "150", "--set", "fit.metric_every=25"]


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(peak**2 / mse)


def test_rgb_photo(cli, tmp_path):
    image = data.astronaut()[::2, ::2]  # (256, 256, 3) uint8
    skio.imsave(tmp_path / "astronaut.png", image, check_contrast=False)
    out = tmp_path / "run"
    code, stdout, err = cli("fit", tmp_path / "astronaut.png", *FAST, "-o", out)
    assert code == 0, err
    assert "preset image" in stdout and "final PSNR" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "image" and summary["psnr"] >= 30
    assert set(summary["seconds_to_psnr"]) == {"30.0", "35.0", "40.0"}
    assert summary["seconds_to_psnr"]["30.0"] is not None
    recon = skio.imread(out / "recon_scale0.png")
    assert recon.shape == image.shape and recon.dtype == np.uint8
    assert _psnr(recon, image, 255) == pytest.approx(summary["psnr"], abs=0.3)
    from skimage.metrics import structural_similarity

    ssim = structural_similarity(recon, image, channel_axis=-1, data_range=255)
    assert 0.7 < summary["ssim"] <= 1 and summary["ssim"] == pytest.approx(ssim, abs=0.02)
    assert skio.imread(out / "recon_scale2.png").shape == (64, 64, 3)  # level of detail 2
    assert (out / "levels.png").is_file() and (out / "history.png").is_file()
    # the continuous model renders at any size
    code, _, err = cli(
        "extract",
        out / "model.safetensors",
        "-o",
        tmp_path / "big.png",
        "--resolution",
        "512x384",
    )
    assert code == 0, err
    assert skio.imread(tmp_path / "big.png").shape == (384, 512, 3)
    code, _, err = cli("extract", out / "model.safetensors", "-o", tmp_path / "n.png", "-r", 128)
    assert code == 0, err  # N: the longest side, the aspect kept
    assert skio.imread(tmp_path / "n.png").shape == (128, 128, 3)
    code, _, err = cli(
        "extract", out / "model.safetensors", "-o", tmp_path / "bad.png", "-r", "512x"
    )
    assert code != 0 and "N (the longest side) or WxH" in err


def test_sixteen_bit_odd_size_round_trip(cli, tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:37, 0:53]
    image = (30000 + 20000 * np.sin(x / 7.0) * np.cos(y / 5.0)).astype(np.uint16)
    image += rng.integers(0, 50, image.shape, dtype=np.uint16)
    skio.imsave(tmp_path / "depth.png", image, check_contrast=False)
    out = tmp_path / "run"
    code, _, err = cli("fit", tmp_path / "depth.png", *FAST, "--block", 16, "-o", out, "--quiet")
    assert code == 0, err
    recon = skio.imread(out / "recon_scale0.png")
    assert recon.dtype == np.uint16 and recon.shape == (37, 53)
    assert _psnr(recon, image, 65535) > 30


def test_rgba_and_a_tiny_thumbnail(cli, tmp_path):
    rgba = np.dstack([data.astronaut()[:40, :61], np.full((40, 61), 200, np.uint8)])
    skio.imsave(tmp_path / "rgba.png", rgba, check_contrast=False)
    out = tmp_path / "rgba"
    code, _, err = cli("fit", tmp_path / "rgba.png", *FAST, "-o", out, "--quiet")
    assert code == 0, err
    assert skio.imread(out / "recon_scale0.png").shape == (40, 61, 4)
    thumb = data.astronaut()[100:103, 200:205]  # 3 x 5
    skio.imsave(tmp_path / "thumb.png", thumb, check_contrast=False)
    out = tmp_path / "thumb"
    code, _, err = cli("fit", tmp_path / "thumb.png", *FAST, "-o", out, "--quiet")
    assert code == 0, err
    assert skio.imread(out / "recon_scale0.png").shape == (3, 5, 3)
