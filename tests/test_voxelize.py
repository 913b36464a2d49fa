from __future__ import annotations

import numpy as np
import pytest
import trimesh
from conftest import solid_iou

from miner3d.errors import MinerError, OutOfMemoryError
from miner3d.io import load_mesh
from miner3d.voxelizer import voxelize, voxelize_file
from miner3d.winding import winding_numbers


def _all_columns_closed(grid) -> bool:
    odd = grid.meta["odd_columns"]
    return (sum(odd.values()) if isinstance(odd, dict) else odd) == 0


def _analytic_box_solid(grid, lo, hi):
    t = grid.transform
    inside = [(lo[a] < t.voxel_centers(a)) & (t.voxel_centers(a) < hi[a]) for a in range(3)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


def test_box_matches_analytic_solid():
    lo, hi = np.array([0.1, -0.2, 0.3]), np.array([1.13, 0.37, 0.71])
    box = trimesh.creation.box(bounds=np.stack([lo, hi]))
    grid = voxelize(box, 64)
    assert _all_columns_closed(grid) and grid.meta["ambiguous_voxels"] == 0
    np.testing.assert_array_equal(grid.occupancy.astype(bool), _analytic_box_solid(grid, lo, hi))


def test_edges_and_vertices_through_column_centres_count_once():
    # A box whose corners and diagonal edges pass exactly through column centres: every
    # tie on a shared edge or vertex must be counted once, or columns turn odd.
    box = trimesh.creation.box(bounds=[[0.0, 0.0, 0.0], [10.0, 10.0, 5.0]])
    # grid with unit voxels whose centres are at integers + 0.5 -> shift the box by 0.5
    box.apply_translation([0.5, 0.5, 0.25])
    grid = voxelize(box, 14, margin=2)
    assert grid.transform.voxel_size == pytest.approx(1.0)
    assert _all_columns_closed(grid)  # along all three axes
    filled = grid.occupancy.astype(bool)
    strict = _analytic_box_solid(grid, [0.5, 0.5, 0.25], [10.5, 10.5, 5.25])
    # the columns on the box's boundary may go either way, but every interior one is full
    assert np.all(filled[strict])
    assert filled.sum() <= 11 * 11 * 5


def test_many_triangles_sharing_vertices_on_centres():
    # an icosphere whose vertices are snapped to column centres: fans around shared
    # vertices exercise the vertex tie-break
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=10.0)
    sphere.vertices[:, :2] = np.round(sphere.vertices[:, :2] - 0.5) + 0.5
    for method in ("robust", "parity"):
        assert _all_columns_closed(voxelize(sphere, 32, margin=2, method=method))


@pytest.mark.parametrize("name", ["lucy.ply", "fandisk.obj"])
def test_parity_matches_open3d_occupancy(meshes_dir, name):
    pytest.importorskip("open3d")
    mesh = load_mesh(meshes_dir / name)
    reference = voxelize(mesh, 128, method="open3d")
    for method in ("robust", "parity", "nonzero"):
        ours = voxelize(mesh, 128, method=method)
        assert ours.transform == reference.transform
        assert _all_columns_closed(ours)
        assert solid_iou(ours.occupancy, reference.occupancy) >= 0.999


def test_independent_inside_test_winding_number(meshes_dir):
    # a second, fully independent reference on a sample of voxel centres: the winding number
    mesh = load_mesh(meshes_dir / "fandisk.obj")
    grid = voxelize(mesh, 64)
    rng = np.random.default_rng(1)
    idx = np.stack([rng.integers(0, n, 4000) for n in grid.shape], axis=1)
    points = grid.transform.grid_to_world(idx + 0.5)
    inside = np.abs(winding_numbers(points, mesh.vertices, mesh.faces)) > 0.5
    ours = grid.occupancy[tuple(idx.T)].astype(bool)
    assert np.mean(ours == inside) >= 0.995
    assert solid_iou(ours, inside) >= 0.99


def test_grid_metadata_and_file(meshes_dir, tmp_path):
    grid = voxelize_file(meshes_dir / "lucy.ply", 64)
    assert max(grid.shape) == 64 and len(set(grid.shape)) == 3  # tight, not cubic
    assert grid.meta["source_sha256"] and grid.meta["method"] == "robust"
    # the transform maps the grid back onto the mesh's own bounding box
    mesh = load_mesh(meshes_dir / "lucy.ply")
    lo, hi = grid.transform.bounds
    assert np.all(lo < mesh.bounds[0]) and np.all(hi > mesh.bounds[1])
    occupied = np.argwhere(grid.occupancy)
    world = grid.transform.grid_to_world(occupied + 0.5)
    assert np.all(world >= mesh.bounds[0] - grid.transform.voxel_size)
    assert np.all(world <= mesh.bounds[1] + grid.transform.voxel_size)


def test_memory_refusal_before_allocating(meshes_dir):
    with pytest.raises(OutOfMemoryError, match="try --resolution"):
        voxelize_file(meshes_dir / "lucy.ply", 1024, max_memory=50_000_000)


def test_flat_mesh_has_no_solid():
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    with pytest.raises(MinerError, match="flat"):
        voxelize(plane, 32)


def test_open_surface_encloses_nothing():
    tilted = trimesh.Trimesh([[0, 0, 0], [1, 0, 0.3], [1, 1, 0.5]], [[0, 1, 2]])
    with pytest.raises(MinerError, match="no volume"):
        voxelize(tilted, 32)


@pytest.mark.parametrize("ext", [".stl", ".off", ".glb", ".obj", ".ply"])
def test_every_supported_format_loads_to_the_same_solid(tmp_path, ext):
    a = trimesh.creation.box(bounds=[[0, 0, 0], [1.01, 0.93, 0.97]])
    b = trimesh.creation.box(bounds=[[2.03, 0.02, 0.01], [3, 1, 2]])
    if ext == ".glb":  # a scene of two nodes, flattened into one mesh
        trimesh.Scene([a, b]).export(tmp_path / f"m{ext}")
    else:
        trimesh.util.concatenate([a, b]).export(tmp_path / f"m{ext}")
    grid = voxelize_file(tmp_path / f"m{ext}", 32)
    t = grid.transform
    n_expected = sum(
        int(
            np.prod(
                [
                    np.count_nonzero((lo < t.voxel_centers(k)) & (t.voxel_centers(k) < hi))
                    for k, (lo, hi) in enumerate(zip(*box.bounds, strict=True))
                ]
            )
        )
        for box in (a, b)
    )
    assert int(grid.occupancy.sum()) == n_expected
