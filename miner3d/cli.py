"""The ``miner3d`` command. Subcommands only parse arguments and call the API.

Errors the user can cause end in one line on stderr and a non-zero exit status
(:class:`miner3d.errors.MinerError`); a traceback means a bug in miner3d.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import MinerError


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
        help="mesh, grid (.npz from voxelize) or image (default meshes/lucy.ply)",
    )
    fit.add_argument("--config", type=Path, help="a YAML config file (instead of a preset)")
    fit.add_argument("--preset", help="cpu, lucy or image (default: by device and input)")
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
    fit.add_argument("--device", help="auto, cpu or cuda")
    fit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set fit.prune_mse=1e-3 (repeatable)",
    )
    fit.add_argument("-o", "--output", type=Path, help="run directory (default runs/NAME-TIME)")
    fit.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    fit.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run")
    fit.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        help="memory budget, e.g. 8GB (default: what is available)",
    )
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    fit.set_defaults(func=_cmd_fit)

    ext = sub.add_parser(
        "extract",
        help="a mesh from a fitted 3D model at any level of detail",
        description="Marching cubes on the model; the format follows -o.",
    )
    ext.add_argument("model", type=Path, help="model.safetensors")
    ext.add_argument(
        "-o", "--output", type=Path, required=True, help="mesh file: .ply .obj .stl .glb .off"
    )
    ext.add_argument("--scale", type=int, default=0, help="level of detail (0: finest)")
    ext.add_argument(
        "-r",
        "--resolution",
        help="3D: samples along the longest axis; images: WxH (default: the scale's own grid)",
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
    ev.add_argument(
        "--mesh",
        type=Path,
        help="source mesh for point IoU / Chamfer / F-score (default: the model's)",
    )
    ev.add_argument(
        "--grid",
        type=Path,
        help="voxel grid for full-grid IoU (default: grid.npz beside the model)",
    )
    ev.add_argument("--points", type=int, default=1_000_000, help="random points for point IoU")
    ev.add_argument("--surface", type=int, default=100_000, help="surface samples per mesh")
    ev.add_argument("-o", "--output", type=Path, help="JSON (default: eval.json beside the model)")
    ev.set_defaults(func=_cmd_eval)

    view = sub.add_parser(
        "view",
        help="pictures of a fitted model and its training history",
        description="Every level of detail beside its blocks; --screenshot renders off-screen.",
    )
    view.add_argument("model", type=Path, help="model.safetensors")
    view.add_argument("--screenshot", type=Path, help="write a PNG instead of opening a window")
    view.add_argument(
        "--plot", type=Path, help="also plot quality against time from metrics.csv beside the model"
    )
    view.set_defaults(func=_cmd_view)
    return parser


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import marching_cubes, save_mesh
    from .model import MinerModel

    if args.output.exists() and not args.force:
        raise MinerError(f"{args.output} exists; pass --force to overwrite it")
    model = MinerModel.load(args.model)
    if not 0 <= args.scale < model.layout.n_scales:
        raise MinerError(f"--scale must be in [0, {model.layout.n_scales - 1}]")
    if model.layout.ndim == 2:
        return _extract_image(model, args)
    resolution = None
    if args.resolution is not None:
        try:
            resolution = int(args.resolution)
        except ValueError:
            raise MinerError(
                f"--resolution takes a number for 3D models, got {args.resolution!r}"
            ) from None
    vertices, faces = marching_cubes(model, args.scale, args.level, resolution=resolution)
    save_mesh(vertices, faces, args.output)
    print(
        f"{args.output}: {len(vertices):,} vertices, {len(faces):,} triangles (scale {args.scale})"
    )
    return 0


def _extract_image(model, args: argparse.Namespace) -> int:
    """Render a 2D model at any size (super-resolution by querying the continuous model)."""
    from .runs import save_image

    height, width = model.layout.shape
    if args.resolution is not None:
        w, sep, h = str(args.resolution).lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
            raise MinerError(f"--resolution takes WxH for images, got {args.resolution!r}")
        width, height = int(w), int(h)
    own = (height, width) == tuple(model.layout.valid_shape(args.scale))
    save_image(model, args.output, args.scale, None if own else (height, width))
    dtype = model.meta.get("dtype", "uint8")
    print(f"{args.output}: {width}x{height} ({dtype}, scale {args.scale})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table
    from .grid import OccupancyGrid
    from .model import MinerModel
    from .runs import write_json

    model = MinerModel.load(args.model)
    if model.layout.ndim != 3:
        raise MinerError("eval measures 3D models; image runs report PSNR in summary.json")
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
    output = args.output or args.model.parent / "eval.json"
    write_json(output, results)
    print(f"written {output}")
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .model import MinerModel
    from .viz import plot_history, render_image_levels, render_levels

    model = MinerModel.load(args.model)
    if model.layout.ndim == 2:
        if args.screenshot is None:
            raise MinerError("image models are drawn to a file: pass --screenshot out.png")
        render_image_levels(model, args.screenshot)
    else:
        render_levels(model, args.screenshot)
    if args.screenshot is not None:
        print(f"written {args.screenshot}")
    if args.plot is not None:
        metrics = args.model.parent / "metrics.csv"
        if not metrics.exists():
            raise MinerError(f"no metrics.csv beside {args.model}")
        plot_history(metrics, args.plot)
        print(f"written {args.plot}")
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
    "device": "device",
}


def _cmd_fit(args: argparse.Namespace) -> int:
    from .config import parse_assignments
    from .runs import describe_summary, run_fit

    overrides = {
        field: getattr(args, flag)
        for flag, field in _FIT_FLAGS.items()
        if getattr(args, flag) is not None
    }
    overrides.update(parse_assignments(args.set))
    if args.resume is not None and (args.input or overrides or args.config or args.preset):
        raise MinerError(
            "--resume continues a run with its own input and config; give nothing else"
        )
    if args.config is not None and args.preset is not None:
        raise MinerError("give --config or --preset, not both")
    progress = None if args.quiet else _FitProgress()
    try:
        summary = run_fit(
            args.input,
            preset=args.preset,
            config_file=args.config,
            overrides=overrides,
            output=args.output,
            force=args.force,
            resume=args.resume,
            max_memory=args.max_memory,
            progress=progress,
            banner=None if args.quiet else (lambda text: print(text, flush=True)),
        )
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        for line in describe_summary(summary):
            print(line)
        print(f"outputs in {summary['run_dir']}")
    return 0


class _FitProgress:
    """A rich progress bar per scale: iterations with ETA, live blocks, loss and quality."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("scale {task.fields[scale]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self.tasks: dict[int, int] = {}
        self.started = False

    def __call__(self, record: dict) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        scale = record.get("scale")
        event = record.get("event")
        if event == "scale_start" or (event == "resumed" and scale not in self.tasks):
            total = record.get("max_iters")  # None for a resumed scale
            self.tasks[scale] = self.progress.add_task("", total=total, scale=scale, status="")
        task = self.tasks.get(scale)
        if task is None:
            return
        if event == "iteration":
            status = (
                f"loss {record['loss']:.2e} | live {record['live_blocks']}/"
                f"{record['mlp_blocks']} blocks"
            )
            if "iou" in record:
                status += f" IoU {record['iou']:.5f}"
            if "psnr" in record:
                status += f" {record['psnr']:.2f} dB"
            self.progress.update(task, completed=record["iteration"], status=status)
        elif event == "scale_end":
            quality = f"IoU {record['iou']:.5f}" if "iou" in record else f"{record['psnr']:.2f} dB"
            done = self.progress.tasks[task].completed or 1
            blocks = f"{record['mlp_blocks']}/{record['blocks']} MLPs"
            self.progress.update(task, total=done, completed=done, status=f"{blocks} {quality}")

    def close(self) -> None:
        if self.started:
            self.progress.stop()


def _cmd_voxelize(args: argparse.Namespace) -> int:
    from .grid import check_resolution
    from .memory import format_size, peak_rss
    from .voxelize import voxelize_file

    check_resolution(args.resolution)
    output = args.output or Path(f"{args.mesh.stem}-{args.resolution}.npz")
    if output.suffix != ".npz":
        raise MinerError(f"the output must end in .npz, got {output}")
    if output.exists() and not args.force:
        raise MinerError(f"{output} exists; pass --force to overwrite it")
    start = time.perf_counter()
    grid = voxelize_file(
        args.mesh,
        args.resolution,
        method=args.method,
        cube=args.cube,
        margin=args.margin,
        max_memory=args.max_memory,
    )
    grid.save(output)
    if not args.quiet:
        shape = "x".join(map(str, grid.shape))
        print(
            f"{args.mesh} -> {output}: {shape} voxels, {100 * grid.filled_fraction:.2f}% inside, "
            f"voxel {grid.transform.voxel_size:.6g} units, method {grid.meta['method']} "
            f"({grid.meta['seconds']:.2f} s), total {time.perf_counter() - start:.2f} s, "
            f"peak RSS {format_size(peak_rss())}"
        )
        open_columns = sum(grid.meta.get("odd_columns", {}).values())
        if open_columns and grid.meta["method"] == "parity":
            print(
                f"warning: {open_columns} columns crossed the surface an odd number of times "
                "(the mesh has holes) and were left empty; try --method robust",
                file=sys.stderr,
            )
        elif open_columns:
            print(
                f"note: the mesh is not closed ({open_columns} open columns); "
                f"{grid.meta.get('ambiguous_voxels', 0)} voxels were decided by the winding "
                "number",
                file=sys.stderr,
            )
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
