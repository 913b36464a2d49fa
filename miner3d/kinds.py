"""Kinds of signal: what a signal is, in one place, instead of a flag tested everywhere.

A :class:`Kind` owns how an input becomes the array the trainer fits, always channels first
``(C, *spatial)``; what the padding of the block grid reads as; the quality metrics and the
thresholds timed to; what a level of detail is written as; and the reference the model's size
is compared with. Two kinds exist today:

* ``occupancy``: a solid, ``(1, X, Y, Z)``, 1 inside; meshes are voxelized (:mod:`voxelizer`)
  and ``.npz`` grids loaded. Padding is empty space (zero); quality is the full-grid IoU at
  0.5 (and at 0.4, as the official MINER code reports); a level of detail is a mesh; the size
  reference is the bit-packed grid.
* ``image``: ``(C, H, W)``; padding repeats the border; quality is PSNR (and SSIM of the
  finest level); a level of detail is a picture; the size reference is the raw samples.

The name ``volume`` is reserved for scalar volumes (CT, MRI, microscopy); it is not available
yet and asking for it says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError
from .io import IMAGE_EXTENSIONS, MESH_EXTENSIONS, read_image
from .metrics import MetricSums

GRID_EXTENSIONS = (".npz",)


@dataclass(frozen=True)
class Kind:
    """What a kind of signal is (see the module doc).

    Attributes:
        name: ``occupancy`` or ``image``.
        ndim: spatial axes ``d``.
        pad: what the block grid's padding reads as: ``zero`` or ``edge``.
        metric: the headline quality figure, a key of :meth:`metric_fields`.
        thresholds: the values of ``metric`` whose first time is reported.
        lod_output: what a level of detail is written as: ``mesh``, ``image`` or ``volume``.
        reference: what the model's size is compared with.
    """

    name: str
    ndim: int
    pad: str
    metric: str
    thresholds: tuple[float, ...]
    lod_output: str
    reference: str
    binary: bool = field(default=False)
    """The signal is 0/1 (IoU is measured)."""

    def metric_fields(self, sums: MetricSums) -> dict[str, float]:
        """The quality figures of one measurement (keys of ``summary.json`` and
        ``metrics.csv``)."""
        if self.binary:
            return {"iou": sums.iou(0), "iou_04": sums.iou(1)}
        return {"psnr": sums.psnr}

    def reference_bytes(self, samples: int, itemsize: int) -> float:
        """Bytes of the reference the model's size is compared with, for ``samples`` samples
        (times channels) of ``itemsize`` bytes."""
        return samples / 8 if self.binary else samples * itemsize

    def as_signal(self, array: Any) -> np.ndarray:
        """An in-memory array as this kind's channels-first ``(C, *spatial)`` (a view when
        possible). Occupancy: ``(X, Y, Z)``; image: ``(H, W)`` or ``(H, W, C)`` with
        ``C <= 4``. Anything else is a :class:`MinerError` naming the shape."""
        a = array if isinstance(array, np.ndarray) else np.asarray(array)
        if self.name == "occupancy":
            if a.ndim != 3:
                raise MinerError(f"an occupancy array is (X, Y, Z); got shape {a.shape}")
            return a[None]
        if a.ndim == 2:
            return a[None]
        if a.ndim == 3 and a.shape[-1] <= 4:
            return np.moveaxis(a, -1, 0)
        raise MinerError(f"an image array is (H, W) or (H, W, C) with C <= 4; got shape {a.shape}")


OCCUPANCY = Kind(
    "occupancy", 3, "zero", "iou", (0.99, 0.995, 0.999), "mesh", "bit-packed grid", binary=True
)
IMAGE = Kind("image", 2, "edge", "psnr", (30.0, 35.0, 40.0), "image", "raw samples")
KINDS = {k.name: k for k in (OCCUPANCY, IMAGE)}
RESERVED = ("volume",)


def get_kind(kind: str | Kind) -> Kind:
    """A :class:`Kind` by name (or itself)."""
    if isinstance(kind, Kind):
        return kind
    if kind in KINDS:
        return KINDS[kind]
    if kind in RESERVED:
        raise MinerError(f"kind '{kind}' is not available yet (available: {', '.join(KINDS)})")
    raise MinerError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)})")


def kind_of_path(path: Path) -> Kind:
    """The kind of an input file, by extension."""
    ext = path.suffix.lower()
    if ext in MESH_EXTENSIONS or ext in GRID_EXTENSIONS:
        return OCCUPANCY
    if ext in IMAGE_EXTENSIONS:
        return IMAGE
    known = ", ".join(MESH_EXTENSIONS + GRID_EXTENSIONS + IMAGE_EXTENSIONS)
    raise MinerError(f"unknown input extension '{ext or path.name}' (known: {known})")


def value_scale(dtype: np.dtype) -> float:
    """The factor that maps raw samples of ``dtype`` into ``[0, 1]``."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 1 / 255
    if dtype == np.uint16:
        return 1 / 65535
    if np.issubdtype(dtype, np.floating) or dtype == np.bool_:
        return 1.0
    raise MinerError(f"unsupported sample type {dtype}")


@dataclass
class Signal:
    """What the trainer sees: the channels-first array, its kind, how to read it, and where it
    came from.

    Attributes:
        data: ``(C, *spatial)`` numpy array (or memory map) in its own dtype.
        kind: the :class:`Kind`.
        value_scale: multiplies raw samples into ``[0, 1]``.
        transform: grid to input coordinates (occupancy), or ``None``.
        info: JSON-serialisable facts about the input (stored in the model's metadata).
    """

    data: Any
    kind: Kind
    value_scale: float
    transform: Any
    info: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape."""
        return tuple(self.data.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])


def read_signal(
    path: Path,
    kind: Kind,
    *,
    resolution: int = 128,
    voxelizer: str = "robust",
    cube: bool = False,
    margin: int = 2,
    reuse_grid: Path | None = None,
    save_grid: Path | None = None,
    max_memory: int | None = None,
) -> Signal:
    """Read an input file as a :class:`Signal` of ``kind``.

    Occupancy: a mesh is voxelized (or its earlier voxelization ``reuse_grid`` read, if that
    file exists; a new grid is saved to ``save_grid``); an ``.npz`` grid is loaded. Image: see
    :func:`miner3d.io.read_image` (uncompressed TIFFs are memory-mapped). Peak memory: the
    voxelizer's (see :mod:`voxelizer`), or the decoded image in its own dtype (nothing for a
    memory map).
    """
    from .grid import OccupancyGrid
    from .voxelizer import voxelize_file

    if kind.name == "image":
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise MinerError(f"{path} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        image, mapped = read_image(path, max_memory)
        scale = value_scale(image.dtype)
        if np.issubdtype(image.dtype, np.floating) and image.dtype != np.float32:
            image = image.astype(np.float32)
        info = {
            "kind": "image",
            "dtype": str(image.dtype),
            "shape": list(image.shape),
            "memory_mapped": mapped,
        }
        return Signal(image, kind, scale, None, info)
    ext = path.suffix.lower()
    if ext in GRID_EXTENSIONS:
        grid, source_kind = OccupancyGrid.load(path), "grid"
    elif ext in MESH_EXTENSIONS:
        source_kind = "mesh"
        if reuse_grid is not None and reuse_grid.exists():  # a resumed run reuses its grid
            grid = OccupancyGrid.load(reuse_grid)
        else:
            grid = voxelize_file(
                path, resolution, method=voxelizer, cube=cube, margin=margin, max_memory=max_memory
            )
            if save_grid is not None:
                grid.save(save_grid)
    else:
        raise MinerError(f"{path} is not a mesh or an .npz grid; an occupancy input must be one")
    if grid.occupancy.ndim != 3:
        raise MinerError(f"{path} holds a {grid.occupancy.ndim}D grid; expected 3D")
    info = {
        "kind": source_kind,
        "grid_shape": list(grid.shape),
        "filled_fraction": grid.filled_fraction,
        "voxelize": grid.meta,
    }
    return Signal(grid.occupancy[None], kind, 1.0, grid.transform, info)
