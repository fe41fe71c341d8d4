"""The dataflow graph that check builds and plan reads: typed values, and the ops that map them.

A spec's forward pass, with every block inlined at its call site, is a sequence of chains (one spec
line each, as instantiated at one place). A chain applies its nodes in turn to one value, its input,
and names the result, its output; a node may also read other values at the same offsets (`add`'s
other operand). Values are made once and may be used any number of times; the chains are in program
order, so each reads only values made before it.

Where the structure follows constructor arguments, the sequence holds regions that generated code
decides at run time: a Loop (a block repeated a number of times that a constructor argument gives:
the body runs once per remaining child of a sequential module) and a Branch (an `if` on constructor
arguments). Fusion stops at a region's edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

from fusegen import ops as O
from fusegen.errors import Pos


@dataclass(frozen=True, eq=False)
class Value:
    """A tensor of the forward pass (compared by identity)."""

    name: str  # the spec's name for it: "x" unless bound by `name = ...`
    shape: O.Shape  # at the example input and default constructor arguments


@dataclass(frozen=True)
class Node:
    """One op of a chain, resolved."""

    op: O.Op
    module_path: str | None  # where ModelNew holds its module, relative to self: "model[3][4]", "fc"
    pos: Pos
    out_shape: O.Shape = ()  # the tensor after this op, at the example input and default arguments
    operands: tuple[Value, ...] = ()  # values read besides the chain's tile (add's other operand)


@dataclass(frozen=True)
class Chain:
    """One spec line as instantiated at one place: its nodes applied in turn to `input` give `output`."""

    ops: tuple[Node, ...]
    line: int  # spec line where the chain is written
    text: str  # the chain as written
    site: str  # where a block instantiates it: "20: conv_dw(c(32), c(64), 1)"; "" outside blocks
    input: Value
    output: Value

    @property
    def in_shape(self) -> O.Shape:
        return self.input.shape


@dataclass(frozen=True)
class Loop:
    """`for block in self.<modules>[start:]`: the body, with its modules at `block`, once per child of a
    sequential module from `start` on; each iteration reads the value the one before made."""

    modules: str  # the sequential module's path
    start: int  # the first child the loop runs
    variable: str  # the loop variable that the body's module paths start with
    body: tuple["Region", ...]
    input: Value  # what the first iteration reads
    carried: Value  # what an iteration reads: the body's input (the one before's output, or `input`)
    output: Value  # what an iteration makes: the loop's value after the last
    # a dense loop (`dense layers:`): what an iteration makes, joined to the input and every earlier
    # iteration's part along channels; `carried` is that concatenation so far, `output` all of it
    part: Value | None = None


@dataclass(frozen=True)
class Branch:
    """`if self.<attribute>:` ... `else:` ..., an attribute that __init__ sets from constructor arguments on the
    model, or on a module inside it (`attribute` is then its path: "stage2[0].projects", "block.projects").
    `merges` are the values that either branch may have made: (value after the branch, its value at the
    end of the first body, at the end of the second)."""

    attribute: str
    then: tuple["Region", ...]
    orelse: tuple["Region", ...]
    merges: tuple[tuple[Value, Value, Value], ...]


Region = Union[Chain, Loop, Branch]


def walk(body: tuple[Region, ...]) -> Iterator[Chain]:
    """Every chain of a body, in program order, inside regions too."""
    for item in body:
        if isinstance(item, Chain):
            yield item
        elif isinstance(item, Loop):
            yield from walk(item.body)
        else:
            yield from walk(item.then)
            yield from walk(item.orelse)


@dataclass(frozen=True)
class Graph:
    input: Value  # the model's input
    body: tuple[Region, ...]  # in program order
    output: Value  # what forward returns
    _uses: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def chains(self) -> tuple[Chain, ...]:
        return tuple(walk(self.body))

    def uses(self, value: Value) -> int:
        """How many places read a value: a chain's input, an operand, a region that carries it or merges
        it, and the model's output."""
        if not self._uses:
            counts: dict[int, int] = {id(self.output): 1}

            def count(values):
                for read in values:
                    counts[id(read)] = counts.get(id(read), 0) + 1

            def visit(body):
                for item in body:
                    if isinstance(item, Chain):
                        count(self.reads(item))
                    elif isinstance(item, Loop):
                        # read by the first iteration and by the next; a dense loop's by the concatenation
                        count([item.input, item.part] if item.part is not None else [item.input, item.output])
                        visit(item.body)
                    else:
                        count([v for _, a, b in item.merges for v in (a, b)])
                        visit(item.then)
                        visit(item.orelse)

            visit(self.body)
            self._uses.update(counts)
        return self._uses.get(id(value), 0)

    @staticmethod
    def reads(chain: Chain) -> Iterator[Value]:
        yield chain.input
        for node in chain.ops:
            yield from node.operands
