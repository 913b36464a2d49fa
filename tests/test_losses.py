"""The per-block losses the written-out backward takes: values and gradients bit for bit
what autograd gives through the same formulas."""

from __future__ import annotations

import pytest
import torch

from miner3d.losses import autograd_losses, masked_mse, mse


@pytest.mark.parametrize("shape", [(7, 1, 128), (5, 3, 64), (1, 3, 50), (0, 1, 8)])
def test_mse_and_its_gradient_equal_autograds_bit_for_bit(shape: tuple[int, int, int]):
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    want_losses, want = autograd_losses(lambda o: (o - target).square().flatten(1).mean(1))(out)
    losses, grad = mse(out, target)
    assert torch.equal(losses, want_losses) and torch.equal(grad, want)
    assert grad.shape == out.shape and not grad.requires_grad


def test_masked_mse_counts_only_real_samples_and_equals_autograd():
    g = torch.Generator().manual_seed(1)
    out, target = torch.randn(4, 3, 40, generator=g), torch.randn(4, 3, 40, generator=g)
    weights = (torch.rand(4, 40, generator=g) < 0.6).float()
    weights[2] = 0  # a row with no real sample counts one
    real = weights.sum(1).clamp(min=1) * 3

    def formula(o: torch.Tensor) -> torch.Tensor:
        return ((o - target).square() * weights.unsqueeze(1)).flatten(1).sum(1) / real

    want_losses, want = autograd_losses(formula)(out)
    losses, grad = masked_mse(out, target, weights)
    assert torch.equal(losses, want_losses) and torch.equal(grad, want)
    assert float(grad[2].abs().max()) == 0 and float(losses[2]) == 0
    row = weights[0].bool()  # the real samples alone, as a plain mean
    torch.testing.assert_close(losses[0], (out[0][:, row] - target[0][:, row]).square().mean())
    # the padding moves nothing
    assert float(grad[0][:, ~row].abs().max()) == 0
