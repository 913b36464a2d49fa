"""The memory preflight's estimates against measurements (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import miner3d
from miner3d.blocks import BlockLayout
from miner3d.estimates import predicted_live_blocks

# each child process: its RSS now, the high-water mark reset to it (Linux), then the job
MEASURE = r"""
def measure_from_now():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))
"""


def _assert_within_a_quarter(child: str, *args) -> None:
    """Run ``child`` in a fresh process; its peak RSS increase within 25 % of its estimate."""
    out = subprocess.run(
        [sys.executable, "-c", child, *map(str, args)], capture_output=True, text=True, check=True
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    peak, estimate = figures["peak"] / 2**30, figures["estimate"] / 2**30
    print(f"{args}: peak {peak:.2f} GiB, estimate {estimate:.2f} GiB")  # shown with -s
    assert 0.75 <= figures["peak"] / figures["estimate"] <= 1.25, figures


CHILD = (
    MEASURE
    + r"""
import json, sys
from miner3d.io import load_mesh
from miner3d.memory import peak_rss
from miner3d.voxelizer import estimate_voxelize_bytes, voxelize


mesh = load_mesh(sys.argv[1])
voxelize(mesh, 32, cube=True)  # numba and the imports, before the measurement
base = measure_from_now()
grid = voxelize(mesh, int(sys.argv[2]), cube=True)
estimate = estimate_voxelize_bytes(grid.shape, len(mesh.vertices), len(mesh.faces))
print(json.dumps({"peak": peak_rss() - base, "estimate": estimate}))
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [800, 900])  # about 1 and 1.4 GiB
def test_voxelize_estimate_is_within_a_quarter_of_the_measured_peak(meshes_dir, resolution):
    _assert_within_a_quarter(CHILD, meshes_dir / "lucy.ply", resolution)


def test_predicted_live_blocks_match_the_fit(meshes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = miner3d.voxelize(meshes_dir / "lucy.ply", 96)
    result = miner3d.fit(grid, max_iters=40)
    core = result.model.core
    predicted = predicted_live_blocks(grid.occupancy[None], True, core.layout)
    for j in range(core.layout.n_scales):
        actual = core.mlp_blocks(j)
        assert abs(predicted[j] - actual) <= 0.2 * actual + 5, (j, predicted, actual)
    layout = BlockLayout((400, 600), 32, 3)
    assert predicted_live_blocks(None, False, layout) == [13 * 19, 7 * 10, 4 * 5]


FIT_CHILD = (
    MEASURE
    + r"""
import json, sys
import numpy as np
import miner3d
from miner3d.blocks import BlockLayout
from miner3d.estimates import fit_bytes, predicted_live_blocks
from miner3d.kinds import get_kind
from miner3d.memory import peak_rss
from miner3d.train import fit


what, size = sys.argv[1], int(sys.argv[2])
if what == "image":  # a photo-like image: waves and noise, detail everywhere
    y, x = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(0).integers(0, 20, (size, size))
    data = (127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0) + noise).astype(np.uint8)[None]
    del x, y, noise
    config = miner3d.effective_config("x.png", overrides={"max_iters": 20})
    kind, scale = get_kind("image"), 1 / 255
else:
    data = miner3d.voxelize(what, size).occupancy[None]
    config = miner3d.effective_config(what, overrides={"max_iters": 60})
    kind, scale = get_kind("occupancy"), 1.0
fit(np.zeros((1,) + (8,) * kind.ndim, np.uint8), config.fit, kind=kind, device="cpu")  # warm-up
layout = BlockLayout(data.shape[1:], config.fit.block, config.fit.n_scales)
live = predicted_live_blocks(data, kind.binary, layout)
estimate = sum(fit_bytes(layout, 1, data.nbytes, config.fit, live).values())
base = measure_from_now()
fit(data, config.fit, kind=kind, value_scale=scale, device="cpu")
print(json.dumps({"peak": peak_rss() - base + data.nbytes, "estimate": estimate}))
"""
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "size"),
    [("lucy", 896), ("image", 4096), ("image", 5120)],  # 0.7, 0.8 and 1.0 GiB measured
)
def test_fit_estimate_is_within_a_quarter_of_the_measured_peak(meshes_dir, what, size):
    source = str(meshes_dir / "lucy.ply") if what == "lucy" else what
    _assert_within_a_quarter(FIT_CHILD, source, size)


RENDER_CHILD = (
    MEASURE
    + r"""
import json, sys
import numpy as np
import miner3d
from miner3d.extract import image_bytes, render_image
from miner3d.memory import peak_rss


rgb = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
model = miner3d.fit(rgb, kind="image", n_scales=2, block=16, max_iters=5).model.core
render_image(model, 0, (64, 64))
n = int(sys.argv[1])
base = measure_from_now()
render_image(model, 0, (n, n))
print(json.dumps({"peak": peak_rss() - base, "estimate": image_bytes(model, 0, (n, n))}))
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("side", [4096, 8192])
def test_render_estimate_is_within_a_quarter_of_the_measured_peak(side):
    _assert_within_a_quarter(RENDER_CHILD, side)


MESH_CHILD = (
    MEASURE
    + r"""
import json, sys
from miner3d.extract import marching_cubes, mesh_bytes
from miner3d.memory import peak_rss
from miner3d.model import MinerModel


model = MinerModel.load(sys.argv[1])
marching_cubes(model, 2)  # the imports and skimage, before the measurement
resolution = int(sys.argv[2])
base = measure_from_now()
marching_cubes(model, 0, resolution=resolution)
print(json.dumps({"peak": peak_rss() - base, "estimate": mesh_bytes(model, 0, resolution)}))
"""
)


@pytest.fixture(scope="module")
def lucy_model(tmp_path_factory, meshes_dir):
    run = tmp_path_factory.mktemp("lucy128")
    miner3d.fit(meshes_dir / "lucy.ply", resolution=128, output=run / "run", force=True)
    return run / "run" / "model.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [384, 640])  # about 0.3 and 0.85 GB, mesh included
def test_mesh_estimate_is_within_a_quarter_of_the_measured_peak(lucy_model, resolution):
    _assert_within_a_quarter(MESH_CHILD, lucy_model, resolution)


def test_a_ranks_estimate_is_its_share_plus_the_halo_and_the_model_it_receives():
    from miner3d.bank import BankShape
    from miner3d.config import FitConfig
    from miner3d.estimates import fit_bytes

    fit = FitConfig(block=8, n_scales=3)
    layout = BlockLayout((600, 340, 1024), 8, 3)
    live = [27_000, 4_000, 700]
    one = fit_bytes(layout, 1, 0, fit, live)
    two = fit_bytes(layout, 1, 0, fit, live, ranks=2)
    many = fit_bytes(layout, 1, 0, fit, live, ranks=64)
    assert one == fit_bytes(layout, 1, 0, fit, live, ranks=1)
    # the coarser fields: half the rows plus a halo of three at 2 ranks, a few rows at 64
    assert 0.5 * one["fields"] < two["fields"] < 0.6 * one["fields"]
    assert many["fields"] < 0.15 * one["fields"]
    # the banks: a rank's share, plus (rank 0) every scale's parameters at the end
    shape = BankShape(3, fit.hidden, fit.hidden_layers, 1, fit.w0)
    whole_model = 4 * shape.params_per_block * sum(live)
    assert two["banks"] - whole_model == pytest.approx(one["banks"] / 2, rel=1e-3)
    assert many["banks"] - whole_model == pytest.approx(one["banks"] / 64, rel=2e-2)
    assert (one["cache"], two["cache"]) == (2 * 8**3 * 27_000, 2 * 8**3 * 13_500)
    # the measurements' kept parts: the coarser sum and the signal, float32, a rank's share
    assert (one["measurement"], two["measurement"]) == (8 * 8**3 * 27_000, 8 * 8**3 * 13_500)
