#!/usr/bin/env bash
# Device runs: the whole test suite on the GPU (KernelBench shapes included), timing tables and `fusegen bench`.
# Usage on the device machine: bash scripts/gpu_check.sh [tests | tests-nets tests-rest] [timing] [bench]
# (default: tests timing bench; carry .whl: lark and black for its Python).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
parts=${*:-tests timing bench}
for part in $parts; do
    case $part in
    tests | tests-nets | tests-rest)
        # the whole suite outgrew one 10-minute device command on a fresh machine (session 5: cut at
        # 600 s); tests-nets (whole nets, ops, training) and tests-rest split it in two
        case $part in
        tests) files=tests ;;
        tests-nets) files="tests/test_models.py tests/test_ops.py tests/test_training.py" ;;
        *) files=$(ls tests/test_*.py | grep -vE "test_(models|ops|training)\.py") ;;
        esac
        # shellcheck disable=SC2086
        python3 -m pytest -q -rA -s -p no:cacheprovider $files 2>&1 | tee "$OUT/pytest-$part.log" | grep -vE "^(PASSED|\.)" | tail -n 60 ;;
    timing)
        python3 scripts/time_models.py 2>&1 | tee "$OUT/timing.txt"
        python3 scripts/time_models.py --profile 2>&1 | tee "$OUT/profile.txt" ;;
    bench)
        # eager, CUDA graph and torch.compile against fusegen, then a per-kernel roofline (minutes: it compiles)
        python3 -m fusegen bench specs/mobilenet_v1.fuse specs/efficientnet_b1.fuse --batch 10 128 \
            --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" ;;
    *) echo "unknown part: $part (tests, tests-nets, tests-rest, timing, bench)"; exit 2 ;;
    esac
done
