"""Per-block losses with their gradients, as the bank's written-out backward takes them
(:meth:`miner3d.bank.MLPBank.train_chunk`): no autograd graph a chunk, where a graph of a
handful of small operations cost about as much as a layer's products (the image preset:
some 15 operations and the engine's bookkeeping a chunk, 16 chunks a step)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def mse(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean squared error and the gradient of their sum by ``out``.

    Args:
        out, target: ``(r, ...)``, the same shape.

    Returns:
        The losses ``(r,)`` and ``2 (out - target) / k`` (``k`` elements a row), bit for bit
        what autograd gives through ``(out - target).square().flatten(1).mean(1)``. Memory:
        two tensors the size of ``out``.
    """
    err = out - target
    losses = err.square().flatten(1).mean(dim=1)
    return losses, err.mul_(2 / max(1, math.prod(err.shape[1:])))


def masked_mse(
    out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean squared error over the samples whose weight is 1, and the gradient of
    their sum by ``out``.

    Args:
        out, target: ``(r, C, P)``.
        weights: ``(r, P)``, 1 for a real sample and 0 for padding.

    Returns:
        The losses ``(r,)`` (a row with no real sample counts one) and their gradient ``(r,
        C, P)``. Memory: three tensors the size of ``out``.
    """
    err = out - target
    real = weights.sum(dim=1).clamp(min=1) * out.shape[1]
    losses = (err.square() * weights.unsqueeze(1)).flatten(1).sum(dim=1) / real
    return losses, err.mul_(weights.unsqueeze(1) * (2 / real)[:, None, None])


def autograd_losses(
    losses_of: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Any differentiable per-row loss ``losses_of(out) -> (r,)`` as
    :meth:`~miner3d.bank.MLPBank.train_chunk` takes it: the losses, and their sum's
    gradient by ``out`` from autograd."""

    def both(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = out.detach().requires_grad_()
        with torch.enable_grad():
            losses = losses_of(out)
            (grad,) = torch.autograd.grad(losses.sum(), out)
        return losses.detach(), grad

    return both
