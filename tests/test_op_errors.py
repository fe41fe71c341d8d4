"""Refusals of the nn-style ops (conv, maxpool, dropout, softmax, conv_transpose): each names the right line and column and says why."""

import pytest

from fusegen import SpecError, compile_spec

HEADER = "model M(c=8)\ninput(2, 4, 16, 16)\n"


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_spec(text, "specs/bad.fuse")
    return info.value


CASES = [
    # (spec, line, column, fragment of the message)
    (
        HEADER + "forward:\n    g: conv(4, c, 3, groups=2)\n",
        4,
        8,
        "conv with groups=2 and kernel_size 3 (4 -> 8 channels) is a grouped KxK convolution, which fusegen cannot"
        " lower yet; it takes groups=1, groups = in_channels = out_channels (depthwise), or a grouped 1x1 conv"
        " without padding",
    ),
    (
        HEADER + "block b(i, o, g):\n    conv(i, o, 3, groups=g)\nforward:\n    b1: b(4, 4, 4)\n    b2: b(4, 8, 2)\n",
        4,
        5,
        "is a grouped KxK convolution, which fusegen cannot lower yet; it takes groups=1, groups = in_channels ="
        " out_channels (depthwise), or a grouped 1x1 conv without padding (in b called at line 7)",
    ),
    (
        HEADER + "forward:\n    g: conv(4, 6, 1, groups=4)\n",
        4,
        8,
        "conv: groups=4 must divide in_channels (4) and out_channels (6)",
    ),
    (HEADER + "forward:\n    g: conv(4, c, 3, bias=1)\n", 4, 8, "conv: bias must be True or False, got 1"),
    (HEADER + "forward:\n    g: conv(4, c, 3, groups=0)\n", 4, 29, "conv: groups must be a positive integer, got 0"),
    (
        HEADER + "forward:\n    g: conv(4, c, 17, padding=0)\n",
        4,
        8,
        "conv: input of size 16 is smaller than the 17x17 window",
    ),
    (
        HEADER + "forward:\n    relu -> dropout(0.5)\n",
        4,
        13,
        "dropout with p = 0.5 zeroes random elements in training mode, which no kernel can reproduce exactly;"
        " fusegen takes p = 0 (KernelBench's dropouts are p = 0.0), where dropout is the identity in training"
        " and eval mode alike, as it is in eval mode for any p",
    ),
    (HEADER + "forward:\n    dropout\n", 4, 5, "dropout with p = 0.5 zeroes random elements in training mode"),
    (HEADER + "forward:\n    dropout(1.5)\n", 4, 5, "dropout: p is a probability between 0 and 1, got 1.5"),
    (
        HEADER + "forward:\n    maxpool(17)\n",
        4,
        5,
        "maxpool: input of size 16 is smaller than the 17x17 window with padding 0",
    ),
    (
        HEADER + "forward:\n    maxpool(4, 2, 3)\n",
        4,
        5,
        "maxpool: padding 3 is more than half the 4x4 window (torch allows at most 2)",
    ),
    (HEADER + "forward:\n    maxpool(3, stride=0)\n", 4, 5, "maxpool: stride must be a positive integer, got 0"),
    (HEADER + "forward:\n    maxpool(0)\n", 4, 13, "maxpool: kernel_size must be a positive integer, got 0"),
    (
        HEADER + "forward:\n    maxpool(2) -> c1: conv(4, c, 3)\n",
        4,
        23,
        "conv3x3_bias cannot join the kernel of maxpool2x2: it reads a 3x3 neighbourhood of its input",
    ),
    (
        HEADER + "forward:\n    c1: conv(4, c, 3) -> relu -> maxpool(2)\n",
        4,
        34,
        "maxpool2x2 cannot join the kernel of conv3x3_bias: it reads a window of its input",
    ),
    (
        HEADER + "forward:\n    flatten\n    maxpool(2)\n",
        5,
        5,
        "maxpool takes a 4-d (NCHW) tensor, but gets shape [2, 1024]",
    ),
    (
        HEADER + "forward:\n    softmax(0)\n",
        4,
        5,
        "softmax along dim=0 is not supported: fusegen's softmax runs along the channels (dim=1 or -3), the height"
        " (dim=2 or -2) or the width (dim=3 or -1) of a 4-d tensor",
    ),
    (HEADER + "forward:\n    softmax(dim=4)\n", 4, 5, "softmax along dim=4 is not supported"),
    (HEADER + "forward:\n    softmax(1.5)\n", 4, 5, "softmax: dim must be an integer, got 1.5"),
    (
        HEADER + "forward:\n    flatten\n    softmax(-2)\n",
        5,
        5,
        "softmax(dim=-2) takes a 4-d (NCHW) tensor (along its channels, height or width) or a 2-d (NC) one along"
        " its features (dim=1 or -1), but gets shape [2, 1024]",
    ),
    (
        HEADER + "forward:\n    c1: conv(4, c, 3) -> bn1: bn(c) -> softmax(-1)\n",
        4,
        40,
        "softmax_width cannot join the kernel of conv3x3_bias: each of its outputs reads the whole width of its"
        " input at its place, and those values are computed by other programs of this kernel",
    ),
    (
        HEADER + "forward:\n    softmax(1) -> c1: conv(4, c, 3)\n",
        4,
        23,
        "conv3x3_bias cannot join the kernel of softmax_channels: it reads a 3x3 neighbourhood",
    ),
    (
        HEADER + "forward:\n    softmax(1) -> relu -> p: avgpool(2)\n",
        4,
        30,
        "avgpool cannot join the kernel of softmax_channels: softmax_channels places its tile's rows in the output"
        " grid to read the whole channels at each, not as a pooling window's pixels",
    ),
    (
        HEADER + "forward:\n    u: conv_transpose(4, 4, 2, 2) -> global_avgpool\n",
        4,
        38,
        "global_avgpool cannot join the kernel of conv_transpose2x2_bias: conv_transpose2x2_bias orders its tile's"
        " rows by output class (parity-major), not as a pooling window's pixels",
    ),
    (
        HEADER + "forward:\n    u: conv_transpose(4, c, 2, 2, output_padding=1)\n",
        4,
        8,
        "conv_transpose with output_padding=1 is not supported: fusegen lowers ConvTranspose2d with"
        " output_padding=0, groups=1 and dilation=1",
    ),
    (HEADER + "forward:\n    u: conv_transpose(4, c, 2, 2, groups=2)\n", 4, 8, "with groups=2 is not supported"),
    (HEADER + "forward:\n    u: conv_transpose(4, c, 2, dilation=2)\n", 4, 8, "with dilation=2 is not supported"),
    (HEADER + "forward:\n    u: conv_transpose(4, c, 2, bias=1)\n", 4, 8, "conv_transpose: bias must be True or False"),
    (
        HEADER + "forward:\n    u: conv_transpose(4, c, 2, padding=-1)\n",
        4,
        40,
        "conv_transpose: padding must be a positive integer, got -1",
    ),
    (
        HEADER + "forward:\n    u: conv_transpose(4, c, 2, 1, 9)\n",
        4,
        8,
        "conv_transpose: an input of size 16 gives no output pixels with kernel_size 2, stride 1 and padding 9",
    ),
    (
        HEADER + "forward:\n    u: conv_transpose(4, c, 2, 2) -> c1: conv(c, c, 3)\n",
        4,
        42,
        "conv3x3_bias cannot join the kernel of conv_transpose2x2_bias",
    ),
    (
        HEADER + "forward:\n    c1: conv(4, c, 3) -> u: conv_transpose(c, c, 2, 2)\n",
        4,
        29,
        "conv_transpose2x2_bias cannot join the kernel of conv3x3_bias",
    ),
]


@pytest.mark.parametrize("text, line, column, fragment", CASES)
def test_error_position_and_message(text, line, column, fragment):
    err = error_of(text)
    assert fragment in err.message
    assert (err.pos.line, err.pos.column) == (line, column), err.message


def test_the_shared_header_compiles():
    """The cases above fail because of their own lines, not because of the header they share."""
    compile_spec(
        HEADER + "forward:\n    c1: conv(4, c, 3, bias=False) -> relu -> dropout(0.0)\n    maxpool(2)\n",
        "specs/ok.fuse",
    )
