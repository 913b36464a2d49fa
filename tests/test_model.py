from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import upsample

from miner3d.bank import BankShape, MLPBank
from miner3d.blocks import BlockLayout, scatter_blocks
from miner3d.grid import GridTransform
from miner3d.model import MinerModel


def random_model(ndim: int, gaussian: bool = False, channels: int = 1) -> MinerModel:
    shape = (20, 13, 16)[:ndim] if ndim == 3 else (37, 20)
    layout = BlockLayout(shape, block=4, n_scales=3)
    bank_shape = BankShape(ndim, 6, 1, channels, 10.0)
    transform = GridTransform((1.0, -2.0, 0.5)[:ndim], 0.1, shape, "xyz"[:ndim])
    model = MinerModel(layout, bank_shape, channels, transform, gaussian)
    gen = torch.Generator().manual_seed(0)
    for j in range(3):
        n = layout.n_blocks(j)
        ids = torch.nonzero(torch.rand(n, generator=gen) < 0.6).squeeze(1)  # some pruned
        model.set_scale(j, ids, MLPBank.create(bank_shape, len(ids), generator=gen))
    return model


def dense_residuals(model: MinerModel) -> list[torch.Tensor]:
    """R_k on scale k's whole grid, from block outputs (the explicit definition), float32."""
    fields = []
    for k in range(model.layout.n_scales):
        field = torch.zeros(model.channels, *model.layout.scale_shape(k))
        ids = torch.arange(model.layout.n_blocks(k))
        scatter_blocks(
            field, model.layout.block, model.layout.unravel(k, ids), model.block_outputs(k, ids)
        )
        fields.append(field)
    return fields


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("gaussian", [False, True])
def test_decode_is_the_sum_of_upsampled_residuals(ndim, gaussian):
    model = random_model(ndim, gaussian)
    fields = dense_residuals(model)
    for j in range(3):
        # scale j on its own grid exactly; coarser scales through their float16 fields
        expected = fields[j] + sum(
            upsample(fields[k].half().float(), 2 ** (k - j)) for k in range(j + 1, 3)
        )
        crop = (slice(None), *(slice(0, n) for n in model.layout.valid_shape(j)))
        torch.testing.assert_close(model.decode(j), expected[crop], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("gaussian", [False, True])
def test_query_equals_decode_at_centres_and_explicit_sum_off_grid(ndim, gaussian):
    model = random_model(ndim, gaussian, channels=2)
    shape = model.layout.shape
    decoded = model.decode(0)
    gen = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randint(0, n, (300,), generator=gen) for n in shape], 1)
    at_centres = model.query((idx + 0.5).double().numpy(), grid_coords=True)
    torch.testing.assert_close(at_centres, decoded[(slice(None), *idx.T)].T, atol=1e-5, rtol=0)
    # the same through the input's own coordinates
    world = model.transform.grid_to_world((idx + 0.5).numpy())
    torch.testing.assert_close(model.query(world), at_centres, atol=1e-5, rtol=0)
    # off-grid points, against grid_sample of every scale's dense residual field
    padded = torch.tensor(model.layout.padded, dtype=torch.float64)
    g = torch.rand(500, ndim, generator=gen, dtype=torch.float64) * (padded - 1) + 0.5
    fields = [f if k == 0 else f.half().float() for k, f in enumerate(dense_residuals(model))]
    norm = (2 * g / padded - 1).flip(-1).float()  # grid_sample wants (x=last axis, ...)
    expected = 0
    for field in fields:
        grid = norm.view(1, *([1] * (ndim - 1)), -1, ndim)
        sampled = F.grid_sample(field[None], grid, align_corners=False, padding_mode="border")
        expected = expected + sampled.reshape(model.channels, -1).T
    torch.testing.assert_close(
        model.query(g.numpy(), grid_coords=True), expected, atol=1e-5, rtol=0
    )


def test_save_load_decodes_bit_identically(tmp_path):
    model = random_model(3)
    model.meta["note"] = "hello"
    path = model.save(tmp_path / "model.safetensors")
    back = MinerModel.load(path)
    assert back.transform == model.transform and back.layout == model.layout
    assert back.meta["note"] == "hello" and back.n_params == model.n_params
    for j in range(3):
        assert torch.equal(back.decode(j), model.decode(j))
