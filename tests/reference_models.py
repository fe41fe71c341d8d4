"""Plain-torch reference models, written out as KernelBench has them (ANCHORS.md), independent of fusegen."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=1000, input_channels=3, alpha=1.0):
        super().__init__()

        def conv_bn(inp, oup, stride):
            return nn.Sequential(
                nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
                nn.BatchNorm2d(oup),
                nn.ReLU(inplace=True),
            )

        def conv_dw(inp, oup, stride):
            return nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.ReLU(inplace=True),
                nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
                nn.ReLU(inplace=True),
            )

        self.model = nn.Sequential(
            conv_bn(input_channels, int(32 * alpha), 2),
            conv_dw(int(32 * alpha), int(64 * alpha), 1),
            conv_dw(int(64 * alpha), int(128 * alpha), 2),
            conv_dw(int(128 * alpha), int(128 * alpha), 1),
            conv_dw(int(128 * alpha), int(256 * alpha), 2),
            conv_dw(int(256 * alpha), int(256 * alpha), 1),
            conv_dw(int(256 * alpha), int(512 * alpha), 2),
            conv_dw(int(512 * alpha), int(512 * alpha), 1),
            conv_dw(int(512 * alpha), int(512 * alpha), 1),
            conv_dw(int(512 * alpha), int(512 * alpha), 1),
            conv_dw(int(512 * alpha), int(512 * alpha), 1),
            conv_dw(int(512 * alpha), int(512 * alpha), 1),
            conv_dw(int(512 * alpha), int(1024 * alpha), 2),
            conv_dw(int(1024 * alpha), int(1024 * alpha), 1),
            nn.AvgPool2d(7),
        )
        self.fc = nn.Linear(int(1024 * alpha), num_classes)

    def forward(self, x):
        x = self.model(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class EfficientNetB1(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.mbconv1 = self._make_mbconv_block(32, 16, 1, 1)
        self.mbconv2 = self._make_mbconv_block(16, 24, 2, 6)
        self.mbconv3 = self._make_mbconv_block(24, 40, 2, 6)
        self.mbconv4 = self._make_mbconv_block(40, 80, 2, 6)
        self.mbconv5 = self._make_mbconv_block(80, 112, 1, 6)
        self.mbconv6 = self._make_mbconv_block(112, 192, 2, 6)
        self.mbconv7 = self._make_mbconv_block(192, 320, 1, 6)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.fc = nn.Linear(1280, num_classes)

    def _make_mbconv_block(self, in_channels, out_channels, stride, expand_ratio):
        hidden_dim = round(in_channels * expand_ratio)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=stride, padding=1, groups=hidden_dim, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden_dim, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.mbconv1(x)
        x = self.mbconv2(x)
        x = self.mbconv3(x)
        x = self.mbconv4(x)
        x = self.mbconv5(x)
        x = self.mbconv6(x)
        x = self.mbconv7(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.fc(x)


class LeNet5(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=6, kernel_size=5, stride=1)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=16, kernel_size=5, stride=1)
        self.fc1 = nn.Linear(in_features=16 * 5 * 5, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=84)
        self.fc3 = nn.Linear(in_features=84, out_features=num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), kernel_size=2, stride=2)
        x = F.max_pool2d(F.relu(self.conv2(x)), kernel_size=2, stride=2)
        # A fixed row length, not the batch: only 32x32 and 33x33 inputs reach the 5x5 that fc1 expects.
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=96, kernel_size=11, stride=4, padding=2)
        self.relu1 = nn.ReLU(inplace=True)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(in_channels=96, out_channels=256, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv3 = nn.Conv2d(in_channels=256, out_channels=384, kernel_size=3, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(in_channels=384, out_channels=384, kernel_size=3, padding=1)
        self.relu4 = nn.ReLU(inplace=True)
        self.conv5 = nn.Conv2d(in_channels=384, out_channels=256, kernel_size=3, padding=1)
        self.relu5 = nn.ReLU(inplace=True)
        self.maxpool3 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.fc1 = nn.Linear(in_features=256 * 6 * 6, out_features=4096)
        self.relu6 = nn.ReLU(inplace=True)
        self.dropout1 = nn.Dropout(p=0.0)
        self.fc2 = nn.Linear(in_features=4096, out_features=4096)
        self.relu7 = nn.ReLU(inplace=True)
        self.dropout2 = nn.Dropout(p=0.0)
        self.fc3 = nn.Linear(in_features=4096, out_features=num_classes)

    def forward(self, x):
        x = self.maxpool1(self.relu1(self.conv1(x)))
        x = self.maxpool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.conv4(x))
        x = self.maxpool3(self.relu5(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = self.dropout1(self.relu6(self.fc1(x)))
        x = self.dropout2(self.relu7(self.fc2(x)))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """ResNet18's block. Its one `relu` module serves both activations."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBasicBlock(BasicBlock):
    """KernelBench 8: a BasicBlock whose shortcut is always a 1x1 conv and BatchNorm (even at stride 1 with
    in == out), created after the block's own layers."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * self.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels * self.expansion),
        )


class Bottleneck(nn.Module):
    """ResNet101's block. Its one `relu` module serves all three activations."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class _ResNet(nn.Module):
    def __init__(self, block, layers, num_classes):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, out_channels, blocks, stride):
        """The first block's shortcut is created before the block (its parameters are drawn first) but
        registered after the block's own layers."""
        downsample = None
        if stride != 1 or self.in_channels != out_channels * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, out_channels * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels * block.expansion),
            )
        layers = [block(self.in_channels, out_channels, stride, downsample)]
        self.in_channels = out_channels * block.expansion
        layers += [block(self.in_channels, out_channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet18(_ResNet):
    def __init__(self, num_classes=1000):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes)


class ResNet101(_ResNet):
    def __init__(self, layers, num_classes=1000):
        super().__init__(Bottleneck, layers, num_classes)


class _VGG(nn.Module):
    def __init__(self, convs_per_block, num_classes):
        super().__init__()
        features, in_channels = [], 3
        for out_channels, convs in zip((64, 128, 256, 512, 512), convs_per_block):
            for _ in range(convs):
                features += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = out_channels
            features.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.0),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.0),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG16(_VGG):
    def __init__(self, num_classes=1000):
        super().__init__((2, 2, 3, 3, 3), num_classes)


class VGG19(_VGG):
    def __init__(self, num_classes=1000):
        super().__init__((2, 2, 4, 4, 4), num_classes)


class MobileNetV2(nn.Module):
    """KernelBench's MobileNetV2 has no residual connections: its block helper computes whether a block
    would have one and the caller drops the answer."""

    # Expand ratio, output channels (multiples of 8, which KernelBench's _make_divisible(c, 8) keeps),
    # blocks, stride of the first block.
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes=1000):
        super().__init__()
        in_channels, last_channels = 32, 1280
        features = [nn.Conv2d(3, in_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU6(inplace=True)]
        for expand_ratio, out_channels, blocks, stride in self.SETTINGS:
            for i in range(blocks):
                block_stride = stride if i == 0 else 1
                features.append(self._inverted_residual(in_channels, out_channels, block_stride, expand_ratio))
                in_channels = out_channels
        features += [
            nn.Conv2d(in_channels, last_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU6(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        ]
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(last_channels, num_classes))
        # KernelBench's re-initialisation, drawn after the default one, in module order. (No conv has a bias,
        # and its BatchNorm branch sets the defaults again.)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _inverted_residual(in_channels, out_channels, stride, expand_ratio):
        hidden = int(in_channels * expand_ratio)
        layers = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class EfficientNetMBConv(nn.Module):
    """KernelBench 21, and EfficientNetB0's block: no expand_conv at all when expand_ratio is 1."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, expand_ratio):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = nn.Sequential(
                nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            )
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(
                hidden, hidden, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=hidden, bias=False
            ),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        )
        self.project_conv = nn.Sequential(
            nn.Conv2d(hidden, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        identity = x
        if hasattr(self, "expand_conv"):
            x = self.expand_conv(x)
        x = self.project_conv(self.depthwise_conv(x))
        if self.use_residual:
            x += identity
        return x


class EfficientNetB0(nn.Module):
    # (in, out, kernel size, stride, expand ratio) of each block
    BLOCKS = [
        (32, 16, 3, 1, 1),
        (16, 24, 3, 2, 6),
        (24, 24, 3, 1, 6),
        (24, 40, 5, 2, 6),
        (40, 40, 5, 1, 6),
        (40, 80, 3, 2, 6),
        (80, 80, 3, 1, 6),
        (80, 112, 5, 1, 6),
        (112, 112, 5, 1, 6),
        (112, 192, 5, 2, 6),
        (192, 192, 5, 1, 6),
        (192, 192, 5, 1, 6),
        (192, 320, 3, 1, 6),
    ]

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.blocks = nn.Sequential(*(EfficientNetMBConv(*block) for block in self.BLOCKS))
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = x.view(x.size(0), -1)
        return self.fc(x)


class EfficientNetB2(nn.Module):
    """Each block's "squeeze and excitation" is in sequence, not a gate: its average pool collapses the map
    to 1x1, so from the first block's output on every tensor is (N, C, 1, 1). The one `relu` module serves
    the stem and the head."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.mbconv1 = self._make_mbconv_block(32, 96, 1, 3)
        self.mbconv2 = self._make_mbconv_block(96, 144, 2, 6)
        self.mbconv3 = self._make_mbconv_block(144, 192, 2, 6)
        self.mbconv4 = self._make_mbconv_block(192, 288, 2, 6)
        self.mbconv5 = self._make_mbconv_block(288, 384, 1, 6)
        self.conv_final = nn.Conv2d(384, 1408, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn_final = nn.BatchNorm2d(1408)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(1408, num_classes)

    @staticmethod
    def _make_mbconv_block(in_channels, out_channels, stride, expand_ratio):
        """Every block here expands (no expand ratio is 1)."""
        hidden = in_channels * expand_ratio
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(hidden, hidden // 4, kernel_size=1, stride=1, padding=0, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden // 4, hidden, kernel_size=1, stride=1, padding=0, bias=False),
            nn.Sigmoid(),
            nn.Conv2d(hidden, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.mbconv5(self.mbconv4(self.mbconv3(self.mbconv2(self.mbconv1(x)))))
        x = self.relu(self.bn_final(self.conv_final(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class SqueezeNetFireModule(nn.Module):
    """A squeeze 1x1 conv, then a 1x1 and a 3x3 expand of its output joined along channels."""

    def __init__(self, in_channels, squeeze_channels, expand1x1_channels, expand3x3_channels):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze_channels, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_channels, expand1x1_channels, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_channels, expand3x3_channels, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        left = self.expand1x1_activation(self.expand1x1(x))
        right = self.expand3x3_activation(self.expand3x3(x))
        return torch.cat([left, right], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.0: fire modules between max pools that round up (ceil_mode), a 1x1 conv classifier."""

    def __init__(self, num_classes=1000):
        super().__init__()
        pool = dict(kernel_size=3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(**pool),
            SqueezeNetFireModule(96, 16, 64, 64),
            SqueezeNetFireModule(128, 16, 64, 64),
            SqueezeNetFireModule(128, 32, 128, 128),
            nn.MaxPool2d(**pool),
            SqueezeNetFireModule(256, 32, 128, 128),
            SqueezeNetFireModule(256, 48, 192, 192),
            SqueezeNetFireModule(384, 48, 192, 192),
            SqueezeNetFireModule(384, 64, 256, 256),
            nn.MaxPool2d(**pool),
            SqueezeNetFireModule(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.0),
            nn.Conv2d(512, num_classes, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class GoogleNetInceptionModule(nn.Module):
    """Four branches (1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max pool then 1x1) joined along channels."""

    def __init__(self, in_channels, out_1x1, reduce_3x3, out_3x3, reduce_5x5, out_5x5, pool_proj):
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_channels, out_1x1, kernel_size=1)
        self.branch3x3 = nn.Sequential(
            nn.Conv2d(in_channels, reduce_3x3, kernel_size=1),
            nn.Conv2d(reduce_3x3, out_3x3, kernel_size=3, padding=1),
        )
        self.branch5x5 = nn.Sequential(
            nn.Conv2d(in_channels, reduce_5x5, kernel_size=1),
            nn.Conv2d(reduce_5x5, out_5x5, kernel_size=5, padding=2),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x):
        branches = (self.branch1x1, self.branch3x3, self.branch5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], 1)


class GoogleNetInceptionV1(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=1)
        self.conv3 = nn.Conv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception3a = GoogleNetInceptionModule(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = GoogleNetInceptionModule(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = GoogleNetInceptionModule(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = GoogleNetInceptionModule(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = GoogleNetInceptionModule(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = GoogleNetInceptionModule(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = GoogleNetInceptionModule(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5a = GoogleNetInceptionModule(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = GoogleNetInceptionModule(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.maxpool1(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = self.maxpool2(F.relu(self.conv3(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for block in (self.inception4a, self.inception4b, self.inception4c, self.inception4d, self.inception4e):
            x = block(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


class DenseNet121TransitionLayer(nn.Module):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.transition = nn.Sequential(
            nn.BatchNorm2d(num_input_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )

    def forward(self, x):
        return self.transition(x)


class DenseNet121DenseBlock(nn.Module):
    """KernelBench's dense block: each layer (BatchNorm, ReLU, 3x3 conv, Dropout(0)) reads the concatenation of
    the input and every earlier layer's output."""

    def __init__(self, num_layers, num_input_features, growth_rate):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(num_input_features + i * growth_rate),
                nn.ReLU(inplace=True),
                nn.Conv2d(num_input_features + i * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False),
                nn.Dropout(0.0),
            )
            for i in range(num_layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(x))
            x = torch.cat(features, 1)
        return x


class DenseNet(nn.Module):
    """KernelBench's DenseNet121 and DenseNet201 (`block_layers`): a 7x7 stem and max pool, dense blocks with a
    transition layer (BatchNorm, ReLU, 1x1 conv, 2x2 average pool) between them, BatchNorm, ReLU, global
    average pool and the classifier."""

    def __init__(self, growth_rate, num_classes, block_layers):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        features = 64
        self.dense_blocks = nn.ModuleList()
        self.transition_layers = nn.ModuleList()
        for i, num_layers in enumerate(block_layers):
            self.dense_blocks.append(DenseNet121DenseBlock(num_layers, features, growth_rate))
            features += num_layers * growth_rate
            if i != len(block_layers) - 1:
                self.transition_layers.append(DenseNet121TransitionLayer(features, features // 2))
                features //= 2
        self.final_bn = nn.BatchNorm2d(features)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x):
        x = self.features(x)
        for i, block in enumerate(self.dense_blocks):
            x = block(x)
            if i != len(self.dense_blocks) - 1:
                x = self.transition_layers[i](x)
        x = torch.relu(self.final_bn(x))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


class DenseNet121(DenseNet):
    def __init__(self, growth_rate=32, num_classes=1000):
        super().__init__(growth_rate, num_classes, [6, 12, 24, 16])


class DenseNet201(DenseNet):
    def __init__(self, growth_rate=32, num_classes=1000):
        super().__init__(growth_rate, num_classes, [6, 12, 48, 32])


class RegNet(nn.Module):
    """KernelBench's RegNet: a stage per width, each two 3x3 convs with bias and BatchNorm, then a 2x2 max pool."""

    def __init__(self, input_channels, stages, block_widths, output_classes):
        super().__init__()
        self.stages = stages
        self.block_widths = block_widths
        widths = [input_channels, *block_widths[:stages]]
        self.feature_extractor = nn.Sequential(*(self._stage(widths[i], widths[i + 1]) for i in range(stages)))
        self.fc = nn.Linear(block_widths[-1], output_classes)

    @staticmethod
    def _stage(in_channels, out_channels):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )

    def forward(self, x):
        return self.fc(self.feature_extractor(x).mean(dim=(2, 3)))


def channel_shuffle(x, groups):
    """Channel j * groups + g of the result is channel g * (C // groups) + j of x."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        return channel_shuffle(x, self.groups)


class ShuffleNetUnit(nn.Module):
    """KernelBench's ShuffleNet unit: grouped 1x1 conv, depthwise 3x3, shuffle, grouped 1x1 conv, shortcut."""

    def __init__(self, in_channels, out_channels, groups=3):
        super().__init__()
        assert out_channels % 4 == 0
        mid = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shuffle = ChannelShuffle(groups)
        if in_channels == out_channels:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return out + self.shortcut(x)


class ShuffleNet(nn.Module):
    """KernelBench's ShuffleNet: a stem, three stages of ShuffleNet units, conv5, global pool, classifier."""

    def __init__(self, num_classes=1000, groups=3, stages_repeats=[3, 7, 3], stages_out_channels=[24, 240, 480, 960]):
        super().__init__()
        widths = stages_out_channels
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2 = self._stage(widths[0], widths[1], stages_repeats[0], groups)
        self.stage3 = self._stage(widths[1], widths[2], stages_repeats[1], groups)
        self.stage4 = self._stage(widths[2], widths[3], stages_repeats[2], groups)
        self.conv5 = nn.Conv2d(widths[3], 1024, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(1024)
        self.fc = nn.Linear(1024, num_classes)

    @staticmethod
    def _stage(in_channels, out_channels, repeats, groups):
        units = [ShuffleNetUnit(in_channels, out_channels, groups)]
        units += [ShuffleNetUnit(out_channels, out_channels, groups) for _ in range(1, repeats)]
        return nn.Sequential(*units)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = F.relu(self.bn5(self.conv5(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DoubleConv(nn.Module):
    """U-Net's double conv with softmax activations: (3x3 conv, BatchNorm, softmax along the width) twice."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.Softmax(dim=-1),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.Softmax(dim=-1),
        )

    def forward(self, x):
        return self.double_conv(x)


class UNetSoftmax(nn.Module):
    """KernelBench's U-Net: four encoders with 2x2 max pools, a bottleneck, four decoders that each read a 2x2
    stride-2 transposed conv's output joined with the encoder's along channels, and a 1x1 conv."""

    def __init__(self, in_channels, out_channels, features):
        super().__init__()
        widths = [features * 2**i for i in range(5)]
        self.encoder1 = DoubleConv(in_channels, widths[0])
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.encoder2 = DoubleConv(widths[0], widths[1])
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.encoder3 = DoubleConv(widths[1], widths[2])
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.encoder4 = DoubleConv(widths[2], widths[3])
        self.pool4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(widths[3], widths[4])
        self.upconv4 = nn.ConvTranspose2d(widths[4], widths[3], kernel_size=2, stride=2)
        self.decoder4 = DoubleConv(widths[4], widths[3])
        self.upconv3 = nn.ConvTranspose2d(widths[3], widths[2], kernel_size=2, stride=2)
        self.decoder3 = DoubleConv(widths[3], widths[2])
        self.upconv2 = nn.ConvTranspose2d(widths[2], widths[1], kernel_size=2, stride=2)
        self.decoder2 = DoubleConv(widths[2], widths[1])
        self.upconv1 = nn.ConvTranspose2d(widths[1], widths[0], kernel_size=2, stride=2)
        self.decoder1 = DoubleConv(widths[1], widths[0])
        self.final_conv = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x):
        skips = []
        for encoder, pool in (
            (self.encoder1, self.pool1),
            (self.encoder2, self.pool2),
            (self.encoder3, self.pool3),
            (self.encoder4, self.pool4),
        ):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for upconv, decoder in (
            (self.upconv4, self.decoder4),
            (self.upconv3, self.decoder3),
            (self.upconv2, self.decoder2),
            (self.upconv1, self.decoder1),
        ):
            x = decoder(torch.cat((upconv(x), skips.pop()), dim=1))
        return self.final_conv(x)


# KernelBench level 3 as its files run: stem -> (reference, get_init_inputs(), get_inputs() shape).
KERNELBENCH = {
    "lenet5": (LeNet5, [20], (4096, 1, 32, 32)),
    "alexnet": (AlexNet, [1000], (1024, 3, 224, 224)),
    "resnet_basic_block": (ResNetBasicBlock, [3, 64, 1], (10, 3, 224, 224)),
    "resnet18": (ResNet18, [1000], (2, 3, 224, 224)),
    "resnet101": (ResNet101, [[3, 4, 23, 3], 1000], (10, 3, 224, 224)),
    "vgg16": (VGG16, [1000], (10, 3, 224, 224)),
    "vgg19": (VGG19, [1000], (10, 3, 224, 224)),
    "mobilenet_v2": (MobileNetV2, [1000], (10, 3, 224, 224)),
    "efficientnet_mbconv": (EfficientNetMBConv, [112, 192, 5, 2, 6], (10, 112, 224, 224)),
    "efficientnet_b0": (EfficientNetB0, [1000], (10, 3, 224, 224)),
    "efficientnet_b2": (EfficientNetB2, [1000], (2, 3, 224, 224)),
    "mobilenet_v1": (MobileNetV1, [1000, 3, 1.0], (10, 3, 224, 224)),
    "efficientnet_b1": (EfficientNetB1, [1000], (10, 3, 240, 240)),
    "squeezenet_fire_module": (SqueezeNetFireModule, [3, 6, 64, 64], (128, 3, 256, 256)),
    "squeezenet": (SqueezeNet, [1000], (64, 3, 512, 512)),
    "googlenet_inception_module": (
        GoogleNetInceptionModule,
        [480, 192, 96, 208, 16, 48, 64],
        (10, 480, 224, 224),
    ),
    "googlenet_inception_v1": (GoogleNetInceptionV1, [1000], (10, 3, 224, 224)),
    "densenet121_transition_layer": (DenseNet121TransitionLayer, [32, 64], (128, 32, 256, 256)),
    "regnet": (RegNet, [3, 3, [64, 128, 256], 10], (8, 3, 224, 224)),
    "shufflenet_unit": (ShuffleNetUnit, [240, 480, 3], (10, 240, 224, 224)),
    "shufflenet": (ShuffleNet, [1000], (10, 3, 224, 224)),
    "densenet121_dense_block": (DenseNet121DenseBlock, [6, 32, 32], (10, 32, 224, 224)),
    "densenet121": (DenseNet121, [32, 10], (10, 3, 224, 224)),
    "densenet201": (DenseNet201, [32, 10], (10, 3, 224, 224)),
    "unet_softmax": (UNetSoftmax, [8, 4, 64], (8, 8, 64, 512)),
}

# Cheap cases, stem -> [(constructor arguments, input shape)]: arguments other than KernelBench's, odd input
# sizes as small as each net's fixed-size layers allow, batch 2 or more wherever BatchNorm runs in training mode
# (batch 3 where the map is 1x1).
SMALL = {
    # 33 is the only size besides 32 that reaches the 5x5 of fc1.
    "lenet5": [([7], (3, 1, 33, 33))],
    # 223 is the smallest input that reaches the 6x6 of fc1.
    "alexnet": [([7], (2, 3, 223, 223))],
    # A shortcut with stride 2, and the always-present one where it could be the identity.
    "resnet_basic_block": [([5, 6, 2], (2, 5, 9, 11)), ([4, 4, 1], (2, 4, 7, 7))],
    "resnet18": [([7], (2, 3, 33, 35))],
    # Two blocks in layer2: one without a shortcut conv.
    "resnet101": [([[1, 2, 1, 1], 7], (2, 3, 33, 33))],
    # 225 reaches the 7x7 of the classifier; no BatchNorm, so batch 1.
    "vgg16": [([7], (1, 3, 225, 225))],
    "vgg19": [([7], (1, 3, 225, 225))],
    "mobilenet_v2": [([7], (2, 3, 33, 33))],
    # With the residual; with expand ratio 1 and stride 2; with expand ratio 1 and the residual.
    "efficientnet_mbconv": [
        ([8, 8, 3, 1, 3], (2, 8, 9, 9)),
        ([6, 5, 5, 2, 1], (2, 6, 11, 13)),
        ([4, 4, 7, 1, 1], (2, 4, 9, 7)),
    ],
    "efficientnet_b0": [([7], (2, 3, 33, 33))],
    "efficientnet_b2": [([7], (3, 3, 15, 15))],
    # Odd channel counts (9, 19, 38, 76, 153, 307); AvgPool2d(7) needs an input of 193 to 416, where one
    # image takes 1.5 minutes of CPU in float16 (numpy's float16 arithmetic is slow): batch 1.
    "mobilenet_v1": [([7, 2, 0.3], (1, 2, 193, 197))],
    "efficientnet_b1": [([7], (2, 3, 33, 33))],
    # Odd channel counts, so the 3x3 expand's slice starts at an odd channel.
    "squeezenet_fire_module": [([5, 3, 7, 9], (2, 5, 6, 7))],
    # The ceil-mode max pools take rows 14 -> 7 -> 3 -> 1 and columns 16 -> 8 -> 4 -> 2: the first pool and
    # every pool of the columns keeps a last window that runs past the edge (floor mode: 6, and 7 -> 3 -> 1).
    "squeezenet": [([7], (2, 3, 33, 37))],
    # Odd channel counts: every slice but the first starts at an odd channel.
    "googlenet_inception_module": [([5, 3, 4, 7, 2, 3, 6], (2, 5, 7, 9))],
    # Maps of 9x10, 5x5, 3x3, 2x2 and 1x1 after the stem and each max pool; no BatchNorm, so batch 1.
    "googlenet_inception_v1": [([7], (1, 3, 17, 19))],
    # Odd sizes: the pool leaves the last row and column out.
    "densenet121_transition_layer": [([5, 7], (2, 5, 7, 9))],
    # Two stages of odd widths from two input channels (9x11 pools to 4x5, then 2x2), and one stage.
    "regnet": [([2, 2, [5, 7], 3], (2, 2, 9, 11)), ([3, 1, [6], 4], (3, 3, 5, 6))],
    # Three channels a group (odd) in the shuffle and the convs, with the shortcut conv; the identity shortcut
    # with two groups.
    "shufflenet_unit": [([9, 36, 3], (2, 9, 5, 7)), ([24, 24, 2], (2, 24, 4, 3))],
    # Two groups, three channels a group in stage3's shuffle, stage4's first unit keeping its width (an identity
    # shortcut where KernelBench's has a conv), two units in stage2 and stage4.
    "shufflenet": [([5, 2, [2, 1, 2], [6, 16, 24, 24]], (2, 3, 17, 15))],
    # Three layers of odd growth over odd input channels and pixels, and no layer (the input as it is).
    "densenet121_dense_block": [([3, 5, 3], (2, 5, 5, 7)), ([0, 4, 3], (2, 4, 3, 5))],
    # Small odd growth (odd channel counts throughout); 33x35 pools down to one pixel at the last block.
    "densenet121": [([3, 7], (2, 3, 33, 35))],
    "densenet201": [([2, 5], (2, 3, 33, 35))],
    # The four pools need sizes divisible by 16: the bottleneck runs at 1x2 pixels (4 values a channel for
    # training mode's BatchNorm), the softmax along widths of 32 down to 2, odd channel counts after the first.
    "unet_softmax": [([3, 2, 3], (2, 3, 16, 32))],
}
