"""Several ranks (issue 15): torchrun with two gloo ranks on loopback against one process."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import miner3d
from miner3d.bank import BankShape, MLPBank, block_uniform
from miner3d.blocks import BlockLayout
from miner3d.checkpoint import load_checkpoint
from miner3d.distributed import Team, backend_for, lost_rank, split_even
from miner3d.errors import MinerError
from miner3d.grid import OccupancyGrid
from miner3d.model import MinerModel
from miner3d.reshard import reshard
from miner3d.sharding import RankBlocks

# a stand-in for `miner3d`: SIGKILL rank KILL_RANK when it starts scale 0's iteration KILL_AT
KILLER = r"""
import os, signal, sys
from miner3d import scale
from miner3d.cli import main

step = scale.ScaleState.step
def killing_step(self, *args, **kwargs):
    if (os.environ["RANK"] == os.environ["KILL_RANK"] and self.scale == 0
            and self.iteration + 1 == int(os.environ["KILL_AT"])):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)
scale.ScaleState.step = killing_step
sys.exit(main())
"""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    return env


def torchrun(*args: str, cwd: Path, script: str | None = None, **env: str):
    """``torchrun --standalone --nproc_per_node 2 -m miner3d ARGS`` (or ``script``)."""
    target = ["-m", "miner3d"] if script is None else [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *target, *map(str, args)],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_process(*args: str, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "miner3d", *map(str, args)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_block_streams_do_not_depend_on_the_company():
    ids = torch.tensor([7, 3, 1000, 42])
    together = block_uniform(5, 2, ids, 33)
    alone = torch.cat([block_uniform(5, 2, ids[i : i + 1], 33) for i in range(4)])
    assert torch.equal(together, alone)
    assert not torch.equal(block_uniform(5, 2, ids, 33), block_uniform(5, 3, ids, 33))
    assert not torch.equal(block_uniform(5, 2, ids, 33), block_uniform(6, 2, ids, 33))
    draws = block_uniform(0, 0, torch.arange(2000), 500)
    assert 0 <= float(draws.min()) and float(draws.max()) < 1
    assert abs(float(draws.mean()) - 0.5) < 0.005 and abs(float(draws.std()) - 12**-0.5) < 0.005


def test_a_blocks_outputs_and_gradients_are_the_same_in_any_company():
    shape = BankShape(3, 22, 2, 1, 30.0)
    bank = MLPBank.for_blocks(shape, torch.arange(9), 0, 0)
    coords = torch.rand(64, 3) * 2 - 1

    def grads(params):
        params = [p.detach().clone().requires_grad_(True) for p in params]
        out = MLPBank(shape, params).forward(coords)
        out.square().mean(dim=(1, 2)).sum().backward()
        return out.detach(), [p.grad for p in params]

    out_all, grad_all = grads(bank.params)
    for rows in (slice(0, 1), slice(3, 5), slice(2, 9)):
        out, grad = grads([p[rows] for p in bank.params])
        assert torch.equal(out, out_all[rows])  # bitwise: a batch of one included
        assert all(torch.equal(g, a[rows]) for g, a in zip(grad, grad_all, strict=True))


class SoloTeam(Team):
    """A team of one that takes the several-ranks paths (its collectives return their input)."""

    @property
    def active(self) -> bool:
        return True

    def sum(self, values):
        return list(values)

    def gather_rows(self, rows):
        return rows

    def all_to_all(self, rows, counts):
        return rows


def _random_model(shape: tuple[int, ...], block: int, scales: int, rows=None):
    """A model whose every scale has MLPs on a random half of its blocks (seeded)."""
    layout = BlockLayout(shape, block, scales)
    model = MinerModel(layout, BankShape(len(shape), 6, 1, 2, 30.0), 2)
    generator = torch.Generator().manual_seed(3)
    banks = {}
    for k in range(scales):
        n = layout.n_blocks(k)
        ids = torch.sort(torch.randperm(n, generator=generator)[: max(1, n // 2)]).values
        banks[k] = (ids, MLPBank.for_blocks(model.bank_shape, ids, 7, k))
    return model, banks


@pytest.mark.parametrize("shape", [(45, 38), (37, 20, 29)])
def test_a_ranks_windows_read_as_the_whole_model(shape):
    """Each share of each scale, read through the windows a rank fetches (its rows plus the
    coarser scales' halo), gives exactly the whole model's values: the coarser base of a
    share's blocks, at every sample and at sample subsets, and the level of detail."""
    whole, banks = _random_model(shape, 4, 4)
    for k, (ids, bank) in banks.items():
        whole.set_scale(k, ids, bank)
    part, _ = _random_model(shape, 4, 4)
    blocks = RankBlocks(part, SoloTeam())
    for k, (ids, bank) in banks.items():
        blocks.finish(k, ids, bank)
    layout = whole.layout
    local = torch.randint(0, 4, (9, len(shape)))
    for s in range(layout.n_scales - 1):
        n = layout.n_blocks(s)
        for world in (2, 3, 7):
            for rank in range(world):
                lo, hi = split_even(n, world, rank)
                ids = torch.arange(lo, hi)
                blocks.focus(s, lo, hi, s + 1)
                base = whole.evaluate_blocks(s, ids, from_scale=s + 1)
                assert torch.equal(part.evaluate_blocks(s, ids, from_scale=s + 1), base)
                assert torch.equal(
                    part.coarser_samples(s, ids, local), whole.coarser_samples(s, ids, local)
                )
                blocks.focus(s, lo, hi, s)
                assert torch.equal(part.evaluate_blocks(s, ids), whole.evaluate_blocks(s, ids))
                if s == 0 and world == 7:  # a rank holds a slab of the finest coarse field
                    held, full = part.residual_field(1), whole.residual_field(1)
                    assert held.shape[1] <= full.shape[1] / 2 and held.shape[2:] == full.shape[2:]
                    assert len(part.scales[0].block_ids) < len(whole.scales[0].block_ids) / 3
    assert blocks.gather() is part  # a team of one is rank 0: the whole model back
    for k, (ids, _) in banks.items():
        assert torch.equal(part.scales[k].block_ids, ids)


def test_a_block_outside_the_window_held_is_an_error():
    model, banks = _random_model((40, 40), 4, 3)
    blocks = RankBlocks(model, SoloTeam())
    for k, (ids, bank) in banks.items():
        blocks.finish(k, ids, bank)
    blocks.focus(1, 0, 2, 1)  # scale 1's first row, and the halo of scale 2
    with pytest.raises(RuntimeError, match="outside"):
        model.evaluate_blocks(1, torch.tensor([model.layout.n_blocks(1) - 1]))
    with pytest.raises(RuntimeError, match="outside"):
        far = torch.tensor([model.layout.n_blocks(0) - 1])
        model.evaluate_blocks(0, far, from_scale=1)


def test_even_split_covers_every_item_once():
    for n in (0, 1, 5, 64, 1001):
        for world in (1, 2, 3, 8):
            runs = [split_even(n, world, r) for r in range(world)]
            assert runs[0][0] == 0 and runs[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
            assert max(b - a for a, b in runs) - min(b - a for a, b in runs) <= 1
    assert Team().sum([1.5, 2]) == [1.5, 2] and Team().gather_text("x") == ["x"]


def test_only_a_failed_collective_reads_as_a_lost_rank():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    assert lost_rank(RuntimeError(gloo))
    assert lost_rank(torch.distributed.DistBackendError("NCCL error"))
    assert not lost_rank(RuntimeError("The size of tensor a (3) must match the size of b (4)"))
    assert not lost_rank(ValueError("gloo"))


def _teapot_args(meshes_dir: Path) -> list:
    """The fit both mesh tests run: the quality plateau off (it reads the clock, and these
    runs are compared exactly)."""
    mesh = meshes_dir / "teapot.obj"
    return [mesh, "--resolution", "64", "--set", "fit.max_iters=150", "--set", "fit.tail=0"]


def _model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_two_ranks_fit_a_mesh_exactly_as_one_process(tmp_path, meshes_dir):
    args = _teapot_args(meshes_dir)
    one = one_process("fit", *args, "-o", "one", "--threads", "1", cwd=tmp_path)
    two = torchrun("fit", *args, "-o", "two", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert "outputs in two" in two.stdout and two.stdout.count("final IoU") == 1  # rank 0 only
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert abs(a["iou"] - b["iou"]) <= 1e-4 and b["iou"] > 0.99
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert [r["rank"] for r in b["ranks"]] == [0, 1]
    assert sum(r["mlp_blocks"] for r in b["ranks"]) == sum(b["mlp_blocks"].values())
    assert min(r["mlp_blocks"] for r in b["ranks"]) > 0
    assert b["peak_rss_bytes"] >= max(r["peak_rss_bytes"] for r in b["ranks"])
    # per-block random streams: the parameters themselves agree, not only the quality
    ta, tb = _model_tensors(tmp_path / "one"), _model_tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.allclose(ta[key].double(), tb[key].double(), atol=1e-5), key
    # the model file is like any other
    model = miner3d.load(tmp_path / "two" / "model.safetensors")
    assert model.mesh(lod=0).is_watertight
    assert not list((tmp_path / "two").glob("checkpoint*"))


@pytest.mark.slow
def test_two_ranks_fit_an_image_as_one_process(tmp_path):
    from PIL import Image

    y, x = np.mgrid[0:192, 0:256]
    rgb = np.stack([x, y, (x * y) % 256], axis=-1) * 0.9
    rgb = (rgb + 20 * np.sin(x / 7.0)[..., None]).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pic.png")
    args = ["pic.png", "--set", "fit.max_iters=120", "--set", "fit.tail=0"]
    one = one_process("fit", *args, "-o", "one", "--threads", "1", cwd=tmp_path)
    two = torchrun("fit", *args, "-o", "two", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert abs(a["psnr"] - b["psnr"]) <= 0.1 and b["psnr"] > 25
    assert b["world_size"] == 2
    assert not list((tmp_path / "two").glob("*.ranks.*"))  # the PNG's raw copy, mapped by all


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_other_paths(tmp_path, meshes_dir):
    """Targets recomputed at each iteration (no cache: the coarser fields read at sample
    subsets), weights shared from the parent blocks, the Gaussian pyramid and float16 model
    files: every path that reads a rank's windows of the coarser scales."""
    args = [
        *_teapot_args(meshes_dir),
        *("--set", "fit.cache_targets=0", "--set", "fit.weight_sharing=true"),
        *("--set", "fit.pyramid=gaussian", "--set", "fit.weights=float16"),
    ]
    one = one_process("fit", *args, "-o", "one", "--threads", "1", cwd=tmp_path)
    two = torchrun("fit", *args, "-o", "two", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert abs(a["iou"] - b["iou"]) <= 1e-4 and b["iou"] > 0.95
    assert a["params"] == b["params"] and a["mlp_blocks"] == b["mlp_blocks"]
    ta, tb = _model_tensors(tmp_path / "one"), _model_tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype
        assert torch.allclose(ta[key].double(), tb[key].double(), atol=1e-3), key


API_RANKS = r"""
import json, os, sys
import torch
import miner3d
result = miner3d.fit(sys.argv[1], resolution=48, output="api", max_iters=40)
line = {"rank": int(os.environ["RANK"]), "model": result.model is not None}
line["group_left"] = not torch.distributed.is_initialized()  # fit ended the group it started
if result.model is not None:
    line["watertight"] = bool(result.model.mesh(lod=0).is_watertight)
print("RESULT " + json.dumps(line))
"""


@pytest.mark.slow
def test_the_api_under_torchrun_returns_the_model_on_rank_0_only(tmp_path, meshes_dir):
    (tmp_path / "api.py").write_text(API_RANKS)
    done = torchrun(meshes_dir / "teapot.obj", cwd=tmp_path, script="api.py")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x[7:]) for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    ranks = {line["rank"]: line for line in lines}
    assert ranks[0] == {"rank": 0, "model": True, "group_left": True, "watertight": True}
    assert ranks[1] == {"rank": 1, "model": False, "group_left": True}
    assert (tmp_path / "api" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_refused_fit_ends_every_rank_with_rank_0s_line_and_leaves_nothing(tmp_path, meshes_dir):
    mesh = meshes_dir / "teapot.obj"
    done = torchrun(
        "fit", mesh, "--resolution", "64", "--max-memory", "30MB", "-o", "r", cwd=tmp_path
    )
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("miner3d (rank")]
    assert sorted(x[:16] for x in lines) == ["miner3d (rank 0)", "miner3d (rank 1)"]
    assert all("needs ~" in x and x.endswith("try --resolution 32") for x in lines)
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # rank 0's estimate
    assert not (tmp_path / "r").exists()  # the raw grid of the ranks included


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_a_resume_finishes_it(tmp_path, meshes_dir):
    (tmp_path / "killer.py").write_text(KILLER)
    args = _teapot_args(meshes_dir)
    killed = torchrun(
        "fit", *args, "-o", "run", "--checkpoint-every", "5it",
        cwd=tmp_path, script="killer.py", KILL_RANK="1", KILL_AT="23",
    )  # fmt: skip
    assert killed.returncode != 0
    assert "another rank" in killed.stderr, killed.stderr[-3000:]
    run = tmp_path / "run"
    manifest = json.loads((run / "checkpoint.json").read_text())
    assert (manifest["world_size"], manifest["scale"], manifest["iteration"]) == (2, 0, 20)
    assert (run / "checkpoint.rank0.safetensors").exists()
    assert (run / "checkpoint.rank1.safetensors").exists()
    raw = np.load(run / "grid.ranks.npy", mmap_mode="r")  # what the ranks map, kept to resume
    grid = OccupancyGrid.load(run / "grid.npz").occupancy
    assert raw.dtype == np.uint8 and np.array_equal(raw, grid)
    # the shards, resharded to one process and back to two, are the shards again
    shards = [load_checkpoint(run / f"checkpoint.rank{r}.safetensors") for r in (0, 1)]
    merged = reshard(shards, 1, 0)
    for r, shard in enumerate(shards):
        again = reshard([merged], 2, r)
        assert again.tensors.keys() == shard.tensors.keys()
        assert all(torch.equal(again.tensors[k], v) for k, v in shard.tensors.items())
    shutil.copytree(run, tmp_path / "alone")
    alone = one_process("fit", "--resume", "alone", cwd=tmp_path)  # one process: resharded
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resharded from 2 ranks" in alone.stdout
    every = ["--checkpoint-every", "5it", "--threads", "1"]
    single = subprocess.run(  # one process, killed the same way: checkpoint.safetensors
        [sys.executable, "killer.py", "fit", *map(str, args), "-o", "single", *every],
        cwd=tmp_path, env=_env(RANK="0", KILL_RANK="0", KILL_AT="23"), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode != 0 and (tmp_path / "single" / "checkpoint.safetensors").exists()
    twice = torchrun("fit", "--resume", "single", cwd=tmp_path)  # two ranks: resharded
    assert twice.returncode == 0, twice.stderr[-3000:]
    assert "resharded" in twice.stdout
    resumed = torchrun("fit", "--resume", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at scale 0, iteration 20" in resumed.stdout
    whole = one_process("fit", *args, "-o", "whole", "--threads", "1", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("whole", "run"))
    assert abs(a["iou"] - b["iou"]) <= 1e-4
    ta = _model_tensors(tmp_path / "whole")
    for other in (run, tmp_path / "alone", tmp_path / "single"):  # 2 -> 2, 2 -> 1, 1 -> 2
        tb = _model_tensors(other)
        for key in ta:
            assert torch.allclose(ta[key].double(), tb[key].double(), atol=1e-5), key
        assert not list(other.glob("checkpoint*")) and not (other / "grid.ranks.npy").exists()


def test_the_ranks_raw_grid_is_checked_before_it_is_mapped(tmp_path):
    from miner3d.errors import MinerError
    from miner3d.grid import map_voxels
    from miner3d.volumes import filled_fraction

    good = np.zeros((6, 5, 4), dtype=np.uint8)
    good[2:4, 1:3] = 1
    np.save(tmp_path / "good.npy", good)
    data = map_voxels(tmp_path / "good.npy", (6, 5, 4))
    assert isinstance(data, np.memmap) and np.array_equal(data, good)
    assert filled_fraction(data[None]) == good.sum() / good.size  # slab by slab
    with pytest.raises(MinerError, match="does not hold this run's 6x5x5 grid"):
        map_voxels(tmp_path / "good.npy", (6, 5, 5))
    np.save(tmp_path / "wide.npy", good.astype(np.float32))
    with pytest.raises(MinerError, match="does not hold"):
        map_voxels(tmp_path / "wide.npy", (6, 5, 4))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MinerError, match="could not map"):
        map_voxels(tmp_path / "junk.npy", (6, 5, 4))


class InTurn(SoloTeam):
    """Rank 0's turn, then another rank's, in one process."""

    def in_turn(self, action):
        self.first = action(True)
        return action(False)


def test_an_input_decoded_in_memory_is_shared_raw_and_mapped_by_every_rank(tmp_path):
    from miner3d.grid import GridTransform
    from miner3d.kinds import Signal, get_kind
    from miner3d.shards import RAW_INFO, RAW_INPUT, share_signal

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (3, 40, 30), dtype=np.uint8)
    transform = GridTransform((0.0, 0.0), 0.5, (40, 30), axes="xy")
    info = {"kind": "image", "shape": [40, 30, 3], "memory_mapped": False}
    image = Signal(pixels, get_kind("image"), 1 / 255, transform, info, 0.0, 1.0)
    reads = []

    def read(first: bool) -> Signal:
        reads.append(first)
        return image

    team = InTurn()
    (tmp_path / RAW_INFO).write_text("{}")  # an earlier run's: never read
    other = share_signal(team, tmp_path, read)
    assert reads == [True]  # the other rank reads nothing but the raw copy
    for sig in (team.first, other):
        assert isinstance(sig.data, np.memmap) and np.array_equal(sig.data, pixels)
        assert (sig.kind.name, sig.value_scale, sig.info) == ("image", 1 / 255, info)
        assert sig.transform.to_dict() == transform.to_dict()
    assert (tmp_path / RAW_INPUT).exists()
    (tmp_path / RAW_INFO).write_text("{broken")
    with pytest.raises(miner3d.MinerError, match="could not map the ranks' copy"):
        share_signal(SoloTeamOther(), tmp_path, read)


class SoloTeamOther(SoloTeam):
    """A rank other than 0, alone: its turn only."""

    def in_turn(self, action):
        return action(False)


def test_a_checkpoint_of_a_new_world_size_removes_the_old_ones_files(tmp_path):
    from miner3d.checkpoint import Checkpoint
    from miner3d.shards import save_checkpoint_of

    def checkpoint() -> Checkpoint:
        return Checkpoint({"generator": torch.zeros(3, dtype=torch.uint8)}, {"scale": 0})

    old = ["checkpoint.json", "checkpoint.prev.json", "checkpoint.rank0.safetensors"]
    old += ["checkpoint.rank1.prev.safetensors", "checkpoint.rank2.safetensors"]
    for name in old:
        (tmp_path / name).write_text("x")
    save_checkpoint_of(tmp_path, checkpoint(), Team())  # one process now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_the_backend_follows_the_device_unless_named(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no GPU needed to name one
    monkeypatch.delenv("MINER3D_DIST_BACKEND", raising=False)
    assert (backend_for(cpu), backend_for(cuda)) == ("gloo", "nccl")
    monkeypatch.setenv("MINER3D_DIST_BACKEND", "Gloo")  # several ranks on one GPU
    assert (backend_for(cpu), backend_for(cuda)) == ("gloo", "gloo")
    monkeypatch.setenv("MINER3D_DIST_BACKEND", "nccl")
    assert backend_for(cuda) == "nccl"
    with pytest.raises(MinerError, match="needs CUDA"):
        backend_for(cpu)
    monkeypatch.setenv("MINER3D_DIST_BACKEND", "mpi")
    with pytest.raises(MinerError, match="gloo or nccl"):
        backend_for(cpu)
