from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from miner3d.cli import main
from miner3d.grid import OccupancyGrid


def test_voxelize_writes_a_grid(cli, meshes_dir, tmp_path):
    out = tmp_path / "lucy.npz"
    code, stdout, _ = cli("voxelize", meshes_dir / "lucy.ply", "-r", 48, "-o", out)
    assert code == 0 and "48" in stdout
    grid = OccupancyGrid.load(out)
    assert max(grid.shape) == 48 and 0.05 < grid.filled_fraction < 0.5
    assert grid.meta["source"].endswith("lucy.ply")
    # --cube
    code, _, _ = cli(
        "voxelize", meshes_dir / "lucy.ply", "-r", 32, "--cube", "-o", tmp_path / "c.npz"
    )
    assert code == 0 and OccupancyGrid.load(tmp_path / "c.npz").shape == (32, 32, 32)


def _write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


BAD_MESHES = {
    "missing": (None, "not found"),
    "unsupported.txt": ("v 0 0 0\n", "unsupported mesh format"),
    "corrupt.ply": (
        b"ply\nformat binary_little_endian 1.0\nelement vertex 99\ngarbage",
        "could not read",
    ),
    "empty.obj": ("# nothing here\n", "no triangles"),
    "plane.obj": ("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3\nf 1 3 4\n", "flat"),
}


@pytest.mark.parametrize("name", list(BAD_MESHES))
def test_bad_mesh_gets_one_line_error_and_no_output(cli, tmp_path, name, expect_error):
    content, needle = BAD_MESHES[name]
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    out = tmp_path / "out.npz"
    code, _, err = cli("voxelize", path, "-r", 32, "-o", out)
    expect_error(code, err, needle)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.npz*"))


@pytest.mark.parametrize("res", [4, 9000])
def test_resolution_out_of_range(cli, meshes_dir, tmp_path, res, expect_error):
    code, _, err = cli("voxelize", meshes_dir / "lucy.ply", "-r", res, "-o", tmp_path / "g.npz")
    expect_error(code, err, "out of range")


def test_not_enough_memory_is_refused_before_allocating(cli, meshes_dir, tmp_path, expect_error):
    out = tmp_path / "g.npz"
    code, _, err = cli(
        "voxelize", meshes_dir / "lucy.ply", "-r", 1024, "--max-memory", "100MB", "-o", out
    )
    expect_error(code, err, "needs ~")
    assert "try --resolution" in err
    assert not out.exists()


def test_existing_output_is_kept_without_force(cli, meshes_dir, tmp_path, expect_error):
    out = _write(tmp_path / "g.npz", b"precious")
    code, _, err = cli("voxelize", meshes_dir / "lucy.ply", "-r", 16, "-o", out)
    expect_error(code, err, "--force")
    assert out.read_bytes() == b"precious"
    code, _, _ = cli("voxelize", meshes_dir / "lucy.ply", "-r", 16, "-o", out, "--force")
    assert code == 0 and OccupancyGrid.load(out).shape[2] == 16


def test_unwritable_output_folder(cli, meshes_dir, tmp_path, expect_error):
    blocker = _write(tmp_path / "file", "x")
    code, _, err = cli(
        "voxelize", meshes_dir / "lucy.ply", "-r", 16, "-o", blocker / "sub" / "g.npz"
    )
    expect_error(code, err, "cannot write")


@pytest.mark.slow
def test_console_entry_point_exit_status(meshes_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "miner3d", "voxelize", str(tmp_path / "nope.ply")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"miner3d: error: mesh file not found: {tmp_path / 'nope.ply'}"


def test_bad_memory_size_is_a_usage_error(capsys, meshes_dir):
    with pytest.raises(SystemExit) as info:
        main(["voxelize", str(meshes_dir / "lucy.ply"), "--max-memory", "lots"])
    assert info.value.code == 2
    assert "not a size" in capsys.readouterr().err


def test_grid_bits_survive_cli_round_trip(cli, meshes_dir, tmp_path):
    from miner3d.voxelizer import voxelize_file

    out = tmp_path / "f.npz"
    assert cli("voxelize", meshes_dir / "fandisk.obj", "-r", 40, "-o", out)[0] == 0
    direct = voxelize_file(meshes_dir / "fandisk.obj", 40)
    np.testing.assert_array_equal(OccupancyGrid.load(out).occupancy, direct.occupancy)
