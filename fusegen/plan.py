"""Stage 3, plan: each checked chain becomes a launch of one fused kernel (or, for a bare view, none).

The kernel IR is small on purpose: a kernel is a prologue (elementwise ops applied to each input tile
as it is loaded), optionally a producer (an anchor and the elementwise ops after it that compute the
anchor's input in registers: a depthwise conv inside a 1x1 conv's K loop, or a 1x1 conv at each tap of
a depthwise conv), one anchor (the loop nest that produces the output tile), an epilogue (elementwise
ops on the fp32 accumulator), optionally a pool (the tiles of each pooling window summed in registers,
so only the pooled pixels are stored) and an optional view of the output.
Chains with the same structure share one kernel definition. (An anchor that splits its K loop, a linear
layer or a KxK conv, lowers to two launches of one wrapper where K has several slices: lower's concern; the
plan only marks the kernels whose launches can split, `Kernel.splits_k`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Union

from fusegen import ops as O
from fusegen.check import Model
from fusegen.graph import Branch, Chain, Graph, Loop, Node, Value, walk


@dataclass(frozen=True)
class FusedOp:
    op: O.Op
    slot: str  # unique inside its kernel: names the op's kernel parameters and its wrapper argument

    @property
    def params(self) -> tuple[O.KernelParam, ...]:
        lowering = self.op.lowering
        return lowering.params if isinstance(lowering, (O.Anchor, O.Elementwise, O.ChannelMap, O.Pool)) else ()

    @property
    def elementwise(self) -> O.Elementwise | None:
        """The lowering of an elementwise op (None for an anchor or a view)."""
        return self.op.lowering if isinstance(self.op.lowering, O.Elementwise) else None

    @property
    def reads_module(self) -> bool:
        """Its wrapper takes the op's module (some parameter comes from `{m}`)."""
        return any("{m}" in p.value for p in self.params)


@dataclass(frozen=True)
class Kernel:
    name: str  # what it fuses: "dwconv3x3_bn_relu"
    prologue: tuple[FusedOp, ...]
    anchor: FusedOp
    epilogue: tuple[FusedOp, ...]
    view: FusedOp | None
    in_rank: int
    sources: tuple[str, ...]  # the spec chains it comes from: "line 9: dwconv3x3(...) -> bn(inp) -> relu"
    # training mode: also store per-tile statistics of the output for the BatchNorm that follows
    writes_batch_stats: bool = False
    # a producer anchor and the elementwise ops after it: the anchor's input tile, made in registers (in
    # its K loop, or at each of its taps where the anchor consumes taps)
    producer: tuple[FusedOp, ...] = ()
    # eval mode: some launch stores an activation for a later kernel, at the model's activation_dtype
    # (its wrapper takes out_dtype; the model's output stays float32)
    stores_activations: bool = False
    # eval mode's first launch, on the model's input in any layout: a CUDA graph replay of a large input
    # runs it outside the graph, into the graph's copy of its output (its wrapper takes `out`)
    writes_given_out: bool = False
    # a pool that ends the kernel (its lowering is the op's Pool): the tile's rows are a pooling window
    pool: FusedOp | None = None
    # some launch stores its output into a channel slice of a concatenation's buffer (its wrapper takes
    # `into`, and the store steps through the buffer's rows)
    writes_slice: bool = False
    # training mode, an identity anchor: stores only the batch statistics of its input, which it reads where
    # it lies (a concatenation's prefix: no copy); the wrapper returns the input and the statistics
    stats_only: bool = False
    # some launch stores the model's 4-d output (or a channel slice of it) in torch's default layout, NCHW:
    # the store steps through the output's strides (its wrapper takes `out_layout`), so ModelNew returns it
    # without a copy out of channels-last
    writes_model_output: bool = False
    # some launch's K may be cut into slices (Anchor.split_k_loop), at the spec's default arguments: the
    # lowering adds the slices kernel
    splits_k: bool = False

    @property
    def ops(self) -> tuple[FusedOp, ...]:
        """Prologue, producer, anchor, epilogue and pool, in chain order."""
        return (*self.prologue, *self.producer, self.anchor, *self.epilogue, *([self.pool] if self.pool else []))

    @property
    def pools_input(self) -> bool:
        """The pool runs on the anchor's input (`pools_input`), in the ordinary frame over the pooled pixels."""
        return pools_input(self.anchor, self.producer, self.epilogue, self.pool)

    @property
    def sums_windows(self) -> bool:
        """The pool ends the kernel in its own frame: each program sums (a slice of) a pooling window's
        pixels, and its wrapper may add the slices with the window_slices_sum helper."""
        return self.pool is not None and not self.pools_input

    @property
    def slices_windows(self) -> bool:
        """A pool anchor whose windows several programs may share (Anchor.slice_loop): nothing follows it in
        its kernel but a view, and it stores no batch statistics and no channel slice, so its wrapper may add
        the slices' sums with the window_slices_sum helper."""
        lowering = self.anchor.op.lowering
        return (
            isinstance(lowering, O.Anchor)
            and lowering.slice_loop is not None
            and not (self.epilogue or self.producer or self.pool or self.writes_batch_stats or self.writes_slice)
        )

    @property
    def producer_at_taps(self) -> bool:
        """The producer runs at each tap of a depthwise anchor (conv1x1 -> dwconv), not in a K loop."""
        return bool(self.producer) and self.anchor.op.lowering.consume_taps is not None

    @property
    def module_ops(self) -> tuple[FusedOp, ...]:
        """Ops whose module the wrapper takes, in chain order."""
        return tuple(f for f in self.ops if f.reads_module)

    @property
    def reads_any_layout(self) -> bool:
        """The kernel takes x in any layout (through its strides), so its wrapper copies nothing."""
        return self.anchor.op.lowering.strided_input and not self.producer

    @property
    def reads_batch_stats(self) -> bool:
        """Training mode: the prologue normalises with batch statistics that the previous kernel stored."""
        return any(f.elementwise and f.elementwise.needs_batch_stats for f in self.prologue)


@dataclass(frozen=True)
class Launch:
    kernel: Kernel
    # what the wrapper takes for each of kernel.module_ops: the module's path, or the value the op reads
    # (add's other operand)
    args: tuple[str | Value, ...]
    comment: str
    input: Value
    output: Value
    stores_activation: bool = False  # its output feeds a later kernel at the model's activation_dtype
    # its output is part `index` of a concatenation: (the concatenated value, index), stored into its slice;
    # in a dense loop the index is the loop's ("index", counting its iterations from 1)
    into: tuple[Value, int | str] | None = None
    # it stores the model's output (or its part of it) in NCHW (Kernel.writes_model_output)
    output_nchw: bool = False


@dataclass(frozen=True)
class ViewOnly:
    op: O.Op
    comment: str
    input: Value
    output: Value


@dataclass(frozen=True)
class ConcatStep:
    """`cat(...)`: the launches that made `parts` stored them into their channel slices of one buffer,
    which is `output`; nothing runs here."""

    parts: tuple[Value, ...]
    comment: str
    output: Value


@dataclass(frozen=True)
class LoopStep:
    """A graph Loop's steps, run once per child of its sequential module. It reads like the Loop (input,
    carried, output, modules, start, variable), with steps for its body."""

    loop: Loop
    body: tuple["Step", ...]

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "loop":  # copy and pickle look before the fields exist
            raise AttributeError(name)
        return getattr(self.loop, name)


@dataclass(frozen=True)
class BranchStep:
    """A graph Branch's steps, one body or the other. It reads like the Branch (attribute, merges), with
    steps for its bodies."""

    branch: Branch
    then: tuple["Step", ...]
    orelse: tuple["Step", ...]

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "branch":  # copy and pickle look before the fields exist
            raise AttributeError(name)
        return getattr(self.branch, name)


Step = Union[Launch, ViewOnly, ConcatStep, LoopStep, BranchStep]


def launches(steps) -> Iterator[Launch]:
    """The launches of steps, inside loops and branches too, in program order."""
    for step in steps:
        if isinstance(step, Launch):
            yield step
        elif isinstance(step, LoopStep):
            yield from launches(step.body)
        elif isinstance(step, BranchStep):
            yield from launches(step.then)
            yield from launches(step.orelse)


@dataclass(frozen=True)
class Plan:
    model: Model
    kernels: tuple[Kernel, ...]
    steps: tuple[Step, ...]  # eval mode
    # training mode, where it differs (a model with BatchNorm); None: the same steps
    train_steps: tuple[Step, ...] | None


@dataclass
class _LoopGroups:
    loop: Loop
    groups: list


@dataclass
class _BranchGroups:
    branch: Branch
    then: list
    orelse: list


@dataclass
class _Group:
    """The ops of one launch, before its kernel is built."""

    prologue: list[Node]
    anchor: Node | None
    epilogue: list[Node]
    view: Node | None
    chains: list[Chain]  # where its ops are written, first the one that names the launch
    input: Value
    output: Value
    writes_batch_stats: bool = False
    producer: list[Node] = field(default_factory=list)
    pool: Node | None = None
    into: tuple[Value, int | str] | None = None  # stores its output into a concatenation's slice (Launch.into)
    stats_only: bool = False  # Kernel.stats_only: its output is its input, with batch statistics


def is_concat(chain: Chain) -> bool:
    return chain.ops[0].op.role is O.Role.CONCAT


def _writes_slice(group: _Group) -> bool:
    """Whether a launch can store its output into a channel slice of another buffer: its frame's one store
    of a 4-d tile (a pool's frame or a view store otherwise)."""
    return (
        (group.pool is None or pools_input(group.anchor, group.producer, group.epilogue, group.pool))
        and group.view is None
        and len(group.output.shape) == 4
    )


def _concat_groups(groups: list, uses) -> list:
    """The concatenations of one body's groups: each part's launch stores into its slice of the
    concatenation's buffer where it made the part in this body, only the concatenation reads the part and
    its kernel can; otherwise a copy kernel stores the part there. `uses(value)` counts a value's readers."""
    made_by = {id(g.output): g for g in groups if isinstance(g, _Group)}
    planned: list = []
    for g in groups:
        if not (isinstance(g, Chain) and is_concat(g)):
            planned.append(g)
            continue
        parts = list(Graph.reads(g))
        for index, part in enumerate(parts):
            producer = made_by.get(id(part))
            if producer is None or producer.into is not None or uses(part) != 1 or not _writes_slice(producer):
                # a copy into the slice: of the model's input, a value made outside this body or read elsewhere
                producer = _Group([], None, [], None, [g], part, Value(part.name, part.shape))
                planned.append(producer)
                parts[index] = producer.output
            producer.into = (g.output, index)
        planned.append(_ConcatGroup(g, tuple(parts)))
    return planned


def _dense_groups(loop: Loop, body: list, before: list, uses) -> list:
    """A dense loop's groups, after the groups `before` it in its body: the launch that makes its input
    stores it into slice 0 of the loop's buffer (a copy kernel where it cannot), then the loop, whose body
    stores what each iteration makes into the iteration's slice (likewise); each iteration reads the
    buffer's channels so far in place."""

    def into(value: Value, groups: list, index: int | str) -> list:
        """The copy group, if one is needed, that stores `value` into slice `index`."""
        producer = next((g for g in groups if isinstance(g, _Group) and g.output is value), None)
        copy = producer is None or producer.into is not None or uses(value) != 1 or not _writes_slice(producer)
        if copy:
            producer = _Group([], None, [], None, [next(walk(loop.body))], value, Value(value.name, value.shape))
        producer.into = (loop.output, index)
        return [producer] if copy else []

    return [*into(loop.input, before, 0), _LoopGroups(loop, [*body, *into(loop.part, body, "index")])]


@dataclass
class _ConcatGroup:
    chain: Chain  # the cat
    parts: tuple[Value, ...]  # the values stored into its slices, in order


def pools_input(anchor, producer, epilogue, pool) -> bool:
    """Whether the average pool that ends an anchor's kernel runs on the anchor's input instead: a 1x1 conv
    with nothing between it and the pool (`Anchor.pool_input`: W * mean(x) = mean(W * x) at every pixel), so
    the GEMM has a window's fewer rows. Its kernel keeps the ordinary frame over the pooled pixels, which
    stores per-tile statistics and channel slices like any other: training mode keeps it one launch.
    Fused ops or nodes alike (both have `.op`)."""
    return pool is not None and not producer and not epilogue and anchor.op.lowering.pool_input is not None


def _split(chain: Chain):
    """(prologue, producer, anchor, epilogue, pool, view) of a chain whose legality check already
    passed. Of two anchors, a second that is a pool ends the first's kernel; otherwise the first and
    the elementwise ops after it are the second's producer."""
    uses = list(chain.ops)
    view = uses.pop() if uses and uses[-1].op.role is O.Role.VIEW else None
    anchors = [i for i, u in enumerate(uses) if u.op.role is O.Role.ANCHOR]
    if not anchors:
        return [], [], None, uses, None, view
    pool = uses.pop(anchors.pop()) if len(anchors) == 2 and uses[anchors[-1]].op.lowering.pool else None
    first, last = anchors[0], anchors[-1]
    return uses[:first], uses[first:last], uses[last], uses[last + 1 :], pool, view


def why_not_fused(group: _Group, chain: Chain, graph: Graph) -> str | None:
    """Why a chain cannot join the end of the kernel that makes its input (None: it can): a chain of
    elementwise ops joins its epilogue, a pool whose windows do not overlap (with a view after it) ends it
    as a pool on the same line would (`_check_fusion`'s rule), so that the kernel stores only the pooled
    pixels. The spec states chains; this is the one place where fusegen fuses across them."""
    if group.pool is not None:
        return f"a pool ({group.pool.op.name}) ends the kernel that makes its input"
    if group.view is not None:
        return f"the kernel that makes its input ends with a view ({group.view.op.name})"
    uses = graph.uses(chain.input)
    if uses > 1:
        return f"its input is read {uses} times, so the kernel that makes it stores it"
    pool = _pool_chain(chain)
    if pool is None:
        return None
    anchor = group.anchor
    if anchor is None or anchor.op.lowering.out_rank != 4 or anchor.op.lowering.pool:
        return f"{pool.op.name} ends the kernel of an anchor with an image output, and that kernel has none"
    if anchor.op.lowering.pool_refusal:
        return f"{anchor.op.name} {anchor.op.lowering.pool_refusal}"
    if anchor.op.lowering.grouped:
        return f"{anchor.op.name}'s programs keep to one group of channels, not to one pooling window"
    if group.producer:
        return f"that kernel computes {group.producer[0].op.name} inside {anchor.op.name}"
    reads = next((u for u in group.epilogue if u.operands), None)
    if reads is not None:
        return f"{reads.op.name} in that kernel reads another value at pixels that a pooled kernel does not store"
    return None


def _pool_chain(chain: Chain) -> Node | None:
    """The pool of a chain that is only a pool with a kernel-ending form (avgpool, global_avgpool), and a
    view after it."""
    prologue, producer, anchor, epilogue, pool, _ = _split(chain)
    if anchor is None or anchor.op.lowering.pool is None or prologue or producer or epilogue or pool:
        return None
    return anchor


def _eval_groups(body: tuple, graph: Graph) -> list:
    """Eval mode: one launch per chain (a chain that is only a view: the Chain itself, no launch). A chain
    of elementwise ops joins the epilogue of the kernel that makes its input where why_not_fused allows
    (`out = conv2 -> bn2` then `return out -> add(identity) -> relu`), and so does a chain that is only a
    pool (`x = conv1x1 -> bn -> relu` then `x -> avgpool(7)`): that launch moves to its place.
    Loops and branches are planned body by body: nothing fuses across their edges."""
    groups: list = []
    made_by: dict[int, _Group] = {}
    for chain in body:
        if isinstance(chain, Loop):
            body = _eval_groups(chain.body, graph)
            groups += _dense_groups(chain, body, groups, graph.uses) if chain.part else [_LoopGroups(chain, body)]
            continue
        if isinstance(chain, Branch):
            groups.append(_BranchGroups(chain, _eval_groups(chain.then, graph), _eval_groups(chain.orelse, graph)))
            continue
        if is_concat(chain):
            groups.append(chain)
            continue
        prologue, producer, anchor, epilogue, pool, view = _split(chain)
        if anchor is None and not epilogue:
            groups.append(chain)
            continue
        target = made_by.get(id(chain.input))
        joins = (anchor is None and view is None) or _pool_chain(chain) is not None
        if joins and target is not None and why_not_fused(target, chain, graph) is None:
            if anchor is None:
                target.epilogue += epilogue
            else:
                target.pool, target.view = anchor, view
            target.chains.append(chain)
            target.output = chain.output
            groups.remove(target)
            groups.append(target)
            made_by[id(chain.output)] = target
            continue
        group = _Group(
            prologue, anchor, epilogue, view, [chain], chain.input, chain.output, producer=producer, pool=pool
        )
        groups.append(group)
        made_by[id(chain.output)] = group
    return _concat_groups(groups, graph.uses)


def _needs_batch_stats(use: Node) -> bool:
    return use.op.train_lowering is not None and use.op.train_lowering.needs_batch_stats


def _split_at_batch_stats(chain: Chain) -> list[Chain]:
    """Training mode: a producer that ends normalised by batch statistics (dwconv -> bn -> conv1x1)
    needs its whole output reduced before its consumer can run, so the chain becomes two launches. So
    does a pool that ends an anchor's kernel in the pooled frame: the BatchNorm before it would need the
    same, and that frame does not store the per-tile statistics that a BatchNorm after it would (a pool on
    the anchor's input, `pools_input`, has neither problem)."""
    prologue, producer, anchor, epilogue, pool, _ = _split(chain)
    if pool is not None and not pools_input(anchor, producer, epilogue, pool):
        cut = next(i for i, u in enumerate(chain.ops) if u is pool)
    elif any(_needs_batch_stats(u) for u in producer):
        cut = len(prologue) + len(producer)
    else:
        return [chain]
    between = Value(chain.output.name, chain.ops[cut - 1].out_shape)
    return [replace(chain, ops=chain.ops[:cut], output=between), replace(chain, ops=chain.ops[cut:], input=between)]


def _pieces(uses: list[tuple[Node, Chain]]) -> list[list[tuple[Node, Chain]]]:
    """Ops split before every op that needs batch statistics (except a leading one)."""
    out: list[list[tuple[Node, Chain]]] = []
    for use in uses:
        if not out or (_needs_batch_stats(use[0]) and out[-1]):
            out.append([])
        out[-1].append(use)
    return out


class _TrainingGroups:
    """Training mode: an op that normalises with batch statistics (BatchNorm) needs its whole input
    reduced first, so it cannot run in the kernel that makes that input. That kernel stores the tensor
    before it, with per-tile statistics, and the op, with the elementwise ops after it, waits on the
    value (`pending`) for the kernel that reads it: a single reader with an anchor normalises each tile
    as it loads it (its prologue). Otherwise (several readers, an op that reads another value, a view,
    a loop's or a branch's edge, the model's output) kernels of their own apply the waiting ops and
    store the value."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.groups: list = []
        # id(value) -> (value, the tensor stored for it, the ops still to apply to that tensor)
        self.pending: dict[int, tuple[Value, Value, list[tuple[Node, Chain]]]] = {}
        self.planned_uses: dict[int, int] = {}  # values that plan itself makes: read once

    def uses(self, value: Value) -> int:
        return self.planned_uses.get(id(value)) or self.graph.uses(value)

    def value(self, like: Value, shape) -> Value:
        made = Value(like.name, shape)
        self.planned_uses[id(made)] = 1
        return made

    def group(self, part, input, output, anchor=None, epilogue=(), view=None, chain=None, producer=()) -> _Group:
        chains: list[Chain] = []
        for c in [*([chain] if chain else []), *(c for _, c in part)]:
            chains += [] if any(c is seen for seen in chains) else [c]
        group = _Group(
            [u for u, _ in part], anchor, list(epilogue), view, chains, input, output, producer=list(producer)
        )
        self.groups.append(group)
        return group

    def wait(self, value: Value, stored: Value, ops: list[tuple[Node, Chain]]) -> None:
        self.pending[id(value)] = (value, stored, ops)

    def apply(self, stored: Value, ops: list[tuple[Node, Chain]], output: Value, view: Node | None = None) -> None:
        """Kernels of their own that apply `ops` to `stored`, giving `output` (then `view`)."""
        parts = _pieces(ops)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            made = output if last else self.value(output, part[-1][0].out_shape)
            self.group(part, stored, made, view=view if last else None)
            stored = made

    def materialize(self, value: Value) -> None:
        _, stored, ops = self.pending.pop(id(value))
        self.apply(stored, ops, value)

    def flush(self) -> None:
        """Every waiting op applied: nothing waits across a loop's or a branch's edge."""
        for value, _, _ in list(self.pending.values()):
            self.materialize(value)

    def join_pool(self, chain: Chain) -> bool:
        """A chain that is only a pool joins the kernel that makes its input where the pool can run on that
        kernel's anchor's input (pools_input: a 1x1 conv), as it would on the conv's line: one launch, as in
        eval mode (`bn -> relu -> conv1x1` then `avgpool(2)`, DenseNet's transitions as fusegen import
        writes them). Whether it joined."""
        pool = _pool_chain(chain)
        target = next((g for g in reversed(self.groups) if isinstance(g, _Group) and g.output is chain.input), None)
        if (
            pool is None
            or target is None
            or id(chain.input) in self.pending
            or not pools_input(target.anchor, target.producer, target.epilogue, pool)
            or why_not_fused(target, chain, self.graph) is not None
        ):
            return False
        target.pool, target.view = pool, _split(chain)[5]
        target.chains.append(chain)
        target.output = chain.output
        self.groups.remove(target)  # the launch moves to the pool's place
        self.groups.append(target)
        return True

    def add(self, chain: Chain) -> None:
        if self.join_pool(chain):
            return
        # a pool left in the chain runs on its anchor's input (_split_at_batch_stats cut the others off)
        prologue, producer, anchor, epilogue, pool, view = _split(chain)
        for node in chain.ops:  # an operand is read as it is stored: its waiting ops apply first
            for operand in node.operands:
                if id(operand) in self.pending:
                    self.materialize(operand)
        if is_concat(chain):  # so is each part of a concatenation
            if id(chain.input) in self.pending:
                self.materialize(chain.input)
            self.groups.append(chain)
            return
        source, carried = chain.input, []
        waiting = self.pending.get(id(source))
        if waiting is not None:
            _, stored, ops = waiting
            single = self.uses(source) == 1
            # a channel map among them moves the anchor's loads, where its loop takes that (check's rule)
            maps = any(isinstance(node.op.lowering, O.ChannelMap) for node, _ in ops)
            loads_mapped = anchor is not None and not producer and anchor.op.lowering.maps_channels
            if (
                single
                and anchor is not None
                and not any(node.operands for node, _ in ops)
                and (loads_mapped or not maps)
            ):
                del self.pending[id(source)]
                source, carried = stored, ops
            elif single and anchor is None and view is None:
                del self.pending[id(source)]  # elementwise ops: they wait too
                self.wait(chain.output, stored, ops + [(u, chain) for u in epilogue])
                return
            else:
                self.materialize(source)
        mine = [(u, chain) for u in epilogue]
        if anchor is None:
            if not epilogue:
                self.groups.append(chain)  # a view of a stored value
            elif view is None:
                self.wait(chain.output, source, mine)
            else:
                self.apply(source, mine, chain.output, view)
            return
        parts = _pieces(carried + [(u, chain) for u in prologue]) or [[]]
        for part in parts[:-1]:
            made = self.value(chain.input, part[-1][0].out_shape)
            self.group(part, source, made)
            source = made
        first_bn = next((i for i, u in enumerate(epilogue) if _needs_batch_stats(u)), len(epilogue))
        waits = mine[first_bn:]
        stored = (
            self.value(chain.output, (epilogue[first_bn - 1] if first_bn else anchor).out_shape)
            if waits
            else chain.output
        )
        group = self.group(parts[-1], source, stored, anchor, epilogue[:first_bn], chain=chain, producer=producer)
        group.pool = pool
        if waits and view is not None:
            self.apply(stored, waits, chain.output, view)
        elif waits:
            self.wait(chain.output, stored, waits)
        else:
            group.view = view

    def body_groups(self, body: tuple, region: bool) -> list:
        """The groups of one body; a region's body applies whatever waits at its end."""
        outer, self.groups = self.groups, []
        for item in body:
            if isinstance(item, Chain):
                pieces = _split_at_batch_stats(item)
                for chain in pieces[1:]:
                    self.planned_uses[id(chain.input)] = 1
                for chain in pieces:
                    self.add(chain)
                continue
            self.flush()
            if isinstance(item, Loop):
                body = self.body_groups(item.body, region=True)
                dense = _dense_groups(item, body, self.groups, self.uses) if item.part else []
                self.groups += dense or [_LoopGroups(item, body)]
            else:
                then = self.body_groups(item.then, region=True)
                self.groups.append(_BranchGroups(item, then, self.body_groups(item.orelse, region=True)))
        if region:
            self.flush()
        elif id(self.graph.output) in self.pending:
            self.materialize(self.graph.output)
        groups, self.groups = _concat_groups(self.groups, self.uses), outer
        self.mark_batch_stats(groups)
        return groups

    def run(self) -> list:
        return self.body_groups(self.graph.body, region=False)

    def mark_batch_stats(self, groups: list) -> None:
        """A launch whose prologue starts by normalising with batch statistics makes the launch that
        stores its input, in the same body, store them too; where none does (the model's input, a value
        from outside a loop or branch such as a dense loop's concatenation so far), an identity kernel
        stores them: of a 4-d input read where it lies (Kernel.stats_only), else with a copy of it."""
        made_by = {id(g.output): g for g in groups if isinstance(g, _Group)}
        for group in [g for g in groups if isinstance(g, _Group)]:
            if not (group.prologue and _needs_batch_stats(group.prologue[0])):
                continue
            producer = made_by.get(id(group.input))
            if producer is None:
                copied = self.value(group.input, group.input.shape)
                producer = _Group([], None, [], None, group.chains[:1], group.input, copied)
                producer.stats_only = len(group.input.shape) == 4
                groups.insert(groups.index(group), producer)
                group.input = copied
                made_by[id(copied)] = producer
            producer.writes_batch_stats = True


def _slots(uses) -> list[str]:
    counts: dict[str, int] = {}
    slots = []
    for use in uses:
        counts[use.op.slot] = counts.get(use.op.slot, 0) + 1
        slots.append(use.op.slot if counts[use.op.slot] == 1 else f"{use.op.slot}{counts[use.op.slot]}")
    return slots


class _Kernels:
    """Builds kernels for groups of ops; groups with the same structure share one kernel."""

    def __init__(self, spec_name: str):
        self.spec_name = spec_name
        self.by_key: dict[tuple, Kernel] = {}

    def comment(self, chain: Chain) -> str:
        return f"{self.spec_name}:{chain.site or f'{chain.line}: {chain.text}'}"

    def launch(self, group: _Group, training: bool) -> Launch:
        chain = group.chains[0]
        in_rank = len(group.input.shape)  # elementwise ops and anchors keep the rank
        anchor = group.anchor or Node(O.load_anchor(in_rank), None, chain.ops[0].pos)
        body = [*group.prologue, *group.producer, anchor, *group.epilogue, *([group.pool] if group.pool else [])]
        ops = [u.op.train_lowered() if training else u.op for u in body]
        trained = any(op is not u.op for op, u in zip(ops, body))
        if group.pool:  # the pool lowers as the end of the anchor's kernel
            ops[-1] = replace(ops[-1], lowering=ops[-1].lowering.pool)
        if training:
            # training mode runs these steps only where BatchNorm normalises by batch statistics, which
            # amplifies the rounding of every dot before it: all dots run three TF32 products
            # (Op.with_stats_precision)
            exact = [op.with_stats_precision() for op in ops]
            trained = trained or (not group.writes_batch_stats and any(e is not op for e, op in zip(exact, ops)))
            ops = exact
        fused = [FusedOp(op, slot) for op, slot in zip(ops, _slots(body))]
        key = (
            tuple(u.op.name for u in body),
            trained,
            group.writes_batch_stats,
            in_rank,
            group.view is not None,
            group.stats_only,
        )
        if key not in self.by_key:
            if group.stats_only:  # "_stats" follows: batch_stats
                name = "batch"
            else:
                name = "_".join(u.op.name for u in body if u is not anchor or group.anchor) or anchor.op.name
            if group.view is not None:
                name += f"_{group.view.op.name}"
            name += "_stats" * group.writes_batch_stats + "_train" * trained
            if any(k.name == name for k in self.by_key.values()):
                name = f"{name}_{in_rank}d"
            at = len(group.prologue) + len(group.producer)  # the anchor's place in the body
            end = len(fused) - (1 if group.pool else 0)  # the pool's place
            self.by_key[key] = Kernel(
                name=name,
                prologue=tuple(fused[: len(group.prologue)]),
                producer=tuple(fused[len(group.prologue) : at]),
                anchor=fused[at],
                epilogue=tuple(fused[at + 1 : end]),
                pool=fused[end] if group.pool else None,
                view=FusedOp(group.view.op, group.view.op.slot) if group.view else None,
                in_rank=in_rank,
                sources=(),
                writes_batch_stats=group.writes_batch_stats,
                stats_only=group.stats_only,
            )
        for c in group.chains:
            source = f"{self.spec_name}:{c.line}: {c.text}"
            if source not in self.by_key[key].sources:
                self.by_key[key] = replace(self.by_key[key], sources=self.by_key[key].sources + (source,))
        args = tuple(
            u.operands[0] if u.op.tensor_args else u.module_path for f, u in zip(fused, body) if f.reads_module
        )
        return Launch(self.by_key[key], args, self.comment(chain), group.input, group.output, into=group.into)

    def mark(self, names: set[str], **fields) -> None:
        """Sets `fields` on the kernels named in `names` (a flag that some launch of them needs)."""
        for key, kernel in self.by_key.items():
            if kernel.name in names:
                self.by_key[key] = replace(kernel, **fields)

    def steps(self, groups: list, training: bool) -> list[Step]:
        steps: list[Step] = []
        for g in groups:
            if isinstance(g, _Group):
                steps.append(self.launch(g, training))
            elif isinstance(g, _LoopGroups):
                steps.append(LoopStep(g.loop, tuple(self.steps(g.groups, training))))
            elif isinstance(g, _BranchGroups):
                steps.append(
                    BranchStep(g.branch, tuple(self.steps(g.then, training)), tuple(self.steps(g.orelse, training)))
                )
            elif isinstance(g, _ConcatGroup):
                steps.append(ConcatStep(g.parts, self.comment(g.chain), g.chain.output))
            else:
                steps.append(ViewOnly(g.ops[-1].op, self.comment(g), g.input, g.output))
        return steps


def _store_activations(steps: list[Launch | ViewOnly], kernels: _Kernels, graph: Graph) -> list[Launch | ViewOnly]:
    """Eval mode with a narrower activation dtype: a launch stores its output in it where every step that
    reads that value is a launch that takes a narrow input there (the model returns float32; a view's
    reader is not known to), and their kernels' wrappers take the dtype. A plan with loops or branches
    keeps float32 (what crosses their edges is not followed)."""
    if any(isinstance(s, (LoopStep, BranchStep)) for s in steps):
        return steps

    def reads_narrow(step: Launch | ViewOnly | ConcatStep, value: Value) -> bool:
        if isinstance(step, (ViewOnly, ConcatStep)):
            return False
        if step.input is not value:
            return True  # an operand: loaded into float32 at the tile's offsets
        reader = step.kernel.producer[0] if step.kernel.producer else step.kernel.anchor  # the op that loads x
        return reader.op.lowering.narrow_input

    readers: dict[int, list[Launch | ViewOnly | ConcatStep]] = {}
    for step in steps:
        if isinstance(step, ConcatStep):  # its buffer is float32: the launches that make its parts store that
            for part in step.parts:
                readers.setdefault(id(part), []).append(step)
            continue
        for value in {
            id(step.input): step.input,
            **{id(a): a for a in getattr(step, "args", ()) if isinstance(a, Value)},
        }.values():
            readers.setdefault(id(value), []).append(step)
    narrow = {
        id(s)
        for s in steps
        if isinstance(s, Launch)
        and s.output is not graph.output
        and readers.get(id(s.output))
        and all(reads_narrow(r, s.output) for r in readers[id(s.output)])
    }
    kernels.mark({s.kernel.name for s in steps if id(s) in narrow}, stores_activations=True)
    return [replace(s, stores_activation=True) if id(s) in narrow else s for s in steps]


def _mark_first_launch(steps: list[Launch | ViewOnly], kernels: _Kernels, graph: Graph) -> None:
    """Eval mode: a first launch that reads the model's input in any layout, the only step that reads it,
    can run outside a CUDA graph on the caller's tensor, so that a replay need not copy the input in."""
    first = steps[0] if steps else None
    if (
        isinstance(first, Launch)
        and first.kernel.reads_any_layout
        and first.into is None
        and graph.uses(graph.input) == 1
    ):
        kernels.mark({first.kernel.name}, writes_given_out=True)


def _output_in_torch_layout(steps: list[Step], kernels: _Kernels, graph: Graph) -> list[Step]:
    """The launches that store the model's 4-d output store it in NCHW, the layout torch returns, where
    none of them runs in a loop and each has the ordinary store: then no copy out of channels-last ends
    the forward (one at about 1 TB/s on an H100: 0.26 of the basic block's 1.25 ms at batch 10). A kernel
    that reads the output or a part of it copies it, as it copies any input of another layout."""
    output = graph.output
    if len(output.shape) != 4:
        return steps

    def outside_loops(steps) -> Iterator[Step]:
        """The steps, those in the bodies of branches too, but not those in loops."""
        for step in steps:
            yield step
            if isinstance(step, BranchStep):
                yield from outside_loops(step.then)
                yield from outside_loops(step.orelse)

    # the output, and the values a branch merges into it (each body's own), inner branches' too
    outputs = {id(output)}
    for step in outside_loops(steps):  # an outer branch before the branches in its bodies
        if isinstance(step, BranchStep):
            outputs |= {id(v) for merged, *sources in step.merges if id(merged) in outputs for v in sources}

    def writes_output(s: Launch) -> bool:
        return id(s.output) in outputs or (s.into is not None and id(s.into[0]) in outputs)

    writers = [s for s in launches(steps) if writes_output(s)]
    movable = {id(s) for s in outside_loops(steps) if isinstance(s, Launch) and writes_output(s)}
    kernel = {k.name: k for k in kernels.by_key.values()}  # as marked so far (a launch holds it as built)
    # a loop's output in some body of a branch, say, or the model's input that a body passes on as it is
    made_otherwise = id(graph.input) in outputs or any(
        isinstance(s, (LoopStep, ViewOnly)) and id(s.output) in outputs for s in outside_loops(steps)
    )
    if (
        made_otherwise
        or not writers
        or any(
            id(s) not in movable
            or kernel[s.kernel.name].writes_given_out
            or kernel[s.kernel.name].stats_only
            or kernel[s.kernel.name].sums_windows
            or kernel[s.kernel.name].slices_windows
            or s.kernel.view is not None
            or s.kernel.anchor.op.lowering.row_order  # its rows are not in (image, pixel) order
            or s.kernel.anchor.op.lowering.out_rank != 4
            for s in writers
        )
    ):
        return steps
    kernels.mark({s.kernel.name for s in writers}, writes_model_output=True)

    def marked(s: Step) -> Step:
        if isinstance(s, Launch) and id(s) in movable:
            return replace(s, output_nchw=True)
        if isinstance(s, BranchStep):
            return replace(s, then=tuple(map(marked, s.then)), orelse=tuple(map(marked, s.orelse)))
        return s

    return list(map(marked, steps))


def _k_splitters(steps: list[Step], in_loop: bool = False) -> set[str]:
    """The kernels with a launch whose K its tile rule may cut into slices: an anchor that splits K, on
    enough input channels (Anchor.split_k_min_channels; in a loop, whose input may widen, on any)."""
    names = set()
    for step in steps:
        if isinstance(step, Launch):
            anchor = step.kernel.anchor.op.lowering
            if isinstance(anchor, O.Anchor) and anchor.split_k_loop is not None:
                if in_loop or step.input.shape[1] >= anchor.split_k_min_channels:
                    names.add(step.kernel.name)
        elif isinstance(step, LoopStep):
            names |= _k_splitters(list(step.body), in_loop=True)
        elif isinstance(step, BranchStep):
            names |= _k_splitters([*step.then, *step.orelse], in_loop)
    return names


def plan(model: Model, spec_name: str) -> Plan:
    graph = model.graph
    kernels = _Kernels(spec_name)
    steps = kernels.steps(_eval_groups(graph.body, graph), training=False)
    if model.activation_dtype != "float32":
        steps = _store_activations(steps, kernels, graph)
    _mark_first_launch(steps, kernels, graph)
    has_batch_stats = any(_needs_batch_stats(u) for chain in graph.chains for u in chain.ops)
    train_steps = kernels.steps(_TrainingGroups(graph).run(), training=True) if has_batch_stats else None
    steps = _output_in_torch_layout(steps, kernels, graph)
    if train_steps is not None:
        train_steps = _output_in_torch_layout(train_steps, kernels, graph)
    slice_writers = {s.kernel.name for s in launches([*steps, *(train_steps or [])]) if s.into is not None}
    kernels.mark(slice_writers, writes_slice=True)
    kernels.mark(_k_splitters([*steps, *(train_steps or [])]), splits_k=True)
    # The Launch objects hold the kernel as it was when built; point them at the final kernels (sources).
    final = {k.name: k for k in kernels.by_key.values()}

    def refresh(s):
        if isinstance(s, Launch):
            return replace(s, kernel=final[s.kernel.name])
        if isinstance(s, LoopStep):
            return replace(s, body=tuple(map(refresh, s.body)))
        if isinstance(s, BranchStep):
            return replace(s, then=tuple(map(refresh, s.then)), orelse=tuple(map(refresh, s.orelse)))
        return s

    return Plan(
        model,
        tuple(kernels.by_key.values()),
        tuple(map(refresh, steps)),
        tuple(map(refresh, train_steps)) if train_steps is not None else None,
    )
