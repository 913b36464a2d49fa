"""Levels of detail out of a fitted model: meshes (occupancy) and pictures (images).

Meshes: marching cubes (scikit-image) slab by slab, seams welded.

The reconstruction is produced a slab of planes at a time along axis 0 (neighbouring slabs
share one plane), marching cubes runs on each slab that crosses the level, and the vertices on
the shared planes, computed from identical values by identical arithmetic, are welded. The
result equals marching cubes on the dense grid, without ever holding it. Two sources of slabs:

* the training grid of a level of detail, decoded one layer of blocks at a time (peak memory:
  two layers, ``2 * b * P1 * P2 * 4`` bytes, plus the mesh);
* any other resolution, by querying the continuous model at the new grid's voxel centres
  (peak memory: one slab of points, 16 planes, plus the mesh).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import MinerError
from .grid import resample_transform
from .memory import preflight
from .model import MinerModel

MESH_OUTPUTS = (".ply", ".obj", ".stl", ".glb", ".off")
IMAGE_OUTPUTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def _march_slabs(
    n_planes: int, planes: Callable[[int, int], np.ndarray], thickness: int, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes over slabs ``[lo, lo + thickness + 1)``; vertices in index units."""
    from skimage.measure import marching_cubes as skimage_mc

    verts, faces, n_verts = [], [], 0
    for lo in range(0, n_planes - 1, thickness):
        slab = planes(lo, min(lo + thickness + 1, n_planes))
        if slab.shape[0] >= 2 and slab.min() < level < slab.max():
            v, f, _, _ = skimage_mc(slab, level=level, allow_degenerate=False)
            v = v.astype(np.float64)  # slab-local float32 positions, offset exactly
            v[:, 0] += lo
            verts.append(v)
            faces.append(f + n_verts)
            n_verts += len(v)
    if not verts:
        raise MinerError(f"the reconstruction never crosses the level {level}")
    vertices = np.concatenate(verts)
    triangles = np.concatenate(faces).astype(np.int64)
    # weld the copies of vertices on the planes two slabs share (bitwise identical)
    vertices, inverse = np.unique(vertices, axis=0, return_inverse=True)
    return vertices, inverse.reshape(-1)[triangles]


def _layer(model: MinerModel, scale: int, layer: int, batch: int) -> np.ndarray:
    """Decoded values of one layer of blocks along axis 0: ``(b, *scale_shape[1:])`` float32."""
    from .blocks import scatter_blocks

    layout = model.layout
    per_layer = math.prod(layout.grid(scale)[1:])
    slab = torch.zeros(
        (model.channels, layout.block, *layout.scale_shape(scale)[1:]), device=model.device
    )
    for start in range(0, per_layer, batch):
        first = layer * per_layer + start
        ids = torch.arange(first, first + min(batch, per_layer - start), device=model.device)
        coords = layout.unravel(scale, ids)
        coords[:, 0] = 0
        scatter_blocks(slab, layout.block, coords, model.evaluate_blocks(scale, ids))
    return slab[0].cpu().numpy()


def marching_cubes(
    model: MinerModel,
    scale: float = 0,
    level: float = 0.5,
    batch: int = 256,
    resolution: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface of the model's first channel at ``level``, at level of detail ``scale`` (a
    fractional one is sampled at its coarser level's resolution unless ``resolution`` says).

    Args:
        batch: blocks decoded at once; with the default, extracting a 512^3 model peaks at
            about 230 MB above the model (measured), under half a dense float32 volume.
        resolution: voxels along the longest axis to sample at (default: that scale's own
            grid); the model is continuous, so any resolution can be asked for.

    Returns:
        vertices ``(V, 3)`` float64 in the input's own coordinates (through the model's
        transform, or in full-resolution grid coordinates if it has none), and faces
        ``(F, 3)`` int64, oriented outwards (towards values below ``level``).
    """
    layout = model.layout
    if layout.ndim != 3:
        raise MinerError("marching cubes needs a 3D model")
    if resolution is None and not float(scale).is_integer():  # a blend: queried, not decoded
        resolution = max(8, max(layout.valid_shape(int(scale))))
    what = f"extracting level of detail {scale}"
    if resolution is not None:
        what = f"extracting at resolution {resolution}"
    preflight(what, mesh_bytes(model, scale, resolution))
    if resolution is None:
        valid = layout.valid_shape(scale)
        cache: dict[int, np.ndarray] = {}

        def planes(lo: int, hi: int) -> np.ndarray:
            needed = range(lo // layout.block, (hi - 1) // layout.block + 1)
            for key in [k for k in cache if k not in needed]:
                del cache[key]
            for k in needed:
                if k not in cache:
                    cache[k] = _layer(model, scale, k, batch)
            stacked = np.concatenate([cache[k] for k in needed])
            start = lo - needed[0] * layout.block
            return stacked[start : start + hi - lo, : valid[1], : valid[2]]

        vertices, faces = _march_slabs(valid[0], planes, layout.block, level)
        grid = (vertices + 0.5) * 2**scale  # sample i of scale j is at (i + 0.5) * 2^j
    else:
        sampling = resample_transform(layout.shape, resolution)

        def planes(lo: int, hi: int) -> np.ndarray:
            idx = np.meshgrid(
                np.arange(lo, hi), *(np.arange(n) for n in sampling.shape[1:]), indexing="ij"
            )
            points = np.stack([i.reshape(-1) for i in idx], axis=1) + 0.5
            values = model.query(sampling.grid_to_world(points), grid_coords=True, from_scale=scale)
            return values[:, 0].reshape(hi - lo, *sampling.shape[1:]).cpu().numpy()

        vertices, faces = _march_slabs(sampling.shape[0], planes, 16, level)
        grid = sampling.grid_to_world(vertices + 0.5)
    vertices = model.transform.grid_to_world(grid) if model.transform is not None else grid
    if _signed_volume(vertices, faces) < 0:
        faces = faces[:, ::-1].copy()
    return vertices, faces


FACE_BYTES = 280
"""Peak bytes per triangle of :func:`marching_cubes`'s outputs and their temporaries
(skimage's lists, float64 vertices, int64 faces, welding, orientation; measured 270 to 370
on Lucy's own grids)."""
POINT_BYTES = 200
"""Peak bytes per query point of a slab at another resolution (float64 positions, the
neighbours' indices and weights, values; measured 190 to 240)."""
PIXEL_BYTES = 145
"""Peak bytes per query point of a band of a 2D rendering at another size (float64
positions, the four neighbours' indices and weights, values; measured 128 to 157 per point
of 2^20-point bands, RGB, with the heap tuned as a fit leaves it)."""


def predicted_faces(model: MinerModel, scale: float = 0, resolution: int | None = None) -> int:
    """Triangles marching cubes will make at level of detail ``scale`` (at ``resolution``
    voxels along the longest axis, or on the scale's own grid). Occupancy: the surface
    crosses the blocks that kept an MLP, about 2.7 triangles per sample of a block's face
    (``2.7 * mlp_blocks * b^2``, measured 2.6 to 2.8 on Lucy at 128 and 256), scaled by the
    square of the resolution; the finest scale with MLPs stands in for one without. Other
    kinds (a level surface of a volume): as if it were the grid's bounding box. A fractional
    level counts as the finer one it blends."""
    layout = model.layout
    scale = int(scale)
    own = max(layout.valid_shape(scale))
    ratio = (resolution or own) / own
    if model.kind != "occupancy":
        area = sum(math.prod(layout.valid_shape(scale)) / n for n in layout.valid_shape(scale))
        return int(2 * 2 * area * ratio**2)
    for k in range(scale, layout.n_scales):
        if model.mlp_blocks(k):
            samples = model.mlp_blocks(k) * (layout.block << (k - scale)) ** 2
            return int(2.7 * samples * ratio**2)
    return 0


def mesh_bytes(model: MinerModel, scale: float = 0, resolution: int | None = None) -> int:
    """Estimated peak bytes of :func:`marching_cubes` above the loaded model: the coarse
    fields, two layers of decoded blocks (own grid; four with marching cubes' own buffers) or
    one slab of 17 planes of query points (another resolution, :data:`POINT_BYTES` each),
    and the mesh (:func:`predicted_faces` at :data:`FACE_BYTES`), plus 16 MiB. Measured peak
    RSS increase against this, Lucy fitted at 128 and 256 (``tests/test_memory_estimates.py``
    checks 384 and 640 within 25 %): 0.92 to 1.11 from 384 to 640 voxels; on the 128 model's
    own grid 0.5 (16 MiB of 30), where the fixed term dominates."""
    layout = model.layout
    if resolution is None:
        slab = 4 * layout.block * math.prod(layout.scale_shape(scale)[1:]) * 4
    else:
        slab = 17 * math.prod(resample_transform(layout.shape, resolution).shape[1:]) * POINT_BYTES
    mesh = predicted_faces(model, scale, resolution) * FACE_BYTES
    return model.field_bytes() + slab + mesh + (16 << 20)


def image_bytes(
    model: MinerModel,
    scale: int = 0,
    size: tuple[int, int] | None = None,
    dtype: np.dtype | type = np.uint8,
    band: int = 1 << 20,
    off_grid: bool = False,
) -> int:
    """Estimated peak bytes of :func:`render_image` above the loaded model: the output, the
    coarse fields, and one band of work: ``band`` query points at :data:`PIXEL_BYTES` each
    when rendering at another size, or ``band`` decoded samples of float32 with their
    temporaries on the level's own grid; off the grid, also one chunk of ``2^16`` gathered
    MLPs (see :func:`miner3d.sampling.query`). Measured peak RSS increase against this, RGB
    renderings of a 256^2 model at 2048^2 to 8192^2 (``tests/test_memory_estimates.py``
    checks 4096 and 8192 within 25 %): 0.91 to 1.05."""
    height, width = model.layout.valid_shape(scale) if size is None else size
    out = height * width * model.channels * np.dtype(dtype).itemsize
    work = band * PIXEL_BYTES if size is not None else band * 4 * 8
    if off_grid and model.scales[0] is not None:
        work += (1 << 16) * model.scales[0].bank.shape.params_per_block * 4
    return out + model.field_bytes() + work


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def save_mesh(vertices: np.ndarray, faces: np.ndarray, path: str | Path) -> Path:
    """Write a mesh atomically; the format follows the extension (.ply .obj .stl .glb .off)."""
    import trimesh

    from .io import atomic_write

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MESH_OUTPUTS:
        raise MinerError(f"unsupported mesh output '{ext}' (choose from {', '.join(MESH_OUTPUTS)})")
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    with atomic_write(path) as tmp:
        mesh.export(tmp, file_type=ext[1:])
    return path


def render_image(
    model,
    scale: float | None = 0,
    size: tuple[int, int] | None = None,
    dtype: np.dtype | type = np.uint8,
    band: int = 1 << 20,
    off_grid: bool = False,
) -> np.ndarray:
    """A 2D model's level of detail ``scale`` as an integer image.

    Args:
        model: a 2D :class:`~miner3d.model.MinerModel`.
        scale: level of detail (0: finest), fractional allowed (:mod:`miner3d.sampling`);
            ``None``: the level whose sample spacing matches ``size`` (an anti-aliased
            minification, as a mipmap; the finest level when enlarging).
        size: ``(H, W)`` to render at by querying the continuous model at the output pixels'
            centres; ``None``: the level's own grid (of ``floor(scale)`` for a fractional
            one), decoded block batch by block batch for an integer level.
        dtype: ``np.uint8`` or ``np.uint16`` (values clipped to ``[0, 1]`` and rounded), or
            ``np.float32`` (clipped to ``[0, 1]``).
        band: samples evaluated per step.
        off_grid: evaluate the finest scale's MLPs at the output pixels' centres.

    Returns:
        ``(H, W, C)``, or ``(H, W)`` for one channel. Memory: the output in ``dtype`` plus one
        step of float32 (no float copy of the whole image).
    """
    from .sampling import auto_lod

    layout, channels = model.layout, model.channels
    if scale is None:
        scale = 0 if size is None else auto_lod(layout.shape, size, layout.n_scales)
    own = layout.valid_shape(int(scale))
    if size is None and (off_grid or not float(scale).is_integer()):
        size = tuple(own)
    height, width = own if size is None else size
    if height < 1 or width < 1:
        raise MinerError(f"an image size must be at least 1 x 1, got {width} x {height}")
    needed = image_bytes(model, int(scale), size, dtype, band, off_grid)
    preflight(f"rendering a {width} x {height} image", needed)
    floating = np.issubdtype(dtype, np.floating)
    top = 1.0 if floating else np.iinfo(dtype).max

    def quantize(values) -> np.ndarray:
        values = values.clamp(0, 1).cpu().numpy()
        return values.astype(dtype) if floating else np.rint(values * top).astype(dtype)

    out = np.empty((height, width, channels), dtype=dtype)
    if size is None:
        b = layout.block
        batch = max(1, band // (channels * b * b))
        for ids, values in model.iter_blocks(int(scale), batch=batch):
            block = quantize(values).transpose(0, 2, 3, 1)  # (n, b, b, C)
            for (r, c), tile in zip(layout.unravel(int(scale), ids).tolist(), block, strict=True):
                rows, cols = min(b, height - r * b), min(b, width - c * b)
                if rows > 0 and cols > 0:
                    out[r * b : r * b + rows, c * b : c * b + cols] = tile[:rows, :cols]
    else:
        cols = (np.arange(width) + 0.5) * layout.shape[1] / width
        step = max(1, band // width)
        for r0 in range(0, height, step):
            rows = (np.arange(r0, min(r0 + step, height)) + 0.5) * layout.shape[0] / height
            grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
            values = model.query(grid, grid_coords=True, from_scale=scale, off_grid=off_grid)
            out[r0 : r0 + len(rows)] = quantize(values).reshape(len(rows), width, channels)
    return out[..., 0] if channels == 1 else out


def save_image(
    model,
    path: Path,
    scale: float | None = 0,
    size: tuple[int, int] | None = None,
    off_grid: bool = False,
) -> Path:
    """Write :func:`render_image` as an 8- or 16-bit picture (16-bit if the fitted image was)
    atomically; the format follows the extension (:data:`IMAGE_OUTPUTS`)."""
    import imageio.v3 as iio

    from .io import atomic_write

    path = Path(path)
    if path.suffix.lower() not in IMAGE_OUTPUTS:
        choose = ", ".join(IMAGE_OUTPUTS)
        raise MinerError(
            f"unsupported image output '{path.suffix or path.name}' (choose from {choose})"
        )

    dtype = np.uint16 if model.meta.get("dtype") == "uint16" else np.uint8
    if path.suffix.lower() in (".jpg", ".jpeg"):
        if model.channels not in (1, 3):
            raise MinerError(
                f"JPEG holds gray or RGB images; this model has {model.channels} channels "
                "(use .png or .tif)"
            )
        dtype = np.uint8  # JPEG is 8-bit
    array = render_image(model, scale, size, dtype, off_grid=off_grid)
    with atomic_write(path) as tmp:
        iio.imwrite(tmp, array, extension=path.suffix.lower())
    return path
