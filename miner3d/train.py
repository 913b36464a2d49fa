"""Coarse-to-fine training of a MINER model (Saragadam et al. 2022, Algorithm 1), d = 2 or 3.

For each scale ``j`` from the coarsest (``J - 1``) to the finest (0):

1. **Targets.** Stream over every block of the scale: the target is the box-filtered signal
   ``G_j`` minus the reconstruction of the coarser scales at this scale's samples (the
   residual, eq. 7; the Gaussian-pyramid ablation fits ``G_j`` itself). Scale 0's targets are
   built from the 1-byte signal per block batch; no float copy of the full grid exists.
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

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .bank import BankAdam, BankShape, MLPBank
from .blocks import BlockLayout, gather_blocks, local_coordinates
from .errors import MinerError
from .grid import GridTransform
from .metrics import MetricSums, block_sums
from .model import MinerModel
from .pyramid import gaussian_levels


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
    metric_every: int = 50
    """Iterations between quality measurements at the finest scale (0: at scale ends only)."""
    batch_blocks: int = 1024
    """Blocks per batch in streamed passes (targets, metrics)."""
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
            "metric_every": self.metric_every >= 0,
            "batch_blocks": self.batch_blocks >= 1,
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
) -> FitResult:
    """Fit a MINER model to a signal, coarse to fine.

    Args:
        signal: occupancy ``(*S)``; image ``(C, *S)`` or ``(*S)`` for one channel; ``d = 2``
            or ``3`` spatial axes.
            Kept in its own dtype (uint8 occupancy stays 1 byte per voxel).
        config: :class:`FitConfig` (paper defaults if omitted).
        occupancy: the signal is a binary occupancy (IoU is measured) rather than an image.
        value_scale: multiplies raw values into ``[0, 1]`` (1/255 for 8-bit images).
        transform: the grid's transform, stored in the model.
        device: ``auto``, ``cpu`` or ``cuda``.
        callback: called with every history record (dict) as it is logged.
        meta: extra JSON-serialisable metadata stored in the model.

    Returns:
        :class:`FitResult`. Peak memory: the padded signal in its dtype, the box-filtered levels
        1..J-1 (float32, ``4 / (2^d - 1)`` bytes per sample and channel at most), the dense
        residual fields 1..J-1 (as much again), and per live block of the current scale its
        target (float32) and, for occupancy, its ground truth (1 byte) per sample.
    """
    config = config or FitConfig()
    config.validate()
    dev = pick_device(str(device))
    trainer = _Trainer(signal, config, occupancy, value_scale, transform, dev, callback, meta)
    return trainer.run()


class _Trainer:
    def __init__(self, signal, config, occupancy, value_scale, transform, device, callback, meta):
        signal = torch.as_tensor(np.asarray(signal)) if not torch.is_tensor(signal) else signal
        if occupancy or signal.ndim == 2:  # one channel: (*S) -> (1, *S)
            signal = signal.unsqueeze(0)
        if signal.ndim - 1 not in (2, 3):
            raise MinerError(
                f"signals must have 2 or 3 spatial axes, got shape {tuple(signal.shape)}"
            )
        self.config = config
        self.occupancy = occupancy
        self.value_scale = value_scale
        self.device = device
        self.callback = callback
        c = config
        self.layout = BlockLayout(tuple(signal.shape[1:]), c.block, c.n_scales)
        self.d = self.layout.ndim
        self.channels = signal.shape[0]
        # pad at full resolution with the border value (zeros for occupancy: outside)
        padded = torch.zeros((self.channels, *self.layout.padded), dtype=signal.dtype)
        padded[(slice(None), *(slice(0, n) for n in self.layout.shape))] = signal
        if not occupancy:  # replicate the last row/column into the padding
            for axis, n in enumerate(self.layout.shape):
                if n < self.layout.padded[axis]:
                    src = padded.narrow(axis + 1, n - 1, 1)
                    padded.narrow(axis + 1, n, self.layout.padded[axis] - n).copy_(
                        src.expand_as(padded.narrow(axis + 1, n, self.layout.padded[axis] - n))
                    )
        self.signal = padded.to(device)
        self.levels = gaussian_levels(self.signal, c.n_scales, value_scale, slab=64)
        shape = BankShape(self.d, c.hidden, c.hidden_layers, self.channels, c.w0)
        model_meta = {"config": asdict(c), "occupancy": occupancy, "value_scale": value_scale}
        model_meta.update(meta or {})
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

    def _level_blocks(self, j: int, coords: torch.Tensor) -> torch.Tensor:
        """Blocks of the box-filtered signal at scale j, float32 ``(n, C, b..b)``."""
        if j == 0:
            return gather_blocks(self.signal, self.layout.block, coords).float() * self.value_scale
        return gather_blocks(self.levels[j], self.layout.block, coords)

    def full_metrics(self, from_scale: int) -> MetricSums:
        """Quality of the reconstruction at level of detail ``from_scale``, measured on the
        full-resolution grid (streamed block batch by block batch)."""
        sums = MetricSums()
        for ids, values in self.model.iter_blocks(0, from_scale, self.config.batch_blocks):
            coords = self.layout.unravel(0, ids)
            truth = self._level_blocks(0, coords)
            sums = sums.add(
                block_sums(values, truth, self.layout.valid_mask(0, ids), self.occupancy)
            )
        return sums

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> FitResult:
        c = self.config
        scale_times = {}
        for j in reversed(range(c.n_scales)):
            if self.stopped == "time_limit":
                break
            t0 = time.perf_counter()
            self._fit_scale(j)
            sums = self.full_metrics(j)
            self.scale_metrics[j] = self._metric_fields(sums)
            scale_times[j] = time.perf_counter() - t0
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
        finest = min(self.scale_metrics)
        summary = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "finest_scale_fitted": finest,
            "stopped": self.stopped or "done",
            "params": self.model.n_params,
            "scale_seconds": {str(k): round(v, 3) for k, v in scale_times.items()},
            "scales": {str(k): v for k, v in self.scale_metrics.items()},
            "mlp_blocks": {str(j): self.model.mlp_blocks(j) for j in range(c.n_scales)},
            "blocks": {str(j): self.layout.n_blocks(j) for j in range(c.n_scales)},
        }
        summary.update(self.scale_metrics[finest])
        self.model.meta["summary"] = summary
        return FitResult(self.model, self.history, summary)

    def _targets(self, j: int):
        """Stream every block of scale j: residual targets, pruning, fixed metric sums.

        Returns live ids ``(m,)``, targets ``(m, C, b^d)`` float32, ground truth of the live
        blocks at scale 0 for occupancy ``(m, C, b^d)`` uint8 (else None), and the metric sums
        of the pruned blocks at scale 0.
        """
        c, layout = self.config, self.layout
        n = layout.n_blocks(j)
        live_ids, targets, truths = [], [], []
        pruned = MetricSums()
        for start in range(0, n, c.batch_blocks):
            ids = torch.arange(start, min(start + c.batch_blocks, n), device=self.device)
            coords = layout.unravel(j, ids)
            level = self._level_blocks(j, coords)
            base = (
                self.model.evaluate_blocks(j, ids, from_scale=j + 1)
                if j < c.n_scales - 1
                else torch.zeros_like(level)
            )
            residual = level - base
            energy = residual.square().flatten(1).mean(dim=1)
            live = energy > c.prune_mse
            target = level if self.model.gaussian else residual
            live_ids.append(ids[live])
            targets.append(target[live].flatten(2))
            if j == 0:
                if self.occupancy:
                    truths.append(gather_blocks(self.signal, c.block, coords[live]).flatten(2))
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
        ids = torch.cat(live_ids)
        return ids, torch.cat(targets), (torch.cat(truths) if truths else None), pruned

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

    def _stats(self, j, rows_out, targets, truths, rows) -> MetricSums:
        """Metric sums at scale 0 of some live blocks, given their outputs ``(m, C, b^d)``."""
        err = rows_out - targets
        if self.occupancy:
            truth = truths.float()
            values = truth + err  # = coarser base + this scale's output
        else:
            truth = torch.zeros_like(err)
            values = err
        mask = self.layout.valid_mask(0, rows)
        if mask is not None:
            mask = mask.flatten(1)
        return block_sums(values, truth, mask, self.occupancy)

    @torch.no_grad()
    def _full_outputs(self, bank: MLPBank, rows: torch.Tensor | None = None) -> torch.Tensor:
        outs = []
        n = len(bank) if rows is None else len(rows)
        for start in range(0, n, self.config.batch_blocks):
            sel = torch.arange(start, min(start + self.config.batch_blocks, n), device=self.device)
            sel = sel if rows is None else rows[sel]
            outs.append(bank.forward(self.coords, rows=sel).transpose(1, 2))
        if not outs:
            return torch.zeros((0, self.channels, self.coords.shape[0]), device=self.device)
        return torch.cat(outs)

    def _fit_scale(self, j: int) -> None:
        c = self.config
        ids, targets, truths, pruned_sums = self._targets(j)
        n_live = len(ids)
        self._log(
            {
                "event": "scale_start",
                "scale": j,
                "blocks": self.layout.n_blocks(j),
                "mlp_blocks": n_live,
                "params": self.model.n_params + n_live * self.model.bank_shape.params_per_block,
            }
        )
        bank = self._init_bank(j, ids)
        final = [p.detach().clone() for p in bank.params]  # rows of every live block
        active = torch.arange(n_live, device=self.device)  # rows still optimised
        frozen_sums = MetricSums()
        frozen_mse = 0.0
        opt = BankAdam(bank, c.lr)
        n_samples = self.coords.shape[0]
        window_loss = None
        it = 0
        for it in range(1, c.max_iters + 1):
            if len(active) == 0:
                break
            if 0 < c.points_per_block < n_samples:
                pick = torch.randperm(n_samples, generator=self.generator)[: c.points_per_block]
                pick = pick.to(self.device)
                coords, target = self.coords[pick], targets[active][:, :, pick]
            else:
                coords, target = self.coords, targets[active]
            out = bank.forward(coords).transpose(1, 2)  # (n_active, C, P)
            block_mse = (out - target).square().flatten(1).mean(dim=1)
            block_mse.sum().backward()
            opt.lr = c.lr * c.lr_decay ** (it - 1)
            opt.step()
            loss = (frozen_mse + float(block_mse.detach().sum())) / max(n_live, 1)

            if it % c.freeze_every == 0:
                done = block_mse.detach() <= c.freeze_mse
                if done.any():
                    rows = active[done]
                    for f, p in zip(final, bank.params, strict=True):
                        f[rows] = p.detach()[done]
                    if j == 0:
                        outs = self._full_outputs(bank, torch.nonzero(done).squeeze(1))
                        frozen_sums = frozen_sums.add(
                            self._stats(
                                j,
                                outs,
                                targets[rows],
                                truths[rows] if truths is not None else None,
                                ids[rows],
                            )
                        )
                    frozen_mse += float(block_mse.detach()[done].sum())
                    keep = torch.nonzero(~done).squeeze(1)
                    opt.keep(keep)
                    active = active[keep]
            record = None
            if j == 0 and c.metric_every and it % c.metric_every == 0:
                outs = self._full_outputs(bank)
                live_sums = self._stats(
                    j,
                    outs,
                    targets[active],
                    None if truths is None else truths[active],
                    ids[active],
                )
                sums = pruned_sums.add(frozen_sums).add(live_sums)
                record = self._metric_fields(sums)
            if record is not None or it % 50 == 0 or it == 1:
                self._log(
                    {
                        "event": "iteration",
                        "scale": j,
                        "iteration": it,
                        "loss": loss,
                        "live_blocks": len(active),
                        "mlp_blocks": n_live,
                        "params": self.model.n_params
                        + n_live * self.model.bank_shape.params_per_block,
                        **(record or {}),
                    }
                )
            if c.time_limit and time.perf_counter() - self.start > c.time_limit:
                self.stopped = "time_limit"
                break
            if c.target and record is not None:
                reached = record["iou"] if self.occupancy else record["psnr"]
                if reached >= c.target:
                    self.stopped = "target"
                    break
            if c.plateau_tol > 0 and it % c.plateau_window == 0:
                if window_loss is not None and window_loss - loss < c.plateau_tol * window_loss:
                    break
                window_loss = loss
        for f, p in zip(final, bank.params, strict=True):
            f[active] = p.detach()
        self.model.set_scale(j, ids, MLPBank(self.model.bank_shape, final))
        self._log({"event": "scale_fitted", "scale": j, "iterations": it})
