"""Sweeps tile sizes, warps and stages of the generated conv1x1 and depthwise kernels at MobileNetV1's
batch-128 layer shapes (GPU). Prints the best configs per layer and the time of today's default."""

import importlib.util
import itertools
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mb", ROOT / "generated" / "mobilenet_v1.py")
mb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mb)

BATCH = 128
# (C_in, C_out, H) of MobileNetV1's 1x1 convs and (C, H_in, stride) of its depthwise convs
GEMMS = [(32, 64, 112), (128, 128, 56), (256, 256, 28), (512, 512, 14), (1024, 1024, 7)]
DWS = [(32, 112, 1), (64, 112, 2), (128, 56, 1), (256, 28, 1), (512, 14, 1), (512, 14, 2), (1024, 7, 1)]


def cl(t):
    return t.to(memory_format=torch.channels_last)


def bn_args(c):
    return [torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda"), torch.randn(c, device="cuda"),
            torch.rand(c, device="cuda") + 0.5]  # fmt: skip


def time_gemm(c_in, c_out, h, bm, bn, bk, warps, stages):
    x = cl(torch.rand(BATCH, c_in, h, h, device="cuda"))
    w = torch.randn(c_out, c_in, 1, 1, device="cuda")
    out = cl(torch.empty(BATCH, c_out, h, h, device="cuda"))
    m = BATCH * h * h
    grid = (triton.cdiv(m, bm), triton.cdiv(c_out, bn))
    args = [x, w, *bn_args(c_out), out, BATCH, c_in, c_out, h, h, *x.stride(), *out.stride(), 1e-5]

    def run():
        mb.conv1x1_bn_relu_kernel[grid](*args, STRIDE=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def time_dw(c, h, stride, bm, bn, warps):
    x = cl(torch.rand(BATCH, c, h, h, device="cuda"))
    w = torch.randn(c, 1, 3, 3, device="cuda")
    oh = (h - 1) // stride + 1
    out = cl(torch.empty(BATCH, c, oh, oh, device="cuda"))
    grid = (triton.cdiv(BATCH * oh * oh, bm), triton.cdiv(c, bn))
    args = [x, w, *bn_args(c), out, BATCH, h, h, c, oh, oh, *x.stride(), *out.stride(), 1e-5]

    def run():
        mb.dwconv3x3_bn_relu_kernel[grid](*args, KH=3, KW=3, STRIDE=stride, PAD=1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def main():
    print(f"device: {torch.cuda.get_device_name()}, batch {BATCH}")
    total_default = total_best = 0.0
    for c_in, c_out, h in GEMMS:
        results = []
        for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (32, 64), (4, 8), (2, 3, 4)):
            try:
                results.append((time_gemm(c_in, c_out, h, bm, bn, bk, warps, stages), (bm, bn, bk, warps, stages)))
            except Exception as err:  # out of shared memory etc.
                print(f"  skip {bm, bn, bk, warps, stages}: {type(err).__name__}")
        results.sort()
        default = time_gemm(c_in, c_out, h, 64, 64, 32, 4, 3)
        total_default += default
        total_best += results[0][0]
        flops = 2 * BATCH * h * h * c_in * c_out
        print(f"conv1x1 {c_in}->{c_out} @{h}: default {default:.3f} ms; best {results[0][0]:.3f} ms "
              f"{results[0][1]} ({flops / results[0][0] / 1e9:.0f} TFLOP/s); next {results[1:4]}")  # fmt: skip
    for c, h, stride in DWS:
        results = []
        for bm, bn, warps in itertools.product((32, 64, 128, 256), (16, 32, 64, 128), (2, 4, 8)):
            results.append((time_dw(c, h, stride, bm, bn, warps), (bm, bn, warps)))
        results.sort()
        default = time_dw(c, h, stride, 64, min(64, max(16, triton.next_power_of_2(c))), 4)
        total_default += default
        total_best += results[0][0]
        oh = (h - 1) // stride + 1
        gbs = 4 * BATCH * c * (h * h + oh * oh) / results[0][0] / 1e6
        print(f"dwconv {c} @{h}/s{stride}: default {default:.3f} ms; best {results[0][0]:.3f} ms {results[0][1]} "
              f"({gbs:.0f} GB/s); next {[r[1] for r in results[1:4]]}")  # fmt: skip
    print(f"sum over the listed layers: default {total_default:.3f} ms, best {total_best:.3f} ms")


if __name__ == "__main__":
    main()
