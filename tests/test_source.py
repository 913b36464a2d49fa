"""The signal source: blocks of every scale read from the unpadded signal (in memory or
memory-mapped), equal to box-filtering an explicitly padded copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import box_downsample, gather_blocks

from miner3d.blocks import BlockLayout
from miner3d.source import SignalSource


def _padded(data: np.ndarray, layout: BlockLayout, pad: str) -> torch.Tensor:
    """The reference: an explicit padded copy (what the trainer no longer makes)."""
    x = torch.from_numpy(np.array(data)).float()
    widths = []
    for n, p in zip(reversed(layout.shape), reversed(layout.padded), strict=True):
        widths += [0, p - n]
    mode = "replicate" if pad == "edge" else "constant"
    return F.pad(x[None], widths, mode=mode)[0]


@pytest.mark.parametrize("pad", ["edge", "zero"])
@pytest.mark.parametrize("shape", [(3, 37, 53), (1, 19, 13, 30)])
@pytest.mark.parametrize("mapped", [False, True])
def test_level_blocks_match_box_filter_of_padded_copy(tmp_path, pad, shape, mapped):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if mapped:  # a channels-last file seen channels-first, as images are read
        last = np.lib.format.open_memmap(
            tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=shape[1:] + shape[:1]
        )
        last[:] = np.moveaxis(data, 0, -1)
        last.flush()
        del last
        data = np.moveaxis(np.load(tmp_path / "x.npy", mmap_mode="r"), -1, 0)
        assert isinstance(data, np.memmap)
    layout = BlockLayout(shape[1:], block=4, n_scales=3)
    source = SignalSource(data, layout, pad, value_scale=1 / 255)
    assert source.mapped == mapped and (source.nbytes == 0) == mapped
    ref = _padded(np.asarray(data), layout, pad) / 255
    for j in range(3):
        level = box_downsample(ref, 2**j)
        ids = torch.arange(layout.n_blocks(j))
        coords = layout.unravel(j, ids)
        got = source.level_blocks(j, coords)
        torch.testing.assert_close(got, gather_blocks(level, 4, coords), atol=1e-6, rtol=0)
        # the same values at chosen positions of some blocks
        ids = torch.tensor([0, layout.n_blocks(j) - 1, layout.n_blocks(j) // 2])
        ndim = len(shape) - 1
        local = torch.tensor([[0] * ndim, [3] * ndim, [1] + [2] * (ndim - 1)])
        blocks = gather_blocks(level, 4, layout.unravel(j, ids)).flatten(2)
        flat = torch.zeros(len(local), dtype=torch.long)
        for axis in range(ndim):
            flat = flat * 4 + local[:, axis]
        got = source.values_at(j, ids, local)
        torch.testing.assert_close(got, blocks[:, :, flat], atol=1e-6, rtol=0)


def test_small_read_budget_gives_the_same_blocks():
    data = torch.randint(0, 2, (1, 24, 24, 24), dtype=torch.uint8)
    layout = BlockLayout((24, 24, 24), block=4, n_scales=2)
    coords = layout.unravel(1, torch.arange(layout.n_blocks(1)))
    whole = SignalSource(data, layout, "zero").level_blocks(1, coords)
    bits = SignalSource(data, layout, "zero", budget=100).level_blocks(1, coords)
    torch.testing.assert_close(whole, bits)
