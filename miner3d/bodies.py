"""Meshes of many bodies with holes: the solid of the generalised winding number, body by body.

The winding number is a sum over triangles, so over the mesh's connected components (its
bodies): ``W(p) = sum_B w_B(p)``. A closed body's ``w_B`` is exactly its inside indicator
(``+1``, or ``-1`` if it is inverted: a cavity), which the exact ladder
(:func:`miner3d.ladder.solid_votes`) decides for every voxel; an open body's ``w_B`` is
fractional near its holes, and only there. So each body is voxelized alone on its own
bounding box with the nonzero ladder (its columns are opened by its own holes only, not by
every neighbour's, as on the whole mesh), the voxels its ladder decides add ``+-1`` to an
int8 total, and the few it leaves undecided take the fast winding number of that body alone
(libigl; a tree of its own triangles, about 20x cheaper per point than the whole mesh's on a
44-body asset) into a float sum. A voxel is inside where ``|total + sum| >= 1/2``: the union
of overlapping bodies, cavities of inverted inner shells, and the winding number's caps over
holes.

Left out, by design: an open body's small far field at voxels its own ladder decided (there
``w_B`` is within a few hundredths of an integer). It moves only voxels where ``W`` is within
that of 1/2. Measured on a generated 44-body, 130k-triangle asset with 18 large holes at 512:
full-grid IoU 0.9995 against the whole mesh's fast winding number at every voxel any body
left undecided (``BENCHMARKS.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ladder import solid_votes

MAX_BODIES = 4096
"""Beyond this many bodies (a triangle soup whose vertices are not shared), one bounding box
each costs more than it saves: the caller uses the whole mesh's winding number instead."""


def bodies(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected component of each face, ``(F,)`` int, and their number; vertices at the
    same position count as shared (an STL file repeats them). Memory: a few int64 per vertex
    and per face."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, merged = np.unique(vertices, axis=0, return_inverse=True)
    merged = merged.reshape(-1)
    tri = merged[faces]
    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]]])
    n = int(merged.max()) + 1
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), (n, n))
    _, labels = connected_components(graph, directed=False)
    face_labels = labels[tri[:, 0]]
    _, face_labels = np.unique(face_labels, return_inverse=True)  # only bodies with faces
    return face_labels.reshape(-1), int(face_labels.max()) + 1


def _orientation(vertices: np.ndarray, faces: np.ndarray) -> int:
    """+1 if the body encloses positive signed volume (outward normals), else -1."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    return 1 if float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) >= 0 else -1


REACH = 4
"""An open body's far field is added within a quarter of its box's size (at least 4 voxels)
around the box."""
BORDERLINE = 0.1
"""Undecided voxels whose winding number is within this of 1/2 also take the far fields of
the open bodies around them."""


def _far_fields(
    vertices: np.ndarray,
    shape: tuple[int, ...],
    opened: list,
    where: np.ndarray,
    winding: np.ndarray,
) -> int:
    """In place: add to ``winding`` (at the undecided voxels ``where``, sorted flat indices)
    whose value is within :data:`BORDERLINE` of 1/2 the fractional far field ``w_B -
    round(w_B)`` of every open body ``B`` within :data:`REACH` that did not evaluate them
    itself. Returns how many voxels were refined. Memory: 40 bytes per borderline voxel."""
    import igl

    near = np.flatnonzero(np.abs(np.abs(winding) - 0.5) < BORDERLINE)
    if not near.size:
        return 0
    cells = np.stack(np.unravel_index(where[near], shape), axis=1)
    for faces, lo, hi, own in opened:
        reach = np.maximum((hi - lo) // REACH, 4)
        inside = np.all((cells >= lo - reach) & (cells < hi + reach), axis=1)
        inside &= ~np.isin(where[near], own, assume_unique=True)
        pick = np.flatnonzero(inside)
        if pick.size:
            w = igl.fast_winding_number(vertices, faces, cells[pick].astype(np.float64) + 0.5)
            winding[near[pick]] += w - np.rint(w)
    return int(near.size)


def voxelize_bodies(
    vertices: np.ndarray, faces: np.ndarray, shape: tuple[int, int, int], labels: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """The winding-number solid of a mesh of several bodies (see the module doc).

    Args:
        vertices: ``(V, 3)`` in continuous grid coordinates.
        faces: ``(F, 3)``.
        shape: the grid.
        labels: ``(F,)`` body of each face (:func:`bodies`).

    Returns:
        ``(nx, ny, nz)`` uint8 occupancy and diagnostics. Peak memory: 2 bytes per voxel (the
        int8 total, then one body's bounding box of votes at a time, then the uint8 result),
        plus about 40 bytes per undecided voxel.
    """
    import igl

    total = np.zeros(shape, dtype=np.int8)
    undecided, weights, opened = [], [], []
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    ends = np.cumsum(counts)
    open_bodies = 0
    for start, end in zip(ends - counts, ends, strict=True):
        f = faces[order[start:end]]
        corners = vertices[f.reshape(-1)]
        lo = np.maximum(np.floor(corners.min(axis=0)).astype(np.int64) - 1, 0)
        hi = np.minimum(np.ceil(corners.max(axis=0)).astype(np.int64) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(int(n) for n in hi - lo)
        votes, info = solid_votes(vertices - lo, f, box, nonzero=True, undecided="mark")
        sign = _orientation(vertices, f)
        region = total[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        for i in range(0, box[0], 32):  # in slabs: the mask costs 1/32 of the box
            slab = region[i : i + 32]
            slab[votes[i : i + 32] == 1] += np.int8(sign)
        local = np.flatnonzero(votes.reshape(-1) >= 2)
        is_open = bool(sum(info["odd_columns"].values()) or local.size)
        open_bodies += is_open
        own = np.zeros(0, dtype=np.int64)
        if local.size:
            cells = np.stack(np.unravel_index(local, box), axis=1) + lo
            w = igl.fast_winding_number(
                vertices, np.ascontiguousarray(f), cells.astype(np.float64) + 0.5
            )
            own = np.ravel_multi_index(cells.T, shape)
            undecided.append(own)
            weights.append(w)
        if is_open:
            opened.append((np.ascontiguousarray(f), lo, hi, own))
    occupancy = (total != 0).view(np.uint8)
    n_undecided = refined = 0
    if undecided:
        where, inverse = np.unique(np.concatenate(undecided), return_inverse=True)
        fraction = np.bincount(inverse.reshape(-1), weights=np.concatenate(weights))
        winding = total.reshape(-1)[where] + fraction
        refined = _far_fields(vertices, shape, opened, where, winding)
        occupancy.reshape(-1)[where] = np.abs(winding) >= 0.5
        n_undecided = int(where.size)
    info = {
        "bodies": len(ends),
        "open_bodies": open_bodies,
        "ambiguous_voxels": n_undecided,
        "winding_voxels": n_undecided,
        "winding": "fast, body by body",
        "far_field_voxels": refined,
    }
    return occupancy, info
