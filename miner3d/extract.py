"""Meshes from a fitted model: marching cubes (scikit-image) slab by slab, seams welded.

The reconstruction at a level of detail is decoded one layer of blocks at a time (a slab of
``b`` sample planes plus the first plane of the next layer, so neighbouring slabs share one
plane), marching cubes runs on each slab that crosses the level, and the vertices on the
shared planes, computed from identical values by identical arithmetic, are welded. The result
equals marching cubes on the dense grid, without ever holding it: peak memory is two layers of
blocks (``2 * b * P1 * P2 * 4`` bytes) plus the mesh.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import MinerError
from .model import MinerModel

MESH_OUTPUTS = (".ply", ".obj", ".stl", ".glb", ".off")


def _layer(model: MinerModel, scale: int, layer: int, batch: int) -> np.ndarray:
    """Decoded values of one layer of blocks along axis 0: ``(b, *scale_shape[1:])`` float32."""
    from .blocks import scatter_blocks

    layout = model.layout
    per_layer = int(np.prod(layout.grid(scale)[1:]))
    slab = torch.zeros(
        (model.channels, layout.block, *layout.scale_shape(scale)[1:]), device=model.device
    )
    for start in range(0, per_layer, batch):
        ids = torch.arange(
            layer * per_layer + start,
            layer * per_layer + min(start + batch, per_layer),
            device=model.device,
        )
        coords = layout.unravel(scale, ids)
        coords[:, 0] = 0
        scatter_blocks(slab, layout.block, coords, model.evaluate_blocks(scale, ids))
    return slab[0].cpu().numpy()


def marching_cubes(
    model: MinerModel, scale: int = 0, level: float = 0.5, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Surface of the model's first channel at ``level``, at level of detail ``scale``.

    Returns:
        vertices ``(V, d=3)`` float64 in the input's own coordinates (through the model's
        transform, or in full-resolution grid coordinates if it has none), and faces
        ``(F, 3)`` int64, oriented outwards (towards values below ``level``).
    """
    from skimage.measure import marching_cubes as skimage_mc

    layout = model.layout
    if layout.ndim != 3:
        raise MinerError("marching cubes needs a 3D model")
    valid = layout.valid_shape(scale)
    b = layout.block
    n_layers = layout.grid(scale)[0]
    verts, faces, n_verts = [], [], 0
    current = _layer(model, scale, 0, batch)
    for layer in range(n_layers):
        following = _layer(model, scale, layer + 1, batch) if layer + 1 < n_layers else None
        extra = following[:1] if following is not None else np.empty((0, *current.shape[1:]))
        slab = np.concatenate([current, extra], axis=0)
        x0 = layer * b
        slab = slab[: max(0, valid[0] - x0), : valid[1], : valid[2]]
        if slab.shape[0] >= 2 and slab.min() < level < slab.max():
            v, f, _, _ = skimage_mc(slab, level=level, allow_degenerate=False)
            v = v.astype(np.float64)  # slab-local float32 positions, offset exactly
            v[:, 0] += x0
            verts.append(v)
            faces.append(f + n_verts)
            n_verts += len(v)
        if following is None:
            break
        current = following
    if not verts:
        raise MinerError(f"the reconstruction at scale {scale} never crosses the level {level}")
    vertices = np.concatenate(verts).astype(np.float64)
    triangles = np.concatenate(faces).astype(np.int64)
    # weld the copies of vertices on the planes two slabs share (bitwise identical)
    vertices, inverse = np.unique(vertices, axis=0, return_inverse=True)
    triangles = inverse.reshape(-1)[triangles]
    # sample index i sits at grid coordinate (i + 0.5) * 2^scale
    grid = (vertices + 0.5) * 2**scale
    vertices = model.transform.grid_to_world(grid) if model.transform is not None else grid
    if _signed_volume(vertices, triangles) < 0:
        triangles = triangles[:, ::-1].copy()
    return vertices, triangles


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
