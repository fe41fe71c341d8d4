"""On the GPU, ModelNew replays its launches as a CUDA graph: same results as direct launches, never
stale after a parameter, shape or device change, never overwriting a tensor that the caller holds,
whether the graph reads the caller's tensor where it lies or copies it in."""

import copy
import warnings
import weakref

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
    params=[(SPEC, None, None), (FLOAT16_SPEC, None, None), (FLOAT16_SPEC, None, 0), (FLOAT16_SPEC, 0, 0)],
    ids=["float32", "float16", "float16-copied-input", "float16-first-kernel-outside"],
)
def model(request):
    """The first two read the caller's tensor where it lies; the others have no such graphs, so a replay
    copies the input in, and in the last every input counts as large, so a replay runs the first launch
    outside the graph instead."""
    spec, outside_from, direct_graphs = request.param
    torch.manual_seed(0)
    m = load_spec(spec, "graphs").ModelNew().cuda().eval()
    if outside_from is not None:
        m.first_kernel_outside_graph_numel = outside_from
    if direct_graphs is not None:
        m.direct_graphs = direct_graphs
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
    """The first conv reads any layout: a graph that reads the caller's tensor is captured for its
    strides, and a graph's copy of the input keeps the first call's layout, later inputs in other
    layouts copied into it."""
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
def test_a_graph_reads_the_callers_tensor_where_it_lies(model):
    """A tensor changed in place between calls is read as it is then, by the graph captured for its
    address (or, without such graphs, by the one that copies it in)."""
    x = rand(2, 3, 17, 15)
    assert torch.equal(model(x), model.run_kernels(x))
    x.normal_()
    assert torch.equal(model(x), model.run_kernels(x))
    graphs = model.cuda_graphs[(x.shape, x.dtype, x.device, False)]
    assert list(graphs) == ([(x.data_ptr(), x.stride())] if model.direct_graphs else [None])
    # and keeps no reference to it: the caller's next input may take its memory
    alive = weakref.ref(x)
    del x
    assert alive() is None


@torch.no_grad()
def test_inputs_past_the_direct_graphs_share_one_graph_that_copies_them():
    """Four inputs alive at four addresses with direct_graphs = 2: the first two get graphs of their own,
    the other two share one; replays in turn (whose graphs share a memory pool) stay right."""
    torch.manual_seed(0)
    model = load_spec(FLOAT16_SPEC, "graphs").ModelNew().cuda().eval()
    randomize_batchnorm(model)
    model.direct_graphs = 2
    inputs = [rand(2, 3, 17, 15) for _ in range(4)]
    expected = [model.run_kernels(x) for x in inputs]
    for _ in range(2):
        outputs = [model(x) for x in inputs]
        assert all(torch.equal(out, want) for out, want in zip(outputs, expected))
    (graphs,) = model.cuda_graphs.values()
    assert list(graphs) == [(x.data_ptr(), x.stride()) for x in inputs[:2]] + [None]


@torch.no_grad()
def test_returned_tensors_are_never_overwritten(model):
    first = model(rand(2, 3, 17, 15))
    kept = first.clone()
    second = model(rand(2, 3, 17, 15))
    assert torch.equal(first, kept)
    assert not torch.equal(first, second)


@torch.no_grad()
def test_an_output_is_handed_out_again_only_once_the_caller_lets_go(model):
    """A replay hands out its graph's own output, written in place once the caller has let go of the
    last one; while the caller holds it (or only a view of it) another graph writes, and past
    model.returned_outputs held outputs a clone is handed out."""
    x = rand(2, 3, 17, 15)  # one address: one graph entry, changed in place between calls
    inputs = [rand(2, 3, 17, 15) for _ in range(5)]
    expected = [model.run_kernels(i) for i in inputs]
    address = model(x).data_ptr()  # dropped at once
    x.copy_(inputs[0])
    assert model(x).data_ptr() == address
    row = model(x)[0]  # only a view of the output held
    held = []
    for i in inputs[1:]:
        x.copy_(i)
        held.append(model(x))
    assert torch.equal(row, expected[0][0])
    assert all(torch.equal(out, want) for out, want in zip(held, expected[1:]))
    assert len({row.data_ptr(), *(out.data_ptr() for out in held)}) == 5
    ((entry,),) = (graphs.values() for graphs in model.cuda_graphs.values())
    assert len(entry["returned"]) == model.returned_outputs == 2 and entry["cloned"] is not None
    del row, held
    x.copy_(inputs[4])
    assert model(x).data_ptr() == address


@torch.no_grad()
def test_an_output_that_is_a_view_is_handed_out_again_once_dropped():
    """A forward that ends in a view (a flatten, as SqueezeNet's does): the view's base holds the memory
    too, which must not count as the caller's hold, or every call would capture graphs until the clone."""
    torch.manual_seed(0)
    model = load_spec(SPEC.replace("    fc: linear(24, classes)\n", ""), "graphs_view").ModelNew().cuda().eval()
    x = rand(2, 3, 17, 15)
    address = model(x).data_ptr()  # dropped at once
    for _ in range(3):
        assert model(x).data_ptr() == address
    ((entry,),) = (graphs.values() for graphs in model.cuda_graphs.values())
    assert len(entry["returned"]) == 1 and entry["cloned"] is None
    held = model(x)
    assert model(x).data_ptr() != held.data_ptr() == address


@pytest.mark.skipif(ON_GPU and torch.cuda.get_device_capability()[0] < 9, reason="dependent launches need Hopper on")
@torch.no_grad()
def test_dependent_launches_compute_what_plain_ones_do(monkeypatch):
    """Programmatic dependent launch for every launch (not only the small ones that launch_pdl picks), on
    an input large enough for several waves of programs: each launch still reads what the one before it
    wrote, bit for bit, launched directly and in a graph."""
    torch.manual_seed(0)
    module = load_spec(FLOAT16_SPEC, "graphs")
    model = module.ModelNew().cuda().eval()
    randomize_batchnorm(model)
    x = rand(64, 3, 97, 89)
    monkeypatch.setattr(module, "launch_pdl", lambda x, grid: False)
    plain = model.run_kernels(x)
    monkeypatch.setattr(module, "launch_pdl", lambda x, grid: True)
    for _ in range(3):
        assert torch.equal(model.run_kernels(x), plain)
        assert torch.equal(model(x), plain)


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
def test_the_graphs_of_one_shape_share_their_intermediates():
    """Graphs for inputs at four addresses take no more memory than one: all are captured on one stream
    into one pool, so each reuses the intermediates' blocks (the caching allocator reuses a block only
    on the stream that freed it; a stream per capture kept a forward's intermediates per graph)."""
    torch.manual_seed(0)
    model = load_spec(SPEC, "graphs").ModelNew().cuda().eval()
    xs = [rand(8, 3, 256, 256) for _ in range(4)]
    model(xs[0])
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for x in xs[1:]:
        model(x)
    assert len(model.cuda_graphs[(xs[0].shape, xs[0].dtype, xs[0].device, False)]) == 4
    one_forward = 4 * 8 * (8 + 8 + 24) * 128 * 128  # conv1's, dw's and pw's float32 outputs
    assert torch.cuda.memory_reserved() - reserved < one_forward


@torch.no_grad()
def test_only_a_large_input_skips_the_copy_into_the_graph():
    """In the graph of inputs past direct_graphs: from first_kernel_outside_graph_numel input elements
    the first launch runs outside the graph, on the caller's tensor; a smaller input is copied in."""
    torch.manual_seed(0)
    model = load_spec(FLOAT16_SPEC, "graphs").ModelNew().cuda().eval()
    randomize_batchnorm(model)
    model.direct_graphs = 0
    large, small = rand(4, 3, 17, 15), rand(2, 3, 17, 15)
    model.first_kernel_outside_graph_numel = large.numel()
    for x in (large, small, large, small):
        assert torch.equal(model(x), model.run_kernels(x))
    outside = {key[0]: graphs[None]["outside"] for key, graphs in model.cuda_graphs.items()}
    assert outside == {large.shape: True, small.shape: False}


# what a capture runs: all of it, or after the first launch
CAPTURED_METHODS = ("run_kernels", "run_kernels_after_first")


def forbidden_call_during_capture(model):
    """Makes the capture of model's forward call torch.cuda.synchronize, which capturing forbids (the
    methods are looked up on the instance, so the capture runs these wrappers); allow_capture undoes it."""

    def forbidding(method):
        def run(x):
            if torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            return method(x)

        return run

    for name in CAPTURED_METHODS:
        setattr(model, name, forbidding(getattr(type(model), name).__get__(model)))


def allow_capture(model):
    for name in CAPTURED_METHODS:
        delattr(model, name)


@torch.no_grad()
def test_a_failed_capture_falls_back_to_direct_launches_and_leaves_the_process_usable(model):
    """A CUDA call that capturing forbids fails the capture: forward still returns the direct launches'
    result, says so once and why, launches directly from then on, and torch's stream and random generator are as
    before (without the cleanup every later random op on the GPU fails)."""
    x = rand(2, 3, 17, 15)
    expected = model.run_kernels(x)
    stream = torch.cuda.current_stream()
    forbidden_call_during_capture(model)
    # the warning says why: the CUDA error's first line
    with pytest.warns(RuntimeWarning, match=r"capturing the forward as a CUDA graph failed \(.*\w.*\), so it"):
        assert torch.equal(model(x), expected)
    assert model.use_cuda_graphs is False and not model.cuda_graphs
    assert torch.cuda.current_stream() == stream
    torch.randn(8, device="cuda").sum().item()
    torch.nn.functional.dropout(rand(64), 0.5, training=True).sum().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert torch.equal(model(x), expected)
    allow_capture(model)
    model.use_cuda_graphs = True
    assert torch.equal(model(x), expected) and len(model.cuda_graphs) == 1
