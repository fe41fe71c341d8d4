"""Times a depthwise-separable pair fused into one kernel (dwconv3x3 -> bn -> act computed in the 1x1
conv's K loop) against the same pair as the two generated kernels, at the block shapes of MobileNetV1
and EfficientNetB1 (GPU). For each shape: the two kernels through their wrappers (generated tiles), then
the fused kernel under every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that fits an RTX 4090's
99 KB, whole K (BLOCK_K = all input channels, up to 256: one K step) among them. Where BLOCK_N < C_out
each channel block computes the depthwise tile again (the generated grid runs the channel blocks of
one pixel block adjacent, so the repeats read their input from L2). Prints one line per shape and batch:
two-kernel ms, the fused kernel at its generated tile (producer_tile), the best fused ms and its config,
and the runner-ups. docs/performance.md says what these sweeps decided.

At batch 10 without `--graph` the two wrappers' Python time exceeds their kernels' (the fused row then
looks 2x faster): use `--graph` there, or compare whole nets (time_variants.py). `--pipelined` tries K
steps of 16-32 channels in 2-3 stages instead (Triton prefetches the next step's taps through shared
memory). `--fp16` runs both on float16 activations with float16 dots (the specs' `activations(float16)`),
also over short row blocks and 1-2 warps.
Usage: python3 scripts/tune_fused.py [--batch B ...] [--shapes mb|eff|mid|all|spec] [--pipelined] [--graph]
[--fp16] [--warm K/N]
"""

import argparse
import itertools
import sys
from functools import cache

import torch
import triton
import triton.testing

from time_models import ROOT, add_warm_argument, load, warm_shard  # this script's folder is on sys.path

sys.path.insert(0, str(ROOT / "tests"))
from helpers import load_source  # noqa: E402

from fusegen import compile_spec  # noqa: E402

# (C_in, H_in, stride, C_out) of each dw -> 1x1 pair
MB = [(32, 112, 1, 64), (64, 112, 2, 128), (128, 56, 1, 128), (128, 56, 2, 256), (256, 28, 1, 256),
      (256, 28, 2, 512), (512, 14, 1, 512), (512, 14, 2, 1024), (1024, 7, 1, 1024)]  # fmt: skip
EFF = [(32, 120, 1, 16), (96, 120, 2, 24), (144, 60, 2, 40), (240, 30, 2, 80), (480, 15, 1, 112),
       (672, 15, 2, 192), (1152, 8, 1, 320)]  # fmt: skip
MID = [(128, 56, 1, 128), (128, 56, 2, 256), (256, 28, 1, 256), (256, 28, 2, 512), (512, 14, 1, 512),
       (96, 120, 2, 24), (144, 60, 2, 40), (480, 15, 1, 112), (32, 112, 1, 64)]  # fmt: skip
FUSED_IN_SPECS = [(32, 112, 1, 64), (64, 112, 2, 128), (32, 120, 1, 16)]
SHAPES = {"mb": MB, "eff": EFF, "mid": MID, "all": MB + EFF, "spec": FUSED_IN_SPECS}
SMEM_LIMIT = 99 * 1024

SPEC = """\
model Pair(c_in=32, c_out=64, stride=1)
input(2, c_in, 8, 8)
forward:
    conv: dwconv3x3(c_in, stride) -> bn: bn(c_in) -> relu -> conv2: conv1x1(c_in, c_out) -> bn2: bn(c_out) -> relu
"""
KERNEL = "dwconv3x3_bn_relu_conv1x1_bn_relu_kernel"


@cache
def fused():
    """The pair as one chain, compiled by fusegen: its kernel is launched at each config."""
    return load_source(compile_spec(SPEC, "specs/pair.fuse"), "pair")


@cache
def mobilenet():
    """generated/mobilenet_v1.py: the two kernels' wrappers, dot_weight and producer_tile."""
    return load("mobilenet_v1")


def modules(c_in, c_out, stride):
    conv = torch.nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
    conv2 = torch.nn.Conv2d(c_in, c_out, 1, bias=False)
    bns = [torch.nn.BatchNorm2d(c) for c in (c_in, c_out)]
    for bn in bns:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return [m.cuda().eval() for m in (conv, bns[0], conv2, bns[1])]


def configs(c_in, c_out, pipelined, fp16):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that fit 99 KB of shared memory."""
    k_all = max(16, triton.next_power_of_2(c_in))
    n_all = max(16, triton.next_power_of_2(c_out))
    found = set()
    blocks_k, stages = ((16, 32), (2, 3)) if pipelined else ((32, k_all if k_all <= 256 else 32), (1,))
    rows = (16, 32, 64, 128) if fp16 else (32, 64, 128)
    for bm, bn, bk, stage in itertools.product(rows, (32, 64, 128, 256), blocks_k, stages):
        bn, bk = min(bn, n_all), min(bk, k_all)
        # a stage holds the 9 taps [BLOCK_M, BLOCK_K] and the weights [BLOCK_K, BLOCK_N]; the taps'
        # sum is converted to tl.dot's layout through one more [BLOCK_M, BLOCK_K] buffer
        smem = ((9 * bm * bk if stage > 1 else 0) + bk * bn) * 4 * stage + bm * bk * 4
        if bm * bn > 16384 or smem > SMEM_LIMIT or bm * bk > 16384:
            continue
        found.add((bm, bn, bk, 8 if bm * bn >= 8192 or bm * bk >= 8192 else 4, stage))
        if fp16:
            found.update((bm, bn, bk, warps, stage) for warps in (1, 2, 4) if bm * bn <= 2048 * warps)
    return sorted(found)


def launcher(x, mods, out, bm, bn, bk, warps, stages, precision="tf32"):
    """The fused kernel's launch on x at one config; `precision` is its tl.dot's ("fp16" on float16 x)."""
    conv, bn1, conv2, bn2 = mods
    n, c_in, h, w = x.shape
    c_out, oh, ow = out.shape[1:]
    weight2 = mobilenet().dot_weight(conv2, precision).contiguous()
    kernel = getattr(fused(), KERNEL)[(triton.cdiv(n * oh * ow, bm) * triton.cdiv(c_out, bn),)]

    def run():
        kernel(
            x, conv.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
            weight2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, out,
            n, h, w, oh, ow, conv.weight.stride(0), conv.weight.stride(2), conv.weight.stride(3), bn1.eps, bn2.eps,
            C_in=c_in, C_out=c_out, CONV_KH=3, CONV_KW=3, CONV_STRIDE=conv.stride[0], CONV_PAD=1,
            DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LAUNCH_PDL=False, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    return run


def bench(fn, graph):
    if graph:
        fn()  # compiled and the weights' copies cached before capture
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The depthwise conv in the 1x1 conv's K loop (one kernel) against the two generated kernels (GPU)."
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 128], metavar="B", help="batches (default 10 128)")
    parser.add_argument(
        "--shapes",
        choices=SHAPES,
        default="all",
        help="MobileNetV1's pairs, EfficientNetB1's, the middle ones where one K step lost at batch 128, all of"
        " those (the default), or the pairs that the shipped specs fuse",
    )
    parser.add_argument("--pipelined", action="store_true", help="K steps of 16-32 channels in 2-3 stages")
    parser.add_argument("--graph", action="store_true", help="time through a CUDA graph (L2 not flushed)")
    parser.add_argument("--fp16", action="store_true", help="float16 activations and dots, as activations(float16)")
    add_warm_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    activations = torch.float16 if args.fp16 else torch.float32
    precision = "fp16" if args.fp16 else "tf32"
    warm = warm_shard(args.warm)
    mb = mobilenet()
    print(
        f"device: {torch.cuda.get_device_name()}; batches {args.batch}; {'CUDA graph' if args.graph else 'do_bench'}; config = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)"
    )
    print(
        f"{'C_in':>5}{'H':>5}{'s':>3}{'C_out':>6}{'batch':>6}{'2 kernels':>10}{'generated':>10}{'fused':>8}  best config        runner-ups"
    )
    torch.manual_seed(0)
    for c_in, h, stride, c_out in SHAPES[args.shapes]:
        mods = modules(c_in, c_out, stride)
        for batch in args.batch:
            x = torch.rand(batch, c_in, h, h, device="cuda", dtype=activations).to(memory_format=torch.channels_last)

            def two_kernels():
                return mb.conv1x1_bn_relu(
                    mb.dwconv3x3_bn_relu(x, mods[0], mods[1], activations), mods[2], mods[3], activations
                )

            with torch.no_grad():
                expected = two_kernels()
                two = bench(two_kernels, args.graph) if not warm else 0.0
            out = torch.empty_like(expected)
            times = []
            generated = mb.producer_tile(c_in, c_out, 9, activations)
            for config in [generated, *(c for c in configs(c_in, c_out, args.pipelined, args.fp16) if c != generated)]:
                if warm and not warm():
                    continue
                run = launcher(x, mods, out, *config, precision=precision)
                try:
                    run()
                except Exception as error:  # out of resources: report, go on
                    print(f"  skipped {config}: {str(error).splitlines()[0][:80]}")
                    continue
                err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
                assert err < (2e-3 if args.fp16 else 1e-3), f"fused {config} differs: {err:.1e}"
                times.append((bench(run, args.graph) if not warm else 0.0, config))
            if warm:
                continue
            at_generated = times[0][0] if times[0][1] == generated else float("nan")
            times.sort()
            best = times[0]
            others = "  ".join(f"{t:.4f} {str(c).replace(' ', '')}" for t, c in times[1:4])
            print(
                f"{c_in:>5}{h:>5}{stride:>3}{c_out:>6}{batch:>6}{two:>10.4f}{at_generated:>10.4f}{best[0]:>8.4f}  "
                f"{str(best[1]).replace(' ', ''):<18} {others}",
                flush=True,
            )


if __name__ == "__main__":
    main()
