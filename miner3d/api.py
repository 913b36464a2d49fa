"""The Python entry points: :func:`fit`, :func:`resume`, :func:`load`, :func:`voxelize`.

::

    import miner3d
    result = miner3d.fit("meshes/teapot.obj", resolution=64)   # presets and overrides as the CLI
    result.model, result.summary["iou"]
    model = miner3d.load("runs/demo/model.safetensors")
    model.query(points)          # (P, d) points in the input's coordinates -> (P, C) numpy
    model.query(points, lod=1)   # level of detail j: the scales >= j
    model.mesh(lod=0)            # trimesh.Trimesh (occupancy; volumes: pass level=)
    model.image(lod=0)           # (H, W, C) numpy (image models)
    model.volume(lod=0)          # (X, Y, Z) numpy in the input's units (volume models)
    grid = miner3d.voxelize("meshes/teapot.obj", 128)   # OccupancyGrid

:func:`fit` without ``output`` writes nothing to disk; with ``output=DIR`` it writes a run
directory (:mod:`miner3d.rundir`) exactly as ``miner3d fit -o DIR`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import pipeline, rundir
from .checkpoint import Checkpoint
from .config import RunConfig, build_config, default_preset, override_key
from .distributed import joined, pick_device
from .errors import FitInterrupted, MinerError
from .facade import Model
from .grid import OccupancyGrid
from .io import file_sha256
from .kinds import OCCUPANCY, Kind, Signal, get_kind, kind_of_path, value_scale, volume_signal
from .memory import parse_size
from .model import MinerModel
from .resources import default_mesh
from .shards import load_rank_checkpoint

Progress = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    """What :func:`fit` returns: the model, the summary (``summary.json``'s keys), the history
    (``metrics.csv``'s rows) and the run directory (``None`` without ``output``)."""

    model: Model | None
    """``None`` on the ranks other than 0 of a torchrun fit (rank 0 holds the whole model)."""
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


def _wrap(model: MinerModel | None) -> Model | None:
    return None if model is None else Model(model)


def load(path: str | Path, device: str = "cpu") -> Model:
    """A model written by ``miner3d fit`` (``model.safetensors``)."""
    return Model(MinerModel.load(path, device))


def voxelize(mesh: str | Path, resolution: int = 128, **options: Any) -> OccupancyGrid:
    """A solid occupancy grid of a mesh file (see :func:`miner3d.voxelizer.voxelize_file` for
    ``method``, ``cube``, ``margin``, ``max_memory``)."""
    from .voxelizer import voxelize_file

    return voxelize_file(mesh, resolution, **options)


def fit(
    source: str | Path | OccupancyGrid | np.ndarray | None = None,
    *,
    kind: str | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    break_lock: bool = False,
    max_memory: int | str | None = None,
    progress: Progress | None = None,
    banner: Callable[[str], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit a model to a mesh, grid, image or volume file, an :class:`OccupancyGrid`, or an
    array.

    Args:
        source: a path (the kind follows the extension and the shape), an
            :class:`OccupancyGrid`, or a numpy array with an explicit ``kind`` (image
            ``(H, W)`` / ``(H, W, C)``; occupancy or volume ``(X, Y, Z)``). ``None``: Lucy.
        kind: ``occupancy``, ``image`` or ``volume``: overrides the detection.
        preset, config: a preset name, or a YAML config file (default: by kind and device).
        output: a run directory to write (locked while the fit runs); ``None`` writes
            nothing to disk.
        force: overwrite an existing run directory (its old files go only once the new
            input has been read).
        break_lock: take the run directory's lock even if another host's process holds it.
        max_memory: memory budget (bytes or ``"8GB"``); the fit is refused before allocating.
        progress: called with every history record.
        banner: called once with a line describing the run.
        **overrides: config fields, e.g. ``resolution=64``, ``lr=2e-3``, ``fit.n_scales=4``.

    SIGINT, SIGTERM and SIGHUP (in the main thread) make the fit checkpoint (with ``output``)
    and raise :class:`~miner3d.errors.FitInterrupted`.

    Started by ``torchrun`` with several ranks, every rank calls this with the same
    arguments: the ranks share each scale's blocks (:mod:`miner3d.distributed`), rank 0
    alone writes ``output`` (its name is rank 0's) and reports, and returns the whole model;
    the other ranks return ``model=None`` (each held only its blocks and their halo). The
    process group ends with the call, unless the caller had started it.
    """
    budget = _budget(max_memory)
    signal_in, path, the_kind = _source(source, kind)
    cfg = _config(the_kind, preset, config, overrides, signal_in)
    with joined(pick_device(cfg.device)) as (team, device):  # before anything is written
        if not team.leader:
            progress = banner = None
        info = pipeline.run_info(source, path, the_kind)
        args = (signal_in, path, the_kind, cfg, device, info)
        if output is None:
            model, summary, history = pipeline.run(
                *args, None, None, budget, progress, banner, team=team
            )
            return FitResult(_wrap(model), summary, history, None)
        run_dir = Path(team.broadcast_text(str(output)))
        started = time.time() - 1e-3

        def open_dir(first: bool) -> tuple[rundir.RunLock | None, bool]:
            return rundir.open_run_dir(run_dir, force, break_lock) if first else (None, False)

        lock, created = team.in_turn(open_dir)
        try:
            model, summary, history = pipeline.run(
                *args, run_dir, None, budget, progress, banner, team=team
            )
        except BaseException as exc:
            if lock is not None:
                lock.release()  # first: discarding may remove the directory
                if not isinstance(exc, FitInterrupted):  # an interrupted run keeps its checkpoint
                    rundir.discard_failed(run_dir, created, started)
            raise
        finally:
            if lock is not None:
                lock.release()
        return FitResult(_wrap(model), summary, history, run_dir)


RESUME_CHANGES = (
    "fit.time_limit",
    "fit.target",
    "fit.lr",
    "checkpoint_minutes",
    "checkpoint_iterations",
)
"""What ``resume`` may change: when to stop, and the learning rate from the next scale on
(plus how often to checkpoint); anything else would not be the same fit."""


def resume(
    run_dir: str | Path,
    *,
    allow_changed_input: bool = False,
    break_lock: bool = False,
    max_memory: int | str | None = None,
    progress: Progress | None = None,
    banner: Callable[[str], None] | None = None,
    **changes: Any,
) -> FitResult:
    """Continue an interrupted run from its newest whole checkpoint (the previous one if the
    newest is corrupt), after checking that the input file is the one fitted (its SHA-256,
    unless ``allow_changed_input``) and that ``config.yaml``, ``grid.npz`` and the checkpoint
    describe the same fit. ``changes``: only ``time_limit``, ``target``, ``lr`` (from the next
    scale on) and ``checkpoint_minutes`` / ``checkpoint_iterations``."""
    from .io import check_input_file

    run_dir = Path(run_dir)
    budget = _budget(max_memory)
    values = {override_key(k): v for k, v in changes.items()}
    for key in values:
        if key not in RESUME_CHANGES:
            names = ", ".join(name.removeprefix("fit.") for name in RESUME_CHANGES)
            raise MinerError(f"a resumed run may change only {names}; not {key}")
    if not run_dir.is_dir():
        raise MinerError(f"{run_dir} is not a miner3d run directory")
    rundir.read_run(run_dir)  # not a run: its own error, before its config is read
    cfg = build_config(config_file=run_dir / rundir.CONFIG, overrides=values)
    with joined(pick_device(cfg.device)) as (team, device):
        if not team.leader:
            progress = banner = None

        def take_lock(first: bool) -> rundir.RunLock | None:  # rank 0 holds the run's lock
            return rundir.RunLock(run_dir, break_lock).acquire() if first else None

        lock = team.in_turn(take_lock)
        try:
            info = rundir.read_run(run_dir)  # again, now that the run is ours
            if info["source"] == "<array>":
                raise MinerError(f"{run_dir} was fitted from an in-memory array; only files resume")
            path = check_input_file(Path(info["source"]))
            if not allow_changed_input and file_sha256(path) != info["sha256"]:
                raise MinerError(
                    f"{path} changed since {run_dir} started (SHA-256 differs); pass "
                    "--allow-changed-input to continue with the new file anyway"
                )
            the_kind = get_kind(info.get("signal_kind") or kind_of_path(path))
            ckpt, note = load_rank_checkpoint(run_dir, team)  # resharded for another world size
            if note and banner is not None:
                banner(f"note: {note}")
            _check_resume(run_dir, cfg, ckpt, info)
            if team.leader:
                if values:
                    rundir.write_yaml(run_dir / rundir.CONFIG, cfg.to_dict())
                rundir.remove_temporaries(run_dir)
            model, summary, history = pipeline.run(
                None,
                path,
                the_kind,
                cfg,
                device,
                info,
                run_dir,
                ckpt,
                budget,
                progress,
                banner,
                team=team,
            )
        finally:
            if lock is not None:
                lock.release()
        return FitResult(_wrap(model), summary, history, run_dir)


def _budget(max_memory: int | str | None) -> int | None:
    """``max_memory`` in bytes (``None``: what is available); a one-line error if not a size."""
    if max_memory is None:
        return None
    try:
        return parse_size(max_memory)
    except ValueError as exc:
        raise MinerError(f"max_memory: {exc}") from None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resume(run_dir: Path, cfg: RunConfig, ckpt: Checkpoint | None, info: dict) -> None:
    """One line naming the first field in which ``config.yaml``, ``grid.npz`` and the
    checkpoint disagree."""
    if ckpt is not None and isinstance(ckpt.state.get("run_config"), dict):
        saved = _flat(ckpt.state["run_config"])
        for key, value in _flat(cfg.to_dict()).items():
            if key in RESUME_CHANGES or key in ("preset", "device"):
                continue
            if key in saved and saved[key] != value:
                raise MinerError(
                    f"config.yaml of {run_dir} no longer matches its checkpoint: {key} is "
                    f"{value!r}, the checkpoint was fitted with {saved[key]!r}"
                )
    grid = run_dir / rundir.GRID
    if info.get("kind") == "mesh" and grid.exists():
        meta = OccupancyGrid.read_header(grid)[0]["meta"]  # the voxels are read once, later
        expected = {
            "resolution": cfg.resolution,
            "method": cfg.voxelizer,
            "cube": cfg.cube,
            "margin": cfg.margin,
        }
        for key, value in expected.items():
            if key in meta and meta[key] != value:
                name = "voxelizer" if key == "method" else key
                raise MinerError(
                    f"grid.npz of {run_dir} was voxelized with {key} {meta[key]!r}, but "
                    f"config.yaml says {name} {value!r}"
                )


def effective_config(
    source: Any = None,
    kind: str | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The config :func:`fit` would use for these arguments (``fit --print-config``); reads
    nothing but the config files."""
    if source is None or isinstance(source, str | Path):
        the_kind = get_kind(kind) if kind else kind_of_path(Path(source or default_mesh()))
    else:
        the_kind = get_kind(kind or "occupancy")
    return _config(the_kind, preset, config, overrides or {})


def _config(
    kind: Kind,
    preset: str | None,
    config: Any,
    overrides: dict[str, Any],
    signal: Signal | None = None,
) -> RunConfig:
    """The effective config; without a preset or config file, the default preset for the
    kind, the device and the grid's size: the longest axis of an in-memory ``signal``, else
    the ``resolution`` a mesh is voxelized at (the ``cpu`` preset's 128 when not given)."""
    values = {override_key(k): v for k, v in overrides.items()}
    if preset is None and config is None:
        import torch

        cuda = values.get("device", "auto") != "cpu" and torch.cuda.is_available()
        size = max(signal.data.shape[1:]) if signal is not None else 0
        size = size or int(values.get("resolution", 0) or 0)
        preset = default_preset(kind.name, cuda, size)
    return build_config(preset, config, values)


def _source(source: Any, kind: str | None) -> tuple[Signal | None, Path | None, Kind]:
    """The input as (an in-memory signal or a path to read, its kind)."""
    if source is None:
        source = default_mesh()
    if isinstance(source, str | Path):
        from .io import check_input_file

        path = check_input_file(source)
        return None, path, get_kind(kind) if kind else kind_of_path(path)
    if isinstance(source, OccupancyGrid):
        the_kind = get_kind(kind or "occupancy")
        if the_kind is not OCCUPANCY:
            raise MinerError("an OccupancyGrid is an occupancy signal")
        info = {"kind": "grid", "grid_shape": list(source.shape)}
        return Signal(source.occupancy[None], the_kind, 1.0, source.transform, info), None, the_kind
    if isinstance(source, np.ndarray):
        if kind is None:
            raise MinerError(
                f"an array of shape {source.shape} is ambiguous: pass kind='image' "
                "((H, W) or (H, W, C)) or kind='occupancy' ((X, Y, Z))"
            )
        the_kind = get_kind(kind)
        data = the_kind.as_signal(source)
        info = {"kind": "array", "dtype": str(data.dtype), "shape": list(data.shape)}
        if the_kind.name == "volume":
            return volume_signal(data, None, info, "the array"), None, the_kind
        return Signal(data, the_kind, value_scale(data.dtype), None, info), None, the_kind
    raise MinerError(f"cannot fit a {type(source).__name__}: give a path, a grid or an array")
