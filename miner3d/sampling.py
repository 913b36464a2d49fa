"""The model at arbitrary points: fractional levels of detail and off-grid evaluation.

**Levels of detail.** Level ``j`` is the sum of the scales ``k >= j`` (``L_j``); a fractional
level ``t = j + f`` (``0 <= f < 1``) blends the two levels around it linearly::

    L_t = (1 - f) L_j + f L_(j+1) = sum_(k > j) R_k + (1 - f) R_j

which is continuous in ``t``, piecewise linear, and equal to ``L_j`` at every integer. Since
``L_j`` sampled on scale ``j``'s grid is the fit of the signal box-filtered ``2^j`` times, a
picture rendered ``2^t`` times smaller than the input at level ``t`` is an anti-aliased
minification, as a mipmap's trilinear filtering gives (:func:`auto_lod`).

**Between samples.** By default each scale's residual field is linearly interpolated from
its own sample centres (``align_corners=False``), so querying at sample centres equals
decoding. With ``off_grid``, the finest scale's MLPs are evaluated at the point itself
instead (an implicit representation is a continuous function): at a point, the blocks of the
``2^d`` sample centres around it are each evaluated at the point, and blended with the same
bilinear weights as the interpolation. Inside a block that is exactly its MLP at the point;
within half a sample of a block face, the two MLPs are blended, so there is no seam: the value
is continuous everywhere.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .errors import MinerError
from .pyramid import interpolate_at


def check_lod(lod: float, n_scales: int, name: str = "lod") -> int | float:
    """``lod`` if it is a level of detail of a model of ``n_scales`` scales (``[0, n - 1]``,
    fractional allowed), as an ``int`` where it is one (a level's own grid); else a one-line
    error naming the option ``name``."""
    lod = float(lod)
    if not (math.isfinite(lod) and 0 <= lod <= n_scales - 1):
        raise MinerError(f"{name} must be in [0, {n_scales - 1}], got {lod:g}")
    return int(lod) if lod.is_integer() else lod


def scale_weights(n_scales: int, lod: float) -> list[float]:
    """The weight of each scale's residual field at level of detail ``lod`` (see the module
    doc): ``1`` above ``floor(lod)``, ``1 - frac(lod)`` at it, ``0`` below."""
    lod = check_lod(lod, n_scales)
    j = math.floor(lod)
    f = lod - j
    return [0.0 if k < j else (1.0 - f if k == j else 1.0) for k in range(n_scales)]


def auto_lod(shape: tuple[int, ...], size: tuple[int, ...], n_scales: int) -> float:
    """The level of detail whose sample spacing matches rendering a grid of ``shape`` at
    ``size``: ``log2`` of the larger shrink factor, clamped to the levels there are (0 when
    enlarging): a mipmap's choice."""
    shrink = max(n / m for n, m in zip(shape, size, strict=True))
    return float(min(max(math.log2(shrink), 0.0), n_scales - 1))


@torch.no_grad()
def query(
    model,
    points: np.ndarray | torch.Tensor,
    grid_coords: bool = False,
    from_scale: float = 0,
    chunk: int = 1 << 16,
    off_grid: bool = False,
) -> torch.Tensor:
    """The model (a :class:`~miner3d.model.MinerModel`, whose ``query`` method this is) at
    arbitrary points.

    Args:
        points: ``(P, d)`` in the input's own coordinates (through the model's transform),
            or continuous full-resolution grid coordinates if ``grid_coords`` (voxel ``i``'s
            centre at ``i + 0.5``).
        from_scale: level of detail, fractional allowed (see the module doc).
        chunk: points per evaluation of the finest scale: its transient memory is the blocks
            those points touch (all ``b^d`` samples of each), or with ``off_grid`` about
            ``2^d`` MLP evaluations per point.
        off_grid: evaluate the finest scale's MLPs at the points themselves.

    Returns:
        ``(P, C)`` float32. Points outside the grid take the border value.
    """
    if not grid_coords:
        if model.transform is None:
            raise MinerError("this model has no transform; pass grid coordinates")
        points = model.transform.world_to_grid(np.asarray(points))
    if off_grid and model.gaussian:
        raise MinerError("off-grid evaluation needs a Laplacian-pyramid model")
    weights = scale_weights(model.layout.n_scales, from_scale)
    g = torch.as_tensor(np.asarray(points), dtype=torch.float64, device=model.device)
    total = torch.zeros((model.channels, g.shape[0]), device=model.device)
    for k in range(1, model.layout.n_scales):
        if model.scales[k] is not None and weights[k] > 0:
            positions = [(g[:, a] / 2**k - 0.5).float() for a in range(model.layout.ndim)]
            total += weights[k] * interpolate_at(model.residual_field(k), positions)
    if weights[0] > 0 and model.scales[0] is not None:
        finest = _off_grid if off_grid else _finest
        step = chunk // (1 << model.layout.ndim) if off_grid else chunk
        for start in range(0, g.shape[0], step):
            total[:, start : start + step] += weights[0] * finest(model, g[start : start + step])
    return total.T.contiguous()


def _corners(model, g: torch.Tensor):
    """The ``2^d`` sample centres around points ``g`` ``(P, d)`` on scale 0's grid: their
    voxel indices ``(2^d, P, d)`` and bilinear weights ``(2^d, P)``."""
    shape, d = model.layout.scale_shape(0), model.layout.ndim
    lows, highs, fracs = [], [], []
    for a in range(d):
        q = (g[:, a] - 0.5).clamp(0, shape[a] - 1)
        lo = q.floor()
        fracs.append((q - lo).float())
        lows.append(lo.long())
        highs.append((lo.long() + 1).clamp(max=shape[a] - 1))
    corners = list(itertools.product((0, 1), repeat=d))
    voxel = torch.stack(
        [torch.stack([highs[a] if c[a] else lows[a] for a in range(d)], 1) for c in corners]
    )
    weight = torch.stack(
        [math.prod(fracs[a] if c[a] else 1 - fracs[a] for a in range(d)) for c in corners]
    )
    return voxel, weight


def _finest(model, g: torch.Tensor) -> torch.Tensor:
    """``L_0(R_0)`` at grid points ``g`` ``(P, d)``, interpolated from the touched blocks'
    sample centres: ``(C, P)``."""
    layout, b, d = model.layout, model.layout.block, model.layout.ndim
    voxel, weight = _corners(model, g)
    block_ids = layout.ravel(0, torch.div(voxel.view(-1, d), b, rounding_mode="floor"))
    local = voxel.view(-1, d) % b
    local_flat = torch.zeros_like(block_ids)
    for a in range(d):
        local_flat = local_flat * b + local[:, a]
    touched, inverse = torch.unique(block_ids, return_inverse=True)
    values = model.block_outputs(0, touched).flatten(2)  # (n_touched, C, b^d)
    samples = values[inverse, :, local_flat].view(len(voxel), -1, model.channels)
    return (samples * weight[..., None]).sum(0).T


def _off_grid(model, g: torch.Tensor) -> torch.Tensor:
    """``R_0`` at grid points ``g`` ``(P, d)`` with each corner's block MLP evaluated at the
    point itself, blended bilinearly (see the module doc): ``(C, P)``. Memory: each corner's
    weights gathered per point (about ``2^d * P`` small matrices)."""
    layout, b, d = model.layout, model.layout.block, model.layout.ndim
    voxel, weight = _corners(model, g)
    coords = torch.div(voxel.view(-1, d), b, rounding_mode="floor")
    rows = model.rows_of(0, layout.ravel(0, coords))  # (2^d P,), -1: no MLP
    point = g.float().repeat(len(voxel), 1)
    local = 2 * (point - coords.float() * b) / b - 1  # the block's own (-1, 1) frame
    out = torch.zeros((len(rows), model.channels), device=model.device)
    has = rows >= 0
    if has.any():
        bank = model.scales[0].bank
        out[has] = bank.forward(local[has][:, None, :], rows=rows[has])[:, 0, :]
    return (out.view(len(voxel), -1, model.channels) * weight[..., None]).sum(0).T
