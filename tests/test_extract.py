from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes as dense_marching_cubes

from miner3d.config import FitConfig
from miner3d.errors import MinerError
from miner3d.extract import marching_cubes, save_mesh
from miner3d.io import load_mesh
from miner3d.train import fit
from miner3d.voxelizer import voxelize_file


@pytest.fixture(scope="module")
def lucy_model(meshes_dir):
    grid = voxelize_file(meshes_dir / "lucy.ply", 64)
    config = FitConfig(n_scales=3, block=8, max_iters=300, prune_mse=2e-3)
    return fit(grid.occupancy[None], config, transform=grid.transform, device="cpu").model


@pytest.mark.parametrize("scale", [0, 1])
def test_slab_marching_cubes_equals_dense(lucy_model, scale):
    # the same block batches on both sides, so the decoded values are bitwise identical and
    # any difference comes from the slabs and the welding
    per_layer = int(np.prod(lucy_model.layout.grid(scale)[1:]))
    vertices, faces = marching_cubes(lucy_model, scale=scale, batch=per_layer)
    dense = lucy_model.decode(scale, batch=per_layer)[0].numpy()
    v, f, _, _ = dense_marching_cubes(dense, level=0.5, allow_degenerate=False)
    expected = lucy_model.transform.grid_to_world((v + 0.5) * 2**scale)
    ours = np.unique(vertices, axis=0)
    ref = np.unique(expected, axis=0)
    assert ours.shape == ref.shape  # welding left no duplicate and lost no vertex
    # skimage returns float32 positions: on the dense grid they carry float32 rounding of the
    # whole extent, so agreement is to 1e-6 of the grid's extent
    tol = 1e-6 * lucy_model.transform.voxel_size * max(lucy_model.layout.shape)
    assert cKDTree(ref).query(ours)[0].max() < tol
    assert cKDTree(ours).query(ref)[0].max() < tol
    a = trimesh.Trimesh(vertices, faces, process=False)
    b = trimesh.Trimesh(expected, f, process=False)
    assert a.area == pytest.approx(b.area, rel=1e-6)
    assert a.is_watertight and a.is_winding_consistent
    assert a.volume > 0


def test_mesh_is_in_the_input_coordinates(lucy_model, meshes_dir, tmp_path):
    vertices, faces = marching_cubes(lucy_model)
    source = load_mesh(meshes_dir / "lucy.ply")
    lo, hi = source.bounds
    voxel = lucy_model.transform.voxel_size
    assert np.all(vertices.min(axis=0) > lo - 2 * voxel)
    assert np.all(vertices.max(axis=0) < hi + 2 * voxel)
    # and it overlaps the source: similar bounding box and volume
    np.testing.assert_allclose(vertices.min(axis=0), lo, atol=2 * voxel)
    np.testing.assert_allclose(vertices.max(axis=0), hi, atol=2 * voxel)
    extracted = trimesh.Trimesh(vertices, faces, process=False)
    assert extracted.volume == pytest.approx(source.volume, rel=0.1)
    for ext in (".ply", ".obj", ".stl", ".glb"):
        path = save_mesh(vertices, faces, tmp_path / f"lucy{ext}")
        back = trimesh.load(path, force="mesh")
        assert len(back.faces) == len(faces)


def test_bad_output_extension(tmp_path):
    with pytest.raises(MinerError, match="unsupported mesh output"):
        save_mesh(np.zeros((3, 3)), np.array([[0, 1, 2]]), tmp_path / "x.xyz")


RSS_SCRIPT = """
import torch
from miner3d.bank import BankShape, MLPBank
from miner3d.blocks import BlockLayout
from miner3d.model import MinerModel
from miner3d.extract import marching_cubes
from miner3d.memory import peak_rss as hwm
import skimage.measure, trimesh

import sys
from miner3d.extract import mesh_bytes
n = int(sys.argv[1])
layout = BlockLayout((n, n, n), block=16, n_scales=4)
shape = BankShape(3, 8, 1, 1, 30.0)
model = MinerModel(layout, shape, 1)
ids = torch.arange(layout.n_blocks(3))  # coarsest: 4^3 blocks of 16^3 samples
bank = MLPBank.create(shape, len(ids))
for p in bank.params:
    p.zero_()
coords = layout.unravel(3, ids)
bank.params[-1][((coords >= 1) & (coords <= 2)).all(dim=1)] = 1.0  # a box in the middle
model.set_scale(3, ids, bank)
bank.forward(torch.zeros(1, 3))  # numba's kernels load once per process (not extraction's)
base = hwm()
vertices, faces = marching_cubes(model, 0)
print(len(faces), hwm() - base, mesh_bytes(model, 0))
"""


@pytest.mark.slow
@pytest.mark.parametrize("n", [512])
def test_extracting_stays_far_below_a_dense_volume(n):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(n)], capture_output=True, text=True, check=True
    )
    n_faces, grown, estimate = map(int, proc.stdout.split())
    assert n_faces > 50_000  # a real surface was extracted
    assert grown < 0.6 * n**3 * 4, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    assert grown < 1.25 * estimate  # the preflight's figure (it leaves out the mesh itself)
