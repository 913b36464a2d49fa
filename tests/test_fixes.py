"""The bugs a new user met in 0.1 (issue 13), each with the test that failed before its fix."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage import data
from skimage import io as skio

import miner3d
from miner3d.bank import BankShape, MLPBank
from miner3d.blocks import BlockLayout
from miner3d.console import describe_summary, size_versus
from miner3d.metrics import MetricSums
from miner3d.scale import ScaleState
from miner3d.targets import ScaleTargets


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A small image run directory (3 scales of 16^2 blocks)."""
    tmp = tmp_path_factory.mktemp("image")
    skio.imsave(tmp / "photo.png", data.astronaut()[::4, ::4], check_contrast=False)
    out = tmp / "run"
    miner3d.fit(tmp / "photo.png", output=out, block=16, max_iters=40, mesh_scales="finest")
    return out


def test_extract_of_an_image_model_to_a_mesh_format_is_refused(
    cli, expect_error, image_run, tmp_path
):
    code, _, err = cli("extract", image_run / "model.safetensors", "-o", tmp_path / "x.ply")
    expect_error(code, err, "an image model is extracted to .png")
    assert not (tmp_path / "x.ply").exists()


def test_extract_lod_of_an_image_is_that_levels_own_grid(cli, image_run, tmp_path):
    for flag in ("--scale", "--lod"):
        out = tmp_path / f"lod1{flag}.png"
        code, _, err = cli("extract", image_run / "model.safetensors", "-o", out, flag, 1)
        assert code == 0, err
        assert skio.imread(out).shape == (64, 64, 3)  # the 128^2 image at level 1


def test_view_and_eval_never_overwrite_without_force(cli, expect_error, image_run, tmp_path):
    shot = tmp_path / "shot.png"
    shot.write_bytes(b"mine")
    code, _, err = cli("view", image_run / "model.safetensors", "--screenshot", shot)
    expect_error(code, err, "--force")
    assert shot.read_bytes() == b"mine"
    code, _, err = cli("view", image_run / "model.safetensors", "--screenshot", shot, "--force")
    assert code == 0, err and shot.stat().st_size > 1000
    kept = tmp_path / "eval.json"
    kept.write_text("{}")
    code, _, err = cli("eval", image_run / "model.safetensors", "-o", kept)
    expect_error(code, err, "--force")
    assert kept.read_text() == "{}"


def test_view_without_a_display_says_so(cli, expect_error, image_run, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code, _, err = cli("view", image_run / "model.safetensors")
    expect_error(code, err, "--screenshot")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_leaves_no_run_directory(cli, expect_error, meshes_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "--device", "cuda", "-o", out)
    expect_error(code, err, "CUDA")
    assert not out.exists()


def test_the_size_figure_reads_the_right_way_round():
    bigger = {"compression_ratio": 0.0746, "compared_with": "bit-packed grid"}
    assert size_versus(bigger) == "13.4x the size of the bit-packed grid"
    smaller = {"compression_ratio": 4.2, "compared_with": "raw samples"}
    assert size_versus(smaller) == "1/4.2 of the raw samples"


def test_summary_line_after_a_resume_counts_every_session():
    summary = {
        "scales": {"0": {"iou": 0.999}},
        "mlp_blocks": {"0": 10},
        "blocks": {"0": 20},
        "iou": 0.999,
        "params": 1000,
        "model_bytes": 10_000,
        "compression_ratio": 0.5,
        "compared_with": "bit-packed grid",
        "seconds_fit": 72.9,
        "seconds_total": 75.0,
        "peak_rss_bytes": 2**30,
    }
    line = describe_summary(summary)[-1]
    assert "2.0x the size of the bit-packed grid" in line and "fit 72.9 s, total 75.0 s" in line


def test_padding_blocks_never_get_an_mlp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    photo = (rng.random((400, 600, 3)) * 255).astype(np.uint8)  # detail everywhere
    result = miner3d.fit(photo, kind="image", max_iters=5, prune_mse=0.0, freeze_mse=0.0)
    core = result.model.core
    layout = core.layout
    assert layout.padded != layout.shape  # 400 x 600 is padded to 512 x 640
    for j in range(layout.n_scales):
        coords = layout.unravel(j, core.scales[j].block_ids)
        first = coords * layout.block * 2**j  # full-resolution index of each block's corner
        assert bool((first < torch.tensor(layout.shape)).all(dim=1).all()), f"scale {j}"
        inside = np.prod([-(-n // (layout.block * 2**j)) for n in layout.shape])
        assert len(core.scales[j].block_ids) == inside  # prune 0: every real block, no other


def test_the_loss_counts_only_real_samples():
    # one 8 x 8 block of which only the first 3 rows are real: targets 0 there, 1e3 in the
    # padding; the block's MSE must be the mean over the 24 real samples alone
    layout = BlockLayout((3, 8), 8, 1)
    shape = BankShape(2, 4, 1, 1, 30.0)
    bank = MLPBank.create(shape, 1, generator=torch.Generator().manual_seed(0))
    target = torch.full((1, 1, 64), 1e3, dtype=torch.float16)
    target[..., :24] = 0
    mask = layout.valid_mask(0, torch.tensor([0])).flatten(1)
    ids = torch.tensor([0])
    t = ScaleTargets(ids, target, MetricSums(), ids, mask)
    st = ScaleState.start(0, t, bank, 1e-3)
    residuals = SimpleNamespace(at=lambda j, ids, cache, pick: cache.float())
    from miner3d.blocks import local_coordinates

    coords = local_coordinates(8, 2)
    mse = st.step(residuals, coords, None, 1 << 16)
    out = bank.forward(coords).detach()[0, :24, 0]
    assert float(mse[0]) == pytest.approx(float(out.square().mean()), rel=1e-5)


def test_summary_keys_are_all_documented(image_run):
    from miner3d.rundir import SUMMARY_KEYS

    summary = json.loads((image_run / "summary.json").read_text())
    assert set(summary) <= set(SUMMARY_KEYS), set(summary) - set(SUMMARY_KEYS)
