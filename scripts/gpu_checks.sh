#!/usr/bin/env bash
# Every GPU check of issues 14 and 15 in one command, for a machine with a CUDA GPU, Python
# and torch (numpy, scikit-image, safetensors, pyyaml and numba too, as on the device machine
# this project is sometimes lent), run from the repository's root. Results go to $OUT
# (default: gpu-checks/): the GPU tests, the bank's step throughput, Lucy 1024 to IoU 0.999
# (`bench_gpu.py`), and the distributed checks: a 1-rank torchrun fit against the single
# process, and 2 ranks on the one GPU with CUDA tensors over gloo; NCCL with 2 ranks where
# there are 2 GPUs. The checks go on after a failure; the last lines sum them up.
#
# trimesh (pure Python) is the only package such a machine may lack. Fetch it here first,
# into .whl/ (ignored by git; name it in the device tool's carry):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl trimesh
# then on the machine:  bash scripts/gpu_checks.sh
# DEVICE=cpu QUICK=1 bash scripts/gpu_checks.sh runs the same checks on a CPU, small (how the
# script itself is checked where there is no GPU).
set -uo pipefail
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/miner3d-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/miner3d-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
results=()
check() {  # check NAME COMMAND...: run, keep its output in $OUT/NAME.txt, note pass or fail
    local name=$1
    shift
    echo "== $name: $*"
    if "$@" 2>&1 | tee "$OUT/$name.txt"; then results+=("$name: ok"); else results+=("$name: FAILED"); fi
}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/gpus.txt"
gpus=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
runs=$(mktemp -d)
fit=(meshes/teapot.obj --resolution 64 --device "$DEVICE" --set fit.max_iters=150 --set fit.tail=0 -q)
if [ "${QUICK:-0}" = 1 ]; then
    bench=(--device "$DEVICE" --resolution 64 --preset cpu --cap 60)
    bank=(--device "$DEVICE" --blocks 0.05 --repeat 1)
else
    bench=(--device "$DEVICE" --cap 300)
    bank=(--device "$DEVICE")
fi
check test_gpu $PYTHON -m pytest -q -p no:cacheprovider tests/test_gpu.py
check bench_bank $PYTHON scripts/bench_bank.py "${bank[@]}"
check bench_gpu $PYTHON scripts/bench_gpu.py "${bench[@]}" --json "$OUT/bench_gpu.json"
check one_process $PYTHON -m miner3d fit "${fit[@]}" --threads 1 -o "$runs/one"
check torchrun_1 $PYTHON -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m miner3d fit "${fit[@]}" -o "$runs/r1"
check torchrun_2_gloo env MINER3D_DIST_BACKEND=gloo $PYTHON -m torch.distributed.run \
    --standalone --nproc_per_node 2 -m miner3d fit "${fit[@]}" -o "$runs/r2gloo"
if [ "$gpus" -ge 2 ]; then
    check torchrun_2_nccl $PYTHON -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m miner3d fit "${fit[@]}" -o "$runs/r2nccl"
fi
check compare $PYTHON - "$runs" <<'EOF'
"""Each run against the single process: one rank must give the same parameters; two ranks
the same quality (their parameters are reported: equal to float tolerance on a CPU, where a
block's kernels do not depend on its company; a GPU's batched kernels may)."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

runs = Path(sys.argv[1])
one = load_file(str(runs / "one" / "model.safetensors"))
iou = json.loads((runs / "one" / "summary.json").read_text())["iou"]
print(f"one process: IoU {iou:.5f}")
failed = False
for name in ("r1", "r2gloo", "r2nccl"):
    if not (runs / name / "model.safetensors").exists():
        continue
    other = load_file(str(runs / name / "model.safetensors"))
    summary = json.loads((runs / name / "summary.json").read_text())
    same = other.keys() == one.keys()
    worst = max(
        (float((one[k].double() - other[k].double()).abs().max()) for k in one if same), default=0
    )
    equal = same and worst <= 1e-5
    ok = abs(summary["iou"] - iou) <= 1e-4 and (equal or name != "r1")
    failed |= not ok
    print(f"{name}: world_size {summary['world_size']}, IoU {summary['iou']:.5f}, "
          f"largest parameter difference {worst:.2e} ({'equal' if equal else 'not equal'}): "
          f"{'ok' if ok else 'DIFFERS'}")
sys.exit(1 if failed else 0)
EOF
rm -rf "$runs"
printf '%s\n' "== summary" "${results[@]}" | tee "$OUT/summary.txt"
