"""Kernels run on the GPU when there is one, else under Triton's interpreter (set before triton loads)."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        import dataclasses

        from triton.runtime import interpreter

        # The interpreter builds an overflow check for every int32 add and mul (a cast to int64, two compares)
        # and then drops it, since its assert needs debug mode: half of the suite's time, for nothing.
        builder = interpreter.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
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


@pytest.fixture(autouse=bool(os.environ.get("FUSEGEN_GPU_COMPILE")))
def every_kernel_compiled_for_a_gpu():
    """FUSEGEN_GPU_COMPILE=1 (off the GPU): every test's kernels are also compiled for an sm_90 GPU, as
    helpers.gpu_compiled does for the tests that always use it. Slow, so not CI's default."""
    from helpers import gpu_compiled

    with gpu_compiled():
        yield
