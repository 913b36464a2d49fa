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
    return parser


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
        odd = grid.meta.get("odd_columns", 0)
        if odd:
            print(
                f"warning: {odd} columns crossed the surface an odd number of times "
                "(the mesh has holes); they were left empty",
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
