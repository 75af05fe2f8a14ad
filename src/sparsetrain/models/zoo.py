"""The networks of the model zoo, written from their papers' descriptions."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .gpt import GPTMini


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _image_shape(shape: Sequence[int], name: str, min_size: int = 1) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"{name} needs images (channels, height, width), got input_shape "
                         f"{tuple(shape)}")
    if min(shape[1:]) < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, got "
                         f"{shape[1]}x{shape[2]}")
    return tuple(shape)  # type: ignore[return-value]


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected in -> 300 -> 100 -> classes, ReLU between."""

    def __init__(self, num_classes, input_shape, width):
        super().__init__()
        n_in = math.prod(input_shape)
        self.fc1 = nn.Linear(n_in, _ch(300, width))
        self.fc2 = nn.Linear(_ch(300, width), _ch(100, width))
        self.fc3 = nn.Linear(_ch(100, width), num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe: conv 20 5x5, max-pool, conv 50 5x5, max-pool, fc 500, fc classes."""

    def __init__(self, num_classes, input_shape, width):
        super().__init__()
        c, h, w = _image_shape(input_shape, "lenet5", min_size=16)
        self.conv1 = nn.Conv2d(c, _ch(20, width), 5)
        self.conv2 = nn.Conv2d(_ch(20, width), _ch(50, width), 5)
        flat = _ch(50, width) * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
        self.fc1 = nn.Linear(flat, _ch(500, width))
        self.fc2 = nn.Linear(_ch(500, width), num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: 3x3 convs with BatchNorm and ReLU, max-pools (skipped once the image is 1x1),
    global average pooling and one linear classifier."""

    def __init__(self, plan, num_classes, input_shape, width):
        super().__init__()
        c, h, _ = _image_shape(input_shape, "vgg")
        layers: list[nn.Module] = []
        size = h
        for item in plan:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = _ch(item, width)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, planes, stride):
        super().__init__()
        c_out = planes * 4
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(c_in, c_out, stride) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """ResNets: CIFAR style (3x3 stem, three stages of 16/32/64 channels) or ImageNet style
    (7x7 stride-2 stem and max-pool, four stages of 64 to 512), global average pool, ``fc``."""

    def __init__(self, block, blocks, channels, num_classes, input_shape, width, imagenet):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "resnet")
        stem = _ch(channels[0], width)
        if imagenet:
            self.conv1 = nn.Conv2d(c, stem, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(c, stem, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem)
        stages = []
        c_in = stem
        for i, (n, planes) in enumerate(zip(blocks, channels)):
            planes = _ch(planes, width)
            layers = []
            for j in range(n):
                layers.append(block(c_in, planes, 2 if (i > 0 and j == 0) else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = nn.functional.adaptive_avg_pool2d(self.layers(x), 1).flatten(1)
        return self.fc(x)


class PreActBlock(nn.Module):
    """Wide ResNet block: BN-ReLU-conv twice, 1x1-conv shortcut when the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (None if stride == 1 and c_in == c_out
                         else nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): stages of 16k, 32k and 64k channels."""

    def __init__(self, depth, k, num_classes, input_shape, width):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "wide resnet")
        n = (depth - 4) // 6
        widths = [_ch(16, width), _ch(16 * k, width), _ch(32 * k, width), _ch(64 * k, width)]
        self.conv1 = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x):
        x = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNetV1(nn.Module):
    """MobileNet v1 with a stride-1 stem for 32x32 images: depthwise 3x3 + pointwise 1x1 pairs."""

    PLAN = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]

    def __init__(self, num_classes, input_shape, width):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "mobilenet-v1")
        c_in = _ch(32, width)
        self.conv1 = nn.Conv2d(c, c_in, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        layers: list[nn.Module] = []
        for item in self.PLAN:
            c_out, stride = (item, 1) if isinstance(item, int) else item
            c_out = _ch(c_out, width)
            layers += [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                       nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
                       nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, expand, stride):
        super().__init__()
        hidden = c_in * expand
        self.use_skip = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_skip else out


class MobileNetV2(nn.Module):
    """MobileNet v2 for 32x32 images: stride-1 stem and second stage, inverted residuals."""

    # (expansion, channels, blocks, stride of the first block)
    PLAN = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes, input_shape, width):
        super().__init__()
        c, _, _ = _image_shape(input_shape, "mobilenet-v2")
        c_in = _ch(32, width)
        self.conv1 = nn.Conv2d(c, c_in, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        blocks = []
        for expand, channels, n, stride in self.PLAN:
            for j in range(n):
                blocks.append(InvertedResidual(c_in, _ch(channels, width), expand,
                                               stride if j == 0 else 1))
                c_in = _ch(channels, width)
        self.layers = nn.Sequential(*blocks)
        last = _ch(1280, width)
        self.conv2 = nn.Conv2d(c_in, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.fc = nn.Linear(last, num_classes)
        _init(self)

    def forward(self, x):
        x = self.layers(nn.functional.relu6(self.bn1(self.conv1(x))))
        x = nn.functional.relu6(self.bn2(self.conv2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _cifar_resnet(depth):
    n = (depth - 2) // 6
    return lambda **kw: ResNet(BasicBlock, [n, n, n], [16, 32, 64], imagenet=False, **kw)


FACTORIES = {
    "lenet300": LeNet300,
    "gpt-mini": GPTMini,
    "lenet5": LeNet5,
    **{name: (lambda plan: lambda **kw: VGG(plan, **kw))(plan) for name, plan in _VGG.items()},
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "wrn-22-2": lambda **kw: WideResNet(22, 2, **kw),
    "mobilenet-v1": MobileNetV1,
    "mobilenet-v2": MobileNetV2,
    "resnet18": lambda **kw: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512],
                                    imagenet=True, **kw),
    "resnet50": lambda **kw: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512],
                                    imagenet=True, **kw),
}
#: The models that read token indices (see ``models.model_inputs``).
TOKEN_MODELS = ("gpt-mini",)
