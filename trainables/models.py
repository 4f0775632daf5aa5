"""ResNets by name: He et al. CIFAR ResNets (6n+2) and ResNet-18/34/50 with a stem per image size.

Blocks are torchvision's (`BasicBlock`, `Bottleneck`); attribute names follow torchvision's
`ResNet` (conv1, bn1, layer1.., fc) so its ImageNet state dicts load unchanged.
Constructors never pick a device or dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3
from .config import ARCHS, CIFAR_DEPTHS, IMAGENET_ARCHS  # noqa: F401  (IMAGENET_ARCHS re-exported: the torch-free lists live with the config)

Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A ResNet with any number of stages, any base width and one of three stems.

    stem: "cifar"/"small" = 3x3 conv, stride 1, no max-pool (32x32 images keep their resolution);
    "imagenet" = 7x7 conv, stride 2, then 3x3 max-pool (torchvision's, for large images).
    """

    def __init__(self, *, block: Block, layers: list[int], widths: list[int], stem: str,
                 num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for index, (num_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, width, num_blocks, stride))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def replace_head(self, num_classes: int) -> None:
        """A fresh classifier for another number of classes (fine-tuning to a new dataset)."""
        self.fc = nn.Linear(self.fc.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        x = torch.flatten(self.avgpool(x), 1)  # (N, C)
        return self.fc(self.dropout(x))     # (N, num_classes)


# ---------------------------------------------------------------------------------------------
# Builders and the registry
# ---------------------------------------------------------------------------------------------

def _cifar_resnet(*, depth: int = 20, width: int | None = None, num_classes: int,
                  dropout: float = 0.0, stem: str = "cifar") -> ResNet:
    """He et al. 2016, section 4.2: three stages of n BasicBlocks, widths w, 2w, 4w, depth 6n+2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    width = width or 16
    stem = "cifar" if stem == "auto" else stem
    return ResNet(block=BasicBlock, layers=[n, n, n], widths=[width, 2 * width, 4 * width],
                  stem=stem, num_classes=num_classes, dropout=dropout)


def _imagenet_resnet(*, block: Block, layers: list[int], width: int | None = None,
                     num_classes: int, dropout: float = 0.0, stem: str = "small") -> ResNet:
    width = width or 64
    return ResNet(block=block, layers=layers, widths=[width, 2 * width, 4 * width, 8 * width],
                  stem=stem, num_classes=num_classes, dropout=dropout)


MODELS: dict[str, Callable[..., ResNet]] = {
    "cifar_resnet": _cifar_resnet,
    **{f"resnet{d}": partial(_cifar_resnet, depth=d) for d in CIFAR_DEPTHS},
    "resnet18": partial(_imagenet_resnet, block=BasicBlock, layers=[2, 2, 2, 2]),
    "resnet34": partial(_imagenet_resnet, block=BasicBlock, layers=[3, 4, 6, 3]),
    "resnet50": partial(_imagenet_resnet, block=Bottleneck, layers=[3, 4, 6, 3]),
}


assert set(MODELS) == set(ARCHS), "trainables.config.ARCHS names the models built here"


def list_models() -> list[str]:
    return sorted(MODELS)


def resolve_stem(arch: str, stem: str, input_size: int) -> str:
    """'auto' picks the small-image stem up to 64 px and torchvision's ImageNet stem above."""
    if stem != "auto":
        return stem
    if arch not in IMAGENET_ARCHS:
        return "cifar"
    return "small" if input_size <= 64 else "imagenet"


def create_model(name: str, *, num_classes: int, depth: int | None = None, width: int | None = None,
                 stem: str = "auto", input_size: int = 32, dropout: float = 0.0) -> ResNet:
    if name not in MODELS:
        raise ValueError(f"arch: unknown model {name!r}; expected one of {', '.join(list_models())}")
    kwargs: dict = {"num_classes": num_classes, "width": width, "dropout": dropout,
                    "stem": resolve_stem(name, stem, input_size)}
    if depth is not None:
        if name != "cifar_resnet" and not (name.startswith("resnet") and MODELS[name].keywords.get("depth") == depth):
            raise ValueError(f"depth: only cifar_resnet takes a depth, got depth={depth} with arch={name!r}")
        kwargs["depth"] = depth
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_macs(arch: str, *, depth: int, width: int, stem: str, input_size: int, num_classes: int = 10) -> int:
    """MACs per image of the model a config builds, counted on the meta device: shapes only, no
    memory and no initialisation (a search space may hold a width-2048 ResNet of 14B weights)."""
    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes, depth=depth, width=width, stem=stem,
                             input_size=input_size).eval()
        return count_macs(model, input_size)


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one (3, size, size) image: convolutions and the classifier."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs
