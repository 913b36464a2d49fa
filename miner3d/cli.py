"""The ``miner3d`` command: argument parsing and printing; the work is in :mod:`miner3d.api`
and the stages it calls.

Errors the user can cause end in one line on stderr and a non-zero exit status
(:class:`miner3d.errors.MinerError`); a traceback means a bug in miner3d.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import MinerError
from .version import __version__


def _size(text: str) -> int:
    from .memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miner3d",
        description="Multiscale implicit neural representations of very large volumes and images.",
    )
    parser.add_argument("--version", action="version", version=f"miner3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    vox = sub.add_parser(
        "voxelize",
        help="turn a mesh into a solid occupancy grid (.npz, bit-packed)",
        description="Voxelize a mesh into a solid occupancy grid (inside = 1), bit-packed on disk.",
    )
    vox.add_argument("mesh", type=Path, help="mesh file (.ply .obj .stl .off .glb .gltf)")
    vox.add_argument(
        "-r",
        "--resolution",
        type=int,
        default=256,
        help="voxels along the mesh's longest axis (default 256)",
    )
    vox.add_argument(
        "-o", "--output", type=Path, help="output .npz (default: <mesh stem>-<resolution>.npz here)"
    )
    vox.add_argument("--cube", action="store_true", help="N^3 grid instead of a tight box")
    vox.add_argument(
        "--margin",
        type=int,
        default=2,
        help="empty voxels on each side of the longest axis (default 2)",
    )
    vox.add_argument(
        "--method",
        default="robust",
        help="robust (default: 3 axes + winding number, tolerates holes), nonzero (union of "
        "overlapping bodies), parity (fastest, closed meshes only), open3d (slow reference)",
    )
    vox.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        help="memory budget, e.g. 2GB (default: what is available)",
    )
    vox.add_argument("--force", action="store_true", help="overwrite an existing output file")
    vox.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    vox.set_defaults(func=_cmd_voxelize)

    fit = sub.add_parser(
        "fit",
        help="fit a MINER model to a mesh, a voxel grid or an image",
        description="Fit a multiscale model coarse to fine. Without INPUT: the bundled Lucy.",
    )
    fit.add_argument(
        "input",
        type=Path,
        nargs="?",
        help="mesh, grid (.npz from voxelize) or image (default: the bundled lucy.ply)",
    )
    fit.add_argument("--kind", help="occupancy or image (default: by the input's extension)")
    fit.add_argument("--config", type=Path, help="a YAML config file (instead of a preset)")
    fit.add_argument("--preset", help="see `miner3d presets` (default: by kind and device)")
    fit.add_argument("-r", "--resolution", type=int, help="voxels along the longest axis")
    fit.add_argument("--scales", type=int, help="number of pyramid scales")
    fit.add_argument("--block", type=int, help="block edge in samples")
    fit.add_argument("--features", type=int, help="hidden features per layer")
    fit.add_argument("--layers", type=int, help="hidden layers")
    fit.add_argument("--w0", type=float, help="SIREN frequency factor")
    fit.add_argument("--lr", type=float, help="learning rate")
    fit.add_argument("--iters", type=int, help="iteration cap per scale")
    fit.add_argument("--target", type=float, help="stop at this IoU (or PSNR) at the finest scale")
    fit.add_argument("--time-limit", type=float, help="stop after this many seconds")
    fit.add_argument("--seed", type=int, help="seed of the initialisation and sample draws")
    fit.add_argument("--device", help="auto, cpu or cuda")
    fit.add_argument("--threads", type=int, help="CPU threads torch uses (default: torch's)")
    fit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set fit.prune_mse=1e-3 (repeatable)",
    )
    fit.add_argument(
        "--print-config", action="store_true", help="print the effective config and exit"
    )
    fit.add_argument("-o", "--output", type=Path, help="run directory (default runs/NAME-TIME)")
    fit.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    fit.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run")
    fit.add_argument("--max-memory", type=_size, help="memory budget, e.g. 8GB (default: free)")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    fit.set_defaults(func=_cmd_fit)

    pre = sub.add_parser("presets", help="list the presets", description="The YAML presets.")
    pre.set_defaults(func=_cmd_presets)

    ext = sub.add_parser(
        "extract",
        help="a mesh (occupancy) or a picture (image) at any level of detail",
        description="Marching cubes on an occupancy model, rendering of an image model; "
        "the format follows -o.",
    )
    ext.add_argument("model", type=Path, help="model.safetensors")
    ext.add_argument(
        "-o", "--output", type=Path, required=True, help="mesh (.ply .obj .stl .glb .off) or image"
    )
    ext.add_argument(
        "--lod", "--scale", dest="lod", type=int, default=0, help="level of detail (0: finest)"
    )
    ext.add_argument(
        "-r",
        "--resolution",
        help="3D: samples along the longest axis; images: WxH (default: the level's own grid)",
    )
    ext.add_argument("--level", type=float, default=0.5, help="iso level (default 0.5)")
    ext.add_argument("--force", action="store_true", help="overwrite an existing file")
    ext.set_defaults(func=_cmd_extract)

    ev = sub.add_parser(
        "eval",
        help="IoU, Chamfer distance and F-score of a fitted 3D model",
        description="Metrics per level of detail; prints a table, writes JSON.",
    )
    ev.add_argument("model", type=Path, help="model.safetensors (in its run directory)")
    ev.add_argument("--mesh", type=Path, help="source mesh (default: the model's)")
    ev.add_argument("--grid", type=Path, help="voxel grid (default: grid.npz beside the model)")
    ev.add_argument("--points", type=int, default=1_000_000, help="random points for point IoU")
    ev.add_argument("--surface", type=int, default=100_000, help="surface samples per mesh")
    ev.add_argument("-o", "--output", type=Path, help="JSON (default: eval.json beside the model)")
    ev.add_argument("--force", action="store_true", help="overwrite an existing JSON")
    ev.set_defaults(func=_cmd_eval)

    view = sub.add_parser(
        "view",
        help="pictures of a fitted model and its training history",
        description="Every level of detail beside its blocks; --screenshot renders off-screen.",
    )
    view.add_argument("model", type=Path, help="model.safetensors")
    view.add_argument("--screenshot", type=Path, help="write a PNG instead of opening a window")
    view.add_argument("--plot", type=Path, help="also plot quality against time (metrics.csv)")
    view.add_argument("--force", action="store_true", help="overwrite existing pictures")
    view.set_defaults(func=_cmd_view)
    return parser


def _refuse_existing(path: Path | None, force: bool) -> None:
    if path is not None and path.exists() and not force:
        raise MinerError(f"{path} exists; pass --force to overwrite it")


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import IMAGE_OUTPUTS, MESH_OUTPUTS, marching_cubes, save_image, save_mesh
    from .model import MinerModel

    _refuse_existing(args.output, args.force)
    model = MinerModel.load(args.model)
    if not 0 <= args.lod < model.layout.n_scales:
        raise MinerError(f"--lod (--scale) must be in [0, {model.layout.n_scales - 1}]")
    suffix = args.output.suffix.lower()
    wanted = MESH_OUTPUTS if model.kind == "occupancy" else IMAGE_OUTPUTS
    if suffix not in wanted:
        got = suffix or str(args.output)
        raise MinerError(f"an {model.kind} model is extracted to {', '.join(wanted)}; got '{got}'")
    if model.kind == "image":
        height, width = model.layout.valid_shape(args.lod)
        if args.resolution is not None:
            w, sep, h = str(args.resolution).lower().partition("x")
            if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
                raise MinerError(f"--resolution takes WxH for images, got {args.resolution!r}")
            width, height = int(w), int(h)
        own = (height, width) == tuple(model.layout.valid_shape(args.lod))
        save_image(model, args.output, args.lod, None if own else (height, width))
        print(
            f"{args.output}: {width}x{height} ({model.meta.get('dtype', 'uint8')}, lod {args.lod})"
        )
        return 0
    resolution = None
    if args.resolution is not None:
        if not str(args.resolution).isdigit():
            raise MinerError(f"--resolution takes a number for 3D models, got {args.resolution!r}")
        resolution = int(args.resolution)
    vertices, faces = marching_cubes(model, args.lod, args.level, resolution=resolution)
    save_mesh(vertices, faces, args.output)
    print(f"{args.output}: {len(vertices):,} vertices, {len(faces):,} triangles (lod {args.lod})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
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
    if mesh is None and model.meta.get("kind") == "mesh" and Path(model.meta["source"]).exists():
        mesh = Path(model.meta["source"])
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


def _cmd_view(args: argparse.Namespace) -> int:
    from .model import MinerModel
    from .viz import plot_history, render_image_levels, render_levels

    _refuse_existing(args.screenshot, args.force)
    _refuse_existing(args.plot, args.force)
    model = MinerModel.load(args.model)
    if args.screenshot is None and not _has_display():
        raise MinerError("no display to open a window on; pass --screenshot out.png")
    metrics = args.model.parent / "metrics.csv"
    if args.plot is not None and not metrics.exists():
        raise MinerError(f"no metrics.csv beside {args.model}")
    if model.kind == "image":
        if args.screenshot is None:
            raise MinerError("image models are drawn to a file: pass --screenshot out.png")
        render_image_levels(model, args.screenshot)
    else:
        render_levels(model, args.screenshot)
    if args.screenshot is not None:
        print(f"written {args.screenshot}")
    if args.plot is not None:
        plot_history(metrics, args.plot)
        print(f"written {args.plot}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
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


def _cmd_fit(args: argparse.Namespace) -> int:
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
    if args.resume is not None and (
        args.input or overrides or args.config or args.preset or args.kind or args.print_config
    ):
        raise MinerError(
            "--resume continues a run with its own input and config; give nothing else"
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
    progress = None if args.quiet else FitProgress()
    banner = None if args.quiet else (lambda text: print(text, flush=True))
    try:
        if args.resume is not None:
            result = api.resume(
                args.resume, max_memory=args.max_memory, progress=progress, banner=banner
            )
        else:
            stem = args.input.stem if args.input is not None else "lucy"
            result = api.fit(
                args.input,
                kind=args.kind,
                preset=args.preset,
                config=args.config,
                output=args.output or default_run_dir(stem),
                force=args.force,
                max_memory=args.max_memory,
                progress=progress,
                banner=banner,
                **overrides,
            )
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        for line in describe_summary(result.summary):
            print(line)
        print(f"outputs in {result.run_dir}")
    return 0


def _cmd_voxelize(args: argparse.Namespace) -> int:
    from . import api
    from .console import describe_voxelize
    from .grid import check_resolution

    check_resolution(args.resolution)
    output = args.output or Path(f"{args.mesh.stem}-{args.resolution}.npz")
    if output.suffix != ".npz":
        raise MinerError(f"the output must end in .npz, got {output}")
    _refuse_existing(output, args.force)
    start = time.perf_counter()
    grid = api.voxelize(
        args.mesh,
        args.resolution,
        method=args.method,
        cube=args.cube,
        margin=args.margin,
        max_memory=args.max_memory,
    )
    grid.save(output)
    if not args.quiet:
        out, err = describe_voxelize(args.mesh, output, grid, time.perf_counter() - start)
        print(out)
        if err:
            print(err, file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MinerError as exc:
        print(f"miner3d: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("miner3d: interrupted", file=sys.stderr)
        return 130
