"""Fractional levels of detail, anti-aliased minification, off-grid evaluation and the
aspect ratio of rendered pictures (#18)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import miner3d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_lod import box, psnr, quantized, zoneplate


@pytest.fixture(scope="module")
def zone_model():
    image = zoneplate(256)
    return image, miner3d.fit(image, kind="image", max_iters=300).model


def test_fractional_levels_blend_linearly_and_are_exact_at_integers(zone_model):
    _, model = zone_model
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 256, size=(500, 2))
    q = {t: model.query(points, lod=t, grid_coords=True) for t in (0, 0.25, 0.5, 1, 1.5, 2)}
    np.testing.assert_allclose(q[0.5], 0.5 * (q[0] + q[1]), atol=1e-6)
    np.testing.assert_allclose(q[0.25], 0.75 * q[0] + 0.25 * q[1], atol=1e-6)
    np.testing.assert_allclose(q[1.5], 0.5 * (q[1] + q[2]), atol=1e-6)
    for j in (1, 2):  # continuous from both sides at an integer
        below = model.query(points, lod=j - 1e-6, grid_coords=True)
        np.testing.assert_allclose(below, q[j], atol=1e-5)
    # an integer level is the level itself: its own grid decoded equals the query there (to
    # the float16 rounding of the coarse fields the query reads, part of the model)
    own = model.image(lod=1)[..., 0]
    centres = (np.stack(np.indices(own.shape), -1).reshape(-1, 2) + 0.5) * 2
    at = np.clip(model.query(centres, lod=1, grid_coords=True)[:, 0], 0, 1)
    np.testing.assert_allclose(own.reshape(-1), at, atol=1e-3)
    with pytest.raises(miner3d.MinerError, match="lod must be in"):
        model.query(points, lod=2.5, grid_coords=True)


def test_minified_render_beats_naive_point_sampling(zone_model):
    image, model = zone_model
    reference = box(image, 4)[..., None]
    auto = quantized(model.image(size=(64, 64)))
    naive = quantized(model.image(lod=0, size=(64, 64)))
    gain = psnr(auto, reference) - psnr(naive, reference)
    assert gain >= 3.0, gain


def test_off_grid_evaluation_has_no_seams(zone_model):
    _, model = zone_model
    b = model.core.layout.block
    # at sample centres, off the grid is the grid
    centres = np.stack(np.indices((40, 40)), -1).reshape(-1, 2) + 0.5
    np.testing.assert_allclose(
        model.query(centres, grid_coords=True, off_grid=True),
        model.query(centres, grid_coords=True),
        atol=1e-5,
    )
    # along a row through block faces, the largest step between points 1/100 px apart
    x = np.arange(b - 3, 3 * b + 3, 0.01)
    line = np.stack([np.full_like(x, 100.3), x], 1)
    values = model.query(line, grid_coords=True, off_grid=True)[:, 0]
    steps = np.abs(np.diff(values))
    middle = (x[:-1] + 0.005) % b
    near_face = np.minimum(middle, b - middle) < 1.0  # within a sample of a block face
    interior = steps[~near_face].max()
    at_faces = steps[near_face].max()
    assert at_faces <= 3 * interior + 1e-3, (at_faces, interior)


def test_resolution_keeps_the_aspect_and_lod_overrides(tmp_path, cli):
    photo = (np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)
    result = miner3d.fit(photo, kind="image", output=tmp_path / "run", max_iters=30, block=8)
    model = tmp_path / "run" / "model.safetensors"
    code, out, err = cli("extract", model, "-o", tmp_path / "a.png", "--resolution", 30)
    assert code == 0, err
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "a.png").shape == (20, 30, 3) and "lod 1" in out
    code, out, err = cli("extract", model, "-o", tmp_path / "b.png", "-r", "30x30", "--lod", 0)
    assert code == 0, err
    assert iio.imread(tmp_path / "b.png").shape == (30, 30, 3) and "lod 0" in out
    code, out, err = cli("extract", model, "-o", tmp_path / "c.png", "--lod", 0.5)
    assert code == 0, err
    assert iio.imread(tmp_path / "c.png").shape == (40, 60, 3)
    code, _, err = cli("extract", model, "-o", tmp_path / "d.png", "--lod", 9)
    assert code != 0 and "--lod" in err
    assert result.model.lods == 3


def _frames(path):
    import imageio.v3 as iio

    frames = iio.imread(path)
    return frames, len({f.tobytes() for f in frames})


@pytest.mark.slow
def test_view_movie_writes_distinct_frames(tmp_path, cli, meshes_dir, zone_model):
    image, _ = zone_model
    miner3d.fit(image, kind="image", output=tmp_path / "img", max_iters=50)
    code, _, err = cli(
        "view", tmp_path / "img" / "model.safetensors", "--movie", tmp_path / "z.gif", "--frames", 8
    )
    assert code == 0, err
    frames, distinct = _frames(tmp_path / "z.gif")
    assert len(frames) == 8 and distinct == 8
    assert all(f[..., :3].std() > 5 for f in frames)  # none blank
    miner3d.fit(meshes_dir / "teapot.obj", output=tmp_path / "tea", resolution=32, max_iters=50)
    model = tmp_path / "tea" / "model.safetensors"
    code, _, err = cli("view", model, "--movie", tmp_path / "t.gif", "--frames", 6)
    assert code == 0, err
    frames, distinct = _frames(tmp_path / "t.gif")
    assert len(frames) == 6 and distinct == 6 and all(f[..., :3].std() > 5 for f in frames)
    code, _, err = cli("view", model, "--screenshot", tmp_path / "s.png", "--lod", 0.5)
    assert code == 0, err
    code, _, err = cli("view", model, "--movie", tmp_path / "t.avi")
    assert code != 0 and ".gif or .mp4" in err
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        code, _, err = cli("view", model, "--movie", tmp_path / "t.mp4", "--frames", 3)
        assert code != 0 and "imageio-ffmpeg" in err
    else:
        code, _, err = cli("view", model, "--movie", tmp_path / "t.mp4", "--frames", 3)
        assert code == 0, err
        import imageio.v3 as iio

        frames = iio.imread(tmp_path / "t.mp4", extension=".mp4")
        assert len(frames) == 3 and len({f.tobytes() for f in frames}) == 3


def test_lod_explorer_redraws_at_each_slider_value(meshes_dir):
    from miner3d.movie import lod_explorer

    model = miner3d.fit(meshes_dir / "teapot.obj", resolution=32, max_iters=50).model.core
    plotter, update = lod_explorer(model, off_screen=True, resolution=32)
    counts = []
    for lod in (2.0, 1.25, 0.0):
        update(lod)
        counts.append(plotter.actors["lod"].GetMapper().GetInput().GetNumberOfPoints())
    plotter.close()
    assert len(set(counts)) == 3 and min(counts) > 0
