"""numba kernels of the parity voxelizer (compiled on first use, cached on disk).

Exactness: x and y are snapped to a fixed-point grid (``2**shift`` steps per voxel) so the
edge functions are exact int64 arithmetic; a column centre lying exactly on an edge or a
vertex is decided by the symbolic perturbation ``p + (eps, eps**2)``, which gives every
triangle the same answer for the same perturbed point. Each column is therefore crossed by a
generic ray, and a closed surface is crossed an even number of times: no crossing is counted
twice on a shared edge, and none is lost.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _owns_edge(dx: np.int64, dy: np.int64) -> bool:
    # sign of the edge function at p + (eps, eps^2) when it is 0 at p: -dy*eps + dx*eps^2
    return dy < 0 or (dy == 0 and dx > 0)


@numba.njit(cache=True)
def rasterize_crossings(fx, fy, gz, faces, half, toggles, parity):  # pragma: no cover - numba
    """Mark where each column along the last axis crosses the surface.

    Args:
        fx, fy: (V,) int64 fixed-point grid coordinates on the first two axes.
        gz: (V,) float64 continuous grid coordinate on the last axis.
        faces: (F, 3) int64 vertex indices.
        half: int64, half a voxel in fixed point; voxel centre i is at (2 i + 1) * half.
        toggles: (nx, ny, nz) uint8, XOR-ed in place at the first voxel beyond each crossing.
        parity: (nx, ny) uint8, XOR-ed in place with the number of crossings of each column.
    """
    nx, ny, nz = toggles.shape
    step = 2 * half
    for f in range(faces.shape[0]):
        a = faces[f, 0]
        b = faces[f, 1]
        c = faces[f, 2]
        ax, ay, bx, by, cx, cy = fx[a], fy[a], fx[b], fy[b], fx[c], fy[c]
        area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        if area == 0:
            continue  # edge-on triangle: the perturbed ray never meets it
        az, bz, cz = gz[a], gz[b], gz[c]
        if area < 0:  # make it counter-clockwise in projection
            bx, by, bz, cx, cy, cz = cx, cy, cz, bx, by, bz
            area = -area
        xmin = min(ax, bx, cx)
        xmax = max(ax, bx, cx)
        ymin = min(ay, by, cy)
        ymax = max(ay, by, cy)
        i0 = max(0, -((half - xmin) // step))  # first centre >= xmin
        i1 = min(nx - 1, (xmax - half) // step)
        j0 = max(0, -((half - ymin) // step))
        j1 = min(ny - 1, (ymax - half) // step)
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
                k = int(np.floor(z - 0.5)) + 1  # first voxel whose centre lies beyond z
                if k < 0:
                    k = 0
                if k < nz:
                    toggles[i, j, k] ^= 1
                parity[i, j] ^= 1


@numba.njit(cache=True, parallel=True)
def fill_columns(toggles, parity):  # pragma: no cover - numba
    """Prefix-XOR each column in place; columns with odd parity are cleared (unreliable).

    Args:
        toggles: (nx, ny, nz) uint8; becomes the occupancy (1 inside).
        parity: (nx, ny) uint8, 1 where a column crossed the surface an odd number of times.
    """
    nx, ny, nz = toggles.shape
    for i in numba.prange(nx):
        for j in range(ny):
            if parity[i, j]:
                for k in range(nz):
                    toggles[i, j, k] = 0
                continue
            run = np.uint8(0)
            for k in range(nz):
                run ^= toggles[i, j, k]
                toggles[i, j, k] = run
