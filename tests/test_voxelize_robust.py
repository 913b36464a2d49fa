"""The robust voxelizer's ladder: each test fails if its stage is removed."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from conftest import solid_iou

from miner3d.io import load_mesh
from miner3d.voxelizer import voxelize
from miner3d.winding import winding_numbers


def _remove_faces(mesh, fraction, seed=0):
    keep = np.random.default_rng(seed).random(len(mesh.faces)) >= fraction
    return trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)


@pytest.mark.parametrize("name", ["lucy.ply", "fandisk.obj"])
def test_two_percent_of_faces_removed(meshes_dir, name):
    # stage 2: columns through a hole do not vote; the other axes decide
    mesh = load_mesh(meshes_dir / name)
    intact = voxelize(mesh, 128)
    holed = _remove_faces(mesh, 0.02)
    robust = voxelize(holed, 128)
    assert robust.transform == intact.transform
    assert solid_iou(robust.occupancy, intact.occupancy) >= 0.995
    single_axis = voxelize(holed, 128, method="parity")
    assert solid_iou(single_axis.occupancy, intact.occupancy) < 0.99


def test_bunny_with_holes_matches_winding_number(meshes_dir):
    mesh = load_mesh(meshes_dir / "stanford-bunny.obj")
    grid = voxelize(mesh, 128)
    assert sum(grid.meta["odd_columns"].values()) > 0  # it really has holes
    rng = np.random.default_rng(0)
    uniform = np.stack([rng.integers(0, n, 2500) for n in grid.shape], axis=1)
    # plus voxels next to the surface, where mistakes happen
    occ = grid.occupancy.astype(bool)
    boundary = occ ^ np.roll(occ, 1, axis=2)
    near = np.argwhere(boundary)
    near = near[rng.choice(len(near), 2500, replace=False)]
    idx = np.concatenate([uniform, near])
    w = winding_numbers(grid.transform.grid_to_world(idx + 0.5), mesh.vertices, mesh.faces)
    ours = grid.occupancy[tuple(idx.T)].astype(bool)
    assert solid_iou(ours, np.abs(w) >= 0.5) >= 0.99


def _box_with_holes(half_width=0.12):
    """Unit box, finely triangulated, with square holes in the middle of its +-x and +-z faces:
    two tunnels that cross in the middle."""
    box = trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]])
    for _ in range(5):
        box = box.subdivide()
    c = box.triangles_center

    def near_mid(a, b):
        return (np.abs(c[:, a] - 0.5) < half_width) & (np.abs(c[:, b] - 0.5) < half_width)

    on_x = np.isclose(c[:, 0], 0) | np.isclose(c[:, 0], 1)
    on_z = np.isclose(c[:, 2], 0) | np.isclose(c[:, 2], 1)
    holes = (on_x & near_mid(1, 2)) | (on_z & near_mid(0, 1))
    return trimesh.Trimesh(box.vertices, box.faces[~holes], process=False)


def test_disagreeing_axes_take_the_winding_number():
    # stage 3: at the tunnels' crossing the x and z columns pass through two holes each, see
    # no surface and vote "outside"; only y votes "inside". The winding number (about 0.9)
    # knows better than the majority.
    mesh = _box_with_holes()
    grid = voxelize(mesh, 40)
    centre = np.floor(grid.transform.world_to_grid(np.array([0.5, 0.5, 0.5]))).astype(int)
    assert grid.meta["ambiguous_voxels"] > 0 and grid.meta["winding_voxels"] > 0
    assert grid.occupancy[tuple(centre)] == 1
    closed = voxelize(trimesh.creation.box(bounds=[[0, 0, 0], [1, 1, 1]]), 40)
    assert solid_iou(grid.occupancy, closed.occupancy) >= 0.99


def _two_overlapping_boxes():
    a = trimesh.creation.box(bounds=[[0, 0, 0], [1.03, 1.01, 0.97]])
    b = trimesh.creation.box(bounds=[[0.51, 0.26, 0.23], [1.52, 0.77, 1.41]])
    return trimesh.util.concatenate([a, b]), a, b


def _analytic(grid, boxes, rule):
    t = grid.transform
    centres = np.meshgrid(*(t.voxel_centers(k) for k in range(3)), indexing="ij")
    inside = [
        np.all(
            [(lo < c) & (c < hi) for c, lo, hi in zip(centres, *box.bounds, strict=True)], axis=0
        )
        for box in boxes
    ]
    return rule(*inside)


def test_overlapping_bodies_robust_gives_union_evenodd_gives_xor():
    mesh, a, b = _two_overlapping_boxes()
    for method in ("robust", "nonzero"):
        union = voxelize(mesh, 48, method=method)
        np.testing.assert_array_equal(
            union.occupancy.astype(bool), _analytic(union, (a, b), np.logical_or)
        )
    xor = voxelize(mesh, 48, method="evenodd")
    np.testing.assert_array_equal(
        xor.occupancy.astype(bool), _analytic(xor, (a, b), np.logical_xor)
    )


@pytest.mark.parametrize("method", ["robust", "evenodd", "parity"])
def test_inverted_orientation_gives_the_same_solid(meshes_dir, method):
    mesh = load_mesh(meshes_dir / "fandisk.obj")
    inverted = trimesh.Trimesh(mesh.vertices, mesh.faces[:, ::-1], process=False)
    assert inverted.volume < 0
    np.testing.assert_array_equal(
        voxelize(inverted, 64, method=method).occupancy, voxelize(mesh, 64, method=method).occupancy
    )


def test_watertight_robust_equals_exact_parity(meshes_dir):
    mesh = load_mesh(meshes_dir / "rocker-arm.obj")
    robust = voxelize(mesh, 96)
    assert robust.meta["ambiguous_voxels"] == 0
    np.testing.assert_array_equal(robust.occupancy, voxelize(mesh, 96, method="parity").occupancy)
