"""Benchmark: does ``torch.compile`` speed up the bank's training step? (issue 14)

The step of :mod:`scripts.bench_bank`'s cases (forward through the batched sine MLPs, MSE,
backward; Adam left out: the same in both) in chunks of 2^14 samples on leaf views of their
rows, as the trainer runs it, eager against ``torch.compile`` (inductor; static shapes, which
recompile for every new chunk size, and ``dynamic=True``). Prints the median of 7 steps after
3 warm-up steps, and the seconds the first compiled step took (compilation included: a fit
pays them once per process, and again for every new shape when static).

    python scripts/bench_compile.py
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from miner3d.bank import BankShape, MLPBank

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK = 1 << 14


def loss_of(coords, target, shape, *params):
    """Sum over blocks of each block's MSE, through the bank's own forward
    (:meth:`miner3d.bank.MLPBank.forward`): ``params`` are ``(n, in, out)``, ``(n, 1, out)``
    per layer of a bank of ``shape``, ``coords`` ``(P, d)``, ``target`` ``(n, P, C)``."""
    out = MLPBank(shape, list(params)).forward(coords)
    return (out - target).square().mean(dim=(1, 2)).sum()


def step(f, params, coords, target, shape, per_chunk: int) -> None:
    n = params[0].shape[0]
    for s in range(0, n, per_chunk):
        rows = [p[s : s + per_chunk].detach().requires_grad_() for p in params]
        loss = f(coords, target[s : s + per_chunk], shape, *rows)
        torch.autograd.grad(loss, rows)


def timed(f, *args) -> float:
    for _ in range(3):
        step(f, *args)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        step(f, *args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from bench_bank import CASES

    torch.manual_seed(0)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print("| case | eager ms | compiled ms (first step s) | dynamic ms (first step s) |")
    print("|---|---|---|---|")
    for name, (d, hidden, layers, channels, n, points) in CASES.items():
        shape = BankShape(d, hidden, layers, channels, 30.0)
        params = []
        for i, o in shape.layer_sizes:
            params += [torch.randn(n, i, o) * 0.1, torch.zeros(n, 1, o)]
        coords = torch.rand(points, d) * 2 - 1
        target = torch.randn(n, points, channels)
        args = (params, coords, target, shape, max(1, CHUNK // points))
        row = [f"{timed(loss_of, *args) * 1e3:.0f}"]
        for dynamic in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(loss_of, dynamic=dynamic)
            t0 = time.perf_counter()
            step(compiled, *args)
            first = time.perf_counter() - t0
            row.append(f"{timed(compiled, *args) * 1e3:.0f} ({first:.1f} s)")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
