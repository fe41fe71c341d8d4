"""On the GPU, ModelNew replays its launches as a CUDA graph: same results as direct launches, never
stale after a parameter, shape or device change, and never overwriting a tensor it returned."""

import pytest
import torch

from helpers import ON_GPU, load_spec, randomize_batchnorm

pytestmark = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU; on the CPU forward launches directly")

SPEC = """\
model Net(c=8, classes=10)
input(2, 3, 17, 15)
forward:
    conv1: conv3x3(3, c, stride=2) -> bn1: bn(c) -> relu
    dw: dwconv3x3(c) -> bn2: bn(c) -> relu6
    pw: conv1x1(c, 24) -> bn3: bn(24) -> relu
    global_avgpool -> flatten
    fc: linear(24, classes)
"""


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = load_spec(SPEC, "graphs").ModelNew().cuda().eval()
    randomize_batchnorm(m)
    return m


def rand(*shape):
    return torch.randn(*shape, device="cuda")


@torch.no_grad()
def test_replay_equals_direct_launches(model):
    x = rand(2, 3, 17, 15)
    direct = model.run_kernels(x)
    assert torch.equal(model(x), direct)
    assert torch.equal(model(x), direct)  # second call: a replay of the captured graph
    assert len(model.cuda_graphs) == 1


@torch.no_grad()
def test_returned_tensors_are_never_overwritten(model):
    first = model(rand(2, 3, 17, 15))
    kept = first.clone()
    second = model(rand(2, 3, 17, 15))
    assert torch.equal(first, kept)
    assert not torch.equal(first, second)


@torch.no_grad()
def test_parameter_changes_are_seen(model):
    x = rand(2, 3, 17, 15)
    before = model(x)
    model.bn1.running_var.mul_(4)  # in place
    changed = model(x)
    assert not torch.allclose(before, changed)
    assert torch.equal(changed, model.run_kernels(x))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pw.weight"].normal_()
    model.load_state_dict(state)
    assert torch.equal(model(x), model.run_kernels(x))
    model.fc.weight = torch.nn.Parameter(torch.randn_like(model.fc.weight))  # replaced
    assert torch.equal(model(x), model.run_kernels(x))


@torch.no_grad()
def test_each_input_shape_gets_its_own_graph(model):
    small, large = rand(1, 3, 9, 9), rand(4, 3, 33, 20)
    for x in (small, large, small):
        assert torch.equal(model(x), model.run_kernels(x))
    assert len(model.cuda_graphs) == 2


@torch.no_grad()
def test_forward_inside_a_callers_own_capture(model):
    x = rand(2, 3, 17, 15)
    expected = model.run_kernels(x)
    model(x)  # warm up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(x)
    graph.replay()
    assert torch.equal(out, expected)


@torch.no_grad()
def test_switching_graphs_off(model):
    model.use_cuda_graphs = False
    x = rand(2, 3, 17, 15)
    assert torch.equal(model(x), model.run_kernels(x))
    assert not model.cuda_graphs
