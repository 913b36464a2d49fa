"""One run, end to end: read the input, check the memory, fit, write the run directory.

:func:`run` is what :func:`miner3d.api.fit` and :func:`miner3d.api.resume` do once the
input, its kind and the config are settled. Ctrl-C (SIGINT) asks the fit to checkpoint and
stop; a second one interrupts at once.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import rundir
from .checkpoint import Checkpoint
from .config import RunConfig
from .distributed import Team, ignore_sigterm, lost_rank
from .errors import DivergedError, FitInterrupted, MinerError
from .grid import OccupancyGrid
from .io import file_sha256
from .kinds import Kind, Signal, read_signal, source_kind
from .memory import peak_rss, preflight
from .metrics import time_to
from .model import MinerModel
from .shards import save_checkpoint_of, share_signal
from .train import fit as train_fit

Progress = Callable[[dict[str, Any]], None]


def run_info(source: Any, path: Path | None, kind: Kind) -> dict[str, Any]:
    """``run.json``: where the input came from."""
    if path is not None:
        input_kind = source_kind(path, kind)
        sha = file_sha256(path)
        return {
            "source": str(path.resolve()),
            "sha256": sha,
            "kind": input_kind,
            "signal_kind": kind.name,
        }
    grid = isinstance(source, OccupancyGrid)
    data = source.occupancy if grid else np.ascontiguousarray(source)
    sha = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    input_kind = "grid" if grid else "array"
    return {"source": "<array>", "sha256": sha, "kind": input_kind, "signal_kind": kind.name}


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class StopFlag:
    """SIGINT, SIGTERM and SIGHUP (where it exists) ask the fit to stop: it writes a
    checkpoint at its next iteration and ends with exit status 128 + the signal's number. A
    second signal interrupts at once. Installed only in the main thread; the handlers that were
    there before are restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopFlag:
        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum

        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: the caller handles its signals
                break
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if exc is not None and lost_rank(exc):  # torchrun SIGTERMs this rank next
            ignore_sigterm()  # which must not cut off the line naming the lost rank


def _preflight(sig: Signal, cfg: RunConfig, max_memory: int | None, ranks: int = 1) -> None:
    """Refuse the fit before it allocates if its predicted peak (:mod:`miner3d.estimates`:
    signal, coarse fields, target cache, MLP banks with Adam's state for the predicted live
    blocks, activations) exceeds the budget. Several ranks: rank 0's peak (the largest)
    against ``max_memory`` per rank, else the memory available shared by the node's ranks."""
    from .blocks import BlockLayout
    from .estimates import fit_bytes, predicted_live_blocks
    from .memory import available_memory

    layout = BlockLayout(sig.shape, cfg.fit.block, cfg.fit.n_scales)
    held = 0 if isinstance(sig.data, np.memmap) else sig.data.nbytes
    live = predicted_live_blocks(sig.data, sig.kind.binary, layout)
    needed = sum(fit_bytes(layout, sig.channels, held, cfg.fit, live, ranks).values())
    if ranks > 1 and max_memory is None:
        max_memory = available_memory() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    hint = ""
    if sig.kind.name == "occupancy":
        fits = cfg.resolution
        while fits > 16 and needed * (fits / cfg.resolution) ** 3 > (max_memory or needed):
            fits //= 2
        if fits != cfg.resolution:
            hint = f"try --resolution {fits}"
    preflight(f"fitting {'x'.join(map(str, sig.shape))} samples", needed, max_memory, hint)


def run(
    sig: Signal | None,
    path: Path | None,
    kind: Kind,
    cfg: RunConfig,
    device,
    info: dict[str, Any],
    run_dir: Path | None,
    ckpt: Checkpoint | None,
    max_memory: int | None,
    progress: Progress | None,
    banner: Callable[[str], None] | None,
    *,
    team: Team | None = None,
) -> tuple[MinerModel, dict[str, Any], list[dict[str, Any]]]:
    """Read the input (unless ``sig`` is given), fit, and write the run directory (if any):
    the body of :func:`miner3d.api.fit` and :func:`miner3d.api.resume`. Returns the model,
    the summary (``summary.json``) and the history. Peak memory: the larger of the reading
    stage's (see :func:`miner3d.kinds.read_signal`) and the fit's (see
    :func:`miner3d.train.fit`), then one level of detail at a time for the outputs.

    With several ranks (``team``), every rank reads the input (a mesh is voxelized by rank
    0, which writes its voxels raw, ``grid.ranks.npy``, for every rank to memory-map until
    the run ends), fits its share, and rank 0 alone writes the run directory; checkpoints
    are one shard per rank plus rank 0's manifest."""
    import torch

    team = team or Team(device=device)

    t_start = time.perf_counter()
    previous = 0.0 if ckpt is None else float(ckpt.state.get("elapsed", 0.0))
    threads, n = "", 0
    if device.type == "cpu":
        from .memory import usable_cpus

        usable = usable_cpus()
        n = min(torch.get_num_threads(), usable)  # more oversubscribe (BENCHMARKS.md)
        torch.set_num_threads(n)
        threads = f", {n} thread{'s' * (n > 1)} of {usable} usable CPUs"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    if banner is not None:
        where = f" -> {run_dir}" if run_dir is not None else ""
        ranks = f" x {team.world_size} ranks" if team.active else ""
        at = ""
        if ckpt is not None:
            at = f" | resuming at scale {ckpt.state['scale']}, iteration {ckpt.state['iteration']}"
        banner(
            f"miner3d fit {path or '<array>'}{where} | preset {cfg.preset} | {device.type} "
            f"({name}{threads}){ranks} | torch {torch.__version__}{at}"
        )
    t0 = time.perf_counter()
    if sig is None:
        grid = None if run_dir is None else run_dir / rundir.GRID
        mapped = run_dir / rundir.RANK_GRID if team.active and run_dir is not None else None

        def read(first: bool) -> Signal:  # rank 0 voxelizes a mesh; the others reuse it
            return read_signal(
                path,
                kind,
                resolution=cfg.resolution,
                voxelizer=cfg.voxelizer,
                cube=cfg.cube,
                margin=cfg.margin,
                reuse_grid=None if ckpt is None and first else grid,
                save_grid=grid if first else None,
                mapped=mapped,
                max_memory=max_memory,
            )

        sig = share_signal(team, run_dir, read)  # several ranks: read once, mapped by all
    if device.type == "cpu" and torch.get_num_threads() != n:
        # numba's parallel voxelizer sets OpenMP's thread count, which torch's follows, to
        # every CPU: two torchrun ranks of OMP_NUM_THREADS=1 then trained on two threads
        # each, 2.4x slower (BENCHMARKS.md)
        torch.set_num_threads(n)
    load_seconds = time.perf_counter() - t0
    team.in_turn(lambda first: _preflight(sig, cfg, max_memory, team.world_size) if first else 0)
    writes = run_dir is not None and team.leader
    if writes and ckpt is None:  # the input is good: now the run's files
        rundir.remove_stale(run_dir)
        rundir.write_yaml(run_dir / rundir.CONFIG, cfg.to_dict())
        rundir.write_json(run_dir / rundir.RUN, info)
    log = None
    if writes:
        log = rundir.MetricsLog(
            run_dir / rundir.METRICS, None if ckpt is None else ckpt.state["history"]
        )

    history = [] if ckpt is None else list(ckpt.state["history"])

    def on_record(record: dict[str, Any]) -> None:
        if log is not None:
            log(record)
            history.append(record)
        if progress is not None:
            progress(record)

    def on_checkpoint(state: Checkpoint) -> None:
        state.state["run_config"] = cfg.to_dict()
        save_checkpoint_of(run_dir, state, team)
        if log is not None:
            log.rewrite(state.state["history"])

    meta = {"source": info["source"], "source_sha256": info["sha256"], **sig.info}
    about = {"input": info, "preset": cfg.preset, "device": f"{device.type} ({name})"}
    about["shape"] = list(sig.shape)  # summary.json's first keys, interrupted or not
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with StopFlag() as flag:
            result = train_fit(
                sig.data,
                cfg.fit,
                kind=kind,
                value_scale=sig.value_scale,
                value_offset=sig.value_offset,
                peak=sig.peak,
                transform=sig.transform,
                device=device,
                callback=on_record,
                meta=meta,
                checkpoint=None if run_dir is None else on_checkpoint,
                checkpoint_seconds=60 * cfg.checkpoint_minutes,
                checkpoint_iterations=cfg.checkpoint_iterations,
                resume=ckpt,
                should_stop=lambda: flag.requested,
                team=team,
            )
    except FitInterrupted as exc:
        name = signal.Signals(flag.signum).name if flag.signum else "a stop request"
        launcher = f"torchrun --nproc_per_node {team.world_size} -m " if team.active else ""
        where = f"; checkpoint saved; continue with: {launcher}miner3d fit --resume {run_dir}"
        error = FitInterrupted(f"{name}: {exc}{where if run_dir else ''}")
        error.exit_code = 128 + flag.signum if flag.signum else 130
        if writes:
            interrupted = {
                **about,
                "stopped": "interrupted",
                "stop_detail": str(error),
                **_last_measurement(history, kind),
                "seconds_load": round(load_seconds, 3),
                "seconds_total": round(previous + time.perf_counter() - t_start, 3),
                "peak_rss_bytes": peak_rss(),
                "versions": rundir.versions(),
            }
            rundir.write_json(run_dir / rundir.SUMMARY, interrupted)
        raise error from None
    except RuntimeError as exc:
        if not team.active or not lost_rank(exc):
            raise
        again = (
            f"; its last checkpoint is kept: torchrun --nproc_per_node {team.world_size} "
            f"-m miner3d fit --resume {run_dir}"
        )
        raise MinerError(
            f"rank {team.rank} of {team.world_size} lost contact with another rank (it failed "
            f"or was killed: see its message){again if run_dir else ''}"
        ) from None
    except DivergedError as exc:
        again = f"miner3d fit {path} -o {run_dir} --force" if path and run_dir else "a fit"
        lower = f"{min(cfg.fit.lr / 10, 1e-3):g}"
        raise DivergedError(f"{exc}; rerun with a lower lr: {again} --lr {lower}") from None
    finally:
        if log is not None:
            log.close()
    model = result.model
    t0 = time.perf_counter()
    outputs: list[str] = []
    if not team.leader:  # rank 0 writes and reports
        return model, result.summary, result.history
    if run_dir is not None:
        model_bytes = model.save(run_dir / rundir.MODEL).stat().st_size
        rundir.write_metrics_csv(run_dir / rundir.METRICS, result.history)
        outputs, meshes = rundir.write_levels(model, kind, run_dir, cfg.mesh_scales)
        outputs += rundir.write_pictures(model, kind, run_dir, result.history, meshes)
    else:
        model_bytes = model.nbytes_on_disk()
    ssim = None
    if kind.name == "image":
        from .evaluate import image_ssim

        ssim = image_ssim(model, sig.data, sig.value_scale)
    elif kind.name == "volume":
        from .evaluate import volume_ssim

        ssim = volume_ssim(model, sig.data, sig.peak / sig.value_scale)
    output_seconds = time.perf_counter() - t0
    samples = math.prod(sig.shape) * sig.channels
    reference = kind.reference_bytes(samples, sig.data.dtype.itemsize)
    summary = {
        **about,
        **result.summary,
        f"seconds_to_{kind.metric}": time_to(result.history, kind.metric, kind.thresholds),
        **({"ssim": ssim} if kind.lod_output in ("image", "volume") else {}),
        "model_bytes": model_bytes,
        "compression_ratio": reference / model_bytes,
        "compared_with": kind.reference,
        "seconds_load": round(load_seconds, 3),
        "seconds_fit": result.summary["seconds"],
        "seconds_outputs": round(output_seconds, 3),
        "seconds_total": round(previous + time.perf_counter() - t_start, 3),
        "peak_rss_bytes": max(peak_rss(), *(r["peak_rss_bytes"] for r in result.summary["ranks"])),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "outputs": outputs,
        "versions": rundir.versions(),
    }
    if run_dir is not None:
        rundir.write_json(run_dir / rundir.SUMMARY, summary)
        rundir.remove_checkpoints(run_dir)
        for raw in run_dir.glob(rundir.RANK_COPIES):
            raw.unlink()
    return model, summary, result.history


def _last_measurement(history: list[dict[str, Any]], kind: Kind) -> dict[str, Any]:
    """An interrupted fit's figures so far: ``seconds_to_*``, its latest measurement as
    ``measured_at`` (``{scale, iteration, time}`` and the figure: the full-grid metric at
    the finest scale, ``level_<metric>`` on a coarser scale's own grid), and the full-grid
    metric at the top level when that is what it was."""
    found: dict[str, Any] = {
        f"seconds_to_{kind.metric}": time_to(history, kind.metric, kind.thresholds)
    }
    for record in reversed(history):
        for key in (kind.metric, f"level_{kind.metric}"):
            if record.get(key) not in (None, ""):
                found["measured_at"] = {k: record.get(k) for k in ("scale", "iteration", "time")}
                found["measured_at"][key] = record[key]
                if key == kind.metric:
                    found[key] = record[key]
                return found
    return found
