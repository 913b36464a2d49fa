"""What each ``miner3d`` subcommand does with its parsed arguments: calls into
:mod:`miner3d.api` and the stages, and prints. Every user error is a
:class:`~miner3d.errors.MinerError` (one line, non-zero exit)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import MinerError, first_line


def _refuse_existing(path: Path | None, force: bool) -> None:
    if path is not None and path.exists() and not force:
        raise MinerError(f"{path} exists; pass --force to overwrite it")


def _image_size(text: str, shape: tuple[int, int]) -> tuple[int, int]:
    """``--resolution`` of an image: ``N`` for the longest side (the aspect kept), or ``WxH``;
    returns ``(H, W)``."""
    w, sep, h = str(text).lower().partition("x")
    if not sep and w.isdigit() and int(w) >= 1:
        n, longest = int(w), max(shape)
        return max(1, round(shape[0] * n / longest)), max(1, round(shape[1] * n / longest))
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise MinerError(f"--resolution takes N (the longest side) or WxH, got {text!r}")
    return int(h), int(w)


def cmd_extract(args: argparse.Namespace) -> int:
    from .dense import fitted_level, save_volume
    from .extract import IMAGE_OUTPUTS, MESH_OUTPUTS, marching_cubes, save_image, save_mesh
    from .io import format_suffix
    from .model import MinerModel
    from .volumes import VOLUME_OUTPUTS

    _refuse_existing(args.output, args.force)
    model = MinerModel.load(args.model)
    from .sampling import check_lod

    top = model.layout.n_scales - 1
    lod = None if args.lod is None else check_lod(args.lod, top + 1, "--lod (--scale)")
    suffix = format_suffix(args.output)
    wanted = {"occupancy": MESH_OUTPUTS, "image": IMAGE_OUTPUTS}.get(
        model.kind, VOLUME_OUTPUTS + MESH_OUTPUTS
    )
    if suffix not in wanted:
        got = suffix or str(args.output)
        article = "an" if model.kind[0] in "aeiou" else "a"
        raise MinerError(
            f"{article} {model.kind} model is extracted to {', '.join(wanted)}; got '{got}'"
        )
    if model.kind == "image":
        from .sampling import auto_lod

        shape = model.layout.valid_shape(0)
        size = None if args.resolution is None else _image_size(args.resolution, shape)
        save_image(model, args.output, lod, size, off_grid=args.off_grid)
        height, width = size or model.layout.valid_shape(int(lod or 0))
        shown = lod if lod is not None or size is None else auto_lod(shape, size, top + 1)
        print(
            f"{args.output}: {width}x{height} ({model.meta.get('dtype', 'uint8')}, "
            f"lod {shown or 0:.3g}{', off the grid' if args.off_grid else ''})"
        )
        return 0
    if args.off_grid:
        raise MinerError("--off-grid is for image models")
    resolution = None
    if args.resolution is not None:
        if not str(args.resolution).isdigit():
            raise MinerError(f"--resolution takes a number for 3D models, got {args.resolution!r}")
        resolution = int(args.resolution)
    if suffix in VOLUME_OUTPUTS:
        save_volume(model, args.output, lod, resolution)
        shown = "auto" if lod is None else f"{lod:g}"
        print(f"{args.output}: float32 volume in the input's units (lod {shown})")
        return 0
    lod = lod or 0
    level = 0.5 if args.level is None else args.level
    if model.kind == "volume":
        if args.level is None:
            lo, hi = model.meta.get("value_range", ["?", "?"])
            raise MinerError(
                f"a mesh of a volume is an isosurface: pass --level VALUE (in the input's "
                f"units; its samples range over [{lo:g}, {hi:g}])"
            )
        level = fitted_level(model, args.level)
    vertices, faces = marching_cubes(model, lod, level, resolution=resolution)
    save_mesh(vertices, faces, args.output)
    print(f"{args.output}: {len(vertices):,} vertices, {len(faces):,} triangles (lod {lod:g})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table
    from .grid import OccupancyGrid
    from .model import MinerModel
    from .rundir import write_json

    output = args.output or args.model.parent / "eval.json"
    _refuse_existing(output, args.force)
    model = MinerModel.load(args.model)
    if model.kind != "occupancy":
        raise MinerError("eval measures occupancy models; image runs report PSNR in summary.json")
    grid_path = args.grid or args.model.parent / "grid.npz"
    occupancy = OccupancyGrid.load(grid_path).occupancy if grid_path.exists() else None
    mesh = args.mesh
    if mesh is None and model.meta.get("kind") == "mesh":
        # the mesh the model names, only if it is the very file it was fitted to: a model
        # from elsewhere must not make eval read an arbitrary path
        from .io import file_sha256

        named = Path(str(model.meta.get("source", "")))
        if named.is_file() and file_sha256(named) == model.meta.get("source_sha256"):
            mesh = named
    if occupancy is None and mesh is None:
        raise MinerError("nothing to compare with: pass --grid and/or --mesh")
    results = evaluate(model, occupancy, mesh, args.points, args.surface)
    for line in format_table(results):
        print(line)
    write_json(output, results)
    print(f"written {output}")
    return 0


def _has_display() -> bool:
    return sys.platform in ("win32", "darwin") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def cmd_view(args: argparse.Namespace) -> int:
    from .model import MinerModel
    from .viz import plot_history, render_image_levels, render_levels, render_volume_levels

    for path in (args.screenshot, args.plot, args.movie):
        _refuse_existing(path, args.force)
    model = MinerModel.load(args.model)
    from .sampling import check_lod

    lods = None
    if args.lod is not None:
        lods = [check_lod(lod, model.layout.n_scales, "--lod") for lod in args.lod]
    metrics = args.model.parent / "metrics.csv"
    if args.plot is not None and not metrics.exists():
        raise MinerError(f"no metrics.csv beside {args.model}")
    if args.movie is not None:
        from .movie import write_movie

        write_movie(model, args.movie, args.frames)
        print(f"written {args.movie} ({args.frames} frames)")
    drawn = args.movie is not None or args.plot is not None
    if args.screenshot is None and not drawn and not _has_display():
        raise MinerError("no display to open a window on; pass --screenshot out.png")
    if model.kind == "image" and args.screenshot is None and not drawn:
        raise MinerError("image models are drawn to a file: pass --screenshot out.png")
    if model.kind == "image" and args.screenshot is not None:
        render_image_levels(model, args.screenshot, lods=lods)
    elif model.kind == "volume" and args.screenshot is not None:
        render_volume_levels(model, args.screenshot, lods=lods)
    elif model.kind == "occupancy" and args.screenshot is not None:
        render_levels(model, args.screenshot, lods=lods)
    elif not drawn:  # a window, with a slider over the level of detail
        from .movie import lod_explorer

        lod_explorer(model)[0].show()
    if args.screenshot is not None:
        print(f"written {args.screenshot}")
    if args.plot is not None:
        plot_history(metrics, args.plot)
        print(f"written {args.plot}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import PRESETS, build_config, describe, load_yaml, preset_path

    for name in PRESETS:
        meshes = "resolution" in load_yaml(preset_path(name))
        print(f"{name:6} {describe(build_config(name), meshes)}")
        print(f"{'':6} {preset_path(name)}")
    return 0


_FIT_FLAGS = {
    "resolution": "resolution",
    "scales": "fit.n_scales",
    "block": "fit.block",
    "features": "fit.hidden",
    "layers": "fit.hidden_layers",
    "w0": "fit.w0",
    "lr": "fit.lr",
    "iters": "fit.max_iters",
    "target": "fit.target",
    "time_limit": "fit.time_limit",
    "seed": "fit.seed",
    "device": "device",
}


def cmd_fit(args: argparse.Namespace) -> int:
    from . import api
    from .config import parse_assignments, to_yaml
    from .console import FitProgress, describe_summary
    from .rundir import default_run_dir

    overrides = {
        field: getattr(args, flag)
        for flag, field in _FIT_FLAGS.items()
        if getattr(args, flag) is not None
    }
    overrides.update(parse_assignments(args.set))
    if args.checkpoint_every is not None:
        unit, value = args.checkpoint_every
        if unit == "it":
            overrides["checkpoint_iterations"] = int(value)
        else:
            overrides["checkpoint_minutes"] = value
    if args.resume is not None:
        other = set(overrides) - set(api.RESUME_CHANGES)
        if args.input or other or args.config or args.preset or args.kind or args.print_config:
            raise MinerError(
                "--resume continues a run with its own input and config; it may change only "
                "--time-limit, --target, --lr and --checkpoint-every, give nothing else"
            )
    if args.config is not None and args.preset is not None:
        raise MinerError("give --config or --preset, not both")
    if args.threads is not None:
        if args.threads < 1:
            raise MinerError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.print_config:
        config = api.effective_config(args.input, args.kind, args.preset, args.config, overrides)
        print(to_yaml(config), end="")
        return 0
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        args.quiet = True
    progress = None if args.quiet else FitProgress()
    banner = None if args.quiet else (lambda text: print(text, flush=True))
    common = {
        "break_lock": args.break_lock,
        "max_memory": args.max_memory,
        "progress": progress,
        "banner": banner,
        **overrides,
    }
    try:
        if args.resume is not None:
            result = api.resume(args.resume, allow_changed_input=args.allow_changed_input, **common)
        else:
            stem = args.input.stem if args.input is not None else "lucy"
            result = api.fit(
                args.input,
                kind=args.kind,
                preset=args.preset,
                config=args.config,
                output=args.output or default_run_dir(stem),
                force=args.force,
                **common,
            )
    except RuntimeError as exc:  # torchrun: a collective failed, another rank went away
        from .distributed import launched, lost_rank

        if not launched() or not lost_rank(exc):
            raise
        raise MinerError(f"another rank failed or was killed: {first_line(exc)}") from None
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        for line in describe_summary(result.summary):
            print(line)
        print(f"outputs in {result.run_dir}")
    return 0


def cmd_voxelize(args: argparse.Namespace) -> int:
    from .console import describe_voxelize
    from .grid import check_resolution

    check_resolution(args.resolution)
    output = args.output or Path(f"{args.mesh.stem}-{args.resolution}.npz")
    if output.suffix.lower() not in (".npz", ".binvox"):
        raise MinerError(f"the output must end in .npz or .binvox, got {output}")
    _refuse_existing(output, args.force)
    start = time.perf_counter()
    from .voxelizer import voxelize_file  # not through the API: no torch to import

    grid = voxelize_file(
        args.mesh,
        args.resolution,
        method=args.method,
        cube=args.cube,
        margin=args.margin,
        max_memory=args.max_memory,
    )
    if output.suffix.lower() == ".binvox":
        from .volumes import write_binvox

        write_binvox(output, grid.occupancy, grid.transform)
    else:
        grid.save(output)
    if not args.quiet:
        out, err = describe_voxelize(args.mesh, output, grid, time.perf_counter() - start)
        print(out)
        if err:
            print(err, file=sys.stderr)
    return 0
