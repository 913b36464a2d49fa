"""Checking a model file before anything is built from it.

A ``model.safetensors`` is read by :meth:`miner3d.model.MinerModel.load`; everything its
header and tensors claim is checked here first, so that a damaged or hostile file gets a
one-line error instead of a traceback, and a header that claims an absurd size is refused
before anything of that size is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bank import BankShape
from .blocks import BlockLayout
from .errors import MinerError
from .grid import GridTransform

MAX_AXIS = 1 << 20
"""Samples along one axis, at most (1M: a 1024^3 grid is 1024)."""
MAX_SAMPLES = 1 << 40
"""Padded samples of a grid, at most (the sum of its coarse fields is 2/7 of this in bytes)."""


@dataclass
class ModelHeader:
    """The checked contents of a model file's header."""

    layout: BlockLayout
    bank_shape: BankShape
    channels: int
    transform: GridTransform | None
    gaussian: bool
    meta: dict[str, Any]


def _positive_int(value: Any, name: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ValueError(f"{name} {value!r} is not a whole number in [1, {top}]")
    return value


def parse_header(header: Any) -> ModelHeader:
    """The header's fields, checked; ``ValueError`` naming the first bad one."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a mapping")
    lay = header.get("layout")
    if not isinstance(lay, dict) or not isinstance(lay.get("shape"), list):
        raise ValueError("layout is missing")
    if len(lay["shape"]) not in (2, 3):
        raise ValueError(f"layout shape {lay['shape']} has not 2 or 3 axes")
    shape = tuple(_positive_int(n, "layout axis", MAX_AXIS) for n in lay["shape"])
    block = _positive_int(lay.get("block"), "block", 1024)
    if block < 2 or block & (block - 1):
        raise ValueError(f"block {block} is not a power of two")
    n_scales = _positive_int(lay.get("n_scales"), "n_scales", 16)
    layout = BlockLayout(shape, block, n_scales)
    if math.prod(layout.padded) > MAX_SAMPLES:
        raise ValueError(f"layout {shape} holds more than 2^40 samples")
    bank = header.get("bank_shape")
    if not isinstance(bank, dict):
        raise ValueError("bank_shape is missing")
    bank_shape = BankShape(
        _positive_int(bank.get("in_features"), "in_features", 3),
        _positive_int(bank.get("hidden"), "hidden", 4096),
        _positive_int(bank.get("hidden_layers"), "hidden_layers", 64),
        _positive_int(bank.get("out_features"), "out_features", 64),
        float(bank.get("w0", 30.0)),
    )
    if bank_shape.in_features != len(shape):
        raise ValueError(f"in_features {bank_shape.in_features} is not the layout's {len(shape)}")
    channels = _positive_int(header.get("channels"), "channels", 64)
    if channels != bank_shape.out_features:
        raise ValueError(f"channels {channels} is not out_features {bank_shape.out_features}")
    transform = header.get("transform")
    if transform is not None:
        transform = GridTransform.from_dict(transform)
    meta = header.get("meta", {})
    return ModelHeader(
        layout,
        bank_shape,
        channels,
        transform,
        bool(header.get("gaussian", False)),
        meta if isinstance(meta, dict) else {},
    )


def check_tensors(head: ModelHeader, tensors: dict[str, torch.Tensor], prefix_of) -> None:
    """Every scale's tensors have the shapes the header says; ``ValueError`` otherwise."""
    sizes = head.bank_shape.layer_sizes
    for j in range(head.layout.n_scales):
        prefix = prefix_of(j)
        ids = tensors.get(prefix + "block_ids")
        if ids is None:
            continue
        n_blocks = head.layout.n_blocks(j)
        if ids.ndim != 1 or ids.dtype != torch.int64:
            raise ValueError(f"{prefix}block_ids is not a 1-D int64 tensor")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n_blocks):
            raise ValueError(f"{prefix}block_ids index blocks outside scale {j}'s {n_blocks}")
        for layer, (fan_in, fan_out) in enumerate(sizes):
            for i, expected in ((2 * layer, (fan_in, fan_out)), (2 * layer + 1, (1, fan_out))):
                param = tensors.get(f"{prefix}param{i}")
                if param is None:
                    raise ValueError(f"tensor {prefix}param{i} is missing")
                if param.dtype not in (torch.float32, torch.float16):
                    raise ValueError(f"{prefix}param{i} is {param.dtype}, not float32 or float16")
                if tuple(param.shape) != (len(ids), *expected):
                    raise ValueError(
                        f"{prefix}param{i} is {tuple(param.shape)}, expected "
                        f"{(len(ids), *expected)}"
                    )


def read_model_file(path: str | Path, prefix_of) -> tuple[ModelHeader, dict[str, torch.Tensor]]:
    """The checked header and the tensors of a model file; one line naming what is wrong
    otherwise."""
    from .io import read_safetensors

    header, tensors = read_safetensors(path, "miner3d", "model")
    try:
        head = parse_header(header)
        check_tensors(head, tensors, prefix_of)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MinerError(f"model {path} is malformed: {exc}") from None
    return head, tensors
