"""One eval-mode forward of a generated net (generated/NAME.py), launched kernel by kernel (no CUDA graph),
for a profiler (GPU): the profiler sees only the third forward (the first two compile and warm up).
Usage: ncu --profile-from-start off [--clock-control none ...] python3 scripts/ncu_forward.py NAME BATCH
"""

import argparse

import torch

from time_models import NETS, load  # this script's folder is on sys.path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One eval forward, kernel by kernel, between cudaProfilerStart and Stop (GPU; run under ncu)."
    )
    parser.add_argument("name", choices=NETS, help="the generated net")
    parser.add_argument("batch", type=int, help="batch size")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _, size = NETS[args.name]
    torch.manual_seed(42)
    new = load(args.name).ModelNew().eval().cuda()
    x = torch.rand(args.batch, 3, size, size, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            new.run_kernels(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        new.run_kernels(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
