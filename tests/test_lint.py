"""`fusegen lint`: each rule (KernelBench's checker included) on a small violating and a small clean
source, the CLI, the generated files, and the two seed prompts' code (what the rules catch there, and
what no static rule can)."""

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusegen import cli
from hypothesis import given, settings
from hypothesis import strategies as st

from fusegen import lint
from fusegen.lint import RULES, lint_source

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

HEADER = "import torch\nimport torch.nn as nn\nimport triton\nimport triton.language as tl\n\n\n"
MODEL = "\n\nclass ModelNew(nn.Module):\n    def forward(self, x):\n        return add(x)\n"
TIME_HEADER = HEADER.replace("import torch\n", "import time\nimport torch\n", 1)
MODEL_INIT = MODEL.replace(
    "    def forward", "    def __init__(self):\n        super().__init__()\n        {init}\n\n    def forward"
)
WRAPPER = """

def add(x):
    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, 64),)](x, out, n, BLOCK=64)
    return out
"""
ADD = """\
@triton.jit
def add_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + 1.0, mask=mask)
"""


def model_file(kernels: str, wrapper: str = WRAPPER) -> str:
    return HEADER + kernels + wrapper + MODEL


def kernel_file(body: str) -> str:
    """A 1-d kernel `add_kernel(x_ptr, y_ptr, out_ptr, n, K, BLOCK)` with `body`, in a clean file."""
    kernel = "@triton.jit\ndef add_kernel(x_ptr, y_ptr, out_ptr, n, K, BLOCK: tl.constexpr):\n" + body
    wrapper = WRAPPER.replace("(x, out, n, BLOCK=64)", "(x, x, out, n, 1, BLOCK=64)")
    return model_file(kernel, wrapper)


PROLOGUE = """\
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
"""

TILE = """\
@triton.jit
def bias_kernel(x_ptr, b_ptr, out_ptr, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, 4):
        acc += tl.load(x_ptr + offs_m[:, None] * stride_m + offs_n[None, :] + k, mask=mask, other=0.0)
    bias = {bias}
    tl.store(out_ptr + offs_m[:, None] * stride_m + offs_n[None, :], acc + bias[None, :], mask=mask)
"""
TILE_WRAPPER = """

def add(x):
    out = torch.empty_like(x)
    M, N = x.shape
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 32))
    bias_kernel[grid](x, x, out, M, N, x.stride(0), BLOCK_M=64, BLOCK_N=32)
    return out
"""


def tile_file(bias: str) -> str:
    return model_file(TILE.format(bias=bias), TILE_WRAPPER)


def permuted_tile_file(bias: str) -> str:
    """tile_file whose store puts channel c of the tile at a permutation of it (a channel shuffle's)."""
    store = "    tl.store(out_ptr + offs_m[:, None] * stride_m + offs_n[None, :]"
    permuted = "    perm_n = (offs_n % 2) * (N // 2) + offs_n // 2\n    tl.store(out_ptr + offs_m[:, None] * stride_m + perm_n[None, :]"
    return tile_file(bias).replace(store, permuted)


def mark(source: str, needle: str, rules: str = "") -> str:
    """Append the `# <-` marker to the one line that contains `needle`."""
    lines = source.split("\n")
    (index,) = [i for i, line in enumerate(lines) if needle in line]
    lines[index] += "  # <-" + (" " + rules if rules else "")
    return "\n".join(lines)


LAUNCH = "add_kernel[("
# A wrapper's block size unpacked from a function of the file (as gemm_tile): each return's element.
TILE_FUNCTION = """def tile(n):
    def half(size):
        return size // 2

    if half(n) > 1024:
        return 128, min(128, max(16, triton.next_power_of_2(n)))
    return 64, 16


"""


def tile_wrapper(tile: str) -> str:
    return (
        WRAPPER.replace("BLOCK=64", "BLOCK=block")
        .replace("def add(x):", tile + "def add(x):")
        .replace("    n = x.numel()\n", "    n = x.numel()\n    _, block = tile(n)\n")
    )


STORE = "tl.store(out_ptr + offs, x + 1.0, mask=mask)"

# (rule, violating source, clean source). In the violating source every line that must be reported
# ends with `# <-` (this rule) or `# <- RULE ...` (the rules listed); nothing else may be reported,
# and the clean source must have no violation at all.
CASES = {
    "TRI001-launch": (
        "TRI001",
        # KernelBench's triton backend wants a @triton.jit kernel too (KB005, at line 1)
        "# <- KB005\n" + mark(model_file("def add_kernel(x_ptr, out_ptr, n, BLOCK):\n    return None\n"), LAUNCH),
        model_file(ADD),
    ),
    "TRI001-undefined": (
        "TRI001",
        "# <- KB005\n" + mark(model_file("", WRAPPER.replace("add_kernel[", "missing_kernel[")), "missing_kernel["),
        model_file(ADD),
    ),
    "TRI001-device-op": (
        "TRI001",
        mark(model_file(ADD + "\n\ndef helper(p):\n    return tl.load(p)\n"), "return tl.load(p)"),
        model_file(ADD + "\n\n@triton.jit\ndef helper(p):\n    return tl.load(p)\n"),
    ),
    "TRI002": (
        "TRI002",
        mark(model_file(ADD.replace("tl.program_id(0)", "tl.program_id(3)")), "program_id"),
        model_file(ADD.replace("tl.program_id(0)", "tl.program_id(2)")),
    ),
    "TRI003": (
        "TRI003",
        mark(
            kernel_file(
                PROLOGUE
                + "    acc = tl.load(x_ptr + offs, mask=mask)\n"
                + "    for k in range(K):\n        if k > 2:\n            break\n        acc = acc * 2.0\n"
                + "    tl.store(out_ptr + offs, acc, mask=mask)\n"
            ),
            "break",
        ),
        kernel_file(
            PROLOGUE
            + "    acc = tl.load(x_ptr + offs, mask=mask)\n"
            + "    for k in range(K):\n        acc = tl.where(k > 2, acc, acc * 2.0)\n"
            + "    tl.store(out_ptr + offs, acc, mask=mask)\n"
        ),
    ),
    "TRI004": (
        "TRI004",
        mark(
            tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)").replace(
                "        acc += tl.load(", "        acc += acc[:, k][:, None]\n        acc += tl.load("
            ),
            "acc[:, k]",
        ),
        tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)"),
    ),
    "TRI005": (
        "TRI005",
        mark(model_file(ADD.replace("x + 1.0", "tl.tanh(x)")), "tl.tanh"),
        # Triton 3.6 has tl.sigmoid and tl.softmax although the seeds list them as missing.
        model_file(ADD.replace("x + 1.0", "2.0 * tl.sigmoid(2.0 * x) - 1.0 + tl.softmax(x)")),
    ),
    "TRI006": (
        "TRI006",
        mark(model_file(ADD, WRAPPER.replace("BLOCK=64", "BLOCK=48")), LAUNCH),
        model_file(
            ADD,
            WRAPPER.replace("BLOCK=64", "BLOCK=B").replace(
                "    n = x.numel()\n", "    n = x.numel()\n    B = min(64, max(16, triton.next_power_of_2(n)))\n"
            ),
        ),
    ),
    "TRI006-unprovable": (
        "TRI006",
        mark(model_file(ADD, WRAPPER.replace("BLOCK=64", "BLOCK=min(n, 16)")), LAUNCH),
        model_file(ADD, WRAPPER.replace("BLOCK=64", "BLOCK=32 if n > 1024 else 16")),
    ),
    "TRI006-tile-function": (
        "TRI006",
        mark(model_file(ADD, tile_wrapper(TILE_FUNCTION.replace("64, 16", "64, 48"))), LAUNCH),
        model_file(ADD, tile_wrapper(TILE_FUNCTION)),
    ),
    "TRI007": (
        "TRI007",
        mark(model_file(ADD, WRAPPER.replace("(triton.cdiv(n, 64),)", "(n // 64,)")), "add_kernel["),
        model_file(
            ADD,
            WRAPPER.replace("(triton.cdiv(n, 64),)", "grid").replace(
                "    n = x.numel()\n", "    n = x.numel()\n    grid = lambda meta: (max(1, n // meta['BLOCK']),)\n"
            ),
        ),
    ),
    "FUS001": (
        "FUS001",
        mark(
            kernel_file(
                PROLOGUE
                + "    x = tl.load(x_ptr + offs, mask=mask)\n    tl.store(out_ptr + offs, x, mask=mask)\n"
                + "    tl.store(out_ptr + offs, x * 2.0, mask=mask)\n"
            ),
            "x * 2.0",
        ),
        kernel_file(
            PROLOGUE + "    x = tl.load(x_ptr + offs, mask=mask)\n    tl.store(out_ptr + offs, x * 2.0, mask=mask)\n"
        ),
    ),
    "FUS002": (
        "FUS002",
        mark(
            kernel_file(
                PROLOGUE
                + "    x = tl.load(x_ptr + offs, mask=mask)\n    tl.store(y_ptr + offs, x * 2.0, mask=mask)\n"
                + "    y = tl.load(y_ptr + offs, mask=mask)\n    tl.store(out_ptr + offs, y + 1.0, mask=mask)\n"
            ),
            "y = tl.load",
        ),
        kernel_file(
            PROLOGUE
            + "    x = tl.load(x_ptr + offs, mask=mask)\n    y = x * 2.0\n    tl.store(y_ptr + offs, y, mask=mask)\n"
            + "    tl.store(out_ptr + offs, y + 1.0, mask=mask)\n"
        ),
    ),
    "FUS003-offsets": (
        "FUS003",
        mark(
            kernel_file(
                PROLOGUE
                + "    x = tl.load(x_ptr + offs, mask=mask)\n    y = tl.load(y_ptr + offs + 1, mask=mask)\n"
                + "    tl.store(out_ptr + offs, x + y, mask=mask)\n"
            ),
            "offs + 1",
        ),
        kernel_file(
            PROLOGUE
            + "    x = tl.load(x_ptr + offs, mask=mask)\n    y = tl.load(y_ptr + offs, mask=mask)\n"
            + "    tl.store(out_ptr + offs, x + y, mask=mask)\n"
        ),
    ),
    "FUS003-mask": (
        "FUS003",
        mark(
            kernel_file(
                PROLOGUE
                + "    x = tl.load(x_ptr + offs, mask=mask)\n    y = tl.load(y_ptr + offs, mask=offs < K)\n"
                + "    tl.store(out_ptr + offs, x + y, mask=mask)\n"
            ),
            "offs < K",
        ),
        kernel_file(
            PROLOGUE
            + "    x = tl.load(x_ptr + offs, mask=mask)\n    y = tl.load(y_ptr + offs, mask=mask)\n"
            + "    tl.store(out_ptr + offs, x + y, mask=mask)\n"
        ),
    ),
    "FUS003-broadcast-mask": (
        "FUS003",
        mark(tile_file("tl.load(b_ptr + offs_n, mask=mask_m, other=0.0)"), "bias = "),
        tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)"),
    ),
    # a load at the offsets that a permuted store's are computed from is the tile's own, before the permutation
    "FUS003-permuted-store": (
        "FUS003",
        mark(permuted_tile_file("tl.load(b_ptr + offs_n + 1, mask=mask_n, other=0.0)"), "bias = "),
        permuted_tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)"),
    ),
    "FUS004": (
        "FUS004",
        mark(
            kernel_file(
                "    pid = tl.program_id(0)\n    lanes = tl.arange(0, BLOCK)\n    offs = pid * BLOCK + lanes\n"
                + "    mask = offs < n\n    acc = tl.zeros((BLOCK,), dtype=tl.float32)\n"
                + "    for k in range(0, K):\n        acc += tl.load(x_ptr + k * n + lanes, mask=mask)\n"
                + "    tl.store(out_ptr + offs, acc, mask=mask)\n"
            ),
            "+ lanes, mask",
        ),
        kernel_file(
            "    pid = tl.program_id(0)\n    lanes = tl.arange(0, BLOCK)\n    offs = pid * BLOCK + lanes\n"
            + "    mask = offs < n\n    acc = tl.zeros((BLOCK,), dtype=tl.float32)\n"
            + "    for k in range(0, K):\n        acc += tl.load(x_ptr + k * n + offs, mask=mask)\n"
            + "    tl.store(out_ptr + offs, acc, mask=mask)\n"
        ),
    ),
    # The EfficientNetB1 seed's defect in small: per-channel parameters loaded at tl.arange(0, BLOCK)
    # without the program's channel offset (pid_n * BLOCK_N). FUS003, FUS004 and FUS005 all see it.
    "FUS004-channel-offset": (
        "FUS004",
        mark(
            tile_file("tl.load(b_ptr + tl.arange(0, BLOCK_N), mask=mask_n, other=0.0)"),
            "bias = ",
            "FUS003 FUS004 FUS005",
        ),
        tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)"),
    ),
    "FUS005": (
        "FUS005",
        mark(
            tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)").replace(
                "mask_n = offs_n < N", "mask_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N) < N"
            ),
            "mask_n = ",
        ),
        tile_file("tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)"),
    ),
    "LAY001-kernel-after-wrapper": (
        "LAY001",
        mark(HEADER + "def helper(x):\n    return x\n\n\n" + ADD + WRAPPER + MODEL, "def add_kernel"),
        # A helper nn.Module between the wrappers and ModelNew belongs to the model section.
        HEADER + ADD + WRAPPER + '\n\nclass Block(nn.Module):\n    """A part of the model."""\n' + MODEL,
    ),
    "LAY001-import-after-model": (
        "LAY001",
        mark(model_file(ADD) + "\n\nimport math\n", "import math"),
        model_file(ADD).replace("import torch\n", "import math\nimport torch\n", 1),
    ),
    "LAY002": (
        "LAY002",
        mark(model_file(ADD) + '\n\nif __name__ == "__main__":\n    print(ModelNew()(torch.ones(4)))\n', "__name__"),
        model_file(ADD),
    ),
    "LAY003": (
        "LAY003",
        mark(model_file(ADD) + "\n\ndef get_inputs():\n    return [torch.randn(4)]\n", "get_inputs"),
        model_file(ADD),
    ),
    "LAY004": (
        "LAY004",
        mark(model_file(ADD) + "\n\nprint(ModelNew()(torch.ones(4)))\n", "print("),
        model_file(ADD),
    ),
    "LAY005": (
        "LAY005",
        mark(model_file(ADD).replace("class ModelNew(nn.Module):", "class ModelNew(object):"), "class ModelNew"),
        model_file(ADD),
    ),
    "LAY005-missing": (  # reported at line 1
        "LAY005",
        "# <-\n" + model_file(ADD).replace("class ModelNew(", "class Model("),
        model_file(ADD),
    ),
    "LAY007": (
        "LAY007",
        mark(model_file(ADD, tile_wrapper(TILE_FUNCTION).replace("tile(n)\n", "tile(n, 16)\n")), "tile(n, 16)"),
        model_file(ADD, tile_wrapper(TILE_FUNCTION)),
    ),
    "LAY006": (  # reported at line 1
        "LAY006",
        "# <-\n"
        + model_file(ADD).replace("import triton.language as tl\n", "from triton import language\ntl = language\n"),
        model_file(ADD).replace("import triton.language as tl\n", "from triton import language as tl\n"),
    ),
    # KernelBench's checker: the text with each line cut at its first # or //, docstrings included
    "KB001-pass": (
        "KB001",
        model_file(ADD).replace(
            "def forward(self, x):\n", 'def forward(self, x):\n        """The forward pass."""  # <-\n'
        ),
        model_file(ADD).replace("def forward(self, x):\n", 'def forward(self, x):\n        """The forward."""\n'),
    ),
    "KB001-try-except": (
        "KB001",
        model_file(
            ADD,
            WRAPPER.replace(
                "    add_kernel[(triton.cdiv(n, 64),)](x, out, n, BLOCK=64)\n",
                "    try:  # <-\n        add_kernel[(triton.cdiv(n, 64),)](x, out, n, BLOCK=64)\n"
                "    except RuntimeError:  # <-\n        out = x + 1\n",
            ),
        ),
        model_file(ADD),
    ),
    "KB002": (
        "KB002",
        TIME_HEADER + ADD + WRAPPER + "\n\ntorch.cuda.Event.elapsed_time = lambda self, end: 0.001  # <-\n"
        "time.perf_counter = lambda: 0.0  # <-\n" + MODEL,
        TIME_HEADER + ADD + WRAPPER + "\n\nCLOCK = time.perf_counter  # read, not replaced\n" + MODEL,
    ),
    "KB003": (
        "KB003",
        model_file(ADD)
        .replace("import torch\n", "import threading  # <-\nimport torch\n", 1)
        .replace("import triton\n", "from concurrent.futures import ThreadPoolExecutor  # <-\nimport triton\n", 1),
        model_file(ADD).replace("import torch\n", "# import threading: no\nimport torch\n", 1),
    ),
    "KB004": (
        "KB004",
        HEADER + ADD + WRAPPER + '\n\nclass Lazy(torch.Tensor):  # <-\n    """Computes later."""\n' + MODEL,
        HEADER + ADD + WRAPPER + '\n\nclass Block(nn.Module):\n    """Holds a tensor."""\n' + MODEL,
    ),
    "KB005": (  # reported at line 1
        "KB005",
        "# <-\n"
        + model_file(ADD.replace("@triton.jit", "@jit")).replace(
            "import triton\n", "import triton\nfrom triton import jit\n"
        ),
        model_file(ADD),
    ),
    "KB101": (
        "KB101",
        model_file(ADD).replace(MODEL, MODEL_INIT.format(init="self.fc = torch.nn.Linear(4, 4)  # <-")),
        model_file(ADD).replace(MODEL, MODEL_INIT.format(init="self.w = torch.nn.Parameter(torch.ones(4))")),
    ),
    "KB102": (
        "KB102",
        model_file(ADD).replace(
            "return add(x)", "y = torch.relu(add(x))  # <-\n        return nn.functional.gelu(y)  # <-"
        ),
        model_file(ADD),
    ),
    "KB103": (
        "KB103",
        model_file(
            ADD,
            WRAPPER.replace(
                "    add_kernel[(triton.cdiv(n, 64),)](x, out, n, BLOCK=64)\n",
                "    side = torch.cuda.Stream()  # <-\n"
                "    with torch.cuda.stream(side):  # <-\n        add_kernel[(triton.cdiv(n, 64),)](x, out, n, BLOCK=64)\n"
                "    torch.cuda.current_stream().wait_stream(side)  # <-\n",
            ),
        ),
        model_file(ADD),
    ),
    "KB104": (
        "KB104",
        model_file(ADD).replace("return add(x)", "return add(x.half()).float()  # <-"),
        model_file(ADD).replace("return add(x)", "return add(x.float())"),
    ),
}


def found(source: str) -> set[tuple[str, int]]:
    return {(v.rule, v.line) for v in lint_source(source, "case.py")}


def expected(rule_id: str, source: str) -> set[tuple[str, int]]:
    out = set()
    for number, line in enumerate(source.splitlines(), 1):
        marker = re.search(r"# <-( [A-Z]{2,3}\d{3}(?: [A-Z]{2,3}\d{3})*)?", line)
        if marker:
            out |= {(r, number) for r in (marker.group(1) or rule_id).split()}
    return out


def test_every_rule_has_a_case():
    assert {r.id for r in RULES} == {rule_id for rule_id, _, _ in CASES.values()}


@pytest.mark.parametrize("case", CASES)
def test_rule_flags_the_violation(case):
    rule_id, bad, _ = CASES[case]
    want = expected(rule_id, bad)
    assert rule_id in {r for r, _ in want}
    assert found(bad) == want


@pytest.mark.parametrize("case", CASES)
def test_rule_passes_the_clean_source(case):
    _, _, good = CASES[case]
    assert lint_source(good, "case.py") == []


def test_approximate_rules_say_so():
    (block,) = lint_source(CASES["TRI006-unprovable"][1], "case.py")
    assert "approximate" in block.message
    for v in lint_source(CASES["FUS004-channel-offset"][1], "case.py"):
        assert "approximate" in v.message, v


def test_a_file_that_is_not_python_is_a_syntax_error():
    with pytest.raises(SyntaxError):
        lint_source("def f(:\n", "bad.py")


# ---------------------------------------------------------------------------------------------
# generated/ and the seeds


# The functions KernelBench's warnings stand in, in a generated file; README's `fusegen lint` says why each stays.
GENERATED_WARNINGS = {
    "KB102": {"reference_forward", "batch_norm_reference"},  # torch ops that only backward runs
    # the streams of a CUDA graph's warm-up and capture, and of the capture that resets torch's generator
    "KB103": {"capture_cuda_graph", "recover_from_failed_capture"},
    "KB104": {"_weight_copy"},  # dot_weight's float16 copy of a conv's weight, for float16 activations
}


@pytest.mark.parametrize("path", sorted((ROOT / "generated").glob("*.py")), ids=lambda p: p.name)
def test_generated_files_are_clean(path):
    """No rule fails (KernelBench's strict checks included); KernelBench's warnings stand only where
    GENERATED_WARNINGS says."""
    source = path.read_text()
    violations = lint_source(source, str(path))
    assert [v for v in violations if v.severity == "error"] == []
    function_at = {}  # line -> the innermost function around it
    for node in ast.walk(ast.parse(source)):  # outer functions first
        if isinstance(node, ast.FunctionDef):
            function_at.update(dict.fromkeys(range(node.lineno, node.end_lineno + 1), node.name))
    warned: dict[str, set[str]] = {}
    for v in violations:
        warned.setdefault(v.rule, set()).add(function_at.get(v.line))
    # a net without BatchNorm has no batch_norm_reference: each warning stands only where it may
    assert all(
        rule in GENERATED_WARNINGS and places <= GENERATED_WARNINGS[rule] for rule, places in warned.items()
    ), warned
    if re.search(r"\b(torch\.relu|nn\.functional\.\w+)\(", source):  # reference_forward calls one
        assert warned.get("KB102")  # reference_forward's torch ops are seen, so the check above can fail


def seed_code(prompt: str) -> str:
    """The python block after [CURRENT CODE] in a seed prompt."""
    return re.search(r"```python\n(.*?)```", prompt[prompt.index("[CURRENT CODE]") :], re.S).group(1)


SEED_COPIES = {"000_": "seed_mobilenet_v1.py", "003_": "seed_efficientnet_b1.py"}


@pytest.mark.parametrize("prefix", SEED_COPIES)
def test_seed_copies_match_the_shared_seeds(prefix):
    """tests/data holds the seeds' code (2 comment lines on top); shared/ sits beside the repo in CI."""
    prompts = sorted(SHARED_SEEDS.glob(f"{prefix}*.txt")) if SHARED_SEEDS.is_dir() else []
    if not prompts:
        pytest.skip(f"no {SHARED_SEEDS}/{prefix}*.txt here")
    copy = (DATA / SEED_COPIES[prefix]).read_text()
    assert copy.split("\n", 2)[2] == seed_code(prompts[0].read_text())


def seed_violations(name: str) -> set[tuple[str, int]]:
    return {(v.rule, v.line) for v in lint_source((DATA / name).read_text(), name)}


def test_mobilenet_v1_seed():
    """Line numbers are in tests/data/seed_mobilenet_v1.py (seed line + 2).

    Caught: the layout. Each kernel after the first follows a wrapper (the seed interleaves kernel,
    wrapper, kernel, ...), and `import math` stands after ModelNew (it works only because ModelNew is
    built after the module has finished loading).

    Not caught, and no static rule could: BatchNorm and ReLU run as PyTorch modules after each Triton
    conv instead of in its epilogue (nothing marks which torch calls "should" have been fused);
    ModelNew's parameters (`weight`, `dw_weight`, `fc_weight`) do not match the reference Model's
    state_dict names, and their init differs; `allow_tf32=True` dots lose accuracy (about 1e-3).
    The kernels themselves follow the rules: one store each, shared offsets, cdiv grids, literal
    power-of-two blocks. KernelBench's checker warns about nothing: its torch.nn pattern needs the
    `torch.` prefix, and the seed spells `nn.BatchNorm2d`, `nn.ReLU`.
    """
    assert seed_violations("seed_mobilenet_v1.py") == {
        ("LAY001", 101),  # kernel conv1x1_kernel after wrapper linear_triton
        ("LAY001", 213),  # kernel conv3x3_kernel after wrapper conv1x1_triton
        ("LAY001", 349),  # kernel depthwise_conv3x3_kernel after wrapper conv3x3_triton
        ("LAY001", 564),  # import math after class ModelNew
    }


def test_efficientnet_b1_seed():
    """Line numbers are in tests/data/seed_efficientnet_b1.py (seed line + 2).

    Caught:
    - the BN parameters (lines 99-105) are loaded at `tl.arange(0, BLOCK_SIZE_C)`, without the
      program's channel offset `pid_oc * BLOCK_SIZE_C`: every program past the first applies channels
      0..BLOCK_SIZE_C-1's BatchNorm. FUS004 sees it exactly (the mask `oc_mask` depends on
      tl.program_id, the offsets do not), FUS003 sees a second offsets computation that the store does
      not use, FUS005 a recomputed tl.arange.
    - offsets recomputed instead of broadcast (FUS005): tl.arange(0, BLOCK_SIZE_N / _C / _HW) again
      for the masks, inside the loop, and for the store (lines 45, 57, 61, 77, 116, 117).
    - block sizes that need not be powers of two (TRI006, approximate): `min(N, 1)` and
      `min(C_out, 16)`; a channel count of 24 would give tl.arange(0, 24), which does not compile.
    - the layout: fused_linear_bias_kernel follows a wrapper (LAY001).

    Not caught, and no static rule could:
    - BLOCK_SIZE_C tiles both the input and the output channels, and the product
      `x[:, None, :, :] * w[None, :, :, :]` pairs x's input channel with w's output-channel axis: the
      weight is used transposed (and the 4-d product is 32x larger than the tile). Telling which axis
      of a tensor means what takes shapes and intent, not syntax.
    - FusedMBConvBlock skips the expand conv when expand_ratio == 1, but the reference model has it
      (conv1x1 -> BN -> ReLU6 even for mbconv1): a semantic difference from the reference.
    - ModelNew's fc parameters are `torch.randn` under other names than the reference's `fc`.
    - The depthwise conv, most BN/ReLU and conv1/conv2 stay in PyTorch (unfused).
    """
    bn_loads = {(rule, line) for line in (99, 101, 103, 105) for rule in ("FUS003", "FUS004", "FUS005")}
    assert seed_violations("seed_efficientnet_b1.py") == bn_loads | {
        ("FUS005", 45),  # spatial_offset recomputes hw_mask's tl.arange(0, BLOCK_SIZE_HW)
        ("FUS005", 57),  # c_offs (the K loop) reuses tl.arange(0, BLOCK_SIZE_C)
        ("FUS005", 61),  # n_offs recomputes tl.arange(0, BLOCK_SIZE_N) in the loop
        ("FUS005", 77),  # oc_offs recomputes the output channels' offsets in the loop
        ("FUS005", 116),  # n_offs_out
        ("FUS005", 117),  # oc_offs_out
        ("TRI006", 162),  # BLOCK_SIZE_N = 4 if N >= 4 else min(N, 1)
        ("TRI006", 163),  # BLOCK_SIZE_C = 32 if C_out >= 32 else min(C_out, 16)
        ("LAY001", 171),  # kernel fused_linear_bias_kernel after wrapper fused_pointwise_conv_bn_relu6
        ("KB101", 5),  # KernelBench warns: import torch.nn.functional as F
        ("KB102", 300),  # F.relu6 in FusedMBConvBlock
        ("KB102", 339),  # F.relu in ModelNew.forward
        ("KB102", 353),  # F.relu
    }


# ---------------------------------------------------------------------------------------------
# The CLI


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes(tmp_path, capsys):
    clean, dirty = tmp_path / "clean.py", tmp_path / "dirty.py"
    clean.write_text(model_file(ADD))
    dirty.write_text(CASES["TRI002"][1])
    assert run_cli(capsys, "lint", str(clean)) == (0, "", "")
    code, out, err = run_cli(capsys, "lint", str(clean), str(dirty))
    assert code == 1 and err == ""
    assert (
        out
        == f"{dirty}:{found(CASES['TRI002'][1]).pop()[1]}:25: TRI002 tl.program_id axis 3: Triton grids have axes 0, 1 and 2 only\n"
    )

    (tmp_path / "syntax.py").write_text("def f(:\n")
    code, out, err = run_cli(capsys, "lint", str(dirty), str(tmp_path / "syntax.py"), str(tmp_path / "none.py"))
    assert code == 2 and "TRI002" in out
    assert f"{tmp_path / 'syntax.py'}:1:7: error: not valid Python: " in err
    assert f"{tmp_path / 'none.py'}: error: cannot read: No such file or directory" in err
    assert "Traceback" not in err
    assert run_cli(capsys, "lint")[0] == 2


def test_cli_json_and_directories(tmp_path, capsys):
    (tmp_path / "dirty.py").write_text(CASES["FUS001"][1])
    code, out, _ = run_cli(capsys, "lint", "--format", "json", str(tmp_path))
    assert code == 1
    (record,) = json.loads(out)
    assert record.keys() == {"file", "line", "column", "rule", "message", "severity"}
    assert (record["file"], record["rule"], record["column"], record["severity"]) == (
        str(tmp_path / "dirty.py"),
        "FUS001",
        5,
        "error",
    )
    code, out, _ = run_cli(capsys, "lint", "--format", "json", str(ROOT / "generated"))
    assert code == 0  # warnings only
    assert {(r["rule"], r["severity"]) for r in json.loads(out)} == {(r, "warning") for r in GENERATED_WARNINGS}


def test_cli_rules_lists_every_rule(capsys):
    code, out, _ = run_cli(capsys, "lint", "--rules")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(RULES)
    for r, line in zip(RULES, lines):
        assert line == f"{r.id}  {r.name}{' (warning)' if r.id.startswith('KB1') else ''}: {r.rationale}"


def test_cli_entry_point_runs_lint():
    result = subprocess.run(
        [sys.executable, "-m", "fusegen", "lint", str(DATA / "seed_mobilenet_v1.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-1].endswith(
        ":564:1: LAY001 `import math` after class ModelNew (line 525): ModelNew comes last"
    )


def test_build_refuses_generated_code_that_fails_lint(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "tiny.fuse"
    spec.write_text("model Tiny(c=4)\ninput(1, c, 5, 5)\nforward:\n    conv: conv3x3(c, 8) -> bn: bn(8) -> relu\n")
    monkeypatch.setattr(cli, "compile_spec", lambda source, path: CASES["FUS002"][1])
    code, out, err = run_cli(capsys, "build", str(spec), "--out-dir", str(tmp_path / "out"))
    assert code == cli.INTERNAL_ERROR != 2
    assert f"fusegen: internal error: generated code for {spec} violates lint rules (a generator bug" in err
    assert f"  {tmp_path / 'out' / 'tiny.py'}:" in err and " FUS002 " in err
    assert not (tmp_path / "out").exists()


def test_build_writes_code_with_kernelbench_warnings_but_refuses_its_strict_findings(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "tiny.fuse"
    spec.write_text("model Tiny(c=4)\ninput(1, c, 5, 5)\nforward:\n    conv: conv3x3(c, 8) -> bn: bn(8) -> relu\n")
    monkeypatch.setattr(cli, "compile_spec", lambda source, path: CASES["KB103"][1])
    assert run_cli(capsys, "build", str(spec), "--out-dir", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "tiny.py").read_text() == CASES["KB103"][1]
    monkeypatch.setattr(cli, "compile_spec", lambda source, path: CASES["KB001-pass"][1])
    code, _, err = run_cli(capsys, "build", str(spec), "--out-dir", str(tmp_path / "out2"))
    assert code == cli.INTERNAL_ERROR and " KB001 `pass` reads as a pass statement" in err
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------
# KernelBench's rule set


def kernelbench_findings(source: str) -> list[tuple[str, int, int]]:
    kb = [r for r in RULES if r.id.startswith("KB")]
    return [(v.rule, v.line, v.column) for v in lint_source(source, "case.py", kb)]


def test_kernelbench_reads_text_as_its_checker_does():
    """Each line is cut at its first `#` or `//` wherever they stand; docstrings and strings are read."""
    clean = model_file(ADD)
    assert kernelbench_findings(clean) == []
    line = clean.count("\n") + 3  # of what follows "\n\n"
    assert kernelbench_findings(clean + '\n\nNOTE = "try: it"\n') == [("KB001", line, 9)]
    assert kernelbench_findings(clean + '\n\nNOTE = "#"; PASS = "pass"\n') == []  # `#` in a string cuts too
    assert kernelbench_findings(clean + "\n\nHALF = 8 // 2 + torch.relu(x)\n") == []  # so does floor division
    assert kernelbench_findings(clean + "\n\nHALF = 8 / 2 + torch.relu(x)\n") == [("KB102", line, 16)]
    assert kernelbench_findings(clean + "\n\nLAYER = nn.Linear(4, 4)\n") == []  # only `torch.nn.<layer>` counts
    assert kernelbench_findings(clean + '\n\nRATE = "a pass-through"\nTEXT = """\n  except ValueError"""\n') == [
        ("KB001", line, 11),
        ("KB001", line + 2, 3),
    ]


def test_kernelbench_option_runs_only_its_rules_and_warnings_exit_0(tmp_path, capsys):
    warned = tmp_path / "warned.py"
    warned.write_text(CASES["KB102"][1])
    line = CASES["KB102"][1].split("\n").index("        y = torch.relu(add(x))  # <-") + 1
    code, out, err = run_cli(capsys, "lint", str(warned))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{warned}:{line}:13: KB102 warning: `torch.relu` reads as a torch computation op: KernelBench's "
        "torch_computation_ops check warns",
        f"{warned}:{line + 1}:16: KB102 warning: `nn.functional.gelu` reads as a torch.nn.functional op: "
        "KernelBench's torch_computation_ops check warns",
    ]
    both = tmp_path / "both.py"  # a seed rule's error and a KernelBench warning
    both.write_text(CASES["TRI002"][1].replace("return add(x)", "return torch.relu(add(x))"))
    code, out, _ = run_cli(capsys, "lint", str(both))
    assert code == 1 and {line.split()[1] for line in out.splitlines()} == {"TRI002", "KB102"}
    code, out, _ = run_cli(capsys, "lint", "--kernelbench", str(both))
    assert code == 0 and {line.split()[1] for line in out.splitlines()} == {"KB102"}
    code, out, _ = run_cli(capsys, "lint", "--kernelbench", "--rules")
    assert [line.split()[0] for line in out.splitlines()] == [r.id for r in RULES if r.id.startswith("KB")]


PIECES = ["class", "class ", " X", "\n", "\t", "(Tensor)", "(torch.Tensor)", "tl.astype(", "tl.astype (", "x", ","]
PIECES += [", tl.float16)", ",tl.float16 )", "tl.float16", ")", "("]


@settings(max_examples=2000)  # microseconds each
@given(st.lists(st.sampled_from(PIECES), max_size=24).map("".join))
def test_linear_finders_match_what_re_finditer_finds(text):
    for finder in (lint._tensor_classes, lint._astype_float16):
        pattern = lint._TENSOR_CLASS if finder is lint._tensor_classes else lint._ASTYPE_FLOAT16
        assert [m.span() for m in finder(text)] == [m.span() for m in pattern.finditer(text)]


def test_kernelbench_rules_take_linear_time_on_long_lines():
    """re.finditer of KernelBench's `class` and `tl.astype` patterns takes minutes on such docstrings."""
    kb = [r for r in RULES if r.id.startswith("KB")]
    for line in ("class a " * 50_000, "tl.astype(x " * 50_000):
        start = time.perf_counter()
        found = lint_source(f'"""{line}"""\n', "long.py", kb)
        assert time.perf_counter() - start < 10
        assert {v.rule for v in found} == {"KB005"}  # no kernel


# ---------------------------------------------------------------------------------------------
# Files lint cannot check: exit 2, one line, no traceback


def test_special_files_exit_2_without_waiting_or_reading_forever(tmp_path):
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "fusegen", "lint", "/dev/zero", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "/dev/zero: error: not a regular file",
        f"{fifo}: error: not a regular file",
    ]


def test_unreadable_inputs_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * 200_000)  # 1.2 MB
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"x = '\xe9'\n")
    monkeypatch.setattr(cli, "LINT_MAX_BYTES", 2**20)
    code, out, err = run_cli(capsys, "lint", str(tmp_path / "empty"), str(big), str(latin))
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[:2] == [
        f"{tmp_path / 'empty'}: error: no .py files in this directory",
        f"{big}: error: larger than 1 MiB, the most fusegen lint checks",
    ]
    assert lines[2].startswith(f"{latin}: error: cannot read: 'utf-8' codec can't decode byte 0xe9")
    assert len(lines) == 3


@pytest.mark.parametrize(
    "source",
    [
        "x = " + "-" * 5000 + "1\n",  # too deep for Python's parser
        "x = " + "-" * 100000 + "1\n",  # Python's parser runs out of memory (MemoryError)
        model_file(ADD.replace("x + 1.0", " + ".join(["x"] * 1200))),  # parses; too deep for the rules
    ],
    ids=["parser", "parser-memory", "rules"],
)
def test_code_nested_too_deeply_exits_2(tmp_path, capsys, source):
    path = tmp_path / "deep.py"
    path.write_text(source)
    assert run_cli(capsys, "lint", str(path)) == (
        2,
        "",
        f"{path}: error: nested too deeply to check (Python's recursion limit)\n",
    )
