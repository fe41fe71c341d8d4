"""Shared test helpers: compile a spec to a live module, randomise BatchNorm, compare with torch."""

from __future__ import annotations

import contextlib
import itertools
import linecache
import os
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


def training_bar(eager: torch.Tensor, exact: torch.Tensor) -> float:
    """The bar for a training-mode output against float64: TOLERANCE, or 3x fp32 torch's own error where that
    is larger (normalising by a small batch's spread amplifies fp32 rounding, in torch as in the kernels)."""
    return max(TOLERANCE, 3 * rel_error(eager, exact))


def assert_state_near_float64(new: dict, exact: dict, eager: dict, keys=None) -> None:
    """Each state_dict entry of `new` (those in `keys`, default all) against the float64 model's: rtol 1e-4
    and atol 1e-5, or 3x fp32 torch's (`eager`'s) own distance from float64 where that is larger."""
    for key, want in exact.items():
        if keys is None or key in keys:
            eager_off = (eager[key].double() - want.double()).abs().max().item()
            assert torch.allclose(new[key].double(), want.double(), rtol=1e-4, atol=max(1e-5, 3 * eager_off)), key


# Where the interpreter runs the kernels (the CPU), Triton's GPU compiler still runs: the launches of a
# forward are recorded, specialised by Triton's own binder and argument packing (signature, constexprs,
# divisibility, options, as at a real launch), and compiled for an sm_90 GPU in a child process without
# the interpreter (under it, triton.language's own functions are interpreted ones the compiler refuses).
# This catches the Triton compiler's failures on a kernel, as at conv_transpose's stride 3, in CPU CI.
GPU_TARGET = ("cuda", 90, 32)


@contextlib.contextmanager
def recorded_launches():
    """Inside, every kernel launch the interpreter runs is also appended to the yielded list as
    (python function, args, kwargs)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def gpu_compiled():
    """Off the GPU, the kernels launched inside are also compiled for one (compile_for_gpu) on leaving; on
    it, the launches compiled them already."""
    if ON_GPU:
        yield
        return
    with recorded_launches() as launches:
        yield
    compile_for_gpu(launches)


_compiled_for_gpu: set = set()  # (source, job) pairs compiled already in this process


def compile_for_gpu(launches) -> int:
    """Compiles each distinct recorded launch for GPU_TARGET, to the cubin, that this process has not
    compiled yet; returns how many it compiled. A Triton compiler failure fails with the compiler's
    message, positioned in the kernel's source."""
    import pickle
    import subprocess
    import sys

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget(*GPU_TARGET))
    jobs: dict[str, dict] = {}  # source file -> {key: job}
    for fn, args, kwargs in launches:
        kwargs = {**kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}  # as run()
        if kwargs.get("DOT_PRECISION") == "ieee":  # dot_precision's choice off the GPU; most convs get TF32 on it
            kwargs["DOT_PRECISION"] = "tf32"
        kernel = JITFunction(fn)  # for its parameters only: the child compiles
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        job = (fn.__name__, signature, constexprs, attrs, options.__dict__)
        filename = fn.__code__.co_filename
        key = "".join(linecache.getlines(filename)) + repr(job)
        if key not in _compiled_for_gpu:
            jobs.setdefault(filename, {})[key] = job
    if not jobs:
        return 0
    files = [(name, "".join(linecache.getlines(name)), list(file_jobs.values())) for name, file_jobs in jobs.items()]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, "-c", _COMPILE_IN_CHILD],
        input=pickle.dumps((GPU_TARGET, files)),
        capture_output=True,
        env=env,
        timeout=1200,
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")[-6000:]
    for file_jobs in jobs.values():
        _compiled_for_gpu.update(file_jobs)
    return sum(len(file_jobs) for file_jobs in jobs.values())


# The child: each source file executed under its own name (so that errors point into it), its kernels
# compiled with the parent's specialisations.
_COMPILE_IN_CHILD = """
import linecache, pickle, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as compile_kernel
target, files = pickle.load(sys.stdin.buffer)
for filename, source, jobs in files:
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"__name__": "generated"}
    exec(compile(source, filename, "exec"), scope)
    for name, signature, constexprs, attrs, options in jobs:
        compile_kernel(ASTSource(scope[name], signature, constexprs, attrs), target=GPUTarget(*target), options=options)
"""
