from __future__ import annotations

import numpy as np
import pytest

from miner3d.errors import MinerError
from miner3d.grid import GridTransform, OccupancyGrid, check_resolution


def test_tight_grid_gives_resolution_on_longest_axis_and_cubic_voxels():
    bounds = np.array([[0.0, -1.0, 2.0], [1.0, 3.0, 2.5]])  # extents 1, 4, 0.5
    t = GridTransform.fit_bounds(bounds, 64, margin=2)
    assert t.shape[1] == 64
    assert t.voxel_size == pytest.approx(4.0 / 60)
    assert t.shape[0] == 15 + 4 and t.shape[2] == 8 + 4  # ceil(extent / voxel) + margins
    lo, hi = t.bounds
    assert np.all(lo < bounds[0]) and np.all(hi > bounds[1])
    # the object is centred
    np.testing.assert_allclose(0.5 * (lo + hi), bounds.mean(axis=0))


def test_cube_grid():
    bounds = np.array([[0.0, 0.0, 0.0], [1.0, 4.0, 0.5]])
    t = GridTransform.fit_bounds(bounds, 32, cube=True)
    assert t.shape == (32, 32, 32)


def test_cell_centred_convention_round_trip():
    t = GridTransform(origin=(1.0, 2.0, 3.0), voxel_size=0.5, shape=(4, 6, 8))
    idx = np.array([[0, 0, 0], [3, 5, 7]])
    world = t.grid_to_world(idx + 0.5)
    np.testing.assert_allclose(world, [[1.25, 2.25, 3.25], [2.75, 4.75, 6.75]])
    np.testing.assert_allclose(t.world_to_grid(world), idx + 0.5)
    np.testing.assert_allclose(t.voxel_centers(0), [1.25, 1.75, 2.25, 2.75])
    # align_corners=False: the grid spans [-1, 1]; voxel 0's centre is at 1/n - 1
    u = t.world_to_normalized(t.grid_to_world(np.array([[0.5, 0.5, 0.5], [0, 0, 0], [4, 6, 8]])))
    np.testing.assert_allclose(u[0], [1 / 4 - 1, 1 / 6 - 1, 1 / 8 - 1])
    np.testing.assert_allclose(u[1], -1)
    np.testing.assert_allclose(u[2], 1)
    assert GridTransform.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("bad", [4, 0, -3, 100_000, 12.5, True])
def test_resolution_out_of_range(bad):
    with pytest.raises(MinerError):
        check_resolution(bad)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    occ = (rng.random((13, 7, 5)) > 0.5).astype(np.uint8)  # size not a multiple of 8
    t = GridTransform(origin=(0.1, 0.2, 0.3), voxel_size=0.01, shape=occ.shape)
    path = OccupancyGrid(occ, t, {"method": "test"}).save(tmp_path / "g.npz")
    back = OccupancyGrid.load(path)
    assert back.transform == t
    assert back.meta == {"method": "test"}
    assert back.occupancy.dtype == np.uint8
    np.testing.assert_array_equal(back.occupancy, occ)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    occ = np.ones((8, 8, 8), dtype=np.uint8)
    t = GridTransform(origin=(0, 0, 0), voxel_size=1.0, shape=occ.shape)
    path = OccupancyGrid(occ, t).save(tmp_path / "g.npz")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        OccupancyGrid(occ * 0, t).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(MinerError, match="not found"):
        OccupancyGrid.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(MinerError, match="could not read"):
        OccupancyGrid.load(bad)
