"""The op table: everything fusegen knows about an op lives in its one entry here.

An entry says which arguments the op takes, which nn.Module holds its parameters (so the generated
ModelNew has the reference's state_dict), how it transforms the shape flowing through a chain, its
torch reference, and how it lowers:

- an ANCHOR owns the kernel's loop nest and leaves the fp32 output tile in `acc`;
- an ELEMENTWISE op maps a tile in registers: after the anchor (epilogue, on `acc`) or before it
  (prologue, on each input tile as it is loaded);
- a VIEW only reshapes the kernel's output and moves no data.

Kernel code uses the names that fusegen.lower defines: `x_ptr`, `N, C_in, H, W` (input),
`C_out, OH, OW` (output), the tile `offs_m, offs_n, mask_m, mask_n, mask` and the output pixel of
each row `n, oh, ow`. The input is channels-last contiguous (`_x_at` addresses it), or any layout
for an anchor that reads it through its strides (`_x_strided_at`), and the channel counts C_in and
C_out are compile-time constants. An op's own kernel parameters are prefixed with its slot
(`bn_weight_ptr`, `conv_weight_ptr`), so two ops of one kind never clash.
"""

from __future__ import annotations

import math
import re
from functools import cache
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

Shape = tuple[int, ...]

# The precision of fp32_dot (fusegen/runtime.py) in a kernel whose output training-mode BatchNorm normalises,
# and in every kernel of a training-mode forward that has such BatchNorm: normalising by the batch's spread
# amplifies rounding upstream of it (docs/performance.md, "Precision and runtime choices"). Elsewhere the
# runtime's `dot_precision` decides in the wrapper. A KxK or transposed conv (an anchor that takes its
# weight's low part) reads its weight split in two on the host: "tf32x3_split" (runtime.tf32x3_split_dot).
STATS_DOT_PRECISION = "tf32x3"
STATS_SPLIT_DOT_PRECISION = "tf32x3_split"


# The blocks of a tile rule that does not name its own (`Anchor.tile_blocks`), and of every producer's.
TILE_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


class Role(Enum):
    ANCHOR = "anchor"
    ELEMENTWISE = "elementwise"
    VIEW = "view"
    # joins values along channels: the kernels that make them store into their slices of one buffer
    CONCAT = "concat"


class ShapeError(Exception):
    """An op cannot take the tensor flowing into it; check turns this into a SpecError."""


class ArgumentError(Exception):
    """No lowering takes an op's argument values (a grouped conv); check turns this into a SpecError."""


@dataclass(frozen=True)
class KernelParam:
    """A kernel parameter of an op and the wrapper expression that feeds it (`{m}` is the op's module)."""

    name: str  # without the slot prefix: "weight_ptr", "eps", "STRIDE"
    value: str
    constexpr: bool = False


@dataclass(frozen=True)
class PrologueHook:
    """What an anchor calls where it loads an input tile: hook(tile, channels, channel_mask, inside) -> lines
    that rewrite `tile` in place. `source(channels)` is the stored channel that each of the tile's channels
    reads: a channel map in the prologue (channel_shuffle) permutes them, so an anchor that takes one
    (`Anchor.maps_channels`) loads its tile there."""

    apply: Callable[[str, str, str, "str | None"], list[str]]
    source: Callable[[str], str] = lambda channels: channels

    def __call__(self, tile: str, channels: str, channel_mask: str, inside: "str | None") -> list[str]:
        return self.apply(tile, channels, channel_mask, inside)


def _no_lines(slot: str) -> list[str]:
    """Kernel lines for nothing (an anchor with nothing to add after its split K's sum)."""
    return []


@dataclass(frozen=True)
class Anchor:
    """How an anchor op lowers. The kernel's anchor names its constexpr params bare (KH); a producer's
    carry its slot (CONV_KH)."""

    params: tuple[KernelParam, ...]
    # wrapper expression of the output's channel count (from x's dims and `{m}`)
    out_channels: str
    # wrapper lines that set OH and OW for a 4-d output; none for a 2-d one
    out_pixels: tuple[str, ...]
    # kernel lines that leave the output tile in `acc`
    loop: Callable[[str, PrologueHook], list[str]]
    # why no later anchor can join this kernel (for the fusion-legality error)
    barrier: str
    # wrapper expression of the blocks named in tile_blocks, where the shape decides them together,
    # followed by the launch options named in tile_options (num_warps, num_stages), if any
    tile: str | None = None
    tile_blocks: tuple[str, ...] = TILE_BLOCKS
    tile_options: tuple[str, ...] = ()
    # A producer (depthwise conv): kernel lines that leave its output at the frame's pixels, channels
    # offs_k (mask_k), in the tile `a` [BLOCK_M, BLOCK_K], to run inside a consumer's K loop; and the
    # kernel's tile rule, as `tile` above (`{m}`: the producer), which replaces the consumer's.
    produce: Callable[[str, PrologueHook], list[str]] | None = None
    produce_tile: str | None = None
    produce_tile_options: tuple[str, ...] = ()
    # A consumer (1x1 conv): its loop with the input tile computed by a producer's lines instead of
    # loaded, so the producer's output never touches memory; `consume_refusal(args)` says why these
    # args cannot (None: they can).
    consume: Callable[[str, list[str]], list[str]] | None = None
    consume_refusal: Callable[[dict], "str | None"] = lambda args: None
    # wrapper lines that refuse, at run time, a module that consume_refusal would refuse
    consume_guard: tuple[str, ...] = ()
    # A tap producer (1x1 conv): kernel lines that leave its output at the input pixels (n, ih, iw) of a
    # depthwise consumer's tap (rows in the image: `in_image`), channels offs_n (mask_n), in the tile
    # `x_tap` [BLOCK_M, BLOCK_N]; `produce_tap_refusal(args)` says why these args cannot (None: they
    # can), and `produce_tap_guard` refuses such a module at run time.
    produce_tap: Callable[[str, PrologueHook], list[str]] | None = None
    produce_tap_refusal: Callable[[dict], "str | None"] = lambda args: None
    produce_tap_guard: tuple[str, ...] = ()
    # A tap consumer (depthwise conv): its loop with each tap's input tile computed by a tap producer's
    # lines instead of loaded, so the producer's output never touches memory; and the kernel's tile rule,
    # as `tile` above (`{m}`: the consumer), with the blocks TILE_BLOCKS.
    consume_taps: Callable[[str, list[str]], list[str]] | None = None
    consume_taps_tile: str | None = None
    consume_taps_tile_options: tuple[str, ...] = ()
    # the loop reads x through its four strides (`_x_strided_at`): the wrapper passes x in whatever
    # layout it comes, so the model's NCHW input reaches a first conv without a channels-last copy
    strided_input: bool = False
    # eval mode: its input may be stored in the model's narrower activation dtype (activations(float16))
    narrow_input: bool = True
    # A pool: how it ends the kernel of an anchor before it in the chain (None: it cannot)
    pool: "Pool | None" = None
    # An average pool right after it can run on its input instead (a 1x1 conv: W * mean(x) = mean(W * x) at
    # every pixel): kernel lines as `loop`, each input tile the mean of a pooling window's input tiles
    # (`height` x `width`, the pool's constexprs) at the frame's pooled pixels (n, ph, pw); and the tile rule
    # there, as `tile` above. None: a pool ends its kernel in the pooled frame (`lower._pooled`).
    pool_input: Callable[[str, PrologueHook, str, str], list[str]] | None = None
    pool_input_tile: str | None = None
    # Why no pool can end its kernel, whose frame makes the tile's rows the pixels of a pooling window, after
    # the anchor's name ("orders its tile's rows ..."); None: one can, as its loop reads the rows only
    # through n, oh, ow
    pool_refusal: str | None = None
    # The anchor orders the output grid's rows itself: kernel lines that set `offs_m`, the output row of each
    # of the tile's rows, from `rows_in_order` (the tile's consecutive places in that order), and whatever else
    # its loop reads of them. Empty: place r of the grid is output row r.
    row_order: tuple[str, ...] = ()
    # Its output channels are GROUPS groups (a GROUPS constexpr among its params), and each program's
    # channel block stays inside one group (`group` in the frame), whose input channels its loop reads.
    grouped: bool = False
    # Its loop loads each input tile at `prologue.source(channels)`, so a channel map may stand in its
    # prologue (channel_shuffle -> conv1x1: the shuffle costs no kernel and no pass over memory).
    maps_channels: bool = False
    # Split K, for launches whose output tiles alone would leave most SMs idle (a linear layer at batch 10,
    # a 3x3 conv on 7x7 pixels): kernel lines as `loop` that sum one slice of the `split_k_depth` products
    # that `loop` sums (a wrapper expression), K_SLICE of them from split * K_SLICE (`split`: program axis
    # 1), and leave out what follows the sum (`split_k_finish`: the bias). K_SLICE comes from the tile rule
    # where its blocks name it, else from runtime.k_slice. With more than one slice, a first kernel stores
    # each slice's sums and the kernel adds them in slice order, then runs split_k_finish on `acc`; with
    # one, it runs `loop`. None: the whole K loop in one kernel, always.
    split_k_loop: Callable[[str, PrologueHook], list[str]] | None = None
    split_k_finish: Callable[[str], list[str]] = _no_lines
    split_k_depth: str = "C_in"
    # the fewest input channels at which its tile rule can cut K in two: a kernel whose every launch reads
    # fewer (a stem) gets no slices kernel (plan: Kernel.splits_k)
    split_k_min_channels: int = 0
    # A pool whose every output sums a window of `window` input pixels (a global pool: H * W, the wrapper's
    # expression): kernel lines as `loop` that sum only this program's slice of the window, WINDOW_SLICE
    # pixels from split * WINDOW_SLICE (`split`: program axis 1), and leave the sum, not the mean, in `acc`.
    # Where the outputs alone would leave most of the GPU idle and nothing follows the anchor in its kernel,
    # several programs share each window (runtime.window_slice); window_slices_sum adds their sums.
    slice_loop: Callable[[str, PrologueHook], list[str]] | None = None
    window: str | None = None

    @property
    def out_rank(self) -> int:
        return 4 if self.out_pixels else 2


@dataclass(frozen=True)
class Pool:
    """A pool at the end of another anchor's kernel (conv1x1 -> bn -> relu -> avgpool(7)): the rows of the
    kernel's tile are the pixels of one pooling window (its stride is its size, no padding), which the
    anchor computes, the epilogue maps and the pool sums in registers; the kernel stores only the pooled
    pixels. `params` are the window's height and width (POOL_H, POOL_W in the kernel), from the anchor's
    output pixels OH and OW."""

    params: tuple[KernelParam, ...]


@dataclass(frozen=True)
class Helper:
    """A kernel and its wrapper that an op's lowering calls, emitted once per generated file."""

    kernel: str
    wrapper: str


@dataclass(frozen=True)
class Elementwise:
    params: tuple[KernelParam, ...]
    # apply(value, slot, channels, channel_mask) -> kernel lines that rewrite `value` in place
    apply: Callable[[str, str, str, str], list[str]]
    # The op normalises with batch statistics of its input: the producing kernel stores per-tile
    # statistics (`x_stats` in the consumer's wrapper) and `setup` turns them into the kernel's params.
    needs_batch_stats: bool = False
    setup: tuple[str, ...] = ()  # wrapper lines before the launch (`{m}` is the op's module)
    helper: Helper | None = None


@dataclass(frozen=True)
class ChannelMap:
    """A permutation of the channels (channel_shuffle), applied where a kernel addresses them: in a prologue
    the anchor loads output channel `ch` from input channel `source(ch, slot, count)`; in an epilogue the
    store writes input channel `ch` at output channel `target(ch, slot, count)` (`count`: the channels)."""

    params: tuple[KernelParam, ...]
    source: Callable[[str, str, str], str]
    target: Callable[[str, str, str], str]


@dataclass(frozen=True)
class View:
    # torch expression applied to the kernel's output in the wrapper
    expr: Callable[[str], str]


@dataclass(frozen=True)
class Op:
    name: str  # as written in a spec
    slot: str  # base name of its module / kernel parameters: "conv", "bn"
    role: Role
    args: tuple[str, ...]  # spec arguments, in order
    defaults: dict[str, object]
    # nn.Module constructor source from the args as Python source; None for an op with no module
    module: Callable[[dict[str, str]], str] | None
    # the kernel reads the module's attributes, so at the top level of forward the op needs a name
    needs_module: bool
    shape: Callable[[dict[str, object], Shape], Shape]
    # torch source of the op on `x`, given the source of its module (None where it has none): the
    # generated reference_forward, which backward differentiates
    reference: Callable[[str, "str | None"], str]
    # None where `specialize` gives the lowering
    lowering: Anchor | Elementwise | ChannelMap | View | None
    summary: str
    int_args: tuple[str, ...] = field(default=())
    # the module attribute holding the channel count the op takes (checks the model's input)
    channels_attr: str | None = None
    # module attributes that a captured CUDA graph holds as constants: a change must capture again
    captured_attrs: tuple[str, ...] = ()
    # source of a function that `reference` calls, emitted once per generated file
    reference_helper: str | None = None
    # how the op lowers in training mode, where that differs (BatchNorm: batch statistics)
    train_lowering: Elementwise | None = None
    # arguments that name values of the forward pass (add's other operand), not construction-time
    # values: the kernel reads them at the output tile's offsets, and its wrapper takes them where it
    # takes modules (`{m}` in a parameter's value is the tensor)
    tensor_args: tuple[str, ...] = ()
    # An op whose lowering depends on its argument values (conv: a depthwise, GEMM or implicit-GEMM
    # anchor): specialize(values, has_module) is the op for the values evaluated at build time, where
    # has_module says whether ModelNew holds its module (an unlabeled maxpool has none). Raises
    # ArgumentError where no lowering takes the values.
    specialize: Callable[[dict[str, object], bool], "Op"] | None = None
    # An op whose lowering depends on the rank of the tensor flowing in (softmax on a 2-d or a 4-d tensor):
    # for_rank(rank) is the op for that rank, once its shape rule took the tensor
    for_rank: Callable[[int], "Op"] | None = None

    def train_lowered(self) -> "Op":
        """The op as it lowers in training mode."""
        return replace(self, lowering=self.train_lowering) if self.train_lowering else self

    def with_stats_precision(self) -> "Op":
        """The op in a training-mode kernel of a net whose BatchNorm normalises by batch statistics: its
        tl.dot in STATS_SPLIT_DOT_PRECISION where the anchor takes its weight's low part, else in
        STATS_DOT_PRECISION."""
        lowering = self.lowering
        if not isinstance(lowering, Anchor) or all(p.name != "DOT_PRECISION" for p in lowering.params):
            return self
        takes_low_part = any(p.name == _DOT_WEIGHT_LOW.name for p in lowering.params)
        precise = _dot_precision(STATS_SPLIT_DOT_PRECISION if takes_low_part else STATS_DOT_PRECISION)
        params = tuple(precise if p.name == "DOT_PRECISION" else p for p in lowering.params)
        return replace(self, lowering=replace(lowering, params=params))


# -- shape rules -------------------------------------------------------------------------------------


def _rank(shape: Shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        dims = "NCHW" if rank == 4 else "NC"
        raise ShapeError(f"{what} takes a {rank}-d ({dims}) tensor, but gets shape {list(shape)}")


def _channels(shape: Shape, expected: object, what: str) -> None:
    if shape[1] != expected:
        raise ShapeError(f"{what} expects {expected} input channels, but the tensor flowing in has {shape[1]}")


def _conv_out(size: int, k: int, stride: int, pad: int, what: str) -> int:
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ShapeError(f"{what}: input of size {size} is smaller than the {k}x{k} window with padding {pad}")
    return out


def _conv_shape(k: int, channels_arg: str, out_arg: str | None, name: str):
    def rule(a: dict, shape: Shape) -> Shape:
        _rank(shape, 4, name)
        _channels(shape, a[channels_arg], name)
        out = a[out_arg] if out_arg else a[channels_arg]
        oh = _conv_out(shape[2], k, a["stride"], a["padding"], name)
        ow = _conv_out(shape[3], k, a["stride"], a["padding"], name)
        return (shape[0], out, oh, ow)

    return rule


# -- prologue plumbing shared by anchors ---------------------------------------------------------------


def _where_inside(hook_lines: list[str], tile: str, inside: str | None) -> list[str]:
    """After a prologue, padding must read as zero again (bn(0) is not 0)."""
    if hook_lines and inside is not None:
        return hook_lines + [f"{tile} = tl.where({inside}, {tile}, 0.0)"]
    return hook_lines


# -- anchors -----------------------------------------------------------------------------------------


def _x_at(n: str, ih: str, iw: str, ch: str) -> str:
    """Address of channel `ch` of input pixel (n, ih, iw). The wrapper hands the kernel a channels-last
    contiguous input and C_in is a compile-time constant, so Triton sees that a run of channels is
    contiguous and aligned, and loads it as vectors whatever C_in is (24 or 40 included)."""
    return f"x_ptr + (({n} * H + {ih}) * W + {iw}) * C_in + {ch}"


def _load_x(address: str, mask: str) -> str:
    """A tile of the input activation, in float32 whatever dtype it is stored in (a model's
    `activations(float16)`): every op computes in float32."""
    return f"tl.load({address}, mask={mask}, other=0.0).to(tl.float32)"


def _x_strided_at(n: str, ih: str, iw: str, ch: str) -> str:
    """Address of channel `ch` of input pixel (n, ih, iw) in any layout. Triton specialises a stride
    of 1, so a channels-last input still has its channel runs known to be contiguous."""
    return f"x_ptr + {n} * x_stride_n + {ch} * x_stride_c + {ih} * x_stride_h + {iw} * x_stride_w"


def _conv_loop(slot: str, prologue: PrologueHook, k_slice: bool = False) -> list[str]:
    """A KxK conv's implicit GEMM; with k_slice, over the program's slice of K only (split K)."""
    k_range = "split * K_SLICE, (split + 1) * K_SLICE" if k_slice else "0, KH * KW * C_in"
    return [
        "# implicit GEMM: K runs over (kh, kw, input channel), channels fastest (as a channels-last input lies)",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        f"for k0 in range({k_range}, BLOCK_K):",
        "    offs_k = k0 + tl.arange(0, BLOCK_K)",
        "    mask_k = offs_k < KH * KW * C_in",
        "    kh = offs_k // (KW * C_in)",
        "    kw = offs_k // C_in % KW",
        "    ci = offs_k % C_in",
        "    ih = oh[:, None] * STRIDE - PAD + kh[None, :]",
        "    iw = ow[:, None] * STRIDE - PAD + kw[None, :]",
        "    inside = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        f"    a = {_load_x(_x_strided_at('n[:, None]', 'ih', 'iw', 'ci[None, :]'), 'inside')}",
        *("    " + line for line in _where_inside(prologue("a", "ci", "mask_k", "inside"), "a", "inside")),
        # dot_weight's (out, kh, kw, in) order is the K loop's: a K step's weights are a run of offs_k
        *(
            "    " + line
            for line in _weight_dot(
                slot, "offs_n[None, :] * (KH * KW * C_in) + offs_k[:, None]", "mask_k[:, None] & mask_n[None, :]"
            )
        ),
    ]


def _weight_dot(slot: str, offsets: str, mask: str) -> list[str]:
    """A KxK or transposed conv's K step: its weight tile (channels offs_n, at `offsets` into the weight)
    times the input tile `a`, into acc; for "tf32x3_split" with the weight's low part
    (runtime.dot_weight_low, in the same order) as well."""
    return [
        f"b = tl.load({slot}_weight_ptr + {offsets}, mask={mask}, other=0.0)",
        'if DOT_PRECISION == "tf32x3_split":',
        f"    b_low = tl.load({slot}_weight_low_ptr + {offsets}, mask={mask}, other=0.0)",
        "    acc = tf32x3_split_dot(a, b, b_low, acc)",
        "else:",
        "    acc = fp32_dot(a, b, acc, DOT_PRECISION)",
    ]


def _loaded_tap(prologue: PrologueHook, channels: str, channel_mask: str) -> list[str]:
    """A depthwise tap's input tile `x_tap`, loaded at the tap's input pixels for `channels`, the prologue
    applied, zero in the padding."""
    return [
        f"x_tap = {_load_x(_x_at('n[:, None]', 'ih[:, None]', 'iw[:, None]', f'{channels}[None, :]'), 'inside')}",
        *_where_inside(prologue("x_tap", channels, channel_mask, "inside"), "x_tap", "inside"),
    ]


def _depthwise(slot: str, out: str, channels: str, channel_mask: str, block: str, tap: list[str]) -> list[str]:
    """Each output channel convolves its own input channel: the tile `out` [BLOCK_M, block] at the
    frame's pixels, for `channels`. `tap` are the lines that leave each tap's input tile in `x_tap`
    (`_loaded_tap`, or a tap producer's)."""
    return [
        f"{out} = tl.zeros((BLOCK_M, {block}), dtype=tl.float32)",
        # a loop over kernel rows, not unrolled: unrolled, the loads of all KH * KW taps were hoisted
        # together (160 registers a thread); float16 activations, batch 128, H200, summed over 10 layers'
        # kernels at their tiles: 0.892 -> 0.840 ms (scripts/tune_tiles.py --dw --fp16 [--dw-unrolled])
        "for kh in range(KH):",
        "    for kw in tl.static_range(KW):",
        "        ih = oh * STRIDE - PAD + kh",
        "        iw = ow * STRIDE - PAD + kw",
        "        in_image = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        f"        inside = in_image[:, None] & {channel_mask}[None, :]",
        *("        " + line for line in tap),
        f"        w = tl.load({slot}_weight_ptr + {channels} * {slot}_weight_stride_o + kh * {slot}_weight_stride_h"
        f" + kw * {slot}_weight_stride_w, mask={channel_mask}, other=0.0)",
        f"        {out} += x_tap * w[None, :]",
    ]


def _dwconv_loop(slot: str, prologue: PrologueHook) -> list[str]:
    return _depthwise(slot, "acc", "offs_n", "mask_n", "BLOCK_N", _loaded_tap(prologue, "offs_n", "mask_n"))


def _dwconv_produce(slot: str, prologue: PrologueHook) -> list[str]:
    return _depthwise(slot, "a", "offs_k", "mask_k", "BLOCK_K", _loaded_tap(prologue, "offs_k", "mask_k"))


def _dwconv_consume_taps(slot: str, produced: list[str]) -> list[str]:
    # the padding is zero in the depthwise conv's input, not the producer's output there
    return _depthwise(slot, "acc", "offs_n", "mask_n", "BLOCK_N", [*produced, "x_tap = tl.where(inside, x_tap, 0.0)"])


def _gemm(slot: str, a_tile: list[str], out: str = "acc", k_slice: bool = False) -> list[str]:
    """out[pixel, channel] = sum over input channels k of a[pixel, k] * w[channel, k], where `a_tile` are
    the lines that leave the input tile of channels offs_k in `a`; with k_slice, k only in the
    program's slice (split K)."""
    k_range = "split * K_SLICE, (split + 1) * K_SLICE" if k_slice else "0, C_in"
    return [
        f"{out} = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        f"for k0 in range({k_range}, BLOCK_K):",
        "    offs_k = k0 + tl.arange(0, BLOCK_K)",
        "    mask_k = offs_k < C_in",
        *("    " + line for line in a_tile),
        f"    b = tl.load({slot}_weight_ptr + offs_n[None, :] * C_in + offs_k[:, None],"
        " mask=mask_k[:, None] & mask_n[None, :], other=0.0)",
        f"    {out} = fp32_dot(a, b, {out}, DOT_PRECISION)",
    ]


def _add_bias(slot: str, tile: str = "acc", channels: str = "offs_n", channel_mask: str = "mask_n") -> list[str]:
    return [f"{tile} += tl.load({slot}_bias_ptr + {channels}, mask={channel_mask}, other=0.0)[None, :]"]


def _then_bias(lines: Callable, bias: bool, tile: str = "acc", channels: str = "offs_n", channel_mask: str = "mask_n"):
    """A conv's kernel lines (loop, producer or consumer: (slot, hook or produced lines, ...) -> lines) and, with
    `bias`, the bias added to the fp32 tile that they leave (`tile`, for `channels`) after its sum."""
    if not bias:
        return lines

    def with_bias(slot: str, *args) -> list[str]:
        return [*lines(slot, *args), *_add_bias(slot, tile, channels, channel_mask)]

    return with_bias


def _gemm_loop(row: str, k_slice: bool = False):
    """1x1 conv and linear: `row` is the input row (pixel) that each output row reads, and the A
    operand is rows of C_in floats; with k_slice, the channels of the program's slice of K."""

    def loop(slot: str, prologue: PrologueHook) -> list[str]:
        channels = prologue.source("offs_k")
        a_tile = [
            f"a = {_load_x(f'x_ptr + x_row[:, None] * C_in + {channels}[None, :]', 'mask_m[:, None] & mask_k[None, :]')}",
            # masked lanes meet zero weights, so the prologue needs no re-masking here
            *prologue("a", "offs_k", "mask_k", None),
        ]
        return [f"x_row = {row}", *_gemm(slot, a_tile, k_slice=k_slice)]

    return loop


def _gemm_pool_input_loop(slot: str, prologue: PrologueHook, height: str, width: str) -> list[str]:
    """A 1x1 conv (stride STRIDE) that an average pool follows, as the pool of its input and then the GEMM:
    each A tile is the mean of the window's input tiles, the prologue applied to each (it may not be linear),
    so the GEMM has the pooled pixels' rows only."""
    channels = prologue.source("offs_k")
    tap = [
        f"x_row = (n * H + (ph * {height} + i) * STRIDE) * W + (pw * {width} + j) * STRIDE",
        f"a_tap = {_load_x(f'x_ptr + x_row[:, None] * C_in + {channels}[None, :]', 'mask_m[:, None] & mask_k[None, :]')}",
        # masked lanes meet zero weights, so the prologue needs no re-masking here
        *prologue("a_tap", "offs_k", "mask_k", None),
        "a += a_tap",
    ]
    a_tile = [
        "# pool: the mean of the window's input tiles (a 1x1 conv commutes with an average pool)",
        "a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)",
        f"for i in range({height}):",
        f"    for j in range({width}):",
        *("        " + line for line in tap),
        f"a = a / ({height} * {width})",
    ]
    return _gemm(slot, a_tile)


def _grouped_gemm_loop(slot: str, prologue: PrologueHook) -> list[str]:
    """A grouped 1x1 conv: the program's output channels lie in one group (the frame's `group`), so its
    GEMM runs over that group's C_in // GROUPS input channels, and the weight's rows are that long."""
    channels = prologue.source("offs_k")
    return [
        "x_row = (n * H + oh * STRIDE) * W + ow * STRIDE",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "for k0 in range(0, C_in // GROUPS, BLOCK_K):",
        "    offs_group_k = k0 + tl.arange(0, BLOCK_K)",
        "    mask_k = offs_group_k < C_in // GROUPS",
        "    offs_k = group * (C_in // GROUPS) + offs_group_k",
        f"    a = {_load_x(f'x_ptr + x_row[:, None] * C_in + {channels}[None, :]', 'mask_m[:, None] & mask_k[None, :]')}",
        # masked lanes meet zero weights, so the prologue needs no re-masking here
        *("    " + line for line in prologue("a", "offs_k", "mask_k", None)),
        f"    b = tl.load({slot}_weight_ptr + offs_n[None, :] * (C_in // GROUPS) + offs_group_k[:, None],"
        " mask=mask_k[:, None] & mask_n[None, :], other=0.0)",
        "    acc = fp32_dot(a, b, acc, DOT_PRECISION)",
    ]


def _gemm_at_tap(slot: str, prologue: PrologueHook) -> list[str]:
    """A stride-1 1x1 conv at a depthwise consumer's tap: its GEMM over the input channels at the tap's
    input pixels, for the consumer's channels offs_n, in `x_tap`. Pixels outside the image load zeros,
    and the consumer zeroes their rows after the producer's elementwise ops."""
    a_tile = [
        f"a = {_load_x(_x_at('n[:, None]', 'ih[:, None]', 'iw[:, None]', 'offs_k[None, :]'), 'in_image[:, None] & mask_k[None, :]')}",
        # masked lanes meet zero weights, so the prologue needs no re-masking here
        *prologue("a", "offs_k", "mask_k", None),
    ]
    return _gemm(slot, a_tile, out="x_tap")


def _gemm_consume(slot: str, produced: list[str]) -> list[str]:
    """A stride-1 1x1 conv whose input tile a producer computes: channels beyond C_in meet zero weights."""
    return _gemm(slot, produced)


def _stride_one(args: dict) -> str | None:
    return None if args["stride"] == 1 else f"with stride {args['stride']} its input pixels are not its output pixels"


# The first lines of a pool whose programs share each window (program axis 1: runtime.window_slice), in
# the pooled frame (lower._pooled) or a pool anchor's own loop (Anchor.slice_loop)
WINDOW_SLICE_LINES = [
    "# this program's slice of the window (program axis 1): WINDOW_SLICE pixels from split * WINDOW_SLICE",
    "split = tl.program_id(1)",
]


def _pool_loop(window: str, pixels: str, divisor: str | None):
    """Average pools: the tile gains a pixel axis, [BLOCK_M rows, BLOCK_P pixels, BLOCK_N channels],
    summed over the pixels, so a few output rows still keep every lane busy (at batch 10 a global
    pool has 10 rows). `window` gives the input row and column of window pixel `p`. A divisor of None:
    the loop sums this program's slice of the window (Anchor.slice_loop) and leaves the sum."""
    first, end = (
        ("0", pixels) if divisor else ("split * WINDOW_SLICE", f"tl.minimum((split + 1) * WINDOW_SLICE, {pixels})")
    )

    def loop(slot: str, prologue: PrologueHook) -> list[str]:
        return [
            "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
            *([] if divisor else WINDOW_SLICE_LINES),
            f"for p0 in range({first}, {end}, BLOCK_P):",
            "    p = p0 + tl.arange(0, BLOCK_P)",
            *(f"    {line}" for line in window.split("\n")),
            f"    inside = mask_m[:, None, None] & (p < {pixels})[None, :, None] & mask_n[None, None, :]",
            f"    a = {_load_x(_x_at('n[:, None, None]', 'ih', 'iw', 'offs_n[None, None, :]'), 'inside')}",
            *("    " + line for line in _where_inside(prologue("a", "offs_n", "mask_n", "inside"), "a", "inside")),
            "    acc += tl.sum(a, axis=1)",
            *([f"acc = acc / ({divisor})"] if divisor else []),
        ]

    return loop


_WINDOW_PIXEL = (
    "ih = (oh[:, None] * KH + p[None, :] // KW)[:, :, None]\niw = (ow[:, None] * KW + p[None, :] % KW)[:, :, None]"
)
_ANY_PIXEL = "ih = (p // W)[None, :, None]\niw = (p % W)[None, :, None]"
# Few output rows (pools end a net): a short row block, and the pixels fill the tile instead.
_POOL_BLOCKS = (
    KernelParam("BLOCK_M", "min(16, next_power_of_2(N * OH * OW))", constexpr=True),
    KernelParam("BLOCK_N", "16", constexpr=True),
    KernelParam("BLOCK_P", "32", constexpr=True),
)


def _pool_window(height: str, width: str) -> tuple[KernelParam, ...]:
    """A pool's window when it ends another anchor's kernel (Pool): constexprs, so that splitting a row
    of the window into its pixel's row and column is cheap."""
    return (KernelParam("H", height, constexpr=True), KernelParam("W", width, constexpr=True))


def _maxpool_loop(slot: str, prologue: PrologueHook) -> list[str]:
    """Max over each KH x KW window, padding read as -inf (as torch pads it), a tap at a time."""
    address = _x_at("n[:, None]", "ih[:, None]", "iw[:, None]", "offs_n[None, :]")
    lines = [
        'acc = tl.full((BLOCK_M, BLOCK_N), float("-inf"), dtype=tl.float32)',
        "for kh in range(KH):",
        "    for kw in tl.static_range(KW):",
        "        ih = oh * STRIDE - PAD + kh",
        "        iw = ow * STRIDE - PAD + kw",
        "        in_image = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        "        inside = in_image[:, None] & mask_n[None, :]",
    ]
    hook = prologue("x_tap", "offs_n", "mask_n", "inside")
    if hook:  # the prologue maps finite values (padding 0), then the padding is -inf
        lines += [f"        x_tap = {_load_x(address, 'inside')}", *("        " + line for line in hook)]
        lines.append('        x_tap = tl.where(inside, x_tap, float("-inf"))')
    else:
        lines.append(f'        x_tap = tl.load({address}, mask=inside, other=float("-inf")).to(tl.float32)')
    # NaN wins, as in torch
    return lines + ["        acc = tl.maximum(acc, x_tap, propagate_nan=tl.PropagateNan.ALL)"]


def _load_loop(slot: str, prologue: PrologueHook) -> list[str]:
    """The anchor of a chain of elementwise ops only: the input tile itself (output row = input row)."""
    channels = prologue.source("offs_n")
    return [
        f"acc = {_load_x(f'x_ptr + offs_m[:, None] * C_in + {channels}[None, :]', 'mask')}",
        *prologue("acc", "offs_n", "mask_n", None),
    ]


def _weight(dims: str) -> tuple[KernelParam, ...]:
    """The module's weight pointer and its strides: a module moved to channels_last has non-contiguous
    weights."""
    names = {"o": 0, "i": 1, "h": 2, "w": 3}
    return (KernelParam("weight_ptr", "{m}.weight"),) + tuple(
        KernelParam(f"weight_stride_{d}", f"{{m}}.weight.stride({names[d]})") for d in dims
    )


_DOT_WEIGHT = "dot_weight({m}, DOT_PRECISION)"
# a KxK or transposed conv's weight less its TF32 rounding, for "tf32x3_split" dots (unread at other precisions)
_DOT_WEIGHT_LOW = KernelParam("weight_low_ptr", "dot_weight_low({m}, DOT_PRECISION)")
# A GEMM's weight as a contiguous [out, in] matrix (a 1x1 weight moved to channels_last already is one):
# with the row length C_in a constant, its tiles load as vectors whatever C_in is.
_GEMM_WEIGHT = KernelParam("weight_ptr", _DOT_WEIGHT + ".contiguous()")


def _dot_precision(precision: str) -> KernelParam:
    return KernelParam("DOT_PRECISION", f'"{precision}" if x.is_cuda else "ieee"', constexpr=True)


# a conv's or linear layer's precision, as the runtime's dot_precision chooses it at each launch
_DOT_PRECISION = KernelParam("DOT_PRECISION", "dot_precision(x, {m})", constexpr=True)
_WINDOW = (
    KernelParam("KH", "{m}.kernel_size[0]", constexpr=True),
    KernelParam("KW", "{m}.kernel_size[1]", constexpr=True),
    KernelParam("STRIDE", "{m}.stride[0]", constexpr=True),
    KernelParam("PAD", "{m}.padding[0]", constexpr=True),
)
_CONV_PARAMS = (KernelParam("weight_ptr", _DOT_WEIGHT), _DOT_WEIGHT_LOW, *_WINDOW, _DOT_PRECISION)
_DWCONV_PARAMS = (*_weight("ohw"), *_WINDOW)  # fp32 multiply-adds, no tl.dot
_CONV_PIXELS = (
    "OH = (H + 2 * {m}.padding[0] - {m}.kernel_size[0]) // {m}.stride[0] + 1",
    "OW = (W + 2 * {m}.padding[1] - {m}.kernel_size[1]) // {m}.stride[1] + 1",
)
_NEIGHBOURHOOD = (
    "it reads a {k}x{k} neighbourhood of its input, and those pixels are computed by other programs of this kernel"
)


_BIAS = KernelParam("bias_ptr", "{m}.bias")


def _bias_words(bias: bool) -> str:
    return "with bias" if bias else "no bias"


def _conv_slice_loop(slot: str, prologue: PrologueHook) -> list[str]:
    return _conv_loop(slot, prologue, k_slice=True)


def _conv_anchor(k: int, bias: bool, guard: tuple[str, ...] = ()) -> Anchor:
    """A KxK conv's implicit GEMM; `guard`: wrapper lines that refuse a module it cannot compute."""
    return Anchor(
        (*_CONV_PARAMS, _BIAS) if bias else _CONV_PARAMS,
        "{m}.out_channels",
        (*guard, *_CONV_PIXELS),
        _then_bias(_conv_loop, bias),
        _NEIGHBOURHOOD.format(k=k),
        tile="conv_tile(N * OH * OW, KH * KW * C_in, C_out, DOT_PRECISION)",
        tile_options=("num_warps", "num_stages"),
        # its K loop gathers single channels of KH x KW pixels whatever the layout: reading the model's
        # NCHW input as it is saves the stem a layout copy
        strided_input=True,
        # DenseNet's 3x3 convs to 32 channels on 7x7 pixels at batch 10: 8 tiles of K up to 17,000
        split_k_loop=_conv_slice_loop,
        split_k_finish=_add_bias if bias else _no_lines,
        split_k_depth="KH * KW * C_in",
        # runtime.k_slice cuts K in two from 16 steps, and conv_tile's steps are 32 deep: more than 480
        # products (a stem's K never splits)
        split_k_min_channels=15 * 32 // (k * k) + 1,
    )


def _dwconv_anchor(k: int, bias: bool, guard: tuple[str, ...] = ()) -> Anchor:
    """A depthwise conv; `guard`: wrapper lines that refuse a module it cannot compute."""
    return Anchor(
        (*_DWCONV_PARAMS, _BIAS) if bias else _DWCONV_PARAMS,
        "{m}.out_channels",
        (*guard, *_CONV_PIXELS),
        _then_bias(_dwconv_loop, bias),
        _NEIGHBOURHOOD.format(k=k),
        tile="dwconv_tile(C_in, x.dtype)",
        tile_blocks=("BLOCK_M", "BLOCK_N"),
        tile_options=("num_warps",),
        produce=_then_bias(_dwconv_produce, bias, "a", "offs_k", "mask_k"),
        produce_tile="producer_tile(C_in, C_out, {m}.kernel_size[0] * {m}.kernel_size[1], x.dtype)",
        # Triton would pipeline the taps of a K step through shared memory as deep as its default
        # (a dwconv5x5 producer asked for 438 KB): the rule says how many stages fit
        produce_tile_options=("num_warps", "num_stages"),
        consume_taps=_then_bias(_dwconv_consume_taps, bias),
        consume_taps_tile="tap_producer_tile(C_in)",
        consume_taps_tile_options=("num_warps",),
    )


def _gemm_anchor(bias: bool, guard: tuple[str, ...] = ()) -> Anchor:
    """A 1x1 conv's GEMM; `guard`: wrapper lines that refuse a module it cannot compute (in each of its
    kernels: alone, as a consumer, as a tap producer)."""
    stride = KernelParam("STRIDE", "{m}.stride[0]", constexpr=True)
    return Anchor(
        (_GEMM_WEIGHT, _BIAS, stride, _DOT_PRECISION) if bias else (_GEMM_WEIGHT, stride, _DOT_PRECISION),
        "{m}.out_channels",
        (*guard, "OH = (H - 1) // {m}.stride[0] + 1", "OW = (W - 1) // {m}.stride[1] + 1"),
        _then_bias(_gemm_loop("(n * H + oh * STRIDE) * W + ow * STRIDE"), bias),
        "each of its outputs reads every input channel of a pixel, but a program of this kernel holds only BLOCK_N of them",
        tile="gemm_tile(N * OH * OW, C_in, C_out, DOT_PRECISION)",
        consume=_then_bias(_gemm_consume, bias),
        consume_refusal=_stride_one,
        consume_guard=(
            "if {m}.stride != (1, 1):",
            '    raise ValueError(f"conv1x1 computes the depthwise conv before it at its own pixels, so it needs stride 1, not {{{m}.stride}}")',
            *guard,
        ),
        produce_tap=_then_bias(_gemm_at_tap, bias, "x_tap"),
        produce_tap_refusal=_stride_one,
        produce_tap_guard=(
            "if {m}.stride != (1, 1):",
            '    raise ValueError(f"the depthwise conv computes conv1x1 at the pixels of its taps, so conv1x1 needs stride 1, not {{{m}.stride}}")',
            *guard,
        ),
        maps_channels=True,
        pool_input=_then_bias(_gemm_pool_input_loop, bias),
        pool_input_tile="gemm_tile(N * PH * PW, C_in, C_out, DOT_PRECISION)",
    )


def _grouped_gemm_anchor(bias: bool, guard: tuple[str, ...]) -> Anchor:
    """A grouped 1x1 conv: one kernel for every group, a program's channel block inside one group (its GEMM
    reads that group's input channels). Any groups value, 1 and depthwise included, computes right."""
    params = (
        _GEMM_WEIGHT,
        KernelParam("STRIDE", "{m}.stride[0]", constexpr=True),
        KernelParam("GROUPS", "{m}.groups", constexpr=True),
        _DOT_PRECISION,
    )
    return Anchor(
        (*params, _BIAS) if bias else params,
        "{m}.out_channels",
        (*guard, "OH = (H - 1) // {m}.stride[0] + 1", "OW = (W - 1) // {m}.stride[1] + 1"),
        _then_bias(_grouped_gemm_loop, bias),
        "each of its outputs reads every input channel of its group at a pixel, but a program of this kernel"
        " holds only BLOCK_N of them",
        # a GEMM per group: the tile rule sees one group's channels
        tile="gemm_tile(N * OH * OW, C_in // GROUPS, C_out // GROUPS, DOT_PRECISION)",
        grouped=True,
        maps_channels=True,
    )


def _conv_op(k: int) -> Op:
    name = f"conv{k}x{k}"
    return Op(
        name=name,
        slot="conv",
        role=Role.ANCHOR,
        args=("in_channels", "out_channels", "stride", "padding"),
        defaults={"stride": 1, "padding": k // 2},
        int_args=("in_channels", "out_channels", "stride", "padding"),
        module=lambda a: f"nn.Conv2d({a['in_channels']}, {a['out_channels']}, {k}, {a['stride']}, {a['padding']}, bias=False)",
        needs_module=True,
        channels_attr="in_channels",
        shape=_conv_shape(k, "in_channels", "out_channels", name),
        reference=lambda x, m: f"{m}({x})",
        lowering=_conv_anchor(k, bias=False),
        summary=f"{k}x{k} convolution, groups=1, no bias (implicit GEMM on tl.dot)",
    )


def _dwconv_op(k: int) -> Op:
    name = f"dwconv{k}x{k}"
    return Op(
        name=name,
        slot="conv",
        role=Role.ANCHOR,
        args=("channels", "stride", "padding"),
        defaults={"stride": 1, "padding": k // 2},
        int_args=("channels", "stride", "padding"),
        module=lambda a: (
            f"nn.Conv2d({a['channels']}, {a['channels']}, {k}, {a['stride']}, {a['padding']},"
            f" groups={a['channels']}, bias=False)"
        ),
        needs_module=True,
        channels_attr="in_channels",
        shape=_conv_shape(k, "channels", None, name),
        reference=lambda x, m: f"{m}({x})",
        lowering=_dwconv_anchor(k, bias=False),
        summary=f"depthwise {k}x{k} convolution (groups = channels), no bias",
    )


# -- the generic conv: nn.Conv2d's arguments, lowered to the anchor that its values call for ------------

CONV_DEFAULTS = {"stride": 1, "padding": 0, "groups": 1, "bias": True}


def _conv2d_module(a: dict[str, str]) -> str:
    extra = "".join(f", {key}={a[key]}" for key in ("groups", "bias") if a[key] != repr(CONV_DEFAULTS[key]))
    positional = ", ".join(a[key] for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding"))
    return f"nn.Conv2d({positional}{extra})"


def _conv2d_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "conv")
    _channels(shape, a["in_channels"], "conv")
    k, stride, padding = a["kernel_size"], a["stride"], a["padding"]
    if a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]:
        raise ShapeError(
            f"conv: groups={a['groups']} must divide in_channels ({a['in_channels']}) and out_channels ({a['out_channels']})"
        )
    oh, ow = (_conv_out(size, k, stride, padding, "conv") for size in shape[2:])
    return (shape[0], a["out_channels"], oh, ow)


def _conv2d_guard(name: str, condition: str, needs: str, bias: bool) -> tuple[str, ...]:
    """Wrapper lines that refuse a conv module that `name` cannot compute: one built with other constructor
    arguments than the spec was checked at, which would call for another anchor."""
    message = (
        f"conv lowers to {name} (as built from the spec), which needs {needs} and {'a' if bias else 'no'} bias,"
        " not kernel_size {{{m}.kernel_size}}, padding {{{m}.padding}}, groups {{{m}.groups}}"
        " and bias {{{m}.bias is not None}}"
    )
    has_bias = "{m}.bias is not None" if bias else "{m}.bias is None"
    return (f"if not ({condition} and {has_bias}):", f'    raise ValueError(f"{message}")')


def _conv2d_specialize(a: dict, has_module: bool) -> Op:
    """The generic conv as the anchor its values call for: depthwise where groups = in_channels =
    out_channels > 1, a grouped GEMM for another grouped 1x1 conv without padding, the GEMM for a 1x1 conv
    without padding, else the implicit GEMM (groups 1 is a dense conv, also with one channel). Grouped
    KxK convs are refused (no anchor yet)."""
    k, groups, bias = a["kernel_size"], a["groups"], a["bias"]
    if not isinstance(bias, bool):
        raise ArgumentError(f"conv: bias must be True or False, got {bias!r}")
    suffix = "_bias" if bias else ""
    if groups == a["in_channels"] == a["out_channels"] > 1:
        name = f"dwconv{k}x{k}{suffix}"
        condition = "{m}.groups == {m}.in_channels == {m}.out_channels"
        guard = _conv2d_guard(name, condition, "groups = in_channels = out_channels", bias)
        lowering = _dwconv_anchor(k, bias, guard)
        summary = f"depthwise {k}x{k} convolution (groups = channels), {_bias_words(bias)}"
    elif groups != 1 and k == 1 and a["padding"] == 0:
        name = f"conv1x1_grouped{suffix}"
        condition = "{m}.kernel_size == (1, 1) and {m}.padding == (0, 0)"
        guard = _conv2d_guard(name, condition, "kernel_size 1 and padding 0", bias)
        lowering = _grouped_gemm_anchor(bias, guard)
        summary = f"grouped 1x1 convolution, {_bias_words(bias)}, a GEMM per group on tl.dot in one kernel"
    elif groups != 1:
        raise ArgumentError(
            f"conv with groups={groups} and kernel_size {k} ({a['in_channels']} -> {a['out_channels']} channels) is a"
            " grouped KxK convolution, which fusegen cannot lower yet; it takes groups=1, groups = in_channels ="
            " out_channels (depthwise), or a grouped 1x1 conv without padding"
        )
    elif k == 1 and a["padding"] == 0:
        name = f"conv1x1{suffix}"
        condition = "{m}.kernel_size == (1, 1) and {m}.padding == (0, 0) and {m}.groups == 1"
        guard = _conv2d_guard(name, condition, "kernel_size 1, padding 0, groups 1", bias)
        lowering = _gemm_anchor(bias, guard)
        summary = f"1x1 convolution, {_bias_words(bias)}, as a GEMM over pixels x channels on tl.dot"
    else:
        # a padded 1x1 conv is an implicit GEMM too, and must not share the GEMM's kernel name
        name = f"conv{k}x{k}{'_padded' if k == 1 else ''}{suffix}"
        guard = _conv2d_guard(name, "{m}.groups == 1", "groups 1", bias)
        lowering = _conv_anchor(k, bias, guard)
        summary = f"{k}x{k} convolution, groups=1, {_bias_words(bias)} (implicit GEMM on tl.dot)"
    return replace(FIXED_OPS["conv"], name=name, lowering=lowering, summary=summary, specialize=None)


# -- maxpool: a window from its module, or fixed at build time where it has none ------------------------


def _maxpool_window(a: dict) -> tuple[int, int, int]:
    """(kernel size, stride, padding): stride None is the kernel size, as in nn.MaxPool2d."""
    k = a["kernel_size"]
    return k, k if a["stride"] is None else a["stride"], a["padding"]


def _maxpool_module(a: dict[str, str]) -> str:
    defaults = (("stride", "None"), ("padding", "0"), ("ceil_mode", "False"))
    extra = "".join(f", {key}={a[key]}" for key, default in defaults if a[key] != default)
    return f"nn.MaxPool2d({a['kernel_size']}{extra})"


def _pool_out(size: int, k: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """nn.MaxPool2d's output size: with ceil_mode a last window that starts inside the input (or its left
    padding) and runs past its end counts too."""
    out = _conv_out(size, k, stride, padding, "maxpool")
    if ceil_mode and (size + 2 * padding - k) % stride and out * stride < size + padding:
        out += 1
    return out


def _maxpool_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "maxpool")
    k, stride, padding = _maxpool_window(a)
    oh, ow = (_pool_out(size, k, stride, padding, a["ceil_mode"] is True) for size in shape[2:])
    return (shape[0], shape[1], oh, ow)


def _maxpool_anchor(k: str, stride: str, padding: str, ceil_mode: bool) -> Anchor:
    """Max over windows of k x k pixels, `stride` apart, `padding` around (wrapper expressions); with
    ceil_mode a last window that runs past the input's end (its pixels there are masked as padding is)."""
    pixels = tuple(f"O{d} = ({d} + 2 * {padding} - {k}) // {stride} + 1" for d in "HW")
    if ceil_mode:
        pixels = tuple(
            line
            for d in "HW"
            for line in (
                f"O{d} = ({d} + 2 * {padding} - {k} + {stride} - 1) // {stride} + 1",
                "# a window must start inside the input or its left padding, as torch's",
                f"if (O{d} - 1) * {stride} >= {d} + {padding}:",
                f"    O{d} -= 1",
            )
        )
    return Anchor(
        (
            KernelParam("KH", k, constexpr=True),
            KernelParam("KW", k, constexpr=True),
            KernelParam("STRIDE", stride, constexpr=True),
            KernelParam("PAD", padding, constexpr=True),
        ),
        "C_in",
        pixels,
        _maxpool_loop,
        "it reads a window of its input, and those pixels are computed by other programs of this kernel",
    )


def _maxpool_specialize(a: dict, has_module: bool) -> Op:
    """With a module (nn.MaxPool2d), the kernel reads the window from it at each launch; without one (an
    unlabeled maxpool at the top level, like F.max_pool2d) the window is the build-time values, and the
    kernel's name says all of them, so that two windows never share a kernel."""
    k, stride, padding = _maxpool_window(a)
    if not isinstance(stride, int) or stride < 1:
        raise ArgumentError(f"maxpool: stride must be a positive integer, got {stride!r}")
    if padding > k // 2:
        raise ArgumentError(
            f"maxpool: padding {padding} is more than half the {k}x{k} window (torch allows at most {k // 2})"
        )
    ceil_mode = a["ceil_mode"]
    if not isinstance(ceil_mode, bool):
        raise ArgumentError(f"maxpool: ceil_mode must be True or False, got {ceil_mode!r}")
    mode = "ceil mode: a last window may run past the input's end" if ceil_mode else "floor mode"
    summary = f"MaxPool2d(k, stride, padding): max over k x k windows, padding read as -inf, {mode}"
    op = replace(FIXED_OPS["maxpool"], specialize=None, summary=summary)
    if has_module:
        lowering = _maxpool_anchor("{m}.kernel_size", "{m}.stride", "{m}.padding", ceil_mode)
        if not ceil_mode:
            return replace(op, lowering=lowering)
        # the kernel's name says the mode: the wrapper's output size differs
        return replace(op, name="maxpool_ceil", lowering=lowering, captured_attrs=(*op.captured_attrs, "ceil_mode"))
    name = f"maxpool{k}x{k}" + (f"_s{stride}" if stride != k else "") + (f"_p{padding}" if padding else "")
    name += "_ceil" if ceil_mode else ""
    return replace(
        op,
        name=name,
        lowering=_maxpool_anchor(str(k), str(stride), str(padding), ceil_mode),
        reference=lambda x, m: f"nn.functional.max_pool2d({x}, {k}, {stride}, {padding}{', ceil_mode=True' * ceil_mode})",
        captured_attrs=(),
    )


# -- softmax: along the width, the height or the channels of a 4-d tensor, or the features of a 2-d one ----

# the axis of a 4-d tensor that each dim names, as softmax_tile (fusegen/runtime.py) takes it
_SOFTMAX_AXES = {1: "channels", 2: "height", 3: "width", -3: "channels", -2: "height", -1: "width"}


def _softmax_shape(a: dict, shape: Shape) -> Shape:
    if len(shape) == 4 or (len(shape) == 2 and a["dim"] in (1, -1)):
        return shape
    raise ShapeError(
        f"softmax(dim={a['dim']}) takes a 4-d (NCHW) tensor (along its channels, height or width) or a 2-d (NC)"
        f" one along its features (dim=1 or -1), but gets shape {list(shape)}"
    )


def _online_softmax(tile: str, axis: int | None) -> list[str]:
    """Sweep 1's step: `row_max` and `row_sum` take in the tile `tile` reduced over `axis` (None: elementwise),
    its lanes past the axis' end -inf; the sum is rescaled to each new maximum."""
    chunk = tile if axis is None else f"tl.max({tile}, axis={axis})"
    expand = "" if axis is None else ("[None, :]" if axis == 0 else "[:, None]")
    exps = f"tl.exp({tile} - new_max{expand})"
    return [
        f"new_max = tl.maximum(row_max, {chunk})",
        f"row_sum = row_sum * tl.exp(row_max - new_max) + {exps if axis is None else f'tl.sum({exps}, axis={axis})'}",
        "row_max = new_max",
    ]


def _softmax_loop(axis: str):
    """Two sweeps over the softmax's axis: the first keeps a running maximum and a sum of exponentials
    rescaled to it (online softmax), the second computes the tile's own values, exp(x - max) / sum. The
    prologue applies to every tile loaded, in both sweeps (training mode's BatchNorm before a softmax)."""

    def loop(slot: str, prologue: PrologueHook) -> list[str]:
        if axis == "width":
            # the tile lies in one image row (softmax_tile makes BLOCK_M divide W): the row's statistics
            # per channel, from chunks of BLOCK_K pixels
            stats = "(BLOCK_N,)"
            first = [
                "row_start = pid_m * BLOCK_M // W * W",
                "for w0 in range(0, W, BLOCK_K):",
                "    offs_w = w0 + tl.arange(0, BLOCK_K)",
                "    inside = (offs_w < W)[:, None] & mask_n[None, :]",
                f"    a = {_load_x('x_ptr + (row_start + offs_w)[:, None] * C_in + offs_n[None, :]', 'inside')}",
                *("    " + line for line in prologue("a", "offs_n", "mask_n", "inside")),
                '    a = tl.where((offs_w < W)[:, None], a, float("-inf"))',
                *("    " + line for line in _online_softmax("a", 0)),
            ]
            expand = "[None, :]"
        elif axis == "channels":
            # every channel of the tile's pixels, BLOCK_K at a time
            stats = "(BLOCK_M,)"
            first = [
                "for k0 in range(0, C_in, BLOCK_K):",
                "    offs_k = k0 + tl.arange(0, BLOCK_K)",
                "    mask_k = offs_k < C_in",
                "    inside = mask_m[:, None] & mask_k[None, :]",
                f"    a = {_load_x('x_ptr + offs_m[:, None] * C_in + offs_k[None, :]', 'inside')}",
                *("    " + line for line in prologue("a", "offs_k", "mask_k", "inside")),
                '    a = tl.where(mask_k[None, :], a, float("-inf"))',
                *("    " + line for line in _online_softmax("a", 1)),
            ]
            expand = "[:, None]"
        else:
            # the column of each value of the tile, a pixel at a time
            stats = "(BLOCK_M, BLOCK_N)"
            first = [
                "for h in range(H):",
                f"    a = {_load_x(_x_at('n[:, None]', 'h', 'ow[:, None]', 'offs_n[None, :]'), 'mask')}",
                *("    " + line for line in prologue("a", "offs_n", "mask_n", None)),
                *("    " + line for line in _online_softmax("a", None)),
            ]
            expand = ""
        return [
            f"# sweep 1: the maximum along the {axis} and the sum of exp(x - maximum), rescaled as the maximum grows",
            f'row_max = tl.full({stats}, float("-inf"), dtype=tl.float32)',
            f"row_sum = tl.zeros({stats}, dtype=tl.float32)",
            *first,
            "# sweep 2: the tile's own values",
            f"acc = {_load_x('x_ptr + offs_m[:, None] * C_in + offs_n[None, :]', 'mask')}",
            *prologue("acc", "offs_n", "mask_n", None),
            f"acc = tl.exp(acc - row_max{expand}) / row_sum{expand}",
        ]

    return loop


def _softmax_anchor(axis: str, rank: int) -> Anchor:
    """The softmax along `axis` of a tensor of `rank` 4, or of 2 along its features (`axis` "channels")."""
    return Anchor(
        (),
        "C_in",
        ("OH = H", "OW = W") if rank == 4 else (),
        _softmax_loop(axis),
        f"each of its outputs reads the whole {axis} of its input at its place, and those values are computed by"
        " other programs of this kernel",
        tile=f'softmax_tile("{axis}", {"W" if rank == 4 else 1}, C_in)',
        tile_options=("num_warps",),
        pool_refusal=f"places its tile's rows in the output grid to read the whole {axis} at each, not as a"
        " pooling window's pixels",
    )


def _softmax_specialize(a: dict, has_module: bool) -> Op:
    """The softmax's anchor for its dim, on a 4-d tensor, and for a 2-d one (`for_rank`); the dim is fixed at
    build time (the kernel's name says it)."""
    dim = a["dim"]
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ArgumentError(f"softmax: dim must be an integer, got {dim!r}")
    if dim not in _SOFTMAX_AXES:
        raise ArgumentError(
            f"softmax along dim={dim} is not supported: fusegen's softmax runs along the channels (dim=1 or -3), the"
            " height (dim=2 or -2) or the width (dim=3 or -1) of a 4-d tensor, or the features (dim=1 or -1) of a"
            " 2-d one"
        )
    axis = _SOFTMAX_AXES[dim]
    op = replace(
        FIXED_OPS["softmax"],
        name=f"softmax_{axis}",
        lowering=_softmax_anchor(axis, 4),
        # an unlabeled softmax at the top level has no module: the build-time dim
        reference=(lambda x, m: f"{m}({x})") if has_module else (lambda x, m: f"torch.softmax({x}, {dim})"),
        summary=f"softmax along the {axis} (dim={dim}): exp(x - max) / sum(exp(x - max)) in two sweeps",
        specialize=None,
    )
    features = replace(
        op,
        name="softmax_features",
        lowering=_softmax_anchor("channels", 2),
        summary=f"softmax along the features (dim={dim}): exp(x - max) / sum(exp(x - max)) in two sweeps",
    )
    # the shape rule takes a 2-d tensor only along dim 1 or -1: the features
    return replace(op, for_rank=lambda rank: features if rank == 2 else op)


# -- conv_transpose: nn.ConvTranspose2d --------------------------------------------------------------------

CONV_TRANSPOSE_DEFAULTS = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "bias": True, "dilation": 1}


def _conv_transpose_module(a: dict[str, str]) -> str:
    positional = ", ".join(a[key] for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding"))
    bias = "" if a["bias"] == "True" else f", bias={a['bias']}"
    return f"nn.ConvTranspose2d({positional}{bias})"


def _conv_transpose_out(size: int, k: int, stride: int, padding: int) -> int:
    out = (size - 1) * stride - 2 * padding + k
    if out < 1:
        raise ShapeError(
            f"conv_transpose: an input of size {size} gives no output pixels with kernel_size {k}, stride {stride}"
            f" and padding {padding}"
        )
    return out


def _conv_transpose_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "conv_transpose")
    _channels(shape, a["in_channels"], "conv_transpose")
    oh, ow = (_conv_transpose_out(size, a["kernel_size"], a["stride"], a["padding"]) for size in shape[2:])
    return (shape[0], a["out_channels"], oh, ow)


_ROWS_BEFORE = "({r} * ({size} // STRIDE) + tl.minimum({r}, {size} % STRIDE))"  # rows or columns of residue < r

# conv_transpose's parity-major rows: the grid enumerates the output pixels class by class, a class being the
# pixels of one (row % STRIDE, column % STRIDE) = (rh, rw), in (image, i, j) order within it (row i * STRIDE +
# rh, column j * STRIDE + rw). Classes of a smaller rh come first, each holding all of that residue's rows.
_PARITY_MAJOR_ROWS = (
    "# parity-major rows: the class (rh, rw) of each, and its place (img, i, j) in the class's grid",
    "rh = tl.zeros((BLOCK_M,), dtype=tl.int32)",
    "for r in tl.static_range(1, STRIDE):",
    f"    rh += (rows_in_order >= N * OW * {_ROWS_BEFORE.format(r='r', size='OH')}).to(tl.int32)",
    f"q = rows_in_order - N * OW * {_ROWS_BEFORE.format(r='rh', size='OH')}",
    # the class's rows, counted without a tensor // STRIDE: Triton 3.6 fails to compile the kernel (layout
    # pass, "arith.muli requires the same encoding") at STRIDE 3 when the splat STRIDE it divides by is
    # shared with i * STRIDE below; max 1 keeps the divisions below defined in an empty class
    "class_h = tl.maximum(OH // STRIDE + (rh < OH % STRIDE).to(tl.int32), 1)",
    "rw = tl.zeros((BLOCK_M,), dtype=tl.int32)",
    "for r in tl.static_range(1, STRIDE):",
    f"    rw += (q >= N * class_h * {_ROWS_BEFORE.format(r='r', size='OW')}).to(tl.int32)",
    f"q -= N * class_h * {_ROWS_BEFORE.format(r='rw', size='OW')}",
    "class_w = tl.maximum(OW // STRIDE + (rw < OW % STRIDE).to(tl.int32), 1)",
    "img = q // (class_h * class_w)",
    "i = q // class_w % class_h",
    "j = q % class_w",
    "offs_m = (img * OH + i * STRIDE + rh) * OW + j * STRIDE + rw",
)


def _conv_transpose_loop(slot: str, prologue: PrologueHook) -> list[str]:
    """The transposed conv as an implicit GEMM over its taps, on parity-major rows (_PARITY_MAJOR_ROWS): a
    pixel of class (rh, rw) takes only the taps kh = (rh + PAD) % STRIDE + t * STRIDE (t < TH), likewise kw,
    so a tile computes the taps of the classes it holds: one class, and no wasted product, where it lies
    inside one (a tile that straddles two classes computes both)."""
    return [
        "TH: tl.constexpr = (KH + STRIDE - 1) // STRIDE",
        "TW: tl.constexpr = (KW + STRIDE - 1) // STRIDE",
        "row_class = rh * STRIDE + rw",
        "first_class = tl.min(tl.where(mask_m, row_class, STRIDE * STRIDE), axis=0)",
        "last_class = tl.max(tl.where(mask_m, row_class, 0), axis=0)",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "for c in range(first_class, last_class + 1):",
        "    in_class = mask_m & (row_class == c)",
        "    # K runs over (t_h, t_w, input channel): the class's taps, from input pixel (i + (rh + PAD) //",
        "    # STRIDE - t_h, likewise)",
        "    for k0 in range(0, TH * TW * C_in, BLOCK_K):",
        "        offs_k = k0 + tl.arange(0, BLOCK_K)",
        "        t_h = offs_k // (TW * C_in)",
        "        t_w = offs_k // C_in % TW",
        "        ci = offs_k % C_in",
        "        kh = (c // STRIDE + PAD) % STRIDE + t_h * STRIDE",
        "        kw = (c % STRIDE + PAD) % STRIDE + t_w * STRIDE",
        "        mask_k = offs_k < TH * TW * C_in",
        "        tap_k = mask_k & (kh < KH) & (kw < KW)  # TH * STRIDE may pass KH",
        "        ih = i[:, None] + (c // STRIDE + PAD) // STRIDE - t_h[None, :]",
        "        iw = j[:, None] + (c % STRIDE + PAD) // STRIDE - t_w[None, :]",
        "        inside = in_class[:, None] & tap_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        f"        a = {_load_x(_x_strided_at('img[:, None]', 'ih', 'iw', 'ci[None, :]'), 'inside')}",
        *("        " + line for line in _where_inside(prologue("a", "ci", "mask_k", "inside"), "a", "inside")),
        # the weight is [in, out, kh, kw], read through its strides
        *(
            "        " + line
            for line in _weight_dot(
                slot,
                f"offs_n[None, :] * {slot}_weight_stride_o"
                f" + (ci * {slot}_weight_stride_i + kh * {slot}_weight_stride_h + kw * {slot}_weight_stride_w)[:, None]",
                "tap_k[:, None] & mask_n[None, :]",
            )
        ),
    ]


def _conv_transpose_specialize(a: dict, has_module: bool) -> Op:
    """nn.ConvTranspose2d with groups 1, dilation 1 and no output padding, with or without bias."""
    for key in ("output_padding", "groups", "dilation"):
        if a[key] != CONV_TRANSPOSE_DEFAULTS[key]:
            raise ArgumentError(
                f"conv_transpose with {key}={a[key]!r} is not supported: fusegen lowers ConvTranspose2d with"
                " output_padding=0, groups=1 and dilation=1"
            )
    bias = a["bias"]
    if not isinstance(bias, bool):
        raise ArgumentError(f"conv_transpose: bias must be True or False, got {bias!r}")
    k = a["kernel_size"]
    name = f"conv_transpose{k}x{k}{'_bias' if bias else ''}"
    has_bias = "{m}.bias is not None" if bias else "{m}.bias is None"
    message = (
        f"conv_transpose lowers to {name} (as built from the spec), which needs output_padding 0, groups 1,"
        f" dilation 1 and {'a' if bias else 'no'} bias, not output_padding"
        " {{{m}.output_padding}}, groups {{{m}.groups}}, dilation {{{m}.dilation}} and bias {{{m}.bias is not None}}"
    )
    guard = (
        "if not ({m}.output_padding == (0, 0) and {m}.groups == 1 and {m}.dilation == (1, 1) and " + has_bias + "):",
        f'    raise ValueError(f"{message}")',
    )
    params = (
        KernelParam("weight_ptr", _DOT_WEIGHT),
        KernelParam("weight_stride_i", "{m}.weight.stride(0)"),
        KernelParam("weight_stride_o", "{m}.weight.stride(1)"),
        KernelParam("weight_stride_h", "{m}.weight.stride(2)"),
        KernelParam("weight_stride_w", "{m}.weight.stride(3)"),
        _DOT_WEIGHT_LOW,
        *_WINDOW,
        _DOT_PRECISION,
    )
    lowering = Anchor(
        (*params, _BIAS) if bias else params,
        "{m}.out_channels",
        (
            *guard,
            "OH = (H - 1) * {m}.stride[0] - 2 * {m}.padding[0] + {m}.kernel_size[0]",
            "OW = (W - 1) * {m}.stride[1] - 2 * {m}.padding[1] + {m}.kernel_size[1]",
        ),
        _then_bias(_conv_transpose_loop, bias),
        f"each of its outputs reads up to {k}x{k} pixels of its input, and those pixels are computed by other"
        " programs of this kernel",
        tile="conv_tile(N * OH * OW, KH * KW * C_in, C_out, DOT_PRECISION)",
        tile_options=("num_warps", "num_stages"),
        strided_input=True,
        pool_refusal="orders its tile's rows by output class (parity-major), not as a pooling window's pixels",
        row_order=_PARITY_MAJOR_ROWS,
    )
    return replace(
        FIXED_OPS["conv_transpose"],
        name=name,
        lowering=lowering,
        summary=f"{k}x{k} transposed convolution, {_bias_words(bias)} (implicit GEMM on tl.dot, parity-major rows)",
        specialize=None,
    )


def _dropout_specialize(a: dict, has_module: bool) -> Op:
    p = a["p"]
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ArgumentError(f"dropout: p is a probability between 0 and 1, got {p!r}")
    if p != 0:
        raise ArgumentError(
            f"dropout with p = {p} zeroes random elements in training mode, which no kernel can reproduce exactly;"
            " fusegen takes p = 0 (KernelBench's dropouts are p = 0.0), where dropout is the identity in training"
            " and eval mode alike, as it is in eval mode for any p"
        )
    return replace(FIXED_OPS["dropout"], specialize=None)


def _conv1x1_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "conv1x1")
    _channels(shape, a["in_channels"], "conv1x1")
    return (shape[0], a["out_channels"], (shape[2] - 1) // a["stride"] + 1, (shape[3] - 1) // a["stride"] + 1)


def _linear_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 2, "linear")
    if shape[1] != a["in_features"]:
        raise ShapeError(f"linear expects {a['in_features']} input features, but the tensor flowing in has {shape[1]}")
    return (shape[0], a["out_features"])


def _avgpool_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "avgpool")
    k = a["kernel_size"]
    if shape[2] < k or shape[3] < k:
        raise ShapeError(f"avgpool({k}) needs an input of at least {k}x{k}, but gets {shape[2]}x{shape[3]}")
    return (shape[0], shape[1], (shape[2] - k) // k + 1, (shape[3] - k) // k + 1)


def _global_pool_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "global_avgpool")
    return (shape[0], shape[1], 1, 1)


def _flatten_shape(a: dict, shape: Shape) -> Shape:
    if len(shape) < 2:
        raise ShapeError(f"flatten needs a batch dimension and at least one more, but gets shape {list(shape)}")
    return (shape[0], math.prod(shape[1:]))


def _bn_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "bn")
    _channels(shape, a["channels"], "bn")
    return shape


def _bn_apply(v: str, slot: str, ch: str, ch_mask: str) -> list[str]:
    return [
        f"{slot}_scale = tl.load({slot}_weight_ptr + {ch}, mask={ch_mask}, other=0.0)"
        f" * tl.rsqrt(tl.load({slot}_var_ptr + {ch}, mask={ch_mask}, other=1.0) + {slot}_eps)",
        f"{slot}_shift = tl.load({slot}_bias_ptr + {ch}, mask={ch_mask}, other=0.0)"
        f" - tl.load({slot}_mean_ptr + {ch}, mask={ch_mask}, other=0.0) * {slot}_scale",
        f"{v} = {v} * {slot}_scale[None, :] + {slot}_shift[None, :]",
    ]


def _bn_module(a: dict[str, str]) -> str:
    extra = "".join(f", {key}={a[key]}" for key in ("eps", "momentum") if a[key] != repr(BN_DEFAULTS[key]))
    return f"nn.BatchNorm2d({a['channels']}{extra})"


BN_DEFAULTS = {"eps": 1e-5, "momentum": 0.1}


# The torch reference of bn (reference_forward, which backward differentiates): the module's own
# arithmetic in either mode, but backward's recomputation must not update the running statistics again.
BN_REFERENCE = '''\
def batch_norm_reference(x, bn):
    """bn(x) in torch ops, in bn's mode, without touching its running statistics."""
    running = (None, None) if bn.training else (bn.running_mean, bn.running_var)
    return nn.functional.batch_norm(x, *running, bn.weight, bn.bias, bn.training, 0.0, bn.eps)
'''


def _bn_train_apply(v: str, slot: str, ch: str, ch_mask: str) -> list[str]:
    # (x - mean) * scale + bias, not x * scale + shift: a mean large against the spread cancels exactly
    return [
        f"{slot}_mean = tl.load({slot}_mean_ptr + {ch}, mask={ch_mask}, other=0.0)",
        f"{slot}_scale = tl.load({slot}_scale_ptr + {ch}, mask={ch_mask}, other=0.0)",
        f"{slot}_bias = tl.load({slot}_bias_ptr + {ch}, mask={ch_mask}, other=0.0)",
        f"{v} = ({v} - {slot}_mean[None, :]) * {slot}_scale[None, :] + {slot}_bias[None, :]",
    ]


# The first lines of every kernel (lower's and the helpers'). Launched with programmatic dependent launch
# (LAUNCH_PDL: launch_pdl sets it for small launches on Hopper and later), a kernel's programs may start while
# the launch before it runs, so that its launch latency hides behind that one's last programs. They wait for
# that launch's writes before any load or store (an output may take the memory of an input that the launch
# before still reads), then let the next launch start: it waits in turn, so launches still finish in order.
PDL = [
    "# programmatic dependent launch (Hopper on): wait for the launch before, then let the next one start",
    "if LAUNCH_PDL:",
    "    tl.extra.cuda.gdc_wait()",
    "    tl.extra.cuda.gdc_launch_dependents()",
]
_PDL_LINES = "".join(f"    {line}\n" for line in PDL)  # in a helper kernel's body


# Training-mode BatchNorm between two kernels: the producer stores, per output tile and channel, the
# sum and the sum of squared deviations from the tile's mean; these kernels merge the tiles with Chan's
# parallel formula (no sum-of-squares cancellation at large N*H*W), then write the per-channel mean
# and scale that the consumer's prologue applies, and update the running statistics like PyTorch. A long
# column of tiles (an early layer, a large batch) is merged in chunks by many programs first, so that no
# program walks thousands of tiles (MobileNetV1 at batch 128: 25,088 tiles a channel in its first layer).
BN_BATCH_STATS = Helper(
    kernel="""\
# Tiles first through last of a column of per-tile statistics (sum, squared deviations from the tile's
# mean; tiles of ROWS_PER_TILE rows, the last ones short of ROWS) merged into (rows, mean, squared
# deviations) per channel, in float64: a mean off by a few ulps is amplified by mean / std once the
# consumer subtracts it.
@triton.jit
def merge_tile_stats(sum_ptr, m2_ptr, first, last, C, ROWS, ROWS_PER_TILE, offs_c, mask_c, BLOCK_T: tl.constexpr):
    mean = tl.zeros_like(offs_c).to(tl.float64)
    m2 = tl.zeros_like(offs_c).to(tl.float64)
    rows_first = tl.minimum(first * ROWS_PER_TILE, ROWS).to(tl.float64)
    for t0 in range(first, last, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < last)[:, None] & mask_c[None, :]
        tile_rows = tl.minimum(tl.maximum(ROWS - offs_t * ROWS_PER_TILE, 0), ROWS_PER_TILE)
        tile_rows = tl.where(offs_t < last, tile_rows, 0).to(tl.float64)
        tile_sum = tl.load(sum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float64)
        tile_m2 = tl.load(m2_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float64)
        # merge the block's tiles, then the block into the total so far (Chan et al.)
        block_rows = tl.sum(tile_rows, axis=0)
        block_mean = tl.sum(tile_sum, axis=0) / block_rows
        deviation = tl.where(mask, tile_sum / tl.maximum(tile_rows, 1.0)[:, None] - block_mean[None, :], 0.0)
        block_m2 = tl.sum(tile_m2 + tile_rows[:, None] * deviation * deviation, axis=0)
        rows_before = tl.minimum(t0 * ROWS_PER_TILE, ROWS).to(tl.float64) - rows_first
        delta = block_mean - mean
        mean += delta * (block_rows / (rows_before + block_rows))
        m2 += block_m2 + delta * delta * (rows_before * block_rows / (rows_before + block_rows))
    return mean, m2


# BatchNorm2d in training mode, a long column of tiles: each program merges one chunk of a block of
# channels' tiles, and stores the chunk's sum and squared deviations for batch_norm_batch_stats_kernel.
@triton.jit
def batch_norm_chunk_stats_kernel(
    tile_sum_ptr, tile_m2_ptr, chunk_sum_ptr, chunk_m2_ptr, T, C, ROWS, ROWS_PER_TILE, TILES_PER_CHUNK,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, LAUNCH_PDL: tl.constexpr,
):
"""
    + _PDL_LINES
    + """    chunk = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    first = chunk * TILES_PER_CHUNK
    last = tl.minimum(first + TILES_PER_CHUNK, T)
    mean, m2 = merge_tile_stats(
        tile_sum_ptr, tile_m2_ptr, first, last, C, ROWS, ROWS_PER_TILE, offs_c, mask_c, BLOCK_T
    )
    rows = (tl.minimum(last * ROWS_PER_TILE, ROWS) - tl.minimum(first * ROWS_PER_TILE, ROWS)).to(tl.float64)
    tl.store(chunk_sum_ptr + chunk * C + offs_c, mean * rows, mask=mask_c)
    tl.store(chunk_m2_ptr + chunk * C + offs_c, m2, mask=mask_c)


# BatchNorm2d in training mode: batch mean and variance from per-tile statistics (or per-chunk ones);
# running statistics update.
@triton.jit
def batch_norm_batch_stats_kernel(
    tile_sum_ptr, tile_m2_ptr, weight_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    batch_mean_ptr, scale_ptr, T, C, ROWS, ROWS_PER_TILE, eps, momentum,
    CUMULATIVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, LAUNCH_PDL: tl.constexpr,
):
"""
    + _PDL_LINES
    + """    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean, m2 = merge_tile_stats(tile_sum_ptr, tile_m2_ptr, 0, T, C, ROWS, ROWS_PER_TILE, offs_c, mask_c, BLOCK_T)
    tl.store(batch_mean_ptr + offs_c, mean.to(tl.float32), mask=mask_c)
    rstd = 1.0 / tl.sqrt(m2 / ROWS + eps)
    tl.store(scale_ptr + offs_c, (tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0) * rstd).to(tl.float32), mask=mask_c)
    # running statistics as nn.BatchNorm2d keeps them: unbiased variance; momentum None is a cumulative
    # average over num_batches_tracked, which the wrapper then counts before the launch
    if CUMULATIVE:
        factor = 1.0 / tl.load(num_batches_tracked_ptr).to(tl.float64)
    else:
        factor = momentum
        tl.atomic_add(num_batches_tracked_ptr, 1, mask=pid == 0)  # one program counts the batch
    running_mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0)
    running_var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0)
    new_mean = (1.0 - factor) * running_mean + factor * mean
    new_var = (1.0 - factor) * running_var + factor * (m2 / (ROWS - 1))
    tl.store(running_mean_ptr + offs_c, new_mean.to(tl.float32), mask=mask_c)
    tl.store(running_var_ptr + offs_c, new_var.to(tl.float32), mask=mask_c)
""",
    wrapper='''\
def batch_norm_batch_stats(x_stats, bn):
    """Training-mode BatchNorm's batch mean and scale (weight / sqrt(var + eps)) per channel, from its
    input's per-tile statistics; updates running_mean, running_var and num_batches_tracked like torch."""
    tile_sum, tile_m2, rows_per_tile, rows = x_stats
    T, C = tile_sum.shape
    if rows < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got {rows} (N*H*W)")
    if bn.momentum is None:  # the kernel reads the count: update it first (otherwise the kernel does)
        bn.num_batches_tracked.add_(1)
    # narrow channel blocks (few channels and many tiles early in a net), up to 256 tiles a program: a
    # longer column is merged in chunks of tiles first
    BLOCK_C, TILES_PER_CHUNK = 8, 256
    if T > TILES_PER_CHUNK:
        # chunks of tiles merged by as many programs, then the chunks by the kernel below, as tiles of
        # TILES_PER_CHUNK tiles' rows
        chunks = cdiv(T, TILES_PER_CHUNK)
        chunk_sum = torch.empty((chunks, C), device=tile_sum.device, dtype=torch.float64)
        chunk_m2 = torch.empty_like(chunk_sum)
        grid = (cdiv(C, BLOCK_C), chunks)
        LAUNCH_PDL = launch_pdl(tile_sum, grid)
        batch_norm_chunk_stats_kernel[grid](
            tile_sum, tile_m2, chunk_sum, chunk_m2, T, C, rows, rows_per_tile, TILES_PER_CHUNK,
            BLOCK_T=TILES_PER_CHUNK, BLOCK_C=BLOCK_C, LAUNCH_PDL=LAUNCH_PDL, num_warps=8, launch_pdl=LAUNCH_PDL,
        )
        tile_sum, tile_m2, rows_per_tile, T = chunk_sum, chunk_m2, rows_per_tile * TILES_PER_CHUNK, chunks
    batch_mean = torch.empty(C, device=tile_sum.device, dtype=torch.float32)
    scale = torch.empty_like(batch_mean)
    grid = (cdiv(C, BLOCK_C),)
    LAUNCH_PDL = launch_pdl(tile_sum, grid)
    batch_norm_batch_stats_kernel[grid](
        tile_sum, tile_m2, bn.weight, bn.running_mean, bn.running_var, bn.num_batches_tracked,
        batch_mean, scale, T, C, rows, rows_per_tile, bn.eps, 0.0 if bn.momentum is None else bn.momentum,
        CUMULATIVE=bn.momentum is None, BLOCK_T=min(TILES_PER_CHUNK, next_power_of_2(T)), BLOCK_C=BLOCK_C,
        LAUNCH_PDL=LAUNCH_PDL, num_warps=8, launch_pdl=LAUNCH_PDL,
    )
    return batch_mean, scale
''',
)


# A pooling window that several programs sum in slices (runtime.window_slice): its slices' sums added in
# slice order, so that every call adds them the same way, then divided by the window's pixels.
WINDOW_SLICES_SUM = Helper(
    kernel="""\
# A pooling window summed in slices by several programs: the slices' sums added in order, then the mean.
@triton.jit
def window_slices_sum_kernel(partial_ptr, pooled_ptr, SPLITS, SIZE, window, BLOCK: tl.constexpr, LAUNCH_PDL: tl.constexpr):
"""
    + _PDL_LINES
    + """    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        total += tl.load(partial_ptr + split * SIZE + offs, mask=mask, other=0.0)
    tl.store(pooled_ptr + offs, total / window, mask=mask)
""",
    wrapper='''\
def window_slices_sum(partial, pooled, window):
    """pooled (pooled pixels x channels, contiguous) = the sum of partial's slices [splits, pixels, channels]
    divided by the `window` pixels that each pooled pixel averages."""
    splits = partial.shape[0]
    size = partial.numel() // splits  # not partial[0]: a torch op, which a launch plan would keep
    BLOCK = 1024
    grid = (cdiv(size, BLOCK),)
    LAUNCH_PDL = launch_pdl(partial, grid)
    window_slices_sum_kernel[grid](
        partial, pooled, splits, size, window, BLOCK=BLOCK, LAUNCH_PDL=LAUNCH_PDL, launch_pdl=LAUNCH_PDL
    )
''',
)


def _same(a: dict, shape: Shape) -> Shape:
    return shape


def _shuffle_shape(a: dict, shape: Shape) -> Shape:
    _rank(shape, 4, "channel_shuffle")
    if shape[1] % a["groups"]:
        raise ShapeError(f"channel_shuffle: {a['groups']} groups do not divide the {shape[1]} channels flowing in")
    return shape


def _shuffle_source(ch: str, slot: str, count: str) -> str:
    """Channel j * groups + g of the shuffled tensor is channel g * (count // groups) + j of its input."""
    groups = f"{slot.upper()}_GROUPS"
    return f"(({ch} % {groups}) * ({count} // {groups}) + {ch} // {groups})"


def _shuffle_target(ch: str, slot: str, count: str) -> str:
    """Where channel c = g * (count // groups) + j of the input lands: j * groups + g."""
    groups = f"{slot.upper()}_GROUPS"
    return f"(({ch} % ({count} // {groups})) * {groups} + {ch} // ({count} // {groups}))"


def _add_shape(a: dict, shape: Shape) -> Shape:
    if tuple(a["other"]) != tuple(shape):
        raise ShapeError(f"add: the value added has shape {list(a['other'])}, the tensor flowing in {list(shape)}")
    return shape


def _cat_shape(a: dict, shape: Shape) -> Shape:
    """The values joined along channels: 4-d, with the same batch and pixels."""
    _rank(shape, 4, "cat")
    for other in a["values"]:
        _rank(other, 4, "cat")
        if (other[0], *other[2:]) != (shape[0], *shape[2:]):
            raise ShapeError(
                f"cat joins values along channels, so their other dimensions must agree: {list(shape)} and {list(other)}"
            )
    return (shape[0], shape[1] + sum(other[1] for other in a["values"]), *shape[2:])


FIXED_OPS = {
    op.name: op
    for op in (
        Op(
            name="conv1x1",
            slot="conv",
            role=Role.ANCHOR,
            args=("in_channels", "out_channels", "stride"),
            defaults={"stride": 1},
            int_args=("in_channels", "out_channels", "stride"),
            module=lambda a: f"nn.Conv2d({a['in_channels']}, {a['out_channels']}, 1, {a['stride']}, 0, bias=False)",
            needs_module=True,
            channels_attr="in_channels",
            shape=_conv1x1_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=_gemm_anchor(bias=False),
            summary="1x1 convolution, no bias, as a GEMM over pixels x channels on tl.dot",
        ),
        Op(
            name="conv",
            slot="conv",
            role=Role.ANCHOR,
            args=("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups", "bias"),
            defaults=dict(CONV_DEFAULTS),
            int_args=("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups"),
            module=_conv2d_module,
            needs_module=True,
            channels_attr="in_channels",
            shape=_conv2d_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=None,
            summary="nn.Conv2d: a depthwise, 1x1 GEMM, grouped 1x1 GEMM or KxK implicit-GEMM anchor, by its argument values",
            specialize=_conv2d_specialize,
        ),
        Op(
            name="maxpool",
            slot="pool",
            role=Role.ANCHOR,
            args=("kernel_size", "stride", "padding", "ceil_mode"),
            defaults={"stride": None, "padding": 0, "ceil_mode": False},
            int_args=("kernel_size", "padding"),
            module=_maxpool_module,
            needs_module=False,
            shape=_maxpool_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=None,
            summary="MaxPool2d(k, stride, padding, ceil_mode): max over k x k windows, padding read as -inf,"
            " floor or ceil mode",
            captured_attrs=("kernel_size", "stride", "padding"),
            specialize=_maxpool_specialize,
        ),
        Op(
            name="conv_transpose",
            slot="conv",
            role=Role.ANCHOR,
            args=(
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "output_padding",
                "groups",
                "bias",
                "dilation",
            ),
            defaults=dict(CONV_TRANSPOSE_DEFAULTS),
            int_args=("in_channels", "out_channels", "kernel_size", "stride", "padding"),
            module=_conv_transpose_module,
            needs_module=True,
            channels_attr="in_channels",
            shape=_conv_transpose_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=None,
            summary="nn.ConvTranspose2d (output_padding 0, groups 1, dilation 1): an implicit GEMM over its taps on"
            " tl.dot",
            specialize=_conv_transpose_specialize,
        ),
        Op(
            name="softmax",
            slot="softmax",
            role=Role.ANCHOR,
            args=("dim",),
            defaults={},
            module=lambda a: f"nn.Softmax(dim={a['dim']})",
            needs_module=False,
            shape=_softmax_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=None,
            summary="nn.Softmax(dim) along a 4-d tensor's channels, height or width, or a 2-d one's features: a running"
            " maximum and sum of exponentials over the dim, then exp(x - max) / sum",
            specialize=_softmax_specialize,
        ),
        Op(
            name="linear",
            slot="fc",
            role=Role.ANCHOR,
            args=("in_features", "out_features"),
            defaults={},
            int_args=("in_features", "out_features"),
            module=lambda a: f"nn.Linear({a['in_features']}, {a['out_features']})",
            needs_module=True,
            channels_attr="in_features",
            shape=_linear_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=Anchor(
                (_GEMM_WEIGHT, KernelParam("bias_ptr", "{m}.bias"), _DOT_PRECISION),
                "{m}.out_features",
                (),
                _then_bias(_gemm_loop("n"), True),
                "each of its outputs reads every input feature of a row, but a program of this kernel holds only BLOCK_N of them",
                tile="linear_tile(N, C_in, C_out)",
                tile_blocks=("BLOCK_M", "BLOCK_N", "BLOCK_K", "K_SLICE"),
                split_k_loop=_gemm_loop("n", k_slice=True),
                split_k_finish=_add_bias,
                # linear_tile's K steps are up to 64 features deep: 64 features or fewer are one slice
                split_k_min_channels=65,
                # the classifier's input error lands on the output unfiltered: EfficientNetB1's error was
                # 1.4e-4 with float16 features, 7.1e-5 with float32 ones (CPU, 2x3x37x45); they are a few KB
                narrow_input=False,
            ),
            summary="fully connected layer with bias, GEMM on tl.dot",
        ),
        Op(
            name="avgpool",
            slot="pool",
            role=Role.ANCHOR,
            args=("kernel_size",),
            defaults={},
            int_args=("kernel_size",),
            module=lambda a: f"nn.AvgPool2d({a['kernel_size']})",
            needs_module=True,
            shape=_avgpool_shape,
            reference=lambda x, m: f"{m}({x})",
            lowering=Anchor(
                (
                    KernelParam("KH", "{m}.kernel_size", constexpr=True),
                    KernelParam("KW", "{m}.kernel_size", constexpr=True),
                    *_POOL_BLOCKS,
                ),
                "C_in",
                (
                    "OH = (H - {m}.kernel_size) // {m}.kernel_size + 1",
                    "OW = (W - {m}.kernel_size) // {m}.kernel_size + 1",
                    "if H < {m}.kernel_size or W < {m}.kernel_size:",
                    '    raise ValueError(f"a {{{m}.kernel_size}}x{{{m}.kernel_size}} pooling window does not fit in'
                    ' {{H}}x{{W}} pixels")',
                ),
                _pool_loop(_WINDOW_PIXEL, "KH * KW", "KH * KW"),
                "it reads a window of its input, and those pixels are computed by other programs of this kernel",
                pool=Pool(_pool_window("{m}.kernel_size", "{m}.kernel_size")),
            ),
            summary="AvgPool2d(k): mean over k x k windows, stride k, no padding",
        ),
        Op(
            name="global_avgpool",
            slot="pool",
            role=Role.ANCHOR,
            args=(),
            defaults={},
            module=lambda a: "nn.AdaptiveAvgPool2d(1)",
            needs_module=False,
            shape=_global_pool_shape,
            reference=lambda x, m: f"nn.functional.adaptive_avg_pool2d({x}, 1)",
            lowering=Anchor(
                _POOL_BLOCKS,
                "C_in",
                ("OH = 1", "OW = 1"),
                _pool_loop(_ANY_PIXEL, "H * W", "H * W"),
                "it reads every pixel of its input, and those pixels are computed by other programs of this kernel",
                pool=Pool(_pool_window("OH", "OW")),
                slice_loop=_pool_loop(_ANY_PIXEL, "H * W", None),
                window="H * W",
            ),
            summary="adaptive average pool to 1x1 (mean over H and W)",
        ),
        Op(
            name="bn",
            slot="bn",
            role=Role.ELEMENTWISE,
            args=("channels", "eps", "momentum"),
            defaults=dict(BN_DEFAULTS),
            int_args=("channels",),
            module=_bn_module,
            needs_module=True,
            channels_attr="num_features",
            shape=_bn_shape,
            captured_attrs=("eps", "momentum"),
            reference=lambda x, m: f"batch_norm_reference({x}, {m})",
            reference_helper=BN_REFERENCE,
            lowering=Elementwise(
                (
                    KernelParam("weight_ptr", "{m}.weight"),
                    KernelParam("bias_ptr", "{m}.bias"),
                    KernelParam("mean_ptr", "{m}.running_mean"),
                    KernelParam("var_ptr", "{m}.running_var"),
                    KernelParam("eps", "{m}.eps"),
                ),
                _bn_apply,
            ),
            train_lowering=Elementwise(
                (
                    KernelParam("mean_ptr", "{m}_mean"),
                    KernelParam("scale_ptr", "{m}_scale"),
                    KernelParam("bias_ptr", "{m}.bias"),
                ),
                _bn_train_apply,
                needs_batch_stats=True,
                setup=("{m}_mean, {m}_scale = batch_norm_batch_stats(x_stats, {m})",),
                helper=BN_BATCH_STATS,
            ),
            summary="BatchNorm2d: eval mode folds running statistics into a per-channel scale and shift;"
            " training mode normalises with batch statistics",
        ),
        Op(
            name="relu",
            slot="relu",
            role=Role.ELEMENTWISE,
            args=(),
            defaults={},
            module=lambda a: "nn.ReLU(inplace=True)",
            needs_module=False,
            shape=_same,
            reference=lambda x, m: f"torch.relu({x})",
            lowering=Elementwise((), lambda v, slot, ch, ch_mask: [f"{v} = tl.maximum({v}, 0.0)"]),
            summary="max(x, 0)",
        ),
        Op(
            name="relu6",
            slot="relu6",
            role=Role.ELEMENTWISE,
            args=(),
            defaults={},
            module=lambda a: "nn.ReLU6(inplace=True)",
            needs_module=False,
            shape=_same,
            reference=lambda x, m: f"nn.functional.relu6({x})",
            lowering=Elementwise((), lambda v, slot, ch, ch_mask: [f"{v} = tl.minimum(tl.maximum({v}, 0.0), 6.0)"]),
            summary="min(max(x, 0), 6)",
        ),
        Op(
            name="add",
            slot="add",
            role=Role.ELEMENTWISE,
            args=("other",),
            defaults={},
            tensor_args=("other",),
            module=None,
            needs_module=False,
            shape=_add_shape,
            reference=lambda x, m: f"{x} + {m}",
            lowering=Elementwise(
                (KernelParam("ptr", "same_layout({m}, out)"),),
                lambda v, slot, ch, ch_mask: [
                    f"{v} += tl.load({slot}_ptr + offs_m[:, None] * C_out + {ch}[None, :], mask=mask, other=0.0).to(tl.float32)"
                ],
            ),
            summary="x + other, another value of the same shape read at the output tile's offsets (a residual)",
        ),
        Op(
            name="cat",
            slot="cat",
            role=Role.CONCAT,
            args=("values...",),
            defaults={},
            tensor_args=("values...",),
            module=None,
            needs_module=False,
            shape=_cat_shape,
            reference=lambda x, m: f"torch.cat([{x}, {m}], 1)",
            lowering=None,
            summary="torch.cat(values, 1): two or more values joined along channels; the kernels that make them"
            " store into their channel slices of one buffer, so nothing is copied",
        ),
        Op(
            name="dropout",
            slot="dropout",
            role=Role.ELEMENTWISE,
            args=("p",),
            defaults={"p": 0.5},
            module=lambda a: f"nn.Dropout({a['p']})",
            needs_module=False,
            shape=_same,
            # p = 0 (specialize refuses any other): the identity, as the kernels compute it
            reference=lambda x, m: x,
            lowering=Elementwise((), lambda v, slot, ch, ch_mask: []),
            summary="Dropout(p = 0): the identity, no kernel code",
            specialize=_dropout_specialize,
        ),
        Op(
            name="sigmoid",
            slot="sigmoid",
            role=Role.ELEMENTWISE,
            args=(),
            defaults={},
            module=lambda a: "nn.Sigmoid()",
            needs_module=False,
            shape=_same,
            reference=lambda x, m: f"torch.sigmoid({x})",
            lowering=Elementwise((), lambda v, slot, ch, ch_mask: [f"{v} = 1.0 / (1.0 + tl.exp(-{v}))"]),
            summary="1 / (1 + exp(-x))",
        ),
        Op(
            name="silu",
            slot="silu",
            role=Role.ELEMENTWISE,
            args=(),
            defaults={},
            module=lambda a: "nn.SiLU()",
            needs_module=False,
            shape=_same,
            reference=lambda x, m: f"nn.functional.silu({x})",
            lowering=Elementwise((), lambda v, slot, ch, ch_mask: [f"{v} = {v} / (1.0 + tl.exp(-{v}))"]),
            summary="x * sigmoid(x)",
        ),
        Op(
            name="hardswish",
            slot="hardswish",
            role=Role.ELEMENTWISE,
            args=(),
            defaults={},
            module=lambda a: "nn.Hardswish()",
            needs_module=False,
            shape=_same,
            reference=lambda x, m: f"nn.functional.hardswish({x})",
            lowering=Elementwise(
                (), lambda v, slot, ch, ch_mask: [f"{v} = {v} * tl.minimum(tl.maximum({v} + 3.0, 0.0), 6.0) / 6.0"]
            ),
            summary="x * min(max(x + 3, 0), 6) / 6",
        ),
        Op(
            name="channel_shuffle",
            slot="shuffle",
            role=Role.ELEMENTWISE,
            args=("groups",),
            defaults={},
            int_args=("groups",),
            module=lambda a: f"nn.ChannelShuffle({a['groups']})",
            needs_module=True,
            shape=_shuffle_shape,
            captured_attrs=("groups",),
            reference=lambda x, m: f"{x}.unflatten(1, ({m}.groups, -1)).transpose(1, 2).flatten(1, 2)",
            lowering=ChannelMap(
                (KernelParam("GROUPS", "{m}.groups", constexpr=True),), _shuffle_source, _shuffle_target
            ),
            summary="ChannelShuffle(groups): channel j * groups + g is input channel g * (C // groups) + j; no"
            " kernel of its own: the kernel before stores its channels there, or the one after loads them so",
        ),
        Op(
            name="flatten",
            slot="flatten",
            role=Role.VIEW,
            args=(),
            defaults={},
            module=lambda a: "nn.Flatten()",
            needs_module=False,
            shape=_flatten_shape,
            reference=lambda x, m: f"{x}.flatten(1)",
            lowering=View(lambda v: f"{v}.flatten(1)"),
            summary="flatten all but the batch dimension (a view of the contiguous output)",
        ),
    )
}

_SIZED = re.compile(r"(dw)?conv([1-9][0-9]*)x\2")


def lookup(name: str) -> Op | None:
    """The op a spec name denotes: a fixed name, or convKxK / dwconvKxK for odd or even K."""
    if name in FIXED_OPS:
        return FIXED_OPS[name]
    match = _SIZED.fullmatch(name)
    if match is None:
        return None
    k = int(match.group(2))
    return _dwconv_op(k) if match.group(1) else _conv_op(k)


def all_names() -> list[str]:
    return sorted([*FIXED_OPS, "conv3x3", "dwconv3x3"])


@cache
def load_anchor(rank: int) -> Op:
    """The identity anchor of a chain that has only elementwise ops."""
    return Op(
        name="load",
        slot="x",
        role=Role.ANCHOR,
        args=(),
        defaults={},
        module=None,
        needs_module=False,
        shape=_same,
        reference=lambda x, m: x,
        lowering=Anchor(
            (),
            "C_in",
            ("OH = H", "OW = W") if rank == 4 else (),
            _load_loop,
            "",
            maps_channels=True,
        ),
        summary="the input tile, for chains of elementwise ops",
    )
