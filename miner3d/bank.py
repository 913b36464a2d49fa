"""A bank of tiny SIRENs, one per block, evaluated with batched matrix products.

Parameters of layer ``l`` are stacked over blocks: weights ``(n, in, out)``, biases
``(n, 1, out)``. Hidden layers compute ``sin(w0 * (x W + b))``; the last layer is linear.
Initialisation follows SIREN (Sitzmann et al. 2020): the first layer uniform in
``+-1/in``, later layers uniform in ``+-sqrt(6/in)/w0``.

The bank never knows the signal: the trainer gives it local coordinates and blocks to run.
Frozen blocks leave the optimisation together with their optimiser state
(:meth:`BankAdam.keep`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from . import siren
from .errors import MinerError
from .fused import adam_step


@dataclass(frozen=True)
class BankShape:
    """Architecture of every MLP of a bank."""

    in_features: int
    hidden: int
    hidden_layers: int
    out_features: int
    w0: float

    @property
    def layer_sizes(self) -> list[tuple[int, int]]:
        sizes = [self.in_features] + [self.hidden] * self.hidden_layers + [self.out_features]
        return list(itertools.pairwise(sizes))

    @property
    def params_per_block(self) -> int:
        return sum(i * o + o for i, o in self.layer_sizes)


class MLPBank:
    """``n`` SIRENs of the same shape.

    Attributes:
        shape: the :class:`BankShape`.
        params: ``[W_0, b_0, W_1, b_1, ...]``: ``W_l`` ``(n, in, out)``, ``b_l`` ``(n, 1, out)``.
    """

    def __init__(self, shape: BankShape, params: list[torch.Tensor]):
        self.shape = shape
        self.params = params

    @classmethod
    def create(
        cls,
        shape: BankShape,
        n: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> MLPBank:
        """SIREN-initialised bank of ``n`` MLPs (float32)."""
        params = []
        for layer, (fan_in, fan_out) in enumerate(shape.layer_sizes):
            bound = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in) / shape.w0
            w = torch.rand(n, fan_in, fan_out, generator=generator) * 2 - 1
            b = torch.rand(n, 1, fan_out, generator=generator) * 2 - 1
            params += [(w * bound).to(device), (b * bound).to(device)]
        return cls(shape, params)

    @classmethod
    def for_blocks(
        cls,
        shape: BankShape,
        ids: torch.Tensor,
        seed: int,
        stream: int,
        device: torch.device | str = "cpu",
    ) -> MLPBank:
        """SIREN-initialised bank with one MLP per block id ``(n,)``, each drawn from its own
        counter-based stream (:func:`block_uniform`): a block's initial weights depend only
        on ``seed``, ``stream`` (the scale) and its id, never on which other blocks share
        the bank, so sharding blocks across ranks changes nothing. Memory: 16 bytes per
        parameter while drawing."""
        params = []
        for layer, (fan_in, fan_out) in enumerate(shape.layer_sizes):
            bound = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in) / shape.w0
            for k, size in enumerate(((fan_in, fan_out), (1, fan_out))):
                u = block_uniform(seed, (stream << 8) + 2 * layer + k, ids, math.prod(size))
                params.append(((u * 2 - 1) * bound).reshape(len(ids), *size).to(device))
        return cls(shape, params)

    def __len__(self) -> int:
        return self.params[0].shape[0]

    @property
    def n_params(self) -> int:
        return len(self) * self.shape.params_per_block

    def forward(self, coords: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate the MLPs.

        Args:
            coords: ``(P, d)`` local coordinates shared by all blocks, or ``(n, P, d)``.
            rows: optional ``(m,)`` subset of the bank's rows to run.

        Returns:
            ``(n or m, P, out_features)``.
        """
        params = self.params if rows is None else [p[rows] for p in self.params]
        single = params[0].shape[0] == 1
        if single:  # a batch of one takes another kernel (last bits differ): run two
            params = [torch.cat([p, p.detach()]) for p in params]
        # every block's outputs are then bitwise the same in any company: sharding blocks
        # across ranks, or chunking them, changes no result
        x = self._layers(params, coords).transpose(1, 2).contiguous()
        return x[:1] if single else x

    def _layers(
        self,
        params: list[torch.Tensor],
        coords: torch.Tensor,
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The MLPs of ``params`` at ``coords`` (:func:`miner3d.siren.forward`), ``(n, out,
        P)``."""
        return siren.forward(params, coords, self.shape.w0, saved)

    def train_chunk(
        self,
        coords: torch.Tensor,
        rows: slice,
        losses_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        grads: list[torch.Tensor],
    ) -> torch.Tensor:
        """Forward and backward of rows ``rows`` with SIREN's derivatives written out, no
        autograd: ``losses_of(out)`` takes the rows' outputs ``(r, out_features, P)``
        (samples last) and returns their losses ``(r,)`` and the gradient of the losses' sum
        by ``out``, the same shape (:func:`miner3d.losses.mse`; any loss through
        :func:`miner3d.losses.autograd_losses`). The gradients by the parameters go into
        ``grads[i][rows]`` (one buffer ``(n, ...)`` per parameter) straight from the
        products and kernels (:func:`miner3d.siren.backward`), the sine's ``w0`` folded
        into its saved derivative: 1.1-1.2x faster a step
        on a CPU than autograd through :meth:`forward` before the fused passes
        (``scripts/bench_bank.py``), and fewer kernels on a GPU.
        Like :meth:`forward`, a row's results do not depend on its company (a batch of one
        runs as two). Returns the losses ``(r,)``, detached. Memory: two activations ``(r,
        hidden, P)`` per hidden layer."""
        params = [p.detach()[rows] for p in self.params]
        r = params[0].shape[0]
        if r == 1:
            params = [torch.cat([p, p]) for p in params]
        saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        out = self._layers(params, coords, saved)[:r]
        losses, grad = losses_of(out)
        g = grad
        if len(params[0]) != r or grad.stride() != out.stride():  # out: C-contiguous
            # a fresh (rows, out, P) buffer, whatever strides the gradient's size-1 axes
            # have: the CPU's bmm picks its kernel by the strides, size-1 axes included,
            # and on some CPUs (AMD Zen 5 with MKL) two kernels round differently
            g = out.new_zeros((params[0].shape[0], *out.shape[1:]))
            g[:r] = grad
        siren.backward(saved, g, grads, rows, coords)
        return losses.detach()

    @torch.no_grad()
    def evaluate(
        self, coords: torch.Tensor, rows: torch.Tensor | None = None, budget: int | None = None
    ) -> torch.Tensor:
        """:meth:`forward` without gradients, ``budget`` samples (blocks x points) at a time:
        blocks in chunks, and one block's samples in chunks when they alone exceed it (one
        SIREN over a whole grid stays in memory). Default: 2^14 samples on a CPU, where a
        chunk's activations then stay in the caches and under the heap's ``mmap`` threshold
        (5k blocks x 512 samples: 0.10 s, against 0.46 s in 64 MiB chunks), 2^22 on a GPU.

        Args:
            coords: ``(P, d)`` local coordinates shared by all blocks, or ``(n, P, d)``.
            rows: optional ``(m,)`` subset of the bank's rows to run.

        Returns:
            ``(n or m, P, out_features)`` float32.
        """
        if budget is None:
            budget = 1 << 14 if self.params[0].device.type == "cpu" else 1 << 22
        n = len(self) if rows is None else len(rows)
        points = coords.shape[-2]
        if n * points <= budget:
            return self.forward(coords, rows)
        if coords.dim() == 2 and points <= budget:  # whole blocks, a few at a time
            every = torch.arange(n, device=coords.device) if rows is None else rows
            per = budget // points
            out = torch.empty((n, points, self.shape.out_features), device=coords.device)
            for start in range(0, n, per):
                out[start : start + per] = self.forward(coords, every[start : start + per])
            return out
        chunk = max(1, budget // max(1, n))
        parts = [self.forward(coords[..., i : i + chunk, :], rows) for i in range(0, points, chunk)]
        return torch.cat(parts, dim=-2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters by name, ``param<i>`` for ``params[i]`` (the keys models and
        checkpoints store, under a prefix)."""
        return {f"param{i}": p for i, p in enumerate(self.params)}

    @classmethod
    def from_state_dict(
        cls, shape: BankShape, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> MLPBank:
        """A bank of ``shape`` from :meth:`state_dict`'s keys; a missing key is a
        ``KeyError`` naming it."""
        n = 2 * len(shape.layer_sizes)  # float16 weights (a model file's) compute in float32
        return cls(shape, [state[f"param{i}"].to(device, torch.float32) for i in range(n)])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the parameters by :meth:`state_dict`'s tensors (on their current device)."""
        device = self.params[0].device
        self.params = MLPBank.from_state_dict(self.shape, state, device).params

    def to(self, device: torch.device | str) -> MLPBank:
        """This bank on ``device`` (``self`` when already there)."""
        if all(p.device == torch.device(device) for p in self.params):
            return self
        return MLPBank(self.shape, [p.detach().to(device) for p in self.params])


class BankAdam:
    """Adam over a bank's stacked parameters, with rows that can be dropped.

    Per-row moments live beside the parameters, so :meth:`keep` shrinks parameters and
    optimiser state together: late iterations cost only the live blocks. :attr:`grads` are
    gradient buffers the trainer fills (and sets as the parameters' ``.grad``): with them a
    step allocates nothing the size of the bank (on a CPU each fresh allocation of tens of
    MiB costs its page faults again, every iteration). Memory: 4x the bank's parameters.
    """

    def __init__(self, bank: MLPBank, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.bank = bank
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        for p in bank.params:
            p.requires_grad_(True)
        self.exp_avg = [torch.zeros_like(p) for p in bank.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in bank.params]
        self.grads = [torch.empty_like(p) for p in bank.params]

    def backward(
        self,
        chunk: int,
        coords: torch.Tensor,
        block_losses: Callable[[slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Forward and backward over the bank at local coordinates ``coords`` ``(P, d)``,
        ``chunk`` rows at a time (:meth:`MLPBank.train_chunk`). ``block_losses(rows, out)``
        takes rows ``rows``'s outputs ``(r, out_features, P)`` and returns their losses
        ``(r,)`` and the gradient of their sum by ``out``. The gradients by the parameters go
        into :attr:`grads`, then set as the parameters' ``.grad``: nothing the bank's size is
        allocated per chunk. Returns every row's loss ``(n,)``, detached. Memory: one
        chunk's activations."""
        bank, n = self.bank, len(self.bank)
        if n == 0:
            return torch.zeros(0, device=bank.params[0].device)
        parts = []
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            losses = bank.train_chunk(coords, rows, partial(block_losses, rows), self.grads)
            parts.append(losses)
        for p, g in zip(bank.params, self.grads, strict=True):
            p.grad = g
        return torch.cat(parts)

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step from the parameters' ``.grad`` (then cleared; a gradient tensor
        may serve as scratch: nothing is allocated), one pass per tensor on a CPU
        (:func:`miner3d.fused.adam_step`). Not torch's fused Adam: it rounds an element by
        where it falls in the tensor (vector body or scalar tail), so a block's update would
        depend on its company, and two ranks would no longer fit exactly as one process."""
        self.step_count += 1
        b1, b2 = self.betas
        c1 = 1 - b1**self.step_count
        c2 = 1 - b2**self.step_count
        for p, m, v in zip(self.bank.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            adam_step(p, p.grad, m, v, self.betas, self.lr / c1, c2, self.eps)
            p.grad = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the parameters and of the moments (the gradient buffers keep
        their storage: their first rows serve)."""
        self.bank.params = [p.detach()[rows].clone().requires_grad_(True) for p in self.bank.params]
        self.exp_avg = [m[rows].clone() for m in self.exp_avg]
        self.exp_avg_sq = [v[rows].clone() for v in self.exp_avg_sq]
        self.grads = [g[: len(rows)] for g in self.grads]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments by name (``exp_avg<i>``, ``exp_avg_sq<i>`` for parameter ``i``); the
        step count and learning rate are :attr:`step_count` and :attr:`lr`."""
        state = {f"exp_avg{i}": m for i, m in enumerate(self.exp_avg)}
        state.update({f"exp_avg_sq{i}": v for i, v in enumerate(self.exp_avg_sq)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], step: int, lr: float) -> None:
        """Restore the moments of :meth:`state_dict`, the step count and the learning rate."""
        device = self.bank.params[0].device
        n = len(self.bank.params)
        self.exp_avg = [state[f"exp_avg{i}"].to(device) for i in range(n)]
        self.exp_avg_sq = [state[f"exp_avg_sq{i}"].to(device) for i in range(n)]
        self.step_count = int(step)
        self.lr = float(lr)


_MASK64 = (1 << 64) - 1


@torch.no_grad()
def round_params(params: list[torch.Tensor], dtype: str, what: str = "the model") -> None:
    """Round ``params`` in place to ``dtype`` (``float16``; ``float32`` leaves them), still
    held in float32; a value beyond float16's range is an error naming ``what``."""
    if dtype == "float32":
        return
    for p in params:
        if len(p) and float(p.abs().max()) > torch.finfo(torch.float16).max:
            raise MinerError(f"{what} has weights beyond float16's range")
        p.copy_(p.to(torch.float16))


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a ``uint64`` array, in place (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def block_uniform(seed: int, stream: int, ids: torch.Tensor, count: int) -> torch.Tensor:
    """``(n, count)`` float32 uniform in ``[0, 1)``: row ``i`` is the first ``count``
    numbers of the stream keyed by ``(seed, stream, ids[i])`` (SplitMix64 over a counter,
    two 24-bit numbers from each 64-bit draw). Depends on nothing else: not on the other
    ids, nor on a generator's state. CPU; memory: 12 bytes per number while mixing."""
    key = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _MASK64
    base = _mix(ids.cpu().numpy().astype(np.uint64) ^ np.uint64(key))
    half = (count + 1) // 2
    z = np.arange(half, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = _mix(base[:, None] + z[None, :])
    out = np.empty((len(base), 2 * half), dtype=np.float32)
    out[:, 0::2] = z >> np.uint64(40)
    out[:, 1::2] = (z >> np.uint64(16)) & np.uint64(0xFFFFFF)
    out *= np.float32(2.0**-24)
    return torch.from_numpy(out[:, :count])
