"""Batch schedulers' signals checkpoint the fit; one writer per run directory (issue 17)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miner3d.checkpoint import load_checkpoint
from miner3d.errors import MinerError
from miner3d.lock import RunLock
from miner3d.model import MinerModel
from miner3d.rundir import SUMMARY_KEYS


def _fit(out: Path, mesh: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "miner3d", "fit", str(mesh), "-o", str(out), "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_row(metrics: Path) -> dict | None:
    try:
        rows = list(csv.DictReader(metrics.open()))
    except OSError:
        return None
    rows = [r for r in rows if r["event"] == "iteration" and r["iteration"]]
    return rows[-1] if rows else None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_checkpoints_the_current_iteration(tmp_path, meshes_dir, signum):
    out = tmp_path / "run"
    proc = _fit(out, meshes_dir / "lucy.ply", "-r", "64", "--checkpoint-every", "100m")
    deadline = time.monotonic() + 120
    row = None
    while time.monotonic() < deadline and proc.poll() is None:
        row = _last_row(out / "metrics.csv")  # appended live
        if row is not None and row["scale"] == "1" and int(row["iteration"]) >= 100:
            break
        time.sleep(0.05)
    assert row is not None and proc.poll() is None, "the fit ended before the signal"
    seen = int(row["iteration"])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], err
    assert f"miner3d fit --resume {out}" in lines[0]
    state = load_checkpoint(out / "checkpoint.safetensors").state
    assert state["scale"] == 1 and state["iteration"] >= seen
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["stop_detail"] in lines[0]
    assert summary["measured_at"]["scale"] == 1 and 0.5 < summary["measured_at"]["level_iou"] <= 1
    assert set(summary) <= set(SUMMARY_KEYS)
    resumed = subprocess.run(
        [sys.executable, "-m", "miner3d", "fit", "--resume", str(out), "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iou"] >= 0.99 and summary["stopped"] != "interrupted"


@pytest.mark.slow
def test_two_writers_of_one_run_directory(tmp_path, meshes_dir):
    out = tmp_path / "run"
    for trial in range(2):
        procs = [
            _fit(out, meshes_dir / name, "-r", "32", "--iters", "100")
            for name in ("teapot.obj", "fandisk.obj")
        ]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        winners = [r for r in results if r[0] == 0]
        assert len(winners) <= 1, results
        for code, err in results:
            if code != 0:
                assert "in use by PID" in err or "exists" in err, err
        if winners:
            run = json.loads((out / "run.json").read_text())
            summary = json.loads((out / "summary.json").read_text())
            model = MinerModel.load(out / "model.safetensors")
            assert run["sha256"] == summary["input"]["sha256"] == model.meta["source_sha256"]
        assert not (out / ".lock").exists()
        for path in out.iterdir() if trial == 0 else []:
            path.unlink()


def test_the_lock_names_its_holder_and_expires_with_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(MinerError, match=f"in use by PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (tmp_path / ".lock").write_text(json.dumps({"host": host, "pid": dead.pid, "started": "x"}))
    with RunLock(tmp_path):  # stale: its process is gone
        pass
    other = {"host": "elsewhere", "pid": 1, "started": "yesterday"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    with pytest.raises(MinerError, match="--break-lock"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path, break_lock=True):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_an_unreadable_lock_is_never_taken_over_silently(tmp_path):
    # a lock being written by another process must not look stale (this race once let two
    # writers both finish); only --break-lock takes it
    (tmp_path / ".lock").write_text("")
    with pytest.raises(MinerError, match="in use by PID"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path, break_lock=True):
        pass
    assert not list(tmp_path.glob(".lock*"))


TAKER = """
import os, sys, time
from pathlib import Path
from miner3d import lock as L
from miner3d.errors import MinerError
from miner3d.lock import RunLock
alive = L._alive  # slowed down: every taker judges the holder dead before any acts on it
L._alive = lambda *a: (time.sleep(0.2), alive(*a))[1]
run, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
try:
    lock = RunLock(run).acquire()
except MinerError:
    print("busy")
else:
    print("got")
    time.sleep(3.0)  # held until every other taker has decided
    lock.release()
"""


@pytest.mark.slow
def test_of_many_takers_of_one_stale_lock_exactly_one_wins(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    for trial in range(3):
        run = tmp_path / f"run{trial}"
        run.mkdir()
        (run / ".lock").write_text(json.dumps({"host": host, "pid": dead.pid, "started": "x"}))
        go = tmp_path / f"go{trial}"
        ready = [tmp_path / f"ready{trial}.{i}" for i in range(6)]
        takers = [
            subprocess.Popen(
                [sys.executable, "-c", TAKER, str(run), str(go), str(flag)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for flag in ready
        ]
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.01)  # every taker is waiting at the barrier
        go.touch()
        said = [p.communicate(timeout=60)[0].strip() for p in takers]
        assert sorted(said) == ["busy"] * 5 + ["got"], said
        assert not (run / ".lock").exists()
