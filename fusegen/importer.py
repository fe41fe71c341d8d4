"""`fusegen import`: a PyTorch nn.Module -> the text of a spec whose ModelNew matches it.

The module is built on the CPU and each module body (the model, and every module of a class of its own) is
traced with torch.fx, its children kept whole; an nn.Sequential needs no trace (its items run in turn). Every
traced call becomes a step of a spec line; lines are cut where a kernel must end (a second anchor, a view, a
value read twice). Sequentials become named sequences (inline where they read `x`) or `block`s, other module
classes `module`s. Instances of a block or module with the same structure share one declaration: the numbers
that differ between them become its parameters, named after the first op argument that takes them.

The spec is written at the constructor arguments given. A number that an integer argument moves, as that argument
times a constant, is written so (the model is imported again at a second value of the argument to see it, and the
spec's ModelNew built there must have the model's state_dict); every other number is fixed by the trace, and an
argument nothing follows is left out of ModelNew's signature. A ModuleList that forward runs in a loop, joining each
item's output onto the running features, is a dense loop; one whose items forward calls in turn, a list of blocks.
Anything fusegen cannot express raises ImportFailure with the line of the model's file that made it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import inspect
import keyword
import linecache
import logging
import operator
import re
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from fusegen import ops as O
from fusegen.check import INIT_CLASSES, INIT_FUNCTIONS, RESERVED


class ImportFailure(Exception):
    """The model cannot become a spec; `line` is the model file's line that says why (None: the file)."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line = line
        self.message = message

    def render(self, path: str) -> str:
        return f"{path}:{self.line}: error: {self.message}" if self.line else f"{path}: error: {self.message}"


# -- loading and building the model ----------------------------------------------------------------------


@dataclass
class Source:
    """The user's model, built, with what the spec needs from its file."""

    path: Path
    model: nn.Module
    build: Callable[[], nn.Module]  # a fresh instance, for the seeded comparison
    class_name: str
    args: tuple[tuple[str, object], ...]  # constructor arguments by name, as given
    input_shape: tuple[int, ...]
    lines: dict[int, int] = field(default_factory=dict)  # id(module) -> the line that created it
    created: dict[int, int] = field(default_factory=dict)  # id(module) -> when it registered its first parameter
    cls: type | None = None  # to build the model at other arguments (None: its signature takes them otherwise)

    def at(self, changes: dict, input_shape: tuple[int, ...]) -> "Source":
        """The model built at the arguments with `changes`, for another example input."""
        args = {**dict(self.args), **changes}
        model, lines, created = _construct(self.cls, self.class_name, self.path, (), args)
        build = lambda: self.cls(**args)  # noqa: E731
        return Source(
            self.path, model, build, self.class_name, tuple(args.items()), input_shape, lines, created, self.cls
        )


def load(path: Path, class_name: str = "Model", args: list | dict | None = None, input_shape=None) -> Source:
    """Runs the file, builds `class_name(*args)` (default: get_init_inputs()) on the CPU and takes the example
    input from get_inputs() unless `input_shape` is given."""
    spec = importlib.util.spec_from_file_location("fusegen_import_" + _identifier(path.stem), path)
    if spec is None:
        raise ImportFailure(None, "not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where inspect and dataclasses look for the file's classes
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any error it raises is the user's to see
        raise ImportFailure(_line_in(err.__traceback__, path), f"running the file failed: {_describe(err)}") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ImportFailure(None, f"no nn.Module class {class_name!r} in the file (--class names another)")
    if args is None:
        args = _call_helper(module, path, "get_init_inputs", "--args")
    if input_shape is None:
        inputs = _call_helper(module, path, "get_inputs", "--input")
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise ImportFailure(None, "get_inputs() must return one tensor: fusegen models take one input")
        input_shape = tuple(inputs[0].shape)
    if len(input_shape) != 4:
        raise ImportFailure(None, f"the input must be N, C, H, W (4 dimensions), got shape {list(input_shape)}")
    positional, keywords = (list(args), {}) if isinstance(args, (list, tuple)) else ([], dict(args))
    try:
        bound = inspect.signature(cls).bind(*positional, **keywords)
    except TypeError as err:
        raise ImportFailure(None, f"{class_name}{inspect.signature(cls)} cannot take {args!r}: {err}") from None
    model, lines, created = _construct(cls, class_name, path, positional, keywords)
    named = tuple((name, value) for name, value in bound.arguments.items())
    shape = tuple(int(d) for d in input_shape)
    build = lambda: cls(*positional, **keywords)  # noqa: E731
    keyworded = all(
        p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in inspect.signature(cls).parameters.values()
    )
    return Source(path, model, build, class_name, named, shape, lines, created, cls if keyworded else None)


def _construct(cls: type, class_name: str, path: Path, positional, keywords) -> tuple[nn.Module, dict, dict]:
    """The model built on the CPU, the line of the file that made each module and the order in which modules
    registered their first parameter."""
    lines: dict[int, int] = {}

    def remember(parent, name, child):
        if isinstance(child, nn.Module):
            lines.setdefault(id(child), _line_in_stack(path))

    created: dict[int, int] = {}

    def count(module, name, param):  # returns None: a hook's value would replace the parameter
        created.setdefault(id(module), len(created))

    hooks = [
        nn.modules.module.register_module_module_registration_hook(remember),
        nn.modules.module.register_module_parameter_registration_hook(count),
    ]
    try:
        with torch.device("cpu"):
            model = cls(*positional, **keywords)
    except Exception as err:
        raise ImportFailure(
            _line_in(err.__traceback__, path), f"{class_name}(...) failed on the CPU: {_describe(err)}"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
    lines[id(model)] = _class_line(cls, path)
    return model, lines, created


def _class_line(cls: type, path: Path) -> int | None:
    """The line of the model's file where the class is defined (None: defined elsewhere)."""
    try:
        return inspect.getsourcelines(cls)[1] if Path(inspect.getsourcefile(cls) or "") == path else None
    except (OSError, TypeError):
        return None


def _call_helper(module, path: Path, name: str, option: str):
    helper = getattr(module, name, None)
    if helper is None:
        raise ImportFailure(None, f"the file has no {name}(); give {option}")
    try:
        return helper()
    except Exception as err:
        raise ImportFailure(_line_in(err.__traceback__, path), f"{name}() failed: {_describe(err)}") from err


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _line_in(tb, path: Path) -> int | None:
    """The last line of the model's file in a traceback."""
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename) == path]
    return frames[-1].lineno if frames else None


def _line_in_stack(path: Path) -> int | None:
    frame = sys._getframe(1)
    while frame is not None:
        if Path(frame.f_code.co_filename) == path:
            return frame.f_lineno
        frame = frame.f_back
    return None


# -- ops: one spec op per supported torch module or call ----------------------------------------------------


@dataclass(frozen=True)
class Hole:
    """An integer in the spec that a block's or module's instances may give differently."""

    arg: str  # the op argument that takes it: names the parameter it may become
    value: int


@dataclass(frozen=True)
class OpCall:
    """One op as written in a spec: `name(args)`, each argument a Hole or literal source, maybe by keyword."""

    name: str
    args: tuple[tuple[str | None, Hole | str], ...] = ()

    @property
    def role(self) -> O.Role:
        return O.lookup(self.name).role


def _square(value, what: str) -> int:
    values = value if isinstance(value, tuple) else (value, value)
    if len(set(values)) != 1:
        raise _Refused(f"a non-square {what} {values}")
    return int(values[0])


class _Refused(Exception):
    """An argument value fusegen cannot take; the caller names the module."""


def _checked(name: str, values: dict, args) -> OpCall:
    """The op call, after the op table's own test of its values (grouped convs, dropout p > 0, ...)."""
    op = O.lookup(name)
    if op.specialize is not None:
        try:
            op.specialize({**op.defaults, **values}, True)
        except O.ArgumentError as err:
            raise _Refused(str(err)) from None
    return OpCall(name, tuple(args))


def _conv(m: nn.Conv2d) -> OpCall:
    if m.padding_mode != "zeros":
        raise _Refused(f"padding_mode={m.padding_mode!r}")
    if _square(m.dilation, "dilation") != 1:
        raise _Refused(f"dilation {m.dilation}")
    k = _square(m.kernel_size, "kernel size")
    stride = _square(m.stride, "stride")
    if m.padding == "valid":
        padding = 0
    elif m.padding == "same":
        if stride != 1 or k % 2 == 0:
            raise _Refused("padding='same' with an even kernel or a stride other than 1")
        padding = k // 2
    else:
        padding = _square(m.padding, "padding")
    cin, cout, groups, bias = m.in_channels, m.out_channels, m.groups, m.bias is not None
    values = dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=stride, padding=padding, groups=groups)
    values["bias"] = bias
    chans = [(None, Hole("in_channels", cin)), (None, Hole("out_channels", cout))]
    pad = [] if padding == k // 2 else [(None, Hole("padding", padding))]
    if not bias and groups == 1 and k == 1 and padding == 0:
        return _checked("conv1x1", values, [*chans, (None, Hole("stride", stride))])
    if not bias and groups == 1:
        return _checked(f"conv{k}x{k}", values, [*chans, (None, Hole("stride", stride)), *pad])
    if not bias and groups == cin == cout > 1:
        return _checked(f"dwconv{k}x{k}", values, [(None, Hole("channels", cin)), (None, Hole("stride", stride)), *pad])
    args = [*chans, (None, Hole("kernel_size", k)), (None, Hole("stride", stride)), (None, Hole("padding", padding))]
    if groups != 1:
        args.append(("groups", Hole("groups", groups)))
    if not bias:
        args.append(("bias", "False"))
    return _checked("conv", values, args)


def _conv_transpose(m: nn.ConvTranspose2d) -> OpCall:
    if m.padding_mode != "zeros":
        raise _Refused(f"padding_mode={m.padding_mode!r}")
    k = _square(m.kernel_size, "kernel size")
    stride, padding = _square(m.stride, "stride"), _square(m.padding, "padding")
    output_padding, dilation = _square(m.output_padding, "output padding"), _square(m.dilation, "dilation")
    bias = m.bias is not None
    values = dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=k,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=m.groups,
        bias=bias,
        dilation=dilation,
    )
    args = [(None, Hole(name, values[name])) for name in ("in_channels", "out_channels", "kernel_size", "stride")]
    args += [(None, Hole("padding", padding))] if padding else []
    return _checked("conv_transpose", values, args + ([] if bias else [("bias", "False")]))


def _softmax(dim) -> OpCall:
    if dim is None:
        raise _Refused("dim=None (torch's implicit dim is deprecated)")
    return _checked("softmax", {"dim": dim}, [(None, repr(dim))])


def _batch_norm(m: nn.BatchNorm2d) -> OpCall:
    if not m.affine or not m.track_running_stats:
        raise _Refused("affine=False or track_running_stats=False")
    args = [(None, Hole("channels", m.num_features))]
    if m.eps != 1e-5:
        args.append(("eps", repr(m.eps)))
    if m.momentum != 0.1:
        args.append(("momentum", repr(m.momentum)))
    return OpCall("bn", tuple(args))


def _max_pool(kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> OpCall:
    if return_indices:
        raise _Refused("return_indices=True")
    if _square(dilation, "dilation") != 1:
        raise _Refused(f"dilation {dilation}")
    k = _square(kernel_size, "kernel size")
    s = k if stride is None or stride == [] else _square(stride, "stride")
    p = _square(padding, "padding")
    args = [(None, Hole("kernel_size", k)), (None, Hole("stride", s))] + ([(None, Hole("padding", p))] if p else [])
    args += [("ceil_mode", "True")] if ceil_mode else []
    return _checked("maxpool", dict(kernel_size=k, stride=s, padding=p, ceil_mode=bool(ceil_mode)), args)


def _avg_pool(kernel_size, stride, padding, ceil_mode, divisor_override) -> OpCall:
    k = _square(kernel_size, "kernel size")
    s = k if stride is None or stride == [] else _square(stride, "stride")
    if s != k or _square(padding, "padding") != 0 or ceil_mode or divisor_override is not None:
        raise _Refused("a stride other than its window, padding, ceil_mode or divisor_override")
    return OpCall("avgpool", ((None, Hole("kernel_size", k)),))


def _adaptive_pool(output_size) -> OpCall:
    if output_size not in (1, (1, 1), [1, 1]):
        raise _Refused(f"output size {output_size} (fusegen pools to 1x1)")
    return OpCall("global_avgpool")


def _dropout(p) -> OpCall:
    return _checked("dropout", {"p": p}, [(None, repr(float(p)))])


_PLAIN = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish"}


def _leaf_op(m: nn.Module) -> OpCall | None:
    """The op of a torch.nn module, or None for a module fusegen has no op for."""
    kind = type(m)
    if kind in _PLAIN:
        return OpCall(_PLAIN[kind])
    if kind is nn.Conv2d:
        return _conv(m)
    if kind is nn.ConvTranspose2d:
        return _conv_transpose(m)
    if kind is nn.Softmax:
        return _softmax(m.dim)
    if kind is nn.BatchNorm2d:
        return _batch_norm(m)
    if kind is nn.Linear:
        if m.bias is None:
            raise _Refused("bias=False (fusegen's linear has a bias)")
        return OpCall(
            "linear", ((None, Hole("in_features", m.in_features)), (None, Hole("out_features", m.out_features)))
        )
    if kind is nn.MaxPool2d:
        return _max_pool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
    if kind is nn.AvgPool2d:
        return _avg_pool(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.divisor_override)
    if kind is nn.AdaptiveAvgPool2d:
        return _adaptive_pool(m.output_size)
    if kind is nn.Dropout:
        return _dropout(m.p)
    if kind is nn.Flatten:
        if (m.start_dim, m.end_dim) != (1, -1):
            raise _Refused(f"start_dim={m.start_dim}, end_dim={m.end_dim}")
        return OpCall("flatten")
    return None


def _module_name(m: nn.Module) -> str:
    kind = type(m)
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__


def _is_leaf(m: nn.Module) -> bool:
    """A module of torch.nn's other than a container: fusegen has an op for it or refuses it."""
    return type(m).__module__.startswith("torch.nn") and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


# Calls in forward that are one elementwise op: functions, and methods by name.
_ELEMENTWISE_CALLS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.hardswish: "hardswish",
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ADDS = {operator.add, operator.iadd, torch.add}
_SHAPE_HELPERS = {"size", "dim"}
_SIZE_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub}
_CATS = {torch.cat, torch.concat, torch.concatenate}


def _bind(fn_args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    bound = dict(zip(names, fn_args))
    bound.update(kwargs)
    return {name: bound.get(name, defaults.get(name)) for name in names}


# -- module bodies ------------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a line: an op (maybe labelled with the module it creates) or a block/module call."""

    input: object  # the fx node of the value it reads
    output: object
    op: OpCall | None = None
    label: str | None = None
    operand: object = None  # add's other value
    parts: tuple = ()  # cat's values, in order
    call: "Structure | None" = None  # a Sequential or a module of a class of its own
    argument: bool = False  # the call's module was made before its parent, which takes it as an argument
    dense: tuple = ()  # a dense loop's layers (Structures): each reads the input joined with every earlier output
    line: int | None = None  # a dense loop's: the model file's line of its first call

    @property
    def role(self) -> str:
        if self.call is not None or self.dense:
            return "call"
        if self.parts:
            return "concat"
        if self.operand is not None:
            return "operand"
        return _role(self.op)


@dataclass
class Structure:
    """A Sequential (items) or a module body (steps from its trace), as found in the model."""

    module: nn.Module
    path: str
    items: list | None = None  # Sequential: OpCall or Structure per index
    steps: list[Step] | None = None  # module body
    inputs: object = None  # module body: its fx placeholder
    output: object = None  # module body: the fx node it returns
    order: dict = field(default_factory=dict)  # module body: fx node -> its place in the trace


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's forward; every module it calls stays a call."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return True


class _Importer:
    def __init__(self, source: Source):
        self.source = source
        self.path = source.path
        self.consumed: set = set()  # fx nodes inside a pattern that one step stands for (a channel shuffle)

    def fail(self, module: nn.Module | None, message: str, line: int | None = None) -> ImportFailure:
        if line is None and module is not None:
            line = self.source.lines.get(id(module))
        return ImportFailure(line, message)

    def structure(self, module: nn.Module, path: str, input_shape: tuple[int, ...]) -> Structure:
        if type(module) is nn.Sequential:
            return self.sequential(module, path, input_shape)
        return self.body(module, path, input_shape)

    def sequential(self, seq: nn.Sequential, path: str, input_shape) -> Structure:
        items = []
        shape = input_shape
        for name, child in seq.named_children():
            where = f"{path}.{name}" if path else name
            items.append(self.child(child, where, shape))
            shape = tuple(_fake_run(child, shape).shape)
        return Structure(seq, path, items=items)

    def child(self, child: nn.Module, where: str, shape) -> OpCall | Structure:
        if _is_leaf(child):
            return self.leaf(child, where)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            raise self.fail(child, f"{_module_name(child)} at {where} is called, but only its items can run")
        return self.structure(child, where, shape)

    def leaf(self, module: nn.Module, where: str, line: int | None = None) -> OpCall:
        try:
            op = _leaf_op(module)
        except _Refused as why:
            raise self.fail(module, f"{_module_name(module)} at {where} is not supported: {why}", line) from None
        if op is None:
            raise self.fail(module, f"{_module_name(module)} at {where} is not supported", line)
        return op

    def body(self, module: nn.Module, path: str, input_shape) -> Structure:
        tracer = _ChildrenAsLeaves()
        tracer.record_stack_traces = True
        what = f"{type(module).__name__}.forward" + (f" at {path}" if path else "")
        try:
            graph = tracer.trace(module)
        except Exception as err:  # a trace error is the user's code meeting a proxy
            line = _line_in(err.__traceback__, self.path)
            if isinstance(err, fx.proxy.TraceError) or "control flow" in str(err):
                raise ImportFailure(
                    line, f"{what} takes a branch or loop on tensor values, which a trace cannot follow"
                ) from None
            raise ImportFailure(line, f"{what} cannot be traced: {_describe(err)}") from None
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise self.fail(module, f"{what} takes {len(placeholders)} inputs; fusegen models take one tensor")
        traced = fx.GraphModule(module, graph)
        for node in graph.nodes:  # a module fusegen has no op for fails the shapes below: name it first
            if node.op == "call_module" and _is_leaf(child := module.get_submodule(node.target)):
                self.leaf(child, f"{path}.{node.target}" if path else node.target, _node_line(node, self.path))
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        try:
            ShapeProp(traced, fake_mode=fake).propagate(fake.from_tensor(torch.empty(input_shape)))
        except Exception as err:  # the user's forward at this input: its error is the user's to see
            why = _describe(err.__cause__ or err)
            raise self.fail(module, f"{what} fails at input shape {list(input_shape)}: {why}") from None
        structure = Structure(module, path, steps=[], inputs=placeholders[0])
        structure.order = {node: i for i, node in enumerate(traced.graph.nodes)}
        alias: dict = {}  # fx node -> the node whose value it is (views that change nothing)
        called: set[str] = set()
        for node in traced.graph.nodes:
            if node.op in ("placeholder", "output"):
                if node.op == "output":
                    structure.output = self.value(node.args[0], alias, module, node)
                continue
            line = _node_line(node, self.path)
            if node in self.consumed:
                continue
            if node.op == "call_module":
                self.call_module(structure, node, alias, called, line)
            elif node.op == "get_attr":
                raise ImportFailure(line, f"{what} reads {node.target} directly; only modules it calls can be imported")
            elif _tensor_shape(node) is None:
                if not _is_size_arithmetic(node):
                    raise ImportFailure(line, f"{_call_name(node)} in {what} is not supported")
            else:
                self.call_function(structure, node, alias, line, what)
        items = [
            (f"{n}.{k}", item)
            for n, c in module.named_children()
            if isinstance(c, nn.ModuleList)
            for k, item in enumerate(c)
        ]
        others = [(n, c) for n, c in module.named_children() if not isinstance(c, nn.ModuleList)]
        for name, child in others + items:
            holds_state = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if name not in called and holds_state:
                where = f"{path}.{name}" if path else name
                raise self.fail(
                    child, f"{_module_name(child)} at {where} holds parameters, but {what} never calls it itself"
                )
        if path:
            self.mark_arguments(structure)
        return structure

    def mark_arguments(self, structure: Structure) -> None:
        """Children that the module's forward calls after a child made later: made before the module itself
        (torchvision's ResNets make a block's downsample and pass it in), so the spec passes them in too."""
        latest = -1
        children = dict(structure.module.named_children())
        for step in structure.steps:
            child = children.get(step.label)  # None for an op's own module (a functional call's)
            made = (
                [self.source.created[id(m)] for m in child.modules() if id(m) in self.source.created] if child else []
            )
            if not made:
                continue
            if min(made) < latest and step.call is not None:
                step.argument = True
            latest = max(latest, min(made))

    def value(self, node, alias: dict, module, at):
        if not isinstance(node, fx.Node) or _tensor_shape(node) is None:
            raise ImportFailure(_node_line(at, self.path), f"{type(module).__name__}.forward must return one tensor")
        return alias.get(node, node)

    def check_name(self, name: str, line) -> None:
        if not re.fullmatch(r"(?!block_[0-9]+$)[A-Za-z_]\w*", name) or name in RESERVED or keyword.iskeyword(name):
            raise ImportFailure(line, f"a spec cannot name a module {name!r} (a name the generated Python uses)")

    def call_module(self, structure: Structure, node, alias, called: set[str], line) -> None:
        target = node.target
        child = structure.module.get_submodule(target)
        where = f"{structure.path}.{target}" if structure.path else target
        if "." in target:
            self.list_item(structure, node, alias, called, line)
            return
        self.check_name(target, line)
        value = alias.get(node.args[0], node.args[0])
        if _is_leaf(child):
            op = self.leaf(child, where, line)
            label = target if O.lookup(op.name).needs_module else None
            if target in called and (label or any(True for _ in child.parameters())):
                raise ImportFailure(
                    line, f"{_module_name(child)} at {where} is called twice; fusegen runs each module once"
                )
            called.add(target)
            structure.steps.append(Step(value, node, op=op, label=label))
            return
        if type(child) is nn.Sequential and len(child) == 0:  # the identity (ShuffleNet's shortcut of one width)
            alias[node] = value
            return
        if target in called:
            raise ImportFailure(
                line, f"{_module_name(child)} at {where} is called twice; fusegen runs each module once"
            )
        called.add(target)
        inner = self.child(child, where, _tensor_shape(node.args[0]))
        only = inner.steps[0] if inner.steps is not None and len(inner.steps) == 1 else None
        if (
            only is not None
            and only.op is not None
            and only.call is None
            and only.operand is None
            and only.input is inner.inputs
            and only.output is inner.output
            and not any(True for _ in child.children())
        ):  # a module of its own class that is one op and holds nothing (ChannelShuffle): the op, named as the child
            label = target if O.lookup(only.op.name).needs_module else None
            structure.steps.append(Step(value, node, op=only.op, label=label))
            return
        structure.steps.append(Step(value, node, label=target, call=inner))

    def list_item(self, structure: Structure, node, alias, called: set[str], line) -> None:
        """`self.blocks[i](x)`: an item of an nn.ModuleList, called in index order (`blocks[i]: block(...)`), or a
        whole list unrolled by a loop that joins each item's output onto the running features (a dense loop)."""
        target = node.target
        name, _, index = target.partition(".")
        container = structure.module.get_submodule(name)
        listed = f"{structure.path}.{name}" if structure.path else name
        where = f"{listed}.{index}"
        if not isinstance(container, nn.ModuleList) or not index.isdigit():
            raise ImportFailure(
                line, f"forward calls {where} on its own; fusegen runs a submodule only through its container"
            )
        self.check_name(name, line)
        value = alias.get(node.args[0], node.args[0])
        loop = _dense_loop(node, name, len(container)) if index == "0" else None
        if loop is not None:
            layers, cats = loop
            self.consumed.update(layers + cats)
            called.update(n.target for n in layers)
            steps = [
                self.child(container[k], f"{listed}.{k}", _tensor_shape(layer.args[0]))
                for k, layer in enumerate(layers)
            ]
            self.check_dense(steps, container, listed)
            structure.steps.append(Step(value, cats[-1], label=name, dense=tuple(steps), line=line))
            return
        item = container[int(index)]
        made = sum(1 for t in called if t.startswith(name + "."))
        if target in called or int(index) != made:
            raise ImportFailure(
                line,
                f"forward calls {where} after {made} item(s) of {name}: fusegen calls a ModuleList's items once each,"
                " in index order",
            )
        if _is_leaf(item):
            raise ImportFailure(
                line,
                f"{_module_name(item)} at {where} is an item of a ModuleList called on its own: fusegen's list items are"
                " modules or Sequentials (`name[i]: block(...)`)",
            )
        called.add(target)
        inner = self.child(item, where, _tensor_shape(node.args[0]))
        structure.steps.append(Step(value, node, label=f"{name}[{index}]", call=inner))

    def check_dense(self, layers: list, container: nn.ModuleList, where: str) -> None:
        """A dense loop's layers are one block called at arguments that grow by a step each layer."""
        templates = [_Writer().template(layer, "") for layer in layers]
        for k, template in enumerate(templates):
            if template.signature != templates[0].signature:
                raise self.fail(
                    container[k],
                    f"{where}.{k} differs in structure from {where}.0: a dense loop runs one block for every layer",
                )
            if template.arguments:
                raise self.fail(
                    container[k], f"{where}.{k} takes a module made before it; a dense loop's layers cannot"
                )
        for j, hole in enumerate(templates[0].holes):
            values = [t.holes[j].value for t in templates]
            step = values[1] - values[0] if len(values) > 1 else 0
            if values != [values[0] + k * step for k in range(len(values))]:
                raise self.fail(
                    container[0],
                    f"the layers of {where} take {hole.arg} {values}: a dense loop's layer takes values that grow by"
                    " one step per layer",
                )

    def call_function(self, structure: Structure, node, alias, line, what) -> None:
        target, args, kwargs = node.target, node.args, node.kwargs
        name = _call_name(node)
        if target in _CATS:
            self.cat(structure, node, alias, line, f"{name} in {what}")
            return
        x = args[0] if args else None
        if not isinstance(x, fx.Node):
            raise ImportFailure(line, f"{name} in {what} is not supported")
        value = alias.get(x, x)
        splits = (node.op == "call_method" and target in ("view", "reshape", "unflatten")) or target is torch.unflatten
        shuffle = _channel_shuffle(node) if splits else None
        if shuffle is not None:  # one step for the nodes from the split to the join
            nodes, groups = shuffle
            self.consumed.update(nodes)
            taken = {s.label for s in structure.steps} | {n for n, _ in structure.module.named_children()}
            op = OpCall("channel_shuffle", ((None, Hole("groups", groups)),))
            structure.steps.append(Step(value, nodes[-1], op=op, label=_fresh("shuffle", taken)))
            return
        try:
            steps = self.function_ops(node, target, args, kwargs)
        except _Refused as why:
            raise ImportFailure(line, f"{name} in {what} is not supported: {why}") from None
        if steps is None:
            raise ImportFailure(line, f"{name} in {what} is not supported")
        if not steps:
            alias[node] = value
            return
        if target in _ADDS or (node.op == "call_method" and target in ("add", "add_")):
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if not isinstance(other, fx.Node) or _tensor_shape(other) != _tensor_shape(x):
                raise ImportFailure(
                    line,
                    f"{name} in {what} adds a value of another shape or a number; fusegen adds tensors of one shape",
                )
            if kwargs.get("alpha", 1) != 1:
                raise ImportFailure(line, f"{name} with alpha in {what} is not supported")
            other = alias.get(other, other)
            if structure.order[other] > structure.order[value]:  # read the newer value as the line's input
                value, other = other, value
            structure.steps.append(Step(value, node, op=OpCall("add"), operand=other))
            return
        for i, op in enumerate(steps):
            label = None
            if O.lookup(op.name).needs_module:
                label = _fresh(
                    op.name, {s.label for s in structure.steps} | {n for n, _ in structure.module.named_children()}
                )
            output = node if i == len(steps) - 1 else (node, i)  # one call, two ops (mean: pool, flatten)
            structure.steps.append(Step(value, output, op=op, label=label))
            value = output

    def cat(self, structure: Structure, node, alias, line, what: str) -> None:
        """torch.cat along channels: one step that reads its parts, each a value of this body."""
        b = _bind(node.args, node.kwargs, ("tensors", "dim"), {"dim": 0})
        parts = b["tensors"]
        if not isinstance(parts, (list, tuple)) or len(parts) < 2:
            raise ImportFailure(line, f"{what} is not supported: fusegen joins two or more values, a list in the call")
        if any(not isinstance(p, fx.Node) or len(_tensor_shape(p) or ()) != 4 for p in parts):
            raise ImportFailure(line, f"{what} is not supported: fusegen joins N, C, H, W tensors")
        if b["dim"] not in (1, -3):
            raise ImportFailure(line, f"{what} along dim={b['dim']} is not supported: fusegen joins along channels")
        parts = tuple(alias.get(p, p) for p in parts)
        structure.steps.append(Step(parts[0], node, op=OpCall("cat"), parts=parts))

    def function_ops(self, node, target, args, kwargs) -> list[OpCall] | None:
        """The ops of a call in forward: [] where it passes its input through, None where unsupported."""
        method = node.op == "call_method"
        in_shape, out_shape = _tensor_shape(args[0]), _tensor_shape(node)
        if (not method and target in _ELEMENTWISE_CALLS) or (method and target in _ELEMENTWISE_METHODS):
            return [OpCall((_ELEMENTWISE_METHODS if method else _ELEMENTWISE_CALLS)[target])]
        if (not method and target in _ADDS) or (method and target in ("add", "add_")):
            return [OpCall("add")]
        if not method and target is F.hardtanh:
            b = _bind(args[1:], kwargs, ("min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
            return [OpCall("relu6")] if (b["min_val"], b["max_val"]) == (0.0, 6.0) else None
        if not method and target is F.max_pool2d:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            b = _bind(
                args[1:], kwargs, names, {"padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
            )
            return [_max_pool(*b.values())]
        if not method and target is F.avg_pool2d:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            b = _bind(args[1:], kwargs, names, {"padding": 0, "ceil_mode": False})
            return [_avg_pool(b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"], b["divisor_override"])]
        if not method and target is F.adaptive_avg_pool2d:
            return [_adaptive_pool(_bind(args[1:], kwargs, ("output_size",), {})["output_size"])]
        if not method and target is F.dropout:
            b = _bind(args[1:], kwargs, ("p", "training"), {"p": 0.5, "training": True})
            return [_dropout(b["p"] if b["training"] else 0.0)]
        if (not method and target is torch.flatten) or (method and target == "flatten"):
            b = _bind(args[1:], kwargs, ("start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            if len(in_shape) == 4 and b["start_dim"] == 1 and b["end_dim"] in (-1, 3):
                return [OpCall("flatten")]
            return [] if in_shape == out_shape else None
        if method and target in ("view", "reshape", "contiguous"):
            if in_shape == out_shape:
                return []
            if len(in_shape) == 4 and out_shape == (in_shape[0], in_shape[1] * in_shape[2] * in_shape[3]):
                return [OpCall("flatten")]
            raise _Refused(f"a shape {list(out_shape)} that is not the flattened {list(in_shape)}")
        if (not method and target is torch.mean) or (method and target == "mean"):
            b = _bind(args[1:], kwargs, ("dim", "keepdim"), {"keepdim": False})
            dims = b["dim"] if isinstance(b["dim"], (list, tuple)) else [b["dim"]]
            if len(in_shape) == 4 and sorted(d % 4 for d in dims if isinstance(d, int)) == [2, 3]:
                return [OpCall("global_avgpool")] + ([] if b["keepdim"] else [OpCall("flatten")])
            raise _Refused(f"dim={b['dim']} (fusegen averages over H and W)")
        return None


def _is_size_arithmetic(node) -> bool:
    """A number from tensor sizes (x.size(), x.shape, their items, arithmetic on them), for a view's arguments."""
    if node.op == "call_method":
        return node.target in _SHAPE_HELPERS
    if node.target is getattr:
        return True
    if node.target is operator.getitem:
        return _tensor_shape(node.args[0]) is None
    return node.target in _SIZE_ARITHMETIC and all(_tensor_shape(a) is None for a in node.args)


def _dense_loop(first, name: str, count: int) -> tuple[list, list] | None:
    """DenseNet's loop, unrolled by the trace, from its first layer call `name.0`: layer k reads the input joined
    along channels with the outputs of layers 0 to k - 1 (torch.cat of the list, or of the last join and the new
    output), and the value is the join after the last layer. (layer calls, joins), or None where the nodes are
    another thing; each output and each join but the last is read only inside the loop."""
    start = first.args[0]
    layers, cats = [first], []

    def parts(cat) -> list | None:
        b = _bind(cat.args, cat.kwargs, ("tensors", "dim"), {"dim": 0})
        if cat.target not in _CATS or b["dim"] not in (1, -3) or not isinstance(b["tensors"], (list, tuple)):
            return None
        return [q for p in b["tensors"] for q in (parts(p) if p in cats else [p])]

    for k in range(count):
        outputs = [start, *layers]
        cat = next((u for u in layers[k].users if u.op == "call_function" and parts(u) == outputs), None)
        if cat is None:
            return None
        cats.append(cat)
        if k + 1 < count:
            layer = next((u for u in cat.users if u.op == "call_module" and u.target == f"{name}.{k + 1}"), None)
            if layer is None or layer.args[0] is not cat:
                return None
            layers.append(layer)
    inside = set(layers) | set(cats)
    if any(set(n.users) - inside for n in layers + cats[:-1]):
        return None
    return layers, cats


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _swaps_dims_1_2(node, source) -> bool:
    """`source.transpose(1, 2)` or `source.permute(0, 2, 1, 3, 4)` on a 5-dimensional value."""
    if node is None or not node.args or node.args[0] is not source:
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op == "call_function" and node.target not in (torch.transpose, torch.permute):
        return False
    dims = node.args[1:] or tuple(node.kwargs.values())
    if name == "transpose" and len(dims) == 2 and all(isinstance(d, int) for d in dims):
        return sorted(d % 5 for d in dims) == [1, 2]
    if name == "permute":
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
        return all(isinstance(d, int) for d in dims) and tuple(d % 5 for d in dims) == (0, 2, 1, 3, 4)
    return False


def _channel_shuffle(split) -> tuple[list, int] | None:
    """A channel shuffle from its first view: x.view(N, g, C // g, H, W) (or reshape, unflatten), .transpose(1, 2)
    (or permute), maybe .contiguous(), then a view, reshape or flatten back to N, C, H, W, each the one reader of
    the one before. The nodes from `split` to the last view, and g; None where the nodes are another thing."""
    in_shape, out_shape = _tensor_shape(split.args[0]), _tensor_shape(split)
    if in_shape is None or out_shape is None or len(in_shape) != 4 or len(out_shape) != 5:
        return None
    n, c, h, w = in_shape
    groups = out_shape[1]
    if out_shape != (n, groups, c // groups, h, w):
        return None
    swap = _only_user(split)
    if not _swaps_dims_1_2(swap, split):
        return None
    nodes = [split, swap]
    end = _only_user(swap)
    if end is not None and end.op == "call_method" and end.target == "contiguous":
        nodes.append(end)
        end = _only_user(end)
    joins = end is not None and (
        (end.op == "call_method" and end.target in ("view", "reshape", "flatten"))
        or (end.op == "call_function" and end.target in (torch.reshape, torch.flatten))
    )
    if not joins or end.args[0] is not nodes[-1] or _tensor_shape(end) != in_shape:
        return None
    return [*nodes, end], groups


def _fresh(base: str, taken: set) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _tensor_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _call_name(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "torch": "torch.", "_operator": "operator."}.get(module, "")
    if module.startswith("torch") and not prefix:
        prefix = "torch."
    return prefix + getattr(target, "__name__", str(target))


def _node_line(node, path: Path) -> int | None:
    found = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
    lines = [int(line) for file, line in found if Path(file) == path]
    return lines[-1] if lines else None


def _fake_run(module: nn.Module, shape) -> torch.Tensor:
    """The module's output at an input shape, without computing it."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        return module(fake.from_tensor(torch.empty(shape)))


# -- spec text: lines with holes, shared declarations ------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A call of a declared block or module: the callee's template and where its holes start in ours."""

    template: "Template"
    start: int


@dataclass(frozen=True)
class DenseRef:
    """A dense loop's block call: the layers' template, and where its holes start in ours, two per hole of the
    layer (the first layer's value, then the step from one layer to the next)."""

    template: "Template"
    start: int


@dataclass(frozen=True)
class ModuleArg:
    """A module passed to a module: its parameter's name in the body, the call that makes it at the call site."""

    name: str
    ref: Ref


@dataclass
class Template:
    """A structure as spec text whose integers are holes (indices into `holes`)."""

    kind: str  # "block" or "module"
    hint: str  # a name for its declaration
    body: list  # lines: tuple of tokens (str, int hole index, Ref, ModuleArg), or Nested
    holes: list[Hole]
    arguments: list[ModuleArg] = field(default_factory=list)

    @property
    def signature(self):
        return (self.kind, _signature(self.body, self.holes))


@dataclass
class Nested:
    """`[target =] name:` and an indented sequential body."""

    header: tuple
    body: list


def _signature(body, holes):
    out = []
    for line in body:
        if isinstance(line, Nested):
            out.append(("nested", _signature([line.header], holes), _signature(line.body, holes)))
            continue
        out.append(tuple(_token_signature(t, holes) for t in line))
    return tuple(out)


def _token_signature(token, holes):
    if isinstance(token, int):
        return (holes[token].arg, token)
    if isinstance(token, Ref):
        return ("ref", token.template.signature, token.start)
    if isinstance(token, DenseRef):
        return ("dense", token.template.signature, token.start)
    if isinstance(token, ModuleArg):
        return ("argument", token.name, token.ref.template.signature, token.ref.start)
    return token


class _Writer:
    """Turns Structures into Templates, line by line."""

    def __init__(self, sequentials: dict | None = None):
        self.groups: dict = {}  # signature -> [Template], in the order declarations must come
        # signature -> how many Sequentials of the model have it (None: none inline, each a block, counted)
        self.sequentials = sequentials

    def once(self, structure: Structure) -> bool:
        """Whether a Sequential's structure is its own (written inline) rather than shared (a block)."""
        if self.sequentials is None:
            return False
        return self.sequentials[_Writer().template(structure, "").signature] == 1

    def template(self, structure: Structure, hint: str) -> Template:
        holes: list[Hole] = []
        if structure.items is not None:
            body = self.sequential_lines(structure.items, holes, hint)
            template = Template("block", hint, body, holes)
        else:
            arguments: list[ModuleArg] = []
            body = self.module_lines(structure, holes, arguments)
            template = Template("module", _snake(type(structure.module).__name__), body, holes, arguments)
        self.groups.setdefault(template.signature, []).append(template)
        return template

    def call(self, structure: Structure, hint: str, holes: list[Hole]) -> Ref:
        template = self.template(structure, hint)
        ref = Ref(template, len(holes))
        holes.extend(template.holes)
        return ref

    def dense_line(self, layers: tuple, hint: str, holes: list[Hole]) -> tuple:
        """`layer(first + i * step, ...) for i in range(n)`: each hole of the layers' block as its first value and
        its step (the importer checked that the layers' values grow so)."""
        templates = [self.template(layer, hint) for layer in layers]
        ref = DenseRef(templates[0], len(holes))
        for j, hole in enumerate(templates[0].holes):
            values = [t.holes[j].value for t in templates]
            holes += [hole, Hole("growth_rate", values[1] - values[0] if len(values) > 1 else 0)]
        holes.append(Hole("num_layers", len(layers)))
        return (ref, " for i in range(", len(holes) - 1, ")")

    def op_tokens(self, op: OpCall, holes: list[Hole]) -> list:
        if not op.args:
            return [op.name]
        tokens: list = [op.name, "("]
        for i, (key, value) in enumerate(op.args):
            tokens += [", "] if i else []
            tokens += [f"{key}="] if key else []
            if isinstance(value, Hole):
                tokens.append(len(holes))
                holes.append(value)
            else:
                tokens.append(value)
        return tokens + [")"]

    def sequential_lines(self, items: list, holes: list[Hole], hint: str) -> list:
        lines: list = []
        chain: list[OpCall] = []
        for item in [*items, None]:
            if isinstance(item, OpCall) and (not chain or _legal([_role(o) for o in chain], _role(item))):
                chain.append(item)
                continue
            if chain:
                line: list = []
                for op in chain:
                    line += [" -> "] if line else []
                    line += self.op_tokens(op, holes)
                lines.append(tuple(line))
            chain = [item] if isinstance(item, OpCall) else []
            if isinstance(item, Structure):
                lines.append((self.call(item, f"{hint}_block", holes),))
        return lines

    def module_lines(self, structure: Structure, holes: list[Hole], arguments: list[ModuleArg]) -> list:
        groups = _group_steps(structure.steps)
        # who reads each value: (line index, as the line's head?)
        readers: dict = {}
        for i, group in enumerate(groups):
            if not group[0].parts:
                readers.setdefault(group[0].input, []).append((i, True))
            for step in group:
                for value in [step.operand] if step.operand is not None else step.parts:
                    readers.setdefault(value, []).append((i, False))
        readers.setdefault(structure.output, []).append((len(groups), True))
        labels = {n for n, _ in structure.module.named_children()} | {s.label for s in structure.steps if s.label}
        taken = labels | set(O.FIXED_OPS) | RESERVED
        names: dict = {}

        def needs_name(value, line: int) -> bool:
            return any(not head or at != line + 1 for at, head in readers.get(value, []))

        def input_needs_name() -> bool:
            """Whether a line reads the body's input as an operand or where `x` is another value: lines that
            name their output leave `x` as it was (an inception module's branches all read `x`)."""
            register = structure.inputs
            reads = readers.get(structure.inputs, [])
            for i in range(len(groups) + 1):
                if any(at == i and (not head or register is not structure.inputs) for at, head in reads):
                    return True
                if i < len(groups) and not needs_name(groups[i][-1].output, i):
                    register = groups[i][-1].output
            return False

        lines: list = []
        if input_needs_name():
            names[structure.inputs] = _fresh("identity", taken)
            taken.add(names[structure.inputs])
            lines.append((f"{names[structure.inputs]} = x",))
        register = structure.inputs
        for i, group in enumerate(groups):
            head, output = group[0].input, group[-1].output
            target = None
            if needs_name(output, i):
                target = names[output] = _fresh("out", taken)
                taken.add(target)
            prefix = [f"{target} = "] if target else []
            first = group[0]
            if head is not register and not first.parts:
                prefix.append(f"{names[head]} -> ")
            if first.parts:
                lines.append(tuple([*prefix, f"cat({', '.join(names[part] for part in first.parts)})"]))
            elif first.dense:
                if head is not register:
                    raise ImportFailure(
                        first.line,
                        f"the dense loop over {first.label} reads a value other than the one the line"
                        " before made; fusegen's dense loop reads `x`",
                    )
                header = tuple([*([f"{target} = "] if target else []), f"dense {first.label}:"])
                lines.append(Nested(header, [self.dense_line(first.dense, "dense_layer", holes)]))
            elif first.argument:
                argument = ModuleArg(first.label, self.call(first.call, f"{first.label}_block", holes))
                arguments.append(argument)
                lines.append(tuple([*prefix, argument]))
            elif (
                first.call is not None
                and first.call.items is not None
                and head is register
                and "[" not in first.label
                and self.once(first.call)
            ):
                body = self.sequential_lines(first.call.items, holes, first.label)
                lines.append(Nested(tuple([*([f"{target} = "] if target else []), f"{first.label}:"]), body))
            elif first.call is not None:
                hint = first.label.partition("[")[0] if first.call.items is not None else ""
                lines.append(tuple([*prefix, f"{first.label}: ", self.call(first.call, hint, holes)]))
            else:
                line: list = list(prefix)
                for k, step in enumerate(group):
                    line += [" -> "] if k else []
                    line += [f"{step.label}: "] if step.label else []
                    op = step.op
                    if step.operand is not None:
                        op = OpCall("add", ((None, names[step.operand]),))
                    line += self.op_tokens(op, holes)
                lines.append(tuple(line))
            if target is None:
                register = output
        if structure.output is not register:
            lines.append((f"return {names[structure.output]}",))
        return lines


def _role(op: OpCall) -> str:
    return {O.Role.ANCHOR: "anchor", O.Role.VIEW: "view", O.Role.ELEMENTWISE: "elementwise"}[op.role]


def _legal(roles: list[str], role: str) -> bool:
    if "view" in roles:
        return False
    if role == "anchor":
        return "anchor" not in roles and "operand" not in roles
    return True


def _group_steps(steps: list[Step]) -> list[list[Step]]:
    """Consecutive steps, each reading the one before (its only reader), that make one legal kernel."""
    readers: dict = {}
    for step in steps:
        for value in step.parts or [step.input, *([step.operand] if step.operand is not None else [])]:
            readers[value] = readers.get(value, 0) + 1
    groups: list[list[Step]] = []
    for step in steps:
        last = groups[-1] if groups else None
        if (
            last
            and step.call is None
            and last[-1].call is None
            and not step.dense
            and not last[-1].dense
            and not step.parts
            and not last[-1].parts
            and step.input is last[-1].output
            and readers.get(step.input) == 1
            and _legal([s.role for s in last], step.role)
        ):
            last.append(step)
        else:
            groups.append([step])
    return groups


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class _Declarations:
    """Names and parameters of the shared declarations, and the text of each."""

    def __init__(self, groups: dict, sources: dict):
        """`sources`: id(hole) -> the expression it is written as, where it follows a constructor argument."""
        self.groups = groups
        self.names: dict = {}
        self.params: dict = {}  # signature -> [(parameter name, representative hole index)]
        self.env: dict = {}  # signature -> {hole index: source}
        taken = set(RESERVED) | set(O.FIXED_OPS)
        for signature, instances in groups.items():
            first = instances[0]
            base = _identifier(re.sub(r"_?[0-9]+$", "", first.hint) or ("stage" if first.kind == "block" else "module"))
            if (
                O.lookup(base) is not None
                or keyword.iskeyword(base)
                or base in RESERVED
                or re.match(r"block_[0-9]", base)
            ):
                base += "_" + first.kind
            self.names[signature] = _fresh(base, taken)
            taken.add(self.names[signature])
        for signature, instances in groups.items():
            first = instances[0]
            # the holes of a module argument's call: its call site writes them
            passed = {a.ref.start + i for a in first.arguments for i in range(len(a.ref.template.holes))}
            by_values: dict = {}
            env = {}
            params = []
            for i, hole in enumerate(first.holes):
                if i in passed:
                    continue
                values = tuple(sources.get(id(t.holes[i]), str(t.holes[i].value)) for t in instances)
                if len(set(values)) == 1:
                    env[i] = values[0]
                    continue
                if values not in by_values:
                    used = {p for p, _ in params} | {a.name for a in first.arguments} | taken
                    by_values[values] = _fresh(hole.arg, used)
                    params.append((by_values[values], i))
                env[i] = by_values[values]
            self.params[signature] = params
            self.env[signature] = env

    def dense_source(self, ref: DenseRef, env: dict) -> str:
        args = []
        for _, j in self.params[ref.template.signature]:
            first, step = env[ref.start + 2 * j], env[ref.start + 2 * j + 1]
            args.append(first if step == "0" else f"i * {step}" if first == "0" else f"{first} + i * {step}")
        return f"{self.names[ref.template.signature]}({', '.join(args)})"

    def call_source(self, ref: Ref, env: dict) -> str:
        signature = ref.template.signature
        args = [env[ref.start + i] for _, i in self.params[signature]]
        args += [self.call_source(Ref(a.ref.template, ref.start + a.ref.start), env) for a in ref.template.arguments]
        return f"{self.names[signature]}({', '.join(args)})"

    def render(self, body: list, env: dict, sequential: bool, indent: str = "    ") -> list[str]:
        out: list[str] = []
        for line in body:
            if isinstance(line, Nested):
                out.append(indent + self.tokens(line.header, env))
                out += self.render(line.body, env, True, indent + "    ")
            else:
                out.append(indent + self.tokens(line, env))
        return _repeats(out) if sequential else out

    def tokens(self, tokens: tuple, env: dict) -> str:
        parts = []
        for t in tokens:
            if isinstance(t, int):
                parts.append(env[t])
            elif isinstance(t, Ref):
                parts.append(self.call_source(t, env))
            elif isinstance(t, DenseRef):
                parts.append(self.dense_source(t, env))
            elif isinstance(t, ModuleArg):
                parts.append(t.name)
            else:
                parts.append(t)
        return "".join(parts)

    def declarations(self) -> list[str]:
        out = []
        for signature, instances in self.groups.items():
            first = instances[0]
            params = ", ".join([p for p, _ in self.params[signature]] + [a.name for a in first.arguments])
            out.append(f"{first.kind} {self.names[signature]}({params}):")
            out += self.render(first.body, self.env[signature], first.kind == "block")
            out.append("")
        return out


def _repeats(lines: list[str]) -> list[str]:
    """Runs of identical lines of a sequential body as `line * N`."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and lines[j + 1] == lines[i] and not lines[i].rstrip().endswith(":"):
            j += 1
        out.append(lines[i] + (f" * {j - i + 1}" if j > i else ""))
        i = j + 1
    return out


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def spec_name(source: Source) -> str:
    """The model's name in the spec: its class, or for KernelBench's `Model` the file's problem name."""
    if source.class_name != "Model":
        return source.class_name
    stem = re.sub(r"^\d+_", "", source.path.stem)
    return _identifier(stem) if stem else "Model"


def to_spec(source: Source) -> str:
    """The spec text for the built model; numbers that follow a constructor argument are written as it."""
    layout = _layout(source)
    layout.init = _init_rules(source)
    follows = _Follows()
    for name, value in source.args:
        _follow(source, layout, name, value, follows)
    text = _text(source, layout, follows)
    if follows.params:
        text = _confirmed(source, layout, follows, text)
    return text


@dataclass
class _Layout:
    """The model's spec before its numbers are written: the forward's lines, their holes, the declarations."""

    writer: "_Writer"
    holes: list[Hole]
    forward: list
    init: list[str] = field(default_factory=list)  # the `init:` rules


def _layout(source: Source) -> _Layout:
    if isinstance(source.model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or _is_leaf(source.model):
        raise ImportFailure(
            source.lines.get(id(source.model)),
            f"the model is an {_module_name(source.model)}; import a module whose forward calls it",
        )
    importer = _Importer(source)
    root = importer.body(source.model, "", source.input_shape)
    counter = _Writer()
    counter.module_lines(root, [], [])
    sequentials = {signature: len(instances) for signature, instances in counter.groups.items()}
    writer = _Writer(sequentials)
    holes: list[Hole] = []
    forward = writer.module_lines(root, holes, [])
    return _Layout(writer, holes, forward)


@dataclass
class _Follows:
    """What follows the constructor's arguments: holes (their index in the forward's) as expressions of them, the
    input's channels, and per argument followed the model at its second value and the holes it moves."""

    holes: dict[int, str] = field(default_factory=dict)
    channels: str | None = None
    params: dict[str, tuple[Callable[[], nn.Module], tuple]] = field(default_factory=dict)  # name -> (build, args)
    claims: dict[str, list[int]] = field(default_factory=dict)


def _follow(source: Source, layout: _Layout, name: str, value, follows: _Follows) -> None:
    """Whether the numbers that an integer argument changes are that argument times a constant: the model is
    imported again with the argument changed (by one, else doubled), and every hole that moves must be `c * name`
    at both values; then those holes are written so. Nothing is recorded where the structure changes or a hole
    moves otherwise (the argument stays fixed at its value)."""
    if source.cls is None or type(value) is not int or value < 1:
        return
    for other in (value + 1, 2 * value):
        shapes = [source.input_shape]
        if source.input_shape[1] == value and follows.channels is None:
            shapes.append((source.input_shape[0], other, *source.input_shape[2:]))
        for shape in shapes:
            try:
                with _quiet():
                    changed = source.at({name: other}, shape)
                    moved = _layout(changed)
            except Exception:  # the user's model at other arguments: any failure says only that it does not follow
                continue
            if len(moved.holes) != len(layout.holes) or _signature(moved.forward, moved.holes) != _signature(
                layout.forward, layout.holes
            ):
                continue
            claims = {}
            for i, (was, now) in enumerate(zip(layout.holes, moved.holes)):
                if was.value == now.value:
                    continue
                if i in follows.holes or was.value % value or now.value != was.value // value * other:
                    return
                claims[i] = name if was.value == value else f"{was.value // value} * {name}"
            if not claims and shape == source.input_shape:
                return  # nothing moved: the spec would not read the argument
            follows.holes.update(claims)
            follows.claims[name] = list(claims)
            follows.params[name] = changed.build, changed.args
            if shape != source.input_shape:
                follows.channels = name
            return


@contextlib.contextmanager
def _quiet():
    """Silences what torch prints about an error it raises (ShapeProp, fake tensors): the caller handles it."""
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _confirmed(source: Source, layout: _Layout, follows: _Follows, text: str) -> str:
    """The spec, after its ModelNew at each argument that it follows, changed, has the model's state_dict there
    (names, shapes and values from one seed); an argument for which it does not stays fixed."""
    from fusegen.pipeline import compile_spec

    model_new = _model_new(compile_spec(text, f"{source.path.stem}.fuse"), source)
    for name, (build, args) in list(follows.params.items()):
        if _state_dict_difference(build, args, model_new, seed=0) is not None:
            for i in follows.claims.pop(name):
                del follows.holes[i]
            del follows.params[name]
            follows.channels = None if follows.channels == name else follows.channels
            return (
                _confirmed(source, layout, follows, _text(source, layout, follows))
                if follows.params
                else _text(source, layout, follows)
            )
    return text


def _text(source: Source, layout: _Layout, follows: _Follows) -> str:
    declarations = _Declarations(layout.writer.groups, {id(layout.holes[i]): e for i, e in follows.holes.items()})
    env = {i: follows.holes.get(i, str(h.value)) for i, h in enumerate(layout.holes)}
    kept = [(name, value) for name, value in source.args if name in follows.params]
    fixed = [(name, value) for name, value in source.args if name not in follows.params]
    # every argument, in the constructor's order (KernelBench passes them positionally)
    params = ", ".join(f"{_param_name(name)}={_literal(name, value)}" for name, value in source.args)
    shape = [str(d) for d in source.input_shape]
    if follows.channels is not None:
        shape[1] = _param_name(follows.channels)
    notes = [f"Imported by `fusegen import` from {source.path.name} ({source.class_name}); edit it as any spec."]
    if kept:
        notes.append(
            f"The numbers written as {', '.join(_param_name(n) for n, _ in kept)} follow those constructor arguments"
            " (each checked at a second value); every other number was fixed by the trace."
        )
    if fixed:
        them = "them" if len(fixed) > 1 else "it"
        values = ", ".join(f"{name}={value!r}" for name, value in fixed)
        notes.append(
            f"Fixed at {values}: the trace cannot tell how the structure follows {them}, so ModelNew takes {them}"
            " only at that value."
        )
    header = [line for note in notes for line in textwrap.wrap(note, 118, initial_indent="# ", subsequent_indent="# ")]
    text = [
        *header,
        f"model {spec_name(source)}({params})",
        f"input({', '.join(shape)})",
        "",
        *declarations.declarations(),
        "forward:",
        *declarations.render(layout.forward, env, False),
        *(
            ["", f"# as {source.class_name} re-initialises its parameters after building them", "init:"]
            if layout.init
            else []
        ),
        *(f"    {rule}" for rule in layout.init),
    ]
    return "\n".join(text) + "\n"


def _init_rules(source: Source) -> list[str]:
    """The `init:` rules of the model's re-initialisation, read from its __init__: a loop `for m in
    self.modules():` of `if isinstance(m, nn.Conv2d):` branches (elif too) that call torch.nn.init functions on
    m.weight and m.bias (`if m.bias is not None:` around them as well). [] where __init__ has no such loop; a
    statement of the loop that a rule cannot express is refused with its line."""
    cls = type(source.model)
    try:
        lines, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return []
    if Path(inspect.getsourcefile(cls) or "") != source.path:
        return []
    tree = ast.parse(textwrap.dedent("".join(lines)))
    init = next((f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    rules: list[str] = []
    present = {type(m).__name__ for m in source.model.modules() if type(m).__module__.startswith("torch.nn")}
    for loop in ast.walk(init) if init is not None else ():
        if isinstance(loop, ast.For) and isinstance(loop.target, ast.Name) and _is_modules_call(loop.iter):
            reader = _InitReader(loop.target.id, start - 1, present)
            for statement in loop.body:
                rules += reader.statement(statement, None)
    return rules


def _is_modules_call(node) -> bool:
    """`self.modules()`."""
    return (
        isinstance(node, ast.Call)
        and not node.args
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "modules"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    )


@dataclass
class _InitReader:
    """Reads the statements of a `for m in self.modules():` loop as `init:` rules."""

    variable: str
    offset: int  # the file's line of the class source's line 1, less one
    present: set[str]  # the classes of torch.nn modules that the model holds

    def refuse(self, node, why: str) -> ImportFailure:
        return ImportFailure(
            self.offset + node.lineno,
            f"the loop over self.modules() {why}, which fusegen's `init:` rules cannot express",
        )

    def statement(self, node, classes: list[str] | None) -> list[str]:
        if isinstance(node, ast.If):
            tested = self.isinstance_classes(node.test)
            if tested is not None and classes is None:
                rules = [r for s in node.body for r in self.statement(s, tested)]
                return rules + [r for s in node.orelse for r in self.statement(s, None)]
            if classes is not None and self.is_bias_check(node.test) and not node.orelse:
                return [r for s in node.body for r in self.statement(s, classes)]
            raise self.refuse(node, f"tests `{ast.unparse(node.test)}`")
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and classes is not None:
            return self.call(node.value, classes)
        raise self.refuse(
            node, f"does `{ast.unparse(node)}`" if classes is not None else "runs outside an isinstance test"
        )

    def isinstance_classes(self, test) -> list[str] | None:
        """`isinstance(m, nn.Conv2d)` or `isinstance(m, (nn.Conv2d, nn.Linear))`: the classes' names."""
        if not (
            isinstance(test, ast.Call)
            and isinstance(test.func, ast.Name)
            and test.func.id == "isinstance"
            and len(test.args) == 2
            and isinstance(test.args[0], ast.Name)
            and test.args[0].id == self.variable
        ):
            return None
        kinds = test.args[1].elts if isinstance(test.args[1], ast.Tuple) else [test.args[1]]
        names = [k.attr if isinstance(k, ast.Attribute) else getattr(k, "id", None) for k in kinds]
        return None if None in names else names

    def is_bias_check(self, test) -> bool:
        """`m.bias is not None`."""
        return (
            isinstance(test, ast.Compare)
            and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None
            and self.parameter(test.left) == "bias"
        )

    def parameter(self, node) -> str | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self.variable:
            return node.attr
        return None

    def call(self, call: ast.Call, classes: list[str]) -> list[str]:
        """`nn.init.kaiming_normal_(m.weight, mode="fan_out")` as `Class.weight = kaiming_normal(mode="fan_out")`
        for each class of the test that the model holds (a rule skips a missing bias, as `if m.bias is not None:`
        does; without that test the model's own loop would have failed on it)."""
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        base = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        function = name[:-1] if name.endswith("_") else None
        parameter = self.parameter(call.args[0]) if call.args else None
        if base not in ("nn.init", "torch.nn.init", "init") or function not in INIT_FUNCTIONS:
            raise self.refuse(call, f"calls `{ast.unparse(func)}`")
        if parameter not in ("weight", "bias"):
            raise self.refuse(call, f"initialises `{ast.unparse(call.args[0]) if call.args else ''}`")
        args = [self.constant(a) for a in call.args[1:]] + [f"{k.arg}={self.constant(k.value)}" for k in call.keywords]
        rules = []
        for kind in classes:
            if kind not in self.present:
                continue  # the model holds none: the branch does nothing
            if kind not in INIT_CLASSES:
                raise self.refuse(call, f"initialises nn.{kind}")
            rules.append(f"{kind}.{parameter} = {function}" + (f"({', '.join(args)})" if args else ""))
        return rules

    def constant(self, node) -> str:
        try:
            value = ast.literal_eval(node)
        except ValueError:
            value = None
        if isinstance(value, str):
            return f'"{value}"' if '"' not in value else repr(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return repr(value)
        raise self.refuse(node, f"passes `{ast.unparse(node)}`")


def _param_name(name: str) -> str:
    """A constructor parameter's name in the spec's header (and ModelNew's signature)."""
    name = _identifier(name)
    return name + "_" if name in RESERVED or keyword.iskeyword(name) else name


def _literal(name: str, value) -> str:
    """A constructor argument as a spec expression."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    raise ImportFailure(
        None, f"the constructor argument {name}={value!r} is not a number, string or list of numbers, as a spec's are"
    )


# -- the check that the spec's ModelNew is the model --------------------------------------------------------


def verify(source: Source, text: str, seed: int = 0) -> None:
    """Builds the spec's ModelNew and the model from the same seed and compares their state_dicts: names, order
    and values. Raises ImportFailure where the model creates or registers its modules in an order the spec does
    not (fusegen creates them in the order forward first calls them) or initialises them itself."""
    from fusegen.pipeline import compile_spec

    model_new = _model_new(compile_spec(text, f"{source.path.stem}.fuse"), source)
    difference = _state_dict_difference(source.build, source.args, model_new, seed)
    if difference is None:
        return
    key, names = difference
    if not names:
        path = key.rpartition(".")[0]
        raise ImportFailure(
            source.lines.get(id(source.model.get_submodule(path))),
            f"{path} draws other initial values than the spec's under the same seed: {source.class_name} creates"
            " its modules in another order than its forward calls them, or initialises them itself (fusegen"
            " creates them in the order forward first calls them)",
        )
    if key is None:
        raise AssertionError(f"the spec's state_dict has other names: {names[:4]}")
    path = key.rpartition(".")[0]
    raise ImportFailure(
        source.lines.get(id(source.model.get_submodule(path))),
        f"{source.class_name} registers {path} in another place than its forward calls it; fusegen registers"
        " modules in the order forward first calls them",
    )


def _model_new(generated: str, source: Source) -> type:
    """The ModelNew class of a generated file."""
    filename = f"<fusegen import {source.path.name}>"
    linecache.cache[filename] = (len(generated), None, generated.splitlines(True), filename)  # for @triton.jit
    namespace: dict = {"__name__": "fusegen_imported"}
    exec(compile(generated, filename, "exec"), namespace)
    return namespace["ModelNew"]


def model_new_args(model_new: type, source: Source) -> dict:
    """The constructor arguments that the spec's ModelNew takes (those it follows), by name."""
    return _taken(model_new, source.args)


def _taken(model_new: type, args: tuple) -> dict:
    taken = inspect.signature(model_new).parameters
    return {_param_name(name): value for name, value in args if _param_name(name) in taken}


def _state_dict_difference(build, args: tuple, model_new: type, seed: int) -> tuple[str | None, list] | None:
    """None where ModelNew at `args` and the model (`build`), each built from `seed`, have one state_dict (names,
    order, values); else (None, the names either lacks), (the first key whose value differs, []) or (the first
    key out of order, the names)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = build().state_dict()
        torch.manual_seed(seed)
        ours = model_new(**_taken(model_new, args)).state_dict()
    if set(reference) != set(ours):
        return None, sorted(set(reference) ^ set(ours))
    for key, tensor in reference.items():
        if tensor.shape != ours[key].shape or not torch.equal(tensor, ours[key]):
            return key, []
    if list(reference) != list(ours):
        return next(a for a, b in zip(reference, ours) if a != b), list(reference)
    return None
