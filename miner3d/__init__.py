"""miner3d: multiscale implicit neural representations (MINER) of very large volumes and images.

The Python API (see :mod:`miner3d.api`)::

    import miner3d
    result = miner3d.fit("meshes/teapot.obj", resolution=64)
    result.model.mesh(lod=0), result.summary["iou"]
    model = miner3d.load("runs/demo/model.safetensors")
    grid = miner3d.voxelize("meshes/teapot.obj", 128)

The data's journey, one module per stage::

    input --kinds/io/voxelize--> (C, *S) signal --source--> blocks of every scale
          --targets/scale/train--> MLP banks (model) --extract/viz/evaluate--> meshes, pictures,
          figures; rundir writes the files of a run, api ties it together, cli prints it

The coordinate convention every stage shares is documented in :mod:`miner3d.grid`; the layers
are a contract that ``make test`` checks (``[tool.importlinter]`` in ``pyproject.toml``).
"""

from typing import Any

from .errors import MinerError
from .version import __version__

_LAZY = {
    "FitResult": "api",
    "Model": "facade",
    "effective_config": "api",
    "fit": "api",
    "load": "api",
    "resume": "api",
    "voxelize": "api",
    "GridTransform": "grid",
    "OccupancyGrid": "grid",
}


def __getattr__(name: str) -> Any:
    """The API is imported on first use, so that ``import miner3d`` (and ``miner3d --help``)
    does not wait for torch."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'miner3d' has no attribute '{name}'")


__all__ = [
    "FitResult",
    "GridTransform",
    "MinerError",
    "Model",
    "OccupancyGrid",
    "__version__",
    "effective_config",
    "fit",
    "load",
    "resume",
    "voxelize",
]
