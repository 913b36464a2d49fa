"""What several ranks (:mod:`miner3d.distributed`) share on disk: the input, and checkpoints.

**The input** (:func:`share_signal`): rank 0 reads it; an input it had to decode into memory
(a PNG or JPEG image, a compressed volume, a grid file) it writes raw for the others,
``input.ranks.npy`` with its metadata in ``input.ranks.json``, and every rank, rank 0 too,
memory-maps that file and reads only its blocks. A mesh's grid is mapped the same way
(``grid.ranks.npy``, :func:`miner3d.kinds.read_signal`). Both last while the run does.

**Checkpoints**: each rank writes its own shard, ``checkpoint.rank<r>.safetensors`` (its own
blocks of the finished scales, and its part of the scale in progress), atomically and keeping its
previous one as ``checkpoint.rank<r>.prev.safetensors``. Once every shard is whole, rank 0
writes the manifest ``checkpoint.json`` (the world size, the scale and iteration, and each
shard's tensor checksum), keeping the one before as ``checkpoint.prev.json``.

A resume takes the newest manifest whose every shard is found, whole and with its checksum,
under the rank's current or previous name: a kill at any moment (mid-shard, between the
shards and the manifest) leaves a set that verifies. A resume with another number of ranks,
or in one process, reshards it (:mod:`miner3d.reshard`), and so does a torchrun resume of one
process's checkpoint; the first checkpoint of the new number removes the old one's files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint
from .distributed import Team
from .errors import MinerError
from .grid import GridTransform
from .io import atomic_write
from .kinds import Signal, get_kind
from .reshard import reshard
from .rundir import (
    CHECKPOINT,
    MANIFEST,
    PREVIOUS_CHECKPOINT,
    PREVIOUS_MANIFEST,
    load_run_checkpoint,
    save_run_checkpoint,
    shard_names,
    write_json,
)

FORMAT = "miner3d-checkpoint-manifest"
RAW_INPUT, RAW_INFO = "input.ranks.npy", "input.ranks.json"


def share_signal(team: Team, run_dir: Path | None, read: Callable[[bool], Signal]) -> Signal:
    """The input on every rank, read once (see the module doc): ``read(True)`` on rank 0,
    then, for an input held in memory, the raw copy mapped on every rank; ``read(False)`` on
    the others otherwise (a mesh's mapped grid). One process, or no run directory: ``read``.
    Memory on the other ranks: the pages of their blocks. Disk: the samples in their dtype."""
    if not team.active or run_dir is None:
        return team.in_turn(read)
    info_path = run_dir / RAW_INFO

    def action(first: bool) -> Signal:
        if not first:
            return _map_raw(run_dir) if info_path.exists() else read(False)
        sig = read(True)
        info_path.unlink(missing_ok=True)  # an earlier run's, never another rank's input
        if isinstance(sig.data, np.memmap):
            return sig
        with atomic_write(run_dir / RAW_INPUT) as tmp, open(tmp, "wb") as fh:
            np.save(fh, sig.data)  # a strided view (channels first) is written in pieces
        head = {"kind": sig.kind.name, "value_scale": sig.value_scale, "info": sig.info}
        head |= {"value_offset": sig.value_offset, "peak": sig.peak}
        head["transform"] = None if sig.transform is None else sig.transform.to_dict()
        write_json(info_path, head)
        return _map_raw(run_dir)

    return team.in_turn(action)


def _map_raw(run_dir: Path) -> Signal:
    """The signal rank 0 wrote raw (:func:`share_signal`), memory-mapped."""
    try:
        head = json.loads((run_dir / RAW_INFO).read_text())
        data = np.load(run_dir / RAW_INPUT, mmap_mode="r", allow_pickle=False)
        transform = head["transform"] and GridTransform.from_dict(head["transform"])
        scale, offset, peak = (float(head[k]) for k in ("value_scale", "value_offset", "peak"))
        kind = get_kind(head["kind"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MinerError(f"could not map the ranks' copy of the input: {exc}") from None
    return Signal(data, kind, scale, transform, head["info"], offset, peak)


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
    """This rank's checkpoint from the newest manifest whose shards all verify, and a note
    of what was skipped; ``(None, "")`` when the run has no checkpoint. Every rank calls it
    (one process too); they agree on the manifest (one all-reduce per manifest tried). A
    checkpoint of another number of ranks (or one process's ``checkpoint.safetensors``) is
    resharded (:func:`miner3d.reshard.reshard`): each rank then reads every shard."""
    notes: list[str] = []
    names = [n for n in (MANIFEST, PREVIOUS_MANIFEST) if (run_dir / n).exists()]
    if not names:
        single, note = load_run_checkpoint(run_dir)
        if single is None or not team.active:
            return single, note
        return reshard([single], team.world_size, team.rank), _joined(note, "resharded")
    for name in names:
        try:
            manifest = _read_manifest(run_dir / name)
        except MinerError as exc:
            notes.append(f"skipped {exc}")
            continue
        digests = manifest["shards_sha256"]
        wanted = [team.rank] if len(digests) == team.world_size else range(len(digests))
        found = [_shard(run_dir, r, digests[r]) for r in wanted]
        missing = int(team.sum([sum(f is None for f in found)])[0])
        if missing == 0:
            if len(digests) == team.world_size:
                return found[0], "; ".join(notes)
            note = f"resharded from {len(digests)} ranks' checkpoint to {team.world_size}"
            return reshard(found, team.world_size, team.rank), _joined("; ".join(notes), note)
        notes.append(f"skipped {name}: {missing} shard(s) found no match")
    raise MinerError(f"no usable checkpoint in {run_dir} ({'; '.join(notes)})")


def _shard(run_dir: Path, rank: int, digest: str) -> Checkpoint | None:
    """Rank ``rank``'s shard with the manifest's checksum, current or previous; or None."""
    for shard in shard_names(rank):
        try:
            ckpt = load_checkpoint(run_dir / shard)
        except MinerError:
            continue
        if ckpt.state.get("tensors_sha256") == digest:
            return ckpt
    return None


def _joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def save_checkpoint_of(run_dir: Path, checkpoint: Checkpoint, team: Team) -> None:
    """Write this rank's checkpoint (one process: ``checkpoint.safetensors``; several: its
    shard, then rank 0's manifest), then remove what a checkpoint of another number of ranks
    left, now superseded (a collective with several ranks)."""
    shards = run_dir.glob("checkpoint.rank*.safetensors")
    if not team.active:
        save_run_checkpoint(run_dir, checkpoint)
        stale = [run_dir / MANIFEST, run_dir / PREVIOUS_MANIFEST, *shards]
    else:
        save_rank_checkpoint(run_dir, checkpoint, team)
        if not team.leader:
            return
        ours = {name for r in range(team.world_size) for name in shard_names(r)}
        stale = [run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT]
        stale += [path for path in shards if path.name not in ours]
    for path in stale:
        path.unlink(missing_ok=True)
