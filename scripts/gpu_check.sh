#!/usr/bin/env bash
# One device run: the whole test suite on the GPU (KernelBench shapes included) and a timing table.
# Usage on the device machine: bash scripts/gpu_check.sh   (carry .whl: lark and black for its Python)
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
python3 -m pytest -q -rA -s -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | grep -vE "^(PASSED|\.)" | tail -n 60
python3 scripts/time_models.py 2>&1 | tee "$OUT/timing.txt"
python3 scripts/time_models.py --profile 2>&1 | tee "$OUT/profile.txt"
