"""Run configuration: YAML presets in ``configs/``, command-line overrides, validation.

A run's config is a :class:`RunConfig` (how to read the input) holding a
:class:`~miner3d.train.FitConfig` (how to fit). Presets are YAML files with the same
structure; every field can be overridden as ``dotted.name=value``. Every error names the
field. The effective config is written into the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import MinerError
from .train import FitConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("cpu", "lucy", "image")


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
    fit: FitConfig = field(default_factory=FitConfig)

    def validate(self) -> None:
        from .grid import check_resolution
        from .voxelize import VOXELIZERS

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
        if self.checkpoint_minutes <= 0:
            raise MinerError(f"invalid config value checkpoint_minutes={self.checkpoint_minutes!r}")
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
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
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

    if not path.is_file():
        raise MinerError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MinerError(f"could not parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MinerError(f"config {path} must be a mapping of fields")
    return data


def preset_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


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


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["fit.block=16", "resolution=64"]`` -> ``{"fit.block": "16", "resolution": "64"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MinerError(f"--set takes field=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
