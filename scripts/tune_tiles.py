"""Sweeps tile sizes, warps and stages of the generated kernels at the layer shapes of MobileNetV1 and
EfficientNetB1 (GPU) and prints, per layer, its time at the tile that the generated rule picks (gemm_tile,
dwconv_tile, conv_tile, linear_tile in generated/mobilenet_v1.py) and at the best tile found, with the
runner-ups. Only configs whose pipelined tiles fit an RTX 4090's 99 KB of shared memory per block are
tried. docs/performance.md says which sweeps decided each rule.

Default: the 1x1 convs (16 layer shapes). `--dw`: the depthwise convs; `--stem`: the first conv (3x3, 3 ->
32, stride 2) at both nets' input sizes, from the model's NCHW input as generated and from a channels-last
copy; `--linear`: the classifier's tiles and slices of K; `--late`: the late layers' GEMMs (latency-bound
at batch 10) over small tiles; `--rounding`: each GEMM at its generated tile under every precision variant
of time_models.PRECISIONS. `--fp16` feeds float16 activations and stores float16, as the specs'
`activations(float16)` runs them, with float16 weights and "fp16" dots in the GEMMs. `--graph` times
through a CUDA graph (do_bench_cudagraph: back to back, L2 not flushed) as the generated ModelNew runs
them; at batch 10 do_bench's launch overhead swamps the kernels. `--dw-unrolled` times the depthwise
kernel with its loop over kernel rows unrolled, as it was generated until session 8.
Usage: python3 scripts/tune_tiles.py [--dw | --stem | --linear | --late | --rounding] [--batch N] [--fp16]
[--precision P] [--graph] [--warm K/N] [--dw-unrolled]
"""

import argparse
import itertools
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
import triton
import triton.testing

# this script's folder is on sys.path
from time_models import PRECISIONS, ROOT, add_warm_argument, load, load_source, warm_shard

# (C_in, C_out, H) of the 1x1 convs: MobileNetV1's, then EfficientNetB1's expand and project convs
GEMMS = [
    (32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28), (256, 512, 14), (512, 512, 14),
    (512, 1024, 7), (1024, 1024, 7),
    (16, 96, 120), (24, 144, 60), (40, 240, 30), (80, 480, 15), (192, 1152, 8), (96, 24, 60), (1152, 320, 8),
]  # fmt: skip
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), timed after the generated tile
CONFIGS = [
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 32, 4, 3),
    (128, 64, 64, 4, 2), (64, 64, 64, 4, 3), (128, 256, 32, 8, 2), (256, 64, 32, 8, 2), (64, 32, 64, 4, 3),
    (32, 64, 64, 4, 3), (32, 32, 64, 4, 3),
]  # fmt: skip
# float16 operands: half the bytes per K step, so longer K steps and deeper pipelines fit
FP16_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4), (128, 256, 64, 8, 2), (64, 64, 128, 4, 3), (128, 64, 128, 4, 2),
]  # fmt: skip
# the late layers' GEMMs, and small tiles for when they run under a wave of programs (batch 10)
LATE_GEMMS = [
    (128, 128, 56), (128, 256, 28), (256, 256, 28), (256, 512, 14), (512, 512, 14), (512, 1024, 7), (1024, 1024, 7),
    (40, 240, 30), (240, 80, 15), (80, 480, 15), (480, 112, 15), (112, 672, 15), (672, 192, 8), (192, 1152, 8),
    (1152, 320, 8), (320, 1280, 8),
]  # fmt: skip
LATE_CONFIGS = [
    (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (64, 32, 64, 4, 3), (32, 64, 64, 4, 3), (32, 32, 64, 4, 3),
    (32, 32, 128, 4, 3), (32, 64, 128, 4, 2), (64, 32, 128, 4, 2), (32, 128, 64, 4, 3), (64, 128, 32, 4, 3),
    (32, 32, 64, 2, 3), (32, 64, 64, 2, 4), (16, 64, 128, 4, 2), (16, 32, 128, 2, 3),
]  # fmt: skip
# (C_in, C_out) of the classifiers
LINEARS = [(1024, 1000), (1280, 1000)]
# (BLOCK_N, BLOCK_K, K_SLICE) of the classifier's split K
LINEAR_CONFIGS = [(bn, bk, bk * steps) for bn in (16, 32, 64) for bk in (32, 64, 128) for steps in (1, 2, 4)]
SMEM_LIMIT = 99 * 1024
# (C, H_in, stride) of the depthwise convs, and (BLOCK_M, BLOCK_N, num_warps) to try after the generated tile
DWS = [(32, 112, 1), (64, 112, 2), (128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1), (96, 120, 2), (144, 60, 2),
       (480, 15, 1), (1152, 8, 1)]  # fmt: skip
DW_CONFIGS = [(64, 64, 4), (32, 32, 2), (64, 32, 2), (32, 64, 4), (128, 32, 4), (128, 64, 4), (64, 128, 4),
              (128, 128, 8)]  # fmt: skip
# float16 halves the bytes of a channel run: wider channel blocks, and warps for them
FP16_DW_CONFIGS = [
    (32, 128, 4), (16, 128, 2), (32, 64, 2), (64, 64, 8), (64, 128, 8), (32, 128, 8), (16, 64, 2), (64, 32, 4),
    (16, 64, 1), (8, 64, 1), (16, 32, 1), (8, 128, 2), (32, 64, 1), (16, 128, 4), (8, 64, 2),
]  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    """How this run times: the command line's options, and the generated module whose kernels it launches."""

    batch: int
    graph: bool
    fp16: bool
    precision: str  # the GEMMs' tl.dot precision
    warm: Callable[[], bool] | None  # warm_shard's function
    module: ModuleType

    @property
    def activations(self) -> torch.dtype:
        return torch.float16 if self.fp16 else torch.float32

    def bench(self, run) -> float:
        if self.warm:
            if self.warm():
                run()
            return float("inf")
        if self.graph:
            run()  # compiled before capture
            return triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def report(label, time_config, configs, rate, runner_ups=3):
    """Times time_config(*config) for each config (the first is the default), prints the default, the
    best with its rate (`rate(ms)`, e.g. "3068 GB/s") and the runner-ups; returns (default ms, best ms)."""
    results = [(time_config(*config), config) for config in configs]
    default = results[0][0]
    results.sort()
    best, config = results[0]
    print(
        f"{label}: default {default:.4f} ms; best {best:.4f} ms {config} ({rate(best)});"
        f" next {[(round(t, 4), c) for t, c in results[1 : 1 + runner_ups]]}"
    )
    return default, best


def batch_norm_tensors(c):
    """weight, bias, running_mean, running_var of a BatchNorm over c channels (variance > 0)."""
    return [torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda"),
            torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5]  # fmt: skip


def fits(sweep, bm, bn, bk, stages):
    return (bm * bk + bk * bn) * (2 if sweep.fp16 else 4) * stages <= SMEM_LIMIT


def time_gemm(sweep, c_in, c_out, h, bm, bn, bk, warps, stages, module=None, precision=None):
    module, precision = module or sweep.module, precision or sweep.precision
    batch, activations = sweep.batch, sweep.activations
    x = torch.rand(batch, c_in, h, h, device="cuda", dtype=activations).to(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 1, 1, device="cuda", dtype=torch.float16 if precision == "fp16" else torch.float32)
    bn_args = batch_norm_tensors(c_out)
    out = torch.empty(batch, c_out, h, h, device="cuda", dtype=activations).to(memory_format=torch.channels_last)
    grid = (triton.cdiv(batch * h * h, bm) * triton.cdiv(c_out, bn),)

    def run():
        module.conv1x1_bn_relu_kernel[grid](
            x, w, *bn_args, out, batch, h, h, h, h, 1e-5, C_in=c_in, C_out=c_out, STRIDE=1,
            DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LAUNCH_PDL=False, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    return sweep.bench(run)


def time_dw(sweep, c, h, stride, bm, bn, warps):
    batch, activations = sweep.batch, sweep.activations
    x = torch.rand(batch, c, h, h, device="cuda", dtype=activations).to(memory_format=torch.channels_last)
    w = torch.randn(c, 1, 3, 3, device="cuda")
    oh = (h - 1) // stride + 1
    bn_args = batch_norm_tensors(c)
    out = torch.empty(batch, c, oh, oh, device="cuda", dtype=activations).to(memory_format=torch.channels_last)
    grid = (triton.cdiv(batch * oh * oh, bm) * triton.cdiv(c, bn),)

    def run():
        sweep.module.dwconv3x3_bn_relu_kernel[grid](
            x, w, *bn_args, out, batch, h, h, oh, oh, w.stride(0), w.stride(2), w.stride(3), 1e-5,
            C_in=c, C_out=c, KH=3, KW=3, STRIDE=stride, PAD=1, BLOCK_M=bm, BLOCK_N=bn, LAUNCH_PDL=False,
            num_warps=warps,
        )  # fmt: skip

    return sweep.bench(run)


# (H_in, C_out) of the stem convs, and (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) to try; the
# first is the default
STEMS = [(224, 32), (240, 32)]
STEM_CONFIGS = [(64, 32, 32, 4, 3)] + [
    (bm, 32, 32, warps, stages) for bm in (32, 64, 128, 256) for warps in (2, 4, 8) for stages in (1, 2)
]


def time_stem(sweep, h, c_out, layout, bm, bn, bk, warps, stages):
    batch = sweep.batch
    x = torch.rand(batch, 3, h, h, device="cuda").to(memory_format=layout)
    w = torch.randn(c_out, 3, 3, 3, device="cuda")
    oh = (h - 1) // 2 + 1
    bn_args = batch_norm_tensors(c_out)
    out = torch.empty(batch, c_out, oh, oh, device="cuda").to(memory_format=torch.channels_last)
    grid = (triton.cdiv(batch * oh * oh, bm) * triton.cdiv(c_out, bn),)

    def run():
        sweep.module.conv3x3_bn_relu_kernel[grid](
            x, w, *bn_args, out, batch, h, h, oh, oh, *x.stride(), *w.stride(), 1e-5, C_in=3, C_out=c_out, KH=3, KW=3,
            STRIDE=2, PAD=1, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LAUNCH_PDL=False,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return sweep.bench(run)


def sweep_stem(sweep):
    for (h, c_out), layout in itertools.product(STEMS, (torch.contiguous_format, torch.channels_last)):
        oh = (h - 1) // 2 + 1
        report(
            f"conv3x3 3->{c_out} @{h}/s2 from {str(layout).split('.')[-1]}",
            lambda *config: time_stem(sweep, h, c_out, layout, *config),
            STEM_CONFIGS,
            lambda ms: f"{4 * sweep.batch * (3 * h * h + c_out * oh * oh) / ms / 1e6:.0f} GB/s",
            runner_ups=5,
        )


def time_linear(sweep, c_in, c_out, bm, bn, bk, k_slice):
    """The classifier as generated: the partial sums of each slice of K, then their sum with the bias."""
    batch = sweep.batch
    x = torch.rand(batch, c_in, device="cuda")
    w = torch.randn(c_out, c_in, device="cuda")
    bias = torch.randn(c_out, device="cuda")
    out = torch.empty(batch, c_out, device="cuda")
    split_k = triton.cdiv(c_in, k_slice)
    partial = torch.empty(split_k, batch, c_out, device="cuda")
    tiles = triton.cdiv(batch, bm) * triton.cdiv(c_out, bn)

    def run():
        sweep.module.linear_slices_kernel[(tiles, split_k)](
            x, w, partial, batch, C_in=c_in, C_out=c_out, DOT_PRECISION="bf16x3", BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, K_SLICE=k_slice, LAUNCH_PDL=False,
        )  # fmt: skip
        sweep.module.linear_kernel[(tiles,)](
            bias, partial, out, batch, C_out=c_out, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split_k, LAUNCH_PDL=False,
        )  # fmt: skip

    return sweep.bench(run)


def sweep_linear(sweep):
    """(BLOCK_M, BLOCK_N, BLOCK_K, K_SLICE), linear_tile's first; K_SLICE = C_in: K not split."""
    batch = sweep.batch
    for c_in, c_out in LINEARS:
        bm = min(32, max(16, triton.next_power_of_2(batch)))
        configs = [(bm, bn, bk, ks) for bn, bk, ks in LINEAR_CONFIGS if ks <= c_in]
        configs += [(bm, bn, bk, triton.cdiv(c_in, bk) * bk) for bn in (16, 32) for bk in (64, 128)]
        report(
            f"linear {c_in}->{c_out}",
            lambda *config: time_linear(sweep, c_in, c_out, *config),
            generated_first(sweep.module.linear_tile(batch, c_in, c_out), configs),
            lambda ms: f"{2 * batch * c_in * c_out / ms / 1e9:.1f} TFLOP/s",
            runner_ups=5,
        )


def generated_first(generated, configs):
    return [generated, *(config for config in configs if config != generated)]


def sweep_dw(sweep):
    total_default = total_best = 0.0
    configs = DW_CONFIGS + (FP16_DW_CONFIGS if sweep.fp16 else [])
    for c, h, stride in DWS:
        oh = (h - 1) // stride + 1
        default, best = report(
            f"dwconv {c} @{h}/s{stride}",
            lambda *config: time_dw(sweep, c, h, stride, *config),
            generated_first(sweep.module.dwconv_tile(c, sweep.activations), configs),
            lambda ms: f"{sweep.activations.itemsize * sweep.batch * c * (h * h + oh * oh) / ms / 1e6:.0f} GB/s",
        )
        total_default += default
        total_best += best
    print(f"sum over the depthwise layers: default {total_default:.3f} ms, best {total_best:.3f} ms")


def rounding_costs(sweep):
    """Each GEMM at its generated tile (gemm_tile, 4 warps, 3 stages) under each precision variant."""
    variants = {name: load("mobilenet_v1", name) for name in PRECISIONS}
    print(f"device: {torch.cuda.get_device_name()}, batch {sweep.batch}; ms at the generated tile")
    print(f"{'conv1x1':<22}{'tile':>16}" + "".join(f"{name:>19}" for name in variants))
    totals = dict.fromkeys(variants, 0.0)
    for c_in, c_out, h in GEMMS:
        tile = sweep.module.gemm_tile(sweep.batch * h * h, c_in, c_out, "tf32")
        row = f"{f'{c_in}->{c_out} @{h}':<22}{str(tile):>16}"
        for name, module in variants.items():
            precision = name.split("-")[0]  # tf32-truncated launches tf32
            ms = time_gemm(sweep, c_in, c_out, h, *tile, 4, 3, module=module, precision=precision)
            totals[name] += ms
            row += f"{ms:>19.4f}"
        print(row)
    print(f"{'sum':<38}" + "".join(f"{t:>19.3f}" for t in totals.values()))


def sweep_gemms(sweep, late):
    print(
        f"device: {torch.cuda.get_device_name()}, batch {sweep.batch}, {'CUDA graph' if sweep.graph else 'do_bench'},"
        f" tl.dot {sweep.precision}, configs (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)"
    )
    configs = LATE_CONFIGS if late else CONFIGS + (FP16_CONFIGS if sweep.fp16 else [])
    total_default = total_best = 0.0
    for c_in, c_out, h in LATE_GEMMS if late else GEMMS:
        generated = (*sweep.module.gemm_tile(sweep.batch * h * h, c_in, c_out, sweep.precision), 4, 3)
        default, best = report(
            f"conv1x1 {c_in}->{c_out} @{h}",
            lambda *config: time_gemm(sweep, c_in, c_out, h, *config),
            [config for config in generated_first(generated, configs) if fits(sweep, *config[:3], config[4])],
            lambda ms: f"{2 * sweep.batch * h * h * c_in * c_out / ms / 1e9:.0f} TFLOP/s",
        )
        total_default += default
        total_best += best
    print(f"sum over the listed layers: default {total_default:.3f} ms, best {total_best:.3f} ms")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tile sweeps of the generated kernels at MobileNetV1's and EfficientNetB1's layer shapes (GPU)."
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dw", action="store_true", help="the depthwise convs")
    what.add_argument("--stem", action="store_true", help="the first conv, from NCHW and from channels-last input")
    what.add_argument("--linear", action="store_true", help="the classifier's tiles and slices of K")
    what.add_argument("--late", action="store_true", help="the late layers' GEMMs over small tiles")
    what.add_argument(
        "--rounding", action="store_true", help="each GEMM at its generated tile under every tl.dot precision variant"
    )
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument(
        "--fp16", action="store_true", help="float16 activations, weights and dots, as activations(float16)"
    )
    parser.add_argument(
        "--precision",
        choices=("tf32", "fp16", "bf16x3", "tf32x3"),
        help="the GEMMs' tl.dot precision (default: fp16 with --fp16, else tf32)",
    )
    parser.add_argument(
        "--graph", action="store_true", help="time through a CUDA graph (L2 not flushed) instead of do_bench"
    )
    parser.add_argument(
        "--dw-unrolled", action="store_true", help="the depthwise kernel with its kernel-row loop unrolled"
    )
    add_warm_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dw_unrolled:  # all the taps' loads can be hoisted together: more registers
        source = (ROOT / "generated" / "mobilenet_v1.py").read_text()
        module = load_source(
            source.replace("for kh in range(KH):", "for kh in tl.static_range(KH):"), "mobilenet_v1_dw_unrolled"
        )
    else:
        module = load("mobilenet_v1")
    sweep = Sweep(
        batch=args.batch,
        graph=args.graph,
        fp16=args.fp16,
        precision=args.precision or ("fp16" if args.fp16 else "tf32"),
        warm=warm_shard(args.warm),
        module=module,
    )
    if args.dw:
        return sweep_dw(sweep)
    if args.stem:
        return sweep_stem(sweep)
    if args.linear:
        return sweep_linear(sweep)
    if args.rounding:
        return rounding_costs(sweep)
    return sweep_gemms(sweep, args.late)


if __name__ == "__main__":
    main()
