"""Coarse-to-fine training of a MINER model (Saragadam et al. 2022, Algorithm 1), d = 2 or 3.

For each scale ``j`` from the coarsest (``J - 1``) to the finest (0):

1. **Targets** (:mod:`.targets`): the box-filtered signal ``G_j`` minus the coarser scales'
   reconstruction (the residual, eq. 7; the Gaussian-pyramid ablation fits ``G_j`` itself),
   streamed block batch by block batch from the signal in its own dtype or memory map,
   cached in float16 when small enough, otherwise recomputed at each iteration's samples.
2. **Prune before** (paper 3.2): a block whose mean squared residual is at most
   ``prune_mse`` gets no MLP; its residual is zero. A block that lies wholly in the padding
   of the block grid never gets one. The residual energy, the loss and the metrics count only
   real samples (those inside the signal), never the padding.
3. **Fit** the live blocks' MLPs together (batched matmul), loss = sum of per-block MSEs so
   each block's gradient is its own. **Prune during**: a block whose MSE falls to
   ``freeze_mse`` is frozen; its parameters and Adam state leave the optimisation.
4. **Switch** scale when every block is frozen, on a plateau of the loss, at ``max_iters``;
   the finest scale also on a plateau of its measured quality (:mod:`.stopping`).

Blocks are independent (per-block loss and freezing): ranks share them (:mod:`.sharding`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .bank import BankShape
from .blocks import BlockLayout, local_coordinates
from .checkpoint import GENERATOR, MODEL, Checkpoint, scale_checkpoint
from .config import HEAP_MMAP_THRESHOLD, FitConfig
from .distributed import Team, pick_device
from .errors import DivergedError, FitInterrupted, MinerError
from .grid import GridTransform
from .kinds import Kind, get_kind
from .memory import SharedCpus, tune_heap
from .model import MinerModel
from .scale import ScaleState
from .sharding import RankBlocks, measure, rank_figures, reduce_sums, shard_targets
from .source import SignalSource
from .stopping import LOG_EVERY, decide_now, measure_now, next_measurement, quality_plateau
from .targets import Residuals

__all__ = ["DivergedError", "FitInterrupted", "FitResult", "fit", "pick_device"]


@dataclass
class FitResult:
    """A fitted model (``None`` on the ranks other than 0 of several), its history (one dict
    per logged event) and summary figures."""

    model: MinerModel | None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[dict[str, Any]], None]


def fit(
    signal: np.ndarray | torch.Tensor,
    config: FitConfig | None = None,
    *,
    kind: Kind | str = "occupancy",
    value_scale: float = 1.0,
    value_offset: float = 0.0,
    peak: float = 1.0,
    transform: GridTransform | None = None,
    device: str | torch.device = "auto",
    callback: Callback | None = None,
    meta: dict[str, Any] | None = None,
    checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint_seconds: float = 300.0,
    checkpoint_iterations: int = 0,
    resume: Checkpoint | None = None,
    should_stop: Callable[[], bool] | None = None,
    team: Team | None = None,
) -> FitResult:
    """Fit a MINER model to a signal, coarse to fine.

    Args:
        signal: ``(C, *S)``, channels first, ``d = 2`` or ``3`` spatial axes (the kind's
            ``ndim``). A torch tensor or numpy array is kept in its own dtype (uint8
            occupancy stays 1 byte per voxel); a numpy memory map is read from disk block
            batch by block batch (see :mod:`miner3d.source`).
        config: :class:`FitConfig` (paper defaults if omitted).
        kind: the kind of signal (:mod:`miner3d.kinds`): its padding and its metrics.
        value_scale: multiplies raw values into ``[0, 1]`` (1/255 for 8-bit images).
        value_offset: subtracted from raw values first (a volume's minimum): the model's
            outputs times ``1 / value_scale``, plus ``value_offset``, are in the input's units.
        peak: PSNR's peak in ``[0, 1]`` units (1: the fitted range).
        transform: the grid's transform, stored in the model.
        device: ``auto``, ``cpu`` or ``cuda``.
        callback: called with every history record (dict) as it is logged.
        meta: extra JSON-serialisable metadata stored in the model.
        checkpoint: called with a :class:`Checkpoint` at every scale switch, every
            ``checkpoint_seconds`` (and every ``checkpoint_iterations``, if > 0) within a
            scale, and before stopping on ``should_stop``.
        resume: a checkpoint to continue from (same signal and config).
        should_stop: polled every iteration; when it returns True the fit checkpoints and
            raises :class:`FitInterrupted`. The trainer installs no signal handler.
        team: the ranks sharing the fit (:mod:`miner3d.distributed`); each trains its share
            of every scale's live blocks and holds only its blocks and their coarser halo
            (:mod:`miner3d.sharding`); rank 0 ends with the whole model, the others with
            ``None``. Every rank passes the same signal and config; ``checkpoint`` gets
            each rank's own part.

    Returns:
        :class:`FitResult`. Peak memory, per full-resolution sample and channel: the signal
        in its dtype (nothing for a memory map), the dense residual fields of scales 1..J-1
        (float16, ``2 / (2^d - 1)`` bytes together), the current scale's cached targets (at
        most ``cache_targets`` bytes); plus the MLP banks with their Adam state, the
        activations of one chunk of ``batch_samples`` samples and one block batch of the
        streamed passes. Nothing else is kept per sample.
    """
    config = config or FitConfig()
    config.validate()
    kind = get_kind(kind)
    if np.ndim(signal) != kind.ndim + 1:
        raise MinerError(
            f"a {kind.name} signal is (C, {kind.ndim} spatial axes), channels first; "
            f"got shape {tuple(np.shape(signal))}"
        )
    tune_heap(HEAP_MMAP_THRESHOLD)  # a training chunk's activations: from the heap, not mmap
    dev = pick_device(str(device))
    values = (value_scale, value_offset, peak)
    trainer = _Trainer(signal, config, kind, values, transform, dev, callback, meta)
    trainer.team = team or Team(device=dev)
    trainer.checkpoint = checkpoint
    trainer.checkpoint_seconds = checkpoint_seconds
    trainer.checkpoint_iterations = checkpoint_iterations
    trainer.should_stop = should_stop or (lambda: False)
    return trainer.run(resume)


class _Trainer:
    checkpoint: Callable[[Checkpoint], None] | None  # these five are set by fit()
    checkpoint_seconds: float
    checkpoint_iterations: int
    should_stop: Callable[[], bool]
    team: Team

    def __init__(self, signal, config, kind, values, transform, device, callback, meta):
        c = self.config = config
        self.kind: Kind = kind
        self.device = device
        self.callback = callback
        self.own_blocks: dict[int, int] = {}  # this rank's MLP blocks per scale
        self.layout = BlockLayout(tuple(signal.shape[1:]), c.block, c.n_scales)
        self.d = self.layout.ndim
        self.channels = int(signal.shape[0])
        # the padding is virtual: what it reads as is the kind's (zero, or the border value)
        value_scale, value_offset, self.peak = values
        self.source = SignalSource(
            signal, self.layout, kind.pad, value_scale, device, value_offset=value_offset
        )
        shape = BankShape(self.d, c.hidden, c.hidden_layers, self.channels, c.w0)
        model_meta = {
            "config": asdict(c),
            "signal_kind": kind.name,
            "occupancy": kind.binary,
            "value_scale": value_scale,
            "value_offset": value_offset,
            "fitted_psnr_peak": self.peak,
            **(meta or {}),
        }
        per_block = self.channels * c.block**self.d
        self.batch = c.batch_blocks or max(1, (1 << 20) // per_block)
        gaussian = c.pyramid == "gaussian"
        self.model = MinerModel(
            self.layout, shape, self.channels, transform, gaussian, model_meta, device
        )
        self.residuals = Residuals(self.model, self.source, c, kind.binary, self.batch)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.coords = local_coordinates(c.block, self.d, device)
        self.history: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.scale_metrics: dict[int, dict[str, float]] = {}
        self.scale_times: dict[int, float] = {}
        self.stopped: str | None = None  # "time_limit" or "target" once the fit must end
        self.stop_detail = ""  # what the quality plateau rule saw, when it stopped the fit
        self.stage_seconds = {"setup": 0.0, "fitting": 0.0, "measuring": 0.0}
        self.cpus = SharedCpus(active=device.type == "cpu")  # one thread if CPUs are shared
        self.scale_stops: dict[int, str] = {}

    def _log(self, record: dict[str, Any], at: float | None = None) -> None:
        """Log ``record`` at the trainer's clock (or at ``at``: the same on every rank)."""
        at = time.perf_counter() - self.start if at is None else at
        record = {"time": round(at, 4), **record}
        self.history.append(record)
        if self.callback is not None:
            self.callback(record)

    # -- checkpoints ---------------------------------------------------------------------
    def _save(self, j: int, st: ScaleState | None) -> None:
        """Hand a checkpoint to the caller: finished scales (> j), and scale j's state."""
        if self.checkpoint is not None:
            books = {"elapsed": time.perf_counter() - self.start, "history": self.history}
            books["scale_metrics"] = {str(k): v for k, v in self.scale_metrics.items()}
            books["scale_times"] = {str(k): v for k, v in self.scale_times.items()}
            self.checkpoint(scale_checkpoint(self.blocks, j, self.generator, books, st))

    def _restore(self, ckpt: Checkpoint) -> int:
        """Load a checkpoint's finished scales and bookkeeping; returns the scale to fit."""
        state = ckpt.state
        j = int(state["scale"])
        finished = ckpt.section(MODEL)
        for k in range(self.config.n_scales - 1, j, -1):
            self.blocks.load(k, finished)
        self.history = list(state["history"])
        self.scale_metrics = {int(k): v for k, v in state["scale_metrics"].items()}
        self.scale_times = {int(k): v for k, v in state["scale_times"].items()}
        self.start = time.perf_counter() - float(state["elapsed"])
        self.generator.set_state(ckpt.tensors[GENERATOR])
        return j

    # -- the loop ------------------------------------------------------------------------
    def run(self, resume: Checkpoint | None = None) -> FitResult:
        c = self.config
        self.blocks = RankBlocks(self.model, self.team)  # the finished scales, as held here
        first = c.n_scales - 1 if resume is None else self._restore(resume)
        for j in range(first, -1, -1):
            if self.stopped == "time_limit":
                break
            t0 = time.perf_counter()
            self.scale_metrics[j] = self._fit_scale(j, resume if j == first else None)
            if j > 0 and self.stopped == "time_limit":  # the fit ends at a coarse scale
                self.scale_metrics[j] |= self._full_grid(j)  # so its figures are exact
            self.scale_times[j] = self.scale_times.get(j, 0.0) + time.perf_counter() - t0
            ends = {"event": "scale_end", "scale": j, "mlp_blocks": self.blocks.counts.get(j, 0)}
            sizes = {"blocks": self.layout.n_blocks(j), "params": self.blocks.n_params}
            self._log(ends | sizes | self.scale_metrics[j])
            if j > 0 and self.stopped is None:
                self._save(j - 1, None)
        finest = min(self.scale_metrics)
        fitted = self.scale_metrics[finest]
        if c.weights != "float32":  # the stored model's own figures, measured again
            self.blocks.round(c.weights)
            self.scale_metrics[finest] = fitted | self._full_grid(finest)
        model = self.blocks.gather()  # the whole model (rank 0; None on the other ranks)
        if model is not None:  # its rows were rounded by their owners
            model.weights = c.weights
        stages = {f"seconds_{k}": round(v, 3) for k, v in self.stage_seconds.items()}
        summary = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "finest_scale_fitted": finest,
            "stopped": self.stopped or self.scale_stops.get(finest, "max_iters"),
            **({"stop_detail": self.stop_detail} if self.stop_detail else {}),
            **stages,
            **({"before_rounding": fitted} if c.weights != "float32" else {}),
            "params": self.blocks.n_params,
            "scale_seconds": {str(k): round(v, 3) for k, v in self.scale_times.items()},
            "scales": {str(k): v for k, v in self.scale_metrics.items()},
            "mlp_blocks": {str(j): self.blocks.counts.get(j, 0) for j in range(c.n_scales)},
            "blocks": {str(j): self.layout.n_blocks(j) for j in range(c.n_scales)},
        }
        summary["scale_stop_reasons"] = {str(k): v for k, v in self.scale_stops.items()}
        summary["world_size"] = self.team.world_size
        fitting, own = self.stage_seconds["fitting"], sum(self.own_blocks.values())
        summary["ranks"] = rank_figures(self.team, fitting, own)
        summary.update(self.scale_metrics[finest])
        self.model.meta["summary"] = summary
        return FitResult(model, self.history, summary)

    def _full_grid(self, j: int) -> dict[str, float]:
        """Level of detail ``j``'s exact full-grid figures (each rank measures its share)."""
        t0 = time.perf_counter()
        sums = measure(self.blocks, self.source, j, self.kind.binary, self.batch)
        self.stage_seconds["measuring"] += time.perf_counter() - t0
        return self.kind.metric_fields(sums, self.peak)

    def _start_scale(self, j: int, resume: Checkpoint | None) -> ScaleState:
        """The state of scale ``j`` at its start, or as a checkpoint left it."""
        c = self.config
        targets = shard_targets(self.residuals, self.blocks, j)
        n_live = self.n_live = int(self.team.sum([len(targets.ids)])[0])
        self.own_blocks[j] = len(targets.ids)
        if resume is not None and resume.state["iteration"] > 0:
            shape = self.model.bank_shape
            st = ScaleState.resume(j, targets, resume, shape, self.device, c.lr)
            step = st.opt.step_count
            self._log(
                {"event": "resumed", "scale": j, "iteration": st.iteration, "adam_step": step}
            )
            return st
        if resume is not None:
            self._log({"event": "resumed", "scale": j, "iteration": 0, "adam_step": 0})
        params = self.blocks.n_params + n_live * self.model.bank_shape.params_per_block
        blocks = self.layout.n_blocks(j)
        self._log(
            {"event": "scale_start", "scale": j, "max_iters": c.max_iters, "blocks": blocks}
            | {"mlp_blocks": n_live, "params": params}
        )
        bank = self.model.new_bank(j, targets.ids, c.seed, c.weight_sharing)
        return ScaleState.start(j, targets, bank, c.lr)

    def _measure(self, st: ScaleState, prefix: str) -> tuple[dict[str, float], float]:
        """The scale's quality figures as it stands (keys prefixed), and the seconds taken."""
        t0 = time.perf_counter()
        sums = reduce_sums(self.team, st.live_metrics(self.residuals))
        fields = {prefix + k: v for k, v in self.kind.metric_fields(sums, self.peak).items()}
        return fields, time.perf_counter() - t0

    def _fit_scale(self, j: int, resume: Checkpoint | None = None) -> dict[str, float]:
        """Fit scale ``j``; returns its final quality figures: exact full-grid ones at scale
        0, a coarser scale's on its own grid (keys prefixed ``level_``)."""
        c = self.config
        t_setup = time.perf_counter()
        st = self._start_scale(j, resume)
        t_fit = time.perf_counter()
        self.stage_seconds["setup"] += t_fit - t_setup
        measuring, reason = 0.0, "max_iters"
        n_live = self.n_live  # over every rank
        params_now = self.blocks.n_params + n_live * self.model.bank_shape.params_per_block
        n_samples, points = self.coords.shape[0], c.block_points(n_live)
        chunk = c.chunk_samples(self.device.type)
        prefix = "" if j == 0 else "level_"
        last_checkpoint = time.perf_counter()
        it = st.iteration
        record = None  # the last measurement's figures, if taken at the last iteration
        active = int(self.team.sum([len(st.active)])[0])  # over every rank
        self.cpus.start()
        for it in range(st.iteration + 1, c.max_iters + 1):
            record = None
            if active == 0:
                reason = "all_frozen"  # every block pruned or frozen
                break
            pick = None
            if 0 < points < n_samples:  # the same samples of every block, on every rank
                pick = torch.randperm(n_samples, generator=self.generator)[:points]
                pick = pick.to(self.device)
            block_mse = st.step(self.residuals, self.coords, pick, chunk)
            if self.cpus.check():
                self._log({"event": "threads", "scale": j, "iteration": it, "threads": 1})
            st.opt.lr = st.lr * c.lr_decay ** (it - 1)
            st.opt.step()
            loss = st.frozen_mse + float(block_mse.sum())
            if it % c.freeze_every == 0 and math.isfinite(loss):
                st.freeze(block_mse, c.freeze_mse, self.residuals)
            measuring_now = c.metric_every and measure_now(j, it, c.metric_every)
            every = self.checkpoint_iterations
            if not decide_now(it, c, self.team.active, measuring_now, every):
                st.iteration = it  # no decision can change here: the ranks need not meet
                continue
            due = time.perf_counter() - last_checkpoint > self.checkpoint_seconds
            elapsed = time.perf_counter() - self.start
            over = bool(c.time_limit) and elapsed > c.time_limit
            # one collective an iteration: every rank takes the same decisions
            loss, active, stop, due, over, elapsed = self.team.sum(
                [loss, len(st.active), self.should_stop(), due, over, elapsed]
            )
            loss, active = loss / max(n_live, 1), int(active)
            elapsed /= self.team.world_size  # the same clock on every rank
            if not math.isfinite(loss):
                raise DivergedError(
                    f"the loss became {loss} at scale {j}, iteration {it} (learning rate "
                    f"{st.opt.lr:.3g} at that iteration)"
                )
            if measuring_now:
                record, seconds = self._measure(st, prefix)
                measuring += seconds
            if record is not None or it % LOG_EVERY == 0 or it == 1:
                head = {"event": "iteration", "scale": j, "iteration": it, "loss": loss}
                sizes = {"live_blocks": active, "mlp_blocks": n_live, "params": params_now}
                self._log(head | sizes | (record or {}), at=elapsed)
            st.iteration = it
            if stop or due or (every and it % every == 0):
                self._save(j, st)
                last_checkpoint = time.perf_counter()
                if stop:
                    raise FitInterrupted(f"interrupted at scale {j}, iteration {it}")
            if over:
                self.stopped = reason = "time_limit"
                break
            if j == 0 and record is not None:
                if c.target and record[self.kind.metric] >= c.target:
                    self.stopped = reason = "target"
                    break
                upcoming = next_measurement(it, c.metric_every)
                self.stop_detail = quality_plateau(self.history, self.kind, c.tail, upcoming)
                if self.stop_detail:
                    reason = "plateau"
                    break
            if st.loss_plateau(it, loss, c):
                reason = "plateau"
                break
        if record is None:  # the scale's end as it stands (only active blocks evaluated)
            record, seconds = self._measure(st, prefix)
            measuring += seconds
        self.blocks.finish(j, st.ids, st.bank())
        self.scale_stops[j] = reason
        self.stage_seconds["measuring"] += measuring
        self.stage_seconds["fitting"] += time.perf_counter() - t_fit - measuring
        self._log({"event": "scale_fitted", "scale": j, "iterations": it, "stop": reason})
        return record
