"""Kinds of signal: what a signal is, in one place, instead of a flag tested everywhere.

A :class:`Kind` owns how an input becomes the array the trainer fits, always channels first
``(C, *spatial)``; what the padding of the block grid reads as; the quality metrics and the
thresholds timed to; what a level of detail is written as; and the reference the model's size
is compared with. Three kinds exist today:

* ``occupancy``: a solid, ``(1, X, Y, Z)``, 1 inside; meshes are voxelized (:mod:`voxelizer`)
  and ``.npz`` grids loaded. Padding is empty space (zero); quality is the full-grid IoU at
  0.5 (and at 0.4, as the official MINER code reports); a level of detail is a mesh; the size
  reference is the bit-packed grid.
* ``image``: ``(C, H, W)``; padding repeats the border; quality is PSNR (and SSIM of the
  finest level); a level of detail is a picture; the size reference is the raw samples.
* ``volume``: a scalar (or up to 4-component) volume ``(C, X, Y, Z)``: CT, MRI, microscopy,
  distance fields. Fitted like an image: padding repeats the border, quality is PSNR; a level
  of detail is a dense volume (or an isosurface at a chosen level). Samples are mapped to
  ``[0, 1]`` by the input's own range (``(raw - min) / (max - min)``), and PSNR's peak is the
  dtype's range for integer inputs, ``max - min`` for float ones.

Which kind a file is (:func:`kind_of_path`): meshes and miner3d ``.npz`` grids are
occupancy; ``.binvox`` is occupancy; other arrays, TIFFs and volume files go by their content
(a 3D array, a multi-page TIFF or a volume format is a volume, a 2D array or one of shape
``(H, W, 3 or 4)`` is an image; a volume of booleans, or of bytes holding only 0 and 1, is
occupancy). ``--kind`` overrides the guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError
from .io import IMAGE_EXTENSIONS, MESH_EXTENSIONS, atomic_write, format_suffix, read_image
from .metrics import MetricSums
from .volumes import (
    ARRAY_EXTENSIONS,
    TIFF_EXTENSIONS,
    VOLUME_EXTENSIONS,
    array_shape,
    filled_fraction,
    only_zero_one,
    sample_range,
)

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
    metric_step: float = field(default=0.01)
    """The resolution at which :attr:`metric` counts as improved (IoU: 1e-4, 4 digits; PSNR:
    0.01 dB); the quality plateau rule rounds to it (:attr:`FitConfig.tail`)."""

    def metric_fields(self, sums: MetricSums, peak: float = 1.0) -> dict[str, float]:
        """The quality figures of one measurement (keys of ``summary.json`` and
        ``metrics.csv``); ``peak``: PSNR's peak in the fitted ``[0, 1]`` units."""
        if self.binary:
            return {"iou": sums.iou(0), "iou_04": sums.iou(1)}
        return {"psnr": sums.psnr + 20.0 * math.log10(peak)}

    def reference_bytes(self, samples: int, itemsize: int) -> float:
        """Bytes of the reference the model's size is compared with, for ``samples`` samples
        (times channels) of ``itemsize`` bytes."""
        return samples / 8 if self.binary else samples * itemsize

    def as_signal(self, array: Any) -> np.ndarray:
        """An in-memory array as this kind's channels-first ``(C, *spatial)`` (a view when
        possible). Occupancy: ``(X, Y, Z)``; image: ``(H, W)`` or ``(H, W, C)`` with
        ``C <= 4``. Anything else is a :class:`MinerError` naming the shape."""
        a = array if isinstance(array, np.ndarray) else np.asarray(array)
        if self.ndim == 3:
            if a.ndim == 4 and self.name == "volume" and a.shape[-1] <= 4:
                return np.moveaxis(a, -1, 0)
            if a.ndim != 3:
                raise MinerError(f"{self.name} arrays are (X, Y, Z); got shape {a.shape}")
            return a[None]
        if a.ndim == 2:
            return a[None]
        if a.ndim == 3 and a.shape[-1] <= 4:
            return np.moveaxis(a, -1, 0)
        raise MinerError(f"an image array is (H, W) or (H, W, C) with C <= 4; got shape {a.shape}")


OCCUPANCY = Kind(
    "occupancy",
    3,
    "zero",
    "iou",
    (0.99, 0.995, 0.999),
    "mesh",
    "bit-packed grid",
    binary=True,
    metric_step=1e-4,
)
IMAGE = Kind("image", 2, "edge", "psnr", (30.0, 35.0, 40.0), "image", "raw samples")
VOLUME = Kind("volume", 3, "edge", "psnr", (30.0, 35.0, 40.0), "volume", "raw samples")
KINDS = {k.name: k for k in (OCCUPANCY, IMAGE, VOLUME)}
RESERVED: tuple[str, ...] = ()


def get_kind(kind: str | Kind) -> Kind:
    """A :class:`Kind` by name (or itself)."""
    if isinstance(kind, Kind):
        return kind
    if kind in KINDS:
        return KINDS[kind]
    if kind in RESERVED:
        raise MinerError(f"kind '{kind}' is not available yet (available: {', '.join(KINDS)})")
    raise MinerError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)})")


def is_grid_file(path: Path) -> bool:
    """A ``.npz`` holding miner3d's grid format tag."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "header.npy" in archive.namelist() and "packed.npy" in archive.namelist()
    except Exception:  # not a zip: the reader will say so
        return False


def source_kind(path: Path, kind: Kind) -> str:
    """What an input file of ``kind`` is read as: ``mesh``, ``grid`` (a miner3d ``.npz``),
    ``image`` (a picture, read by :func:`miner3d.io.read_image`) or ``volume`` (an array or
    a volume file, read by :func:`miner3d.volumes.read_volume`)."""
    ext = format_suffix(path)
    if ext in MESH_EXTENSIONS:
        return "mesh"
    if ext in GRID_EXTENSIONS and is_grid_file(path):
        return "grid"
    if kind.name == "image" and ext in IMAGE_EXTENSIONS and ext not in ARRAY_EXTENSIONS:
        return "image"
    return "volume"


def kind_of_path(path: Path) -> Kind:
    """The kind of an input file, by extension and, for arrays and TIFFs, by the shape its
    header declares (see the module doc). A 3D array of bytes is read once here to tell
    occupancy (only 0 and 1) from a volume, and again when it is fitted."""
    ext = format_suffix(path)
    if ext in MESH_EXTENSIONS or ext == ".binvox":
        return OCCUPANCY
    if ext == ".npz" and is_grid_file(path):
        return OCCUPANCY
    if ext in ARRAY_EXTENSIONS or ext in TIFF_EXTENSIONS:
        head = array_shape(path)
        if head is None:
            return IMAGE if ext in TIFF_EXTENSIONS else VOLUME  # the reader says what is wrong
        shape, dtype = head
        if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)):
            return IMAGE
        if ext in TIFF_EXTENSIONS and len(shape) == 3 and shape[-1] == 1:
            return IMAGE  # (H, W, 1): one page with one sample per pixel
        if dtype == np.bool_:
            return OCCUPANCY
        if dtype == np.uint8 and len(shape) == 3:
            from .volumes import read_volume

            return OCCUPANCY if only_zero_one(read_volume(path).data) else VOLUME
        return VOLUME
    if ext in IMAGE_EXTENSIONS:
        return IMAGE
    if ext in VOLUME_EXTENSIONS:
        return VOLUME
    known = ", ".join(dict.fromkeys(MESH_EXTENSIONS + IMAGE_EXTENSIONS + VOLUME_EXTENSIONS))
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
        value_scale: multiplies raw samples (less ``value_offset``) into ``[0, 1]``.
        transform: grid to input coordinates, or ``None``.
        info: JSON-serialisable facts about the input (stored in the model's metadata).
        value_offset: subtracted from raw samples before ``value_scale``.
        peak: PSNR's peak in ``[0, 1]`` units (the dtype's range times ``value_scale`` for
            integer volumes).
    """

    data: Any
    kind: Kind
    value_scale: float
    transform: Any
    info: dict[str, Any]
    value_offset: float = 0.0
    peak: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape."""
        return tuple(self.data.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])


def _mapped_grid(path: Path, transform, meta: dict, kind: Kind, source: str) -> Signal:
    """A grid's raw voxels memory-mapped (:func:`miner3d.grid.map_voxels`) as a signal."""
    from .grid import map_voxels

    data = map_voxels(path, tuple(transform.shape))[None]
    info = {"kind": source, "grid_shape": list(data.shape[1:])}
    info |= {"filled_fraction": filled_fraction(data), "voxelize": meta}
    return Signal(data, kind, 1.0, transform, info)


def volume_signal(
    data: np.ndarray, transform: Any, info: dict[str, Any], path: Path | str = "the input"
) -> Signal:
    """A volume's samples ``(C, X, Y, Z)`` as a :class:`Signal` mapped to ``[0, 1]`` by their
    range, with PSNR's peak the dtype's range (integers) or the range itself (floats)."""
    if data.dtype == np.float64 or data.dtype == np.float16:
        from .memory import preflight

        preflight(f"converting {path} to float32", data.size * 4)
        data = data.astype(np.float32)  # the source reads float32: a copy, 4 bytes a sample
    lo, hi = sample_range(data, path)
    scale = 1.0 / (hi - lo)
    peak = 1.0
    if data.dtype == np.bool_:
        peak = scale
    elif np.issubdtype(data.dtype, np.integer):
        info_ = np.iinfo(data.dtype)
        peak = (float(info_.max) - float(info_.min)) * scale
    info = {**info, "value_range": [lo, hi], "psnr_peak": (1.0 / scale) * peak}
    return Signal(data, VOLUME, scale, transform, info, value_offset=lo, peak=peak)


def info_of(volume) -> dict[str, Any]:
    """JSON-serialisable facts about a volume (stored in the model's metadata)."""
    return {
        "format": volume.format,
        "dtype": str(volume.data.dtype),
        "shape": list(volume.data.shape[1:]),
        "channels": int(volume.data.shape[0]),
        "memory_mapped": isinstance(volume.data, np.memmap)
        or isinstance(getattr(volume.data, "base", None), np.memmap),
    }


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
    mapped: Path | None = None,
    max_memory: int | None = None,
) -> Signal:
    """Read an input file as a :class:`Signal` of ``kind``.

    Occupancy: a mesh is voxelized (or its earlier voxelization ``reuse_grid`` read, if that
    file exists; a new grid is saved to ``save_grid``); an ``.npz`` grid is loaded; a volume
    file (``.binvox``, arrays, stacks, NIfTI, VTK) must hold only 0 and 1. Image: see
    :func:`miner3d.io.read_image` (uncompressed TIFFs are memory-mapped), or a 2D array.
    ``mapped`` (several ranks): a mesh's grid is also written there raw (``.npy``) and mapped
    from it, each rank reading only its blocks; with ``reuse_grid``, an existing one is mapped.
    Volume: :func:`miner3d.volumes.read_volume` (memory-mapped where the format allows), mapped
    to ``[0, 1]`` by its range (:func:`volume_signal`). Peak memory: the voxelizer's (see
    :mod:`voxelizer`), or the decoded samples in their own dtype (nothing for a memory map).
    """
    from .grid import OccupancyGrid
    from .volumes import read_volume
    from .voxelizer import voxelize_file

    ext = format_suffix(path)
    source = source_kind(path, kind)
    if source == "image":
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
    if source == "volume":
        if ext not in VOLUME_EXTENSIONS:
            raise MinerError(f"{path} is not a {kind.name} input (unknown extension '{ext}')")
        volume = read_volume(path, max_memory)
        data = volume.data
        if len(volume.shape) != kind.ndim:
            raise MinerError(
                f"{path} holds a {len(volume.shape)}D array of shape {volume.shape}; a "
                f"{kind.name} is {kind.ndim}D (--kind chooses another)"
            )
        info = {"kind": "volume", **info_of(volume)}
        if kind.name == "volume":
            return volume_signal(data, volume.transform, info, path)
        if kind.name == "image":
            return Signal(data, kind, value_scale(data.dtype), volume.transform, info)
        if data.shape[0] != 1 or not (data.dtype in (np.bool_, np.uint8) and only_zero_one(data)):
            raise MinerError(
                f"{path} is not an occupancy grid: it holds {data.dtype} samples other than "
                "0 and 1 (fit it with --kind volume)"
            )
        data = data.view(np.uint8) if data.dtype == np.bool_ else data
        info["filled_fraction"] = filled_fraction(data)
        return Signal(data, kind, 1.0, volume.transform, info)
    if kind.name != "occupancy":
        raise MinerError(f"{path} is a mesh or a miner3d grid: an occupancy input")
    if source == "grid":
        grid = OccupancyGrid.load(path)
    elif mapped is not None and mapped.exists() and reuse_grid is not None and reuse_grid.exists():
        header, transform = OccupancyGrid.read_header(reuse_grid)
        return _mapped_grid(mapped, transform, header["meta"], kind, source)
    else:
        if reuse_grid is not None and reuse_grid.exists():  # a resumed run reuses its grid
            grid = OccupancyGrid.load(reuse_grid)
        else:
            grid = voxelize_file(
                path, resolution, method=voxelizer, cube=cube, margin=margin, max_memory=max_memory
            )
            if save_grid is not None:
                grid.save(save_grid)
        if mapped is not None:
            with atomic_write(mapped) as tmp, open(tmp, "wb") as fh:
                np.save(fh, grid.occupancy)
            return _mapped_grid(mapped, grid.transform, grid.meta, kind, source)
    if grid.occupancy.ndim != 3:
        raise MinerError(f"{path} holds a {grid.occupancy.ndim}D grid; expected 3D")
    info = {
        "kind": source,
        "grid_shape": list(grid.shape),
        "filled_fraction": grid.filled_fraction,
        "voxelize": grid.meta,
    }
    return Signal(grid.occupancy[None], kind, 1.0, grid.transform, info)
