"""Whole models: every committed generated/<stem>.py that KernelBench has a problem for, against its plain-torch
reference in reference_models.py, at small constructor arguments and inputs (SMALL) and, on the GPU, at
KernelBench's own (KERNELBENCH). A net is tested here as soon as its generated file exists."""

import contextlib
import copy
import functools
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusegen.bench import record_launches
from helpers import (
    DEVICE,
    ON_GPU,
    TOLERANCE,
    assert_state_near_float64,
    float16_activations,
    load_spec,
    randomize_batchnorm,
    rel_error,
    training_bar,
)
from reference_models import KERNELBENCH, SMALL

ROOT = Path(__file__).resolve().parent.parent
STEMS = [stem for stem in KERNELBENCH if (ROOT / "generated" / f"{stem}.py").exists()]
SEED = 42  # KernelBench's, set before each constructor

# Nets whose fixed-size layers (MobileNetV1's AvgPool2d(7), the classifiers of AlexNet and VGG) need inputs of
# 193 to 225 pixels, where one forward under Triton's interpreter takes minutes of CPU. On the CPU they run the
# checks that launch no kernel and the least that runs every kernel once: eval mode in the spec's activation
# dtype and one training-mode step (none where training mode runs eval mode's kernels); the rest on the GPU.
# GoogLeNet's input is small, but its 3x3 and 5x5 convs of up to 832 channels make one forward take as long, and
# so do ResNet18's 3x3s of up to 512 channels (its gradients run in ResNet101's and the basic block's cases).
# DenseNet121's and DenseNet201's 58 and 98 dense layers (a few launches each) do too at any input.
LARGE_INPUT = {
    "mobilenet_v1", "alexnet", "vgg16", "vgg19", "googlenet_inception_v1", "resnet18", "densenet121", "densenet201"
}
GPU_ONLY = "runs on the GPU only for a large-input net (LARGE_INPUT): too slow under the interpreter"


@functools.cache
def generated(stem: str):
    spec = importlib.util.spec_from_file_location(f"generated_{stem}", ROOT / "generated" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def declares_float16_activations(stem: str) -> bool:
    """Whether the spec says `activations(float16)`: then eval mode stores the tensors between kernels as
    float16 unless model.activation_dtype is set to float32."""
    return "self.activation_dtype" in (ROOT / "generated" / f"{stem}.py").read_text()


def has_training_kernels(stem: str) -> bool:
    """False for a net without BatchNorm: its training mode runs eval mode's kernels."""
    return hasattr(generated(stem).ModelNew, "run_training_kernels")


def cpu_subset(stem: str) -> bool:
    """Whether only LARGE_INPUT's subset of the checks runs for this net here."""
    return not ON_GPU and stem in LARGE_INPUT


def param(*values, gpu_only_if_large=False):
    """A parameter set named after its values (the net's stem first); with gpu_only_if_large, skipped on the
    CPU for a large-input net."""
    skip = gpu_only_if_large and cpu_subset(values[0])
    return pytest.param(
        *values,
        id="-".join(str(v).replace(" ", "") for v in values),
        marks=[pytest.mark.skip(reason=GPU_ONLY)] if skip else [],
    )


# Cases that SMALL lacks, stem -> [(constructor arguments, input shape)]. EfficientNetB1 at 9x9 ends in 1x1 maps
# from mbconv4 on: eval mode on the smallest tiles, and in training mode, at batch 1, BatchNorms with one value
# per channel, which torch refuses and so must ModelNew.
EXTRA_CPU_CASES = {"efficientnet_b1": [([7], (1, 3, 9, 9))]}
# At full width, final maps larger than the pools' windows: MobileNetV1's AvgPool2d(7) on an 8x8 map leaves a
# row and a column out; EfficientNetB1's adaptive pool on 4x5.
EXTRA_GPU_CASES = {
    "mobilenet_v1": [([1000, 3, 1.0], (3, 3, 255, 230))],
    "efficientnet_b1": [([1000], (1, 3, 97, 131))],
}
# KernelBench's AlexNet and VGGs end in a Linear sized for 224-pixel inputs, too slow for the interpreter at
# their smallest input (AlexNet at 223 pixels: 697 s in both modes). On the CPU they run the same spec with
# that Linear's input size for a small input instead (test_fixed_classifier_nets_at_a_small_input): every
# kernel of the net, at a small input. stem -> (the spec's text, its replacement, the Linear, the input)
RESIZED_CLASSIFIER = {
    "alexnet": ("256 * 6 * 6", "256 * 1 * 1", "fc1", (2, 3, 63, 63)),
    "vgg16": ("512 * 7 * 7", "512 * 1 * 1", "classifier.0", (1, 3, 32, 32)),
    "vgg19": ("512 * 7 * 7", "512 * 1 * 1", "classifier.0", (1, 3, 32, 32)),
}
CPU_CASES = [
    (stem, args, shape)
    for stem in STEMS
    if stem not in RESIZED_CLASSIFIER
    for args, shape in SMALL[stem] + EXTRA_CPU_CASES.get(stem, [])
]
GPU_CASES = CPU_CASES + [
    (stem, args, shape) for stem in STEMS for args, shape in [KERNELBENCH[stem][1:]] + EXTRA_GPU_CASES.get(stem, [])
]
CASES = GPU_CASES if ON_GPU else CPU_CASES


def pair(stem, args):
    """Reference and ModelNew built as KernelBench builds them: the same seed before each constructor."""
    torch.manual_seed(SEED)
    ref = KERNELBENCH[stem][0](*args)
    torch.manual_seed(SEED)
    new = generated(stem).ModelNew(*args)
    return ref, new


def first_small_case(stem):
    """(reference, ModelNew, input) at the net's first SMALL case, on DEVICE."""
    args, shape = SMALL[stem][0]
    ref, new = pair(stem, args)
    return ref.to(DEVICE), new.to(DEVICE), torch.rand(*shape, device=DEVICE)


@contextlib.contextmanager
def only_generated_kernels(new):
    """Inside, a torch conv, transposed conv, batch_norm, linear, pooling, activation, softmax, cat or dropout
    call, any module call (the modules only hold parameters) and the autograd wrapper of gradient mode raise.
    Call new.forward, not new."""

    def forbidden(*args, **kwargs):
        raise AssertionError("forward called a torch op that the kernels should replace, or the autograd wrapper")

    with pytest.MonkeyPatch.context() as patch:
        for fn in ("conv2d", "conv_transpose2d", "batch_norm", "linear", "avg_pool2d", "adaptive_avg_pool2d"):
            patch.setattr(F, fn, forbidden)
        for fn in ("max_pool2d", "relu", "relu6", "sigmoid", "softmax", "dropout"):
            patch.setattr(F, fn, forbidden)
        for fn in ("conv2d", "conv_transpose2d", "batch_norm", "relu", "sigmoid", "softmax", "max_pool2d", "cat"):
            patch.setattr(torch, fn, forbidden)
        patch.setattr(torch, "concat", forbidden)
        patch.setattr(torch.Tensor, "softmax", forbidden)
        patch.setattr(torch.nn.Module, "__call__", forbidden)
        patch.setattr(type(new).TorchBackward, "apply", forbidden)
        yield


def assert_shape_and_layout(out, expected):
    """The reference's shape, and contiguous where the reference's output is (a caller may .view it)."""
    assert out.shape == expected.shape
    if expected.is_contiguous():
        assert out.is_contiguous(), out.stride()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def construction_args(stem):
    """KernelBench's constructor arguments, then each other one of SMALL's."""
    args = [KERNELBENCH[stem][1]]
    for small_args, _ in SMALL[stem]:
        if small_args not in args:
            args.append(small_args)
    return args


@pytest.mark.parametrize("stem, args", [param(stem, args) for stem in STEMS for args in construction_args(stem)])
def test_seeded_construction_gives_identical_state_dicts(stem, args):
    """KernelBench's comparison uses the same weights only if ModelNew creates the same parameters and
    buffers, in the same order, drawn from the generator in the same order."""
    ref, new = pair(stem, args)
    ref_state, new_state = ref.state_dict(), new.state_dict()
    assert list(ref_state) == list(new_state)
    for key in ref_state:
        assert ref_state[key].shape == new_state[key].shape, key
        assert ref_state[key].dtype == new_state[key].dtype, key
        assert torch.equal(bits(ref_state[key]), bits(new_state[key])), key
    new.load_state_dict(ref_state, strict=True)
    ref.load_state_dict(new_state, strict=True)


def eval_cases():
    """Each case in the spec's activation dtype, and in float32 too where the spec declares float16."""
    for stem, args, shape in CASES:
        if declares_float16_activations(stem):
            yield param(stem, args, shape, "float16")
            yield param(stem, args, shape, "float32", gpu_only_if_large=True)
        else:
            yield param(stem, args, shape, "float32")


@pytest.mark.parametrize("stem, args, shape, activations", list(eval_cases()))
def test_eval_mode_matches_reference(stem, args, shape, activations):
    """Against float64, with only the generated kernels running and no autograd wrapper under inference
    mode. Where the spec stores activations as float16 (`activations(float16)`) the bar is TOLERANCE or
    1.5x the error of the torch reference with the same float16 roundings, whichever is larger (on the
    CPU, where the kernels compute plain fp32, that rounding is all the error)."""
    ref, new = pair(stem, args)
    randomize_batchnorm(ref, seed=sum(shape))
    new.load_state_dict(ref.state_dict(), strict=True)
    ref, new = ref.eval().to(DEVICE), new.eval().to(DEVICE)
    if declares_float16_activations(stem):
        new.activation_dtype = getattr(torch, activations)
    x = torch.rand(*shape, device=DEVICE)
    with torch.inference_mode():
        with only_generated_kernels(new):
            out = new.forward(x)
        eager = ref(x)
        with float16_activations(ref):
            rounded = ref(x)
        exact = ref.double()(x.double())
    assert_shape_and_layout(out, eager)
    err, rounded_err = rel_error(out, exact), rel_error(rounded, exact)
    print(
        f"{stem} {args} {list(shape)} {activations} activations: rel. L2 error vs float64 {err:.2e} (eager torch:"
        f" {rel_error(eager, exact):.2e}; with float16 activations: {rounded_err:.2e})"
    )
    assert err < (max(TOLERANCE, 1.5 * rounded_err) if activations == "float16" else TOLERANCE)


# A large-input net without BatchNorm runs eval mode's kernels in training mode too: on the CPU its eval-mode
# run is the one.
TRAINING_CASES = [param(*case, gpu_only_if_large=not has_training_kernels(case[0])) for case in CASES]


@pytest.mark.parametrize("stem, args, shape", TRAINING_CASES)
def test_training_mode_matches_reference(stem, args, shape):
    """KernelBench's setting: BatchNorm in training mode, under no_grad. Outputs and every running buffer
    after two steps (one for a large-input net on the CPU), against the reference model in training mode
    run in float64; only the generated kernels run, and no autograd wrapper.

    Normalising by the batch's spread amplifies fp32 rounding (the last BatchNorms see few values per
    channel): fp32 torch itself is off by up to about 1e-5 on the CPU cases, and which of torch and the
    kernels is closer depends on the seed. So the bar is TOLERANCE or 3x fp32 torch's own error,
    whichever is larger (the issue's bar for eval mode is 3x eager's error)."""
    ref, new = pair(stem, args)
    randomize_batchnorm(ref, seed=sum(shape))
    new.load_state_dict(ref.state_dict(), strict=True)
    exact = copy.deepcopy(ref).double()
    ref, new, exact = (m.train().to(DEVICE) for m in (ref, new, exact))
    with torch.no_grad():
        for step in range(1 if cpu_subset(stem) else 2):
            x = torch.rand(*shape, device=DEVICE) + step
            try:
                expected = exact(x.double())
            except ValueError:  # torch refuses a BatchNorm with one value per channel; so must we
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    new(x)
                return
            with only_generated_kernels(new):
                out = new.forward(x)
            eager = ref(x)
            assert_shape_and_layout(out, eager)
            err, eager_err = rel_error(out, expected), rel_error(eager, expected)
            print(
                f"{stem} {args} {list(shape)} training step {step}: rel. L2 error vs float64 {err:.2e}"
                f" (fp32 torch: {eager_err:.2e}); vs fp32 torch {rel_error(out, eager):.2e}"
            )
            assert err < training_bar(eager, expected)
            # as the outputs: past fp32 torch's own distance from float64, 3x it
            buffers = [key for key in exact.state_dict() if "running" in key or "num_batches" in key]
            assert_state_near_float64(new.state_dict(), exact.state_dict(), ref.state_dict(), buffers)


# Without BatchNorm these nets run eval mode's kernels in training mode too, and the VGGs' kernels are AlexNet's
# kinds (conv + bias + ReLU, maxpool, linear + ReLU + dropout) at up to 512 channels, three minutes of CPU: on
# the CPU one run of AlexNet, on the GPU all.
RESIZED_CASES = [
    param(stem, training, gpu_only_if_large=training or stem != "alexnet")
    for stem in RESIZED_CLASSIFIER
    if stem in STEMS
    for training in (False, True)
]


@pytest.mark.parametrize("stem, training", RESIZED_CASES)
def test_fixed_classifier_nets_at_a_small_input(stem, training):
    """AlexNet and the VGGs with their first Linear sized for a small input's features (the spec changed in
    that one number, the reference's Linear replaced alike): every other module, kernel and launch is the
    net's, against float64."""
    text, replacement, linear, shape = RESIZED_CLASSIFIER[stem]
    spec = (ROOT / "specs" / f"{stem}.fuse").read_text()
    assert text in spec
    small_spec = re.sub(r"^input\(.*\)$", f"input{shape}", spec.replace(text, replacement), flags=re.M)
    small = load_spec(small_spec, f"{stem}_small")
    torch.manual_seed(SEED)
    ref = KERNELBENCH[stem][0](7)
    parent, name = linear.rpartition(".")[::2] if "." in linear else ("", linear)
    owner = ref.get_submodule(parent) if parent else ref
    old = getattr(owner, name) if not name.isdigit() else owner[int(name)]
    resized = torch.nn.Linear(eval(replacement), old.out_features)
    setattr(owner, name, resized)
    new = small.ModelNew(7)
    new.load_state_dict(ref.state_dict(), strict=True)
    ref, new = ref.train(training).to(DEVICE), new.train(training).to(DEVICE)
    x = torch.rand(*shape, device=DEVICE)
    with torch.no_grad():
        with only_generated_kernels(new):
            out = new.forward(x)
        exact = copy.deepcopy(ref).double()(x.double())
    assert_shape_and_layout(out, exact)
    assert rel_error(out, exact) < TOLERANCE


# Only a spec with `activations(float16)` stores anything but float32.
FLOAT16_STEMS = [param(stem, gpu_only_if_large=True) for stem in STEMS if declares_float16_activations(stem)]


@pytest.mark.parametrize("stem", FLOAT16_STEMS)
def test_eval_mode_stores_float16_between_kernels(stem):
    """In eval mode every kernel stores float16 (the spec's activations(float16)) but the last (the model
    returns float32) and those whose output a linear reads (it loads its input in float32: the classifier's
    input error reaches the output unfiltered). Training mode stores float32 throughout."""
    _, new, x = first_small_case(stem)
    launches = record_launches(new.eval(), x)
    linear_inputs = {
        launch.inputs[0].untyped_storage().data_ptr()
        for launch in launches
        if any(isinstance(m, nn.Linear) for m in launch.modules)
    }
    expected = [
        (
            torch.float32
            if launch is launches[-1] or launch.outputs[0].untyped_storage().data_ptr() in linear_inputs
            else torch.float16
        )
        for launch in launches
    ]
    assert torch.float16 in expected
    assert [launch.outputs[0].dtype for launch in launches] == expected
    train_launches = record_launches(new.train(), x)
    assert {t.dtype for launch in train_launches for t in launch.outputs} == {torch.float32}


@pytest.mark.parametrize("stem", [param(stem, gpu_only_if_large=True) for stem in STEMS])
def test_gradients_match_the_reference(stem):
    """Outside no_grad the kernels still run forward, and backward gives torch's gradients."""
    ref, new, x = first_small_case(stem)
    randomize_batchnorm(ref, seed=3)
    new.load_state_dict(ref.state_dict(), strict=True)
    ref, new = ref.eval(), new.eval()
    if declares_float16_activations(stem):
        new.activation_dtype = torch.float32  # forward's float16 rounding has its own test; this one is backward's
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = ref(x_ref), new(x_new)
    assert out_new.grad_fn is not None and "TorchBackward" in type(out_new.grad_fn).__name__
    assert rel_error(out_new.detach(), out_ref.detach()) < TOLERANCE
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    (out_new * weights).sum().backward()
    assert rel_error(x_new.grad, x_ref.grad) < TOLERANCE
    for (key, p_ref), p_new in zip(ref.named_parameters(), new.parameters()):
        assert p_new.grad is not None, key
        assert rel_error(p_new.grad, p_ref.grad) < TOLERANCE, key


@pytest.mark.parametrize("stem", STEMS)
def test_bad_inputs_get_a_value_error_naming_the_expected_shape(stem):
    args, shape = SMALL[stem][0]
    torch.manual_seed(SEED)
    new = generated(stem).ModelNew(*args).eval().to(DEVICE)
    channels, size = shape[1], shape[2:]
    expected = rf"expects a float32 tensor of shape \(N, {channels}, H, W\), got"
    with torch.no_grad():
        for bad in (
            torch.rand(1, channels + 1, *size),  # channels
            torch.rand(channels, *size),  # rank
            torch.rand(1, channels, *size, dtype=torch.float64),  # dtype
        ):
            with pytest.raises(ValueError, match=expected):
                new(bad.to(DEVICE))


@pytest.mark.parametrize("stem", STEMS)
def test_offsets_past_2_31_are_refused_not_overrun(stem):
    """A batch whose input alone needs 64-bit element offsets is refused before any launch (meta tensors:
    nothing is allocated, and a launch on them would fail otherwise)."""
    args, shape = SMALL[stem][0]
    with torch.device("meta"):
        new = generated(stem).ModelNew(*args).eval()
    batch = 2**31 // math.prod(shape[1:]) + 1
    with torch.no_grad(), pytest.raises(ValueError, match=r"element offsets past 2\*\*31"):
        new(torch.empty(batch, *shape[1:], device="meta"))
