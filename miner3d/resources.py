"""Files that ship with miner3d: the YAML presets and the default mesh.

In a source checkout they are the repository's ``configs/`` and ``meshes/lucy.ply`` (the
sources the README points at). An installed wheel carries copies of them inside the package
(``miner3d/configs/``, ``miner3d/meshes/lucy.ply``, see ``pyproject.toml``), so that presets
and the default input are found from any working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


def configs_dir() -> Path:
    """The folder of the YAML presets (``<name>.yaml``)."""
    return _first_existing(PACKAGE / "configs", PACKAGE.parent / "configs")


def default_mesh() -> Path:
    """The bundled Lucy (``lucy.ply``), the input of ``miner3d fit`` without an argument."""
    return _first_existing(PACKAGE / "meshes" / "lucy.ply", PACKAGE.parent / "meshes" / "lucy.ply")
