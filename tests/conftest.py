from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

MESHES = Path(__file__).resolve().parent.parent / "meshes"


@pytest.fixture(scope="session")
def meshes_dir() -> Path:
    return MESHES


def solid_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean solids (1.0 only if identical; an empty grid scores 0)."""
    a = a.astype(bool)
    b = b.astype(bool)
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0
