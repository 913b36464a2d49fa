"""``miner3d view --movie``: the levels of detail as a moving picture (GIF, or MP4 with
imageio-ffmpeg).

* An image model: a zoom from the whole picture into its centre, each frame at the
  continuous level of detail whose sample spacing matches its footprint (a mipmap's choice:
  :func:`miner3d.sampling.auto_lod`), so the coarse levels show the whole and the finest the
  detail.
* A 3D model: a turntable, the level of detail going continuously from the coarsest to the
  finest as the camera turns once around (occupancy: the surface at 0.5, extracted at each
  frame's fractional level; volume: a volume rendering of it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import MinerError
from .model import MinerModel

MOVIE_OUTPUTS = (".gif", ".mp4")


def image_zoom_frames(model: MinerModel, n_frames: int = 24, side: int = 256) -> list[np.ndarray]:
    """``n_frames`` frames ``(h, w, 3)`` uint8, ``side`` pixels on the longest side, of a zoom
    into the image's centre: frame ``i`` shows level ``t = top (1 - i / (n - 1))`` over a
    window ``2^(top - t)`` times smaller than the image, from the whole image at the coarsest
    level to the centre at the finest."""
    layout = model.layout
    height, width = layout.valid_shape(0)
    longest = max(height, width)
    out_h, out_w = max(1, round(side * height / longest)), max(1, round(side * width / longest))
    top = layout.n_scales - 1
    frames = []
    for i in range(n_frames):
        lod = top * (1 - i / max(1, n_frames - 1))  # coarse to fine, continuously
        zoom = 2.0 ** (top - lod)  # the window halves as the level does
        win_h, win_w = height / zoom, width / zoom
        rows = height / 2 + (np.arange(out_h) + 0.5 - out_h / 2) * win_h / out_h
        cols = width / 2 + (np.arange(out_w) + 0.5 - out_w / 2) * win_w / out_w
        grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
        values = model.query(grid, grid_coords=True, from_scale=lod).clamp(0, 1).cpu().numpy()
        frame = np.rint(values * 255).astype(np.uint8).reshape(out_h, out_w, -1)
        frames.append(_rgb(frame))
    return frames


def _rgb(frame: np.ndarray) -> np.ndarray:
    if frame.shape[-1] == 1:
        return np.repeat(frame, 3, axis=-1)
    return frame[..., :3]


def turntable_frames(model: MinerModel, n_frames: int = 24, size: int = 320) -> list[np.ndarray]:
    """``n_frames`` off-screen PyVista frames ``(size, size, 3)`` of a 3D model turning once
    around its vertical axis while its level of detail goes from the coarsest to the finest
    (surfaces of occupancy models at 0.5, sampled at up to 96 voxels; volume renderings of
    volume models at up to 64)."""
    from .extract import marching_cubes
    from .viz import _pyvista, polydata, volume_grid

    pv = _pyvista()
    top = model.layout.n_scales - 1
    plotter = pv.Plotter(off_screen=True, window_size=(size, size))
    frames, cache = [], {}
    bounds = None
    for i in range(n_frames):
        lod = round(top * (1 - i / max(1, n_frames - 1)) * 8) / 8  # 1/8 steps: reused meshes
        plotter.clear()
        if model.kind == "volume":
            grid, clim = volume_grid(model, lod, side=64)
            plotter.add_volume(grid, scalars="values", cmap="gray", clim=clim, opacity="sigmoid")
            plotter.remove_scalar_bar()
            bounds = bounds or grid.bounds
        else:
            if lod not in cache:
                try:
                    resolution = min(96, max(model.layout.shape))
                    cache[lod] = marching_cubes(model, lod, 0.5, resolution=max(8, resolution))
                except MinerError:  # this level has no surface
                    cache[lod] = None
            if cache[lod] is not None:
                vertices, faces = cache[lod]
                surface = polydata(vertices, faces)
                plotter.add_mesh(surface, color="tan", smooth_shading=True)
                bounds = bounds or surface.bounds
        plotter.add_text(f"lod {lod:.2f}", font_size=10)
        if bounds is not None:
            _orbit(plotter, bounds, 2 * math.pi * i / n_frames)
        frames.append(np.asarray(plotter.screenshot(return_img=True))[..., :3])
    plotter.close()
    return frames


def _orbit(plotter, bounds, angle: float) -> None:
    """Put the camera on a circle around the bounds' centre, at ``angle`` radians."""
    lo, hi = np.asarray(bounds[0::2]), np.asarray(bounds[1::2])
    centre, radius = (lo + hi) / 2, float(np.linalg.norm(hi - lo))
    up = int(np.argmax(hi - lo))  # the longest axis is "up" (Lucy stands along it)
    a, b = [k for k in range(3) if k != up]
    eye = centre.copy()
    eye[a] += 1.6 * radius * math.cos(angle)
    eye[b] += 1.6 * radius * math.sin(angle)
    eye[up] += 0.4 * radius
    view_up = [0.0, 0.0, 0.0]
    view_up[up] = 1.0
    plotter.camera_position = [tuple(eye), tuple(centre), tuple(view_up)]


def write_movie(model: MinerModel, path: str | Path, n_frames: int = 24, fps: int = 8) -> Path:
    """The levels-of-detail movie of ``model`` (see the module doc) to ``path`` (``.gif``;
    ``.mp4`` with imageio-ffmpeg), atomically. Memory: the frames (``n_frames`` small RGB
    pictures) and one level's mesh or volume at a time."""
    import imageio.v3 as iio

    from .io import atomic_write

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MOVIE_OUTPUTS:
        raise MinerError(f"a movie is {' or '.join(MOVIE_OUTPUTS)}, got '{ext or path.name}'")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise MinerError(
                ".mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); .gif works as it is"
            ) from None
    if n_frames < 2:
        raise MinerError(f"a movie needs at least 2 frames, got {n_frames}")
    if model.kind == "image":
        frames = image_zoom_frames(model, n_frames)
    else:
        frames = turntable_frames(model, n_frames)
    with atomic_write(path) as tmp:
        if ext == ".gif":
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
        else:  # ffmpeg picks its muxer by the name, which atomic_write ends in .mp4
            iio.imwrite(tmp, np.stack(frames), extension=".mp4", fps=fps)
    return path


def lod_explorer(model: MinerModel, off_screen: bool = False, resolution: int = 128):
    """A PyVista window on a 3D model with a slider over its level of detail (fractional):
    the surface at 0.5 of an occupancy model, a volume rendering of a volume model, redrawn
    at every move (sampled at up to ``resolution`` voxels). Returns ``(plotter, update)``;
    ``update(lod)`` is what the slider calls (and what a test can call off-screen)."""
    from .extract import marching_cubes
    from .viz import _pyvista, polydata, volume_grid

    pv = _pyvista()
    top = model.layout.n_scales - 1
    plotter = pv.Plotter(off_screen=off_screen)
    side = max(8, min(resolution, max(model.layout.shape)))

    def update(lod: float) -> None:
        lod = float(min(max(lod, 0.0), top))
        plotter.remove_actor("lod", render=False)
        if model.kind == "volume":
            grid, clim = volume_grid(model, lod, side=min(side, 96))
            plotter.add_volume(grid, scalars="values", cmap="gray", clim=clim, name="lod")
        else:
            try:
                vertices, faces = marching_cubes(model, lod, 0.5, resolution=side)
            except MinerError:  # no surface at this level
                return
            surface = polydata(vertices, faces)
            plotter.add_mesh(surface, color="tan", smooth_shading=True, name="lod")

    update(0.0)
    plotter.view_isometric()
    plotter.add_slider_widget(update, [0, top], value=0, title="level of detail")
    return plotter, update
