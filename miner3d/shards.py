"""Checkpoints of a fit shared by several ranks (:mod:`miner3d.distributed`).

Each rank writes its own shard, ``checkpoint.rank<r>.safetensors`` (the finished scales,
the same on every rank, and its part of the scale in progress), atomically and keeping its
previous one as ``checkpoint.rank<r>.prev.safetensors``. Once every shard is whole, rank 0
writes the manifest ``checkpoint.json`` (the world size, the scale and iteration, and each
shard's tensor checksum), keeping the one before as ``checkpoint.prev.json``.

A resume takes the newest manifest whose every shard is found, whole and with its checksum,
under the rank's current or previous name: a kill at any moment (mid-shard, between the
shards and the manifest) leaves a set that verifies. The world size must be the
manifest's: shards are not re-partitioned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .distributed import Team
from .errors import MinerError
from .rundir import (
    CHECKPOINT,
    MANIFEST,
    PREVIOUS_MANIFEST,
    save_run_checkpoint,
    shard_names,
    write_json,
)

FORMAT = "miner3d-checkpoint-manifest"


def save_rank_checkpoint(run_dir: Path, checkpoint: Checkpoint, team: Team) -> None:
    """Every rank: write this rank's shard; rank 0 then writes the manifest (a collective:
    every rank calls it at the same iteration)."""
    save_run_checkpoint(run_dir, checkpoint, shard_names(team.rank))
    digests = team.gather_text(checkpoint.state["tensors_sha256"])  # also the barrier
    if not team.leader:
        return
    manifest = {
        "format": FORMAT,
        "world_size": team.world_size,
        "scale": checkpoint.state["scale"],
        "iteration": checkpoint.state["iteration"],
        "shards_sha256": digests,
    }
    current = run_dir / MANIFEST
    if current.exists():
        os.replace(current, run_dir / PREVIOUS_MANIFEST)
    write_json(current, manifest)


def _read_manifest(path: Path) -> dict:
    """A manifest's fields; a one-line error if malformed."""
    try:
        manifest = json.loads(path.read_text())
        digests = manifest["shards_sha256"]
        if manifest.get("format") != FORMAT or not isinstance(digests, list):
            raise ValueError
        if int(manifest["world_size"]) != len(digests):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise MinerError(f"{path.name} is not a miner3d checkpoint manifest") from None
    return manifest


def load_rank_checkpoint(run_dir: Path, team: Team) -> tuple[Checkpoint | None, str]:
    """This rank's shard of the newest manifest whose shards all verify, and a note of what
    was skipped; ``(None, "")`` when the run has no manifest. Every rank calls it; they agree
    on the manifest (one all-reduce per manifest tried)."""
    notes: list[str] = []
    names = [n for n in (MANIFEST, PREVIOUS_MANIFEST) if (run_dir / n).exists()]
    if not names:
        if (run_dir / CHECKPOINT).exists():
            raise MinerError(
                f"{run_dir} was checkpointed by one process: resume it without torchrun"
            )
        return None, ""
    for name in names:
        try:
            manifest = _read_manifest(run_dir / name)
        except MinerError as exc:
            notes.append(f"skipped {exc}")
            continue
        if int(manifest["world_size"]) != team.world_size:
            raise MinerError(
                f"{run_dir} was checkpointed by {manifest['world_size']} ranks; resume it with "
                f"torchrun --nproc_per_node {manifest['world_size']} (shards are not "
                f"re-partitioned; this run has {team.world_size})"
            )
        digest = manifest["shards_sha256"][team.rank]
        found = None
        for shard in shard_names(team.rank):
            try:
                ckpt = load_checkpoint(run_dir / shard)
            except MinerError:
                continue
            if ckpt.state.get("tensors_sha256") == digest:
                found = ckpt
                break
        missing = int(team.sum([found is None])[0])
        if missing == 0:
            return found, "; ".join(notes)
        notes.append(f"skipped {name}: {missing} rank(s) found no matching shard")
    raise MinerError(f"no usable checkpoint in {run_dir} ({'; '.join(notes)})")
