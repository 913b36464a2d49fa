"""The fused CPU passes of the bank's step (miner3d.fused, miner3d._fused): accuracy against
double precision, agreement with torch's path, and determinism."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from functools import partial

import numba
import numpy as np
import pytest
import torch

from miner3d import fused
from miner3d.bank import BankAdam, BankShape, MLPBank
from miner3d.losses import autograd_losses, mse


def _inputs(n: int, bound: float, seed: int = 0) -> torch.Tensor:
    """Random values in ``+-bound`` and the points where the reduction switches (odd
    multiples of pi/4) and where sin or cos vanish (multiples of pi/2), with neighbours."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    k = torch.arange(-int(bound / (math.pi / 4)), int(bound / (math.pi / 4)) + 1)
    marks = (k * math.pi / 4).to(torch.float32)
    near = torch.cat([torch.nextafter(marks, marks + 1), torch.nextafter(marks, marks - 1)])
    return torch.cat([x.float(), marks, near])


def _sin_cos(x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    z = x.reshape(1, 1, -1).clone()
    bias = torch.zeros(1, 1, 1)
    assert fused.uses_kernels(z)
    s, c = fused.sin_cos(z, bias, scale, True)
    return s.flatten(), c.flatten()


@pytest.mark.parametrize("bound", [4.0, 200.0, 1e4])
def test_the_sine_and_cosine_are_within_1e7_of_double_precision(bound: float):
    x = _inputs(200_000, bound)
    s, c = _sin_cos(x)
    exact = x.double()
    assert float((s.double() - exact.sin()).abs().max()) < 1.2e-7
    assert float((c.double() - exact.cos()).abs().max()) < 1.2e-7
    # torch's own functions, the path on a GPU, agree as closely
    assert float((s - x.sin()).abs().max()) < 1.6e-7
    assert float((c - x.cos()).abs().max()) < 1.6e-7


def test_bias_and_scale_enter_as_documented():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 50, generator=gen) * 20
    bias = torch.randn(3, 1, 4, generator=gen)
    s, c = fused.sin_cos(z.clone(), bias, 30.0, True)
    pre = (z + (30.0 * bias).transpose(1, 2)).double()  # rounded to float32 as the layer
    torch.testing.assert_close(s.double(), pre.sin(), rtol=0, atol=2e-7)
    torch.testing.assert_close(c.double(), 30.0 * pre.cos(), rtol=0, atol=30 * 2e-7)
    only, none = fused.sin_cos(z.clone(), bias, 30.0, False)
    assert none is None and torch.equal(only, s)


def test_nan_stays_nan_and_huge_inputs_stay_bounded():
    x = torch.tensor([float("nan"), float("inf"), 1e30, -3e9, 7e6])
    s, c = _sin_cos(x)
    assert torch.isnan(s[0]) and torch.isnan(c[0]) and torch.isnan(s[1])
    assert bool((s[2:].abs() <= 1).all()) and bool((c[2:].abs() <= 1).all())


def test_an_element_does_not_depend_on_its_place_company_or_threads():
    x = _inputs(10_000, 300.0, seed=2)
    whole_s, whole_c = _sin_cos(x)
    for start, length in ((1, 777), (5, 3), (17, 1), (100, 4097)):
        s, c = _sin_cos(x[start : start + length])
        assert torch.equal(s, whole_s[start : start + length])
        assert torch.equal(c, whole_c[start : start + length])
    before = numba.get_num_threads()
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # numba follows torch's count
        s, c = _sin_cos(x)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(before)
    assert torch.equal(s, whole_s) and torch.equal(c, whole_c)


def _adam_tensors(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p, g, m = (torch.randn(n, generator=gen) for _ in range(3))
    v = torch.rand(n, generator=gen) * 1e-3
    return [p, g, m * 1e-2, v]


def test_the_adam_kernel_agrees_with_torch_and_is_deterministic():
    args = ((0.9, 0.999), 1e-2 / (1 - 0.9**3), 1 - 0.999**3, 1e-8)
    kernel = _adam_tensors(100_003, 0)
    fused.adam_step(*kernel, *args)
    ref = _adam_tensors(100_003, 0)
    saved = fused._kernels
    fused._kernels = False  # the torch path, as on a GPU
    try:
        fused.adam_step(*ref, *args)
    finally:
        fused._kernels = saved
    for k, r in zip(kernel[::2] + kernel[3:], ref[::2] + ref[3:], strict=True):  # p, m, v
        torch.testing.assert_close(k, r, rtol=1e-6, atol=1e-9)
    assert not torch.equal(kernel[0], _adam_tensors(100_003, 0)[0])  # it moved
    part = [t[13:2013].clone() for t in _adam_tensors(100_003, 0)]
    fused.adam_step(*part, *args)
    assert torch.equal(part[0], kernel[0][13:2013])  # bitwise, wherever it lies


@pytest.mark.parametrize(
    "shape, points",
    [
        (BankShape(2, 20, 3, 3, 30.0), 64),
        (BankShape(3, 22, 2, 1, 30.0), 128),
        (BankShape(3, 9, 1, 2, 30.0), 37),
    ],
)
def test_the_step_agrees_with_torchs_path(shape: BankShape, points: int):
    """BankAdam.backward and step with the kernels (the thin layers and the passes between
    the products), and with torch's functions (the GPU's path): the same losses, gradients
    and parameters to float32 rounding, for one to three hidden layers and any sample count
    (vector tails included), batches of one row included."""
    d, out = shape.in_features, shape.out_features
    coords = torch.rand(points, d, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = torch.rand(9, points, out, generator=torch.Generator().manual_seed(2))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        bank = MLPBank.for_blocks(shape, torch.arange(9), 0, 0)
        opt = BankAdam(bank, 1e-3)
        loss = opt.backward(4, coords, lambda rows, out: mse(out, target[rows].transpose(1, 2)))
        grads = [p.grad.clone() for p in bank.params]
        lone = opt.backward(1, coords, lambda rows, out: mse(out, target[rows].transpose(1, 2)))
        assert torch.equal(lone, loss)  # a batch of one, run as two, gives the same bits
        assert all(torch.equal(p.grad, g) for p, g in zip(bank.params, grads, strict=True))
        opt.step()
        return loss, grads + [p.detach() for p in bank.params]

    loss, tensors = run()
    saved = fused._kernels
    fused._kernels = False
    try:
        ref_loss, ref = run()
    finally:
        fused._kernels = saved
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for t, r in zip(tensors, ref, strict=True):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_autograd_through_forward_takes_torchs_path():
    bank = MLPBank.for_blocks(BankShape(3, 8, 2, 1, 30.0), torch.arange(3), 0, 0)
    for p in bank.params:
        p.requires_grad_(True)
    bank.forward(torch.rand(10, 3)).square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in bank.params)
    with torch.no_grad():
        z = torch.zeros(1, 1, 4)
        assert fused.uses_kernels(z)
    assert not fused.uses_kernels(z.requires_grad_())


def test_blocks_still_do_not_share_a_step():
    shape = BankShape(2, 6, 2, 1, 30.0)
    bank = MLPBank.for_blocks(shape, torch.arange(4), 0, 0)
    before = [p.detach().clone() for p in bank.params]
    opt = BankAdam(bank, 1e-2)
    coords = torch.rand(16, 2)
    target = torch.zeros(4, 16, 1)
    target[2] = 1.0

    def losses(rows: slice, out: torch.Tensor) -> torch.Tensor:
        err = out - target[rows].transpose(1, 2)
        return err.square().mean((1, 2)) * (torch.arange(4)[rows] == 2)

    opt.backward(4, coords, lambda rows, out: autograd_losses(partial(losses, rows))(out))
    opt.step()
    for p, q in zip(bank.params, before, strict=True):
        moved = (p.detach() != q).flatten(1).any(1)
        assert moved.tolist() == [False, False, True, False]
    assert np.isfinite(np.concatenate([p.detach().numpy().ravel() for p in bank.params])).all()


@pytest.mark.slow
def test_numba_takes_wide_vectors_on_avx512_and_keeps_the_users_features():
    """On an x86 CPU with AVX-512 the kernels are generated without LLVM's preference for
    256-bit vectors; a user's ``NUMBA_CPU_FEATURES`` stays as it is."""
    import llvmlite.binding as ll

    from miner3d._numba import WIDE

    probe = "import miner3d._fused, numba; print(numba.config.CPU_FEATURES)"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    wide = platform.machine() == "x86_64" and bool(ll.get_host_cpu_features().get("avx512f"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(WIDE) == wide
    own = ll.get_host_cpu_features().flatten()
    env["NUMBA_CPU_FEATURES"] = own
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == own
