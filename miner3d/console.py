"""What the command line prints: the progress bar of a fit and its closing summary."""

from __future__ import annotations

from typing import Any

from .memory import format_size


def size_versus(summary: dict[str, Any]) -> str:
    """The model's size against its reference, the right way round: ``13.4x the size of the
    bit-packed grid``, or ``1/4.2 of the raw samples``."""
    ratio = summary["compression_ratio"]  # reference / model
    what = summary["compared_with"]
    if ratio >= 1:
        return f"1/{ratio:.1f} of the {what}"
    return f"{1 / ratio:.1f}x the size of the {what}"


class FitProgress:
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
            status += quality_text(record)
            self.progress.update(task, completed=record["iteration"], status=status)
        elif event == "scale_end":
            quality = quality_text(record).strip()
            done = self.progress.tasks[task].completed or 1
            blocks = f"{record['mlp_blocks']}/{record['blocks']} MLPs"
            self.progress.update(task, total=done, completed=done, status=f"{blocks} {quality}")

    def close(self) -> None:
        if self.started:
            self.progress.stop()


def quality_text(record: dict[str, Any]) -> str:
    """A record's quality for the progress line: the full grid's (``IoU 0.99912``, ``41.20
    dB``), or a coarse scale's on its own grid (``own grid IoU 0.99512``); '' if none."""
    for prefix, label in (("", ""), ("level_", "own grid ")):
        if prefix + "iou" in record:
            return f" {label}IoU {record[prefix + 'iou']:.5f}"
        if prefix + "psnr" in record:
            return f" {label}{record[prefix + 'psnr']:.2f} dB"
    return ""


def describe_summary(summary: dict[str, Any]) -> list[str]:
    """The final summary as lines of text (for the CLI's table)."""
    lines = []
    metric = "iou" if "iou" in summary else "psnr"
    header = "IoU @0.5" if metric == "iou" else "PSNR dB"
    lines.append(f"{'scale':>5} {'blocks with MLP':>16} {header:>10}")
    for j in sorted(summary["scales"], key=int, reverse=True):
        m = summary["scales"][j]
        key = metric if metric in m else f"level_{metric}"
        value = f"{m[key]:.5f}" if metric == "iou" else f"{m[key]:.2f}"
        where = "" if key == metric else " (on the scale's own grid)"
        blocks = f"{summary['mlp_blocks'][j]}/{summary['blocks'][j]}"
        lines.append(f"{j:>5} {blocks:>16} {value:>10}{where}")
    lines.append(
        f"final IoU (threshold 0.5, full grid): {summary[metric]:.5f}"
        if metric == "iou"
        else f"final PSNR: {summary[metric]:.2f} dB"
        + (f", SSIM {summary['ssim']:.4f}" if summary.get("ssim") is not None else "")
    )
    lines.append(
        f"parameters {summary['params']:,} | model {format_size(summary['model_bytes'])} "
        f"({size_versus(summary)}) | fit {summary['seconds_fit']:.1f} s, total "
        f"{summary['seconds_total']:.1f} s | peak RSS {format_size(summary['peak_rss_bytes'])}"
    )
    if "seconds_setup" in summary:
        lines.append(
            f"stopped: {summary['stopped']} | set-up {summary['seconds_setup']:.1f} s, fitting "
            f"{summary['seconds_fitting']:.1f} s, measuring {summary['seconds_measuring']:.1f} s, "
            f"reading {summary['seconds_load']:.1f} s, outputs {summary['seconds_outputs']:.1f} s"
        )
    if summary.get("stop_detail"):
        lines.append(f"quality plateau: {summary['stop_detail']}")
    return lines


def describe_voxelize(mesh, output, grid, seconds: float) -> tuple[str, str]:
    """The line ``miner3d voxelize`` prints, and a warning or note for stderr ('' if none)."""
    from .memory import peak_rss

    shape = "x".join(map(str, grid.shape))
    line = (
        f"{mesh} -> {output}: {shape} voxels, {100 * grid.filled_fraction:.2f}% inside, "
        f"voxel {grid.transform.voxel_size:.6g} units, method {grid.meta['method']} "
        f"({grid.meta['seconds']:.2f} s), total {seconds:.2f} s, "
        f"peak RSS {format_size(peak_rss())}"
    )
    open_columns = sum(grid.meta.get("odd_columns", {}).values())
    note = ""
    if open_columns and grid.meta["method"] == "parity":
        note = (
            f"warning: {open_columns} columns crossed the surface an odd number of times "
            "(the mesh has holes) and were left empty; try --method robust"
        )
    elif grid.meta.get("open_bodies"):
        note = (
            f"note: {grid.meta['open_bodies']} of the mesh's {grid.meta['bodies']} bodies are "
            f"not closed; {grid.meta.get('winding_voxels', 0)} voxels were decided by the "
            "winding number, body by body"
        )
    elif open_columns:
        note = (
            f"note: the mesh is not closed ({open_columns} open columns); "
            f"{grid.meta.get('ambiguous_voxels', 0)} voxels were decided by the winding number"
        )
    return line, note
