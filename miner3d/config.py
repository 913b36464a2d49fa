"""Run configuration: YAML presets, command-line overrides, validation.

A run's config is a :class:`RunConfig` (how to read the input) holding a :class:`FitConfig`
(how to fit). Presets are YAML files with the same structure, in the repository's
``configs/`` (the source) and shipped inside the installed package; every field can be
overridden as ``dotted.name=value``. Every error names the field. The effective config is
written into the run directory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import MinerError
from .resources import configs_dir

PRESETS = ("cpu", "cpu-large", "lucy", "image", "volume")
LARGE_GRID = 512
"""Voxels on the longest axis from which an occupancy fit on a CPU starts from ``cpu-large``."""


HEAP_MMAP_THRESHOLD = 2 << 20
"""Bytes from which a fit's C heap serves a block by ``mmap`` (:func:`miner3d.memory.tune_heap`);
a CPU training chunk's activation tensors stay under it (:meth:`FitConfig.chunk_samples`)."""


@dataclass
class FitConfig:
    """Everything that shapes a fit. Defaults: the paper's 3D setting."""

    n_scales: int = 4
    """J, the number of pyramid scales (1 = no pyramid)."""
    block: int = 16
    """Block edge in samples, the same at every scale."""
    hidden: int = 22
    """Features of each hidden layer."""
    hidden_layers: int = 2
    """Number of hidden (sine) layers."""
    w0: float = 30.0
    """SIREN frequency factor."""
    lr: float = 1e-3
    """Adam learning rate at the start of each scale."""
    lr_decay: float = 0.999
    """Learning rate multiplier per iteration (exponential decay, reset at each scale)."""
    max_iters: int = 2000
    """Iteration cap per scale."""
    prune_mse: float = 5e-4
    """Prune before a scale: blocks whose mean squared residual is at most this get no MLP."""
    freeze_mse: float = 1e-4
    """Prune during a scale: a block whose MSE reaches this is frozen."""
    freeze_every: int = 10
    """Iterations between freezing checks (each one compacts the optimiser state)."""
    plateau_window: int = 200
    """Iterations over which the loss must improve by ``plateau_tol`` (relative)."""
    plateau_tol: float = 0.01
    """Relative improvement of the loss per window below which the scale ends (0: never)."""
    weight_sharing: bool = False
    """A child block starts from its parent's weights / sqrt(2^d) (when the parent has an MLP)."""
    pyramid: str = "laplacian"
    """``laplacian`` (fit residuals) or ``gaussian`` (fit each scale's signal, the ablation)."""
    points_per_block: int = 0
    """Samples per block per iteration, drawn at random (0: all ``b^d``)."""
    iteration_samples: int = 0
    """If > 0, overrides ``points_per_block`` at each scale's start: this many samples per
    iteration shared by the scale's live blocks, at least 64 per block (at most ``b^d``).
    Small signals then see every sample, large ones a subset, at a bounded iteration cost."""
    metric_every: int = 50
    """Iterations between quality measurements (0: at scale ends only): exact full-grid ones
    at the finest scale (this often up to 4x this many iterations, then with gaps that
    double as the iterations do: :func:`miner3d.stopping.measure_now`); at a coarser scale,
    at this many times 1, 2, 4, 8, ... iterations, its level of detail on its own grid
    against the box-filtered signal. Only the blocks still training are evaluated."""
    tail: float = 1.5
    """The finest scale's quality plateau (no long tails): it ends once its measured quality,
    rounded to the kind's step (IoU: 4 digits, PSNR: 0.01 dB), is no better than at a
    measurement at or before ``1 / tail`` of the fit's time so far; the fit then ends within
    ``tail`` times the time at which it first reached its final rounded quality (0: off)."""
    batch_blocks: int = 0
    """Blocks per batch in streamed passes (targets, metrics); 0: as many as hold 2^20
    samples (the transient memory of a pass is a few tens of bytes per sample of a batch)."""
    cache_targets: int = 256 << 20
    """Bytes under which a scale's targets are cached (float16) rather than recomputed at
    every iteration's samples (the live blocks' targets counted), and, separately, under
    which its measurements keep the live blocks' coarser sum and signal (float32, 8 bytes a
    sample and channel) rather than read them again at each."""
    batch_samples: int = 0
    """Samples (blocks x points) per forward/backward chunk of an iteration; bounds the
    activation memory (about ``(3 * hidden_layers + 2) * hidden * 4`` bytes per sample) and
    leaves the result unchanged (every block's gradient is its own). 0: 2^14 on a CPU for
    22 features (a chunk's activations stay in the caches and come from the heap: the step
    ran 3x faster than at 2^19), 2^19 on a GPU (see :meth:`chunk_samples`)."""
    weights: str = "float32"
    """How ``model.safetensors`` stores the MLPs' weights and biases: ``float32``, or
    ``float16`` (half the bytes; the fit's end rounds the weights, measures the rounded
    model on the full grid again, and reports that: ``summary.json``'s ``before_rounding``
    keeps the fitted figures). Checkpoints always keep float32."""
    seed: int = 0
    """Seed of the MLP initialisation and of the sample draws."""
    time_limit: float = 0.0
    """Wall-clock cap of the whole fit in seconds (0: none); the scale in progress is kept."""
    target: float = 0.0
    """Stop once the finest scale's measured quality reaches this (IoU, or PSNR in dB; 0: off)."""

    def block_points(self, live_blocks: int) -> int:
        """Samples per block per iteration when a scale has ``live_blocks`` MLPs over every
        rank (0: all ``b^d``): :attr:`iteration_samples` shared, at least 64 a block, or
        :attr:`points_per_block`."""
        if self.iteration_samples:
            return max(64, self.iteration_samples // max(1, live_blocks))
        return self.points_per_block

    def chunk_samples(self, device_type: str = "cpu") -> int:
        """Samples per forward/backward chunk: :attr:`batch_samples`, or when 0 the default
        of the device type (``cpu`` or ``cuda``). On a CPU, the largest power of two (at
        most 2^15) whose activation tensors (``hidden`` float32 features a sample) stay under
        :data:`HEAP_MMAP_THRESHOLD`, so that they come from the heap: 2^14 for 22
        features."""
        if self.batch_samples:
            return self.batch_samples
        if device_type != "cpu":
            return 1 << 19
        fits = (HEAP_MMAP_THRESHOLD - 1) // (4 * max(self.hidden, 1))
        return max(1, min(1 << 15, 1 << (fits.bit_length() - 1)))

    def validate(self) -> None:
        """Raise :class:`MinerError` naming the first bad field."""
        checks = {
            "n_scales": self.n_scales >= 1,
            "block": self.block >= 2 and self.block & (self.block - 1) == 0,
            "hidden": self.hidden >= 1,
            "hidden_layers": self.hidden_layers >= 1,
            "w0": self.w0 > 0,
            "lr": self.lr > 0,
            "lr_decay": 0 < self.lr_decay <= 1,
            "max_iters": self.max_iters >= 0,
            "prune_mse": self.prune_mse >= 0,
            "freeze_mse": self.freeze_mse >= 0,
            "freeze_every": self.freeze_every >= 1,
            "plateau_window": self.plateau_window >= 1,
            "plateau_tol": self.plateau_tol >= 0,
            "pyramid": self.pyramid in ("laplacian", "gaussian"),
            "points_per_block": self.points_per_block >= 0,
            "iteration_samples": self.iteration_samples >= 0,
            "metric_every": self.metric_every >= 0,
            "tail": self.tail == 0 or self.tail > 1,
            "batch_blocks": self.batch_blocks >= 0,
            "batch_samples": self.batch_samples >= 0,
            "cache_targets": self.cache_targets >= 0,
            "time_limit": self.time_limit >= 0,
            "target": self.target >= 0,
            "seed": 0 <= self.seed < 2**63,
            "weights": self.weights in ("float32", "float16"),
        }
        for f in fields(self):  # no float field may be inf or nan; no int beyond 2^63
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                checks[f.name] = False
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                checks[f.name] = False
        for name, ok in checks.items():
            if not ok:
                raise MinerError(f"invalid config value {name}={getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MinerError(f"unknown config field '{unknown[0]}'")
        return cls(**values)


@dataclass
class RunConfig:
    """What ``miner3d fit`` does besides fitting."""

    preset: str = "cpu"
    """Name of the preset this config started from."""
    resolution: int = 128
    """Voxels along the mesh's longest axis (meshes only)."""
    cube: bool = False
    """Voxelize into an N^3 grid instead of a tight box."""
    margin: int = 2
    """Empty voxels on each side of the longest axis."""
    voxelizer: str = "robust"
    """Voxelization method (see ``miner3d voxelize --help``)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    mesh_scales: str = "all"
    """Which levels of detail to extract as meshes: ``all``, ``finest`` or ``none``."""
    checkpoint_minutes: float = 5.0
    """Minutes between checkpoints within a scale (checkpoints are also written at every
    scale switch)."""
    checkpoint_iterations: int = 0
    """If > 0, also a checkpoint every this many iterations within a scale."""
    fit: FitConfig = field(default_factory=FitConfig)

    def validate(self) -> None:
        from .grid import check_resolution
        from .voxelizer import VOXELIZERS

        try:
            check_resolution(self.resolution)
        except MinerError as exc:
            raise MinerError(f"invalid config value resolution: {exc}") from None
        if self.voxelizer not in VOXELIZERS:
            raise MinerError(
                f"invalid config value voxelizer={self.voxelizer!r} "
                f"(choose from {', '.join(VOXELIZERS)})"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MinerError(f"invalid config value device={self.device!r}")
        if self.mesh_scales not in ("all", "finest", "none"):
            raise MinerError(f"invalid config value mesh_scales={self.mesh_scales!r}")
        if self.margin < 0:
            raise MinerError(f"invalid config value margin={self.margin!r}")
        if not 0 < self.checkpoint_minutes < math.inf:
            raise MinerError(f"invalid config value checkpoint_minutes={self.checkpoint_minutes!r}")
        if self.checkpoint_iterations < 0:
            raise MinerError(
                f"invalid config value checkpoint_iterations={self.checkpoint_iterations!r}"
            )
        self.fit.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the field."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            text = str(value).strip()
            if text.lstrip("+-").isdigit():
                return int(text)
            number = float(text)
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise MinerError(
            f"invalid config value {name}={value!r} (expected {typ.__name__})"
        ) from None


def _apply(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise MinerError(f"unknown config field '{name}'")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise MinerError(f"config field '{name}' is a section, not a value")
            _apply(current, value, f"{name}.")
        else:
            setattr(target, key, _coerce(name, value, known[key].type))


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    from .io import check_input_file

    check_input_file(path, "config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise MinerError(f"config {path} is not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise MinerError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise MinerError(f"could not parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MinerError(f"config {path} must be a mapping of fields")
    return data


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (inside the installed package, or the repository's
    ``configs/`` in a source checkout)."""
    return configs_dir() / f"{name}.yaml"


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The effective config: defaults, then a preset (or a config file), then overrides.

    Args:
        preset: a name in :data:`PRESETS`.
        config_file: a YAML file (used instead of the preset when given).
        overrides: ``{"dotted.name": value}`` (strings are converted to the field's type).
    """
    config = RunConfig()
    if config_file is not None:
        data = load_yaml(Path(config_file))
        config.preset = str(data.pop("preset", Path(config_file).stem))
    else:
        name = preset or "cpu"
        if name not in PRESETS:
            raise MinerError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
        data = load_yaml(preset_path(name))
        config.preset = name
    _apply(config, data)
    for dotted, value in (overrides or {}).items():
        *sections, last = dotted.split(".")
        nested: dict[str, Any] = {last: value}
        for section in reversed(sections):
            nested = {section: nested}
        _apply(config, nested)
    config.validate()
    return config


def default_preset(kind: str, cuda: bool, size: int = 0) -> str:
    """The preset a fit starts from when none is named: ``image`` for images, ``volume`` for
    scalar volumes, ``lucy`` (the paper's 1024^3 setting) for occupancy on a GPU; on a CPU
    ``cpu-large`` for occupancy grids of ``size`` >= :data:`LARGE_GRID` voxels on their
    longest axis, ``cpu`` otherwise."""
    if kind in ("image", "volume"):
        return kind
    if cuda:
        return "lucy"
    return "cpu-large" if size >= LARGE_GRID else "cpu"


def describe(config: RunConfig, meshes: bool = True) -> str:
    """One line of what a config does, e.g. for ``miner3d presets`` (``meshes``: say the
    voxel resolution)."""
    f = config.fit
    sampling = (
        f"{f.iteration_samples} samples/iteration"
        if f.iteration_samples
        else (f"{f.points_per_block} samples/block" if f.points_per_block else "every sample")
    )
    return (
        f"{f.n_scales} scales of {f.block}-sample blocks, {f.hidden_layers} x {f.hidden} sine "
        f"features, lr {f.lr:g}, <= {f.max_iters} iterations/scale, {sampling}"
        + (f"; meshes at {config.resolution} voxels" if meshes else "")
    )


def override_key(key: str) -> str:
    """The dotted config field of an override: ``resolution`` and ``fit.lr`` as they are, a
    bare :class:`FitConfig` field (``lr``) as ``fit.lr``."""
    if "." in key or key in {f.name for f in fields(RunConfig)}:
        return key
    if key in {f.name for f in fields(FitConfig)}:
        return f"fit.{key}"
    raise MinerError(f"unknown config field '{key}'")


def to_yaml(config: RunConfig) -> str:
    """The YAML of ``config``, as ``config.yaml`` holds it."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["fit.block=16", "resolution=64"]`` -> ``{"fit.block": "16", "resolution": "64"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MinerError(f"--set takes field=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
