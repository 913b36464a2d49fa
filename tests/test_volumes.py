"""Volume inputs: every format's round trip, axis order against independent readers, bad
files, kind detection, and scalar-volume fits end to end (#16)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import miner3d
from miner3d.grid import GridTransform
from miner3d.kinds import kind_of_path
from miner3d.volumes import read_volume, write_binvox, write_volume

SHAPE = (5, 6, 7)  # every axis different: a transposition cannot pass
ANISO = GridTransform((1.0, -2.0, 3.5), 0.9, SHAPE, "xyz", (0.5, 0.7, 0.9), None)


def asymmetric(shape=SHAPE, dtype=np.float32) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100 * i + 10 * j + k).astype(dtype)


@pytest.mark.parametrize("ext", [".npy", ".nii", ".nii.gz", ".vti", ".mha", ".tif"])
def test_round_trip_keeps_values_spacing_and_origin(tmp_path, ext):
    data = asymmetric()
    path = write_volume(tmp_path / f"v{ext}", data, ANISO)
    volume = read_volume(path)
    assert volume.data.shape == (1, *SHAPE)
    np.testing.assert_array_equal(volume.data[0], data)
    if ext == ".npy":
        assert volume.transform is None  # NumPy arrays carry no coordinates
        return
    np.testing.assert_allclose(volume.transform.origin, ANISO.origin, atol=1e-5)
    np.testing.assert_allclose(volume.transform.steps, ANISO.steps, rtol=1e-6)
    assert volume.transform.axis_aligned


def test_npz_and_a_rotated_direction_round_trip(tmp_path):
    data = asymmetric()
    np.savez_compressed(tmp_path / "a.npz", volume=data)
    np.testing.assert_array_equal(read_volume(tmp_path / "a.npz").data[0], data)
    c, s = math.cos(0.3), math.sin(0.3)
    rotated = GridTransform(
        (1.0, 2.0, 3.0), 0.9, SHAPE, "xyz", (0.5, 0.7, 0.9), (c, -s, 0, s, c, 0, 0, 0, 1)
    )
    for ext in (".nii.gz", ".vti"):
        back = read_volume(write_volume(tmp_path / f"r{ext}", data, rotated)).transform
        corner = np.array([[0.5, 1.5, 2.5], [4.5, 5.5, 6.5]])
        np.testing.assert_allclose(back.grid_to_world(corner), rotated.grid_to_world(corner))
    with pytest.raises(miner3d.MinerError, match="keeps no direction"):
        write_volume(tmp_path / "r.mha", data, rotated)


def test_binvox_axis_order_agrees_with_trimesh(tmp_path):
    from trimesh.exchange.binvox import export_binvox, load_binvox
    from trimesh.voxel import VoxelGrid

    rng = np.random.default_rng(1)
    grid = (rng.random((5, 6, 6)) > 0.5).astype(np.uint8)  # trimesh needs axes 1 and 2 equal
    grid[0, 1, 2], grid[0, 2, 1] = 1, 0
    ours = write_binvox(
        tmp_path / "ours.binvox", grid, GridTransform((1.0, 2.0, 3.0), 0.5, (5, 6, 6))
    )
    with open(ours, "rb") as fh:
        np.testing.assert_array_equal(load_binvox(fh).matrix, grid.astype(bool))
    (tmp_path / "theirs.binvox").write_bytes(export_binvox(VoxelGrid(grid.astype(bool))))
    np.testing.assert_array_equal(read_volume(tmp_path / "theirs.binvox").data[0], grid)
    back = read_volume(ours)
    assert back.transform.origin == (1.0, 2.0, 3.0) and np.allclose(back.transform.steps, 0.5)
    assert kind_of_path(ours).name == "occupancy"


def test_nifti_written_by_nibabel_sits_where_its_affine_says(tmp_path):
    import nibabel

    data = asymmetric(dtype=np.int16)
    affine = np.array([[0, 0, -0.9, 10], [0.5, 0, 0, -4], [0, 0.7, 0, 2], [0, 0, 0, 1.0]])
    nibabel.save(nibabel.Nifti1Image(data, affine), tmp_path / "n.nii.gz")
    volume = read_volume(tmp_path / "n.nii.gz")
    np.testing.assert_array_equal(volume.data[0], data)
    ijk = np.array([[0, 0, 0], [4, 5, 6], [1, 3, 2]], dtype=float)
    expected = (affine @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(volume.transform.grid_to_world(ijk + 0.5), expected, atol=1e-9)


def test_vtk_points_sit_where_pyvista_puts_them(tmp_path):
    import pyvista

    data = asymmetric()
    grid = pyvista.ImageData(dimensions=SHAPE, spacing=(0.5, 0.7, 0.9), origin=(1, 2, 3))
    grid.point_data["v"] = data.ravel(order="F")
    grid.save(tmp_path / "p.vti")
    volume = read_volume(tmp_path / "p.vti")
    np.testing.assert_array_equal(volume.data[0], data)
    flat = np.arange(grid.n_points)
    ijk = np.stack(np.unravel_index(flat, SHAPE, order="F"), 1)
    np.testing.assert_allclose(volume.transform.grid_to_world(ijk + 0.5), grid.points, atol=1e-6)


def _raw_header_files(tmp_path, data):
    """A MetaImage and an NRRD header over the same raw bytes, written by hand (x fastest),
    independent of the readers under test."""
    raw = tmp_path / "v.raw"
    raw.write_bytes(np.asfortranarray(data).tobytes(order="F"))
    nx, ny, nz = data.shape
    (tmp_path / "v.mhd").write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = {nx} {ny} {nz}\nElementType = MET_SHORT\n"
        "ElementSpacing = 0.5 0.7 0.9\nOffset = 1 2 3\nElementByteOrderMSB = False\n"
        "ElementDataFile = v.raw\n"
    )
    (tmp_path / "v.nrrd").write_text(
        f"NRRD0004\ntype: short\ndimension: 3\nsizes: {nx} {ny} {nz}\nencoding: raw\n"
        "endian: little\nspace: left-posterior-superior\n"
        "space directions: (0.5,0,0) (0,0.7,0) (0,0,0.9)\nspace origin: (1,2,3)\n"
        "data file: v.raw\n\n"
    )
    return raw


@pytest.mark.parametrize("ext", [".mhd", ".nrrd"])
def test_hand_written_metaimage_and_nrrd(tmp_path, ext):
    data = asymmetric(dtype=np.int16)
    _raw_header_files(tmp_path, data)
    volume = read_volume(tmp_path / f"v{ext}")
    np.testing.assert_array_equal(volume.data[0], data)
    np.testing.assert_allclose(volume.transform.grid_to_world([[0.5, 0.5, 0.5]]), [[1, 2, 3]])
    np.testing.assert_allclose(volume.transform.steps, (0.5, 0.7, 0.9))


def test_bad_volume_files_are_one_line_errors(tmp_path, cli, expect_error):
    import nibabel

    run = tmp_path / "run"
    data = asymmetric(dtype=np.int16)
    raw = _raw_header_files(tmp_path, data)
    raw.write_bytes(raw.read_bytes()[:100])
    code, _, err = cli("fit", tmp_path / "v.mhd", "-o", run)
    expect_error(code, err, "declares 5x6x7 samples")
    raw.unlink()
    code, _, err = cli("fit", tmp_path / "v.mhd", "-o", run)
    expect_error(code, err, "which is missing")
    nibabel.save(
        nibabel.Nifti1Image(np.zeros((4, 4, 4, 10), np.float32), np.eye(4)), tmp_path / "t.nii"
    )
    code, _, err = cli("fit", tmp_path / "t.nii", "-o", run)
    expect_error(code, err, "is a series of shape (4, 4, 4, 10)")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * 8, dtype=object).reshape(2, 2, 2))
    code, _, err = cli("fit", tmp_path / "o.npy", "--kind", "volume", "-o", run)
    expect_error(code, err, "object array")
    (tmp_path / "b.binvox").write_bytes(
        b"#binvox 1\ndim 4 4\ntranslate 0 0 0\nscale 1\ndata\n\x00\x40"
    )
    code, _, err = cli("fit", tmp_path / "b.binvox", "-o", run)
    expect_error(code, err, "malformed header")
    (tmp_path / "c.binvox").write_bytes(b"#binvox 1\ndim 4 4 4\nscale 1\ndata\n\x01\x10")
    code, _, err = cli("fit", tmp_path / "c.binvox", "-o", run)
    expect_error(code, err, "runs cover 16 voxels")
    (tmp_path / "d.binvox").write_bytes(b"P6 not a binvox\n")
    code, _, err = cli("fit", tmp_path / "d.binvox", "-o", run)
    expect_error(code, err, "not a binvox file")
    np.save(tmp_path / "e.npy", np.zeros((0, 4, 4), np.float32))
    code, _, err = cli("fit", tmp_path / "e.npy", "-o", run)
    expect_error(code, err, "empty array")
    np.save(tmp_path / "k.npy", np.full((8, 8, 8), 7.0, np.float32))
    code, _, err = cli("fit", tmp_path / "k.npy", "-o", run)
    expect_error(code, err, "is constant (every sample is 7)")
    np.save(tmp_path / "n.npy", np.full((8, 8, 8), np.nan, np.float32))
    code, _, err = cli("fit", tmp_path / "n.npy", "-o", run)
    expect_error(code, err, "NaN or infinite")
    np.save(tmp_path / "m.npy", np.full((8, 8, 8), 3, np.uint8))
    code, _, err = cli("fit", tmp_path / "m.npy", "--kind", "occupancy", "-o", run)
    expect_error(code, err, "not an occupancy grid")
    assert not run.exists()


def test_four_component_nifti_is_fitted_as_channels(tmp_path):
    import nibabel

    vectors = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(vectors, np.eye(4)), tmp_path / "vec.nii")
    volume = read_volume(tmp_path / "vec.nii")
    assert volume.data.shape == (3, 5, 6, 7)
    np.testing.assert_array_equal(volume.data[2], vectors[..., 2])


def test_a_large_npy_volume_is_memory_mapped(tmp_path):
    from miner3d.kinds import VOLUME, read_signal

    np.save(tmp_path / "big.npy", torus_distance((40, 48, 32)))
    signal = read_signal(tmp_path / "big.npy", VOLUME)
    assert isinstance(signal.data, np.memmap) and signal.info["memory_mapped"]
    result = miner3d.fit(tmp_path / "big.npy", max_iters=30, n_scales=2)
    assert result.summary["input"]["kind"] == "volume" and result.model.kind == "volume"


def test_kind_follows_content(tmp_path):
    cases = {
        "bool.npy": np.zeros((4, 5, 6), bool),
        "bytes01.npy": (np.arange(120).reshape(4, 5, 6) % 2).astype(np.uint8),
        "bytes.npy": (np.arange(120).reshape(4, 5, 6) % 7).astype(np.uint8),
        "float.npy": np.zeros((4, 5, 6), np.float32),
        "gray.npy": np.zeros((4, 5), np.float32),
        "rgb.npy": np.zeros((4, 5, 3), np.uint8),
    }
    for name, array in cases.items():
        np.save(tmp_path / name, array)
    kinds = {name: kind_of_path(tmp_path / name).name for name in cases}
    assert kinds == {
        "bool.npy": "occupancy",
        "bytes01.npy": "occupancy",
        "bytes.npy": "volume",
        "float.npy": "volume",
        "gray.npy": "image",
        "rgb.npy": "image",
    }
    write_volume(tmp_path / "stack.tif", np.zeros((4, 5, 6), np.uint16), None)
    assert kind_of_path(tmp_path / "stack.tif").name == "volume"


def torus_distance(shape=(40, 48, 32)) -> np.ndarray:
    """A smooth signed distance field of a torus, float32, in voxel units."""
    g = [np.arange(n) - (n - 1) / 2 for n in shape]
    x, y, z = np.meshgrid(*g, indexing="ij")
    ring = np.sqrt(x**2 + y**2) - 13.0
    return (np.sqrt(ring**2 + z**2) - 6.0).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return 10 * math.log10(peak**2 / float(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.slow
def test_scalar_volume_fit_end_to_end(tmp_path, cli):
    sdf = torus_distance()
    source = write_volume(tmp_path / "torus.nii.gz", sdf, ANISO.with_shape(sdf.shape))
    run = tmp_path / "run"
    code, _, err = cli("fit", source, "-o", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preset"] == "volume" and summary["input"]["kind"] == "volume"
    assert summary["psnr"] >= 40.0 and 0.95 <= summary["ssim"] <= 1.0
    assert (run / "levels.png").stat().st_size > 0
    # the whole volume back, in the input's units and coordinates
    code, _, err = cli("extract", run / "model.safetensors", "-o", tmp_path / "back.nii.gz")
    assert code == 0, err
    back = read_volume(tmp_path / "back.nii.gz")
    assert back.data.shape == (1, *sdf.shape)
    np.testing.assert_allclose(back.transform.origin, ANISO.origin, atol=1e-5)
    np.testing.assert_allclose(back.transform.steps, ANISO.with_shape(sdf.shape).steps)
    measured = psnr(np.asarray(back.data[0]), sdf, float(sdf.max() - sdf.min()))
    assert measured >= 40.0 and abs(measured - summary["psnr"]) < 0.2
    # an isosurface in world coordinates, and a resampled, coarser level
    code, _, err = cli("extract", run / "model.safetensors", "-o", tmp_path / "iso.ply")
    assert code != 0 and "--level" in err
    code, _, err = cli(
        "extract", run / "model.safetensors", "--level", 0, "-o", tmp_path / "iso.ply"
    )
    assert code == 0, err
    import trimesh

    mesh = trimesh.load(tmp_path / "iso.ply")
    lo, hi = ANISO.with_shape(sdf.shape).bounds
    assert np.all(mesh.vertices >= lo) and np.all(mesh.vertices <= hi)
    assert mesh.is_watertight and mesh.volume > 0
    model = miner3d.load(run / "model.safetensors")
    small = model.volume(lod=1, resolution=24)
    assert small.shape == (20, 24, 16)
    code, _, err = cli(
        "view",
        run / "model.safetensors",
        "--screenshot",
        tmp_path / "v.png",
        "--plot",
        tmp_path / "h.png",
    )
    assert code == 0, err


def test_integer_volume_psnr_uses_the_dtype_range():
    volume = (torus_distance((24, 24, 24)) * 100).astype(np.int16)
    result = miner3d.fit(volume, kind="volume", max_iters=200)
    meta = result.model.core.meta
    assert meta["psnr_peak"] == pytest.approx(65535)  # in the input's units
    span = meta["value_range"][1] - meta["value_range"][0]
    assert meta["fitted_psnr_peak"] == pytest.approx(65535 / span)
    recon = result.model.volume()
    assert recon.dtype == np.float32 and recon.shape == volume.shape
    expected = psnr(recon, volume, 65535.0)
    assert result.summary["psnr"] == pytest.approx(expected, abs=0.3)


def test_voxelize_writes_binvox_that_fits_as_occupancy(tmp_path, cli, meshes_dir):
    out = tmp_path / "teapot.binvox"
    code, _, err = cli("voxelize", meshes_dir / "teapot.obj", "-r", 32, "-o", out, "-q")
    assert code == 0, err
    grid = miner3d.voxelize(meshes_dir / "teapot.obj", 32)
    volume = read_volume(out)
    np.testing.assert_array_equal(volume.data[0], grid.occupancy)
    np.testing.assert_allclose(volume.transform.origin, grid.transform.origin)
    result = miner3d.fit(out, max_iters=50)
    assert result.summary["iou"] > 0.9 and result.model.kind == "occupancy"


def test_big_endian_and_gzip_nrrd(tmp_path):
    data = asymmetric(dtype=np.int16)
    nx, ny, nz = data.shape
    head = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {nx} {ny} {nz}\nspacings: 0.5 0.7 0.9\n"
    big = np.asfortranarray(data).astype(">i2").tobytes(order="F")
    (tmp_path / "big.nrrd").write_bytes((head + "encoding: raw\nendian: big\n\n").encode() + big)
    import gzip

    little = np.asfortranarray(data).tobytes(order="F")
    (tmp_path / "gz.nrrd").write_bytes(
        (head + "encoding: gzip\nendian: little\n\n").encode() + gzip.compress(little)
    )
    for name in ("big.nrrd", "gz.nrrd"):
        volume = read_volume(tmp_path / name)
        assert volume.data.dtype.isnative
        np.testing.assert_array_equal(volume.data[0], data)
        np.testing.assert_allclose(volume.transform.steps, (0.5, 0.7, 0.9))
    result = miner3d.fit(tmp_path / "big.nrrd", max_iters=10, n_scales=1, block=8)
    assert result.model.kind == "volume"
