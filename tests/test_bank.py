from __future__ import annotations

from functools import partial

import pytest
import torch

from miner3d.bank import BankAdam, BankShape, MLPBank
from miner3d.losses import mse


def test_bank_shapes_and_parameter_count():
    shape = BankShape(in_features=3, hidden=22, hidden_layers=2, out_features=1, w0=30.0)
    assert shape.params_per_block == 3 * 22 + 22 + 22 * 22 + 22 + 22 + 1
    bank = MLPBank.create(shape, 5, generator=torch.Generator().manual_seed(0))
    assert bank.n_params == 5 * shape.params_per_block
    x = torch.rand(64, 3) * 2 - 1
    assert bank.forward(x).shape == (5, 64, 1)
    sub = bank.forward(x, rows=torch.tensor([4, 1]))
    torch.testing.assert_close(sub, bank.forward(x)[[4, 1]])


def test_blocks_are_independent():
    # one block's loss moves only that block's parameters
    shape = BankShape(2, 8, 2, 1, 30.0)
    bank = MLPBank.create(shape, 3, generator=torch.Generator().manual_seed(0))
    before = [p.clone() for p in bank.params]
    opt = BankAdam(bank, lr=1e-2)
    out = bank.forward(torch.rand(10, 2))
    out[1].square().mean().backward()
    opt.step()
    for p, q in zip(bank.params, before, strict=True):
        assert torch.equal(p[0], q[0]) and torch.equal(p[2], q[2])
        assert not torch.equal(p[1], q[1])


def test_adam_keep_shrinks_parameters_and_state():
    shape = BankShape(3, 4, 1, 2, 30.0)
    bank = MLPBank.create(shape, 6)
    opt = BankAdam(bank, lr=1e-3)
    bank.forward(torch.rand(5, 3)).sum().backward()
    opt.step()
    m_before = opt.exp_avg[0][[1, 4]].clone()
    opt.keep(torch.tensor([1, 4]))
    assert len(bank) == 2 and opt.exp_avg[0].shape[0] == 2 and opt.exp_avg_sq[3].shape[0] == 2
    torch.testing.assert_close(opt.exp_avg[0], m_before)
    bank.forward(torch.rand(5, 3)).sum().backward()
    opt.step()  # still consistent after compaction
    assert opt.step_count == 2


def _mse(target: torch.Tensor, rows: slice, out: torch.Tensor):
    return mse(out, target[rows].transpose(1, 2))


def _autograd_grads(bank: MLPBank, coords: torch.Tensor, target: torch.Tensor):
    params = [p.detach().clone().requires_grad_(True) for p in bank.params]
    out = MLPBank(bank.shape, params).forward(coords)
    losses = (out - target).square().flatten(1).mean(1)
    losses.sum().backward()
    return losses.detach(), [p.grad for p in params]


def test_the_written_out_backward_equals_autograd():
    """``BankAdam.backward`` (SIREN's derivatives by hand, in chunks of rows) gives the
    gradients autograd gives through ``forward``, for 2D and 3D inputs, several outputs,
    chunks of one row and of several."""
    for shape in (BankShape(3, 22, 2, 1, 30.0), BankShape(2, 20, 3, 3, 30.0)):
        bank = MLPBank.for_blocks(shape, torch.arange(7), 0, 0)
        coords = torch.rand(50, shape.in_features, generator=torch.Generator().manual_seed(1))
        coords = coords * 2 - 1
        target = torch.rand(7, 50, shape.out_features, generator=torch.Generator().manual_seed(2))
        want_losses, want = _autograd_grads(bank, coords, target)
        for chunk in (1, 3, 7):
            opt = BankAdam(bank, 1e-3)
            losses = opt.backward(chunk, coords, partial(_mse, target))
            torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-7)
            for p, g in zip(bank.params, want, strict=True):
                assert p.grad.shape == g.shape
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


@pytest.mark.parametrize("shape", [BankShape(3, 22, 2, 1, 30.0), BankShape(2, 20, 3, 3, 30.0)])
def test_written_out_gradients_are_the_same_in_any_company(shape: BankShape):
    """A row's loss and gradients are bitwise the same alone (a batch of one) or among
    others. One output is the case that once failed on an AMD CPU: autograd handed the
    gradient's size-1 axis other strides for a lone row, and bmm took another kernel."""
    bank = MLPBank.for_blocks(shape, torch.arange(9), 0, 0)
    coords = torch.rand(64, shape.in_features) * 2 - 1
    target = torch.rand(9, 64, shape.out_features)

    def grads(rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        buffers = [torch.zeros_like(p) for p in bank.params]
        losses = bank.train_chunk(coords, rows, partial(_mse, target, rows), buffers)
        return losses, [b[rows] for b in buffers]

    all_losses, all_grads = grads(slice(0, 9))
    for rows in (slice(0, 1), slice(3, 5), slice(2, 9), slice(8, 9)):
        losses, part = grads(rows)
        assert torch.equal(losses, all_losses[rows])  # bitwise: a batch of one included
        assert all(torch.equal(g, a[rows]) for g, a in zip(part, all_grads, strict=True))


def _at_offset(t: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of ``t`` whose storage starts ``k`` floats into a fresh buffer."""
    view = torch.empty(t.numel() + 16)[k : k + t.numel()].view(t.shape)
    return view.copy_(t)


def test_results_do_not_depend_on_memory_alignment():
    """Two ranks see a block's parameters, coordinates, targets and gradient buffers at
    other addresses than one process does: forward and gradients stay bitwise the same at
    16 offsets (a BLAS kernel that peels loops by alignment would round differently)."""
    for shape, n, points in (
        (BankShape(3, 22, 2, 1, 30.0), 40, 128),
        (BankShape(2, 20, 3, 3, 30.0), 60, 64),
    ):
        base = MLPBank.for_blocks(shape, torch.arange(n), 0, 0)
        coords = torch.rand(points, shape.in_features, generator=torch.Generator().manual_seed(1))
        target = torch.rand(
            n, points, shape.out_features, generator=torch.Generator().manual_seed(2)
        )
        results = []
        for k in range(16):
            bank = MLPBank(shape, [_at_offset(p.detach(), k) for p in base.params])
            xs, ts = _at_offset(coords * 2 - 1, (5 * k) % 16), _at_offset(target, (3 * k) % 16)
            grads = [_at_offset(torch.zeros_like(p), (7 * k) % 16) for p in base.params]
            bank.train_chunk(xs, slice(0, n), partial(_mse, ts, slice(0, n)), grads)
            results.append(torch.cat([g.flatten() for g in grads] + [bank.forward(xs).flatten()]))
        assert all(torch.equal(r, results[0]) for r in results[1:])


def test_bank_adam_steps_like_torch_adam_through_keep():
    """Three steps, rows dropped, two more: the same parameters as ``torch.optim.Adam`` on
    the kept rows (the moments and step count carried over)."""
    shape = BankShape(2, 6, 1, 1, 30.0)
    bank = MLPBank.create(shape, 5, generator=torch.Generator().manual_seed(0))
    ref = [p.detach().clone().requires_grad_(True) for p in bank.params]
    opt, torch_opt = BankAdam(bank, lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        if step == 3:
            rows = torch.tensor([0, 2, 4])
            opt.keep(rows)
            ref = [p.detach()[rows].clone().requires_grad_(True) for p in ref]
            state = torch_opt.state
            moved = torch.optim.Adam(ref, lr=1e-2)
            for new, old in zip(ref, torch_opt.param_groups[0]["params"], strict=True):
                s = state[old]
                moved.state[new] = {
                    "step": s["step"].clone(),
                    "exp_avg": s["exp_avg"][rows].clone(),
                    "exp_avg_sq": s["exp_avg_sq"][rows].clone(),
                }
            torch_opt = moved
        for p, q in zip(bank.params, ref, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(bank.params, ref, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
    assert opt.step_count == 5


def test_a_step_without_gradients_still_counts():
    """A rank whose blocks all froze steps with the others: its count (bias correction)
    must stay the world's."""
    bank = MLPBank.create(BankShape(2, 4, 1, 1, 30.0), 3)
    opt = BankAdam(bank, lr=1e-3)
    opt.step()  # no gradients
    assert opt.step_count == 1
