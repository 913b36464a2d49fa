"""The layers of a bank's SIRENs, forward and written-out backward, samples last.

A layer computes ``(n, out, in) @ (n, in, P)``: its rows of ``P`` samples fill whole vector
registers, where rows of ``hidden`` features (22 = 16 + 6) leave them part-empty (1.05-1.1x
a training step on a CPU, ``scripts/bench_bank.py``). A hidden layer's ``w0`` is its
product's ``alpha`` (``baddbmm`` at ``beta=0`` ignores its input), its bias, sine and
derivative one pass (:func:`miner3d.fused.sin_cos`); the backward folds ``w0`` into the
saved derivative, so the gradients go straight into the buffers' rows.

On a CPU (float32, outside autograd, numba present: :func:`miner3d.fused.uses_kernels`)
the thin layers and the passes between the products are numba kernels
(:mod:`miner3d._fused`): the first layer (``d`` inputs) with its sine, the linear last layer
(a few outputs), the last layer's backward through the sine below it, and each hidden
layer's gradient through its sine with its bias gradient. The square hidden layers' products
stay with the BLAS's batched kernels (``baddbmm``, ``bmm``), which run them faster (numba's
loops reached 0.55x of MKL's ``baddbmm`` on the image preset's 20 x 20 x 64 products: a
vector loop over a row's samples cannot keep a tile of outputs in registers). The image
preset's step: 41 -> 38 ms, the cpu preset's 273-304 -> 248-251 ms (an Intel Xeon, two
threads, alternating with the code before). Elsewhere
(CUDA, autograd, no numba) torch's operations compute the same. Either way a block's results
never depend on the blocks beside it.
"""

from __future__ import annotations

import torch

from . import fused
from .fused import sin_cos, uses_kernels

Saved = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _kernels(params: list[torch.Tensor], coords: torch.Tensor) -> bool:
    return coords.dim() == 2 and uses_kernels(params[0]) and uses_kernels(coords)


def forward(
    params: list[torch.Tensor], coords: torch.Tensor, w0: float, saved: Saved | None = None
) -> torch.Tensor:
    """The MLPs of ``params`` (per layer ``(n, in, out)`` weights and ``(n, 1, out)`` biases)
    at ``coords`` ``(P, d)`` or ``(n, P, d)``: hidden layers ``sin(w0 (x W + b))``, the last
    linear. ``saved`` gets every layer's input ``(n, in, P)``, its weights ``(n, in, out)``
    and, for a hidden layer, the sine's derivative by its unscaled pre-activation ``w0 cos(w0
    (x W + b))`` ``(n, out, P)`` (for the last one: the output), for :func:`backward`.
    Returns ``(n, out, P)``. Memory: two activations ``(n, hidden, P)`` per hidden layer with
    ``saved``, two in all without."""
    n, last = params[0].shape[0], len(params) // 2 - 1
    kernels = _kernels(params, coords)
    if kernels:  # outside autograd: a bank's parameters may still ask for gradients
        params = [p.detach() for p in params]
    x = coords.transpose(-1, -2)
    if kernels:
        x = x.contiguous()
    x = x.expand(n, *coords.shape[:-3:-1])
    for layer in range(last):
        w, b = params[2 * layer], params[2 * layer + 1]
        if kernels and layer == 0:
            fused._threads()
            s = torch.empty(n, b.shape[2], x.shape[2])
            c = torch.empty_like(s) if saved is not None else s
            k = fused._kernels
            k.first_layer(
                x[0].numpy(), w.numpy(), b.numpy(), w0, saved is not None, s.numpy(), c.numpy()
            )
        else:
            z = torch.empty(n, b.shape[2], x.shape[2], device=x.device)  # ignored:
            z = torch.baddbmm(z, w.transpose(1, 2), x, beta=0, alpha=w0)  # w0 (x W)
            s, c = sin_cos(z, b, w0, saved is not None)
        if saved is not None:
            saved.append((x, w, c))
        x = s
    w, b = params[2 * last], params[2 * last + 1]
    if kernels:
        z = torch.empty(n, b.shape[2], x.shape[2])
        fused._kernels.last_layer(x.numpy(), w.numpy(), b.numpy(), z.numpy())
    else:
        z = torch.bmm(w.transpose(1, 2), x).add_(b.transpose(1, 2))
    if saved is not None:
        saved.append((x, w, z))
    return z


def backward(
    saved: Saved, g: torch.Tensor, grads: list[torch.Tensor], rows: slice, coords: torch.Tensor
) -> None:
    """The gradients of the loss by every layer's parameters from :func:`forward`'s
    ``saved`` (at ``coords``) and the loss's gradient by the outputs ``g`` ``(n, out, P)``
    (C-contiguous), into the buffers' rows ``grads[i][rows]`` (``r <= n`` rows: with ``r <
    n``, a lone row run as two, only the first ``r`` are kept). Consumes the saved
    derivatives."""
    n, last = len(g), len(saved) - 1
    r = len(grads[0][rows])
    if _kernels([saved[0][1]], coords) and last >= 1:
        fused._threads()
        k = fused._kernels
        outs = [
            (grads[2 * i][rows], grads[2 * i + 1][rows])
            if n == r
            else (
                g.new_empty((n, *grads[2 * i].shape[1:])),
                g.new_empty((n, *grads[2 * i + 1].shape[1:])),
            )
            for i in range(last + 1)
        ]
        x, w, _ = saved[last]
        dsin = saved[last - 1][2]
        gw, gb = (t.numpy() for t in outs[last])
        k.last_backward(
            x.numpy(), w.numpy(), g.numpy(), dsin.numpy(), gw, gb, outs[last - 1][1].numpy()
        )
        g = dsin
        for layer in range(last - 1, 0, -1):
            x, w, _ = saved[layer]
            torch.bmm(x, g.transpose(1, 2), out=outs[layer][0])
            h = torch.bmm(w, g)
            dsin = saved[layer - 1][2]
            k.through_sine(dsin.numpy(), h.numpy(), outs[layer - 1][1].numpy())
            g = dsin
        k.first_weights(saved[0][0][0].numpy(), g.numpy(), outs[0][0].numpy())
        if n != r:
            for i, (gw, gb) in enumerate(outs):
                grads[2 * i][rows].copy_(gw[:r])
                grads[2 * i + 1][rows].copy_(gb[:r])
        return
    for layer in range(last, -1, -1):  # g: the loss's gradient by the layer's x W + b
        x, w, _ = saved[layer]
        gw, gb = grads[2 * layer][rows], grads[2 * layer + 1][rows]  # (r, in, out), (r, 1, out)
        if n == r:  # straight into the buffers' rows
            torch.bmm(x, g.transpose(1, 2), out=gw)
            torch.sum(g, dim=2, out=gb.view(r, -1))
        else:  # a lone row, run as two
            gw.copy_(torch.bmm(x, g.transpose(1, 2))[:r])
            gb.copy_(g.sum(dim=2, keepdim=True).transpose(1, 2)[:r])
        if layer:  # through the sine: its derivative w0 cos(...), consumed
            g = saved[layer - 1][2].mul_(torch.bmm(w, g))
