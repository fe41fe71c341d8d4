"""One eval-mode forward of a generated net, launched kernel by kernel (no CUDA graph), for a profiler (GPU).
Usage: ncu --profile-from-start off ... python3 scripts/ncu_forward.py NAME BATCH; the profiler sees only the
third forward (the first two compile and warm up)."""

import sys

import torch

from time_models import NETS, load  # this script's folder is on sys.path


def main():
    name, batch = sys.argv[1], int(sys.argv[2])
    _, size = NETS[name]
    torch.manual_seed(42)
    new = load(name).ModelNew().eval().cuda()
    x = torch.rand(batch, 3, size, size, device="cuda")
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
