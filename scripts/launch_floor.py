"""What a kernel boundary costs by itself on this GPU: chains of 26 launches (MobileNetV1's count) of a
kernel that only copies a float16 tensor (+1), ping-ponging between two buffers, in one CUDA graph, with
and without programmatic dependent launch (GPU, Hopper on for PDL). Prints us per chain and per launch
for a few sizes (L2 not flushed: the buffers stay resident, as a small net's activations do), the floor
that a forward of N launches pays before its kernels do any work.
"""

import torch
import triton
import triton.language as tl
import triton.testing

LAUNCHES = 26
# (elements, elements a program): one program; MobileNetV1's 512 -> 512 @14 GEMM's 248 programs at batch
# 10 on 0.5 MB; its 2 MB output in 1024 programs; the same in 4096
SIZES = [(128, 128), (248 * 1024, 1024), (1 << 20, 1024), (1 << 20, 256)]


@triton.jit
def step_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def chain(a, b, launches, block, pdl):
    grid = (triton.cdiv(a.numel(), block),)
    for i in range(launches):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        step_kernel[grid](src, dst, a.numel(), BLOCK=block, PDL=pdl, launch_pdl=pdl)


def graph_us(a, b, launches, block, pdl):
    chain(a, b, launches, block, pdl)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(a, b, launches, block, pdl)
    return triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1e3


def main():
    print(f"device: {torch.cuda.get_device_name()}; a graph of 1 or {LAUNCHES} copy launches, median us")
    print(f"{'elements':>9}{'programs':>10}{'PDL':>6}{'1 launch':>10}{f'{LAUNCHES} launches':>14}{'per launch':>12}")
    pdl_modes = (False, True) if torch.cuda.get_device_capability()[0] >= 9 else (False,)
    for elements, block in SIZES:
        a = torch.rand(elements, device="cuda").half()
        b = torch.empty_like(a)
        for pdl in pdl_modes:
            one, many = (graph_us(a, b, n, block, pdl) for n in (1, LAUNCHES))
            programs = triton.cdiv(elements, block)
            print(f"{elements:>9}{programs:>10}{'on' if pdl else 'off':>6}{one:>10.1f}{many:>14.1f}{many / LAUNCHES:>12.2f}")


if __name__ == "__main__":
    main()
