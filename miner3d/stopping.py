"""When the trainer measures quality, and the finest scale's quality plateau (no long tails).

Both read only what every rank holds alike (the iteration, the history logged at the ranks'
common clock), so every rank takes the same decision at the same iteration, and a resumed
fit (whose history is restored) takes the one the uninterrupted fit would have.
"""

from __future__ import annotations

from typing import Any

from .kinds import Kind


def measure_now(j: int, it: int, every: int) -> bool:
    """Whether iteration ``it`` of scale ``j`` measures quality: every ``every`` iterations
    at the finest scale (its target and plateau rules read them); at ``every`` times a power
    of two at a coarser scale (a curve on a log axis at a few tenths of a second each)."""
    if it % every:
        return False
    return j == 0 or (it // every) & (it // every - 1) == 0


def prefixed_fields(fields: dict[str, float], prefix: str) -> dict[str, float]:
    """``fields`` with ``prefix`` before every key (``level_`` for a coarse scale's)."""
    return {prefix + k: v for k, v in fields.items()}


def quality_plateau(history: list[dict[str, Any]], kind: Kind, tail: float, now: float) -> str:
    """The finest scale's quality rule: its latest exact measurement, rounded to
    ``kind.metric_step`` (IoU: 4 digits), is no better than one taken at or before
    ``(now + interval) / tail`` seconds (``interval``: since the previous measurement), so
    the fit stops at the last measurement before ``tail`` times the time it first reached
    its final rounded quality. Returns what it saw when the scale must end, else ''.

    Args:
        history: the fit's records; the finest scale's iteration records with ``kind.metric``
            (exact full-grid measurements, at the ranks' common clock) are read.
        kind: the signal's kind (its headline metric and step).
        tail: ``FitConfig.tail`` (0: never).
        now: the trainer's clock at the latest measurement.
    """
    metric, step = kind.metric, kind.metric_step
    if not tail:
        return ""
    finest = [
        (r["time"], round(r[metric] / step))
        for r in history
        if r.get("event") == "iteration" and r.get("scale") == 0 and metric in r
    ]
    if len(finest) < 2:
        return ""
    t_last, last = finest[-1]
    interval = t_last - finest[-2][0]  # the next measurement would come this much later
    early = [q for t, q in finest[:-1] if t <= (now + interval) / tail]
    if not early or last > max(early):
        return ""
    first = next(t for t, q in finest if q >= last)
    return (
        f"{metric} {last * step:.6g} (rounded to {step:g}) first reached at {first:.1f} s; "
        f"no better at {t_last:.1f} s"
    )
