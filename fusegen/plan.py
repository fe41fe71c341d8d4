"""Stage 3, plan: each checked chain becomes a launch of one fused kernel (or, for a bare view, none).

The kernel IR is small on purpose: a kernel is a prologue (elementwise ops applied to each input tile
as it is loaded), one anchor (the loop nest that produces the output tile), an epilogue (elementwise
ops on the fp32 accumulator) and an optional view of the output. Chains with the same structure
share one kernel definition.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fusegen import ops as O
from fusegen.check import ChainUse, Model, OpUse


@dataclass(frozen=True)
class FusedOp:
    op: O.Op
    slot: str  # unique inside its kernel: names the op's kernel parameters and its wrapper argument

    @property
    def params(self) -> tuple[O.KernelParam, ...]:
        lowering = self.op.lowering
        return lowering.params if isinstance(lowering, (O.Anchor, O.Elementwise)) else ()


@dataclass(frozen=True)
class Kernel:
    name: str  # what it fuses: "dwconv3x3_bn_relu"
    prologue: tuple[FusedOp, ...]
    anchor: FusedOp
    epilogue: tuple[FusedOp, ...]
    view: FusedOp | None
    in_rank: int
    sources: tuple[str, ...]  # the spec chains it comes from: "line 9: dwconv3x3(...) -> bn(inp) -> relu"

    @property
    def ops(self) -> tuple[FusedOp, ...]:
        """Prologue, anchor and epilogue, in chain order."""
        return (*self.prologue, self.anchor, *self.epilogue)

    @property
    def module_ops(self) -> tuple[FusedOp, ...]:
        """Ops whose module the wrapper takes, in chain order."""
        return tuple(f for f in self.ops if f.params)


@dataclass(frozen=True)
class Launch:
    kernel: Kernel
    modules: tuple[str, ...]  # module path for each of kernel.module_ops
    comment: str


@dataclass(frozen=True)
class ViewOnly:
    op: O.Op
    comment: str


@dataclass(frozen=True)
class Plan:
    model: Model
    kernels: tuple[Kernel, ...]
    steps: tuple[Launch | ViewOnly, ...]


def _split(chain: ChainUse):
    """(prologue, anchor, epilogue, view) of a chain whose legality check already passed."""
    uses = list(chain.ops)
    view = uses.pop() if uses and uses[-1].op.role is O.Role.VIEW else None
    anchors = [i for i, u in enumerate(uses) if u.op.role is O.Role.ANCHOR]
    if not anchors:
        return [], None, uses, view
    i = anchors[0]
    return uses[:i], uses[i], uses[i + 1 :], view


def _slots(uses) -> list[str]:
    counts: dict[str, int] = {}
    slots = []
    for use in uses:
        counts[use.op.slot] = counts.get(use.op.slot, 0) + 1
        slots.append(use.op.slot if counts[use.op.slot] == 1 else f"{use.op.slot}{counts[use.op.slot]}")
    return slots


def plan(model: Model, spec_name: str) -> Plan:
    kernels: dict[tuple, Kernel] = {}
    pending: list[tuple[tuple, tuple[str, ...], str] | ViewOnly] = []
    for chain in model.chains:
        comment = f"{spec_name}:{chain.site or f'{chain.line}: {chain.text}'}"
        prologue, anchor, epilogue, view = _split(chain)
        if anchor is None and not epilogue:
            pending.append(ViewOnly(view.op, comment))
            continue
        in_rank = len(chain.in_shape)
        if anchor is None:
            anchor = OpUse(O.load_anchor(in_rank), None, chain.ops[0].pos)
        body = [*prologue, anchor, *epilogue]
        fused = [FusedOp(u.op, slot) for u, slot in zip(body, _slots(body))]
        key = (tuple(u.op.name for u in chain.ops), in_rank)
        if key not in kernels:
            name = "_".join(key[0])
            if any(k.name == name for k in kernels.values()):
                name = f"{name}_{in_rank}d"
            kernels[key] = Kernel(
                name=name,
                prologue=tuple(fused[: len(prologue)]),
                anchor=fused[len(prologue)],
                epilogue=tuple(fused[len(prologue) + 1 :]),
                view=FusedOp(view.op, view.op.slot) if view else None,
                in_rank=in_rank,
                sources=(),
            )
        source = f"{spec_name}:{chain.line}: {chain.text}"
        if source not in kernels[key].sources:
            kernels[key] = replace(kernels[key], sources=kernels[key].sources + (source,))
        modules = tuple(u.module_path for f, u in zip(fused, body) if f.params)
        pending.append((key, modules, comment))
    steps = tuple(p if isinstance(p, ViewOnly) else Launch(kernels[p[0]], p[1], p[2]) for p in pending)
    return Plan(model, tuple(kernels.values()), steps)
