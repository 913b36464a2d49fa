"""Fused passes of the bank's training step: the hidden activation ``sin(z + bias)`` with
its derivative, and the Adam update (the thin layers' kernels: :mod:`miner3d.siren`).

On a CPU, without autograd, each is one numba pass (:mod:`miner3d._fused`): the sine and
its cosine 4.5-6x faster than ``torch.sin`` then ``torch.cos``, Adam 4-6x faster than its
seven in-place operations, on an AMD EPYC with two threads (BENCHMARKS.md). On an Intel
Xeon (5th generation), whose ``torch.sin`` is 2.7x the EPYC's, the pass over a chunk of
327,680 takes 133-150 us against 140 us for torch's two functions alone (its bias add and
scaling not counted). Elsewhere
(CUDA, autograd through :meth:`miner3d.bank.MLPBank.forward`, or without numba, as on a GPU
machine that lacks it) torch's own operations do the same arithmetic. The two agree to
1.6e-7 (a sine) and 1e-6 relative (Adam); each is deterministic, and an element's result
never depends on its place, its company or the number of threads.
"""

from __future__ import annotations

import torch

_kernels = None  # miner3d._fused once imported; False where numba is missing


def _cpu_kernels():
    global _kernels
    if _kernels is None:
        try:
            from . import _fused
        except ImportError:  # pragma: no cover - numba is a dependency; a GPU box may lack it
            _kernels = False
        else:
            _kernels = _fused
    return _kernels


def uses_kernels(t: torch.Tensor) -> bool:
    """Whether the passes over ``t`` take the numba kernels: a float32 CPU tensor outside
    autograd, where numba imports."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and not (torch.is_grad_enabled() and t.requires_grad)
        and bool(_cpu_kernels())
    )


def _threads() -> None:
    """numba's threads follow torch's count (``--threads``, a shared machine's drop to one)."""
    import numba

    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def sin_cos(
    z: torch.Tensor, bias: torch.Tensor, scale: float, with_cos: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A SIREN layer's activation ``sin(z + scale bias)`` and, when ``with_cos``, its
    derivative by the unscaled pre-activation, ``scale cos(z + scale bias)``.

    Args:
        z: ``(n, out, P)`` float32: the layer's product, already times ``scale`` (consumed:
            the torch path reuses it).
        bias: ``(n, 1, out)``, as the bank stores it.

    Returns:
        ``(n, out, P)`` sines and derivatives (``None`` without ``with_cos``). Memory: one
        tensor the size of ``z`` per function.
    """
    if not uses_kernels(z):
        z = z + bias.transpose(1, 2) * scale  # a new tensor: z may be autograd's
        if not with_cos:
            return torch.sin(z), None
        return torch.sin(z), torch.cos_(z).mul_(scale)
    _threads()
    z, b = z.detach().contiguous(), bias.detach().contiguous().numpy()
    sin = torch.empty_like(z)
    if not with_cos:
        _kernels.sin_bias(z.numpy(), b, scale, sin.numpy())
        return sin, None
    cos = torch.empty_like(z)
    _kernels.sin_cos_bias(z.numpy(), b, scale, sin.numpy(), cos.numpy())
    return sin, cos


@torch.no_grad()
def adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    betas: tuple[float, float],
    step_size: float,
    c2: float,
    eps: float,
) -> None:
    """One Adam step in place, any shape (all four alike): ``m = b1 m + (1 - b1) g``, ``v =
    b2 v + (1 - b2) g^2``, ``p -= step_size m / (sqrt(v / c2) + eps)``. ``g`` may be
    overwritten (the torch path's scratch). Allocates nothing."""
    b1, b2 = betas
    p, g, m, v = (t.detach() for t in (p, g, m, v))
    if uses_kernels(p) and all(t.is_contiguous() for t in (p, g, m, v)):
        _threads()
        flat = (t.view(-1).numpy() for t in (p, g, m, v))
        _kernels.adam(*flat, b1, 1 - b1, b2, 1 - b2, step_size, c2, eps)
        return
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = torch.div(v, c2, out=g).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
