"""`fusegen import`: KernelBench's files and users' own modules become specs whose ModelNew matches the module
(seeded state_dict, outputs in eval and training mode), and what fusegen cannot express is one error with the
model file's line."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

from fusegen.importer import ImportFailure, Source, load, model_new_args, to_spec, verify
from helpers import (
    DEVICE,
    ON_GPU,
    TOLERANCE,
    assert_state_near_float64,
    load_spec,
    randomize_batchnorm,
    rel_error,
    training_bar,
)
from test_cli import fusegen

KERNELBENCH = Path(__file__).resolve().parents[2] / "shared" / "kernelbench" / "level3"
if not KERNELBENCH.exists():
    KERNELBENCH = Path("/work/shared/kernelbench/level3")
SEED = 42
needs_kernelbench = pytest.mark.skipif(not KERNELBENCH.is_dir(), reason="KernelBench's level-3 files are not here")


def imported(path: Path, args, shape, class_name="Model"):
    """(spec text, the source) for a model file at these constructor arguments and input shape."""
    source = load(path.resolve(), class_name, args, shape)
    text = to_spec(source)
    verify(source, text)
    return text, source


def assert_matches(path: Path, args, shape, class_name="Model"):
    """The spec's ModelNew against the module: the seeded state_dict, names, order and values; the output in
    eval mode (random BatchNorm statistics) and in training mode (and the running statistics after it), against
    the module in float64 with test_models' bars: TOLERANCE, in training mode or 3x fp32 torch's own error
    (normalising by a small batch's spread amplifies rounding). Without args and shape, the file's own
    get_init_inputs() and get_inputs()."""
    text, source = imported(path, args, shape, class_name)
    generated = load_spec(text, f"imported_{path.stem}")
    torch.manual_seed(SEED)  # the same input whichever tests ran before in this worker
    x = torch.rand(*source.input_shape, device=DEVICE)
    for training in (False, True):
        torch.manual_seed(SEED)
        ref = source.build()
        torch.manual_seed(SEED)
        new = generated.ModelNew(**model_new_args(generated.ModelNew, source))
        assert list(ref.state_dict()) == list(new.state_dict())
        for a, b in zip(ref.state_dict().values(), new.state_dict().values()):
            assert torch.equal(a, b)
        if not training:
            randomize_batchnorm(ref, seed=3)
            new.load_state_dict(ref.state_dict())
        exact = copy.deepcopy(ref).double()
        ref, new, exact = (m.to(DEVICE).train(training) for m in (ref, new, exact))
        with torch.no_grad():
            out, eager, want = new(x), ref(x), exact(x.double())
        bar = training_bar(eager, want) if training else TOLERANCE
        assert rel_error(out, want) < bar, (training, rel_error(out, want), rel_error(eager, want))
        # the running statistics as test_models checks them (EfficientNetB2 at KernelBench's batch of 2
        # normalises 2 values a channel in its last blocks)
        assert_state_near_float64(new.state_dict(), exact.state_dict(), ref.state_dict())
    return text


@needs_kernelbench
@pytest.mark.parametrize(
    "stem, args, shape",
    [
        ("4_LeNet5", [7], (2, 1, 32, 32)),
        ("8_ResNetBasicBlock", [4, 6, 2], (2, 4, 9, 11)),
        # with the residual; without the expand conv, at stride 2
        ("21_EfficientNetMBConv", [4, 4, 3, 1, 2], (2, 4, 7, 6)),
        ("21_EfficientNetMBConv", [5, 6, 5, 2, 1], (2, 5, 9, 7)),
        # torch.cat of branches: two expands, four branches (two Sequentials of one structure, a pool first)
        ("17_SqueezeNetFireModule", [3, 4, 5, 6], (2, 3, 7, 6)),
        ("6_GoogleNetInceptionModule", [5, 3, 4, 6, 2, 3, 4], (2, 5, 7, 6)),
        # transposed convs whose outputs a cat joins with the encoders', softmax along the width
        ("45_UNetSoftmax", [3, 2, 2], (2, 3, 16, 16)),
        # a block's last maxpool, then `global_avgpool -> flatten` on the forward's next line: one kernel
        ("27_RegNet", [3, 3, [4, 6, 5], 7], (2, 3, 17, 16)),
        # four stages of bottlenecks, their blocks after the first as loops
        ("10_ResNet101", [[1, 2, 1, 1], 7], (2, 3, 32, 32)),
        # 64 pixels square, or a batch of 4 to 8 at 32: smaller, the last stages' training-mode BatchNorm
        # normalises 2 to 4 values a channel, so ill-conditioned that fp32 torch's own running statistics miss
        # the float32 bars (rtol 1e-4) against float64 (EfficientNetB2 at batch 4: up to 10x the bar, fusegen 8x)
        ("22_EfficientNetB0", [7], (2, 3, 64, 64)),
        ("23_EfficientNetB1", [7], (4, 3, 32, 32)),
        ("24_EfficientNetB2", [7], (8, 3, 32, 32)),
        # growth rate 4: 98 dense layers at a few channels each
        ("16_DenseNet201", [4, 7], (4, 3, 32, 32)),
        ("15_DenseNet121", [2, 3], (4, 3, 32, 32)),
        ("9_ResNet18", [7], (4, 3, 32, 32)),
        ("20_MobileNetV2", [7], (4, 3, 32, 32)),
        # no BatchNorm: a batch of 2
        ("7_GoogleNetInceptionV1", [7], (2, 3, 64, 64)),
        # alpha is fixed at 1.0 by the trace; 193 pixels are the fewest whose last map holds its 7 x 7 pool
        ("19_MobileNetV1", [7, 1, 1.0], (1, 1, 193, 193)),
    ],
)
def test_kernelbench_files_import_and_match(stem, args, shape):
    assert_matches(KERNELBENCH / f"{stem}.py", args, shape)


@needs_kernelbench
@pytest.mark.skipif(not ON_GPU, reason="KernelBench's own arguments and inputs: on the GPU only")
@pytest.mark.parametrize("stem", sorted(path.stem for path in KERNELBENCH.glob("*.py")))
def test_kernelbench_files_import_and_match_at_their_own_inputs(stem):
    assert_matches(KERNELBENCH / f"{stem}.py", None, None)


@needs_kernelbench
@pytest.mark.parametrize(
    "stem, args, shape",
    [
        ("13_DenseNet121TransitionLayer", [6, 4], (2, 6, 4, 6)),
        ("14_DenseNet121DenseBlock", [3, 4, 2], (2, 4, 5, 4)),
    ],
)
def test_kernelbench_densenet_parts_import_and_match(stem, args, shape):
    assert_matches(KERNELBENCH / f"{stem}.py", args, shape)


# AlexNet's and the VGGs' first Linear is sized for 224-pixel inputs, minutes a forward under the interpreter:
# imported at that input, then built with that Linear sized for a small input's features (one number of the spec,
# the module's Linear replaced alike), so every other kernel of the imported net runs here. Without BatchNorm,
# training mode runs eval mode's kernels: eval mode only (about 100 s a net on the development CPU).
# stem -> (the Linear's input features at 224 pixels, at the small input, its module path, the small input)
RESIZED_CLASSIFIER = {
    "5_AlexNet": (9216, 256, "fc1", (2, 3, 63, 63)),
    "11_VGG16": (25088, 512, "classifier.0", (1, 3, 32, 32)),
    "12_VGG19": (25088, 512, "classifier.0", (1, 3, 32, 32)),
}


@needs_kernelbench
@pytest.mark.parametrize("stem", sorted(RESIZED_CLASSIFIER))
def test_kernelbench_fixed_classifier_nets_import_and_match_at_a_small_input(stem):
    features, small_features, path, shape = RESIZED_CLASSIFIER[stem]
    text, source = imported(KERNELBENCH / f"{stem}.py", [7], (1, 3, 224, 224))
    linear = f"linear({features}, "
    assert text.count(linear) == 1 and "bn(" not in text
    small = text.replace(linear, f"linear({small_features}, ").replace("input(1, 3, 224, 224)", f"input{shape}")
    generated = load_spec(small, f"imported_{stem}_small")
    assert not hasattr(generated.ModelNew, "run_training_kernels")
    torch.manual_seed(SEED)
    ref = source.build()
    parent, _, name = path.rpartition(".")
    setattr(ref.get_submodule(parent), name, nn.Linear(small_features, ref.get_submodule(path).out_features))
    new = generated.ModelNew(**model_new_args(generated.ModelNew, source))
    new.load_state_dict(ref.state_dict(), strict=True)
    exact = copy.deepcopy(ref).double().to(DEVICE).eval()
    new = new.to(DEVICE).eval()
    torch.manual_seed(SEED)
    x = torch.rand(*shape, device=DEVICE)
    with torch.no_grad():
        out, want = new(x), exact(x.double())
    assert rel_error(out, want) < TOLERANCE


@needs_kernelbench
def test_kernelbench_dense_block_is_a_dense_loop_that_follows_its_arguments():
    """The ModuleList that forward runs in a loop, torch.cat growing the features, is `dense layers:` over one
    block whose channels grow by growth_rate per layer; every argument is a name, so ModelNew(...) at other
    arguments is the model there (the import checks the state_dict at a second value of each)."""
    text, source = imported(KERNELBENCH / "14_DenseNet121DenseBlock.py", [3, 4, 2], (2, 4, 5, 4))
    assert "model DenseNet121DenseBlock(num_layers=3, num_input_features=4, growth_rate=2)\n" in text
    assert "input(2, num_input_features, 5, 4)\n" in text
    assert "    dense layers:\n" in text
    assert "        dense_layer(num_input_features + i * growth_rate, growth_rate) for i in range(num_layers)\n" in text
    generated = load_spec(text, "imported_dense_block")
    for args in ([1, 3, 5], [4, 2, 3]):
        other = source.at(dict(zip(("num_layers", "num_input_features", "growth_rate"), args)), None)
        torch.manual_seed(SEED)
        want = other.build()
        torch.manual_seed(SEED)
        got = generated.ModelNew(*args)
        assert [(k, v.shape) for k, v in want.state_dict().items()] == [
            (k, v.shape) for k, v in got.state_dict().items()
        ]
        assert all(torch.equal(a, b) for a, b in zip(want.state_dict().values(), got.state_dict().values()))


@needs_kernelbench
def test_kernelbench_densenet121_writes_module_lists_and_dense_loops():
    """DenseNet121 at growth_rate 2 (its outputs are checked above, at a batch of 4): its dense blocks and
    transition layers are ModuleList items (`dense_blocks[0]: dense_block(64, 6)`), made in turn as the model
    makes them, so the seeded state_dict is the model's; growth_rate stays fixed (the transitions halve sums of
    it), num_classes follows."""
    text, _ = imported(KERNELBENCH / "15_DenseNet121.py", [2, 3], (2, 3, 32, 32))
    assert "module dense_block(channels, num_layers):\n    dense layers:\n" in text
    assert "        dense_layer(channels + i * 2) for i in range(num_layers)\n" in text
    assert "    dense_blocks[0]: dense_block(64, 6)\n    transition_layers[0]: transition_layer(76, 38)\n" in text
    assert "    dense_blocks[3]: dense_block(39, 16)\n" in text
    assert "model DenseNet121(growth_rate=2, num_classes=3)" in text and "# Fixed at growth_rate=2:" in text


@needs_kernelbench
def test_kernelbench_mobilenet_v1_shares_one_block_for_its_depthwise_separable_pairs():
    """At KernelBench's own arguments: the thirteen conv_dw blocks are one block whose channels and stride are its
    parameters, the five identical ones one line; the spec builds and its seeded state_dict is the model's."""
    text, _ = imported(KERNELBENCH / "19_MobileNetV1.py", None, None)
    assert "block model_block_2(channels, stride, out_channels):" in text
    assert "        model_block_2(512, 1, 512) * 5\n" in text
    # the classes and the input's channels follow their arguments; alpha's channel counts are fixed (int(c * alpha))
    assert "input(10, input_channels, 224, 224)" in text
    assert "model MobileNetV1(num_classes=1000, input_channels=3, alpha=1.0)" in text
    assert "conv3x3(input_channels, 32, 2)" in text and "fc: linear(1024, num_classes)" in text
    assert "# Fixed at alpha=1.0:" in text


@needs_kernelbench
def test_kernelbench_shufflenet_unit_grouped_convs_and_its_channel_shuffle_module():
    """ChannelShuffle, a module of KernelBench's own doing view/transpose/view, is the op under its name."""
    text = assert_matches(KERNELBENCH / "25_ShuffleNetUnit.py", [6, 12, 3], (2, 6, 7, 6))
    assert "conv1: conv(6, 3, 1, 1, 0, groups=3, bias=False)" in text
    assert "-> shuffle: channel_shuffle(3)\n" in text


@needs_kernelbench
def test_kernelbench_shufflenet_units_whose_shortcut_is_an_empty_sequential_add_their_input():
    text = assert_matches(KERNELBENCH / "26_ShuffleNet.py", [7, 3, [2, 1, 1], [6, 12, 24, 48]], (2, 3, 8, 8))
    assert "-> relu -> add(identity)\n" in text
    # stage2 inline: its second unit keeps its width, so its shortcut is empty and the unit another module
    assert "    stage2:\n        shuffle_net_unit(6, 3, 12)\n        shuffle_net_unit_2()\n" in text


@needs_kernelbench
def test_kernelbench_squeezenet_pools_in_ceil_mode():
    """At 29 x 29 the first two pools round up (12 -> 6, 6 -> 3), the last one reads one window."""
    text = assert_matches(KERNELBENCH / "18_SqueezeNet.py", [7], (1, 3, 29, 29))
    assert text.count("maxpool(3, 2, ceil_mode=True)") == 3
    assert "    cat(out_2, out_3)\n" in text


@needs_kernelbench
def test_kernelbench_inception_v1_shares_one_module_for_its_inceptions():
    """At KernelBench's own arguments (its outputs are checked above, at a small input): the nine inception modules are
    one `module`, their branches joined by cat; the spec builds and its seeded state_dict is the model's."""
    text, _ = imported(KERNELBENCH / "7_GoogleNetInceptionV1.py", None, None)
    assert text.count("inception_module(") == 10
    assert "    cat(out, out_2, out_3, out_4)\n" in text
    assert "identity = x" not in text  # every branch reads `x`: the lines before name their outputs


@needs_kernelbench
def test_kernelbench_resnets_pass_each_blocks_downsample_in():
    """ResNet18 at KernelBench's arguments: its BasicBlocks' downsamples are made before the blocks, so the
    block takes it as an argument; layers 2 to 4 are one block; the seeded state_dict is the model's."""
    text, _ = imported(KERNELBENCH / "9_ResNet18.py", None, None)
    assert "module basic_block_2(in_channels, out_channels, downsample):" in text
    assert "    basic_block_2(in_channels, out_channels, downsample_block(in_channels, out_channels))\n" in text
    assert "    layer4: layer(256, 512)\n" in text


@needs_kernelbench
def test_kernelbench_mobilenet_v2_re_initialisation_becomes_init_rules():
    """MobileNetV2 re-initialises every module after building them (kaiming_normal_ fan_out, ones and zeros,
    normal(0, 0.01)): the loop over self.modules() becomes the spec's `init:` rules, so the seeded state_dict is
    the model's (its outputs are checked above, at a small input)."""
    text, _ = imported(KERNELBENCH / "20_MobileNetV2.py", [5], (1, 3, 33, 33))
    rules = [
        'Conv2d.weight = kaiming_normal(mode="fan_out")',
        "Conv2d.bias = zeros",
        "BatchNorm2d.weight = ones",
        "BatchNorm2d.bias = zeros",
        "Linear.weight = normal(0, 0.01)",
        "Linear.bias = zeros",
    ]
    assert text.endswith("init:\n" + "".join(f"    {rule}\n" for rule in rules))
    assert "linear(1280, num_classes)" in text


USER_MODELS = '''\
import torch
import torch.nn as nn
import torch.nn.functional as F


class Stage(nn.Module):
    """A custom module with an nn.Sequential inside, a functional activation and a residual x + y."""

    def __init__(self, channels, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.norm = nn.BatchNorm2d(channels)
        self.stride = stride

    def forward(self, x):
        y = self.norm(self.body(x))
        if self.stride == 1:
            y = y + x
        return F.relu(y)


class Widen(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class TinyNet(nn.Module):
    def __init__(self, classes=5, width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stages = nn.Sequential(
            Stage(width, 1), Stage(width, 1), Widen(width, 2 * width), Stage(2 * width, 2), Stage(2 * width, 1)
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.stem(x)), 2, 1)
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.head(torch.flatten(x, 1))


class MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6, eps=1e-3, momentum=0.2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.pool(F.hardswish(self.bn(self.conv(x))))
        x = x.mean([2, 3])
        return torch.sigmoid(self.fc(x))


class Block(nn.Module):
    """A ResNet basic block whose downsample is made before it and passed in, as torchvision's are."""

    def __init__(self, cin, cout, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, widths=(4, 6), classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        cin = widths[0]
        for width in widths:
            stride = 1 if width == cin else 2
            down = None
            if stride != 1:
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layers += [Block(cin, width, stride, down), Block(width, width)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LateConv(nn.Module):
    """Makes its Linear before the conv that forward calls first."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x):
        return self.rnn(self.conv(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return x


class Joined(nn.Module):
    """torch.cat in both spellings, the input one of its parts; channel shuffles written out in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 1, groups=3, bias=False)

    def forward(self, x):
        y = torch.cat([self.a(x), F.relu(self.b(x))], 1)
        y = self.bn(torch.cat((x, y), dim=1))
        n, c, h, w = y.size()
        y = y.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        z = self.c(y).relu()
        return z.reshape(n, 2, 3, h, w).permute(0, 2, 1, 3, 4).reshape(n, 6, h, w)


class CatBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([y, y.relu()], 0)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1)

    def forward(self, x):
        return self.up(x)


class Growing(nn.Module):
    """A dense loop written torchvision's way, each output joined onto the running value, over modules of a class of
    their own."""

    def __init__(self, layers=2, channels=3, growth=2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1, bias=False)
        self.blocks = nn.ModuleList([Widen(channels + i * growth, growth) for i in range(layers)])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.cat([x, block(x)], 1)
        return x


class ConvList(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1) for _ in range(2)])

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return x


class Reinitialised(nn.Module):
    """Re-initialises its modules after building them, one class per branch, a tuple of classes in one."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=0.1, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 0.5)
                torch.nn.init.uniform_(m.bias, -0.1, 0.1)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ReinitialisedByHand(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.fill_(0.1)

    def forward(self, x):
        return F.relu(self.conv(x))


class Reordered(nn.Module):
    """Makes its modules in another order past a width: the spec's ModelNew at the second width would not draw
    the model's weights, so the import keeps the width fixed."""

    def __init__(self, width=4):
        super().__init__()
        if width > 4:
            self.fc = nn.Linear(width, 2)
        self.conv = nn.Conv2d(3, width, 1)
        if width <= 4:
            self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x):
        return self.conv(x)
'''


@pytest.fixture(scope="module")
def user_models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(USER_MODELS)
    return path


def line_of(text: str) -> int:
    return next(i for i, line in enumerate(USER_MODELS.splitlines(), 1) if text in line)


def test_a_users_modules_import_and_match(user_models):
    """Custom module classes (one `module` for the Stages of both widths, with and without the residual), an
    nn.Sequential inside them, F.relu, F.max_pool2d, torch.flatten, adaptive pooling, x + y and a Conv2d with bias."""
    text = assert_matches(user_models, {"classes": 5, "width": 4}, (2, 3, 9, 8), "TinyNet")
    assert "model TinyNet(classes=5, width=4)" in text
    assert "module stage(channels, stride):" not in text  # the residual makes two structures
    assert "        stage(width) * 2\n" in text  # the widths follow the argument: `ModelNew(width=...)` builds them
    assert "head: linear(2 * width, classes)" in text
    assert "body:" in text and "add(" in text


def test_a_module_made_before_its_parent_is_passed_to_it(user_models):
    """The downsample that a Block is given: the spec's module takes it as an argument, made at the call site
    before the block's own convs, so seeded weights come in the model's order."""
    text = assert_matches(user_models, [[4, 6], 3], (2, 3, 7, 6), "TinyResNet")
    assert "module block_module_2(downsample):" in text
    assert "    identity -> downsample\n" in text
    assert "        block_module_2(downsample_block())\n" in text


def test_cat_and_channel_shuffles_in_forward(user_models):
    text = assert_matches(user_models, [], (2, 3, 6, 5), "Joined")
    assert "    out_3 = cat(out, out_2)\n    cat(identity, out_3)\n" in text  # the parts' lines name them
    assert "shuffle: channel_shuffle(3)" in text and "shuffle_2: channel_shuffle(2)" in text


def test_a_dense_loop_of_modules_joined_one_by_one(user_models):
    text = assert_matches(user_models, [3, 2, 3], (2, 3, 5, 4), "Growing")
    assert "    dense blocks:\n        widen(channels + i * growth, growth) for i in range(layers)\n" in text


def test_a_re_initialisation_loop_becomes_init_rules(user_models):
    text = assert_matches(user_models, [3], (2, 3, 6, 5), "Reinitialised")
    assert text.endswith(
        "init:\n"
        '    Conv2d.weight = kaiming_uniform(a=0.1, nonlinearity="relu")\n'
        "    Conv2d.bias = zeros\n"
        "    BatchNorm2d.weight = constant(0.5)\n"
        "    BatchNorm2d.bias = uniform(-0.1, 0.1)\n"
        "    Linear.weight = trunc_normal(std=0.02)\n"
        "    Linear.bias = constant(0)\n"
    )


def test_an_argument_whose_second_value_the_spec_does_not_build_stays_fixed(user_models):
    """At width 5 the channels move as the width (conv(3, 5), linear(5, 2)), but the model makes fc first: the
    spec's ModelNew(width=5) draws other weights, so the width stays fixed: ModelNew takes it only at 4."""
    text, _ = imported(user_models, [4], (1, 3, 5, 5), "Reordered")
    assert "model Reordered(width=4)\n" in text
    assert "# Fixed at width=4:" in text
    assert "conv: conv(3, 4, 1, 1, 0)" in text


def test_mean_hardswish_and_batch_norm_arguments(user_models):
    text = assert_matches(user_models, [], (3, 3, 11, 10), "MeanHead")
    assert "bn: bn(6, eps=0.001, momentum=0.2)" in text
    assert "global_avgpool -> flatten" in text


@pytest.mark.parametrize(
    "class_name, anchor, message",
    [
        ("Recurrent", "return self.rnn(self.conv(x))", "nn.LSTM at rnn is not supported"),
        ("Branchy", "if x.sum() > 0:", "Branchy.forward takes a branch or loop on tensor values"),
        ("CatBatch", "return torch.cat", "torch.cat in CatBatch.forward along dim=0 is not supported"),
        (
            "Upsample",
            "return self.up(x)",
            "nn.ConvTranspose2d at up is not supported: conv_transpose with output_padding=1",
        ),
        ("Grouped", "return self.conv(x)", "nn.Conv2d at conv is not supported: conv with groups=2"),
        ("ConvList", "x = conv(x)", "nn.Conv2d at convs.0 is an item of a ModuleList called on its own"),
        (
            "ReinitialisedByHand",
            "m.weight.data.fill_(0.1)",
            "the loop over self.modules() calls `m.weight.data.fill_`, which fusegen's `init:` rules cannot express",
        ),
    ],
)
def test_unsupported_models_name_the_line(user_models, class_name, anchor, message):
    with pytest.raises(ImportFailure) as failure:
        to_spec(load(user_models.resolve(), class_name, [], (1, 3, 8, 8)))
    assert failure.value.line == line_of(anchor)
    assert message in failure.value.message


def test_a_creation_order_that_forward_does_not_follow_is_refused(user_models):
    source = load(user_models.resolve(), "LateConv", [], (1, 3, 8, 8))
    with pytest.raises(ImportFailure) as failure:
        verify(source, to_spec(source))
    assert failure.value.line == line_of("self.fc = nn.Linear(4, 2)")
    assert "fc draws other initial values than the spec's under the same seed" in failure.value.message


def test_the_command_writes_a_spec_that_builds(user_models, tmp_path):
    spec = tmp_path / "specs" / "mean_head.fuse"
    result = fusegen(
        tmp_path,
        "import",
        str(user_models),
        "--class",
        "MeanHead",
        "--args",
        "[]",
        "--input",
        "[2, 3, 9, 9]",
        "-o",
        str(spec),
    )
    assert result.returncode == 0, result.stderr
    build = fusegen(tmp_path, "build", str(spec))
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "generated" / "mean_head.py").exists()


def test_the_command_refuses_with_file_line_exit_2_and_writes_nothing(user_models, tmp_path):
    spec = tmp_path / "recurrent.fuse"
    result = fusegen(
        tmp_path,
        "import",
        str(user_models),
        "--class",
        "Recurrent",
        "--args",
        "[]",
        "--input",
        "[1, 3, 8, 8]",
        "-o",
        str(spec),
    )
    assert result.returncode == 2
    line = line_of("return self.rnn(self.conv(x))")
    assert f"{user_models}:{line}: error: nn.LSTM at rnn is not supported" in result.stderr
    assert not spec.exists()
    assert not list(tmp_path.iterdir())


class Net(nn.Module):
    """A custom module around an nn.Sequential of the layers a test draws."""

    def __init__(self, layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@st.composite
def conv_stacks(draw):
    """(layers as (class, arguments) to build them from, input shape): convs of every form the importer writes
    (1x1, KxK, depthwise, with bias or padding: the generic conv), each maybe followed by BatchNorm and an
    activation, at shapes they fit."""
    channels, size = draw(st.integers(1, 6)), draw(st.integers(3, 9))
    shape = (draw(st.integers(1, 2)), channels, size, size)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3, 5]))
        padding = draw(st.integers(0, k // 2))
        stride = draw(st.sampled_from([1, 2]))
        if size + 2 * padding < k:
            continue
        depthwise = channels > 1 and draw(st.booleans())
        out = channels if depthwise else draw(st.integers(1, 6))
        groups = channels if depthwise else 1
        layers.append((nn.Conv2d, (channels, out, k, stride, padding, 1, groups, draw(st.booleans()))))
        channels, size = out, (size + 2 * padding - k) // stride + 1
        # training-mode BatchNorm needs two values per channel, in torch as in the kernels
        if shape[0] * size * size > 1 and draw(st.booleans()):
            layers.append((nn.BatchNorm2d, (out,)))
        layers += draw(st.sampled_from([[], [(nn.ReLU, ())], [(nn.ReLU6, ())], [(nn.SiLU, ())], [(nn.Hardswish, ())]]))
    assume(layers)
    return layers, shape


@given(stack=conv_stacks(), training=st.booleans())
def test_random_conv_stacks_import_and_match(stack, training):
    layers, shape = stack

    def build():
        return Net([cls(*args) for cls, args in layers])

    source = Source(Path(__file__), build(), build, "Net", (), shape)
    text = to_spec(source)
    verify(source, text)
    new = load_spec(text, "imported_stack").ModelNew()
    ref = source.model
    randomize_batchnorm(ref, seed=len(text))
    new.load_state_dict(ref.state_dict())
    exact = copy.deepcopy(ref).double().to(DEVICE).train(training)
    new.to(DEVICE).train(training)
    torch.manual_seed(len(text))
    x = torch.rand(*shape, device=DEVICE)
    with torch.no_grad():
        out, expected = new(x).double(), exact(x.double())
    # Against float64, relative to the output's size but to no less than values of 1: BatchNorm keeps the
    # intermediates near 1, and a small output (one value of 0.0034 after SiLU once) carries their rounding
    # (1.08e-5 relative there, 4e-8 absolute).
    scale = max(expected.norm().item(), expected.numel() ** 0.5)
    assert (out - expected).norm().item() / scale < TOLERANCE
