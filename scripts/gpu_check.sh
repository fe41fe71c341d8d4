#!/usr/bin/env bash
# Device runs: the whole test suite on the GPU (KernelBench shapes included), timing tables and `fusegen bench`.
# Usage on a GPU machine, from the repository root: bash scripts/gpu_check.sh [PART ...] (--help lists them).
# Where the machine's Python lacks lark and black, put their wheels in .whl/: they are installed first.
set -uo pipefail
usage="usage: bash scripts/gpu_check.sh [PART ...]   (default: tests timing bench)
parts:
  tests       the whole test suite on the GPU (KernelBench shapes included)
  tests-nets  its first half: tests/test_models.py, test_ops.py, test_training.py
  tests-rest  its second half: the other test files
  timing      eager against the generated ModelNew (scripts/time_models.py) and a per-kernel profile
  bench       fusegen bench of every spec at its batch, eval and training mode (no torch.compile), after
              compiling every spec's kernels twelve specs side by side (scripts/warm_specs.py)
Everything is printed and written to \$OUT (default /tmp/out): device.txt, pytest-*.log, timing.txt,
profile.txt, warm.txt, bench.txt, bench.json."
case "${1:-}" in
-h | --help) echo "$usage"; exit 0 ;;
esac
parts=${*:-tests timing bench}
for part in $parts; do
    case $part in
    tests | tests-nets | tests-rest | timing | bench) ;;
    *) echo "unknown part: $part" >&2; echo "$usage" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
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
        # every spec's kernels compiled first, twelve specs side by side; then eager and its CUDA graph
        # against fusegen (with and without a graph), then a per-kernel roofline
        python3 scripts/warm_specs.py specs/*.fuse 2>&1 | tee "$OUT/warm.txt"
        python3 -m fusegen bench specs/*.fuse --no-compile --mode eval train \
            --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" ;;
    esac
done
