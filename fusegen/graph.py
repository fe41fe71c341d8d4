"""The dataflow graph that check builds and plan reads: typed values, and the ops that map them.

A spec's forward pass, with every block inlined at its call site, is a sequence of chains (one spec
line each, as instantiated at one place). A chain applies its nodes in turn to one value, its input,
and names the result, its output; a node may also read other values at the same offsets (`add`'s
other operand). Values are made once and may be used any number of times; the chains are in program
order, so each reads only values made before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

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
class Graph:
    input: Value  # the model's input
    chains: tuple[Chain, ...]  # in program order
    output: Value  # what forward returns
    _uses: dict = field(default_factory=dict, compare=False, repr=False)

    def uses(self, value: Value) -> int:
        """How many times a value is read: as a chain's input, as an operand, and once as the output."""
        if not self._uses:
            counts: dict[int, int] = {id(self.output): 1}
            for chain in self.chains:
                for read in self.reads(chain):
                    counts[id(read)] = counts.get(id(read), 0) + 1
            self._uses.update(counts)
        return self._uses.get(id(value), 0)

    @staticmethod
    def reads(chain: Chain) -> Iterator[Value]:
        yield chain.input
        for node in chain.ops:
            yield from node.operands
