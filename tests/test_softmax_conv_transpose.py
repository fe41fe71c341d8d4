"""softmax(dim) and conv_transpose against torch on random shapes and arguments (the U-Net's two ops).

softmax runs in both modes with a BatchNorm before it (training mode: in the softmax's prologue, applied in
both of its sweeps) and one after it (training mode: the softmax's kernel stores its output's statistics),
and over a linear layer's features;
conv_transpose runs over kernel sizes, strides, paddings and bias, and into a concatenation's slice.
Off the GPU every kernel is also compiled for one (helpers.gpu_compiled), where the interpreter cannot tell
whether Triton's GPU compiler accepts it."""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F
from hypothesis import Phase, assume, example, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, TOLERANCE, gpu_compiled, load_spec, randomize_batchnorm, rel_error

# Few examples: every one compiles a spec and runs it under the interpreter.
few_examples = settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])
channels = st.one_of(st.sampled_from([1, 3, 17]), st.integers(1, 20))


def load(text: str):
    return load_spec(text, "test_softmax_conv_transpose_" + hashlib.sha1(text.encode()).hexdigest()[:12])


SOFTMAX_SPEC = """\
model Net()
input({n}, {c}, {h}, {w})
forward:
    pre: conv({c}, {c}, 1) -> bn0: bn({c})
    softmax({dim}) -> bn1: bn({c})
"""


def softmax_reference(m, x, dim):
    return m.bn1(torch.softmax(m.bn0(m.pre(x)), dim))


@few_examples
@given(
    dim=st.sampled_from([1, 2, 3, -1, -2, -3]),
    training=st.booleans(),
    n=st.integers(1, 2),
    c=channels,
    h=st.integers(1, 9),
    w=st.integers(1, 40),
)
@example(dim=-1, training=True, n=2, c=3, h=2, w=37)  # odd width: row blocks of one pixel
@example(dim=-1, training=False, n=1, c=20, h=3, w=48)  # row blocks of 16 pixels, three to a row
@example(dim=3, training=True, n=2, c=1, h=1, w=300)  # row blocks of 4 pixels, sweep 1 in chunks of 256
@example(dim=1, training=True, n=2, c=300, h=2, w=3)  # two channel blocks of 256
@example(dim=-2, training=True, n=2, c=70, h=5, w=3)  # two channel blocks of 64
def test_softmax_between_batch_norms(dim, training, n, c, h, w):
    """Output and running statistics against a float64 copy of the model run by torch."""
    assume(not training or n * h * w > 1)  # torch refuses training-mode BatchNorm over one value a channel
    module = load(SOFTMAX_SPEC.format(n=n, c=c, h=h, w=w, dim=dim))
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE)
    randomize_batchnorm(model)
    exact = copy.deepcopy(model).double()
    model.train(training)
    exact.train(training)
    x = 4 * torch.randn(n, c, h, w, device=DEVICE)
    with torch.no_grad(), gpu_compiled():
        out = model(x)
        expected = softmax_reference(exact, x.double(), dim)
    assert out.is_contiguous()
    err = rel_error(out, expected)
    assert err < TOLERANCE, f"relative error {err:.3g} (dim={dim}, training={training})"
    for key, buffer in exact.state_dict().items():
        if "running" in key:
            assert torch.allclose(model.state_dict()[key].double(), buffer, rtol=1e-5, atol=1e-6), key


FEATURES_SPEC = """\
model Net()
input({n}, {c}, 1, 1)
forward:
    flatten
    fc: linear({c}, {f})
    softmax({dim})
"""


@few_examples
@given(dim=st.sampled_from([1, -1]), n=st.integers(1, 20), c=channels, f=st.integers(1, 300))
@example(dim=-1, n=3, c=5, f=257)  # two blocks of 256 features
def test_softmax_over_a_linear_layers_features(dim, n, c, f):
    module = load(FEATURES_SPEC.format(n=n, c=c, f=f, dim=dim))
    assert "def softmax_features(" in module.SOURCE  # the 2-d kernel
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).eval()
    x = torch.randn(n, c, 1, 1, device=DEVICE)
    with torch.no_grad(), gpu_compiled():
        out = model(x)
        expected = torch.softmax(model.fc(x.flatten(1)), dim)
    assert out.shape == expected.shape and rel_error(out, expected) < TOLERANCE


CONV_TRANSPOSE_SPEC = """\
model Net()
input({n}, {c_in}, {h}, {w})
forward:
    up: conv_transpose({c_in}, {c_out}, {k}, {stride}, {padding}, bias={bias}) -> relu
"""


def output_size(size, k, stride, padding):
    return (size - 1) * stride - 2 * padding + k


@few_examples
@given(
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    bias=st.booleans(),
    n=st.integers(1, 2),
    c_in=channels,
    c_out=channels,
    h=st.integers(1, 6),
    w=st.integers(1, 6),
)
@example(k=2, stride=2, padding=0, bias=True, n=2, c_in=17, c_out=3, h=3, w=5)  # the U-Net's
@example(k=3, stride=2, padding=1, bias=False, n=1, c_in=5, c_out=70, h=4, w=1)  # two channel blocks
@example(k=4, stride=3, padding=2, bias=True, n=1, c_in=1, c_out=1, h=2, w=3)  # taps outside, and between rows
@example(k=1, stride=1, padding=0, bias=True, n=2, c_in=40, c_out=20, h=2, w=2)  # a 1x1 conv, K steps of 32
@example(k=2, stride=2, padding=0, bias=True, n=1, c_in=3, c_out=64, h=64, w=64)  # tiles of 128 rows
def test_conv_transpose(k, stride, padding, bias, n, c_in, c_out, h, w):
    """Against F.conv_transpose2d with the model's own weight and bias, but the test's stride and padding."""
    assume(output_size(h, k, stride, padding) >= 1 and output_size(w, k, stride, padding) >= 1)  # else a spec error
    spec = CONV_TRANSPOSE_SPEC.format(
        n=n, c_in=c_in, c_out=c_out, h=h, w=w, k=k, stride=stride, padding=padding, bias=bias
    )
    torch.manual_seed(0)
    model = load(spec).ModelNew().to(DEVICE).eval()
    x = torch.randn(n, c_in, h, w, device=DEVICE)
    with torch.no_grad(), gpu_compiled():  # stride 3 once failed in Triton's GPU compiler alone
        out = model(x)
        up = model.up
        expected = F.relu(F.conv_transpose2d(x, up.weight, up.bias, stride, padding))
    assert (up.bias is not None) == bias
    assert out.shape == expected.shape and out.is_contiguous()
    err = rel_error(out, expected)
    assert err < TOLERANCE, f"relative error {err:.3g}\n{spec}"


CAT_SPEC = """\
model Net()
input(2, 5, 3, 4)
forward:
    a = x -> up: conv_transpose(5, 3, 2, 2)
    y = x -> wide: conv(5, 4, 1) -> relu
    b = y -> same: conv_transpose(4, 6, 2, 2, bias=False)
    x = cat(a, b)
    return x -> mix: conv(9, 2, 1)
"""


def test_conv_transposes_store_into_their_slices_of_a_cat():
    """Each conv_transpose's one store writes its channel slice of the concatenation: no copy kernel."""
    module = load(CAT_SPEC)
    assert "def load(" not in module.SOURCE  # the copy kernel's wrapper
    torch.manual_seed(0)
    model = module.ModelNew().to(DEVICE).eval()
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    with torch.no_grad(), gpu_compiled():
        out = model(x)
        a = F.conv_transpose2d(x, model.up.weight, model.up.bias, 2)
        b = F.conv_transpose2d(F.relu(model.wide(x)), model.same.weight, None, 2)
        expected = model.mix(torch.cat([a, b], 1))
    assert rel_error(out, expected) < TOLERANCE
