"""The plain-torch references in reference_models.py against KernelBench's own level-3 files: the same
constructor signature, the same parameters drawn in the same order under one seed (state_dict keys, order
and values), the same outputs in training and in eval mode, the same running statistics after a
training-mode forward. Each net at its SMALL arguments and at KernelBench's, on small inputs."""

import copy
import functools
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import randomize_batchnorm
from reference_models import KERNELBENCH, SMALL

LEVEL3 = Path(__file__).resolve().parents[2] / "shared" / "kernelbench" / "level3"
if not LEVEL3.exists():
    LEVEL3 = Path("/work/shared/kernelbench/level3")

FILES = {
    "lenet5": "4_LeNet5",
    "alexnet": "5_AlexNet",
    "resnet_basic_block": "8_ResNetBasicBlock",
    "resnet18": "9_ResNet18",
    "resnet101": "10_ResNet101",
    "vgg16": "11_VGG16",
    "vgg19": "12_VGG19",
    "mobilenet_v2": "20_MobileNetV2",
    "efficientnet_mbconv": "21_EfficientNetMBConv",
    "efficientnet_b0": "22_EfficientNetB0",
    "efficientnet_b2": "24_EfficientNetB2",
    "mobilenet_v1": "19_MobileNetV1",
    "efficientnet_b1": "23_EfficientNetB1",
    "squeezenet_fire_module": "17_SqueezeNetFireModule",
    "squeezenet": "18_SqueezeNet",
    "googlenet_inception_module": "6_GoogleNetInceptionModule",
    "googlenet_inception_v1": "7_GoogleNetInceptionV1",
    "densenet121_transition_layer": "13_DenseNet121TransitionLayer",
    "regnet": "27_RegNet",
    "shufflenet_unit": "25_ShuffleNetUnit",
    "shufflenet": "26_ShuffleNet",
    "densenet121_dense_block": "14_DenseNet121DenseBlock",
    "densenet121": "15_DenseNet121",
    "densenet201": "16_DenseNet201",
    "unet_softmax": "45_UNetSoftmax",
}
SEED = 42


@functools.cache
def kernelbench(stem):
    """KernelBench's problem file, imported by path."""
    spec = importlib.util.spec_from_file_location(f"kernelbench_{FILES[stem]}", LEVEL3 / f"{FILES[stem]}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernelbench_case(stem):
    """KernelBench's constructor arguments, on an input of the first SMALL case's batch and size (valid for
    every net at either arguments) with as many channels as KernelBench's input."""
    _, args, shape = KERNELBENCH[stem]
    small_shape = SMALL[stem][0][1]
    return args, (small_shape[0], shape[1], *small_shape[2:])


CASES = [(stem, args, shape) for stem in KERNELBENCH for args, shape in SMALL[stem]]
CASES += [(stem, *kernelbench_case(stem)) for stem in KERNELBENCH]


def case_id(case):
    stem, args, shape = case
    return f"{stem}-{args}-{'x'.join(map(str, shape))}".replace(" ", "")


def seeded(cls, args):
    """Built as KernelBench builds Model and ModelNew: the seed set right before the constructor."""
    torch.manual_seed(SEED)
    return cls(*args)


@pytest.fixture(scope="module", params=CASES, ids=map(case_id, CASES))
def case(request):
    """(ours, KernelBench's, input shape), built once per case: tests that change them work on copies."""
    stem, args, shape = request.param
    return seeded(KERNELBENCH[stem][0], args), seeded(kernelbench(stem).Model, args), shape


# Both sides run the same torch ops in the same order, so they agree bitwise in practice; the tolerance only
# spares the tests a kernel whose rounding might depend on memory alignment.
RTOL, ATOL = 1e-6, 1e-6


def assert_same_state(ours, theirs):
    """Keys in the same order, parameters bitwise equal, buffers (the running statistics that a training-mode
    forward updates) equal to RTOL/ATOL."""
    buffers = {name for name, _ in ours.named_buffers()}
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and value.shape == theirs[key].shape, key
        if key in buffers:
            torch.testing.assert_close(value, theirs[key], rtol=RTOL, atol=ATOL, msg=key)
        else:
            assert torch.equal(value, theirs[key]), key


def assert_same_outputs(ours, theirs, shape):
    """Same input to both (a copy each, in case one forward writes into it)."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = theirs(x.clone())
        out = ours(x.clone())
    assert out.shape == expected.shape
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def test_every_kernelbench_net_has_a_reference_and_small_cases():
    assert set(KERNELBENCH) == set(SMALL) == set(FILES)
    assert all(SMALL[stem] for stem in SMALL)


@pytest.mark.parametrize("stem", KERNELBENCH)
def test_table_holds_kernelbench_arguments_and_input_shape(stem):
    _, args, shape = KERNELBENCH[stem]
    module = kernelbench(stem)
    assert module.get_init_inputs() == args
    with torch.device("meta"):  # the shape only: AlexNet's batch of 1024 would take 600 MB
        (x,) = module.get_inputs()
    assert tuple(x.shape) == shape


@pytest.mark.parametrize("stem", KERNELBENCH)
def test_same_constructor_signature(stem):
    ours, theirs = inspect.signature(KERNELBENCH[stem][0]), inspect.signature(kernelbench(stem).Model)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


def test_same_parameters_drawn_in_the_same_order(case):
    ours, theirs, _ = case
    assert_same_state(ours, theirs)
    assert module_tree(ours) == module_tree(theirs)


def module_tree(model):
    """Each submodule's name, its class where it is torch's own, and its plain attributes (a block's
    `stride`, ResNet's `in_channels`, MBConv's `use_residual`, each layer's configuration)."""
    return [
        (name, type(m) if type(m).__module__.startswith("torch.") else None, public_attributes(m))
        for name, m in model.named_modules()
    ]


def public_attributes(module):
    return {key: value for key, value in vars(module).items() if not key.startswith("_")}


def test_eval_mode_outputs_match(case):
    ours, theirs, shape = copy.deepcopy(case)
    for model in (ours, theirs):
        randomize_batchnorm(model, seed=7)
        model.eval()
    assert_same_outputs(ours, theirs, shape)


def test_training_mode_outputs_and_running_statistics_match(case):
    ours, theirs, shape = copy.deepcopy(case)
    for model in (ours, theirs):
        randomize_batchnorm(model, seed=7)
        model.train()
    assert_same_outputs(ours, theirs, shape)
    assert_same_state(ours, theirs)


@given(
    channels=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel_size=st.sampled_from([1, 3, 5, 7]),
    stride=st.integers(1, 3),
    expand_ratio=st.integers(1, 4),
    size=st.tuples(st.integers(3, 12), st.integers(3, 12)),
    same_channels=st.booleans(),
)
def test_mbconv_at_any_arguments(channels, kernel_size, stride, expand_ratio, size, same_channels):
    """Same channels and stride 1 give the residual; expand ratio 1 drops expand_conv."""
    in_channels, out_channels = (channels[0], channels[0]) if same_channels else channels
    args = [in_channels, out_channels, kernel_size, stride, expand_ratio]
    check_block("efficientnet_mbconv", args, (2, in_channels, *size))


@given(
    channels=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    stride=st.integers(1, 3),
    size=st.tuples(st.integers(2, 12), st.integers(2, 12)),
)
def test_resnet_basic_block_at_any_arguments(channels, stride, size):
    check_block("resnet_basic_block", [*channels, stride], (2, channels[0], *size))


def check_block(stem, args, shape):
    ours, theirs = seeded(KERNELBENCH[stem][0], args), seeded(kernelbench(stem).Model, args)
    assert_same_state(ours, theirs)
    for model in (ours, theirs):
        randomize_batchnorm(model, seed=sum(shape))
    assert_same_outputs(ours.eval(), theirs.eval(), shape)
    assert_same_outputs(ours.train(), theirs.train(), shape)
    assert_same_state(ours, theirs)
