"""The trainer's side of several ranks (:mod:`miner3d.distributed`): which blocks a rank
trains, and what the ranks put together. With one rank every function here returns its
input unchanged, so a single process runs exactly the single-process code."""

from __future__ import annotations

from typing import Any

import torch

from .bank import MLPBank
from .distributed import Team, split_even
from .memory import peak_rss
from .metrics import MetricSums
from .model import MinerModel
from .source import SignalSource
from .targets import Residuals, ScaleTargets


def shard_targets(residuals: Residuals, team: Team, j: int) -> ScaleTargets:
    """This rank's live blocks of scale ``j`` and their targets. One rank streams the whole
    scale once; several first decide pruning on an even share of the blocks each, gather
    the decisions (``(m,)`` ids, 8 bytes a live block), then build the targets of an even,
    contiguous share of the live blocks (every live block costs the same samples per
    iteration). Memory: the rank's share of the target cache and one batch of blocks."""
    if not team.active:
        return residuals.scale(j)
    lo, hi = split_even(residuals.layout.n_blocks(j), team.world_size, team.rank)
    ids = torch.arange(lo, hi, device=residuals.device)
    decided = residuals.scale(j, ids, keep_targets=False)
    live = team.gather_rows(decided.ids)
    lo, hi = split_even(len(live), team.world_size, team.rank)
    targets = residuals.scale(j, live[lo:hi], decided=True)
    targets.pruned_sums = decided.pruned_sums  # of the first pass's share
    return targets


def gather_bank(team: Team, ids: torch.Tensor, bank: MLPBank) -> tuple[torch.Tensor, MLPBank]:
    """Every rank's block ids ``(m_r,)`` and bank rows, concatenated in rank order (the
    whole scale, on every rank)."""
    if not team.active:
        return ids, bank
    return team.gather_rows(ids), MLPBank(bank.shape, [team.gather_rows(p) for p in bank.params])


def measure(
    model: MinerModel, source: SignalSource, team: Team, from_scale: int, iou: bool, batch: int
) -> MetricSums:
    """:meth:`MinerModel.measure` of level of detail ``from_scale``, each rank streaming an
    even, contiguous share of the scale-0 blocks; the sums of every rank."""
    share = split_even(model.layout.n_blocks(0), team.world_size, team.rank)
    return reduce_sums(team, model.measure(source, from_scale, iou, batch, share))


def reduce_sums(team: Team, sums: MetricSums) -> MetricSums:
    """Metric sums over every rank (counts exact: float64 holds them below 2^53)."""
    if not team.active:
        return sums
    k = len(sums.inter)
    flat = team.sum([*sums.inter, *sums.union, sums.sse, sums.count])
    whole = [round(x) for x in flat]
    return MetricSums(whole[:k], whole[k : 2 * k], flat[2 * k], whole[2 * k + 1])


def rank_figures(team: Team, seconds_fitting: float, mlp_blocks: int) -> list[dict[str, Any]]:
    """``summary.json``'s ``ranks``: each rank's host, fitting seconds, MLP blocks and peak
    RSS, in rank order (a collective: every rank calls it)."""
    own = torch.tensor([[seconds_fitting, mlp_blocks, peak_rss()]], dtype=torch.float64)
    rows = team.gather_rows(own).tolist()
    return [
        {"rank": r, "host": host, "seconds_fitting": round(t, 3)}
        | {"mlp_blocks": int(m), "peak_rss_bytes": int(rss)}
        for r, (host, (t, m, rss)) in enumerate(zip(team.hosts(), rows, strict=True))
    ]
