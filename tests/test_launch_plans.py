"""Without a CUDA graph, ModelNew records its forward once per input signature (the second call) and
replays the recorded launches and torch ops from then on (runtime.run_launch_plan): the replay must
compute what the wrappers compute, bit for bit, update the running statistics as they do, go stale when a
CUDA graph would, and hand out a fresh output every call. On the CPU the replay launches through Triton's
interpreter, so these tests run everywhere."""

import copy
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, ON_GPU, load_spec, randomize_batchnorm

from fusegen import runtime

ROOT = Path(__file__).resolve().parent.parent

# a stem that reads any layout, a depthwise conv, a fused pair, a pool and a linear: views and a
# split-K linear's partial sums among the torch ops
SPEC = """\
model Net(c=8, classes=10)
input(2, 3, 17, 15)
forward:
    conv1: conv3x3(3, c, stride=2) -> bn1: bn(c) -> relu
    dw: dwconv3x3(c) -> bn2: bn(c) -> relu6 -> pw: conv1x1(c, 24) -> bn3: bn(24) -> relu
    global_avgpool -> flatten
    fc: linear(24, classes)
"""


def dense_block():
    """DenseNet's dense block: every layer reads a view of one buffer and stores into its next slice."""
    module = load_spec((ROOT / "specs" / "densenet121_dense_block.fuse").read_text(), "dense_block_plans")
    return module.ModelNew(num_layers=3, num_input_features=5, growth_rate=3), (2, 5, 5, 7)


def dense_block_split_k():
    """The dense block with 64 input features: every layer's 3x3 conv sums 576 products in 2 tiles, so its K
    is split (runtime.k_slice), and a launch of the slices kernel precedes each conv's."""
    module = load_spec((ROOT / "specs" / "densenet121_dense_block.fuse").read_text(), "dense_block_plans")
    return module.ModelNew(num_layers=3, num_input_features=64, growth_rate=3), (2, 64, 5, 7)


def small_net():
    return load_spec(SPEC, "plans").ModelNew(), (2, 3, 17, 15)


def without_graphs(model):
    model.use_cuda_graphs = False
    return model


def pair(make):
    """The model with launch plans and a copy that runs its wrappers every call, seeded alike."""
    torch.manual_seed(0)
    model, shape = make()
    randomize_batchnorm(model, seed=3)
    model = without_graphs(model.to(DEVICE))
    direct = copy.deepcopy(model)
    direct.use_launch_plans = False
    return model, direct, shape


def the_plan(model, training):
    (plan,) = [plan for key, plan in model.launch_plans.items() if key[-1] == training]
    return plan


@pytest.mark.parametrize("make", [small_net, dense_block], ids=["net", "dense_block"])
@pytest.mark.parametrize("training", [False, True])
@torch.no_grad()
def test_a_replay_computes_what_the_wrappers_compute(make, training):
    """Four calls on two inputs (run, record, replay, replay): outputs and every buffer (running
    statistics, num_batches_tracked) bitwise equal to a copy that runs its wrappers every time."""
    model, direct, shape = pair(make)
    model.train(training), direct.train(training)
    xs = [torch.randn(shape, device=DEVICE) for _ in range(2)]
    for i in range(4):
        assert torch.equal(model(xs[i % 2]), direct(xs[i % 2]))
    plan = the_plan(model, training)
    assert plan["steps"], "the forward was recorded"
    kinds = {step[0] for step in plan["steps"]}
    # on the GPU every launch goes straight to its compiled kernel's launcher; the interpreter's are calls
    assert kinds == ({"launch", "op"} if ON_GPU else {"call", "op"})
    # the intermediates (outputs of all launches but the last, training mode's statistics) are places in
    # one allocation: the ops left make the output and what views read (the dense block's eval forward
    # stores every layer into its output buffer: it has no intermediates)
    allocations = [step for step in plan["steps"] if step[0] == "op" and "empty" in str(step[1])]
    assert len(allocations) <= 2 and (plan["arena"][1] or (make is dense_block and not training))
    assert plan["pointers"] == ON_GPU
    for key, buffer in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], buffer), key
    if training:
        assert (
            model.state_dict()["layers.0.0.num_batches_tracked" if make is dense_block else "bn1.num_batches_tracked"]
            == 4
        )


@pytest.mark.parametrize("training", [False, True])
@torch.no_grad()
def test_a_replay_launches_the_slices_of_a_split_k(training):
    """A launch that runs only where K is split (the slices kernel's) is recorded and replayed like any other:
    the plan of the dense block whose convs split K has one launch a layer more than the plan of the one
    whose K fits one slice, and both replays compute what the wrappers compute, buffers included."""
    launches = []
    for make in (dense_block, dense_block_split_k):
        model, direct, shape = pair(make)
        model.train(training), direct.train(training)
        xs = [torch.randn(shape, device=DEVICE) for _ in range(2)]
        for i in range(4):
            assert torch.equal(model(xs[i % 2]), direct(xs[i % 2]))
        for key, buffer in direct.state_dict().items():
            assert torch.equal(model.state_dict()[key], buffer), key
        launches.append(sum(step[0] in ("launch", "call") for step in the_plan(model, training)["steps"]))
    assert launches[1] == launches[0] + 3


@torch.no_grad()
def test_a_replay_hands_out_a_fresh_output_each_call():
    model, direct, shape = pair(small_net)
    model.eval(), direct.eval()
    x, other = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    outputs = [model(x) for _ in range(3)]
    kept = outputs[-1].clone()
    assert torch.equal(model(other), direct(other))
    assert torch.equal(outputs[-1], kept)
    assert len({out.data_ptr() for out in outputs}) == 3


@torch.no_grad()
def test_a_plan_goes_stale_when_a_graph_would():
    """A parameter replaced, a parameter changed in place, a captured attribute (BatchNorm's eps) changed:
    each records again, and the replay sees the change."""
    model, direct, shape = pair(small_net)
    model.eval(), direct.eval()
    x = torch.randn(shape, device=DEVICE)

    def same():
        for _ in range(3):
            assert torch.equal(model(x), direct(x))

    same()
    for m in (model, direct):
        m.fc.weight = torch.nn.Parameter(m.fc.weight * 2)
    same()
    for m in (model, direct):
        m.pw.weight.mul_(-1)
    same()
    for m in (model, direct):
        m.bn2.eps = 0.5
    same()


@torch.no_grad()
def test_inputs_of_another_layout_or_alignment_get_plans_of_their_own():
    """Triton specializes a pointer on its 16-byte alignment and the stem reads its input's strides: an input
    one float past an aligned address, and one in channels_last, each get their own plan."""
    model, direct, shape = pair(small_net)
    model.eval(), direct.eval()
    storage = torch.randn(1 + torch.Size(shape).numel(), device=DEVICE)
    inputs = [
        storage[:-1].view(shape),
        storage[1:].view(shape),
        torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last),
    ]
    for _ in range(3):
        for x in inputs:
            assert torch.equal(model(x), direct(x))
    assert len(model.launch_plans) == 3
    assert all(plan["steps"] for plan in model.launch_plans.values())


@torch.no_grad()
def test_a_forward_that_reads_a_value_on_the_host_is_not_replayed():
    """A forward whose launches depend on a tensor's value (an .item()) cannot be replayed: the plan says
    so, and every call runs the forward as it is."""
    model, direct, shape = pair(small_net)
    model.eval(), direct.eval()
    run_kernels = type(model).run_kernels.__get__(model)
    calls = []

    def reading_a_value(x):
        calls.append(float(x.sum().item()))
        return run_kernels(x)

    model.run_kernels = reading_a_value
    x = torch.randn(shape, device=DEVICE)
    for _ in range(4):
        assert torch.equal(model(x), direct(x))
    assert the_plan(model, False)["steps"] is False
    assert len(calls) == 4


def test_the_gradient_path_replays_plans_and_keeps_gradients_exact():
    """With grad enabled the kernels run inside an autograd.Function; its forward replays the plan, and
    backward's gradients are reference_forward's."""
    model, direct, shape = pair(small_net)
    model.eval()
    x = torch.randn(shape, device=DEVICE)
    for _ in range(3):
        out = model(x)
    assert the_plan(model, False)["steps"]
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.reference_forward(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-6), name


def test_a_call_with_gradients_sees_parameters_and_modules_replaced():
    """The gradient path hands TorchBackward a cached tuple of the parameters (runtime.model_parameters):
    a parameter or module replaced after a call must be among the next call's inputs and get its
    gradient, and one that left the model must not."""
    model, _, shape = pair(small_net)
    model.eval()
    x = torch.randn(shape, device=DEVICE)
    model(x).sum().backward()
    old_weight, old_bn = model.fc.weight, model.bn3
    model.fc.weight = torch.nn.Parameter(old_weight.detach() * 2)
    model.bn3 = copy.deepcopy(old_bn)
    model.bn3.bias.data += 1
    model.extra = torch.nn.Linear(2, 2)  # a module added: the parameters grow
    model.zero_grad(set_to_none=True)
    old_weight.grad = old_bn.bias.grad = None
    out = model(x)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if name.split(".")[0] != "extra"}
    assert old_weight.grad is None and old_bn.bias.grad is None
    model.zero_grad()
    model.reference_forward(x).square().sum().backward()
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-6), name
    assert len(model.parameter_cache[3]) == len(list(model.parameters()))


def test_a_copy_starts_without_plans():
    """A plan holds compiled launchers and tensors of the original: deepcopy and pickling leave it behind."""
    model, _, shape = pair(small_net)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(shape, device=DEVICE))
    model(torch.randn(shape, device=DEVICE))  # with gradients: the parameters' tuple is cached
    assert model.launch_plans and model.parameter_cache is not None
    other = copy.deepcopy(model)
    assert other.launch_plans == {} and other.use_launch_plans and other.parameter_cache is None


def test_the_arena_gives_tensors_whose_lives_overlap_bytes_of_their_own():
    """runtime.arena_layout on a recording of allocations and launches: a tensor that a torch op reads,
    the output, and one that something outside the forward keeps stay allocations; the others get
    512-byte aligned places that no tensor alive at the same time shares, and a tensor made after another
    died may take its bytes."""
    empty, launch = torch.ops.aten.empty.memory_format, "launch"
    held = [torch.zeros(4)] + [torch.empty(n) for n in (100, 300, 100, 50, 100, 7, 9)]
    elsewhere = [held[5], held[7][1:]]  # noqa: F841 (kept outside the recording: a tensor itself, a view of one)
    steps = [
        ["op", empty, [], {}, [], [1], []],  # 0: slot 1 lives from 0 to 2
        ["op", empty, [], {}, [], [2], []],  # 1: slot 2 lives from 1 to 4
        ["call", launch, [None], {}, [(0, 1)], [], []],
        ["op", empty, [], {}, [], [3], []],  # 3: slot 3, read by a view: stays
        ["call", launch, [None, None], {}, [(0, 2), (1, 3)], [], []],
        ["op", empty, [], {}, [], [4], []],  # 5: slot 4, the output
        ["op", torch.ops.aten.view.default, [None, [-1]], {}, [(0, 3)], [], []],
        ["op", empty, [], {}, [], [5], []],  # slot 5, kept elsewhere
        ["op", empty, [], {}, [], [6], []],  # 8: slot 6 lives from 8 to 10, after slot 1 died
        ["op", empty, [], {}, [], [7], []],  # slot 7, a view of it kept elsewhere
        ["call", launch, [None, None, None, None], {}, [(0, 4), (1, 5), (2, 6), (3, 7)], [], []],
    ]
    places, size = runtime.arena_layout(steps, held, output=4)
    assert set(places) == {1, 2, 6}
    lives = {1: (0, 2), 2: (1, 4), 6: (8, 10)}
    spans = {s: (offset, offset + held[s].untyped_storage().nbytes()) for s, (offset, *_) in places.items()}
    for s, (offset, shape, strides, dtype) in places.items():
        assert offset % 512 == 0 and (shape, strides, dtype) == (held[s].shape, held[s].stride(), held[s].dtype)
        assert spans[s][1] <= size
    for a in places:
        for b in places:
            if a < b and lives[a][0] <= lives[b][1] and lives[b][0] <= lives[a][1]:
                assert spans[a][1] <= spans[b][0] or spans[b][1] <= spans[a][0], (a, b)
    assert size == 512 + 1536  # slot 6 reuses slot 1's bytes (or slot 2's, once it died)
