"""Times eager torch and the generated ModelNew (generated/*.py, fp32 input) on the GPU, in eval mode and
in training mode (BatchNorm with batch statistics, KernelBench's setting); prints a table.

A quick baseline, not `fusegen bench`: do_bench medians over rotated inputs, batch 10 and 128. The other
modes: `--precision P` times the generated files with another tl.dot precision (PRECISIONS) in eval mode;
`--profile` and `--profile-train` print where the GPU time goes per kernel (torch.profiler); `--timeline B`
prints one CUDA-graph replay of each net at batch B kernel by kernel (start, duration, idle gap before
it), after an L2 flush; `--host B` prints the host's time per forward at batch B.

The other scripts here import its helpers (NETS, load, median_ms, warm_shard) and, through it, the
fusegen of this checkout.
Usage: python3 scripts/time_models.py [--precision P | --profile | --profile-train | --timeline B | --host B]
"""

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
# this checkout's fusegen (not another one that pip installed), and the tests' helpers and reference models
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import reference_models  # noqa: E402
from helpers import load_source, randomize_batchnorm, rel_error  # noqa: E402

NETS = {"mobilenet_v1": (reference_models.MobileNetV1, 224), "efficientnet_b1": (reference_models.EfficientNetB1, 240)}


# The generated files' eval-mode tl.dot precision ("tf32", operands rounded to nearest: activations in
# the kernel, weights by dot_weight) and the
# alternatives to compare it with, as edits of the generated source.
def _edit(*replacements):
    """A source edit: each (old, new) replaced, each old required."""

    def edit(source):
        for old, new in replacements:
            assert old in source, f"the generated source no longer has {old!r}"
            source = source.replace(old, new)
        return source

    return edit


PRECISIONS = {
    "tf32": _edit(),
    "tf32-truncated": _edit(('if DOT_PRECISION == "tf32":', "if False:"), ('if precision != "tf32":', "if True:")),
    "bf16x3": _edit(('"tf32" if x.is_cuda', '"bf16x3" if x.is_cuda')),
    "tf32x3": _edit(('"tf32" if x.is_cuda', '"tf32x3" if x.is_cuda')),
}


def load(name, precision="tf32"):
    source = PRECISIONS[precision]((ROOT / "generated" / f"{name}.py").read_text())
    return load_source(source, f"{name}_{precision}")


def warm_shard(shard: str | None):
    """A sweep script's `--warm K/N`: a function to call once per config, in order, that says whether
    this process compiles it (every Nth from the Kth), so N processes side by side fill Triton's cache;
    None without the flag."""
    if shard is None:
        return None
    shard, shards = map(int, shard.split("/"))
    seen = itertools.count(1)
    return lambda: next(seen) % shards == shard


def add_warm_argument(parser: argparse.ArgumentParser) -> None:
    """A sweep script's `--warm K/N` option (see warm_shard)."""

    def shard(text: str) -> str:
        if not re.fullmatch(r"\d+/[1-9]\d*", text):
            raise argparse.ArgumentTypeError(f"K/N, such as 0/4, not {text!r}")
        return text

    parser.add_argument(
        "--warm",
        type=shard,
        metavar="K/N",
        help="only compile (and run once) every Nth config from the Kth: N such processes side by side fill"
        " Triton's cache, so that the timing run after them compiles nothing",
    )


def median_ms(fn, inputs):
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(inputs)
        fn(inputs[state["i"]])

    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")


def main(precision="tf32"):
    print(f"device: {torch.cuda.get_device_name()}, fusegen's eval-mode tl.dot: {precision}")
    print(
        "rel err: relative L2 error against a float64 run of the reference in the same mode (eager uses cuDNN defaults)"
    )
    print(
        f"{'net':<16}{'mode':>6}{'batch':>6}{'eager ms':>10}{'fusegen ms':>12}{'speedup':>9}{'eager err':>11}{'fusegen err':>13}"
    )
    for name, (ref_cls, size) in NETS.items():
        for training in (False, True) if precision == "tf32" else (False,):
            for batch in (10, 128):
                torch.manual_seed(42)
                ref = ref_cls()
                randomize_batchnorm(ref)
                torch.manual_seed(42)
                new = load(name, precision).ModelNew()
                new.load_state_dict(ref.state_dict())
                exact = ref_cls().double()
                exact.load_state_dict(ref.state_dict())
                ref, new, exact = (m.train(training).cuda() for m in (ref, new, exact))
                inputs = [torch.rand(batch, 3, size, size, device="cuda") for _ in range(4)]
                with torch.no_grad():
                    exact_out = exact(inputs[0].double())
                    ours_err = rel_error(new(inputs[0]), exact_out)
                    eager_err = rel_error(ref(inputs[0]), exact_out)
                    eager = median_ms(ref, inputs)
                    ours = median_ms(new, inputs)
                mode = "train" if training else "eval"
                print(
                    f"{name:<16}{mode:>6}{batch:>6}{eager:>10.3f}{ours:>12.3f}{eager / ours:>9.2f}"
                    f"{eager_err:>11.1e}{ours_err:>13.1e}"
                )


def profile(name: str, batch: int, training: bool = False, top: int = 12) -> None:
    """Where the GPU time of one forward goes, per generated kernel (torch.profiler)."""
    ref_cls, size = NETS[name]
    torch.manual_seed(42)
    new = load(name).ModelNew().train(training).cuda()
    x = torch.rand(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            new(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                new(x)
            torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    print(f"\n{name} batch {batch}, {'training' if training else 'eval'} mode: GPU time per forward by kernel")
    for e in rows:
        print(f"  {e.key[:60]:<60}{e.device_time_total / 5 / 1000:>9.3f} ms{e.count // 5:>5} launches")


def timeline(name: str, batch: int, replays: int = 5) -> None:
    """The last of `replays` forwards (each after an L2 flush, as do_bench) kernel by kernel: where the
    time of a CUDA-graph replay goes, kernels or the gaps between them."""
    ref_cls, size = NETS[name]
    torch.manual_seed(42)
    new = load(name).ModelNew().eval().cuda()
    x = torch.rand(batch, 3, size, size, device="cuda")
    flush = torch.empty(256 * 2**20 // 4, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            new(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                flush.zero_()
                new(x)
            torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    starts = [i for i, e in enumerate(kernels) if e.time_range.elapsed_us() > 20 and "fill" in e.key.lower()]
    last = kernels[starts[-1] + 1 :] if starts else kernels
    print(f"\n{name} batch {batch}: one replay after an L2 flush ({len(last)} kernels, copies included)")
    print(f"{'start us':>9}{'us':>8}{'gap us':>8}  kernel")
    busy = 0.0
    for i, e in enumerate(last):
        gap = e.time_range.start - last[i - 1].time_range.end if i else 0.0
        busy += e.time_range.elapsed_us()
        print(
            f"{e.time_range.start - last[0].time_range.start:>9.1f}{e.time_range.elapsed_us():>8.1f}{gap:>8.1f}  {e.key[:70]}"
        )
    span = last[-1].time_range.end - last[0].time_range.start
    print(f"span {span:.1f} us: kernels {busy:.1f} us, gaps {span - busy:.1f} us")


def host_time(name: str, batch: int, calls: int = 200) -> None:
    """The host's time per eval-mode forward: the calls queue behind a long GPU sleep, so the host never
    waits for the GPU. Where it is above the GPU's time per forward, the host bounds the forward."""
    _, size = NETS[name]
    new = load(name).ModelNew().eval().cuda()
    x = torch.rand(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        new(x)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU cycles
        start = time.perf_counter()
        for _ in range(calls):
            new(x)
        host_ms = (time.perf_counter() - start) / calls * 1e3
        torch.cuda.synchronize()
    print(f"{name} batch {batch}: host {host_ms:.3f} ms per forward")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Eager torch against the generated ModelNew on the GPU (eval and training mode, batch 10 and 128)."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="tf32",
        help="the generated files with this tl.dot precision, eval mode (default tf32, as generated: both modes)",
    )
    mode.add_argument("--profile", action="store_true", help="GPU time per kernel of one eval forward at batch 128")
    mode.add_argument("--profile-train", action="store_true", help="the same in training mode, batch 10 and 128")
    mode.add_argument("--timeline", type=int, metavar="B", help="one CUDA-graph replay at batch B, kernel by kernel")
    mode.add_argument("--host", type=int, metavar="B", help="the host's time per forward at batch B")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.host is not None:
        for name in NETS:
            host_time(name, args.host)
    elif args.timeline is not None:
        for name in NETS:
            timeline(name, args.timeline)
    elif args.profile:
        profile("mobilenet_v1", 128)
        profile("efficientnet_b1", 128)
    elif args.profile_train:
        for batch in (10, 128):
            profile("mobilenet_v1", batch, training=True, top=16)
            profile("efficientnet_b1", batch, training=True, top=16)
    else:
        main(args.precision)
