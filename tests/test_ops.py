"""Property tests for every op and every kind of fused chain: random shapes, compared with plain torch.

Each test builds spec text from drawn integers, compiles it with `load_spec`, runs `ModelNew` in eval
mode with randomised BatchNorm statistics on random data, and compares with a reference written in
torch.nn.functional that uses the model's own parameters but the test's own strides, paddings and
eps (so a module built with the wrong hyper-parameters is caught too).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from itertools import count
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from fusegen import compile_spec
from helpers import DEVICE, ON_GPU, TOLERANCE, load_source, load_spec, randomize_batchnorm, rel_error

# Random examples per test, on top of the pinned @example edge cases. No shrinking: under the
# interpreter it can take minutes, and the failure message already shows the failing spec.
few_examples = settings(max_examples=10, phases=[Phase.explicit, Phase.reuse, Phase.generate])

batches = st.integers(1, 3)
# Channel counts that are not multiples of the 16-wide blocks come up often. The kernels tile
# channels by at most 64, so pinned examples with WIDE channels also cover several channel blocks.
channels = st.one_of(st.sampled_from([1, 3, 5, 17, 33]), st.integers(1, 40))
WIDE = 70
sizes = st.integers(1, 20)  # H and W are drawn independently: odd, non-square and 1 all come up
strides = st.sampled_from([1, 2])


# -- ops as a spec writes them, each with its torch reference ---------------------------------------------


@dataclass(frozen=True)
class Op:
    call: str  # as written in a spec, without a name: "conv3x3(3, 8, stride=2, padding=1)"
    reference: Callable[[nn.Module | None, torch.Tensor], torch.Tensor]  # (the op's module, input) -> output
    has_params: bool = True  # at the top level it needs a name, and its module is `model.<name>`


def padding_arg(padding: int | None) -> str:
    """The spec's padding keyword; None leaves it out, so the op's default k // 2 applies."""
    return "" if padding is None else f", padding={padding}"


def conv(k: int, c_in: int, c_out: int, stride: int = 1, padding: int | None = None) -> Op:
    """convKxK (padding None: the op's default k // 2), or the conv1x1 GEMM op for k == 1."""
    if k == 1:
        assert padding in (None, 0), "conv1x1 has no padding argument"
        call, pad = f"conv1x1({c_in}, {c_out}, stride={stride})", 0
    else:
        pad = k // 2 if padding is None else padding
        call = f"conv{k}x{k}({c_in}, {c_out}, stride={stride}{padding_arg(padding)})"
    return Op(call, lambda m, y: F.conv2d(y, m.weight, None, stride, pad))


def dwconv(k: int, c: int, stride: int = 1, padding: int | None = None) -> Op:
    pad = k // 2 if padding is None else padding
    call = f"dwconv{k}x{k}({c}, stride={stride}{padding_arg(padding)})"
    return Op(call, lambda m, y: F.conv2d(y, m.weight, None, stride, pad, groups=c))


def bn(c: int, eps: float | None = None) -> Op:
    call = f"bn({c})" if eps is None else f"bn({c}, eps={eps!r})"
    e = 1e-5 if eps is None else eps
    return Op(call, lambda m, y: F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, e))


def linear(f_in: int, f_out: int) -> Op:
    return Op(f"linear({f_in}, {f_out})", lambda m, y: F.linear(y, m.weight, m.bias))


def avgpool(k: int) -> Op:
    return Op(f"avgpool({k})", lambda m, y: F.avg_pool2d(y, k))


relu = Op("relu", lambda m, y: F.relu(y), has_params=False)
relu6 = Op("relu6", lambda m, y: F.relu6(y), has_params=False)
global_avgpool = Op("global_avgpool", lambda m, y: F.adaptive_avg_pool2d(y, 1), has_params=False)
flatten = Op("flatten", lambda m, y: torch.flatten(y, 1), has_params=False)

ACTIVATIONS = {"relu": relu, "relu6": relu6}


# -- running a spec against the reference ---------------------------------------------------------------


def load(text: str):
    return load_spec(text, "test_ops_" + hashlib.sha1(text.encode()).hexdigest()[:12])


def spec_text(input_shape: tuple[int, ...], lines: list[str]) -> str:
    header = ["model Net()", f"input({', '.join(map(str, input_shape))})", "forward:"]
    return "\n".join(header + [f"    {line}" for line in lines]) + "\n"


Step = tuple[Op, str | None]  # an op and the ModelNew attribute that holds its module


def check(input_shape: tuple[int, ...], *chains: list[Op], seed: int = 0, layout=None, model_layout=None):
    """Compiles one spec line per chain (ops with parameters named op0, op1, ...) and compares
    ModelNew with the reference on random data; returns the generated module."""
    names = (f"op{i}" for i in count())
    lines, steps = [], []
    for chain in chains:
        calls = []
        for op in chain:
            name = next(names) if op.has_params else None
            calls.append(f"{name}: {op.call}" if name else op.call)
            steps.append((op, name))
        lines.append(" -> ".join(calls))
    text = spec_text(input_shape, lines)
    return compare(text, steps, input_shape, seed=seed, layout=layout, model_layout=model_layout)


def compare(text: str, steps: list[Step], input_shape, kwargs=None, seed: int = 0, layout=None, model_layout=None):
    """Runs `ModelNew(**kwargs)` of a spec on random data; the reference applies `steps` in order. Returns
    the generated module.

    `layout` (optional) re-lays the input out in memory (other strides, maybe a storage offset or
    broadcast rows) before the model sees it; the reference gets a contiguous copy of the same values.
    """
    module = load(text)
    torch.manual_seed(seed)
    model = module.ModelNew(**(kwargs or {})).to(DEVICE).eval()
    randomize_batchnorm(model, seed)
    if model_layout is not None:
        model = model.to(memory_format=model_layout)
    # Scaled up so that relu6's clamp at 6 is exercised too, not only the one at 0.
    x = 4 * torch.randn(input_shape, device=DEVICE)
    if layout is not None:
        x = layout(x)
    x_before = x.clone()
    exact_model = copy.deepcopy(model).double()
    clamps_from = len(steps) - trailing_clamps(steps)
    with torch.no_grad():
        out = model(x)
        unclamped = x.double().contiguous()
        for op, name in steps[:clamps_from]:
            unclamped = op.reference(getattr(exact_model, name) if name else None, unclamped)
        exact = unclamped
        for op, name in steps[clamps_from:]:
            exact = op.reference(None, exact)  # relu or relu6: no module
    assert torch.equal(x, x_before), "the model wrote to its input"
    err = clamped_error(out, exact, unclamped)
    assert err < TOLERANCE, f"relative error {err:.3g} >= {TOLERANCE}\nModelNew({kwargs or ''}) of spec:\n{text}"
    return module


def trailing_clamps(steps: list[Step]) -> int:
    """How many of the last steps are relu or relu6."""
    clamps = 0
    while clamps < len(steps) and steps[-1 - clamps][0] in ACTIVATIONS.values():
        clamps += 1
    return clamps


def clamped_error(out: torch.Tensor, exact: torch.Tensor, unclamped: torch.Tensor) -> float:
    """||out - exact|| over the larger of ||exact|| and ||unclamped||, the exact output before its trailing
    relu/relu6. A clamp can leave one value of a whole channel standing, and that value may be the small
    difference of the affine epilogue's two large terms: its float32 rounding, at most an ulp of those terms,
    is then a large part of the output's norm (1.3e-5 of it, at c_out=1: the error this once failed at).
    Relative to the values before the clamp, the rounding is what float32 gives anywhere. The reference is
    float64, so the error is the model's alone."""
    assert out.shape == exact.shape, (out.shape, exact.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    scale = max(exact.norm().item(), unclamped.norm().item(), 1e-30)
    return (out.double() - exact).norm().item() / scale


def at_least(size: int, minimum: int) -> int:
    return max(size, minimum)


# -- each anchor alone -----------------------------------------------------------------------------------


@few_examples
@given(
    k=st.sampled_from([3, 5]),
    padding=st.sampled_from([0, 1, None]),
    stride=strides,
    n=batches,
    c_in=channels,
    c_out=channels,
    h=sizes,
    w=sizes,
)
@example(k=3, padding=None, stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(k=3, padding=1, stride=2, n=3, c_in=17, c_out=33, h=9, w=14)
@example(k=5, padding=0, stride=2, n=2, c_in=5, c_out=3, h=7, w=5)
@example(k=5, padding=None, stride=1, n=1, c_in=3, c_out=17, h=1, w=6)
@example(k=3, padding=None, stride=1, n=1, c_in=2, c_out=64, h=128, w=128)  # tiles of 128 rows
def test_conv_kxk(k, padding, stride, n, c_in, c_out, h, w):
    smallest = k - 2 * (k // 2 if padding is None else padding)  # the window must fit in the padded input
    shape = (n, c_in, at_least(h, smallest), at_least(w, smallest))
    check(shape, [conv(k, c_in, c_out, stride, padding)])


@few_examples
@given(stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(stride=2, n=3, c_in=33, c_out=17, h=1, w=1)
@example(stride=2, n=2, c_in=40, c_out=5, h=11, w=4)
@example(stride=1, n=2, c_in=WIDE, c_out=WIDE, h=3, w=5)
def test_conv1x1(stride, n, c_in, c_out, h, w):
    check((n, c_in, h, w), [conv(1, c_in, c_out, stride)])


def tf32_bits(t: torch.Tensor, round_half: int) -> torch.Tensor:
    """t as TF32: its low 13 mantissa bits dropped after adding `round_half` (0x1000 rounds to nearest)."""
    return ((t.view(torch.int32) + round_half) & ~0x1FFF).view(torch.float32)


def with_dot_precision(spec: str, precision: str, convs: int) -> nn.Module:
    """ModelNew of `spec`, whose `convs` convs choose their dot with dot_precision, with that choice forced
    to `precision` (so the GPU's paths run on the CPU too)."""
    source = compile_spec(spec, f"specs/{precision}.fuse")
    choice = "DOT_PRECISION = dot_precision(x, conv)"
    assert source.count(choice) == convs
    module = load_source(source.replace(choice, f'DOT_PRECISION = "{precision}"'), precision)
    torch.manual_seed(0)
    return module.ModelNew().to(DEVICE).eval()


def test_tf32_dot_rounds_its_operands_to_nearest():
    """The GPU's "tf32" tl.dot path, on the CPU too: both operands are rounded to the nearest TF32 value
    first (tensor cores would truncate them), then multiplied exactly and summed in fp32."""
    model = with_dot_precision(spec_text((2, 48, 5, 3), ["op0: conv1x1(48, 24)"]), "tf32", convs=1)
    x = torch.randn(2, 48, 5, 3, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        weight = model.op0.weight

        def conv_of(round_half):
            return F.conv2d(tf32_bits(x, round_half).double(), tf32_bits(weight, round_half).double())

        rounded, truncated = rel_error(out, conv_of(0x1000)), rel_error(out, conv_of(0))
    # (interpreter: 9e-8 and 9e-4; plain fp32 operands would be 3e-4 off the rounded ones)
    assert rounded < 2e-5, f"{rounded:.2g} off the product of the rounded operands"
    assert truncated > 10 * rounded, "the operands were truncated, not rounded"


def test_tf32x3_split_dot_adds_the_weights_low_part():
    """The GPU's "tf32x3_split" path of a 3x3 conv and a transposed conv, on the CPU too: the weight's TF32
    rounding (dot_weight) and what it leaves (dot_weight_low) meet the split input tile in three products,
    fp32's accuracy where the rounded weight alone is 1e-4 off."""
    spec = spec_text((2, 8, 7, 6), ["op0: conv3x3(8, 24) -> relu", "op1: conv_transpose(24, 8, 2, 2)"])
    model = with_dot_precision(spec, "tf32x3_split", convs=2)
    x = torch.randn(2, 8, 7, 6, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        a, b = model.op0, model.op1

        def net(round_weights):
            first, second = (tf32_bits(w, 0x1000) if round_weights else w for w in (a.weight, b.weight))
            hidden = F.relu(F.conv2d(x.double(), first.double(), padding=1))
            return F.conv_transpose2d(hidden, second.double(), b.bias.double(), stride=2)

        split, rounded_weights = rel_error(out, net(False)), rel_error(out, net(True))
    # (interpreter: 1e-7 and 2e-4)
    assert split < 1e-6, f"{split:.2g} off the exact product"
    assert rounded_weights > 100 * split, "the weights' low part was left out"


def test_fp16_dot_multiplies_float16_operands():
    """The GPU's "fp16" tl.dot path (a conv reading float16 activations), on the CPU too: the activation
    tile and dot_weight's copy of the weight are both rounded to nearest float16, and their products
    summed in fp32."""
    spec = "model Net()\ninput(2, 48, 5, 3)\nactivations(float16)\nforward:\n"
    model = with_dot_precision(spec + "    a: conv1x1(48, 64) -> relu\n    b: conv1x1(64, 24)\n", "fp16", convs=2)
    x = torch.randn(2, 48, 5, 3, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        a, b = model.a.weight.double(), model.b.weight.double()
        hidden = F.relu(F.conv2d(x.half().double(), a.half().double())).half().double()
        rounded = rel_error(out, F.conv2d(hidden, b.half().double()))
        # the same, but with the second conv's weight as it is
        unrounded_weight = rel_error(out, F.conv2d(hidden, b))
    # (interpreter: 1e-7 and 4e-4)
    assert rounded < 2e-5, f"{rounded:.2g} off the product of the rounded operands"
    assert unrounded_weight > 10 * rounded, "the weight was not rounded to float16"


def test_dot_weight_rounds_once_per_version_of_the_weight():
    module = load_spec(spec_text((1, 8, 4, 4), ["op0: conv1x1(8, 16)"]), "dot_weight")
    conv = nn.Conv2d(8, 16, 1, bias=False)
    assert module.dot_weight(conv, "tf32x3") is conv.weight  # other precisions take the weight as it is
    rounded = module.dot_weight(conv, "tf32")
    assert torch.equal(rounded, tf32_bits(conv.weight.detach(), 0x1000))
    assert not torch.equal(rounded, conv.weight) and rounded.stride() == conv.weight.stride()
    assert module.dot_weight(conv, "tf32") is rounded  # kept while the weight is unchanged
    with torch.no_grad():
        conv.weight.mul_(3.0)  # in place: a new version
    assert torch.equal(module.dot_weight(conv, "tf32"), tf32_bits(conv.weight.detach(), 0x1000))
    conv.weight = nn.Parameter(torch.randn(16, 8, 1, 1))  # replaced
    assert torch.equal(module.dot_weight(conv, "tf32"), tf32_bits(conv.weight.detach(), 0x1000))
    channels_last = nn.Conv2d(8, 16, 3, bias=False).to(memory_format=torch.channels_last)
    assert module.dot_weight(channels_last, "tf32").stride() == channels_last.weight.stride()


def test_a_conv_weight_comes_in_the_k_loops_order():
    """A Conv2d's dot_weight (and dot_weight_low) is (out, kh, kw, in) in memory, the KxK conv's K order, at
    every precision, whatever the module's layout; made once per version; a weight already in that order is
    taken as it is. A transposed conv's keeps its strides (its K loop reads them)."""
    module = load_spec(spec_text((1, 8, 4, 4), ["op0: conv3x3(8, 16)"]), "dot_weight_order")
    conv = nn.Conv2d(8, 16, 3, bias=False)
    weight = conv.weight.detach().clone()
    for precision in ("ieee", "tf32x3", "tf32", "tf32x3_split", "fp16"):
        operand = module.dot_weight(conv, precision)
        assert operand.is_contiguous(memory_format=torch.channels_last), precision
        assert operand.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        assert torch.equal(operand, module.dot_weight(conv, precision)), precision
    assert torch.equal(module.dot_weight(conv, "ieee"), weight)
    assert module.dot_weight(conv, "ieee") is module.dot_weight(conv, "tf32x3")  # one copy, kept
    assert torch.equal(module.dot_weight(conv, "tf32"), tf32_bits(weight, 0x1000))
    assert module.dot_weight_low(conv, "tf32x3_split").is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # in place: a new version
    assert torch.equal(module.dot_weight(conv, "ieee"), 3.0 * weight)
    moved = nn.Conv2d(8, 16, 3, bias=False).to(memory_format=torch.channels_last)
    assert module.dot_weight(moved, "ieee") is moved.weight
    transposed = nn.ConvTranspose2d(8, 16, 2, stride=2)
    assert module.dot_weight(transposed, "ieee") is transposed.weight
    assert module.dot_weight(transposed, "tf32").stride() == transposed.weight.stride()


def test_dot_weight_low_is_what_tf32_leaves_of_the_weight():
    """dot_weight_low(m, "tf32x3_split"): the weight less dot_weight's TF32 rounding (which "tf32x3_split"
    shares with "tf32"), itself a TF32 value, with the weight's strides, made once per version; other
    precisions read no low part (the weight as it is)."""
    module = load_spec(spec_text((1, 8, 4, 4), ["op0: conv3x3(8, 16)"]), "dot_weight_low")
    conv = nn.Conv2d(8, 16, 3, bias=False).to(memory_format=torch.channels_last)
    high, low = module.dot_weight(conv, "tf32x3_split"), module.dot_weight_low(conv, "tf32x3_split")
    assert high is module.dot_weight(conv, "tf32") and low.stride() == conv.weight.stride()
    weight = conv.weight.detach()
    assert torch.equal(low, tf32_bits(weight - high, 0x1000)) and torch.count_nonzero(low) > 0
    assert ((high.double() + low.double() - weight.double()).abs() <= weight.double().abs() * 2.0**-21).all()
    assert module.dot_weight_low(conv, "tf32x3_split") is low  # kept while the weight is unchanged
    with torch.no_grad():
        conv.weight.mul_(3.0)  # in place: a new version
    moved = module.dot_weight_low(conv, "tf32x3_split")
    assert torch.equal(moved, tf32_bits(conv.weight.detach() - module.dot_weight(conv, "tf32"), 0x1000))
    for precision in ("tf32", "tf32x3", "fp16", "ieee"):
        assert module.dot_weight_low(conv, precision) is conv.weight


def test_dot_weight_in_float16_only_where_it_rounds_as_well_as_tf32():
    """dot_weight(m, "fp16"): a float16 copy, once per version, unless the largest magnitude is outside
    [2**-8, 2**15]: then None, and dot_precision keeps "tf32"."""
    module = load_spec(spec_text((1, 8, 4, 4), ["op0: conv1x1(8, 16)"]), "dot_weight")
    conv = nn.Conv2d(8, 16, 1, bias=False)
    half = module.dot_weight(conv, "fp16")
    assert half.dtype == torch.float16 and torch.equal(half, conv.weight.detach().half())
    assert module.dot_weight(conv, "fp16") is half  # kept while the weight is unchanged
    for scale, fits in ((2.0**-14, False), (2.0**24, False), (1.0, True)):
        with torch.no_grad():
            conv.weight.copy_(torch.rand(16, 8, 1, 1) * 0.5 + 0.5).mul_(scale)  # in place: a new version
        assert (module.dot_weight(conv, "fp16") is not None) == fits, scale
    assert module.dot_precision(torch.rand(1, 8, 4, 4), conv) == "ieee"  # Triton's interpreter


FLOAT16_NET = """\
model Net()
input(2, 8, 9, 7)
activations(float16)
forward:
    pw: conv1x1(8, 24) -> bn1: bn(24) -> relu
    dw: dwconv3x3(24) -> bn2: bn(24) -> relu
    mid: conv1x1(24, 24) -> bn3: bn(24) -> relu
    out: conv1x1(24, 16) -> bn4: bn(16)
"""


@pytest.mark.skipif(DEVICE != "cuda", reason='the interpreter computes every dot in fp32 ("ieee")')
def test_float16_activations_with_a_tiny_weight():
    """A 1x1 conv weight scaled by 2**-20 (its BatchNorm's weight by 2**20 makes up for it) would lose
    most of its bits in float16's subnormals: that conv keeps its TF32 dot, the one before it runs
    float16, and the net stays within TOLERANCE of float64."""
    module = load_spec(FLOAT16_NET, "float16_net")
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 8, 9, 7, device=DEVICE)
    with torch.no_grad():
        model.out.weight.mul_(2.0**-20)
        model.bn4.weight.mul_(2.0**20)
        exact = copy.deepcopy(model).double().reference_forward(x.double())
        err = rel_error(model(x), exact)
    # the first conv reads the model's float32 input: "tf32"; the others float16 activations
    assert [module.dot_precision(x.half(), m) for m in (model.mid, model.out)] == ["fp16", "tf32"]
    assert err < TOLERANCE, err


@few_examples
@given(
    k=st.sampled_from([3, 5]),
    padding=st.sampled_from([0, None]),
    stride=strides,
    n=batches,
    c=channels,
    h=sizes,
    w=sizes,
)
@example(k=3, padding=None, stride=1, n=1, c=1, h=1, w=1)
@example(k=3, padding=None, stride=2, n=2, c=17, h=1, w=1)
@example(k=5, padding=None, stride=2, n=3, c=33, h=13, w=6)
@example(k=5, padding=0, stride=1, n=1, c=5, h=5, w=9)
@example(k=3, padding=None, stride=1, n=2, c=WIDE, h=4, w=3)
def test_dwconv(k, padding, stride, n, c, h, w):
    smallest = k - 2 * (k // 2 if padding is None else padding)
    check((n, c, at_least(h, smallest), at_least(w, smallest)), [dwconv(k, c, stride, padding)])


@few_examples
@given(n=batches, c=channels, h=st.integers(1, 3), w=st.integers(1, 3), f_out=channels)
@example(n=1, c=1, h=1, w=1, f_out=1)
@example(n=3, c=17, h=1, w=1, f_out=33)
@example(n=2, c=5, h=3, w=2, f_out=17)
@example(n=2, c=WIDE, h=1, w=2, f_out=WIDE)
@example(n=17, c=WIDE, h=1, w=4, f_out=WIDE)
@example(n=17, c=5, h=1, w=2, f_out=16384)
def test_linear(n, c, h, w, f_out):
    """A bare `flatten` line (a view, no kernel) feeds the 2-d linear kernels. Under 256 tiles K is split:
    up to 16 rows (all drawn examples) in slices of one K step of up to 64 features (140 features: two
    whole slices and one of 12), from 17 rows of four steps (280 features: 256 and 24); from 256 tiles
    (17 x 16384) it is one slice."""
    check((n, c, h, w), [flatten], [linear(c * h * w, f_out)])


@few_examples
@given(k=st.sampled_from([2, 3]), n=batches, c=channels, h=sizes, w=sizes)
@example(k=2, n=1, c=1, h=2, w=2)
@example(k=3, n=3, c=17, h=3, w=11)
@example(k=2, n=2, c=33, h=9, w=5)
def test_avgpool(k, n, c, h, w):
    check((n, c, at_least(h, k), at_least(w, k)), [avgpool(k)])


@few_examples
@given(then_flatten=st.booleans(), n=batches, c=channels, h=sizes, w=sizes)
@example(then_flatten=True, n=1, c=1, h=1, w=1)
@example(then_flatten=False, n=3, c=33, h=1, w=1)
@example(then_flatten=True, n=2, c=17, h=7, w=12)
@example(then_flatten=False, n=1, c=5, h=13, w=3)
@example(then_flatten=True, n=2, c=WIDE, h=2, w=3)
def test_global_avgpool(then_flatten, n, c, h, w):
    check((n, c, h, w), [global_avgpool, flatten] if then_flatten else [global_avgpool])


# -- fused chains: anchor -> elementwise epilogue -------------------------------------------------------

EPILOGUES = {"bn": [], "bn_relu": [relu], "bn_relu6": [relu6]}  # after the bn


def anchor_op(kind: str, c_in: int, c_out: int, stride: int) -> tuple[Op, int]:
    """The anchor and its output channels."""
    if kind == "dwconv3x3":
        return dwconv(3, c_in, stride), c_in
    return conv(1 if kind == "conv1x1" else 3, c_in, c_out, stride), c_out


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("kind", ["conv3x3", "dwconv3x3", "conv1x1"])
@few_examples
@given(stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(stride=2, n=3, c_in=17, c_out=33, h=9, w=4)
@example(stride=1, n=2, c_in=WIDE, c_out=WIDE, h=3, w=2)
def test_anchor_epilogue(kind, epilogue, stride, n, c_in, c_out, h, w):
    anchor, channels_out = anchor_op(kind, c_in, c_out, stride)
    check((n, c_in, h, w), [anchor, bn(channels_out), *EPILOGUES[epilogue]])


@few_examples
@given(n=batches, c=channels, h=sizes, w=sizes, f_out=channels)
@example(n=1, c=1, h=1, w=1, f_out=1)
@example(n=3, c=33, h=5, w=8, f_out=17)
def test_global_avgpool_flatten_linear_relu(n, c, h, w, f_out):
    """`global_avgpool -> flatten` then `linear -> relu`: the 2-d anchor with an epilogue."""
    check((n, c, h, w), [global_avgpool, flatten], [linear(c, f_out), relu])


# -- a pool at the end of an anchor's kernel ------------------------------------------------------------

POOLS = {
    "avgpool2": [avgpool(2)],
    "avgpool3": [avgpool(3)],
    "global": [global_avgpool],
    "global_flatten": [global_avgpool, flatten],
}


@pytest.mark.parametrize("kind", ["conv3x3", "dwconv3x3", "conv1x1"])
@few_examples
@given(pool=st.sampled_from(list(POOLS)), stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(pool="global", stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(pool="avgpool2", stride=1, n=1, c_in=1, c_out=1, h=2, w=2)
@example(pool="global_flatten", stride=1, n=2, c_in=5, c_out=WIDE, h=9, w=8)  # 72 pixels: two 64-row tiles
@example(pool="avgpool3", stride=2, n=3, c_in=17, c_out=33, h=14, w=9)  # 7x5: a row and 2 columns left over
@example(pool="global", stride=2, n=1, c_in=9, c_out=22, h=4, w=6)  # 16-row tiles summed wrongly on an H200
def test_pool_ends_the_anchor_kernel(kind, pool, stride, n, c_in, c_out, h, w):
    """`anchor -> bn -> relu -> pool`: one kernel computes the anchor over each pooling window, tile by
    tile, and stores only the pooled pixels; pixels that no window covers are never computed."""
    anchor, channels_out = anchor_op(kind, c_in, c_out, stride)
    k = int(pool[-1]) if pool.startswith("avgpool") else 1
    size = (k - 1) * stride + 1  # the least input whose anchor output, (size - 1) // stride + 1, holds a window
    check((n, c_in, at_least(h, size), at_least(w, size)), [anchor, bn(channels_out), relu, *POOLS[pool]])


# -- elementwise-only chains (the identity "load" anchor) ------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@few_examples
@given(eps=st.sampled_from([None, 1e-3]), n=batches, c=channels, h=sizes, w=sizes)
@example(eps=None, n=1, c=1, h=1, w=1)
@example(eps=1e-3, n=3, c=33, h=7, w=12)
def test_elementwise_chain_4d(activation, eps, n, c, h, w):
    check((n, c, h, w), [bn(c, eps), ACTIVATIONS[activation]])


@few_examples
@given(n=batches, c=channels, h=st.integers(1, 4), w=st.integers(1, 4))
@example(n=1, c=1, h=1, w=1)
@example(n=3, c=17, h=3, w=2)
def test_elementwise_chain_2d(n, c, h, w):
    """`relu6` alone on the 2-d output of `flatten`."""
    check((n, c, h, w), [flatten], [relu6])


# -- prologue chains: elementwise ops on each input tile as the anchor loads it -------------------------


@few_examples
@given(with_epilogue=st.booleans(), stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(with_epilogue=False, stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(with_epilogue=True, stride=2, n=3, c_in=33, c_out=17, h=1, w=1)
@example(with_epilogue=False, stride=2, n=2, c_in=17, c_out=5, h=9, w=6)
@example(with_epilogue=True, stride=1, n=2, c_in=WIDE, c_out=WIDE, h=2, w=3)
# all but one output clamped to zero, and that one the difference of two near-equal terms (see clamped_error)
@example(with_epilogue=True, stride=2, n=2, c_in=36, c_out=1, h=11, w=3)
def test_prologue_conv1x1(with_epilogue, stride, n, c_in, c_out, h, w):
    """`bn -> relu -> conv1x1`, optionally `-> bn -> relu6` after it (two bns in one kernel)."""
    epilogue = [bn(c_out), relu6] if with_epilogue else []
    check((n, c_in, h, w), [bn(c_in), relu, conv(1, c_in, c_out, stride), *epilogue])


@pytest.mark.parametrize("kind", ["dwconv3x3", "conv3x3"])
@few_examples
@given(stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(stride=2, n=3, c_in=33, c_out=17, h=2, w=1)
@example(stride=1, n=2, c_in=17, c_out=5, h=7, w=10)
@example(stride=1, n=1, c_in=WIDE, c_out=WIDE, h=3, w=2)
def test_prologue_padded(kind, stride, n, c_in, c_out, h, w):
    """`bn -> relu -> conv`: the padding is zero AFTER the prologue, i.e. conv(relu(bn(x))) with zero padding."""
    anchor, _ = anchor_op(kind, c_in, c_out, stride)
    check((n, c_in, h, w), [bn(c_in), relu, anchor])


@few_examples
@given(pool=st.sampled_from(["avgpool2", "avgpool3", "global"]), n=batches, c=channels, h=sizes, w=sizes)
@example(pool="global", n=1, c=1, h=1, w=1)
@example(pool="avgpool3", n=3, c=33, h=3, w=10)
@example(pool="avgpool2", n=2, c=17, h=7, w=2)
def test_prologue_pool(pool, n, c, h, w):
    """`bn -> relu6 -> avgpool(k)` and `bn -> relu6 -> global_avgpool -> flatten`."""
    if pool == "global":
        check((n, c, h, w), [bn(c), relu6, global_avgpool, flatten])
    else:
        k = int(pool[-1])
        check((n, c, at_least(h, k), at_least(w, k)), [bn(c), relu6, avgpool(k)])


# -- producer chains: a depthwise conv computed inside the 1x1 conv's K loop -----------------------------


@pytest.mark.parametrize("k", [3, 5])
@few_examples
@given(stride=strides, n=batches, c=channels, c_out=channels, h=sizes, w=sizes, with_prologue=st.booleans())
@example(stride=1, n=1, c=1, c_out=1, h=1, w=1, with_prologue=False)
@example(stride=2, n=3, c=33, c_out=17, h=9, w=4, with_prologue=True)
@example(stride=1, n=2, c=WIDE, c_out=WIDE, h=3, w=5, with_prologue=False)
@example(stride=1, n=1, c=40, c_out=300, h=2, w=3, with_prologue=False)  # two 256-channel blocks
def test_dwconv_producer_into_conv1x1(k, stride, n, c, c_out, h, w, with_prologue):
    """`[bn -> relu ->] dwconvKxK -> bn -> relu6 -> conv1x1 -> bn -> relu`: one kernel whose 1x1 conv
    computes the depthwise conv of each K block in registers; the optional prologue applies to the
    depthwise conv's input taps (zero padding after it)."""
    prologue = [bn(c), relu] if with_prologue else []
    check(
        (n, c, h, w),  # the default padding k // 2 keeps every size valid
        [*prologue, dwconv(k, c, stride), bn(c), relu6, conv(1, c, c_out), bn(c_out), relu],
    )


# -- tap producers: a 1x1 conv computed at each tap of the depthwise conv after it ----------------------------


@pytest.mark.parametrize("k", [3, 5])
@few_examples
@given(stride=strides, n=batches, c_in=channels, c=channels, h=sizes, w=sizes, with_prologue=st.booleans())
@example(stride=1, n=1, c_in=1, c=1, h=1, w=1, with_prologue=False)
@example(stride=2, n=3, c_in=33, c=17, h=9, w=4, with_prologue=True)
@example(stride=2, n=2, c_in=16, c=WIDE, h=8, w=5, with_prologue=False)  # two 64-channel blocks at C_in 16
@example(stride=1, n=1, c_in=WIDE, c=40, h=3, w=6, with_prologue=False)  # 70 input channels: K steps of 64
def test_conv1x1_producer_at_dwconv_taps(k, stride, n, c_in, c, h, w, with_prologue):
    """`[bn -> relu ->] conv1x1 -> bn -> relu6 -> dwconvKxK -> bn -> relu6`: one kernel whose depthwise conv
    computes the 1x1 conv, its bn and relu6 at the input pixels of each tap; taps in the padding read zero
    (not relu6(bn(0))), and the optional prologue applies to the 1x1 conv's input."""
    prologue = [bn(c_in), relu] if with_prologue else []
    check(
        (n, c_in, h, w),
        [*prologue, conv(1, c_in, c), bn(c), relu6, dwconv(k, c, stride), bn(c), relu6],
    )


def test_a_tap_producer_with_stride_is_refused_at_run_time():
    """The spec checks the 1x1 conv's stride at its example arguments; a module changed later is refused."""
    module = load(spec_text((1, 4, 5, 5), ["pw: conv1x1(4, 6) -> bn0: bn(6) -> relu -> dw: dwconv3x3(6)"]))
    model = module.ModelNew().to(DEVICE).eval()
    model.pw.stride = (2, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="conv1x1 needs stride 1"):
        model(torch.randn(1, 4, 5, 5, device=DEVICE))


# float16 storage of a tensor between kernels, for the reference: not an op of the spec
to_float16 = Op("", lambda m, y: y.half().to(y.dtype), has_params=False)


@few_examples
@given(stride=strides, n=batches, c=channels, c_out=channels, h=sizes, w=sizes)
@example(stride=2, n=2, c=24, c_out=17, h=9, w=6)  # a masked 32-channel block of float16
@example(stride=1, n=1, c=96, c_out=40, h=5, w=7)  # three full 32-channel blocks
@example(stride=1, n=1, c=WIDE, c_out=WIDE, h=3, w=4)
def test_float16_activations_into_depthwise_convs(stride, n, c, c_out, h, w):
    """`activations(float16)`: a depthwise conv and a depthwise producer read float16 tensors stored by
    the kernel before them (their tiles are chosen for float16), and the producer's 1x1 conv multiplies
    float16 operands on the GPU. The reference rounds where the kernels store, and on the GPU also the
    depthwise tile that goes into the fp16 dot."""
    text = (
        f"model Net()\ninput({n}, {c}, {h}, {w})\nactivations(float16)\nforward:\n"
        f"    op0: conv1x1({c}, {c}) -> op1: bn({c}) -> relu\n"
        f"    op2: dwconv3x3({c}, stride={stride}) -> op3: bn({c}) -> relu6\n"
        f"    op4: dwconv3x3({c}) -> op5: bn({c}) -> relu -> op6: conv1x1({c}, {c_out}) -> op7: bn({c_out}) -> relu\n"
    )
    steps = [(conv(1, c, c), "op0"), (bn(c), "op1"), (relu, None), (to_float16, None)]
    steps += [(dwconv(3, c, stride), "op2"), (bn(c), "op3"), (relu6, None), (to_float16, None)]
    steps += [(dwconv(3, c), "op4"), (bn(c), "op5"), (relu, None), *([(to_float16, None)] if ON_GPU else [])]
    steps += [(conv(1, c, c_out), "op6"), (bn(c_out), "op7"), (relu, None)]
    compare(text, steps, (n, c, h, w))


def test_a_producer_consumer_with_stride_is_refused_at_run_time():
    """The spec checks the 1x1 conv's stride at its example arguments; a module changed later is refused."""
    module = load(spec_text((1, 4, 5, 5), ["dw: dwconv3x3(4) -> bn0: bn(4) -> relu -> pw: conv1x1(4, 6)"]))
    model = module.ModelNew().to(DEVICE).eval()
    model.pw.stride = (2, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="needs stride 1"):
        model(torch.randn(1, 4, 5, 5, device=DEVICE))


# -- a whole model ---------------------------------------------------------------------------------------


@few_examples
@given(n=batches, c_in=channels, c_mid=channels, c_out=channels, classes=channels, h=sizes, w=sizes)
@example(n=1, c_in=1, c_mid=1, c_out=1, classes=1, h=1, w=1)
@example(n=3, c_in=3, c_mid=17, c_out=33, classes=5, h=9, w=14)
def test_multi_chain_model(n, c_in, c_mid, c_out, classes, h, w):
    check(
        (n, c_in, h, w),
        [conv(3, c_in, c_mid, stride=2), bn(c_mid), relu],
        [dwconv(3, c_mid), bn(c_mid), relu6],
        [conv(1, c_mid, c_out), bn(c_out)],
        [bn(c_out), relu],
        [bn(c_out), relu, conv(1, c_out, c_mid)],
        [bn(c_mid), relu6, dwconv(5, c_mid, stride=2)],
        [global_avgpool, flatten],
        [linear(c_mid, classes), relu],
        [linear(classes, classes)],
    )


NET_SPEC = """\
model Net(c_in=8, c_out=16, classes=5)
input(2, c_in, 9, 9)
forward:
    conv1: conv3x3(c_in, c_out, stride=2) -> bn1: bn(c_out) -> relu
    dw: dwconv3x3(c_out, stride=1) -> bn2: bn(c_out) -> relu6
    pw: conv1x1(c_out, 24) -> bn3: bn(24)
    bn4: bn(24) -> relu
    bn5: bn(24) -> relu -> pw2: conv1x1(24, c_in)
    global_avgpool -> flatten
    fc: linear(c_in, classes)
"""


@few_examples
@given(n=batches, c_in=channels, c_out=channels, classes=channels, h=sizes, w=sizes)
@example(n=2, c_in=8, c_out=16, classes=5, h=9, w=9)  # the spec's own example
@example(n=1, c_in=1, c_out=1, classes=1, h=1, w=1)
@example(n=3, c_in=17, c_out=33, classes=3, h=6, w=11)
def test_constructor_arguments(n, c_in, c_out, classes, h, w):
    """ModelNew(**kwargs) builds the model at other sizes than the defaults the spec was checked at."""
    steps = [
        (conv(3, c_in, c_out, stride=2), "conv1"), (bn(c_out), "bn1"), (relu, None),
        (dwconv(3, c_out), "dw"), (bn(c_out), "bn2"), (relu6, None),
        (conv(1, c_out, 24), "pw"), (bn(24), "bn3"),
        (bn(24), "bn4"), (relu, None),
        (bn(24), "bn5"), (relu, None), (conv(1, 24, c_in), "pw2"),
        (global_avgpool, None), (flatten, None),
        (linear(c_in, classes), "fc"),
    ]  # fmt: skip
    compare(NET_SPEC, steps, (n, c_in, h, w), kwargs=dict(c_in=c_in, c_out=c_out, classes=classes))


# -- inputs that are not contiguous ----------------------------------------------------------------------


def embedded_in_nan(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view into a larger NaN-filled tensor: other strides and a storage offset."""
    n, c, h, w = x.shape
    big = torch.full((n + 1, c + 2, h + 1, 2 * w + 3), float("nan"), device=x.device)
    view = big[1:, 1 : c + 1, 1:, 3::2]
    view.copy_(x)
    return view


LAYOUTS = {
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "hw_transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "embedded_in_nan": embedded_in_nan,
    "broadcast_batch": lambda x: x[:1].expand_as(x),  # batch stride 0
}


# A chain for each way an anchor loads its input: (c_in, c_out, stride) -> ops.
FIRST_CHAINS = {
    "conv3x3_bn_relu": lambda c_in, c_out, stride: [conv(3, c_in, c_out, stride), bn(c_out), relu],
    "dwconv3x3_bn_relu6": lambda c_in, c_out, stride: [dwconv(3, c_in, stride), bn(c_in), relu6],
    "bn_relu_conv1x1": lambda c_in, c_out, stride: [bn(c_in), relu, conv(1, c_in, c_out, stride)],
    "bn_relu": lambda c_in, c_out, stride: [bn(c_in), relu],
    "avgpool2": lambda c_in, c_out, stride: [avgpool(2)],
    "global_avgpool_flatten": lambda c_in, c_out, stride: [global_avgpool, flatten],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@few_examples
@given(
    kind=st.sampled_from(list(FIRST_CHAINS)),
    stride=strides,
    n=batches,
    c_in=channels,
    c_out=channels,
    h=st.integers(2, 20),  # at least 2, for avgpool(2)
    w=st.integers(2, 20),
)
@example(kind="conv3x3_bn_relu", stride=2, n=2, c_in=5, c_out=17, h=9, w=6)
@example(kind="dwconv3x3_bn_relu6", stride=1, n=3, c_in=17, c_out=1, h=5, w=8)
@example(kind="bn_relu_conv1x1", stride=2, n=2, c_in=33, c_out=3, h=7, w=4)
@example(kind="bn_relu", stride=1, n=2, c_in=3, c_out=1, h=3, w=7)
@example(kind="avgpool2", stride=1, n=2, c_in=5, c_out=1, h=7, w=4)
@example(kind="global_avgpool_flatten", stride=1, n=3, c_in=17, c_out=1, h=5, w=3)
def test_noncontiguous_input(layout, kind, stride, n, c_in, c_out, h, w):
    """The kernels index the input through its strides: a re-laid-out input gives the same output."""
    check((n, c_in, h, w), FIRST_CHAINS[kind](c_in, c_out, stride), layout=LAYOUTS[layout])


@pytest.mark.parametrize("kind", ["conv3x3", "conv5x5", "dwconv3x3", "conv1x1", "linear"])
def test_weights_in_channels_last_layout(kind):
    """`model.to(memory_format=torch.channels_last)` makes conv weights non-contiguous: kernels index
    weights through their strides, so the results do not change."""
    n, c_in, c_out, h, w = 2, 5, 17, 7, 6
    chains = {
        "conv3x3": [[conv(3, c_in, c_out, stride=2), bn(c_out), relu]],
        "conv5x5": [[conv(5, c_in, c_out)]],
        "dwconv3x3": [[dwconv(3, c_in), bn(c_in), relu6]],
        "conv1x1": [[conv(1, c_in, c_out)]],
        "linear": [[flatten], [linear(c_in * h * w, c_out)]],
    }[kind]
    check((n, c_in, h, w), *chains, model_layout=torch.channels_last)


# -- the generic conv: nn.Conv2d's arguments, lowered to the anchor its values call for -----------------


def conv2d(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1, bias: bool = True) -> Op:
    """The generic conv, every argument spelled out as nn.Conv2d's."""
    call = f"conv({c_in}, {c_out}, {k}, stride={stride}, padding={padding}, groups={groups}, bias={bias})"

    def reference(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
        assert (m.bias is not None) == bias, "the module's bias does not follow the spec"
        return F.conv2d(y, m.weight, m.bias, stride, padding, groups=groups)

    return Op(call, reference)


def conv_kernel(k: int, padding: int, groups: int, c_in: int, c_out: int, bias: bool) -> str:
    """The kernel name of a generic conv alone: the anchor it lowers to, and its bias."""
    suffix = "_bias" if bias else ""
    if groups == c_in == c_out > 1:
        return f"dwconv{k}x{k}{suffix}"
    if k == 1 and padding == 0:
        return f"conv1x1{suffix}"
    return f"conv{k}x{k}{'_padded' if k == 1 else ''}{suffix}"


@few_examples
@given(
    kind=st.sampled_from(["dense", "pointwise", "depthwise"]),
    k=st.integers(1, 11),
    stride=st.integers(1, 3),
    padding=st.integers(0, 5),
    bias=st.booleans(),
    n=batches,
    c_in=channels,
    c_out=channels,
    h=sizes,
    w=sizes,
)
@example(kind="dense", k=11, stride=4, padding=2, bias=True, n=1, c_in=3, c_out=17, h=19, w=14)  # AlexNet's stem
@example(kind="dense", k=5, stride=1, padding=0, bias=True, n=2, c_in=1, c_out=6, h=9, w=8)  # LeNet's
@example(kind="dense", k=7, stride=2, padding=3, bias=False, n=1, c_in=3, c_out=WIDE, h=9, w=10)  # ResNet's
@example(kind="dense", k=1, stride=2, padding=1, bias=True, n=1, c_in=5, c_out=3, h=4, w=5)  # a padded 1x1
@example(kind="pointwise", k=1, stride=2, padding=0, bias=True, n=3, c_in=WIDE, c_out=33, h=5, w=3)
@example(kind="pointwise", k=1, stride=1, padding=0, bias=False, n=1, c_in=1, c_out=1, h=1, w=1)
@example(kind="depthwise", k=3, stride=2, padding=1, bias=True, n=2, c_in=WIDE, c_out=WIDE, h=7, w=6)
@example(kind="depthwise", k=5, stride=1, padding=2, bias=False, n=1, c_in=17, c_out=17, h=1, w=3)
def test_conv(kind, k, stride, padding, bias, n, c_in, c_out, h, w):
    """conv(...) as torch computes nn.Conv2d with these arguments, through the anchor its values call for:
    depthwise where groups = in = out channels, the GEMM for 1x1 without padding, else the implicit GEMM."""
    if kind == "pointwise":
        k, padding = 1, 0
    if kind == "depthwise":
        c_out = c_in
    groups = c_in if kind == "depthwise" else 1
    padding = min(padding, k)
    smallest = k - 2 * padding
    module = check(
        (n, c_in, at_least(h, smallest), at_least(w, smallest)), [conv2d(c_in, c_out, k, stride, padding, groups, bias)]
    )
    assert f"def {conv_kernel(k, padding, groups, c_in, c_out, bias)}_kernel(" in module.SOURCE


@pytest.mark.parametrize(
    "args",
    [
        "3, 96, 11, 4, 2",
        "6, 16, 5",
        "64, 64, 3, 1, 1, bias=False",
        "8, 8, 3, 2, 1, groups=8",
        "32, 32, 5, 1, 2, groups=32, bias=False",
        "24, 40, 1",
    ],
)
def test_conv_module_is_nn_conv2d(args):
    """Under one seed the generic conv's module creates nn.Conv2d's parameters (a bias by default), so
    ModelNew's state_dict and seeded init equal the reference's."""
    module = load(spec_text((1, int(args.split(",")[0]), 16, 16), [f"c: conv({args})"]))
    torch.manual_seed(3)
    generated = module.ModelNew().c
    torch.manual_seed(3)
    expected = eval(f"nn.Conv2d({args})")
    assert repr(generated) == repr(expected)
    assert generated.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(generated.state_dict()[key], value), key


# A biased conv in each other role: a depthwise producer in a biased 1x1 conv's K loop, a biased 1x1 conv
# at a biased depthwise conv's taps, and a biased conv whose kernel a pool ends.
BIASED_PAIRS = {
    "dwconv_bias_into_conv1x1_bias": lambda c_in, c_out, k, stride: (
        [conv2d(c_in, c_in, k, stride, k // 2, groups=c_in), bn(c_in), relu6, conv2d(c_in, c_out, 1)],
        f"dwconv{k}x{k}_bias_bn_relu6_conv1x1_bias",
    ),
    "conv1x1_bias_at_dwconv_bias_taps": lambda c_in, c_out, k, stride: (
        [conv2d(c_in, c_out, 1), relu6, conv2d(c_out, c_out, k, stride, k // 2, groups=c_out), bn(c_out)],
        f"conv1x1_bias_relu6_dwconv{k}x{k}_bias_bn",
    ),
    "conv_bias_avgpool": lambda c_in, c_out, k, stride: (
        [conv2d(c_in, c_out, k, 1, k // 2), relu, avgpool(2)],
        f"conv{k}x{k}_bias_relu_avgpool" if k > 1 else "conv1x1_bias_relu_avgpool",
    ),
}


@pytest.mark.parametrize("pair", list(BIASED_PAIRS))
@settings(max_examples=3, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(k=st.sampled_from([1, 3, 5]), stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(k=3, stride=2, n=2, c_in=17, c_out=33, h=7, w=9)
@example(k=5, stride=1, n=1, c_in=WIDE, c_out=5, h=4, w=3)
def test_biased_conv_in_fused_kernels(pair, k, stride, n, c_in, c_out, h, w):
    """The bias is added where each role leaves its fp32 tile: the producer's tile before the ops after it,
    the tap's tile before the padding is zeroed again, the conv's tile before the pool sums it."""
    c_in, c_out = max(c_in, 2), max(c_out, 2)  # a 1-channel conv with groups 1 is dense, not depthwise
    ops, kernel = BIASED_PAIRS[pair](c_in, c_out, k, stride)
    module = check((n, c_in, at_least(h, 2), at_least(w, 2)), ops)
    assert f"def {kernel}_kernel(" in module.SOURCE


CTOR_CONV = """\
model Net(k=3, g=1, b=True)
input(2, 4, 9, 8)
forward:
    c: conv(4, 4, k, padding=k // 2, groups=g, bias=b) -> relu
"""


def test_conv_built_with_other_constructor_arguments():
    """The kernel reads the window from the module (other kernel sizes work); a module that would call
    for another anchor or no bias than the spec was built with is refused before any launch."""
    c = conv2d(4, 4, 5, padding=2)
    compare(CTOR_CONV, [(c, "c"), (relu, None)], (2, 4, 9, 8), kwargs={"k": 5})
    module = load(CTOR_CONV)
    for kwargs, wrong in (({"g": 4}, "groups 4"), ({"b": False}, "bias False")):
        model = module.ModelNew(**kwargs).to(DEVICE).eval()
        with torch.no_grad(), pytest.raises(ValueError, match=f"conv lowers to conv3x3_bias .*{wrong}"):
            model(torch.randn(2, 4, 9, 8, device=DEVICE))


# -- maxpool ---------------------------------------------------------------------------------------------


def maxpool(k: int, stride: int | None = None, padding: int = 0, labeled: bool = False) -> Op:
    """nn.MaxPool2d's arguments; labeled, ModelNew holds the module and the kernel reads its window."""
    call = f"maxpool({k}{'' if stride is None else f', stride={stride}'}, padding={padding})"
    return Op(call, lambda m, y: F.max_pool2d(y, k, stride, padding), has_params=labeled)


@few_examples
@given(
    k=st.integers(1, 5),
    stride=st.one_of(st.none(), st.integers(1, 3)),
    padding=st.integers(0, 2),
    labeled=st.booleans(),
    with_prologue=st.booleans(),
    n=batches,
    c=channels,
    h=sizes,
    w=sizes,
)
@example(k=3, stride=2, padding=1, labeled=True, with_prologue=True, n=2, c=WIDE, h=9, w=8)  # ResNet's
@example(k=2, stride=2, padding=0, labeled=False, with_prologue=False, n=1, c=6, h=11, w=11)  # LeNet's (odd size)
@example(k=3, stride=2, padding=0, labeled=True, with_prologue=False, n=3, c=17, h=7, w=10)  # AlexNet's
@example(k=5, stride=None, padding=2, labeled=False, with_prologue=True, n=1, c=1, h=1, w=1)  # all padding but one
@example(k=1, stride=3, padding=0, labeled=True, with_prologue=False, n=2, c=33, h=5, w=4)
def test_maxpool(k, stride, padding, labeled, with_prologue, n, c, h, w):
    """`[bn ->] maxpool`: the max over each window, padding -inf, floor mode; after a prologue the padding is
    -inf again (bn would map it to +inf where its scale is negative). Unlabeled at the top level the window
    is fixed at build time and the kernel's name says it; labeled, it comes from the module."""
    padding = min(padding, k // 2)
    smallest = k - 2 * padding
    prologue = [bn(c)] if with_prologue else []
    shape = (n, c, at_least(h, smallest), at_least(w, smallest))
    module = check(shape, [*prologue, maxpool(k, stride, padding, labeled)])
    s = k if stride is None else stride
    window = f"maxpool{k}x{k}" + (f"_s{s}" if s != k else "") + (f"_p{padding}" if padding else "")
    name = "maxpool" if labeled else window
    assert f"def {'bn_' * with_prologue}{name}_kernel(" in module.SOURCE


@few_examples
@given(
    k=st.integers(1, 3),
    stride=st.one_of(st.none(), st.integers(1, 3)),
    padding=st.integers(0, 1),
    pool=st.sampled_from(list(POOLS)),
    one_line=st.booleans(),
    n=batches,
    c=channels,
    h=sizes,
    w=sizes,
)
@example(k=2, stride=None, padding=0, pool="global_flatten", one_line=False, n=2, c=WIDE, h=9, w=8)  # RegNet's end
@example(k=3, stride=2, padding=1, pool="avgpool2", one_line=True, n=1, c=3, h=8, w=7)
def test_a_pool_ends_a_maxpool_kernel(k, stride, padding, pool, one_line, n, c, h, w):
    """`maxpool -> pool` on one line, or the pool on the next line (which fuses as the line would): one
    kernel whose window parameters are the pool's own (the maxpool's slot is `pool`, the pool's `pool2`)."""
    padding = min(padding, k // 2)
    s = k if stride is None else stride
    window = int(pool[-1]) if pool.startswith("avgpool") else 1
    least = (window - 1) * s + k - 2 * padding  # the least input whose maxpool output holds a window
    shape = (n, c, at_least(h, least), at_least(w, least))
    chains = [[maxpool(k, stride, padding), *POOLS[pool]]] if one_line else [[maxpool(k, stride, padding)], POOLS[pool]]
    module = check(shape, *chains)
    # one kernel, besides the helper that adds a window's slices where programs share one
    launched = set(re.findall(r"^def (\w+_kernel)\(", module.SOURCE, re.M)) - {"window_slices_sum_kernel"}
    assert len(launched) == 1, launched


@few_examples
@given(
    k=st.integers(2, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    labeled=st.booleans(),
    n=batches,
    c=channels,
    h=sizes,
    w=sizes,
)
@example(k=3, stride=2, padding=0, labeled=True, n=2, c=WIDE, h=14, w=7)  # SqueezeNet's, odd and even sizes
@example(k=3, stride=2, padding=1, labeled=False, n=1, c=3, h=4, w=5)  # a last window in the right padding only
@example(k=2, stride=3, padding=0, labeled=True, n=1, c=1, h=2, w=3)
def test_maxpool_ceil_mode(k, stride, padding, labeled, n, c, h, w):
    """`maxpool(..., ceil_mode=True)`: a last window that runs past the input's end counts where it starts
    inside the input or its left padding, as in torch (not where it would lie in the right padding only)."""
    padding = min(padding, k // 2)
    shape = (n, c, at_least(h, k - 2 * padding), at_least(w, k - 2 * padding))
    call = f"maxpool({k}, stride={stride}, padding={padding}, ceil_mode=True)"
    op = Op(call, lambda m, y: F.max_pool2d(y, k, stride, padding, ceil_mode=True), has_params=labeled)
    module = check(shape, [op])
    if labeled:
        assert module.ModelNew().op0.ceil_mode is True
        assert "def maxpool_ceil_kernel(" in module.SOURCE
    else:
        assert "_ceil_kernel(" in module.SOURCE


def test_maxpool_propagates_nan_like_torch():
    """A NaN in a window is the window's max. (Under the interpreter numpy's max propagates it anyway; on
    the GPU tl.maximum drops it unless told PropagateNan.ALL.)"""
    module = load(spec_text((1, 3, 4, 4), ["maxpool(2)"]))
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        out = module.ModelNew().to(DEVICE).eval()(x)
    assert torch.equal(out.isnan(), F.max_pool2d(x, 2).isnan()) and out.isnan().sum() == 1


def test_maxpool_inside_a_sequence_from_the_module():
    """In a sequence maxpool is an nn.MaxPool2d item (indices as in torch); its window comes from the module."""
    text = spec_text((2, 3, 12, 10), ["features:", "    conv(3, 8, 3, padding=1) -> relu", "    maxpool(2, stride=2)"])
    module = load(text)
    assert [type(m).__name__ for m in module.ModelNew().features] == ["Conv2d", "ReLU", "MaxPool2d"]
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).eval()
    model.features[2].kernel_size = model.features[2].stride = 3
    x = torch.randn(2, 3, 12, 10, device=DEVICE)
    with torch.no_grad():
        assert rel_error(model(x), F.max_pool2d(F.relu(model.features[0](x)), 3)) < TOLERANCE


def test_maxpool_on_float16_activations():
    """A maxpool between kernels that store float16 loads it into fp32; the max of float16 values is one of
    them, so only the stores round."""
    text = (
        "model Net()\ninput(2, 5, 11, 9)\nactivations(float16)\nforward:\n"
        "    a: conv(5, 12, 3) -> relu\n    maxpool(3, stride=2, padding=1)\n    b: conv(12, 7, 1)\n"
    )
    steps = [(conv2d(5, 12, 3), "a"), (relu, None), (to_float16, None)]
    steps += [(maxpool(3, 2, 1), None), (to_float16, None), (conv2d(12, 7, 1), "b")]
    compare(text, steps, (2, 5, 11, 9))


RESNET_STEM = """\
model Stem(c=6)
input(3, 3, 13, 11)
forward:
    conv1: conv(3, c, 7, stride=2, padding=3, bias=False) -> bn1: bn(c) -> relu
    maxpool(3, stride=2, padding=1)
    conv2: conv(c, c, 3, padding=1, bias=False) -> bn2: bn(c)
"""


def test_maxpool_in_training_mode_normalises_in_its_prologue():
    """ResNet's stem in training mode: bn1 needs conv1's whole output first, so bn1 and relu run in the
    maxpool's prologue (padding -inf after them); compared with torch in float64, buffers included."""
    torch.manual_seed(0)
    model = load_spec(RESNET_STEM, "resnet_stem").ModelNew()
    randomize_batchnorm(model)
    model = model.to(DEVICE).train()
    ref = copy.deepcopy(model).double()
    assert "def bn_relu_maxpool3x3_s2_p1_train_kernel(" in load_spec(RESNET_STEM, "resnet_stem").SOURCE
    x = torch.randn(3, 3, 13, 11, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        expected = ref.bn2(ref.conv2(F.max_pool2d(F.relu(ref.bn1(ref.conv1(x.double()))), 3, 2, 1)))
    assert rel_error(out, expected) < TOLERANCE
    for key, value in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[key].to(value.dtype), value, rtol=1e-4, atol=1e-5), key


# -- dropout (p = 0) and the new activations -------------------------------------------------------------

DROPOUT_HEAD = """\
model Head()
input(3, 4, 5, 4)
forward:
    flatten
    fc1: linear(80, 40) -> relu -> dropout(0.0)
    classifier:
        dropout(0.0) -> linear(40, 70) -> relu
        dropout(0.0)
        linear(70, 5)
"""


@pytest.mark.parametrize("training", [False, True])
def test_dropout_p0_is_the_identity(training):
    """`dropout(0.0)` (all of KernelBench's) adds no kernel code, after an anchor or before one, alone on a
    line, in both modes; in a sequence it is an nn.Dropout item, so the indices after it are torch's."""
    module = load(DROPOUT_HEAD)
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).train(training)
    head = nn.Sequential(nn.Dropout(0.0), nn.Linear(40, 70), nn.ReLU(), nn.Dropout(0.0), nn.Linear(70, 5))
    assert [type(m) for m in model.classifier] == [type(m) for m in head]
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.0, 0.0]
    x = torch.randn(3, 4, 5, 4, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        head.load_state_dict(model.classifier.state_dict())  # strict: the same keys
        expected = head.to(DEVICE).train(training)(F.relu(model.fc1(x.flatten(1))))
    assert rel_error(out, expected) < TOLERANCE
    # no line of kernel code: fc1's kernels are those of the same spec without dropouts, but for names
    without = load(DROPOUT_HEAD.replace(" -> dropout(0.0)", "")).SOURCE
    for kernel in ("slices_kernel", "kernel"):
        plain = kernel_code(without, f"linear_relu_{kernel}")
        assert kernel_code(module.SOURCE, f"linear_relu_dropout_{kernel}") == plain


def kernel_code(source: str, name: str) -> list[str]:
    """The lines of the @triton.jit function `name` that are not comments, its name left out."""
    body = source.split(f"def {name}(")[1].split("\n\n\n")[0]
    return [line for line in body.splitlines() if not line.strip().startswith("#")]


ACTIVATION_OPS = {
    "sigmoid": Op("sigmoid", lambda m, y: torch.sigmoid(y), has_params=False),
    "silu": Op("silu", lambda m, y: F.silu(y), has_params=False),
    "hardswish": Op("hardswish", lambda m, y: F.hardswish(y), has_params=False),
}


@pytest.mark.parametrize("activation", list(ACTIVATION_OPS))
@settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(bias=st.booleans(), stride=strides, n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes)
@example(bias=True, stride=1, n=1, c_in=1, c_out=1, h=1, w=1)
@example(bias=False, stride=2, n=2, c_in=17, c_out=WIDE, h=7, w=6)
def test_activation_after_conv(activation, bias, stride, n, c_in, c_out, h, w):
    """`conv -> bn -> act`, then `act -> conv` (the activation in the next kernel's prologue), in fp32
    against torch; inputs scaled by 4 reach hardswish's clamps at -3 and 3 and sigmoid's flat tails."""
    act = ACTIVATION_OPS[activation]
    check(
        (n, c_in, h, w),
        [conv2d(c_in, c_out, 3, stride, 1, bias=bias), bn(c_out), act],
        [bn(c_out), act, conv2d(c_out, c_in, 1)],
    )


@few_examples
@given(n=st.integers(1, 20), c=channels, h=st.integers(1, 4), w=st.integers(1, 4), f_out=channels)
@example(n=2, c=35, h=2, w=2, f_out=17)  # 140 features: two whole slices of 64 and one of 12
@example(n=17, c=WIDE, h=2, w=2, f_out=WIDE)  # 17 rows: slices of four K steps (256 and 24)
@example(n=1, c=1, h=1, w=1, f_out=1)
def test_linear_relu_after_split_k(n, c, h, w, f_out):
    """`linear -> relu`: relu runs in the kernel that adds up the slices of K, after the bias; a slices
    kernel comes where K can have more than one slice (more than 64 features)."""
    module = check((n, c, h, w), [flatten], [linear(c * h * w, f_out), relu])
    assert ("def linear_relu_slices_kernel(" in module.SOURCE) == (c * h * w > 64)


# -- grouped 1x1 convs and the channel shuffle -----------------------------------------------------------


def grouped_conv1x1(c_in: int, c_out: int, groups: int, stride: int = 1, bias: bool = False) -> Op:
    return Op(
        f"conv({c_in}, {c_out}, 1, {stride}, groups={groups}, bias={bias})",
        lambda m, y: F.conv2d(y, m.weight, m.bias, stride, 0, groups=groups),
    )


def channel_shuffle(groups: int) -> Op:
    """The reference's shuffle: channels viewed as (groups, C // groups), transposed, flattened."""

    def shuffled(m, y):
        n, c, h, w = y.shape
        return y.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    return Op(f"channel_shuffle({groups})", shuffled)


@few_examples
@given(
    groups=st.integers(2, 5),
    per_in=st.integers(1, 9),
    per_out=st.integers(1, 9),
    bias=st.booleans(),
    stride=strides,
    n=batches,
    h=sizes,
    w=sizes,
)
@example(groups=3, per_in=3, per_out=5, bias=False, stride=1, n=1, h=1, w=1)
@example(groups=2, per_in=7, per_out=40, bias=True, stride=1, n=1, h=3, w=2)  # two channel blocks a group
@example(groups=5, per_in=1, per_out=1, bias=False, stride=2, n=3, h=9, w=4)  # depthwise, as a grouped GEMM
@example(groups=4, per_in=9, per_out=3, bias=True, stride=2, n=1, h=5, w=7)
def test_grouped_conv1x1(groups, per_in, per_out, bias, stride, n, h, w):
    """A grouped 1x1 conv is one kernel whose programs each stay inside one group; odd channel counts per
    group, with and without bias, at batch 1 too."""
    op = grouped_conv1x1(groups * per_in, groups * per_out, groups, stride, bias)
    check((n, groups * per_in, h, w), [op, bn(groups * per_out), relu])


# Where the shuffle stands: its channels move in the store of the kernel before it, or in the loads of the 1x1
# conv after it; the ops on the other side of it see the shuffled channels.
SHUFFLE_PLACES = ["end", "end then bn", "own line", "start", "bn then start"]


@pytest.mark.parametrize("place", SHUFFLE_PLACES)
@settings(max_examples=2, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # five places: 25 examples
@given(groups=st.integers(2, 4), per_group=st.integers(1, 7), n=batches, h=sizes, w=sizes)
@example(groups=3, per_group=5, n=1, h=1, w=1)
@example(groups=2, per_group=3, n=2, h=4, w=9)
@example(groups=4, per_group=17, n=1, h=2, w=3)  # 68 channels: two channel blocks
def test_channel_shuffle(place, groups, per_group, n, h, w):
    c = groups * per_group
    shuffle, into = channel_shuffle(groups), grouped_conv1x1(c, 2 * c, groups)
    chains = {
        "end": [[dwconv(3, c), bn(c), shuffle], [into]],
        "end then bn": [[dwconv(3, c), shuffle, bn(c), relu], [into]],
        "own line": [[dwconv(3, c), bn(c)], [shuffle], [conv(1, c, 5)]],
        "start": [[dwconv(3, c)], [shuffle, into, bn(2 * c)]],
        "bn then start": [[dwconv(3, c)], [bn(c), relu, shuffle, into]],
    }[place]
    check((n, c, h, w), *chains)


SHUFFLE_TRAINING = """\
model Shuffle(c=6, groups=3)
input(2, c, 5, 3)
forward:
    dw: conv(c, c, 3, padding=1, groups=c, bias=False) -> bn: bn(c) -> shuffle: channel_shuffle(groups)
    {consumer}
"""


@pytest.mark.parametrize(
    "consumer, kernel",
    [
        # bn waits for the depthwise conv's batch statistics, then runs with the shuffle in pw's loads
        ("pw: conv(c, 2 * c, 1, groups=groups, bias=False)", "bn_channel_shuffle_conv1x1_grouped_train_kernel"),
        # a depthwise conv loads no shuffled channels: a kernel of its own applies bn and stores them shuffled
        ("dw2: conv(c, c, 3, padding=1, groups=c, bias=False)", "bn_channel_shuffle_train_kernel"),
    ],
)
@pytest.mark.parametrize("args", [(6, 3), (10, 2)])
def test_channel_shuffle_in_training_mode(consumer, kernel, args):
    """In training mode the BatchNorm before the shuffle normalises with batch statistics: compared with
    torch in float64, running buffers included."""
    text = SHUFFLE_TRAINING.format(consumer=consumer)
    module = load(text)
    assert f"def {kernel}(" in module.SOURCE
    torch.manual_seed(0)
    model = module.ModelNew(*args)
    randomize_batchnorm(model)
    model = model.to(DEVICE).train()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, args[0], 5, 3, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        y = channel_shuffle(args[1]).reference(None, ref.bn(ref.dw(x.double())))
        expected = (ref.pw if hasattr(ref, "pw") else ref.dw2)(y)
    assert rel_error(out, expected) < TOLERANCE
    for key, value in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[key].to(value.dtype), value, rtol=1e-4, atol=1e-5), key


TILE_SPEC = """\
model Tiles()
input(2, 3, 9, 13)
forward:
    a = c1: conv(3, 8, 3, padding=1) -> b1: bn(8) -> relu
    b = a -> c2: conv(8, 8, 3, padding=1) -> b2: bn(8) -> add(a) -> relu
    c = b -> b3: bn(8) -> relu -> c3: conv(8, 6, 5, padding=2)
    c = c -> maxpool(2, 2)
    return c -> up: conv_transpose(6, 5, 2, 2) -> relu
"""


@pytest.mark.skipif(ON_GPU, reason="on the GPU the KernelBench nets run these tiles at their own shapes")
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("block_n", [64, 128])
def test_kxk_convs_compute_alike_in_tiles_of_128_rows(training, block_n):
    """conv_tile gives 128 rows (and 128 channels) only to grids of 64 programs or more, which the nets' CPU
    cases never reach: forced here, every KxK anchor (epilogues, a residual, a prologue, a transposed conv)
    computes what it computes in 64-row tiles."""
    module = load_spec(TILE_SPEC, "tiles_128")
    tiles = []

    def conv_tile(rows, K, C_out, precision):
        tiles.append(K)
        return 128, block_n, 32, 4, 3 if K > 32 else 1

    module.conv_tile = conv_tile
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).train(training)
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 9, 13, device=DEVICE)
    with torch.no_grad():
        expected = model.reference_forward(x)
        out = model(x)
    assert len(set(tiles)) == 4  # the four KxK convs
    assert rel_error(out, expected) < TOLERANCE
