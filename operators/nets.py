"""The torch networks of the default subjects (torchvision is not needed: these few are written here).

``ConvNet`` is the ResNet-style (basic blocks) and ResNeXt-style (grouped bottlenecks) classifier;
``SegNet`` the fully-convolutional segmenter in the role of the studies' FCN/DUC; ``TextClassifier`` a
MiniLM encoder (optionally truncated to its first layers, for distillation) with a mean-pooled linear
head. Every block keeps its internal width in ``mid`` so that structured pruning can rebuild a block
narrower and copy the kept channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ConvNetSpec:
    kind: Literal["resnet", "resnext"]
    widths: tuple[int, ...] = (32, 64, 128)  # one stage per width; stages after the first halve the resolution
    blocks: tuple[int, ...] = (1, 1, 1)
    mids: tuple[int, ...] | None = None  # internal width of each block, in order; default: its stage width
    groups: int = 8  # ResNeXt cardinality
    in_channels: int = 1
    classes: int = 10

    def block_mids(self) -> list[int]:
        if self.mids is not None:
            return list(self.mids)
        return [w for w, n in zip(self.widths, self.blocks, strict=True) for _ in range(n)]

    def narrower(self, factor: float) -> ConvNetSpec:
        """The same architecture with every width scaled (the distillation student)."""
        groups = self.groups
        widths = tuple(max(groups, round(w * factor / groups) * groups) for w in self.widths)
        return replace(self, widths=widths, mids=None)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.mid = mid
        self.conv1 = _conv_bn(cin, mid, 3, stride)
        self.conv2 = _conv_bn(mid, cout, 3)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))
        return out


class GroupedBottleneck(nn.Module):
    """ResNeXt block: 1×1 reduce, 3×3 grouped conv (``groups`` paths), 1×1 expand."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.mid, self.groups = mid, groups
        self.conv1 = _conv_bn(cin, mid, 1)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups=groups)
        self.conv3 = _conv_bn(mid, cout, 1)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        out: torch.Tensor = F.relu(self.conv3(y) + self.shortcut(x))
        return out


class ConvNet(nn.Module):
    def __init__(self, spec: ConvNetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Sequential(_conv_bn(spec.in_channels, spec.widths[0], 3), nn.ReLU())
        blocks: list[nn.Module] = []
        mids = iter(spec.block_mids())
        cin = spec.widths[0]
        for stage, (width, count) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                mid = next(mids)
                if spec.kind == "resnet":
                    blocks.append(BasicBlock(cin, mid, width, stride))
                else:
                    blocks.append(GroupedBottleneck(cin, mid, width, stride, spec.groups))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, spec.classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(image))
        logits: torch.Tensor = self.head(features.mean(dim=(2, 3)))
        return logits


@dataclass(frozen=True)
class SegNetSpec:
    widths: tuple[int, int, int] = (24, 48, 96)
    classes: int = 11
    in_channels: int = 1

    def narrower(self, factor: float) -> SegNetSpec:
        return replace(self, widths=tuple(max(8, round(w * factor)) for w in self.widths))  # type: ignore[arg-type]


class SegNet(nn.Module):
    """Encoder (full → 1/2 → 1/4 resolution) and decoder back to per-pixel logits at full resolution."""

    def __init__(self, spec: SegNetSpec) -> None:
        super().__init__()
        self.spec = spec
        w1, w2, w3 = spec.widths
        self.enc1 = nn.Sequential(_conv_bn(spec.in_channels, w1, 3), nn.ReLU(), BasicBlock(w1, w1, w1, 1))
        self.enc2 = BasicBlock(w1, w2, w2, 2)
        self.enc3 = BasicBlock(w2, w3, w3, 2)
        self.dec2 = nn.Sequential(_conv_bn(w3 + w2, w2, 3), nn.ReLU())
        self.dec1 = nn.Sequential(_conv_bn(w2 + w1, w1, 3), nn.ReLU())
        self.classify = nn.Conv2d(w1, spec.classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(image)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], dim=1))
        logits: torch.Tensor = self.classify(d1)
        return logits


class TextClassifier(nn.Module):
    """A BERT-family encoder (its first ``layers`` layers) + attention-masked mean pooling + a linear head."""

    def __init__(self, encoder: Any, classes: int, layers: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder  # a transformers BertModel: untyped here
        if layers is not None and layers < len(encoder.encoder.layer):
            encoder.encoder.layer = encoder.encoder.layer[:layers]
            encoder.config.num_hidden_layers = layers
        self.head = nn.Linear(int(encoder.config.hidden_size), classes)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # the pooling weights first: then a partition's tail receives them with the hidden state and never
        # needs the raw mask input (see operators.onnxgraph.find_cuts)
        weights = attention_mask.unsqueeze(-1).to(torch.float32)
        hidden: torch.Tensor = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled: torch.Tensor = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pooled(input_ids, attention_mask))
        return logits

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters by depth from the output: the head, the encoder's layers last to first, the embeddings
        (``operators.training.fit``'s layer-wise rate decay)."""
        layers = [list(layer.parameters()) for layer in reversed(self.encoder.encoder.layer)]
        return [list(self.head.parameters()), *layers, list(self.encoder.embeddings.parameters())]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]
