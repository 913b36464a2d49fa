"""Quality metrics: full-grid IoU of occupancy (threshold 0.5, and 0.4 as the official MINER
code reports), PSNR of images. Computed from per-block sums so they can be streamed block batch
by block batch and never need a dense float copy of the full grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

IOU_THRESHOLDS = (0.5, 0.4)


@dataclass
class MetricSums:
    """Running sums behind the metrics.

    Attributes:
        inter, union: per IoU threshold, voxel counts of (pred & gt) and (pred | gt).
        sse: sum of squared errors; count: number of samples times channels.
    """

    inter: list[int] = field(default_factory=lambda: [0] * len(IOU_THRESHOLDS))
    union: list[int] = field(default_factory=lambda: [0] * len(IOU_THRESHOLDS))
    sse: float = 0.0
    count: int = 0

    def add(self, other: MetricSums) -> MetricSums:
        return MetricSums(
            [a + b for a, b in zip(self.inter, other.inter, strict=True)],
            [a + b for a, b in zip(self.union, other.union, strict=True)],
            self.sse + other.sse,
            self.count + other.count,
        )

    def iou(self, threshold_index: int = 0) -> float:
        union = self.union[threshold_index]
        return self.inter[threshold_index] / union if union else 1.0

    @property
    def mse(self) -> float:
        return self.sse / self.count if self.count else 0.0

    @property
    def psnr(self) -> float:
        return psnr(self.mse)


def block_sums(
    values: torch.Tensor,
    truth: torch.Tensor,
    mask: torch.Tensor | None = None,
    iou: bool = True,
) -> MetricSums:
    """Metric sums of predicted ``values`` against ``truth``.

    Args:
        values: ``(n, C, *block)`` float predictions.
        truth: ``(n, C, *block)`` targets (binary for occupancy).
        mask: optional ``(n, *block)`` bool, the samples to count (unpadded region).
        iou: also count IoU (binary signals; thresholds :data:`IOU_THRESHOLDS`).
    """
    truth = truth.to(values.dtype)
    err2 = (values - truth).square()
    count = err2.numel()
    keep = None
    if mask is not None:  # multiply rather than index: no gathered copies
        keep = mask.unsqueeze(1)
        err2 = err2 * keep
        count = int(torch.count_nonzero(mask)) * values.shape[1]
    sums = MetricSums(sse=float(err2.sum(dtype=torch.float64)), count=count)
    if iou:
        gt = truth >= 0.5
        if keep is not None:
            gt &= keep
        for i, t in enumerate(IOU_THRESHOLDS):
            pred = values >= t
            if keep is not None:
                pred &= keep
            sums.inter[i] = int(torch.count_nonzero(pred & gt))
            sums.union[i] = int(torch.count_nonzero(pred | gt))
    return sums


def time_to(
    history: list[dict], metric: str, thresholds: tuple[float, ...]
) -> dict[str, float | None]:
    """Wall time of the first record whose ``metric`` (every such record is a full-resolution
    measurement of the model so far) reaches each threshold; ``None`` if none does."""
    return {
        str(t): next((r["time"] for r in history if r.get(metric, -math.inf) >= t), None)
        for t in thresholds
    }


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for signals in ``[0, peak]``."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def iou(pred, truth) -> float:
    """IoU of two boolean arrays (numpy or torch); 1.0 when both are empty."""
    inter = (pred & truth).sum()
    union = (pred | truth).sum()
    return float(inter) / float(union) if union else 1.0


def chamfer_fscore(
    a: np.ndarray, b: np.ndarray, threshold: float
) -> tuple[float, float, float, float]:
    """Chamfer distance and F-score between two point samples of surfaces.

    Args:
        a, b: ``(N, 3)`` and ``(M, 3)`` surface samples.
        threshold: distance under which a sample counts as matched (F-score).

    Returns:
        ``(chamfer, fscore, precision, recall)``: chamfer is the mean of the two directions'
        mean nearest-neighbour distances; precision is the fraction of ``a`` within
        ``threshold`` of ``b``, recall the fraction of ``b`` within it of ``a``.
    """
    from scipy.spatial import cKDTree

    d_ab = cKDTree(b).query(a, workers=-1)[0]
    d_ba = cKDTree(a).query(b, workers=-1)[0]
    chamfer = 0.5 * (float(d_ab.mean()) + float(d_ba.mean()))
    precision = float((d_ab < threshold).mean())
    recall = float((d_ba < threshold).mean())
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return chamfer, fscore, precision, recall
