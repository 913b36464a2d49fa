"""Meshes of many overlapping bodies with holes: the default solid is the generalised winding
number's (libigl's exact ``winding_number`` is the truth here, not the fast approximation
under test), on both of the robust method's paths."""

from __future__ import annotations

import sys
from pathlib import Path

import igl
import numpy as np
import pytest
import trimesh
from conftest import solid_iou

from miner3d import voxelizer
from miner3d.bodies import bodies
from miner3d.voxelizer import voxelize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from meshgen import multibody_mesh


def winding_solid(mesh, grid) -> np.ndarray:
    """``|w| >= 1/2`` at every voxel centre, exact (libigl)."""
    idx = np.indices(grid.shape).reshape(3, -1).T
    w = igl.winding_number(
        np.asarray(mesh.vertices, dtype=np.float64),
        np.asarray(mesh.faces, dtype=np.int64),
        grid.transform.grid_to_world(idx + 0.5),
    )
    return (np.abs(w) >= 0.5).reshape(grid.shape)


@pytest.fixture(scope="module")
def holed_bodies():
    mesh = multibody_mesh(bodies=12, subdivisions=2, hole_radius=0.35, seed=3)
    assert bodies(mesh.vertices, mesh.faces)[1] == 12
    return mesh


@pytest.mark.parametrize("path", ["whole mesh", "body by body"])
def test_holed_overlapping_bodies_match_the_winding_number(holed_bodies, monkeypatch, path):
    if path == "body by body":
        monkeypatch.setattr(voxelizer, "BODY_BY_BODY", 0)
    grid = voxelize(holed_bodies, 64)
    assert ("bodies" in grid.meta) == (path == "body by body")
    assert grid.meta["ambiguous_voxels"] > 0  # the holes really leave voxels undecided
    truth = winding_solid(holed_bodies, grid)
    assert solid_iou(grid.occupancy, truth) >= 0.999
    # the parity ladder's solid is what the old default gave: overlaps cancel
    evenodd = voxelize(holed_bodies, 64, method="evenodd")
    assert solid_iou(evenodd.occupancy, truth) < 0.99


def test_an_inverted_inner_shell_is_a_cavity_body_by_body(monkeypatch):
    outer = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    inner = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    inner = trimesh.Trimesh(inner.vertices, inner.faces[:, ::-1], process=False)
    keep = outer.triangles_center[:, 2] < 0.95  # a hole at the top of the outer shell
    holed = trimesh.Trimesh(outer.vertices, outer.faces[keep], process=False)
    mesh = trimesh.util.concatenate([holed, inner])
    monkeypatch.setattr(voxelizer, "BODY_BY_BODY", 0)
    grid = voxelize(mesh, 48)
    assert grid.meta["bodies"] == 2 and grid.meta["open_bodies"] >= 1
    centre = tuple(np.asarray(grid.shape) // 2)
    assert grid.occupancy[centre] == 0  # inside the inverted shell: the cavity
    assert solid_iou(grid.occupancy, winding_solid(mesh, grid)) >= 0.999


def test_bodies_of_a_triangle_soup_share_positions():
    a = trimesh.creation.box()
    b = trimesh.creation.box()
    b.apply_translation([3.0, 0, 0])
    shared = trimesh.util.concatenate([a, b])
    soup = trimesh.Trimesh(
        shared.triangles.reshape(-1, 3),
        np.arange(len(shared.faces) * 3).reshape(-1, 3),
        process=False,
    )
    assert bodies(shared.vertices, shared.faces)[1] == 2
    labels, count = bodies(soup.vertices, soup.faces)
    assert count == 2 and len(np.unique(labels[:12])) == 1
