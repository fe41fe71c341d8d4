"""Bad specs: each error names the right line and column and says what was expected."""

import pytest

from fusegen import SpecError, compile_spec

HEADER = "model M(c=8, alpha=0.5)\ninput(2, 3, 16, 16)\n"
# a sequence whose block call follows the repeat's index; the line that repeats it comes next
INDEXED = "model M(n={n})\ninput(2, 3, 16, 16)\nblock b(k):\n    conv(3, 3, k, padding=k // 2)\nforward:\n    seq:\n"
# blocks for a dense sequence: one that keeps the pixels (2 new channels), one that halves them
DENSE = "model M(n={n})\ninput(2, 3, 8, 8)\nblock b(k):\n    conv(k, 2, 3, padding=1)\nblock s(k):\n    conv(k, 2, 3, 2, 1)\nforward:\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_spec(text, "specs/bad.fuse")
    return info.value


CASES = [
    # (spec, line, column, fragment of the message)
    (HEADER + "forward:\n    conv1: conv3x3(3, c) ->\n", 4, 28, "expected a name"),
    (
        HEADER + "activations(bfloat16)\nforward:\n    relu\n",
        3,
        13,
        "activations(...) takes float32 or float16, got 'bfloat16'",
    ),
    (HEADER + "activations(float16)\nactivations(float32)\nforward:\n    relu\n", 4, 1, "a second `activations(...)`"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) @ 2\n", 4, 26, "unexpected character '@'"),
    # where a value is expected the lexer reads a keyword as a name: Python could not parse it
    (HEADER + "forward:\n    conv1: conv3x3(3, c if and else 1)\n", 4, 28, "`and` is a Python keyword, not a name"),
    (HEADER + "block b(k=None and and):\n    relu\nforward:\n    b()\n", 3, 20, "`and` is a Python keyword"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c)\n      bn1: bn(c)\n", 5, 7, "unexpected indentation"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c)\n  bn1: bn(c)\n", 5, 3, "indentation matches no enclosing block"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c,\n", 4, 25, "unexpected end of file"),
    (HEADER + "forward:\n    conv1: conv3x(3, c)\n", 4, 12, "unknown op or block 'conv3x'; did you mean 'conv3x3'"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c, 1, 1, 1)\n", 4, 32, "conv3x3 takes 4 argument(s)"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c, pad=1)\n", 4, 26, "has no argument 'pad'"),
    (HEADER + "forward:\n    conv1: conv3x3(3)\n", 4, 12, "needs the argument 'out_channels'"),
    (
        HEADER + "forward:\n    conv1: conv3x3(4, c)\n",
        4,
        12,
        "expects 4 input channels, but the tensor flowing in has 3",
    ),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) -> bn1: bn(9)\n", 4, 34, "bn expects 9 input channels"),
    (
        HEADER + "forward:\n    conv1: conv3x3(3, 16 * alpha)\n",
        4,
        23,
        "must be a positive integer, got 8.0 (wrap it in int(...))",
    ),
    (HEADER + "forward:\n    conv1: conv3x3(3, k)\n", 4, 23, "unknown name 'k'"),
    (
        HEADER + "forward:\n    conv1: conv3x3(3, c) -> pw: conv1x1(c, c)\n",
        4,
        33,
        "conv1x1 cannot join the kernel of conv3x3",
    ),
    (HEADER + "forward:\n    dw: dwconv3x3(3) -> dw2: dwconv3x3(3)\n", 4, 30, "reads a 3x3 neighbourhood"),
    (
        HEADER + "forward:\n    dw: dwconv3x3(3) -> pw: conv1x1(3, c, stride=2)\n",
        4,
        29,
        "conv1x1 cannot join the kernel of dwconv3x3: conv1x1 computes dwconv3x3 in its K loop only at its own"
        " pixels, and with stride 2 its input pixels are not its output pixels",
    ),
    (
        HEADER + "forward:\n    dw: dwconv3x3(3) -> pw: conv1x1(3, c) -> pw2: conv1x1(c, c)\n",
        4,
        51,
        "conv1x1 cannot join the kernel of conv1x1: each of its outputs reads every input channel",
    ),
    (
        HEADER + "forward:\n    pw: conv1x1(3, c, stride=2) -> dw: dwconv3x3(c)\n",
        4,
        40,
        "dwconv3x3 cannot join the kernel of conv1x1: dwconv3x3 computes conv1x1 at the input pixels of its taps,"
        " and with stride 2 its input pixels are not its output pixels",
    ),
    (
        HEADER + "forward:\n    pw: conv1x1(3, c) -> dw: dwconv3x3(c) -> pw2: conv1x1(c, c)\n",
        4,
        51,
        "conv1x1 cannot join the kernel of dwconv3x3: each of its outputs reads every input channel",
    ),
    (HEADER + "forward:\n    global_avgpool -> flatten -> relu\n", 4, 34, "flatten only reshapes"),
    (
        HEADER + "forward:\n    pw: conv1x1(3, c) -> global_avgpool -> relu\n",
        4,
        44,
        "global_avgpool ends the kernel of conv1x1, so only a view may follow it; start a new chain (a new line) at relu",
    ),
    (
        HEADER + "forward:\n    dw: dwconv3x3(3) -> pw: conv1x1(3, c) -> p: avgpool(2)\n",
        4,
        49,
        "avgpool cannot join the kernel of conv1x1: a pool ends the kernel of one anchor, and this kernel"
        " computes dwconv3x3 inside conv1x1",
    ),
    (
        HEADER + "forward:\n    p: avgpool(2) -> global_avgpool\n",
        4,
        22,
        "global_avgpool cannot join the kernel of avgpool",
    ),
    (
        HEADER + "forward:\n    fc: linear(3, 8) -> global_avgpool\n",
        4,
        25,
        "global_avgpool cannot join the kernel of linear",
    ),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) -> bn(c)\n", 4, 29, "bn holds parameters, so it needs a name"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c)\n    conv1: conv1x1(c, c)\n", 5, 5, "'conv1' names a second module"),
    (HEADER + "forward:\n    training: conv3x3(3, c)\n", 4, 5, "is an attribute of nn.Module"),
    (HEADER + "forward:\n    fc: linear(3, 10)\n", 4, 9, "linear takes a 2-d (NC) tensor"),
    (HEADER + "forward:\n    p: avgpool(32)\n", 4, 8, "avgpool(32) needs an input of at least 32x32"),
    (
        HEADER + "block b(i, o):\n    conv1x1(i, o) -> bn(o)\nforward:\n    b1: b(3)\n",
        6,
        9,
        "block 'b' takes 2 argument(s) (i, o), 1 given",
    ),
    (
        HEADER + "block b(i, o):\n    conv1x1(i, o) -> bn(i)\nforward:\n    b1: b(3, 8)\n",
        4,
        22,
        "bn expects 3 input channels, but the tensor flowing in has 8 (in b called at line 6)",
    ),
    (
        HEADER + "block b(i, o):\n    conv1x1(i, o)\nforward:\n    b1: b(3, 8) -> relu\n",
        6,
        9,
        "block 'b' expands to chains of its own",
    ),
    (
        HEADER + "block b(i, o):\n    c1: conv1x1(i, o)\nforward:\n    b1: b(3, 8)\n",
        4,
        5,
        "numbered like nn.Sequential",
    ),
    (HEADER + "block b(i):\n    conv1x1(i, i)\nforward:\n    b(3)\n", 6, 5, "a block at the top level needs a name"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) * 2\n", 4, 5, "`* N` repeats lines of a sequence or block"),
    ("input(2, 3, 16, 16)\nmodel M()\nforward:\n    relu\n", 1, 1, "starts with its `model Name(...)` header"),
    (HEADER + "input(1, 3, 8, 8)\nforward:\n    relu\n", 3, 1, "a second `input(...)` declaration"),
    ("model M()\nforward:\n    relu\n", 3, 9, "no `input(...)` declaration"),
    (
        "model M(x=1)\ninput(1, 3, 8, 8)\nforward:\n    relu\n",
        1,
        9,
        "'x' clashes with a name the generated Python uses",
    ),
    (HEADER + "forward:\n    seq:\n        relu * (0 - 1)\n", 5, 17, "a line repeats a whole number of times, got -1"),
    ("model M()\ninput(2, 3, 16)\nforward:\n    relu\n", 2, 1, "the example input is N, C, H, W"),
    (HEADER + "let f(v) = v / 0\nforward:\n    conv1: conv3x3(3, f(2))\n", 3, 12, "division by zero"),
    (
        INDEXED.format(n=2) + "        b(1 + 2 * i) for i in range(n)\n",
        7,
        9,
        "i = 1 makes the ops [['conv3x3_bias']], but i = 0 makes [['conv1x1_bias']]; a loop's iterations run one body",
    ),
    (
        INDEXED.format(n=0) + "        b(3) for i in range(n)\n",
        7,
        29,
        "runs at least once at the default arguments, got 0",
    ),
    (INDEXED.format(n=2) + "        b(3) for x in range(2)\n", 7, 9, "the repeat's index 'x' clashes"),
    (
        HEADER + "module m():\n    relu for i in range(2)\nforward:\n    m1: m()\n",
        4,
        5,
        "a repeat with an index belongs",
    ),
    (
        HEADER + "forward:\n    s: channel_shuffle(3) -> dw: dwconv3x3(3)\n",
        4,
        8,
        "channel_shuffle before dwconv3x3 would move the channels that dwconv3x3 loads, which only a 1x1 conv's",
    ),
    (
        HEADER + "forward:\n    dw: dwconv3x3(3) -> s: channel_shuffle(3) -> pw: conv1x1(3, 6)\n",
        4,
        28,
        "which a kernel of two anchors (dwconv3x3, conv1x1) does elsewhere",
    ),
    (HEADER + "forward:\n    s: channel_shuffle(2)\n", 4, 8, "channel_shuffle: 2 groups do not divide the 3 channels"),
    (
        HEADER
        + "module m(i, o):\n    if i != o:\n        x = conv1: conv1x1(i, o)\n    return x\nforward:\n    m1: m(3, c)\n",
        4,
        8,
        "an `if` on constructor arguments inside a module tests a `let` name",
    ),
    (
        DENSE.format(n=2) + "    sparse seq:\n        b(3 + 2 * i) for i in range(n)\n",
        8,
        5,
        "unknown kind of sequence 'sparse'",
    ),
    (
        DENSE.format(n=2) + "    dense seq:\n        b(3) * n\n",
        8,
        5,
        "a dense sequence holds one block call repeated with an index",
    ),
    (
        DENSE.format(n=2) + "    dense seq:\n        s(3 + 2 * i) for i in range(n)\n",
        9,
        9,
        "the block must keep the batch and the pixels: [2, 3, 8, 8] becomes [2, 2, 4, 4]",
    ),
    (
        DENSE.format(n=0) + "    dense seq:\n        b(3 + 2 * i) for i in range(n)\n",
        9,
        37,
        "a dense sequence runs its block at least once at the default arguments, got 0",
    ),
    (DENSE.format(n=2) + "    seqs[1]: b(3)\n", 8, 5, "seqs[1] comes next after 0 item(s) of seqs; write seqs[0]"),
    # an index past Python's 4,300-digit int() limit is compared as text
    (DENSE.format(n=2) + f"    seqs[{'9' * 5000}]: b(3)\n", 8, 5, f"seqs[{'9' * 20}...] comes next after 0 item(s)"),
    (
        DENSE.format(n=2) + "    convs[0]: conv(3, 3, 1)\n",
        8,
        5,
        "an item of a module list is a block's module, not an op",
    ),
    (DENSE.format(n=2) + "    training[0]: b(3)\n", 8, 5, "'training' is an attribute of nn.Module"),
]


# Hostile specs (issue #27): each is one SpecError at a position, whose message states the limit it meets.
HOSTILE = [
    # limits, each stated in its error
    (
        HEADER + "forward:\n    conv1: conv3x3(3, " + "+".join(["1"] * 100) + ")\n",
        "nested too deeply: fusegen reads at most 64 levels",
    ),
    (HEADER + "forward:\n    conv1: conv3x3(3, " + "int(" * 70 + "8" + ")" * 70 + ")\n", "at most 64 levels"),
    (HEADER + "forward:\n    conv1: conv3x3(3, " + "9" * 5000 + ")\n", "integers are at most 2**63 - 1"),
    (HEADER + "forward:\n    conv1: conv3x3(3, 4611686018427387904 * 2)\n", "integers are at most 2**63 - 1"),
    (HEADER + "forward:\n    conv1: conv3x3(3, int(1e300))\n", "integers are at most 2**63 - 1"),
    (
        HEADER + "forward:\n    conv1: conv" + "9" * 4301 + "x3(3, c)\n",
        "a name of 4307 characters; fusegen's limit is 100",
    ),
    ("model M(s=1e999)\ninput(2, 3, 16, 16)\nforward:\n    relu\n", "a number past float's range"),
    (
        HEADER + "forward:\n    seq:\n        relu * 100000000\n",
        "a line repeats at most 1000 times (fusegen's limit), got 100000000",
    ),
    (HEADER + "block b():\n    relu * 100000000\nforward:\n    b1: b()\n", "a line repeats at most 1000 times"),
    (HEADER + "forward:\n    " + " -> ".join(["relu"] * 100) + "\n", "a chain has at most 64 ops"),
    (HEADER + "block b():\n    relu * 1000\nforward:\n    seq:\n        b() * 10\n", "more than 2000 ops"),
    (HEADER + "forward:\n    conv1: conv3x3(3, 10000000)\n", "past fusegen's limit of 2**31 - 1 elements"),
    (
        HEADER + "forward:\n    flatten -> fc: linear(768, 10000000)\n",
        "768 * 10000000 is past fusegen's limit of 2**31 - 1",
    ),
    (
        "model M()\ninput(2, 3, 100000000000, 8)\nforward:\n    relu\n",
        "the example input has more than 2**31 - 1 elements",
    ),
    (
        HEADER + "let f(v) = f(v)\nforward:\n    conv1: conv3x3(3, f(c))\n",
        "let functions cannot call themselves: f -> f",
    ),
    (
        HEADER + "let f(v) = g(v)\nlet g(v) = f(v)\nforward:\n    conv1: conv3x3(3, f(c))\n",
        "cannot call themselves: f -> g -> f",
    ),
    (
        HEADER
        + "let f0(v) = v\n"
        + "".join(f"let f{i}(v) = f{i-1}(v) + f{i-1}(v)\n" for i in range(1, 30))
        + "forward:\n    conv1: conv3x3(3, f29(1))\n",
        "more than 100000 steps",
    ),
    # names that Python or ModelNew would read otherwise
    (
        HEADER + "let k = 2\nlet f(v) = v * k\nlet k = 3\nforward:\n    c1: conv3x3(3, f(4)) -> b: bn(8)\n",
        "'k' is already defined at line 3 (a let)",
    ),
    (HEADER + "let c = 4\nforward:\n    relu\n", "'c' is already defined at line 1 (a constructor parameter)"),
    (
        HEADER + "block c(k):\n    relu\nforward:\n    c1: c(1)\n",
        "'c' is already defined at line 1 (a constructor parameter)",
    ),
    (HEADER + "forward:\n    let alpha = 2\n    conv1: conv3x3(3, c)\n", "'alpha' is already defined at line 1"),
    (
        HEADER + "let f(class) = 1\nforward:\n    relu\n",
        "let parameter 'class' clashes with a name the generated Python uses",
    ),
    (HEADER + "block b(nn):\n    relu\nforward:\n    b1: b(1)\n", "block parameter 'nn' clashes"),
    (HEADER + "forward:\n    activation_dtype: conv3x3(3, c)\n", "'activation_dtype' is an attribute of ModelNew"),
    (HEADER + "forward:\n    use_cuda_graphs: conv3x3(3, c)\n", "'use_cuda_graphs' is an attribute of ModelNew"),
    (HEADER + "forward:\n    run_kernels: conv3x3(3, c)\n", "'run_kernels' is an attribute of ModelNew"),
    (
        HEADER
        + 'block b(k):\n    if k > 1:\n        conv3x3(3, exec("import os"))\n    relu\nforward:\n    b1: b(1)\n',
        "unknown function 'exec'",  # in a branch check never takes, but __init__ holds
    ),
    # init: rules as torch.nn.init would take them
    (
        HEADER + "forward:\n    conv1: conv3x3(3, c)\ninit:\n    Conv2d.class = zeros\n",
        "init: 'class' is not weight or bias",
    ),
    (
        HEADER + "forward:\n    conv1: conv3x3(3, c)\ninit:\n    Conv2d.weight = normal(class=1)\n",
        "init: normal has no argument 'class'",
    ),
    (
        HEADER + "forward:\n    conv1: conv3x3(3, c)\ninit:\n    Conv2d.weight = kaiming_normal(mode=nope)\n",
        "unknown name 'nope'",
    ),
    (
        HEADER + 'forward:\n    conv1: conv3x3(3, c)\ninit:\n    Conv2d.weight = kaiming_normal(mode="fan")\n',
        "init: kaiming_normal: Mode fan not supported",
    ),
    (
        HEADER + "forward:\n    conv1: conv3x3(3, c)\ninit:\n    Conv2d.weight = constant(1, 2)\n",
        "init: constant takes 1 argument(s) (val)",
    ),
]


@pytest.mark.parametrize("text, fragment", HOSTILE)
def test_hostile_spec_is_one_error_that_states_the_limit(text, fragment):
    err = error_of(text)
    assert fragment in err.message
    assert err.pos is not None and err.render("specs/bad.fuse", text).startswith(
        f"specs/bad.fuse:{err.pos.line}:{err.pos.column}: error: "
    )


@pytest.mark.parametrize("text, line, column, fragment", CASES)
def test_error_position_and_message(text, line, column, fragment):
    err = error_of(text)
    assert fragment in err.message
    if line is None:
        assert err.pos is None
    else:
        assert (err.pos.line, err.pos.column) == (line, column), err.message


def test_rendered_error_has_file_line_column_and_caret():
    text = HEADER + "forward:\n    conv1: conv3x3(4, c)\n"
    rendered = error_of(text).render("specs/bad.fuse", text).splitlines()
    assert rendered[0].startswith("specs/bad.fuse:4:12: error: conv3x3 expects 4 input channels")
    assert rendered[1] == "    " + "    conv1: conv3x3(4, c)"
    assert rendered[2] == "    " + " " * 11 + "^"


def test_the_shared_header_compiles():
    """The cases above fail because of their own lines, not because of the header they share."""
    compile_spec(HEADER + "forward:\n    conv1: conv3x3(3, int(c * alpha)) -> bn1: bn(int(c * alpha)) -> relu\n", "specs/ok.fuse")


def test_let_functions_see_their_declaration_scope_like_python():
    """`c` closes over the constructor's alpha, not a block parameter of the same name."""
    from helpers import load_spec

    text = (
        "model M(alpha=2)\ninput(1, 3, 8, 8)\nlet c(v) = int(v * alpha)\n"
        "block b(alpha):\n    conv1x1(3, c(alpha))\nforward:\n    x1: b(4)\n    y: conv1x1(8, 8)\n"
    )
    assert load_spec(text, "closure").ModelNew().x1[0].out_channels == 8
    with pytest.raises(SpecError, match="conv1x1 expects 12 input channels"):
        compile_spec(text.replace("y: conv1x1(8, 8)", "y: conv1x1(12, 8)"), "specs/closure.fuse")


@pytest.mark.parametrize("separator", ["\f", "\x85", "\u2028", "\x0b", "\x1c"])
def test_error_lines_are_counted_at_newlines_only(separator):
    """str.splitlines splits at these too; the parser and the rendered error must not."""
    text = HEADER + f"forward:\n    relu # {separator} a comment\n    conv1: conv3x3(4, c)\n"
    err = error_of(text)
    assert (err.pos.line, err.pos.column) == (5, 12)
    assert err.render("specs/bad.fuse", text).splitlines()[1:] == [
        "        conv1: conv3x3(4, c)",
        "    " + " " * 11 + "^",
    ]


def test_a_line_quoted_in_a_comment_has_its_control_characters_escaped():
    """A block argument may be any string; a carriage return in it must not end the comment that quotes
    the line (Python ends a line there)."""
    text = HEADER + 'block b(s):\n    conv3x3(8, 8)\nforward:\n    conv1: conv3x3(3, int(c * alpha * 2))\n    b1: b("\rimport os")\n'
    source = compile_spec(text, "specs/ok.fuse")
    assert "\r" not in source
    assert '# ok.fuse:7: b1: b("\\rimport os")' in source
    compile(source, "ok.py", "exec")


def test_model_attributes_are_every_name_modelnew_defines():
    """check.MODEL_ATTRIBUTES against the ModelNew classes of the generated files: the methods, class
    attributes and the self.<name> attributes __init__ sets to a constant, a dict or a torch attribute
    (the spec's modules are calls or module arguments, its conditions expressions of its names)."""
    import ast
    from pathlib import Path

    from fusegen.check import MODEL_ATTRIBUTES

    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("generated").glob("*.py")):
        (model,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
        names = {n.name for n in model.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {t.id for n in model.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        init = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        for node in ast.walk(init):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.Dict, ast.Attribute)):
                names |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
        names -= {"__init__", "forward"}  # nn.Module's, refused as such
        assert names <= MODEL_ATTRIBUTES, (path.name, names - MODEL_ATTRIBUTES)
