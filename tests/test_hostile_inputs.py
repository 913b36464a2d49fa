"""Hostile inputs (issue 17, section 5 and the smaller items): each gets its own one-line
error, checked with --debug so that the top-level handler alone cannot pass the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import miner3d
from miner3d.grid import GridTransform, OccupancyGrid


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """An occupancy model and an RGBA image model, fitted in memory, saved."""
    root = tmp_path_factory.mktemp("models")
    grid = OccupancyGrid(
        np.pad(np.ones((12, 12, 12), np.uint8), 6), GridTransform((0.0,) * 3, 1.0, (24,) * 3)
    )
    occupancy = miner3d.fit(grid, n_scales=2, max_iters=30)
    occupancy.model.save(root / "occupancy.safetensors")
    rgba = (np.random.default_rng(0).random((40, 40, 4)) * 255).astype(np.uint8)
    image = miner3d.fit(rgba, kind="image", n_scales=2, block=16, max_iters=20)
    image.model.save(root / "rgba.safetensors")
    return root


def _model_file(path, layout, tensors=None, channels=1):
    header = {
        "format": "miner3d-model",
        "version": 1,
        "layout": layout,
        "bank_shape": {
            "in_features": len(layout["shape"]),
            "hidden": 4,
            "hidden_layers": 1,
            "out_features": channels,
            "w0": 30.0,
        },
        "channels": channels,
        "gaussian": False,
        "transform": None,
        "meta": {},
    }
    save_file(tensors or {}, os.fspath(path), metadata={"miner3d": json.dumps(header)})
    return path


def _cases(tmp, models):
    """(argv, the message of this case) for every hostile input of section 5."""
    (tmp / "folder.ply").mkdir()
    os.mkfifo(tmp / "pipe.ply")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp / "inf.yaml").write_text("fit:\n  max_iters: .inf\n")
    header = {"format": "miner3d-grid", "transform": {"origin": "nowhere"}}
    np.savez(tmp / "broken.npz", packed=np.zeros(8, np.uint8), header=np.array(json.dumps(header)))
    header = {
        "format": "miner3d-grid",
        "transform": {"origin": [0, 0, 0], "voxel_size": 1, "shape": [2048] * 3},
    }
    np.savez(
        tmp / "huge.npz", packed=np.zeros(1 << 20, np.uint8), header=np.array(json.dumps(header))
    )
    huge = _model_file(tmp / "huge.safetensors", {"shape": [100000] * 3, "block": 8, "n_scales": 3})
    big = _model_file(tmp / "big.safetensors", {"shape": [8192] * 3, "block": 16, "n_scales": 4})
    missing = _model_file(
        tmp / "missing.safetensors",
        {"shape": [16, 16, 16], "block": 8, "n_scales": 1},
        {"scale0.block_ids": torch.tensor([0]), "scale0.param0": torch.zeros(1, 3, 4)},
    )
    occupancy, rgba = models / "occupancy.safetensors", models / "rgba.safetensors"
    return [
        (["fit", tmp / "folder.ply"], "is a directory"),
        (["fit", tmp / "pipe.ply"], "not a regular file"),
        (["fit", "--config", tmp / "binary.yaml", "--print-config"], "not a text (UTF-8) YAML"),
        (
            ["fit", "--config", tmp / "inf.yaml", "--print-config"],
            "invalid config value fit.max_iters",
        ),
        (["fit", "--set", "fit.block=1e400", "--print-config"], "invalid config value fit.block"),
        (["fit", "--set", "fit.seed=123456789012345678901234", "--print-config"], "seed="),
        (["fit", "--set", "fit.lr=inf", "--print-config"], "invalid config value lr=inf"),
        (["fit", tmp / "broken.npz", "-o", tmp / "r1"], "malformed header"),
        (["fit", tmp / "huge.npz", "-o", tmp / "r2"], "truncated or inconsistent"),
        (["extract", huge, "-o", tmp / "h.ply"], "more than 2^40 samples"),
        (["extract", missing, "-o", tmp / "m.ply"], "tensor scale0.param1 is missing"),
        (["extract", big, "-o", tmp / "b.ply"], "is available"),
        (["extract", occupancy, "-o", tmp / "r.ply", "-r", "8192"], "is available"),
        (["extract", rgba, "-o", tmp / "x.png", "-r", "100000x100000"], "is available"),
        (["extract", rgba, "-o", tmp / "x.jpg"], "JPEG holds gray or RGB images"),
    ]


def test_every_hostile_input_gets_its_own_one_line_error(cli, expect_error, small_models, tmp_path):
    for argv, needle in _cases(tmp_path, small_models):
        code, _, err = cli(*argv, "--debug")
        expect_error(code, err, needle)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_eval_counts_must_be_positive(small_models, capsys):
    from miner3d.cli import main

    for flag in ("--points", "--surface"):
        for value in ("0", "-5"):
            with pytest.raises(SystemExit) as info:
                main(["eval", str(small_models / "occupancy.safetensors"), flag, value])
            assert info.value.code == 2
            assert "must be at least 1" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_unless_debug(cli, monkeypatch, meshes_dir):
    import miner3d.commands

    def broken(args):
        raise RuntimeError("something deep\nand more")

    monkeypatch.setattr(miner3d.commands, "cmd_presets", broken)
    from miner3d.cli import _build_parser

    parser = _build_parser()
    monkeypatch.setattr("miner3d.cli._build_parser", lambda: _retarget(parser, broken))
    code, _, err = cli("presets")
    assert code == 1 and err.count("\n") == 1
    assert "unexpected RuntimeError: something deep" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        cli("presets", "--debug")


def _retarget(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["presets"].set_defaults(func=func)
    return parser


def test_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.run(
        f"{sys.executable} -m miner3d presets | head -c 3",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_huge_coordinates_are_not_called_flat(cli, expect_error, tmp_path):
    mesh = tmp_path / "far.obj"
    mesh.write_text("v 0 0 0\nv 1e308 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 2 4\nf 2 3 4\n")
    code, _, err = cli("voxelize", mesh, "-r", 32, "-o", tmp_path / "g.npz")
    expect_error(code, err, "too large")


def test_force_with_a_bad_input_keeps_the_old_run(cli, expect_error, meshes_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "-r", 32, "--iters", 30, "-o", out, "-q")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.obj"
    bad.write_text("# nothing\n")
    code, _, err = cli("fit", bad, "-o", out, "--force", "-q")
    expect_error(code, err, "no triangles")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failed_fit_leaves_nothing_behind(cli, expect_error, meshes_dir, tmp_path):
    out = tmp_path / "fresh"
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "-o", out, "--max-memory", "1MB")
    expect_error(code, err, "is available")
    assert not out.exists()
    code, _, err = cli("fit", meshes_dir / "teapot.obj", "-r", 32, "--iters", 20, "-o", out, "-q")
    assert code == 0, err  # the same command again: no --force needed


def test_eval_reads_the_models_mesh_only_if_it_is_the_fitted_file(
    cli, expect_error, meshes_dir, tmp_path
):
    import shutil

    mesh = tmp_path / "teapot.obj"
    shutil.copy(meshes_dir / "teapot.obj", mesh)
    out = tmp_path / "run"
    code, _, err = cli("fit", mesh, "-r", 32, "--iters", 20, "-o", out, "-q")
    assert code == 0, err
    (out / "grid.npz").unlink()
    mesh.write_text(open(meshes_dir / "fandisk.obj").read())  # another file at that path
    code, _, err = cli("eval", out / "model.safetensors", "--points", 1000, "--surface", 100)
    expect_error(code, err, "nothing to compare with")


def test_cgroup_headroom_reads_the_own_cgroup_and_its_parents(tmp_path):
    from miner3d.memory import cgroup_headroom

    proc = tmp_path / "cgroup"
    proc.write_text("0::/jobs/job1\n")
    root = tmp_path / "fs"
    (root / "jobs" / "job1").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "jobs" / "memory.max").write_text(f"{8 << 30}\n")
    (root / "jobs" / "memory.current").write_text(f"{1 << 30}\n")
    (root / "jobs" / "job1" / "memory.max").write_text(f"{6 << 30}\n")
    (root / "jobs" / "job1" / "memory.current").write_text(f"{1 << 30}\n")
    assert cgroup_headroom(str(proc), str(root)) == 5 << 30
    (root / "jobs" / "memory.current").write_text(f"{4 << 30}\n")  # the parent is tighter
    assert cgroup_headroom(str(proc), str(root)) == 4 << 30
    proc.write_text("4:memory:/a\n")
    (root / "memory" / "a").mkdir(parents=True)
    (root / "memory" / "a" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (root / "memory" / "a" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert cgroup_headroom(str(proc), str(root)) == 1 << 30


@pytest.mark.slow
def test_a_large_image_is_sized_by_the_budget_not_a_bomb_guard(tmp_path):
    from PIL import Image

    from miner3d.errors import OutOfMemoryError
    from miner3d.io import read_image

    path = tmp_path / "wide.png"
    Image.new("L", (20000, 10000)).save(path)  # 200 MP: beyond PIL's decompression-bomb guard
    with pytest.raises(OutOfMemoryError, match="decoding the 20000x10000x1 image"):
        read_image(path, max_memory=100 << 20)
    image, mapped = read_image(path)
    assert image.shape == (1, 10000, 20000) and not mapped
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard is restored for everyone else


def test_an_unreadable_input(cli, expect_error, meshes_dir, tmp_path, monkeypatch):
    # root reads every file, so the permission is denied through os.access, as for a user
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if str(path).endswith("locked.obj") else real_access(path, mode),
    )
    locked = tmp_path / "locked.obj"
    locked.write_text((meshes_dir / "teapot.obj").read_text())
    code, _, err = cli("fit", locked, "-o", tmp_path / "run", "--debug")
    expect_error(code, err, "permission denied")
    assert not (tmp_path / "run").exists()
