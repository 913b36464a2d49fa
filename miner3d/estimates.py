"""How much memory a fit will take, before it starts: the preflight's figures.

A fit's peak is the signal held in memory, the coarse scales' float16 residual fields, the
finest scale's float16 target cache and the float32 parts its measurements keep (the
coarser scales' sum and the signal at its live blocks, each within ``fit.cache_targets``),
the MLP banks (every finished scale's parameters; the finest scale's parameters,
gradients, Adam moments and final copy), and the activations of one chunk of samples. Only
the banks depend on the fit itself, through how many blocks keep an
MLP; that count is predicted from the signal:

* occupancy: the blocks of each scale whose voxels are not all alike (the surface passes
  through them), counted exactly from the grid at 1 byte per block; measured within 10 % of
  the fitted count on Lucy at 256 and 512;
* images: every block with a real sample (a photo's blocks nearly all keep an MLP at the
  image preset's 45 dB pruning level; a flat image is over-estimated).

Measured against the peak RSS increase of fresh processes on the 2-core machine (the fit
alone, 60-100 iterations per scale): 0.99x, 0.97x and 0.91x of this estimate for Lucy at 256,
512 and 640 (cpu preset), 0.82x for a synthetic 4096^2 image (image preset).
(Those ratios were measured before issue 14; since then every CPU fit fixes the heap's
thresholds (:func:`miner3d.memory.tune_heap`) and trains in 2^14-sample chunks, so the
activation term is a few MiB at every size, and the same tests still hold.)
``tests/test_memory_estimates.py`` holds Lucy at 640 and 768 (one size in each regime) and a
4096^2 image within 25 %.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .bank import BankShape
from .blocks import BlockLayout
from .config import FitConfig
from .source import block_extremes

TORCH_OVERHEAD = 96 << 20
"""Allocator and kernel workspace a fit adds beyond its tensors (measured)."""


def predicted_live_blocks(data: Any, binary: bool, layout: BlockLayout) -> list[int]:
    """Blocks per scale predicted to keep an MLP (see the module doc), from ``data``
    ``(C, *S)``. Memory: one layer of blocks of the signal at a time, plus 2 bytes per block."""
    b, d = layout.block, layout.ndim
    if not binary:
        return [math.prod(-(-n // (b << j)) for n in layout.shape) for j in range(layout.n_scales)]
    some, every = block_extremes(data[:1], layout)  # occupancy: one channel
    hi, lo = some.numpy(), every.numpy()  # some voxel of the block inside; all of them
    counts = []
    for _ in range(layout.n_scales):
        counts.append(int(np.count_nonzero(hi & ~lo)))
        if any(n % 2 for n in hi.shape):
            break
        split = [x for n in hi.shape for x in (n // 2, 2)]
        axes = tuple(range(1, 2 * d, 2))
        hi, lo = hi.reshape(split).any(axis=axes), lo.reshape(split).all(axis=axes)
    return counts + [counts[-1]] * (layout.n_scales - len(counts))


def fit_bytes(
    layout: BlockLayout,
    channels: int,
    signal_bytes: int,
    fit: FitConfig,
    live: list[int],
    ranks: int = 1,
) -> dict[str, int]:
    """The parts of a fit's peak, in bytes (see the module doc); ``live[j]``: blocks of scale
    ``j`` with an MLP. ``signal_bytes``: what the signal holds in memory (0 for a map).
    ``ranks > 1``: rank 0's peak among that many (:mod:`miner3d.sharding`): its share of the
    target cache and of the banks, its windows of the coarser fields (its share of a field's
    rows plus three for the halo and the rounding to blocks), and the whole model it
    receives at the end."""
    d, b = layout.ndim, layout.block
    per_block = BankShape(d, fit.hidden, fit.hidden_layers, channels, fit.w0).params_per_block
    fields = 0
    for k in range(1, layout.n_scales):
        rows = layout.grid(k)[0]
        share = min(rows, -(-rows // ranks) + 3 * (ranks > 1))
        fields += 2 * channels * math.prod(layout.scale_shape(k)) * share // rows
    mine = [-(-n // ranks) for n in live]
    cache = 2 * channels * b**d * mine[0]
    cache = cache if cache <= fit.cache_targets else 0
    kept = (8 if layout.n_scales > 1 else 4) * channels * b**d * mine[0]  # fixed_parts
    kept = kept if kept <= fit.cache_targets else 0
    banks = 4 * per_block * (sum(mine[1:]) + 5 * mine[0])
    if ranks > 1:  # rank 0 receives the whole model at the end, to write it
        banks += 4 * per_block * sum(live)
    samples = min(b**d, fit.block_points(live[0]) or b**d)  # 0: every sample
    chunk = min(fit.chunk_samples(), samples * max(1, live[0]))
    width = max(fit.hidden, channels)
    activations = chunk * (3 * fit.hidden_layers + 2) * width * 4
    evaluation = 96 << 20  # one streamed batch of blocks (targets, metrics)
    return {
        "signal": int(signal_bytes),
        "fields": fields,
        "cache": cache,
        "measurement": kept,
        "banks": banks,
        "activations": activations + evaluation,
        "overhead": TORCH_OVERHEAD,
    }
