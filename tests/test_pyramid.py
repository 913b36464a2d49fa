from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import gather_blocks, upsample

from miner3d.blocks import BlockLayout, local_coordinates, scatter_blocks
from miner3d.pyramid import interpolate_at


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_interpolate_at_is_align_corners_false_interpolation(factor):
    for x, mode in ((torch.randn(2, 5, 3, 4), "trilinear"), (torch.randn(3, 7, 4), "bilinear")):
        d = x.ndim - 1
        positions = []
        for axis in range(d):
            q = (torch.arange(x.shape[1 + axis] * factor) + 0.5) / factor - 0.5
            view = [1] * d
            view[axis] = -1
            positions.append(q.view(view))
        ref = F.interpolate(x[None], scale_factor=factor, mode=mode, align_corners=False)[0]
        torch.testing.assert_close(interpolate_at(x, positions), ref, atol=1e-5, rtol=0)


def test_layout_padding_and_parents():
    layout = BlockLayout((39, 25, 64), block=8, n_scales=3)
    assert layout.padded == (64, 32, 64)
    assert layout.grid(0) == (8, 4, 8) and layout.grid(2) == (2, 1, 2)
    assert layout.valid_shape(1) == (20, 13, 32)
    ids = torch.arange(layout.n_blocks(0))
    torch.testing.assert_close(layout.ravel(0, layout.unravel(0, ids)), ids)
    parents = layout.unravel(1, layout.parent(0, ids))
    torch.testing.assert_close(parents, layout.unravel(0, ids) // 2)
    mask = layout.valid_mask(0, ids)
    assert int(mask.sum()) == 39 * 25 * 64


def test_gather_scatter_round_trip():
    layout = BlockLayout((32, 16), block=8, n_scales=2)
    field = torch.arange(2 * 32 * 16, dtype=torch.float32).view(2, 32, 16)
    coords = layout.unravel(0, torch.tensor([0, 3, 5]))
    blocks = gather_blocks(field, 8, coords)
    assert blocks.shape == (3, 2, 8, 8)
    c = coords[1]
    torch.testing.assert_close(
        blocks[1], field[:, c[0] * 8 : c[0] * 8 + 8, c[1] * 8 : c[1] * 8 + 8]
    )
    out = torch.zeros_like(field)
    scatter_blocks(out, 8, coords, blocks)
    assert torch.equal(gather_blocks(out, 8, coords), blocks)
    assert out.count_nonzero() == blocks.count_nonzero()


def test_block_upsampling_equals_whole_field_upsampling():
    # the coarser scale interpolated at a finer scale's block samples, without halos or
    # whole-grid index tensors, is exactly the whole-field upsampling restricted to the blocks
    layout = BlockLayout((64, 32, 32), block=8, n_scales=3)
    coarse = torch.randn(1, *layout.scale_shape(2))
    full = upsample(coarse, 4)
    ids = torch.tensor([0, 7, 13, layout.n_blocks(0) - 1])
    positions = []
    for axis, q in enumerate(layout.block_axis_positions(0, ids, at_scale=2)):
        view = [len(ids), 1, 1, 1]
        view[1 + axis] = 8
        positions.append(q.view(view))
    values = interpolate_at(coarse, positions).movedim(0, 1)
    torch.testing.assert_close(values, gather_blocks(full, 8, layout.unravel(0, ids)))


def test_local_coordinates_are_cell_centred():
    c = local_coordinates(4, 2)
    assert c.shape == (16, 2)
    torch.testing.assert_close(c[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(c[::4, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
