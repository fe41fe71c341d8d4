"""graph_inputs_unchanged decides whether a captured CUDA graph may replay: it must see every change
that a replay would miss (a stale graph), and no change where the kernels read memory live. Plain
Python over the module tree, so it runs on the CPU too."""

import pytest
import torch

from helpers import load_spec

SPEC = """\
model Net(c=8, classes=10)
input(2, 3, 17, 15)
activations(float16)
forward:
    conv1: conv3x3(3, c, stride=2) -> bn1: bn(c) -> relu
    pw: conv1x1(c, 24) -> bn2: bn(24) -> relu
    global_avgpool -> flatten
    fc: linear(24, classes)
"""


def replace_parameter(m):
    m.fc.weight = torch.nn.Parameter(torch.randn_like(m.fc.weight))


def reassign_data(m):
    m.pw.weight.data = torch.randn_like(m.pw.weight)  # same object and version, new memory


def change_parameter_in_place(m):
    m.pw.weight.mul_(2)  # a TF32 or float16 copy made at capture would be stale


def replace_buffer(m):
    m.bn1.running_mean = torch.randn_like(m.bn1.running_mean)


def swap_parameter_for_plain_tensor(m):
    # as torch.func.functional_call does: the name no longer resolves to the captured parameter
    weight = m.fc.weight
    del m.fc.weight
    m.fc.weight = torch.randn_like(weight)


def change_eps(m):
    m.bn2.eps = 1e-2


def change_momentum(m):
    m.bn1.momentum = None


def change_activation_dtype(m):
    m.activation_dtype = torch.float32


def replace_submodule(m):
    m.bn2 = torch.nn.BatchNorm2d(24)


@pytest.mark.parametrize(
    "change",
    [
        replace_parameter,
        reassign_data,
        change_parameter_in_place,
        replace_buffer,
        swap_parameter_for_plain_tensor,
        change_eps,
        change_momentum,
        change_activation_dtype,
        replace_submodule,
    ],
)
def test_changes_that_a_replay_would_miss_are_seen(change):
    module = load_spec(SPEC, "graph_inputs")
    model = module.ModelNew()
    inputs = module.graph_inputs(model, model.captured_attrs)
    assert module.graph_inputs_unchanged(inputs)
    with torch.no_grad():
        change(model)
    assert not module.graph_inputs_unchanged(inputs)


def test_buffers_changed_in_place_replay_as_they_are():
    """The kernels read BatchNorm's running statistics where they lie: updating them in place (as
    training mode and load_state_dict do) needs no new capture."""
    module = load_spec(SPEC, "graph_inputs")
    model = module.ModelNew()
    inputs = module.graph_inputs(model, model.captured_attrs)
    model.bn1.running_var.mul_(4)
    model.bn2.num_batches_tracked += 1
    assert module.graph_inputs_unchanged(inputs)
