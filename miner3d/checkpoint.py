"""Checkpoints of a fit in progress: what they hold, the names of their tensors, their file.

A checkpoint holds everything needed to continue a fit exactly (same optimiser state, same
sample draws, same result as an uninterrupted fit):

* ``generator``: the sampler's random state;
* ``model.`` + the model's keys (:func:`miner3d.model.scale_state_dict`) of every finished
  scale;
* ``current.`` + the bank's keys (``param<i>``) and the optimiser's (``exp_avg<i>``,
  ``exp_avg_sq<i>``) of the scale in progress, with ``current.final<i>`` (the parameters of
  every live block, frozen ones final) and ``current.active`` (the rows still optimised);
* a JSON state: scale, iteration, elapsed seconds, history, running sums.

The file is safetensors (tensors, the JSON state in its metadata), written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import read_safetensors, write_safetensors

FORMAT = "miner3d-checkpoint"
MODEL = "model."
CURRENT = "current."
GENERATOR = "generator"


@dataclass
class Checkpoint:
    """Tensors (see the module doc for their names) and a JSON-serialisable state."""

    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix``, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every key under ``prefix``."""
    return {prefix + k: v for k, v in tensors.items()}


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write a checkpoint atomically."""
    return write_safetensors(path, checkpoint.tensors, FORMAT, checkpoint.state)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error if it is not one."""
    state, tensors = read_safetensors(path, FORMAT, "checkpoint")
    return Checkpoint(tensors, state)
