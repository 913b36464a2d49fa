from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from PIL import Image

from miner3d.checkpoint import load_checkpoint
from miner3d.io import load_mesh

SMALL = ["--resolution", "48", "--iters", "150"]


@pytest.fixture(scope="module")
def lucy_run(tmp_path_factory, meshes_dir):
    out = tmp_path_factory.mktemp("runs") / "lucy"
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "miner3d",
            "fit",
            str(meshes_dir / "lucy.ply"),
            *SMALL,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert code.returncode == 0, code.stderr
    return out, code.stdout


@pytest.mark.slow
def test_fit_writes_a_complete_run(lucy_run):
    out, stdout = lucy_run
    for name in (
        "config.yaml",
        "run.json",
        "grid.npz",
        "model.safetensors",
        "metrics.csv",
        "summary.json",
        "mesh_scale0.ply",
        "mesh_scale1.ply",
        "mesh_scale2.ply",
    ):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iou"] >= 0.99
    assert summary["params"] > 0 and summary["model_bytes"] > 0
    assert summary["compression_ratio"] > 0 and summary["versions"]["torch"]
    assert f"{summary['iou']:.5f}" in stdout and "final IoU" in stdout
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("time,event,scale,iteration,loss")
    assert any(",iteration,0," in line for line in lines)


@pytest.mark.slow
def test_finest_mesh_is_in_the_input_coordinates(lucy_run, meshes_dir):
    out, _ = lucy_run
    mesh = trimesh.load(out / "mesh_scale0.ply", force="mesh")
    source = load_mesh(meshes_dir / "lucy.ply")
    voxel = (source.bounds[1] - source.bounds[0]).max() / 44  # 48 voxels, 2 of margin a side
    np.testing.assert_allclose(mesh.bounds, source.bounds, atol=2 * voxel)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(source.volume, rel=0.15)


def test_overrides_reach_the_written_config(cli, meshes_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(
        "fit",
        meshes_dir / "fandisk.obj",
        "--resolution",
        32,
        "--scales",
        2,
        "--block",
        16,
        "--features",
        12,
        "--layers",
        1,
        "--iters",
        200,
        "--set",
        "fit.prune_mse=1e-3",
        "--set",
        "mesh_scales=finest",
        "-o",
        out,
        "--quiet",
    )
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["resolution"] == 32
    assert (
        config["fit"]
        | {
            "n_scales": 2,
            "block": 16,
            "hidden": 12,
            "hidden_layers": 1,
            "max_iters": 200,
            "prune_mse": 1e-3,
        }
        == config["fit"]
    )
    assert sorted(p.name for p in out.glob("mesh_*")) == ["mesh_scale0.ply"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "fit.block=12"], "invalid config value block=12"),
        (["--set", "fit.lr=fast"], "invalid config value fit.lr='fast'"),
        (["--set", "fit.blocksize=16"], "unknown config field 'fit.blocksize'"),
        (["--set", "resolution"], "--set takes field=value"),
        (["--preset", "gpu"], "unknown preset 'gpu'"),
        (["--resolution", "5"], "resolution"),
        (["--max-memory", "1MB"], "try --resolution"),
    ],
)
def test_bad_config_values(cli, meshes_dir, tmp_path, args, needle, expect_error):
    out = tmp_path / "run"
    code, _, err = cli("fit", meshes_dir / "lucy.ply", *args, "-o", out, "--quiet")
    expect_error(code, err, needle)
    assert not (out / "model.safetensors").exists()


def test_bad_inputs(cli, tmp_path, meshes_dir, expect_error):
    code, _, err = cli("fit", tmp_path / "missing.ply", "-o", tmp_path / "a")
    expect_error(code, err, "input not found")
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = cli("fit", tmp_path / "notes.txt", "-o", tmp_path / "b")
    expect_error(code, err, "unknown input extension")
    (tmp_path / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nnonsense")
    code, _, err = cli("fit", tmp_path / "broken.ply", "-o", tmp_path / "c")
    expect_error(code, err, "could not read mesh")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = cli("fit", tmp_path / "broken.png", "-o", tmp_path / "d")
    expect_error(code, err, "could not read image")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, _, err = cli("fit", meshes_dir / "lucy.ply", "-o", blocker / "run")
    expect_error(code, err, "cannot write")


@pytest.mark.slow
def test_existing_run_is_never_overwritten(cli, lucy_run, meshes_dir, expect_error):
    out, _ = lucy_run
    before = (out / "model.safetensors").read_bytes()
    code, _, err = cli("fit", meshes_dir / "lucy.ply", "-o", out, "--quiet")
    expect_error(code, err, "--resume")
    code, _, err = cli("fit", "--resume", out, "--quiet")
    expect_error(code, err, "nothing to resume")
    assert (out / "model.safetensors").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cli, meshes_dir, tmp_path, expect_error):
    out = tmp_path / "run"
    code, _, err = cli(
        "fit",
        meshes_dir / "fandisk.obj",
        "--resolution",
        32,
        "--lr",
        "1e30",
        "--set",
        "checkpoint_minutes=1e-9",
        "-o",
        out,
        "--quiet",
    )
    expect_error(code, err, "the loss became")
    checkpoint = load_checkpoint(out / "checkpoint.safetensors")
    failed_at = int(err.split("iteration ")[1].split(" ")[0])
    assert checkpoint.state["iteration"] < failed_at
    assert not (out / "model.safetensors").exists()
    # the hint is a command that works
    hint = err.split("rerun with a lower lr: ")[1].strip()
    assert hint.startswith("miner3d fit ") and "--force --lr 0.001" in hint
    code, _, err = cli(*hint.split()[1:], "--iters", 50, "--quiet")
    assert code == 0, err
    assert (out / "model.safetensors").exists()


def _start_fit(out: Path, meshes_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "miner3d",
            "fit",
            str(meshes_dir / "lucy.ply"),
            "--resolution",
            "48",
            "--iters",
            "3000",
            "--set",
            "fit.freeze_mse=0",
            "--set",
            "fit.plateau_tol=0",
            "--set",
            "checkpoint_minutes=0.001",
            "-o",
            str(out),
            "--quiet",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_mid_scale_checkpoint(out: Path, proc: subprocess.Popen, scale: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        path = out / "checkpoint.safetensors"
        if path.exists():
            state = load_checkpoint(path).state
            if state["scale"] == scale and state["iteration"] > 0:
                return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no mid-scale checkpoint appeared")


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_the_checkpoint(tmp_path, meshes_dir):
    out = tmp_path / "run"
    proc = _start_fit(out, meshes_dir)
    _wait_for_mid_scale_checkpoint(out, proc, scale=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(out / "checkpoint.safetensors").state
    assert state["adam_step"] > 0  # optimiser state is in the checkpoint
    resumed = subprocess.run(
        [sys.executable, "-m", "miner3d", "fit", "--resume", str(out), "--set", "x=1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 2 and "give nothing else" in resumed.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "miner3d", "fit", "--resume", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at scale {state['scale']}, iteration {state['iteration']}" in resumed.stdout
    lines = (out / "metrics.csv").read_text().splitlines()
    resumed_rows = [line for line in lines if ",resumed," in line]
    assert len(resumed_rows) == 1
    assert resumed_rows[0].split(",")[2:4] == [str(state["scale"]), str(state["iteration"])]
    # the history before the kill is kept, and the scale was not restarted
    starts = [line for line in lines if ",scale_start," in line]
    assert [line.split(",")[2] for line in starts] == ["2", "1", "0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iou"] >= 0.99
    # the total counts the session before the kill too: at least fit + load + outputs
    assert summary["seconds_fit"] >= state["elapsed"] > 0
    parts = summary["seconds_fit"] + summary["seconds_load"] + summary["seconds_outputs"]
    assert summary["seconds_total"] >= parts - 0.01


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_cleanly(tmp_path, meshes_dir):
    out = tmp_path / "run"
    proc = _start_fit(out, meshes_dir, "--set", "checkpoint_minutes=100")
    deadline = time.time() + 120
    while not (out / "grid.npz").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # well into the fit
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and f"--resume {out}" in stderr
    assert (out / "checkpoint.safetensors").exists()


@pytest.mark.slow
def test_run_has_pictures(lucy_run):
    out, _ = lucy_run
    for name in ("levels.png", "history.png"):
        image = np.asarray(Image.open(out / name))
        assert image.ndim == 3 and (image[..., :3] != image[0, 0, :3]).any(axis=-1).mean() > 0.03


@pytest.mark.slow
def test_extract_eval_view_subcommands(cli, lucy_run, meshes_dir, tmp_path, expect_error):
    out, _ = lucy_run
    model = out / "model.safetensors"
    code, stdout, err = cli("extract", model, "-o", tmp_path / "m.obj", "--scale", 1)
    assert code == 0, err
    coarse = trimesh.load(tmp_path / "m.obj", force="mesh")
    code, _, err = cli("extract", model, "-o", tmp_path / "fine.stl", "--resolution", 96)
    assert code == 0, err
    fine = trimesh.load(tmp_path / "fine.stl", force="mesh")
    assert fine.is_watertight and len(fine.faces) > len(coarse.faces)
    code, _, err = cli("extract", model, "-o", tmp_path / "m.obj")
    expect_error(code, err, "--force")
    code, _, err = cli("extract", model, "-o", tmp_path / "x.ply", "--scale", 7)
    expect_error(code, err, "--scale")

    code, stdout, err = cli(
        "eval", model, "--points", 20000, "--surface", 5000, "-o", tmp_path / "eval.json"
    )
    assert code == 0, err
    for name in ("iou_grid", "iou_grid_04", "iou_points", "chamfer", "chamfer_pct_diag", "fscore"):
        assert name in stdout
    results = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert results["scales"]["0"]["iou_grid"] == pytest.approx(summary["iou"], abs=1e-12)
    assert results["scales"]["0"]["iou_points"] > 0.75  # 48 voxels across Lucy: coarse
    assert results["scales"]["0"]["chamfer_pct_diag"] < 1.0

    code, _, err = cli(
        "view", model, "--screenshot", tmp_path / "v.png", "--plot", tmp_path / "p.png"
    )
    assert code == 0, err
    assert (tmp_path / "v.png").stat().st_size > 1000 and (tmp_path / "p.png").is_file()
    code, _, err = cli("view", tmp_path / "nope.safetensors")
    expect_error(code, err, "model file not found")


def test_print_config_prints_the_effective_yaml_and_creates_nothing(cli, meshes_dir, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(
        "fit", meshes_dir / "fandisk.obj", "--lr", "3e-3", "--seed", 7, "--print-config", "-o", out
    )
    assert code == 0, err
    config = yaml.safe_load(stdout)
    assert config["preset"] in ("cpu", "lucy") and config["fit"]["lr"] == 3e-3
    assert config["fit"]["seed"] == 7
    assert not out.exists()
    code, stdout, _ = cli("fit", tmp_path / "photo.png", "--print-config")  # need not exist
    assert code == 0 and yaml.safe_load(stdout)["preset"] == "image"
    code, stdout, _ = cli("fit", tmp_path / "x.png", "--kind", "occupancy", "--print-config")
    assert code == 0 and yaml.safe_load(stdout)["preset"] in ("cpu", "lucy")


def test_presets_are_listed_with_their_files(cli):
    code, stdout, err = cli("presets")
    assert code == 0, err
    for name in ("cpu", "lucy", "image"):
        assert any(line.startswith(name) for line in stdout.splitlines())
    assert "cpu.yaml" in stdout and "scales of" in stdout


def test_seed_and_threads_flags(cli, meshes_dir, tmp_path):
    import torch

    before = torch.get_num_threads()
    runs = {}
    try:
        for seed in (1, 1, 2):
            out = tmp_path / f"seed{seed}-{len(runs)}"
            code, _, err = cli(
                "fit",
                meshes_dir / "teapot.obj",
                *SMALL,
                "--scales",
                2,
                "--seed",
                seed,
                "--threads",
                1,
                "--set",
                "mesh_scales=none",
                "-o",
                out,
                "--quiet",
            )
            assert code == 0, err
            assert torch.get_num_threads() == 1
            runs[out.name] = json.loads((out / "summary.json").read_text())["scales"]
    finally:
        torch.set_num_threads(before)
    first, again, other = runs.values()
    assert first == again and first != other  # the seed decides the result, and only it
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "--threads", 0, "--print-config")
    assert code != 0 and "--threads" in err


def test_unknown_or_mismatched_kind(cli, expect_error, meshes_dir, tmp_path):
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "--kind", "volume", "-o", tmp_path / "r")
    expect_error(code, err, "is a mesh or a miner3d grid: an occupancy input")
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "--kind", "texture", "-o", tmp_path / "r")
    expect_error(code, err, "unknown kind 'texture'")
    assert not (tmp_path / "r").exists()
