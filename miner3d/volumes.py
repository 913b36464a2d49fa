"""Volume files in and out: NumPy, 3D TIFF stacks, binvox, NIfTI, VTK image data, MetaImage,
NRRD.

Every reader returns a :class:`Volume`: the samples channels first ``(C, *S)`` in the file's
own dtype (a memory map where the format allows it: ``.npy``, uncompressed TIFF stacks and
NIfTI files), and the :class:`~miner3d.grid.GridTransform` that puts them in the file's own
coordinates (spacing, origin and direction; see :mod:`miner3d.grid` for the convention). The
size a header declares is checked against the memory budget before anything is allocated.

========================  ======================  ========================================
extension                 read with               spacing / origin
========================  ======================  ========================================
``.npy`` ``.npz``         numpy (no pickle)       none (grid coordinates)
``.tif`` ``.tiff``        tifffile (pages = axis  ImageJ ``spacing`` and resolution tags,
                          0)                      or our own JSON description
``.binvox``               our own reader/writer   ``translate`` and ``scale``
``.nii`` ``.nii.gz``      nibabel                 the sform (else qform) affine, RAS+
``.vti`` ``.mha``         VTK (PyVista)           ``Spacing``, ``Origin``, ``Direction``
``.mhd`` ``.nrrd``
========================  ======================  ========================================
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MinerError, first_line
from .grid import GridTransform
from .imaging import (
    check_array,
    read_nifti,
    read_nrrd,
    read_tiff_stack,
    read_vtk,
    spaced_transform,
)
from .io import atomic_write, check_input_file, format_suffix, npy_header
from .memory import preflight, release_pages

ARRAY_EXTENSIONS = (".npy", ".npz")
TIFF_EXTENSIONS = (".tif", ".tiff")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
VTK_EXTENSIONS = (".vti", ".mha", ".mhd", ".nrrd")
VOLUME_EXTENSIONS = (".binvox", *ARRAY_EXTENSIONS, *TIFF_EXTENSIONS, *NIFTI_EXTENSIONS)
VOLUME_EXTENSIONS += VTK_EXTENSIONS
VOLUME_OUTPUTS = (".npy", ".nii", ".nii.gz", ".vti", ".mha", ".tif", ".tiff")


@dataclass
class Volume:
    """Samples read from a file.

    Attributes:
        data: ``(C, *S)`` in the file's dtype, a view or memory map where possible.
        transform: grid to the file's coordinates, or ``None`` (the file has none).
        format: what the file was, e.g. ``nifti``.
    """

    data: np.ndarray
    transform: GridTransform | None
    format: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])


def read_array(path: Path, max_memory: int | None = None) -> np.ndarray:
    """The one array of a ``.npy`` (memory-mapped) or ``.npz`` file (its declared size checked
    before it is decompressed). Object arrays are refused, never unpickled."""
    import zipfile

    try:
        if format_suffix(path) == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(".npy")]
                if len(names) != 1:
                    raise MinerError(f"{path} holds {len(names)} arrays; give a file with one")
                with archive.open(names[0]) as member:
                    shape, dtype = npy_header(member)
            if dtype.hasobject:
                raise MinerError(f"{path} holds an object array; not a numeric volume")
            preflight(f"reading {path}", math.prod(shape) * dtype.itemsize, max_memory)
            with np.load(path, allow_pickle=False) as data:
                array = data[data.files[0]]
    except MinerError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "object" in str(exc).lower():
            raise MinerError(f"{path} holds an object array; not a numeric volume") from None
        raise MinerError(f"could not read {path}: {exc}") from None
    except Exception as exc:  # any parse failure is the file's fault
        raise MinerError(f"could not read {path}: {first_line(exc)}") from None
    check_array(array, path)
    return array


# -- binvox -------------------------------------------------------------------------------


def read_binvox(path: Path, max_memory: int | None = None) -> Volume:
    """A ``.binvox`` occupancy grid (``#binvox 1``, run-length encoded, ``x`` slowest and
    ``y`` fastest as binvox stores it) as ``(1, X, Y, Z)`` uint8; its ``translate`` and
    ``scale`` (the side of the voxelized cube) become the transform."""
    with open(path, "rb") as fh:
        lines = []
        for _ in range(8):
            line = fh.readline(256)
            lines.append(line.strip())
            if line.strip() == b"data":
                break
        body = fh.read() if lines and lines[-1] == b"data" else b""
    try:
        text = [ln.decode("ascii") for ln in lines]
    except UnicodeDecodeError:
        raise MinerError(f"{path} is not a binvox file (no text header)") from None
    if not text or not text[0].startswith("#binvox") or text[-1] != "data":
        raise MinerError(f"{path} is not a binvox file (no '#binvox' ... 'data' header)")
    fields = {ln.split()[0]: ln.split()[1:] for ln in text[1:-1] if ln.split()}
    try:
        dims = tuple(int(v) for v in fields["dim"])
        translate = tuple(float(v) for v in fields.get("translate", ("0", "0", "0")))
        scale = float(fields.get("scale", ("1",))[0])
        if len(dims) != 3 or min(dims) < 1 or max(dims) > 1 << 16 or len(translate) != 3:
            raise ValueError(f"dim {dims}")
    except (KeyError, ValueError, IndexError) as exc:
        raise MinerError(f"binvox file {path} has a malformed header ({exc})") from None
    n = math.prod(dims)
    runs = np.frombuffer(body[: len(body) // 2 * 2], dtype=np.uint8).reshape(-1, 2)
    counts = runs[:, 1].astype(np.int64)
    if int(counts.sum()) != n:
        raise MinerError(
            f"binvox file {path} is truncated or inconsistent: its runs cover "
            f"{int(counts.sum())} voxels, its header says {'x'.join(map(str, dims))}"
        )
    preflight(f"reading the {'x'.join(map(str, dims))} binvox grid {path}", 2 * n, max_memory)
    flat = np.repeat((runs[:, 0] > 0).astype(np.uint8), counts)
    # binvox: index = x * (dz * dy) + z * dy + y
    grid = np.ascontiguousarray(flat.reshape(dims[0], dims[2], dims[1]).transpose(0, 2, 1))
    voxel = scale / max(dims)
    transform = spaced_transform(grid.shape, (voxel,) * 3, translate, path)
    return Volume(grid[None], transform, "binvox")


def write_binvox(path: str | Path, occupancy: np.ndarray, transform: GridTransform | None) -> Path:
    """An ``(X, Y, Z)`` occupancy grid as ``.binvox``, atomically. binvox has cubic voxels and
    no direction: an anisotropic or rotated transform is refused in one line. Memory: the
    grid once more, transposed, and its runs."""
    path = Path(path)
    occupancy = np.asarray(occupancy)
    if occupancy.ndim != 3:
        raise MinerError(f"binvox holds 3D grids; got shape {occupancy.shape}")
    if transform is None:
        translate, voxel = (0.0, 0.0, 0.0), 1.0
    else:
        steps = transform.steps
        if not transform.axis_aligned or not np.allclose(steps, steps[0], rtol=1e-6):
            raise MinerError("binvox stores cubic, axis-aligned voxels; this grid's are not")
        translate, voxel = tuple(transform.origin), float(steps[0])
    flat = occupancy.astype(bool).transpose(0, 2, 1).reshape(-1)
    change = np.flatnonzero(np.diff(flat.view(np.uint8))) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts].astype(np.uint8)
    pieces = -(-lengths // 255)  # runs longer than 255 are split
    out_values = np.repeat(values, pieces)
    out_counts = np.full(int(pieces.sum()), 255, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    out_counts[last] = lengths - 255 * (pieces - 1)
    body = np.stack([out_values, out_counts.astype(np.uint8)], axis=1).tobytes()
    dims = occupancy.shape
    header = (
        f"#binvox 1\ndim {dims[0]} {dims[1]} {dims[2]}\n"
        f"translate {translate[0]!r} {translate[1]!r} {translate[2]!r}\n"
        f"scale {voxel * max(dims)!r}\ndata\n"
    )
    with atomic_write(path) as tmp:
        tmp.write_bytes(header.encode("ascii") + body)
    return path


# -- dispatch -----------------------------------------------------------------------------


def read_volume(path: str | Path, max_memory: int | None = None) -> Volume:
    """A volume file of any :data:`VOLUME_EXTENSIONS` (see the module doc). Arrays with no
    coordinates get ``transform=None``. Samples stored in the other byte order (big-endian
    NRRD, NIfTI or NumPy files) are swapped into memory, after a size check. Raises
    :class:`MinerError` in one line for anything unreadable, empty, of a non-numeric dtype, or
    larger than ``max_memory`` once decoded."""
    volume = _read_volume(check_input_file(path, "volume file"), max_memory)
    if not volume.data.dtype.isnative:
        preflight(f"byte-swapping {path}", volume.data.nbytes, max_memory)
        volume.data = volume.data.astype(volume.data.dtype.newbyteorder("="))
    return volume


def _read_volume(path: Path, max_memory: int | None) -> Volume:
    """A volume file of any :data:`VOLUME_EXTENSIONS` (see the module doc). Arrays with no
    coordinates get ``transform=None``. Raises :class:`MinerError` in one line for anything
    unreadable, empty, of a non-numeric dtype, or larger than ``max_memory`` once decoded."""
    ext = format_suffix(path)
    if ext in ARRAY_EXTENSIONS:
        array = read_array(path, max_memory)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            data = np.moveaxis(array, -1, 0)  # (H, W, 3|4): an image's channels
        else:
            data = array[None]
        return Volume(data, None, "numpy")
    if ext in TIFF_EXTENSIONS:
        return Volume(*read_tiff_stack(path, max_memory))
    if ext == ".binvox":
        return read_binvox(path, max_memory)
    if ext in NIFTI_EXTENSIONS:
        return Volume(*read_nifti(path, max_memory))
    if ext == ".nrrd":
        return Volume(*read_nrrd(path, max_memory))
    if ext in VTK_EXTENSIONS:
        return Volume(*read_vtk(path, max_memory))
    raise MinerError(f"unknown volume format '{ext}' (known: {', '.join(VOLUME_EXTENSIONS)})")


def array_shape(path: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of the one array of a ``.npy`` / ``.npz`` file, or of a TIFF's first
    series, from the header alone (``None`` if it cannot be read)."""
    import zipfile

    path = Path(path)
    try:
        if format_suffix(path) == ".npy":
            with open(path, "rb") as fh:
                return npy_header(fh)
        if format_suffix(path) == ".npz":
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(".npy")]
                if len(names) != 1:
                    return None
                with archive.open(names[0]) as member:
                    return npy_header(member)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(series.shape)
            if series.axes.endswith("S"):
                shape = (*shape[:-1], 1)  # samples per pixel are channels, not an axis
            return shape, series.dtype
    except Exception:  # the reader will say what is wrong
        return None


def image_data(data: np.ndarray, transform: GridTransform):
    """``data`` ``(X, Y, Z)`` or ``(X, Y, Z, C)`` as a PyVista ``ImageData`` (point array
    ``values``, VTK's x-fastest order) placed by ``transform``: spacing, the first sample's
    centre as VTK's origin, and the direction matrix."""
    import pyvista

    shape = data.shape[:3]
    grid = pyvista.ImageData(dimensions=shape, spacing=tuple(transform.steps))
    grid.origin = tuple(transform.sample_affine()[:3, 3])
    grid.direction_matrix = transform.matrix
    channels = 1 if data.ndim == 3 else data.shape[3]
    grid.point_data["values"] = (
        data.reshape(-1, channels, order="F") if channels > 1 else data.ravel("F")
    )
    return grid


def write_volume(
    path: str | Path, data: np.ndarray, transform: GridTransform | None, meta: dict | None = None
) -> Path:
    """``data`` ``(*S)`` or ``(*S, C)`` (3D) to ``path`` in the format its extension names
    (:data:`VOLUME_OUTPUTS`), atomically, with the transform's spacing, origin and direction
    where the format holds them (``.npy`` holds none; ``.tif`` keeps them in its JSON
    description). Memory: the format's encoded copy at most."""
    path = Path(path)
    ext = format_suffix(path)
    if ext not in VOLUME_OUTPUTS:
        choose = ", ".join(VOLUME_OUTPUTS)
        raise MinerError(f"unsupported volume output '{ext or path.name}' (choose from {choose})")
    data = np.asarray(data)
    channels = 1 if data.ndim == 3 else data.shape[3]
    if transform is None:
        transform = GridTransform((0.0,) * 3, 1.0, data.shape[:3])
    if ext == ".mha" and not transform.axis_aligned:  # VTK's MetaImage writer keeps none
        raise MinerError(".mha keeps no direction here: write .nii.gz or .vti")
    with atomic_write(path) as tmp:  # its name ends in ext: the writers pick the format by it
        if ext == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, data, allow_pickle=False)
        elif ext in NIFTI_EXTENSIONS:
            import nibabel

            image = nibabel.Nifti1Image(data, transform.sample_affine())
            image.header.set_xyzt_units("mm")
            nibabel.save(image, os.fspath(tmp))
        elif ext == ".vti":
            image_data(data, transform).save(os.fspath(tmp))
        elif ext == ".mha":  # PyVista has no MetaImage writer
            from vtkmodules.vtkIOImage import vtkMetaImageWriter

            writer = vtkMetaImageWriter()
            writer.SetInputData(image_data(data, transform))
            writer.SetFileName(os.fspath(tmp))
            writer.SetCompression(False)
            writer.Write()
        else:
            import tifffile

            description = {
                "spacing": [float(v) for v in transform.steps],
                "origin": list(transform.origin),
                "miner3d": meta or {},
            }
            tifffile.imwrite(
                tmp,
                data,
                photometric="minisblack" if channels == 1 else None,
                metadata=json.loads(json.dumps(description)),
            )
    return path


def _chunks(data: np.ndarray, budget: int = 1 << 26):
    """``data`` ``(C, *S)`` in slabs along its first spatial axis of about ``budget`` bytes
    (a memory map's pages are read slab by slab)."""
    per = max(1, data[:, :1].nbytes)
    step = max(1, budget // per)
    for start in range(0, data.shape[1], step):
        yield np.asarray(data[:, start : start + step])
        release_pages(data)


def filled_fraction(data: np.ndarray) -> float:
    """The fraction of 1s in a 0/1 array ``(C, *S)``, slab by slab (:func:`_chunks`)."""
    return float(sum(int(np.count_nonzero(c)) for c in _chunks(data))) / max(1, data.size)


def only_zero_one(data: np.ndarray) -> bool:
    """Whether every sample is 0 or 1 (streamed slab by slab)."""
    return all(bool(np.all(chunk <= 1)) for chunk in _chunks(data))


def sample_range(data: np.ndarray, path: Path | str = "the input") -> tuple[float, float]:
    """``(min, max)`` of the samples, streamed slab by slab; a one-line error if any is NaN
    or infinite, or if the volume is constant."""
    lo, hi = math.inf, -math.inf
    for chunk in _chunks(data):
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MinerError(f"{path} holds NaN or infinite samples")
    if hi == lo:
        raise MinerError(f"{path} is constant (every sample is {lo:g}): there is nothing to fit")
    return lo, hi
