"""Training mode: BatchNorm normalises with batch statistics and updates its running buffers exactly
as nn.BatchNorm2d does, while the kernels stay fused (the producer stores per-tile statistics, the
next kernel normalises in its prologue). Compared with a float64 copy of the model run by torch
(normalising by the batch's spread amplifies fp32 rounding, so fp32 torch is no exact reference)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, assume, example, given, settings
from hypothesis import strategies as st

from fusegen.bench import record_launches
from helpers import DEVICE, TOLERANCE, load_spec, randomize_batchnorm, rel_error

# MobileNet-like: stem, depthwise-separable pair, a projection without activation, pool, classifier. In
# eval mode the pool ends the projection's kernel; in training mode it gets a launch of its own, whose
# prologue normalises with bn3's batch statistics.
SPEC = """\
model Net(c=8, wide=24, classes=10)
input(2, 3, 17, 15)
forward:
    conv1: conv3x3(3, c, stride=2) -> bn1: bn(c) -> relu
    dw: dwconv3x3(c) -> bn2: bn(c) -> relu6
    pw: conv1x1(c, wide) -> bn3: bn(wide, eps=1e-3, momentum=0.3) -> global_avgpool -> flatten
    fc: linear(wide, classes)
"""


def net_reference(m, x):
    """SPEC's forward with the model's own modules, in their mode (updates running buffers in training)."""
    x = F.relu(m.bn1(m.conv1(x)))
    x = F.relu6(m.bn2(m.dw(x)))
    x = m.bn3(m.pw(x))
    return m.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# Every place a batch-statistics BatchNorm can sit: first op of the model (its input has no producer
# kernel), two in a row across chains, after a pool, before a view, at the very end of the model.
ODD_SPEC = """\
model Odd(c=6)
input(2, c, 9, 7)
forward:
    bn0: bn(c) -> relu -> pw: conv1x1(c, 10) -> bn1: bn(10) -> relu6
    bn2: bn(10) -> relu
    pool: avgpool(2) -> bn3: bn(10)
    global_avgpool -> bn4: bn(10) -> relu -> flatten
"""
TAIL_SPEC = """\
model Tail(c=6)
input(2, c, 9, 7)
forward:
    pw: conv1x1(c, 7) -> bn1: bn(7)
    bn2: bn(7) -> relu6
"""

# Producer chains, in a 1x1 conv's K loop (dw -> pw) and at a depthwise conv's taps (pe -> dw3): BatchNorm
# between producer and consumer needs the producer's output reduced first (two launches); without one,
# the pair stays one kernel, normalising its input taps (dw2 -> pw2) or its 1x1 conv's input (pe2 -> dw4).
PRODUCER_SPEC = """\
model Prod(c=6)
input(2, c, 9, 7)
forward:
    dw: dwconv3x3(c) -> bn1: bn(c) -> relu6 -> pw: conv1x1(c, 10) -> bn2: bn(10) -> relu
    dw2: dwconv3x3(10, stride=2) -> relu -> pw2: conv1x1(10, 5) -> bn3: bn(5)
    pe: conv1x1(5, 12) -> bn4: bn(12) -> relu6 -> dw3: dwconv3x3(12, stride=2) -> bn5: bn(12) -> relu6
    pe2: conv1x1(12, 8) -> relu -> dw4: dwconv3x3(8) -> bn6: bn(8)
"""


def producer_reference(m, x):
    x = F.relu(m.bn2(m.pw(F.relu6(m.bn1(m.dw(x))))))
    x = m.bn3(m.pw2(F.relu(m.dw2(x))))
    x = F.relu6(m.bn5(m.dw3(F.relu6(m.bn4(m.pe(x))))))
    return m.bn6(m.dw4(F.relu(m.pe2(x))))


def odd_reference(m, x):
    x = F.relu6(m.bn1(m.pw(F.relu(m.bn0(x)))))
    x = F.relu(m.bn2(x))
    x = m.bn3(m.pool(x))
    return F.relu(m.bn4(F.adaptive_avg_pool2d(x, 1))).flatten(1)


def tail_reference(m, x):
    return F.relu6(m.bn2(m.bn1(m.pw(x))))


def running_buffers(model):
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same_buffers(new, ref):
    for key, expected in running_buffers(ref).items():
        got = running_buffers(new)[key].to(expected.dtype)
        if "num_batches" in key:
            assert torch.equal(got, expected), key
        else:
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (key, (got - expected).abs().max().item())


def make(spec: str, name: str, seed: int = 0, **kwargs):
    """The generated model and a float64 copy of it, both in training mode."""
    torch.manual_seed(seed)
    model = load_spec(spec, name).ModelNew(**kwargs)
    randomize_batchnorm(model, seed=seed)
    return model.to(DEVICE).train(), copy.deepcopy(model).to(DEVICE).double().train()


def check_steps(new, ref, reference, inputs):
    """Several training steps: outputs and running buffers after each must match torch's."""
    with torch.no_grad():
        for x in inputs:
            out, expected = new(x), reference(ref, x.double())
            assert rel_error(out, expected) < TOLERANCE
            assert_same_buffers(new, ref)


@settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: slow under the interpreter
@given(
    batch=st.integers(1, 3),
    h=st.integers(3, 19),
    w=st.integers(3, 19),
    c=st.sampled_from([1, 5, 8, 17]),
    wide=st.sampled_from([3, 24, 70]),
)
def test_training_steps_match_torch(batch, h, w, c, wide):
    new, ref = make(SPEC, "train_net", seed=batch * h + w, c=c, wide=wide)
    shape = (batch, 3, h, w)
    inputs = [torch.rand(*shape, device=DEVICE) * 4 - 1, torch.randn(*shape, device=DEVICE) + 2]
    check_steps(new, ref, net_reference, inputs)


def pool_input_spec(k: int, stride: int, bias: bool, own_line: bool = False) -> str:
    """DenseNet's transition layer, then a BatchNorm that needs the pooled output's batch statistics; with
    own_line the pool is a chain of its own after the conv's (as fusegen import writes it)."""
    pool = f"\n    pool: avgpool({k})" if own_line else f" -> pool: avgpool({k})"
    return f"""\
model Transition(c=6, out=4)
input(2, c, 9, 7)
forward:
    bn0: bn(c) -> relu -> pw: conv(c, out, 1, stride={stride}, bias={bias}){pool}
    bn1: bn(out) -> relu
"""


def pool_input_reference(m, x):
    return F.relu(m.bn1(m.pool(m.pw(F.relu(m.bn0(x))))))


@settings(phases=[Phase.explicit, Phase.reuse, Phase.generate], max_examples=20)
@given(
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    # not 1 input channel: a biased 1x1 conv's output is then w * m + b, whose spread a small w leaves at
    # 1/300 of its mean, and BatchNorm amplifies fp32 rounding to the bar (fp32 torch 6-9e-6, fusegen 4e-6 to
    # 2.4e-5 and 1.6e-5 with the pool a launch of its own, against 1e-5: measured, session 24)
    c=st.sampled_from([5, 17]),
    out=st.sampled_from([3, 24, 70]),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    own_line=st.booleans(),
)
@example(k=2, stride=1, bias=False, batch=2, c=17, out=70, h=12, w=9, own_line=False)  # a row and a column left
@example(k=3, stride=2, bias=True, batch=3, c=5, out=3, h=11, w=5, own_line=True)
def test_an_average_pool_after_a_1x1_conv_runs_on_the_convs_input(k, stride, bias, batch, c, out, h, w, own_line):
    """`bn -> relu -> conv1x1 -> avgpool(k)`: the pool averages the conv's input windows and the GEMM runs on
    the pooled pixels (the two commute), one launch in both modes; in training mode that launch also stores
    the batch statistics of the pooled output for the BatchNorm after it. So with the pool on a line of its
    own."""
    size = (k - 1) * stride + 1  # the least input whose conv output holds a window
    h, w = max(h, size), max(w, size)
    pooled = ((h - 1) // stride + 1) // k * (((w - 1) // stride + 1) // k)
    # 8 values a channel for each BatchNorm at least: with 2 to 4, the sign of a difference of nearly equal values
    # decides an output, and fp32 torch misses the bars too (test_import's EfficientNets)
    assume(batch * pooled >= 8)
    spec = pool_input_spec(k, stride, bias, own_line)
    new, ref = make(spec, f"pool_input_{k}_{stride}_{bias}_{own_line}", c=c, out=out)
    source = load_spec(spec).SOURCE
    # no kernel sums a window's GEMM rows (the pooled frame): each averages its input tiles before the dot
    assert "pooled +=" not in source and source.count("a = a / (POOL_H * POOL_W)") == 2
    inputs = [torch.rand(batch, c, h, w, device=DEVICE) * 4 - 1, torch.randn(batch, c, h, w, device=DEVICE) + 1]
    for training in (True, False):
        new.train(training), ref.train(training)
        names = [launch.wrapper for launch in record_launches(copy.deepcopy(new), inputs[0])]  # buffers kept
        assert [name for name in names if "avgpool" in name] == [
            f"bn_relu_conv1x1{'_bias' * bias}_avgpool" + ("_stats_train" if training else "")
        ], names
        check_steps(new, ref, pool_input_reference, inputs)


def test_batchnorm_anywhere_in_the_model():
    # Batch 8, fixed: bn4 normalises N values per channel after the global pool, and with N = 3 that
    # amplifies fp32 rounding past 1e-5 in fp32 torch itself (up to 6.5e-5 over 60 random draws, fusegen
    # up to 9.2e-5, both with a median of 2.0e-6); with N = 8 both stayed under 1e-5.
    torch.manual_seed(0)
    inputs = [torch.randn(8, 6, 9, 7, device=DEVICE) * 2 + 1 for _ in range(2)]
    check_steps(*make(ODD_SPEC, "train_odd"), odd_reference, inputs)
    check_steps(*make(TAIL_SPEC, "train_tail"), tail_reference, inputs)
    check_steps(*make(PRODUCER_SPEC, "train_producer"), producer_reference, inputs)


def test_momentum_none_is_a_cumulative_average():
    new, ref = make(SPEC, "train_net")
    for m in (new, ref):
        m.bn2.momentum = None
    check_steps(new, ref, net_reference, [torch.rand(2, 3, 11, 13, device=DEVICE) + i for i in range(3)])


def test_no_cancellation_when_the_mean_dwarfs_the_spread():
    """Variance from per-tile deviations: sum-of-squares in fp32 would lose it entirely at mean 1e3."""
    new, _ = make(SPEC, "train_net")
    x = torch.rand(3, 3, 40, 36, device=DEVICE) * 0.01 + 1000
    with torch.no_grad():
        before = new.bn1.running_var.clone()
        new(x)
        conv = F.conv2d(x.double(), new.conv1.weight.double(), stride=2, padding=1)
        batch_var = conv.var(dim=(0, 2, 3), unbiased=True)
        expected = 0.9 * before.double() + 0.1 * batch_var
    assert rel_error(new.bn1.running_var, expected) < 1e-4


def test_modes_switch_and_changed_parameters_are_seen():
    """No stale fold or stale graph: each forward uses the current mode, statistics and parameters."""
    new, ref = make(SPEC, "train_net")
    x = torch.rand(2, 3, 17, 15, device=DEVICE)
    with torch.no_grad():
        for mode in ("train", "eval", "train", "eval"):
            new.train(mode == "train")
            ref.train(mode == "train")
            assert rel_error(new(x), net_reference(ref, x.double())) < TOLERANCE, mode
            assert_same_buffers(new, ref)
        state = {k: v.clone() for k, v in new.state_dict().items()}
        state["bn2.weight"].normal_()
        state["bn2.running_mean"].normal_()
        ref.load_state_dict(state)  # converts to its float64
        new.load_state_dict(state)
        new.bn3.bias.add_(0.5)  # in place
        ref.bn3.bias.add_(0.5)
        for mode in ("eval", "train"):
            new.train(mode == "train")
            ref.train(mode == "train")
            assert rel_error(new(x), net_reference(ref, x.double())) < TOLERANCE, mode
            assert_same_buffers(new, ref)


def test_training_gradients_and_buffers_updated_once():
    new, ref = make(SPEC, "train_net", seed=5)
    x = torch.rand(2, 3, 13, 11, device=DEVICE)
    weights = torch.randn(2, 10, device=DEVICE)
    x_new, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out_new, out_ref = new(x_new), net_reference(ref, x_ref)
    assert rel_error(out_new.detach(), out_ref.detach()) < TOLERANCE
    (out_new * weights).sum().backward()
    (out_ref * weights).sum().backward()
    assert_same_buffers(new, ref)  # backward recomputes the forward without a second update
    assert rel_error(x_new.grad, x_ref.grad) < TOLERANCE
    for (key, p_ref), p_new in zip(ref.named_parameters(), new.parameters()):
        assert rel_error(p_new.grad, p_ref.grad) < TOLERANCE, key


def test_one_value_per_channel_is_refused_like_torch():
    new, _ = make(SPEC, "train_net")
    with torch.no_grad(), pytest.raises(ValueError, match="more than 1 value per channel"):
        new(torch.rand(1, 3, 1, 1, device=DEVICE))


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    tiles=st.integers(2, 700),
    last_rows=st.integers(1, 64),
    c=st.sampled_from([1, 5, 8, 19]),
    cumulative=st.booleans(),
)
@example(tiles=257, last_rows=1, c=5, cumulative=False)  # one tile past a chunk: a chunk of one row
@example(tiles=512, last_rows=64, c=8, cumulative=True)  # two whole chunks
def test_batch_statistics_merge_long_columns_of_tiles_in_chunks(tiles, last_rows, c, cumulative):
    """batch_norm_batch_stats on per-tile statistics as a producer stores them (64-row tiles, the last one
    short), of values whose mean dwarfs their spread: the batch mean, the scale and the running buffers
    against float64. Columns of more than 256 tiles are merged in chunks by a kernel of their own first."""
    module = load_spec(SPEC, "train_net")
    rows = (tiles - 1) * 64 + last_rows
    torch.manual_seed(tiles * 100 + c)
    values = (torch.randn(rows, c, dtype=torch.float64) * torch.rand(c, dtype=torch.float64) + 300).to(DEVICE)
    padded = torch.cat([values, values.new_zeros(tiles * 64 - rows, c)]).view(tiles, 64, c)
    counts = torch.full((tiles, 1), 64.0, dtype=torch.float64, device=DEVICE)
    counts[-1] = last_rows
    tile_sum = padded.sum(1)
    tile_mean = (tile_sum / counts).unsqueeze(1)
    in_tile = (torch.arange(64, device=DEVICE).view(1, 64, 1) < counts.view(tiles, 1, 1)).to(torch.float64)
    tile_m2 = (((padded - tile_mean) * in_tile) ** 2).sum(1)
    bn = torch.nn.BatchNorm2d(c, momentum=None if cumulative else 0.2).to(DEVICE).train()
    randomize_batchnorm(bn, seed=c)
    exact = copy.deepcopy(bn).double()
    chunked = []
    chunk_kernel = module.batch_norm_chunk_stats_kernel
    recorded = type("Recorded", (), {"__getitem__": lambda self, grid: chunked.append(grid) or chunk_kernel[grid]})
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "batch_norm_chunk_stats_kernel", recorded())
        mean, scale = module.batch_norm_batch_stats((tile_sum.float(), tile_m2.float(), 64, rows), bn)
        exact(values.view(rows, c, 1, 1))
    assert len(chunked) == (tiles > 256)
    # the merge itself in float64: exact for the fp32 tile statistics it gets
    stored_sum, stored_m2 = tile_sum.float().double(), tile_m2.float().double()
    batch_mean = stored_sum.sum(0) / rows
    batch_m2 = stored_m2.sum(0) + (counts * (stored_sum / counts - batch_mean) ** 2).sum(0)
    assert rel_error(mean, batch_mean) < 1e-7  # float32 outputs
    assert rel_error(scale, exact.weight / (batch_m2 / rows + exact.eps).sqrt()) < 1e-7
    assert_same_buffers(bn, exact)  # and the running buffers as torch updates them from the values


# DenseNet's dense layer: BatchNorm and relu on a 3x3 conv's input, the conv to few channels; at batch 10 on
# 7x7 pixels its tiles alone would leave most SMs idle, so K is split into slices (runtime.k_slice)
# 64 channels by default: the plan gives a kernel a slices kernel where the spec's arguments let K split
SPLIT_SPEC = """\
model Split(c=64, growth=5)
input(2, c, 7, 6)
forward:
    bn1: bn(c) -> relu -> conv: conv(c, growth, 3, padding=1, bias=bias) -> bn2: bn(growth) -> relu
"""


def test_batch_statistics_of_one_pixel_images_match_torch():
    """An NCHW batch of 1 x 1 images is channels-last contiguous to torch with stride(3) 1, not C: the
    kernel that reads its batch statistics where it lies must still step C floats a pixel."""
    spec = "model OnePixel(c=5)\ninput(3, c, 1, 1)\nforward:\n    bn1: bn(c) -> relu -> conv: conv1x1(c, 7)\n"
    new, ref = make(spec, "one_pixel", seed=5)
    x = torch.randn(3, 5, 1, 1, device=DEVICE)
    check_steps(new, ref, lambda m, x: m.conv(F.relu(m.bn1(x))), [x, 2 * x + 1])


def split_reference(m, x):
    return F.relu(m.bn2(m.conv(F.relu(m.bn1(x)))))


class CountedKernel:
    """A Triton kernel whose launches (`kernel[grid](...)`) are counted."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    batch=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.sampled_from([3, 12, 40]),
    growth=st.sampled_from([5, 33]),
    bias=st.booleans(),
    slice_steps=st.integers(1, 3),
    training=st.booleans(),
)
@example(batch=2, h=7, w=7, c=40, growth=33, bias=True, slice_steps=1, training=True)  # 12 slices, 2 channel blocks
@example(batch=1, h=1, w=1, c=3, growth=5, bias=False, slice_steps=1, training=False)  # one slice: the whole K loop
def test_a_kxk_conv_with_k_in_slices_matches_torch(batch, h, w, c, growth, bias, slice_steps, training):
    """With K cut into slices of `slice_steps` K steps (k_slice replaced), the slices kernel runs where K has
    more than one slice, and the output (after the slices' sum, the bias, BatchNorm and relu) and the running
    buffers match torch's, in both modes; with one slice the kernel runs the whole K loop alone."""
    spec = SPLIT_SPEC.replace("bias=bias", f"bias={bias}")
    new, ref = make(spec, f"split_k_{bias}", seed=batch + h * w, c=c, growth=growth)
    namespace = type(new).run_kernels.__globals__  # the generated module's globals, which the wrappers read
    slices_names = [name for name in namespace if name.endswith("_slices_kernel")]  # eval's and training's
    assert len(slices_names) == 2, slices_names
    with pytest.MonkeyPatch.context() as patch:
        block_k = []
        patch.setitem(namespace, "k_slice", lambda programs, depth, step: block_k.append(step) or slice_steps * step)
        counted = [CountedKernel(namespace[name]) for name in slices_names]
        for name, kernel in zip(slices_names, counted):
            patch.setitem(namespace, name, kernel)
        new.train(training), ref.train(training)
        x = torch.randn(batch, c, h, w, device=DEVICE) + 0.5
        check_steps(new, ref, split_reference, [x, 2 * x])
    splits = -(-9 * c // (slice_steps * block_k[0]))
    # (on the GPU each input's CUDA graph runs the wrappers twice, a warm-up and the capture: count no number)
    assert (sum(kernel.launches for kernel in counted) > 0) == (splits > 1)
