"""The benchmark scripts run (tiny settings, CPU); their figures are not asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.slow  # every script runs in a subprocess


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, check=False, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_gpu_script_on_cpu(tmp_path):
    out = _run(
        "scripts/bench_gpu.py",
        "--device",
        "cpu",
        "--resolution",
        "48",
        "--preset",
        "cpu",
        "--cap",
        "60",
        "--target",
        "0.99",
        "--json",
        str(tmp_path / "g.json"),
    )
    assert "time to IoU 0.99:" in out and "peak GPU memory" in out
    assert (tmp_path / "g.json").is_file()


def test_bench_fit_harness_runs_each_baseline(tmp_path):
    out = _run(
        "scripts/bench_fit.py",
        "--resolution",
        "32",
        "--cap",
        "8",
        "--methods",
        "miner",
        "kilonerf",
        "siren",
        "miner-gaussian",
        "hashgrid-t16",
        "--set",
        "max_iters=60",
        "--csv",
        str(tmp_path / "b.csv"),
        "--plot",
        str(tmp_path / "b.png"),
    )
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert len(lines) == 6 and "failed" not in out
    assert (tmp_path / "b.png").is_file()


def test_bench_voxelize_script(tmp_path):
    out = _run(
        "scripts/bench_voxelize.py",
        "--meshes",
        "meshes/fandisk.obj",
        "--resolutions",
        "32",
        "--routes",
        "miner3d-robust",
        "open3d",
        "--repeat",
        "1",
    )
    assert "miner3d-robust" in out and "open3d" in out


def test_eval_iou_script(tmp_path):
    out = _run(
        "scripts/eval_iou.py",
        "meshes/fandisk.obj",
        "meshes/rocker-arm.obj",
        "--resolution",
        "32",
        "--points",
        "20000",
        "--surface",
        "5000",
        "-o",
        str(tmp_path / "e.csv"),
    )
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert rows[0].startswith("mesh,resolution,scale,params")
    assert len(rows) == 1 + 2 * 3  # two meshes, three scales each (cpu preset)
    assert "fandisk.obj" in out


def test_bench_fit_harness_on_an_image(tmp_path):
    import imageio.v3 as iio
    from skimage import data

    iio.imwrite(tmp_path / "a.png", data.astronaut()[:128, :160])
    _run(
        "scripts/bench_fit.py",
        "--image",
        str(tmp_path / "a.png"),
        "--cap",
        "8",
        "--methods",
        "miner",
        "kilonerf",
        "siren",
        "--set",
        "max_iters=40",
        "--csv",
        str(tmp_path / "i.csv"),
    )
    lines = (tmp_path / "i.csv").read_text().splitlines()
    assert lines[0].startswith("method,lr,params,final_psnr") and len(lines) == 4


def test_llvm_layer_kernel_agrees_with_double_precision():
    """The LLVM IR layer prototype (product alone, and with its bias, sine and derivative)
    computes what it claims: within 1e-4 of float64 (float32 products of pre-activations up
    to about 150), at two widths and tile heights (20 by 4 rows, 22 by 2)."""
    for args in (("--rows", "4"), ("--hidden", "22", "--points", "32", "--rows", "2")):
        out = _run("scripts/bench_llvm_layer.py", "--blocks", "5", "--repeat", "2", *args)
        errors = [float(e) for e in re.findall(r"error ([0-9.e+-]+),", out)]
        assert len(errors) == 2 and max(errors) < 1e-4, out


def test_bench_bank_and_volume_scripts():
    out = _run("scripts/bench_bank.py", "--blocks", "0.01", "--repeat", "1")
    assert "GFLOP/s" in out and out.count("% |") == 3
    out = _run("scripts/bench_volume.py", "--size", "24", "--lucy", "32")
    assert out.count(" dB | ") == 4


def test_rank_scripts(tmp_path):
    out = _run("scripts/plan_ranks.py", "--resolution", "48")
    assert "| ranks | predicted fit s | speed-up |" in out and "| 256 |" in out
    assert "| 0 | 2 | " in out and "| 2 | 256 | " in out
    out = _run("scripts/bench_ranks.py", "--resolution", "48", "--set", "fit.max_iters=30")
    assert "| 1 process, 2 threads |" in out and "| 2 ranks, 1 thread each |" in out


def test_lattice_mesh_is_a_watertight_high_genus_solid(tmp_path):
    import trimesh

    out = _run("scripts/lattice_mesh.py", str(tmp_path / "l.ply"), "-n", "60", "--cells", "3")
    mesh = trimesh.load(tmp_path / "l.ply")
    assert "watertight True" in out and mesh.is_watertight
    assert mesh.euler_number < -2  # 3 x 3 x 3 cells: 2 x 2 beams an axis inside the box


def test_bench_compact_reports_float16_weights(tmp_path):
    run = tmp_path / "run"
    _run("-m", "miner3d", "fit", "meshes/teapot.obj", "--resolution", "32", "-o", str(run))
    out = _run("scripts/bench_compact.py", str(run))
    row = out.strip().splitlines()[-1].split("|")
    f32, f16, iou32, iou16 = float(row[4]), float(row[5]), float(row[9]), float(row[10])
    assert f16 < f32 and iou32 > 0.9 and abs(iou32 - iou16) < 0.01


def test_bench_compile_times_the_banks_own_forward():
    """The compile benchmark's step computes what the bank computes (checked eagerly: CI
    has no compiler to promise)."""
    import importlib.util

    import torch

    from miner3d.bank import BankShape, MLPBank

    path = ROOT / "scripts" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = BankShape(2, 8, 2, 3, 30.0)
    bank = MLPBank.for_blocks(shape, torch.arange(5), 0, 0)
    coords = torch.rand(16, 2) * 2 - 1
    target = torch.rand(5, 16, 3)
    expected = (bank.forward(coords) - target).square().mean(dim=(1, 2)).sum()
    got = module.loss_of(coords, target, shape, *bank.params)
    assert torch.allclose(got, expected)


def test_gpu_checks_script_runs_its_checks_on_a_cpu(tmp_path):
    """The script a session lent a GPU runs first: here on the CPU, small, every check must
    pass (the one-rank and two-rank fits equal the single process's parameters)."""
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "QUICK": "1",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
    }
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # its torchrun ranks: loopback only
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_checks.sh")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    names = ["test_gpu", "bench_bank", "bench_gpu", "one_process", "torchrun_1"]
    names += ["torchrun_2_gloo", "compare"]
    assert summary[1:] == [f"{name}: ok" for name in names]
    compare = (tmp_path / "out" / "compare.txt").read_text()
    assert "r1: world_size 1" in compare and "r2gloo: world_size 2" in compare
    assert compare.count("(equal)") == 2  # on a CPU two ranks give the same parameters too
