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

The file is safetensors (tensors, the JSON state in its metadata), written atomically. The
state also holds the SHA-256 of the tensors (``tensors_sha256``): a checkpoint whose bytes
changed, or whose state lacks what a resume needs, is refused with a one-line error (and the
run directory falls back to the previous checkpoint, see :mod:`miner3d.rundir`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import MinerError
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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


_ALWAYS = {"scale": int, "iteration": int, "elapsed": float, "history": list}
_MID_SCALE = {"adam_step": int, "adam_lr": float, "frozen_mse": float, "frozen_sums": dict}


def _validate(state: Any, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A one-line error if ``state`` lacks a field a resume reads, or a tensor is missing."""
    if not isinstance(state, dict):
        raise MinerError(f"checkpoint {path} has no state")
    needed = dict(_ALWAYS)
    if isinstance(state.get("iteration"), int) and state["iteration"] > 0:
        needed.update(_MID_SCALE)
    for key, typ in needed.items():
        value = state.get(key)
        ok = isinstance(value, int | float) if typ is float else isinstance(value, typ)
        if not ok or isinstance(value, bool):
            raise MinerError(f"checkpoint {path} is incomplete: '{key}' is missing or malformed")
    if state["scale"] < 0 or state["iteration"] < 0:
        raise MinerError(f"checkpoint {path} is malformed: negative scale or iteration")
    if GENERATOR not in tensors or (state["iteration"] > 0 and f"{CURRENT}active" not in tensors):
        raise MinerError(f"checkpoint {path} is incomplete: tensors are missing")


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write a checkpoint atomically, with the SHA-256 of its tensors in its state (also set
    in ``checkpoint.state``)."""
    checkpoint.state["tensors_sha256"] = tensors_sha256(checkpoint.tensors)
    return write_safetensors(path, checkpoint.tensors, FORMAT, checkpoint.state)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a one-line error if it is not
    one, is incomplete, or its tensors changed since it was written."""
    path = Path(path)
    state, tensors = read_safetensors(path, FORMAT, "checkpoint")
    _validate(state, tensors, path)
    expected = state.get("tensors_sha256")
    if expected is not None and expected != tensors_sha256(tensors):
        raise MinerError(f"checkpoint {path} is corrupt: its tensors do not match their checksum")
    return Checkpoint(tensors, state)


def scale_checkpoint(
    model: Any, j: int, generator: torch.Generator, books: dict[str, Any], st: Any = None
) -> Checkpoint:
    """The checkpoint of a fit about to fit scale ``j`` (or fitting it: ``st``, its
    :class:`~miner3d.scale.ScaleState`): the finished scales (> j) of ``model`` under
    ``model.``, the sample generator's state, the scale's state under ``current.``, and the
    trainer's JSON bookkeeping ``books`` (elapsed, history, scale_metrics, scale_times).
    Tensors are copied to the CPU."""
    tensors = {GENERATOR: generator.get_state()}
    for k in range(j + 1, model.layout.n_scales):
        tensors.update(prefixed(MODEL, model.scale_state_dict(k)))
    state: dict[str, Any] = {"scale": j, "iteration": 0, **books}
    if st is not None:
        tensors.update(st.checkpoint_tensors())
        state.update(st.checkpoint_state())
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return Checkpoint(tensors, json.loads(json.dumps(state)))
