"""The ``miner3d`` command: argument parsing and printing; the work is in :mod:`miner3d.api`
and the stages it calls.

Errors the user can cause end in one line on stderr and a non-zero exit status
(:class:`miner3d.errors.MinerError`); a traceback means a bug in miner3d.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import commands
from .errors import MinerError
from .version import __version__


def _size(text: str) -> int:
    from .memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _every(text: str) -> tuple[str, float]:
    """``10m`` / ``10`` (minutes) or ``500it`` (iterations)."""
    t = text.strip().lower()
    unit, number = ("it", t[:-2]) if t.endswith("it") else ("m", t.removesuffix("m"))
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes 10m, 10 (minutes) or 500it, not {text!r}"
        ) from None
    if not 0 < value < float("inf") or (unit == "it" and value != int(value)):
        raise argparse.ArgumentTypeError(f"takes a positive 10m, 10 or 500it, not {text!r}")
    return unit, value


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the full traceback of an unexpected error"
    )
    parser = argparse.ArgumentParser(
        prog="miner3d",
        description="Multiscale implicit neural representations of very large volumes and images.",
    )
    parser.add_argument("--version", action="version", version=f"miner3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    vox = sub.add_parser(
        "voxelize",
        parents=[common],
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
        "-o",
        "--output",
        type=Path,
        help="output .npz or .binvox (default: <mesh stem>-<resolution>.npz here)",
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
        help="robust (default: nonzero rule on 3 axes + fast winding number; overlapping "
        "bodies are a union, holes are capped), evenodd (overlaps cancel), parity (fastest, "
        "closed meshes only), open3d (slow reference)",
    )
    vox.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        help="memory budget, e.g. 2GB (default: what is available)",
    )
    vox.add_argument("--force", action="store_true", help="overwrite an existing output file")
    vox.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    vox.set_defaults(func=commands.cmd_voxelize)

    fit = sub.add_parser(
        "fit",
        parents=[common],
        help="fit a MINER model to a mesh, a voxel grid or an image",
        description="Fit a multiscale model coarse to fine. Without INPUT: the bundled Lucy.",
    )
    fit.add_argument(
        "input",
        type=Path,
        nargs="?",
        help="mesh, grid (.npz from voxelize) or image (default: the bundled lucy.ply)",
    )
    fit.add_argument(
        "--kind", help="occupancy, image or volume (default: by the input's extension and shape)"
    )
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
    fit.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue an interrupted run (only --time-limit, --target, --lr and "
        "--checkpoint-every may change)",
    )
    fit.add_argument(
        "--checkpoint-every",
        type=_every,
        metavar="N",
        help="checkpoint every 10m (minutes, the default unit) or 500it (iterations); "
        "also at every scale switch and on SIGINT / SIGTERM / SIGHUP",
    )
    fit.add_argument(
        "--allow-changed-input", action="store_true", help="resume although the input changed"
    )
    fit.add_argument(
        "--break-lock", action="store_true", help="take the run's lock from a process gone"
    )
    fit.add_argument("--max-memory", type=_size, help="memory budget, e.g. 8GB (default: free)")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    fit.set_defaults(func=commands.cmd_fit)

    pre = sub.add_parser(
        "presets", parents=[common], help="list the presets", description="The YAML presets."
    )
    pre.set_defaults(func=commands.cmd_presets)

    ext = sub.add_parser(
        "extract",
        parents=[common],
        help="a mesh, a picture or a volume at any level of detail",
        description="Marching cubes on an occupancy model (or a volume's isosurface at "
        "--level), rendering of an image model, a dense volume of a volume model; the format "
        "follows -o.",
    )
    ext.add_argument("model", type=Path, help="model.safetensors")
    ext.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="mesh (.ply .obj .stl .glb .off), image (.png .tif .jpg) or volume "
        "(.npy .nii .nii.gz .vti .mha .tif)",
    )
    ext.add_argument(
        "--lod",
        "--scale",
        dest="lod",
        type=float,
        default=None,
        help="level of detail: 0 the finest, fractions blend two levels (default: the finest "
        "for meshes; for pictures and volumes the level whose sample spacing matches the "
        "output, anti-aliased as a mipmap)",
    )
    ext.add_argument(
        "-r",
        "--resolution",
        help="samples along the longest axis (the aspect kept); images also WxH (default: "
        "the level's own grid; volumes: the input's shape)",
    )
    ext.add_argument(
        "--off-grid",
        action="store_true",
        help="images: evaluate the finest scale's MLPs at the output pixels instead of "
        "interpolating between their samples",
    )
    ext.add_argument(
        "--level",
        type=float,
        help="iso level of a mesh: 0.5 for occupancy (the default); for a volume, in its units",
    )
    ext.add_argument("--force", action="store_true", help="overwrite an existing file")
    ext.set_defaults(func=commands.cmd_extract)

    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="IoU, Chamfer distance and F-score of a fitted 3D model",
        description="Metrics per level of detail; prints a table, writes JSON.",
    )
    ev.add_argument("model", type=Path, help="model.safetensors (in its run directory)")
    ev.add_argument("--mesh", type=Path, help="source mesh (default: the model's)")
    ev.add_argument("--grid", type=Path, help="voxel grid (default: grid.npz beside the model)")
    ev.add_argument("--points", type=_positive, default=1_000_000, help="points for point IoU")
    ev.add_argument("--surface", type=_positive, default=100_000, help="surface samples per mesh")
    ev.add_argument("-o", "--output", type=Path, help="JSON (default: eval.json beside the model)")
    ev.add_argument("--force", action="store_true", help="overwrite an existing JSON")
    ev.set_defaults(func=commands.cmd_eval)

    view = sub.add_parser(
        "view",
        parents=[common],
        help="pictures of a fitted model and its training history",
        description="Every level of detail beside its blocks; --screenshot renders off-screen, "
        "--movie writes a GIF or MP4.",
    )
    view.add_argument("model", type=Path, help="model.safetensors")
    view.add_argument("--screenshot", type=Path, help="write a PNG instead of opening a window")
    view.add_argument("--plot", type=Path, help="also plot quality against time (metrics.csv)")
    view.add_argument(
        "--lod",
        type=float,
        action="append",
        help="draw this level of detail only (fractional allowed; repeat for several)",
    )
    view.add_argument(
        "--movie",
        type=Path,
        help="write the levels of detail as a movie (.gif; .mp4 with imageio-ffmpeg): a zoom "
        "through an image's levels, a turntable of a 3D model's",
    )
    view.add_argument("--frames", type=_positive, default=24, help="frames of --movie (24)")
    view.add_argument("--force", action="store_true", help="overwrite existing pictures")
    view.set_defaults(func=commands.cmd_view)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status. A user error is one line on stderr; an unexpected
    one too, with its type, unless ``--debug`` asks for the traceback."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    who = "miner3d"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's ranks
        who = f"miner3d (rank {os.environ.get('RANK', '?')})"
    try:
        return args.func(args)
    except MinerError as exc:
        _error_line(f"{who}: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line(f"{who}: interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`miner3d ... | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else ""
        _error_line(
            f"{who}: error: unexpected {type(exc).__name__}: {reason} (this is a bug in "
            "miner3d; rerun with --debug for the traceback and report it)"
        )
        return 1


def _error_line(line: str) -> None:
    """``line`` on stderr in one write: torchrun's ranks share one stderr, unbuffered, and
    ``print`` writes the newline apart, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
