"""CUDA paths (marked ``gpu``: they skip themselves where torch sees no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import miner3d

pytestmark = pytest.mark.gpu


def test_fit_on_cuda_matches_the_cpu_quality(tmp_path, monkeypatch, meshes_dir):
    monkeypatch.chdir(tmp_path)
    grid = miner3d.voxelize(meshes_dir / "lucy.ply", 48)
    on_gpu = miner3d.fit(grid, preset="cpu", device="cuda", max_iters=300)
    on_cpu = miner3d.fit(grid, preset="cpu", device="cpu", max_iters=300)
    assert on_gpu.summary["device"].startswith("cuda")
    assert on_gpu.summary["peak_gpu_bytes"] > 0
    assert on_gpu.summary["iou"] >= 0.99 and on_cpu.summary["iou"] >= 0.99
    assert abs(on_gpu.summary["iou"] - on_cpu.summary["iou"]) < 2e-3
    points = np.random.default_rng(0).random((1000, 3)) * np.array(grid.shape)
    values = on_gpu.model.query(points, grid_coords=True)
    assert values.shape == (1000, 1) and np.isfinite(values).all()


def test_image_fit_on_cuda(tmp_path, monkeypatch):
    from skimage import data

    monkeypatch.chdir(tmp_path)
    result = miner3d.fit(data.astronaut()[::4, ::4], kind="image", device="cuda", max_iters=100)
    assert result.summary["psnr"] > 25 and result.model.image().shape == (128, 128, 3)
