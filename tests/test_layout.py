"""The shape of the package: small modules (the layer contract itself is checked by
`make lint` with lint-imports, see pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import miner3d

PACKAGE = Path(miner3d.__file__).parent


def test_no_module_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert sizes and max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


def test_import_miner3d_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, miner3d; miner3d.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
