"""Reading meshes and images, and writing files safely.

Meshes are read with trimesh (PLY, OBJ, STL, OFF, GLB/GLTF; scenes are flattened into one
mesh in world coordinates); images with scikit-image, uncompressed TIFFs memory-mapped with
tifffile. Every output file is written atomically: to a temporary file in
the destination folder, then renamed, so an interrupted or failed write never leaves a
partial file or destroys what was there before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import MinerError, first_line

MESH_EXTENSIONS = (".ply", ".obj", ".stl", ".off", ".glb", ".gltf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def format_suffix(path: str | Path) -> str:
    """The extension that names a file's format, lower case (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name ends in ``.tmp`` and the destination's format suffix
    (``.x.nii.gz.k3j9.tmp.nii.gz``), so writers that choose a format by the name (nibabel,
    VTK, ffmpeg) write the right one. The temporary file is removed if the block raises.
    Raises :class:`MinerError` if the destination folder cannot be written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tail = ".tmp" + format_suffix(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=tail, dir=folder)
    except OSError as exc:
        raise MinerError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and a writer may have replaced the file: give what open() would
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_input_file(path: str | Path, what: str = "input") -> Path:
    """``path`` if it is a regular, readable file; a one-line error otherwise (missing, a
    directory, a FIFO or device, which would hang or fail later, or unreadable)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MinerError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise MinerError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise MinerError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise MinerError(f"{path} is not a regular file (a pipe or a device?)")
    if not os.access(path, os.R_OK):
        raise MinerError(f"cannot read {path}: permission denied")
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(check_input_file(path), "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise MinerError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the ``.npy`` array whose header ``fh`` is at (an open file or zip
    member), reading nothing else: for size checks before an array is loaded."""
    version = np.lib.format.read_magic(fh)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read(fh)
    return tuple(shape), dtype


def load_mesh(path: str | Path):  # -> trimesh.Trimesh
    """Read a triangle mesh with trimesh, flattening scenes; raise :class:`MinerError` on bad input.

    Returns a ``trimesh.Trimesh`` (processing off: vertices and faces as stored, float64).
    """
    import trimesh

    path = check_input_file(path, "mesh file")
    ext = path.suffix.lower()
    if ext not in MESH_EXTENSIONS:
        supported = ", ".join(MESH_EXTENSIONS)
        raise MinerError(f"unsupported mesh format '{ext or path.name}' (supported: {supported})")
    try:
        # trimesh.load(force="mesh") is ~10x slower on big meshes: flatten scenes ourselves
        loaded = trimesh.load(path, process=False)
        if isinstance(loaded, trimesh.Scene):
            loaded = loaded.to_mesh()
    except Exception as exc:  # trimesh raises many types
        raise MinerError(f"could not read mesh {path}: {first_line(exc)}") from None
    if isinstance(loaded, list | tuple) or not hasattr(loaded, "faces"):
        raise MinerError(f"could not read a triangle mesh from {path}")
    faces = np.asarray(loaded.faces)
    vertices = np.asarray(loaded.vertices)
    if faces.size == 0 or vertices.size == 0:
        raise MinerError(f"mesh {path} has no triangles")
    if not np.all(np.isfinite(vertices)):
        raise MinerError(f"mesh {path} has non-finite vertex coordinates")
    with np.errstate(over="ignore"):
        extent = vertices.max(axis=0) - vertices.min(axis=0)
    if not np.all(np.isfinite(extent)) or float(np.abs(vertices).max()) > 1e150:
        raise MinerError(f"mesh {path} has coordinates too large to voxelize (beyond 1e150)")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MinerError(f"mesh {path} has faces that index missing vertices")
    return loaded


def write_safetensors(path: str | Path, tensors: dict, key: str, header: dict) -> Path:
    """Tensors to ``path`` (safetensors, atomically) with ``header`` as JSON under metadata
    ``key``: loads on any future PyTorch, unlike pickled checkpoints."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata={key: json.dumps(header)})
    return path


def safetensors_bytes(tensors: dict, key: str, header: dict) -> bytes:
    """What :func:`write_safetensors` would write, in memory."""
    import json

    from safetensors.torch import save

    return save(tensors, metadata={key: json.dumps(header)})


def read_safetensors(path: str | Path, key: str, what: str) -> tuple[dict, dict]:
    """``(header, tensors)`` of a file written by :func:`write_safetensors`; a clear
    :class:`MinerError` naming ``what`` when it is missing or not such a file."""
    import json

    from safetensors import safe_open

    path = check_input_file(path, f"{what} file")
    # one open file for the header and every tensor: safetensors reopens by name, and a
    # writer that renames a new file into place between two reads would mix two files
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise MinerError(f"cannot read {path}: {exc.strerror or exc}") from None
    pinned = f"/proc/self/fd/{fd}"
    try:
        name = pinned if os.path.exists(pinned) else os.fspath(path)
        with safe_open(name, framework="pt", device="cpu") as fh:
            header = json.loads(fh.metadata()[key])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # any parse failure is the file's fault
        raise MinerError(f"could not read {what} {path}: {exc}") from None
    finally:
        os.close(fd)
    return header, tensors


def map_tiff(path: Path) -> np.ndarray | None:
    """An uncompressed, contiguous single-image TIFF as a read-only memory map ``(C, H, W)``
    (a view: nothing is read until the fit asks for blocks), or ``None`` when the file cannot
    be mapped (compressed, tiled, several pages, not a TIFF): it is then decoded instead."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        mapped = tifffile.memmap(path, mode="r")
    except Exception:  # not mappable: the decoder reports what is wrong, if anything
        return None
    if axes == "YX":
        return mapped[None]
    if axes == "YXS":
        return np.moveaxis(mapped, -1, 0)
    if axes == "SYX":
        return mapped
    return None


def _decoded_bytes(path: Path) -> tuple[int, str] | None:
    """Bytes an image decodes to, from its header alone (``None`` if the header cannot
    say): PIL for PNG/JPEG, tifffile for TIFF."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, itemsize = tuple(series.shape), series.dtype.itemsize
        else:
            from PIL import Image

            with Image.open(path) as im:
                shape = (*im.size, len(im.getbands()))
                itemsize = 2 if im.mode.startswith("I;16") or im.mode in ("I", "F") else 1
                itemsize = 4 if im.mode in ("I", "F") else itemsize
    except Exception:  # the decoder will say what is wrong
        return None
    return int(np.prod(shape)) * itemsize, "x".join(map(str, shape))


def read_image(path: str | Path, max_memory: int | None = None) -> tuple[np.ndarray, bool]:
    """An image file as ``(C, H, W)`` in its own dtype, and whether it is memory-mapped.

    Uncompressed TIFFs are memory-mapped (:func:`map_tiff`, no memory); anything else is
    decoded (``H * W * C`` samples in the file's dtype, and a channels-first copy): its size
    is read from the header and checked against ``max_memory`` (default: the memory
    available) before decoding, so any size that fits is read and none that does not is
    tried. Raises :class:`MinerError` for a missing or undecodable file, or one that is not
    ``(H, W)`` / ``(H, W, C)``.
    """
    from PIL import Image
    from skimage import io as skio

    from .memory import preflight

    path = check_input_file(path, "image file")
    image = map_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else None
    mapped = image is not None
    if image is None:
        bomb_guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sized below
        try:
            size = _decoded_bytes(path)
            if size is not None:
                preflight(f"decoding the {size[1]} image {path}", 2 * size[0], max_memory)
            image = np.asarray(skio.imread(path))
        except MinerError:
            raise
        except Exception as exc:  # any decoder failure is the file's fault
            raise MinerError(f"could not read image {path}: {first_line(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_guard
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3:
            image = np.ascontiguousarray(np.moveaxis(image, -1, 0))
        else:
            raise MinerError(f"image {path} has shape {image.shape}; expected (H, W) or (H, W, C)")
    if not (image.dtype in (np.uint8, np.uint16) or np.issubdtype(image.dtype, np.floating)):
        raise MinerError(f"image {path} has unsupported sample type {image.dtype}")
    return image, mapped
