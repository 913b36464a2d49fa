"""Dense volumes out of a fitted volume model, in the input's own units and coordinates.

A volume model fits ``(raw - value_offset) * value_scale`` (:mod:`miner3d.kinds`); every
function here maps back, so that what is written has the input's values: a CT volume comes
back in Hounsfield units, a distance field in its own length unit. Isosurfaces of a volume
model are :func:`miner3d.extract.marching_cubes` at :func:`fitted_level`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import MinerError
from .grid import GridTransform, resample_transform
from .memory import preflight
from .model import MinerModel


def value_map(model: MinerModel) -> tuple[float, float]:
    """``(value_scale, value_offset)`` of the model: input = fitted / scale + offset."""
    scale = float(model.meta.get("value_scale", 1.0)) or 1.0
    return scale, float(model.meta.get("value_offset", 0.0))


def to_input_units(model: MinerModel, values: np.ndarray) -> np.ndarray:
    """Fitted values (any shape, float32) in the input's units, in place where possible."""
    scale, offset = value_map(model)
    if scale != 1.0:
        values /= scale
    if offset:
        values += offset
    return values


def fitted_level(model: MinerModel, level: float) -> float:
    """An isosurface level in the input's units as the model's fitted value."""
    scale, offset = value_map(model)
    return (level - offset) * scale


def output_shape(model: MinerModel, resolution: int | None) -> tuple[int, ...]:
    """The grid a dense output is sampled on: the input's own shape, or ``resolution``
    samples along its longest axis (the aspect kept)."""
    layout = model.layout
    return (
        layout.shape if resolution is None else resample_transform(layout.shape, resolution).shape
    )


def output_transform(model: MinerModel, shape: tuple[int, ...]) -> GridTransform:
    """The input-coordinate transform of a dense output of ``shape`` over the model's box."""
    layout = model.layout
    base = model.transform or GridTransform((0.0,) * layout.ndim, 1.0, layout.shape)
    return base if tuple(shape) == tuple(base.shape) else base.with_shape(shape)


def volume_bytes(model: MinerModel, shape: tuple[int, ...], band: int = 1 << 20) -> int:
    """Estimated peak bytes of :func:`render_volume` above the loaded model: the float32
    output, the coarse fields, and one band of ``band`` samples of work (query points at about
    200 bytes each)."""
    return math.prod(shape) * model.channels * 4 + model.field_bytes() + band * 200


def render_volume(
    model: MinerModel,
    scale: float | None = 0,
    resolution: int | None = None,
    band: int = 1 << 20,
) -> np.ndarray:
    """Level of detail ``scale`` as a dense float32 array in the input's units.

    Args:
        scale: level of detail (0: finest; a coarser level is sampled on the full grid, its
            coarse scales interpolated, as :meth:`~miner3d.model.MinerModel.query` does),
            fractional allowed (:mod:`miner3d.sampling`); ``None``: the level whose sample
            spacing matches the output (anti-aliased when coarser, as a mipmap).
        resolution: samples along the longest axis (default: the input's own shape).
        band: samples evaluated per step.

    Returns:
        ``(X, Y, Z)``, or ``(X, Y, Z, C)`` for several channels. Memory: the output (4 bytes
        per sample and channel) plus one band of work (:func:`volume_bytes`).
    """
    from .sampling import auto_lod

    layout, channels = model.layout, model.channels
    if layout.ndim != 3:
        raise MinerError("a dense volume needs a 3D model")

    shape = output_shape(model, resolution)
    if scale is None:
        scale = auto_lod(layout.shape, shape, layout.n_scales)
    preflight(f"writing a {'x'.join(map(str, shape))} volume", volume_bytes(model, shape, band))
    out = np.empty((*shape, channels), dtype=np.float32)
    if tuple(shape) == tuple(layout.shape) and float(scale).is_integer():
        scale = int(scale)
        b = layout.block
        batch = max(1, band // (channels * b**3))
        for ids, values in model.iter_blocks(0, from_scale=scale, batch=batch):
            block = values.permute(0, 2, 3, 4, 1).cpu().numpy()  # (n, b, b, b, C)
            for (i, j, k), tile in zip(layout.unravel(0, ids).tolist(), block, strict=True):
                x, y, z = i * b, j * b, k * b
                nx, ny, nz = min(b, shape[0] - x), min(b, shape[1] - y), min(b, shape[2] - z)
                if nx > 0 and ny > 0 and nz > 0:
                    out[x : x + nx, y : y + ny, z : z + nz] = tile[:nx, :ny, :nz]
    else:
        ratio = np.asarray(layout.shape, dtype=np.float64) / np.asarray(shape)
        plane = shape[1] * shape[2]
        step = max(1, band // plane)
        yz = np.stack(
            np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1
        ).reshape(-1, 2)
        for x0 in range(0, shape[0], step):
            xs = np.arange(x0, min(x0 + step, shape[0]))
            points = np.concatenate(
                [np.repeat(xs, plane)[:, None], np.tile(yz, (len(xs), 1))], axis=1
            )
            g = (points + 0.5) * ratio
            values = model.query(g, grid_coords=True, from_scale=scale).cpu().numpy()
            out[x0 : x0 + len(xs)] = values.reshape(len(xs), shape[1], shape[2], channels)
    to_input_units(model, out)
    return out[..., 0] if channels == 1 else out


def central_slices(model: MinerModel, scale: float = 0, size: int = 256) -> list[np.ndarray]:
    """The three orthogonal slices through the centre of the volume at level of detail
    ``scale``, first channel, in the input's units: ``[(Y, Z), (X, Z), (X, Y)]``, each
    sampled at most ``size`` samples a side. Memory: the three slices."""
    layout = model.layout
    shape = np.asarray(layout.shape, dtype=np.float64)
    steps = np.maximum(shape.max() / size, 1.0)
    out = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        counts = [max(1, round(float(shape[a] / steps))) for a in others]
        grids = np.meshgrid(
            *((np.arange(n) + 0.5) * shape[a] / n for a, n in zip(others, counts, strict=True)),
            indexing="ij",
        )
        points = np.empty((grids[0].size, 3))
        points[:, axis] = shape[axis] / 2
        for a, g in zip(others, grids, strict=True):
            points[:, a] = g.reshape(-1)
        values = model.query(points, grid_coords=True, from_scale=scale)[:, 0].cpu().numpy()
        out.append(to_input_units(model, values.reshape(counts)))
    return out


def save_volume(
    model: MinerModel, path: str | Path, scale: float | None = 0, resolution: int | None = None
) -> Path:
    """:func:`render_volume` written to ``path`` (the format by its extension, see
    :func:`miner3d.volumes.write_volume`) with the input's spacing, origin and direction."""
    from .volumes import write_volume

    volume = render_volume(model, scale, resolution)
    transform = output_transform(model, volume.shape[:3])
    meta = {"lod": scale, "source": model.meta.get("source")}
    return write_volume(path, volume, transform, meta)
