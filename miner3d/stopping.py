"""When the trainer measures quality, when ranks meet, and the finest scale's quality plateau.

All read only what every rank holds alike (the iteration, the history logged at the ranks'
common clock), so every rank takes the same decision at the same iteration, and a resumed
fit (whose history is restored) takes the one the uninterrupted fit would have.
"""

from __future__ import annotations

from typing import Any

from .config import FitConfig
from .kinds import Kind


def measure_now(j: int, it: int, every: int) -> bool:
    """Whether iteration ``it`` of scale ``j`` measures quality. At the finest scale every
    ``every`` iterations up to ``4 * every``, then with gaps that double as the iterations
    do (every 2 ``every`` up to 8 ``every``, every 4 ``every`` up to 16 ``every``, ...): a
    long fit's measurements cost a bounded share of its time, and its target and plateau
    rules still see a measurement within a third of the iterations so far. At a coarser
    scale at ``every`` times a power of four (a curve on a log axis: since the fused CPU
    passes made the iterations 1.5-2x faster, powers of two made the coarse scales' own-grid
    measurements 5 % of Lucy 1024's fit, BENCHMARKS.md)."""
    if it % every:
        return False
    if j > 0:  # every times a power of four
        k = it // every
        return k & (k - 1) == 0 and k.bit_length() % 2 == 1
    gap = every * 2 ** max(0, (it // (2 * every)).bit_length() - 1)
    return it % gap == 0


def next_measurement(it: int, every: int) -> int:
    """The finest scale's first measuring iteration after ``it`` (:func:`measure_now`)."""
    k = it + 1
    while not measure_now(0, k, every):
        k += 1
    return k


LOG_EVERY = 50
"""Iterations between the trainer's logged iteration records (besides measurements)."""


def decide_now(it: int, config: FitConfig, ranks: bool, measuring: bool, every: int) -> bool:
    """Whether iteration ``it`` takes the decisions every rank must agree on, through one
    all-reduce (the loss, the live blocks, a stop request, a checkpoint due, the time
    limit): at every iteration of a single process; with several ranks only where one can
    change or is needed: freezing (every ``freeze_every``), the loss plateau's window, a
    measurement (``measuring``), a checkpoint every ``every`` iterations (0: none), a
    logged iteration, the first and the last. The ranks then meet about every
    ``freeze_every`` iterations instead of at each (an all-reduce costs 0.35 to 0.9 ms on
    loopback, an iteration of a small fit about 1 ms); a stop request or the time limit is
    acted on at the next such iteration."""
    c = config
    return (
        not ranks
        or measuring
        or it in (1, c.max_iters)
        or it % c.freeze_every == 0
        or it % c.plateau_window == 0
        or it % LOG_EVERY == 0
        or (bool(every) and it % every == 0)
    )


def quality_plateau(history: list[dict[str, Any]], kind: Kind, tail: float, upcoming: int) -> str:
    """The finest scale's quality rule: its latest exact measurement (at ``now`` seconds),
    rounded to ``kind.metric_step`` (IoU: 4 digits), is no better than one taken at or before
    ``(now + wait) / tail`` seconds, ``wait`` being the time to the next measurement
    (iteration ``upcoming``, at the pace of the last two measurements), so the fit stops at
    the last measurement before ``tail`` times the time it first reached its final rounded
    quality. Returns what it saw when the scale must end, else ''.

    Args:
        history: the fit's records; the finest scale's iteration records with ``kind.metric``
            (exact full-grid measurements, at the ranks' common clock) are read.
        kind: the signal's kind (its headline metric and step).
        tail: ``FitConfig.tail`` (0: never).
        upcoming: the iteration of the next measurement (:func:`next_measurement`).
    """
    metric, step = kind.metric, kind.metric_step
    if not tail:
        return ""
    finest = [
        (r["time"], r["iteration"], round(r[metric] / step))
        for r in history
        if r.get("event") == "iteration" and r.get("scale") == 0 and metric in r
    ]
    if len(finest) < 2:
        return ""
    (t_prev, it_prev, _), (now, it_last, last) = finest[-2], finest[-1]
    wait = (now - t_prev) / max(1, it_last - it_prev) * (upcoming - it_last)
    early = [q for t, _, q in finest[:-1] if t <= (now + wait) / tail]
    if not early or last > max(early):
        return ""
    first = next(t for t, _, q in finest if q >= last)
    return (
        f"{metric} {last * step:.6g} (rounded to {step:g}) first reached at {first:.1f} s; "
        f"no better at {now:.1f} s"
    )
