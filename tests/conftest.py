"""Kernels run on the GPU when there is one, else under Triton's interpreter (set before triton loads)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # References in true fp32: cuDNN would otherwise run convolutions in TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter is slow and its speed varies: no deadlines, few but varied examples.
settings.register_profile(
    "fusegen", deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("fusegen")
