"""The trainer's side of several ranks (:mod:`miner3d.distributed`): which blocks a rank
trains, which blocks of the model it holds, and what the ranks put together. With one rank
every function here returns its input unchanged, so a single process runs exactly the
single-process code.

A rank's memory grows with its own blocks plus a halo, not with the whole signal: it keeps
the MLPs it trained (:class:`RankBlocks`), and before each pass over a run of blocks (its
share of a scale's pruning pass, of its training, of a quality measurement) fetches from
their owners only the coarser scales' blocks that the run's samples read, decoding their
dense fields as windows of rows (:meth:`miner3d.blocks.BlockLayout.halo_rows`). Rank 0
receives the whole model only at the fit's end, to write it."""

from __future__ import annotations

import math
from typing import Any

import torch

from .bank import MLPBank, round_params
from .blocks import BlockLayout
from .distributed import Team, split_even
from .memory import peak_rss
from .metrics import MetricSums
from .model import MinerModel, scale_prefix
from .source import SignalSource
from .targets import Residuals, ScaleTargets


class RankBlocks:
    """The finished scales' MLP blocks as this rank holds them.

    One process: :meth:`finish` installs each finished scale whole in the model, and
    :meth:`focus` does nothing. Several ranks: each keeps the blocks it trained
    (:attr:`owned`); :meth:`focus` installs in the model windows of the coarser scales
    fetched from their owners (collective); :meth:`gather` gives rank 0 the whole model.
    """

    def __init__(self, model: MinerModel, team: Team):
        self.model, self.team = model, team
        self.owned: dict[int, tuple[torch.Tensor, MLPBank]] = {}
        """Per finished scale: this rank's block ids ``(m,)`` and their bank (several ranks)."""
        self.counts: dict[int, int] = {}
        """MLP blocks per finished scale, over every rank."""
        self.held: dict[int, tuple[int, int]] = {}  # block rows of each scale in the model

    @property
    def layout(self) -> BlockLayout:
        return self.model.layout

    @property
    def n_params(self) -> int:
        """Parameters of the finished scales, over every rank."""
        return sum(self.counts.values()) * self.model.bank_shape.params_per_block

    def finish(self, j: int, ids: torch.Tensor, bank: MLPBank) -> None:
        """Scale ``j`` is fitted: this rank's blocks ``ids`` ``(m,)`` and their ``bank``
        (a collective: every rank calls it)."""
        self.counts[j] = int(self.team.sum([len(ids)])[0])
        if not self.team.active:
            self.model.set_scale(j, ids, bank)
            return
        self.owned[j] = (ids, bank)
        self.held.pop(j, None)

    def scale_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Scale ``k``'s tensors as a checkpoint keeps them: the model's (one process), or
        this rank's own blocks (several)."""
        if not self.team.active:
            return self.model.scale_state_dict(k)
        if k not in self.owned:
            return {}
        ids, bank = self.owned[k]
        state = {"block_ids": ids, **bank.state_dict()}
        return {scale_prefix(k) + name: v for name, v in state.items()}

    def load(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """Scale ``k`` from a checkpoint's tensors (see :meth:`scale_state_dict`)."""
        prefix = scale_prefix(k)
        state = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
        ids = state.get("block_ids", torch.zeros(0, dtype=torch.long))
        bank = MLPBank.from_state_dict(self.model.bank_shape, state, self.model.device)
        self.finish(k, ids.to(self.model.device), bank)

    def round(self, dtype: str) -> None:
        """Round every finished scale's weights to ``dtype`` (:meth:`MinerModel.round_weights`)."""
        if not self.team.active:
            self.model.round_weights(dtype)
            return
        for k, (_, bank) in self.owned.items():
            round_params(bank.params, dtype, f"scale {k}")
        self.held.clear()  # the windows are fetched again, rounded

    def focus(self, s: int, lo: int, hi: int, from_scale: int) -> None:
        """Before a pass over blocks ``[lo, hi)`` of scale ``s`` that reads the finished
        scales ``>= from_scale``: install in the model every such scale's blocks that the
        pass reads (scale ``s`` itself: the run's rows; coarser: their halo). A collective.
        Memory: the windows' banks and, when decoded, their dense fields."""
        if not self.team.active:
            return
        for k, rows in self.layout.windows(s, lo, hi).items():
            if k < from_scale or k not in self.owned:
                continue
            keep = self.held.get(k) == rows
            ids, bank = self._fetch(k, (0, 0) if keep else rows)
            if not keep:
                self.model.set_scale(k, ids, bank, rows)
                self.held[k] = rows

    def gather(self) -> MinerModel | None:
        """The whole model on rank 0 (every rank's blocks of every scale), ``None`` on the
        others (a collective). One process: the model. Memory on rank 0: the whole model."""
        if not self.team.active:
            return self.model
        for k in sorted(self.owned):
            whole = (0, self.layout.grid(k)[0])
            ids, bank = self._fetch(k, whole if self.team.leader else (0, 0))
            if self.team.leader:
                self.model.set_scale(k, ids, bank)
        return self.model if self.team.leader else None

    def _fetch(self, k: int, rows: tuple[int, int]) -> tuple[torch.Tensor, MLPBank]:
        """Every rank's blocks of scale ``k`` within its block rows ``rows`` (a collective:
        each rank asks for its own rows, receives them from their owners)."""
        ids, bank = self.owned[k]
        lo, hi = self.layout.ids_of_rows(k, rows)
        wanted = self.team.gather_rows(torch.tensor([[lo, hi]], device=ids.device)).tolist()
        picks = [torch.nonzero((ids >= a) & (ids < b)).squeeze(1) for a, b in wanted]
        order, counts = torch.cat(picks), [len(p) for p in picks]
        widths = [math.prod(p.shape[1:]) for p in bank.params]
        pairs = zip(bank.params, widths, strict=True)
        flat = torch.cat([p.detach()[order].reshape(len(order), n) for p, n in pairs], 1)
        got_ids = self.team.all_to_all(ids[order], counts)
        got = self.team.all_to_all(flat, counts)
        got_ids, first = first_of_each(got_ids)  # a checkpoint of an older version: twice
        parts = torch.split(got[first], widths, dim=1)
        shapes = [p.shape[1:] for p in bank.params]
        params = [x.reshape(len(got_ids), *n) for x, n in zip(parts, shapes, strict=True)]
        return got_ids, MLPBank(bank.shape, params)


def first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ``ids`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), "amin")
    return unique, first


def shard_targets(residuals: Residuals, blocks: RankBlocks, j: int) -> ScaleTargets:
    """This rank's live blocks of scale ``j`` and their targets. One rank streams the whole
    scale once; several first decide pruning on an even share of the blocks each, hand the
    live ids on (:func:`even_share`), then build the targets of an even, contiguous share
    of the live blocks (every live block costs the same samples per
    iteration), each pass with the coarser scales' window it reads
    (:meth:`RankBlocks.focus`), which stays for the scale's training. Memory: the rank's
    share of the target cache, its windows and one batch of blocks."""
    team = blocks.team
    if not team.active:
        return residuals.scale(j)
    lo, hi = split_even(residuals.layout.n_blocks(j), team.world_size, team.rank)
    blocks.focus(j, lo, hi, j + 1)
    ids = torch.arange(lo, hi, device=residuals.device)
    decided = residuals.scale(j, ids, keep_targets=False)
    mine = even_share(team, decided.ids)
    blocks.focus(j, int(mine[0]) if len(mine) else 0, int(mine[-1]) + 1 if len(mine) else 0, j + 1)
    targets = residuals.scale(j, mine, decided=True)
    targets.pruned_sums = decided.pruned_sums  # of the first pass's share
    return targets


def even_share(team: Team, ids: torch.Tensor) -> torch.Tensor:
    """This rank's even, contiguous share (:func:`split_even`) of every rank's ``ids``
    ``(m_r,)`` taken in rank order: each rank sends each other only the ids that fall in its
    share (one all-gather of the counts, one all-to-all), so no rank ever holds every id."""
    counts = [int(n) for n in team.gather_rows(torch.tensor([len(ids)])).flatten()]
    start = sum(counts[: team.rank])
    total, stop = sum(counts), start + len(ids)
    sends = []
    for q in range(team.world_size):
        a, b = split_even(total, team.world_size, q)
        sends.append(max(0, min(b, stop) - max(a, start)))
    return team.all_to_all(ids, sends)


def measure(
    blocks: RankBlocks, source: SignalSource, from_scale: int, iou: bool, batch: int
) -> MetricSums:
    """:meth:`MinerModel.measure` of level of detail ``from_scale``, each rank streaming an
    even, contiguous share of the scale-0 blocks (with their window); the sums of every
    rank."""
    team, model = blocks.team, blocks.model
    share = split_even(model.layout.n_blocks(0), team.world_size, team.rank)
    blocks.focus(0, *share, from_scale)
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
