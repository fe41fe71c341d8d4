"""`fusegen lint`: the seeds' hard rules, checked on a Triton model file's source.

The file is parsed with `ast`; it is never imported or run. Only `triton.language` itself is
imported, to judge `tl.*` names against the Triton in use rather than against the seeds' list.

Terms used by the rules:

- kernel: a function decorated with `@triton.jit` / `@jit` (`@triton.jit(...)`, and `@triton.autotune`
  or `@triton.heuristics` stacked on it, count too).
- launch: a subscript-call `name[grid](...)`.
- access: a `tl.load` or `tl.store` call. Its pointer is split into a base (the kernel parameter it
  starts from, following local pointer variables such as `y_ptrs = y_ptr + ...`) and offset terms.
- index terms: an access's offset terms with broadcasts (`v[None, :]`, `v[:, None]`) and stride
  factors (a product with an expression of kernel parameters only) removed, and local address
  sums (`x_offsets = n * stride_n + c * stride_c`) expanded. `offs_n[None, :] * out_stride_c`
  and `offs_n` have the same index term, `offs_n`.
- fused elementwise kernel: a kernel with at least one `tl.store`, no loop, no `tl.dot` and no
  reduction (`tl.sum`, `tl.max`, ...). All its loads and stores are at the output's offsets.
- tile kernel: any other kernel (a GEMM, convolution or pool with a fused epilogue). Loads inside
  its loops feed the anchor (the K loop, the window) and index another space; the loads outside
  loops are the fused ops and are held to the store's offsets and mask.

Rules that can only be judged approximately (data flow through local names only, outputs told
apart by pointer name, ...) say "approximate" in their message. To add a rule, write a checker
and decorate it with `@rule(...)`: the table, `--rules` and the CLI pick it up.

The KB* rules are KernelBench's static checker (`validate_kernel_static(code, backend="triton",
precision="fp32")`), which reads text, not the tree: regular expressions over the source with each
line cut at its first `#` or `//`. KB0xx are its strict checks (the submission is rejected) and report
errors; KB1xx are its warnings and report warnings.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import functools
import importlib
import re
import types
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Union

# ---------------------------------------------------------------------------------------------
# Violations and the rule table


@dataclass(frozen=True, order=True)
class Violation:
    file: str
    line: int
    column: int  # 1-based
    rule: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        warning = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}:{self.column}: {self.rule} {warning}{self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextPosition:
    """A place in the source text, for the rules that read text rather than the tree."""

    lineno: int
    col_offset: int  # 0-based, in characters


Finding = tuple[Union[ast.AST, TextPosition, None], str]  # None: the file as a whole (reported at 1:1)


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    rationale: str
    check: Callable[["Source"], Iterable[Finding]]
    severity: str = "error"  # "warning": reported, but `fusegen lint` still exits 0 and build still writes


RULES: list[Rule] = []


def rule(id: str, name: str, rationale: str, severity: str = "error"):
    """Register a checker in RULES: the one place a rule is defined."""

    def register(check: Callable[["Source"], Iterable[Finding]]):
        assert all(r.id != id for r in RULES), id
        assert severity in ("error", "warning"), severity
        RULES.append(Rule(id, name, rationale, check, severity))
        return check

    return register


def lint_source(source: str, filename: str = "<source>", rules: Iterable[Rule] | None = None) -> list[Violation]:
    """Every violation of `rules` (default: all) in `source`, sorted by position. Raises SyntaxError for
    text that is not Python, RecursionError for code nested too deeply to parse or check."""
    try:
        tree = ast.parse(source, filename=filename)
    except ValueError as err:  # null bytes
        raise SyntaxError(str(err)) from err
    src = Source(tree, source)
    found: set[Violation] = set()
    for r in RULES if rules is None else rules:
        for node, message in r.check(src):
            line, col = (node.lineno, node.col_offset + 1) if node is not None else (1, 1)
            found.add(Violation(filename, line, col, r.id, message, r.severity))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# What the rules look at

APPROX = "approximate"
DEVICE_ONLY = {"program_id", "num_programs", "load", "store", "arange", "dot"}
REDUCTIONS = {"sum", "max", "min", "reduce", "argmax", "argmin", "cumsum", "cumprod", "xor_sum", "associative_scan"}


@functools.cache
def _triton_language():
    import triton
    import triton.language

    return triton.__version__, triton.language


def dotted(expr: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything else."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return [expr.id, *reversed(parts)]


def text(expr: ast.AST) -> str:
    return ast.unparse(expr)


def scope_walk(nodes: Iterable[ast.AST], loops: tuple = ()) -> Iterator[tuple[ast.AST, tuple]]:
    """Nodes in source order with the loops around them; nested functions, lambdas and classes are
    yielded but not entered (they are scopes of their own)."""
    for node in nodes:
        yield node, loops
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            for field, value in ast.iter_fields(node):
                children = value if isinstance(value, list) else [value]
                inner = loops + (node,) if field == "body" else loops
                yield from scope_walk([c for c in children if isinstance(c, ast.AST)], inner)
        else:
            yield from scope_walk(ast.iter_child_nodes(node), loops)


def strip_broadcast(expr: ast.expr) -> ast.expr:
    """`v[None, :] * s` -> `v * s`: the broadcast spelling is not part of the index."""

    class Strip(ast.NodeTransformer):
        def visit_Subscript(self, node):
            self.generic_visit(node)
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if all(_is_none(i) or (isinstance(i, ast.Slice) and not (i.lower or i.upper or i.step)) for i in items):
                return node.value
            return node

    return Strip().visit(_copy(expr))


def _copy(expr: ast.expr) -> ast.expr:
    return ast.parse(text(expr), mode="eval").body


def _is_none(expr: ast.AST) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None


def split_sum(expr: ast.expr) -> list[ast.expr]:
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Add, ast.Sub)):
        return split_sum(expr.left) + split_sum(expr.right)
    return [expr]


def split_and(expr: ast.expr) -> list[ast.expr]:
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitAnd):
        return split_and(expr.left) + split_and(expr.right)
    return [expr]


def _int(expr: ast.AST) -> int | None:
    if isinstance(expr, ast.Constant) and type(expr.value) is int:
        return expr.value
    return None


class Scope:
    """A function's parameters and local assignments (values as written; augmented assignments as
    `name op value`; loop variables get the loop's iterable)."""

    def __init__(self, node: ast.FunctionDef | ast.Module | ast.Lambda):
        self.node = node
        self.params: list[str] = []
        self.defaults: dict[str, ast.expr] = {}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            self.params = [x.arg for x in positional + a.kwonlyargs]
            for arg, default in zip(positional[len(positional) - len(a.defaults) :], a.defaults):
                self.defaults[arg.arg] = default
            for arg, default in zip(a.kwonlyargs, a.kw_defaults):
                if default is not None:
                    self.defaults[arg.arg] = default
        self.defs: dict[str, list[ast.expr]] = {}
        self.first_def: dict[str, ast.expr] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        for sub, _ in scope_walk(body):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    self._bind(target, sub.value, plain=len(sub.targets) == 1, unpack=True)
            elif isinstance(sub, ast.AnnAssign) and sub.value is not None:
                self._bind(sub.target, sub.value, plain=True)
            elif isinstance(sub, ast.AugAssign) and isinstance(sub.target, ast.Name):
                value = ast.BinOp(ast.Name(sub.target.id, ast.Load()), sub.op, sub.value)
                self.defs.setdefault(sub.target.id, []).append(ast.copy_location(value, sub))
            elif isinstance(sub, (ast.For, ast.AsyncFor)):
                self._bind(sub.target, sub.iter, plain=False)
            elif isinstance(sub, ast.NamedExpr):
                self._bind(sub.target, sub.value, plain=False)
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub is not node:
                self.functions[sub.name] = sub
                self.defs.setdefault(sub.name, [])
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for alias in sub.names:
                    self.defs.setdefault((alias.asname or alias.name).split(".")[0], [])

    def _bind(self, target: ast.expr, value: ast.expr, plain: bool, unpack: bool = False) -> None:
        """`unpack`: an assignment, so element i of a tuple target holds element i of the value
        (`value[i]` where the value is not a literal tuple); otherwise each element gets the value."""
        if isinstance(target, ast.Name):
            self.defs.setdefault(target.id, []).append(value)
            if plain:
                self.first_def.setdefault(target.id, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for i, element in enumerate(target.elts):
                part = value
                if unpack and isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                    part = value.elts[i]
                elif unpack:
                    part = ast.copy_location(ast.Subscript(value, ast.Constant(i), ast.Load()), value)
                self._bind(element, part, plain=False, unpack=unpack)

    def is_local(self, name: str) -> bool:
        return name in self.defs or name in self.params

    def values(self, name: str) -> list[ast.expr] | None:
        """What `name` may hold here; None if unknown (a parameter without default, or not bound)."""
        if name in self.params:
            if name not in self.defaults:
                return None
            return [self.defaults[name], *self.defs.get(name, [])]
        return self.defs.get(name) or None


@dataclass
class Access:
    kind: str  # "load" or "store"
    call: ast.Call
    pointer: ast.expr
    mask: ast.expr | None
    in_loop: bool


class Kernel(Scope):
    def __init__(self, src: "Source", node: ast.FunctionDef):
        super().__init__(node)
        self.src = src
        self.name = node.name
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        self.constexpr = {
            a.arg for a in args if a.annotation is not None and (dotted(a.annotation) or [""])[-1] == "constexpr"
        }
        self.accesses: list[Access] = []
        self.aranges: list[tuple[ast.Call, tuple]] = []  # with the loops around each
        self.has_loop = self.has_dot = self.has_reduction = False
        for sub, loops in scope_walk(node.body):
            if isinstance(sub, (ast.For, ast.AsyncFor, ast.While)):
                self.has_loop = True
            if not isinstance(sub, ast.Call):
                continue
            op = src.tl_op(sub.func)
            if op in ("load", "store"):
                pointer = sub.args[0] if sub.args else _keyword(sub, "pointer")
                mask_pos = 1 if op == "load" else 2
                mask = sub.args[mask_pos] if len(sub.args) > mask_pos else _keyword(sub, "mask")
                if pointer is not None:
                    self.accesses.append(Access(op, sub, pointer, None if _is_none(mask) else mask, bool(loops)))
            elif op == "arange":
                self.aranges.append((sub, loops))
            elif op == "dot":
                self.has_dot = True
            elif op in REDUCTIONS:
                self.has_reduction = True
        # Block-size constexprs: named BLOCK*, or the bound of a tl.arange(0, NAME).
        self.block_params = {p for p in self.constexpr if "BLOCK" in p.upper()}
        for call, _ in self.aranges:
            if len(call.args) == 2 and isinstance(call.args[1], ast.Name) and call.args[1].id in self.constexpr:
                self.block_params.add(call.args[1].id)

    @property
    def stores(self) -> list[Access]:
        return [a for a in self.accesses if a.kind == "store"]

    @property
    def elementwise(self) -> bool:
        """A fused elementwise kernel: it stores, and has no loop, no tl.dot and no reduction."""
        return bool(self.stores) and not (self.has_loop or self.has_dot or self.has_reduction)

    # -- pointers ---------------------------------------------------------------------------

    def decompose(self, pointer: ast.expr, depth: int = 0) -> tuple[str | None, list[ast.expr]]:
        """Pointer -> (base parameter or None, offset terms)."""
        terms = split_sum(pointer)
        first = terms[0]
        if isinstance(first, ast.Name) and first.id not in self.params and first.id in self.first_def and depth < 8:
            base, inner = self.decompose(self.first_def[first.id], depth + 1)
            if base is not None:
                return base, inner + terms[1:]
        for i, term in enumerate(terms):
            if isinstance(term, ast.Name) and term.id in self.params:
                return term.id, terms[:i] + terms[i + 1 :]
        return None, terms

    def base_key(self, access: Access) -> str:
        base, _ = self.decompose(access.pointer)
        return base if base is not None else text(access.pointer)

    def offsets_text(self, access: Access) -> str:
        _, terms = self.decompose(access.pointer)
        return " + ".join(text(t) for t in terms)

    def _is_scale(self, expr: ast.expr) -> bool:
        """An expression of kernel parameters and constants only: a stride or a block size."""
        return not any(isinstance(n, ast.Call) for n in ast.walk(expr)) and all(
            n.id in self.params for n in ast.walk(expr) if isinstance(n, ast.Name)
        )

    def _is_address(self, value: ast.expr) -> bool:
        """A local that sums index * runtime stride terms (not `pid * BLOCK + tl.arange(...)`)."""
        for term in split_sum(value):
            term = strip_broadcast(term)
            while isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult):
                for side in (term.left, term.right):
                    if self._is_scale(side) and any(
                        isinstance(n, ast.Name) and n.id not in self.constexpr for n in ast.walk(side)
                    ):
                        return True
                term = term.left
        return False

    def index_terms(self, access: Access) -> set[str]:
        _, terms = self.decompose(access.pointer)
        return self._norm(terms, 0)

    def _norm(self, terms: list[ast.expr], depth: int) -> set[str]:
        out: set[str] = set()
        for term in terms:
            term = strip_broadcast(term)
            while isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult):
                if self._is_scale(term.right) and not self._is_scale(term.left):
                    term = term.left
                elif self._is_scale(term.left) and not self._is_scale(term.right):
                    term = term.right
                else:
                    break
            if (
                isinstance(term, ast.Name)
                and term.id in self.first_def
                and term.id not in self.params
                and depth < 8
                and self._is_address(self.first_def[term.id])
            ):
                out |= self._norm(split_sum(self.first_def[term.id]), depth + 1)
            else:
                out.add(text(term))
        return out

    def mask_leaves(self, mask: ast.expr, depth: int = 0) -> set[str]:
        """`mask` -> its conditions: `&`-operands, with local mask names expanded."""
        out: set[str] = set()
        for atom in split_and(strip_broadcast(mask)):
            value = self.first_def.get(atom.id) if isinstance(atom, ast.Name) else None
            if (
                value is not None
                and depth < 8
                and (isinstance(value, (ast.Compare, ast.Name, ast.Subscript)) or split_and(value)[1:])
            ):
                out |= self.mask_leaves(value, depth + 1)
            else:
                out.add(text(atom))
        return out

    # -- data flow --------------------------------------------------------------------------

    def locals_behind(self, names: set[str]) -> set[str]:
        """The local (non-parameter) names among `names` and those they are computed from."""
        out: set[str] = set()
        todo = [n for n in names if n in self.defs and n not in self.params]
        while todo:
            name = todo.pop()
            if name not in out:
                out.add(name)
                for value in self.defs[name]:
                    todo += [n.id for n in ast.walk(value) if isinstance(n, ast.Name) and n.id in self.defs]
        return out

    @functools.cached_property
    def _from_pid(self) -> set[str]:
        return self._tainted("program_id")

    @functools.cached_property
    def _from_arange(self) -> set[str]:
        return self._tainted("arange")

    def _tainted(self, op: str) -> set[str]:
        names: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, values in self.defs.items():
                if name not in names and any(self._mentions(v, op, names) for v in values):
                    names.add(name)
                    changed = True
        return names

    def _mentions(self, expr: ast.AST, op: str, names: set[str]) -> bool:
        return any(
            (isinstance(n, ast.Name) and n.id in names) or (isinstance(n, ast.Call) and self.src.tl_op(n.func) == op)
            for n in ast.walk(expr)
        )

    def depends_on_pid(self, expr: ast.AST) -> bool:
        return self._mentions(expr, "program_id", self._from_pid)

    def depends_on_arange(self, expr: ast.AST) -> bool:
        return self._mentions(expr, "arange", self._from_arange)


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class Source:
    """The parsed file and what the rules share: import aliases, kernels, launches."""

    def __init__(self, tree: ast.Module, text: str):
        self.tree = tree
        self.text = text
        self.tl_names: set[str] = set()
        self.triton_names: set[str] = set()
        self.jit_names = {"jit"}
        self.imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imported.add(a.asname or a.name.split(".")[0])
                    if a.name == "triton.language" and a.asname:
                        self.tl_names.add(a.asname)
                    elif a.name == "triton" or (a.name.startswith("triton.") and not a.asname):
                        self.triton_names.add(a.asname or "triton")
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    self.imported.add(a.asname or a.name)
                    if node.module == "triton" and a.name == "language":
                        self.tl_names.add(a.asname or a.name)
                    if node.module == "triton" and a.name == "jit":
                        self.jit_names.add(a.asname or a.name)
        # Without the imports (LAY006 reports that), assume the usual names unless bound to something else.
        self.tl_names = self.tl_names or ({"tl"} - self.imported)
        self.triton_names = self.triton_names or ({"triton"} - self.imported)
        self.module = Scope(tree)
        self.functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.bound = set(self.imported) | set(dir(builtins)) | {"__builtins__"}  # bound anywhere in the file
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.add(node.name)
            elif isinstance(node, ast.arg):
                self.bound.add(node.arg)
        self.kernels = [Kernel(self, n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and self.is_jit(n)]
        self.kernel_by_name = {k.name: k for k in self.kernels if k.node in self.functions.values()}
        # Launches `name[grid](...)`, each with the scope it is written in.
        self.launches: list[tuple[ast.Call, Scope]] = []
        scopes: list[Scope] = [self.module] + [
            Scope(n) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for scope in scopes:
            body = scope.node.body
            for node, _ in scope_walk(body):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)
                ):
                    self.launches.append((node, scope))

    @functools.cached_property
    def kernelbench_text(self) -> str:
        """The text KernelBench's checker matches: each line cut at its first `#` or `//` wherever it
        stands (in a string, or Python's floor division `a // b`); docstrings and strings stay."""
        return re.sub(r"(?:#|//).*", "", self.text)

    @functools.cached_property
    def _kernelbench_line_starts(self) -> list[int]:
        return [0] + [m.end() for m in re.finditer("\n", self.kernelbench_text)]

    def kernelbench_position(self, offset: int) -> TextPosition:
        """Where `offset` into kernelbench_text is in the file (cutting lines moves no line start)."""
        line = bisect.bisect_right(self._kernelbench_line_starts, offset)
        return TextPosition(line, offset - self._kernelbench_line_starts[line - 1])

    def is_jit(self, fn: ast.AST) -> bool:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return False
        for d in fn.decorator_list:
            parts = dotted(d.func if isinstance(d, ast.Call) else d)
            if parts and (
                (len(parts) == 1 and parts[0] in self.jit_names)
                or (len(parts) == 2 and parts[0] in self.triton_names and parts[1] == "jit")
            ):
                return True
        return False

    def tl_path(self, expr: ast.AST) -> list[str] | None:
        """`tl.math.exp` -> ["math", "exp"] (also spelled `triton.language.math.exp`)."""
        parts = dotted(expr)
        if not parts or len(parts) < 2:
            return None
        if parts[0] in self.tl_names:
            return parts[1:]
        if parts[0] in self.triton_names and parts[1] == "language" and len(parts) > 2:
            return parts[2:]
        return None

    def tl_op(self, func: ast.AST) -> str | None:
        path = self.tl_path(func)
        return path[0] if path and len(path) == 1 else None

    def scope_of_launch(self, name: str, scope: Scope) -> str:
        """What a launched name is: "kernel", "function" (a plain def), "local", "imported", "unknown"."""
        if scope is not self.module and scope.is_local(name):
            return "local"
        if name in self.kernel_by_name:
            return "kernel"
        if name in self.functions:
            return "function"
        if name in self.imported:
            return "imported"
        if name in self.bound:
            return "local"  # a module variable, a closure's variable, a builtin: not a kernel we can see
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Triton rules


@rule("TRI001", "jit-kernel", "A function launched with a grid, or using device-only tl ops, must be @triton.jit.")
def _jit_kernel(src: Source) -> Iterator[Finding]:
    for call, scope in src.launches:
        name = call.func.value.id
        kind = src.scope_of_launch(name, scope)
        if kind == "function":
            yield call, f"`{name}` is launched with a grid but is not decorated with @triton.jit"
        elif kind == "unknown":
            yield call, f"`{name}` is launched with a grid but is not defined in this file"
    kernel_nodes = {k.node for k in src.kernels}
    inside_kernels = {n for k in kernel_nodes for n in ast.walk(k)}
    for fn in ast.walk(src.tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn in inside_kernels:
            continue
        for node, _ in scope_walk(fn.body):
            op = src.tl_op(node.func) if isinstance(node, ast.Call) else None
            if op in DEVICE_ONLY:
                yield node, f"`{fn.name}` calls tl.{op} but is not decorated with @triton.jit"
                break


@rule("TRI002", "program-id-axis", "tl.program_id(axis) exists only for axis 0, 1 and 2.")
def _program_id_axis(src: Source) -> Iterator[Finding]:
    for node in ast.walk(src.tree):
        if not (isinstance(node, ast.Call) and src.tl_op(node.func) == "program_id"):
            continue
        axis = node.args[0] if node.args else _keyword(node, "axis")
        if axis is None:
            yield node, "tl.program_id() without an axis: give 0, 1 or 2"
        elif _int(axis) is None:
            yield axis, f"tl.program_id axis `{text(axis)}` is not a literal 0, 1 or 2 ({APPROX}: not evaluated)"
        elif _int(axis) not in (0, 1, 2):
            yield axis, f"tl.program_id axis {_int(axis)}: Triton grids have axes 0, 1 and 2 only"


@rule("TRI003", "no-loop-exit", "continue, break and return inside a kernel's loop do not compile: mask instead.")
def _no_loop_exit(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        for node, loops in scope_walk(k.node.body):
            if loops and isinstance(node, (ast.Continue, ast.Break, ast.Return)):
                word = type(node).__name__.lower()
                yield node, f"`{word}` inside a loop of kernel `{k.name}`: kernels cannot leave a loop early; use a mask"


@rule("TRI004", "loop-var-index", "Triton tensors cannot be indexed with a loop variable (`x[:, i]`).")
def _loop_var_index(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        for node, loops in scope_walk(k.node.body):
            if not (isinstance(node, ast.Subscript) and loops):
                continue
            loop_vars: dict[str, bool] = {}  # name -> from tl.static_range
            for loop in loops:
                if isinstance(loop, (ast.For, ast.AsyncFor)):
                    static = isinstance(loop.iter, ast.Call) and src.tl_op(loop.iter.func) == "static_range"
                    for n in ast.walk(loop.target):
                        if isinstance(n, ast.Name):
                            loop_vars[n.id] = static
                else:  # while: the names its test reads that its body assigns
                    assigned = Scope(ast.Module(body=loop.body, type_ignores=[])).defs
                    for n in ast.walk(loop.test):
                        if isinstance(n, ast.Name) and n.id in assigned:
                            loop_vars[n.id] = False
            used = [n.id for n in ast.walk(node.slice) if isinstance(n, ast.Name) and n.id in loop_vars]
            if used:
                note = f" ({APPROX}: a tuple indexed in a tl.static_range loop is fine)" if loop_vars[used[0]] else ""
                yield node, f"`{text(node)}` indexes with loop variable `{used[0]}`; use offsets and masks{note}"


@rule("TRI005", "tl-function-exists", "Every tl.* name used must exist in the installed triton.language.")
def _tl_exists(src: Source) -> Iterator[Finding]:
    version, language = _triton_language()
    inner = {id(n.value) for n in ast.walk(src.tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(src.tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        path = src.tl_path(node)
        if not path:
            continue
        obj = language
        for part in path:
            obj = _member(obj, part)
            if obj is None:
                name = "tl." + ".".join(path)
                yield node, f"{name} does not exist in triton.language (Triton {version}): implement it from functions it has"
                break


def _member(obj: object, name: str) -> object | None:
    """`obj.name`, importing it if it is a submodule not imported yet (`tl.extra.libdevice`)."""
    if hasattr(obj, name):
        return getattr(obj, name)
    if isinstance(obj, types.ModuleType) and hasattr(obj, "__path__"):
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ImportError:
            return None
    return None


def _pow2(expr: ast.expr, scope: Scope, module: Scope, seen: frozenset = frozenset()) -> bool | None:
    """True: provably a power of two; False: provably not; None: cannot tell."""
    value = _int(expr)
    if value is not None:
        return value > 0 and value & (value - 1) == 0
    if isinstance(expr, ast.Name):
        if expr.id in seen:
            return None
        values = scope.values(expr.id) if scope.is_local(expr.id) else module.values(expr.id)
        if not values:
            return None
        return _all([_pow2(v, scope, module, seen | {expr.id}) for v in values])
    if isinstance(expr, ast.IfExp):
        return _all([_pow2(expr.body, scope, module, seen), _pow2(expr.orelse, scope, module, seen)])
    if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Call) and _int(expr.slice) is not None:
        # element i of what a function of this file returns: element i of each of its return tuples
        parts = dotted(expr.value.func) or []
        function = module.functions.get(parts[0]) if len(parts) == 1 and parts[0] not in seen else None
        if function is None:
            return None
        returns = [n.value for n, _ in scope_walk(function.body) if isinstance(n, ast.Return)]
        i = _int(expr.slice)
        if not returns or not all(isinstance(r, ast.Tuple) and i < len(r.elts) for r in returns):
            return None
        return _all([_pow2(r.elts[i], Scope(function), module, seen | {parts[0]}) for r in returns])
    if isinstance(expr, ast.Call):
        parts = dotted(expr.func) or []
        if parts and parts[-1] == "next_power_of_2":
            return True
        if parts in (["min"], ["max"]) and expr.args and not expr.keywords:
            values = [_int(a) for a in expr.args]
            if all(v is not None for v in values):
                result = (min if parts == ["min"] else max)(values)
                return result > 0 and result & (result - 1) == 0
            return True if all(_pow2(a, scope, module, seen) for a in expr.args) else None
    if isinstance(expr, ast.BinOp):
        if isinstance(expr.op, ast.LShift) and _int(expr.left) == 1:
            return True
        if isinstance(expr.op, ast.Pow) and _int(expr.left) == 2:
            return True
        if isinstance(expr.op, ast.Mult):
            return True if _pow2(expr.left, scope, module, seen) and _pow2(expr.right, scope, module, seen) else None
    return None


def _all(verdicts: list[bool | None]) -> bool | None:
    if any(v is False for v in verdicts):
        return False
    return True if all(verdicts) else None


@rule("TRI006", "block-size-pow2", "Constexpr block sizes (tl.arange bounds) must be powers of two: 16, 32, 64, ...")
def _block_size_pow2(src: Source) -> Iterator[Finding]:
    def judge(param: str, value: ast.expr, scope: Scope) -> Iterator[Finding]:
        verdict = _pow2(value, scope, src.module)
        shown = text(value)
        if isinstance(value, ast.Name):
            values = scope.values(value.id) if scope.is_local(value.id) else src.module.values(value.id)
            if values and len(values) == 1:
                shown += f" (= `{text(values[0])}`)"
        if verdict is False:
            yield value, f"block size {param}={shown} is not a power of two"
        elif verdict is None:
            yield value, (
                f"block size {param}={shown} is not provably a power of two "
                f"({APPROX}: only literals, min/max of them and triton.next_power_of_2 are proven)"
            )

    for call, scope in src.launches:
        k = src.kernel_by_name.get(call.func.value.id)
        if k is None or src.scope_of_launch(k.name, scope) != "kernel":
            continue
        for i, arg in enumerate(call.args):
            if i < len(k.params) and k.params[i] in k.block_params:
                yield from judge(k.params[i], arg, scope)
        for kw in call.keywords:
            if kw.arg in k.block_params:
                yield from judge(kw.arg, kw.value, scope)
    for k in src.kernels:  # @triton.autotune(configs=[triton.Config({"BLOCK_M": 128}, ...)])
        for d in k.node.decorator_list:
            for node in ast.walk(d):
                if isinstance(node, ast.Call) and (dotted(node.func) or [""])[-1] == "Config" and node.args:
                    if isinstance(node.args[0], ast.Dict):
                        for key, value in zip(node.args[0].keys, node.args[0].values):
                            if isinstance(key, ast.Constant) and key.value in k.block_params:
                                yield from judge(key.value, value, src.module)


def _dim_ok(expr: ast.expr, scope: Scope, module: Scope, seen: frozenset = frozenset()) -> bool:
    value = _int(expr)
    if value is not None:
        return value >= 1
    if isinstance(expr, ast.Call):
        parts = dotted(expr.func) or []
        if parts and parts[-1] == "cdiv":
            return True
        if parts == ["max"]:
            return any((_int(a) or 0) >= 1 for a in expr.args)
        return False
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult):
        return _dim_ok(expr.left, scope, module, seen) and _dim_ok(expr.right, scope, module, seen)
    if isinstance(expr, ast.IfExp):
        return _dim_ok(expr.body, scope, module, seen) and _dim_ok(expr.orelse, scope, module, seen)
    if isinstance(expr, ast.Name) and expr.id not in seen:
        values = scope.values(expr.id) if scope.is_local(expr.id) else module.values(expr.id)
        return bool(values) and all(_dim_ok(v, scope, module, seen | {expr.id}) for v in values)
    return False


def _grid_findings(grid: ast.expr, scope: Scope, src: Source, seen: frozenset = frozenset()) -> Iterator[Finding]:
    if isinstance(grid, (ast.Tuple, ast.List)):
        for dim in grid.elts:
            if not _dim_ok(dim, scope, src.module):
                yield dim, f"grid dimension `{text(dim)}` can be 0: build it with triton.cdiv(n, BLOCK) or max(1, ...)"
        return
    if isinstance(grid, ast.Lambda):
        yield from _grid_findings(grid.body, Scope(grid), src, seen)
        return
    if isinstance(grid, ast.Name) and grid.id not in seen:
        fn = scope.functions.get(grid.id) or src.functions.get(grid.id)
        if fn is not None:
            fn_scope = Scope(fn)
            for node, _ in scope_walk(fn.body):
                if isinstance(node, ast.Return) and node.value is not None:
                    yield from _grid_findings(node.value, fn_scope, src, seen | {grid.id})
            return
        values = scope.values(grid.id) if scope.is_local(grid.id) else src.module.values(grid.id)
        if values:
            for value in values:
                yield from _grid_findings(value, scope, src, seen | {grid.id})
            return
    if isinstance(grid, (ast.Name, ast.Call, ast.Attribute, ast.Subscript)) and not _dim_ok(grid, scope, src.module):
        yield grid, f"cannot see how the grid `{text(grid)}` is built ({APPROX}): write it as a tuple of triton.cdiv(...)"
        return
    if not _dim_ok(grid, scope, src.module):
        yield grid, f"grid dimension `{text(grid)}` can be 0: build it with triton.cdiv(n, BLOCK) or max(1, ...)"


@rule("TRI007", "grid-nonzero", "Every grid dimension must be >= 1: triton.cdiv(n, BLOCK) or max(1, ...).")
def _grid_nonzero(src: Source) -> Iterator[Finding]:
    for call, scope in src.launches:
        if src.scope_of_launch(call.func.value.id, scope) == "kernel":
            yield from _grid_findings(call.func.slice, scope, src)


# ---------------------------------------------------------------------------------------------
# Fusion rules

_BY_NAME = "approximate: outputs told apart by pointer name"


@rule(
    "FUS001", "one-store-per-output", "A fused kernel stores each output tensor once; intermediates stay in registers."
)
def _one_store(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        first: dict[str, int] = {}
        for a in k.stores:
            key = k.base_key(a)
            if key in first:
                yield a.call, (
                    f"second tl.store to `{key}` in kernel `{k.name}` (first at line {first[key]}): "
                    f"one store per output tensor ({_BY_NAME})"
                )
            else:
                first[key] = a.call.lineno


@rule("FUS002", "no-store-then-load", "Loading back what the kernel stored is the intermediate fusion removes.")
def _store_then_load(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        stored: dict[str, ast.Call] = {}
        for a in sorted(k.accesses, key=lambda a: (a.call.lineno, a.call.col_offset)):
            key = k.base_key(a)
            if a.kind == "store":
                stored.setdefault(key, a.call)
            elif key in stored:
                yield a.call, (
                    f"tl.load of `{key}` after tl.store to it at line {stored[key].lineno}: store-then-load of "
                    f"one buffer; keep the value in registers ({_BY_NAME})"
                )


@rule(
    "FUS003", "shared-offsets-mask", "Fused ops load at the store's offsets and mask, or a [None, :] broadcast of them."
)
def _shared_offsets(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        stores = k.stores
        if not stores or all(any("pid_m" in t for t in k.index_terms(s)) for s in stores):
            continue  # none, or stores of one row per program (per-tile statistics): no tile offsets to share
        ref = stores[0]
        ref_terms = set().union(*(k.index_terms(s) for s in stores))
        ref_leaves = set().union(*(k.mask_leaves(s.mask) for s in stores if s.mask is not None))
        ref_names = k.locals_behind(set().union(*(_names(t) for t in ref_terms)))
        kind = "fused elementwise kernel" if k.elementwise else "kernel"
        for a in k.accesses:
            if a is ref or a.in_loop:
                continue  # loads inside loops feed the anchor: another index space
            terms = k.index_terms(a)
            if not terms:
                continue  # a scalar load
            what = f"tl.{a.kind} of `{k.base_key(a)}`"
            # a term computed from the store's offsets alone (a channel shuffle permutes the channels where
            # its kernel loads or stores them) is the same index space, not a second computation
            extra = sorted(t for t in terms - ref_terms if not (_names(t) - set(k.params) or {""}) <= ref_names)
            if extra:
                yield a.call, (
                    f"{what} indexes with `{extra[0]}`, which the {kind}'s store does not: a second offsets "
                    f"computation; use the store's offsets, broadcast with [None, :] / [:, None] "
                    f"({APPROX}: index terms compared as text)"
                )
            elif a.mask is None and ref.mask is not None:
                yield a.call, f"{what} has no mask but the store of `{k.base_key(ref)}` is masked"
            elif a.mask is None:
                continue
            elif k.elementwise and terms == k.index_terms(ref):
                if text(a.mask) != text(ref.mask or ast.Constant(None)):
                    yield a.call, (
                        f"{what} is masked by `{text(a.mask)}`, the store by `{text(ref.mask or ast.Constant(None))}`: "
                        f"a fused elementwise kernel uses one mask everywhere ({APPROX}: compared as text)"
                    )
            else:
                leaves = k.mask_leaves(a.mask)
                if terms == k.index_terms(ref):  # the whole tile: the same conditions
                    odd = sorted(leaves ^ ref_leaves)
                else:  # a broadcast: part of the store's conditions, on the axes it loads
                    axes = k.locals_behind(set().union(*(_names(t) for t in terms)))
                    odd = sorted(
                        leaf
                        for leaf in leaves
                        if leaf not in ref_leaves
                        or (k.locals_behind(_names(leaf)) and not k.locals_behind(_names(leaf)) & axes)
                    )
                if odd:
                    yield a.call, (
                        f"{what} is masked by `{text(a.mask)}`, not by the store's mask "
                        f"`{text(ref.mask) if ref.mask is not None else 'None'}` (or, for a broadcast, its "
                        f"conditions on the loaded axes): `{odd[0]}` ({APPROX}: conditions compared as text)"
                    )


def _names(source: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(source, mode="eval")) if isinstance(n, ast.Name)}


@rule("FUS004", "offsets-follow-program", "A block whose mask follows tl.program_id must take its offsets from it too.")
def _offsets_follow_program(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        if not k._from_pid:
            continue  # a single-program kernel
        for a in k.accesses:
            _, terms = k.decompose(a.pointer)
            # The whole pointer: a base parameter may itself be moved by the program (`X += row * stride`).
            if not terms or not k.depends_on_arange(a.pointer) or k.depends_on_pid(a.pointer):
                continue
            if a.kind == "store":
                yield a.call, (
                    f"tl.store to `{k.base_key(a)}`: offsets do not depend on tl.program_id, so every program "
                    f"writes the same block ({APPROX}: data flow through local names)"
                )
            elif a.mask is not None and k.depends_on_pid(a.mask):
                yield a.call, (
                    f"tl.load of `{k.base_key(a)}`: the mask depends on tl.program_id but the offsets "
                    f"`{k.offsets_text(a)}` do not, so every program reads the first block (missing pid * BLOCK?) "
                    f"({APPROX}: data flow through local names)"
                )


@rule("FUS005", "broadcast-not-recompute", "Compute each tl.arange once; a broadcast is v[None, :] / v[:, None].")
def _broadcast_not_recompute(src: Source) -> Iterator[Finding]:
    for k in src.kernels:
        seen: dict[str, list[tuple[ast.Call, tuple]]] = {}
        for call, loops in k.aranges:
            key = text(call)
            # An earlier identical range still in scope here: outside loops, or in loops around this one.
            earlier = [c for c, outer in seen.get(key, []) if all(any(o is l for l in loops) for o in outer)]
            if earlier:
                yield call, (
                    f"{key} computed again (first at line {earlier[0].lineno}): compute the offsets once and "
                    f"broadcast them with [None, :] / [:, None] ({APPROX}: the same range may serve another axis)"
                )
            seen.setdefault(key, []).append((call, loops))


# ---------------------------------------------------------------------------------------------
# Layout rules

_LAYOUT = "the layout is imports, kernels, wrappers, then class ModelNew(nn.Module)"
_REQUIRED_IMPORTS = {
    "import torch": ("torch", "torch"),
    "import torch.nn as nn": ("torch.nn", "nn"),
    "import triton": ("triton", "triton"),
    "import triton.language as tl": ("triton.language", "tl"),
}
_TEST_MODULES = {"pytest", "unittest", "doctest"}


def _main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node.test))


def _input_helper(stmt: ast.stmt) -> str | None:
    names = []
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names = [stmt.name]
    elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return next((n for n in names if n in ("get_inputs", "get_init_inputs")), None)


def _test_code(stmt: ast.stmt, index: int) -> str | None:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith(("test", "benchmark")):
        return f"test function `{stmt.name}`"
    if isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
        return f"test class `{stmt.name}`"
    if isinstance(stmt, ast.Import) and any(a.name.split(".")[0] in _TEST_MODULES for a in stmt.names):
        return f"`{text(stmt)}`"
    if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").split(".")[0] in _TEST_MODULES:
        return f"`{text(stmt)}`"
    if isinstance(stmt, ast.Expr) and not (index == 0 and isinstance(stmt.value, ast.Constant)):
        if not isinstance(stmt.value, ast.Constant):
            return f"top-level `{text(stmt)[:40]}` runs on import"
    if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
        return f"top-level `{type(stmt).__name__.lower()}` block runs on import"
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Call):
        if (dotted(stmt.value.func) or [""])[-1] in ("ModelNew", "Model"):
            return f"top-level `{text(stmt)[:40]}` builds a model on import"
    return None


def _section(src: Source, stmt: ast.stmt) -> tuple[int, str] | None:
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return 0, f"`{text(stmt)}`"
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return (1, f"kernel `{stmt.name}`") if src.is_jit(stmt) else (2, f"wrapper `{stmt.name}`")
    if isinstance(stmt, ast.ClassDef):
        return 3, f"class `{stmt.name}`"
    return None


@rule("LAY001", "section-order", "Imports, then kernels, then wrappers, then class ModelNew, nothing after it.")
def _section_order(src: Source) -> Iterator[Finding]:
    """Helper nn.Module classes are part of the model section: allowed after the wrappers and before
    ModelNew (the seeds' own code has them there). Module-level constants may stand anywhere before
    ModelNew. Statements flagged by LAY002-LAY004 are left to those rules."""
    top: tuple[int, str, int] = (0, "", 0)  # rank, label, line of the latest highest section
    model_new = None
    for index, stmt in enumerate(src.tree.body):
        if _main_guard(stmt) or _input_helper(stmt) or _test_code(stmt, index):
            continue
        section = _section(src, stmt)
        if model_new is not None:
            label = section[1] if section else f"`{text(stmt).splitlines()[0][:40]}`"
            yield stmt, f"{label} after class ModelNew (line {model_new}): ModelNew comes last"
            continue
        if section is not None:
            rank, label = section
            if rank < top[0]:
                yield stmt, f"{label} after {top[1]} (line {top[2]}): {_LAYOUT}"
            else:
                top = (rank, label, stmt.lineno)
        if isinstance(stmt, ast.ClassDef) and stmt.name == "ModelNew":
            model_new = stmt.lineno


@rule("LAY002", "no-main-guard", "The file is a module for the harness: no `if __name__ == ...` block.")
def _no_main_guard(src: Source) -> Iterator[Finding]:
    for node in ast.walk(src.tree):
        if _main_guard(node):
            yield node, "`if __name__ ...` block: the file must not run anything itself"


@rule(
    "LAY003",
    "no-input-helpers",
    "get_inputs / get_init_inputs belong to the reference harness, not to ModelNew's file.",
)
def _no_input_helpers(src: Source) -> Iterator[Finding]:
    for stmt in src.tree.body:
        name = _input_helper(stmt)
        if name:
            yield stmt, f"`{name}` defined: leave get_inputs / get_init_inputs to the harness"


@rule("LAY004", "no-test-code", "No testing code: test functions, test imports, top-level statements that run.")
def _no_test_code(src: Source) -> Iterator[Finding]:
    for index, stmt in enumerate(src.tree.body):
        what = _test_code(stmt, index)
        if what and not _main_guard(stmt):
            yield stmt, f"testing code: {what}"


@rule(
    "LAY007",
    "call-fits-signature",
    "A call of a function the file defines passes what its signature takes: positional count, keywords, the required.",
)
def _call_fits_signature(src: Source) -> Iterator[Finding]:
    # names the file also binds otherwise (an assignment, a parameter) may not be the function: skipped
    rebound = {n.id for n in ast.walk(src.tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    rebound |= {n.arg for n in ast.walk(src.tree) if isinstance(n, ast.arg)}
    for node in ast.walk(src.tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.func.id in rebound:
            continue
        function = src.functions.get(node.func.id)
        if function is None or any(isinstance(a, ast.Starred) for a in node.args):
            continue
        keywords = [k.arg for k in node.keywords]
        if None in keywords:  # **kwargs: cannot tell
            continue
        problem = _signature_misfit(function.args, len(node.args), keywords)
        if problem:
            yield node, f"`{function.name}(...)` {problem}"


def _signature_misfit(args: ast.arguments, positional: int, keywords: list[str]) -> str | None:
    """What is wrong with passing `positional` arguments and `keywords` to a function of signature `args`."""
    params = [a.arg for a in (*args.posonlyargs, *args.args)]
    if positional > len(params) and args.vararg is None:
        return f"takes at most {len(params)} positional argument(s), {positional} given"
    given = set(params[:positional])
    named = {a.arg for a in (*args.args, *args.kwonlyargs)}
    for keyword in keywords:
        if keyword in given:
            return f"gets {keyword!r} twice (by position and by keyword)"
        if keyword not in named and args.kwarg is None:
            return f"has no parameter {keyword!r}"
        given.add(keyword)
    required = params[: len(params) - len(args.defaults)]
    required += [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    missing = [name for name in required if name not in given]
    return f"misses {', '.join(missing)}" if missing else None


@rule("LAY005", "modelnew-class", "The file defines exactly one `class ModelNew(nn.Module)` at top level.")
def _model_new(src: Source) -> Iterator[Finding]:
    classes = [n for n in src.tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
    if not classes:
        yield None, "no top-level `class ModelNew(nn.Module)`"
    for extra in classes[1:]:
        yield extra, f"ModelNew defined again (first at line {classes[0].lineno})"
    for cls in classes[:1]:
        if not any(
            (dotted(b) or [""])[-1] == "Module" and (dotted(b) or [])[:-1] in ([], ["nn"], ["torch", "nn"])
            for b in cls.bases
        ):
            yield cls, "ModelNew must subclass nn.Module directly"


@rule("LAY006", "required-imports", "The file imports torch, torch.nn as nn, triton and triton.language as tl.")
def _required_imports(src: Source) -> Iterator[Finding]:
    bound: set[tuple[str, str]] = set()
    for stmt in src.tree.body:
        if isinstance(stmt, ast.Import):
            bound |= {(a.name, a.asname or a.name) for a in stmt.names}
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            bound |= {(f"{stmt.module}.{a.name}", a.asname or a.name) for a in stmt.names}
    for line, wanted in _REQUIRED_IMPORTS.items():
        if wanted not in bound:
            yield None, f"missing `{line}`"


# ---------------------------------------------------------------------------------------------
# KernelBench's static checker: validate_kernel_static(code, backend="triton", precision="fp32")
#
# Each rule is one of its checks: the same regular expressions, matched over Source.kernelbench_text.
# KernelBench names the first match of each check; these rules report every match.


_WORD = re.compile(r"\w*")


def _kernelbench_matches(
    src: Source, check: str, patterns: list[tuple[str | Callable[[str], Iterator[re.Match]], str]], strict: bool
) -> Iterator[Finding]:
    """Each match of each pattern (a regular expression, or a function that finds its matches)."""
    verdict = "rejects the file" if strict else "warns"
    text = src.kernelbench_text
    for pattern, what in patterns:
        for match in pattern(text) if callable(pattern) else re.finditer(pattern, text):
            shown = match.group(0)
            if re.search(r"[\w.]$", shown):  # `torch.nn.` -> `torch.nn.Linear`, `except V` -> `except ValueError`
                shown += _WORD.match(text, match.end()).group(0)
            shown = shown.split("\n")[0][:60]
            yield src.kernelbench_position(match.start()), f"`{shown}` {what}: KernelBench's {check} check {verdict}"


@rule(
    "KB001",
    "no-try-except-pass",
    "KernelBench rejects `try:`, `except` before `:` or a name, and the word `pass` outside a # comment: in "
    "docstrings and strings too.",
)
def _kb_code_bypass(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "code_bypass",
        [
            (r"\btry\s*:", "reads as a try block (docstrings and strings count too)"),
            (r"\bexcept(?:\s*:|\s+\w)", "reads as an except clause (docstrings and strings count too)"),
            (r"\bpass\b", "reads as a pass statement (docstrings and strings count too)"),
        ],
        strict=True,
    )


@rule(
    "KB002",
    "no-timing-patch",
    "KernelBench rejects assigning torch.cuda.Event(.record, .elapsed_time), torch.cuda.synchronize, "
    "time.perf_counter or time.time.",
)
def _kb_timing_patch(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "timing_event_patch",
        [
            (
                r"torch\.cuda\.(?:Event(?:\.record|\.elapsed_time)?|synchronize)\s*=|time\.(?:perf_counter|time)\s*=",
                "reads as replacing a timing function",
            )
        ],
        strict=True,
    )


@rule("KB003", "no-threads", "KernelBench rejects threading, multiprocessing and concurrent.futures.")
def _kb_threads(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "thread_injection",
        [
            (r"threading\.Thread\s*\(|import\s+threading|from\s+threading\s+import", "reads as threading"),
            (
                r"multiprocessing\.(?:Process|Pool|Manager|Queue|Pipe)|import\s+multiprocessing",
                "reads as multiprocessing",
            ),
            (r"concurrent\.futures|ThreadPoolExecutor|ProcessPoolExecutor", "reads as a concurrent.futures pool"),
        ],
        strict=True,
    )


# Two of KernelBench's patterns make re.finditer quadratic: it tries each `class` before a long line,
# or each `tl.astype(` before a far comma, and scans that line or up to the comma from each. The two
# functions below find the same matches, trying the pattern only where it matches.
_TENSOR_CLASS = re.compile(r"class\s+\w+.*\((?:torch\.)?Tensor\)")
_CLASS_NAME = re.compile(r"class\s+(\w)")
_ASTYPE_FLOAT16 = re.compile(r"tl\.astype\s*\(\s*[^,]+,\s*tl\.float16\s*\)")
_FLOAT16_ARGUMENT = re.compile(r",\s*tl\.float16\s*\)")


def _tensor_classes(text: str) -> Iterator[re.Match]:
    """_TENSOR_CLASS tried only at a `class` whose name (after whitespace, newlines too) stands on a line
    with a `(Tensor)` or `(torch.Tensor)` after the name's first character."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    last_paren = {}  # line index -> the start of its last (Tensor) / (torch.Tensor)
    for paren in re.finditer(r"\((?:torch\.)?Tensor\)", text):
        last_paren[bisect.bisect_right(line_starts, paren.start())] = paren.start()
    end = 0  # matches do not overlap
    for word in re.finditer("class", text):
        named = _CLASS_NAME.match(text, word.start())
        if word.start() < end or named is None:
            continue
        if last_paren.get(bisect.bisect_right(line_starts, named.start(1)), -1) > named.start(1):
            match = _TENSOR_CLASS.match(text, word.start())
            end = match.end()
            yield match


def _astype_float16(text: str) -> Iterator[re.Match]:
    """_ASTYPE_FLOAT16 tried only where the first comma after a `tl.astype(` has characters before it
    and `tl.float16)` after it."""
    commas = [m.start() for m in re.finditer(",", text)]
    float16_after = {}  # comma -> whether `,\s*tl.float16\s*)` starts there
    end = 0  # matches do not overlap
    for call in re.finditer(r"tl\.astype\s*\(", text):
        i = bisect.bisect_left(commas, call.end())
        if call.start() < end or i == len(commas) or commas[i] == call.end():
            continue
        comma = commas[i]
        if comma not in float16_after:
            float16_after[comma] = _FLOAT16_ARGUMENT.match(text, comma) is not None
        if float16_after[comma]:
            match = _ASTYPE_FLOAT16.match(text, call.start())
            end = match.end()
            yield match


@rule(
    "KB004",
    "no-tensor-subclass",
    "KernelBench rejects lazy tensors: _make_subclass, `class X(torch.Tensor)` / `(Tensor)`, torch.Tensor.__new__.",
)
def _kb_lazy_tensors(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "lazy_eval",
        [
            (r"_make_subclass", "reads as making a tensor subclass"),
            (_tensor_classes, "reads as a tensor subclass"),
            (r"torch\.Tensor\.__new__", "reads as building a tensor by hand"),
        ],
        strict=True,
    )


@rule(
    "KB005",
    "triton-kernel",
    "KernelBench's triton backend rejects a file without `@triton.jit` or `@triton.autotune` so spelled, "
    "or without a `tl.` name.",
)
def _kb_triton_impl(src: Source) -> Iterator[Finding]:
    if not re.search(r"@triton\.(?:jit|autotune)", src.kernelbench_text):
        yield None, "no `@triton.jit` or `@triton.autotune` outside comments: KernelBench's triton_impl check rejects the file"
    if not re.search(r"\btl\.\w", src.kernelbench_text):
        yield None, "no `tl.` name outside comments: KernelBench's triton_impl check rejects the file"


@rule(
    "KB101",
    "torch-nn-layer",
    "KernelBench warns about torch.nn.<name> but Module, ModuleList/Dict, Parameter, ParameterList/Dict, "
    "parameter and init.",
    severity="warning",
)
def _kb_torch_nn(src: Source) -> Iterator[Finding]:
    allowed = "Module|ModuleList|ModuleDict|Parameter|ParameterList|ParameterDict|parameter|init"
    yield from _kernelbench_matches(
        src, "pytorch_wrap", [(rf"torch\.nn\.(?!(?:{allowed})\b)", "reads as a torch.nn compute layer")], strict=False
    )


_KB_TORCH_OPS = [
    *("mm", "bmm", "matmul", "einsum", "linear"),
    *("conv", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    *(f"{kind}_pool{d}d" for kind in ("avg", "max", "adaptive_avg", "adaptive_max") for d in (1, 2, 3)),
    *("relu", "hardtanh", "elu", "selu", "leaky_relu", "gelu", "softsign", "softplus", "softmax", "log_softmax"),
    *("tanh", "sigmoid", "hardsigmoid", "silu", "mish"),
    *("batch_norm", "group_norm", "layer_norm", "instance_norm", "rms_norm", "normalize"),
    *("cross_entropy", "kl_div", "mse_loss", "huber_loss", "triplet_margin_loss", "cosine_similarity"),
    *("logsumexp", "clamp", "dropout"),
]
_KB_F_OPS = "conv|linear|relu|gelu|softmax|batch_norm|layer_norm|dropout|max_pool|avg_pool"  # name prefixes


@rule(
    "KB102",
    "torch-compute-op",
    "KernelBench warns about torch computation calls (torch.relu, torch.conv2d, torch.matmul, ...), "
    "nn.functional.* and F.relu / F.conv... .",
    severity="warning",
)
def _kb_torch_ops(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "torch_computation_ops",
        [
            (rf"\btorch\.(?:{'|'.join(_KB_TORCH_OPS)})(?=\s*\(|\s|$)", "reads as a torch computation op"),
            (r"\bnn\.functional\.\w+", "reads as a torch.nn.functional op"),
            (rf"\bF\.(?:{_KB_F_OPS})", "reads as a torch.nn.functional op"),
        ],
        strict=False,
    )


@rule(
    "KB103",
    "cuda-stream",
    "KernelBench warns about CUDA streams: cuda.Stream(), `with torch.cuda.stream`, .wait_stream(), .record_stream().",
    severity="warning",
)
def _kb_streams(src: Source) -> Iterator[Finding]:
    yield from _kernelbench_matches(
        src,
        "stream_injection",
        [
            (r"cuda\.Stream\s*\(", "reads as creating a CUDA stream"),
            (r"with\s+torch\.cuda\.stream", "reads as running on another CUDA stream"),
            (r"\.(?:wait|record)_stream\s*\(", "reads as synchronising CUDA streams"),
        ],
        strict=False,
    )


@rule(
    "KB104",
    "float16-cast",
    "KernelBench (precision fp32) warns about float16 casts: .half(), .to(torch.float16), "
    "tl.astype(..., tl.float16), CUDA/CUTLASS half conversions. bfloat16 is not checked.",
    severity="warning",
)
def _kb_float16(src: Source) -> Iterator[Finding]:
    what = "reads as a float16 cast (precision fp32)"
    yield from _kernelbench_matches(
        src,
        "precision_downgrade",
        [
            (_astype_float16, what),
            (r"\.(?:half|float16)\s*\(", what),
            (r"\.to\s*\(\s*(?:dtype\s*=\s*)?torch\.(?:float16|half)\b", what),
            # CUDA C++, CUTLASS and ThunderKittens, as an inline extension's source would spell them
            (
                r"__float2half(?:_rn)?\s*\(|\(\s*__half\s*\)\s*[\w\->.]+|static_cast\s*<\s*(?:__half|half)\s*>\s*\(",
                what,
            ),
            (r"NumericConverter\s*<\s*half_t\s*,\s*float\s*>|LinearCombination\s*<\s*half_t", what),
            (r"type_convert\s*<\s*half_t\s*>\s*\(|tk::half\s*\(", what),
        ],
        strict=False,
    )
