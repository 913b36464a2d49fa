"""The fitted model: every scale's MLP bank and which blocks have one.

The model's value at a point is the sum over scales of each scale's residual field ``R_k``
(the block MLPs' outputs at scale ``k``'s sample centres, zero in blocks without an MLP),
each linearly interpolated (``align_corners=False``) from its own grid straight to the point::

    f(x) = sum_k  L_k(R_k)(x)

so :meth:`MinerModel.decode` (the sum at the sample centres of a scale) and
:meth:`MinerModel.query` (the sum at arbitrary points) agree by construction, and the
reconstruction at level of detail ``j`` is the same sum truncated to ``k >= j``. Residual
fields of scales ``k >= 1`` are decoded once into dense float16 tensors (``2 / (2^d - 1)``
bytes per full-resolution sample and channel for all of them together: 0.29 GiB per channel
at 1024^3); scale 0 is only ever evaluated, in float32, block batch by block batch.

The float16 rounding of a coarse field (at most ``2^-12`` of its value in ``[0.5, 1)``) is
part of the model's definition: the trainer fits each finer scale to the residual of exactly
these rounded fields, so the rounding is absorbed by the finer scales and never accumulates
(the finest scale, evaluated in float32, takes the last of it).

One file, ``model.safetensors``: tensors, with layout, architecture, transform and config as
JSON metadata, checked on reading by :mod:`miner3d.modelfile`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import sampling
from .bank import BankShape, MLPBank, round_params
from .blocks import BlockLayout, local_coordinates, scatter_blocks
from .grid import GridTransform
from .metrics import MetricSums, block_sums
from .pyramid import interpolate_at, interpolate_blocks

MODEL_FORMAT_VERSION = 1


def scale_prefix(j: int) -> str:
    """The key prefix of scale ``j``'s tensors in model files: ``scale<j>.`` + ``block_ids``
    and the bank's keys (``param<i>``)."""
    return f"scale{j}."


@dataclass
class ScaleBank:
    """The blocks of one scale that have an MLP (sorted flat ids ``(m,)``) and their bank."""

    block_ids: torch.Tensor
    bank: MLPBank


class MinerModel:
    """A fitted multiscale model.

    Attributes:
        layout: block geometry (:class:`BlockLayout`).
        bank_shape: architecture of every block MLP.
        channels: ``C``, outputs per sample.
        scales: ``scales[j]`` is scale ``j``'s :class:`ScaleBank` (``None`` until fitted).
        gaussian: the MLPs of a scale predict the signal itself (Gaussian-pyramid ablation)
            rather than the residual; their residual is then ``output - coarser sum``.
        transform: grid to input coordinates (:mod:`miner3d.grid`).
        meta: JSON-serialisable extras (config, kind, value scale, history summary).
    """

    def __init__(
        self,
        layout: BlockLayout,
        bank_shape: BankShape,
        channels: int,
        transform: GridTransform | None = None,
        gaussian: bool = False,
        meta: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.layout = layout
        self.bank_shape = bank_shape
        self.channels = channels
        self.transform = transform
        self.gaussian = gaussian
        self.meta = dict(meta or {})
        self.device = torch.device(device)
        self.scales: list[ScaleBank | None] = [None] * layout.n_scales
        self._slots: dict[int, torch.Tensor] = {}
        self._dense: dict[int, torch.Tensor] = {}
        self._rows: dict[int, tuple[int, int]] = {}  # scales held as a window of rows
        self._coords = local_coordinates(layout.block, layout.ndim, self.device)
        self.weights = "float32"
        """How :meth:`save` stores the MLPs' weights (see :meth:`round_weights`)."""

    # -- bookkeeping ---------------------------------------------------------------------
    def set_scale(
        self, j: int, block_ids: torch.Tensor, bank: MLPBank, rows: tuple[int, int] | None = None
    ) -> None:
        """Install scale ``j``'s bank (rows in the order of ``block_ids``). ``rows``: the
        model holds only the block rows ``[r0, r1)`` of the scale's first axis (a rank's
        window, see :mod:`miner3d.sharding`; its dense field is then that window, and asking
        for a block outside it is an error); ``None``: the whole scale."""
        self._rows.pop(j, None)
        if rows is not None:
            self._rows[j] = rows
        order = torch.argsort(block_ids)
        ids = block_ids[order].to(self.device)
        bank = MLPBank(
            bank.shape, [p.detach()[order.to(p.device)].to(self.device) for p in bank.params]
        )
        self.scales[j] = ScaleBank(ids, bank)
        slots = torch.full((self.layout.n_blocks(j),), -1, dtype=torch.long, device=self.device)
        slots[ids] = torch.arange(len(ids), device=self.device)
        self._slots[j] = slots
        # this scale's dense field and every finer one that depended on it are stale
        for k in list(self._dense):
            if k <= j:
                del self._dense[k]

    def scale_state_dict(self, j: int) -> dict[str, torch.Tensor]:
        """Scale ``j``'s tensors under :func:`scale_prefix` (empty if it has no bank)."""
        scale = self.scales[j]
        if scale is None:
            return {}
        state = {"block_ids": scale.block_ids, **scale.bank.state_dict()}
        return {scale_prefix(j) + k: v for k, v in state.items()}

    def load_scale_state_dict(self, j: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Install scale ``j`` from tensors named as by :meth:`scale_state_dict`; ``False``
        if they hold no such scale."""
        prefix = scale_prefix(j)
        if prefix + "block_ids" not in tensors:
            return False
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        bank = MLPBank.from_state_dict(self.bank_shape, state, self.device)
        self.set_scale(j, state["block_ids"], bank)
        return True

    @property
    def kind(self) -> str:
        """The kind of signal: ``occupancy`` or ``image`` (see :mod:`miner3d.kinds`)."""
        if "signal_kind" in self.meta:
            return str(self.meta["signal_kind"])
        return "occupancy" if self.meta.get("occupancy", self.layout.ndim == 3) else "image"

    def field_bytes(self) -> int:
        """Bytes of the dense float16 residual fields of scales >= 1 that decoding, querying
        and extraction hold (``2 / (2^d - 1)`` bytes per full-resolution sample, channel)."""
        return sum(
            2 * self.channels * math.prod(self.layout.scale_shape(k))
            for k in range(1, self.layout.n_scales)
        )

    @property
    def n_params(self) -> int:
        return sum(s.bank.n_params for s in self.scales if s is not None)

    def rows_of(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        """The rows of scale ``j``'s bank that hold blocks ``ids`` ``(n,)``; -1 for a block
        without an MLP."""
        return self._slots[j][ids]

    def mlp_blocks(self, j: int) -> int:
        return 0 if self.scales[j] is None else len(self.scales[j].block_ids)

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def block_outputs(self, j: int, ids: torch.Tensor) -> torch.Tensor:
        """Residual field ``R_j`` on blocks ``ids`` of scale ``j``: ``(n, C, b, ..., b)``."""
        b, d = self.layout.block, self.layout.ndim
        out = torch.zeros((len(ids), self.channels) + (b,) * d, device=self.device)
        scale = self.scales[j]
        if scale is None or len(ids) == 0:
            return out
        if j in self._rows:  # a window: a block outside it would read as one without an MLP
            r0, r1 = self.layout.rows_of_ids(j, int(ids.min()), int(ids.max()) + 1)
            if r0 < self._rows[j][0] or r1 > self._rows[j][1]:
                raise RuntimeError(f"blocks of scale {j} outside the rows held {self._rows[j]}")
        slots = self._slots[j][ids]
        has = slots >= 0
        if has.any():
            values = scale.bank.evaluate(self._coords, rows=slots[has])  # (m, b^d, C)
            out[has] = values.transpose(1, 2).reshape((-1, self.channels) + (b,) * d)
            if self.gaussian:
                out[has] -= self.evaluate_blocks(j, ids[has], from_scale=j + 1)
        return out

    def residual_field(self, k: int, batch_samples: int = 1 << 18) -> torch.Tensor:
        """Dense ``R_k`` ``(C, *scale_shape(k))`` float16 for ``k >= 1`` (cached), decoded
        ``batch_samples`` block samples at a time (transient: their MLP activations)."""
        if k == 0:
            raise ValueError("scale 0 is never held dense; use block_outputs")
        if k not in self._dense:
            shape = list(self.layout.scale_shape(k))
            r0, r1 = self._rows.get(k, (0, 0))
            if k in self._rows:  # a window of rows: the field's first axis is cut to it
                shape[0] = (r1 - r0) * self.layout.block
            field = torch.zeros((self.channels, *shape), dtype=torch.float16, device=self.device)
            scale = self.scales[k]
            if scale is not None:
                batch = max(1, batch_samples // self.layout.block**self.layout.ndim)
                for start in range(0, len(scale.block_ids), batch):
                    ids = scale.block_ids[start : start + batch]
                    coords = self.layout.unravel(k, ids)
                    coords[:, 0] -= r0
                    scatter_blocks(field, self.layout.block, coords, self.block_outputs(k, ids))
            self._dense[k] = field
        return self._dense[k]

    def _window(self, k: int) -> dict[str, int]:
        """How :mod:`.pyramid` reads scale ``k``'s dense field: a window's first row and the
        whole axis's length (nothing for a whole field)."""
        if k not in self._rows:
            return {}
        whole = self.layout.scale_shape(k)[0]
        return {"origin": self._rows[k][0] * self.layout.block, "extent": whole}

    @torch.no_grad()
    def evaluate_blocks(
        self, s: int, ids: torch.Tensor, from_scale: int | None = None
    ) -> torch.Tensor:
        """``sum_{k >= max(from_scale, s)} L_k(R_k)`` at the sample centres of blocks ``ids``
        of scale ``s``: ``(n, C, b, ..., b)``. ``from_scale`` defaults to ``s`` (the
        reconstruction at level of detail ``s``); ``s + 1`` gives the coarser base that scale
        ``s`` refines."""
        from_scale = s if from_scale is None else from_scale
        b, d = self.layout.block, self.layout.ndim
        total = torch.zeros((len(ids), self.channels) + (b,) * d, device=self.device)
        for k in range(max(from_scale, s), self.layout.n_scales):
            if self.scales[k] is None:
                continue
            if k == s:
                total += self.block_outputs(s, ids)
            else:
                positions = self.layout.block_axis_positions(s, ids, at_scale=k)
                field = self.residual_field(k)
                total += interpolate_blocks(field, positions, **self._window(k)).movedim(0, 1)
        return total

    @torch.no_grad()
    def coarser_samples(self, s: int, ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The coarser scales' sum ``sum_{k > s} L_k(R_k)`` (what scale ``s`` refines) at the
        same local positions ``local`` ``(P, d)`` (integers in ``[0, b)``) of every block
        ``ids`` of scale ``s``: :meth:`evaluate_blocks` with ``from_scale = s + 1`` at only
        those samples. Returns ``(n, C, P)``; memory is per sample asked for, not per block."""
        b, d = self.layout.block, self.layout.ndim
        local = local.to(self.device)
        total = torch.zeros((len(ids), self.channels, local.shape[0]), device=self.device)
        coords = self.layout.unravel(s, ids).to(torch.float64)
        for k in range(s + 1, self.layout.n_scales):
            if self.scales[k] is None:
                continue
            factor = 2.0 ** (k - s)
            positions = [
                ((coords[:, a : a + 1] * b + local[:, a] + 0.5) / factor - 0.5).float()
                for a in range(d)
            ]
            field = self.residual_field(k)
            total += interpolate_at(field, positions, **self._window(k)).movedim(0, 1)
        return total

    def new_bank(self, j: int, ids: torch.Tensor, seed: int, share: bool = False) -> MLPBank:
        """SIREN-initialised MLPs for blocks ``ids`` ``(n,)`` of scale ``j``, each from its own
        stream (:meth:`MLPBank.for_blocks`); ``share``: a block whose parent has an MLP starts
        from the parent's weights / sqrt(2^d) instead (the weight-sharing variant)."""
        bank = MLPBank.for_blocks(self.bank_shape, ids, seed, j, self.device)
        parent = self.scales[j + 1] if j + 1 < len(self.scales) else None
        if share and parent is not None and len(ids):
            rows = self.rows_of(j + 1, self.layout.parent(j, ids))
            has = rows >= 0
            shrink = 1.0 / math.sqrt(2**self.layout.ndim)
            for p, q in zip(bank.params, parent.bank.params, strict=True):
                p[has] = q[rows[has]] * shrink
        return bank

    def measure(
        self,
        source,
        from_scale: int,
        iou: bool,
        batch: int = 512,
        blocks: tuple[int, int] | None = None,
    ) -> MetricSums:
        """Metric sums of level of detail ``from_scale`` against the full-resolution signal
        ``source`` (a :class:`miner3d.source.SignalSource` on this layout), real samples
        only, streamed block batch by block batch (no dense float copy of either), over the
        scale-0 blocks ``[start, stop)`` of ``blocks`` (all by default). ``iou``: also
        count IoU (binary signals)."""
        sums = MetricSums()
        for ids, values in self.iter_blocks(0, from_scale, batch, blocks):
            truth = source.level_blocks(0, self.layout.unravel(0, ids))
            mask = self.layout.valid_mask(0, ids)
            sums = sums.add(block_sums(values.to(truth.device), truth, mask, iou))
        return sums

    def iter_blocks(
        self,
        s: int = 0,
        from_scale: int | None = None,
        batch: int = 512,
        blocks: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream the reconstruction at scale ``s``: yields ``(ids (n,), values (n, C, b..b))``
        over every block of scale ``s`` (or the ids ``[start, stop)`` of ``blocks``). Peak
        memory: one batch of blocks."""
        first, stop = blocks or (0, self.layout.n_blocks(s))
        for start in range(first, stop, batch):
            ids = torch.arange(start, min(start + batch, stop), device=self.device)
            yield ids, self.evaluate_blocks(s, ids, from_scale)

    def decode(self, scale: int = 0, batch: int = 512) -> torch.Tensor:
        """Dense reconstruction at level of detail ``scale`` on that scale's own grid, padding
        cropped: ``(C, *valid_shape(scale))`` float32. Memory: 4 bytes per sample and channel
        of that grid (4 GiB at 1024^3: stream with :meth:`iter_blocks` instead)."""
        field = torch.empty((self.channels, *self.layout.scale_shape(scale)), device=self.device)
        for ids, values in self.iter_blocks(scale, batch=batch):
            scatter_blocks(field, self.layout.block, self.layout.unravel(scale, ids), values)
        crop = (slice(None), *(slice(0, n) for n in self.layout.valid_shape(scale)))
        return field[crop]

    query = sampling.query  # the model at arbitrary points, fractional levels of detail

    # -- files ---------------------------------------------------------------------------
    @torch.no_grad()
    def round_weights(self, dtype: str) -> None:
        """Round every MLP weight and bias to ``dtype`` (``float16``; ``float32`` leaves
        them), in place, still computed in float32, so the model in memory is the one
        :meth:`save` then stores in ``dtype``. Decoded fields are dropped; a weight beyond
        float16's range is an error (never an infinity in the file)."""
        if dtype == "float32":
            return
        for j, scale in enumerate(self.scales):
            round_params([] if scale is None else scale.bank.params, dtype, f"scale {j}")
        self._dense.clear()
        self.weights = dtype

    def _file_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors (CPU, contiguous; weights in :attr:`weights`) and the JSON header of
        the model file."""
        tensors: dict[str, torch.Tensor] = {}
        dtype = getattr(torch, self.weights)
        for j in range(self.layout.n_scales):
            state = self.scale_state_dict(j)
            for k, v in state.items():
                v = v.detach().cpu().contiguous()
                tensors[k] = v.to(dtype) if v.is_floating_point() else v
        header = {
            "format": "miner3d-model",
            "version": MODEL_FORMAT_VERSION,
            "layout": asdict(self.layout),
            "bank_shape": asdict(self.bank_shape),
            "channels": self.channels,
            "gaussian": self.gaussian,
            "transform": None if self.transform is None else self.transform.to_dict(),
            "meta": self.meta,
        }
        return tensors, header

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` atomically: tensors, and JSON metadata."""
        from .io import write_safetensors

        tensors, header = self._file_parts()
        return write_safetensors(path, tensors, "miner3d", header)

    def nbytes_on_disk(self) -> int:
        """The size :meth:`save` would write, computed in memory (one copy of the tensors)."""
        from .io import safetensors_bytes

        tensors, header = self._file_parts()
        return len(safetensors_bytes(tensors, "miner3d", header))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> MinerModel:
        """Read a model written by :meth:`save`; every claim of its header is checked first
        (:mod:`miner3d.modelfile`). Memory: the file's tensors."""
        from .modelfile import read_model_file

        head, tensors = read_model_file(path, scale_prefix)
        model = cls(
            head.layout,
            head.bank_shape,
            head.channels,
            head.transform,
            head.gaussian,
            head.meta,
            device,
        )
        for j in range(head.layout.n_scales):
            model.load_scale_state_dict(j, tensors)
        if any(t.dtype == torch.float16 for t in tensors.values()):
            model.weights = "float16"
        return model
