"""A fitted model as users hold it (:class:`Model`): queries and levels of detail in numpy
and trimesh, in the input's own coordinates and units. :func:`miner3d.load` and
:func:`miner3d.fit` return one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError
from .grid import OccupancyGrid
from .model import MinerModel


class Model:
    """A fitted model, as users hold it: queries and levels of detail in numpy and trimesh.

    Attributes:
        core: the :class:`~miner3d.model.MinerModel` (torch tensors, blocks, banks).
        kind: ``occupancy``, ``image`` or ``volume``.
        transform: grid to input coordinates (:class:`~miner3d.grid.GridTransform`), or
            ``None`` (grid coordinates).
    """

    def __init__(self, core: MinerModel):
        self.core = core

    @property
    def kind(self) -> str:
        return self.core.kind

    @property
    def transform(self):
        return self.core.transform

    @property
    def n_params(self) -> int:
        return self.core.n_params

    @property
    def lods(self) -> int:
        """Levels of detail: ``0`` (finest) to ``lods - 1``."""
        return self.core.layout.n_scales

    def _check_lod(self, lod: float | None) -> float | None:
        """``lod`` as an int where it is one (a level's own grid), else a float in range."""
        from .sampling import check_lod

        return None if lod is None else check_lod(lod, self.lods)

    def query(
        self, points: Any, lod: float = 0, grid_coords: bool = False, off_grid: bool = False
    ) -> np.ndarray:
        """The model at points ``(P, d)`` in the input's coordinates (or full-resolution grid
        coordinates, voxel ``i``'s centre at ``i + 0.5``): ``(P, C)`` float32. Level of detail
        ``lod`` sums the scales ``>= lod``; a fractional one blends the two levels around it
        (:mod:`miner3d.sampling`). ``off_grid`` evaluates the finest scale's MLPs at the
        points instead of interpolating between their samples."""
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.core.layout.ndim:
            raise MinerError(f"points must be (P, {self.core.layout.ndim}), got {points.shape}")
        grid = grid_coords or self.transform is None
        lod = self._check_lod(lod)
        values = self.core.query(points, grid_coords=grid, from_scale=lod, off_grid=off_grid)
        return values.cpu().numpy()

    def mesh(self, lod: float = 0, level: float | None = None, resolution: int | None = None):
        """The surface at ``level`` (``trimesh.Trimesh``, input coordinates): occupancy models
        (``level`` 0.5 by default), or a volume's isosurface (``level`` in its units, required);
        ``resolution`` samples the continuous model on another grid."""
        import trimesh

        from .dense import fitted_level
        from .extract import marching_cubes

        if self.kind == "image" or (self.kind == "volume" and level is None):
            what = "pass level= in the volume's units" if self.kind == "volume" else "3D only"
            raise MinerError(f"mesh() is for occupancy and volume models ({what})")
        level = 0.5 if level is None else level
        level = fitted_level(self.core, level) if self.kind == "volume" else level
        lod = self._check_lod(lod)
        vertices, faces = marching_cubes(self.core, lod, level, resolution=resolution)
        return trimesh.Trimesh(vertices, faces, process=False)

    def image(
        self,
        lod: float | None = None,
        size: tuple[int, int] | None = None,
        off_grid: bool = False,
    ) -> np.ndarray:
        """The picture, ``(H, W, C)`` float32 in ``[0, 1]``: level of detail ``lod`` on its
        own grid, or rendered at ``size = (H, W)``; without ``lod``, the level whose sample
        spacing matches ``size`` (anti-aliased when smaller, as a mipmap; the finest when
        larger). ``off_grid``: evaluate the finest scale's MLPs between samples (image
        models)."""
        from .extract import render_image

        if self.kind != "image":
            raise MinerError(f"image() is for image models; this model's kind is {self.kind}")
        lod = self._check_lod(lod)
        out = render_image(self.core, lod, size, np.float32, off_grid=off_grid)
        return out[..., None] if out.ndim == 2 else out

    def volume(self, lod: float | None = None, resolution: int | None = None) -> np.ndarray:
        """The dense volume at level of detail ``lod`` in the input's units, float32
        ``(X, Y, Z)`` (``(X, Y, Z, C)`` for several channels), at the input's shape or
        ``resolution`` samples along its longest axis; without ``lod``, the level whose
        sample spacing matches (volume models)."""
        from .dense import render_volume

        if self.kind != "volume":
            raise MinerError(f"volume() is for volume models; this model's kind is {self.kind}")
        return render_volume(self.core, self._check_lod(lod), resolution)

    def evaluate(
        self,
        grid: OccupancyGrid | np.ndarray | None = None,
        mesh: str | Path | None = None,
        points: int = 1_000_000,
        surface: int = 100_000,
    ) -> dict[str, Any]:
        """``miner3d eval``'s figures per level of detail (occupancy models): full-grid IoU
        against ``grid``; point IoU, Chamfer distance and F-score against ``mesh`` (see
        :mod:`miner3d.evaluate`)."""
        from .evaluate import evaluate

        if self.kind != "occupancy":
            raise MinerError(
                f"evaluate() is for occupancy models; this model's kind is {self.kind}"
            )
        occupancy = grid.occupancy if isinstance(grid, OccupancyGrid) else grid
        if occupancy is None and mesh is None:
            raise MinerError("nothing to compare with: pass grid and/or mesh")
        return evaluate(self.core, occupancy, mesh, points, surface)

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` atomically."""
        return self.core.save(path)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.core.layout.shape))
        return f"<miner3d.Model {self.kind} {shape}, {self.lods} lods, {self.n_params:,} params>"
