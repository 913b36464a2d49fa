"""Independent reference implementations the tests compare the package against (torch's own
pooling and interpolation, plain slicing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def box_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over ``factor^d`` cells: ``(C, *S)`` -> ``(C, *S / factor)`` float32."""
    if factor == 1:
        return x.float()
    return F.interpolate(x[None].float(), scale_factor=1 / factor, mode="area")[0]


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Linear upsampling ``(C, *S)`` -> ``(C, *S * factor)``, align_corners=False."""
    mode = _MODES[x.ndim - 1]
    return F.interpolate(x[None], scale_factor=factor, mode=mode, align_corners=False)[0]


def gather_blocks(field: torch.Tensor, block: int, coords: torch.Tensor) -> torch.Tensor:
    """Blocks ``(n, C, b, ..., b)`` of a field ``(C, *S)`` at block coordinates ``(n, d)``."""
    out = []
    for c in coords.tolist():
        out.append(field[(slice(None), *(slice(i * block, (i + 1) * block) for i in c))])
    return torch.stack(out)
