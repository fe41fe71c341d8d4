"""Experiment (GPU): a depthwise 3x3 -> bn -> relu kernel over 1-d tiles of output rows, as fusegen
generates it, against the same kernel over 2-d patches of TILE_H x TILE_W output pixels, which read
each input row for several output rows. Hand-written stand-ins (weights as [C, 9], BatchNorm as a
scale and shift), not the generated kernels. Usage: python3 scripts/dw_patch_tiles.py [batch]; prints
the best config of each per layer shape of MobileNetV1 and EfficientNetB1, checked against torch."""

import sys
import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def dw_rows(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    N,
    H,
    W,
    OH,
    OW,
    C: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N * OH * OW
    mask_n = offs_n < C
    n = offs_m // (OH * OW)
    oh = offs_m // OW % OH
    ow = offs_m % OW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            ih = oh * STRIDE - 1 + kh
            iw = ow * STRIDE - 1 + kw
            inside = mask_m[:, None] & mask_n[None, :] & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            x = tl.load(
                x_ptr + ((n[:, None] * H + ih[:, None]) * W + iw[:, None]) * C + offs_n[None, :], mask=inside, other=0.0
            )
            w = tl.load(w_ptr + offs_n * 9 + kh * 3 + kw, mask=mask_n, other=0.0)
            acc += x * w[None, :]
    acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n)[None, :] + tl.load(shift_ptr + offs_n, mask=mask_n)[None, :]
    acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + offs_m[:, None] * C + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def dw_patch(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    N,
    H,
    W,
    OH,
    OW,
    C: tl.constexpr,
    STRIDE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles = tl.cdiv(OH, TILE_H) * tiles_w
    n = pid_m // tiles
    t = pid_m % tiles
    r = tl.arange(0, TILE_H * TILE_W)
    oh = (t // tiles_w) * TILE_H + r // TILE_W
    ow = (t % tiles_w) * TILE_W + r % TILE_W
    mask_m = (oh < OH) & (ow < OW)
    offs_m = (n * OH + oh) * OW + ow
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    acc = tl.zeros((TILE_H * TILE_W, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            ih = oh * STRIDE - 1 + kh
            iw = ow * STRIDE - 1 + kw
            inside = mask_m[:, None] & mask_n[None, :] & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            x = tl.load(x_ptr + ((n * H + ih[:, None]) * W + iw[:, None]) * C + offs_n[None, :], mask=inside, other=0.0)
            w = tl.load(w_ptr + offs_n * 9 + kh * 3 + kw, mask=mask_n, other=0.0)
            acc += x * w[None, :]
    acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n)[None, :] + tl.load(shift_ptr + offs_n, mask=mask_n)[None, :]
    acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + offs_m[:, None] * C + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 128
SHAPES = [
    (32, 112, 1),
    (64, 112, 2),
    (128, 56, 1),
    (128, 56, 2),
    (256, 28, 1),
    (512, 14, 1),
    (1024, 7, 1),
    (32, 120, 1),
    (96, 120, 2),
    (480, 15, 1),
    (1152, 8, 1),
]
ROWS = [(64, 64, 4), (64, 32, 4), (32, 32, 2), (64, 32, 2), (128, 32, 4), (64, 64, 2)]  # (BLOCK_M, BLOCK_N, warps)
PATCHES = [
    (8, 8, 32, 4),
    (8, 8, 64, 4),
    (4, 16, 32, 4),
    (4, 8, 32, 2),
    (8, 16, 32, 4),
    (16, 8, 32, 4),
    (2, 32, 32, 4),
    (4, 4, 64, 2),
    (8, 4, 32, 2),
    (4, 8, 64, 4),
]  # (TILE_H, TILE_W, BLOCK_N, warps)


def main():
    print(torch.cuda.get_device_name(), "batch", BATCH)
    tot_rows = tot_patch = tot_default = 0.0
    for c, h, s in SHAPES:
        oh = (h - 1) // s + 1
        x = torch.rand(BATCH, c, h, h, device="cuda").to(memory_format=torch.channels_last)
        w = torch.randn(c, 9, device="cuda")
        scale, shift = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        out = torch.empty(BATCH, c, oh, oh, device="cuda").to(memory_format=torch.channels_last)
        ref = torch.relu(
            torch.nn.functional.conv2d(x, w.view(c, 1, 3, 3), None, s, 1, groups=c) * scale[None, :, None, None]
            + shift[None, :, None, None]
        )
        rows = []
        for bm, bn, warps in ROWS:
            grid = (triton.cdiv(BATCH * oh * oh, bm), triton.cdiv(c, bn))
            run = lambda: dw_rows[grid](
                x, w, scale, shift, out, BATCH, h, h, oh, oh, C=c, STRIDE=s, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps
            )
            run()
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
            rows.append((triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"), (bm, bn, warps)))
        patches = []
        for th, tw, bn, warps in PATCHES:
            grid = (BATCH * triton.cdiv(oh, th) * triton.cdiv(oh, tw), triton.cdiv(c, bn))
            run = lambda: dw_patch[grid](
                x,
                w,
                scale,
                shift,
                out,
                BATCH,
                h,
                h,
                oh,
                oh,
                C=c,
                STRIDE=s,
                TILE_H=th,
                TILE_W=tw,
                BLOCK_N=bn,
                num_warps=warps,
            )
            out.zero_()
            run()
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
            patches.append(
                (triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"), (th, tw, bn, warps))
            )
        generated = rows[0][0] if c >= 64 else rows[1][0]  # the tile fusegen generates: 64 x min(64, C)
        rows.sort()
        patches.sort()
        gbs = 4 * BATCH * c * (h * h + oh * oh) / 1e6
        tot_rows += rows[0][0]
        tot_patch += patches[0][0]
        tot_default += generated
        print(
            f"dw {c}@{h}/s{s}: generated tile {generated:.4f}  rows best {rows[0][0]:.4f} {rows[0][1]}  patch best {patches[0][0]:.4f} {patches[0][1]} ({gbs / patches[0][0]:.0f} GB/s)  next {[(round(t, 4), k) for t, k in patches[1:4]]}"
        )
    print(f"sum: generated tile {tot_default:.3f}  rows best {tot_rows:.3f}  patch best {tot_patch:.3f}")


main()
