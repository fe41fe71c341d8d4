"""`cat(...)` along channels: random branches (2 to 4, odd channel counts) joined into one buffer, in eval
and training mode, against torch.cat of torch ops on the model's own modules; and the emitted run method,
which allocates the buffer once and has each branch's kernel store into its slice."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from fusegen import compile_spec
from fusegen.errors import SpecError
from helpers import DEVICE, TOLERANCE, load_spec, randomize_batchnorm, rel_error

ROOT = Path(__file__).resolve().parent.parent
few_examples = settings(max_examples=10, phases=[Phase.explicit, Phase.reuse, Phase.generate], deadline=None)

# How a branch makes its part from the input. "input" joins the input itself and "twice" a value that the
# concatenation joins twice (torch.cat([a, a])): neither is made by a kernel that only reads it once, so
# a copy kernel stores it into its slice. "conv_bn" normalises in training mode with batch statistics, so a kernel of its
# own applies the BatchNorm, into the slice.
KINDS = ["conv1x1", "conv3x3", "dwconv3x3", "maxpool", "conv_bn", "input", "twice"]


def branch_line(kind: str, index: int, c_in: int, c_out: int) -> str:
    name = f"b{index}"
    return {
        "conv1x1": f"{name} = x -> m{index}: conv({c_in}, {c_out}, 1) -> relu",
        "conv3x3": f"{name} = x -> m{index}: conv({c_in}, {c_out}, 3, padding=1)",
        "dwconv3x3": f"{name} = x -> m{index}: dwconv3x3({c_in})",
        "maxpool": f"{name} = x -> maxpool(3, 1, 1)",
        "conv_bn": f"{name} = x -> m{index}: conv({c_in}, {c_out}, 1, bias=False) -> n{index}: bn({c_out}) -> relu",
        "input": f"{name} = x",
        "twice": f"{name} = x -> m{index}: conv({c_in}, {c_out}, 1)",
    }[kind]


def branch_reference(kind: str, index: int, model, x: torch.Tensor) -> torch.Tensor:
    m, n = getattr(model, f"m{index}", None), getattr(model, f"n{index}", None)
    if kind == "conv1x1":
        return F.relu(F.conv2d(x, m.weight, m.bias))
    if kind == "conv3x3":
        return F.conv2d(x, m.weight, m.bias, padding=1)
    if kind == "dwconv3x3":
        return F.conv2d(x, m.weight, None, padding=1, groups=x.shape[1])
    if kind == "maxpool":
        return F.max_pool2d(x, 3, 1, 1)
    if kind == "conv_bn":
        return F.relu(n(F.conv2d(x, m.weight)))  # the module: in training mode it updates its buffers
    if kind == "input":
        return x
    return F.conv2d(x, m.weight, m.bias)


def part_channels(kind: str, c_in: int, c_out: int) -> int:
    return c_in if kind in ("dwconv3x3", "maxpool", "input") else c_out * (2 if kind == "twice" else 1)


def concat_spec(shape, kinds, widths, consumer: int | None, normalise: bool) -> str:
    c_in = shape[1]
    lines = ["model Net()", f"input({', '.join(map(str, shape))})", "forward:"]
    lines += [f"    {branch_line(kind, i, c_in, c)}" for i, (kind, c) in enumerate(zip(kinds, widths))]
    parts = [f"b{i}" for i, kind in enumerate(kinds) for _ in range(2 if kind == "twice" else 1)]
    lines.append(f"    y = cat({', '.join(parts)})")
    if consumer is not None:  # a 1x1 conv reads the whole buffer, maybe normalised over all its channels
        total = sum(part_channels(kind, c_in, c) for kind, c in zip(kinds, widths))
        bn = f"norm: bn({total}) -> relu -> " if normalise else ""
        lines.append(f"    y = y -> {bn}head: conv({total}, {consumer}, 1)")
    lines.append("    return y")
    return "\n".join(lines) + "\n"


def reference(model, kinds, x: torch.Tensor, consumer: int | None, normalise: bool) -> torch.Tensor:
    parts = [branch_reference(kind, i, model, x) for i, kind in enumerate(kinds)]
    y = torch.cat([part for part, kind in zip(parts, kinds) for _ in range(2 if kind == "twice" else 1)], 1)
    if consumer is not None:
        y = F.conv2d(F.relu(model.norm(y)) if normalise else y, model.head.weight, model.head.bias)
    return y


def load(text: str):
    return load_spec(text, "test_concat_" + hashlib.sha1(text.encode()).hexdigest()[:12])


@few_examples
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=4),
    widths=st.lists(st.integers(1, 19), min_size=4, max_size=4),
    consumer=st.one_of(st.none(), st.integers(1, 9)),
    normalise=st.booleans(),
    training=st.booleans(),
    n=st.integers(2, 3),
    c=st.integers(1, 7),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
)
@example(
    kinds=["conv1x1", "conv3x3"],
    widths=[5, 3, 1, 1],
    consumer=None,
    normalise=False,
    training=False,
    n=2,
    c=3,
    h=6,
    w=7,
)
@example(
    kinds=["input", "conv_bn", "maxpool", "dwconv3x3"],
    widths=[1, 7, 1, 1],
    consumer=5,
    normalise=True,
    training=True,
    n=2,
    c=5,
    h=3,
    w=4,
)
@example(
    kinds=["twice", "conv1x1", "conv_bn"],
    widths=[3, 17, 19, 1],
    consumer=None,
    normalise=False,
    training=False,
    n=3,
    c=7,
    h=1,
    w=1,
)
def test_cat_matches_torch_cat(kinds, widths, consumer, normalise, training, n, c, h, w):
    """The parts' values in their slices, in order, whichever way each part reaches its slice; a BatchNorm
    over the whole concatenation (DenseNet's) normalises with the batch statistics of all its channels."""
    widths = widths[: len(kinds)]
    shape = (n, c, h, w)
    text = concat_spec(shape, kinds, widths, consumer, normalise)
    module = load(text)
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).train(training)
    randomize_batchnorm(model, 1)
    expected_model = copy.deepcopy(model)
    x = 4 * torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        expected = reference(expected_model, kinds, x, consumer, normalise)
    assert out.shape == expected.shape and out.is_contiguous()
    assert rel_error(out, expected) < TOLERANCE, text
    for key, buffer in expected_model.state_dict().items():  # training mode's running statistics
        assert torch.allclose(model.state_dict()[key], buffer, rtol=1e-5, atol=1e-6), key


def run_method(source: str, name: str = "run_kernels") -> str:
    return source.split(f"    def {name}(self, x):")[1].split("\n    def ")[0]


def test_branch_kernels_store_into_one_buffer():
    """SqueezeNet's fire module: the buffer is made once, before the first expand's launch; each expand's
    kernel stores into its slice (one tl.store, stepping through the buffer's rows where a later kernel
    reads the buffer, through its strides into an NCHW buffer where it is the model's output); nothing
    concatenates or copies after them; the part joined twice and the model's input are copied into their
    slices."""
    text = (
        "model Net()\ninput(2, 3, 5, 5)\nforward:\n"
        "    x = squeeze: conv(3, 4, 1) -> relu\n"
        "    e1 = x -> expand1x1: conv(4, 5, 1) -> relu\n"
        "    e3 = x -> expand3x3: conv(4, 7, 3, padding=1) -> relu\n"
        "    y = cat(e1, e3)\n"
        "    return y -> classifier: conv(12, 2, 1)\n"
    )
    source = load(text).SOURCE
    run = run_method(source)
    assert run.count("y_buffer = {") == 1
    assert run.index("y_buffer = {") < run.index("conv1x1_bias_relu(x, self.expand1x1")
    assert "into=(y_buffer, 0)" in run and "into=(y_buffer, 1)" in run
    assert "torch.cat" not in run and "load(" not in run
    compact = re.sub(r",([)}])", r"\1", "".join(run.split()))  # as black may break the line or not
    assert '{"channels":(self.expand1x1.out_channels,self.expand3x3.out_channels),"tensor":None}' in compact
    assert 'y = y_buffer["tensor"]' in run
    for kernel in ("conv1x1_bias_relu_kernel", "conv3x3_bias_relu_kernel"):
        body = source.split(f"def {kernel}(")[1].split("\n\n\n")[0]
        assert body.count("tl.store(") == 1
        assert "tl.store(out_ptr+offs_m[:,None]*out_row_stride+offs_n[None,:],acc,mask=mask)" in "".join(body.split())
    # the model's output: the buffer is NCHW, and each expand stores through its strides
    output = load(
        text.replace("    y = cat(e1, e3)\n    return y -> classifier: conv(12, 2, 1)\n", "    return cat(e1, e3)\n")
    )
    run = run_method(output.SOURCE)
    compact = re.sub(r",([)}])", r"\1", "".join(run.split()))
    assert '"tensor":None,"layout":torch.contiguous_format}' in compact and run.rstrip().endswith("return x")
    for kernel in ("conv1x1_bias_relu_kernel", "conv3x3_bias_relu_kernel"):
        body = "".join(output.SOURCE.split(f"def {kernel}(")[1].split("\n\n\n")[0].split())
        assert "tl.store(out_ptr+out_rows[:,None]+offs_n[None,:]*out_stride_c,acc,mask=mask)" in body
    copied = load(
        text.replace("y = cat(e1, e3)", "y = cat(e3, x, e3)").replace("conv(12, 2, 1)", "conv(18, 2, 1)")
    ).SOURCE
    run = run_method(copied)
    assert "into=(y_buffer, 0)" in run and "load(x, into=(y_buffer, 1))" in run
    assert "load(e3, into=(y_buffer, 2))" in run


def test_a_part_of_another_shape_is_refused_at_run_time():
    """The spec is checked at its example input; a model built with other channels than the parts' kernels
    make, or an input whose parts' pixels differ, gets torch.cat's refusal as a ValueError."""
    text = (
        "model Net(s=2)\ninput(2, 3, 6, 6)\nforward:\n"
        "    a = p: conv(3, 4, 3, stride=s, padding=1)\n"
        "    b = x -> maxpool(2)\n"
        "    return cat(a, b)\n"
    )
    module = load(text)
    with torch.no_grad():
        assert module.ModelNew().to(DEVICE)(torch.randn(2, 3, 6, 6, device=DEVICE)).shape == (2, 7, 3, 3)
        with pytest.raises(ValueError, match="does not fit"):
            module.ModelNew(s=1).to(DEVICE)(torch.randn(2, 3, 6, 6, device=DEVICE))


HEADER = "model M()\ninput(2, 3, 8, 8)\nforward:\n    a = x -> p: conv(3, 4, 1)\n"
ERRORS = [
    # (the spec's last lines, line, column, fragment of the message)
    ("    return cat(a)\n", 5, 12, "cat joins two or more values, 1 given"),
    ("    return cat(a, z)\n", 5, 19, "cat joins values of this body"),
    ("    return cat(a, x, dim=1)\n", 5, 22, "cat takes values only"),
    ("    return cat(a, x) -> relu\n", 5, 12, "cat joins values into one buffer, so it stands alone on its line"),
    ("    return a -> cat(a, x)\n", 5, 17, "stands alone on its line"),
    ("    y = c: cat(a, x)\n", 5, 9, "cat has no module, so it takes no name"),
    (
        "    b = x -> maxpool(2)\n    return cat(a, b)\n",
        6,
        12,
        "their other dimensions must agree: [2, 4, 8, 8] and [2, 3, 4, 4]",
    ),
    ("    s:\n        cat(a, x)\n", 6, 9, "cat reads other values, so it has no module"),
]


@pytest.mark.parametrize("lines, line, column, message", ERRORS)
def test_bad_cat_is_a_spec_error(lines, line, column, message):
    with pytest.raises(SpecError) as info:
        compile_spec(HEADER + lines, "specs/bad.fuse")
    assert (info.value.pos.line, info.value.pos.column) == (line, column), str(info.value)
    assert message in str(info.value)


def test_branches_that_read_the_input_share_one_layout_copy():
    """Two 1x1 convs and a max pool read the model's NCHW input channels-last: it is copied once, first,
    and each wrapper's own copy then has nothing to do; a 3x3 conv reads any layout and needs none. With
    a single such reader the wrapper's copy is the only one."""
    text = (
        "model Net()\ninput(2, 3, 5, 6)\nforward:\n"
        "    a = p: conv(3, 4, 1)\n"
        "    b = x -> q: conv(3, 5, 1)\n"
        "    c = x -> maxpool(3, 1, 1)\n"
        "    d = x -> r: conv(3, 2, 3, padding=1)\n"
        "    return cat(a, b, c, d)\n"
    )
    module = load(text)
    run = run_method(module.SOURCE)
    assert run.count(".contiguous(memory_format=torch.channels_last)") == 1
    assert run.index("x = x.contiguous(memory_format=torch.channels_last)") < run.index("conv1x1_bias(")
    single = text.replace("b = x -> q: conv(3, 5, 1)", "b = a -> q: conv(4, 5, 1)").replace("c = x", "c = a")
    single = run_method(load(single).SOURCE)
    assert "x.contiguous(memory_format" not in single
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).eval()
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        branches = [model.p(x), model.q(x), F.max_pool2d(x, 3, 1, 1), model.r(x)]
    assert rel_error(out, torch.cat(branches, 1)) < TOLERANCE


LOOP_AND_BRANCH = """\
model Net(blocks=3, c=6)
input(2, c, 5, 7)

module fire(cin, s, e):
    x = squeeze: conv(cin, s, 1) -> relu
    a = x -> left: conv(s, e, 1) -> relu
    b = x -> right: conv(s, c - e, 3, padding=1) -> relu
    return cat(a, b)

block stage(cin, n):
    fire(cin, 3, 2) * n

forward:
    let wide = c > 4
    body: stage(c, blocks)
    if wide:
        y = x -> p: conv(c, 2, 1)
        x = cat(x, y)
    else:
        y = x -> q: conv(c, 3, 1)
        x = cat(y, x)
    return x
"""


@pytest.mark.parametrize("blocks, c", [(3, 6), (1, 4), (0, 5)])
def test_cat_in_a_loop_and_a_branch(blocks, c):
    """A concatenation in a module that a loop repeats (its channel counts from the loop variable's
    modules), and one in each body of a branch on constructor arguments after it (from the loop's result,
    also where the loop runs no iteration)."""
    module = load(LOOP_AND_BRANCH)
    torch.manual_seed(0)
    model = module.ModelNew(blocks=blocks, c=c).to(DEVICE).eval()
    x = torch.randn(2, c, 5, 7, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        y = x
        for fire in model.body:
            s = F.relu(fire.squeeze(y))
            y = torch.cat([F.relu(fire.left(s)), F.relu(fire.right(s))], 1)
        y = torch.cat([y, model.p(y)], 1) if c > 4 else torch.cat([model.q(y), y], 1)
    assert rel_error(out, y) < TOLERANCE


def test_dense_layers_read_and_store_one_buffer_in_place():
    """A dense block (`dense layers:`): every layer's kernel reads the channels so far as a view of the block's
    one buffer and stores into its next slice, so no layer copies earlier features; the buffer is the block's
    value. Against torch's concatenating loop."""
    module = load_spec((ROOT / "specs" / "densenet121_dense_block.fuse").read_text(), "dense_block_in_place")
    torch.manual_seed(0)
    model = module.ModelNew(num_layers=3, num_input_features=5, growth_rate=3).to(DEVICE).eval()
    randomize_batchnorm(model, seed=3)
    reads = []
    conv = module.bn_relu_conv3x3_dropout

    def recording(x, *args, into):
        out = conv(x, *args, into=into)
        buffer = into[0]["tensor"]
        reads.append((x.shape[1], x.data_ptr() == buffer.data_ptr(), out.data_ptr() - buffer.data_ptr()))
        return out

    module.bn_relu_conv3x3_dropout = recording
    x = torch.randn(2, 5, 5, 7, device=DEVICE)
    with torch.no_grad():
        out = model.run_kernels(x)
        expected = x
        for layer in model.layers:
            expected = torch.cat([expected, layer(expected)], 1)
    # each layer reads the buffer's first channels in place and stores at its slice's first channel
    assert reads == [(5, True, 5 * 4), (8, True, 8 * 4), (11, True, 11 * 4)]
    assert rel_error(out, expected) < TOLERANCE


def test_training_dense_layers_take_batch_statistics_of_the_buffer_in_place():
    """Training mode: each layer's BatchNorm normalises the channels so far with their batch statistics, which
    batch_stats reads from the block's buffer where they lie (no copy kernel, no torch copy), and the layer's
    kernel reads the same view. Output and running statistics against torch's concatenating loop."""
    module = load_spec((ROOT / "specs" / "densenet121_dense_block.fuse").read_text(), "dense_block_in_place")
    assert "def load_stats(" not in module.SOURCE
    torch.manual_seed(0)
    model = module.ModelNew(num_layers=3, num_input_features=5, growth_rate=3)
    randomize_batchnorm(model, seed=3)
    reference = copy.deepcopy(model).to(DEVICE).double()
    model = model.to(DEVICE).train()
    reads = []
    stats, conv = module.batch_stats, module.bn_relu_conv3x3_dropout_train

    def recording_stats(x):
        seen, x_stats = stats(x)
        # the buffer's first channels: a view at the start of the buffer's storage
        reads.append(("stats", x.shape[1], seen is x, x.data_ptr() == x.untyped_storage().data_ptr()))
        return seen, x_stats

    def recording_conv(x, x_stats, *args, into):
        reads.append(("conv", x.shape[1], x.data_ptr() == into[0]["tensor"].data_ptr()))
        return conv(x, x_stats, *args, into=into)

    module.batch_stats, module.bn_relu_conv3x3_dropout_train = recording_stats, recording_conv
    x = torch.randn(2, 5, 5, 7, device=DEVICE)
    with torch.no_grad():
        out = model.run_kernels(x)
        expected = x.double()
        for layer in reference.layers:
            expected = torch.cat([expected, layer(expected)], 1)
    assert reads == [r for c in (5, 8, 11) for r in (("stats", c, True, True), ("conv", c, True))]
    assert rel_error(out, expected) < TOLERANCE
    for key, buffer in reference.state_dict().items():
        if "running" in key:
            assert torch.allclose(model.state_dict()[key].double(), buffer, rtol=1e-5, atol=1e-6), key


STEM_DENSE = """\
model StemDense(layers=2, growth=3)
input(2, 3, 5, 4)

block layer(c, g):
    bn(c) -> relu -> conv1x1(c, g)

forward:
    stem: conv1x1(3, 5) -> stem_bn: bn(5)
    dense layers:
        layer(5 + i * growth, growth) for i in range(layers)
"""


@pytest.mark.parametrize("training", [False, True])
def test_a_dense_loop_whose_input_a_kernel_of_its_body_makes(training):
    """The stem's kernel stores the loop's input into the buffer's first slice, so the buffer counts the stem's
    channels (5), not those of the model's input (3). Against torch's concatenating loop on the model's own
    modules (a copy of them: training mode updates the running statistics)."""
    module = load_spec(STEM_DENSE, "stem_dense")
    torch.manual_seed(0)
    model = module.ModelNew()
    randomize_batchnorm(model, seed=3)
    reference = copy.deepcopy(model)
    model, reference = model.to(DEVICE).train(training), reference.to(DEVICE).train(training)
    x = torch.rand(2, 3, 5, 4, device=DEVICE)
    with torch.no_grad():
        out = model(x)
        expected = reference.stem_bn(reference.stem(x))
        for layer in reference.layers:
            expected = torch.cat([expected, layer(expected)], 1)
    assert out.shape == (2, 11, 5, 4)
    assert rel_error(out, expected) < TOLERANCE
