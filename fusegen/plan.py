"""Stage 3, plan: each checked chain becomes a launch of one fused kernel (or, for a bare view, none).

The kernel IR is small on purpose: a kernel is a prologue (elementwise ops applied to each input tile
as it is loaded), optionally a producer (an anchor and the elementwise ops after it that compute the
anchor's input in registers: a depthwise conv inside a 1x1 conv's K loop, or a 1x1 conv at each tap of
a depthwise conv), one anchor (the loop nest that produces the output tile), an epilogue (elementwise
ops on the fp32 accumulator), optionally a pool (the tiles of each pooling window summed in registers,
so only the pooled pixels are stored) and an optional view of the output.
Chains with the same structure share one kernel definition. (An anchor that splits its K loop, linear,
lowers to two launches of one wrapper: lower's concern, not the plan's.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fusegen import ops as O
from fusegen.check import ChainUse, Model, OpUse


@dataclass(frozen=True)
class FusedOp:
    op: O.Op
    slot: str  # unique inside its kernel: names the op's kernel parameters and its wrapper argument

    @property
    def params(self) -> tuple[O.KernelParam, ...]:
        lowering = self.op.lowering
        return lowering.params if isinstance(lowering, (O.Anchor, O.Elementwise, O.Pool)) else ()

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

    @property
    def ops(self) -> tuple[FusedOp, ...]:
        """Prologue, producer, anchor, epilogue and pool, in chain order."""
        return (*self.prologue, *self.producer, self.anchor, *self.epilogue, *([self.pool] if self.pool else []))

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
    modules: tuple[str, ...]  # module path for each of kernel.module_ops
    comment: str
    stores_activation: bool = False  # its output feeds a later kernel at the model's activation_dtype


@dataclass(frozen=True)
class ViewOnly:
    op: O.Op
    comment: str


@dataclass(frozen=True)
class Plan:
    model: Model
    kernels: tuple[Kernel, ...]
    steps: tuple[Launch | ViewOnly, ...]  # eval mode
    # training mode, where it differs (a model with BatchNorm); None: the same steps
    train_steps: tuple[Launch | ViewOnly, ...] | None


@dataclass
class _Group:
    """The ops of one launch, before its kernel is built."""

    prologue: list[OpUse]
    anchor: OpUse | None
    epilogue: list[OpUse]
    view: OpUse | None
    chains: list[ChainUse]  # where its ops are written, first the one that names the launch
    writes_batch_stats: bool = False
    producer: list[OpUse] = field(default_factory=list)
    pool: OpUse | None = None


def _split(chain: ChainUse):
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


def _eval_groups(model: Model) -> list[_Group | ChainUse]:
    """Eval mode: one launch per chain (a chain that is only a view: the ChainUse itself, no launch)."""
    groups: list[_Group | ChainUse] = []
    for chain in model.chains:
        prologue, producer, anchor, epilogue, pool, view = _split(chain)
        if anchor is None and not epilogue:
            groups.append(chain)
        else:
            groups.append(_Group(prologue, anchor, epilogue, view, [chain], producer=producer, pool=pool))
    return groups


def _needs_batch_stats(use: OpUse) -> bool:
    return use.op.train_lowering is not None and use.op.train_lowering.needs_batch_stats


def _split_at_batch_stats(chain: ChainUse) -> list[ChainUse]:
    """Training mode: a producer that ends normalised by batch statistics (dwconv -> bn -> conv1x1)
    needs its whole output reduced before its consumer can run, so the chain becomes two launches. So
    does a pool that ends an anchor's kernel: the BatchNorm before it would need the same, and a pooled
    kernel does not store the per-tile statistics that a BatchNorm after it would."""
    prologue, producer, _, _, pool, _ = _split(chain)
    if pool is not None:
        cut = next(i for i, u in enumerate(chain.ops) if u is pool)
    elif any(_needs_batch_stats(u) for u in producer):
        cut = len(prologue) + len(producer)
    else:
        return [chain]
    return [replace(chain, ops=chain.ops[:cut]), replace(chain, ops=chain.ops[cut:], in_shape=chain.ops[cut - 1].out_shape)]


def _training_groups(model: Model) -> list[_Group | ChainUse]:
    """Training mode: an op that normalises with batch statistics (BatchNorm) needs its whole input
    reduced first, so it cannot run in the kernel that produces that input. It moves, with the
    elementwise ops after it, into the prologue of the next anchor: the producer stores the tensor
    before it once, with per-tile statistics, and the consumer normalises each tile as it loads it.
    Where no anchor follows (a second BatchNorm, a view, the end), a kernel of its own applies it."""
    groups: list[_Group | ChainUse] = []
    carried: list[tuple[OpUse, ChainUse]] = []  # ops waiting for the next anchor, with their chain

    def pieces(uses: list[tuple[OpUse, ChainUse]]) -> list[list[tuple[OpUse, ChainUse]]]:
        """Split before every op that needs batch statistics (except a leading one)."""
        out: list[list[tuple[OpUse, ChainUse]]] = []
        for use in uses:
            if not out or (_needs_batch_stats(use[0]) and out[-1]):
                out.append([])
            out[-1].append(use)
        return out

    def group(part, anchor=None, epilogue=(), view=None, chain=None, producer=()) -> _Group:
        chains: list[ChainUse] = []
        for c in [*([chain] if chain else []), *(c for _, c in part)]:
            chains += [] if any(c is seen for seen in chains) else [c]
        return _Group([u for u, _ in part], anchor, list(epilogue), view, chains, producer=list(producer))

    for chain in (piece for whole in model.chains for piece in _split_at_batch_stats(whole)):
        prologue, producer, anchor, epilogue, _, view = _split(chain)
        if anchor is None:
            carried += [(u, chain) for u in epilogue]
        else:
            parts = pieces(carried + [(u, chain) for u in prologue]) or [[]]
            groups += [group(part) for part in parts[:-1]]
            first_bn = next((i for i, u in enumerate(epilogue) if _needs_batch_stats(u)), len(epilogue))
            groups.append(group(parts[-1], anchor, epilogue[:first_bn], chain=chain, producer=producer))
            carried = [(u, chain) for u in epilogue[first_bn:]]
        if view is not None:
            if carried:  # the ops waiting apply before the view
                parts = pieces(carried)
                groups += [group(part, view=view if part is parts[-1] else None) for part in parts]
                carried = []
            elif anchor is not None:
                groups[-1].view = view
            else:
                groups.append(chain)
    groups += [group(part) for part in pieces(carried)]

    # A group that starts by normalising with batch statistics makes the launch before it store them;
    # the model input has no producer, so an identity kernel stores it with its statistics.
    launches = [g for g in groups if isinstance(g, _Group)]
    if launches and launches[0].prologue and _needs_batch_stats(launches[0].prologue[0]):
        first = _Group([], None, [], None, [model.chains[0]])
        groups.insert(0, first)
        launches.insert(0, first)
    for producer, consumer in zip(launches, launches[1:]):
        producer.writes_batch_stats = bool(consumer.prologue) and _needs_batch_stats(consumer.prologue[0])
    return groups


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

    def comment(self, chain: ChainUse) -> str:
        return f"{self.spec_name}:{chain.site or f'{chain.line}: {chain.text}'}"

    def launch(self, group: _Group, training: bool) -> Launch:
        chain = group.chains[0]
        in_rank = len(chain.in_shape)  # elementwise ops and anchors keep the rank
        anchor = group.anchor or OpUse(O.load_anchor(in_rank), None, chain.ops[0].pos)
        body = [*group.prologue, *group.producer, anchor, *group.epilogue, *([group.pool] if group.pool else [])]
        ops = [u.op.train_lowered() if training else u.op for u in body]
        trained = any(op is not u.op for op, u in zip(ops, body))
        if group.pool:  # the pool lowers as the end of the anchor's kernel
            ops[-1] = replace(ops[-1], lowering=ops[-1].lowering.pool)
        if group.writes_batch_stats:
            ops = [op.feeding_batch_stats() for op in ops]
        fused = [FusedOp(op, slot) for op, slot in zip(ops, _slots(body))]
        key = (tuple(u.op.name for u in body), trained, group.writes_batch_stats, in_rank, group.view is not None)
        if key not in self.by_key:
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
            )
        for c in group.chains:
            source = f"{self.spec_name}:{c.line}: {c.text}"
            if source not in self.by_key[key].sources:
                self.by_key[key] = replace(self.by_key[key], sources=self.by_key[key].sources + (source,))
        modules = tuple(u.module_path for f, u in zip(fused, body) if f.reads_module)
        return Launch(self.by_key[key], modules, self.comment(chain))

    def mark(self, names: set[str], **fields) -> None:
        """Sets `fields` on the kernels named in `names` (a flag that some launch of them needs)."""
        for key, kernel in self.by_key.items():
            if kernel.name in names:
                self.by_key[key] = replace(kernel, **fields)

    def steps(self, groups: list[_Group | ChainUse], training: bool) -> list[Launch | ViewOnly]:
        return [
            self.launch(g, training) if isinstance(g, _Group) else ViewOnly(g.ops[-1].op, self.comment(g))
            for g in groups
        ]


def _store_activations(steps: list[Launch | ViewOnly], kernels: _Kernels) -> list[Launch | ViewOnly]:
    """Eval mode with a narrower activation dtype: a launch stores its output in it where the next
    launch's anchor takes a narrow input (the model returns float32), and their kernels' wrappers take
    the dtype."""
    def reads_narrow(kernel: Kernel) -> bool:
        reader = kernel.producer[0] if kernel.producer else kernel.anchor  # the op that loads x
        return reader.op.lowering.narrow_input

    launches = [s for s in steps if isinstance(s, Launch)]
    narrow = {id(s) for s, after in zip(launches, launches[1:]) if reads_narrow(after.kernel)}
    kernels.mark({s.kernel.name for s in launches if id(s) in narrow}, stores_activations=True)
    return [replace(s, stores_activation=True) if id(s) in narrow else s for s in steps]


def _mark_first_launch(steps: list[Launch | ViewOnly], kernels: _Kernels) -> None:
    """Eval mode: a first launch that reads the model's input in any layout can run outside a CUDA
    graph on the caller's tensor, so that a replay need not copy the input into the graph."""
    first = steps[0] if steps else None
    if isinstance(first, Launch) and first.kernel.reads_any_layout:
        kernels.mark({first.kernel.name}, writes_given_out=True)


def plan(model: Model, spec_name: str) -> Plan:
    kernels = _Kernels(spec_name)
    steps = kernels.steps(_eval_groups(model), training=False)
    if model.activation_dtype != "float32":
        steps = _store_activations(steps, kernels)
    _mark_first_launch(steps, kernels)
    has_batch_stats = any(_needs_batch_stats(u) for chain in model.chains for u in chain.ops)
    train_steps = kernels.steps(_training_groups(model), training=True) if has_batch_stats else None
    # The Launch objects hold the kernel as it was when built; point them at the final kernels (sources).
    final = {k.name: k for k in kernels.by_key.values()}

    def refresh(s):
        return replace(s, kernel=final[s.kernel.name]) if isinstance(s, Launch) else s

    return Plan(
        model,
        tuple(kernels.by_key.values()),
        tuple(map(refresh, steps)),
        tuple(map(refresh, train_steps)) if train_steps is not None else None,
    )
