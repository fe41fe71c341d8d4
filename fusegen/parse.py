"""Stage 1, parse: spec text -> Lark tree -> the frozen dataclasses of fusegen.syntax."""

from __future__ import annotations

import keyword
import math
from functools import cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.indenter import DedentError, Indenter

from fusegen import syntax as S
from fusegen.errors import Pos, SpecError, source_lines

GRAMMAR = Path(__file__).resolve().parent.parent / "grammar" / "fuse.lark"

# Limits that keep every later stage (and the Python that runs the generated file) within its own: the
# recursion of each stage's walks, and integers that Python prints and torch allocates.
MAX_DEPTH = 64  # levels of the syntax tree: bodies, statements, calls and expressions all count
MAX_NAME_LENGTH = 100
MAX_INT = 2**63 - 1  # a spec's integers, literal or computed (fusegen.check), stay in int64

# How a grammar terminal is named in "expected ..." messages; punctuation is quoted from the grammar.
TOKEN_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "COMPARE": "a comparison",
    "STRING": "a string",
    "_NL": "end of line",
    "_INDENT": "an indented block",
    "_DEDENT": "less indentation",
    "$END": "end of file",
}


class SpecIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR"]
    CLOSE_PAREN_types = ["RPAR"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8


@cache
def _parser() -> Lark:
    return Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        postlex=SpecIndenter(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _pos(item) -> Pos:
    return Pos(item.line, item.column)


def _word(terminal: str, parser: Lark) -> str:
    if terminal in TOKEN_WORDS:
        return TOKEN_WORDS[terminal]
    for term in parser.terminals:
        if term.name == terminal and term.pattern.type == "str":
            return repr(term.pattern.value)
    return terminal.lower()


def _binop(op: str):
    def build(self, meta, items):
        return S.BinOp(op, items[0], items[1], _pos(meta))

    return build


def _not_a_keyword(token, meta) -> str:
    """A name in an expression. Where the grammar expects a name, the lexer reads any word as one, so
    `a and and` would reach the generated Python, which cannot parse it."""
    if keyword.iskeyword(str(token)) and str(token) not in ("None", "True", "False"):
        raise SpecError(_pos(meta), f"`{token}` is a Python keyword, not a name: a value is missing here")
    return str(token)


@v_args(meta=True)
class _ToSyntax(Transformer):
    """Builds one dataclass per grammar rule; the rule names match the class names."""

    def int_literal(self, meta, items):
        text = str(items[0]).lstrip("0") or "0"
        if len(text) > len(str(MAX_INT)) or int(text) > MAX_INT:
            raise SpecError(_pos(meta), f"integer too large: a spec's integers are at most 2**63 - 1 ({MAX_INT})")
        return S.IntLiteral(int(text), _pos(meta))

    def float_literal(self, meta, items):
        value = float(items[0])
        if not math.isfinite(value):
            raise SpecError(_pos(meta), "a number past float's range (about 1.8e308)")
        return S.FloatLiteral(value, str(items[0]), _pos(meta))

    def string_literal(self, meta, items):
        return S.StringLiteral(str(items[0])[1:-1], _pos(meta))

    def init_rule(self, meta, items):
        return S.InitRule(str(items[0]), str(items[1]), items[2], _pos(meta))

    def init_decl(self, meta, items):
        return S.InitDecl(tuple(items), _pos(meta))

    def name(self, meta, items):
        return S.Name(_not_a_keyword(items[0], meta), _pos(meta))

    def apply(self, meta, items):
        func, *args = items
        return S.Apply(_not_a_keyword(func, meta), tuple(a for a in args if a is not None), _pos(meta))

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    truediv = _binop("/")
    floordiv = _binop("//")
    mod = _binop("%")

    def neg(self, meta, items):
        return S.Neg(items[0], _pos(meta))

    def compare(self, meta, items):
        return S.Compare(str(items[1]), items[0], items[2], _pos(meta))

    def or_op(self, meta, items):
        return S.BoolOp("or", items[0], items[1], _pos(meta))

    def and_op(self, meta, items):
        return S.BoolOp("and", items[0], items[1], _pos(meta))

    def not_op(self, meta, items):
        return S.Not(items[0], _pos(meta))

    def if_expr(self, meta, items):
        return S.IfExpr(items[0], items[1], items[2], _pos(meta))

    def list_literal(self, meta, items):
        return S.ListLiteral(tuple(i for i in items if i is not None), _pos(meta))

    def index(self, meta, items):
        return S.Index(items[0], items[1], _pos(meta))

    def ctor_param(self, meta, items):
        return S.CtorParam(str(items[0]), items[1], _pos(meta))

    def model_decl(self, meta, items):
        name, *params = items
        return S.ModelDecl(str(name), tuple(p for p in params if p is not None), _pos(meta))

    def input_decl(self, meta, items):
        return S.InputDecl(tuple(items), _pos(meta))

    def activations_decl(self, meta, items):
        return S.ActivationsDecl(str(items[0]), _pos(items[0]), _pos(meta))

    def let_params(self, meta, items):
        return tuple(str(t) for t in items)

    def let_decl(self, meta, items):
        name, params, value = items
        return S.LetDecl(str(name), params, value, _pos(meta))

    def kwarg(self, meta, items):
        return S.Kwarg(str(items[0]), items[1], _pos(meta))

    def call(self, meta, items):
        name, *args = items
        args = [a for a in args if a is not None]
        positional = tuple(a for a in args if not isinstance(a, S.Kwarg))
        kwargs = tuple(a for a in args if isinstance(a, S.Kwarg))
        for a in args[len(positional) :]:
            if not isinstance(a, S.Kwarg):
                raise SpecError(a.pos, "positional argument after a keyword argument")
        return S.Call(str(name), positional, kwargs, _pos(meta))

    def step(self, meta, items):
        label, index, call = items
        if label is not None and index is not None:
            label = f"{label}[{index}]"  # an item of an nn.ModuleList
        return S.Step(str(label) if label is not None else None, call, _pos(meta))

    def chain(self, meta, items):
        return S.Chain(tuple(items), _pos(meta))

    def chain_line(self, meta, items):
        target, chain, (index, repeat) = items[0], items[1], items[2] or (None, None)
        return S.ChainLine(str(target) if target is not None else None, chain, repeat, _pos(meta), index)

    def times(self, meta, items):
        return None, items[0]

    def indexed(self, meta, items):
        name, count = items
        return str(name), count

    def body(self, meta, items):
        return tuple(items)

    def sequence(self, meta, items):
        target, kind, name, body = items
        kind = str(kind) if kind is not None else None
        return S.Sequence(str(target) if target is not None else None, str(name), body, _pos(meta), kind)

    def if_stmt(self, meta, items):
        test, body, orelse = items
        return S.If(test, body, orelse or (), _pos(meta))

    def else_clause(self, meta, items):
        return items[0]

    def return_stmt(self, meta, items):
        return S.Return(items[0], _pos(meta))

    def block_param(self, meta, items):
        return S.BlockParam(str(items[0]), items[1], _pos(meta))

    def block_decl(self, meta, items):
        name, *params, body = items
        return S.BlockDecl(str(name), tuple(p for p in params if p is not None), body, _pos(meta))

    def module_decl(self, meta, items):
        name, *params, body = items
        return S.BlockDecl(str(name), tuple(p for p in params if p is not None), body, _pos(meta), kind="module")

    def forward_decl(self, meta, items):
        return S.ForwardDecl(items[0], _pos(meta))

    def start(self, meta, items):
        return list(items)


def _assemble(statements: list, end: Pos) -> S.Spec:
    """Checks that the file has one model header, one input and one forward, and gathers the rest. A
    missing declaration is reported at the end of the file (`end`)."""
    by_kind: dict[type, list] = {}
    for st in statements:
        by_kind.setdefault(type(st), []).append(st)
    singles = {}
    for kind, what in (
        (S.ModelDecl, "`model Name(...)`"),
        (S.InputDecl, "`input(...)`"),
        (S.ForwardDecl, "`forward:`"),
    ):
        found = by_kind.get(kind, [])
        if not found:
            raise SpecError(end, f"the spec has no {what} declaration")
        if len(found) > 1:
            raise SpecError(found[1].pos, f"a second {what} declaration; a spec describes one model")
        singles[kind] = found[0]
    optional = by_kind.get(S.ActivationsDecl, [])
    if len(optional) > 1:
        raise SpecError(optional[1].pos, "a second `activations(...)` declaration")
    inits = by_kind.get(S.InitDecl, [])
    if len(inits) > 1:
        raise SpecError(inits[1].pos, "a second `init:` declaration; put all the rules in one")
    if statements[0] is not singles[S.ModelDecl]:
        raise SpecError(statements[0].pos, "a spec starts with its `model Name(...)` header")
    return S.Spec(
        model=singles[S.ModelDecl],
        input=singles[S.InputDecl],
        activations=optional[0] if optional else None,
        lets=tuple(by_kind.get(S.LetDecl, [])),
        blocks=tuple(by_kind.get(S.BlockDecl, [])),
        forward=singles[S.ForwardDecl],
        init=inits[0] if inits else None,
    )


def _syntax_error(err: UnexpectedInput, text: str, parser: Lark) -> SpecError:
    if isinstance(err, UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "end of file"
        return SpecError(Pos(err.line, err.column), f"unexpected character {char!r}")
    expected = sorted({_word(t, parser) for t in err.expected})
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        lines = source_lines(text)
        pos = Pos(len(lines), len(lines[-1]) + 1)
        return SpecError(pos, f"unexpected end of file; expected {', '.join(expected)}")
    token = err.token
    if token.type in ("_INDENT", "_DEDENT"):
        # These borrow the position of the newline before them; point at the indented line instead.
        pos = Pos(token.end_line, token.end_column)
        if token.type == "_INDENT":
            return SpecError(pos, "unexpected indentation")
        lines = source_lines(text)
        if pos.line > len(lines):
            return SpecError(
                Pos(len(lines), len(lines[-1]) + 1), f"unexpected end of file; expected {' or '.join(expected)}"
            )
    else:
        pos = Pos(token.line, token.column)
    found = _word(token.type, parser) if token.type.startswith("_") else repr(str(token))
    return SpecError(pos, f"unexpected {found}; expected {' or '.join(expected)}")


def parse_spec(text: str) -> S.Spec:
    """Parses spec text; raises SpecError with the position of the first problem."""
    parser = _parser()
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = parser.parse(text)
    except DedentError:
        raise SpecError(_dedent_pos(text), "this line's indentation matches no enclosing block") from None
    except UnexpectedInput as err:
        raise _syntax_error(err, text, parser) from None
    _check_limits(tree)
    try:
        statements = _ToSyntax().transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    statements = [s for s in statements if not isinstance(s, Token)]
    if not statements:
        raise SpecError(Pos(1, 1), "the spec is empty; it needs `model`, `input` and `forward:` declarations")
    lines = source_lines(text)
    return _assemble(statements, Pos(len(lines), len(lines[-1]) + 1))


def _check_limits(tree: Tree) -> None:
    """Refuses a tree deeper than MAX_DEPTH or a name longer than MAX_NAME_LENGTH, walking without recursion."""
    stack = [(tree, 1, None)]
    while stack:
        node, depth, parent_pos = stack.pop()
        pos = Pos(node.meta.line, node.meta.column) if not node.meta.empty else parent_pos
        if depth > MAX_DEPTH:
            raise SpecError(
                pos,
                f"nested too deeply: fusegen reads at most {MAX_DEPTH} levels of bodies, calls and expressions",
            )
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, depth + 1, pos))
            elif isinstance(child, Token) and child.type == "NAME" and len(child) > MAX_NAME_LENGTH:
                raise SpecError(_pos(child), f"a name of {len(child)} characters; fusegen's limit is {MAX_NAME_LENGTH}")


def _dedent_pos(text: str) -> Pos | None:
    """Where the first line whose indentation matches no enclosing level starts (for DedentError)."""
    levels = [0]
    for number, line in enumerate(source_lines(text), start=1):
        stripped = line.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if indent > levels[-1]:
            levels.append(indent)
            continue
        while indent < levels[-1]:
            levels.pop()
        if indent != levels[-1]:
            return Pos(number, indent + 1)
    return None
