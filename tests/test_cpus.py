"""How many threads a CPU fit uses: the CPUs this process may use (affinity, cgroup quota)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from miner3d.memory import cgroup_cpu_quota


def test_cgroup_cpu_quota_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    proc.write_text("0::/jobs/job1\n")
    (root / "jobs" / "job1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(proc), str(root)) is None  # no quota anywhere
    (root / "jobs" / "cpu.max").write_text("300000 100000\n")
    (root / "jobs" / "job1" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(str(proc), str(root)) == 1.5  # the tightest, own or above
    proc.write_text("1:cpu,cpuacct:/a\n")
    (root / "cpu" / "a").mkdir(parents=True)
    (root / "cpu" / "a" / "cpu.cfs_quota_us").write_text("200000\n")
    (root / "cpu" / "a" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(str(proc), str(root)) == 2.0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_a_fit_pinned_to_one_cpu_uses_one_thread(tmp_path, meshes_dir):
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "miner3d", "fit"]
    cmd += [str(meshes_dir / "teapot.obj"), "-r", "32", "--iters", "20", "-o", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 thread of 1 usable CPUs" in done.stdout


@pytest.mark.slow
def test_the_voxelizer_does_not_raise_the_fits_thread_count(meshes_dir):
    """torch follows OpenMP's thread count until told one, and numba's parallel voxelizer
    raises OpenMP's to every CPU: a fit asked for one thread (torchrun's OMP_NUM_THREADS=1)
    must keep one through voxelizing."""
    child = (
        "import torch, miner3d\n"
        f"miner3d.fit({str(meshes_dir / 'lucy.ply')!r}, resolution=96, max_iters=3)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_a_fit_drops_to_one_thread_when_its_cpus_are_shared():
    """SharedCpus reads the CPU time the process got against the wall time: a process whose
    two threads get far less than two CPUs' time (here: none, it sleeps) drops to one."""
    import time

    import torch

    from miner3d.memory import SharedCpus

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpus = SharedCpus(window=0.2)
        assert not cpus.check()  # the window has not passed yet
        time.sleep(0.3)
        assert cpus.check() and torch.get_num_threads() == 1 and cpus.threads == 1
        time.sleep(0.3)
        assert not cpus.check()  # once only
        torch.set_num_threads(2)
        busy = SharedCpus(window=0.2, floor=0.3)  # one busy thread is over 0.3 x 2 CPUs
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            pass
        assert not busy.check() and torch.get_num_threads() == 2
        assert not SharedCpus(window=0.0, active=False).check()  # a GPU fit never checks
    finally:
        torch.set_num_threads(before)
