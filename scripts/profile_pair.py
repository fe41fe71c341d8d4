"""Runs one depthwise-separable pair twice both ways, for a profiler (GPU): the two generated kernels
(dwconv3x3_bn_relu, conv1x1_bn_relu of generated/mobilenet_v1.py) and the fused kernel (the depthwise conv
in the 1x1 conv's K loop) at the tile the generated wrapper would pick (producer_tile, float32
activations), then prints the fused kernel's error against the two. For example, under
`ncu --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:conv`.
Usage: python3 scripts/profile_pair.py C_IN H STRIDE C_OUT BATCH (e.g. 128 56 1 128 128)
"""

import argparse

import torch

from tune_fused import fused, launcher, mobilenet, modules  # this script's folder is on sys.path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One dw -> 1x1 pair as two kernels and fused, for ncu (GPU).")
    for name, what in (
        ("c_in", "the depthwise conv's channels"),
        ("h", "input height and width"),
        ("stride", "the depthwise conv's stride"),
        ("c_out", "the 1x1 conv's output channels"),
        ("batch", "batch size"),
    ):
        parser.add_argument(name, type=int, help=what)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    c_in, h, stride, c_out, batch = args.c_in, args.h, args.stride, args.c_out, args.batch
    mb = mobilenet()
    mods = modules(c_in, c_out, stride)
    x = torch.rand(batch, c_in, h, h, device="cuda").to(memory_format=torch.channels_last)
    bm, bn, bk, warps, stages = fused().producer_tile(c_in, c_out, 9, torch.float32)
    print(
        f"{c_in}@{h}/s{stride} -> {c_out}, batch {batch}; fused tile {(bm, bn, bk)}, {warps} warps, {stages} stage(s)"
    )
    with torch.no_grad():
        for _ in range(2):
            expected = mb.conv1x1_bn_relu(mb.dwconv3x3_bn_relu(x, mods[0], mods[1]), mods[2], mods[3])
        out = torch.empty_like(expected)
        run = launcher(x, mods, out, bm, bn, bk, warps, stages)
        for _ in range(2):
            run()
    torch.cuda.synchronize()
    print(f"fused vs two kernels: rel err {((out - expected).norm() / expected.norm()).item():.1e}")


if __name__ == "__main__":
    main()
