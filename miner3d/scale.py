"""The typed state of the scale being fitted, and what one iteration does to it.

:class:`ScaleState` is everything a checkpoint saves of a scale in progress (its tensors under
``current.``, see :mod:`miner3d.checkpoint`) plus the caches rebuilt from the signal when a fit
resumes (targets, masks of the blocks that reach into the padding, the pruned blocks' metric
sums). :meth:`ScaleState.step` runs forward and backward over the active blocks;
:meth:`ScaleState.freeze` takes blocks that reached ``freeze_mse`` out of the optimisation
with their Adam state (prune during).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .bank import BankAdam, BankShape, MLPBank
from .checkpoint import CURRENT, Checkpoint, prefixed
from .config import FitConfig
from .losses import masked_mse, mse
from .metrics import MetricSums
from .targets import MeasureRows, Residuals, ScaleTargets, compact


@dataclass
class ScaleState:
    """The state of scale :attr:`scale` during its fit."""

    scale: int
    ids: torch.Tensor
    """``(n,)`` ids of every block of the scale that has an MLP (rows of ``final``)."""
    final: list[torch.Tensor]
    """Parameters of every such block (frozen rows final, active rows set by :meth:`bank`)."""
    opt: BankAdam
    """Adam over the active rows' bank."""
    active: torch.Tensor
    """``(m,)`` rows of ``final`` still optimised."""
    live_ids: torch.Tensor
    """``(m,)`` block ids of the active rows."""
    targets: torch.Tensor | None
    """``(m, C, b^d)`` float16 targets of the active rows, or ``None`` (recomputed)."""
    partial_ids: torch.Tensor
    """Sorted ids of live blocks that reach into the padding (the loss masks them)."""
    partial_masks: torch.Tensor
    """``(k, b^d)`` bool, real samples of each of ``partial_ids``."""
    pruned_sums: MetricSums
    """Metric sums (at the scale's resolution) of the blocks without an MLP."""
    frozen_sums: MetricSums = field(default_factory=MetricSums)
    """Metric sums (at the scale's resolution) of the frozen blocks."""
    frozen_mse: float = 0.0
    """Sum of the frozen blocks' last MSEs."""
    window_loss: float | None = None
    """The loss at the start of the current plateau window."""
    iteration: int = 0
    lr: float = 0.0
    """The learning rate the scale started with (a resume may change it only from the next
    scale on)."""
    fixed: MeasureRows | None = None
    """The active rows' :meth:`Residuals.fixed_parts`, read at the first measurement (``None``
    before, or when over budget: then each measurement reads them again)."""
    fixed_read: bool = False

    def loss_plateau(self, it: int, loss: float, config: FitConfig) -> bool:
        """At the end of each ``plateau_window`` iterations: whether ``loss`` improved on
        the window's first by less than ``plateau_tol`` of it (else a new window starts)."""
        if not config.plateau_tol or it % config.plateau_window:
            return False
        last, self.window_loss = self.window_loss, loss
        return last is not None and last - loss < config.plateau_tol * last

    @classmethod
    def start(cls, j: int, targets: ScaleTargets, bank: MLPBank, lr: float) -> ScaleState:
        """A fresh scale: every live block active, Adam at step 0."""
        ids = targets.ids
        final = [p.detach().clone() for p in bank.params]
        active = torch.arange(len(ids), device=ids.device)
        return cls(
            j,
            ids,
            final,
            BankAdam(bank, lr),
            active,
            ids,
            targets.cache,
            targets.partial_ids,
            targets.partial_masks,
            targets.pruned_sums,
            lr=lr,
        )

    @classmethod
    def resume(
        cls,
        j: int,
        targets: ScaleTargets,
        ckpt: Checkpoint,
        shape: BankShape,
        device: torch.device,
        lr: float,
    ) -> ScaleState:
        """The scale as a checkpoint written mid-scale left it (``targets`` rebuilt; ``lr``:
        the starting learning rate if the checkpoint does not name the scale's own)."""
        state, current = ckpt.state, ckpt.section(CURRENT)
        bank = MLPBank.from_state_dict(shape, current, device)
        opt = BankAdam(bank, float(state["adam_lr"]))
        opt.load_state_dict(current, state["adam_step"], state["adam_lr"])
        final = [current[f"final{i}"].to(device) for i in range(len(bank.params))]
        active = current["active"].to(device)
        cache = targets.cache
        if cache is not None and len(active) < len(cache):
            cache = compact(cache, active)
        ids = targets.ids
        st = cls(
            j,
            ids,
            final,
            opt,
            active,
            ids[active],
            cache,
            targets.partial_ids,
            targets.partial_masks,
            targets.pruned_sums,
        )
        st.frozen_sums = MetricSums(**state["frozen_sums"])
        st.frozen_mse = float(state["frozen_mse"])
        st.window_loss = state["window_loss"]
        st.iteration = int(state["iteration"])
        st.lr = float(state.get("scale_lr", lr))
        return st

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint saves, under ``current.``."""
        tensors = prefixed(CURRENT, self.opt.bank.state_dict())
        tensors.update(prefixed(CURRENT, self.opt.state_dict()))
        tensors.update({f"{CURRENT}final{i}": f for i, f in enumerate(self.final)})
        tensors[f"{CURRENT}active"] = self.active
        return tensors

    def checkpoint_state(self) -> dict[str, Any]:
        """The JSON fields a checkpoint saves."""
        return {
            "iteration": self.iteration,
            "adam_step": self.opt.step_count,
            "adam_lr": self.opt.lr,
            "frozen_mse": self.frozen_mse,
            "frozen_sums": asdict(self.frozen_sums),
            "window_loss": self.window_loss,
            "scale_lr": self.lr,
        }

    def step(
        self,
        residuals: Residuals,
        coords: torch.Tensor,
        pick: torch.Tensor | None,
        batch_samples: int,
    ) -> torch.Tensor:
        """Forward and backward over the active blocks at local coordinates ``coords[pick]``
        in chunks of ``batch_samples`` samples (activations bounded by the chunk); returns
        every active block's MSE over its real samples ``(m,)``. Every block's gradient is its
        own; it is set as the bank's ``.grad`` (:meth:`BankAdam.backward`: 3.5x faster on a
        CPU with 2^14-2^15-sample chunks than with 2^19, where the activations leave the
        caches). Memory: one chunk's activations."""
        coords = coords if pick is None else coords[pick]

        def block_mse(rows: slice, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cache = None if self.targets is None else self.targets[rows]
            target = residuals.at(self.scale, self.live_ids[rows], cache, pick)
            at = None
            if len(self.partial_ids):  # blocks reaching into the padding: real samples only
                ids = self.live_ids[rows]
                at = torch.nonzero(torch.isin(ids, self.partial_ids)).squeeze(1)
            if at is None or not len(at):
                return mse(out, target)
            masks = self.partial_masks[torch.searchsorted(self.partial_ids, ids[at])]
            masks = masks if pick is None else masks[:, pick]
            part, part_grad = masked_mse(out[at], target[at], masks.to(out.dtype))
            losses, grad = mse(out, target)
            return losses.index_put_((at,), part), grad.index_put_((at,), part_grad)

        return self.opt.backward(max(1, batch_samples // coords.shape[0]), coords, block_mse)

    def freeze(self, block_mse: torch.Tensor, freeze_mse: float, residuals: Residuals) -> None:
        """Active blocks whose MSE ``(m,)`` reached ``freeze_mse`` leave the optimisation with
        their Adam state; their quality is measured once and kept."""
        done = block_mse <= freeze_mse
        if not done.any():
            return
        for f, p in zip(self.final, self.opt.bank.params, strict=True):
            f[self.active[done]] = p.detach()[done]
        rows = torch.nonzero(done).squeeze(1)
        fixed = None if self.fixed is None else self.fixed.select(rows)
        frozen = residuals.live_sums(self.opt.bank, rows, self.live_ids[done], self.scale, fixed)
        self.frozen_sums = self.frozen_sums.add(frozen)
        self.frozen_mse += float(block_mse[done].sum())
        keep = torch.nonzero(~done).squeeze(1)
        self.opt.keep(keep)
        self.active = self.active[keep]
        self.live_ids = self.live_ids[keep]
        if self.targets is not None:
            self.targets = compact(self.targets, keep)
        if self.fixed is not None:
            self.fixed = self.fixed.keep(keep)

    def live_metrics(self, residuals: Residuals) -> MetricSums:
        """Metric sums of the whole reconstruction of this scale as it stands (pruned,
        frozen and active blocks) against ``G_j``: at scale 0 the exact full-grid figures,
        at a coarser scale those of its level of detail on its own grid. Only the active
        blocks' MLPs are evaluated: the coarser scales' sum and the signal at their samples
        are read at the first measurement and kept (:meth:`Residuals.fixed_parts`)."""
        rows = torch.arange(len(self.active), device=self.active.device)
        if not self.fixed_read:
            self.fixed, self.fixed_read = residuals.fixed_parts(self.scale, self.live_ids), True
        live = residuals.live_sums(self.opt.bank, rows, self.live_ids, self.scale, self.fixed)
        return self.pruned_sums.add(self.frozen_sums).add(live)

    def bank(self) -> MLPBank:
        """The scale's finished bank: every live block's parameters, in the order of
        :attr:`ids`."""
        for f, p in zip(self.final, self.opt.bank.params, strict=True):
            f[self.active] = p.detach()
        return MLPBank(self.opt.bank.shape, self.final)
