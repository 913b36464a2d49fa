"""A checkpoint written by one number of ranks, continued by another.

A fit's state splits cleanly by blocks (:mod:`miner3d.sharding`): the finished scales' MLPs
are owned block by block, and the scale in progress is an even, contiguous run of its live
blocks per rank (rows of the bank, of Adam's moments, of the final parameters), plus running
sums that the ranks only ever add. Every rank draws the same sample positions from the same
generator. So the checkpoint of ``W0`` ranks (or of one process: one shard) gives rank ``r``
of ``W1`` exactly the state that rank would have written had the fit run at ``W1`` ranks from
the start, and the continued fit's parameters equal an uninterrupted fit's.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from .checkpoint import CURRENT, GENERATOR, MODEL, Checkpoint
from .distributed import split_even
from .metrics import MetricSums
from .sharding import first_of_each


def reshard(shards: list[Checkpoint], world: int, rank: int) -> Checkpoint:
    """Rank ``rank`` of ``world``'s checkpoint from every shard of one checkpoint, in rank
    order (see the module doc). Finished scales: that rank's even share of every block, by
    id; the scale in progress: its even share of the live rows; the running sums of frozen
    blocks: all on rank 0. Memory: every shard's tensors, and the rank's part again."""
    state = json.loads(json.dumps(shards[0].state))
    state.pop("tensors_sha256", None)
    tensors = {GENERATOR: shards[0].tensors[GENERATOR]}
    names = {n for shard in shards for n in shard.tensors if n.startswith(MODEL)}
    for prefix in sorted({n[: n.index(".", len(MODEL)) + 1] for n in names}):
        keys = sorted({n[len(prefix) :] for n in names if n.startswith(prefix)})
        whole = {k: _cat(shards, prefix + k) for k in keys}
        _, order = first_of_each(whole["block_ids"])  # an older version's held every block
        lo, hi = split_even(len(order), world, rank)
        tensors.update({prefix + k: v[order[lo:hi]] for k, v in whole.items()})
    if CURRENT + "active" in shards[0].tensors:
        sizes = [len(shard.tensors[CURRENT + "final0"]) for shard in shards]
        starts = [sum(sizes[:i]) for i in range(len(shards))]
        lo, hi = split_even(sum(sizes), world, rank)
        active = torch.cat(
            [s.tensors[CURRENT + "active"] + at for s, at in zip(shards, starts, strict=True)]
        )  # every active row's place among all live rows
        mine = (active >= lo) & (active < hi)
        tensors[CURRENT + "active"] = active[mine] - lo
        keys = {n for n in shards[0].tensors if n.startswith(CURRENT)} - {CURRENT + "active"}
        for key in keys:  # final<i>: every live row; param<i>, exp_avg*<i>: the active ones
            rows = _cat(shards, key)
            tensors[key] = rows[lo:hi] if key.startswith(CURRENT + "final") else rows[mine]
        frozen = MetricSums()
        for shard in shards:
            frozen = frozen.add(MetricSums(**shard.state["frozen_sums"]))
        state["frozen_sums"] = asdict(frozen if rank == 0 else MetricSums())
        mse = sum(float(shard.state["frozen_mse"]) for shard in shards)
        state["frozen_mse"] = mse if rank == 0 else 0.0
    return Checkpoint({k: v.contiguous() for k, v in tensors.items()}, state)


def _cat(shards: list[Checkpoint], key: str) -> torch.Tensor:
    """Every shard's tensor ``key`` (those that have it), concatenated in rank order."""
    return torch.cat([shard.tensors[key] for shard in shards if key in shard.tensors])
