"""The runtime of generated files: the functions that kernels, wrappers and ModelNew call (the dot, the tile
rules, the precision rule, the CUDA-graph cache). A generated file must stay self-contained, so emit copies
each function it calls from this source (`fusegen.emit.runtime_sources`); tests/test_runtime.py tests them
here. The measurements behind the rules are in docs/performance.md ("Tile rules and why", "Precision and
runtime choices"), not in these comments, which every generated file repeats."""

import torch
import triton
import triton.language as tl

# -- the dot of every anchor --------------------------------------------------------------------------


@triton.jit
def round_to_tf32(x):
    """x rounded to the nearest TF32 value, ties away from zero (as cuBLAS and cuDNN round)."""
    # add half a unit in TF32's last place, then drop the 13 mantissa bits that TF32 lacks
    bits = x.to(tl.uint32, bitcast=True) + 0x1000
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def fp32_dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b for an fp32 tile `a` and dot_weight's `b`, accumulated in fp32. Tensor cores read
    fp32 operands as TF32 by truncating them, a bias that adds up over a net: for "tf32" the activations
    `a` are rounded to nearest here, and the weights `b` come rounded already. For "fp16" `a` rounds to
    nearest float16 and `b` comes as float16."""
    # if/else, not an early return: Triton compiles the code after a return in a constexpr branch too
    if DOT_PRECISION == "fp16":
        acc = tl.dot(a.to(tl.float16), b, acc)
    else:
        if DOT_PRECISION == "tf32":
            a = round_to_tf32(a)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def tf32x3_split_dot(a, b, b_low, acc):
    """acc + a @ w in three TF32 products, fp32's accuracy: `b` is the weight w rounded to TF32 and `b_low`
    the rest of it, rounded to TF32 (dot_weight, dot_weight_low: split once on the host, where Triton's
    "tf32x3" splits the weight tile again in every program's K loop). `a` splits here the same way."""
    a_high = round_to_tf32(a)
    a_low = round_to_tf32(a - a_high)
    # the two small products summed apart from acc: added into a large accumulator, the tensor cores
    # would drop their low bits
    small = tl.dot(a_low, b, input_precision="tf32")
    small = tl.dot(a_high, b_low, small, input_precision="tf32")
    return acc + tl.dot(a_high, b, small, input_precision="tf32")


# -- precision ----------------------------------------------------------------------------------------


def dot_precision(x, module):
    """fp32_dot's precision for input x and a conv's or linear layer's `module`. Off the GPU "ieee" (Triton's
    interpreter computes fp32). On it "fp16" where x is a float16 activation and the weight rounds to
    float16 as well as to TF32 (dot_weight); "tf32x3" (three TF32 products, fp32's accuracy) for a linear
    layer, whose error reaches the output unfiltered and which torch computes in fp32, and for a conv whose
    outputs each sum few products (a stem's, LeNet's), whose TF32 rounding nothing averages out and which
    cuDNN computes in fp32; else "tf32", rounded to nearest as cuDNN's TF32 convs are.
    """
    if not x.is_cuda:
        return "ieee"
    if x.dtype == torch.float16 and dot_weight(module, "fp16") is not None:
        return "fp16"
    if module.weight.dim() == 2:  # a linear layer
        return "tf32x3"
    channels = module.in_channels // module.groups
    if channels <= 16 and channels * module.kernel_size[0] * module.kernel_size[1] <= 256:
        return "tf32x3"
    return "tf32"


def dot_weight(module, precision):
    """module.weight as fp32_dot's operand `b` at `precision`, made once per version of the weight. A
    Conv2d's comes in (out, kh, kw, in) order (channels_last), the order of the KxK conv's K loop, so a K
    step's weights for an output channel are one contiguous run (with the weight's own NCHW order they lay
    KH * KW floats apart: 3x3 convs of 64 to 512 channels ran 1.5-3.6x slower on an H100); other modules'
    weights keep their strides. "tf32", and "tf32x3_split" (whose other part is dot_weight_low): rounded to
    the nearest TF32 values (ties away from zero). "fp16": rounded to float16, or None where that loses
    more than TF32 would: where the largest magnitude is above 2**15 (near float16's overflow) or below
    2**-8 (then the weights under 2**-14 that go subnormal lose more than 1/64 of the largest one's TF32
    rounding)."""
    # in the wrapper, not per tile in the kernel: rounding each weight tile as it loads costs the GEMMs time
    if precision == "tf32x3_split":
        precision = "tf32"
    if precision in ("tf32", "fp16"):
        return _weight_copy(module, precision)
    if _in_k_order(module) and not module.weight.is_contiguous(memory_format=torch.channels_last):
        return _weight_copy(module, "fp32")
    return module.weight


def dot_weight_low(module, precision):
    """For "tf32x3_split": what dot_weight's TF32 rounding leaves of module.weight, rounded to TF32 (the
    two sum to the weight within 2**-21 of it), made once per version of the weight. Other precisions do
    not read it: module.weight."""
    if precision != "tf32x3_split":
        return module.weight
    return _weight_copy(module, "tf32_low")


def _weight_copy(module, kind):
    """module.weight as `kind` ("tf32", "tf32_low", "fp16" or "fp32"; see dot_weight), in channels_last
    order for a Conv2d, kept on the module until the weight changes (in place or replaced)."""
    weight = module.weight
    key = (weight.data_ptr(), weight._version, weight.device, weight.stride())
    cached = getattr(module, f"{kind}_weight", None)
    if cached is None or cached[0] != key:
        w = weight.detach()
        if kind == "fp16":  # one sync per version of the weight, made before a CUDA graph's capture
            operand = w.half() if 2**-8 <= w.abs().amax().item() <= 2**15 else None
        elif kind == "tf32":
            operand = _tf32(w)
        elif kind == "tf32_low":
            operand = _tf32(w - _weight_copy(module, "tf32"))
        else:
            operand = w
        if operand is not None and _in_k_order(module):
            operand = operand.contiguous(memory_format=torch.channels_last)
        cached = (key, operand)
        setattr(module, f"{kind}_weight", cached)
    return cached[1]


def _in_k_order(module):
    """Whether dot_weight gives module's weight in (out, kh, kw, in) order: a conv's, not a transposed
    conv's (whose K loop reads its (in, out, kh, kw) weight through the strides) or a linear layer's."""
    return module.weight.dim() == 4 and not module.transposed


def _tf32(w):
    """w rounded to the nearest TF32 values, ties away from zero (as round_to_tf32)."""
    return ((w.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


# -- tile rules (each from sweeps on an H200; docs/performance.md, "Tile rules and why") --------------


def next_power_of_2(n):
    """The least power of two >= n (1 below 2), as triton.next_power_of_2. Triton 3.6 makes that and
    triton.cdiv constexpr_functions, whose host-side calls (unwrapping each argument) took about half of
    a MobileNetV1 forward's wrapper time."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a, b):
    """ceil(a / b) for ints, as triton.cdiv (see next_power_of_2)."""
    return -(-a // b)


def gemm_tile(rows, C_in, C_out, precision):
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a 1x1 conv of `rows` pixels."""

    def programs(block_m, block_n):
        return cdiv(rows, block_m) * cdiv(C_out, block_n)

    # up to 128 channels, so that each input row is read once for up to 128 output channels
    block_n = min(128, max(16, next_power_of_2(C_out)))
    # float16 operands: K steps of 64 carry the bytes of 32 fp32 ones, where that leaves two steps or more
    block_k = 64 if precision == "fp16" and C_in >= 128 else 32
    # 128 rows where that leaves five programs per SM of a 128-SM GPU; a tf32x3 dot (three products per
    # tile) keeps 64
    if precision != "tf32x3" and C_in >= 32 and block_n >= 64 and programs(128, block_n) >= 640:
        return 128, block_n, block_k
    if programs(64, block_n) >= 128:
        return 64, block_n, block_k
    # under a wave of programs (batch 10's late layers): narrower tiles, longer K steps, since each K step
    # waits on its loads (float16 operands: steps of 128, three stages of them in 96 KB)
    block_k = 128 if precision == "fp16" and C_in >= 128 else 64 if C_in >= 64 else 32
    if programs(64, min(block_n, 64)) >= 128:
        return 64, min(block_n, 64), block_k
    return 32, min(block_n, 32), block_k


def conv_tile(rows, K, C_out, precision):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a KxK conv of `rows` output pixels whose
    implicit GEMM has K = KH * KW * C_in, swept on the stem (3x3, 3 -> 32, stride 2) and on eight convs
    of AlexNet, VGG, SqueezeNet, DenseNet and the U-Net; the single-product rule again (kxk microbenchmark)
    once dot_weight gave the weight in K order."""
    block_n = min(64, max(16, next_power_of_2(C_out)))
    if K <= 32:
        # one K step (the stem's 27): nothing to pipeline, and 2 warps per 64 x 32 tile
        return 64, block_n, 32, 2, 1
    if precision not in ("tf32x3", "tf32x3_split"):
        # With the weight in K order its tiles load as runs, and larger tiles pay: 128 output channels where
        # that leaves half a wave of programs (H100, batch 10: 256 -> 256 @56 0.289 -> 0.191 ms, 512 -> 512
        # @14 0.199 -> 0.175), else 128 rows where those leave it (256 -> 256 @14 0.115 -> 0.073). 128 x 128
        # in 3 stages, a BatchNorm prologue's tile included, takes 81 KiB of a 4090's 99 KiB (compiled for sm_89).
        if C_out >= 128 and cdiv(rows, 128) * cdiv(C_out, 128) >= 64:
            return 128, 128, 32, 4, 3
        if cdiv(rows, 128) * cdiv(C_out, block_n) >= 64:
            return 128, block_n, 32, 4, 3
        return 64, block_n, 32, 4, 3
    # the split weight's three products: 128 rows on 8 warps from half a wave of programs, in two stages,
    # since a BatchNorm prologue's input tile takes shared memory of its own (swept on an H100); a tf32x3 dot
    # (three products per tile) keeps 64, as in gemm_tile
    if precision == "tf32x3_split" and block_n == 64 and cdiv(rows, 128) * cdiv(C_out, 64) >= 64:
        return 128, 64, 32, 8, 2
    return 64, block_n, 32, 4, 3


def dwconv_tile(C, dtype):
    """(BLOCK_M, BLOCK_N, num_warps) for a depthwise conv over C channels stored in `dtype`."""
    if dtype == torch.float16:
        # 16 pixels a program and 16 values a thread: many small programs keep more of the taps' loads in
        # flight; a channel block that C fills, so no lane is masked
        block_n = min(
            128 if C % 128 == 0 else 64 if C % 64 == 0 else 32,
            max(16, next_power_of_2(C)),
        )
        return 16, block_n, max(1, block_n // 32)
    return 64, min(64, max(16, next_power_of_2(C))), 4


def producer_tile(C_in, C_out, taps, dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a 1x1 conv from C_in to C_out channels
    whose input tile a depthwise conv of `taps` taps computes in its K loop, its input stored in `dtype`.
    """
    # up to 128 output channels in one block: each further block computes the depthwise conv again
    block_n = min(128, max(16, next_power_of_2(C_out)))
    if C_in <= 64:
        # one K step: the depthwise tile is computed once
        block_k = max(16, next_power_of_2(C_in))
        if dtype == torch.float16:
            # 32 rows, a warp per 32 channels of the depthwise tile (32 of its values a thread)
            return 32, block_n, block_k, max(1, block_k // 32), 1
        return (64 if block_n <= 64 else 32), block_n, block_k, 4, 1
    # K steps of 32 channels; Triton prefetches the next step's taps through shared memory where two
    # stages fit a 4090's 99 KB
    stage_bytes = (taps * 32 * 32 + 32 * block_n) * 4
    return 32, block_n, 32, 4, (2 if 2 * stage_bytes + 32 * 32 * 4 <= 99 * 1024 else 1)


def tap_producer_tile(C_in):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a depthwise conv whose taps a 1x1 conv from C_in channels
    computes (conv1x1 -> bn -> relu6 -> dwconv3x3), swept on EfficientNetB1's expansions into stride-2
    depthwise convs with float16 activations."""
    if C_in <= 64:
        # 16 pixels a program and the whole 1x1 conv in one K step; a warp per 32 channels up to 32 input
        # channels, then 64 channels on 2 warps
        block_k = max(16, next_power_of_2(C_in))
        if C_in <= 32:
            return 16, 32, block_k, 1
        return 16, 64, block_k, 2
    return 64, 64, 64, 4


def linear_tile(N, C_in, C_out):
    """(BLOCK_M, BLOCK_N, BLOCK_K, K_SLICE) for a linear layer of N rows: each program sums K_SLICE of
    the C_in input features, and a second kernel adds the slices' sums (split K)."""
    block_m = min(32, max(16, next_power_of_2(N)))
    block_n = 32 if N <= 16 else 64
    block_k = min(64, max(16, next_power_of_2(C_in)))
    if cdiv(N, block_m) * cdiv(C_out, block_n) >= 256:
        # two waves of tiles or more: the whole K in one slice
        return block_m, block_n, block_k, cdiv(C_in, block_k) * block_k
    if N <= 16:
        # a small batch: a program for each K step
        return block_m, block_n, block_k, block_k
    # slices of four K steps
    return block_m, block_n, block_k, 4 * block_k


def k_slice(programs, depth, block_k):
    """For a GEMM launch of `programs` output tiles whose K loop sums `depth` products in steps of block_k:
    how many of them one program sums (a multiple of block_k). A launch of 256 programs or more sums the
    whole K in each; a smaller one cuts K into up to cdiv(256, programs) slices of at least 8 steps (the
    last slice holds what is left), each summed by programs of their own (split K): DenseNet's 3x3 convs to
    32 channels on 7x7 pixels at batch 10 are 8 tiles of up to 530 steps."""
    steps = cdiv(depth, block_k)
    splits = max(1, min(cdiv(256, programs), steps // 8))
    return cdiv(steps, splits) * block_k


def window_slice(programs, window, block_m):
    """For a kernel that a pool ends, of `programs` programs (pooled pixels x channel blocks) over
    `window`-pixel pooling windows in tiles of block_m pixels: how many pixels of a window one program sums
    (a multiple of block_m). Where the pooled pixels alone leave the launch under about 256 programs, the
    windows are sliced so that it gets that many: a global pool at a small batch, such as EfficientNetB2's
    first at batch 2, 4 programs each over 12,544 pixels."""
    tiles = cdiv(window, block_m)
    if programs >= 256:
        return tiles * block_m
    return cdiv(tiles, min(tiles, cdiv(256, programs))) * block_m


def softmax_tile(axis, W, C):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a softmax over `axis` ("width", "height" or "channels") of
    a channels-last tensor W pixels wide with C channels; BLOCK_K is the chunk of the axis that the kernel's
    first sweep reduces at a time. Not swept on a GPU: tiles of about 4096 values on 4 warps."""
    if axis == "width":
        # every row block lies in one image row, whose statistics all its rows share: BLOCK_M divides W
        # (the largest power of two that does, up to 256: a program for each 256 pixels of the row)
        m_bits = min((W & -W).bit_length() - 1, 8)
        block_m = 1 << m_bits
        block_n = min(max(16, next_power_of_2(C)), 1 << max(4, 12 - m_bits))
        block_k = min(next_power_of_2(W), max(block_m, next_power_of_2(4096 // block_n)))
        return block_m, block_n, block_k, 4
    if axis == "channels":
        # every channel block reads all C channels of its rows: one block up to 256 channels
        block_n = min(256, max(16, next_power_of_2(C)))
        return max(16, next_power_of_2(4096 // block_n)), block_n, block_n, 4
    # the height: a running maximum and sum for each value of the tile, one image row at a time
    return 64, min(64, max(16, next_power_of_2(C))), 1, 4


# -- launch helpers -----------------------------------------------------------------------------------


def launch_pdl(x, grid):
    """Whether a launch of `grid` programs on x's GPU uses programmatic dependent launch: its programs may
    start while the launch before runs, and wait for that one's writes before their first load or store
    (every kernel's first lines, fusegen.lower). Only NVIDIA GPUs of compute capability 9.0 on (elsewhere
    the launch is plain), and only small launches: a large launch's successor would hold SMs while it waits.
    """
    if not x.is_cuda:
        return False
    gpu = torch.cuda.get_device_properties(x.device)
    programs = 1
    for size in grid:
        programs *= size
    return torch.version.hip is None and gpu.major >= 9 and programs <= 8 * gpu.multi_processor_count


def same_layout(t, out):
    """t in out's layout (channels-last if 4-d, contiguous), for a kernel that reads it at out's offsets
    (the second operand of add)."""
    if t.shape != out.shape:
        raise ValueError(f"add: the operands' shapes {tuple(t.shape)} and {tuple(out.shape)} differ")
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def concat_slice(into, N, C, H, W, device):
    """The channel slice that a launch stores its output, of shape (N, C, H, W), into: part `index` of
    the concatenation whose buffer is `into` = (buffer, index), a dict of the parts' channel counts and the
    tensor, which the first launch into it makes at its batch and pixels: channels-last, or NCHW where the
    dict's "layout" says so (the model's output). A part of another shape is refused, as torch.cat refuses
    it. (torch.cat along channels without a copy: the launches that make the parts store into their channel
    slices of one buffer.)"""
    buffer, index = into
    channels = buffer["channels"]
    if C != channels[index]:
        raise ValueError(f"cat: part {index} has {C} channels, where {channels[index]} were expected")
    if buffer["tensor"] is None:
        shape = (N, sum(channels), H, W)
        layout = buffer.get("layout", torch.channels_last)
        buffer["tensor"] = torch.empty(shape, device=device, dtype=torch.float32, memory_format=layout)
    tensor = buffer["tensor"]
    if (N, H, W) != (tensor.shape[0], *tensor.shape[2:]):
        raise ValueError(f"cat: a part of shape {(N, C, H, W)} does not fit {tuple(tensor.shape)}")
    start = sum(channels[:index])
    return tensor[:, start : start + C]


def concat_prefix(buffer, index):
    """The channels of a concatenation's buffer before part `index` (a dense loop's iteration reads the
    input and every earlier iteration's output there, in place: a view, no copy)."""
    return buffer["tensor"][:, : sum(buffer["channels"][:index])]


def pixel_rows(x):
    """x where it lies if its pixels are rows of its channels, each row one stride after the last (a
    channels-last tensor, or a concatenation's prefix: the first channels of a channels-last buffer), else
    a channels-last copy. A kernel reads the rows at x.stride(3): where a dimension of size 1 came with
    another stride (torch lets it: an NCHW tensor of 1 x 1 images is channels-last contiguous), the view
    returned has the rows' stride there."""
    N, C, H, W = x.shape
    # the rows' stride: that of the innermost pixel dimension longer than 1
    row = x.stride(3) if W > 1 else x.stride(2) if H > 1 else x.stride(0) if N > 1 else C
    strides = (H * W * row, 1, W * row, row)
    if any(size > 1 and stride != wanted for size, stride, wanted in zip(x.shape, x.stride(), strides)):
        x = x.contiguous(memory_format=torch.channels_last)
        strides = (H * W * C, 1, W * C, C)
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def check_32bit_offsets(*tensors):
    """Raises ValueError if an element offset of a tensor reaches 2**31 (the kernels use 32-bit offsets)."""
    for t in tensors:
        # the offsets stay within the storage: a storage of fewer elements needs no walk of the strides
        if t.untyped_storage().nbytes() < 2**31 * t.element_size():
            continue
        if sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} has element offsets past 2**31; split the batch")


# -- the CUDA-graph cache: on the GPU the whole forward replays as one graph, since at small batch the
# Python launches, not the kernels, take most of the time ------------------------------------------------


def graph_inputs(model, attrs):
    """What a CUDA graph captured for `model` reads: (table, name, object) for every parameter, buffer
    and child module in the tree and each attribute named in `attrs` where a module has one; then the
    parameters and buffers with their addresses, and the parameters with their versions.
    """
    slots, tensors, parameters = [], [], []
    modules = [model]
    for module in modules:  # appending while iterating: the whole tree, breadth first
        for table in (module._parameters, module._buffers, module._modules):
            slots += [(table, name, value) for name, value in table.items()]
        slots += [(module.__dict__, name, module.__dict__[name]) for name in attrs if name in module.__dict__]
        tensors += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        parameters += [t for t in module._parameters.values() if t is not None]
        modules += [child for child in module._modules.values() if child is not None]
    return (
        slots,
        tensors,
        [t.data_ptr() for t in tensors],
        parameters,
        [t._version for t in parameters],
    )


def graph_inputs_unchanged(inputs):
    """Whether what graph_inputs found is as it was: three flat list comprehensions per call, much cheaper
    on the host than a walk of the module tree."""
    slots, tensors, addresses, parameters, versions = inputs
    return (
        all([table.get(name) is value for table, name, value in slots])
        and [t.data_ptr() for t in tensors] == addresses
        and [t._version for t in parameters] == versions
    )


def graph_entry(model, x, copy_input):
    """The CUDA graphs of one input shape, dtype, device and mode and one input address (or of the inputs
    at other addresses). They all read `static_x` (None: the caller's tensor where it lies; the graphs keep
    no reference to it, so the caller's next input may take its memory) and differ only in where they
    write: the outputs of `returned` go to the caller as they are, that of `cloned` is copied out, for when
    the caller still holds all of those. Each graph is (graph, output)."""
    # from model.first_kernel_outside_graph_numel input elements (eval mode) graphs that copy their input
    # in start from the first launch's output instead: that launch runs outside, on x itself
    outside = (
        copy_input
        and not model.training
        and model.first_kernel_outside_graph_numel is not None
        and x.numel() >= model.first_kernel_outside_graph_numel
    )
    static_x = None
    if outside:
        static_x = model.run_first_kernel(x)
    elif copy_input:
        # in the layout the first kernel reads, so that each replay's copy is also any layout change
        static_x = torch.empty_like(x, memory_format=model.input_layout).copy_(x)
    inputs = graph_inputs(model, model.captured_attrs)
    return {
        "inputs": inputs,
        "outside": outside,
        "static_x": static_x,
        "returned": [],
        "cloned": None,
    }


def capture_cuda_graph(model, entry, x):
    """A CUDA graph of model.run_kernels on x as `entry` feeds it: (graph, its output), or None where the
    capture failed (see recover_from_failed_capture). The graphs of a device share one memory pool: each
    replay writes what it reads first, and an output stays allocated while its entry holds it, so none
    needs another's intermediates kept."""
    run = model.run_kernels_after_first if entry["outside"] else model.run_kernels
    graph_x = x if entry["static_x"] is None else entry["static_x"]
    with torch.cuda.device(x.device):
        # One capture stream per device: the caching allocator reuses a freed block only on the stream
        # that freed it, so graphs captured on streams of their own each kept a forward's intermediates
        # (SqueezeNet at batch 64: 3.7 GB a graph, 45 GB for 12).
        pool, side = model.cuda_graph_pools.setdefault(x.device, (torch.cuda.graph_pool_handle(), torch.cuda.Stream()))
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # compiles the kernels outside the capture; training mode must not count this run
            buffers = [b.clone() for b in model.buffers()]
            run(graph_x)
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        # imported here: a generated file's top-level imports are the seeds' four
        import contextlib

        failures = []

        def keep_failure(kind, failure, traceback):
            """An __exit__ that keeps a RuntimeError and suppresses it (a file with a try block is one that
            KernelBench's checks reject)."""
            if isinstance(failure, RuntimeError):
                failures.append(failure)
            return isinstance(failure, RuntimeError)

        # A fallback to the same kernels launched directly, not to torch: see recover_from_failed_capture.
        with contextlib.ExitStack() as failure_kept:
            failure_kept.push(keep_failure)
            # torch.cuda.graph's default capture stream lives on whichever GPU first captured anything in
            # this process: capture on the stream of x's GPU instead. "thread_local": calls that capturing
            # forbids only in the capturing thread (cudaMalloc, say) may come from other threads meanwhile.
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                out = run(graph_x)
        if failures:
            recover_from_failed_capture(model, stream, failures[0])
            return None
    return graph, out


def recover_from_failed_capture(model, stream, failure):
    """Leaves the process as it was before a capture that failed with `failure`, and the model launching its
    kernels directly from then on, saying so once and why. torch does not clean up after a capture that
    fails: the capture stream stays current (torch.cuda.graph skips restoring the stream when capture_end
    raises), and the CUDA generator stays in capture mode, so that every later random op on the GPU fails
    ("Offset increment outside graph capture"); a capture that succeeds resets the generator."""
    torch.cuda.set_stream(stream)
    with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
        torch.empty(1, device=stream.device).zero_()
    model.use_cuda_graphs = False
    model.cuda_graphs.clear()
    model.cuda_graph_pools.clear()
    import warnings  # here: a generated file's top-level imports are the seeds' four

    # torch's CUDA errors go on with advice on CUDA_LAUNCH_BLOCKING: their first line says what failed
    reason = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
    warnings.warn(
        f"{type(model).__name__}: capturing the forward as a CUDA graph failed ({reason}), so it launches its"
        " kernels directly from now on (set use_cuda_graphs = True to try again)",
        RuntimeWarning,
        stacklevel=4,
    )


def caller_holds(output):
    """Whether anything besides its graph entry holds a graph's output (the tensor handed out, a view of
    it): the entry's tensor, its base where it is a view (a final flatten keeps the kernel's output as its
    base) and the storage object asked for count as the entry's own."""
    own = 3 if output._base is not None else 2
    return torch._C._storage_Use_Count(output.untyped_storage()._cdata) > own


def replay_cuda_graph(model, x):
    """Runs model.run_kernels(x) as a CUDA graph captured for x's shape, dtype, device and mode. Graphs are
    captured again when a parameter or buffer is replaced, a parameter changes in place, or a module
    attribute named in model.captured_attrs changes. Up to model.direct_graphs graphs per shape read the
    caller's tensor where it lies, one per address and strides, so that a replay copies nothing in: a
    later input there has x's shape and layout, so the graph reads it as it is then. An input at another
    address shares graphs that copy it in. A call never overwrites a tensor that the caller still holds:
    it hands out the output of a graph whose last output the caller has let go (up to
    model.returned_outputs such graphs), or else a clone."""
    # The kernels read buffers where they lie, so in-place changes to them need no new capture. A
    # parameter changed in place (its _version) captures again: dot_weight's TF32 copies are made
    # then. Scalars such as BatchNorm's eps and momentum are constants of the graph.
    graphs = model.cuda_graphs.setdefault((x.shape, x.dtype, x.device, model.training), {})
    address = (x.data_ptr(), x.stride())  # None: the graphs that copy their input in
    if address not in graphs and sum(a is not None for a in graphs) >= model.direct_graphs:
        address = None
    entry = graphs.get(address)
    if entry is not None and not graph_inputs_unchanged(entry["inputs"]):
        # all graphs were captured with the same parameters and attributes: all are stale
        model.cuda_graphs.clear()
        model.cuda_graph_pools.clear()
        return replay_cuda_graph(model, x)
    if entry is None:
        entry = graphs[address] = graph_entry(model, x, copy_input=address is None)
    returned = next((r for r in entry["returned"] if not caller_holds(r[1])), None)
    if returned is None and len(entry["returned"]) < model.returned_outputs:
        returned = capture_cuda_graph(model, entry, x)
        if returned is None:
            return model.run_kernels(x)
        entry["returned"].append(returned)
    if returned is None and entry["cloned"] is None:
        entry["cloned"] = capture_cuda_graph(model, entry, x)
        if entry["cloned"] is None:
            return model.run_kernels(x)
    graph, out = returned or entry["cloned"]
    if entry["outside"]:
        model.run_first_kernel(x, out=entry["static_x"])
    elif entry["static_x"] is not None:
        entry["static_x"].copy_(x)
    graph.replay()
    # an alias, not `out` itself: the caller's hold on it must count in caller_holds
    return out.detach() if returned else out.clone()


def model_parameters(model):
    """tuple(model.parameters()), which a call with gradients hands TorchBackward as its inputs, cached
    with the parameter and module tables it was read from: read again when any entry of those was
    replaced, added or removed. The check costs a tenth of the walk (MobileNetV1: 10 us against 90 on a
    CPU), which took most of a grad-enabled call's host time."""
    cache = model.parameter_cache
    if cache is not None:
        tables, sizes, slots, params = cache
        if [len(table) for table in tables] == sizes and all(
            [table.get(name) is value for table, name, value in slots]
        ):
            return params
    tables = [table for module in model.modules() for table in (module._parameters, module._modules)]
    slots = [(table, name, value) for table in tables for name, value in table.items()]
    model.parameter_cache = (tables, [len(table) for table in tables], slots, tuple(model.parameters()))
    return model.parameter_cache[3]


# -- launch plans: without a CUDA graph, the forward's launches replayed without the wrappers' Python -----


def launch_forward(model, x):
    """The kernels of model's forward on x, with or without gradients: on the GPU a CUDA graph's replay
    where graphs are on (and the caller is not capturing one), else the launch plan."""
    if model.use_cuda_graphs and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        return replay_cuda_graph(model, x)
    return run_launch_plan(model, x)


def run_launch_plan(model, x):
    """model.run_kernels(x), where no CUDA graph runs it (use_cuda_graphs off, the gradient path), at a
    fraction of the host time: the second call with x's shape, strides, dtype, device, alignment and mode
    records what the forward did (record_launch_plan), and later calls replay that (replay_launch_plan).
    A plan goes stale when a CUDA graph would: a parameter, buffer or captured attribute replaced, or a
    parameter changed in place."""
    if not model.use_launch_plans or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return model.run_kernels(x)
    # the input's 16-byte alignment too: Triton specializes each pointer on it, and a plan keeps the
    # kernels compiled for one
    key = (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, model.training)
    plan = model.launch_plans.get(key)
    if plan is not None and not graph_inputs_unchanged(plan["inputs"]):
        model.launch_plans.clear()
        plan = None
    if plan is None:
        # the first call runs as it is: it compiles the kernels and fills the caches (dot_weight's
        # copies) that the recording then sees as constants
        model.launch_plans[key] = {"inputs": graph_inputs(model, model.captured_attrs), "steps": None}
        return model.run_kernels(x)
    if plan["steps"] is None:
        return record_launch_plan(model, x, plan)
    if plan["steps"] is False:
        return model.run_kernels(x)
    return replay_launch_plan(plan, x)


def record_launch_plan(model, x, plan):
    """Runs model.run_kernels(x) and records it into plan["steps"]: every torch op (through a
    TorchDispatchMode: tensor allocations, views, BatchNorm's num_batches_tracked.add_(1)) and every
    Triton launch (through each kernel's run, record_launches_of), in order, with the tensors they read
    or made as slots (slot 0: x) and every other tensor (parameters, buffers, cached weight copies) held
    as it is. A forward that reads a tensor's values on the host (.item()) or passes tensors in a list
    cannot be replayed, nor one whose launches the recording did not see: plan["steps"] becomes False
    and the model runs as it is."""
    # imported here: a generated file's top-level imports are the seeds' four
    from torch.utils._python_dispatch import TorchDispatchMode

    slots = {id(x): 0}
    # every slot's tensor, kept alive so that no id is reused while recording
    held = [x]
    steps, uses = [], []

    def add_step(kind, call, args, kwargs, outputs):
        args, kwargs = list(args), dict(kwargs)
        fills = [(i, slots[id(a)]) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and id(a) in slots]
        fills += [(k, slots[id(a)]) for k, a in kwargs.items() if isinstance(a, torch.Tensor) and id(a) in slots]
        for i, _ in fills:
            if isinstance(i, int):
                args[i] = None
            else:
                kwargs[i] = None
        nested = [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))]
        if any(isinstance(t, torch.Tensor) for a in nested for t in a):
            recorder.replayable = False
        outs = []
        for out in outputs:
            if id(out) not in slots:
                slots[id(out)] = len(held)
                held.append(out)
            outs.append(slots[id(out)])
        steps.append([kind, call, args, kwargs, fills, outs, []])
        uses.append([s for _, s in fills] + outs)

    class RecordOps(TorchDispatchMode):
        replayable = True
        launching = False  # the interpreter's own torch ops inside a launch are not the forward's

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.detach.default and id(args[0]) in slots:
                # the mode's own detach of each new tensor: the replay's tensor serves as it is
                slots[id(out)] = slots[id(args[0])]
                held.append(out)
            elif not self.launching:
                outputs = out if isinstance(out, (list, tuple)) else [out]
                if not all(isinstance(o, torch.Tensor) for o in outputs if o is not None):
                    self.replayable = False  # a value read on the host: the forward depends on it
                kind = "ops" if isinstance(out, (list, tuple)) else "op"
                add_step(kind, func, args, kwargs or {}, [o for o in outputs if o is not None])
            return out

        def record_launch(self, kernel, run, grid, args, kwargs):
            self.launching = True
            compiled = run(kernel, *args, grid=grid, warmup=False, **kwargs)
            self.launching = False
            if x.is_cuda and not triton.knobs.runtime.launch_enter_hook.calls:
                compiled = compiled.result() if hasattr(compiled, "result") else compiled
                device = triton.runtime.driver.active.get_current_device()
                bound = kernel.device_caches[device][4](*args, **kwargs)[0]
                launch = (compiled.run, (*grid, 1, 1)[:3], compiled.function, compiled.packed_metadata)
                add_step("launch", launch, bound.values(), {}, [])
            else:  # the interpreter, or a profiler's launch hooks: launched as the wrapper launched it
                add_step("call", kernel[grid], args, kwargs, [])
            return compiled

    for kernel in type(model).run_kernels.__globals__.values():
        if isinstance(kernel, triton.runtime.KernelInterface):
            record_launches_of(kernel)
    with RecordOps() as recorder:
        out = model.run_kernels(x)
    launched = any(step[0] in ("launch", "call") for step in steps)
    if not (recorder.replayable and launched) or id(out) not in slots:
        plan["steps"] = False
        return out
    last_use = {}
    for i, used in enumerate(uses):
        for s in used:
            last_use[s] = i
    for s, i in last_use.items():
        if s != slots[id(out)]:
            steps[i][6].append(s)  # dropped after its last step, as the forward drops it
    places, arena = arena_layout(steps, held, slots[id(out)])
    kept_steps, drops = [], []
    for step in steps:
        if step[0] == "op" and step[5] and step[5][0] in places:
            drops += step[6]  # the allocation goes: what it read last is dropped a step later
        else:
            step[6] += drops
            kept_steps.append(step)
            drops = []
    steps = kept_steps
    # on the GPU, where every launch goes to its launcher, pointers go as integers: the arena's, and
    # those of the tensors the plan holds (parameters, buffers, weight copies), which the launcher then
    # neither asks for nor checks with the driver
    pointers = x.is_cuda and not any(step[0] == "call" for step in steps)
    held_by_plan = []
    if pointers:
        for step in steps:
            if step[0] == "launch":
                held_by_plan += [a for a in step[2] if isinstance(a, torch.Tensor)]
                step[2] = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in step[2]]
    plan.update(steps=steps, slots=len(held), output=slots[id(out)], arena=(arena, places), pointers=pointers)
    plan["held"] = held_by_plan  # what the integer pointers point into
    return out


def arena_layout(steps, held, output):
    """Where the tensors that only launches touch go in one allocation per replay: ({slot: (byte offset,
    shape, strides, dtype)}, bytes in all). A tensor qualifies when an allocation op made it, no torch op
    reads it, it is not the output and nothing outside the forward kept it (its storage's only users are
    the recording's tensors). Two share bytes only where their lives, from the allocation to the last
    step that reads them, do not overlap. Offsets are multiples of 512 bytes, so every pointer keeps the
    16-byte alignment its kernel was compiled for."""
    allocations = (
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.empty_strided.default,
    )
    born, dies, read_by_ops, read_by_allocations = {}, {}, set(), {}
    for i, (kind, call, _, _, fills, outs, _) in enumerate(steps):
        if kind == "op" and call in allocations and outs:
            born.setdefault(outs[0], i)
            read_by_allocations[outs[0]] = [s for _, s in fills]  # empty_like(t) reads t's shape
        elif kind in ("op", "ops"):
            read_by_ops.update(s for _, s in fills)
        for _, s in fills:
            dies[s] = i
    sharing = {}  # storage address -> the recording's tensors on it
    for address in [t.untyped_storage().data_ptr() for t in held]:
        sharing[address] = sharing.get(address, 0) + 1
    import sys  # here: a generated file's top-level imports are the seeds' four

    # what holds a tensor of the recording: the list `held` and sys.getrefcount's argument, as for this one
    probe = [torch.empty(0)]
    candidates = set()
    for s in born:
        storage = held[s].untyped_storage()
        # the same tensor held elsewhere, or another tensor on its storage (the storage object asked for
        # holds one use too)
        kept_elsewhere = (
            sys.getrefcount(held[s]) > sys.getrefcount(probe[0])
            or torch._C._storage_Use_Count(storage._cdata) > sharing[storage.data_ptr()] + 1
        )
        if s != output and s not in read_by_ops and storage.nbytes() > 0 and not kept_elsewhere:
            candidates.add(s)
    # an allocation that stays (its tensor does not qualify) needs the tensors it reads as tensors
    while True:
        staying = {r for s, reads in read_by_allocations.items() if s not in candidates for r in reads}
        if not candidates & staying:
            break
        candidates -= staying
    lives = [
        (-(-held[s].untyped_storage().nbytes() // 512) * 512, born[s], dies.get(s, born[s]), s) for s in candidates
    ]
    placed, layout, size = [], {}, 0
    for need, first, last, s in sorted(lives, reverse=True):  # the largest first
        offset = 0
        for start, end in sorted((start, end) for start, end, b, d in placed if b <= last and first <= d):
            if offset + need <= start:
                break
            offset = max(offset, end)
        placed.append((offset, offset + need, first, last))
        t = held[s]
        layout[s] = (offset + t.storage_offset() * t.element_size(), t.shape, t.stride(), t.dtype)
        size = max(size, offset + need)
    return layout, size


def record_launches_of(kernel):
    """Routes kernel's launches, in a thread that records a plan (record_launch_plan's RecordOps is on
    its stack of dispatch modes, which is the thread's own), through the recorder; elsewhere kernel
    launches as before."""
    if getattr(kernel, "records_launches", False):
        return
    # imported here: a generated file's top-level imports are the seeds' four
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    run = type(kernel).run

    def recorded_run(*args, grid, warmup, **kwargs):
        recorders = [m.record_launch for m in _get_current_dispatch_mode_stack() if hasattr(m, "record_launch")]
        if not recorders or warmup:
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        return recorders[-1](kernel, run, grid, args, kwargs)

    kernel.run = recorded_run
    kernel.records_launches = True


def replay_launch_plan(plan, x):
    """Runs the steps that record_launch_plan recorded, with x in slot 0: one allocation for the arena's
    tensors (arena_layout), each torch op again (a fresh output per call, so that none is shared between
    calls), each launch straight through its compiled kernel's launcher on the current stream."""
    values = [None] * plan["slots"]
    values[0] = x
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None
    size, places = plan["arena"]
    if places:
        arena = torch.empty(size, dtype=torch.uint8, device=x.device)
        if plan["pointers"]:
            base = arena.data_ptr()
            for s, (offset, _, _, _) in places.items():
                values[s] = base + offset
        else:
            for s, (offset, shape, strides, dtype) in places.items():
                values[s] = arena[offset:].view(dtype).as_strided(shape, strides)
    for kind, call, args, kwargs, fills, outs, drops in plan["steps"]:
        if fills:
            args, kwargs = list(args), dict(kwargs)
            for i, s in fills:
                if isinstance(i, int):
                    args[i] = values[s]
                else:
                    kwargs[i] = values[s]
        if kind == "launch":
            run, grid, function, metadata = call
            run(*grid, stream, function, metadata, None, None, None, *args)
        elif kind == "call":
            call(*args, **kwargs)
        elif kind == "op":
            out = call(*args, **kwargs)
            if outs:
                values[outs[0]] = out
        else:  # "ops": a list or tuple of outputs
            out = call(*args, **kwargs)
            for s, o in zip(outs, [o for o in out if o is not None]):
                values[s] = o
        for s in drops:
            values[s] = None
    return values[plan["output"]]
