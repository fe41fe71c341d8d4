"""The runtime that generated files copy (fusegen/runtime.py), tested where it is written: the tile rules,
the precision rule, dot_weight, the offset check, and the copy into generated files (the CUDA-graph
cache's change detection: tests/test_graph_inputs.py)."""

import inspect
from types import SimpleNamespace

import black
import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from fusegen import compile_spec, ops, runtime
from fusegen.emit import runtime_sources
from pathlib import Path

from helpers import DEVICE

ROOT = Path(__file__).resolve().parent.parent


@settings(max_examples=200, deadline=None)
@given(c_in=st.integers(1, 2048))
def test_tap_producer_tiles_are_powers_of_two_that_fit_a_4090(c_in):
    """tap_producer_tile: power-of-two blocks of at least 16 (tl.dot's minimum), the whole 1x1
    conv in one K step up to 64 input channels, at least one output value for each thread; its one
    pipelined K loop fits the 99 KB of shared memory an RTX 4090 gives a block (4 bytes a value)."""
    block_m, block_n, block_k, warps = runtime.tap_producer_tile(c_in)
    for block in (block_m, block_n, block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert (block_k >= c_in) == (c_in <= 64) and warps in (1, 2, 4)
    assert block_m * block_n >= 32 * warps
    assert (block_m * block_k + block_k * block_n) * 4 * 3 <= 99 * 1024


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 128 * 224 * 224),
    c_in=st.integers(1, 2048),
    c_out=st.integers(1, 2048),
    precision=st.sampled_from(["tf32", "tf32x3", "fp16"]),
)
def test_gemm_tiles_are_powers_of_two_that_fit_a_4090(rows, c_in, c_out, precision):
    """gemm_tile: power-of-two blocks of at least 16 (tl.dot's minimum), pipelined in 3 stages
    within the 99 KB of shared memory an RTX 4090 gives a block (2 bytes an operand for "fp16" dots,
    4 else); 64 rows at most for tf32x3 dots."""
    block_m, block_n, block_k = runtime.gemm_tile(rows, c_in, c_out, precision)
    for block in (block_m, block_n, block_k):
        assert block >= 16 and block & (block - 1) == 0
    operand_bytes = 2 if precision == "fp16" else 4
    assert (block_m * block_k + block_k * block_n) * operand_bytes * 3 <= 99 * 1024
    assert block_n <= max(16, triton.next_power_of_2(c_out)) and (block_m <= 64 or precision != "tf32x3")


@settings(max_examples=300, deadline=None)
@given(
    c_in=st.integers(1, 2048),
    c_out=st.integers(1, 2048),
    k=st.sampled_from([1, 3, 5, 7]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_producer_tiles_are_powers_of_two_that_fit_a_4090(c_in, c_out, k, dtype):
    """producer_tile: power-of-two blocks of at least 16; up to 64 input channels in one K
    step; with stages > 1 every stage's taps and weights, and the taps' sum on its way to tl.dot, fit
    the 99 KB of shared memory an RTX 4090 gives a block (counted at 4 bytes a value whatever `dtype`)."""
    block_m, block_n, block_k, warps, stages = runtime.producer_tile(c_in, c_out, k * k, dtype)
    for block in (block_m, block_n, block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert (block_k >= c_in) == (c_in <= 64) and stages in (1, 2)
    assert warps in (1, 2, 4)
    taps = k * k * block_m * block_k if stages > 1 else 0
    assert ((taps + block_k * block_n) * stages + block_m * block_k) * 4 <= 99 * 1024
    assert block_n <= max(16, triton.next_power_of_2(c_out))


@settings(max_examples=200, deadline=None)
@given(channels=st.integers(1, 4096), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_dwconv_tiles_are_powers_of_two_without_idle_threads(channels, dtype):
    """dwconv_tile: power-of-two blocks of at least 16, a channel block no wider than the
    channels round up to; with float16 a block that the channels fill where they are a multiple of 32,
    and at least one value for each thread."""
    block_m, block_n, warps = runtime.dwconv_tile(channels, dtype)
    for block in (block_m, block_n):
        assert block >= 16 and block & (block - 1) == 0
    assert block_n <= max(16, triton.next_power_of_2(channels)) and warps in (1, 2, 4)
    assert block_m * block_n >= 32 * warps
    if dtype == torch.float16 and channels % 32 == 0:
        assert channels % block_n == 0


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 2**22),
    c_in=st.integers(1, 2048),
    c_out=st.integers(1, 2048),
    k=st.sampled_from([3, 5, 7]),
    precision=st.sampled_from(["ieee", "tf32", "tf32x3", "tf32x3_split"]),
)
def test_conv_tiles_are_powers_of_two_that_fit_a_4090(rows, c_in, c_out, k, precision):
    """conv_tile: power-of-two blocks of at least 16; one stage (nothing to prefetch)
    exactly when the implicit GEMM's K fits one step; every stage's tiles fit the 99 KB of shared
    memory an RTX 4090 gives a block (two weight tiles a stage for "tf32x3_split": the weight and its low
    part); 128 rows only where that still leaves half a wave of 64 programs (on 8 warps for
    "tf32x3_split"), and never for "tf32x3"; 128 output channels only for one product a tile (not the
    split), from half a wave."""
    block_m, block_n, block_k, warps, stages = runtime.conv_tile(rows, k * k * c_in, c_out, precision)
    for block in (block_m, block_n, block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert (stages == 1) == (k * k * c_in <= block_k) and warps in (2, 4, 8)
    weight_tiles = 2 if precision == "tf32x3_split" else 1
    assert (block_m * block_k + weight_tiles * block_k * block_n) * 4 * stages <= 99 * 1024
    assert block_n <= max(16, triton.next_power_of_2(c_out))
    if block_m == 128:
        assert -(-rows // 128) * -(-c_out // block_n) >= 64 and precision != "tf32x3"
        assert (warps == 8) == (precision == "tf32x3_split")
    if block_n == 128:
        assert precision in ("ieee", "tf32") and block_m == 128


@settings(max_examples=300, deadline=None)
@given(programs=st.integers(1, 4096), depth=st.integers(1, 9 * 2048), block_k=st.sampled_from([16, 32, 64]))
def test_k_slices_cover_k_once_and_fill_small_launches(programs, depth, block_k):
    """k_slice: whole K steps a slice, every slice holding some of K; a launch of 256 programs or more sums
    the whole K in one program, a smaller one gets between half of and all of cdiv(256, programs) slices a
    tile, each of 8 K steps or more but the last."""
    size = runtime.k_slice(programs, depth, block_k)
    splits = runtime.cdiv(depth, size)
    steps = runtime.cdiv(depth, block_k)
    assert size % block_k == 0 and (splits - 1) * size < depth <= splits * size
    if programs >= 256 or steps < 16:
        assert splits == 1
    else:
        wanted = min(steps // 8, runtime.cdiv(256, programs))
        assert wanted / 2 < splits <= wanted and size >= 8 * block_k


@settings(max_examples=200, deadline=None)
@given(
    k=st.sampled_from([2, 3, 4, 5, 7, 11]),
    rows=st.integers(1, 200_000),
    c_out=st.integers(1, 1024),
    precision=st.sampled_from(["ieee", "tf32", "tf32x3", "tf32x3_split"]),
)
def test_a_conv_below_its_anchors_split_k_channels_never_splits(k, rows, c_out, precision):
    """The KxK conv anchor's split_k_min_channels (below it, plan emits no slices kernel) agrees with
    conv_tile and k_slice: under it no launch cuts K, at it a launch of one tile does."""
    anchor = ops.lookup(f"conv{k}x{k}").lowering
    least = anchor.split_k_min_channels
    below, at = k * k * (least - 1), k * k * least
    block_k = runtime.conv_tile(rows, below, c_out, precision)[2]
    assert runtime.k_slice(1, below, block_k) >= below
    block_k = runtime.conv_tile(rows, at, c_out, precision)[2]
    assert runtime.k_slice(1, at, block_k) < at


@given(n=st.integers(1, 4096), c_out=st.integers(1, 4096))
def test_a_linear_layer_below_its_anchors_split_k_features_never_splits(n, c_out):
    """The linear anchor's split_k_min_channels agrees with linear_tile: below it K_SLICE holds every
    feature, at it a batch of one (at most 128 tiles here) cuts K."""
    least = ops.lookup("linear").lowering.split_k_min_channels
    assert runtime.linear_tile(n, least - 1, c_out)[3] >= least - 1
    assert runtime.linear_tile(1, least, c_out)[3] < least


def on_gpu(dtype=torch.float32):
    """What dot_precision reads of an input on the GPU."""
    return SimpleNamespace(is_cuda=True, dtype=dtype)


@settings(max_examples=300, deadline=None)
@given(programs=st.integers(1, 4096), window=st.integers(1, 224 * 224), block_m=st.sampled_from([16, 64]))
def test_window_slices_cover_each_window_once_and_fill_small_launches(programs, window, block_m):
    """window_slice: whole tiles a slice, every slice holding some of the window's pixels; a launch of 256
    programs or more sums whole windows, a smaller one gets about 256 (at most one program a tile)."""
    size = runtime.window_slice(programs, window, block_m)
    splits = runtime.cdiv(window, size)
    tiles = runtime.cdiv(window, block_m)
    assert size % block_m == 0 and (splits - 1) * size < window <= splits * size
    if programs >= 256:
        assert splits == 1
    else:
        wanted = min(tiles, runtime.cdiv(256, programs))  # programs a window, short of whole tiles a slice
        assert wanted / 2 < splits <= wanted


def test_dot_precision_is_ieee_off_the_gpu():
    """Triton's interpreter computes fp32 whatever the precision: the wrappers say so."""
    assert runtime.dot_precision(torch.rand(2, 3, 4, 4), nn.Conv2d(3, 8, 3)) == "ieee"


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.Linear(1024, 1000), "tf32x3"),  # torch's matmuls are fp32
        (nn.Conv2d(3, 32, 3, 2, 1), "tf32x3"),  # a stem: 27 products an output
        (nn.Conv2d(6, 16, 5), "tf32x3"),  # LeNet's second conv: 150
        (nn.Conv2d(3, 64, 1), "tf32x3"),  # a shortcut from 3 channels
        (nn.Conv2d(3, 64, 7, 2, 3), "tf32x3"),  # ResNet's stem: 147
        (nn.Conv2d(3, 96, 11, 4, 2), "tf32"),  # AlexNet's stem: 363 products, compute-bound
        (nn.Conv2d(32, 64, 1), "tf32"),
        (nn.Conv2d(64, 64, 3, padding=1), "tf32"),
        (nn.Conv2d(48, 48, 1, groups=3), "tf32x3"),  # 16 channels a group
    ],
)
def test_dot_precision_on_the_gpu(module, expected):
    assert runtime.dot_precision(on_gpu(), module) == expected


def test_dot_precision_takes_float16_where_the_weight_rounds_to_it():
    conv = nn.Conv2d(64, 64, 1)
    assert runtime.dot_precision(on_gpu(torch.float16), conv) == "fp16"
    with torch.no_grad():
        conv.weight.mul_(2**20)  # past float16's comfortable range: TF32 instead
    assert runtime.dot_precision(on_gpu(torch.float16), conv) == "tf32"


def test_dot_weight_rounds_to_nearest_tf32_once_per_version():
    conv = nn.Conv2d(4, 4, 1)
    weight = runtime.dot_weight(conv, "tf32")
    w = conv.weight.detach().double()
    # the nearest TF32 value: 10 mantissa bits, so within half a unit of 2**-10 relative
    assert torch.all((weight.double() - w).abs() <= w.abs() * 2**-11)
    assert torch.all((weight.view(torch.int32) & 0x1FFF) == 0)
    assert runtime.dot_weight(conv, "tf32") is weight  # cached
    with torch.no_grad():
        conv.weight.add_(1.0)  # a new version: a new copy
    assert not torch.equal(runtime.dot_weight(conv, "tf32"), weight)
    assert runtime.dot_weight(conv, "tf32x3") is conv.weight  # the others read the weight itself


@triton.jit
def _round_kernel(x_ptr, out_ptr, n: tl.constexpr):
    offs = tl.arange(0, n)
    tl.store(out_ptr + offs, runtime.round_to_tf32(tl.load(x_ptr + offs)))


def test_round_to_tf32_in_a_kernel_matches_dot_weight():
    """The activations' rounding (in the kernel) and the weights' (in the wrapper) are the same."""
    torch.manual_seed(0)
    x = torch.randn(64, device=DEVICE) * 10
    out = torch.empty_like(x)
    _round_kernel[(1,)](x, out, n=64)
    module = SimpleNamespace(weight=x.clone())
    assert torch.equal(out, runtime.dot_weight(module, "tf32"))


def test_check_32bit_offsets_refuses_a_tensor_past_2_31():
    runtime.check_32bit_offsets(torch.empty(2**15, 2**16 - 1, device="meta"))
    runtime.check_32bit_offsets(torch.empty(1, device="meta").expand(2**20, 2**20))  # stride 0
    with pytest.raises(ValueError, match="past 2"):
        runtime.check_32bit_offsets(torch.empty(2**15, 2**16 + 1, device="meta"))
    # a view's own offsets count, not its storage's size (which only spares the walk when small)
    big = torch.empty(2**16, 2**16, device="meta")
    runtime.check_32bit_offsets(big[:2, :7])
    with pytest.raises(ValueError, match="past 2"):
        runtime.check_32bit_offsets(big[:, :2])


def test_pixel_rows_keeps_channels_last_rows_and_a_concatenations_prefix_where_they_lie():
    buffer = torch.rand(2, 9, 3, 4).to(memory_format=torch.channels_last)
    for view in (buffer, buffer[:, :5], buffer[:, :1]):
        assert runtime.pixel_rows(view) is view
    nchw = torch.rand(2, 5, 3, 4)
    for other in (nchw, buffer[:, 2:5].contiguous()[:, :, :, ::2]):
        rows = runtime.pixel_rows(other)
        assert rows.is_contiguous(memory_format=torch.channels_last) and torch.equal(rows, other)


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    layout=st.sampled_from(["nchw", "channels_last", "prefix"]),
)
def test_pixel_rows_are_the_pixels_one_stride_of_x_apart(shape, layout):
    """What a kernel reads of pixel_rows(x): pixel p's channel c at p * stride(3) + c, for any x. Dimensions
    of size 1 may come with any stride (an NCHW batch of 1 x 1 images is channels-last contiguous to
    torch, with stride(3) 1): the rows' stride must be there all the same."""
    x = torch.rand(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "prefix":  # a concatenation's first channels
        x = torch.cat([x, torch.rand(shape)], 1).contiguous(memory_format=torch.channels_last)[:, : shape[1]]
    N, C, H, W = shape
    rows = runtime.pixel_rows(x)
    read = rows.as_strided((N * H * W, C), (rows.stride(3), 1))
    assert torch.equal(read, x.permute(0, 2, 3, 1).reshape(N * H * W, C))


@given(st.integers(-3, 10**6), st.integers(1, 5000))
def test_host_side_integer_helpers_match_tritons(n, d):
    """next_power_of_2 and cdiv are plain functions: Triton's are constexpr_functions, slow to call."""
    assert runtime.next_power_of_2(n) == (triton.next_power_of_2(n) if n >= 1 else 1)
    assert runtime.cdiv(n, d) == triton.cdiv(n, d)


def test_same_layout_gives_channels_last_and_refuses_other_shapes():
    out = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    t = torch.rand(2, 3, 4, 5)
    same = runtime.same_layout(t, out)
    assert torch.equal(same, t) and same.stride() == out.stride()
    with pytest.raises(ValueError, match="shapes"):
        runtime.same_layout(torch.rand(2, 3, 4, 4), out)


def test_generated_files_copy_the_runtime_functions_they_call_and_no_others():
    """Each generated file holds the runtime's own source of each function it calls (directly or
    through another runtime function), formatted as the file is, and of none it does not call."""
    names = [name for name, value in vars(runtime).items() if inspect.isfunction(value) or hasattr(value, "fn")]
    for spec in ("mobilenet_v1.fuse", "lenet5.fuse"):
        source = (ROOT / "generated" / spec.replace(".fuse", ".py")).read_text()
        rebuilt = compile_spec((ROOT / "specs" / spec).read_text(), f"specs/{spec}")
        assert rebuilt == source
        copied = [name for name in names if f"\ndef {name}(" in source]
        assert {
            "fp32_dot",
            "round_to_tf32",
            "dot_precision",
            "replay_cuda_graph",
            "graph_inputs",
            "run_launch_plan",
        } <= set(copied)
        for name in copied:
            function = getattr(runtime, name)
            text = inspect.getsource(getattr(function, "fn", function))
            body = black.format_str(text[text.index(f"def {name}(") :], mode=black.Mode())
            assert body in source, name
            others = source.replace(body, "")
            assert f"{name}(" in others, f"{name} is copied but not called"
    # gemm_tile's own callees come along, in the runtime's order
    copied = [text.split("(")[0] for text in runtime_sources(["y = gemm_tile(1, 2, 3, p)"], jit=False)]
    assert copied == ["def next_power_of_2", "def cdiv", "def gemm_tile"]
    assert runtime_sources(["acc = fp32_dot(a, b, acc, P)"], jit=True)[0].startswith("@triton.jit")


@settings(max_examples=200, deadline=None)
@given(axis=st.sampled_from(["width", "height", "channels"]), w=st.integers(1, 4096), c=st.integers(1, 4096))
def test_softmax_tiles_are_powers_of_two_of_at_most_4096_values(axis, w, c):
    """softmax_tile: power-of-two blocks; along the width a row block lies in one image row (BLOCK_M divides
    W), so its rows share one row's statistics; every tile the kernel loads (BLOCK_M x BLOCK_N in sweep 2,
    BLOCK_K x BLOCK_N or BLOCK_M x BLOCK_K in sweep 1) holds at most 4096 values."""
    block_m, block_n, block_k, warps = runtime.softmax_tile(axis, w, c)
    for block in (block_m, block_n, block_k):
        assert block >= 1 and block & (block - 1) == 0
    assert block_n >= 16 and warps == 4
    assert block_m * block_n <= 4096
    if axis == "width":
        assert w % block_m == 0 and block_k * block_n <= 4096
    if axis == "channels":
        assert block_m * block_k <= 4096


def test_caller_holds_counts_a_view_s_base_as_the_graph_s_own():
    """A CUDA graph's output that is a view (a final flatten) keeps its base alive, which is the graph's own
    hold; the alias handed out, or any view of it, is the caller's until dropped. The same for an output
    that is no view."""
    for out in (torch.empty(4, 3).flatten(), torch.empty(12)):
        assert not runtime.caller_holds(out)
        handed = out.detach()
        assert runtime.caller_holds(out)
        row = handed[:2]
        del handed
        assert runtime.caller_holds(out)
        del row
        assert not runtime.caller_holds(out)
