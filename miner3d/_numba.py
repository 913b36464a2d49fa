"""numba, with its code generation set for this CPU before any of miner3d's kernels compile.

LLVM tunes the x86 CPUs that have AVX-512 (Intel's server cores since Skylake, AMD's since
Zen 4) to prefer 256-bit vectors, so numba's loops there run at half their vector width.
On such a CPU this asks for the host's features without that preference: the bank's sine
with its derivative ran 1.35x faster (195 -> 145 us a chunk on an Intel Xeon, 5th
generation; with the polynomial's products and sums contracted to FMAs, 92 us).

It applies only where numba's code generator has not started yet (``import numba`` alone
does not start it; the first ``njit`` does), and never where the user set
``NUMBA_CPU_FEATURES``; otherwise numba keeps its own choice, with the same results. Kernels
cached on disk are keyed by the features, so a change compiles them again once.
"""

from __future__ import annotations

import platform

import numba

WIDE = "-prefer-256-bit"


def _wide_vectors() -> None:
    if numba.config.CPU_FEATURES is not None or platform.machine() not in ("x86_64", "AMD64"):
        return
    from numba.core.codegen import get_host_cpu_features  # numba's own list (NUMBA_ENABLE_AVX)

    features = get_host_cpu_features()
    if "+avx512f" in features.split(","):
        numba.config.CPU_FEATURES = f"{features},{WIDE}"


_wide_vectors()

__all__ = ["numba"]
