"""Generalised winding numbers (Jacobson et al. 2013): an inside test that tolerates holes.

``w(p) = sum over triangles of the solid angle they subtend at p / (4 pi)``: 1 inside a closed
outward-oriented surface, 0 outside, and a smooth in-between value near holes. Exact summation,
O(points x triangles), parallel over points: meant for a few thousand to a few million
queries, not for whole grids.
"""

from __future__ import annotations

import numpy as np

from ._numba import numba


@numba.njit(cache=True, parallel=True)
def _winding(points, tri):  # pragma: no cover - numba
    n = points.shape[0]
    out = np.zeros(n)
    for q in numba.prange(n):
        px, py, pz = points[q, 0], points[q, 1], points[q, 2]
        total = 0.0
        for f in range(tri.shape[0]):
            ax = tri[f, 0, 0] - px
            ay = tri[f, 0, 1] - py
            az = tri[f, 0, 2] - pz
            bx = tri[f, 1, 0] - px
            by = tri[f, 1, 1] - py
            bz = tri[f, 1, 2] - pz
            cx = tri[f, 2, 0] - px
            cy = tri[f, 2, 1] - py
            cz = tri[f, 2, 2] - pz
            la = np.sqrt(ax * ax + ay * ay + az * az)
            lb = np.sqrt(bx * bx + by * by + bz * bz)
            lc = np.sqrt(cx * cx + cy * cy + cz * cz)
            det = ax * (by * cz - bz * cy) - ay * (bx * cz - bz * cx) + az * (bx * cy - by * cx)
            den = (
                la * lb * lc
                + (ax * bx + ay * by + az * bz) * lc
                + (bx * cx + by * cy + bz * cz) * la
                + (cx * ax + cy * ay + cz * az) * lb
            )
            total += 2.0 * np.arctan2(det, den)  # Van Oosterom & Strackee solid angle
        out[q] = total / (4.0 * np.pi)
    return out


def winding_numbers(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Generalised winding number of a triangle mesh at each point.

    Args:
        points: (P, 3) query points.
        vertices: (V, 3) mesh vertices (same frame as ``points``).
        faces: (F, 3) vertex indices, consistently oriented (outward normals give +1 inside).

    Returns:
        (P,) float64 winding numbers. Memory: the (F, 3, 3) float64 triangle array.
    """
    tri = np.ascontiguousarray(np.asarray(vertices, dtype=np.float64)[np.asarray(faces)])
    return _winding(np.ascontiguousarray(points, dtype=np.float64), tri)
