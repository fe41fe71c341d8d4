"""Runs one depthwise-separable pair twice both ways, for a profiler (GPU): the two generated kernels
(dwconv3x3_bn_relu, conv1x1_bn_relu) and the fused kernel at the tile the generated wrapper would pick
(producer_tile, float32 activations). Usage: python3 scripts/profile_pair.py C_IN H STRIDE C_OUT BATCH, e.g. under
`ncu --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:conv`.
"""

import sys

import torch

from tune_fused import fused, launcher, mb, modules  # this script's folder is on sys.path


def main():
    c_in, h, stride, c_out, batch = map(int, sys.argv[1:6])
    mods = modules(c_in, c_out, stride)
    x = torch.rand(batch, c_in, h, h, device="cuda").to(memory_format=torch.channels_last)
    bm, bn, bk, warps, stages = fused.producer_tile(c_in, c_out, 9, torch.float32)
    print(f"{c_in}@{h}/s{stride} -> {c_out}, batch {batch}; fused tile {(bm, bn, bk)}, {warps} warps, {stages} stage(s)")
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
