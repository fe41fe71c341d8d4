"""The dataflow graph: named values, values used twice, the residual add fused into an epilogue, `module`
blocks with named children and module arguments, construction-time `if`, lists and repeats."""

import ast

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st

from fusegen import SpecError, compile_spec
from fusegen.check import check
from fusegen.parse import parse_spec
from fusegen.plan import _eval_groups, why_not_fused
from helpers import DEVICE, TOLERANCE, load_spec, randomize_batchnorm, rel_error

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
    assert "conv3x3_bn_add_relu(out, self.conv2, self.bn2, identity)" in run
    assert run.index("identity = conv1x1_bn(x") < run.index("conv3x3_bn_add_relu")
    assert "def conv3x3_bn_add_relu(x, conv, bn, add)" in source
    # a 4-d output comes back in torch's layout, as the reference's
    assert run.rstrip().endswith(".contiguous()")


def test_why_an_elementwise_line_is_not_fused():
    """The fusion pass says why a chain of elementwise ops cannot join the kernel that makes its input."""
    text = BLOCK.replace("return out -> add(identity) -> relu", "y = out -> relu\n    return out -> add(y)")
    model = check(parse_spec(text), text)
    groups = _eval_groups(model.graph)
    relu_chain = next(c for c in model.graph.chains if c.text == "y = out -> relu")
    conv2 = next(
        g for g in groups if not isinstance(g, type(relu_chain)) and g.anchor and g.anchor.module_path == "conv2"
    )
    assert (
        why_not_fused(conv2, relu_chain, model.graph)
        == "its input is read 2 times, so the kernel that makes it stores it"
    )


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
    x = torch.rand(n, cin, h, w, device=DEVICE)
    with torch.no_grad():
        out, want = new(x), ref(x)
    assert out.is_contiguous()
    assert rel_error(out, want) < TOLERANCE
    for a, b in zip(new.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)  # running statistics


MODULES = """\
model Net(num_classes=5, widths=[4, 6])
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

    def __init__(self, num_classes=5, widths=(4, 6)):
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

        self.stage1 = stage(4, 4, 2, 1)
        self.stage2 = stage(4, 6, 1, 2)
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
        ("    if c > 3:\n        relu\n", "this condition depends on the constructor parameter(s) c"),
        ("    seq:\n        relu * c\n", "this repeat count depends on the constructor parameter(s) c"),
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
    text = f"model M(c=4)\ninput(1, 3, 6, 6)\nforward:\n{line}"
    with pytest.raises(SpecError) as err:
        compile_spec(text, "specs/m.fuse")
    assert fragment in err.value.message
