"""Classifiers for the unlearning drivers (randomly initialised: no weights are downloaded).

* ``resnet18``: torchvision's ResNet-18 with the usual small-image stem (3×3 stride-1
  convolution, no max-pool), the standard model for 32×32 CIFAR/SVHN unlearning.
* ``narrow_resnet``: a three-stage ResNet of torchvision ``BasicBlock`` s with widths
  (16, 32, 64) and a stride-2 stem, sized so that Fashion-MNIST unlearning runs in
  minutes on two CPU cores (~78k parameters).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models.resnet import BasicBlock

MODELS = ("narrow_resnet", "resnet18")


class NarrowResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths=(16, 32, 64), stem_stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != width:
                downsample = nn.Sequential(
                    nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks.append(BasicBlock(cin, width, stride, downsample))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def small_image_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name == "narrow_resnet":
        return NarrowResNet(in_channels, num_classes)
    if name == "resnet18":
        return small_image_resnet18(in_channels, num_classes)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer, whose input is the penultimate representation."""
    return model.fc
