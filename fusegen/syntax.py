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


Expr = Union[IntLiteral, FloatLiteral, Name, Apply, BinOp, Neg]


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
    chain: Chain
    repeat: int | None
    pos: Pos


@dataclass(frozen=True)
class Sequence:
    """A named nn.Sequential written as an indented body: `model:`."""

    name: str
    body: tuple["BodyLine", ...]
    pos: Pos


BodyLine = Union[LetDecl, ChainLine, Sequence]


@dataclass(frozen=True)
class BlockDecl:
    name: str
    params: tuple[str, ...]
    body: tuple[BodyLine, ...]
    pos: Pos


@dataclass(frozen=True)
class ForwardDecl:
    body: tuple[BodyLine, ...]
    pos: Pos


@dataclass(frozen=True)
class Spec:
    model: ModelDecl
    input: InputDecl
    activations: ActivationsDecl | None
    lets: tuple[LetDecl, ...]
    blocks: tuple[BlockDecl, ...]
    forward: ForwardDecl
