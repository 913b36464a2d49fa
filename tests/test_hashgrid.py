"""The hash-grid baseline of scripts/bench_fit.py (scripts/hashgrid.py): its encoding is
instant-ngp's, and it fits a solid."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from hashgrid import PRIMES, HashGridField, fit_hashgrid, surface_voxels


def _reference_encoding(model: HashGridField, x: torch.Tensor) -> torch.Tensor:
    """instant-ngp's encoding of ``x`` ``(N, 3)``, one point, level and corner at a time,
    in Python integers (uint32 hashing written as arbitrary-precision arithmetic)."""
    table, res, offsets = model.table.detach(), model.res.tolist(), model.offset.tolist()
    out = torch.zeros(x.shape[0], len(res) * table.shape[1], dtype=torch.float64)
    for i, point in enumerate(x.tolist()):
        for level, r in enumerate(int(r) for r in res):
            pos = [c * r for c in point]
            low = [math.floor(p) for p in pos]
            for corner in range(8):
                bits = [(corner >> k) & 1 for k in range(3)]
                v = [low[k] + bits[k] for k in range(3)]
                w = math.prod(pos[k] - low[k] if bits[k] else 1 - pos[k] + low[k] for k in range(3))
                if (r + 1) ** 3 <= model.table_size:
                    index = v[0] + v[1] * (r + 1) + v[2] * (r + 1) ** 2
                else:
                    index = (v[0] * PRIMES[0] ^ v[1] * PRIMES[1] ^ v[2] * PRIMES[2]) % (1 << 32)
                    index %= model.table_size
                row = table[offsets[level] + index].double()
                out[i, 2 * level : 2 * level + 2] += w * row
    return out


def test_the_encoding_is_instant_ngps():
    torch.manual_seed(0)
    model = HashGridField(finest=300, log2_table=14)  # two levels dense, 14 hashed
    assert 0 < model.n_dense < 16
    with torch.no_grad():
        model.table.normal_()
    x = torch.rand(20, 3)
    ours = model.encode(x).double()
    assert torch.allclose(ours, _reference_encoding(model, x), atol=1e-4)


def test_surface_voxels_are_those_with_a_neighbour_of_the_other_value():
    grid = np.zeros((4, 5, 6), np.uint8)
    grid[1:3, 1:4, 2:5] = 1
    flat = set(surface_voxels(grid).tolist())
    expected = set()
    for idx in np.ndindex(grid.shape):
        for axis in range(3):
            for step in (-1, 1):
                other = list(idx)
                other[axis] += step
                if 0 <= other[axis] < grid.shape[axis] and grid[tuple(other)] != grid[idx]:
                    expected.add(np.ravel_multi_index(idx, grid.shape))
    assert flat == expected


def test_it_fits_a_ball():
    n = 24
    z, y, x = np.mgrid[0:n, 0:n, 0:n] + 0.5
    ball = ((x - n / 2) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2 < (n / 3) ** 2).astype(np.uint8)
    result = fit_hashgrid(ball, cap=600, max_iters=60, log2_table=12, batch=4096, tail=0)
    assert result["stopped"] in ("max_iters", "target") and result["iou"] >= 0.98
    assert result["history"][-1]["iteration"] == result["iterations"] <= 60
    assert result["reached"]["0.99"] is not None
