"""Whole models: the committed generated files against the plain-torch references in reference_models.py."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reference_models
from fusegen.bench import record_launches
from helpers import DEVICE, ON_GPU, TOLERANCE, float16_activations, randomize_batchnorm, rel_error

ROOT = Path(__file__).resolve().parent.parent


def generated(name: str):
    spec = importlib.util.spec_from_file_location(f"generated_{name}", ROOT / "generated" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NETS = {
    "mobilenet_v1": reference_models.MobileNetV1,
    "efficientnet_b1": reference_models.EfficientNetB1,
}
# Constructor arguments other than the defaults: the generated __init__ must follow them.
SMALL_ARGS = {"mobilenet_v1": dict(num_classes=10, input_channels=3, alpha=0.25), "efficientnet_b1": dict(num_classes=10)}

# (net, kwargs, input shape). MobileNetV1 ends in AvgPool2d(7), so its input must be at least 193 pixels.
CPU_CASES = [
    ("mobilenet_v1", SMALL_ARGS["mobilenet_v1"], (1, 3, 197, 211)),
    ("efficientnet_b1", SMALL_ARGS["efficientnet_b1"], (2, 3, 37, 45)),
    ("efficientnet_b1", SMALL_ARGS["efficientnet_b1"], (1, 3, 9, 9)),
]
GPU_CASES = CPU_CASES + [
    ("mobilenet_v1", {}, (10, 3, 224, 224)),
    ("efficientnet_b1", {}, (10, 3, 240, 240)),
    ("mobilenet_v1", {}, (3, 3, 255, 230)),
    ("efficientnet_b1", {}, (1, 3, 97, 131)),
]


def pair(name, kwargs):
    """Reference and ModelNew built as KernelBench builds them: the same seed before each constructor."""
    torch.manual_seed(42)
    ref = NETS[name](**kwargs)
    torch.manual_seed(42)
    new = generated(name).ModelNew(**kwargs)
    return ref, new


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("small", [False, True], ids=["defaults", "small_args"])
def test_same_parameters_same_order_same_init(name, small):
    ref, new = pair(name, SMALL_ARGS[name] if small else {})
    ref_state, new_state = ref.state_dict(), new.state_dict()
    assert list(ref_state) == list(new_state)
    for key in ref_state:
        assert ref_state[key].shape == new_state[key].shape, key
        assert torch.equal(ref_state[key], new_state[key]), key
    new.load_state_dict(ref_state, strict=True)


@pytest.mark.parametrize("activations", ["float16", "float32"])
@pytest.mark.parametrize("name, kwargs, shape", GPU_CASES if ON_GPU else CPU_CASES)
def test_eval_mode_matches_reference(name, kwargs, shape, activations):
    """Against float64. The specs store activations as float16 (`activations(float16)`): then the bar
    is TOLERANCE or 1.5x the error of the torch reference with the same float16 roundings, whichever is
    larger (on the CPU, where the kernels compute plain fp32, that rounding is all the error)."""
    ref, new = pair(name, kwargs)
    randomize_batchnorm(ref, seed=sum(shape))
    new.load_state_dict(ref.state_dict(), strict=True)
    ref, new = ref.eval().to(DEVICE), new.eval().to(DEVICE)
    new.activation_dtype = getattr(torch, activations)
    x = torch.rand(*shape, device=DEVICE)
    with torch.no_grad():
        out = new(x)
        eager = ref(x)
        with float16_activations(ref):
            rounded = ref(x)
        exact = ref.double()(x.double())
    err, rounded_err = rel_error(out, exact), rel_error(rounded, exact)
    print(
        f"{name} {list(shape)} {activations} activations: rel. L2 error vs float64 {err:.2e} (eager torch:"
        f" {rel_error(eager, exact):.2e}; with float16 activations: {rounded_err:.2e})"
    )
    assert err < (max(TOLERANCE, 1.5 * rounded_err) if activations == "float16" else TOLERANCE)


@pytest.mark.parametrize("name", NETS)
def test_eval_mode_stores_float16_between_kernels(name):
    """In eval mode every kernel stores float16 (the spec's activations(float16)) but the last two: the
    one whose pool feeds the classifier (whose input error reaches the output unfiltered) and the
    classifier.
    Training mode stores float32 throughout."""
    _, new = pair(name, SMALL_ARGS[name])
    x = torch.rand(1, 3, 193, 193, device=DEVICE) if name == "mobilenet_v1" else torch.rand(2, 3, 16, 16, device=DEVICE)
    new = new.to(DEVICE)
    eval_launches = record_launches(new.eval(), x)
    dtypes = [launch.outputs[0].dtype for launch in eval_launches]
    assert dtypes == [torch.float16] * (len(dtypes) - 2) + [torch.float32] * 2
    train_launches = record_launches(new.train(), x)
    assert {t.dtype for launch in train_launches for t in launch.outputs} == {torch.float32}


@pytest.mark.parametrize("name", NETS)
def test_forward_runs_only_generated_kernels(name, monkeypatch):
    """No torch conv, batch_norm, linear or pooling runs in forward (modules only hold parameters)."""
    _, new = pair(name, SMALL_ARGS[name])
    shape = (1, 3, 193, 193) if name == "mobilenet_v1" else (1, 3, 16, 16)

    def forbidden(*args, **kwargs):
        raise AssertionError("forward called a torch op that the kernels should replace")

    for fn in ("conv2d", "batch_norm", "linear", "avg_pool2d", "adaptive_avg_pool2d", "relu", "relu6"):
        monkeypatch.setattr(F, fn, forbidden)
    for fn in ("conv2d", "batch_norm", "relu"):
        monkeypatch.setattr(torch, fn, forbidden)
    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)
    with torch.no_grad():
        out = type(new).forward(new.eval().to(DEVICE), torch.rand(*shape, device=DEVICE))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("name, kwargs, shape", GPU_CASES if ON_GPU else CPU_CASES)
def test_training_mode_matches_reference(name, kwargs, shape):
    """KernelBench's setting: BatchNorm in training mode, under no_grad. Outputs and every running
    buffer after two steps, against the reference model in training mode run in float64.

    Normalising by the batch's spread amplifies fp32 rounding (the last BatchNorms here see 49 values
    per channel): fp32 torch itself is 2e-6 to 1.1e-5 off on the CPU cases, and which of torch and the
    kernels is closer depends on the seed. So the bar is TOLERANCE or 3x fp32 torch's own error,
    whichever is larger (the issue's bar for eval mode is 3x eager's error)."""
    ref, new = pair(name, kwargs)
    randomize_batchnorm(ref, seed=sum(shape))
    new.load_state_dict(ref.state_dict(), strict=True)
    exact = copy.deepcopy(ref).double()
    ref, new, exact = (m.train().to(DEVICE) for m in (ref, new, exact))
    with torch.no_grad():
        for step in range(2):
            x = torch.rand(*shape, device=DEVICE) + step
            try:
                expected = exact(x.double())
            except ValueError:  # torch refuses a BatchNorm with one value per channel; so must we
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    new(x)
                return
            out, eager = new(x), ref(x)
            err, eager_err = rel_error(out, expected), rel_error(eager, expected)
            print(
                f"{name} {list(shape)} training step {step}: rel. L2 error vs float64 {err:.2e}"
                f" (fp32 torch: {eager_err:.2e}); vs fp32 torch {rel_error(out, eager):.2e}"
            )
            assert err < max(TOLERANCE, 3 * eager_err)
            for key, buffer in exact.state_dict().items():
                if "running" in key or "num_batches" in key:
                    got = new.state_dict()[key].to(buffer.dtype)
                    assert torch.allclose(got, buffer, rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("name, shape", [("efficientnet_b1", (2, 3, 19, 23)), ("mobilenet_v1", (1, 3, 193, 200))])
def test_gradients_match_the_reference(name, shape):
    """Outside no_grad the kernels still run forward, and backward gives torch's gradients."""
    kwargs = SMALL_ARGS[name]
    ref, new = pair(name, kwargs)
    randomize_batchnorm(ref, seed=3)
    new.load_state_dict(ref.state_dict(), strict=True)
    ref, new = ref.eval().to(DEVICE), new.eval().to(DEVICE)
    new.activation_dtype = torch.float32  # forward's float16 rounding has its own test; this one is backward's
    x = torch.rand(*shape, device=DEVICE)
    weights = torch.randn(shape[0], kwargs["num_classes"], device=DEVICE)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = ref(x_ref), new(x_new)
    assert out_new.grad_fn is not None and "TorchBackward" in type(out_new.grad_fn).__name__
    assert rel_error(out_new.detach(), out_ref.detach()) < TOLERANCE
    (out_ref * weights).sum().backward()
    (out_new * weights).sum().backward()
    assert rel_error(x_new.grad, x_ref.grad) < TOLERANCE
    for (key, p_ref), p_new in zip(ref.named_parameters(), new.parameters()):
        assert p_new.grad is not None, key
        assert rel_error(p_new.grad, p_ref.grad) < TOLERANCE, key


def test_no_autograd_wrapper_under_no_grad(monkeypatch):
    _, new = pair("efficientnet_b1", SMALL_ARGS["efficientnet_b1"])
    module = type(new)

    def forbidden(*args):
        raise AssertionError("TorchBackward used under no_grad")

    monkeypatch.setattr(module.TorchBackward, "apply", forbidden)
    x = torch.rand(1, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        new.eval().to(DEVICE)(x)
    with torch.inference_mode():
        new(x)


@pytest.mark.parametrize("name", NETS)
def test_bad_inputs_get_a_value_error_naming_the_expected_shape(name):
    _, new = pair(name, SMALL_ARGS[name])
    new = new.eval().to(DEVICE)
    size = 193 if name == "mobilenet_v1" else 16
    expected = r"expects a float32 tensor of shape \(N, 3, H, W\), got"
    with torch.no_grad():
        for bad in (
            torch.rand(1, 4, size, size),  # channels
            torch.rand(3, size, size),  # rank
            torch.rand(1, 3, size, size, dtype=torch.float64),  # dtype
        ):
            with pytest.raises(ValueError, match=expected):
                new(bad.to(DEVICE))


@pytest.mark.parametrize("name, size", [("mobilenet_v1", 224), ("efficientnet_b1", 240)])
def test_offsets_past_2_31_are_refused_not_overrun(name, size):
    """A batch whose activations need 64-bit element offsets is refused before any launch (meta
    tensors: no memory is allocated)."""
    _, new = pair(name, SMALL_ARGS[name])
    new = new.eval().to("meta")
    with torch.no_grad(), pytest.raises(ValueError, match=r"element offsets past 2\*\*31"):
        new(torch.empty(20000, 3, size, size, device="meta"))
