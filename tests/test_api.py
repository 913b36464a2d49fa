"""The Python API, spelled exactly as the README documents it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

import miner3d


@pytest.fixture(scope="module")
def teapot_run(tmp_path_factory, meshes_dir):
    out = tmp_path_factory.mktemp("api") / "teapot"
    result = miner3d.fit(meshes_dir / "teapot.obj", resolution=64, output=out, mesh_scales="none")
    return result, out


def test_fit_load_query_mesh_as_documented(teapot_run, meshes_dir):
    result, out = teapot_run
    assert result.summary["iou"] >= 0.99 and result.run_dir == out
    assert isinstance(result.model, miner3d.Model) and result.model.kind == "occupancy"
    model = miner3d.load(out / "model.safetensors")
    assert model.kind == "occupancy" and model.transform is not None
    lo, hi = trimesh.load(meshes_dir / "teapot.obj", force="mesh").bounds
    points = lo + np.random.default_rng(0).random((500, 3)) * (hi - lo)
    values = model.query(points)
    assert values.shape == (500, 1) and values.dtype == np.float32
    np.testing.assert_allclose(values, result.model.query(points), atol=1e-6)
    coarse = model.query(points, lod=1)
    assert coarse.shape == (500, 1) and not np.allclose(coarse, values)
    mesh = model.mesh(lod=0)
    assert isinstance(mesh, trimesh.Trimesh) and mesh.is_watertight
    np.testing.assert_allclose(mesh.bounds, [lo, hi], atol=0.05 * (hi - lo).max())
    with pytest.raises(miner3d.MinerError, match="image models"):
        model.image()
    with pytest.raises(miner3d.MinerError, match="lod must be in"):
        model.query(points, lod=7)


def test_voxelize_returns_a_grid(meshes_dir):
    grid = miner3d.voxelize(meshes_dir / "teapot.obj", 48)
    assert isinstance(grid, miner3d.OccupancyGrid) and max(grid.shape) == 48
    assert grid.occupancy.dtype == np.uint8 and 0 < grid.filled_fraction < 1


def test_fit_without_output_writes_nothing(tmp_path, monkeypatch, meshes_dir):
    monkeypatch.chdir(tmp_path)
    grid = miner3d.voxelize(meshes_dir / "teapot.obj", 32)
    result = miner3d.fit(grid, max_iters=60, n_scales=2)
    assert result.run_dir is None and result.summary["model_bytes"] > 0
    assert result.summary["input"] == {
        "source": "<array>",
        "sha256": result.summary["input"]["sha256"],
        "kind": "grid",
        "signal_kind": "occupancy",
    }
    assert list(tmp_path.iterdir()) == []
    mesh = result.model.mesh()
    assert len(mesh.faces) > 0


def test_image_array_with_explicit_kind(tmp_path, monkeypatch):
    from skimage import data

    monkeypatch.chdir(tmp_path)
    image = data.astronaut()[::4, ::4]  # (128, 128, 3) uint8, channels last
    result = miner3d.fit(image, kind="image", max_iters=80, n_scales=2, block=16)
    assert result.model.kind == "image" and result.summary["psnr"] > 20
    picture = result.model.image(lod=0)
    assert picture.shape == (128, 128, 3) and picture.dtype == np.float32
    assert 0 <= picture.min() and picture.max() <= 1
    assert result.model.image(lod=1).shape == (64, 64, 3)
    gray = miner3d.fit(image[..., 0], kind="image", max_iters=20, n_scales=1, block=16)
    assert gray.model.image().shape == (128, 128, 1)
    with pytest.raises(miner3d.MinerError, match="for occupancy and volume models"):
        result.model.mesh()
    assert list(tmp_path.iterdir()) == []


def test_an_ambiguous_array_is_a_clear_error():
    with pytest.raises(miner3d.MinerError, match="ambiguous: pass kind="):
        miner3d.fit(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(miner3d.MinerError, match=r"\(H, W\) or \(H, W, C\)"):
        miner3d.fit(np.zeros((4, 4, 4, 4), np.uint8), kind="image")
    with pytest.raises(miner3d.MinerError, match="is constant"):
        miner3d.fit(np.zeros((8, 8, 8), np.float32), kind="volume")
    with pytest.raises(miner3d.MinerError, match="max_memory: not a size"):
        miner3d.fit(np.zeros((8, 8, 8), np.uint8), kind="occupancy", max_memory="lots")
    with pytest.raises(miner3d.MinerError, match="unknown config field 'nonsense'"):
        miner3d.fit(np.zeros((8, 8, 8), np.uint8), kind="occupancy", nonsense=1)


def test_effective_config_follows_kind_and_overrides(meshes_dir):
    config = miner3d.effective_config(meshes_dir / "lucy.ply", overrides={"lr": 5e-3})
    assert config.preset in ("cpu", "lucy") and config.fit.lr == 5e-3
    assert miner3d.effective_config("x.png").preset == "image"
    assert miner3d.effective_config("x.png", kind="occupancy", preset="cpu").preset == "cpu"


def test_summary_says_why_the_fit_stopped_and_where_the_time_went():
    solid = np.zeros((32, 32, 32), np.uint8)
    solid[8:24, 6:26, 10:22] = 1
    done = miner3d.fit(solid, kind="occupancy", max_iters=40).summary
    stages = [done[f"seconds_{k}"] for k in ("setup", "fitting", "measuring")]
    assert min(stages) >= 0 and done["seconds_outputs"] >= 0
    assert abs(sum(stages) - done["seconds_fit"]) <= 0.1 * done["seconds_fit"] + 0.05
    assert set(done["scale_stop_reasons"]) == {"0", "1", "2"}
    assert done["stopped"] in ("all_frozen", "max_iters", "plateau")
    assert done["stopped"] == done["scale_stop_reasons"]["0"]
    assert set(done["scale_stop_reasons"].values()) <= {"all_frozen", "max_iters", "plateau"}
    capped = miner3d.fit(
        solid,
        kind="occupancy",
        max_iters=400,
        target=0.5,
        metric_every=5,
        freeze_mse=1e-12,
        prune_mse=1e-12,
    )
    assert capped.summary["stopped"] == "target"
    assert capped.summary["scale_stop_reasons"]["0"] == "target"


def test_large_grids_on_a_cpu_start_from_the_large_preset(meshes_dir):
    from miner3d.config import default_preset

    assert default_preset("occupancy", cuda=False, size=1024) == "cpu-large"
    assert default_preset("occupancy", cuda=False, size=511) == "cpu"
    assert default_preset("occupancy", cuda=True, size=1024) == "lucy"
    assert default_preset("image", cuda=False, size=8192) == "image"
    lucy = meshes_dir / "lucy.ply"
    big = miner3d.effective_config(lucy, overrides={"resolution": 512, "device": "cpu"})
    assert big.preset == "cpu-large" and big.resolution == 512
    assert big.fit.metric_every == 10 and big.fit.max_iters == 400
    assert miner3d.effective_config(lucy, overrides={"resolution": 256}).preset == "cpu"
    assert (
        miner3d.effective_config(lucy, preset="cpu", overrides={"resolution": 1024}).preset == "cpu"
    )
    # an in-memory grid is chosen by its own longest axis
    thin = np.zeros((8, 8, 512), np.uint8)
    thin[2:6, 2:6, 100:400] = 1
    result = miner3d.fit(thin, kind="occupancy", device="cpu", max_iters=5)
    assert result.summary["preset"] == "cpu-large"
    assert miner3d.fit(thin[:, :, :256], kind="occupancy", max_iters=5).summary["preset"] == "cpu"


def test_float16_weights_halve_the_model_and_report_its_own_quality(tmp_path, meshes_dir):
    from miner3d.evaluate import grid_iou
    from miner3d.io import read_safetensors
    from miner3d.model import MinerModel

    grid = miner3d.voxelize(meshes_dir / "lucy.ply", 64)
    args = {"max_iters": 80, "n_scales": 2, "tail": 0}
    full = miner3d.fit(grid, output=tmp_path / "f32", mesh_scales="none", **args)
    half = miner3d.fit(grid, output=tmp_path / "f16", mesh_scales="none", weights="float16", **args)
    _, tensors = read_safetensors(tmp_path / "f16" / "model.safetensors", "miner3d", "model")
    params = [t for k, t in tensors.items() if ".param" in k]
    assert params and all(t.dtype == torch.float16 for t in params)
    assert 0.45 < half.summary["model_bytes"] / full.summary["model_bytes"] < 0.56
    # the same fit until the rounding: the fitted figures are the float32 run's
    assert half.summary["before_rounding"]["iou"] == full.summary["iou"]
    model = MinerModel.load(tmp_path / "f16" / "model.safetensors")
    assert model.weights == "float16"
    stored = grid_iou(model, grid.occupancy, 0).iou(0)
    assert stored == pytest.approx(half.summary["iou"], abs=1e-12)  # the file's own IoU
    assert abs(stored - full.summary["iou"]) < 1e-3
    with pytest.raises(miner3d.MinerError, match="weights"):
        miner3d.fit(grid, weights="bfloat16")
