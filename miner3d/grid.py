"""The one coordinate convention of miner3d, and the occupancy grid that carries it.

Convention (used by every module through this one):

* **Cell-centred voxels.** Voxel ``i`` along an axis covers the continuous grid interval
  ``[i, i + 1)`` and is sampled at its centre ``i + 0.5``. This is the convention of
  ``torch.nn.functional.interpolate(..., align_corners=False)`` and ``grid_sample`` with
  ``align_corners=False``, which the core uses for up- and downsampling. The normalised
  coordinate of a continuous grid position ``g`` on an axis of ``n`` voxels is
  ``u = 2 g / n - 1``, so the grid spans exactly ``[-1, 1]`` and voxel centres sit at
  ``(2 i + 1) / n - 1``.
* **Cubic voxels, non-cubic grids.** ``resolution`` is the voxel count along the mesh's
  longest axis (margin included); the other axes get as many voxels as the margined bounding
  box needs, so a statue that fills 19 % of its bounding cube costs 19 % of ``N^3``.
  ``cube=True`` gives the classic ``N^3`` grid with the mesh centred in it.
* **Axis order.** Array axis ``k`` of a grid is input axis ``k`` (array index ``[i, j, k]``
  is input ``(x, y, z)``); :attr:`GridTransform.axes` records this as ``"xyz"``.
* **One transform.** A :class:`GridTransform` (origin, voxel size, shape) is stored with
  every grid file and every model, and :meth:`GridTransform.grid_to_world` /
  :meth:`GridTransform.world_to_grid` are the only maps between grid and input coordinates::

      world = origin + direction @ (spacing * g)   (g: continuous grid coordinate)
      voxel centre of index i: g = i + 0.5

  ``spacing`` is per axis (anisotropic voxels of CT, MRI and microscopy; a mesh's grid has
  ``spacing = (voxel_size,) * d``) and ``direction`` is the identity unless a volume file
  says otherwise (a NIfTI sform, a MetaImage ``TransformMatrix``): it is kept and written
  back, never resampled away.
* **World coordinates are the input's own.** miner3d converts no frame: a mesh's units, a
  NIfTI file's RAS+ millimetres (its sform, else its qform, as nibabel reads them), a VTK
  or MetaImage file's frame as VTK reads it, an NRRD file's ``space`` (LPS for files
  written by ITK). Outputs are written in the same frame, so they overlay the input in any
  viewer. Volume formats that place samples at points (VTK, NIfTI, NRRD) put sample ``i``
  at ``g = i + 0.5`` here, so their origin is the first sample's centre, half a voxel from
  ours.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError

GRID_FORMAT_VERSION = 1
MIN_RESOLUTION = 8
MAX_RESOLUTION = 8192


@dataclass(frozen=True)
class GridTransform:
    """Map between grid coordinates and the input's own coordinates.

    Attributes:
        origin: world position of grid coordinate 0 (the corner of voxel 0), length ``d``.
        voxel_size: edge length of one cubic voxel in input units (with ``spacing``: its
            longest edge).
        shape: voxels per axis, length ``d``.
        axes: which input axis each array axis holds (``"xyz"`` for 3D, ``"xy"`` for 2D).
        spacing: per-axis voxel edges, length ``d`` (``None``: cubic voxels of ``voxel_size``).
        direction: ``d x d`` direction cosines, row-major, length ``d * d`` (``None``: the
            identity): column ``k`` is the world direction of array axis ``k``.
    """

    origin: tuple[float, ...]
    voxel_size: float
    shape: tuple[int, ...]
    axes: str = "xyz"
    spacing: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def steps(self) -> np.ndarray:
        """Per-axis voxel edges ``(d,)`` float64."""
        if self.spacing is None:
            return np.full(self.ndim, self.voxel_size, dtype=np.float64)
        return np.asarray(self.spacing, dtype=np.float64)

    @property
    def matrix(self) -> np.ndarray:
        """The direction cosines ``(d, d)`` float64 (the identity if none)."""
        if self.direction is None:
            return np.eye(self.ndim)
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def axis_aligned(self) -> bool:
        return self.direction is None or bool(np.allclose(self.matrix, np.eye(self.ndim)))

    @property
    def affine(self) -> np.ndarray:
        """``(d + 1, d + 1)``: homogeneous map of continuous grid coordinates to world."""
        out = np.eye(self.ndim + 1)
        out[:-1, :-1] = self.matrix * self.steps
        out[:-1, -1] = self.origin
        return out

    def grid_to_world(self, g: np.ndarray) -> np.ndarray:
        """Continuous grid coordinates ``(..., d)`` to input coordinates ``(..., d)`` (float64)."""
        scaled = np.asarray(g, dtype=np.float64) * self.steps
        if self.direction is not None:
            scaled = scaled @ self.matrix.T
        return np.asarray(self.origin) + scaled

    def world_to_grid(self, x: np.ndarray) -> np.ndarray:
        """Input coordinates ``(..., d)`` to continuous grid coordinates ``(..., d)`` (float64)."""
        offset = np.asarray(x, dtype=np.float64) - np.asarray(self.origin)
        if self.direction is not None:
            offset = offset @ np.linalg.inv(self.matrix).T
        return offset / self.steps

    def world_to_normalized(self, x: np.ndarray) -> np.ndarray:
        """Input coordinates ``(..., d)`` to ``[-1, 1]`` per axis (``align_corners=False``)."""
        return 2.0 * self.world_to_grid(x) / np.asarray(self.shape, dtype=np.float64) - 1.0

    def voxel_centers(self, axis: int) -> np.ndarray:
        """Input coordinates of the voxel centres along one axis, shape ``(shape[axis],)``
        (axis-aligned grids)."""
        return self.origin[axis] + self.steps[axis] * (np.arange(self.shape[axis]) + 0.5)

    @property
    def bounds(self) -> np.ndarray:
        """``(2, d)`` array: the lower and upper corners of the grid's box in input
        coordinates (of its rotated box, with a direction)."""
        corners = np.array(
            [[(c >> a) & 1 for a in range(self.ndim)] for c in range(1 << self.ndim)], float
        )
        world = self.grid_to_world(corners * np.asarray(self.shape))
        return np.stack([world.min(axis=0), world.max(axis=0)])

    def with_shape(self, shape: tuple[int, ...]) -> GridTransform:
        """The same box sampled by ``shape`` voxels (spacing rescaled per axis)."""
        steps = self.steps * np.asarray(self.shape) / np.asarray(shape)
        return GridTransform(
            self.origin,
            float(steps.max()),
            tuple(int(n) for n in shape),
            self.axes,
            tuple(float(v) for v in steps),
            self.direction,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None}  # old readers see old keys

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridTransform:
        """The transform of a file's header; a ``ValueError`` if it is not a sound one."""
        shape = tuple(int(v) for v in d["shape"])
        origin = tuple(float(v) for v in d["origin"])
        spacing = d.get("spacing")
        spacing = None if spacing is None else tuple(float(v) for v in spacing)
        direction = d.get("direction")
        direction = None if direction is None else tuple(float(v) for v in direction)
        voxel_size = float(d["voxel_size"])
        n = len(shape)
        if len(origin) != n or (spacing is not None and len(spacing) != n):
            raise ValueError("origin, spacing and shape differ in length")
        steps = spacing or (voxel_size,)
        if not all(math.isfinite(v) for v in origin) or not all(
            math.isfinite(v) and v > 0 for v in steps
        ):
            raise ValueError("non-finite origin, or a voxel size that is not positive")
        if direction is not None:
            if len(direction) != n * n or not all(math.isfinite(v) for v in direction):
                raise ValueError(f"direction must be {n * n} finite numbers")
            if abs(np.linalg.det(np.reshape(direction, (n, n)))) < 1e-6:
                raise ValueError("direction is singular")
        return cls(origin, voxel_size, shape, str(d.get("axes", "xyz")), spacing, direction)

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> GridTransform:
        """The transform of a volume file whose ``(d + 1, d + 1)`` ``affine`` maps a sample's
        index to the world position of its centre (NIfTI, VTK): our origin is half a voxel
        before the first sample's centre. A ``ValueError`` for a singular or non-finite one."""
        affine = np.asarray(affine, dtype=np.float64)
        d = len(shape)
        linear = affine[:d, :d]
        if not np.all(np.isfinite(affine[:d])):
            raise ValueError("the file's affine is not finite")
        steps = np.linalg.norm(linear, axis=0)
        if np.any(steps <= 0) or abs(np.linalg.det(linear)) < 1e-12 * np.prod(steps):
            raise ValueError("the file's affine is singular (a zero spacing?)")
        matrix = linear / steps
        origin = affine[:d, d] - matrix @ (0.5 * steps)
        direction = None
        if not np.allclose(matrix, np.eye(d), atol=1e-9):
            direction = tuple(float(v) for v in matrix.reshape(-1))
        return cls(
            tuple(float(v) for v in origin),
            float(steps.max()),
            tuple(int(v) for v in shape),
            "xyz"[:d],
            tuple(float(v) for v in steps),
            direction,
        )

    def sample_affine(self) -> np.ndarray:
        """The inverse of :meth:`from_affine`: ``(d + 1, d + 1)`` mapping a sample index to the
        world position of its centre (what NIfTI and VTK files store)."""
        out = self.affine
        out[:-1, -1] = self.grid_to_world(np.full(self.ndim, 0.5))
        return out

    @classmethod
    def fit_bounds(
        cls, bounds: np.ndarray, resolution: int, margin: int = 2, cube: bool = False
    ) -> GridTransform:
        """The grid for an object with the given bounding box.

        Args:
            bounds: ``(2, d)`` lower and upper corners of the object, input units.
            resolution: voxels along the longest axis, ``margin`` empty voxels per side included.
            margin: empty voxels kept on each side of the longest axis (so surfaces close).
            cube: give every axis ``resolution`` voxels (the classic ``N^3`` grid).
        """
        check_resolution(resolution)
        if not 0 <= 2 * margin < resolution:
            raise MinerError(f"margin {margin} leaves no room in a grid of {resolution} voxels")
        bounds = np.asarray(bounds, dtype=np.float64)
        extent = bounds[1] - bounds[0]
        longest = float(extent.max())
        if not np.all(np.isfinite(extent)) or longest <= 0:
            raise MinerError("the object has an empty or non-finite bounding box")
        voxel_size = longest / (resolution - 2 * margin)
        if cube:
            shape = np.full(len(extent), resolution)
        else:
            # ceil with a tolerance so that the longest axis gets exactly `resolution`
            inner = np.ceil(extent / voxel_size - 1e-9).astype(np.int64)
            shape = np.maximum(inner, 1) + 2 * margin
        center = 0.5 * (bounds[0] + bounds[1])
        origin = center - 0.5 * voxel_size * shape
        axes = "xyz"[: len(extent)]
        return cls(tuple(float(v) for v in origin), voxel_size, tuple(int(v) for v in shape), axes)


def check_resolution(resolution: int) -> None:
    """Raise a :class:`MinerError` unless ``resolution`` is an integer in the supported range."""
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool):
        raise MinerError(f"resolution must be an integer, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise MinerError(
            f"resolution {resolution} is out of range [{MIN_RESOLUTION}, {MAX_RESOLUTION}]"
        )


def resample_transform(shape: tuple[int, ...], resolution: int) -> GridTransform:
    """A grid of ``resolution`` samples along the longest axis over the same extent as a grid
    of ``shape``, expressed in that grid's coordinates (origin 0, unit voxels)."""
    check_resolution(resolution)
    voxel = max(shape) / resolution
    new_shape = tuple(max(1, round(n / voxel)) for n in shape)
    return GridTransform((0.0,) * len(shape), voxel, new_shape, "xyz"[: len(shape)])


@dataclass
class OccupancyGrid:
    """A solid occupancy grid: 1 byte per voxel in memory, 1 bit per voxel on disk.

    Attributes:
        occupancy: ``(nx, ny, nz)`` uint8, 1 inside, 0 outside (C order, z fastest).
        transform: the grid's :class:`GridTransform`.
        meta: provenance (source file and hash, method, timings), JSON-serialisable.
    """

    occupancy: np.ndarray
    transform: GridTransform
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.occupancy.shape)

    @property
    def filled_fraction(self) -> float:
        return float(np.count_nonzero(self.occupancy)) / max(1, self.occupancy.size)

    def save(self, path: str | Path) -> Path:
        """Write the bit-packed grid and its metadata to ``path`` (``.npz``), atomically.

        Peak extra memory: the packed copy, ``nx*ny*nz/8`` bytes.
        """
        from .io import atomic_write

        path = Path(path)
        if path.suffix != ".npz":
            raise MinerError(f"grid files end in .npz, got {path.name}")
        header = {
            "format": "miner3d-grid",
            "version": GRID_FORMAT_VERSION,
            "transform": self.transform.to_dict(),
            "meta": self.meta,
        }
        packed = np.packbits(self.occupancy.reshape(-1).astype(bool, copy=False))
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, packed=packed, header=np.array(json.dumps(header)))
        return path

    @staticmethod
    def read_header(path: str | Path) -> tuple[dict[str, Any], GridTransform]:
        """The checked header of a grid file and its transform, reading nothing else (the
        packed voxels stay on disk): for callers that need only the metadata."""
        from .io import check_input_file

        path = check_input_file(path, "grid file")
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":  # an .npz is a zip archive
                raise MinerError(f"could not read grid file {path}: not an .npz archive")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
        except Exception as exc:  # any parse failure is the file's fault
            raise MinerError(f"could not read grid file {path}: {exc}") from None
        if not isinstance(header, dict) or header.get("format") != "miner3d-grid":
            raise MinerError(f"{path} is not a miner3d grid file")
        try:
            transform = GridTransform.from_dict(header["transform"])
            shape = tuple(int(n) for n in transform.shape)
            if len(shape) != 3 or min(shape) < 1 or any(n > 2**20 for n in shape):
                raise ValueError(f"shape {shape}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MinerError(f"grid file {path} has a malformed header ({exc})") from None
        if not isinstance(header.get("meta"), dict):
            header["meta"] = {}
        return header, transform

    @classmethod
    def load(cls, path: str | Path) -> OccupancyGrid:
        """Read a grid written by :meth:`save`. The packed voxels' declared size is checked
        against the header and the memory budget before they are read. Peak memory: the grid
        plus its packed copy."""
        import zipfile

        from .io import npy_header
        from .memory import preflight

        header, transform = cls.read_header(path)
        shape = transform.shape
        n = math.prod(shape)
        expected = -(-n // 8)
        try:
            with zipfile.ZipFile(path) as archive, archive.open("packed.npy") as member:
                declared, dtype = npy_header(member)
        except Exception as exc:  # a missing or broken member is the file's fault
            raise MinerError(f"could not read grid file {path}: {exc}") from None
        if declared != (expected,) or dtype != np.uint8:
            raise MinerError(
                f"grid file {path} is truncated or inconsistent: {declared} packed bytes "
                f"for a {'x'.join(map(str, shape))} grid"
            )
        preflight(f"loading the {'x'.join(map(str, shape))} grid {path}", n + expected)
        try:
            with np.load(path, allow_pickle=False) as data:
                packed = data["packed"]
        except Exception as exc:  # any parse failure is the file's fault
            raise MinerError(f"could not read grid file {path}: {exc}") from None
        if packed.shape != (expected,):
            raise MinerError(f"grid file {path} is truncated")
        occupancy = np.unpackbits(packed, count=n).reshape(shape)
        return cls(occupancy, transform, header["meta"])


def map_voxels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A grid's raw voxels, ``shape`` uint8, memory-mapped from an ``.npy`` file (what several
    ranks read instead of each holding the grid; nothing is read here). A one-line error if
    the file holds anything else."""
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MinerError(f"could not map {path}: {exc}") from None
    if data.shape != shape or data.dtype != np.uint8:
        raise MinerError(f"{path} does not hold this run's {'x'.join(map(str, shape))} grid")
    return data
