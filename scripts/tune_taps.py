"""Times an expansion fused into the depthwise conv after it (conv1x1 -> bn -> relu6 -> dwconv3x3 -> bn ->
relu6 as one kernel that computes the 1x1 conv at each of the depthwise conv's taps) against the same pair
as the two generated kernels, at the shapes of EfficientNetB1's MBConv blocks (GPU, float16 activations).
Both run in a CUDA graph (do_bench_cudagraph, L2 not flushed), as the generated ModelNew runs them. For
each shape and batch: the two kernels at their generated tiles, the fused kernel at its generated tile
(tap_producer_tile) and under every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a grid, best first.
`--batch B ...` sets the batches (default 10 128), `--shapes I,J` picks entries of SHAPES; `--warm K/N` only
compiles every Nth config from the Kth (N processes side by side fill Triton's cache).
docs/performance.md says what these sweeps decided (tap_producer_tile, the specs' mbconv_expand_fused).
Usage: python3 scripts/tune_taps.py [--batch B ...] [--shapes I,J,...] [--warm K/N]
"""

import argparse
import itertools
import sys
from functools import cache

import torch
import triton
import triton.testing

from time_models import ROOT, add_warm_argument, warm_shard  # this script's folder is on sys.path

sys.path.insert(0, str(ROOT / "tests"))
from helpers import load_source, randomize_batchnorm  # noqa: E402

from fusegen import compile_spec  # noqa: E402

# (C_in, H_in, stride, hidden) of EfficientNetB1's expand -> depthwise pairs, then MobileNetV1's 1x1 -> strided dw
SHAPES = [(16, 120, 2, 96), (24, 60, 2, 144), (40, 30, 2, 240), (80, 15, 1, 480), (112, 15, 2, 672), (192, 8, 1, 1152),
          (128, 56, 2, 128), (256, 28, 2, 256), (512, 14, 2, 512)]  # fmt: skip

PAIR = """\
model Pair(c_in=16, hidden=96, stride=2)
input(2, c_in, 8, 8)
activations(float16)
forward:
    conv: conv1x1(c_in, hidden) -> bn: bn(hidden) -> relu6{sep}conv2: dwconv3x3(hidden, stride) -> bn2: bn(hidden) -> relu6
"""


@cache
def pair(fused: bool):
    """The pair compiled by fusegen: as one chain (one kernel) or as two."""
    name = "fused_pair" if fused else "pair"
    return load_source(compile_spec(PAIR.format(sep=" -> " if fused else "\n    "), "specs/pair.fuse"), name)


def configs(c_in, hidden):
    k_all = min(64, max(16, triton.next_power_of_2(c_in)))
    n_all = max(16, triton.next_power_of_2(hidden))
    found = set()
    for bm, bn, bk, warps in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (32, k_all), (1, 2, 4, 8)):
        bn, bk = min(bn, n_all), min(bk, k_all)
        if bm * bn // (32 * warps) <= 64 and bm * bn >= 32 * 32 * warps // 4:  # 8 to 64 accumulators a thread
            found.add((bm, bn, bk, warps))
    return sorted(found)


def shape_indices(text: str) -> list[int]:
    try:
        indices = [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated indices into SHAPES, not {text!r}") from None
    if not all(0 <= i < len(SHAPES) for i in indices):
        raise argparse.ArgumentTypeError(f"indices from 0 to {len(SHAPES) - 1}, not {text!r}")
    return indices


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="An expansion computed at each tap of the depthwise conv after it, against the two generated"
        " kernels (GPU, float16 activations, CUDA graphs)."
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 128], metavar="B", help="batches (default 10 128)")
    parser.add_argument(
        "--shapes",
        type=shape_indices,
        metavar="I,J",
        help="entries of SHAPES, (C_in, H, stride, hidden): "
        + "; ".join(f"{i} {shape}" for i, shape in enumerate(SHAPES)).replace("%", "%%"),
    )
    add_warm_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warm = warm_shard(args.warm)
    fused, apart = pair(fused=True), pair(fused=False)
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    print(
        f"device: {torch.cuda.get_device_name()}; batches {args.batch}; CUDA graph; config = (BLOCK_M, BLOCK_N, BLOCK_K, warps)"
    )
    print(
        f"{'C_in':>5}{'H':>5}{'s':>3}{'hidden':>7}{'batch':>6}{'2 kernels':>10}{'generated':>10}{'fused':>8}  best config        runner-ups"
    )
    generated_rule = fused.tap_producer_tile
    for c_in, h, stride, hidden in shapes:
        torch.manual_seed(0)
        model = apart.ModelNew(c_in, hidden, stride)
        randomize_batchnorm(model)
        model = model.cuda().eval()
        conv, bn, conv2, bn2 = model.conv, model.bn, model.conv2, model.bn2
        for batch in args.batch:
            x = torch.rand(batch, c_in, h, h, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)

            def two_kernels():
                y = apart.conv1x1_bn_relu6(x, conv, bn, torch.float16)
                return apart.dwconv3x3_bn_relu6(y, conv2, bn2)

            with torch.no_grad():
                expected = two_kernels().float()
                two = triton.testing.do_bench_cudagraph(two_kernels, rep=40, return_mode="median") if not warm else 0.0
            generated = generated_rule(c_in)
            times = []
            for config in [generated, *(c for c in configs(c_in, hidden) if c != generated)]:
                if warm and not warm():
                    continue
                fused.tap_producer_tile = lambda *_, config=config: config

                def run():
                    return fused.conv1x1_bn_relu6_dwconv3x3_bn_relu6(x, conv, bn, conv2, bn2)

                try:
                    with torch.no_grad():
                        out = run()
                except Exception as error:  # out of resources: report, go on
                    print(f"  skipped {config}: {str(error).splitlines()[0][:80]}")
                    continue
                err = ((out - expected).norm() / expected.norm()).item()
                assert err < 2e-3, f"fused {config} differs: {err:.1e}"
                if not warm:
                    with torch.no_grad():
                        times.append((triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median"), config))
            if warm:
                continue
            at_generated = times[0][0] if times[0][1] == generated else float("nan")
            times.sort()
            others = "  ".join(f"{t:.4f} {str(c).replace(' ', '')}" for t, c in times[1:12])
            print(
                f"{c_in:>5}{h:>5}{stride:>3}{hidden:>7}{batch:>6}{two:>10.4f}{at_generated:>10.4f}{times[0][0]:>8.4f}  "
                f"{str(times[0][1]).replace(' ', ''):<18} {others}",
                flush=True,
            )


if __name__ == "__main__":
    main()
