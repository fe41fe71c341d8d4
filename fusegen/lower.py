"""Stage 4, lower: a planned kernel becomes Triton source for the @triton.jit kernel and its launch
wrapper.

Every kernel has the same frame, which owns the offsets and masks (like Inductor's templates own
`store_output`): a 2-d output tile of BLOCK_M rows (output pixels n, oh, ow, or batch rows for a
2-d output) by BLOCK_N channels. The anchor fills `acc` inside that frame, the prologue ops rewrite
each input tile where the anchor loads it, the epilogue ops rewrite `acc`, and one `tl.store` writes
it. A kernel that a pool ends has another frame (`_pooled`): one pooled pixel a program, its rows the
pixels of that pixel's window (or of a slice of it, where programs share the windows of a small launch),
whose tiles it sums before the one store; except where the pool runs on
the anchor's input (a 1x1 conv then an average pool, `Kernel.pools_input`): the ordinary frame over the
pooled pixels, each input tile the mean of its window. An anchor that splits K
(`Anchor.split_k_loop`) lowers to two kernels in the same frame: one stores each slice of K's partial
sums, the other adds them and runs the epilogue, or runs the whole K loop itself where K has one slice.
Kernel parameters appear only when the body uses them, so no kernel has a dead parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fusegen import ops as O
from fusegen.plan import FusedOp, Kernel

INDENT = "    "
# Activations between kernels are channels-last: the tile's channel axis then has stride 1, so every
# load and store of a tile is coalesced, and a 1x1 conv reads plain rows of a GEMM operand. A kernel
# reads and writes contiguous tensors in that layout (the wrapper copies any other input once), so
# addresses need no strides: Triton sees C_in and C_out as constants and proves the alignment that
# vector loads and stores need. An anchor with strided_input (a dense conv, whose K loop gathers
# anyway) reads any layout through x's strides instead, the model's NCHW input among them.
_LAYOUT = {4: ", memory_format=torch.channels_last", 2: ""}
_CONTIGUOUS = {4: "x = x.contiguous(memory_format=torch.channels_last)", 2: "x = x.contiguous()"}
_X_STRIDES = [(f"x_stride_{d}", f"x.stride({i})") for i, d in enumerate("nchw")]
_CHANNELS = ("C_in", "C_out")


@dataclass(frozen=True)
class LoweredKernel:
    kernel_source: str
    wrapper_source: str


def _param_name(f: FusedOp, p: O.KernelParam, is_anchor: bool) -> str:
    if p.constexpr:
        return p.name if is_anchor else f"{f.slot.upper()}_{p.name}"
    return f"{f.slot}_{p.name}"


def _slotted(f: FusedOp, text: str) -> str:
    """`text` with the bare names of f's constexprs (KH, DOT_PRECISION) replaced by the slot-prefixed ones
    that an op other than the kernel's anchor takes (CONV_KH, CONV_DOT_PRECISION)."""
    for p in f.params:
        if p.constexpr:
            text = re.sub(rf"\b{p.name}\b", _param_name(f, p, is_anchor=False), text)
    return text


def _prologue_hook(prologue: tuple[FusedOp, ...]) -> O.PrologueHook:
    """The prologue's ops on each loaded input tile. A channel map among them (channel_shuffle) moves where
    the tile is loaded from (`source`): the ops before it see the stored channels, the ops after it the
    tile's own."""

    def sources(channels: str) -> list[str]:
        """The channels that each op of the prologue sees, and last the stored ones that the tile loads."""
        seen = [channels]
        for f in reversed(prologue):
            if isinstance(f.op.lowering, O.ChannelMap):
                channels = f.op.lowering.source(channels, f.slot, "C_in")
            seen.append(channels)
        return seen[::-1]

    def hook(tile: str, channels: str, channel_mask: str, inside: str | None) -> list[str]:
        lines = []
        for f, seen in zip(prologue, sources(channels)):
            if isinstance(f.op.lowering, O.ChannelMap):
                lines.append(f"# prologue: {f.op.name}, where the input tile was loaded")
                continue
            lines.append(f"# prologue: {f.op.name} on the loaded input tile")
            lines.extend(f.op.lowering.apply(tile, f.slot, seen, channel_mask))
        return lines

    return O.PrologueHook(hook, lambda channels: sources(channels)[0])


# A grouped anchor's channel blocks: each group's channels in blocks of BLOCK_N, so that no block spans two
# groups and a program's output channels read the input channels of one group
_GROUP_BLOCKS = "(GROUPS * tl.cdiv(C_out // GROUPS, BLOCK_N))"


def _frame(
    out_rank: int, loop: list[str], grouped: bool = False, row_order: tuple[str, ...] = (), pooled: bool = False
) -> list[str]:
    """The tile's offsets and masks, and the output pixel of each row where the anchor's loop uses it;
    `grouped`: the channel blocks of a grouped anchor (Anchor.grouped), each inside one group; `row_order`:
    the lines of an anchor that orders the grid's rows itself (Anchor.row_order), which set offs_m; `pooled`:
    the rows are pooled pixels (n, ph, pw) of a pool that runs on the anchor's input (Kernel.pools_input)."""
    rows = ("N * PH * PW" if pooled else "N * OH * OW") if out_rank == 4 else "N"
    places = "rows_in_order" if row_order else "offs_m"  # the tile's places in the grid's row order
    channel_blocks = _GROUP_BLOCKS if grouped else "tl.cdiv(C_out, BLOCK_N)"
    channels = (
        [
            "group = pid_n // tl.cdiv(C_out // GROUPS, BLOCK_N)",
            "offs_group_n = pid_n % tl.cdiv(C_out // GROUPS, BLOCK_N) * BLOCK_N + tl.arange(0, BLOCK_N)",
            "offs_n = group * (C_out // GROUPS) + offs_group_n",
        ]
        if grouped
        else ["offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)"]
    )
    lines = [
        "# Output tile: BLOCK_M rows x BLOCK_N channels. Every fused op uses these offsets and masks,",
        "# and the tile stays in registers until the one store.",
        "# adjacent programs share a block of rows (channel blocks fastest), so a GEMM with several",
        "# channel blocks reads its input rows from DRAM once",
        *(["# channel blocks inside one group: a program's output channels read one group's input channels"] * grouped),
        f"pid_m = tl.program_id(0) // {channel_blocks}",
        f"pid_n = tl.program_id(0) % {channel_blocks}",
        f"{places} = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        *channels,
        f"mask_m = {places} < {rows}",
        "mask_n = offs_group_n < C_out // GROUPS" if grouped else "mask_n = offs_n < C_out",
        "mask = mask_m[:, None] & mask_n[None, :]",
        *row_order,
    ]
    height, width = ("PH", "PW") if pooled else ("OH", "OW")
    pixel = (
        [
            f"n = offs_m // ({height} * {width})",
            f"{height.lower()} = offs_m // {width} % {height}",
            f"{width.lower()} = offs_m % {width}",
        ]
        if out_rank == 4
        else ["n = offs_m"]
    )
    loop_text = "\n".join(loop)
    return lines + [line for line in pixel if _used(line.split(" = ")[0], loop_text)]


def _store(channels: str, row_stride: str, value: str = "acc") -> str:
    """The one store: output row offs_m starts at offs_m * row_stride (C_out in the wrapper's own contiguous
    tensor; out_row_stride in a channel slice of a concatenation's channels-last buffer, whose first channel
    out_ptr is); `channels` are where the tile's channels go (offs_n, or a channel map's targets); `value` what it
    stores (the tile `acc`, or an expression of it)."""
    return f"tl.store(out_ptr + offs_m[:, None] * {row_stride} + {channels}[None, :], {value}, mask=mask)"


def _store_through_strides(channels: str, pixels: str) -> list[str]:
    """The one store, into an output of any layout through its strides (the model's output, NCHW, or a
    channel slice of it): rows offs_m are (image, pixel) of `pixels` pixels an image. Where a tile's rows
    lie in one image (ROWS_IN_ONE_IMAGE), the image is one number and the pixels offs_m less a number,
    consecutive as Triton sees them: an NCHW store is then as coalesced as a channels-last one."""
    return [
        "if ROWS_IN_ONE_IMAGE:",
        f"    image = pid_m * BLOCK_M // ({pixels})",
        f"    out_rows = image * out_stride_n + (offs_m - image * ({pixels})) * out_stride_p",
        "else:",
        f"    out_rows = offs_m // ({pixels}) * out_stride_n + offs_m % ({pixels}) * out_stride_p",
        f"tl.store(out_ptr + out_rows[:, None] + {channels}[None, :] * out_stride_c, acc, mask=mask)",
    ]


def _pooled_pixels(height: str, width: str) -> list[str]:
    """Wrapper lines of a pooled kernel: its output pixels, and torch's error where the window (`height` x
    `width`, the pool's constexprs) does not fit."""
    return [
        f"PH, PW = OH // {height}, OW // {width}",
        "if PH == 0 or PW == 0:",
        f'    raise ValueError(f"a {{{height}}}x{{{width}}} pooling window does not fit in {{OH}}x{{OW}} pixels")',
    ]


def _window_names(pool: FusedOp | None) -> tuple[str, str] | None:
    """The names of the pool's window height and width in the kernel and its wrapper, from its slot: POOL_H,
    or POOL2_H for a pool after a maxpool (whose slot is pool); None without a pool."""
    return tuple(_param_name(pool, p, is_anchor=False) for p in pool.params) if pool else None


def _pooled(tile: list[str], height: str, width: str) -> list[str]:
    """The frame of a kernel that a pool ends: a program's output is one pooled pixel (n, ph, pw) for
    BLOCK_N channels, and its tile's rows are the pixels of that pixel's pooling window (`height` x
    `width`), BLOCK_M at a time. `tile` (the anchor's loop and the epilogue) leaves each window tile in
    `acc`. Where few pooled pixels would leave most of the GPU idle (a global pool at a small batch),
    several programs share a window (program axis 1, runtime.window_slice): each sums WINDOW_SLICE of its
    pixels, and window_slices_sum adds the slices' sums."""
    return [
        "# Output tile: one pooled pixel x BLOCK_N channels. Its rows are the pixels of the pooling window,",
        "# BLOCK_M at a time; every fused op uses these offsets and masks, and the window's tiles are summed",
        "# in registers until the one store. Channel blocks are fastest, so adjacent programs share a window.",
        "pid_m = tl.program_id(0) // tl.cdiv(C_out, BLOCK_N)",
        "pid_n = tl.program_id(0) % tl.cdiv(C_out, BLOCK_N)",
        "offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "mask_n = offs_n < C_out",
        "ph = pid_m // PW % PH",
        "pw = pid_m % PW",
        "# the image of every row",
        "n = pid_m // (PH * PW) + tl.zeros((BLOCK_M,), dtype=tl.int32)",
        *O.WINDOW_SLICE_LINES,
        "pooled = tl.zeros((BLOCK_N,), dtype=tl.float32)",
        f"for p0 in range(split * WINDOW_SLICE, tl.minimum((split + 1) * WINDOW_SLICE, {height} * {width}), BLOCK_M):",
        "    offs_m = p0 + tl.arange(0, BLOCK_M)  # pixels of the window",
        f"    mask_m = offs_m < {height} * {width}",
        "    mask = mask_m[:, None] & mask_n[None, :]",
        f"    oh = ph * {height} + offs_m // {width}",
        f"    ow = pw * {width} + offs_m % {width}",
        *(INDENT + line for line in tile),
        "    # pool: the sum of the window's rows",
        "    pooled += tl.sum(tl.where(mask, acc, 0.0), axis=0)",
        "if SPLIT_WINDOW:  # the slice's sum, for window_slices_sum to add to the others' in order",
        "    tl.store(partial_ptr + (split * N * PH * PW + pid_m) * C_out + offs_n, pooled, mask=mask_n)",
        "else:",
        f"    tl.store(out_ptr + pid_m * C_out + offs_n, pooled / ({height} * {width}), mask=mask_n)",
    ]


# Split K: the first kernel's program axis 1 is its slice of K, whose partial sums it stores in a
# [SPLIT_K, rows, C_out] tensor; the second adds them up.
_SLICE = [
    "# this program's slice of K (program axis 1): K_SLICE of its products from split * K_SLICE",
    "split = tl.program_id(1)",
]


def _partial_offsets(rows: str) -> str:
    return f"partial_ptr + split * {rows} * C_out + offs_m[:, None] * C_out + offs_n[None, :]"


def _sum_slices(rows: str) -> list[str]:
    return [
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "# in slice order, so that every call adds them the same way (a CUDA graph replay equals a direct run)",
        "for split in tl.static_range(SPLIT_K):",
        f"    acc += tl.load({_partial_offsets(rows)}, mask=mask, other=0.0)",
    ]


# A stats_only kernel's anchor: its input tile, rows x_row_stride apart (a concatenation's prefix has the
# buffer's channels between its rows)
_STATS_ONLY_LOAD = [
    "acc = tl.load(x_ptr + offs_m[:, None] * x_row_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)"
]


def _tile_stats(channels: str) -> list[str]:
    """Training mode: statistics of the output tile for the BatchNorm that follows in the next kernel, at the
    output's `channels`. The deviations are taken from the tile's own mean, so merging the tiles later does
    not cancel."""
    return [
        "# per-channel statistics of this tile for the next kernel's BatchNorm (training mode)",
        "tile_rows = tl.sum(mask_m.to(tl.float32), axis=0)",
        "tile_sum = tl.sum(tl.where(mask, acc, 0.0), axis=0)",
        "tile_deviation = tl.where(mask, acc - (tile_sum / tile_rows)[None, :], 0.0)",
        f"tl.store(tile_sum_ptr + pid_m * C_out + {channels}, tile_sum, mask=mask_n)",
        f"tl.store(tile_m2_ptr + pid_m * C_out + {channels}, tl.sum(tile_deviation * tile_deviation, axis=0), mask=mask_n)",
    ]


def _used(name: str, body: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", body) is not None


def _produced(kernel: Kernel) -> list[str]:
    """The producer's lines: its anchor computes the anchor's input tile (in a K loop: `a` for channels
    offs_k; at a tap: `x_tap` for channels offs_n), its elementwise ops rewrite it. Its constexprs carry
    its slot (CONV_KH), the kernel's anchor owns the bare names."""
    producer = kernel.producer[0]
    lowering: O.Anchor = producer.op.lowering
    produce, tile, channels, channel_mask = (
        (lowering.produce_tap, "x_tap", "offs_n", "mask_n")
        if kernel.producer_at_taps
        else (lowering.produce, "a", "offs_k", "mask_k")
    )
    lines = [f"# producer: {producer.op.summary}"]
    lines += produce(producer.slot, _prologue_hook(kernel.prologue))
    for f in kernel.producer[1:]:
        lines.append(f"# producer: {f.op.name}")
        lines += f.op.lowering.apply(tile, f.slot, channels, channel_mask)
    return _slotted(producer, "\n".join(lines)).split("\n")


def _out_dims(kernel: Kernel) -> list[str]:
    """Wrapper lines for C_out, OH and OW: the anchor's, except that with a producer in its K loop the
    output pixels are the producer's (its consumer keeps them: stride 1)."""
    pixels = kernel.producer[0] if kernel.producer and not kernel.producer_at_taps else kernel.anchor
    return [
        f"C_out = {kernel.anchor.op.lowering.out_channels.format(m=kernel.anchor.slot)}",
        *(line.format(m=pixels.slot) for line in pixels.op.lowering.out_pixels),
    ]


# a wrapper expression, the blocks it returns, and the launch options it returns after them
TileRule = tuple[str, tuple[str, ...], tuple[str, ...]]


def _tile_rule(kernel: Kernel) -> TileRule | None:
    """The wrapper expression that sets the block sizes, and the launch options it also returns: in a
    kernel with a producer, the rule of the pair (a K-loop producer's, a tap consumer's), else the
    anchor's; None where neither has one."""
    if kernel.producer_at_taps:
        anchor: O.Anchor = kernel.anchor.op.lowering
        return anchor.consume_taps_tile.format(m=kernel.anchor.slot), O.TILE_BLOCKS, anchor.consume_taps_tile_options
    if kernel.producer:
        producer = kernel.producer[0]
        lowering: O.Anchor = producer.op.lowering
        return lowering.produce_tile.format(m=producer.slot), O.TILE_BLOCKS, lowering.produce_tile_options
    anchor: O.Anchor = kernel.anchor.op.lowering
    if kernel.pools_input:
        return anchor.pool_input_tile, anchor.tile_blocks, anchor.tile_options
    return (anchor.tile, anchor.tile_blocks, anchor.tile_options) if anchor.tile else None


def _block_lines(rule: TileRule | None, out_rank: int, body_text: str, own_blocks: dict[str, str]) -> list[str]:
    """Wrapper lines that set the block sizes: the kernel's tile rule, or defaults overridden by the
    anchor's own (which come last, in its order: one may read another, or a default)."""
    if rule:
        expression, blocks, options = rule
        return [f"{', '.join([*blocks, *options])} = {expression}"]
    default_blocks = {
        "BLOCK_M": "64" if out_rank == 4 else "min(64, max(16, next_power_of_2(N)))",
        "BLOCK_N": "min(64, max(16, next_power_of_2(C_out)))",
    }
    if _used("BLOCK_K", body_text):
        default_blocks["BLOCK_K"] = "32"
    values = {**{b: v for b, v in default_blocks.items() if b not in own_blocks}, **own_blocks}
    return [f"{name} = {value}" for name, value in values.items()]


# A kernel parameter and the wrapper expression that feeds it
Param = tuple[str, str]


def _used_by(body: list[str], params: list[Param]) -> list[Param]:
    """The params that a kernel body uses, in order: no kernel has a dead parameter."""
    text = "\n".join(body)
    return [p for p in params if _used(p[0], text)]


def _kernel_source(
    name: str, comments: list[str], body: list[str], positional: list[Param], keyword: list[Param]
) -> list[str]:
    """The @triton.jit kernel `name`: `body` after the wait of a dependent launch (_PDL)."""
    params = [name for name, _ in _used_by(body, positional)]
    params += [f"{name}: tl.constexpr" for name, _ in _used_by(body, keyword)] + ["LAUNCH_PDL: tl.constexpr"]
    return [*comments, "@triton.jit", f"def {name}({', '.join(params)}):", *(INDENT + line for line in [*O.PDL, *body])]


def _launch(
    name: str, grid: str, body: list[str], positional: list[Param], keyword: list[Param], options: tuple[str, ...]
) -> list[str]:
    """Wrapper lines that launch the kernel `name` whose body is `body`."""
    return [
        f"LAUNCH_PDL = launch_pdl(x, {grid})",
        f"{name}[{grid}](",
        *(INDENT + f"{value}," for _, value in _used_by(body, positional)),
        *(INDENT + f"{param}={value}," for param, value in _used_by(body, keyword)),
        INDENT + "LAUNCH_PDL=LAUNCH_PDL,",
        # the launch options (num_warps, num_stages) that the tile rule set
        *(INDENT + f"{option}={option}," for option in options),
        INDENT + "launch_pdl=LAUNCH_PDL,",
        ")",
    ]


def _splits_k(kernel: Kernel) -> bool:
    """Whether the kernel's anchor may split K (Anchor.split_k_loop, Kernel.splits_k): its own loop on its own
    input, the tile its frame's, no pool in it."""
    return (
        kernel.splits_k
        and not (kernel.producer or kernel.producer_at_taps or kernel.pool or kernel.pools_input)
        and not (kernel.stats_only or kernel.slices_windows or kernel.sums_windows)
    )


def lower(kernel: Kernel) -> LoweredKernel:
    anchor: O.Anchor = kernel.anchor.op.lowering
    out_rank = anchor.out_rank
    pool_window = _window_names(kernel.pool)  # (height, width) names, or None
    pixels = "PH * PW" if kernel.pool else "OH * OW"  # an image's output pixels (a 4-d output)
    rows = f"N * {pixels}" if out_rank == 4 else "N"
    if kernel.producer_at_taps:
        loop = anchor.consume_taps(kernel.anchor.slot, _produced(kernel))
    elif kernel.producer:
        loop = anchor.consume(kernel.anchor.slot, _produced(kernel))
    elif kernel.stats_only:
        loop = _STATS_ONLY_LOAD
    elif kernel.pools_input:
        loop = anchor.pool_input(kernel.anchor.slot, _prologue_hook(kernel.prologue), *pool_window)
    elif kernel.slices_windows:
        loop = anchor.slice_loop(kernel.anchor.slot, _prologue_hook(kernel.prologue))
    else:
        loop = anchor.loop(kernel.anchor.slot, _prologue_hook(kernel.prologue))
    # split K: a first kernel (`slices`) runs the loop over each slice of K, and where there is more than one
    # slice this one adds their sums
    split_k = _splits_k(kernel)
    slices = []
    if split_k:
        slice_loop = anchor.split_k_loop(kernel.anchor.slot, _prologue_hook(kernel.prologue))
        slices = [*_frame(out_rank, slice_loop), *_SLICE]
        slices += [f"# anchor: {kernel.anchor.op.summary}, over one slice of K", *slice_loop]
        slices.append(f"tl.store({_partial_offsets(rows)}, acc, mask=mask)")
        loop = [
            "if SPLIT_K == 1:  # K in one slice: the whole loop here",
            *(INDENT + line for line in loop),
            "else:  # the sum of the slices' partial sums",
            *(INDENT + line for line in [*_sum_slices(rows), *anchor.split_k_finish(kernel.anchor.slot)]),
        ]
    summary = "the input tile, where it lies" if kernel.stats_only else kernel.anchor.op.summary
    tile = [f"# anchor: {summary}" + (", or the sum of its slices of K" if split_k else ""), *loop]
    channels = "offs_n"  # the output channels of the tile's columns: a channel map moves them
    for f in kernel.epilogue:
        if isinstance(f.op.lowering, O.ChannelMap):
            tile.append(f"# epilogue: {f.op.name}: where the store puts each channel")
            tile.append(f"{f.slot}_n = {f.op.lowering.target(channels, f.slot, 'C_out')}")
            channels = f"{f.slot}_n"
            continue
        tile.append(f"# epilogue: {f.op.name}")
        tile += f.op.lowering.apply("acc", f.slot, channels, "mask_n")
    pooled_frame = kernel.sums_windows
    if pooled_frame:
        assert not kernel.writes_batch_stats, "training mode gives a pool its own launch"
        assert channels == "offs_n", "check refuses a channel map in a kernel that a pool ends"
        body = _pooled(tile, *pool_window)
    else:
        stats = _tile_stats(channels) if kernel.writes_batch_stats else []
        if kernel.stats_only:
            store = []
        elif kernel.slices_windows:
            store = [
                "# the slice's sum, for window_slices_sum to add to the others' in order; or the window's mean",
                "if SPLIT_WINDOW:",
                f"    tl.store({_partial_offsets(rows)}, acc, mask=mask)",
                "else:",
                f"    {_store(channels, 'C_out', f'acc / ({anchor.window})')}",
            ]
        elif kernel.writes_model_output:
            store = _store_through_strides(channels, pixels)
        else:
            store = [_store(channels, "out_row_stride" if kernel.writes_slice else "C_out")]
        frame = _frame(out_rank, loop, anchor.grouped, anchor.row_order, pooled=kernel.pools_input)
        body = [*frame, *tile, *store, *stats]
    body_text = "\n".join([*body, *slices])  # what either kernel uses

    # Candidate parameters in signature order, each with the wrapper expression that feeds it.
    in_dims = ["N", "C_in", "H", "W"][: kernel.in_rank]
    # a pooled kernel's output has the pooled pixels (PH, PW) of the anchor's output pixels (OH, OW)
    out_dims = ["C_out", *(["PH", "PW"] if kernel.pool else ["OH", "OW"])][: out_rank - 1]
    pointers = [("x_ptr", "x"), ("x_row_stride", "x.stride(3)")]
    scalars: list[tuple[str, str]] = []
    constexprs: list[tuple[str, str]] = []
    own_blocks: dict[str, str] = {}  # block sizes an anchor chooses itself
    for f in kernel.ops:
        is_anchor = f is kernel.anchor
        for p in f.params:
            value = p.value.format(m=f.slot)
            # a value may read the op's own constexprs (dot_weight's DOT_PRECISION)
            entry = (_param_name(f, p, is_anchor), value if is_anchor else _slotted(f, value))
            if is_anchor and p.name.startswith("BLOCK_"):
                own_blocks[p.name] = entry[1]
            elif p.constexpr:
                constexprs.append(entry)
            elif p.name.endswith("_ptr"):
                pointers.append(entry)
            else:
                scalars.append(entry)
    pointers += [("partial_ptr", "partial"), ("out_ptr", "out"), ("out_row_stride", "out.stride(3)")]
    pointers += [(f"out_stride_{d}", f"out.stride({i})") for d, i in (("n", 0), ("c", 1), ("p", 3))]
    if kernel.writes_batch_stats:
        pointers += [("tile_sum_ptr", "tile_sum"), ("tile_m2_ptr", "tile_m2")]
    dims = [(d, d) for d in dict.fromkeys(in_dims + out_dims) if d not in _CHANNELS]
    # the pool's window: constexprs that the wrapper sets with the output's dims
    pool = kernel.pool
    window = [(_param_name(pool, p, is_anchor=False), p.value.format(m=pool.slot)) for p in pool.params] if pool else []
    channels = [(d, d) for d in _CHANNELS]
    rule = _tile_rule(kernel)
    blocks = [(b, b) for b in dict.fromkeys([*O.TILE_BLOCKS, *own_blocks, *(rule[1] if rule else ()), "K_SLICE"])]
    blocks.append(("SPLIT_K", "SPLIT_K"))
    if kernel.writes_model_output:  # _store_through_strides
        blocks.append(("ROWS_IN_ONE_IMAGE", f"{pixels} % BLOCK_M == 0"))
    if pooled_frame or kernel.slices_windows:  # the window's slices (_pooled, Anchor.slice_loop)
        scalars.append(("WINDOW_SLICE", "WINDOW_SLICE"))
        blocks.append(("SPLIT_WINDOW", "WINDOW_SPLITS > 1"))
    strides = _X_STRIDES if kernel.reads_any_layout else []
    positional = [p for p in pointers + dims + strides + scalars if _used(p[0], body_text)]
    block_lines = _block_lines(rule, out_rank, body_text, own_blocks)
    if pooled_frame:
        # a program's rows are one pooling window's pixels, 64 a tile (the last 1x1 convs with their pools
        # on an H200: 64 x 128 tiles were the fastest at batch 10 and 128). Not fewer for a small window:
        # with 16 rows, a conv3x3's K loop pipelined in 3 stages on 4 warps gave wrong sums on an H200
        block_lines.append("BLOCK_M = 64  # rows: pixels of one pooling window, 64 a tile")
    # a pooled kernel: one pooled pixel a program; a grouped anchor: each group's channels in blocks
    row_blocks = f"cdiv({rows}, 1)" if pooled_frame else f"cdiv({rows}, BLOCK_M)"
    # (a grid dimension must be visibly positive: max(1, GROUPS), though a module's groups is 1 at least)
    channel_blocks = "max(1, GROUPS) * cdiv(C_out // GROUPS, BLOCK_N)" if anchor.grouped else "cdiv(C_out, BLOCK_N)"
    # a constexpr that another wrapper expression reads (dot_weight and gemm_tile read DOT_PRECISION, the
    # grid a grouped anchor's GROUPS) is a wrapper variable, set first
    read = "\n".join([*(value for _, value in positional), *block_lines, channel_blocks])
    # the window's constexprs are wrapper variables too, set with the output's dims (anchor_dims below)
    window_names = {name for name, _ in window}
    variables = {name for name, _ in constexprs if _used(name, read)} | window_names
    variable_lines = [f"{name} = {value}" for name, value in constexprs if name in variables - window_names]
    constexprs = [(name, name if name in variables else value) for name, value in constexprs]
    keyword = [p for p in channels + constexprs + blocks if _used(p[0], body_text)]

    fused = " -> ".join(f.op.name for f in kernel.ops if f.op.name != "load") or "copy"
    if kernel.pools_input:
        fused += f" (the {kernel.pool.op.name} on the {kernel.anchor.op.name}'s input: the two commute)"
    if kernel.writes_batch_stats:
        fused += " (training mode: with the output's batch statistics)"
    sources = [f"# {source}" for source in kernel.sources]
    kernel_lines = []
    if split_k:
        comment = (
            f"# {kernel.anchor.op.name} over slices of K: each slice's partial sums, for {kernel.name}_kernel to add."
        )
        kernel_lines += [
            *_kernel_source(f"{kernel.name}_slices_kernel", [comment, *sources], slices, positional, keyword),
            "",
            "",
        ]
        fused += f" (adding up {kernel.name}_slices_kernel's partial sums first)"
    header = f"# {fused}: one kernel, one store{' per output' if kernel.writes_batch_stats else ''}."
    if kernel.stats_only:
        header = "# the batch statistics of the input, read where it lies (training mode): one kernel."
    kernel_lines += _kernel_source(f"{kernel.name}_kernel", [header, *sources], body, positional, keyword)

    # The launch wrapper: output shape, block sizes, grid, launch.
    modules = [f.slot for f in kernel.module_ops]
    anchor_dims = _out_dims(kernel)
    if kernel.producer_at_taps:
        producer = kernel.producer[0]
        anchor_dims += [line.format(m=producer.slot) for line in producer.op.lowering.produce_tap_guard]
    elif kernel.producer:
        anchor_dims += [line.format(m=kernel.anchor.slot) for line in anchor.consume_guard]
    if kernel.pool:
        anchor_dims += [f"{name} = {value}" for name, value in window] + _pooled_pixels(*pool_window)
    out_shape = ", ".join(["N", *out_dims])
    inputs = ["x", "x_stats"] if kernel.reads_batch_stats else ["x"]
    setup = [line.format(m=f.slot) for f in kernel.prologue if f.elementwise for line in f.elementwise.setup]
    # the kernel computes in float32 and its store converts to the output's dtype: an activation for a
    # later kernel may be stored narrower (the model's activation_dtype), the model's output is float32
    out_dtype = ["out_dtype=torch.float32"] if kernel.stores_activations else []
    given_out = ["out=None"] if kernel.writes_given_out else []
    out_layout = _LAYOUT[out_rank]
    if kernel.writes_model_output:  # the launch that stores the model's output asks for torch's layout
        given_out.append("out_layout=torch.channels_last")
        out_layout = ", memory_format=out_layout"
    new_out = f"torch.empty(({out_shape}), device=x.device, dtype={'out_dtype' if out_dtype else 'torch.float32'}{out_layout})"
    if kernel.writes_slice:  # `into`: (a concatenation's buffer, the index of this output's slice)
        given_out.append("into=None")
        new_out = f"({new_out} if into is None else concat_slice(into, {out_shape}, x.device))"
    if kernel.stats_only:
        # x where it lies if its pixels are rows of channels one stride apart (a concatenation's prefix)
        layout, allocate, checked = "x = pixel_rows(x)", [], "x"
    else:
        layout = None if kernel.reads_any_layout else _CONTIGUOUS[kernel.in_rank]
        # a given `out` is a CUDA graph's copy of this launch's output, made by this wrapper for the same x
        allocate = [f"out = {new_out} if out is None else out" if kernel.writes_given_out else f"out = {new_out}"]
        checked = "x, out"
    wrapper = [
        f"def {kernel.name}({', '.join([*inputs, *modules, *out_dtype, *given_out])}):",
        *([INDENT + layout] if layout else []),
        INDENT + f"{', '.join(in_dims)} = x.shape",
        *(INDENT + line for line in anchor_dims + allocate),
        INDENT + f"check_32bit_offsets({checked})",
        *(INDENT + line for line in variable_lines + block_lines),
    ]
    tiles = f"{row_blocks} * {channel_blocks}"
    if split_k:  # the slices kernel launches the same tiles for each slice of K
        wrapper.append(INDENT + f"tiles = {tiles}")
        tiles = "tiles"
    # the pixels of a pooling window, and the window's pixels a program sums at a time
    window_pixels, window_block = (
        (f"{pool_window[0]} * {pool_window[1]}", "BLOCK_M") if pooled_frame else (anchor.window, "BLOCK_P")
    )
    if pooled_frame or kernel.slices_windows:
        wrapper += [
            INDENT + "# programs that share each pooling window where the pooled pixels alone would not fill the GPU",
            INDENT + f"WINDOW_SLICE = window_slice({tiles}, {window_pixels}, {window_block})",
            INDENT + f"WINDOW_SPLITS = cdiv({window_pixels}, WINDOW_SLICE)",
            INDENT + "# the slices' sums (a kernel that sums whole windows stores into out and reads no partial)",
            INDENT
            + "partial = out if WINDOW_SPLITS == 1 else "
            + f"torch.empty((WINDOW_SPLITS, {rows}, C_out), device=x.device, dtype=torch.float32)",
            INDENT + f"grid = ({tiles}, WINDOW_SPLITS)",
        ]
    else:
        wrapper += [INDENT + f"grid = ({tiles},)"]
    if kernel.writes_batch_stats:
        wrapper += [
            INDENT + f"tile_sum = torch.empty((cdiv({rows}, BLOCK_M), C_out), device=x.device, dtype=torch.float32)",
            INDENT + "tile_m2 = torch.empty_like(tile_sum)",
        ]
    options = rule[2] if rule else ()
    wrapper += [INDENT + line for line in setup]
    if split_k:
        depth = anchor.split_k_depth
        wrapper += [
            INDENT + "# split K: a program for each slice of K_SLICE of a tile's products, where the tiles alone",
            INDENT + "# would leave most SMs idle; the slices kernel stores each slice's sums, this one adds them",
        ]
        if "K_SLICE" not in (rule[1] if rule else ()):
            wrapper.append(INDENT + f"K_SLICE = k_slice(tiles, {depth}, BLOCK_K)")
        wrapper += [
            INDENT + f"SPLIT_K = cdiv({depth}, K_SLICE)",
            INDENT + "# the slices' sums (with one slice the kernel reads none, and takes `out` in their place)",
            INDENT
            + "partial = out if SPLIT_K == 1 else "
            + f"torch.empty((SPLIT_K, {rows}, C_out), device=x.device, dtype=torch.float32)",
            INDENT + "if SPLIT_K > 1:",
            INDENT * 2 + "slices_grid = (tiles, SPLIT_K)",
            *(
                INDENT * 2 + line
                for line in _launch(f"{kernel.name}_slices_kernel", "slices_grid", slices, positional, keyword, options)
            ),
        ]
    wrapper += [INDENT + line for line in _launch(f"{kernel.name}_kernel", "grid", body, positional, keyword, options)]
    if pooled_frame or kernel.slices_windows:
        wrapper += [INDENT + "if WINDOW_SPLITS > 1:", INDENT * 2 + f"window_slices_sum(partial, out, {window_pixels})"]
    result = "x" if kernel.stats_only else kernel.view.op.lowering.expr("out") if kernel.view else "out"
    if kernel.writes_batch_stats:
        result += f", (tile_sum, tile_m2, BLOCK_M, {rows})"
    wrapper.append(INDENT + f"return {result}")
    return LoweredKernel("\n".join(kernel_lines), "\n".join(wrapper))
