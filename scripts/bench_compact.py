"""Benchmark: how compact fitted occupancy models are, and what float16 weights would cost.

For each run directory (``miner3d fit ... -o RUN``): parameters, the model file's MiB with
its float32 weights and with every MLP weight stored as float16, the model's size against the
bit-packed grid and against the run's compressed ``grid.npz``, time to IoU 0.999 from
``summary.json``, and the full-grid IoU (threshold 0.5, level of detail 0) of the model as
fitted and with its weights rounded to float16 (loaded back as float32). Memory: the grid and
one model at a time, plus one full-grid decode.

    python scripts/bench_compact.py runs/lucy1024 runs/lucy1024-b16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import miner3d
from miner3d.io import read_safetensors, write_safetensors


def float16_copy(model_path: Path, out: Path) -> Path:
    """The model file with every MLP weight and bias rounded to float16 (stored so)."""
    header, tensors = read_safetensors(model_path, "miner3d", "model")
    half = {
        k: v.half() if ".param" in k and v.is_floating_point() else v for k, v in tensors.items()
    }
    return write_safetensors(out, half, "miner3d", header)


def full_grid_iou(model_path: Path, grid: miner3d.OccupancyGrid) -> float:
    """IoU at 0.5 of level of detail 0 against ``grid`` (weights loaded as float32)."""
    header, tensors = read_safetensors(model_path, "miner3d", "model")
    with tempfile.TemporaryDirectory() as tmp:  # float16 weights back to float32 to load
        full = {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items()}
        path = write_safetensors(Path(tmp) / "m.safetensors", full, "miner3d", header)
        model = miner3d.load(path)
        return float(model.evaluate(grid)["scales"]["0"]["iou_grid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print(
        "| run | blocks, features | params | model MiB (float32) | float16 MiB | x bit-packed "
        "grid | x grid.npz | IoU 0.999 at | IoU float32 | IoU float16 weights |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        config = miner3d.load(run / "model.safetensors").core.meta["config"]
        grid = miner3d.OccupancyGrid.load(run / "grid.npz")
        model_path = run / "model.safetensors"
        size = model_path.stat().st_size
        packed = grid.occupancy.size / 8
        with tempfile.TemporaryDirectory() as tmp:
            half_path = float16_copy(model_path, Path(tmp) / "half.safetensors")
            half = half_path.stat().st_size
            iou32 = full_grid_iou(model_path, grid)
            iou16 = full_grid_iou(half_path, grid)
        hit = summary.get("seconds_to_iou", {}).get("0.999")
        print(
            f"| {run.name} | {config['block']}^3 x {config['n_scales']} scales, "
            f"{config['hidden_layers']} x {config['hidden']} | {summary['params']:,} | "
            f"{size / 2**20:.3f} | {half / 2**20:.3f} | {size / packed:.2f} | "
            f"{size / (run / 'grid.npz').stat().st_size:.0f} | "
            f"{'not reached' if hit is None else f'{hit:.1f} s'} | {iou32:.5f} | {iou16:.5f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
