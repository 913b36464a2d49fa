"""The files of a run directory, and the schema of ``summary.json``, in one place.

A run directory holds::

    config.yaml            the effective config (preset + overrides), written first
    run.json               the input (path, SHA-256, kind) so --resume finds it again
    grid.npz               the voxelized input (meshes), reused by --resume
    checkpoint.safetensors written at every scale switch and every few minutes (or
                           iterations), atomically; the one before is kept as
                           checkpoint.prev.safetensors; both removed when the fit completes
    .lock                  while a process writes the run: its host, PID and start time
    model.safetensors      the fitted model (tensors + JSON metadata)
    metrics.csv            one row per logged event, appended as the fit goes (tail -f it):
                           time, scale, iteration, loss, blocks, IoU; rewritten from the
                           checkpoint's history when a run resumes
    summary.json           the figures of the run (:data:`SUMMARY_KEYS`)
    mesh_scale<j>.ply      (occupancy) the surface at each level of detail, input coordinates
    recon_scale<j>.png     (images) the reconstruction at each level of detail
                           (volumes: none; `miner3d extract` writes any level on demand)
    levels.png, history.png  pictures: every level of detail; quality against time

Nothing is overwritten without ``force``; every file is written atomically (metrics.csv is
appended live, and rewritten atomically at every checkpoint and at the end). One process at a
time writes a run directory (:class:`RunLock`). Keys of ``summary.json`` keep their names and
meanings; later versions only add keys.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import MinerError, first_line
from .io import atomic_write
from .lock import LOCK, RunLock

CONFIG = "config.yaml"
RUN = "run.json"
GRID = "grid.npz"
RANK_GRID = "grid.ranks.npy"  # several ranks: the grid's raw voxels, memory-mapped by each
RANK_COPIES = "*.ranks.*"  # that, and any input's raw copy (:mod:`miner3d.shards`)
CHECKPOINT = "checkpoint.safetensors"
PREVIOUS_CHECKPOINT = "checkpoint.prev.safetensors"
MANIFEST = "checkpoint.json"
"""Several ranks: ``checkpoint.rank<r>.safetensors`` (and ``.prev``) per rank, and this
manifest of rank 0's (and ``checkpoint.prev.json``), see :mod:`miner3d.shards`."""
PREVIOUS_MANIFEST = "checkpoint.prev.json"
MODEL = "model.safetensors"
METRICS = "metrics.csv"
SUMMARY = "summary.json"

SUMMARY_KEYS: dict[str, str] = {
    "input": "the input: source path (or '<array>'), sha256, kind (mesh, grid, image, array)",
    "preset": "the preset the config started from",
    "device": "the device the fit ran on, e.g. 'cpu (x86_64)'",
    "shape": "the signal's spatial shape",
    "seconds": "the fit's wall time (over every session of a resumed run)",
    "finest_scale_fitted": "the finest scale fitted (0 unless a time limit stopped the fit)",
    "stopped": "why the fit ended: target, time_limit, or how its finest scale ended: plateau "
    "(of the loss, or of the measured quality: see fit.tail), max_iters or all_frozen (every "
    "block pruned or frozen), or interrupted (a signal; the checkpoint stays, and the summary "
    "holds only the input, stop_detail with the command that resumes, the latest "
    "measurement, measured_at, seconds_to_*, seconds_load, seconds_total, peak_rss_bytes and "
    "versions, until the resumed fit replaces it)",
    "measured_at": "interrupted fits: the latest measurement, {scale, iteration, time} and its "
    "figure (the full-grid metric, also given at the top level, or level_<metric> on a coarser "
    "scale's own grid)",
    "stop_detail": "when the quality plateau rule stopped the fit: what it saw",
    "scale_stop_reasons": "{scale: all_frozen, plateau, max_iters, target or time_limit}",
    "seconds_setup": "seconds building each scale's targets and banks (this session)",
    "seconds_fitting": "seconds of training iterations (this session)",
    "seconds_measuring": "seconds of quality measurements (this session): only the blocks "
    "still training are evaluated, the others' sums are kept",
    "world_size": "processes that fitted together (torchrun ranks; 1 for one process)",
    "ranks": "[{rank, host, seconds_fitting, mlp_blocks (its share of the scales fitted in "
    "this session), "
    "peak_rss_bytes (at the fit's end)}], one per rank",
    "before_rounding": "with fit.weights float16: the finest scale's figures before the "
    "weights were rounded (the top-level ones are the stored model's, measured again)",
    "params": "parameters of every MLP of the model",
    "scale_seconds": "{scale: seconds spent fitting it}",
    "scales": "{scale: quality at its end}: the finest scale's full-grid figures (iou, iou_04 "
    "or psnr), a coarser scale's on its own grid against the box-filtered signal (level_iou, "
    "level_iou_04 or level_psnr; full-grid too when a time limit ended the fit there)",
    "mlp_blocks": "{scale: blocks with an MLP}",
    "blocks": "{scale: blocks of the scale}",
    "iou": "occupancy: full-grid IoU at threshold 0.5 of the finest level fitted",
    "iou_04": "occupancy: the same at threshold 0.4 (as the official MINER code reports)",
    "psnr": "images: PSNR in dB of the finest level fitted",
    "ssim": "images and volumes: SSIM (volumes: 3D, data range = PSNR's peak) of the finest "
    "level (null over 16 M samples)",
    "seconds_to_iou": "occupancy: {threshold: first second the IoU reached it, or null}",
    "seconds_to_psnr": "images: {threshold in dB: first second the PSNR reached it, or null}",
    "model_bytes": "bytes of model.safetensors",
    "compression_ratio": "reference bytes / model bytes (> 1: the model is smaller)",
    "compared_with": "the reference of compression_ratio: bit-packed grid or raw samples",
    "seconds_load": "seconds to read (and voxelize) the input",
    "seconds_fit": "= seconds",
    "seconds_outputs": "seconds to write meshes, pictures and metrics",
    "seconds_total": "wall time of the whole run, every session of a resumed run included",
    "peak_rss_bytes": "peak resident memory of the (last) process; the largest rank's with several",
    "peak_gpu_bytes": "peak CUDA memory allocated, or null",
    "outputs": "the files written per level of detail and the pictures",
    "versions": "{miner3d, torch, numpy, python}",
}

METRIC_COLUMNS = (
    "time",
    "event",
    "scale",
    "iteration",
    "loss",
    "live_blocks",
    "mlp_blocks",
    "blocks",
    "params",
    "iou",
    "iou_04",
    "psnr",
    "level_iou",
    "level_psnr",
)


def write_json(path: Path, data: Any) -> None:
    """JSON, indented, atomically (numpy scalars and non-finite floats made plain)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """YAML, in the dict's order, atomically."""
    import yaml

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per history record, the columns of :data:`METRIC_COLUMNS`, atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


class MetricsLog:
    """``metrics.csv`` appended row by row as the fit logs (flushed, so ``tail -f`` follows
    it). ``history``: the rows to start from (a resumed run's checkpoint history), written
    atomically first."""

    def __init__(self, path: Path, history: list[dict[str, Any]] | None = None):
        self.path = path
        self._fh = None
        self.rewrite(history or [])

    def __call__(self, record: dict[str, Any]) -> None:
        self._writer.writerow(record)
        self._fh.flush()

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        """Replace the file by ``history`` atomically and go on appending to the new file."""
        self.close()
        write_metrics_csv(self.path, history)
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def save_run_checkpoint(
    run_dir: Path, checkpoint: Checkpoint, names: tuple[str, str] | None = None
) -> None:
    """Write the checkpoint (whole, then renamed), keeping the one before as
    ``checkpoint.prev``. ``checkpoint.safetensors`` never goes missing: the previous one is
    hard-linked to its new name before the new one replaces it (renamed, where the file
    system has no hard links), so a kill or a reader at any moment finds a whole checkpoint.
    ``names``: the current and previous file names (a rank's shards)."""
    names = names or (CHECKPOINT, PREVIOUS_CHECKPOINT)
    current = run_dir / names[0]
    staged = save_checkpoint(run_dir / f".{names[0]}.staged.tmp", checkpoint)
    if current.exists():
        previous = run_dir / f".{names[1]}.staged.tmp"
        previous.unlink(missing_ok=True)
        try:
            os.link(current, previous)
        except OSError:  # no hard links here: a brief moment with only the previous one
            os.replace(current, previous)
        os.replace(previous, run_dir / names[1])
    os.replace(staged, current)


def load_run_checkpoint(run_dir: Path) -> tuple[Checkpoint | None, str]:
    """The newest whole checkpoint of a run and a note (``""``, or which file was skipped and
    why); ``(None, "")`` when there is none. A checkpoint that fails its integrity check falls
    back to the previous one."""
    notes = []
    if (run_dir / MANIFEST).exists() or (run_dir / PREVIOUS_MANIFEST).exists():
        raise MinerError(
            f"{run_dir} was checkpointed by several ranks: resume it with torchrun and as many "
            "ranks (see its checkpoint.json)"
        )
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path), "; ".join(notes)
        except MinerError as exc:
            notes.append(f"skipped {name}: {exc}")
    if notes:
        raise MinerError(f"no usable checkpoint in {run_dir} ({'; '.join(notes)})")
    return None, ""


def remove_checkpoints(run_dir: Path) -> None:
    """Remove the checkpoints (a single process's, or the ranks' shards and manifests) and any
    temporary file a killed write left behind."""
    for path in checkpoint_files(run_dir):
        path.unlink(missing_ok=True)
    remove_temporaries(run_dir)


def shard_names(rank: int) -> tuple[str, str]:
    """Rank ``rank``'s current and previous checkpoint files."""
    return f"checkpoint.rank{rank}.safetensors", f"checkpoint.rank{rank}.prev.safetensors"


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Every checkpoint file of a run: a single process's, or the ranks' and manifests."""
    names = (CHECKPOINT, PREVIOUS_CHECKPOINT, MANIFEST, PREVIOUS_MANIFEST)
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    return found + sorted(run_dir.glob("checkpoint.rank*.safetensors"))


def remove_temporaries(run_dir: Path) -> None:
    """Remove the ``.<name>.*.tmp[<suffix>]`` files of atomic writes that a kill interrupted."""
    for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.tmp.*")]:
        tmp.unlink(missing_ok=True)


def default_run_dir(stem: str) -> Path:
    """``runs/<stem>-<local time>``."""
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run_dir(output: Path, force: bool, break_lock: bool = False) -> tuple[RunLock, bool]:
    """Create (or, with ``force``, reuse) a run directory and take its lock; returns the lock
    and whether the directory was created. A clear error if another process holds the lock, if
    the directory has a run in it (without ``force``), is a file, or cannot be written. Nothing
    in it is removed here: stale files go only once the new input has been read
    (:func:`remove_stale`)."""
    if output.exists() and not output.is_dir():
        raise MinerError(f"{output} exists and is not a directory")
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MinerError(f"cannot write to {output}: {exc.strerror or exc}") from None
    lock = RunLock(output, break_lock).acquire()
    try:
        if any(p.name != LOCK for p in output.iterdir()) and not force:
            raise MinerError(
                f"run directory {output} exists; pass --resume {output} to continue "
                "it or --force to overwrite it"
            )
    except BaseException:
        lock.release()
        raise
    return lock, created


def remove_stale(run_dir: Path) -> None:
    """Remove what an earlier run left that the new one would not overwrite at once (its
    model, checkpoints, summary, temporary files)."""
    for name in (MODEL, SUMMARY):
        (run_dir / name).unlink(missing_ok=True)
    remove_checkpoints(run_dir)


def discard_failed(run_dir: Path, created: bool, since: float) -> None:
    """After a fit that failed before its first checkpoint: remove the files it wrote (those
    modified at or after ``since``, a ``time.time()``), and the directory if it made it, so
    that the same command can simply be run again; an earlier run's files stay."""
    if checkpoint_files(run_dir):
        return
    for path in [*(run_dir / n for n in (CONFIG, RUN, GRID, METRICS)), *run_dir.glob(RANK_COPIES)]:
        if path.exists() and path.stat().st_mtime >= since:
            path.unlink()
    remove_temporaries(run_dir)
    if created:
        try:
            run_dir.rmdir()
        except OSError:  # not empty: something else is in it
            pass


def read_run(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run to resume; a clear error if ``run_dir`` is not a run, is
    complete, or its ``run.json`` is malformed."""
    run_file = run_dir / RUN
    if not run_file.is_file():
        raise MinerError(f"{run_dir} is not a miner3d run directory (no {RUN})")
    has_checkpoint = (run_dir / CHECKPOINT).is_file() or (run_dir / PREVIOUS_CHECKPOINT).is_file()
    if not has_checkpoint and (run_dir / MODEL).is_file():
        raise MinerError(f"{run_dir} is complete; nothing to resume")
    try:
        info = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise MinerError(f"could not read {run_file}: {first_line(exc)}") from None
    if not isinstance(info, dict) or not all(
        isinstance(info.get(key), str) for key in ("source", "sha256")
    ):
        raise MinerError(f"{run_file} is malformed: it must name the source and its sha256")
    return info


def write_levels(model, kind, run_dir: Path, which: str) -> tuple[list[str], dict]:
    """A mesh (occupancy) or a picture (image) per level of detail: ``which`` is ``all``,
    ``finest`` or ``none``. Returns the names written (or why a level has none) and the
    meshes ``{scale: (vertices, faces)}`` for the pictures. Memory: one level at a time
    (see :func:`miner3d.extract.marching_cubes` and :func:`miner3d.extract.render_image`)."""
    from .extract import marching_cubes, save_image, save_mesh

    scales = {"all": list(range(model.layout.n_scales)), "finest": [0], "none": []}[which]
    written, meshes = [], {}
    if kind.lod_output == "volume":
        return [], meshes  # dense volumes are large: `miner3d extract` writes them on demand
    for j in scales:
        if kind.lod_output == "mesh":
            try:
                vertices, faces = marching_cubes(model, scale=j)
            except MinerError as exc:  # this level of detail has no surface
                written.append(f"(no mesh at scale {j}: {exc})")
                continue
            written.append(save_mesh(vertices, faces, run_dir / f"mesh_scale{j}.ply").name)
            meshes[j] = (vertices, faces)
        else:
            written.append(save_image(model, run_dir / f"recon_scale{j}.png", j).name)
    return written, meshes


def write_pictures(
    model, kind, run_dir: Path, history: list[dict[str, Any]], meshes: dict
) -> list[str]:
    """``levels.png`` (every level of detail beside its blocks) and ``history.png`` (quality
    against time). A picture that cannot be drawn (no OpenGL) is reported, not fatal."""
    from .viz import plot_history, render_image_levels, render_levels, render_volume_levels

    written = []
    try:
        if kind.lod_output == "mesh":
            render_levels(model, run_dir / "levels.png", meshes=meshes)
        elif kind.lod_output == "volume":
            render_volume_levels(model, run_dir / "levels.png")
        else:
            render_image_levels(model, run_dir / "levels.png")
        written.append("levels.png")
    except Exception as exc:  # a missing display library must not lose the fit
        written.append(f"(levels.png not drawn: {type(exc).__name__}: {exc})")
    try:
        plot_history(history, run_dir / "history.png")
        written.append("history.png")
    except Exception as exc:  # as above
        written.append(f"(history.png not drawn: {type(exc).__name__}: {exc})")
    return written


def versions() -> dict[str, str]:
    """The versions ``summary.json`` records."""
    import torch

    from .version import __version__

    return {
        "miner3d": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
