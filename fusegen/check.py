"""Stage 2, check: resolve names and ops, and turn the spec into what plan and emit need.

Two walks over the spec:
- `_InitWriter` translates each block and the forward body into Python for ModelNew.__init__, line
  by line (so module creation order, registration order and every construction-time `if`, repeat and
  argument follow the spec, at any constructor arguments);
- `_GraphBuilder` evaluates the spec at its default constructor arguments and example input, inlines
  every block at its call site and builds the dataflow graph (fusegen.graph), checking shapes, channel
  counts and that every chain can be one kernel. The forward pass is compiled for the structure it
  finds, so a branch or a repeat count that depends on a constructor parameter is refused.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import inspect
import keyword
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from fusegen import ops as O
from fusegen import syntax as S
from fusegen.errors import Pos, SpecError, source_lines
from fusegen.graph import Branch, Chain, Graph, Loop, Node, Value, walk
from fusegen.parse import MAX_INT

# Functions a spec expression may call besides its own `let` functions and blocks.
BUILTINS = {"int": int, "round": round, "min": min, "max": max, "abs": abs, "len": len}
CONSTANTS = {"None": None, "True": True, "False": False}
# Names the generated module uses itself (`block` is a module body's nn.Module while it is built, and
# block, block_2, ... are forward's loop variables).
RESERVED = {"self", "x", "nn", "torch", "triton", "tl", "super", "range", "ModelNew", "block"} | (
    set(dir(builtins)) - set(CONSTANTS)
)
# ModelNew's own attributes and methods besides nn.Module's: a module may not take their names.
MODEL_ATTRIBUTES = {
    "TorchBackward", "captured_attrs", "input_layout", "first_kernel_outside_graph_numel", "direct_graphs",
    "returned_outputs", "use_cuda_graphs", "cuda_graphs", "cuda_graph_pools", "use_launch_plans", "launch_plans",
    "parameter_cache", "activation_dtype", "run_kernels", "run_training_kernels", "run_first_kernel",
    "run_kernels_after_first", "reference_forward", "__getstate__",
}  # fmt: skip
# Limits that bound the time and memory of a build (each error that enforces one states it).
MAX_REPEAT = 1000  # times a line repeats
MAX_OPS = 2000  # ops in the forward pass, every repeat and block call expanded
MAX_CHAIN_OPS = 64  # ops in one chain (one kernel)
MAX_EVALUATIONS = 100_000  # steps of expression evaluation in a whole spec
MAX_ELEMENTS = 2**31 - 1  # of a tensor (the kernels' offsets are 32-bit) and of an op's sizes multiplied
_PRECEDENCE = {"if": 0, "or": 1, "and": 2, "not": 3, "compare": 4, "+": 5, "-": 5, "*": 6, "/": 6, "//": 6, "%": 6}


# -- what check hands to plan and emit ------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    name: str
    params: tuple[tuple[str, str], ...]  # constructor parameter, default as source
    example_input: O.Shape
    init: tuple[str, ...]  # the body of ModelNew.__init__ after super().__init__(), as Python lines
    graph: Graph  # the forward pass
    activation_dtype: str = "float32"  # torch dtype of the tensors between kernels in eval mode

    @property
    def chains(self) -> tuple[Chain, ...]:
        return self.graph.chains


# What `activations(...)` may store. float16 keeps TF32's 10-bit mantissa, so the 1x1 convs see the
# same operands they would round to anyway, at half the bytes (its range ends at 65504, far above
# activations after BatchNorm). bfloat16 is not offered: its 7 bits round 8x coarser than TF32.
ACTIVATION_DTYPES = ("float32", "float16")


# -- expressions -----------------------------------------------------------------------------------------


def expr_source(e: S.Expr, parent: int = -1, right: bool = False) -> str:
    """Python source of an expression, with the parentheses that precedence needs."""
    if isinstance(e, S.IntLiteral):
        return str(e.value)
    if isinstance(e, S.FloatLiteral):
        return repr(e.value)
    if isinstance(e, S.Name):
        return e.id
    if isinstance(e, S.StringLiteral):
        return repr(e.value)
    if isinstance(e, S.Apply):
        return f"{e.func}({', '.join(expr_source(a) for a in e.args)})"
    if isinstance(e, S.ListLiteral):
        return f"[{', '.join(expr_source(a) for a in e.items)}]"
    if isinstance(e, S.Index):
        return f"{expr_source(e.value, 9)}[{expr_source(e.index)}]"
    if isinstance(e, S.Neg):
        return f"-{expr_source(e.operand, 7)}"
    if isinstance(e, S.Not):
        text, prec = f"not {expr_source(e.operand, 3)}", 3
    elif isinstance(e, S.IfExpr):
        prec = 0
        text = f"{expr_source(e.body, 1)} if {expr_source(e.test, 1)} else {expr_source(e.orelse, 0)}"
    else:  # BinOp, Compare, BoolOp: left-associative
        prec = _PRECEDENCE["compare" if isinstance(e, S.Compare) else e.op]
        text = f"{expr_source(e.left, prec)} {e.op} {expr_source(e.right, prec, right=True)}"
    return f"({text})" if prec < parent or (right and prec == parent) else text


@dataclass(frozen=True)
class Val:
    """A construction-time value and the constructor parameters it depends on."""

    value: object
    deps: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BlockInstance:
    """The value of a block call inside an expression (`shortcut(inp, oup, stride)` passed to a module):
    __init__ makes its modules where it evaluates the expression; forward inlines it where it is used."""

    block: S.BlockDecl
    args: dict
    pos: Pos


@dataclass
class _Scope:
    values: dict[str, Val]
    # let functions, each with the values visible where it was declared (no name is bound twice, so
    # those are the values Python's late binding sees when the function runs)
    functions: dict[str, tuple[S.LetDecl, dict[str, Val]]]
    blocks: dict[str, S.BlockDecl]
    globals: dict[str, Val]  # the constructor parameters and global lets: block defaults see these
    calling: tuple[str, ...] = ()  # the let functions being evaluated, outermost first
    steps_left: list[int] = field(default_factory=lambda: [MAX_EVALUATIONS])  # shared by every scope of a spec

    def child(self, values: dict[str, Val]) -> "_Scope":
        return replace(self, values={**self.values, **values})


def _in_range(value, pos: Pos):
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise SpecError(pos, f"integer too large: a spec's integers are at most 2**63 - 1 ({MAX_INT})")
    return value


def _binary(op: str, left, right, pos: Pos):
    try:
        return _in_range(
            {
                "+": lambda: left + right,
                "-": lambda: left - right,
                "*": lambda: left * right,
                "/": lambda: left / right,
                "//": lambda: left // right,
                "%": lambda: left % right,
                "==": lambda: left == right,
                "!=": lambda: left != right,
                "<": lambda: left < right,
                "<=": lambda: left <= right,
                ">": lambda: left > right,
                ">=": lambda: left >= right,
            }[op](),
            pos,
        )
    except ZeroDivisionError:
        raise SpecError(pos, "division by zero") from None
    except TypeError:
        raise SpecError(pos, f"cannot apply {op!r} to {left!r} and {right!r}") from None
    except OverflowError:
        raise SpecError(pos, f"{left!r} {op} {right!r} is past float's range") from None


def evaluate(e: S.Expr, scope: _Scope) -> Val:
    scope.steps_left[0] -= 1
    if scope.steps_left[0] < 0:
        raise SpecError(
            e.pos, f"the spec's expressions take more than {MAX_EVALUATIONS} steps to evaluate (fusegen's limit)"
        )
    if isinstance(e, (S.IntLiteral, S.FloatLiteral, S.StringLiteral)):
        return Val(e.value)
    if isinstance(e, S.Name):
        if e.id in scope.values:
            return scope.values[e.id]
        if e.id in CONSTANTS:
            return Val(CONSTANTS[e.id])
        known = sorted(scope.values)
        hint = difflib.get_close_matches(e.id, known, 1)
        extra = f"; did you mean {hint[0]!r}?" if hint else (f"; known names: {', '.join(known)}" if known else "")
        raise SpecError(e.pos, f"unknown name {e.id!r}{extra}")
    if isinstance(e, S.ListLiteral):
        items = [evaluate(i, scope) for i in e.items]
        return Val([i.value for i in items], frozenset().union(*(i.deps for i in items)))
    if isinstance(e, S.Index):
        value, index = evaluate(e.value, scope), evaluate(e.index, scope)
        try:
            return Val(value.value[index.value], value.deps | index.deps)
        except (TypeError, IndexError, KeyError):
            raise SpecError(e.pos, f"cannot index {value.value!r} with {index.value!r}") from None
    if isinstance(e, S.Neg):
        operand = evaluate(e.operand, scope)
        return Val(_in_range(-_number(operand.value, e.operand.pos), e.pos), operand.deps)
    if isinstance(e, S.Not):
        operand = evaluate(e.operand, scope)
        return Val(not operand.value, operand.deps)
    if isinstance(e, S.IfExpr):
        test = evaluate(e.test, scope)
        chosen = evaluate(e.body if test.value else e.orelse, scope)
        return Val(chosen.value, test.deps | chosen.deps)
    if isinstance(e, S.BoolOp):
        left = evaluate(e.left, scope)
        if bool(left.value) == (e.op == "or"):  # short circuit, as Python
            return left
        right = evaluate(e.right, scope)
        return Val(right.value, left.deps | right.deps)
    if isinstance(e, S.Apply):
        return _apply(e, scope)
    left, right = evaluate(e.left, scope), evaluate(e.right, scope)
    if isinstance(e, S.BinOp):
        _number(left.value, e.left.pos), _number(right.value, e.right.pos)
    return Val(_binary(e.op, left.value, right.value, e.pos), left.deps | right.deps)


def _apply(e: S.Apply, scope: _Scope) -> Val:
    args = [evaluate(a, scope) for a in e.args]
    deps = frozenset().union(*(a.deps for a in args))
    if e.func in scope.functions:
        let, closure = scope.functions[e.func]
        if len(args) != len(let.params):
            raise SpecError(e.pos, f"{e.func}() takes {len(let.params)} argument(s), {len(args)} given")
        if e.func in scope.calling:
            calls = " -> ".join([*scope.calling[scope.calling.index(e.func) :], e.func])
            raise SpecError(e.pos, f"let functions cannot call themselves: {calls}")
        inner = replace(scope, values={**closure, **dict(zip(let.params, args))}, calling=(*scope.calling, e.func))
        return evaluate(let.value, inner)
    if e.func in scope.blocks:
        block = scope.blocks[e.func]
        # whether the instance exists does not depend on its arguments
        return Val(BlockInstance(block, _bind_block(block, tuple(e.args), (), args, (), e.pos, scope), e.pos))
    if e.func not in BUILTINS:
        known = sorted([*BUILTINS, *scope.functions, *scope.blocks])
        raise SpecError(e.pos, f"unknown function {e.func!r}; expressions may call {', '.join(known)}")
    try:
        return Val(_in_range(BUILTINS[e.func](*(a.value for a in args)), e.pos), deps)
    except (TypeError, ValueError, OverflowError) as err:
        raise SpecError(e.pos, f"{e.func}(): {err}") from None


def _bind_block(block, args, kwargs, arg_values, kwarg_values, pos, scope) -> dict[str, Val]:
    """A block call's arguments by parameter; missing ones take the block's defaults."""
    names = [p.name for p in block.params]
    if len(args) > len(names):
        raise SpecError(
            pos, f"block {block.name!r} takes {len(names)} argument(s) ({', '.join(names)}), {len(args)} given"
        )
    bound = dict(zip(names, arg_values))
    for kw, value in zip(kwargs, kwarg_values):
        if kw.name not in names:
            raise SpecError(kw.pos, f"block {block.name!r} has no parameter {kw.name!r} ({', '.join(names)})")
        if kw.name in bound:
            raise SpecError(kw.pos, f"block {block.name!r} gets {kw.name!r} twice")
        bound[kw.name] = value
    for p in block.params:
        if p.name not in bound:
            if p.default is None:
                given = len(args) + len(kwargs)
                raise SpecError(
                    pos,
                    f"block {block.name!r} takes {len(names)} argument(s) ({', '.join(names)}), {given} given; {p.name!r} has no default",
                )
            bound[p.name] = evaluate(p.default, replace(scope, values=scope.globals))
    return bound


def _number(value: object, pos: Pos) -> int | float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SpecError(pos, f"expected a number, got {value!r}")
    return value


def _check_name(name: str, pos: Pos, what: str) -> None:
    if keyword.iskeyword(name) or name in RESERVED or re.fullmatch(r"block_[0-9]+", name):
        raise SpecError(pos, f"{what} {name!r} clashes with a name the generated Python uses; pick another")


def _static(value: Val, pos: Pos, what: str) -> object:
    """A value that decides the forward pass's structure: it must not depend on constructor parameters."""
    if value.deps:
        names = ", ".join(sorted(value.deps))
        raise SpecError(
            pos,
            f"{what} depends on the constructor parameter(s) {names}; fusegen compiles one forward pass, so"
            " the structure must be fixed by constants and block arguments (structure that follows constructor"
            " arguments is not supported yet)",
        )
    return value.value


def _is_expr(value: object) -> bool:
    return isinstance(
        value,
        (
            S.IntLiteral,
            S.FloatLiteral,
            S.StringLiteral,
            S.Name,
            S.Apply,
            S.BinOp,
            S.Neg,
            S.Compare,
            S.BoolOp,
            S.Not,
            S.IfExpr,
            S.ListLiteral,
            S.Index,
        ),
    )


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


# -- ops and their arguments ---------------------------------------------------------------------------


class _Ops:
    """Op lookup and argument binding, shared by both walks."""

    def __init__(self, blocks: dict[str, S.BlockDecl], defined: dict[str, tuple[str, Pos]]):
        self.blocks = blocks
        self.defined = defined  # the spec's global names, with what and where each is

    def check_body_let(self, let: S.LetDecl) -> None:
        """A `let` in a body binds a local name; one that rebinds a global one would change what the
        blocks and let functions that read it compute."""
        if let.params is not None:
            raise SpecError(let.pos, "let functions are declared at the top of the spec, not inside a body")
        _check_name(let.name, let.pos, "let")
        if let.name in self.defined:
            what, pos = self.defined[let.name]
            raise SpecError(let.pos, f"{let.name!r} is already defined at line {pos.line} ({what}); pick another name")

    def op(self, call: S.Call) -> O.Op:
        op = O.lookup(call.name)
        if op is None:
            known = O.all_names() + sorted(self.blocks)
            hint = difflib.get_close_matches(call.name, known, 1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise SpecError(
                call.pos,
                f"unknown op or block {call.name!r}{extra} (ops: {', '.join(O.all_names())}, convKxK, dwconvKxK"
                + (f"; blocks: {', '.join(sorted(self.blocks))})" if self.blocks else ")"),
            )
        return op

    def bind(self, op: O.Op, call: S.Call) -> dict[str, S.Expr | object]:
        """Matches a call's arguments to the op's parameters; missing ones take the op's defaults."""
        if len(call.args) > len(op.args):
            names = ", ".join(op.args) if op.args else "none"
            raise SpecError(
                call.args[len(op.args)].pos if op.args else call.pos,
                f"{op.name} takes {len(op.args)} argument(s) ({names}), {len(call.args)} given",
            )
        bound: dict[str, S.Expr | object] = dict(zip(op.args, call.args))
        for kw in call.kwargs:
            if kw.name not in op.args:
                raise SpecError(
                    kw.pos, f"{op.name} has no argument {kw.name!r} (it takes {', '.join(op.args) or 'none'})"
                )
            if kw.name in bound:
                raise SpecError(kw.pos, f"{op.name} gets {kw.name!r} twice")
            bound[kw.name] = kw.value
        for name in op.args:
            if name not in bound:
                if name not in op.defaults:
                    raise SpecError(
                        call.pos, f"{op.name} needs the argument {name!r} ({op.name}({', '.join(op.args)}))"
                    )
                bound[name] = op.defaults[name]
        return bound

    def module_source(self, op: O.Op, call: S.Call) -> str:
        if op.module is None or op.tensor_args:
            raise SpecError(call.pos, f"{op.name} reads other values, so it has no module; use it in a module body")
        return op.module({k: expr_source(v) if _is_expr(v) else repr(v) for k, v in self.bind(op, call).items()})

    def values(self, op: O.Op, call: S.Call, scope: _Scope) -> dict[str, object]:
        """The op's arguments at build time (tensor arguments keep their syntax: the builder resolves them)."""
        values = {}
        for name, value in self.bind(op, call).items():
            if name in op.tensor_args:
                values[name] = value
                continue
            if _is_expr(value):
                pos = value.pos
                value = evaluate(value, scope).value
            else:
                pos = call.pos
            if name in op.int_args and (
                not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "padding" else 1)
            ):
                hint = " (wrap it in int(...))" if isinstance(value, float) else ""
                raise SpecError(pos, f"{op.name}: {name} must be a positive integer, got {value!r}{hint}")
            values[name] = value
        sizes = [values[name] for name in op.int_args if name not in ("stride", "padding", "groups")]
        if math.prod(sizes) > MAX_ELEMENTS:
            raise SpecError(
                call.pos,
                f"{op.name}: {' * '.join(map(str, sizes))} is past fusegen's limit of 2**31 - 1 for an op's sizes multiplied",
            )
        return values


def _head(chain: S.Chain, tensors) -> tuple[str | None, tuple[S.Step, ...]]:
    """A chain that starts with a value (`out -> conv2: ...`): that value's name and the steps after it."""
    first = chain.steps[0]
    call = first.call
    if first.label is None and not call.args and not call.kwargs and call.name in tensors:
        return call.name, chain.steps[1:]
    return None, chain.steps


def _is_bare(step: S.Step) -> bool:
    return step.label is None and not step.call.args and not step.call.kwargs


# -- walk 1: ModelNew.__init__ -------------------------------------------------------------------------------


class _InitWriter:
    """Python for ModelNew.__init__: a nested function per block and the forward body's modules, in the
    spec's order, with its construction-time `if`s, repeats and arguments as Python."""

    def __init__(self, ops: _Ops):
        self.ops = ops
        self.blocks = ops.blocks
        self.module_lists: dict[tuple[str, str], int] = {}  # (target, list name) -> items made so far

    def block_function(self, block: S.BlockDecl) -> list[str]:
        params = ", ".join(
            p.name + (f"={expr_source(p.default)}" if p.default is not None else "") for p in block.params
        )
        if block.kind == "block":
            lets, items = self.sequential(block.body, top=True)
            return [f"def {block.name}({params}):", *_indent(lets), f"    return {_sequential(items)}"]
        tensors = {"x"}
        lines = self.module_body(block.body, "block", {p.name for p in block.params}, tensors, set())
        return [f"def {block.name}({params}):", "    block = nn.Module()", *_indent(lines), "    return block"]

    def sequential(self, body: tuple, top: bool) -> tuple[list[str], list[str]]:
        """(lets, nn.Sequential items) of a sequential body."""
        lets: list[str] = []
        items: list[str] = []
        for line in body:
            if isinstance(line, S.LetDecl):
                self.ops.check_body_let(line)
                if not top:
                    raise SpecError(line.pos, "a `let` inside an `if` of a sequential block; put it at the block's top")
                lets.append(f"{line.name} = {expr_source(line.value)}")
            elif isinstance(line, S.If):
                then = self.sequential(line.body, top=False)[1]
                orelse = self.sequential(line.orelse, top=False)[1]
                items.append(f"*([{', '.join(then)}] if {expr_source(line.test)} else [{', '.join(orelse)}])")
            elif isinstance(line, S.ChainLine):
                if line.target is not None:
                    raise SpecError(
                        line.pos, "a sequential block's lines run one after another; name values in a `module`"
                    )
                for step in line.chain.steps:
                    if step.label is not None:
                        raise SpecError(
                            step.pos,
                            "modules inside a sequence or block are numbered like nn.Sequential; names belong in a `module`",
                        )
                items.extend(self.items(line))
            else:
                what = "a return" if isinstance(line, S.Return) else "a named sequence"
                raise SpecError(line.pos, f"{what} belongs in a `module` or forward, not in a sequential block")
        return lets, items

    def items(self, line: S.ChainLine) -> list[str]:
        """The nn.Sequential items a chain line creates, as Python source (creation order kept)."""
        items = []
        for step in line.chain.steps:
            if step.call.name in self.blocks:
                items.append(self.block_call(step.call))
            else:
                items.append(self.ops.module_source(self.ops.op(step.call), step.call))
        if line.repeat is None:
            return items
        count = expr_source(line.repeat)
        index = line.index or "_"
        if line.index is not None:
            _check_name(line.index, line.pos, "the repeat's index")
        if len(items) == 1:
            return [f"*({items[0]} for {index} in range({count}))"]
        if isinstance(line.repeat, S.IntLiteral) and line.index is None:
            if line.repeat.value > MAX_REPEAT:
                raise SpecError(
                    line.repeat.pos,
                    f"a line repeats at most {MAX_REPEAT} times (fusegen's limit), got {line.repeat.value}",
                )
            return items * line.repeat.value
        return [f"*(module for {index} in range({count}) for module in ({', '.join(items)},))"]

    def block_call(self, call: S.Call) -> str:
        args = [expr_source(a) for a in call.args] + [f"{kw.name}={expr_source(kw.value)}" for kw in call.kwargs]
        return f"{call.name}({', '.join(args)})"

    def module_body(
        self, body: tuple, target: str, params: set[str], tensors: set[str], registered: set[str]
    ) -> list[str]:
        """Lines that add a module body's children to `target` (`self` or a block's nn.Module)."""
        lines: list[str] = []
        lets: set[str] = set()
        for line in body:
            if isinstance(line, S.LetDecl):
                self.ops.check_body_let(line)
                lines.append(f"{line.name} = {expr_source(line.value)}")
                lets.add(line.name)
            elif isinstance(line, S.Sequence):
                _check_name(line.name, line.pos, "name")
                lets, items = self.sequential(line.body, top=True)
                lines += [*lets, f"{target}.{line.name} = {_sequential(items)}"]
                tensors.add(line.target or "x")
            elif isinstance(line, S.If):
                if target != "self" and isinstance(line.test, S.Name) and line.test.id in lets:
                    # where the condition follows constructor arguments, forward tests the module's attribute
                    if hasattr(nn.Module(), line.test.id):
                        raise SpecError(
                            line.test.pos, f"{line.test.id!r} is an attribute of nn.Module; pick another name"
                        )
                    lines.append(f"{target}.{line.test.id} = {line.test.id}")
                then = self.module_body(line.body, target, params, tensors, registered)
                orelse = self.module_body(line.orelse, target, params, tensors, registered)
                test = expr_source(line.test)
                if then:
                    lines += [f"if {test}:", *_indent(then), *(["else:", *_indent(orelse)] if orelse else [])]
                elif orelse:
                    lines += [f"if not ({test}):", *_indent(orelse)]
            else:
                chain = line.chain
                head, steps = _head(chain, tensors)
                if isinstance(line, S.ChainLine) and line.repeat is not None and any(s.label for s in steps):
                    raise SpecError(
                        line.pos, "a repeated line would name its modules twice; repeat it in a sequential block"
                    )
                if isinstance(line, S.ChainLine) and line.index is not None:
                    raise SpecError(
                        line.pos, "a repeat with an index belongs in a sequential body (a block or a sequence)"
                    )
                for step in steps:
                    lines += self.module_step(step, len(steps), target, params, registered)
                if isinstance(line, S.ChainLine):
                    tensors.add(line.target or "x")
        return lines

    def module_step(self, step: S.Step, steps: int, target: str, params: set[str], registered: set[str]) -> list[str]:
        call = step.call
        if _is_bare(step) and call.name in params and call.name not in self.blocks and O.lookup(call.name) is None:
            # a module passed in as an argument (`downsample`): registered where it is first used
            if call.name in registered:
                return []
            registered.add(call.name)
            return [f"{target}.{call.name} = {call.name}"]
        if call.name in self.blocks:
            if steps > 1:
                raise SpecError(
                    call.pos, f"block {call.name!r} expands to chains of its own; put it on a line by itself"
                )
            if step.label is None:
                where = "at the top level" if target == "self" else "in a module body"
                raise SpecError(step.pos, f"a block {where} needs a name: `name: {call.name}(...)`")
            if "[" in step.label:
                return self.list_item(step, target)
            _check_name(step.label, step.pos, "name")
            return [f"{target}.{step.label} = {self.block_call(call)}"]
        op = self.ops.op(call)
        if step.label is not None and "[" in step.label:
            raise SpecError(step.pos, f"an item of a module list is a block's module, not an op ({op.name})")
        if op.role is O.Role.CONCAT:  # no module: the graph builder checks its values
            return []
        if step.label is None:
            if op.needs_module:
                raise SpecError(step.pos, f"{op.name} holds parameters, so it needs a name: `name: {op.name}(...)`")
            self.ops.bind(op, call)
            return []
        _check_name(step.label, step.pos, "name")
        return [f"{target}.{step.label} = {self.ops.module_source(op, call)}"]

    def list_item(self, step: S.Step, target: str) -> list[str]:
        """`blocks[i]: block(...)`: the nn.ModuleList `blocks`, made where its first item is, appended to in
        index order (so that modules of two lists can be made in turn, as DenseNet makes its dense blocks
        and transition layers)."""
        name, index = step.label[:-1].split("[")
        _check_name(name, step.pos, "name")
        made = self.module_lists.setdefault((target, name), 0)
        if index != str(made):  # as text: an index of thousands of digits is no int() to make
            shown = index if len(index) <= 20 else index[:20] + "..."
            raise SpecError(
                step.pos, f"{name}[{shown}] comes next after {made} item(s) of {name}; write {name}[{made}]"
            )
        self.module_lists[(target, name)] = made + 1
        created = [f"{target}.{name} = nn.ModuleList()"] if made == 0 else []
        return [*created, f"{target}.{name}.append({self.block_call(step.call)})"]


def _sequential(items: list[str]) -> str:
    return f"nn.Sequential({', '.join(items)})"


# The module classes a spec's modules have, and the torch.nn.init functions an `init:` rule may call.
INIT_CLASSES = ("Conv2d", "BatchNorm2d", "Linear")
INIT_PARAMETERS = ("weight", "bias")
INIT_FUNCTIONS = (
    "constant", "ones", "zeros", "normal", "uniform", "trunc_normal",
    "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform",
)  # fmt: skip


def _init_rules(decl: S.InitDecl, scope: _Scope) -> list[str]:
    """`init:` as torch code writes it: a loop over self.modules() that applies each rule of a module's
    class in turn (a missing bias is skipped)."""
    by_class: dict[str, list[str]] = {}
    for rule in decl.rules:
        if rule.module_class not in INIT_CLASSES:
            raise SpecError(
                rule.pos, f"init: {rule.module_class!r} is not a module class of a spec ({', '.join(INIT_CLASSES)})"
            )
        if rule.call.name not in INIT_FUNCTIONS:
            raise SpecError(
                rule.call.pos, f"init: {rule.call.name!r} is not one of torch.nn.init's {', '.join(INIT_FUNCTIONS)}"
            )
        if rule.parameter not in INIT_PARAMETERS:
            raise SpecError(rule.pos, f"init: {rule.parameter!r} is not {' or '.join(INIT_PARAMETERS)}")
        function = getattr(nn.init, f"{rule.call.name}_")
        function_params = [p for p in inspect.signature(function).parameters if p not in ("tensor", "generator")]
        if len(rule.call.args) > len(function_params):
            raise SpecError(
                rule.call.pos,
                f"init: {rule.call.name} takes {len(function_params)} argument(s) ({', '.join(function_params)})",
            )
        for kw in rule.call.kwargs:
            if kw.name not in function_params:
                raise SpecError(
                    kw.pos, f"init: {rule.call.name} has no argument {kw.name!r} ({', '.join(function_params)})"
                )
        # the rule on a small tensor at the default arguments: what it would raise in __init__, check says
        args = [evaluate(a, scope).value for a in rule.call.args]
        kwargs = {kw.name: evaluate(kw.value, scope).value for kw in rule.call.kwargs}
        try:
            function(torch.empty(4, 4), *args, **kwargs)
        except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError) as err:
            raise SpecError(rule.call.pos, f"init: {rule.call.name}: {err}") from None
        args = [f"module.{rule.parameter}"] + [expr_source(a) for a in rule.call.args]
        args += [f"{kw.name}={expr_source(kw.value)}" for kw in rule.call.kwargs]
        apply = f"nn.init.{rule.call.name}_({', '.join(args)})"
        guard = [f"if module.{rule.parameter} is not None:", f"    {apply}"] if rule.parameter == "bias" else [apply]
        by_class.setdefault(rule.module_class, []).extend(guard)
    lines = ["for module in self.modules():"]
    for i, (cls, body) in enumerate(by_class.items()):
        lines += [f"    {'if' if i == 0 else 'elif'} isinstance(module, nn.{cls}):", *_indent(_indent(body))]
    return lines


# -- walk 2: the dataflow graph ----------------------------------------------------------------------------


class _GraphBuilder:
    def __init__(self, ops: _Ops, lines: list[str], scope: _Scope):
        self.ops = ops
        self.scope = scope  # the global scope: a block's body sees it and its arguments
        self.blocks = ops.blocks
        self.lines = lines
        self.body: list = []  # the chains and regions of the body being built
        self.block_stack: list[str] = []
        self.loops = 0  # loops open around the body being built
        self.ops_made = 0
        # a branch not taken at the default arguments: its shapes there need not fit
        self.untaken = False
        # (attribute, condition source, position) of each `if` that __init__ decides for forward
        self.conditions: list[tuple[str, str, Pos]] = []

    def region(self, build) -> tuple[tuple, object]:
        """The chains and regions that `build()` adds, as a region body, and what it returns."""
        outer, self.body = self.body, []
        result = build()
        body, self.body = tuple(self.body), outer
        return body, result

    # Bodies. A module body (a `module`, or forward) names its children; a sequential body numbers them.

    def module_body(
        self, body, scope: _Scope, tensors: dict[str, Value], path: str, site: Pos | None
    ) -> tuple[Value, bool]:
        """Runs a module body on tensors["x"]; returns its value and whether a `return` gave it."""
        for line in body:
            if isinstance(line, S.LetDecl):
                scope = scope.child({line.name: evaluate(line.value, scope)}) if line.params is None else scope
            elif isinstance(line, S.ChainLine):
                head, steps = _head(line.chain, tensors)
                value, made = tensors[head or "x"], len(self.body)
                for _ in range(self.repeat(line, scope)):
                    value = self.module_steps(line.chain, steps, value, scope, tensors, path, site, line.target)
                tensors[line.target or "x"] = self.named(value, line.target, made)
            elif isinstance(line, S.Sequence):
                made = len(self.body)
                if line.kind is not None:
                    value = self.dense(line, scope, tensors["x"], _child(path, line.name), site)
                else:
                    value, _ = self.sequential_body(line.body, scope, tensors["x"], _child(path, line.name), site, 0)
                tensors[line.target or "x"] = self.named(value, line.target, made)
            elif isinstance(line, S.If):
                test = evaluate(line.test, scope)
                in_module = bool(self.block_stack) and self.blocks[self.block_stack[-1]].kind == "module"
                if test.deps and (in_module or not (self.block_stack or self.loops)):
                    self.branch(line, test, scope, tensors, path if in_module else "", site)
                    continue
                taken = _static(test, line.test.pos, "this condition")
                value, returned = self.module_body(line.body if taken else line.orelse, scope, tensors, path, site)
                if returned:
                    return value, True
            else:  # Return
                head, steps = _head(line.chain, tensors)
                value = tensors[head or "x"]
                if steps:
                    value = self.module_steps(line.chain, steps, value, scope, tensors, path, site, None)
                return value, True
        return tensors["x"], False

    def branch(self, line: S.If, test: Val, scope: _Scope, tensors: dict[str, Value], path: str, site) -> None:
        """An `if` on constructor arguments at the top level, or in a `module` at `path`: both bodies,
        decided at run time by an attribute that __init__ sets on the model (a `let` name names it) or on
        the module (a `let` of its body, which __init__ keeps on it); values either body binds merge after
        it."""
        if path:
            if not isinstance(line.test, S.Name):
                raise SpecError(
                    line.test.pos,
                    "an `if` on constructor arguments inside a module tests a `let` name, which the module keeps"
                    " for forward; bind the condition with `let` first",
                )
            attribute = f"{path}.{line.test.id}"
        else:
            attribute = line.test.id if isinstance(line.test, S.Name) else f"condition_line_{line.pos.line}"
            self.conditions.append((attribute, expr_source(line.test), line.pos))
        bodies, bound = [], []
        for taken, lines in ((bool(test.value), line.body), (not test.value, line.orelse)):
            mine = dict(tensors)
            untaken, self.untaken = self.untaken, self.untaken or not taken
            body, (_, returned) = self.region(lambda: self.module_body(lines, scope, mine, path, site))
            self.untaken = untaken
            if returned:
                raise SpecError(
                    line.pos, "a `return` inside an `if` on constructor arguments; bind the value and return after it"
                )
            bodies.append(body)
            bound.append(mine)
        merges = []
        for name in dict.fromkeys([*bound[0], *bound[1]]):
            first, second = bound[0].get(name), bound[1].get(name)
            if first is None or second is None:
                tensors.pop(name, None)  # bound on one side only: not a value after the `if`
            elif first is second:
                tensors[name] = first
            else:
                merged = Value(name, (first if test.value else second).shape)
                merges.append((merged, first, second))
                tensors[name] = merged
        self.body.append(Branch(attribute, bodies[0], bodies[1], tuple(merges)))

    def loop(self, line: S.ChainLine, rest, scope: _Scope, value: Value, prefix: str, index: int, site) -> Value:
        """A block repeated a number of times that follows constructor arguments: a loop over the sequential
        module's children from `index` on, so it must end its sequential body."""
        first = line.chain.steps[0]
        if len(line.chain.steps) > 1 or first.call.name not in self.blocks:
            raise SpecError(line.repeat.pos, "a repeat count that follows constructor arguments repeats one block call")
        if any(not isinstance(later, S.LetDecl) for later in rest):
            raise SpecError(
                line.repeat.pos, "a repeat count that follows constructor arguments repeats the last line of its block"
            )
        variable = "block" if not self.loops else f"block_{self.loops + 1}"
        self.loops += 1
        if line.index is None:
            carried = Value(value.name, value.shape)
            body, out = self.region(
                lambda: self.block_call(first.call, scope, carried, variable, site or first.call.pos)
            )
            if out.shape != value.shape:
                raise SpecError(
                    first.call.pos,
                    f"a block repeated by a constructor argument must keep its input's shape: {list(value.shape)} becomes {list(out.shape)}",
                )
        else:
            body, carried, out = self.indexed_loop(line, scope, value, variable, site or first.call.pos)
        self.loops -= 1
        self.body.append(Loop(prefix, index, variable, body, value, carried, out))
        return out

    def dense(self, line: S.Sequence, scope: _Scope, value: Value, prefix: str, site) -> Value:
        """`dense layers:` with one indexed block call: a loop over the children whose iterations each read
        the concatenation of `value` and every earlier iteration's output, and whose value is all of it
        (DenseNet's dense block). Every iteration at the default arguments is built and checked."""
        if line.kind != "dense":
            raise SpecError(
                line.pos, f"unknown kind of sequence {line.kind!r}; `dense {line.name}:` is the one there is"
            )
        repeat = line.body[0] if len(line.body) == 1 else None
        if not (
            isinstance(repeat, S.ChainLine)
            and repeat.index is not None
            and repeat.target is None
            and len(repeat.chain.steps) == 1
            and repeat.chain.steps[0].call.name in self.blocks
        ):
            raise SpecError(
                line.pos,
                "a dense sequence holds one block call repeated with an index: `layer(c + i * g, g) for i in range(n)`",
            )
        if len(value.shape) != 4:
            raise SpecError(
                line.pos, f"a dense sequence joins 4-d (NCHW) tensors along channels, not {list(value.shape)}"
            )
        count = evaluate(repeat.repeat, scope)
        if not isinstance(count.value, int) or isinstance(count.value, bool) or count.value < 1:
            raise SpecError(
                repeat.repeat.pos,
                f"a dense sequence runs its block at least once at the default arguments, got {count.value!r}",
            )
        call = repeat.chain.steps[0].call
        variable = "block" if not self.loops else f"block_{self.loops + 1}"
        self.loops += 1
        first, channels = None, value.shape[1]
        for i in range(count.value):
            carried = Value(value.name, (value.shape[0], channels, *value.shape[2:]))
            iteration = scope.child({repeat.index: Val(i, count.deps)})
            body, part = self.region(lambda: self.block_call(call, iteration, carried, variable, site or call.pos))
            ops = [[node.op.name for node in chain.ops] for chain in walk(body)]
            if first is not None and ops != first[0]:
                raise SpecError(
                    call.pos,
                    f"{repeat.index} = {i} makes the ops {ops}, but {repeat.index} = 0 makes {first[0]}; a loop's"
                    " iterations run one body, so they must make the same ops",
                )
            if len(part.shape) != 4 or (part.shape[0], *part.shape[2:]) != (value.shape[0], *value.shape[2:]):
                raise SpecError(
                    call.pos,
                    f"a dense sequence joins each block's output to its input along channels, so the block must keep"
                    f" the batch and the pixels: {list(carried.shape)} becomes {list(part.shape)}",
                )
            first = first or (ops, body, carried, part)
            channels += part.shape[1]
        self.loops -= 1
        _, body, carried, part = first
        output = Value(value.name, (value.shape[0], channels, *value.shape[2:]))
        self.body.append(Loop(prefix, 0, variable, body, value, carried, output, part=part))
        return output

    def indexed_loop(self, line: S.ChainLine, scope: _Scope, value: Value, variable: str, site: Pos):
        """(body, carried, output) of a loop whose block call reads the repeat's index (a stage per width):
        every iteration at the default arguments is built and checked, and the loop's body is the last one,
        so that its output has the shape after the loop. The iterations share one body in forward, so they
        must lower to the same ops and keep the rank."""
        count = evaluate(line.repeat, scope)
        if not isinstance(count.value, int) or isinstance(count.value, bool) or count.value < 1:
            raise SpecError(
                line.repeat.pos,
                f"a repeat that follows constructor arguments runs at least once at the default arguments, got {count.value!r}",
            )
        call = line.chain.steps[0].call
        first_ops, out = None, value
        for i in range(count.value):
            carried = Value(value.name, out.shape)
            iteration = scope.child({line.index: Val(i, count.deps)})
            body, out = self.region(lambda: self.block_call(call, iteration, carried, variable, site))
            ops = [[node.op.name for node in chain.ops] for chain in walk(body)]
            if first_ops is not None and ops != first_ops:
                raise SpecError(
                    call.pos,
                    f"{line.index} = {i} makes the ops {ops}, but {line.index} = 0 makes {first_ops}; a loop's"
                    " iterations run one body, so they must make the same ops",
                )
            if len(out.shape) != len(carried.shape):
                raise SpecError(
                    call.pos,
                    f"each iteration of a loop reads the one before's output, so the block must keep its input's"
                    f" rank: {list(carried.shape)} becomes {list(out.shape)}",
                )
            first_ops = ops
        return body, carried, out

    def sequential_body(
        self, body, scope: _Scope, value: Value, prefix: str, site: Pos | None, index: int
    ) -> tuple[Value, int]:
        """Runs a sequential body on `value`, its children numbered from `index`; returns the value and the
        next index."""
        for number, line in enumerate(body):
            if isinstance(line, S.LetDecl):
                scope = scope.child({line.name: evaluate(line.value, scope)})
            elif isinstance(line, S.If):
                test = _static(evaluate(line.test, scope), line.test.pos, "this condition")
                value, index = self.sequential_body(
                    line.body if test else line.orelse, scope, value, prefix, site, index
                )
            elif line.repeat is not None and evaluate(line.repeat, scope).deps:
                value = self.loop(line, body[number + 1 :], scope, value, prefix, index, site)
            else:
                for i in range(self.repeat(line, scope)):
                    # the index is the line's own, as a comprehension's variable is
                    line_scope = scope.child({line.index: Val(i)}) if line.index is not None else scope
                    first = line.chain.steps[0]
                    if first.call.name in self.blocks:
                        path = f"{prefix}[{index}]"
                        value = self.block_call(first.call, line_scope, value, path, site or first.call.pos)
                        index += 1
                        continue
                    uses = []
                    for step in line.chain.steps:
                        uses.append((self.ops.op(step.call), step, f"{prefix}[{index}]"))
                        index += 1
                    value = self.chain(line.chain, uses, value, line_scope, {}, site, None)
        return value, index

    def named(self, value: Value, name: str | None, made: int) -> Value:
        """`value` under the name a line binds it to, where the line's last chain made it (a block's or a
        sequence's chains name their outputs x); `made` is how many items the body had before the line."""
        last = self.body[-1] if len(self.body) > made else None
        if name is None or not isinstance(last, Chain) or last.output is not value or value.name == name:
            return value
        renamed = Value(name, value.shape)
        self.body[-1] = replace(last, output=renamed)
        return renamed

    def repeat(self, line, scope: _Scope) -> int:
        if not isinstance(line, S.ChainLine) or line.repeat is None:
            return 1
        count = _static(evaluate(line.repeat, scope), line.repeat.pos, "this repeat count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise SpecError(line.repeat.pos, f"a line repeats a whole number of times, got {count!r}")
        if count > MAX_REPEAT:
            raise SpecError(
                line.repeat.pos, f"a line repeats at most {MAX_REPEAT} times (fusegen's limit), got {count}"
            )
        return count

    def module_steps(self, chain: S.Chain, steps, value: Value, scope, tensors, path, site, target) -> Value:
        """The steps of a chain in a module body: ops (labelled ones own a module), one block, or a cat."""
        uses = []
        for i, step in enumerate(steps):
            call = step.call
            concat = O.lookup(call.name)
            if concat is not None and concat.role is O.Role.CONCAT:
                if i > 0 or len(steps) > 1 or steps is not chain.steps:
                    raise SpecError(
                        call.pos,
                        f"{call.name} joins values into one buffer, so it stands alone on its line:"
                        f" `name = {call.name}(a, b)`, then `name -> ...` on the next",
                    )
                return self.concat(chain, step, concat, tensors, site, target)
            instance = scope.values.get(call.name) if _is_bare(step) and call.name not in self.blocks else None
            if instance is not None and O.lookup(call.name) is None:
                module = instance.value
                if not isinstance(module, BlockInstance):
                    raise SpecError(call.pos, f"{call.name!r} is {module!r} here, not a module to apply")
                if len(steps) > 1:
                    raise SpecError(call.pos, f"{call.name!r} expands to chains of its own; put it on a line by itself")
                return self.inline(module.block, module.args, value, _child(path, call.name), site or call.pos)
            if call.name in self.blocks:
                return self.block_call(call, scope, value, _child(path, step.label), site or call.pos)
            op = self.ops.op(call)
            uses.append((op, step, _child(path, step.label) if step.label else None))
        return self.chain(chain, uses, value, scope, tensors, site, target)

    def block_call(self, call: S.Call, scope: _Scope, value: Value, path: str, site: Pos) -> Value:
        block = self.blocks[call.name]
        args = _bind_block(
            block,
            call.args,
            call.kwargs,
            [evaluate(a, scope) for a in call.args],
            [evaluate(kw.value, scope) for kw in call.kwargs],
            call.pos,
            scope,
        )
        return self.inline(block, args, value, path, site)

    def inline(self, block: S.BlockDecl, args: dict[str, Val], value: Value, path: str, site: Pos) -> Value:
        if block.name in self.block_stack:
            raise SpecError(site, f"block {block.name!r} calls itself")
        self.block_stack.append(block.name)
        scope = replace(self.scope, values={**self.scope.globals, **args})
        if block.kind == "block":
            value, _ = self.sequential_body(block.body, scope, value, path, site, 0)
        else:
            value, _ = self.module_body(block.body, scope, {"x": value}, path, site)
        self.block_stack.pop()
        return value

    def concat(self, chain: S.Chain, step: S.Step, op: O.Op, tensors, site: Pos | None, target: str | None) -> Value:
        """`cat(a, b, ...)`: a chain of one node that reads the first value as its input and the others as
        operands; plan has the kernels that make them store into their slices of one buffer."""
        call = step.call
        if step.label is not None:
            raise SpecError(step.pos, f"{call.name} has no module, so it takes no name")
        if call.kwargs:
            raise SpecError(call.kwargs[0].pos, f"{call.name} takes values only, no keyword arguments")
        if len(call.args) < 2:
            raise SpecError(call.pos, f"{call.name} joins two or more values, {len(call.args)} given")
        parts = []
        for arg in call.args:
            if not isinstance(arg, S.Name) or arg.id not in tensors:
                raise SpecError(
                    arg.pos, f"{call.name} joins values of this body ({', '.join(sorted(tensors))}); this is not one"
                )
            parts.append(tensors[arg.id])
        shape = parts[0].shape
        try:
            shape = op.shape({"values": [part.shape for part in parts[1:]]}, shape)
        except O.ShapeError as err:
            if not self.untaken:
                where = f" (in {self.block_stack[-1]} called at line {site.line})" if site and self.block_stack else ""
                raise SpecError(call.pos, f"{err}{where}") from None
        node = Node(op, None, call.pos, shape, operands=tuple(parts[1:]))
        return self.record(chain, (node,), parts[0], site, target)

    def record(self, chain: S.Chain, nodes: tuple[Node, ...], value: Value, site: Pos | None, target) -> Value:
        """Adds the chain of `nodes` on `value` to the body; returns its output."""
        text = _comment_text(self.lines[chain.pos.line - 1])
        call_site = f"{site.line}: {_comment_text(self.lines[site.line - 1])}" if site else ""
        output = Value(target or "x", nodes[-1].out_shape)
        self.body.append(Chain(nodes, chain.pos.line, text, call_site, value, output))
        return output

    # Chains.

    def chain(
        self, chain: S.Chain, uses, value: Value, scope: _Scope, tensors, site: Pos | None, target: str | None
    ) -> Value:
        """One chain on `value`: checks fusion legality, follows the shape, records the chain."""
        nodes, values = [], []
        for op, step, path in uses:
            args = self.ops.values(op, step.call, scope)
            operands = []
            for name in op.tensor_args:
                ref = args[name]
                if not isinstance(ref, S.Name) or ref.id not in tensors:
                    pos = getattr(ref, "pos", step.call.pos)
                    raise SpecError(
                        pos, f"{op.name}: {name} must name a value of this body ({', '.join(sorted(tensors))})"
                    )
                operands.append(tensors[ref.id])
                args[name] = tensors[ref.id].shape
            nodes.append(Node(op, path, step.call.pos, operands=tuple(operands)))
            values.append(args)
        where = ""
        if site is not None:
            where = f" (in {self.block_stack[-1] if self.block_stack else 'the block'} called at line {site.line})"
        nodes = [_specialized(node, args, where) for node, args in zip(nodes, values)]
        _check_fusion(nodes, values)
        shape = value.shape
        shaped = []
        for node, args in zip(nodes, values):
            try:
                rank, shape = len(shape), node.op.shape(args, shape)
                if node.op.for_rank is not None:
                    node = replace(node, op=node.op.for_rank(rank))
            except O.ShapeError as err:
                if not self.untaken:  # a branch not taken here: its shapes are checked where it runs
                    raise SpecError(node.pos, f"{err}{where}") from None
            if math.prod(shape) > MAX_ELEMENTS:
                raise SpecError(
                    node.pos, f"{node.op.name} makes a {list(shape)} tensor, past fusegen's limit of 2**31 - 1 elements"
                )
            shaped.append(replace(node, out_shape=shape))
        if not shaped:
            return value
        if len(shaped) > MAX_CHAIN_OPS:
            raise SpecError(shaped[MAX_CHAIN_OPS].pos, f"a chain has at most {MAX_CHAIN_OPS} ops (fusegen's limit)")
        self.ops_made += len(shaped)
        if self.ops_made > MAX_OPS:
            raise SpecError(
                chain.pos,
                f"the forward pass has more than {MAX_OPS} ops, repeats and block calls expanded (fusegen's limit)",
            )
        return self.record(chain, tuple(shaped), value, site, target)


def _check_calls(spec: S.Spec, scope: _Scope) -> None:
    """Every function an expression calls is a builtin of BUILTINS, a let function or a block: also in a
    branch that check never evaluates, since __init__ holds it all (`exec(...)` must not get there)."""
    known = {*BUILTINS, *scope.functions, *scope.blocks}
    stack: list = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, S.Apply) and node.func not in known:
            raise SpecError(
                node.pos, f"unknown function {node.func!r}; expressions may call {', '.join(sorted(known))}"
            )
        if isinstance(node, (tuple, list)):
            stack.extend(node)
        elif dataclasses.is_dataclass(node):
            stack.extend(getattr(node, f.name) for f in dataclasses.fields(node))


def _comment_text(line: str) -> str:
    """A spec line as generated code quotes it in a comment: without its own comment, and with each
    character that is not printable (a carriage return would end the comment) escaped."""
    text = line.split("#")[0].strip()
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _specialized(node: Node, args: dict, where: str) -> Node:
    """The op for its argument values, where they decide how it lowers (conv: which anchor)."""
    if node.op.specialize is None:
        return node
    try:
        return replace(node, op=node.op.specialize(args, node.module_path is not None))
    except O.ArgumentError as err:
        raise SpecError(node.pos, f"{err}{where}") from None


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_fusion(uses: list[Node], values: list[dict]) -> None:
    """A chain is one kernel: elementwise prologue, one anchor, elementwise epilogue, a final view. A
    second anchor may follow a first that can produce its input tile inside the second's K loop
    (dwconv -> ... -> conv1x1), or at each of the second's taps (conv1x1 -> ... -> dwconv): then the
    first and the elementwise ops after it are that producer. Or a pool may end the chain of an anchor
    with a 4-d output (conv1x1 -> bn -> relu -> avgpool(7)): the kernel computes the pool's windows and
    stores only the pooled pixels. An op that reads another value (add) reads it at the output tile's
    offsets, so it belongs to the epilogue of a kernel that stores every pixel it computes."""
    anchor_at = [i for i, use in enumerate(uses) if use.op.role is O.Role.ANCHOR]
    for i, use in enumerate(uses):
        if not use.operands:
            continue
        if anchor_at and i < anchor_at[-1]:
            raise SpecError(
                use.pos,
                f"{use.op.name} reads another value at the output tile's offsets, so it must come after the kernel's"
                f" last anchor ({uses[anchor_at[-1]].op.name}); end the chain before it",
            )
        if any(u.op.lowering.pool for u in uses if isinstance(u.op.lowering, O.Anchor)) and len(anchor_at) == 2:
            raise SpecError(
                use.pos, f"{use.op.name} cannot join a kernel that a pool ends; start a new chain at the pool"
            )
    anchors: list[Node] = []
    first_args: dict = {}
    for i, (use, args) in enumerate(zip(uses, values)):
        role = use.op.role
        if role is O.Role.VIEW and i != len(uses) - 1:
            raise SpecError(
                uses[i + 1].pos,
                f"{use.op.name} only reshapes the kernel's output, so it must end its chain; start a new line here",
            )
        if anchors and anchors[-1].op.lowering.pool and len(anchors) == 2 and role is not O.Role.VIEW:
            raise SpecError(
                use.pos,
                f"{anchors[-1].op.name} ends the kernel of {anchors[0].op.name}, so only a view may follow it;"
                f" start a new chain (a new line) at {use.op.name}",
            )
        if role is not O.Role.ANCHOR:
            continue
        if anchors:
            first, lowering = anchors[-1], use.op.lowering
            why = lowering.barrier
            if lowering.pool and first.op.lowering.pool_refusal:
                why = f"{first.op.name} {first.op.lowering.pool_refusal}"
            elif (
                lowering.pool
                and first.op.lowering.out_rank == 4
                and not (first.op.lowering.pool or first.op.lowering.grouped)
            ):
                if len(anchors) == 1:
                    anchors.append(use)
                    continue
                why = f"a pool ends the kernel of one anchor, and this kernel computes {anchors[0].op.name} inside {first.op.name}"
            if len(anchors) == 1 and first.op.lowering.produce and lowering.consume:
                refusal = lowering.consume_refusal(args)
                if refusal is None:
                    anchors.append(use)
                    continue
                why = f"{use.op.name} computes {first.op.name} in its K loop only at its own pixels, and {refusal}"
            if len(anchors) == 1 and first.op.lowering.produce_tap and lowering.consume_taps:
                refusal = first.op.lowering.produce_tap_refusal(first_args)
                if refusal is None:
                    anchors.append(use)
                    continue
                why = f"{use.op.name} computes {first.op.name} at the input pixels of its taps, and {refusal}"
            raise SpecError(
                use.pos,
                f"{use.op.name} cannot join the kernel of {first.op.name}: {why}. Start a new chain (a new line) at {use.op.name}",
            )
        anchors.append(use)
        first_args = args
    _check_channel_maps(uses, anchor_at)


def _check_channel_maps(uses: list[Node], anchor_at: list[int]) -> None:
    """A channel map (channel_shuffle) moves where its kernel loads or stores channels: before the anchor,
    the anchor's loads (an anchor that takes that: Anchor.maps_channels); after it, the one store. A
    producer's tile and a pooled pixel are addressed elsewhere, so two anchors take none."""
    for i, use in enumerate(uses):
        if not isinstance(use.op.lowering, O.ChannelMap):
            continue
        if len(anchor_at) == 2:
            raise SpecError(
                use.pos,
                f"{use.op.name} moves channels where a kernel loads or stores them, which a kernel of two anchors"
                f" ({uses[anchor_at[0]].op.name}, {uses[anchor_at[1]].op.name}) does elsewhere; end the chain"
                f" after {use.op.name} or start a new one at it",
            )
        if anchor_at and i < anchor_at[0] and not uses[anchor_at[0]].op.lowering.maps_channels:
            anchor = uses[anchor_at[0]].op.name
            raise SpecError(
                use.pos,
                f"{use.op.name} before {anchor} would move the channels that {anchor} loads, which only a 1x1"
                f" conv's loads take; end the previous chain with {use.op.name} (its store moves them) instead",
            )


# -- the checker ------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, spec: S.Spec, source: str):
        self.spec = spec
        self.lines = source_lines(source)

    def declarations(self) -> tuple[_Scope, tuple[tuple[str, str], ...], list[str]]:
        """The constructor parameters, global lets and blocks: their scope, the parameters with their
        defaults as source, and the __init__ lines that define the lets and blocks."""
        params = []
        values: dict[str, Val] = {}
        for p in self.spec.model.params:
            _check_name(p.name, p.pos, "constructor parameter")
            self.define(p.name, p.pos, "a constructor parameter")
            values[p.name] = Val(evaluate(p.default, _Scope({}, {}, {}, {})).value, frozenset({p.name}))
            params.append((p.name, expr_source(p.default)))
        blocks: dict[str, S.BlockDecl] = {}
        scope = _Scope(values, {}, blocks, values)
        init: list[str] = []
        for let in self.spec.lets:
            _check_name(let.name, let.pos, "let")
            self.define(let.name, let.pos, "a let")
            for param in let.params or ():
                _check_name(param, let.pos, "let parameter")
            if let.params is not None:
                init += [f"def {let.name}({', '.join(let.params)}):", f"    return {expr_source(let.value)}"]
                scope = replace(scope, functions={**scope.functions, let.name: (let, scope.values)})
            else:
                init.append(f"{let.name} = {expr_source(let.value)}")
                scope = scope.child({let.name: evaluate(let.value, scope)})
        scope = replace(scope, globals=scope.values)
        for block in self.spec.blocks:
            _check_name(block.name, block.pos, "block")
            self.define(block.name, block.pos, "a block")
            if O.lookup(block.name) is not None:
                raise SpecError(block.pos, f"block {block.name!r} has the name of an op")
            names = [p.name for p in block.params]
            if len(set(names)) != len(names):
                raise SpecError(block.pos, f"block {block.name!r} names a parameter twice")
            for p in block.params:
                _check_name(p.name, p.pos, "block parameter")
            blocks[block.name] = block
        return scope, tuple(params), init

    def define(self, name: str, pos: Pos, what: str) -> None:
        """Constructor parameters, global lets and blocks share __init__'s namespace, where each name is
        bound once: Python's functions read a name when they run, so a second binding would change what a
        block or a let function computes from what check computed."""
        if name in self.defined:
            first_what, first_pos = self.defined[name]
            raise SpecError(
                pos, f"{name!r} is already defined at line {first_pos.line} ({first_what}); pick another name"
            )
        self.defined[name] = (what, pos)

    def run(self) -> Model:
        self.defined: dict[str, tuple[str, Pos]] = {}
        scope, params, init = self.declarations()
        _check_calls(self.spec, scope)
        ops = _Ops(scope.blocks, self.defined)
        writer = _InitWriter(ops)
        for block in self.spec.blocks:
            init += writer.block_function(block)
        self.attributes: set[str] = set()
        self.check_attributes(self.spec.forward.body, self.attributes)
        init += writer.module_body(self.spec.forward.body, "self", set(), {"x"}, set())
        if self.spec.init is not None:
            init += _init_rules(self.spec.init, scope)

        dims = []
        for d in self.spec.input.dims:
            value = evaluate(d, scope).value
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(d.pos, f"input dimensions are positive integers, got {value!r}")
            dims.append(value)
        if math.prod(dims) > MAX_ELEMENTS:
            raise SpecError(self.spec.input.pos, f"the example input has more than 2**31 - 1 elements: {dims}")
        if len(dims) != 4:
            raise SpecError(self.spec.input.pos, f"the example input is N, C, H, W (4 dimensions), got {len(dims)}")
        builder = _GraphBuilder(ops, self.lines, scope)
        model_input = Value("x", tuple(dims))
        output, _ = builder.module_body(self.spec.forward.body, scope, {"x": model_input}, "", None)
        if not any(walk(builder.body)):
            raise SpecError(self.spec.forward.pos, "forward has no chains")
        for attribute, source, pos in builder.conditions:
            if attribute in self.attributes or hasattr(nn.Module(), attribute) or attribute in MODEL_ATTRIBUTES:
                raise SpecError(
                    pos,
                    f"ModelNew keeps this condition as self.{attribute}, which names a module; bind it with another `let` name",
                )
            init.append(f"self.{attribute} = {source}  # forward reads it: the structure follows it")
        graph = Graph(model_input, tuple(builder.body), output)
        init = _fixed_parameter_guards(self.spec) + init
        return Model(self.spec.model.name, params, tuple(dims), tuple(init), graph, self.activation_dtype())

    def check_attributes(self, body: tuple, seen: set[str]) -> None:
        """The forward body's module names: unique (the two bodies of an `if` may each make one), and none
        that nn.Module has already."""
        for line in body:
            names = []
            if isinstance(line, S.Sequence):
                names = [(line.name, line.pos)]
            elif isinstance(line, S.If):
                then, orelse = set(seen), set(seen)
                self.check_attributes(line.body, then)
                self.check_attributes(line.orelse, orelse)
                seen |= then | orelse
            elif isinstance(line, (S.ChainLine, S.Return)):
                if isinstance(line, S.ChainLine) and line.repeat is not None:
                    raise SpecError(
                        line.pos, "`* N` repeats lines of a sequence or block; at the top level name each module"
                    )
                names = [(s.label, s.pos) for s in line.chain.steps if s.label]
            for name, pos in names:
                if name in seen:
                    raise SpecError(pos, f"{name!r} names a second module; module names must be unique")
                base = name.split("[")[0]
                if hasattr(nn.Module(), base) or base in MODEL_ATTRIBUTES:
                    owner = "nn.Module" if hasattr(nn.Module(), base) else "ModelNew"
                    raise SpecError(pos, f"{base!r} is an attribute of {owner}; pick another name")
                seen.add(name)

    def activation_dtype(self) -> str:
        decl = self.spec.activations
        if decl is None:
            return "float32"
        if decl.dtype not in ACTIVATION_DTYPES:
            raise SpecError(
                decl.dtype_pos, f"activations(...) takes {' or '.join(ACTIVATION_DTYPES)}, got {decl.dtype!r}"
            )
        return decl.dtype


def _names_read(node: object) -> Iterator[str]:
    """Every name an expression anywhere under node reads (a syntax tree of frozen dataclasses)."""
    if isinstance(node, S.Name):
        yield node.id
    elif isinstance(node, tuple):
        for item in node:
            yield from _names_read(item)
    elif dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from _names_read(getattr(node, field.name))


def _fixed_parameter_guards(spec: S.Spec) -> list[str]:
    """__init__ lines for the constructor parameters that nothing in the spec reads: ModelNew takes them, as
    the reference does (KernelBench calls ModelNew(*get_init_inputs())), but only at their defaults; any
    other value raises instead of building the default net."""
    read = set(_names_read(dataclasses.replace(spec, model=None)))
    lines = []
    for p in spec.model.params:
        if p.name not in read:
            default = expr_source(p.default)
            message = (
                f"{spec.model.name}'s spec fixes {p.name} at {default}: nothing in it reads {p.name}, so it"
                f" builds the same net for any value; got {p.name}={{{p.name}!r}}"
            )
            lines += [f"if {p.name} != {default}:", f"    raise ValueError(f{message!r})"]
    return lines


def check(spec: S.Spec, source: str) -> Model:
    return _Checker(spec, source).run()
