"""`fusegen bench SPEC [...] --batch N [...] --mode eval train`: times a spec's ModelNew against eager
torch and torch.compile on the GPU, in eval mode and in training mode (KernelBench's: model.train() under
torch.no_grad()), then accounts for every generated kernel: time, bytes moved, FLOPs, and the share of
the floor that the machine's measured bandwidth and TF32 peak allow.

The accounting (recording launches, bytes, FLOPs, tables, the JSON report) is plain functions that
also run on the CPU under Triton's interpreter; only the functions that time things need CUDA.
"""

from __future__ import annotations

import copy
import itertools
import json
import linecache
import re
import math
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import triton
import triton.testing

from fusegen.errors import SpecError
from fusegen.ops import STATS_DOT_PRECISION, STATS_SPLIT_DOT_PRECISION, lookup
from fusegen.pipeline import compile_plan
from fusegen.plan import BranchStep, Launch, LoopStep

NO_GPU = (
    "fusegen bench: needs a CUDA GPU (torch.cuda.is_available() is False); without one the kernels only run "
    "under Triton's interpreter, which says nothing about speed. Run it on a GPU machine."
)
DEVICE = "cuda"  # tests swap in "cpu" to run the whole command with fake timings
SEED = 0
INPUTS_PER_BATCH = 4  # distinct inputs the model timings rotate through
FUSEGEN = "fusegen"
FUSEGEN_NO_GRAPH = "fusegen, no CUDA graph"


# -- the model, compiled in memory -----------------------------------------------------------------------


@dataclass
class SpecModel:
    """A spec compiled and imported in memory: nothing is written to generated/."""

    path: str
    name: str  # the spec's model name: "MobileNetV1"
    module: types.ModuleType  # the generated module
    example_input: tuple[int, ...]  # the spec's input(...) at the default constructor arguments
    launch_steps: list  # eval-mode steps of run_kernels (launches, views, loops, branches), in order
    train_launch_steps: list  # training mode's (run_training_kernels'; without BatchNorm, the eval ones)

    def steps(self, mode: str) -> list:
        return self.train_launch_steps if mode == "train" else self.launch_steps


def compile_model(spec_path: str, source: str) -> SpecModel:
    """Spec text -> the generated module, executed. Raises SpecError for a bad spec."""
    kernel_plan, text = compile_plan(source, spec_path)
    steps = list(kernel_plan.steps)
    train_steps = list(kernel_plan.train_steps or kernel_plan.steps)
    filename = f"<fusegen bench {spec_path}>"
    # @triton.jit reads each kernel's source through inspect, which needs a file: register one.
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    module = types.ModuleType(f"fusegen_bench_{Path(spec_path).stem}")
    exec(compile(text, filename, "exec"), module.__dict__)
    model = kernel_plan.model
    return SpecModel(spec_path, model.name, module, tuple(model.example_input), steps, train_steps)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from their defaults (variance kept positive), so
    the BatchNorm arithmetic is really exercised and errors are not flattered by identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)


def build_model(spec: SpecModel, seed: int = SEED, mode: str = "eval") -> nn.Module:
    """ModelNew at its default arguments, in `mode` ("eval" or "train"), with random BatchNorm statistics
    (on the CPU); the same parameters and statistics in either mode."""
    torch.manual_seed(seed)
    model = spec.module.ModelNew().train(mode == "train")
    randomize_batchnorm(model, seed)
    return model


def input_shape(spec: SpecModel, batch: int) -> tuple[int, ...]:
    return (batch, *spec.example_input[1:])


def model_mode(model: nn.Module) -> str:
    return "train" if model.training else "eval"


def rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative L2 error ||out - exact|| / ||exact||."""
    exact = exact.double()
    return ((out.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


# -- recording the kernel launches of one forward ---------------------------------------------------------


@dataclass
class KernelLaunch:
    """One call of a generated launch wrapper during a forward pass."""

    wrapper: str  # its name: the @triton.jit kernel's name without `_kernel`
    call: Callable  # the wrapper itself, to time the launch again
    # the activation first (in training mode then its per-tile statistics), then the nn.Modules whose
    # parameters the kernel reads
    args: tuple
    output: object  # what the wrapper returned
    comment: str = ""  # the spec chain it runs: "mobilenet_v1.fuse:17: conv_dw(c(32), c(64), 1)"
    ops: tuple[str, ...] = ()  # the fused ops' names, in chain order
    reads_module: tuple[bool, ...] = ()  # for each op: whether the wrapper takes an argument for it

    @property
    def inputs(self) -> list[torch.Tensor]:
        return _tensors(self.args)

    @property
    def modules(self) -> list[nn.Module]:
        return [a for a in self.args if isinstance(a, nn.Module)]

    @property
    def outputs(self) -> list[torch.Tensor]:
        return _tensors(self.output if isinstance(self.output, (tuple, list)) else (self.output,))

    def run(self):
        return self.call(*self.args)


def _tensors(items) -> list[torch.Tensor]:
    """The tensors among `items` and in the tuples among them: training mode's per-tile statistics, which
    a wrapper returns with its output and the next one takes after its activation, are such a tuple."""
    tensors = []
    for item in items:
        nested = item if isinstance(item, (tuple, list)) else (item,)
        tensors += [t for t in nested if isinstance(t, torch.Tensor)]
    return tensors


def launch_wrappers(namespace: dict) -> dict[str, Callable]:
    """The generated module's launch wrappers: `name` for each `@triton.jit` kernel `name_kernel`."""
    return {
        name.removesuffix("_kernel"): namespace[name.removesuffix("_kernel")]
        for name in namespace
        if name.endswith("_kernel") and callable(namespace.get(name.removesuffix("_kernel")))
    }


def record_launches(model: nn.Module, x: torch.Tensor) -> list[KernelLaunch]:
    """Runs model.run_kernels(x) once (in training mode that is run_training_kernels) with every launch
    wrapper replaced by a recorder; returns the launches in run order. run_kernels calls the wrappers by
    global name, so swapping the module's globals intercepts them; they are restored afterwards.
    A wrapper that another calls (training mode's batch_norm_batch_stats, from the wrapper whose prologue
    normalises with the statistics it merges) is part of that one's launch, as the plan counts them."""
    namespace = type(model).run_kernels.__globals__
    wrappers = launch_wrappers(namespace)
    launches: list[KernelLaunch] = []
    depth = 0  # wrappers running now

    def recorder(name: str, wrapper: Callable) -> Callable:
        def record(*args, **options):  # run_first_kernel passes out=None
            nonlocal depth
            depth += 1
            try:
                output = wrapper(*args, **options)
            finally:
                depth -= 1
            if depth == 0:
                launches.append(KernelLaunch(name, wrapper, args, output))
            return output

        return record

    try:
        namespace.update({name: recorder(name, wrapper) for name, wrapper in wrappers.items()})
        with torch.no_grad():
            model.run_kernels(x)
    finally:
        namespace.update(wrappers)
    return launches


def label_launches(launches: list[KernelLaunch], steps: list, model: nn.Module) -> list[KernelLaunch]:
    """Adds each launch's spec chain and fused ops from the plan's steps, followed as the model runs them: a
    loop once per child of its sequential module, a branch's body as the model's attribute decides."""
    position = 0

    def walk(items, names: dict) -> None:
        nonlocal position
        for step in items:
            if isinstance(step, LoopStep):
                for child in list(_resolve(step.modules, names))[step.start :]:
                    walk(step.body, {**names, step.variable: child})
            elif isinstance(step, BranchStep):
                walk(step.then if _resolve(step.attribute, names) else step.orelse, names)
            elif isinstance(step, Launch):
                if position >= len(launches) or launches[position].wrapper != step.kernel.name:
                    found = launches[position].wrapper if position < len(launches) else "nothing"
                    raise RuntimeError(f"run_kernels launched {found} where the plan lists {step.kernel.name}")
                launches[position].comment = step.comment
                launches[position].ops = tuple(f.op.name for f in step.kernel.ops)
                launches[position].reads_module = tuple(f.reads_module for f in step.kernel.ops)
                position += 1

    walk(steps, {"self": model})
    if position != len(launches):
        raise RuntimeError(f"run_kernels launched {len(launches)} kernels, the plan {position}")
    return launches


def _resolve(path: str, names: dict) -> nn.Module:
    """A module path of the plan ("layer3", "features[4]", "block.layer"): from the model, or a loop variable."""
    parts = re.findall(r"(\w+)|\[(\d+)\]", path)
    first = parts[0][0]
    module = names[first] if first in names else getattr(names["self"], first)
    for name, index in parts[1:]:
        module = module[int(index)] if index else getattr(module, name)
    return module


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    # BatchNorm's integer num_batches_tracked is a training counter that no kernel reads.
    return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]


def launch_bytes(launch: KernelLaunch) -> int:
    """Compulsory DRAM traffic: every input tensor and every floating parameter or buffer of the module
    arguments (conv and linear weights and biases; BatchNorm weight, bias, running_mean, running_var)
    read once, every output written once; in training mode the inputs and outputs include the per-tile
    statistics that feed the next BatchNorm. Halo re-reads and re-reads of weights are not counted, nor
    the per-channel batch mean and scale that training mode's batch_norm_batch_stats hands the kernel."""
    tensors = [*launch.inputs, *(t for m in launch.modules for t in _module_tensors(m)), *launch.outputs]
    return sum(t.numel() * t.element_size() for t in tensors)


# FLOPs per output element of ops that hold no parameters and so are only known by name.
ELEMENTWISE_FLOPS = {"relu": 1, "relu6": 2, "add": 1}  # a max; a max and a min; an add


def launch_flops(launch: KernelLaunch) -> int:
    """Arithmetic of one launch, a multiply-add counted as 2, each op at the pixels and channels where it
    runs (a 1x1 conv computed at a depthwise conv's taps at its own output pixels, once each: the floor
    counts the work, not its recomputation):

    - Conv2d: 2 * output elements * in_channels / groups * kh * kw
    - Linear: 2 * batch * in_features * out_features (the bias add is left out)
    - BatchNorm2d, folded into a scale and shift: 2 per element
    - AvgPool2d: 1 add per window element per output; global_avgpool: 1 add per input element
      (the one division per output is left out)
    - relu: 1 per element (a max), relu6: 2 (a max and a min), add: 1

    In a kernel that a pool ends, the conv and the ops after it count at the conv's pixels that the
    windows cover. Training mode's BatchNorm counts as in eval mode (normalising with a scale and shift);
    the per-tile statistics of its input and their merge into the batch mean and variance are left out.
    """
    x, out = launch.inputs[0], launch.outputs[0]
    # the wrapper's argument for each op that takes one (its module, or add's other operand), in chain order;
    # after x (and training mode's statistics), before the activation dtype
    arguments = iter(a for a in launch.args[1:] if not isinstance(a, (tuple, torch.dtype)))
    pool = next((m for m in launch.modules if isinstance(m, nn.AvgPool2d)), None)
    batch, channels, size = x.shape[0], x.shape[1], tuple(x.shape[2:])
    flops = 0
    for op, takes in zip(
        launch.ops, launch.reads_module or [lookup(op) is not None and lookup(op).needs_module for op in launch.ops]
    ):
        module = next(arguments) if takes else None
        pixels = batch * math.prod(size)
        if isinstance(module, nn.Conv2d):
            size = tuple(
                (s + 2 * p - k) // st + 1
                for s, k, st, p in zip(size, module.kernel_size, module.stride, module.padding)
            )
            if pool is not None:  # a pool ends this conv's kernel: only the pixels of whole windows are computed
                size = tuple(s // pool.kernel_size * pool.kernel_size for s in size)
            channels = module.out_channels
            flops += (
                2
                * batch
                * math.prod(size)
                * channels
                * (module.in_channels // module.groups)
                * math.prod(module.kernel_size)
            )
        elif isinstance(module, nn.Linear):
            channels = module.out_features
            flops += 2 * out.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d):
            flops += 2 * pixels * channels
        elif isinstance(module, nn.AvgPool2d):
            k = (
                module.kernel_size
                if isinstance(module.kernel_size, tuple)
                else (module.kernel_size, module.kernel_size)
            )
            flops += out.numel() * k[0] * k[1]
        elif op == "global_avgpool":
            flops += pixels * channels
        else:
            flops += ELEMENTWISE_FLOPS.get(op, 0) * pixels * channels
    return flops


def group_launches(launches: list[KernelLaunch]) -> list[tuple[KernelLaunch, int]]:
    """Identical launches (same wrapper, same shapes and strides, modules of the same configuration)
    as one entry with a count, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for launch in launches:
        key = (
            launch.wrapper,
            tuple((tuple(t.shape), t.stride()) for t in launch.inputs),
            tuple(repr(m) for m in launch.modules),
        )
        groups.setdefault(key, [launch, 0])[1] += 1
    return [(launch, count) for launch, count in groups.values()]


# -- accounting -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peaks:
    """What the machine reaches, measured: DRAM bandwidth and fp32 matmul throughput in TF32."""

    bandwidth_gb_per_s: float
    tf32_tflop_per_s: float


def floor_ms(nbytes: int, flops: int, peaks: Peaks) -> float:
    """The least time the work can take: moving its bytes at peak bandwidth or doing its FLOPs at TF32
    peak. Most of fusegen's convolutions run TF32 dots (operands rounded to nearest), so the peak applies to
    them as it is; a tf32x3 dot (classifiers, few-product convs, training mode) reaches a third of it."""
    return max(nbytes / peaks.bandwidth_gb_per_s / 1e6, flops / peaks.tf32_tflop_per_s / 1e9)


def kernel_rows(groups: list[tuple[KernelLaunch, int]], times_ms: list[float], peaks: Peaks) -> list[dict]:
    """One row per group of identical launches; ms and the rates are per launch."""
    rows = []
    for (launch, count), ms in zip(groups, times_ms, strict=True):
        nbytes, flops = launch_bytes(launch), launch_flops(launch)
        floor = floor_ms(nbytes, flops, peaks)
        rows.append(
            {
                "kernel": launch.wrapper,
                "count": count,
                "spec": launch.comment,
                "in_shape": list(launch.inputs[0].shape),
                "out_shape": list(launch.outputs[0].shape),
                "ms": ms,
                "bytes": nbytes,
                "flops": flops,
                "gb_per_s": nbytes / ms / 1e6,
                "tflop_per_s": flops / ms / 1e9,
                "floor_ms": floor,
                "floor_share": floor / ms,
            }
        )
    return rows


def kernel_totals(rows: list[dict], fusegen_ms: float | None) -> dict:
    """Sums over every launch of the forward, against fusegen's end-to-end time."""
    kernel_ms = sum(r["ms"] * r["count"] for r in rows)
    floor = sum(r["floor_ms"] * r["count"] for r in rows)
    return {
        "launches": sum(r["count"] for r in rows),
        "kernel_ms": kernel_ms,
        "fusegen_ms": fusegen_ms,
        "floor_ms": floor,
        "floor_share": floor / fusegen_ms if fusegen_ms else None,
    }


def add_speedups(configs: list[dict]) -> list[dict]:
    """speedup = the configuration's time / fusegen's: how many times faster fusegen is."""
    ours = next((c["ms"] for c in configs if c["config"] == FUSEGEN), None)
    for c in configs:
        c["speedup"] = c["ms"] / ours if c["ms"] and ours else None
    return configs


# -- tables ------------------------------------------------------------------------------------------------


def format_table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """Aligned plain text; columns are (header, "<" or ">")."""
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, (header, _) in enumerate(columns)]

    def line(cells) -> str:
        return "  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in zip(cells, columns, widths)).rstrip()

    return "\n".join([line([header for header, _ in columns]), *(line(row) for row in rows)])


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


MODE_NOTES = {
    "eval": "mode eval: model.eval(), BatchNorm with the running statistics (random, away from their defaults).",
    "train": (
        "mode train: model.train() under torch.no_grad(), as KernelBench times: BatchNorm with batch statistics. "
        "Every fusegen call updates the running buffers (the outputs do not read them); the torch "
        "configurations run reference_forward, which computes batch statistics but leaves the running buffers alone."
    ),
}


def model_table(runs: list[dict]) -> str:
    columns = [
        ("net", "<"),
        ("batch", ">"),
        ("mode", "<"),
        ("config", "<"),
        ("median ms", ">"),
        ("fusegen speedup", ">"),
        ("rel err", ">"),
    ]
    rows, failures = [], []
    for run in runs:
        for c in run["configs"]:
            ms = "failed" if c["failure"] else _num(c["ms"], ".3f")
            speedup = _num(c["speedup"], ".2f") + ("x" if c["speedup"] else "")
            error = _num(c["rel_error"], ".1e")
            rows.append([run["model"], str(run["batch"]), run["mode"], c["config"], ms, speedup, error])
            if c["failure"]:
                failures.append(f"  {run['model']} batch {run['batch']} {run['mode']} {c['config']}: {c['failure']}")
    notes = ["fusegen speedup: the configuration's median time / fusegen's (above 1: fusegen is faster)."]
    notes.append("rel err: ||y - y64|| / ||y64|| against reference_forward in float64 on the GPU, in the same mode.")
    notes.append(
        f"{FUSEGEN_NO_GRAPH}: model.use_cuda_graphs = False: the launch plan replayed (runtime.run_launch_plan)."
    )
    notes += [note for mode, note in MODE_NOTES.items() if any(run["mode"] == mode for run in runs)]
    slower = [
        f"{run['model']} batch {run['batch']} {run['mode']}"
        for run in runs
        for c in run["configs"]
        if c["config"] == "eager" and c["speedup"] is not None and c["speedup"] < 1
    ]
    notes.append(f"fusegen slower than eager: {', '.join(slower) or 'none'}")
    return "\n".join([format_table(columns, rows), *notes, *(["failed:", *failures] if failures else [])])


TRAIN_KERNEL_NOTE = (
    "a *_train row times two kernels: its wrapper first launches batch_norm_batch_stats, which merges the "
    "per-tile statistics of its input (stored by the kernel before) into the batch mean and scale and updates "
    "the running buffers (on every timing replay too), then the kernel that normalises with them."
)


def kernel_table(run: dict) -> str:
    columns = [("#", ">"), ("kernel", "<"), ("count", ">"), ("input -> output", "<"), ("ms", ">"), ("MB", ">")]
    columns += [("GB/s", ">"), ("TFLOP/s", ">"), ("floor %", ">"), ("spec", "<")]
    rows = []
    for i, r in enumerate(run["kernels"], 1):
        shapes = f"{'x'.join(map(str, r['in_shape']))} -> {'x'.join(map(str, r['out_shape']))}"
        rows.append(
            [
                str(i),
                r["kernel"],
                str(r["count"]),
                shapes,
                f"{r['ms']:.4f}",
                f"{r['bytes'] / 1e6:.2f}",
                f"{r['gb_per_s']:.0f}",
                f"{r['tflop_per_s']:.2f}",
                f"{100 * r['floor_share']:.0f}",
                r["spec"],
            ]
        )
    t = run["totals"]
    share = "-" if t["floor_share"] is None else f"{100 * t['floor_share']:.0f}%"
    return "\n".join(
        [
            (
                f"{run['model']} ({run['spec']}) batch {run['batch']}, {run['mode']} mode: per kernel "
                "(ms, rates and floor per launch)"
            ),
            format_table(columns, rows),
            (
                f"total: {t['launches']} launches, {t['kernel_ms']:.3f} ms summed one by one (L2 flushed before "
                f"each; in the forward, L2 carries activations between kernels), fusegen end to end "
                f"{_num(t['fusegen_ms'], '.3f')} ms; floor {t['floor_ms']:.3f} ms = {share} of end to end"
            ),
            *([TRAIN_KERNEL_NOTE] if any(r["kernel"].endswith("_train") for r in run["kernels"]) else []),
        ]
    )


def peaks_line(peaks: Peaks) -> str:
    return (
        f"measured peaks: {peaks.bandwidth_gb_per_s:.0f} GB/s (device-to-device copy of 1 GiB), "
        f"{peaks.tf32_tflop_per_s:.0f} TFLOP/s (8192x8192 fp32 matmul in TF32); "
        "floor = max(bytes / bandwidth, FLOPs / TF32 peak)"
    )


def build_report(env: dict, peaks: Peaks, runs: list[dict]) -> dict:
    """Everything measured, as JSON-ready plain data."""
    return {
        **env,
        "peaks": {"bandwidth_gb_per_s": peaks.bandwidth_gb_per_s, "tf32_tflop_per_s": peaks.tf32_tflop_per_s},
        "runs": runs,
    }


# -- timing (CUDA only) ----------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"fusegen bench: {message}", file=sys.stderr, flush=True)


def environment() -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        # The baselines run with torch's defaults, which this records.
        "tf32": {
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "fusegen tl.dot": (
                "tf32 rounded to nearest; tf32x3 in linear layers and in convs of few products per output; fp16 on "
                f"float16 activations; {STATS_DOT_PRECISION} in training mode where BatchNorm uses batch statistics"
                f" ({STATS_SPLIT_DOT_PRECISION} in KxK and transposed convs: the weight split on the host)"
            ),
        },
    }


def copy_bandwidth_gb_per_s() -> float:
    """DRAM bandwidth as a device-to-device copy of 1 GiB reaches it: bytes read plus bytes written."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def tf32_matmul_tflop_per_s(n: int = 8192) -> float:
    """fp32 matmul throughput with TF32 allowed (torch's flag restored afterwards)."""
    a, b = torch.rand(n, n, device="cuda"), torch.rand(n, n, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ms = triton.testing.do_bench(lambda: torch.matmul(a, b), return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / ms / 1e9


def measure_peaks() -> Peaks:
    progress("measuring peak bandwidth and TF32 throughput")
    peaks = Peaks(copy_bandwidth_gb_per_s(), tf32_matmul_tflop_per_s())
    torch.cuda.empty_cache()
    return peaks


def median_ms(fn: Callable, inputs: list[torch.Tensor]) -> float:
    """do_bench median (it flushes L2 before every rep), rotating through distinct inputs."""
    turns = itertools.cycle(inputs)
    return triton.testing.do_bench(lambda: fn(next(turns)), warmup=50, rep=300, return_mode="median")


def cuda_graph_of(fn: Callable, example: torch.Tensor) -> Callable:
    """fn captured as a CUDA graph: copy the input in, replay, return a copy of the output. (fusegen's
    forward reads its input where it lies and hands out its graph's own output where it can: about 4 + 4
    us at batch 10 on an H200, against this configuration's 0.6 ms or more.)"""
    static_x = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuDNN picks its algorithms outside the capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    return replay


def without_cuda_graphs(model: nn.Module) -> Callable:
    """model's forward with use_cuda_graphs off for the call (set back afterwards, for the other rows)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        model.use_cuda_graphs = False
        try:
            return model(x)
        finally:
            model.use_cuda_graphs = True

    return forward


def configurations(model: nn.Module, max_autotune: bool, torch_compile: bool = True) -> list[tuple[str, Callable]]:
    """(name, make) pairs; make(example input) returns the callable to time. Each runs the model in its
    mode: reference_forward and ModelNew read model.training."""
    configs = [
        ("eager", lambda x: model.reference_forward),
        ("eager + CUDA graph", lambda x: cuda_graph_of(model.reference_forward, x)),
    ]
    if torch_compile:
        configs += [
            ("torch.compile", lambda x: torch.compile(model.reference_forward)),
            ("torch.compile reduce-overhead", lambda x: torch.compile(model.reference_forward, mode="reduce-overhead")),
        ]
    if max_autotune:
        configs.append(
            ("torch.compile max-autotune", lambda x: torch.compile(model.reference_forward, mode="max-autotune"))
        )
    return configs + [(FUSEGEN, lambda x: model), (FUSEGEN_NO_GRAPH, lambda x: without_cuda_graphs(model))]


def measure_configuration(name: str, make: Callable, inputs: list[torch.Tensor], exact: torch.Tensor) -> dict:
    """Median ms and error of one configuration; a failure is reported in the result, not raised."""
    progress(f"  {name}: {'compiling, ' if 'compile' in name else ''}warming up")
    started = time.perf_counter()
    try:
        torch.compiler.reset()  # each torch.compile mode and batch compiles afresh, with static shapes
        fn = make(inputs[0])
        # reduce-overhead records its CUDA graph on a later call than the first, and fusegen captures a graph
        # per input address: every input warms up, so that no capture lands in do_bench's timed reps (a
        # 31 ms net gets nine of them, and SqueezeNet's captures there doubled its median)
        for _ in range(3):
            for x in inputs:
                fn(x)
        error = rel_error(fn(inputs[0]), exact)
        progress(f"  {name}: ready after {time.perf_counter() - started:.0f} s; timing")
        ms = median_ms(fn, inputs)
        progress(f"  {name}: {ms:.3f} ms, rel err {error:.1e}")
        return {"config": name, "ms": ms, "rel_error": error, "failure": None}
    except Exception as err:  # one failing baseline (a compiler error, say) must not lose the others
        traceback.print_exc()
        return {"config": name, "ms": None, "rel_error": None, "failure": f"{type(err).__name__}: {err}"}


def kernel_times_ms(groups: list[tuple[KernelLaunch, int]]) -> list[float]:
    """Each launch alone, L2 flushed before each rep: the wrapper called with the recorded arguments,
    captured once as a CUDA graph and replayed, so the time is the kernel's and not the wrapper's Python
    (which took longer than many batch-10 kernels, and so was what a direct call timed)."""
    times = []
    for launch, _ in groups:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the recording ran it already: compiled, weights' dot copies made
            launch.run()
        times.append(triton.testing.do_bench(graph.replay, return_mode="median"))
    return times


def bench_batch(
    spec: SpecModel,
    model: nn.Module,
    model64: nn.Module,
    batch: int,
    max_autotune: bool,
    peaks: Peaks,
    torch_compile: bool = True,
) -> dict:
    """Every configuration at one batch size, then the per-kernel profile, in the mode of model and of
    model64 (its float64 copy), which live on the device the run uses."""
    shape = input_shape(spec, batch)
    mode = model_mode(model)
    progress(f"{spec.name} batch {batch} ({'x'.join(map(str, shape))}), {mode} mode")
    device = next(model.parameters()).device
    torch.manual_seed(SEED + batch)
    inputs = [torch.rand(shape, device=device) for _ in range(INPUTS_PER_BATCH)]
    with torch.no_grad():
        exact = model64.reference_forward(inputs[0].double())
        configs = [
            measure_configuration(name, make, inputs, exact)
            for name, make in configurations(model, max_autotune, torch_compile)
        ]
        torch.compiler.reset()
        progress("  per kernel: recording one forward, timing each launch")
        launches = label_launches(record_launches(model, inputs[0]), spec.steps(mode), model)
        groups = group_launches(launches)
        kernels = kernel_rows(groups, kernel_times_ms(groups), peaks)
    del launches, groups
    configs = add_speedups(configs)
    fusegen_ms = next(c["ms"] for c in configs if c["config"] == FUSEGEN)
    return {
        "spec": spec.path,
        "model": spec.name,
        "batch": batch,
        "mode": mode,
        "input_shape": list(shape),
        "configs": configs,
        "kernels": kernels,
        "totals": kernel_totals(kernels, fusegen_ms),
    }


def main(
    spec_paths: list[str],
    batches: list[int] | None,
    max_autotune: bool,
    json_path: str | None,
    torch_compile: bool = True,
    modes: list[str] | None = None,
) -> int:
    specs: list[SpecModel] = []
    failed = False
    for path in spec_paths:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            print(f"{path}: error: cannot read spec: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
            failed = True
            continue
        try:
            specs.append(compile_model(path, source))
        except SpecError as err:
            print(err.render(path, source), file=sys.stderr)
            failed = True
    if failed:
        return 2
    if json_path and not Path(json_path).parent.is_dir():
        print(f"fusegen bench: cannot write {json_path}: no directory {Path(json_path).parent}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2

    runs = []
    saved = 0  # runs in the JSON file
    planned = len(specs) * len(modes or ["eval"]) * len(batches or [None])
    try:
        env = environment()
        peaks = measure_peaks()
        for spec in specs:
            # a model per mode, built afresh: training-mode calls move the running statistics that eval reads
            for mode in modes or ["eval"]:
                progress(f"{spec.path}: building {spec.name} in {mode} mode")
                cpu_model = build_model(spec, mode=mode)
                model64 = copy.deepcopy(cpu_model).double().to(DEVICE)  # before any forward: no graphs to copy
                model = cpu_model.to(DEVICE)
                for batch in batches or [spec.example_input[0]]:
                    runs.append(bench_batch(spec, model, model64, batch, max_autotune, peaks, torch_compile))
                    if json_path:  # after every run: a long bench that stops early keeps what it measured
                        write_report(json_path, build_report(env, peaks, runs))
                        saved = len(runs)
                del model, model64
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        if json_path:
            _partial(json_path).unlink(missing_ok=True)  # a write that the interrupt cut short
        progress(f"interrupted after {len(runs)} of {planned} runs" + (f"; {json_path} holds {saved}" if saved else ""))
        if runs:
            print_tables(env, peaks, runs)
        return 130

    print_tables(env, peaks, runs)
    if json_path:
        progress(f"wrote {json_path}")
    return 0


def write_report(json_path: str, report: dict) -> None:
    """The report as JSON, replacing the file whole: a reader never sees it half-written."""
    partial = _partial(json_path)
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(json_path)


def _partial(json_path: str) -> Path:
    return Path(json_path + ".partial")


def print_tables(env: dict, peaks: Peaks, runs: list[dict]) -> None:
    """The environment, every run's row in one table, then each run's per-kernel table."""
    tf32 = env["tf32"]
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}")
    print(
        "TF32: the torch baselines run with torch's defaults: "
        f"cudnn.allow_tf32={tf32['torch.backends.cudnn.allow_tf32']} (convolutions), "
        f"cuda.matmul.allow_tf32={tf32['torch.backends.cuda.matmul.allow_tf32']} (matmuls); "
        f"fusegen's tl.dot runs {tf32['fusegen tl.dot']}. fp32 input and output."
    )
    print("timing: triton.testing.do_bench medians, L2 flushed before every rep, inputs rotated")
    print(peaks_line(peaks))
    print()
    print(model_table(runs))
    for run in runs:
        print()
        print(kernel_table(run))
