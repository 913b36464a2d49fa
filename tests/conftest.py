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


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """A user error: non-zero status, exactly one line on stderr naming ``needle``, no
    traceback."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("miner3d: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def cli(capsys):
    """Run the ``miner3d`` command in this process: ``cli("fit", path, ...)`` ->
    ``(exit status, stdout, stderr)``."""
    from miner3d.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def expect_error():
    """:func:`assert_one_line_error`."""
    return assert_one_line_error


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
