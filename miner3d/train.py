"""Coarse-to-fine training of a MINER model (Saragadam et al. 2022, Algorithm 1), d = 2 or 3.

For each scale ``j`` from the coarsest (``J - 1``) to the finest (0):

1. **Targets.** Stream over every block of the scale: the target is the box-filtered signal
   ``G_j`` minus the reconstruction of the coarser scales at this scale's samples (the
   residual, eq. 7; the Gaussian-pyramid ablation fits ``G_j`` itself). The signal is read
   through :class:`~miner3d.source.SignalSource` (its own dtype, or a memory map; levels
   box-filtered per block when needed): no padded, float or per-scale copy of the full signal
   exists. The live blocks' targets are cached in float16 when a scale's cache would fit in
   ``cache_targets`` bytes (the coarse scales, and every scale of small signals; float16
   rounding, ~1e-4 at most, is far below any quality figure), otherwise recomputed at each
   iteration's samples from the signal and the coarser scales' fields, never stored.
2. **Prune before** (paper 3.2): a block whose mean squared residual is at most
   ``prune_mse`` gets no MLP; its residual is zero.
3. **Fit** the live blocks' MLPs together (batched matmul), loss = sum of per-block MSEs so
   each block's gradient is its own. **Prune during**: a block whose MSE falls to
   ``freeze_mse`` is frozen; its parameters and Adam state leave the optimisation.
4. **Switch** scale when every block is frozen, on a plateau of the loss, or at
   ``max_iters``.

Every block's work is independent of the others' (the per-block loss, the per-block freezing),
so blocks can later be sharded across ranks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .bank import BankAdam, BankShape, MLPBank
from .blocks import BlockLayout, local_coordinates
from .errors import MinerError
from .grid import GridTransform
from .memory import return_large_frees
from .metrics import MetricSums, block_sums, full_resolution_sums
from .model import MinerModel
from .source import SignalSource


@dataclass
class FitConfig:
    """Everything that shapes a fit. Defaults: the paper's 3D setting."""

    n_scales: int = 4
    """J, the number of pyramid scales (1 = no pyramid)."""
    block: int = 16
    """Block edge in samples, the same at every scale."""
    hidden: int = 22
    """Features of each hidden layer."""
    hidden_layers: int = 2
    """Number of hidden (sine) layers."""
    w0: float = 30.0
    """SIREN frequency factor."""
    lr: float = 1e-3
    """Adam learning rate at the start of each scale."""
    lr_decay: float = 0.999
    """Learning rate multiplier per iteration (exponential decay, reset at each scale)."""
    max_iters: int = 2000
    """Iteration cap per scale."""
    prune_mse: float = 5e-4
    """Prune before a scale: blocks whose mean squared residual is at most this get no MLP."""
    freeze_mse: float = 1e-4
    """Prune during a scale: a block whose MSE reaches this is frozen."""
    freeze_every: int = 10
    """Iterations between freezing checks (each one compacts the optimiser state)."""
    plateau_window: int = 200
    """Iterations over which the loss must improve by ``plateau_tol`` (relative)."""
    plateau_tol: float = 0.01
    """Relative improvement of the loss per window below which the scale ends (0: never)."""
    weight_sharing: bool = False
    """A child block starts from its parent's weights / sqrt(2^d) (when the parent has an MLP)."""
    pyramid: str = "laplacian"
    """``laplacian`` (fit residuals) or ``gaussian`` (fit each scale's signal, the ablation)."""
    points_per_block: int = 0
    """Samples per block per iteration, drawn at random (0: all ``b^d``)."""
    iteration_samples: int = 0
    """If > 0, overrides ``points_per_block`` at each scale's start: this many samples per
    iteration shared by the scale's live blocks, at least 64 per block (at most ``b^d``).
    Small signals then see every sample, large ones a subset, at a bounded iteration cost."""
    metric_every: int = 50
    """Iterations between quality measurements at the finest scale (0: at scale ends only)."""
    batch_blocks: int = 0
    """Blocks per batch in streamed passes (targets, metrics); 0: as many as hold 2^20
    samples (the transient memory of a pass is a few tens of bytes per sample of a batch)."""
    cache_targets: int = 256 << 20
    """Bytes under which a scale's targets are cached (float16) rather than recomputed at
    every iteration's samples (the whole scale's blocks counted, pruned or not)."""
    batch_samples: int = 1 << 19
    """Samples (blocks x points) per forward/backward chunk of an iteration; bounds the
    activation memory (about ``(3 * hidden_layers + 2) * hidden * 4`` bytes per sample) and
    leaves the result unchanged (every block's gradient is its own)."""
    seed: int = 0
    """Seed of the MLP initialisation and of the sample draws."""
    time_limit: float = 0.0
    """Wall-clock cap of the whole fit in seconds (0: none); the scale in progress is kept."""
    target: float = 0.0
    """Stop once the finest scale's measured quality reaches this (IoU, or PSNR in dB; 0: off)."""

    def validate(self) -> None:
        """Raise :class:`MinerError` naming the first bad field."""
        checks = {
            "n_scales": self.n_scales >= 1,
            "block": self.block >= 2 and self.block & (self.block - 1) == 0,
            "hidden": self.hidden >= 1,
            "hidden_layers": self.hidden_layers >= 1,
            "w0": self.w0 > 0,
            "lr": self.lr > 0,
            "lr_decay": 0 < self.lr_decay <= 1,
            "max_iters": self.max_iters >= 0,
            "prune_mse": self.prune_mse >= 0,
            "freeze_mse": self.freeze_mse >= 0,
            "freeze_every": self.freeze_every >= 1,
            "plateau_window": self.plateau_window >= 1,
            "plateau_tol": self.plateau_tol >= 0,
            "pyramid": self.pyramid in ("laplacian", "gaussian"),
            "points_per_block": self.points_per_block >= 0,
            "iteration_samples": self.iteration_samples >= 0,
            "metric_every": self.metric_every >= 0,
            "batch_blocks": self.batch_blocks >= 0,
            "batch_samples": self.batch_samples >= 1,
            "cache_targets": self.cache_targets >= 0,
            "time_limit": self.time_limit >= 0,
            "target": self.target >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise MinerError(f"invalid config value {name}={getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MinerError(f"unknown config field '{unknown[0]}'")
        return cls(**values)


@dataclass
class FitResult:
    """A fitted model, its history (one dict per logged event) and summary figures."""

    model: MinerModel
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[dict[str, Any]], None]


@dataclass
class Checkpoint:
    """Everything needed to continue a fit: tensors (finished scales' banks; the scale in
    progress: parameters, optimiser moments, which rows are live; the sampler's state) and a
    JSON-serialisable state (scale, iteration, running sums, history)."""

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


class FitInterrupted(MinerError):
    """The fit was asked to stop (SIGINT); a checkpoint was written first."""

    exit_code = 130


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinerError("CUDA was requested but torch sees no GPU")
    return torch.device(device)


def fit(
    signal: np.ndarray | torch.Tensor,
    config: FitConfig | None = None,
    *,
    occupancy: bool = True,
    value_scale: float = 1.0,
    transform: GridTransform | None = None,
    device: str | torch.device = "auto",
    callback: Callback | None = None,
    meta: dict[str, Any] | None = None,
    checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint_seconds: float = 300.0,
    resume: Checkpoint | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> FitResult:
    """Fit a MINER model to a signal, coarse to fine.

    Args:
        signal: occupancy ``(*S)``; image ``(C, *S)`` or ``(*S)`` for one channel; ``d = 2``
            or ``3`` spatial axes. A torch tensor or numpy array is kept in its own dtype
            (uint8 occupancy stays 1 byte per voxel); a numpy memory map is read from disk
            block batch by block batch (see :mod:`miner3d.source`).
        config: :class:`FitConfig` (paper defaults if omitted).
        occupancy: the signal is a binary occupancy (IoU is measured) rather than an image.
        value_scale: multiplies raw values into ``[0, 1]`` (1/255 for 8-bit images).
        transform: the grid's transform, stored in the model.
        device: ``auto``, ``cpu`` or ``cuda``.
        callback: called with every history record (dict) as it is logged.
        meta: extra JSON-serialisable metadata stored in the model.
        checkpoint: called with a :class:`Checkpoint` at every scale switch, every
            ``checkpoint_seconds`` within a scale, and before stopping on ``stop_requested``.
        resume: a checkpoint to continue from (same signal and config).
        stop_requested: polled every iteration; when it returns True the fit checkpoints and
            raises :class:`FitInterrupted`.

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
    if math.prod(np.shape(signal)) >= 1 << 26:  # large signals: memory before allocation speed
        # freed tensors leave the resident set at once (-170 MiB of peak on 64 MP RGB; on
        # small fits the page faults of fresh allocations cost up to 1.7x the time)
        return_large_frees()
    dev = pick_device(str(device))
    trainer = _Trainer(signal, config, occupancy, value_scale, transform, dev, callback, meta)
    trainer.checkpoint = checkpoint
    trainer.checkpoint_seconds = checkpoint_seconds
    trainer.stop_requested = stop_requested or (lambda: False)
    return trainer.run(resume)


class _Trainer:
    def __init__(self, signal, config, occupancy, value_scale, transform, device, callback, meta):
        if not torch.is_tensor(signal) and not isinstance(signal, np.memmap):
            signal = torch.as_tensor(np.asarray(signal))
        if occupancy or signal.ndim == 2:  # one channel: (*S) -> (1, *S)
            signal = signal[None]
        if signal.ndim - 1 not in (2, 3):
            raise MinerError(
                f"signals must have 2 or 3 spatial axes, got shape {tuple(signal.shape)}"
            )
        self.config = config
        self.occupancy = occupancy
        self.value_scale = value_scale
        self.device = device
        self.callback = callback
        self.checkpoint: Callable[[Checkpoint], None] | None = None
        self.checkpoint_seconds = 300.0
        self.stop_requested: Callable[[], bool] = lambda: False
        c = config
        self.layout = BlockLayout(tuple(signal.shape[1:]), c.block, c.n_scales)
        self.d = self.layout.ndim
        self.channels = signal.shape[0]
        # the padding is virtual: zeros for occupancy (outside), the border value for images
        self.source = SignalSource(
            signal, self.layout, "zero" if occupancy else "edge", value_scale, device
        )
        shape = BankShape(self.d, c.hidden, c.hidden_layers, self.channels, c.w0)
        model_meta = {"config": asdict(c), "occupancy": occupancy, "value_scale": value_scale}
        model_meta.update(meta or {})
        self.batch_blocks = c.batch_blocks or max(1, (1 << 20) // (self.channels * c.block**self.d))
        self.model = MinerModel(
            self.layout,
            shape,
            self.channels,
            transform,
            c.pyramid == "gaussian",
            model_meta,
            device,
        )
        self.generator = torch.Generator().manual_seed(c.seed)
        self.coords = local_coordinates(c.block, self.d, device)
        self.history: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.scale_metrics: dict[int, dict[str, float]] = {}
        self.scale_times: dict[int, float] = {}
        self.stopped: str | None = None  # "time_limit" or "target" once the fit must end

    # -- helpers -------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.perf_counter() - self.start, 4), **record}
        self.history.append(record)
        if self.callback is not None:
            self.callback(record)

    def _metric_fields(self, sums: MetricSums) -> dict[str, float]:
        if self.occupancy:
            return {"iou": sums.iou(0), "iou_04": sums.iou(1)}
        return {"psnr": sums.psnr}

    def full_metrics(self, from_scale: int) -> MetricSums:
        """Quality of the reconstruction at level of detail ``from_scale``, measured on the
        full-resolution grid (streamed block batch by block batch)."""
        return full_resolution_sums(
            self.model, self.source, from_scale, self.occupancy, self.batch_blocks
        )

    # -- checkpoints ---------------------------------------------------------------------
    def _save(self, j: int, scale_state: dict[str, Any] | None) -> None:
        """Hand a checkpoint to the caller: finished scales (> j), and scale j's state."""
        if self.checkpoint is None:
            return
        tensors: dict[str, torch.Tensor] = {"generator": self.generator.get_state()}
        for k in range(j + 1, self.config.n_scales):
            scale = self.model.scales[k]
            tensors[f"model.scale{k}.block_ids"] = scale.block_ids
            for i, p in enumerate(scale.bank.params):
                tensors[f"model.scale{k}.param{i}"] = p
        state: dict[str, Any] = {
            "scale": j,
            "iteration": 0,
            "elapsed": time.perf_counter() - self.start,
            "history": self.history,
            "scale_metrics": {str(k): v for k, v in self.scale_metrics.items()},
            "scale_times": {str(k): v for k, v in self.scale_times.items()},
        }
        if scale_state is not None:
            opt: BankAdam = scale_state["opt"]
            for i, p in enumerate(opt.bank.params):
                tensors[f"current.param{i}"] = p.detach()
                tensors[f"current.exp_avg{i}"] = opt.exp_avg[i]
                tensors[f"current.exp_avg_sq{i}"] = opt.exp_avg_sq[i]
            for i, f in enumerate(scale_state["final"]):
                tensors[f"current.final{i}"] = f
            tensors["current.active"] = scale_state["active"]
            sums: MetricSums = scale_state["frozen_sums"]
            state.update(
                iteration=scale_state["it"],
                adam_step=opt.step_count,
                adam_lr=opt.lr,
                frozen_mse=scale_state["frozen_mse"],
                frozen_sums=asdict(sums),
                window_loss=scale_state["window_loss"],
            )
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.checkpoint(Checkpoint(tensors, json.loads(json.dumps(state))))

    def _restore(self, ckpt: Checkpoint) -> int:
        """Load a checkpoint's finished scales and bookkeeping; returns the scale to fit."""
        state, tensors = ckpt.state, ckpt.tensors
        j = int(state["scale"])
        n_params = 2 * len(self.model.bank_shape.layer_sizes)
        for k in range(self.config.n_scales - 1, j, -1):
            params = [tensors[f"model.scale{k}.param{i}"].to(self.device) for i in range(n_params)]
            self.model.set_scale(
                k, tensors[f"model.scale{k}.block_ids"], MLPBank(self.model.bank_shape, params)
            )
        self.history = list(state["history"])
        self.scale_metrics = {int(k): v for k, v in state["scale_metrics"].items()}
        self.scale_times = {int(k): v for k, v in state["scale_times"].items()}
        self.start = time.perf_counter() - float(state["elapsed"])
        self.generator.set_state(tensors["generator"])
        return j

    # -- the loop ------------------------------------------------------------------------
    def run(self, resume: Checkpoint | None = None) -> FitResult:
        c = self.config
        first = c.n_scales - 1
        if resume is not None:
            first = self._restore(resume)
        for j in range(first, -1, -1):
            if self.stopped == "time_limit":
                break
            t0 = time.perf_counter()
            self._fit_scale(j, resume if j == first and resume is not None else None)
            sums = self.full_metrics(j)
            self.scale_metrics[j] = self._metric_fields(sums)
            self.scale_times[j] = self.scale_times.get(j, 0.0) + time.perf_counter() - t0
            self._log(
                {
                    "event": "scale_end",
                    "scale": j,
                    "mlp_blocks": self.model.mlp_blocks(j),
                    "blocks": self.layout.n_blocks(j),
                    "params": self.model.n_params,
                    **self.scale_metrics[j],
                }
            )
            if j > 0 and self.stopped is None:
                self._save(j - 1, None)
        finest = min(self.scale_metrics)
        summary = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "finest_scale_fitted": finest,
            "stopped": self.stopped or "done",
            "params": self.model.n_params,
            "scale_seconds": {str(k): round(v, 3) for k, v in self.scale_times.items()},
            "scales": {str(k): v for k, v in self.scale_metrics.items()},
            "mlp_blocks": {str(j): self.model.mlp_blocks(j) for j in range(c.n_scales)},
            "blocks": {str(j): self.layout.n_blocks(j) for j in range(c.n_scales)},
        }
        summary.update(self.scale_metrics[finest])
        self.model.meta["summary"] = summary
        return FitResult(self.model, self.history, summary)

    def _targets(self, j: int):
        """Stream every block of scale j: residual targets, pruning, fixed metric sums.

        Returns live ids ``(m,)``; their targets ``(m, C, b^d)`` float16 when the scale's
        cache fits ``cache_targets`` (else ``None``: recomputed at each iteration's samples);
        and the metric sums of the pruned blocks at scale 0. Deterministic given the
        coarser scales, so a resumed fit rebuilds them instead of storing them.
        """
        c, layout = self.config, self.layout
        n = layout.n_blocks(j)
        live_ids = []
        targets = None
        if n * self.channels * c.block**self.d * 2 <= c.cache_targets:
            # room for every block; only the rows written are ever touched (resident)
            targets = torch.empty(
                (n, self.channels, c.block**self.d), dtype=torch.float16, device=self.device
            )
        filled = 0
        pruned = MetricSums()
        for start in range(0, n, self.batch_blocks):
            ids = torch.arange(start, min(start + self.batch_blocks, n), device=self.device)
            coords = layout.unravel(j, ids)
            level = self.source.level_blocks(j, coords)
            if j < c.n_scales - 1:
                base = self.model.evaluate_blocks(j, ids, from_scale=j + 1)
            else:
                base = torch.zeros_like(level)
            residual = level - base
            energy = residual.square().flatten(1).mean(dim=1)
            live = energy > c.prune_mse
            live_ids.append(ids[live])
            if targets is not None:
                kept = (level if self.model.gaussian else residual)[live].flatten(2)
                targets[filled : filled + len(kept)] = kept
                filled += len(kept)
            if j == 0:  # a pruned block's value is the coarser scales' sum
                mask = layout.valid_mask(0, ids)
                dead = ~live
                pruned = pruned.add(
                    block_sums(
                        base[dead],
                        level[dead],
                        None if mask is None else mask[dead],
                        self.occupancy,
                    )
                )
        if targets is not None:
            targets = targets[:filled]  # the unfilled rows were never touched
        return torch.cat(live_ids), targets, pruned

    def _init_bank(self, j: int, ids: torch.Tensor) -> MLPBank:
        c = self.config
        bank = MLPBank.create(self.model.bank_shape, len(ids), self.device, self.generator)
        parent_scale = self.model.scales[j + 1] if j + 1 < c.n_scales else None
        if c.weight_sharing and parent_scale is not None and len(ids):
            parents = self.layout.parent(j, ids)
            slots = self.model._slots[j + 1][parents]
            has = slots >= 0
            shrink = 1.0 / math.sqrt(2**self.d)
            for p, q in zip(bank.params, parent_scale.bank.params, strict=True):
                p[has] = q[slots[has]] * shrink
        return bank

    def _local(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat sample indices inside a block ``(P,)`` -> integer positions ``(P, d)``."""
        b = self.config.block
        return torch.stack(
            [
                torch.div(flat, b ** (self.d - 1 - a), rounding_mode="floor") % b
                for a in range(self.d)
            ],
            dim=1,
        )

    def _chunk_targets(self, st, rows: slice, pick: torch.Tensor | None) -> torch.Tensor:
        """Targets ``(m, C, P)`` of live rows ``rows`` at the samples ``pick`` (all if None):
        from the cache, or from the signal minus the coarser scales' sum at exactly those
        samples."""
        cached = st["live_targets"]
        if cached is not None:
            part = cached[rows]
            return (part if pick is None else part[:, :, pick]).float()
        j, ids = st["scale"], st["live_ids"][rows]
        flat = torch.arange(self.coords.shape[0], device=self.device) if pick is None else pick
        local = self._local(flat)
        level = self.source.values_at(j, ids, local)
        if self.model.gaussian:
            return level
        return level - self.model.coarser_samples(j, ids, local)

    @torch.no_grad()
    def _live_sums(self, bank: MLPBank, rows: torch.Tensor, ids: torch.Tensor) -> MetricSums:
        """Metric sums at scale 0 of blocks ``ids`` whose MLPs are rows ``rows`` of ``bank``,
        streamed block batch by block batch (their outputs on every sample, plus the coarser
        scales' sum, against the full-resolution signal)."""
        layout, b, d = self.layout, self.config.block, self.d
        sums = MetricSums()
        for start in range(0, len(ids), self.batch_blocks):
            part = ids[start : start + self.batch_blocks]
            out = bank.evaluate(self.coords, rows=rows[start : start + len(part)])
            values = out.transpose(1, 2).reshape((len(part), self.channels) + (b,) * d)
            if not self.model.gaussian:
                values += self.model.evaluate_blocks(0, part, from_scale=1)
            truth = self.source.level_blocks(0, layout.unravel(0, part))
            sums = sums.add(block_sums(values, truth, layout.valid_mask(0, part), self.occupancy))
        return sums

    def _step(self, st, pick: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward over the live blocks in chunks of ``batch_samples`` samples;
        returns every live block's MSE ``(n_active,)`` (gradients accumulate in the bank)."""
        bank = st["opt"].bank
        n = len(st["active"])
        coords = self.coords if pick is None else self.coords[pick]
        step = max(1, self.config.batch_samples // coords.shape[0])
        losses = []
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            target = self._chunk_targets(st, rows, pick)
            out = bank.forward(coords, rows=None if step >= n else rows).transpose(1, 2)
            block_mse = (out - target).square().flatten(1).mean(dim=1)
            block_mse.sum().backward()
            losses.append(block_mse.detach())
        return torch.cat(losses) if losses else torch.zeros(0, device=self.device)

    def _fit_scale(self, j: int, resume: Checkpoint | None = None) -> None:
        c = self.config
        ids, targets, pruned_sums = self._targets(j)
        n_live = len(ids)
        per_block = self.model.bank_shape.params_per_block
        params_now = self.model.n_params + n_live * per_block
        if resume is None or resume.state["iteration"] == 0:
            if resume is not None:
                self._log({"event": "resumed", "scale": j, "iteration": 0, "adam_step": 0})
            self._log(
                {
                    "event": "scale_start",
                    "scale": j,
                    "max_iters": c.max_iters,
                    "blocks": self.layout.n_blocks(j),
                    "mlp_blocks": n_live,
                    "params": params_now,
                }
            )
            bank = self._init_bank(j, ids)
            st: dict[str, Any] = {
                "final": [p.detach().clone() for p in bank.params],  # rows of every live block
                "active": torch.arange(n_live, device=self.device),  # rows still optimised
                "frozen_sums": MetricSums(),
                "frozen_mse": 0.0,
                "window_loss": None,
                "it": 0,
                "opt": BankAdam(bank, c.lr),
            }
        else:
            tensors, state = resume.tensors, resume.state
            n_params = 2 * len(self.model.bank_shape.layer_sizes)
            dev = self.device
            bank = MLPBank(
                self.model.bank_shape,
                [tensors[f"current.param{i}"].to(dev) for i in range(n_params)],
            )
            opt = BankAdam(bank, float(state["adam_lr"]))
            opt.load_state_dict(
                {
                    "step": state["adam_step"],
                    "lr": state["adam_lr"],
                    "exp_avg": [tensors[f"current.exp_avg{i}"].to(dev) for i in range(n_params)],
                    "exp_avg_sq": [
                        tensors[f"current.exp_avg_sq{i}"].to(dev) for i in range(n_params)
                    ],
                }
            )
            st = {
                "final": [tensors[f"current.final{i}"].to(dev) for i in range(n_params)],
                "active": tensors["current.active"].to(dev),
                "frozen_sums": MetricSums(**state["frozen_sums"]),
                "frozen_mse": float(state["frozen_mse"]),
                "window_loss": state["window_loss"],
                "it": int(state["iteration"]),
                "opt": opt,
            }
            self._log(
                {
                    "event": "resumed",
                    "scale": j,
                    "iteration": st["it"],
                    "adam_step": opt.step_count,
                }
            )
        opt: BankAdam = st["opt"]
        # the live blocks' data, compacted whenever blocks freeze (no per-iteration gather)
        if targets is not None and len(st["active"]) < len(targets):  # resumed mid-scale
            targets = _compact(targets, st["active"])
        st["live_targets"] = targets
        st["live_ids"] = ids[st["active"]]
        st["scale"] = j
        del targets
        n_samples = self.coords.shape[0]
        points = c.points_per_block
        if c.iteration_samples:
            points = max(64, c.iteration_samples // max(1, n_live))
        last_checkpoint = time.perf_counter()
        it = st["it"]
        for it in range(st["it"] + 1, c.max_iters + 1):
            active = st["active"]
            if len(active) == 0:
                break
            pick = None
            if 0 < points < n_samples:
                pick = torch.randperm(n_samples, generator=self.generator)[:points]
                pick = pick.to(self.device)
            block_mse = self._step(st, pick)
            opt.lr = c.lr * c.lr_decay ** (it - 1)
            opt.step()
            loss = (st["frozen_mse"] + float(block_mse.detach().sum())) / max(n_live, 1)
            if not math.isfinite(loss):
                raise MinerError(
                    f"the loss became {loss} at scale {j}, iteration {it}; the last good "
                    "checkpoint is kept (try a lower lr)"
                )
            if it % c.freeze_every == 0:
                self._freeze(j, st, block_mse.detach())
            active = st["active"]
            record = None
            if j == 0 and c.metric_every and it % c.metric_every == 0:
                rows = torch.arange(len(active), device=self.device)
                live_sums = self._live_sums(opt.bank, rows, st["live_ids"])
                record = self._metric_fields(pruned_sums.add(st["frozen_sums"]).add(live_sums))
            if record is not None or it % 50 == 0 or it == 1:
                self._log(
                    {
                        "event": "iteration",
                        "scale": j,
                        "iteration": it,
                        "loss": loss,
                        "live_blocks": len(active),
                        "mlp_blocks": n_live,
                        "params": params_now,
                        **(record or {}),
                    }
                )
            st["it"] = it
            stop = self.stop_requested()
            if stop or time.perf_counter() - last_checkpoint > self.checkpoint_seconds:
                self._save(j, st)
                last_checkpoint = time.perf_counter()
                if stop:
                    raise FitInterrupted(f"interrupted at scale {j}, iteration {it}")
            if c.time_limit and time.perf_counter() - self.start > c.time_limit:
                self.stopped = "time_limit"
                break
            if c.target and record is not None:
                reached = record["iou"] if self.occupancy else record["psnr"]
                if reached >= c.target:
                    self.stopped = "target"
                    break
            if c.plateau_tol > 0 and it % c.plateau_window == 0:
                window_loss = st["window_loss"]
                if window_loss is not None and window_loss - loss < c.plateau_tol * window_loss:
                    break
                st["window_loss"] = loss
        final, active = st["final"], st["active"]
        for f, p in zip(final, opt.bank.params, strict=True):
            f[active] = p.detach()
        self.model.set_scale(j, ids, MLPBank(self.model.bank_shape, final))
        self._log({"event": "scale_fitted", "scale": j, "iterations": it})

    def _freeze(self, j, st, block_mse) -> None:
        """Blocks whose MSE reached ``freeze_mse`` leave the optimisation (prune during)."""
        done = block_mse <= self.config.freeze_mse
        if not done.any():
            return
        opt: BankAdam = st["opt"]
        active = st["active"]
        rows = active[done]
        for f, p in zip(st["final"], opt.bank.params, strict=True):
            f[rows] = p.detach()[done]
        if j == 0:
            frozen = self._live_sums(opt.bank, torch.nonzero(done).squeeze(1), st["live_ids"][done])
            st["frozen_sums"] = st["frozen_sums"].add(frozen)
        st["frozen_mse"] += float(block_mse[done].sum())
        keep = torch.nonzero(~done).squeeze(1)
        opt.keep(keep)
        st["active"] = active[keep]
        st["live_ids"] = st["live_ids"][keep]
        if st["live_targets"] is not None:
            st["live_targets"] = _compact(st["live_targets"], keep)


def _compact(rows: torch.Tensor, keep: torch.Tensor, step: int = 4096) -> torch.Tensor:
    """``rows[keep]`` for sorted ``keep``, in place, a few rows at a time: never a second copy
    of a large cache (a row moves only towards the front, past rows already moved)."""
    for start in range(0, len(keep), step):
        part = keep[start : start + step]
        rows[start : start + len(part)] = rows[part]
    return rows[: len(keep)]
