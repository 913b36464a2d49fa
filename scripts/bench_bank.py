"""Benchmark: throughput of one training step of an MLP bank (forward, MSE loss, backward,
Adam) as the trainer runs it, next to this machine's measured FP32 matrix-multiply peak and
sine throughput.

Sizes are the presets' at realistic block counts: Lucy at 1024 on a CPU (the ``cpu`` preset's
2 x 22 sine MLPs, 128 of a block's 8^3 samples, 21,501 live finest blocks), the ``lucy``
preset (16^3 blocks, every sample) at 2,000 blocks, and the ``image`` preset (3 x 20, RGB,
64 samples a block) at 4,096 blocks. The step runs the trainer's way: the heap tuned as a
fit tunes it (:func:`miner3d.memory.tune_heap`), chunks of ``--chunk`` samples (default: the
config's for the device) on leaf views of their rows, gradients written into
:class:`~miner3d.bank.BankAdam`'s buffers. FLOPs per point: ``2 * in * out`` per layer
forward, counted 3x for forward plus backward; sines and Adam are not counted (so the
percentage is an upper bound of what the matrix work achieves). Sines per second:
``torch.sin`` of a cache-sized tensor (one chunk's activations) and of a 2^26-element one
(memory-bound), and the step's own pass (:func:`miner3d.fused.sin_cos`, a sine and its
cosine from one reduction) over a chunk, from which the last column's bound. The median of
``--repeat`` steps after two warm-up steps.

    python scripts/bench_bank.py
    python scripts/bench_bank.py --chunk 4194304    # one chunk an iteration
    python scripts/bench_bank.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from miner3d.bank import BankAdam, BankShape, MLPBank
from miner3d.config import FitConfig
from miner3d.fused import sin_cos
from miner3d.losses import mse
from miner3d.memory import tune_heap

CASES = {
    "cpu preset, Lucy 1024 finest": (3, 22, 2, 1, 21_501, 128),
    "lucy preset, 16^3 blocks": (3, 22, 2, 1, 2_000, 4096),
    "image preset, RGB": (2, 20, 3, 3, 4_096, 64),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of an ``n x n`` float32 matrix product (median of ``repeat``)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for _ in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def sine_rate(device: torch.device, n: int, repeat: int = 9) -> float:
    """Sines per second of ``torch.sin`` over ``n`` float32 elements (median of ``repeat``)."""
    x = torch.rand(n, device=device)
    out = torch.empty_like(x)
    times = []
    for _ in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.sin(x, out=out)
        sync(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times[1:])


def sin_cos_rate(device: torch.device, rows: int, hidden: int, points: int, repeat: int = 9):
    """Pairs (a sine and its cosine) per second of the step's own pass
    (:func:`miner3d.fused.sin_cos`: one numba kernel on a CPU, torch's functions elsewhere)
    over a chunk's pre-activation ``(rows, hidden, points)`` (median of ``repeat``)."""
    z = torch.rand(rows, hidden, points, device=device) * 60 - 30
    bias = torch.rand(rows, 1, hidden, device=device)
    times = []
    for _ in range(repeat + 1):
        zz = z.clone()
        sync(device)
        t0 = time.perf_counter()
        sin_cos(zz, bias, 30.0, True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return z.numel() / statistics.median(times[1:])


def step_time(case: tuple, device: torch.device, repeat: int, chunk: int) -> tuple[float, int]:
    d, hidden, layers, out, blocks, points = case
    shape = BankShape(d, hidden, layers, out, 30.0)
    bank = MLPBank.create(shape, blocks, device, torch.Generator().manual_seed(0))
    adam = BankAdam(bank, 1e-3)
    coords = torch.rand(points, d, device=device) * 2 - 1
    target = torch.rand(blocks, out, points, device=device)
    rows_per_chunk = max(1, chunk // points)

    def block_losses(rows: slice, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mse(out, target[rows])

    times = []
    for _ in range(repeat + 2):
        sync(device)
        t0 = time.perf_counter()
        adam.backward(rows_per_chunk, coords, block_losses)  # the trainer's chunks, gradients
        adam.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = sum(2 * i * o for i, o in shape.layer_sizes)
    return statistics.median(times[2:]), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--blocks", type=float, default=1.0, help="scale the block counts")
    parser.add_argument("--chunk", type=int, default=0, help="samples per chunk (0: default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    chunk = args.chunk or FitConfig().chunk_samples(device.type)
    tune_heap()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    peak = matmul_peak(device)
    cached, streamed = sine_rate(device, chunk * 22), sine_rate(device, 1 << 26)
    pairs = sin_cos_rate(device, max(1, chunk // 128), 22, 128)
    print(
        f"# {name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; FP32 matmul 2048^2: {peak:.1f} GFLOP/s; torch.sin: "
        f"{cached / 1e9:.2f} G/s ({chunk * 22:,} elements), {streamed / 1e9:.2f} G/s (2^26); "
        f"the step's sine with its cosine: {pairs / 1e9:.2f} G pairs/s; "
        f"chunks of {chunk:,} samples"
    )
    print(
        "| case | blocks x points | step | points/s | GFLOP/s (3x forward) | of matmul peak "
        "| points/s if only sines and cosines ran |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, case in CASES.items():
        case = (*case[:4], max(1, round(case[4] * args.blocks)), case[5])
        seconds, flops = step_time(case, device, args.repeat, chunk)
        n = case[4] * case[5]
        rate = n / seconds
        gflops = 3 * flops * rate / 1e9
        sine_bound = pairs / (case[1] * case[2])  # a sine and its cosine a hidden feature
        print(
            f"| {label} | {case[4]:,} x {case[5]:,} | {seconds * 1e3:.0f} ms | "
            f"{rate / 1e6:.2f} M | {gflops:.1f} | {100 * gflops / peak:.0f} % | "
            f"{sine_bound / 1e6:.1f} M |",
            flush=True,
        )


if __name__ == "__main__":
    main()
