"""numba kernels of the bank's training step on a CPU (compiled on first use, cached on
disk): the hidden layers' sine with its derivative, and the Adam update, each one pass; the
thin first and last layers and the passes between the hidden layers' products
(:mod:`miner3d.siren`).

The elementwise passes are never reassociated: the sine's kernels only let products and
sums contract to fused multiply-adds (``fastmath={"contract"}``, which LLVM applies alike in
the vector body and the scalar tail), Adam not even that. The sums over a row's samples
(the backward's gradients) run in vector lanes, in an order fixed by the row's length.
So an element's result never depends on where it lies, on its company or on how the
threads split the work; two ranks fit exactly as one process. On a CPU with AVX-512 the
loops take 512-bit vectors (:mod:`miner3d._numba`).

The sine: ``x = q pi/2 + r`` with ``|r| <= pi/4`` (Cody and Waite's reduction, pi/2 in
three float32 parts), then Taylor polynomials of degree 9 and 10 in ``r``, swapped and
signed by ``q mod 4``: within 7e-8 of the exact value for ``|x| <= 2e4`` with FMAs
(``tests/test_fused.py``, which asserts 1.2e-7 to ``|x| = 1e4``, the bound without them;
``torch.sin``: 4e-8). Past it the error grows with ``|x|`` (a SIREN pre-activation that
large means a diverged fit), the results are clamped to ``[-1, 1]``, and a NaN or an
infinity gives NaN.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba import numba

_f = np.float32
_TWO_OVER_PI = _f(2 / math.pi)
_P1 = _f(1.5703125)
_P2 = _f(4.837512969970703125e-4)
_P3 = _f(math.pi / 2 - 1.5703125 - 4.837512969970703125e-4)
_S1, _S2, _S3, _S4 = (_f((-1) ** k / math.factorial(2 * k + 1)) for k in range(1, 5))
_C1, _C2, _C3, _C4, _C5 = (_f((-1) ** k / math.factorial(2 * k)) for k in range(1, 6))
_HALF, _QUARTER, _ONE, _TWO, _THREE, _FOUR = _f(0.5), _f(0.25), _f(1), _f(2), _f(3), _f(4)


@numba.njit(cache=True, inline="always")
def _sincos(x):  # pragma: no cover - numba
    """``(sin x, cos x)`` of a float32 (the module's docstring says how)."""
    q = np.floor(x * _TWO_OVER_PI + _HALF)
    r = ((x - q * _P1) - q * _P2) - q * _P3
    r2 = r * r
    s = r + r * r2 * (_S1 + r2 * (_S2 + r2 * (_S3 + r2 * _S4)))
    c = _ONE + r2 * (_C1 + r2 * (_C2 + r2 * (_C3 + r2 * (_C4 + r2 * _C5))))
    m = q - _FOUR * np.floor(q * _QUARTER)  # q mod 4: 0, 1, 2, 3
    odd = m == _ONE or m == _THREE
    sin = c if odd else s
    cos = s if odd else c
    sin = -sin if m >= _TWO else sin
    cos = -cos if m == _ONE or m == _TWO else cos
    return min(max(sin, -_ONE), _ONE), min(max(cos, -_ONE), _ONE)


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def sin_cos_bias(z, bias, scale, sin, cos):  # pragma: no cover - numba
    """``sin[i, j] = sin(z[i, j] + scale bias[i, 0, j])`` and ``cos[i, j] = scale cos(...)``
    for ``z`` ``(r, o, P)``, ``bias`` ``(r, 1, o)`` (float32, C-contiguous)."""
    scale = np.float32(scale)
    for i in numba.prange(z.shape[0]):
        for j in range(z.shape[1]):
            b = scale * bias[i, 0, j]
            for p in range(z.shape[2]):
                s, c = _sincos(z[i, j, p] + b)
                sin[i, j, p] = s
                cos[i, j, p] = scale * c


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def sin_bias(z, bias, scale, sin):  # pragma: no cover - numba
    """``sin[i, j] = sin(z[i, j] + scale bias[i, 0, j])``, as :func:`sin_cos_bias`."""
    scale = np.float32(scale)
    for i in numba.prange(z.shape[0]):
        for j in range(z.shape[1]):
            b = scale * bias[i, 0, j]
            for p in range(z.shape[2]):
                sin[i, j, p] = _sincos(z[i, j, p] + b)[0]


@numba.njit(cache=True, parallel=True, nogil=True, error_model="numpy")  # no zero checks
def adam(p, g, m, v, b1, a1, b2, a2, step_size, c2, eps):  # pragma: no cover - numba
    """One Adam step over flat float32 arrays: ``m = b1 m + a1 g``, ``v = b2 v + a2 g^2``,
    ``p -= step_size * m / (sqrt(v / c2) + eps)`` (``a1 = 1 - b1`` and ``a2 = 1 - b2``
    taken in double precision, as torch takes them), each scalar rounded to float32 as
    torch's in-place operations round them."""
    b1, a1, b2, a2 = np.float32(b1), np.float32(a1), np.float32(b2), np.float32(a2)
    step, c2, eps = np.float32(step_size), np.float32(c2), np.float32(eps)
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        mi = b1 * m[i] + a1 * gi
        vi = b2 * v[i] + a2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step * (mi / (np.sqrt(vi / c2) + eps))


# The thin layers and the passes between the products, each one kernel over a chunk's rows
# (the hidden layers' square products stay with the BLAS's batched kernels, faster there).
# A row's sums run in vector lanes (``reassoc``): the order is fixed by the row's length
# alone, so a row's result still never depends on its place, its company or the threads.
_SUMS = {"contract", "reassoc"}


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def first_layer(x, w, bias, scale, with_cos, sin, cos):  # pragma: no cover - numba
    """The first layer from the shared coordinates: ``sin[i, j] = sin(scale (x^T w[i])[j] +
    scale bias[i, 0, j])`` and ``cos = scale cos(...)`` (when ``with_cos``) for ``x`` ``(d,
    P)``, ``w`` ``(r, d, o)``, ``bias`` ``(r, 1, o)``; ``sin``, ``cos`` ``(r, o, P)``."""
    scale = np.float32(scale)
    for i in numba.prange(w.shape[0]):
        for j in range(w.shape[2]):
            z = sin[i, j]
            a = w[i, 0, j]
            for p in range(x.shape[1]):
                z[p] = a * x[0, p]
            for k in range(1, w.shape[1]):
                a = w[i, k, j]
                for p in range(x.shape[1]):
                    z[p] += a * x[k, p]
            b = scale * bias[i, 0, j]
            if with_cos:
                c = cos[i, j]
                for p in range(x.shape[1]):
                    s, cc = _sincos(scale * z[p] + b)
                    z[p] = s
                    c[p] = scale * cc
            else:
                for p in range(x.shape[1]):
                    z[p] = _sincos(scale * z[p] + b)[0]


@numba.njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def last_layer(x, w, bias, out):  # pragma: no cover - numba
    """The linear last layer: ``out[i] = w[i]^T x[i] + bias[i, 0]`` for ``x`` ``(r, h, P)``,
    ``w`` ``(r, h, o)``, ``bias`` ``(r, 1, o)``, ``out`` ``(r, o, P)``."""
    for i in numba.prange(w.shape[0]):
        for j in range(w.shape[2]):
            y = out[i, j]
            a, b = w[i, 0, j], bias[i, 0, j]
            for p in range(x.shape[2]):
                y[p] = b + a * x[i, 0, p]
            for k in range(1, w.shape[1]):
                a = w[i, k, j]
                for p in range(x.shape[2]):
                    y[p] += a * x[i, k, p]


@numba.njit(cache=True, parallel=True, nogil=True, fastmath=_SUMS)
def last_backward(x, w, g, dsin, gw, gb, gb_below):  # pragma: no cover - numba
    """The last layer's backward from the loss's gradient ``g`` ``(r, o, P)``: ``gw[i] = x[i]
    g[i]^T`` ``(r, h, o)``, ``gb[i, 0] = g[i]``'s row sums, and through the sine below,
    ``dsin[i] *= w[i] g[i]`` ``(r, h, P)`` (in place of its saved derivative, as
    :func:`through_sine`) with its row sums in ``gb_below`` ``(r, 1, h)`` (the layer below's
    bias gradient)."""
    for i in numba.prange(w.shape[0]):
        for j in range(w.shape[2]):
            s = np.float32(0)
            for p in range(g.shape[2]):
                s += g[i, j, p]
            gb[i, 0, j] = s
            for k in range(w.shape[1]):
                s = np.float32(0)
                for p in range(g.shape[2]):
                    s += x[i, k, p] * g[i, j, p]
                gw[i, k, j] = s
        acc = np.empty(g.shape[2], np.float32)
        for k in range(w.shape[1]):
            c = dsin[i, k]
            a = w[i, k, 0]
            for p in range(g.shape[2]):
                acc[p] = a * g[i, 0, p]
            for j in range(1, w.shape[2]):
                a = w[i, k, j]
                for p in range(g.shape[2]):
                    acc[p] += a * g[i, j, p]
            s = np.float32(0)
            for p in range(g.shape[2]):
                v = c[p] * acc[p]
                c[p] = v
                s += v
            gb_below[i, 0, k] = s


@numba.njit(cache=True, parallel=True, nogil=True, fastmath=_SUMS)
def through_sine(dsin, h, gb):  # pragma: no cover - numba
    """``dsin *= h`` (both ``(r, h, P)``: the gradient through a hidden layer's sine, in place
    of its saved derivative) and the rows' sums into ``gb`` ``(r, 1, h)``."""
    for i in numba.prange(dsin.shape[0]):
        for k in range(dsin.shape[1]):
            s = np.float32(0)
            for p in range(dsin.shape[2]):
                v = dsin[i, k, p] * h[i, k, p]
                dsin[i, k, p] = v
                s += v
            gb[i, 0, k] = s


@numba.njit(cache=True, parallel=True, nogil=True, fastmath=_SUMS)
def first_weights(x, g, gw):  # pragma: no cover - numba
    """The first layer's weight gradient ``gw[i] = x g[i]^T`` ``(r, d, o)`` from the shared
    coordinates ``x`` ``(d, P)`` and ``g`` ``(r, o, P)``."""
    for i in numba.prange(g.shape[0]):
        for j in range(g.shape[1]):
            for k in range(x.shape[0]):
                s = np.float32(0)
                for p in range(x.shape[1]):
                    s += x[k, p] * g[i, j, p]
                gw[i, k, j] = s
