"""On the GPU, ModelNew replays its launches as a CUDA graph: same results as direct launches, never
stale after a parameter, shape or device change, and never overwriting a tensor it returned."""

import copy

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


# the same net with float16 between its kernels in eval mode
FLOAT16_SPEC = SPEC.replace("input(2, 3, 17, 15)\n", "input(2, 3, 17, 15)\nactivations(float16)\n")


@pytest.fixture(
    params=[(SPEC, None), (FLOAT16_SPEC, None), (FLOAT16_SPEC, 0)],
    ids=["float32", "float16", "float16-first-kernel-outside"],
)
def model(request):
    """The last: every input counts as large, so a replay runs the first launch outside the graph."""
    spec, outside_from = request.param
    torch.manual_seed(0)
    m = load_spec(spec, "graphs").ModelNew().cuda().eval()
    if outside_from is not None:
        m.first_kernel_outside_graph_numel = outside_from
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
def test_inputs_in_any_layout_replay_alike(model):
    """The first conv reads any layout, so the graph's copy of the input keeps the caller's: the
    first call's layout fixes it, and later inputs in other layouts are copied into it."""
    x = rand(2, 3, 17, 15)
    strided = torch.full((2, 3, 17, 30), float("nan"), device="cuda")
    strided[..., ::2] = x
    direct = model.run_kernels(x)
    for first in (x.to(memory_format=torch.channels_last), x):
        model.cuda_graphs.clear()
        for layout in (first, x, x.to(memory_format=torch.channels_last), strided[..., ::2]):
            assert torch.equal(model(layout), direct)
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
def test_a_changed_activation_dtype_captures_again():
    torch.manual_seed(0)
    model = load_spec(FLOAT16_SPEC, "graphs").ModelNew().cuda().eval()
    randomize_batchnorm(model)
    x = rand(2, 3, 17, 15)
    narrow = model(x)
    model.activation_dtype = torch.float32
    wide = model(x)
    assert torch.equal(wide, model.run_kernels(x)) and not torch.equal(wide, narrow)
    model.activation_dtype = torch.float16
    assert torch.equal(model(x), narrow)


@torch.no_grad()
def test_switching_graphs_off(model):
    model.use_cuda_graphs = False
    x = rand(2, 3, 17, 15)
    assert torch.equal(model(x), model.run_kernels(x))
    assert not model.cuda_graphs


@torch.no_grad()
def test_training_mode_replays_update_the_running_statistics_once_per_call(model):
    """Capturing runs the kernels once to compile them; that run must not count as a training step."""
    direct = copy.deepcopy(model).train()
    direct.use_cuda_graphs = False
    model.train()
    for _ in range(3):  # capture, then replays
        x = rand(2, 3, 17, 15)
        assert torch.equal(model(x), direct(x))
        for key, buffer in direct.state_dict().items():
            assert torch.equal(model.state_dict()[key], buffer), key
    model.eval()
    x = rand(2, 3, 17, 15)
    assert torch.equal(model(x), direct.eval()(x))
    assert len(model.cuda_graphs) == 2  # one per mode


@torch.no_grad()
def test_changed_batchnorm_scalars_capture_again(model):
    """eps and momentum reach the kernels as constants of the captured graph: changing them must
    not replay the old ones."""
    direct = copy.deepcopy(model).train()
    direct.use_cuda_graphs = False
    model.train()
    x = rand(2, 3, 17, 15)
    assert torch.equal(model(x), direct(x))
    for m in (model, direct):
        m.bn2.momentum = None  # a cumulative average from now on
        m.bn1.eps = 1e-2
    for _ in range(2):
        assert torch.equal(model(x), direct(x))
        for key, buffer in direct.state_dict().items():
            assert torch.equal(model.state_dict()[key], buffer), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_launches_on_the_inputs_device_not_the_current_one(model, graphs, training):
    expected_model = copy.deepcopy(model).train(training)
    expected_model.use_cuda_graphs = False
    on_1 = copy.deepcopy(model).to("cuda:1").train(training)
    on_1.use_cuda_graphs = graphs
    x = rand(2, 3, 17, 15)
    with torch.cuda.device(0), torch.no_grad():
        out = on_1(x.to("cuda:1"))
        expected = expected_model(x)
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), expected.cpu())


@torch.no_grad()
def test_only_a_large_input_skips_the_copy_into_the_graph():
    """From first_kernel_outside_graph_numel input elements the first launch runs outside the graph,
    on the caller's tensor; a smaller input is copied into the graph."""
    torch.manual_seed(0)
    model = load_spec(FLOAT16_SPEC, "graphs").ModelNew().cuda().eval()
    randomize_batchnorm(model)
    large, small = rand(4, 3, 17, 15), rand(2, 3, 17, 15)
    model.first_kernel_outside_graph_numel = large.numel()
    for x in (large, small, large, small):
        assert torch.equal(model(x), model.run_kernels(x))
    outside = {key[0]: entry[-1] for key, entry in model.cuda_graphs.items()}
    assert outside == {large.shape: True, small.shape: False}
