"""The memory preflight's estimates against measurements (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import miner3d
from miner3d.blocks import BlockLayout
from miner3d.estimates import predicted_live_blocks

CHILD = r"""
import json, sys
from miner3d.io import load_mesh
from miner3d.memory import peak_rss
from miner3d.voxelizer import estimate_voxelize_bytes, voxelize

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))

mesh = load_mesh(sys.argv[1])
voxelize(mesh, 32, cube=True)  # numba and the imports, before the measurement
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = rss()
grid = voxelize(mesh, int(sys.argv[2]), cube=True)
estimate = estimate_voxelize_bytes(grid.shape, len(mesh.vertices), len(mesh.faces))
print(json.dumps({"peak": peak_rss() - base, "estimate": estimate}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [640, 800])  # about 0.5 and 1 GiB
def test_voxelize_estimate_is_within_a_quarter_of_the_measured_peak(meshes_dir, resolution):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(meshes_dir / "lucy.ply"), str(resolution)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak"] / figures["estimate"]
    assert 0.75 <= ratio <= 1.25, figures


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


FIT_CHILD = r"""
import json, sys
import numpy as np
import miner3d
from miner3d.blocks import BlockLayout
from miner3d.estimates import fit_bytes, predicted_live_blocks
from miner3d.memory import peak_rss

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))

grid = miner3d.voxelize(sys.argv[1], int(sys.argv[2]))
miner3d.fit(np.zeros((8, 8, 8), np.uint8), kind="occupancy", n_scales=1, block=8, max_iters=2)
config = miner3d.effective_config(sys.argv[1], overrides={"max_iters": 60})
data = grid.occupancy[None]
layout = BlockLayout(grid.shape, config.fit.block, config.fit.n_scales)
live = predicted_live_blocks(data, True, layout)
estimate = sum(fit_bytes(layout, 1, data.nbytes, config.fit, live).values())
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = rss()
miner3d.fit(grid, preset=config.preset, max_iters=60)
print(json.dumps({"peak": peak_rss() - base + data.nbytes, "estimate": estimate}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [640, 768])  # below and above 2^26 voxels
def test_fit_estimate_is_within_a_quarter_of_the_measured_peak(meshes_dir, resolution):
    out = subprocess.run(
        [sys.executable, "-c", FIT_CHILD, str(meshes_dir / "lucy.ply"), str(resolution)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["peak"] / figures["estimate"]
    assert 0.75 <= ratio <= 1.25, figures


RENDER_CHILD = r"""
import json, sys
import numpy as np
import miner3d
from miner3d.extract import image_bytes, render_image
from miner3d.memory import peak_rss

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))

rgb = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
model = miner3d.fit(rgb, kind="image", n_scales=2, block=16, max_iters=5).model.core
render_image(model, 0, (64, 64))
n = int(sys.argv[1])
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = rss()
render_image(model, 0, (n, n))
print(json.dumps({"peak": peak_rss() - base, "estimate": image_bytes(model, 0, (n, n))}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("side", [4096, 8192])
def test_render_estimate_is_within_a_quarter_of_the_measured_peak(side):
    out = subprocess.run(
        [sys.executable, "-c", RENDER_CHILD, str(side)], capture_output=True, text=True, check=True
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.75 <= figures["peak"] / figures["estimate"] <= 1.25, figures
