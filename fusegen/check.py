"""Stage 2, check: resolve names and ops, evaluate the spec at its default constructor arguments and
example input, and verify shapes, channel counts and that every chain can be one kernel.

It also records, symbolically, how ModelNew.__init__ builds the module tree (so that other
constructor arguments still work) and where each op's module lives (`model[3][4]`).
"""

from __future__ import annotations

import builtins
import difflib
import keyword
from dataclasses import dataclass, replace

import torch.nn as nn

from fusegen import ops as O
from fusegen import syntax as S
from fusegen.errors import Pos, SpecError

# Functions a spec expression may call besides its own `let` functions.
BUILTINS = {"int": int, "round": round, "min": min, "max": max}
# Names an expression may use anywhere (conv's `bias=False`); Python's own, so no spec can rebind them.
CONSTANTS = {"True": True, "False": False}
# Names the generated module uses itself.
RESERVED = {"self", "x", "nn", "torch", "triton", "tl", "super", "range", "ModelNew"} | set(dir(builtins))
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


# -- what check hands to plan and emit ------------------------------------------------------------------


@dataclass(frozen=True)
class OpUse:
    """One op of a chain, resolved."""

    op: O.Op
    module_path: str | None  # where ModelNew holds its module, relative to self: "model[3][4]", "fc"
    pos: Pos
    out_shape: O.Shape = ()  # the tensor after this op, at the example input and default arguments


@dataclass(frozen=True)
class ChainUse:
    """One chain of the forward pass, as instantiated at one place."""

    ops: tuple[OpUse, ...]
    line: int  # spec line where the chain is written
    text: str  # the chain as written
    site: str  # where a block instantiates it: "20: conv_dw(c(32), c(64), 1)"; "" outside blocks
    in_shape: O.Shape  # at the example input and default arguments


@dataclass(frozen=True)
class Function:
    """A nested function of __init__: a `let` function or a block that returns nn.Sequential."""

    name: str
    params: tuple[str, ...]
    lets: tuple[tuple[str, str], ...]
    result: str


@dataclass(frozen=True)
class Assign:
    target: str  # "h" or "self.conv1"
    value: str


@dataclass(frozen=True)
class Model:
    name: str
    params: tuple[tuple[str, str], ...]  # constructor parameter, default as source
    example_input: O.Shape
    init: tuple[Function | Assign, ...]  # the body of ModelNew.__init__, in order
    chains: tuple[ChainUse, ...]  # the forward pass, in order
    activation_dtype: str = "float32"  # torch dtype of the tensors between kernels in eval mode


# What `activations(...)` may store. float16 keeps TF32's 10-bit mantissa, so the 1x1 convs see the
# same operands they would round to anyway, at half the bytes (its range ends at 65504, far above
# activations after BatchNorm). bfloat16 is not offered: its 7 bits round 8x coarser than TF32.
ACTIVATION_DTYPES = ("float32", "float16")


# -- expressions -----------------------------------------------------------------------------------------


def expr_source(e: S.Expr, parent: int = 0, right: bool = False) -> str:
    """Python source of an expression, with the parentheses that precedence needs."""
    if isinstance(e, S.IntLiteral):
        return str(e.value)
    if isinstance(e, S.FloatLiteral):
        return repr(e.value)
    if isinstance(e, S.Name):
        return e.id
    if isinstance(e, S.Apply):
        return f"{e.func}({', '.join(expr_source(a) for a in e.args)})"
    if isinstance(e, S.Neg):
        return f"-{expr_source(e.operand, 3)}"
    prec = _PRECEDENCE[e.op]
    text = f"{expr_source(e.left, prec)} {e.op} {expr_source(e.right, prec, right=True)}"
    return f"({text})" if prec < parent or (right and prec == parent) else text


@dataclass
class _Scope:
    values: dict[str, object]
    # let functions, each with the values visible where it was declared (Python closes over those)
    functions: dict[str, tuple[S.LetDecl, dict[str, object]]]

    def child(self, values: dict[str, object]) -> "_Scope":
        return _Scope({**self.values, **values}, self.functions)


def evaluate(e: S.Expr, scope: _Scope) -> object:
    if isinstance(e, S.IntLiteral):
        return e.value
    if isinstance(e, S.FloatLiteral):
        return e.value
    if isinstance(e, S.Name):
        if e.id in CONSTANTS:
            return CONSTANTS[e.id]
        if e.id not in scope.values:
            known = sorted(scope.values)
            hint = difflib.get_close_matches(e.id, known, 1)
            extra = f"; did you mean {hint[0]!r}?" if hint else (f"; known names: {', '.join(known)}" if known else "")
            raise SpecError(e.pos, f"unknown name {e.id!r}{extra}")
        return scope.values[e.id]
    if isinstance(e, S.Neg):
        return -_number(evaluate(e.operand, scope), e.operand.pos)
    if isinstance(e, S.Apply):
        args = [evaluate(a, scope) for a in e.args]
        if e.func in scope.functions:
            let, closure = scope.functions[e.func]
            if len(args) != len(let.params):
                raise SpecError(e.pos, f"{e.func}() takes {len(let.params)} argument(s), {len(args)} given")
            return evaluate(let.value, _Scope({**closure, **dict(zip(let.params, args))}, scope.functions))
        if e.func not in BUILTINS:
            known = sorted([*BUILTINS, *scope.functions])
            raise SpecError(e.pos, f"unknown function {e.func!r}; expressions may call {', '.join(known)}")
        try:
            return BUILTINS[e.func](*args)
        except TypeError as err:
            raise SpecError(e.pos, f"{e.func}(): {err}") from None
    left = _number(evaluate(e.left, scope), e.left.pos)
    right = _number(evaluate(e.right, scope), e.right.pos)
    try:
        return {
            "+": lambda: left + right,
            "-": lambda: left - right,
            "*": lambda: left * right,
            "/": lambda: left / right,
            "//": lambda: left // right,
            "%": lambda: left % right,
        }[e.op]()
    except ZeroDivisionError:
        raise SpecError(e.pos, "division by zero") from None


def _number(value: object, pos: Pos) -> int | float:
    if not isinstance(value, (int, float)):
        raise SpecError(pos, f"expected a number, got {value!r}")
    return value


def _check_name(name: str, pos: Pos, what: str) -> None:
    if keyword.iskeyword(name) or name in RESERVED:
        raise SpecError(pos, f"{what} {name!r} clashes with a name the generated Python uses; pick another")


# -- the checker ------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, spec: S.Spec, source: str):
        self.spec = spec
        self.lines = source.splitlines()
        self.blocks: dict[str, S.BlockDecl] = {}
        self.init: list[Function | Assign] = []
        self.chains: list[ChainUse] = []
        self.attributes: set[str] = set()
        self.block_stack: list[str] = []

    # The model header, global lets and blocks.

    def declarations(self) -> tuple[_Scope, tuple[tuple[str, str], ...]]:
        params = []
        values: dict[str, object] = {}
        for p in self.spec.model.params:
            _check_name(p.name, p.pos, "constructor parameter")
            if p.name in values:
                raise SpecError(p.pos, f"constructor parameter {p.name!r} is declared twice")
            values[p.name] = evaluate(p.default, _Scope({}, {}))
            params.append((p.name, expr_source(p.default)))
        scope = _Scope(values, {})
        for let in self.spec.lets:
            scope = self.let(let, scope, in_block=False)
        for block in self.spec.blocks:
            _check_name(block.name, block.pos, "block")
            if block.name in self.blocks or block.name in scope.functions:
                raise SpecError(block.pos, f"{block.name!r} is defined twice")
            if O.lookup(block.name) is not None:
                raise SpecError(block.pos, f"block {block.name!r} has the name of an op")
            if len(set(block.params)) != len(block.params):
                raise SpecError(block.pos, f"block {block.name!r} names a parameter twice")
            self.blocks[block.name] = block
            self.init.append(self.block_function(block))
        return scope, tuple(params)

    def let(self, let: S.LetDecl, scope: _Scope, in_block: bool) -> _Scope:
        _check_name(let.name, let.pos, "let")
        if let.params is not None:
            if in_block:
                raise SpecError(let.pos, "let functions are declared at the top of the spec, not inside a body")
            self.init.append(Function(let.name, let.params, (), expr_source(let.value)))
            return _Scope(scope.values, {**scope.functions, let.name: (let, scope.values)})
        value = evaluate(let.value, scope)
        if not in_block:
            self.init.append(Assign(let.name, expr_source(let.value)))
        return scope.child({let.name: value})

    def block_function(self, block: S.BlockDecl) -> Function:
        lets = []
        items = []
        for line in block.body:
            if isinstance(line, S.LetDecl):
                if line.params is not None:
                    raise SpecError(line.pos, "let functions are declared at the top of the spec, not inside a body")
                lets.append((line.name, expr_source(line.value)))
            elif isinstance(line, S.Sequence):
                raise SpecError(line.pos, "a block is already an nn.Sequential; a named sequence belongs in forward")
            else:
                items.extend(self.item_sources(line))
        return Function(block.name, block.params, tuple(lets), _sequential(items))

    def item_sources(self, line: S.ChainLine) -> list[str]:
        """The nn.Sequential items a body line creates, as Python source (creation order kept)."""
        items = []
        for step in line.chain.steps:
            call = step.call
            if call.name in self.blocks:
                items.append(f"{call.name}({', '.join(expr_source(a) for a in call.args)})")
            else:
                op = self.op(call)
                items.append(op.module(self.arg_sources(op, call)))
        if line.repeat is None:
            return items
        if len(items) == 1:
            return [f"*({items[0]} for _ in range({line.repeat}))"]
        return items * line.repeat

    # Ops and their arguments.

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
                raise SpecError(kw.pos, f"{op.name} has no argument {kw.name!r} (it takes {', '.join(op.args) or 'none'})")
            if kw.name in bound:
                raise SpecError(kw.pos, f"{op.name} gets {kw.name!r} twice")
            bound[kw.name] = kw.value
        for name in op.args:
            if name not in bound:
                if name not in op.defaults:
                    raise SpecError(call.pos, f"{op.name} needs the argument {name!r} ({op.name}({', '.join(op.args)}))")
                bound[name] = op.defaults[name]
        return bound

    def arg_sources(self, op: O.Op, call: S.Call) -> dict[str, str]:
        return {k: expr_source(v) if _is_expr(v) else repr(v) for k, v in self.bind(op, call).items()}

    def arg_values(self, op: O.Op, call: S.Call, scope: _Scope) -> dict[str, object]:
        values = {}
        for name, value in self.bind(op, call).items():
            if _is_expr(value):
                pos = value.pos
                value = evaluate(value, scope)
            else:
                pos = call.pos
            if name in op.int_args and (not isinstance(value, int) or value < (0 if name == "padding" else 1)):
                hint = " (wrap it in int(...))" if isinstance(value, float) else ""
                raise SpecError(pos, f"{op.name}: {name} must be a positive integer, got {value!r}{hint}")
            values[name] = value
        return values

    # The forward pass.

    def forward(self, scope: _Scope) -> None:
        for line in self.spec.forward.body:
            if isinstance(line, S.LetDecl):
                scope = self.let(line, scope, in_block=False)
            elif isinstance(line, S.Sequence):
                self.attribute(line.name, line.pos)
                items = self.body(line.body, scope, line.name, site=None)
                self.init.append(Assign(f"self.{line.name}", _sequential(items)))
            else:
                self.top_level_line(line, scope)

    def attribute(self, name: str, pos: Pos) -> None:
        _check_name(name, pos, "name")
        if name in self.attributes:
            raise SpecError(pos, f"{name!r} names a second module; module names must be unique")
        if hasattr(nn.Module(), name):
            raise SpecError(pos, f"{name!r} is an attribute of nn.Module; pick another name")
        self.attributes.add(name)

    def top_level_line(self, line: S.ChainLine, scope: _Scope) -> None:
        if line.repeat is not None:
            raise SpecError(line.pos, "`* N` repeats lines of a sequence or block; at the top level name each module")
        first = line.chain.steps[0]
        if first.call.name in self.blocks:
            self.no_block_in_chain(line.chain)
            if first.label is None:
                raise SpecError(first.pos, f"a block at the top level needs a name: `name: {first.call.name}(...)`")
            self.attribute(first.label, first.pos)
            self.block_call(first.call, scope, first.label, site=first.call.pos)
            self.init.append(Assign(f"self.{first.label}", self.item_sources(S.ChainLine(line.chain, None, line.pos))[0]))
            return
        uses = []
        for step in line.chain.steps:
            op = self.op(step.call)
            if step.label is None:
                if op.needs_module:
                    raise SpecError(step.pos, f"{op.name} holds parameters, so it needs a name: `name: {op.name}(...)`")
                uses.append(OpUse(op, None, step.call.pos))
                continue
            self.attribute(step.label, step.pos)
            self.init.append(Assign(f"self.{step.label}", op.module(self.arg_sources(op, step.call))))
            uses.append(OpUse(op, step.label, step.call.pos))
        self.chain(line.chain, uses, scope, site=None)

    def body(self, body: tuple, scope: _Scope, prefix: str, site: Pos | None) -> list[str]:
        """Walks an nn.Sequential body (a named sequence or a block); returns its item sources."""
        items: list[str] = []
        index = 0
        for line in body:
            if isinstance(line, S.LetDecl):
                scope = scope.child({line.name: evaluate(line.value, scope)})
                continue
            if isinstance(line, S.Sequence):
                raise SpecError(line.pos, "named sequences belong at the top level of forward")
            for step in line.chain.steps:
                if step.label is not None:
                    raise SpecError(
                        step.pos,
                        "modules inside a sequence or block are numbered like nn.Sequential; names belong at the top level",
                    )
            items.extend(self.item_sources(line))
            for _ in range(line.repeat or 1):
                first = line.chain.steps[0]
                if first.call.name in self.blocks:
                    self.no_block_in_chain(line.chain)
                    self.block_call(first.call, scope, f"{prefix}[{index}]", site=site or first.call.pos)
                    index += 1
                    continue
                uses = []
                for step in line.chain.steps:
                    uses.append(OpUse(self.op(step.call), f"{prefix}[{index}]", step.call.pos))
                    index += 1
                self.chain(line.chain, uses, scope, site=site)
        return items

    def no_block_in_chain(self, chain: S.Chain) -> None:
        for step in chain.steps:
            if step.call.name in self.blocks and len(chain.steps) > 1:
                raise SpecError(
                    step.call.pos,
                    f"block {step.call.name!r} expands to chains of its own; put it on a line by itself",
                )

    def block_call(self, call: S.Call, scope: _Scope, path: str, site: Pos) -> None:
        block = self.blocks[call.name]
        if call.kwargs:
            raise SpecError(call.kwargs[0].pos, f"block {block.name!r} takes positional arguments only")
        if len(call.args) != len(block.params):
            raise SpecError(
                call.pos,
                f"block {block.name!r} takes {len(block.params)} argument(s) ({', '.join(block.params)}),"
                f" {len(call.args)} given",
            )
        if block.name in self.block_stack:
            raise SpecError(call.pos, f"block {block.name!r} calls itself")
        values = {p: evaluate(a, scope) for p, a in zip(block.params, call.args)}
        self.block_stack.append(block.name)
        self.body(block.body, scope.child(values), path, site=site)
        self.block_stack.pop()

    def chain(self, chain: S.Chain, uses: list[OpUse], scope: _Scope, site: Pos | None) -> None:
        """Checks fusion legality, then follows the tensor's shape through the chain."""
        values = [self.arg_values(use.op, step.call, scope) for use, step in zip(uses, chain.steps)]
        where = ""
        if site is not None:
            where = f" (in {self.block_stack[-1] if self.block_stack else 'the block'} called at line {site.line})"
        uses = [_specialized(use, args, where) for use, args in zip(uses, values)]
        _check_fusion(uses, values)
        in_shape = self.shape
        shaped = []
        for use, args in zip(uses, values):
            try:
                self.shape = use.op.shape(args, self.shape)
            except O.ShapeError as err:
                raise SpecError(use.pos, f"{err}{where}") from None
            shaped.append(replace(use, out_shape=self.shape))
        text = self.lines[chain.pos.line - 1].split("#")[0].strip()
        call_site = f"{site.line}: {self.lines[site.line - 1].split('#')[0].strip()}" if site else ""
        self.chains.append(ChainUse(tuple(shaped), chain.pos.line, text, call_site, in_shape))

    def run(self) -> Model:
        scope, params = self.declarations()
        dims = []
        for d in self.spec.input.dims:
            value = evaluate(d, scope)
            if not isinstance(value, int) or value < 1:
                raise SpecError(d.pos, f"input dimensions are positive integers, got {value!r}")
            dims.append(value)
        if len(dims) != 4:
            raise SpecError(self.spec.input.pos, f"the example input is N, C, H, W (4 dimensions), got {len(dims)}")
        self.shape: O.Shape = tuple(dims)
        self.forward(scope)
        if not self.chains:
            raise SpecError(self.spec.forward.pos, "forward has no chains")
        return Model(
            self.spec.model.name, params, tuple(dims), tuple(self.init), tuple(self.chains), self.activation_dtype()
        )

    def activation_dtype(self) -> str:
        decl = self.spec.activations
        if decl is None:
            return "float32"
        if decl.dtype not in ACTIVATION_DTYPES:
            raise SpecError(decl.dtype_pos, f"activations(...) takes {' or '.join(ACTIVATION_DTYPES)}, got {decl.dtype!r}")
        return decl.dtype


def _is_expr(value: object) -> bool:
    return isinstance(value, (S.IntLiteral, S.FloatLiteral, S.Name, S.Apply, S.BinOp, S.Neg))


def _specialized(use: OpUse, args: dict, where: str) -> OpUse:
    """The op for its argument values, where they decide how it lowers (conv: which anchor)."""
    if use.op.specialize is None:
        return use
    try:
        return replace(use, op=use.op.specialize(args, use.module_path is not None))
    except O.ArgumentError as err:
        raise SpecError(use.pos, f"{err}{where}") from None


def _sequential(items: list[str]) -> str:
    return f"nn.Sequential({', '.join(items)})"


def _check_fusion(uses: list[OpUse], values: list[dict]) -> None:
    """A chain is one kernel: elementwise prologue, one anchor, elementwise epilogue, a final view. A
    second anchor may follow a first that can produce its input tile inside the second's K loop
    (dwconv -> ... -> conv1x1), or at each of the second's taps (conv1x1 -> ... -> dwconv): then the
    first and the elementwise ops after it are that producer. Or a pool may end the chain of an anchor
    with a 4-d output (conv1x1 -> bn -> relu -> avgpool(7)): the kernel computes the pool's windows and
    stores only the pooled pixels."""
    anchors: list[OpUse] = []
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
            if lowering.pool and first.op.lowering.out_rank == 4 and not first.op.lowering.pool:
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


def check(spec: S.Spec, source: str) -> Model:
    return _Checker(spec, source).run()

