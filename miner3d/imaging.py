"""NIfTI, VTK image data, MetaImage, NRRD and TIFF-stack files: the formats of medical and
scientific imaging, read through nibabel (NIfTI), VTK's readers (PyVista), tifffile and our
own NRRD reader, each returning ``(data (C, *S), transform, format)`` for
:class:`~miner3d.volumes.Volume`. Headers are
parsed first, so that the declared size is checked against the memory budget, and a detached
``.raw`` file's presence and size, before any reader allocates.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import MinerError, first_line
from .grid import GridTransform
from .io import format_suffix
from .memory import preflight

MAX_CHANNELS = 4
SAMPLE_TYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32")
SAMPLE_TYPES += ("float64", "int64", "uint64", "float16")


def spaced_transform(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    path: str | Path,
) -> GridTransform:
    """The axis-aligned transform of a file that states per-axis spacing and an origin (the
    corner of voxel 0); a one-line error naming ``path`` if they are not usable."""
    try:
        return GridTransform.from_dict(
            {"origin": origin, "voxel_size": max(spacing), "shape": shape, "spacing": spacing}
        )
    except (ValueError, TypeError) as exc:
        raise MinerError(f"{path}: its spacing or origin is not usable ({exc})") from None


def check_array(array: np.ndarray, path: Path) -> None:
    """A one-line error unless ``array`` holds numeric samples and is not empty."""
    if array.dtype.hasobject or array.dtype.name not in SAMPLE_TYPES:
        raise MinerError(f"{path} holds samples of type {array.dtype}; not a numeric volume")
    if array.size == 0:
        raise MinerError(f"{path} holds an empty array of shape {array.shape}")


# -- NIfTI --------------------------------------------------------------------------------


def read_nifti(path: Path, max_memory: int | None = None) -> tuple:
    """A NIfTI-1/2 file through nibabel: 3D, or 4D/5D with up to 4 components per voxel
    (fitted as channels); a time series is refused. Uncompressed unscaled files are
    memory-mapped; others are decoded after a size check. The affine is the sform if set,
    else the qform (nibabel's choice), in RAS+ millimetres."""
    import nibabel

    try:
        image = nibabel.load(os.fspath(path))
        shape = tuple(int(n) for n in image.shape)
        dtype = np.dtype(image.get_data_dtype())
        affine = np.asarray(image.affine)
    except Exception as exc:  # any parse failure is the file's fault
        raise MinerError(f"could not read NIfTI file {path}: {first_line(exc)}") from None
    spatial = shape[:3]
    extra = [n for n in shape[3:] if n != 1]
    if len(spatial) < 3:
        raise MinerError(f"{path} is {len(shape)}D; a volume is 3D")
    if len(extra) > 1 or (extra and extra[0] > MAX_CHANNELS):
        raise MinerError(
            f"{path} is a series of shape {shape}: a volume is 3D, or 4D with at most "
            f"{MAX_CHANNELS} components per voxel (fit one volume of the series)"
        )
    channels = extra[0] if extra else 1
    proxy = image.dataobj
    scaled = not (
        getattr(proxy, "slope", 1.0) in (1.0, None) and getattr(proxy, "inter", 0.0) in (0.0, None)
    )
    itemsize = 4 if scaled else dtype.itemsize
    preflight(f"reading {path}", math.prod(spatial) * channels * itemsize, max_memory)
    try:
        array = np.asarray(proxy) if scaled else proxy.get_unscaled()
    except Exception as exc:
        raise MinerError(f"could not read NIfTI file {path}: {first_line(exc)}") from None
    array = array.reshape(*spatial, channels)
    if scaled and array.dtype == np.float64:
        array = array.astype(np.float32)
    check_array(array, path)
    try:
        transform = GridTransform.from_affine(affine, spatial)
    except ValueError as exc:
        raise MinerError(f"NIfTI file {path}: {exc}") from None
    return np.moveaxis(array, -1, 0), transform, "nifti"


# -- NRRD (our reader), VTK image data and MetaImage (VTK's) ------------------------------

_MET_TYPES = {
    "MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4,
    "MET_INT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_ULONG": 8, "MET_LONG": 8,
    "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8,
}  # fmt: skip
_NRRD_TYPES = {
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1", "signed char": "i1",
    "int8": "i1", "int8_t": "i1", "char": "i1", "short": "i2", "short int": "i2",
    "signed short": "i2", "int16": "i2", "int16_t": "i2", "ushort": "u2",
    "unsigned short": "u2", "uint16": "u2", "uint16_t": "u2", "int": "i4", "signed int": "i4",
    "int32": "i4", "int32_t": "i4", "uint": "u4", "unsigned int": "u4", "uint32": "u4",
    "uint32_t": "u4", "longlong": "i8", "long long": "i8", "int64": "i8", "int64_t": "i8",
    "ulonglong": "u8", "unsigned long long": "u8", "uint64": "u8", "uint64_t": "u8",
    "float": "f4", "double": "f8",
}  # fmt: skip


def _vector(text: str) -> list[float] | None:
    """``(a,b,c)`` as floats; ``none`` as ``None``."""
    text = text.strip()
    if text.lower() == "none":
        return None
    return [float(v) for v in text.strip("()").split(",")]


def read_nrrd(path: Path, max_memory: int | None = None) -> tuple:
    """An NRRD file (attached or one detached data file; raw, gzip or ascii encoding) with
    our own reader: VTK's takes a first axis of fewer than 10 samples for components. Axes
    are fastest first, as NRRD stores them; a non-spatial first axis (``space directions``
    ``none``) of up to 4 samples holds channels. ``space origin`` is the first sample's
    centre. Raw data is memory-mapped."""
    import gzip

    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD000") or end < 0:
        raise MinerError(f"{path} is not an NRRD file (no 'NRRD000x' header)")
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and not value.startswith("="):
            fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        dtype = np.dtype(_NRRD_TYPES[fields["type"].lower()])
        if fields.get("endian", "little").lower() == "big":
            dtype = dtype.newbyteorder(">")
        encoding = fields.get("encoding", "raw").lower()
        directions = re.findall(r"\([^)]*\)|none", fields.get("space directions", ""))
        vectors = [_vector(v) for v in directions]
        skip = int(fields.get("byte skip", "0"))
    except (KeyError, ValueError) as exc:
        raise MinerError(f"NRRD file {path} has a malformed header ({exc})") from None
    if (
        not sizes
        or min(sizes) < 1
        or skip < 0
        or encoding not in ("raw", "gzip", "gz", "ascii", "text", "txt")
    ):
        raise MinerError(
            f"NRRD file {path}: unsupported header (sizes, encoding {encoding} or byte skip)"
        )
    channels_first = len(sizes) == 4 or (vectors and vectors[0] is None)
    spatial = sizes[1:] if channels_first else sizes
    if len(spatial) != 3 or (channels_first and sizes[0] > MAX_CHANNELS):
        raise MinerError(
            f"{path} has axes of sizes {sizes}: a volume is 3D, at most {MAX_CHANNELS} components"
        )
    size = math.prod(sizes) * dtype.itemsize
    preflight(f"reading {path}", size, max_memory)
    detached = fields.get("data file") or fields.get("datafile")
    source, offset = (path.parent / detached, skip) if detached else (path, end + 2 + skip)
    if detached and not source.is_file():
        raise MinerError(f"{path} names its samples' file {detached}, which is missing")
    shape = tuple(sizes[::-1])
    try:
        if encoding == "raw":
            if source.stat().st_size - offset < size:
                raise MinerError(f"{source} holds fewer bytes than the {size} {path} declares")
            flat = np.memmap(source, dtype=dtype, mode="r", offset=offset, shape=shape)
        else:
            with open(source, "rb") as fh:
                fh.seek(offset)
                raw = fh.read()
            if encoding in ("gzip", "gz"):
                flat = np.frombuffer(gzip.decompress(raw), dtype=dtype)
            else:
                flat = np.array(raw.split(), dtype=dtype)
            if flat.size != math.prod(sizes):
                raise MinerError(f"{path} holds {flat.size} samples; its header says {sizes}")
            flat = flat.reshape(shape)
    except MinerError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise MinerError(f"could not read NRRD file {path}: {exc}") from None
    array = flat.transpose()  # (fastest, ..., slowest) = (C?, x, y, z): a view
    array = array if channels_first else array[None]
    check_array(array, path)
    spatial_vectors = [v for v in vectors if v is not None]
    affine = np.eye(4)
    if len(spatial_vectors) == 3:
        affine[:3, :3] = np.asarray(spatial_vectors).T
        affine[:3, 3] = _vector(fields.get("space origin", "(0,0,0)")) or (0, 0, 0)
    elif "spacings" in fields:
        steps = [float(v) for v in fields["spacings"].split() if v.lower() != "nan"]
        affine[:3, :3] = np.diag(steps[-3:])
    try:
        transform = GridTransform.from_affine(affine, tuple(spatial))
    except ValueError as exc:
        raise MinerError(f"{path}: {exc}") from None
    return array, transform, "nrrd"


def _text_header(path: Path, end: bytes, limit: int = 1 << 16) -> list[str]:
    with open(path, "rb") as fh:
        raw = fh.read(limit)
    if end in raw:
        raw = raw[: raw.index(end)]
    return raw.decode("latin-1").splitlines()


def _declared_bytes(path: Path) -> int | None:
    """Bytes of samples a MetaImage or VTI header declares (``None``: it does not say), after
    checking that a MetaImage's detached ``.raw`` exists and is large enough."""
    ext = format_suffix(path)
    if ext in (".mha", ".mhd"):
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        match = re.search(rb"ElementDataFile\s*=\s*([^\r\n]*)", head)
        fields = {}
        for line in head[: match.start() if match else None].decode("latin-1").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip()
        try:
            dims = [int(v) for v in fields["DimSize"].split()]
            itemsize = _MET_TYPES[fields["ElementType"].upper()]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
        except (KeyError, ValueError) as exc:
            raise MinerError(f"MetaImage file {path} has a malformed header ({exc})") from None
        if not dims or min(dims) < 1 or channels < 1 or match is None:
            raise MinerError(f"MetaImage file {path} has a malformed header")
        size = math.prod(dims) * itemsize * channels
        data_file = match.group(1).decode("latin-1").strip()
        compressed = fields.get("CompressedData", "False").lower() == "true"
        if data_file != "LOCAL":
            raw = path.parent / data_file
            if not raw.is_file():
                raise MinerError(f"{path} names its samples' file {data_file}, which is missing")
            if not compressed and raw.stat().st_size < size:
                raise MinerError(
                    f"{raw} holds {raw.stat().st_size} bytes; {path} declares "
                    f"{'x'.join(map(str, dims))} samples of {itemsize} bytes ({size} bytes)"
                )
        return size
    if ext == ".vti":
        text = "\n".join(_text_header(path, b"<AppendedData"))
        extent = re.search(r'WholeExtent\s*=\s*"([^"]*)"', text)
        if extent is None:
            raise MinerError(f"{path} is not a VTK image data file (no WholeExtent)")
        try:
            e = [int(v) for v in extent.group(1).split()]
            comps = re.findall(r'NumberOfComponents\s*=\s*"(\d+)"', text)
            channels = max([int(c) for c in comps] or [1])
        except ValueError:
            raise MinerError(f"{path} has a malformed WholeExtent") from None
        dims = [e[2 * a + 1] - e[2 * a] + 1 for a in range(len(e) // 2)]
        return math.prod(max(1, n) for n in dims) * channels * 8
    return None


def read_vtk(path: Path, max_memory: int | None = None) -> tuple:
    """A ``.vti``, ``.mha`` or ``.mhd`` file through VTK's readers (PyVista): its
    one point array (up to 4 components) as ``(C, X, Y, Z)`` (VTK's x-fastest order seen as a
    view), with its spacing, origin and direction matrix. The header's size is checked (and a
    detached ``.raw`` file's presence and size) before VTK reads."""
    import pyvista

    declared = _declared_bytes(path)
    if declared is not None:
        preflight(f"reading {path}", 2 * declared, max_memory)
    from vtkmodules.vtkCommonCore import vtkObject

    vtkObject.GlobalWarningDisplayOff()  # VTK's own messages would bypass our one-line errors
    try:
        data = pyvista.read(os.fspath(path))
    except Exception as exc:  # VTK readers raise many types
        raise MinerError(f"could not read {path}: {first_line(exc)}") from None
    dims = tuple(int(n) for n in getattr(data, "dimensions", ()))
    names = list(getattr(data, "point_data", {}).keys())
    if len(dims) != 3 or not names or data.n_points != math.prod(dims) or data.n_points == 0:
        raise MinerError(f"could not read image data from {path} (empty or unreadable)")
    values = np.asarray(data.point_data[names[0]])
    channels = 1 if values.ndim == 1 else values.shape[1]
    if channels > MAX_CHANNELS:
        raise MinerError(f"{path} has {channels} components per sample; at most {MAX_CHANNELS}")
    shape = dims if dims[2] > 1 else dims[:2]  # a single slice is an image
    array = values.reshape((*shape, channels), order="F")
    check_array(array, path)
    affine = np.eye(len(shape) + 1)
    matrix = np.asarray(getattr(data, "direction_matrix", np.eye(3)))[: len(shape), : len(shape)]
    affine[:-1, :-1] = matrix * np.asarray(data.spacing)[: len(shape)]
    affine[:-1, -1] = np.asarray(data.origin)[: len(shape)]
    try:
        transform = GridTransform.from_affine(affine, shape)
    except ValueError as exc:
        raise MinerError(f"{path}: {exc}") from None
    return np.moveaxis(array, -1, 0), transform, format_suffix(path)[1:]


# -- TIFF stacks --------------------------------------------------------------------------


def _tiff_spacing(tif, ndim: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Spacing and origin of a TIFF stack: our own JSON description, else ImageJ's
    ``spacing`` (axis 0) with the X/Y resolution tags (axes 2 and 1)."""
    meta = tif.shaped_metadata[0] if tif.shaped_metadata else None
    if isinstance(meta, dict) and "spacing" in meta:
        spacing = tuple(float(v) for v in meta["spacing"])
        origin = tuple(float(v) for v in meta.get("origin", (0.0,) * ndim))
        return spacing, origin
    ij = tif.imagej_metadata or {}
    if ndim != 3 or "spacing" not in ij:
        return None, None
    page = tif.pages[0]
    steps = []
    for tag in ("YResolution", "XResolution"):
        value = page.tags.get(tag)
        num, den = value.value if value is not None else (1, 1)
        steps.append(den / num if num else 1.0)
    return (float(ij["spacing"]), *steps), None


def read_tiff_stack(path: Path, max_memory: int | None = None) -> tuple:
    """A multi-page TIFF ``(pages, H, W)``, or ``(pages, H, W, C)`` with ``C <= 4`` samples,
    memory-mapped when uncompressed and contiguous, decoded otherwise (its size checked
    first)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, series.axes
            spacing, origin = _tiff_spacing(tif, 3)
        channels_last = axes.endswith("S") and len(shape) == 4
        if len(shape) - channels_last != 3:
            raise MinerError(f"{path} is not a 3D stack (axes {axes}, shape {shape})")
        try:
            array = tifffile.memmap(path, mode="r")
        except Exception:  # compressed or tiled: decoded
            preflight(f"decoding {path}", math.prod(shape) * dtype.itemsize, max_memory)
            array = tifffile.imread(path)
        array = array.reshape(shape)
    except MinerError:
        raise
    except Exception as exc:  # any decoder failure is the file's fault
        raise MinerError(f"could not read TIFF stack {path}: {first_line(exc)}") from None
    check_array(array, path)
    data = np.moveaxis(array, -1, 0) if channels_last else array[None]
    transform = None
    if spacing is not None:
        transform = spaced_transform(data.shape[1:], spacing, origin or (0.0,) * 3, path)
    return data, transform, "tiff"
