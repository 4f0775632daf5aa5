from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trainables.models import IMAGENET_ARCHS, count_parameters, create_model, list_models, resolve_stem


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(images)


# ---------------------------------------------------------------------------------------------
# Every registered model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_forward_shape_on_32px(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert _forward(model, torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_with_imagenet_stem_on_64px(name: str) -> None:
    model = create_model(name, num_classes=5, stem="imagenet")
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert _forward(model, torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_registry_holds_the_documented_models() -> None:
    assert list_models() == sorted(list_models())
    assert {"cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
            "resnet18", "resnet34", "resnet50"} <= set(list_models())


# ---------------------------------------------------------------------------------------------
# Parameter counts (He et al. 2016 table 6; torchvision)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "low", "high"), [
    ("resnet20", 0.26e6, 0.28e6),
    ("resnet56", 0.84e6, 0.86e6),
    ("resnet110", 1.7e6, 1.75e6),
    ("resnet18", 11.16e6, 11.18e6),  # small stem, 10 classes
])
def test_parameter_count(name: str, low: float, high: float) -> None:
    assert low <= count_parameters(create_model(name, num_classes=10)) <= high


def test_resnet50_imagenet_matches_torchvision_and_loads_its_state_dict() -> None:
    ours = create_model("resnet50", num_classes=1000, stem="imagenet")
    theirs = torchvision.models.resnet50()
    assert count_parameters(ours) == count_parameters(theirs)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_forward(ours, images), _forward(theirs, images))


# ---------------------------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------------------------

def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="arch") as error:
        create_model("resnet19", num_classes=10)
    assert "resnet19" in str(error.value)
    for name in list_models():
        assert name in str(error.value)


@pytest.mark.parametrize("depth", [7, 9, 10, 21, 2, -4])
def test_depth_must_be_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match="depth") as error:
        create_model("cifar_resnet", num_classes=10, depth=depth)
    assert str(depth) in str(error.value)


@pytest.mark.parametrize(("depth", "blocks_per_stage"), [(8, 1), (14, 2), (20, 3), (32, 5)])
def test_cifar_resnet_depth(depth: int, blocks_per_stage: int) -> None:
    model = create_model("cifar_resnet", num_classes=10, depth=depth)
    assert model.num_stages == 3
    assert [len(stage) for stage in model.stages] == [blocks_per_stage] * 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # + the classifier; 1x1 shortcut convs do not count


@pytest.mark.parametrize(("name", "depth"), [("resnet18", 18), ("resnet20", 32)])
def test_depth_is_refused_where_it_does_not_apply(name: str, depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        create_model(name, num_classes=10, depth=depth)


def test_named_depth_agrees_with_its_name() -> None:
    assert count_parameters(create_model("resnet20", num_classes=10, depth=20)) == \
        count_parameters(create_model("resnet20", num_classes=10))


@pytest.mark.parametrize(("name", "width", "expected"), [
    ("resnet20", None, [16, 32, 64]),
    ("resnet20", 8, [8, 16, 32]),
    ("cifar_resnet", 4, [4, 8, 16]),
    ("resnet18", None, [64, 128, 256, 512]),
    ("resnet18", 16, [16, 32, 64, 128]),
    ("resnet50", 8, [32, 64, 128, 256]),  # bottleneck: 4x expansion
])
def test_width_sets_the_stage_widths(name: str, width: int | None, expected: list[int]) -> None:
    model = create_model(name, num_classes=10, width=width)
    assert model.conv1.out_channels == (width or (16 if len(expected) == 3 else 64))
    # a stage's output channels: those of the last BatchNorm of its last block
    stage_out = [[m for m in stage[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
                 for stage in model.stages]
    assert stage_out == expected
    assert model.fc.in_features == expected[-1]
    assert _forward(model, torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_dropout_adds_a_dropout_layer_before_the_classifier() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in create_model("resnet20", num_classes=10).modules())
    model = create_model("resnet20", num_classes=10, dropout=0.3)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.3
    model.train()
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    first = model(images)
    torch.manual_seed(1)
    assert not torch.equal(first, model(images))  # dropout is active in training mode


def test_replace_head_keeps_the_body() -> None:
    model = create_model("cifar_resnet", num_classes=10, depth=8, width=4)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    model.replace_head(3)
    assert model.fc.in_features == 16 and model.fc.out_features == 3
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, body[key]), key
    assert _forward(model, torch.randn(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(("arch", "input_size", "expected"), [
    ("resnet20", 32, "cifar"), ("resnet20", 224, "cifar"), ("resnet18", 32, "small"),
    ("resnet18", 64, "small"), ("resnet50", 96, "imagenet"), ("resnet34", 224, "imagenet"),
])
def test_auto_stem(arch: str, input_size: int, expected: str) -> None:
    assert resolve_stem(arch, "auto", input_size) == expected
    assert resolve_stem(arch, "cifar", input_size) == "cifar"
    model = create_model(arch, num_classes=10, input_size=input_size, width=8)
    assert isinstance(model.maxpool, nn.MaxPool2d) == (expected == "imagenet")


def test_small_stem_keeps_the_resolution() -> None:
    for name in IMAGENET_ARCHS:
        model = create_model(name, num_classes=10, width=4, stem="small")
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
