"""Pyramid operators for d = 2 or 3, all in the cell-centred convention of :mod:`miner3d.grid`.

* Downsampling by ``f`` is the box filter: the mean over each ``f^d`` cell (paper eqs. 9-10,
  ``F.interpolate(mode='area')``), computed per block by
  :meth:`miner3d.source.SignalSource.level_blocks`.
* Upsampling is linear interpolation with ``align_corners=False`` and clamped borders, exactly
  ``F.interpolate(mode='trilinear' | 'bilinear', align_corners=False)`` for integer factors.
  :func:`interpolate_at` evaluates it at any continuous positions (voxel centres of a finer
  block, or arbitrary query points), gathering only the ``2^d`` neighbours it needs: no
  per-voxel index tensor of a whole grid is ever built.

A signal field is a tensor ``(C, *S)``: channels first, then ``d`` spatial axes.
"""

from __future__ import annotations

import itertools

import torch


def _window_index(index: torch.Tensor, origin: int, rows: int) -> torch.Tensor:
    """Indices along axis 0 of the whole field -> rows of a window that starts at row
    ``origin`` and holds ``rows`` rows; an index outside the window is an error (a
    negative one would silently wrap)."""
    index = index - origin
    if len(index.reshape(-1)) and (int(index.min()) < 0 or int(index.max()) >= rows):
        raise RuntimeError("interpolation reads outside the window of the field held")
    return index


def interpolate_at(
    field: torch.Tensor,
    positions: list[torch.Tensor],
    origin: int = 0,
    extent: int | None = None,
) -> torch.Tensor:
    """Linear interpolation of a cell-centred field at continuous index positions.

    Args:
        field: ``(C, *S)``, ``d = len(S)`` spatial axes.
        positions: ``d`` tensors, one per axis, of mutually broadcastable shapes; position
            ``q`` on an axis means the centre of voxel ``q`` (voxel ``i`` spans
            ``[i - 0.5, i + 0.5)``). Out-of-range positions clamp to the border voxel, like
            ``F.interpolate`` with ``align_corners=False``.
        origin, extent: ``field`` is a window of a longer field: its rows ``[origin, origin
            + field.shape[1])`` along the first axis of ``extent`` rows (the whole field by
            default). Positions and border clamping are the whole field's.

    Returns:
        ``(C, *broadcast_shape)``: e.g. positions of shapes ``(n, b, 1, 1)``, ``(n, 1, b, 1)``,
        ``(n, 1, 1, b)`` give the ``(C, n, b, b, b)`` values of ``n`` blocks of ``b^3``
        voxels; positions of shape ``(P,)`` give ``(C, P)`` values at ``P`` points.
    """
    whole = field.shape[1] if extent is None else extent
    lows, highs, weights = [], [], []
    for axis, q in enumerate(positions):
        n = whole if axis == 0 else field.shape[1 + axis]
        q = q.clamp(min=0.0, max=float(n - 1))
        lo = q.floor()
        weights.append(q - lo)
        lo = lo.long()
        hi = (lo + 1).clamp(max=n - 1)
        if axis == 0 and extent is not None:
            lo, hi = (_window_index(i, origin, field.shape[1]) for i in (lo, hi))
        lows.append(lo)
        highs.append(hi)
    out = None
    for corner in itertools.product((0, 1), repeat=len(positions)):
        index = tuple(highs[a] if c else lows[a] for a, c in enumerate(corner))
        w = None
        for a, c in enumerate(corner):
            wa = weights[a] if c else 1.0 - weights[a]
            w = wa if w is None else w * wa
        term = field[(slice(None), *index)].float() * w
        out = term if out is None else out + term
    return out


def interpolate_blocks(
    field: torch.Tensor,
    positions: list[torch.Tensor],
    origin: int = 0,
    extent: int | None = None,
) -> torch.Tensor:
    """Linear interpolation of a field at the samples of ``n`` blocks, separably.

    The same values as :func:`interpolate_at` on the blocks' sample grids, computed by
    gathering one small patch per block (``m = ceil((b - 1) / f) + 2`` coarse samples per
    axis, ``f`` the upsampling factor) and applying a ``(b, m)`` weight matrix per axis: no
    index tensor of the blocks' full sample count is ever built (that alone would be 8 bytes
    per output sample per axis).

    Args:
        field: ``(C, *S)``.
        positions: ``d`` tensors ``(n, b)``: the index positions of the blocks' samples along
            each axis (clamped to the border like :func:`interpolate_at`).
        origin, extent: a window of a longer field, as for :func:`interpolate_at`.

    Returns:
        ``(C, n, b, ..., b)`` float32 (whatever the field's float dtype).
    """
    n, b = positions[0].shape
    d = len(positions)
    raw_lo = [q[:, 0].floor().long() for q in positions]
    span = max(int((q[:, -1].floor() - q[:, 0].floor()).max()) if n else 0 for q in positions)
    m = span + 2
    patch_index = []
    weights = []
    steps = torch.arange(m, device=field.device)
    for axis, q in enumerate(positions):
        size = extent if axis == 0 and extent is not None else field.shape[1 + axis]
        idx = (raw_lo[axis][:, None] + steps).clamp(0, size - 1)  # (n, m)
        if axis == 0 and extent is not None:
            idx = _window_index(idx, origin, field.shape[1])
        view = [n] + [1] * d
        view[1 + axis] = m
        patch_index.append(idx.view(view))
        qc = q.clamp(0.0, float(size - 1))
        i0 = qc.floor()
        w = (qc - i0).float()
        p0 = i0.long() - raw_lo[axis][:, None]  # (n, b) position of the lower neighbour
        mat = torch.zeros((n, b, m), device=field.device)
        mat.scatter_add_(2, p0.unsqueeze(2), (1 - w).unsqueeze(2))
        mat.scatter_add_(2, (p0 + 1).clamp(max=m - 1).unsqueeze(2), w.unsqueeze(2))
        weights.append(mat)
    # broadcast indices of shape (n, m, 1, 1) etc.: n * m^d elements, not n * b^d
    x = field[(slice(None), *patch_index)].float()  # (C, n, m, ..., m), float32 arithmetic
    for axis in range(d):
        x = x.movedim(2 + axis, -1)
        shape = x.shape
        x = torch.einsum("cnrm,nim->cnri", x.reshape(shape[0], n, -1, m), weights[axis])
        x = x.reshape(*shape[:-1], b).movedim(-1, 2 + axis)
    return x
