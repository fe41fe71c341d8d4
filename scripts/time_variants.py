"""Times whole nets built from edits of their specs against the specs as they are, in one process (GPU):
which blocks to fuse is a spec decision, and a whole net in its CUDA graph is where it shows (L2 carries
activations between kernels; at batch 10 a launch costs about what a small kernel does).

Each variant is a list of (old, new) edits of specs/<net>.fuse; every edit must apply. Prints eval-mode
median ms (do_bench, L2 flushed, inputs rotated) per net, batch and variant, with the error against
float64. `--batch B ...` sets the batches (default 10 128); `--baseline DIR,...` adds each DIR/<net>.py (say,
the generated files of an earlier commit, or hand-edited copies) as a variant named DIR, to time a compiler
change; `--variants NAME,...` times only those (VARIANTS names them per net).
Usage: python3 scripts/time_variants.py [--batch B ...] [--variants NAME,...] [--baseline DIR,...]
"""

import argparse
import re
import sys

import torch

from time_models import NETS, ROOT, median_ms  # this script's folder is on sys.path

sys.path.insert(0, str(ROOT / "tests"))
from helpers import load_source, randomize_batchnorm, rel_error  # noqa: E402

from fusegen import compile_spec  # noqa: E402


def fuse_blocks(block, fused, first_args=None):
    """Calls of `block` whose first argument is in `first_args` (all when None) become `fused` calls."""

    def edit(spec):
        pattern = re.compile(rf"^(\s+(?:\w+: )?){block}\((\w+\(\d+\)|\d+)", re.M)

        def replace(match):
            if first_args is None or match.group(2) in first_args:
                return f"{match.group(1)}{fused}({match.group(2)}"
            return match.group(0)

        edited = pattern.sub(replace, spec)
        assert edited != spec, f"no call of {block} to fuse"
        return edited

    return edit


def activations(dtype):
    """The spec with `activations(dtype)` instead of its own declaration."""

    def edit(spec):
        edited = re.sub(r"^activations\(\w+\)$", f"activations({dtype})", spec, flags=re.M)
        assert edited != spec, "the spec declares no other activations(...)"
        return edited

    return edit


VARIANTS = {
    "mobilenet_v1": {
        "spec": None,
        "fp32-act": activations("float32"),
        "fuse-all": fuse_blocks("conv_dw", "conv_dw_fused"),
        "fuse-512+": fuse_blocks("conv_dw", "conv_dw_fused", {"c(512)", "c(1024)"}),
        "fuse-none": fuse_blocks("conv_dw_fused", "conv_dw"),
        # the 56x56 blocks (128 -> 128, 128 -> 256 after a stride-2 depthwise conv): slower (session 12)
        "fuse-128": fuse_blocks("conv_dw", "conv_dw_fused", {"c(128)"}),
    },
    "efficientnet_b1": {
        "spec": None,
        "fp32-act": activations("float32"),
        "fuse-all": fuse_blocks("mbconv", "mbconv_fused"),
        "fuse-80+": fuse_blocks("mbconv", "mbconv_fused", {"80", "112", "192"}),
        # session 6's spec: mbconv2 and mbconv3 fused too (with float16 activations they lose)
        "fuse-16+24": fuse_blocks("mbconv", "mbconv_fused", {"16", "24"}),
        "fuse-none": fuse_blocks("mbconv_fused", "mbconv"),
        # the expansions of mbconv2-4 computed at their depthwise convs' taps (session 11), or not
        "expand-none": fuse_blocks("mbconv_expand_fused", "mbconv"),
        "expand-16": fuse_blocks("mbconv_expand_fused", "mbconv", {"24", "40"}),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    names = sorted({name for variants in VARIANTS.values() for name in variants})
    parser = argparse.ArgumentParser(
        description="Whole nets from edited specs (and other generated files) against the specs, in one process (GPU)."
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 128], metavar="B", help="batches (default 10 128)")
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        metavar="NAME,...",
        help=f"time only these spec variants (default: all of a net's; known: {', '.join(names)})",
    )
    parser.add_argument(
        "--baseline",
        type=lambda text: text.split(","),
        default=[],
        metavar="DIR,...",
        help="also time DIR/<net>.py for each DIR (relative to the repository root), as a variant named DIR",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}; eval mode, median ms")
    print(f"{'net':<16}{'batch':>6}  {'variant':<12}{'ms':>8}{'vs spec':>9}{'rel err':>10}")
    for name, variants in VARIANTS.items():
        ref_cls, size = NETS[name]
        spec_path = ROOT / "specs" / f"{name}.fuse"
        modules = {}
        for variant, edit in variants.items():
            if args.variants and variant not in args.variants:
                continue
            text = spec_path.read_text() if edit is None else edit(spec_path.read_text())
            source = compile_spec(text, str(spec_path.relative_to(ROOT)))
            modules[variant] = load_source(source, f"{name}_{variant}")
        for folder in args.baseline:
            modules[folder] = load_source((ROOT / folder / f"{name}.py").read_text(), f"{name}_{folder}")
        torch.manual_seed(42)
        ref = ref_cls()
        randomize_batchnorm(ref)
        exact = ref_cls().double()
        exact.load_state_dict(ref.state_dict())
        exact = exact.eval().cuda()
        for batch in args.batch:
            inputs = [torch.rand(batch, 3, size, size, device="cuda") for _ in range(4)]
            with torch.no_grad():
                exact_out = exact(inputs[0].double())
            base = None
            for variant, module in modules.items():
                new = module.ModelNew()
                new.load_state_dict(ref.state_dict())
                new = new.eval().cuda()
                with torch.no_grad():
                    err = rel_error(new(inputs[0]), exact_out)
                    ms = median_ms(new, inputs)
                base = base or ms
                print(f"{name:<16}{batch:>6}  {variant:<12}{ms:>8.3f}{base / ms:>8.2f}x{err:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
