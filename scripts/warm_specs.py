"""Compiles the kernels of specs (GPU) at each spec's KernelBench batch, in eval and training mode, one
process per spec and several side by side, so that a `fusegen bench` after it finds them in Triton's cache
and compiles nothing (compiling all 25 specs one after another takes a good part of a 10-minute device
command). Processes share the cache through TRITON_CACHE_DIR, as the bench after them must.

Usage: python3 scripts/warm_specs.py [--jobs N] SPEC [SPEC ...]
"""

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def warm(path: str) -> None:
    """One spec: the model in each mode, its launches run twice without a CUDA graph (the second records
    the launch plan), as the bench's no-graph row runs them."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fusegen.bench import build_model, compile_model, input_shape

    spec = compile_model(path, Path(path).read_text(encoding="utf-8"))
    for mode in ("eval", "train"):
        model = build_model(spec, mode=mode).cuda()
        model.use_cuda_graphs = False
        x = torch.rand(input_shape(spec, spec.example_input[0]), device="cuda")
        with torch.no_grad():
            for _ in range(2):
                model(x)
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12, help="specs compiled side by side (default: 12)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: warm the one spec
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    args = parser.parse_args()
    if args.one:
        warm(args.specs[0])
        return 0

    def child(path: str) -> tuple[str, int, float]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", path])
        return path, done.returncode, time.perf_counter() - started

    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for path, code, seconds in pool.map(child, args.specs):
            print(f"{path}: {'compiled' if code == 0 else f'failed (exit {code})'} in {seconds:.0f} s", flush=True)
            failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
