"""Shared test helpers: compile a spec to a live module, randomise BatchNorm, compare with torch."""

from __future__ import annotations

import contextlib
import itertools
import linecache
import types

import torch

from fusegen import compile_spec
from fusegen.bench import randomize_batchnorm  # noqa: F401  (the tests' BatchNorm statistics too)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# fp32 kernels. On the GPU tl.dot rounds its operands to TF32 (like cuDNN: about 1e-4 on the whole nets,
# eager's own error), the bar is the 1e-3; the interpreter computes plain fp32.
TOLERANCE = 1e-3 if ON_GPU else 1e-5

_modules: dict[str, types.ModuleType] = {}
_files = itertools.count()


def load_spec(text: str, name: str = "test_spec") -> types.ModuleType:
    """Compiles spec text through the whole pipeline and imports the generated file (cached by text)."""
    if text not in _modules:
        _modules[text] = load_source(compile_spec(text, f"specs/{name}.fuse"), name)
    return _modules[text]


def load_source(source: str, name: str) -> types.ModuleType:
    """Imports generated source as a module."""
    filename = f"<fusegen {name} {next(_files)}>"
    # @triton.jit reads each kernel's source through inspect, which needs a file: register one.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    exec(compile(source, filename, "exec"), module.__dict__)
    module.SOURCE = source
    return module


@contextlib.contextmanager
def float16_activations(model: torch.nn.Module):
    """Inside, the plain-torch `model` rounds the output of every BatchNorm and activation to float16
    and back: the rounding that a spec's `activations(float16)` adds where a kernel stores its output
    (and a little more: also inside a fused pair, whose depthwise output stays in registers). The pool
    before the classifier stays float32, as in the kernels."""
    kinds = (torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.ReLU6)
    hooks = [
        m.register_forward_hook(lambda module, args, out: out.half().to(out.dtype))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
