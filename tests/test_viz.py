"""Pictures render off-screen and match a small cached image (pyvista's image-cache approach).

Set MINER3D_UPDATE_IMAGE_CACHE=1 to rewrite the cache after an intended change of a picture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from miner3d.config import FitConfig
from miner3d.train import fit
from miner3d.voxelizer import voxelize_file

CACHE = Path(__file__).parent / "image_cache"
UPDATE = os.environ.get("MINER3D_UPDATE_IMAGE_CACHE") == "1"


@pytest.fixture(scope="module")
def fandisk_fit(meshes_dir):
    grid = voxelize_file(meshes_dir / "fandisk.obj", 32)
    config = FitConfig(n_scales=2, block=8, max_iters=150, prune_mse=2e-3, metric_every=25)
    return fit(grid.occupancy[None], config, transform=grid.transform, device="cpu")


def _compare(rendered: Path, name: str, threshold: float) -> None:
    """pyvista's image comparison (mean edge-filtered pixel error) against the cache."""
    import pyvista as pv

    path = CACHE / name
    if UPDATE:
        Image.open(rendered).save(path)
    if not path.exists():
        pytest.fail(f"no cached image {path}; run with MINER3D_UPDATE_IMAGE_CACHE=1")
    assert Image.open(path).size == Image.open(rendered).size
    error = pv.compare_images(str(path), str(rendered))
    assert error < threshold, f"{name} differs from the cache: error {error:.1f}"
    # and a wrong picture would not pass: compared with its mirror image it fails
    mirrored = rendered.with_name("mirrored.png")
    Image.open(rendered).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    assert pv.compare_images(str(path), str(mirrored)) > threshold


def _not_blank(image: np.ndarray, background_fraction_max: float = 0.97) -> None:
    background = np.all(image == image[0, 0], axis=-1)
    assert background.mean() < background_fraction_max, "the picture is (nearly) blank"


def test_levels_render_offscreen(fandisk_fit, tmp_path):
    from miner3d.viz import render_levels

    image = render_levels(fandisk_fit.model, tmp_path / "levels.png", window_size=(400, 400))
    assert (tmp_path / "levels.png").is_file()
    assert image.shape == (400, 400, 3)
    _not_blank(image)
    tan = (image[..., 0] > 150) & (image[..., 1] > 110) & (image[..., 2] < 140)
    blue = (image[..., 2] > 120) & (image[..., 0] < 110)
    assert tan.mean() > 0.01 and blue.mean() > 0.001  # surfaces and block outlines are drawn
    _compare(tmp_path / "levels.png", "levels_fandisk.png", threshold=500)


def test_history_plot(fandisk_fit, tmp_path):
    from miner3d.rundir import write_metrics_csv
    from miner3d.viz import plot_history

    # the fit's own history has wall times that vary run to run: plot it (through the CSV),
    # but compare a fixed history with the cache
    write_metrics_csv(tmp_path / "metrics.csv", fandisk_fit.history)
    _not_blank(plot_history(tmp_path / "metrics.csv", tmp_path / "fit.png"), 0.95)
    history = [
        {
            "event": "iteration",
            "time": 0.1 * i,
            "scale": 1 if i < 10 else 0,
            "iou": 1 - 0.5 * np.exp(-i / 5),
        }
        for i in range(30)
    ]
    history.insert(10, {"event": "scale_end", "time": 0.95, "scale": 1, "iou": 0.8})
    history.append({"event": "scale_end", "time": 3.0, "scale": 0, "iou": 0.999})
    image = plot_history(history, tmp_path / "history.png")
    _not_blank(image, 0.95)
    _compare(tmp_path / "history.png", "history_fandisk.png", threshold=500)


def test_image_levels_picture(tmp_path):
    from skimage import data

    from miner3d.viz import render_image_levels

    camera = torch.from_numpy(data.camera()[::4, ::4].copy())  # (128, 128) grayscale
    config = FitConfig(
        n_scales=2,
        block=32,
        hidden=16,
        hidden_layers=2,
        max_iters=40,
        prune_mse=1e-4,
        freeze_mse=1e-5,
        metric_every=20,
    )
    result = fit(camera[None], config, kind="image", value_scale=1 / 255, device="cpu")
    image = render_image_levels(result.model, tmp_path / "levels.png")
    _not_blank(image, 0.9)
    yellow = (image[..., 0] > 200) & (image[..., 1] > 200) & (image[..., 2] < 80)
    assert yellow.any()  # live blocks outlined
