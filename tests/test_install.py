"""A plain, non-editable install works outside the repository: presets and the default mesh
are found from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_packaged_lucy_is_the_repositorys():
    """The default mesh ships as package data; the source is meshes/lucy.ply. (The wheel's copy
    is compared in the install test below.)"""
    from miner3d.resources import configs_dir, default_mesh

    assert default_mesh().read_bytes() == (ROOT / "meshes" / "lucy.ply").read_bytes()
    assert {p.name for p in configs_dir().glob("*.yaml")} >= {"cpu.yaml", "lucy.yaml", "image.yaml"}


@pytest.mark.slow
def test_non_editable_install_fits_from_an_empty_directory(tmp_path):
    import shutil

    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "miner3d", "configs", "meshes"):
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, source],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    # -S: no site processing, so the development checkout's editable-install hook is not
    # loaded; the dependencies come from this interpreter's site-packages, miner3d from target
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-S", *argv], capture_output=True, text=True, cwd=empty, env=env
        )

    where = run(
        "-c", "import miner3d.resources as r; print(r.configs_dir()); print(r.default_mesh())"
    )
    assert where.returncode == 0, where.stderr
    configs, mesh = (Path(line) for line in where.stdout.split())
    assert configs.is_relative_to(target) and mesh.is_relative_to(target)
    assert mesh.read_bytes() == (ROOT / "meshes" / "lucy.ply").read_bytes()
    presets = run("-m", "miner3d", "presets")
    assert presets.returncode == 0 and "cpu" in presets.stdout, presets.stderr
    fit = run("-m", "miner3d", "fit", "--resolution", "32", "--iters", "30", "-q", "-o", "out")
    assert fit.returncode == 0, fit.stderr
    assert (empty / "out" / "summary.json").is_file() and (
        empty / "out" / "mesh_scale0.ply"
    ).is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["out"]
