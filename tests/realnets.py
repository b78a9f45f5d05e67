"""Architectures at the studies' real size, written as torch modules for the test rings (no torchvision here).

``resnet50`` is torchvision's ResNet-50 layout (bottlenecks 3-4-6-3, 25.6 M parameters, ~98 MB as fp32
ONNX); ``fcn_resnet50`` is torchvision's FCN-ResNet50 layout (dilated ResNet-50 backbone at output stride
8, the 3×3 FCN head, bilinear upsampling to the input size; 32.9 M parameters). Weights are random: the
tests exercise what users' exports look like (size, graph shape, fixed batch), not what they learned.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class ResNet50Backbone(nn.Module):
    """Stem and the four stages; ``dilated`` replaces the strides of stages 3 and 4 by dilation (FCN)."""

    def __init__(self, dilated: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, cin, dilation = [], 64, 1
        for index, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            stride = 1 if index == 0 else 2
            if dilated and index >= 2:
                dilation, stride = dilation * stride, 1
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, stride if block == 0 else 1, dilation))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.stages(self.stem(x))
        return out


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone()
        self.fc = nn.Linear(self.backbone.channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.backbone(x), 1), 1))
        return out


class FCNResNet50(nn.Module):
    def __init__(self, classes: int = 21) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone(dilated=True)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.channels, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(512, classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear")
        return out


def resnet50(classes: int = 1000, seed: int = 0) -> ResNet50:
    torch.manual_seed(seed)
    return ResNet50(classes).eval()


def fcn_resnet50(classes: int = 21, seed: int = 0) -> FCNResNet50:
    torch.manual_seed(seed)
    return FCNResNet50(classes).eval()
