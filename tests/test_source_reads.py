"""SignalSource's block reads against direct slicing of the array."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.uint16])
@pytest.mark.parametrize("pad", ["zero", "edge"])
def test_block_reads_equal_direct_slicing(dtype, pad):
    """SignalSource.level_blocks reads exactly the samples a slice of the array holds (the
    box filter's mean of them at a coarser scale), edge and padding included, in reads of
    fewer samples than a block row."""
    from miner3d.blocks import BlockLayout
    from miner3d.source import SignalSource

    rng = np.random.default_rng(0)
    data = (rng.random((2, 21, 13, 10)) * 200).astype(dtype)
    layout = BlockLayout((21, 13, 10), block=4, n_scales=2)
    src = SignalSource(data, layout, pad, budget=97)
    padded = np.pad(
        data.astype(np.float64),
        [(0, 0)] + [(0, 32 - n) for n in data.shape[1:]],
        mode="constant" if pad == "zero" else "edge",
    )
    for j in (0, 1):
        ids = torch.arange(layout.n_blocks(j))
        got = src.level_blocks(j, layout.unravel(j, ids)).double().numpy()
        span = 4 << j
        for k, (x, y, z) in enumerate(layout.unravel(j, ids).tolist()):
            box = padded[:, x * span : (x + 1) * span, y * span : (y + 1) * span]
            box = box[..., z * span : (z + 1) * span]
            want = box.reshape(2, 4, 1 << j, 4, 1 << j, 4, 1 << j).mean(axis=(2, 4, 6))
            np.testing.assert_allclose(got[k], want, rtol=1e-6)
