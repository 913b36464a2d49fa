"""Pictures: PyVista renders of every level of detail beside its blocks (the paper's Fig. 1 /
Fig. 8), image reconstructions with their blocks outlined (Fig. 4), and quality-against-time
plots with the scale switches marked (Fig. 3 / 5). PyVista and matplotlib are imported only
here, and only when a picture is drawn; everything renders off-screen for servers and CI."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError
from .io import atomic_write
from .model import MinerModel


def _pyvista():
    """Import PyVista; without a display, ask VTK for its EGL window straight away (otherwise it
    tries X first and prints a warning before falling back)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import pyvista as pv

    return pv


def _levels(model: MinerModel, lods: list[float] | None) -> list[float]:
    """The levels of detail a picture shows: ``lods``, or every level, coarsest first."""
    return list(range(model.layout.n_scales - 1, -1, -1)) if lods is None else list(lods)


def polydata(vertices: np.ndarray, faces: np.ndarray):
    """A triangle mesh ``(V, 3)``, ``(F, 3)`` as a PyVista ``PolyData``."""
    pv = _pyvista()
    cells = np.hstack([np.full((len(faces), 1), 3), faces]).ravel()
    return pv.PolyData(vertices, cells)


def block_outlines(model: MinerModel, scale: int):
    """``pyvista.PolyData`` of the 12 edges of every block of ``scale`` that has an MLP, in the
    input's coordinates."""
    pv = _pyvista()

    layout = model.layout
    bank = model.scales[scale]
    if bank is None or len(bank.block_ids) == 0:
        return pv.PolyData()
    coords = layout.unravel(scale, bank.block_ids).cpu().numpy().astype(np.float64)
    size = layout.block * 2**scale  # block edge in full-resolution voxels
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    points = (coords[:, None, :] + corners[None]) * size  # (n, 8, 3) grid coordinates
    if model.transform is not None:
        points = model.transform.grid_to_world(points)
    edges = np.array(
        [
            [0, 1],
            [2, 3],
            [4, 5],
            [6, 7],
            [0, 2],
            [1, 3],
            [4, 6],
            [5, 7],
            [0, 4],
            [1, 5],
            [2, 6],
            [3, 7],
        ]
    )
    n = len(coords)
    lines = (edges[None] + 8 * np.arange(n)[:, None, None]).reshape(-1, 2)
    cells = np.hstack([np.full((len(lines), 1), 2), lines]).ravel()
    return pv.PolyData(points.reshape(-1, 3), lines=cells)


def render_levels(
    model: MinerModel,
    path: str | Path | None = None,
    window_size: tuple[int, int] | None = None,
    meshes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    lods: list[float] | None = None,
) -> np.ndarray:
    """Every level of detail of a 3D model (or those of ``lods``, fractional allowed; top
    row) over its blocks with an MLP drawn as wireframe cubes (bottom row), coarsest on the
    left. Writes a PNG if ``path`` is given (off-screen); with no path and a display, opens an
    interactive window.

    Returns:
        the rendered image, ``(H, W, 3)`` uint8.
    """
    pv = _pyvista()

    from .extract import marching_cubes

    levels = _levels(model, lods)
    n = len(levels)
    window_size = window_size or (320 * n, 640)
    off_screen = path is not None
    plotter = pv.Plotter(shape=(2, n), off_screen=off_screen, window_size=window_size, border=False)
    for col, j in enumerate(levels):
        if meshes is not None and j in meshes:
            vertices, faces = meshes[j]
        else:
            try:
                vertices, faces = marching_cubes(model, scale=j)
            except MinerError:
                vertices, faces = None, None
        surface = None
        if vertices is not None:
            surface = polydata(vertices, faces)
        plotter.subplot(0, col)
        plotter.add_text(f"scale {j:g}", font_size=10)
        if surface is not None:
            plotter.add_mesh(surface, color="tan", smooth_shading=True)
        plotter.subplot(1, col)
        plotter.add_text(f"{model.mlp_blocks(int(j))} blocks", font_size=10)
        outlines = block_outlines(model, int(j))
        if outlines.n_points:
            plotter.add_mesh(outlines, color="steelblue", line_width=1)
        if surface is not None:
            plotter.add_mesh(surface, color="tan", opacity=0.25)
        plotter.view_isometric()
        plotter.subplot(0, col)
        plotter.view_isometric()
    if off_screen:
        image = plotter.screenshot(return_img=True)
        plotter.close()
        _save_png(image, Path(path))
        return image
    plotter.show()
    return plotter.last_image


def render_image_levels(
    model: MinerModel, path: str | Path, max_side: int = 1024, lods: list[float] | None = None
) -> np.ndarray:
    """Each level of detail of a 2D model (or those of ``lods``, fractional allowed) with its
    blocks with an MLP outlined (Fig. 4); a level larger than ``max_side`` pixels is rendered
    at that size by querying the model."""
    import matplotlib

    from .extract import render_image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    levels = _levels(model, lods)
    n = len(levels)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for col, j in enumerate(levels):
        height, width = model.layout.valid_shape(int(j))
        shrink = max(1.0, max(height, width) / max_side)  # never a full-size copy of a huge image
        size = None if shrink == 1 else (round(height / shrink), round(width / shrink))
        if size is None and not float(j).is_integer():
            size = (height, width)
        image = render_image(model, j, size)
        image = image[..., :3] if image.ndim == 3 else image
        ax = axes[0, col]
        ax.imshow(
            image,
            cmap="gray" if image.ndim == 2 else None,
            vmin=0,
            vmax=255,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),  # scale j's pixel coordinates
        )
        bank = model.scales[int(j)]
        if bank is not None and len(bank.block_ids):
            b = model.layout.block
            rc = model.layout.unravel(int(j), bank.block_ids).cpu().numpy() * b - 0.5
            segments = []
            for r, c in rc:
                segments += [
                    [(c, r), (c + b, r)],
                    [(c + b, r), (c + b, r + b)],
                    [(c + b, r + b), (c, r + b)],
                    [(c, r + b), (c, r)],
                ]
            ax.add_collection(LineCollection(segments, colors="yellow", linewidths=0.5))
        ax.set_title(f"scale {j:g}: {model.mlp_blocks(int(j))} blocks")
        ax.axis("off")
    return _save_figure(fig, Path(path))


def volume_grid(model: MinerModel, scale: float, side: int = 96):
    """Level of detail ``scale`` of a volume model as a PyVista ``ImageData`` (point array
    ``values``, input units and coordinates, ``side`` samples along the longest axis) and the
    colour limits (the input's value range)."""
    from .dense import output_transform, render_volume
    from .volumes import image_data

    _pyvista()  # VTK's off-screen window first
    volume = render_volume(model, scale, resolution=max(8, min(side, max(model.layout.shape))))
    volume = volume[..., 0] if volume.ndim == 4 else volume
    grid = image_data(volume, output_transform(model, volume.shape))
    lo, hi = model.meta.get("value_range", [float(volume.min()), float(volume.max())])
    return grid, (lo, hi)


def volume_rendering(
    model: MinerModel, scale: float, size: int = 320, side: int = 96
) -> np.ndarray:
    """An off-screen PyVista volume rendering (``(size, size, 3)`` uint8) of level of detail
    ``scale``, sampled at ``side`` samples along its longest axis, in the input's coordinates,
    grey with opacity rising over the input's value range."""
    pv = _pyvista()
    grid, clim = volume_grid(model, scale, side)
    plotter = pv.Plotter(off_screen=True, window_size=(size, size))
    plotter.add_volume(grid, scalars="values", cmap="gray", clim=clim, opacity="sigmoid")
    plotter.remove_scalar_bar()
    plotter.view_isometric()
    image = plotter.screenshot(return_img=True)
    plotter.close()
    return np.asarray(image)[..., :3]


def render_volume_levels(
    model: MinerModel, path: str | Path, size: int = 256, lods: list[float] | None = None
) -> np.ndarray:
    """Every level of detail of a volume model (rows: coarse to fine): the three orthogonal
    slices through its centre, in the input's units on one colour scale, and a volume
    rendering (PyVista, off-screen; left out, with a note in its place, where no OpenGL is
    available)."""
    import matplotlib

    from .dense import central_slices

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = _levels(model, lods)
    n = len(levels)
    lo, hi = model.meta.get("value_range", [None, None])
    fig, axes = plt.subplots(n, 4, figsize=(13, 3.3 * n), squeeze=False)
    for row, j in enumerate(levels):
        for axis, plane in enumerate(central_slices(model, j, size)):
            ax = axes[row, axis]
            ax.imshow(plane.T, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"lod {j:g}: slice normal to axis {axis}")
        ax = axes[row, 3]
        try:
            ax.imshow(volume_rendering(model, j))
            ax.set_title(f"lod {j:g}: volume rendering")
        except Exception as exc:  # no OpenGL: the slices still say what there is to say
            ax.text(0.5, 0.5, f"no volume rendering:\n{type(exc).__name__}", ha="center")
        for ax in axes[row]:
            ax.axis("off")
    return _save_figure(fig, Path(path))


def plot_history(history: list[dict[str, Any]] | str | Path, path: str | Path) -> np.ndarray:
    """Quality (IoU or PSNR) against wall time, scale switches marked, from a history or
    ``metrics.csv``: the full-grid measurements, and the coarse scales' on their own grids
    (their levels of detail against the box-filtered signal). Writes a PNG and returns it as
    an array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(history, list):
        with open(history, newline="") as fh:
            history = list(csv.DictReader(fh))
    binary = any(r.get(k) not in (None, "") for r in history for k in ("iou", "level_iou"))
    metric = "iou" if binary else "psnr"

    def series(key: str) -> list[tuple[float, float]]:
        return [
            (float(r["time"]), float(r[key]))
            for r in history
            if r.get(key) not in (None, "") and r.get("event") in ("iteration", "scale_end")
        ]

    full, level = series(metric), series(f"level_{metric}")
    if not full and not level:
        raise MinerError("the history holds no quality measurement to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    if level:
        t, q = zip(*level, strict=True)
        ax.plot(t, q, ".", color="tab:orange", label="coarse scale, on its own grid")
    if full:
        t, q = zip(*full, strict=True)
        ax.plot(t, q, marker=".", color="tab:blue", label="full grid")
    for r in history:
        if r.get("event") == "scale_end":
            ax.axvline(float(r["time"]), color="gray", linestyle=":", linewidth=1)
            ax.text(
                float(r["time"]),
                ax.get_ylim()[0],
                f" {r['scale']}",
                color="gray",
                fontsize=8,
                va="bottom",
            )
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("IoU (threshold 0.5)" if metric == "iou" else "PSNR (dB)")
    ax.set_title("quality against time; dotted: end of each scale")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save_figure(fig, Path(path))


def _save_figure(fig, path: Path) -> np.ndarray:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    _save_png(image, path)
    return image


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
