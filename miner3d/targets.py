"""What one scale is fitted to: residual targets, pruning before, and the live measurement.

:class:`Residuals` reads the signal (:class:`~miner3d.source.SignalSource`) and the coarser
scales of the model being fitted, block batch by block batch:

* :meth:`Residuals.scale` streams every block of a scale once: its residual (the box-filtered
  signal ``G_j`` minus the coarser scales' sum; ``G_j`` itself for the Gaussian ablation), the
  pruning decision (mean squared residual over the block's real samples at most
  ``prune_mse``, or no real sample at all: no MLP), the float16 target cache when it fits
  ``cache_targets``, and the masks of the live blocks that reach into the padding;
* :meth:`Residuals.at` gives the targets of some blocks at some samples, from the cache or
  recomputed from the signal and the coarser fields at exactly those samples;
* :meth:`Residuals.live_sums` measures blocks under training against the signal at their
  scale's own resolution (``G_j``; at scale 0 the full-resolution signal: the trainer's exact
  full-grid figures during the finest scale, its level-of-detail figures during the coarser
  ones), from :meth:`Residuals.fixed_parts` where they were kept (:class:`MeasureRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bank import MLPBank
from .blocks import local_coordinates
from .config import FitConfig
from .metrics import MetricSums, block_sums
from .model import MinerModel
from .source import SignalSource


@dataclass
class ScaleTargets:
    """The outcome of streaming one scale (see :meth:`Residuals.scale`)."""

    ids: torch.Tensor
    """``(m,)`` sorted ids of the blocks that get an MLP."""
    cache: torch.Tensor | None
    """``(m, C, b^d)`` float16 targets, or ``None`` (recomputed at each iteration)."""
    pruned_sums: MetricSums
    """The metric sums of the pruned blocks at the scale's resolution (their value is the
    coarser scales' sum); empty when pruning was decided by another pass."""
    partial_ids: torch.Tensor
    """Sorted ids of live blocks that reach into the padding."""
    partial_masks: torch.Tensor
    """``(k, b^d)`` bool, the real samples of each of ``partial_ids``."""


@dataclass
class MeasureRows:
    """The fixed parts of some live blocks' measurement (:meth:`Residuals.fixed_parts`), row
    for row with the blocks."""

    base: torch.Tensor | None
    """``(n, C, b, ..., b)`` float32: the coarser scales' sum, or ``None`` (none is added)."""
    truth: torch.Tensor
    """``(n, C, b, ..., b)`` float32: ``G_j``."""

    def select(self, rows: torch.Tensor) -> MeasureRows:
        """Rows ``rows``, copied."""
        return MeasureRows(None if self.base is None else self.base[rows], self.truth[rows])

    def keep(self, rows: torch.Tensor) -> MeasureRows:
        """Only rows ``rows`` (sorted), moved to the front in place (no second copy)."""
        base = None if self.base is None else compact(self.base, rows)
        return MeasureRows(base, compact(self.truth, rows))


class Residuals:
    """Targets and measurements of the scales of ``model`` against ``source``.

    Args:
        model: the model being fitted (its coarser scales are read).
        source: the signal, on the model's layout.
        config: the fit's config (block, pruning, cache size).
        iou: the signal is binary (IoU is counted).
        batch_blocks: blocks per streamed batch.
    """

    def __init__(
        self,
        model: MinerModel,
        source: SignalSource,
        config: FitConfig,
        iou: bool,
        batch_blocks: int,
    ):
        self.model, self.source, self.config = model, source, config
        self.layout = model.layout
        self.iou = iou
        self.batch_blocks = batch_blocks
        self.channels = model.channels
        self.d = self.layout.ndim
        self.device = model.device
        self.coords = local_coordinates(config.block, self.d, self.device)

    def scale(
        self,
        j: int,
        ids: torch.Tensor | None = None,
        decided: bool = False,
        keep_targets: bool = True,
    ) -> ScaleTargets:
        """Stream every block of scale ``j`` once (see the module doc), or only the sorted
        block ids ``ids``; ``decided``: they are all live (pruning was decided before, by
        another pass); ``keep_targets=False``: decide only, never cache. Deterministic
        given the coarser scales, so a resumed fit rebuilds it instead of storing it.
        Memory: the target cache (the live blocks' rows, float16, kept when they fit in
        ``cache_targets`` bytes) and one batch of blocks. When every block's rows would not
        fit but the live blocks' do, the live blocks are streamed a second time to cache
        theirs (never more than ``cache_targets`` touched): recomputing them at every chunk
        took 8 of the 29 s of Lucy 1024's finest scale (428k blocks, 21k live; its set-up
        took 9.6-9.7 s with the second pass or without). Blocks :meth:`blank` finds are
        counted (their real samples) and never read: the scale's set-up at Lucy 1024 fell
        from 10.2 to 3.9 s."""
        c, layout, model = self.config, self.layout, self.model
        per_block = c.block**self.d
        if ids is None:
            ids = torch.arange(layout.n_blocks(j), device=self.device)
        pruned = MetricSums()
        if not decided:  # blocks whose residual is exactly zero are counted unread
            blank = self.blank(j, ids)
            if blank is not None and bool(blank.any()):
                pruned.count = layout.real_samples(j, ids[blank]) * self.channels
                ids = ids[~blank]
        n = len(ids)
        live_ids, partial_ids, partial_masks = [], [], []
        cache = None
        row_bytes = self.channels * per_block * 2
        if keep_targets and n * row_bytes <= c.cache_targets:
            # room for every block; only the rows written are ever touched (resident)
            cache = torch.empty(
                (n, self.channels, per_block), dtype=torch.float16, device=self.device
            )
        filled = 0
        for start in range(0, n, self.batch_blocks):
            batch = ids[start : start + self.batch_blocks]
            level = self.source.level_blocks(j, layout.unravel(j, batch))
            if j < c.n_scales - 1:
                base = model.evaluate_blocks(j, batch, from_scale=j + 1)
            else:
                base = torch.zeros_like(level)
            residual = level - base
            mask = layout.valid_mask(j, batch)  # None: no padding at this scale
            real = None if mask is None else mask.flatten(1).sum(dim=1)
            if decided:
                live = torch.ones(len(batch), dtype=torch.bool, device=self.device)
            elif mask is None:
                live = residual.square().flatten(1).mean(dim=1) > c.prune_mse
            else:  # real samples only; a block wholly in the padding gets no MLP
                sse = (residual.square() * mask.unsqueeze(1)).flatten(1).sum(dim=1)
                live = (sse / (real.clamp(min=1) * self.channels) > c.prune_mse) & (real > 0)
            if mask is not None:
                partial = live & (real < per_block)
                partial_ids.append(batch[partial])
                partial_masks.append(mask[partial].flatten(1))
            live_ids.append(batch[live])
            if cache is not None:
                kept = (level if model.gaussian else residual)[live].flatten(2)
                cache[filled : filled + len(kept)] = kept
                filled += len(kept)
            if not decided:  # a pruned block's value is the coarser scales' sum
                dead = ~live
                dead_mask = None if mask is None else mask[dead]
                pruned = pruned.add(block_sums(base[dead], level[dead], dead_mask, self.iou))
        if cache is not None:
            cache = cache[:filled]  # the unfilled rows were never touched
        live_ids = torch.cat(live_ids) if live_ids else ids[:0]
        if keep_targets and cache is None and 0 < len(live_ids) * row_bytes <= c.cache_targets:
            # the live blocks fit where the whole scale did not: stream them again to cache
            cache = self.scale(j, live_ids, decided=True).cache
        no_ids = torch.zeros(0, dtype=torch.long, device=self.device)
        no_masks = torch.zeros((0, per_block), dtype=torch.bool, device=self.device)
        return ScaleTargets(
            live_ids,
            cache,
            pruned,
            torch.cat(partial_ids) if partial_ids else no_ids,
            torch.cat(partial_masks) if partial_masks else no_masks,
        )

    def blank(self, j: int, ids: torch.Tensor) -> torch.Tensor | None:
        """``(n,)`` bool: which blocks ``ids`` of scale ``j`` have a residual of exactly zero
        at every sample, known without reading them: the signal is zero over the block
        (zero padding, zero offset) and no coarser block that linear interpolation could
        read at its samples (its cover at each coarser scale and that block's neighbours)
        has an MLP, so the coarser scales' sum there is exactly zero too. ``None`` where
        that cannot be known (edge padding, an offset, the Gaussian pyramid). Most of a
        mesh's bounding box is such blocks. Memory: one bool per block of each scale, and
        a few ``(n, d)`` int64 block coordinates (Lucy 2048's finest scale: 3.4 M blocks, 82
        MB each)."""
        source, layout, model = self.source, self.layout, self.model
        if source.pad != "zero" or source.value_offset != 0.0 or model.gaussian:
            return None
        coords = layout.unravel(j, ids).cpu()
        blank = ~source.nonzero_blocks(j)[tuple(coords.T)]
        for k in range(j + 1, layout.n_scales):
            scale = model.scales[k]
            if scale is None or not len(scale.block_ids):
                continue
            has = torch.zeros(layout.grid(k), dtype=torch.bool)
            has[tuple(layout.unravel(k, scale.block_ids.cpu()).T)] = True
            for axis in range(self.d):  # dilate by one block along each axis
                near = has.clone()
                near.narrow(axis, 1, has.shape[axis] - 1).logical_or_(
                    has.narrow(axis, 0, has.shape[axis] - 1)
                )
                near.narrow(axis, 0, has.shape[axis] - 1).logical_or_(
                    has.narrow(axis, 1, has.shape[axis] - 1)
                )
                has = near
            blank &= ~has[tuple((coords >> (k - j)).T)]
        return blank.to(ids.device)

    def local(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat sample indices inside a block ``(P,)`` -> integer positions ``(P, d)``."""
        b = self.config.block
        return torch.stack(
            [
                torch.div(flat, b ** (self.d - 1 - a), rounding_mode="floor") % b
                for a in range(self.d)
            ],
            dim=1,
        )

    def at(
        self,
        j: int,
        ids: torch.Tensor,
        cache: torch.Tensor | None,
        pick: torch.Tensor | None,
    ) -> torch.Tensor:
        """Targets ``(m, C, P)`` of blocks ``ids`` of scale ``j`` at the samples ``pick``
        ``(P,)`` (all if None): from ``cache`` (their rows ``(m, C, b^d)``), or from the signal
        minus the coarser scales' sum at exactly those samples (memory per sample asked)."""
        if cache is not None:
            return (cache if pick is None else cache[:, :, pick]).float()
        flat = torch.arange(self.coords.shape[0], device=self.device) if pick is None else pick
        local = self.local(flat)
        level = self.source.values_at(j, ids, local)
        if self.model.gaussian:
            return level
        return level - self.model.coarser_samples(j, ids, local)

    def _adds_coarser(self, j: int) -> bool:
        """Whether scale ``j``'s reconstruction adds the coarser scales' sum to its MLPs'."""
        return not self.model.gaussian and j < self.config.n_scales - 1

    @torch.no_grad()
    def fixed_parts(self, j: int, ids: torch.Tensor) -> MeasureRows | None:
        """What stays fixed of blocks ``ids``'s measurement while scale ``j`` is fitted, for
        :meth:`live_sums` to reuse: the coarser scales' sum at every sample (``None`` where
        it is not added) and ``G_j`` (at scale 0 the signal itself), each ``(n, C, b, ...,
        b)`` float32, exactly what :meth:`live_sums` would compute again. Reading them took
        more than half of every measurement (the bunny at 512: 3.6 of 6.7 s of the fit's
        quality measurements). ``None`` when they would take more than ``cache_targets``
        bytes. Memory: 8 bytes per sample and channel of the blocks (4 at the coarsest
        scale); Lucy 1024's finest scale, 21,501 blocks of 8^3: 88 MB."""
        per_block = self.channels * self.config.block**self.d
        coarser = self._adds_coarser(j)
        if len(ids) * per_block * (8 if coarser else 4) > self.config.cache_targets:
            return None
        shape = (len(ids), self.channels) + (self.config.block,) * self.d
        truth = torch.empty(shape, device=self.device)
        base = torch.empty(shape, device=self.device) if coarser else None
        for start in range(0, len(ids), self.batch_blocks):
            part = ids[start : start + self.batch_blocks]
            truth[start : start + len(part)] = self.source.level_blocks(
                j, self.layout.unravel(j, part)
            )
            if base is not None:
                base[start : start + len(part)] = self.model.evaluate_blocks(j, part, j + 1)
        return MeasureRows(base, truth)

    @torch.no_grad()
    def live_sums(
        self,
        bank: MLPBank,
        rows: torch.Tensor,
        ids: torch.Tensor,
        j: int = 0,
        fixed: MeasureRows | None = None,
    ) -> MetricSums:
        """Metric sums of blocks ``ids`` of scale ``j`` whose MLPs are rows ``rows`` of
        ``bank``, streamed block batch by block batch: their outputs on every sample, plus
        the coarser scales' sum, against ``G_j`` (the full-resolution signal at scale 0);
        real samples only. ``fixed``: those blocks' :meth:`fixed_parts` (row for row), read
        instead of computed again: the same sums, bit for bit."""
        layout, b, d = self.layout, self.config.block, self.d
        sums = MetricSums()
        for start in range(0, len(ids), self.batch_blocks):
            part = ids[start : start + self.batch_blocks]
            at = slice(start, start + len(part))
            out = bank.evaluate(self.coords, rows=rows[at])
            values = out.transpose(1, 2).reshape((len(part), self.channels) + (b,) * d)
            if fixed is not None:  # fixed_parts kept a base exactly where one is added
                if fixed.base is not None:
                    values += fixed.base[at]
                truth = fixed.truth[at]
            else:
                if self._adds_coarser(j):
                    values += self.model.evaluate_blocks(j, part, j + 1)
                truth = self.source.level_blocks(j, layout.unravel(j, part))
            sums = sums.add(block_sums(values, truth, layout.valid_mask(j, part), self.iou))
        return sums


def compact(rows: torch.Tensor, keep: torch.Tensor, step: int = 4096) -> torch.Tensor:
    """``rows[keep]`` for sorted ``keep``, in place, a few rows at a time: never a second copy
    of a large cache (a row moves only towards the front, past rows already moved)."""
    for start in range(0, len(keep), step):
        part = keep[start : start + step]
        rows[start : start + len(part)] = rows[part]
    return rows[: len(keep)]
