"""Block layout of every scale (octree in 3D, quadtree in 2D), and scattering into blocks.

Every scale is cut into blocks of the same size ``b`` in samples, so the number of blocks
doubles along each axis per finer scale and block ``c`` at scale ``j + 1`` is the parent of
blocks ``2 c + {0, 1}^d`` at scale ``j``. The full-resolution grid is padded up to a multiple
of ``b * 2**(J - 1)`` on every axis (the padding is remembered: :attr:`BlockLayout.shape` is
the signal's own shape).

Blocks are addressed by a flat id per scale (C order over the block grid). Scattering
works on a strided view ``(C, g0, b, g1, b, ...)`` of a field indexed with per-block
indices only: nothing per voxel of the whole grid is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Geometry of the pyramid's blocks.

    Attributes:
        shape: the signal's spatial shape at full resolution (unpadded), length ``d``.
        block: block edge in samples ``b`` (same at every scale).
        n_scales: ``J``; scale 0 is the finest, ``J - 1`` the coarsest.
    """

    shape: tuple[int, ...]
    block: int
    n_scales: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def padded(self) -> tuple[int, ...]:
        """Full-resolution shape padded to a multiple of ``b * 2**(J-1)`` per axis."""
        unit = self.block * 2 ** (self.n_scales - 1)
        return tuple(math.ceil(n / unit) * unit for n in self.shape)

    def scale_shape(self, j: int) -> tuple[int, ...]:
        """Padded sample grid of scale ``j``."""
        return tuple(n >> j for n in self.padded)

    def valid_shape(self, j: int) -> tuple[int, ...]:
        """The part of scale ``j``'s grid that covers the unpadded signal."""
        return tuple(math.ceil(n / 2**j) for n in self.shape)

    def grid(self, j: int) -> tuple[int, ...]:
        """Blocks per axis at scale ``j``."""
        return tuple(n // self.block for n in self.scale_shape(j))

    def n_blocks(self, j: int) -> int:
        return math.prod(self.grid(j))

    def unravel(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        """Flat block ids ``(n,)`` -> block coordinates ``(n, d)`` (int64)."""
        coords = []
        rest = ids
        for g in reversed(self.grid(j)):
            coords.append(rest % g)
            rest = torch.div(rest, g, rounding_mode="floor")
        return torch.stack(coords[::-1], dim=1)

    def ravel(self, j: int, coords: torch.Tensor) -> torch.Tensor:
        """Block coordinates ``(n, d)`` -> flat ids ``(n,)``."""
        ids = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device)
        for axis, g in enumerate(self.grid(j)):
            ids = ids * g + coords[:, axis]
        return ids

    def parent(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        """Ids at scale ``j + 1`` of the parents of blocks ``ids`` at scale ``j``."""
        return self.ravel(j + 1, torch.div(self.unravel(j, ids), 2, rounding_mode="floor"))

    def block_axis_positions(self, j: int, ids: torch.Tensor, at_scale: int) -> list[torch.Tensor]:
        """Index positions, in scale ``at_scale``'s grid, of the voxel centres of blocks ``ids``
        of scale ``j`` (``at_scale >= j``): ``d`` tensors ``(n, b)``, one per axis (for
        :func:`pyramid.interpolate_blocks`)."""
        b = self.block
        coords = self.unravel(j, ids).to(torch.float64)
        local = torch.arange(b, dtype=torch.float64, device=ids.device)
        factor = 2.0 ** (at_scale - j)
        return [
            ((coords[:, axis : axis + 1] * b + local + 0.5) / factor - 0.5).float()
            for axis in range(self.ndim)
        ]

    def rows_of_ids(self, j: int, lo: int, hi: int) -> tuple[int, int]:
        """The block rows ``[r0, r1)`` along the first axis of scale ``j`` that hold the
        block ids ``[lo, hi)`` (C order: a run of ids is a slab of rows); ``(0, 0)`` if
        empty."""
        if hi <= lo:
            return 0, 0
        per_row = math.prod(self.grid(j)[1:])
        return lo // per_row, (hi - 1) // per_row + 1

    def ids_of_rows(self, j: int, rows: tuple[int, int]) -> tuple[int, int]:
        """The block ids ``[lo, hi)`` of scale ``j``'s block rows ``[r0, r1)``."""
        per_row = math.prod(self.grid(j)[1:])
        return rows[0] * per_row, rows[1] * per_row

    def halo_rows(self, s: int, rows: tuple[int, int], k: int) -> tuple[int, int]:
        """The block rows of scale ``k > s`` that linear interpolation (:mod:`.pyramid`) reads
        at the samples of scale ``s``'s block rows ``rows``: their span, one sample more on
        each side, two at the top (a batch's patches may reach one further), in whole
        blocks. ``(0, 0)`` for no rows."""
        if rows[1] <= rows[0]:
            return 0, 0
        b, factor = self.block, 2 ** (k - s)
        top = self.scale_shape(k)[0] - 1
        lo = max(0, math.floor((rows[0] * b + 0.5) / factor - 0.5) - 1)
        hi = min(top, math.floor((rows[1] * b - 0.5) / factor - 0.5) + 2)
        return lo // b, hi // b + 1

    def windows(self, s: int, lo: int, hi: int) -> dict[int, tuple[int, int]]:
        """For a pass over blocks ``[lo, hi)`` of scale ``s``: the block rows it reads of every
        scale ``k >= s`` (scale ``s``: the run's own rows; each coarser one: the halo of the
        one below, :meth:`halo_rows`, so nested reads stay inside too)."""
        rows = {s: self.rows_of_ids(s, lo, hi)}
        for k in range(s + 1, self.n_scales):
            rows[k] = self.halo_rows(k - 1, rows[k - 1], k)
        return rows

    def real_samples(self, j: int, ids: torch.Tensor) -> int:
        """How many samples of blocks ``ids`` of scale ``j`` lie inside the unpadded signal
        (what :meth:`valid_mask` would count, without building it)."""
        valid, count = self.valid_shape(j), torch.ones(len(ids), dtype=torch.long)
        for axis, coord in enumerate(self.unravel(j, ids.cpu()).T):
            count *= (valid[axis] - coord * self.block).clamp(0, self.block)
        return int(count.sum())

    def valid_mask(self, j: int, ids: torch.Tensor) -> torch.Tensor | None:
        """``(n, b, ..., b)`` bool mask of the samples inside the unpadded signal, or ``None``
        when the grid needs no padding at this scale."""
        valid = self.valid_shape(j)
        if valid == self.scale_shape(j):
            return None
        b, d = self.block, self.ndim
        coords = self.unravel(j, ids)
        local = torch.arange(b, device=ids.device)
        mask = None
        for axis in range(d):
            inside = coords[:, axis : axis + 1] * b + local < valid[axis]  # (n, b)
            view = [inside.shape[0]] + [1] * d
            view[1 + axis] = b
            inside = inside.view(view)
            mask = inside if mask is None else mask & inside
        return mask


def _block_view(field: torch.Tensor, block: int) -> torch.Tensor:
    """``(C, *S)`` -> strided view ``(C, g0, b, g1, b, ...)``."""
    shape = [field.shape[0]]
    for n in field.shape[1:]:
        shape += [n // block, block]
    return field.view(shape)


def _block_index(coords: torch.Tensor) -> tuple:
    index: list = [slice(None)]
    for axis in range(coords.shape[1]):
        index += [coords[:, axis], slice(None)]
    return tuple(index)


def scatter_blocks(
    field: torch.Tensor, block: int, coords: torch.Tensor, values: torch.Tensor
) -> None:
    """Write ``values`` ``(n, C, b, ..., b)`` into the blocks ``coords`` ``(n, d)`` of ``field``."""
    _block_view(field, block)[_block_index(coords)] = values.to(field.dtype)


def local_coordinates(block: int, ndim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cell-centred local coordinates of a block's samples, ``(b^d, d)`` in ``(-1, 1)``,
    C order (the last axis fastest), shared by every block: ``(2 i + 1) / b - 1``."""
    axis = (2 * torch.arange(block, dtype=torch.float32, device=device) + 1) / block - 1
    grids = torch.meshgrid(*([axis] * ndim), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)
