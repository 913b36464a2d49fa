"""The full-resolution signal, read block batch by block batch, never copied whole.

The trainer and the metrics see the signal only through :class:`SignalSource`: the blocks of
any scale (box-filtered on the fly from the full-resolution samples) and the samples at chosen
positions inside blocks. The caller's array is used as it is:

* a torch tensor or an in-memory numpy array is moved to the fitting device once, in its own
  dtype (1 byte per sample for occupancy and 8-bit images);
* a numpy memory map (``np.memmap``, e.g. from ``tifffile.memmap``) stays on disk: every read
  gathers just the samples asked for, and the pages it touched are handed back to the kernel
  afterwards (``madvise(MADV_DONTNEED)``), so the file never accumulates in the resident set.

Padding (the layout pads the grid to a multiple of ``b * 2**(J - 1)``) is virtual: indices
past the end are clamped to the border sample ("edge", images) or read as zero ("zero",
occupancy: outside the grid is empty). No padded copy and no float copy of the full signal or
of any coarser level exists; the box-filtered level ``G_j`` of a block is the mean of its
``(b 2^j)^d`` full-resolution samples, computed when asked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .blocks import BlockLayout
from .memory import release_pages

PAD_MODES = ("zero", "edge")


class SignalSource:
    """Read access by blocks to a signal ``(C, *S)`` (``S`` the unpadded spatial shape).

    Args:
        data: ``(C, *S)`` torch tensor, numpy array or numpy memory map (any strides: a
            channels-last file seen through ``np.moveaxis`` is fine), in its own dtype.
        layout: the block layout (its ``shape`` must be ``S``).
        pad: ``"zero"`` or ``"edge"``: what the padding beyond ``S`` reads as.
        value_scale: multiplies raw samples into ``[0, 1]`` (1/255 for 8-bit images).
        value_offset: subtracted from raw samples first (a volume's minimum).
        device: where blocks are returned (and where in-memory data is kept).
        budget: samples (times channels) gathered per read; bounds the transient memory of one
            read to about ``budget * (itemsize + 8)`` bytes.
    """

    def __init__(
        self,
        data: np.ndarray | torch.Tensor,
        layout: BlockLayout,
        pad: str,
        value_scale: float = 1.0,
        device: torch.device | str = "cpu",
        budget: int = 1 << 22,
        value_offset: float = 0.0,
    ):
        if pad not in PAD_MODES:
            raise ValueError(f"pad must be one of {PAD_MODES}")
        if tuple(data.shape[1:]) != tuple(layout.shape):
            raise ValueError(f"data shape {tuple(data.shape)} does not match {layout.shape}")
        self.layout = layout
        self.pad = pad
        self.value_scale = value_scale
        self.value_offset = value_offset
        self.device = torch.device(device)
        self.budget = budget
        self.channels = int(data.shape[0])
        self.mapped = isinstance(data, np.memmap)
        self._nonzero: torch.Tensor | None = None  # nonzero_blocks(0), once read
        if self.mapped:
            self.data = data
        else:
            tensor = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
            self.data = tensor.to(self.device)

    @property
    def nbytes(self) -> int:
        """Bytes the source keeps in memory (0 for a memory map)."""
        return 0 if self.mapped else self.data.numel() * self.data.element_size()

    # -- reading -------------------------------------------------------------------------
    def _gather(self, index: list[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        """Samples at clamped full-resolution indices (one mutually broadcastable tensor per
        axis): ``(C, *broadcast)`` float32, less ``value_offset``, times ``value_scale``;
        zero where ``valid`` is False."""
        if self.mapped:
            where = tuple(i.cpu().numpy() for i in index)
            raw = torch.from_numpy(np.ascontiguousarray(self.data[(slice(None), *where)]))
            self.release()
        else:
            raw = self.data[(slice(None), *(i.to(self.data.device) for i in index))]
        values = raw.to(self.device).float()
        if self.value_offset != 0.0:
            values -= self.value_offset
        if self.value_scale != 1.0:
            values *= self.value_scale
        if valid is not None:
            values *= valid.to(self.device)
        return values

    def _clamp(self, axis: int, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clamp full-resolution indices of one axis; the mask of real samples for zero
        padding (``None`` when every index is inside)."""
        n = self.layout.shape[axis]
        inside = None
        if self.pad == "zero" and bool((raw >= n).any()):
            inside = raw < n
        return raw.clamp(max=n - 1), inside

    def level_blocks(self, j: int, coords: torch.Tensor) -> torch.Tensor:
        """The box-filtered signal ``G_j`` on blocks of scale ``j``.

        Args:
            j: the scale (0: the full-resolution samples themselves).
            coords: ``(n, d)`` block coordinates at scale ``j``.

        Returns:
            ``(n, C, b, ..., b)`` float32 in ``[0, 1]`` units. Transient memory: one read of at
            most ``budget`` samples of ``(b 2^j)^d``-sample regions, plus the output.
        """
        layout, d = self.layout, self.layout.ndim
        b, f = layout.block, 1 << j
        span = b * f
        n = coords.shape[0]
        out = torch.empty((n, self.channels) + (b,) * d, device=self.device)
        step = max(1, self.budget // (self.channels * span**d))
        local = torch.arange(span, device=coords.device)
        for start in range(0, n, step):
            part = coords[start : start + step]
            m = part.shape[0]
            index, valid = [], None
            for axis in range(d):
                raw = part[:, axis : axis + 1] * span + local  # (m, span)
                idx, inside = self._clamp(axis, raw)
                view = [m] + [1] * d
                view[1 + axis] = span
                index.append(idx.view(view))
                if inside is not None:
                    inside = inside.view(view)
                    valid = inside if valid is None else valid & inside
            values = self._gather(index, valid).movedim(0, 1)  # (m, C, span, ..., span)
            if f > 1:
                split = [m, self.channels]
                for _ in range(d):
                    split += [b, f]
                values = values.reshape(split).mean(dim=tuple(range(3, 3 + 2 * d, 2)))
            out[start : start + m] = values
        return out

    def values_at(self, j: int, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``G_j`` at the same local positions of several blocks of scale ``j``.

        Args:
            j: the scale (each value is the mean of ``2^(j d)`` full-resolution samples).
            ids: ``(n,)`` flat block ids at scale ``j``.
            local: ``(P, d)`` integer positions inside a block (``0 <= local < b``).

        Returns:
            ``(n, C, P)`` float32 in ``[0, 1]`` units. Transient memory: ``budget`` samples.
        """
        layout, d = self.layout, self.layout.ndim
        f = 1 << j
        coords = layout.unravel(j, ids)
        local = local.to(coords.device)
        cell = torch.arange(f, device=coords.device)
        n_local = local.shape[0]
        out = torch.empty((len(ids), self.channels, n_local), device=self.device)
        step = max(1, self.budget // (self.channels * max(1, n_local) * f**d))
        for start in range(0, len(ids), step):
            part = coords[start : start + step]
            m = part.shape[0]
            index, valid = [], None
            for axis in range(d):
                first = (part[:, axis : axis + 1] * layout.block + local[:, axis]) * f  # (m, P)
                view = [m, n_local] + [1] * d
                view[2 + axis] = f
                idx, inside = self._clamp(axis, (first[:, :, None] + cell).view(view))
                index.append(idx)
                if inside is not None:
                    valid = inside if valid is None else valid & inside
            values = self._gather(index, valid)  # (C, m, P, f, ..., f)
            values = values.reshape(self.channels, m, n_local, -1).mean(dim=3)
            out[start : start + m] = values.movedim(0, 1)
        return out

    def nonzero_blocks(self, j: int) -> torch.Tensor:
        """``grid(j)`` bool: the blocks of scale ``j`` with a raw sample other than zero (the
        padding counts as zero), on the CPU. Scale 0's is read once (:func:`block_extremes`)
        and kept; coarser ones pool it."""
        if self._nonzero is None:
            self._nonzero = block_extremes(self.data, self.layout)[0]
        found, d = self._nonzero, self.layout.ndim
        for _ in range(j):  # a block of scale k + 1 covers 2 x ... x 2 of scale k
            split = [x for g in found.shape for x in (g // 2, 2)]
            found = found.view(split).any(tuple(range(1, 2 * d, 2)))
        return found

    def release(self) -> None:
        """Hand the pages of a memory map back to the kernel (they stay in the page cache; the
        next read faults them in again). No-op for in-memory data."""
        if self.mapped:
            release_pages(self.data)


def block_extremes(data: Any, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block of scale 0 (two ``grid(0)`` bool tensors, on the CPU): whether some raw
    sample of ``data`` ``(C, *shape)`` is nonzero, and whether every one is (the padding
    counts as zero). Read one slab of block rows at a time, a memory map's pages handed back
    after each: memory ``C * b * prod(padded[1:])`` bytes."""
    b, d = layout.block, layout.ndim
    grid, padded, channels = layout.grid(0), layout.padded, int(data.shape[0])
    some = torch.zeros(grid, dtype=torch.bool)
    every = torch.zeros(grid, dtype=torch.bool)  # rows past the signal stay False
    slab = torch.zeros((channels, b, *padded[1:]), dtype=torch.bool)
    split = [channels, b] + [x for g in grid[1:] for x in (g, b)]
    axes = (0, 1, *range(3, 2 * d, 2))
    for i in range(-(-layout.shape[0] // b)):
        rows = data[:, i * b : (i + 1) * b]
        found = (
            rows.cpu() != 0 if torch.is_tensor(rows) else torch.from_numpy(np.asarray(rows) != 0)
        )
        slab.zero_()
        slab[(slice(None), slice(0, found.shape[1]), *map(slice, found.shape[2:]))] = found
        some[i], every[i] = slab.view(split).any(axes), slab.view(split).all(axes)
        release_pages(data)  # a memory map is read slab by slab, never held
    return some, every
