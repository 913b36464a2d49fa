"""``miner3d eval``: how good a fitted 3D model is, every metric named exactly.

* ``iou_grid`` (per scale): full-grid IoU at threshold 0.5 of the reconstruction at that level
  of detail, upsampled to full resolution, against the voxel grid it was fitted to (the
  trainer's metric; ``iou_grid_04`` at threshold 0.4 as the official MINER code reports).
* ``iou_points`` (per scale): IoU over uniform random points in the source mesh's bounding
  box: the model's value at the point >= 0.5 against the source's inside test, which is the
  robust voxelizer at ``inside_resolution`` voxels (holed sources are judged fairly).
* ``chamfer`` / ``chamfer_pct_diag``: mean of both directions' mean nearest-neighbour
  distances between surface samples of the extracted mesh and of the source, in input units
  and as % of the source's bounding-box diagonal; ``fscore`` at 0.5 % of that diagonal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MinerError
from .metrics import MetricSums, chamfer_fscore
from .model import MinerModel
from .source import SignalSource

SSIM_MAX_SAMPLES = 1 << 24


def grid_iou(model: MinerModel, occupancy: np.ndarray, from_scale: int) -> MetricSums:
    """Streamed full-grid metric sums of level of detail ``from_scale`` against a grid."""
    layout = model.layout
    if tuple(occupancy.shape) != layout.shape:
        raise MinerError(f"grid shape {occupancy.shape} is not the model's {layout.shape}")
    source = SignalSource(occupancy[None], layout, "zero", device=model.device)
    return model.measure(source, from_scale, iou=True)


def image_ssim(model: MinerModel, image: np.ndarray, value_scale: float) -> float | None:
    """SSIM (``skimage.metrics.structural_similarity``, data range 1) of the finest
    reconstruction against ``image`` ``(C, H, W)`` (raw samples times ``value_scale`` in
    ``[0, 1]``); ``None`` for images of more than :data:`SSIM_MAX_SAMPLES` samples (skimage
    works on float64 copies, about 40 bytes per sample) or smaller than its 7 x 7 window."""
    from skimage.metrics import structural_similarity

    from .extract import render_image
    from .memory import available_memory

    image = np.moveaxis(np.asarray(image), 0, -1)  # (H, W, C)
    if image.size > SSIM_MAX_SAMPLES or min(image.shape[:2]) < 7:
        return None
    if 48 * image.size > available_memory():  # skimage's float64 copies would not fit
        return None
    recon = render_image(model, 0, dtype=np.uint16).astype(np.float32) / 65535
    truth = image.astype(np.float32) * value_scale
    if image.shape[-1] == 1:
        return float(structural_similarity(recon, truth[..., 0], data_range=1.0))
    return float(structural_similarity(recon, truth, data_range=1.0, channel_axis=-1))


def volume_ssim(model: MinerModel, volume: np.ndarray, peak: float) -> float | None:
    """3D SSIM (``skimage.metrics.structural_similarity`` on the whole volume, 7^3 windows) of
    the finest reconstruction against ``volume`` ``(C, X, Y, Z)`` in the input's units, with
    ``peak`` (PSNR's peak, input units) as the data range; the mean over channels. ``None`` for
    volumes over :data:`SSIM_MAX_SAMPLES` samples (float64 copies and the float32
    reconstruction, about 56 bytes a sample) or smaller than the window."""
    from skimage.metrics import structural_similarity

    from .dense import render_volume
    from .memory import available_memory

    volume = np.asarray(volume)
    if volume.size > SSIM_MAX_SAMPLES or min(volume.shape[1:]) < 7:
        return None
    if 56 * volume.size > available_memory():
        return None
    recon = render_volume(model, 0)
    recon = recon[None] if recon.ndim == 3 else np.moveaxis(recon, -1, 0)
    scores = [
        structural_similarity(r, v.astype(np.float32), data_range=peak)
        for r, v in zip(recon, volume, strict=True)
    ]
    return float(np.mean(scores))


def evaluate(
    model: MinerModel,
    occupancy: np.ndarray | None = None,
    mesh_path: str | Path | None = None,
    n_points: int = 1_000_000,
    n_surface: int = 100_000,
    inside_resolution: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics per scale: ``{"scales": {j: {...}}, ...}`` (see the module doc)."""
    from .extract import marching_cubes

    results: dict[str, Any] = {"scales": {}}
    rng = np.random.default_rng(seed)
    source = None
    if mesh_path is not None:
        import trimesh

        from .io import load_mesh
        from .voxelizer import voxelize

        source = load_mesh(mesh_path)
        lo, hi = source.bounds
        diag = float(np.linalg.norm(hi - lo))
        inside_grid = voxelize(source, inside_resolution)
        points = lo + rng.random((n_points, 3)) * (hi - lo)
        idx = np.floor(inside_grid.transform.world_to_grid(points)).astype(np.int64)
        idx = np.clip(idx, 0, np.array(inside_grid.shape) - 1)
        inside = inside_grid.occupancy[tuple(idx.T)].astype(bool)
        source_samples = trimesh.sample.sample_surface(
            trimesh.Trimesh(source.vertices, source.faces, process=False), n_surface, seed=seed
        )[0]
        results.update(
            source=str(mesh_path),
            n_points=n_points,
            n_surface=n_surface,
            diagonal=diag,
            fscore_threshold=0.005 * diag,
            inside_resolution=inside_resolution,
        )
    for j in range(model.layout.n_scales - 1, -1, -1):
        row: dict[str, Any] = {}
        if occupancy is not None:
            sums = grid_iou(model, occupancy, j)
            row.update(iou_grid=sums.iou(0), iou_grid_04=sums.iou(1))
        if source is not None:
            predicted = np.empty(n_points, dtype=bool)
            for start in range(0, n_points, 200_000):
                chunk = points[start : start + 200_000]
                predicted[start : start + len(chunk)] = (
                    model.query(chunk, from_scale=j)[:, 0].cpu().numpy() >= 0.5
                )
            union = np.count_nonzero(predicted | inside)
            row["iou_points"] = np.count_nonzero(predicted & inside) / union if union else 1.0
            try:
                vertices, faces = marching_cubes(model, scale=j)
            except MinerError:
                row["chamfer"] = None
            else:
                import trimesh

                ours = trimesh.Trimesh(vertices, faces, process=False)
                samples = trimesh.sample.sample_surface(ours, n_surface, seed=seed)[0]
                chamfer, fscore, precision, recall = chamfer_fscore(
                    samples, source_samples, results["fscore_threshold"]
                )
                row.update(
                    chamfer=chamfer,
                    chamfer_pct_diag=100 * chamfer / diag,
                    fscore=fscore,
                    precision=precision,
                    recall=recall,
                )
        results["scales"][str(j)] = row
    return results


def format_table(results: dict[str, Any]) -> list[str]:
    """The metrics as an aligned text table, one row per scale, columns named exactly."""
    columns = ["iou_grid", "iou_grid_04", "iou_points", "chamfer", "chamfer_pct_diag", "fscore"]
    present = [c for c in columns if any(c in r for r in results["scales"].values())]
    lines = ["scale " + " ".join(f"{c:>16}" for c in present)]
    for j, row in results["scales"].items():
        cells = []
        for c in present:
            v = row.get(c)
            cells.append(f"{'-' if v is None else format(v, '.6g'):>16}")
        lines.append(f"{j:>5} " + " ".join(cells))
    return lines
