"""The method users would pick instead of MINER: an instant-ngp-style multiresolution hash
encoding with a tiny MLP (Mueller et al. 2022), in pure PyTorch, fitted to the same voxel
occupancy grid as miner3d, for ``scripts/bench_fit.py``.

Encoding: ``levels`` grids from ``base`` to ``finest`` cells along the longest axis (a
geometric series), ``features`` values per vertex; a level with at most ``2^log2_table``
vertices is indexed densely, a finer one through instant-ngp's spatial hash (coordinates
times the primes 1, 2654435761, 805459861, xor-ed, modulo the table). Each point's features
are the levels' d-linear interpolations, concatenated, then an MLP of ``hidden_layers`` x
``hidden`` ReLU units gives one logit. instant-ngp's defaults: 16 levels, 2 features, tables
of 2^19, base 16, a 2 x 64 MLP, Adam (lr 1e-2, betas 0.9/0.99, eps 1e-15), table entries
initialised in U(-1e-4, 1e-4).

Training: binary cross-entropy on the logits at voxel centres, batches of ``batch`` voxels,
half drawn uniformly and half among the surface voxels (those with a 6-neighbour of the
other value), as instant-ngp samples an SDF near its surface. Quality: the exact full-grid
IoU (logit > 0 against the grid) on miner3d's finest-scale schedule
(:func:`miner3d.stopping.measure_now`); the fit stops at the time cap or by miner3d's quality
plateau rule (:func:`miner3d.stopping.quality_plateau`, tail 1.5). The clock counts training
only: measurements are excluded (they would favour miner3d, which measures only its live
blocks), which is generous to this baseline.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)
SIGNED_PRIMES = tuple(p - (1 << 32) if p >= 1 << 31 else p for p in PRIMES)
"""The primes as int32 values: int32 products wrap modulo 2^32 as uint32 ones do, so their
low bits (all the table index keeps) are instant-ngp's."""


class _Gather(torch.autograd.Function):
    """``table[index]`` whose backward sums the gradient rows with ``torch.bincount`` per
    feature: 1.3x faster than index_put's accumulation, 2.3x than index_select's
    scatter_add, for 8.4 M random rows of a 6.6 M x 2 table on this project's CPU."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        cols = [torch.bincount(index, grad[:, f], ctx.rows) for f in range(grad.shape[1])]
        return torch.stack(cols, 1).to(grad.dtype), None


class HashGridField(nn.Module):
    """A multiresolution hash encoding of ``[0, 1]^d`` followed by a ReLU MLP.

    Args:
        ndim: dimensions of the domain (2 or 3).
        levels, features, log2_table, base, finest: the encoding (see the module).
        hidden, hidden_layers: the MLP.
    """

    def __init__(
        self,
        ndim: int = 3,
        levels: int = 16,
        features: int = 2,
        log2_table: int = 19,
        base: int = 16,
        finest: int = 512,
        hidden: int = 64,
        hidden_layers: int = 2,
    ):
        super().__init__()
        growth = math.exp((math.log(finest) - math.log(base)) / max(1, levels - 1))
        self.ndim, self.table_size = ndim, 1 << log2_table
        res = [math.floor(base * growth**lvl) for lvl in range(levels)]
        sizes = [min((r + 1) ** ndim, self.table_size) for r in res]
        self.register_buffer("res", torch.tensor(res, dtype=torch.float32))
        self.n_dense = sum((r + 1) ** ndim <= self.table_size for r in res)  # a prefix
        stride = torch.tensor(res, dtype=torch.int64)[:, None] + 1
        self.register_buffer("powers", (stride ** torch.arange(ndim)).int())  # (L, d): dense
        self.mask = self.table_size - 1  # hashed levels fill the whole table
        self.register_buffer("offset", torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.int32))
        self.table = nn.Parameter(torch.empty(sum(sizes), features).uniform_(-1e-4, 1e-4))
        dims, layers = [levels * features] + [hidden] * hidden_layers, []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, d)`` in ``[0, 1]``. Returns ``(N, levels * features)``. Memory: about
        ``N * levels * 2^d * 24`` bytes of indices, weights and gathered features."""
        n, d = x.shape
        pos = x[:, None, :] * self.res[None, :, None]  # (N, L, d)
        low = pos.floor()
        frac = pos - low
        low = low.int()  # int32: half the memory traffic of int64 (indices < 2^31)
        two = torch.arange(2, device=x.device, dtype=torch.int32)
        k_dense = self.n_dense

        def corners(k: int, values: torch.Tensor) -> torch.Tensor:  # axis k's pair, broadcast
            return values.reshape((n, -1) + (1,) * (d - 1 - k) + (2,) + (1,) * k)

        dense = hashed = weights = None  # each (N, L', 2, .., 2)
        for k in range(d):
            vertex = low[:, :, k, None] + two  # (N, L, 2)
            w = corners(k, torch.stack([1 - frac[:, :, k], frac[:, :, k]], -1))
            term = corners(k, vertex[:, :k_dense] * self.powers[:k_dense, k, None])
            h = corners(k, vertex[:, k_dense:] * SIGNED_PRIMES[k])
            dense = term if dense is None else dense + term
            hashed = h if hashed is None else hashed ^ h
            weights = w if weights is None else weights * w
        index = torch.cat([dense, hashed & self.mask], 1)
        index = (index + self.offset.reshape((1, -1) + (1,) * d)).reshape(-1)
        gathered = _Gather.apply(self.table, index).reshape(-1, 1 << d, self.table.shape[1])
        mixed = torch.bmm(weights.reshape(-1, 1, 1 << d), gathered)  # (N * L, 1, F)
        return mixed.reshape(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, d)`` in ``[0, 1]``. Returns ``(N,)`` logits."""
        return self.mlp(self.encode(x))[:, 0]

    def params(self) -> int:
        """Parameters: every table entry in use and the MLP's weights."""
        return sum(p.numel() for p in self.parameters())


def _centres(flat: torch.Tensor, shape: tuple[int, ...], longest: int) -> torch.Tensor:
    """Voxel centres of flat indices ``flat`` ``(N,)`` of a C-order grid of ``shape``, in
    ``[0, 1]`` along the longest axis (cubic voxels). Returns ``(N, d)`` float32."""
    return (torch.stack(torch.unravel_index(flat, shape), 1).float() + 0.5) / longest


def surface_voxels(grid: np.ndarray) -> torch.Tensor:
    """Flat indices ``(M,)`` int64 of the voxels with a 6-neighbour of the other value.
    Memory: a boolean copy of the grid and the indices."""
    solid = grid.astype(bool)
    edge = np.zeros_like(solid)
    for axis in range(solid.ndim):
        a = [slice(None)] * solid.ndim
        b = [slice(None)] * solid.ndim
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        differ = solid[tuple(a)] != solid[tuple(b)]
        edge[tuple(a)] |= differ
        edge[tuple(b)] |= differ
    return torch.from_numpy(np.flatnonzero(edge))


@torch.no_grad()
def full_grid_iou(model: HashGridField, grid: np.ndarray, chunk: int = 1 << 12) -> float:
    """Exact IoU of ``logit > 0`` at every voxel centre against ``grid`` (``(D, H, W)``
    uint8 or bool), ``chunk`` voxels at a time (4096: the fastest, 0.5 M voxels/s on this
    project's CPU, against 0.28 at 2^16)."""
    shape, truth = grid.shape, torch.from_numpy(grid.reshape(-1).astype(bool))
    inter = union = 0
    for lo in range(0, truth.numel(), chunk):
        flat = torch.arange(lo, min(lo + chunk, truth.numel()))
        pred = model(_centres(flat, shape, max(shape))) > 0
        t = truth[lo : lo + len(flat)]
        inter += int((pred & t).sum())
        union += int((pred | t).sum())
    return inter / union if union else 1.0


def fit_hashgrid(
    grid: np.ndarray,
    cap: float,
    *,
    thresholds: tuple[float, ...] = (0.99, 0.995, 0.999),
    lr: float = 1e-2,
    batch: int = 1 << 14,
    every: int = 20,
    tail: float = 1.5,
    max_iters: int | None = None,
    seed: int = 0,
    callback: Any = None,
    **encoding: Any,
) -> dict[str, Any]:
    """Fit a :class:`HashGridField` to an occupancy ``grid`` ``(D, H, W)`` until ``cap``
    seconds of training, a target-free quality plateau (``tail``), an IoU of 1, or
    ``max_iters`` iterations.

    ``batch``: 2^14 voxels per step reached 0.999 at Lucy 256 sooner than 2^12 or 2^16 on
    this project's CPU. Returns ``{"params", "iou", "seconds" (training clock),
    "seconds_measuring", "iterations", "reached" ({threshold: first second or None}),
    "history" (the measurements), "stopped", "batch"}``. Memory: the grid's surface
    indices, the tables (``4 * features * sum(table sizes)`` bytes, with their gradient and
    Adam's two moments) and one batch's encoding."""
    from miner3d.kinds import get_kind
    from miner3d.metrics import time_to
    from miner3d.stopping import measure_now, next_measurement, quality_plateau

    torch.manual_seed(seed)
    kind = get_kind("occupancy")
    shape, longest = grid.shape, max(grid.shape)
    encoding.setdefault("finest", longest)
    model = HashGridField(ndim=grid.ndim, **encoding)
    mlp_params = [p for n, p in model.named_parameters() if n.startswith("mlp")]
    opt = torch.optim.Adam(
        [{"params": [model.table]}, {"params": mlp_params, "weight_decay": 1e-6}],
        lr=lr,
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    truth = torch.from_numpy(grid.reshape(-1).astype(np.float32))
    surface = surface_voxels(grid)
    total = truth.numel()
    history: list[dict[str, Any]] = []
    clock = measuring = 0.0
    it, stopped = 0, "time_limit"
    while clock < cap:
        t0 = time.perf_counter()
        half = batch // 2
        flat = torch.cat(
            [
                torch.randint(0, total, (batch - half,)),
                surface[torch.randint(0, max(1, len(surface)), (half,))],
            ]
        )
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(_centres(flat, shape, longest)), truth[flat]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        clock += time.perf_counter() - t0
        last = clock >= cap or it == max_iters
        if measure_now(0, it, every) or last:
            t1 = time.perf_counter()
            record = {"event": "iteration", "scale": 0, "iteration": it, "time": clock}
            record["iou"] = full_grid_iou(model, grid)
            record["loss"] = float(loss.detach())
            measuring += time.perf_counter() - t1
            history.append(record)
            if callback is not None:
                callback(record)
            if record["iou"] >= 1.0:
                stopped = "target"
                break
            if quality_plateau(history, kind, tail, next_measurement(it, every)):
                stopped = "plateau"
                break
            if it == max_iters:
                stopped = "max_iters"
                break
    return {
        "params": model.params(),
        "iou": history[-1]["iou"] if history else None,
        "seconds": clock,
        "seconds_measuring": measuring,
        "iterations": it,
        "reached": time_to(history, "iou", thresholds),
        "history": history,
        "stopped": stopped,
        "batch": batch,
    }
