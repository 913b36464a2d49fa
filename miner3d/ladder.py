"""The exact ladder of the robust voxelizer: crossings of axis-aligned columns of voxel
centres, votes of three axes, and the generalised winding number for what they leave
undecided (see :mod:`miner3d.voxelizer` for the methods built on it)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fixed_point(vertices: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Grid coordinates snapped to ``2**shift`` steps per voxel, int64 ``(V, 3)``, and half a
    voxel in those units. |coordinates| < 2^30, so the edge functions are exact in int64."""
    shift = 29 - math.ceil(math.log2(max(shape) + 1))
    return np.rint(vertices * float(1 << shift)).astype(np.int64), 1 << (shift - 1)


# the column axis c, and the two axes (a, b) of its columns, in cyclic order (right-handed)
AXIS_PLANES = ((2, 0, 1), (0, 1, 2), (1, 2, 0))


def solid_votes(
    vertices: np.ndarray,
    faces: np.ndarray,
    shape: tuple[int, int, int],
    nonzero: bool,
    planes: tuple[tuple[int, int, int], ...] = AXIS_PLANES,
    undecided: str = "winding",
    winding_budget: float = 2e9,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Steps 1-3 of the robust ladder, along the columns of ``planes`` (``(c, a, b)``: column
    axis, then the two axes that index the columns). Voxels the closed axes do not decide
    take the winding number (``undecided="winding"``, :func:`resolve_undecided`), stay empty
    (``"outside"``), or are left as 2 or 3 for the caller (``"mark"``).

    Peak memory: the ``(nx, ny, nz)`` uint8 result (votes are decided in place) + per axis
    13 bytes per candidate crossing (at most the triangles' projected bounding boxes in
    columns) + the winding number's ``(F, 3, 3)`` float64 triangles when it runs.
    """
    from . import _raster

    fixed, half = fixed_point(vertices, shape)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    votes = np.zeros(shape, dtype=np.uint8)
    flat = votes.reshape(-1)
    strides = [s // votes.itemsize for s in votes.strides]
    info: dict[str, Any] = {"odd_columns": {}}
    for c, a, b in planes:
        fa = np.ascontiguousarray(fixed[:, a])
        fb = np.ascontiguousarray(fixed[:, b])
        gc = np.ascontiguousarray(vertices[:, c], dtype=np.float64)
        na, nb, nc = shape[a], shape[b], shape[c]
        capacity = _raster.crossing_capacity(fa, fb, faces, half, na, nb)
        col = np.empty(capacity, dtype=np.int64)
        depth = np.empty(capacity, dtype=np.int32)
        sign = np.empty(capacity, dtype=np.int8)
        n = _raster.collect_crossings(fa, fb, gc, faces, half, na, nb, nc, col, depth, sign)
        offsets, depth, sign = _raster.sort_by_column(col[:n], depth[:n], sign[:n], na * nb)
        del col
        _raster.add_votes(
            offsets, depth, sign, flat, nb, nc, strides[a], strides[b], strides[c], 2 + c, nonzero
        )
        info["odd_columns"]["xyz"[c]] = _count_open_columns(offsets, sign, nonzero)
    _raster.decide_votes(flat, len(planes))
    ambiguous = np.flatnonzero(flat >= 2)
    info["ambiguous_voxels"] = int(ambiguous.size)
    if undecided == "outside":
        flat[ambiguous] = 0
    elif undecided == "winding":
        resolve_undecided(votes, vertices, faces, info, winding_budget, ambiguous)
    return votes, info


def resolve_undecided(
    votes: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    info: dict[str, Any],
    budget: float = 2e9,
    ambiguous: np.ndarray | None = None,
) -> None:
    """In place: the voxels :func:`solid_votes` left undecided (2 or 3; their flat indices
    ``ambiguous``, found again if not given and ``info`` counts any) take the winding number
    (:func:`winding_inside`), or the majority of their votes beyond its budget; ``info``
    says which."""
    if not info["ambiguous_voxels"]:
        return
    flat = votes.reshape(-1)
    if ambiguous is None:
        ambiguous = np.flatnonzero(flat >= 2)
    centres = np.stack(np.unravel_index(ambiguous, votes.shape), axis=1) + 0.5
    inside, how = winding_inside(centres, vertices, faces, budget)
    flat[ambiguous] = flat[ambiguous] == 2 if inside is None else inside
    info["winding_voxels"] = 0 if inside is None else int(ambiguous.size)
    info["winding"] = how


EXACT_PAIRS = 10_000_000
"""Point-triangle pairs up to which the exact winding number is used (about 0.1 s on two
cores): below it, building the fast winding number's tree costs more than it saves."""


def winding_inside(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, budget: float
) -> tuple[np.ndarray | None, str]:
    """``|w| >= 1/2`` of the generalised winding number at ``points`` ``(P, 3)``: exact for a
    few points (:data:`EXACT_PAIRS`), else libigl's fast winding number (Barill et al. 2018:
    a Barnes-Hut tree of the triangles, about ``O(log F)`` per point) when libigl is
    installed, else the exact sum while it costs at
    most ``budget`` point-triangle pairs (``None`` beyond: the caller takes the majority of
    the votes). Returns the decisions and which route took them. Memory: the points, the
    tree (a few hundred bytes per triangle) and one float64 per point."""
    from .winding import winding_numbers

    pairs = len(points) * len(faces)
    if pairs <= EXACT_PAIRS:  # a few voxels: exact, and cheaper than building the tree
        return np.abs(winding_numbers(points, vertices, faces)) >= 0.5, "exact"
    try:
        import igl
    except ImportError:  # the core runs without libigl (e.g. a bare GPU machine)
        igl = None
    if igl is not None:
        w = igl.fast_winding_number(
            np.ascontiguousarray(vertices, dtype=np.float64),
            np.ascontiguousarray(faces, dtype=np.int64),
            np.ascontiguousarray(points, dtype=np.float64),
        )
        return np.abs(w) >= 0.5, "fast"
    if pairs > budget:
        return None, "majority"
    return np.abs(winding_numbers(points, vertices, faces)) >= 0.5, "exact"


def _count_open_columns(offsets: np.ndarray, sign: np.ndarray, nonzero: bool) -> int:
    if not nonzero:
        return int(np.count_nonzero(np.diff(offsets) % 2))
    running = np.concatenate([[0], np.cumsum(sign, dtype=np.int64)])
    return int(np.count_nonzero(running[offsets[1:]] != running[offsets[:-1]]))
