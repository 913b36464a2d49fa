"""numba kernels of the parity voxelizer (compiled on first use, cached on disk).

Exactness: x and y are snapped to a fixed-point grid (``2**shift`` steps per voxel) so the
edge functions are exact int64 arithmetic; a column centre lying exactly on an edge or a
vertex is decided by the symbolic perturbation ``p + (eps, eps**2)``, which gives every
triangle the same answer for the same perturbed point. Each column is therefore crossed by a
generic ray, and a closed surface is crossed an even number of times: no crossing is counted
twice on a shared edge, and none is lost.
"""

from __future__ import annotations

import numpy as np

from ._numba import numba


@numba.njit(cache=True, inline="always")
def _owns_edge(dx: np.int64, dy: np.int64) -> bool:
    # sign of the edge function at p + (eps, eps^2) when it is 0 at p: -dy*eps + dx*eps^2
    return dy < 0 or (dy == 0 and dx > 0)


# --- crossings per column, and per-voxel votes of the axes ------------------------------------


@numba.njit(cache=True)
def crossing_capacity(fa, fb, faces, half, na, nb):  # pragma: no cover - numba
    """Upper bound of the crossings :func:`collect_crossings` can find: the sum over triangles of
    the column centres inside their projected bounding boxes."""
    step = 2 * half
    total = 0
    for f in range(faces.shape[0]):
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        lo_a = min(fa[a], fa[b], fa[c])
        hi_a = max(fa[a], fa[b], fa[c])
        lo_b = min(fb[a], fb[b], fb[c])
        hi_b = max(fb[a], fb[b], fb[c])
        i0 = max(0, -((half - lo_a) // step))
        i1 = min(na - 1, (hi_a - half) // step)
        j0 = max(0, -((half - lo_b) // step))
        j1 = min(nb - 1, (hi_b - half) // step)
        if i1 >= i0 and j1 >= j0:
            total += (i1 - i0 + 1) * (j1 - j0 + 1)
    return total


@numba.njit(cache=True)
def collect_crossings(fa, fb, gc, faces, half, na, nb, nc, col, depth, sign):  # pragma: no cover
    """Every crossing of the columns along axis c with the surface, as (column, voxel, sign).

    Exact (see the module doc): a column centre on an edge or a vertex belongs to exactly one
    of the triangles around it. ``column = i * nb + j``; ``depth`` is
    the first voxel beyond the crossing (``nc`` when beyond the grid); ``sign`` is +1 where
    the ray along +c enters an outward-oriented surface, -1 where it leaves.

    Returns:
        the number of crossings written.
    """
    step = 2 * half
    n = 0
    for f in range(faces.shape[0]):
        a = faces[f, 0]
        b = faces[f, 1]
        c = faces[f, 2]
        ax, ay, bx, by, cx, cy = fa[a], fb[a], fa[b], fb[b], fa[c], fb[c]
        area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        if area == 0:
            continue
        az, bz, cz = gc[a], gc[b], gc[c]
        s = np.int8(1)
        if area < 0:
            bx, by, bz, cx, cy, cz = cx, cy, cz, bx, by, bz
            area = -area
        else:
            s = np.int8(-1)  # normal along +c: the ray leaves the solid here
        i0 = max(0, -((half - min(ax, bx, cx)) // step))
        i1 = min(na - 1, (max(ax, bx, cx) - half) // step)
        j0 = max(0, -((half - min(ay, by, cy)) // step))
        j1 = min(nb - 1, (max(ay, by, cy) - half) // step)
        own_bc = _owns_edge(cx - bx, cy - by)
        own_ca = _owns_edge(ax - cx, ay - cy)
        own_ab = _owns_edge(bx - ax, by - ay)
        inv_area = 1.0 / area
        for i in range(i0, i1 + 1):
            px = (2 * i + 1) * half
            for j in range(j0, j1 + 1):
                py = (2 * j + 1) * half
                w0 = (cx - bx) * (py - by) - (cy - by) * (px - bx)
                if w0 < 0 or (w0 == 0 and not own_bc):
                    continue
                w1 = (ax - cx) * (py - cy) - (ay - cy) * (px - cx)
                if w1 < 0 or (w1 == 0 and not own_ca):
                    continue
                w2 = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
                if w2 < 0 or (w2 == 0 and not own_ab):
                    continue
                z = (w0 * az + w1 * bz + w2 * cz) * inv_area
                k = int(np.floor(z - 0.5)) + 1
                col[n] = i * nb + j
                depth[n] = min(max(k, 0), nc)
                sign[n] = s
                n += 1
    return n


@numba.njit(cache=True)
def sort_by_column(col, depth, sign, n_columns):  # pragma: no cover - numba
    """Counting sort of crossings by column. Returns (offsets (n_columns + 1,), depth, sign)
    with column ``c``'s crossings at ``offsets[c]:offsets[c + 1]``."""
    offsets = np.zeros(n_columns + 1, dtype=np.int64)
    for m in range(col.shape[0]):
        offsets[col[m] + 1] += 1
    for c in range(n_columns):
        offsets[c + 1] += offsets[c]
    fill = offsets[:-1].copy()
    out_depth = np.empty_like(depth)
    out_sign = np.empty_like(sign)
    for m in range(col.shape[0]):
        p = fill[col[m]]
        out_depth[p] = depth[m]
        out_sign[p] = sign[m]
        fill[col[m]] = p + 1
    return offsets, out_depth, out_sign


@numba.njit(cache=True, parallel=True)
def add_votes(
    offsets, depth, sign, votes, nb, nc, stride_a, stride_b, stride_c, invalid_bit, nonzero
):  # pragma: no cover - numba
    """Add one axis's votes to the flat vote grid, column by column (columns in parallel).

    Bits 0-1 of a voxel's vote byte count the axes that say inside; bit ``invalid_bit`` is set
    when this axis's column is not closed (odd parity, or a nonzero total winding).
    """
    n_columns = offsets.shape[0] - 1
    for c in numba.prange(n_columns):
        lo = offsets[c]
        hi = offsets[c + 1]
        if lo == hi:
            continue
        # insertion sort of the column's few crossings by depth
        for m in range(lo + 1, hi):
            d = depth[m]
            s = sign[m]
            p = m - 1
            while p >= lo and depth[p] > d:
                depth[p + 1] = depth[p]
                sign[p + 1] = sign[p]
                p -= 1
            depth[p + 1] = d
            sign[p + 1] = s
        total = 0
        for m in range(lo, hi):
            total += 1 if not nonzero else sign[m]
        base = (c // nb) * stride_a + (c % nb) * stride_b
        if (nonzero and total != 0) or (not nonzero and total % 2 == 1):
            for k in range(nc):
                votes[base + k * stride_c] |= np.uint8(1 << invalid_bit)
            continue
        state = 0
        for m in range(lo, hi):
            if state != 0:
                start = depth[m - 1]
                for k in range(start, depth[m]):
                    votes[base + k * stride_c] += np.uint8(1)
            state = state ^ 1 if not nonzero else state + sign[m]


@numba.njit(cache=True, parallel=True)
def decide_votes(votes, n_axes):  # pragma: no cover - numba
    """In place: 1 where every closed axis says inside, 0 where every one says outside; where
    they disagree or none is closed (left to the winding number), 2 if at least half of the
    closed axes say inside, else 3."""
    for m in numba.prange(votes.shape[0]):
        v = votes[m]
        inside = v & 3
        invalid = (v >> 2) & 7
        valid = n_axes - ((invalid & 1) + ((invalid >> 1) & 1) + ((invalid >> 2) & 1))
        if valid == 0 or (inside != 0 and inside != valid):
            votes[m] = 2 if 2 * inside >= valid else 3
        else:
            votes[m] = 1 if inside > 0 else 0
