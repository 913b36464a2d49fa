"""``miner3d fit`` end to end: input, run directory, checkpoints, outputs, summary.

A run directory holds::

    config.yaml            the effective config (preset + overrides), written first
    run.json               the input (path, SHA-256, kind) so --resume finds it again
    grid.npz               the voxelized input (meshes), reused by --resume
    checkpoint.safetensors written at every scale switch and every few minutes, atomically;
                           removed when the fit completes
    model.safetensors      the fitted model (tensors + JSON metadata)
    metrics.csv            one row per logged event: time, scale, iteration, loss, blocks, IoU
    summary.json           final quality per scale, parameters, bytes, times, memory, versions
    mesh_scale<j>.ply      the surface at each level of detail, in the input's coordinates
    recon_scale<j>.png     (images) the reconstruction at each level of detail

Nothing is overwritten without ``--force``; every file is written atomically.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, build_config
from .errors import MinerError
from .io import (
    MESH_EXTENSIONS,
    atomic_write,
    file_sha256,
    read_safetensors,
    write_safetensors,
)
from .memory import format_size, peak_rss, preflight
from .metrics import time_to
from .train import FitConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "meshes" / "lucy.ply"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
GRID_EXTENSIONS = (".npz",)
CHECKPOINT = "checkpoint.safetensors"


def input_kind(path: Path) -> str:
    """``mesh``, ``grid`` or ``image`` by extension; a clear error otherwise."""
    ext = path.suffix.lower()
    if ext in MESH_EXTENSIONS:
        return "mesh"
    if ext in GRID_EXTENSIONS:
        return "grid"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    known = ", ".join(MESH_EXTENSIONS + GRID_EXTENSIONS + IMAGE_EXTENSIONS)
    raise MinerError(f"unknown input extension '{ext or path.name}' (known: {known})")


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


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
)


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(path: Path, checkpoint) -> None:
    write_safetensors(path, checkpoint.tensors, "miner3d-checkpoint", checkpoint.state)


def load_checkpoint(path: Path):
    from .train import Checkpoint

    state, tensors = read_safetensors(path, "miner3d-checkpoint", "checkpoint")
    return Checkpoint(tensors, state)


@dataclass
class Signal:
    """What the fit sees: the array, how to read it, and where it came from."""

    data: Any  # occupancy (*S) uint8, or image (C, H, W)
    occupancy: bool
    value_scale: float
    transform: Any
    info: dict[str, Any]


def estimate_fit_bytes(
    padded_samples: int, channels: int, ndim: int, signal_bytes: int, fit: FitConfig
) -> int:
    """Peak bytes of a fit (see :func:`miner3d.train.fit`): the signal held in memory
    (``signal_bytes``, 0 for a memory map), the float16 residual fields of scales >= 1
    (``2 / (2^d - 1)`` bytes per sample and channel) with scale 1's cached targets
    (``2 / 2^d`` at most), one chunk of activations, and 256 MiB for torch itself. The MLP
    banks are not counted (their size depends on how much the fit prunes)."""
    coarse = 2 / (2**ndim - 1) + (2 / 2**ndim if fit.n_scales > 1 else 0)
    activations = fit.batch_samples * (3 * fit.hidden_layers + 2) * max(fit.hidden, channels) * 4
    return int(signal_bytes + padded_samples * channels * coarse + activations) + 256 * 2**20


def _map_tiff(path: Path) -> np.ndarray | None:
    """An uncompressed, contiguous single-image TIFF as a read-only memory map ``(C, H, W)``
    (a view: nothing is read until the fit asks for blocks), or ``None`` when the file cannot
    be mapped (compressed, tiled, several pages, not a TIFF): it is then decoded instead."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        mapped = tifffile.memmap(path, mode="r")
    except Exception:  # not mappable: the decoder reports what is wrong, if anything
        return None
    if axes == "YX":
        return mapped[None]
    if axes == "YXS":
        return np.moveaxis(mapped, -1, 0)
    if axes == "SYX":
        return mapped
    return None


def _read_image(path: Path) -> Signal:
    from skimage import io as skio

    image = _map_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else None
    mapped = image is not None
    if image is None:
        try:
            image = np.asarray(skio.imread(path))
        except Exception as exc:  # any decoder failure is the file's fault
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MinerError(f"could not read image {path}: {reason}") from None
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3:
            image = np.ascontiguousarray(np.moveaxis(image, -1, 0))
        else:
            raise MinerError(f"image {path} has shape {image.shape}; expected (H, W) or (H, W, C)")
    if image.dtype == np.uint8:
        scale = 1 / 255
    elif image.dtype == np.uint16:
        scale = 1 / 65535
    elif np.issubdtype(image.dtype, np.floating):
        image, scale = (image if image.dtype == np.float32 else image.astype(np.float32)), 1.0
    else:
        raise MinerError(f"image {path} has unsupported sample type {image.dtype}")
    info = {
        "kind": "image",
        "dtype": str(image.dtype),
        "shape": list(image.shape),
        "memory_mapped": mapped,
    }
    return Signal(image, False, scale, None, info)


def load_signal(path: Path, config: RunConfig, run_dir: Path, max_memory: int | None) -> Signal:
    """Read the input: voxelize a mesh (saving ``grid.npz`` in the run), load a grid, or read
    an image."""
    from .grid import OccupancyGrid
    from .voxelize import voxelize_file

    kind = input_kind(path)
    if kind == "image":
        return _read_image(path)
    grid_path = run_dir / "grid.npz"
    if kind == "grid":
        grid = OccupancyGrid.load(path)
    elif grid_path.exists():  # a resumed run reuses its own voxelization
        grid = OccupancyGrid.load(grid_path)
    else:
        grid = voxelize_file(
            path,
            config.resolution,
            method=config.voxelizer,
            cube=config.cube,
            margin=config.margin,
            max_memory=max_memory,
        )
        grid.save(grid_path)
    if grid.occupancy.ndim != 3:
        raise MinerError(f"{path} holds a {grid.occupancy.ndim}D grid; expected 3D")
    info = {
        "kind": kind,
        "grid_shape": list(grid.shape),
        "filled_fraction": grid.filled_fraction,
        "voxelize": grid.meta,
    }
    return Signal(grid.occupancy, True, 1.0, grid.transform, info)


def _new_run_dir(source: Path, output: Path | None, force: bool) -> Path:
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = Path("runs") / f"{source.stem}-{stamp}"
    if output.exists() and not output.is_dir():
        raise MinerError(f"{output} exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not force:
        raise MinerError(
            f"run directory {output} exists; pass --resume {output} to continue "
            "it or --force to overwrite it"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MinerError(f"cannot write to {output}: {exc.strerror or exc}") from None
    if force:
        for stale in ("grid.npz", CHECKPOINT, "model.safetensors"):
            (output / stale).unlink(missing_ok=True)
    return output


class _StopFlag:
    """SIGINT sets the flag (the fit checkpoints and stops at the next iteration); a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_fit(
    source: Path | None = None,
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    output: Path | None = None,
    force: bool = False,
    resume: Path | None = None,
    max_memory: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    banner: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit a mesh, grid or image into a run directory; returns the summary (also written to
    ``summary.json``)."""
    import torch

    from .train import FitInterrupted, fit, pick_device

    say = banner or (lambda text: None)
    t_start = time.perf_counter()
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        run_file = run_dir / "run.json"
        if not run_file.is_file():
            raise MinerError(f"{run_dir} is not a miner3d run directory (no run.json)")
        run_info = json.loads(run_file.read_text())
        source = Path(run_info["source"])
        config = build_config(config_file=run_dir / "config.yaml")
        if (run_dir / CHECKPOINT).is_file():
            checkpoint = load_checkpoint(run_dir / CHECKPOINT)
        elif (run_dir / "model.safetensors").is_file():
            raise MinerError(f"{run_dir} is complete; nothing to resume")
    else:
        source = Path(source) if source is not None else DEFAULT_INPUT
        if not source.exists():
            raise MinerError(f"input not found: {source}")
        kind = input_kind(source)
        if preset is None and config_file is None:
            wants_cuda = (overrides or {}).get("device", "auto")
            on_gpu = torch.cuda.is_available() and wants_cuda != "cpu"
            preset = "image" if kind == "image" else ("lucy" if on_gpu else "cpu")
        config = build_config(preset, config_file, overrides)
        run_dir = _new_run_dir(source, output, force)
        run_info = {"source": str(source.resolve()), "sha256": file_sha256(source), "kind": kind}
        write_yaml(run_dir / "config.yaml", config.to_dict())
        write_json(run_dir / "run.json", run_info)
    device = pick_device(config.device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    say(
        f"miner3d fit {source} -> {run_dir} | preset {config.preset} | {device.type} "
        f"({name}{threads}) | torch {torch.__version__}"
        + (
            f" | resuming at scale {checkpoint.state['scale']}, iteration "
            f"{checkpoint.state['iteration']}"
            if checkpoint
            else ""
        )
    )

    t0 = time.perf_counter()
    sig = load_signal(source, config, run_dir, max_memory)
    load_seconds = time.perf_counter() - t0
    from .blocks import BlockLayout

    shape = sig.data.shape if sig.occupancy else sig.data.shape[1:]
    channels = 1 if sig.occupancy else sig.data.shape[0]
    layout = BlockLayout(tuple(shape), config.fit.block, config.fit.n_scales)
    held = 0 if isinstance(sig.data, np.memmap) else sig.data.nbytes
    needed = estimate_fit_bytes(math.prod(layout.padded), channels, len(shape), held, config.fit)
    hint = ""
    if sig.occupancy:
        fits = config.resolution
        while fits > 16 and needed * (fits / config.resolution) ** 3 > (max_memory or needed):
            fits //= 2
        if fits != config.resolution:
            hint = f"try --resolution {fits}"
    preflight(f"fitting {'x'.join(map(str, shape))} samples", needed, max_memory, hint)

    history: list[dict[str, Any]] = []

    def on_record(record: dict[str, Any]) -> None:
        history.append(record)
        if progress is not None:
            progress(record)

    def on_checkpoint(ckpt) -> None:
        save_checkpoint(run_dir / CHECKPOINT, ckpt)
        write_metrics_csv(run_dir / "metrics.csv", ckpt.state["history"])

    meta = {"source": run_info["source"], "source_sha256": run_info["sha256"], **sig.info}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _StopFlag() as flag:
        try:
            result = fit(
                sig.data,
                config.fit,
                occupancy=sig.occupancy,
                value_scale=sig.value_scale,
                transform=sig.transform,
                device=device,
                callback=on_record,
                meta=meta,
                checkpoint=on_checkpoint,
                checkpoint_seconds=60 * config.checkpoint_minutes,
                resume=checkpoint,
                stop_requested=lambda: flag.requested,
            )
        except FitInterrupted as exc:
            raise FitInterrupted(
                f"{exc}; checkpoint saved; continue with: miner3d fit --resume {run_dir}"
            ) from None
    fit_seconds = result.summary["seconds"]
    model_path = result.model.save(run_dir / "model.safetensors")
    write_metrics_csv(run_dir / "metrics.csv", result.history)

    t0 = time.perf_counter()
    meshes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    outputs = write_levels(result.model, run_dir, config, sig, meshes)
    outputs += write_pictures(result.model, run_dir, result.history, meshes)
    ssim = None if sig.occupancy else image_ssim(result.model, sig)
    output_seconds = time.perf_counter() - t0

    thresholds = (0.99, 0.995, 0.999) if sig.occupancy else (30.0, 35.0, 40.0)
    metric = "iou" if sig.occupancy else "psnr"
    reached = time_to(result.history, metric, thresholds)
    samples = math.prod(shape) * channels
    model_bytes = model_path.stat().st_size
    reference_bytes = samples / 8 if sig.occupancy else samples * sig.data.dtype.itemsize
    summary = {
        "input": run_info,
        "preset": config.preset,
        "device": f"{device.type} ({name})",
        "shape": list(shape),
        **result.summary,
        f"seconds_to_{metric}": reached,
        **({} if sig.occupancy else {"ssim": ssim}),
        "model_bytes": model_bytes,
        "compression_ratio": reference_bytes / model_bytes,
        "compared_with": "bit-packed grid" if sig.occupancy else "raw samples",
        "seconds_load": round(load_seconds, 3),
        "seconds_fit": fit_seconds,
        "seconds_outputs": round(output_seconds, 3),
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "peak_rss_bytes": peak_rss(),
        "peak_gpu_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "outputs": outputs,
        "versions": _versions(),
    }
    write_json(run_dir / "summary.json", summary)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    summary["run_dir"] = str(run_dir)
    return summary


SSIM_MAX_SAMPLES = 1 << 24


def image_ssim(model, sig: Signal) -> float | None:
    """SSIM (``skimage.metrics.structural_similarity``, data range 1) of the finest
    reconstruction against the input image; ``None`` for images of more than
    :data:`SSIM_MAX_SAMPLES` samples (skimage works on float64 copies, about 40 bytes per
    sample) or smaller than its 7 x 7 window."""
    from skimage.metrics import structural_similarity

    image = np.moveaxis(np.asarray(sig.data), 0, -1)  # (H, W, C)
    if image.size > SSIM_MAX_SAMPLES or min(image.shape[:2]) < 7:
        return None
    recon = render_image(model, 0, dtype=np.uint16).astype(np.float32) / 65535
    truth = image.astype(np.float32) * sig.value_scale
    if image.shape[-1] == 1:
        return float(structural_similarity(recon, truth[..., 0], data_range=1.0))
    return float(structural_similarity(recon, truth, data_range=1.0, channel_axis=-1))


def write_pictures(
    model,
    run_dir: Path,
    history: list[dict[str, Any]],
    meshes: dict[int, tuple[np.ndarray, np.ndarray]],
) -> list[str]:
    """``levels.png`` (every level of detail beside its blocks) and ``history.png`` (quality
    against time). A picture that cannot be drawn (no OpenGL) is reported, not fatal."""
    from .viz import plot_history, render_image_levels, render_levels

    written = []
    try:
        if model.layout.ndim == 3:
            render_levels(model, run_dir / "levels.png", meshes=meshes)
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


def write_levels(
    model,
    run_dir: Path,
    config: RunConfig,
    sig: Signal,
    meshes: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[str]:
    """A mesh (3D) or a picture (2D) per level of detail, as the config asks; the meshes are
    also returned in ``meshes`` for the pictures."""
    scales = list(range(model.layout.n_scales))
    if config.mesh_scales == "finest":
        scales = [0]
    elif config.mesh_scales == "none":
        scales = []
    written = []
    for j in scales:
        if sig.occupancy:
            from .extract import marching_cubes, save_mesh

            try:
                vertices, faces = marching_cubes(model, scale=j)
            except MinerError as exc:  # this level of detail has no surface
                written.append(f"(no mesh at scale {j}: {exc})")
                continue
            written.append(save_mesh(vertices, faces, run_dir / f"mesh_scale{j}.ply").name)
            if meshes is not None:
                meshes[j] = (vertices, faces)
        else:
            written.append(save_image(model, run_dir / f"recon_scale{j}.png", j).name)
    return written


def render_image(
    model,
    scale: int = 0,
    size: tuple[int, int] | None = None,
    dtype: np.dtype | type = np.uint8,
    band: int = 1 << 20,
) -> np.ndarray:
    """A 2D model's level of detail ``scale`` as an integer image.

    Args:
        model: a 2D :class:`~miner3d.model.MinerModel`.
        scale: level of detail (0: finest).
        size: ``(H, W)`` to render at by querying the continuous model (super- or
            sub-sampling); ``None``: scale ``scale``'s own grid, decoded block batch by batch.
        dtype: ``np.uint8`` or ``np.uint16``; values are clipped to ``[0, 1]`` and rounded.
        band: samples evaluated per step.

    Returns:
        ``(H, W, C)``, or ``(H, W)`` for one channel. Memory: the output in ``dtype`` plus one
        step of float32 (no float copy of the whole image).
    """
    layout, channels = model.layout, model.channels
    top = np.iinfo(dtype).max

    def quantize(values) -> np.ndarray:
        return np.rint(values.clamp(0, 1).cpu().numpy() * top).astype(dtype)

    if size is None:
        height, width = layout.valid_shape(scale)
        out = np.empty((height, width, channels), dtype=dtype)
        b = layout.block
        batch = max(1, band // (channels * b * b))
        for ids, values in model.iter_blocks(scale, batch=batch):
            block = quantize(values).transpose(0, 2, 3, 1)  # (n, b, b, C)
            for (r, c), tile in zip(layout.unravel(scale, ids).tolist(), block, strict=True):
                rows, cols = min(b, height - r * b), min(b, width - c * b)
                if rows > 0 and cols > 0:
                    out[r * b : r * b + rows, c * b : c * b + cols] = tile[:rows, :cols]
    else:
        height, width = size
        out = np.empty((height, width, channels), dtype=dtype)
        cols = (np.arange(width) + 0.5) * layout.shape[1] / width
        step = max(1, band // width)
        for r0 in range(0, height, step):
            rows = (np.arange(r0, min(r0 + step, height)) + 0.5) * layout.shape[0] / height
            grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
            values = model.query(grid, grid_coords=True, from_scale=scale)  # (P, C)
            out[r0 : r0 + len(rows)] = quantize(values).reshape(len(rows), width, channels)
    return out[..., 0] if channels == 1 else out


def save_image(model, path: Path, scale: int = 0, size: tuple[int, int] | None = None) -> Path:
    """Write :func:`render_image` as an 8- or 16-bit PNG (16-bit if the fitted image was)
    atomically."""
    import imageio.v3 as iio

    dtype = np.uint16 if model.meta.get("dtype") == "uint16" else np.uint8
    array = render_image(model, scale, size, dtype)
    with atomic_write(path) as tmp:
        iio.imwrite(tmp, array, extension=path.suffix or ".png")
    return path


def _versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {
        "miner3d": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def describe_summary(summary: dict[str, Any]) -> list[str]:
    """The final summary as lines of text (for the CLI's table)."""
    lines = []
    metric = "iou" if "iou" in summary else "psnr"
    header = "IoU @0.5" if metric == "iou" else "PSNR dB"
    lines.append(f"{'scale':>5} {'blocks with MLP':>16} {header:>10}")
    for j in sorted(summary["scales"], key=int, reverse=True):
        m = summary["scales"][j]
        value = f"{m['iou']:.5f}" if metric == "iou" else f"{m['psnr']:.2f}"
        blocks = f"{summary['mlp_blocks'][j]}/{summary['blocks'][j]}"
        lines.append(f"{j:>5} {blocks:>16} {value:>10}")
    lines.append(
        f"final IoU (threshold 0.5, full grid): {summary[metric]:.5f}"
        if metric == "iou"
        else f"final PSNR: {summary[metric]:.2f} dB"
        + (f", SSIM {summary['ssim']:.4f}" if summary.get("ssim") is not None else "")
    )
    lines.append(
        f"parameters {summary['params']:,} | model {format_size(summary['model_bytes'])} "
        f"({summary['compression_ratio']:.2f}x vs {summary['compared_with']}) | fit "
        f"{summary['seconds_fit']:.1f} s, total {summary['seconds_total']:.1f} s | peak RSS "
        f"{format_size(summary['peak_rss_bytes'])}"
    )
    return lines
