"""The dataflow graph: named values, values used twice, the residual add fused into an epilogue, `module`
blocks with named children and module arguments, construction-time `if`, lists and repeats."""

import ast
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st

from fusegen import SpecError, compile_spec
from fusegen.check import check
from fusegen.parse import parse_spec
from fusegen.plan import _eval_groups, why_not_fused
from helpers import (
    DEVICE,
    TOLERANCE,
    assert_state_near_float64,
    load_spec,
    randomize_batchnorm,
    rel_error,
    training_bar,
)

BLOCK = """\
model Block(cin=3, cout=8, stride=1)
input(2, cin, 9, 11)
forward:
    out = conv1: conv3x3(cin, cout, stride) -> bn1: bn(cout) -> relu
    out = out -> conv2: conv3x3(cout, cout) -> bn2: bn(cout)
    identity = downsample:
        conv1x1(cin, cout, stride) -> bn(cout)
    return out -> add(identity) -> relu
"""


class TorchBlock(nn.Module):
    """The reference of BLOCK: a ResNet basic block with a 1x1 conv on the shortcut."""

    def __init__(self, cin=3, cout=8, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


def pair(spec_text, reference, *args):
    torch.manual_seed(0)
    ref = reference(*args)
    torch.manual_seed(0)
    new = load_spec(spec_text, "graph").ModelNew(*args)
    assert list(ref.state_dict()) == list(new.state_dict())
    for a, b in zip(ref.state_dict().values(), new.state_dict().values()):
        assert torch.equal(a, b)
    return ref.to(DEVICE), new.to(DEVICE)


def run_kernels_source(source: str, method: str = "run_kernels") -> str:
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
    (fn,) = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == method]
    return ast.unparse(fn)


def test_the_residual_add_runs_in_the_epilogue_of_the_last_conv():
    """conv2 -> bn2 on one line, `add(identity) -> relu` on the next: one kernel, whose wrapper takes the
    shortcut's value; the shortcut is computed before it."""
    source = compile_spec(BLOCK, "specs/block.fuse")
    run = run_kernels_source(source)
    assert "conv3x3_bn_add_relu(out, self.conv2, self.bn2, identity, out_layout=torch.contiguous_format)" in run
    assert run.index("identity = conv1x1_bn(x") < run.index("conv3x3_bn_add_relu")
    assert "def conv3x3_bn_add_relu(x, conv, bn, add, out_layout=torch.channels_last)" in source
    # a 4-d output comes back in torch's layout, as the reference's: the last launch stores it so
    assert run.rstrip().endswith("return x")


def test_why_an_elementwise_line_is_not_fused():
    """The fusion pass says why a chain of elementwise ops cannot join the kernel that makes its input."""
    text = BLOCK.replace("return out -> add(identity) -> relu", "y = out -> relu\n    return out -> add(y)")
    model = check(parse_spec(text), text)
    groups = _eval_groups(model.graph.body, model.graph)
    relu_chain = next(c for c in model.graph.chains if c.text == "y = out -> relu")
    conv2 = next(
        g for g in groups if not isinstance(g, type(relu_chain)) and g.anchor and g.anchor.module_path == "conv2"
    )
    assert (
        why_not_fused(conv2, relu_chain, model.graph)
        == "its input is read 2 times, so the kernel that makes it stores it"
    )


POOL_LINES = """\
model Pooled(c=8, classes=5)
input(2, 3, 14, 14)
forward:
    x = conv: conv3x3(3, c) -> bn: bn(c) -> relu
    x = x -> POOL
    fc: linear(c, classes)
"""


class TorchPooled(nn.Module):
    def __init__(self, c=8, classes=5, pool=None):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pool = pool
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pool(x) if self.pool is not None else nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize(
    "pool, kernel",
    [
        ("global_avgpool -> flatten", "conv3x3_bn_relu_global_avgpool_flatten"),
        ("pool: avgpool(14) -> flatten", "conv3x3_bn_relu_avgpool_flatten"),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_a_pool_on_a_line_of_its_own_ends_the_kernel_before_it(pool, kernel, training):
    """A line that is only a pool whose windows do not overlap (and a view) ends the kernel of the line
    before it, as on one line: the kernel stores only the pooled pixels (fusegen import writes a model's
    pool as its own line). Training mode gives a pool after a BatchNorm a launch of its own."""
    text = POOL_LINES.replace("POOL", pool)
    source = compile_spec(text, "specs/pooled.fuse")
    wrappers = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    run = run_kernels_source(source, "run_first_kernel") + "\n" + run_kernels_source(source, "run_kernels_after_first")
    launched = [ast.unparse(c.func) for c in ast.walk(ast.parse(run)) if isinstance(c, ast.Call)]
    assert [f for f in launched if f in wrappers] == [kernel, "linear"]
    ref, new = pair(
        text, lambda c=8, classes=5: TorchPooled(c, classes, nn.AvgPool2d(14) if "avgpool(" in pool else None)
    )
    randomize_batchnorm(ref)
    new.load_state_dict(ref.state_dict())
    ref, new = ref.train(training), new.train(training)
    x = torch.randn(2, 3, 14, 14, device=DEVICE)
    with torch.no_grad():
        assert rel_error(new(x), ref(x)) < TOLERANCE
    for key, buffer in ref.state_dict().items():
        assert torch.allclose(new.state_dict()[key].float(), buffer.float(), rtol=1e-5, atol=1e-6), key


def test_why_a_pool_line_is_not_fused():
    """The fusion pass says why a pool on its own line does not end the kernel that makes its input."""
    cases = [
        ("x = g: conv(8, 8, 1, groups=2)\n    x = x -> p: avgpool(2)", "g", "programs keep to one group of channels"),
        ("x = c: conv1x1(8, 8)\n    y = x -> p: avgpool(2)\n    return x -> add(x)", "c", "its input is read 3 times"),
    ]
    for lines, module, reason in cases:
        text = f"model M()\ninput(2, 8, 4, 4)\nforward:\n    {lines}\n"
        model = check(parse_spec(text), text)
        groups = _eval_groups(model.graph.body, model.graph)
        pool_chain = next(c for c in model.graph.chains if "avgpool" in c.text)
        group = next(g for g in groups if getattr(g, "anchor", None) is not None and g.anchor.module_path == module)
        assert group.pool is None
        assert reason in why_not_fused(group, pool_chain, model.graph)


sizes = st.integers(1, 9)


@given(
    cin=st.integers(1, 20),
    cout=st.integers(1, 20),
    stride=st.sampled_from([1, 2]),
    n=st.integers(1, 2),
    h=sizes,
    w=sizes,
    training=st.booleans(),
)
@example(cin=3, cout=8, stride=1, n=1, h=1, w=1, training=False)
@example(cin=17, cout=5, stride=2, n=2, h=9, w=4, training=True)
def test_residual_block_matches_torch(cin, cout, stride, n, h, w, training):
    ref, new = pair(BLOCK, TorchBlock, cin, cout, stride)
    if not training:
        randomize_batchnorm(ref, seed=cin + cout)
        new.load_state_dict(ref.state_dict())
        ref.eval(), new.eval()
    elif n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) < 2:
        return  # training-mode BatchNorm needs two values per channel, in torch as in the kernels
    exact = copy.deepcopy(ref).double()
    x = torch.rand(n, cin, h, w, device=DEVICE)
    with torch.no_grad():
        out, eager, want = new(x), ref(x), exact(x.double())
    assert out.is_contiguous()
    # against float64 with test_models' bars: in training mode, where BatchNorm normalises as few as 2 values a
    # channel, fp32 torch itself can miss 1e-5 (measured: 6.5e-3 on an output of 9e-6, cin=2, cout=1, 1 x 3
    # pixels at stride 2), so TOLERANCE or 3x fp32 torch's error; the running statistics likewise
    assert rel_error(out, want) < (training_bar(eager, want) if training else TOLERANCE)
    assert_state_near_float64(new.state_dict(), exact.state_dict(), ref.state_dict())  # running statistics


MODULES = """\
model Net(num_classes=5)
input(1, 3, 8, 8)

module unit(cin, cout, stride=1, downsample=None):
    out = conv1: conv3x3(cin, cout, stride) -> bn1: bn(cout) -> relu
    out = out -> conv2: conv3x3(cout, cout) -> bn2: bn(cout)
    identity = x
    if downsample:
        identity = x -> downsample
    return out -> add(identity) -> relu

block shortcut(cin, cout, stride):
    conv1x1(cin, cout, stride) -> bn(cout)

block stage(cin, cout, blocks, stride):
    unit(cin, cout, stride, shortcut(cin, cout, stride) if stride != 1 or cin != cout else None)
    unit(cout, cout) * (blocks - 1)

forward:
    stem: conv3x3(3, 4) -> bn: bn(4) -> relu
    stage1: stage(4, 4, 2, 1)
    stage2: stage(4, 6, 1, 2)
    global_avgpool -> flatten
    fc: linear(6, num_classes)
"""


class TorchUnit(nn.Module):
    def __init__(self, cin, cout, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchNet(nn.Module):
    """The reference of MODULES. The shortcut is made before its unit's convs (a different creation order
    than registration order, as in torchvision's ResNets)."""

    def __init__(self, num_classes=5, layers=(2, 1)):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

        def stage(cin, cout, blocks, stride):
            shortcut = None
            if stride != 1 or cin != cout:
                shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            return nn.Sequential(
                TorchUnit(cin, cout, stride, shortcut), *(TorchUnit(cout, cout) for _ in range(blocks - 1))
            )

        self.stage1 = stage(4, 4, layers[0], 1)
        self.stage2 = stage(4, 6, layers[1], 2)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_module_blocks_with_a_module_argument(training):
    """Named children at any depth (`stage2.0.downsample.0.weight`), a module passed to a block and made
    before the block's own modules, a repeat of `blocks - 1` (zero times in stage2), an `if` on it."""
    ref, new = pair(MODULES, TorchNet, 5)
    assert "stage2.0.downsample.0.weight" in new.state_dict() and "stage1.0.downsample.0.weight" not in new.state_dict()
    if not training:
        randomize_batchnorm(ref, seed=3)
        new.load_state_dict(ref.state_dict())
        ref.eval(), new.eval()
    x = torch.rand(2, 3, 7, 9, device=DEVICE)
    with torch.no_grad():
        assert rel_error(new(x), ref(x)) < TOLERANCE


def test_a_value_used_twice_is_stored_once():
    """`identity = x` keeps the block's input for the add: the model input is read by two kernels, so the
    first launch no longer runs outside the CUDA graph on the caller's tensor."""
    source = compile_spec(MODULES, "specs/net.fuse")
    assert "first_kernel_outside_graph_numel = None" not in source  # stem reads x once
    assert "first_kernel_outside_graph_numel = None" in compile_spec(BLOCK, "specs/block.fuse")


def test_construction_time_if_else_and_lists():
    text = """\
model M(c=4)
input(1, 3, 6, 6)
let sizes = [3, 5, 8]
let big = 4
block body(k, wide):
    if wide:
        conv1x1(3, sizes[k]) -> relu
    else:
        conv1x1(3, sizes[k]) -> relu6
forward:
    a: body(2 if big > 3 else 0, not big == 4 or False)
    fc: conv1x1(8, c)
"""
    generated = load_spec(text, "if")
    model = generated.ModelNew()
    assert isinstance(model.a[1], nn.ReLU6) and model.a[0].out_channels == 8
    assert "conv1x1_relu6(" in run_kernels_source(generated.SOURCE)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("    y: b(c)\n", "this condition depends on the constructor parameter(s) c"),
        ("    seq:\n        relu * c\n", "a repeat count that follows constructor arguments repeats one block call"),
        ("    seq:\n        b(1) * c\n        relu\n", "repeats the last line of its block"),
        ("    y = add(x) -> c1: conv1x1(3, 3)\n", "must come after the kernel's last anchor"),
        ("    seq:\n        add(x)\n", "add reads other values, so it has no module"),
        ("    y = x -> relu -> add(z)\n", "add: other must name a value of this body"),
        (
            "    y = x -> relu\n    z = c1: conv1x1(3, 5) -> add(y)\n",
            "the value added has shape [1, 3, 6, 6], the tensor flowing in [1, 5, 6, 6]",
        ),
    ],
)
def test_graph_errors(line, fragment):
    # an `if` inside a block is decided per call site, so it must not follow constructor arguments
    text = f"model M(c=4)\ninput(1, 3, 6, 6)\nblock b(k):\n    if k > 3:\n        relu\nforward:\n{line}"
    with pytest.raises(SpecError) as err:
        compile_spec(text, "specs/m.fuse")
    assert fragment in err.value.message


LOOP = MODULES.replace("model Net(num_classes=5)", "model Net(layers=[2, 1], num_classes=5)").replace(
    "stage1: stage(4, 4, 2, 1)\n    stage2: stage(4, 6, 1, 2)",
    "stage1: stage(4, 4, layers[0], 1)\n    stage2: stage(4, 6, layers[1], 2)",
)


@pytest.mark.parametrize("layers", [[1, 1], [3, 2]])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_repeat_count_from_a_constructor_argument_is_a_loop(layers, training):
    """`unit(...) * (blocks - 1)` with blocks from `layers`: forward loops over the stage's remaining
    children, so the model built with other layers (one unit a stage, or three) still matches."""
    source = load_spec(LOOP, "graph").SOURCE
    assert "for block in self.stage1[1:]:" in run_kernels_source(source, "run_kernels_after_first")
    ref, new = pair(LOOP, lambda layers: TorchNet(5, layers), layers)
    if not training:
        randomize_batchnorm(ref, seed=5)
        new.load_state_dict(ref.state_dict())
        ref.eval(), new.eval()
    x = torch.rand(2, 3, 7, 9, device=DEVICE)
    with torch.no_grad():
        assert rel_error(new(x), ref(x)) < TOLERANCE
    for a, b in zip(new.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


BRANCHES = """\
model MBConv(in_channels=4, out_channels=6, stride=2, expand_ratio=3)
input(2, in_channels, 9, 9)

forward:
    let hidden = in_channels * expand_ratio
    let expands = expand_ratio != 1
    let use_residual = stride == 1 and in_channels == out_channels
    identity = x
    if expands:
        expand_conv:
            conv1x1(in_channels, hidden) -> bn(hidden) -> relu6
    depthwise_conv:
        dwconv3x3(hidden, stride) -> bn(hidden) -> relu6
    if use_residual:
        project_conv:
            conv1x1(hidden, out_channels) -> bn(out_channels)
        x = x -> add(identity)
    else:
        project_conv:
            conv1x1(hidden, out_channels) -> bn(out_channels)
"""


class TorchMBConv(nn.Module):
    def __init__(self, in_channels=4, out_channels=6, stride=2, expand_ratio=3):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
            )
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project_conv = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x
        if hasattr(self, "expand_conv"):
            x = self.expand_conv(x)
        x = self.project_conv(self.depthwise_conv(x))
        return x + identity if self.use_residual else x


@pytest.mark.parametrize("args", [(4, 6, 2, 3), (4, 4, 1, 3), (4, 4, 1, 1), (5, 3, 2, 1)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_an_if_on_constructor_arguments_is_decided_at_run_time(args, training):
    """Both bodies of each `if` are compiled; __init__ keeps the conditions (self.expands,
    self.use_residual) and forward follows them, so every combination matches."""
    source = load_spec(BRANCHES, "graph").SOURCE
    run = run_kernels_source(source)
    assert "if self.expands:" in run and "if self.use_residual:" in run
    assert "conv1x1_bn_add(" in run  # the residual still fuses, inside its branch
    ref, new = pair(BRANCHES, TorchMBConv, *args)
    if not training:
        randomize_batchnorm(ref, seed=sum(args))
        new.load_state_dict(ref.state_dict())
        ref.eval(), new.eval()
    x = torch.rand(2, args[0], 9, 7, device=DEVICE)
    with torch.no_grad():
        assert rel_error(new(x), ref(x)) < TOLERANCE


INDEXED = """\
model Widths(widths=[3, 5, 4])
input(2, 3, 7, 9)

forward:
    features:
        conv(widths[i], widths[i + 1], 3, padding=1) -> relu for i in range(2)
"""


class TorchWidths(nn.Module):
    def __init__(self, widths=(3, 5, 4)):
        super().__init__()
        layers = []
        for i in range(2):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


@pytest.mark.parametrize("widths", [[3, 5, 4], [3, 2, 7]])
def test_a_repeat_with_an_index_and_a_constant_count_is_inlined_per_index(widths):
    """`chain for i in range(2)`: each repeat reads its own `i` (the widths of its conv), and a constant count
    inlines the repeats: two launches, no loop."""
    source = load_spec(INDEXED, "graph").SOURCE
    assert "for " not in run_kernels_source(source)
    ref, new = pair(INDEXED, TorchWidths, widths)
    x = torch.rand(2, 3, 7, 9, device=DEVICE)
    with torch.no_grad():
        assert rel_error(new(x), ref(x)) < TOLERANCE


IDENTITY_OR_CONVS = """\
model Net(c=8, p=True)
input(2, c, 6, 6)

forward:
    let projects = p
    y = x
    if projects:
        a = x -> m1: conv1x1(c, c) -> relu
        b = x -> m2: conv1x1(c, c)
        y = a -> add(b)
    return y
"""


@pytest.mark.parametrize("projects", [True, False])
def test_an_output_that_a_branch_may_pass_on_from_the_input_comes_back_in_torchs_layout(projects):
    """Where a body returns the model's input as it is (here the run method's channels-last copy of it, which
    two kernels read), the forward keeps its final copy to torch's layout, and the other body's launches store
    channels-last: the output is contiguous either way."""
    module = load_spec(IDENTITY_OR_CONVS, "test_graph_identity_or_convs")
    run = run_kernels_source(module.SOURCE)
    assert run.rstrip().endswith(".contiguous()") and "out_layout" not in run
    torch.manual_seed(0)
    model = module.ModelNew(8, projects).to(DEVICE).eval()
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    with torch.no_grad():
        out, want = model(x), model.reference_forward(x)
    assert out.is_contiguous(), out.stride()
    assert rel_error(out, want) < TOLERANCE
