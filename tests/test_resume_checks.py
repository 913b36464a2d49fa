"""--resume verifies before it continues (issue 17): the input's SHA-256, config.yaml against
the checkpoint and grid.npz, the checkpoint's integrity (falling back to the previous one),
what a resume may change, and leftovers of a killed write."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import yaml

import miner3d
from miner3d.checkpoint import load_checkpoint
from miner3d.errors import FitInterrupted


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, meshes_dir):
    """A run of a copy of the teapot stopped by SIGINT mid scale 1, with two checkpoints."""
    root = tmp_path_factory.mktemp("interrupted")
    mesh = root / "teapot.obj"
    shutil.copy(meshes_dir / "teapot.obj", mesh)
    out = root / "run"
    sent = []

    def progress(record):
        if record.get("scale") == 1 and record.get("iteration", 0) >= 60 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # the fit's own handler takes it

    with pytest.raises(FitInterrupted) as info:
        miner3d.fit(
            mesh,
            output=out,
            resolution=40,
            max_iters=200,
            checkpoint_iterations=25,
            mesh_scales="none",
            progress=progress,
        )
    assert info.value.exit_code == 130 and "SIGINT" in str(info.value)
    assert (out / "checkpoint.safetensors").exists() and (
        out / "checkpoint.prev.safetensors"
    ).exists()
    return root


@pytest.fixture
def run(interrupted, tmp_path):
    """A fresh copy of the interrupted run (and of its input, at the same path)."""
    copy = tmp_path / "run"
    shutil.copytree(interrupted / "run", copy)
    info = json.loads((copy / "run.json").read_text())
    mesh = tmp_path / "teapot.obj"
    shutil.copy(interrupted / "teapot.obj", mesh)
    info["source"] = str(mesh)
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def _edit_config(run, section, key, value):
    config = yaml.safe_load((run / "config.yaml").read_text())
    (config[section] if section else config)[key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("fit", "n_scales", 2, "fit.n_scales"),
        ("fit", "block", 4, "fit.block"),
        ("fit", "hidden", 16, "fit.hidden"),
        (None, "resolution", 32, "resolution"),
    ],
)
def test_an_edited_config_names_the_field(run, section, key, value, field):
    _edit_config(run, section, key, value)
    with pytest.raises(miner3d.MinerError, match=f"{field} is {value}"):
        miner3d.resume(run)


def test_a_grid_of_another_resolution_is_refused_without_a_checkpoint(run):
    for name in ("checkpoint.safetensors", "checkpoint.prev.safetensors"):
        (run / name).unlink()
    _edit_config(run, None, "resolution", 32)
    with pytest.raises(miner3d.MinerError, match="voxelized with resolution 40"):
        miner3d.resume(run)


def test_a_changed_input_is_refused_unless_allowed(run):
    source = json.loads((run / "run.json").read_text())["source"]
    with open(source, "a") as fh:
        fh.write("\n# edited\n")
    with pytest.raises(miner3d.MinerError, match="--allow-changed-input"):
        miner3d.resume(run)
    result = miner3d.resume(run, allow_changed_input=True)
    assert result.summary["iou"] > 0.9


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{not json", "could not read"), ('{"source": 3}', "must name the source")],
)
def test_a_malformed_run_json(run, content, needle):
    (run / "run.json").write_text(content)
    with pytest.raises(miner3d.MinerError, match=needle):
        miner3d.resume(run)


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(run):
    previous = load_checkpoint(run / "checkpoint.prev.safetensors").state["iteration"]
    data = bytearray((run / "checkpoint.safetensors").read_bytes())
    data[-100:] = bytes(100)  # the tensors' bytes change; the header still parses
    (run / "checkpoint.safetensors").write_bytes(bytes(data))
    notes = []
    result = miner3d.resume(run, banner=notes.append)
    assert any("skipped checkpoint.safetensors" in n and "corrupt" in n for n in notes), notes
    assert any(f"iteration {previous}" in n for n in notes), notes
    assert result.summary["iou"] > 0.9


def test_a_checkpoint_without_adam_state_is_refused(run, tmp_path):
    from miner3d.io import read_safetensors, write_safetensors

    for name in ("checkpoint.safetensors", "checkpoint.prev.safetensors"):
        state, tensors = read_safetensors(run / name, "miner3d-checkpoint", "checkpoint")
        del state["adam_step"]
        write_safetensors(run / name, tensors, "miner3d-checkpoint", state)
    with pytest.raises(miner3d.MinerError, match="'adam_step' is missing"):
        miner3d.resume(run)


def test_resume_may_change_only_what_is_safe(run):
    with pytest.raises(miner3d.MinerError, match="may change only"):
        miner3d.resume(run, n_scales=2)
    (run / ".checkpoint.safetensors.x1.tmp").write_text("left by a kill")
    result = miner3d.resume(run, lr=1e-3, time_limit=600)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["fit"]["lr"] == 1e-3 and config["fit"]["time_limit"] == 600
    assert result.summary["iou"] > 0.9
    assert not list(run.glob(".*.tmp")) and not list(run.glob("checkpoint*"))
    assert not (run / ".lock").exists()
    assert oct((run / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
