"""Scaling on paper (issue 15): how a fit's real work would split over 2 to 256 ranks.

One single-process fit runs here, instrumented: for every block of every scale it records how
many iterations the block trained (a block leaves when it freezes), and it times the parts of
each scale's set-up that ranks share (streaming targets) apart from the part every rank
repeats (decoding the coarser scales' dense fields). From that real layout, for each world
size ``W``, with the trainer's partition (an even, contiguous share of each scale's live
blocks per rank):

* **balance**: max/mean over ranks of live blocks, and of block-iterations (the samples a
  rank pushes through its MLPs over the scale; every live block draws the same samples per
  iteration);
* **bytes exchanged** per scale, summed over ranks: the live block ids handed from the
  pruning shares to the training shares (8 bytes an id that changes rank, and the counts);
  the all-to-alls that bring each rank the coarser
  scales' blocks its pruning share and its training share read (their halo windows,
  :meth:`miner3d.sharding.RankBlocks.focus`: float32 parameters and an 8-byte id a block not
  its own); one all-reduce of five float64 a decision (counted at every iteration, an upper
  bound) and six per quality measurement; after scale 0, every block not rank 0's, to rank 0;
* **predicted speed-up** ``T(1) / T(W)``, with ``T(W) = sum over scales of [fitting x (max
  rank block-iterations / all block-iterations) + (shared set-up + measuring) / W +
  decoding the windows + iterations x latency x ceil(log2 W) + bytes / W / bandwidth]``
  plus rank 0's receipt of the whole model; decoding a window costs the measured seconds per
  MLP block of decoding that whole scale once, times the largest rank's window blocks (its
  pruning and its training windows); latency and bandwidth are arguments (defaults: this
  machine's measured gloo loopback all-reduce of 0.35 ms, and 1 GB/s).

``--image gen108`` plans the image preset's layout of a 108 MP RGB picture (12000 x 9000)
with every block live (a photo with detail everywhere keeps them all); it is not fitted here
(about 10 GB and an hour on two cores), so every block is taken to train every iteration and
no time is predicted.

    python scripts/plan_ranks.py --resolution 1024          # Lucy, fitted here first
    python scripts/plan_ranks.py --image gen108
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

import miner3d
from miner3d import train
from miner3d.distributed import split_even
from miner3d.metrics import time_to
from miner3d.model import MinerModel
from miner3d.scale import ScaleState
from miner3d.targets import Residuals
from miner3d.train import fit

ROOT = Path(__file__).resolve().parents[1]
WORLDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Recorder:
    """Per-block trained iterations and set-up times of one fit, by monkeypatching."""

    def __init__(self):
        self.iterations: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # scale -> ids, counts
        self.steps: dict[int, int] = {}
        self.shared: dict[int, float] = {}
        self.repeated: dict[int, float] = {}
        self.measuring: dict[int, float] = {}
        self.decode: dict[int, float] = {}  # scale k: seconds to decode its whole dense field
        recorder = self
        step, scale, field = ScaleState.step, Residuals.scale, MinerModel.residual_field
        live, measure = ScaleState.live_metrics, train.measure

        def counting_step(self, *args, **kwargs):
            if self.scale not in recorder.iterations:  # the first step: every live block
                ids = self.ids.cpu().numpy()
                recorder.iterations[self.scale] = (ids, np.zeros(len(ids)))
            recorder.iterations[self.scale][1][self.active.cpu().numpy()] += 1
            recorder.steps[self.scale] = recorder.steps.get(self.scale, 0) + 1
            return step(self, *args, **kwargs)

        def timed_scale(self, j, *args, **kwargs):
            before = recorder.repeated.get(j, 0.0)
            t = time.perf_counter()
            out = scale(self, j, *args, **kwargs)
            spent = time.perf_counter() - t - (recorder.repeated.get(j, 0.0) - before)
            recorder.shared[j] = recorder.shared.get(j, 0.0) + spent  # without decoding
            return out

        def timed_live(self, *args, **kwargs):
            t = time.perf_counter()
            out = live(self, *args, **kwargs)
            add(recorder.measuring, self.scale, time.perf_counter() - t)
            return out

        def timed_measure(blocks, source, j, *args, **kwargs):
            t = time.perf_counter()
            out = measure(blocks, source, j, *args, **kwargs)
            add(recorder.measuring, j, time.perf_counter() - t)
            return out

        def timed_field(self, k, *args, **kwargs):
            cold = k not in self._dense
            t = time.perf_counter()
            out = field(self, k, *args, **kwargs)
            if cold:  # decoded now: ranks decode windows of it instead (charged by scale k)
                add(recorder.repeated, k - 1, time.perf_counter() - t)
                add(recorder.decode, k, time.perf_counter() - t)
            return out

        ScaleState.step, Residuals.scale, MinerModel.residual_field = (
            counting_step,
            timed_scale,
            timed_field,
        )
        ScaleState.live_metrics, train.measure = timed_live, timed_measure


def add(table: dict[int, float], key: int, seconds: float) -> None:
    table[key] = table.get(key, 0.0) + seconds


def fitted_layout(args) -> tuple[dict, dict, dict]:
    """Fit Lucy here and return per-scale figures."""
    rec = Recorder()
    grid = miner3d.voxelize(args.mesh, args.resolution)
    run_config = miner3d.effective_config(args.mesh, overrides={"resolution": args.resolution})
    config = run_config.fit
    result = fit(grid.occupancy[None], config, kind="occupancy", device="cpu")
    times = {int(k): v for k, v in result.summary["scale_seconds"].items()}
    model = result.model
    scales = {}
    for j, (ids, work) in rec.iterations.items():
        other = rec.shared.get(j, 0.0) + rec.repeated.get(j, 0.0) + rec.measuring.get(j, 0.0)
        scales[j] = {
            "n_blocks": model.layout.n_blocks(j),
            "ids": ids,
            "work": work,
            "iterations": rec.steps[j],
            "fitting": max(0.0, times[j] - other),
            "shared": rec.shared.get(j, 0.0),
            "repeated": rec.repeated.get(j, 0.0),
            "measuring": rec.measuring.get(j, 0.0),
            "decode": rec.decode.get(j, 0.0),
        }
    figures = {
        "layout": model.layout,
        "params_per_block": model.bank_shape.params_per_block,
        "measurements": 1 + rec.steps.get(0, 0) // max(1, config.metric_every),
        "seconds": result.summary["seconds"],
        "what": f"Lucy {'x'.join(map(str, grid.shape))}, {run_config.preset} preset, fitted here "
        f"(final IoU {result.summary['iou']:.5f} at {result.summary['seconds']:.0f} s; IoU 0.999 "
        f"at {time_to(result.history, 'iou', (0.999,))['0.999']} s, instrumented)",
    }
    return scales, figures, result.summary


def image_layout(args) -> tuple[dict, dict, None]:
    """The image preset's layout of a 12000 x 9000 RGB picture: every block live."""
    config = miner3d.effective_config("x.png").fit
    from miner3d.bank import BankShape
    from miner3d.blocks import BlockLayout

    layout = BlockLayout((9000, 12000), config.block, config.n_scales)
    shape = BankShape(2, config.hidden, config.hidden_layers, 3, config.w0)
    scales = {}
    for j in range(config.n_scales):
        n = layout.n_blocks(j)
        iters = config.max_iters
        scales[j] = {
            "n_blocks": n,
            "ids": np.arange(n),
            "work": np.full(n, float(iters)),
            "iterations": iters,
            "fitting": None,
            "shared": None,
            "repeated": None,
            "measuring": None,
            "decode": None,
        }
    figures = {
        "layout": layout,
        "params_per_block": shape.params_per_block,
        "measurements": 1 + config.max_iters // max(1, config.metric_every),
        "seconds": None,
        "what": "a 12000 x 9000 RGB image (108 MP), image preset, every block live",
    }
    return scales, figures, None


def windows(layout, scales: dict, j: int, lo: int, hi: int, w: int, rank: int) -> dict:
    """For a run of blocks ``[lo, hi)`` of scale ``j`` on rank ``rank`` of ``w``: per coarser
    scale ``k``, the MLP blocks of its halo window, and how many of them are another rank's
    (what :meth:`miner3d.sharding.RankBlocks.focus` installs and fetches)."""
    out = {}
    for k, rows in layout.windows(j, lo, hi).items():
        if k == j or k not in scales:
            continue
        live = scales[k]["ids"]
        a, b = layout.ids_of_rows(k, rows)
        i0, i1 = np.searchsorted(live, a), np.searchsorted(live, b)
        own0, own1 = split_even(len(live), w, rank)
        mine = max(0, min(own1, i1) - max(own0, i0))
        out[k] = (int(i1 - i0), int(i1 - i0 - mine))
    return out


def plan(scales: dict, figures: dict, latency: float, bandwidth: float) -> None:
    ppb, layout = figures["params_per_block"], figures["layout"]
    per_block = ppb * 4 + 8  # float32 parameters and an int64 id
    print(f"# {figures['what']}; {platform.machine()}")
    print("\n| scale | W | live blocks max/mean | block-iterations max/mean | MB exchanged |")
    print("|---|---|---|---|---|")
    predicted = {}
    for w in WORLDS:
        total = 0.0
        for j in sorted(scales, reverse=True):
            s = scales[j]
            ids, work = s["ids"], s["work"]
            shares = [split_even(len(ids), w, r) for r in range(w)]
            blocks = np.array([b - a for a, b in shares], dtype=np.float64)
            load = np.array([work[a:b].sum() for a, b in shares])
            first = [split_even(s["n_blocks"], w, r) for r in range(w)]
            decoded = np.zeros(w)  # per rank: MLP blocks decoded, weighted by seconds each
            fetched = 0
            if w > 1:
                for r in range(w):
                    a, b = shares[r]
                    trained = (int(ids[a]), int(ids[b - 1]) + 1) if b > a else (0, 0)
                    runs = [first[r], trained]
                    for lo, hi in runs:
                        for k, (window, others) in windows(layout, scales, j, lo, hi, w, r).items():
                            fetched += others
                            rate = scales[k]["decode"] or 0.0
                            decoded[r] += window * rate / max(1, len(scales[k]["ids"]))
            if w == 1:
                exchanged = 0.0
            else:
                runs = [(np.searchsorted(ids, x), np.searchsorted(ids, y)) for x, y in first]
                pairs = zip(runs, shares, strict=True)
                stay = sum(max(0, min(b, e) - max(a, t)) for (a, b), (t, e) in pairs)
                gathered = 8 * (len(ids) - stay + w * w)  # ids that change rank, and counts
                reduced = (s["iterations"] * 5 + figures["measurements"] * 6) * 8
                exchanged = gathered + fetched * per_block + w * 2 * reduced
            balance_b = blocks.max() / blocks.mean() if blocks.mean() else 1.0
            balance_w = load.max() / load.mean() if load.mean() else 1.0
            if w in (2, 8, 64, 256):
                print(f"| {j} | {w} | {balance_b:.3f} | {balance_w:.3f} | {exchanged / 1e6:,.1f} |")
            if s["fitting"] is not None:
                total += (
                    s["fitting"] * (load.max() / load.sum())
                    + (s["shared"] + s["measuring"]) / w
                    + (s["repeated"] if w == 1 else float(decoded.max()))
                    + s["iterations"] * latency * math.ceil(math.log2(w))
                    + exchanged / w / bandwidth
                )
        final = 0.0  # rank 0 receives every block it did not train
        if w > 1:
            n_live = [len(s["ids"]) for s in scales.values()]
            final = sum(n - split_even(n, w, 0)[1] for n in n_live) * per_block
            if w in (2, 8, 64, 256):
                print(f"| end | {w} | | | {final / 1e6:,.1f} (the model, to rank 0) |")
        if figures["seconds"] is not None:
            predicted[w] = total + final / bandwidth
    if predicted:
        print(f"\n1 process measured: {figures['seconds']:.1f} s of fitting")
        print("\n| ranks | predicted fit s | speed-up |")
        print("|---|---|---|")
        for w, t in predicted.items():
            print(f"| {w} | {t:.1f} | {predicted[1] / t:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=str(ROOT / "meshes" / "lucy.ply"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--image", choices=["gen108"], help="plan a 108 MP image instead")
    parser.add_argument("--latency", type=float, default=0.35e-3, help="all-reduce seconds")
    parser.add_argument("--bandwidth", type=float, default=1e9, help="bytes/s per rank")
    args = parser.parse_args()
    torch.manual_seed(0)
    scales, figures, _ = image_layout(args) if args.image else fitted_layout(args)
    plan(scales, figures, args.latency, args.bandwidth)


if __name__ == "__main__":
    main()
