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
    (HEADER + "activations(bfloat16)\nforward:\n    relu\n", 3, 13, "activations(...) takes float32 or float16, got 'bfloat16'"),
    (HEADER + "activations(float16)\nactivations(float32)\nforward:\n    relu\n", 4, 1, "a second `activations(...)`"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) @ 2\n", 4, 26, "unexpected character '@'"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c)\n      bn1: bn(c)\n", 5, 7, "unexpected indentation"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c)\n  bn1: bn(c)\n", 5, 3, "indentation matches no enclosing block"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c,\n", 4, 25, "unexpected end of file"),
    (HEADER + "forward:\n    conv1: conv3x(3, c)\n", 4, 12, "unknown op or block 'conv3x'; did you mean 'conv3x3'"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c, 1, 1, 1)\n", 4, 32, "conv3x3 takes 4 argument(s)"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c, pad=1)\n", 4, 26, "has no argument 'pad'"),
    (HEADER + "forward:\n    conv1: conv3x3(3)\n", 4, 12, "needs the argument 'out_channels'"),
    (HEADER + "forward:\n    conv1: conv3x3(4, c)\n", 4, 12, "expects 4 input channels, but the tensor flowing in has 3"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) -> bn1: bn(9)\n", 4, 34, "bn expects 9 input channels"),
    (HEADER + "forward:\n    conv1: conv3x3(3, 16 * alpha)\n", 4, 23, "must be a positive integer, got 8.0 (wrap it in int(...))"),
    (HEADER + "forward:\n    conv1: conv3x3(3, k)\n", 4, 23, "unknown name 'k'"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) -> pw: conv1x1(c, c)\n", 4, 33, "conv1x1 cannot join the kernel of conv3x3"),
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
    (HEADER + "forward:\n    p: avgpool(2) -> global_avgpool\n", 4, 22, "global_avgpool cannot join the kernel of avgpool"),
    (HEADER + "forward:\n    fc: linear(3, 8) -> global_avgpool\n", 4, 25, "global_avgpool cannot join the kernel of linear"),
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
    (HEADER + "block b(i, o):\n    c1: conv1x1(i, o)\nforward:\n    b1: b(3, 8)\n", 4, 5, "numbered like nn.Sequential"),
    (HEADER + "block b(i):\n    conv1x1(i, i)\nforward:\n    b(3)\n", 6, 5, "a block at the top level needs a name"),
    (HEADER + "forward:\n    conv1: conv3x3(3, c) * 2\n", 4, 5, "`* N` repeats lines of a sequence or block"),
    ("input(2, 3, 16, 16)\nmodel M()\nforward:\n    relu\n", 1, 1, "starts with its `model Name(...)` header"),
    (HEADER + "input(1, 3, 8, 8)\nforward:\n    relu\n", 3, 1, "a second `input(...)` declaration"),
    ("model M()\nforward:\n    relu\n", None, None, "no `input(...)` declaration"),
    ("model M(x=1)\ninput(1, 3, 8, 8)\nforward:\n    relu\n", 1, 9, "'x' clashes with a name the generated Python uses"),
    (HEADER + "forward:\n    seq:\n        relu * (0 - 1)\n", 5, 17, "a line repeats a whole number of times, got -1"),
    ("model M()\ninput(2, 3, 16)\nforward:\n    relu\n", 2, 1, "the example input is N, C, H, W"),
    (HEADER + "let f(v) = v / 0\nforward:\n    conv1: conv3x3(3, f(2))\n", 3, 12, "division by zero"),
    (
        INDEXED.format(n=2) + "        b(1 + 2 * i) for i in range(n)\n",
        7,
        9,
        "i = 1 makes the ops [['conv3x3_bias']], but i = 0 makes [['conv1x1_bias']]; a loop's iterations run one body",
    ),
    (INDEXED.format(n=0) + "        b(3) for i in range(n)\n", 7, 29, "runs at least once at the default arguments, got 0"),
    (INDEXED.format(n=2) + "        b(3) for x in range(2)\n", 7, 9, "the repeat's index 'x' clashes"),
    (HEADER + "module m():\n    relu for i in range(2)\nforward:\n    m1: m()\n", 4, 5, "a repeat with an index belongs"),
    (DENSE.format(n=2) + "    sparse seq:\n        b(3 + 2 * i) for i in range(n)\n", 8, 5, "unknown kind of sequence 'sparse'"),
    (DENSE.format(n=2) + "    dense seq:\n        b(3) * n\n", 8, 5, "a dense sequence holds one block call repeated with an index"),
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
    (DENSE.format(n=2) + "    convs[0]: conv(3, 3, 1)\n", 8, 5, "an item of a module list is a block's module, not an op"),
    (DENSE.format(n=2) + "    training[0]: b(3)\n", 8, 5, "'training' is an attribute of nn.Module"),
]


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
    compile_spec(HEADER + "forward:\n    conv1: conv3x3(3, c) -> bn1: bn(c) -> relu\n", "specs/ok.fuse")


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
