from __future__ import annotations

import torch

from miner3d.bank import BankAdam, BankShape, MLPBank


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
