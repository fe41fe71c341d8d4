"""The spec's syntax tree: small frozen dataclasses named like the grammar rules in grammar/fuse.lark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from fusegen.errors import Pos

# -- expressions: integer and float arithmetic on constructor parameters --------------------------


@dataclass(frozen=True)
class IntLiteral:
    value: int
    pos: Pos


@dataclass(frozen=True)
class FloatLiteral:
    value: float
    text: str
    pos: Pos


@dataclass(frozen=True)
class StringLiteral:
    value: str
    pos: Pos


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class Apply:
    """`int(v * alpha)`, `round(x)` or a call of a `let` function such as `c(32)`."""

    func: str
    args: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / // %
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Compare:
    op: str  # one of == != < <= > >=
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" or "or"
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Not:
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class IfExpr:
    """`a if test else b`."""

    body: "Expr"
    test: "Expr"
    orelse: "Expr"
    pos: Pos


@dataclass(frozen=True)
class ListLiteral:
    items: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class Index:
    """`layers[0]`."""

    value: "Expr"
    index: "Expr"
    pos: Pos


Expr = Union[
    IntLiteral, FloatLiteral, StringLiteral, Name, Apply, BinOp, Neg, Compare, BoolOp, Not, IfExpr, ListLiteral, Index
]


# -- declarations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtorParam:
    name: str
    default: Expr
    pos: Pos


@dataclass(frozen=True)
class ModelDecl:
    name: str
    params: tuple[CtorParam, ...]
    pos: Pos


@dataclass(frozen=True)
class InputDecl:
    dims: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True)
class ActivationsDecl:
    """`activations(float16)`: the dtype of the tensors between kernels in eval mode."""

    dtype: str
    dtype_pos: Pos
    pos: Pos


@dataclass(frozen=True)
class LetDecl:
    """`let h = round(ci * expand)` or the function `let c(v) = int(v * alpha)`."""

    name: str
    params: tuple[str, ...] | None
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Call:
    """An op (`conv1x1(inp, oup)`, `relu`) or a block (`conv_dw(32, 64, 1)`)."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    pos: Pos


@dataclass(frozen=True)
class Step:
    """One link of a chain, with the attribute name it gets at the top level (`conv1: conv3x3(...)`)."""

    label: str | None
    call: Call
    pos: Pos


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...]
    pos: Pos


@dataclass(frozen=True)
class ChainLine:
    """`[target =] chain [* repeat]` or `[target =] chain for index in range(repeat)`: without a target the
    chain's output becomes the value `x`; `index` counts the repeats from 0."""

    target: str | None
    chain: Chain
    repeat: Expr | None
    pos: Pos
    index: str | None = None


@dataclass(frozen=True)
class Sequence:
    """A named nn.Sequential written as an indented body: `model:`, or `identity = downsample:`; `dense
    layers:` (kind "dense") applies its children densely."""

    target: str | None
    name: str
    body: tuple["BodyLine", ...]
    pos: Pos
    kind: str | None = None


@dataclass(frozen=True)
class If:
    """`if test:` ... [`else:` ...], decided when the model is built."""

    test: Expr
    body: tuple["BodyLine", ...]
    orelse: tuple["BodyLine", ...]
    pos: Pos


@dataclass(frozen=True)
class Return:
    """`return chain`: the value a module body (or forward) produces."""

    chain: Chain
    pos: Pos


BodyLine = Union[LetDecl, ChainLine, Sequence, If, Return]


@dataclass(frozen=True)
class BlockParam:
    name: str
    default: Expr | None
    pos: Pos


@dataclass(frozen=True)
class BlockDecl:
    """`block` (an nn.Sequential, children numbered) or `module` (an nn.Module, children named)."""

    name: str
    params: tuple[BlockParam, ...]
    body: tuple[BodyLine, ...]
    pos: Pos
    kind: str = "block"  # "block" or "module"


@dataclass(frozen=True)
class ForwardDecl:
    body: tuple[BodyLine, ...]
    pos: Pos


@dataclass(frozen=True)
class InitRule:
    """`Conv2d.weight = kaiming_normal(mode="fan_out")`."""

    module_class: str
    parameter: str
    call: Call
    pos: Pos


@dataclass(frozen=True)
class InitDecl:
    rules: tuple[InitRule, ...]
    pos: Pos


@dataclass(frozen=True)
class Spec:
    model: ModelDecl
    input: InputDecl
    activations: ActivationsDecl | None
    lets: tuple[LetDecl, ...]
    blocks: tuple[BlockDecl, ...]
    forward: ForwardDecl
    init: InitDecl | None = None
