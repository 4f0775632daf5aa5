from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from trainables.checkpoint import load_checkpoint, save_checkpoint, save_weights
from trainables.config import TrainConfig, check_config
from trainables.data import Splits
from trainables.finetune import PretrainedError, apply_freeze, build_model, param_groups
from trainables.models import ResNet, create_model, resolve_stem
from trainables.train import Trainer

# ---------------------------------------------------------------------------------------------
# Freeze strategies
# ---------------------------------------------------------------------------------------------

STEM = ("conv1.", "bn1.")


def _bn_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}


def _expected_trainable(name: str, strategy: str, frozen_stages: int, bn_modules: set[str]) -> bool:
    if strategy == "none":
        return True
    if strategy == "linear":
        return name.startswith("fc.")
    if strategy == "stages":
        frozen = STEM + tuple(f"layer{k}." for k in range(1, frozen_stages + 1))
        return not name.startswith(frozen)
    return name.startswith("fc.") or name.rsplit(".", 1)[0] in bn_modules  # bn


def _frozen_statistics(module_name: str, strategy: str, frozen_stages: int) -> bool:
    """Whether a BatchNorm layer keeps its running statistics under strategy."""
    if strategy == "linear":
        return True
    if strategy == "stages":
        return f"{module_name}.".startswith(STEM + tuple(f"layer{k}." for k in range(1, frozen_stages + 1)))
    return False  # none, and bn: statistics adapt to the new data


FREEZES = [("none", 0), ("linear", 0), ("stages", 1), ("stages", 2), ("bn", 0)]


@pytest.mark.parametrize(("strategy", "frozen_stages"), FREEZES)
def test_freeze_trains_exactly_the_intended_parameters(tiny_config: TrainConfig, tiny_splits: Splits,
                                                       strategy: str, frozen_stages: int) -> None:
    config = tiny_config.replace(freeze=strategy, frozen_stages=frozen_stages)
    trainer = Trainer(config, tiny_splits, device="cpu")
    model = trainer.model
    bn_modules = _bn_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_epoch()
    after = model.state_dict()

    expected = {name for name, _ in model.named_parameters()
                if _expected_trainable(name, strategy, frozen_stages, bn_modules)}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    changed = {name for name, _ in model.named_parameters() if not torch.equal(before[name], after[name])}
    assert changed == expected

    for module in sorted(bn_modules):
        kept = all(torch.equal(before[f"{module}.{buffer}"], after[f"{module}.{buffer}"])
                   for buffer in ("running_mean", "running_var", "num_batches_tracked"))
        assert kept == _frozen_statistics(module, strategy, frozen_stages), module


@pytest.mark.parametrize("frozen_stages", [-1, 4])
def test_frozen_stages_out_of_range(frozen_stages: int) -> None:
    model = create_model("cifar_resnet", num_classes=3, depth=8, width=4)
    with pytest.raises(ValueError, match="frozen_stages"):
        apply_freeze(model, "stages", frozen_stages)


def test_unknown_freeze_strategy() -> None:
    with pytest.raises(ValueError, match="freeze"):
        apply_freeze(create_model("cifar_resnet", num_classes=3, depth=8, width=4), "most")


# ---------------------------------------------------------------------------------------------
# Optimizer parameter groups
# ---------------------------------------------------------------------------------------------

def _depth(name: str, num_stages: int) -> int:
    if name.startswith(STEM):
        return 0
    if name.startswith("layer"):
        return int(name[len("layer")])
    return num_stages + 1  # the head


@pytest.mark.parametrize(("arch", "layer_decay"), [("cifar_resnet", 1.0), ("cifar_resnet", 0.5), ("resnet18", 0.7)])
def test_param_groups_decay_and_layer_lr(arch: str, layer_decay: float) -> None:
    model = create_model(arch, num_classes=3, depth=8 if arch == "cifar_resnet" else None, width=4)
    config = TrainConfig(weight_decay=1e-3, layer_decay=layer_decay)
    groups = param_groups(model, config)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter, once
    top = model.num_stages + 1
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            # no weight decay on 1-d parameters: BatchNorm weights and biases, the fc bias
            assert group["weight_decay"] == (0.0 if param.ndim == 1 else 1e-3), name
            assert group["lr_scale"] == pytest.approx(layer_decay ** (top - _depth(name, model.num_stages))), name


def test_param_groups_leave_out_frozen_parameters() -> None:
    model = create_model("cifar_resnet", num_classes=3, depth=8, width=4)
    apply_freeze(model, "linear")
    groups = param_groups(model, TrainConfig(layer_decay=0.5))
    params = [p for group in groups for p in group["params"]]
    assert len(params) == 2 and params[0] is model.fc.weight and params[1] is model.fc.bias
    assert all(group["lr_scale"] == 1.0 for group in groups)


def test_trainer_applies_the_layer_lr(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    trainer = Trainer(tiny_config.replace(layer_decay=0.5, lr=0.2), tiny_splits, device="cpu")
    lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert lrs == pytest.approx(sorted(0.2 * 0.5 ** k for k in range(5)))  # stem, 3 stages, head
    conv1 = trainer.model.conv1.weight
    stem_group = next(g for g in trainer.optimizer.param_groups if any(p is conv1 for p in g["params"]))
    assert stem_group["lr"] == pytest.approx(0.2 * 0.5 ** 4)


# ---------------------------------------------------------------------------------------------
# Pretrained starting points
# ---------------------------------------------------------------------------------------------

def _two_class_splits(splits: Splits) -> Splits:
    """The first two classes of splits: a dataset with another class count."""
    train, val = splits.train_labels < 2, splits.val_labels < 2
    return Splits.from_tensors(splits.train_images[train], splits.train_labels[train], splits.val_images[val],
                  splits.val_labels[val], splits.classes[:2], splits.mean, splits.std)


@pytest.fixture(scope="module")
def source_run(tiny_config: TrainConfig, tiny_splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained ResNet-8 (width 4, 3 classes) saved both ways: checkpoint.pt and weights.safetensors."""
    trainer = Trainer(tiny_config.replace(seed=11), tiny_splits, device="cpu")
    trainer.train_epoch()
    state = trainer.state_dict()
    checkpoint_dir = tmp_path_factory.mktemp("run")
    save_checkpoint(checkpoint_dir, state)
    weights_dir = tmp_path_factory.mktemp("export")
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "history")}
    save_weights(weights_dir, trainer.model, meta)
    return {"checkpoint": checkpoint_dir, "weights": weights_dir,
            "model": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


def _assert_body_equal(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    body = [k for k in source if not k.startswith("fc.")]
    assert body and all(torch.equal(state[k], source[k]) for k in body)


@pytest.mark.parametrize("form", ["checkpoint", "weights"])
def test_pretrained_from_a_run_with_another_class_count(source_run: dict, tiny_config: TrainConfig,
                                                        tiny_splits: Splits, form: str) -> None:
    # The config asks for another architecture: the checkpoint's architecture wins.
    config = tiny_config.replace(arch="resnet20", depth=None, width=None, pretrained=str(source_run[form]))
    trainer = Trainer(config, _two_class_splits(tiny_splits), device="cpu")
    assert (trainer.config.arch, trainer.config.depth, trainer.config.width) == ("cifar_resnet", 8, 4)
    assert trainer.model.fc.out_features == 2 and trainer.model.fc.in_features == 16
    _assert_body_equal(trainer.model, source_run["model"])
    assert not torch.equal(trainer.model.fc.weight[:2], source_run["model"]["fc.weight"][:2])  # a new head
    trainer.train_epoch()  # and it trains


@pytest.mark.parametrize("form", ["checkpoint", "weights"])
def test_pretrained_with_the_same_class_count_keeps_the_head(source_run: dict, tiny_config: TrainConfig,
                                                             form: str) -> None:
    model = build_model(tiny_config.replace(pretrained=str(source_run[form])), num_classes=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source_run["model"][key]), key


def test_pretrained_path_may_name_the_file(source_run: dict, tiny_config: TrainConfig) -> None:
    model = build_model(tiny_config.replace(pretrained=str(source_run["checkpoint"] / "checkpoint.pt")), num_classes=3)
    _assert_body_equal(model, source_run["model"])


def test_checkpoint_loads_without_unpickling_objects(source_run: dict) -> None:
    state = load_checkpoint(source_run["checkpoint"])
    assert {"config", "model", "num_classes", "classes", "mean", "std"} <= set(state)
    assert TrainConfig.from_dict(state["config"]).arch == "cifar_resnet"


def test_missing_pretrained_run_is_a_pretrained_error(tiny_config: TrainConfig, tmp_path: Path) -> None:
    config = tiny_config.replace(pretrained=str(tmp_path / "no-such-run"))
    with pytest.raises(PretrainedError, match="no-such-run"):
        build_model(config, num_classes=3)


def test_trainer_with_a_missing_pretrained_run_raises_pretrained_error(tiny_config: TrainConfig, tiny_splits: Splits,
                                                                       tmp_path: Path) -> None:
    """Through the Trainer (the way every run starts) the error must be the same PretrainedError."""
    config = tiny_config.replace(pretrained=str(tmp_path / "no-such-run"))
    with pytest.raises(PretrainedError, match="no-such-run"):
        Trainer(config, tiny_splits, device="cpu")


# --- torchvision ImageNet weights in the torch hub cache (downloads: tests/test_weights.py) -

@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weights cached, and a download is refused at once (a closed local port as the mirror):
    the tests never reach the internet. tests/test_weights.py has the downloads."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TUNE_RESNET_WEIGHTS_URL", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return home


@pytest.fixture(scope="module")
def resnet18_torch_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torch home whose hub cache holds torchvision's ResNet-18 file (random weights, real layout)."""
    home = tmp_path_factory.mktemp("torch-home")
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / Path(weights.url).name)
    return home, state


@pytest.mark.parametrize("pretrained", ["torchvision", "torchvision:resnet18"])
def test_torchvision_without_cached_weights_names_the_cache_path(empty_torch_home: Path, tiny_config: TrainConfig,
                                                                 pretrained: str) -> None:
    config = tiny_config.replace(arch="resnet18", depth=None, pretrained=pretrained)
    with pytest.raises(PretrainedError) as error:
        build_model(config, num_classes=3)
    assert str(empty_torch_home / "hub" / "checkpoints") in str(error.value)
    assert "resnet18" in str(error.value)


def test_torchvision_has_no_weights_for_cifar_resnets(empty_torch_home: Path, tiny_config: TrainConfig) -> None:
    with pytest.raises(PretrainedError, match="resnet18, resnet34, resnet50"):
        build_model(tiny_config.replace(pretrained="torchvision"), num_classes=3)


@pytest.mark.parametrize(("stem", "conv1_loaded"), [("small", False), ("imagenet", True)])
def test_torchvision_weights_from_the_cache(resnet18_torch_home: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch,
                                            tiny_config: TrainConfig, stem: str, conv1_loaded: bool) -> None:
    home, state = resnet18_torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    config = tiny_config.replace(arch="resnet18", depth=None, width=None, stem=stem, pretrained="torchvision")
    model = build_model(config, num_classes=3)
    assert isinstance(model, ResNet) and model.fc.out_features == 3
    ours = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            assert torch.equal(ours[key], value) == conv1_loaded
        else:
            assert torch.equal(ours[key], value), key


def test_checkpoint_of_a_torchvision_start_can_be_a_pretrained_start(
        resnet18_torch_home: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch, tiny_config: TrainConfig,
        tiny_splits: Splits, tmp_path: Path) -> None:
    """The config saved in a checkpoint must describe its model (STYLE: config travels with the model).

    "torchvision:resnet18" builds a ResNet-18 whatever config.arch says; the checkpoint must say resnet18.
    """
    monkeypatch.setenv("TORCH_HOME", str(resnet18_torch_home[0]))
    trainer = Trainer(tiny_config.replace(depth=None, width=None, pretrained="torchvision:resnet18"),
                      tiny_splits, device="cpu")
    assert trainer.model.num_stages == 4  # a ResNet-18 was built
    assert trainer.config.arch == "resnet18"
    save_checkpoint(tmp_path / "run", trainer.state_dict())
    model = build_model(tiny_config.replace(pretrained=str(tmp_path / "run")), num_classes=3)
    _assert_body_equal(model, trainer.model.state_dict())


def test_checkpoint_of_a_fine_tune_at_another_input_size_can_be_a_pretrained_start(
        tiny_config: TrainConfig, tiny_splits: Splits, tmp_path: Path) -> None:
    """stem "auto" depends on input_size: pretrained at 16 px (small stem), fine-tuned at 96 px.

    The fine-tuned model keeps the small stem, so the config it saves must say so; else a
    later start from it builds the 7x7 ImageNet stem and its conv1 weights no longer fit.
    """
    config = tiny_config.replace(arch="resnet18", depth=None, width=4, stem="auto")
    save_checkpoint(tmp_path / "pretrain", Trainer(config, tiny_splits, device="cpu").state_dict())
    finetune = Trainer(config.replace(input_size=96, pretrained=str(tmp_path / "pretrain")), tiny_splits, device="cpu")
    assert isinstance(finetune.model.maxpool, nn.Identity)  # the pretrained (small) stem was kept
    saved = finetune.config
    assert resolve_stem(saved.arch, saved.stem, saved.input_size) == "small"
    save_checkpoint(tmp_path / "finetune", finetune.state_dict())
    model = build_model(config.replace(input_size=96, pretrained=str(tmp_path / "finetune")), num_classes=3)
    _assert_body_equal(model, finetune.model.state_dict())


def test_check_model_finds_what_building_the_model_would_refuse(tmp_path: Path) -> None:
    """The pre-trial check: the freeze must fit the model the run builds, and a pretrained start
    must be there and readable; a good config passes without any memory for weights."""
    from trainables.finetune import check_model

    check_model(TrainConfig(arch="resnet20", freeze="stages", frozen_stages=3))
    check_model(TrainConfig(arch="resnet18", freeze="stages", frozen_stages=4))  # 4 stages there
    with pytest.raises(ValueError, match="^frozen_stages: expected 0..3 for this model, got 4"):
        check_model(TrainConfig(arch="resnet20", freeze="stages", frozen_stages=4))
    with pytest.raises(PretrainedError, match="does not exist"):
        check_model(TrainConfig(pretrained=str(tmp_path / "missing")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot be read"):
        check_model(TrainConfig(pretrained=str(tmp_path / "bad")))


def test_check_model_follows_the_pretrained_runs_architecture(source_run: dict, tiny_config: TrainConfig) -> None:
    """A checkpoint brings its own model: the freeze is checked against it, not the config's arch."""
    from trainables.finetune import check_model

    stages = create_model("cifar_resnet", num_classes=3, depth=8, width=4).num_stages
    check_model(tiny_config.replace(arch="resnet18", pretrained=str(source_run["checkpoint"]), freeze="stages",
                                    frozen_stages=stages))
    with pytest.raises(ValueError, match=f"expected 0..{stages} for this model"):
        check_model(tiny_config.replace(arch="resnet18", pretrained=str(source_run["checkpoint"]), freeze="stages",
                                        frozen_stages=stages + 1))


# ---------------------------------------------------------------------------------------------
# Unfreezing on a schedule: the frozen base first, then everything
# ---------------------------------------------------------------------------------------------

def _stem_and_head(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.conv1.weight.detach().clone(), model.fc.weight.detach().clone()


def test_unfreeze_epoch_trains_the_head_first_then_everything(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    config = tiny_config.replace(freeze="linear", unfreeze_epoch=1, epochs=2, layer_decay=0.5)
    trainer = Trainer(config, tiny_splits, device="cpu")
    stem, head = _stem_and_head(trainer.model)
    trainer.train_epoch()
    trainer.epoch += 1
    after_first = _stem_and_head(trainer.model)
    assert torch.equal(after_first[0], stem) and not torch.equal(after_first[1], head)  # only the head moved
    trainer.train_epoch()
    after_second = _stem_and_head(trainer.model)
    assert not torch.equal(after_second[0], stem)  # the base thawed at epoch 1
    assert all(p.requires_grad for p in trainer.model.parameters())
    # the thawed stem trains at the layer-wise decayed rate: it is in a group of its own scale
    scales = {group["lr_scale"] for group in trainer.optimizer.param_groups
              if any(p is trainer.model.conv1.weight for p in group["params"])}
    assert scales == {0.5 ** (trainer.model.num_stages + 1)}


def test_unfreeze_epoch_resumes_exactly_across_the_switch(tiny_config: TrainConfig, tiny_splits: Splits,
                                                         tmp_path: Path) -> None:
    config = tiny_config.replace(freeze="stages", frozen_stages=2, unfreeze_epoch=2, epochs=3,
                                 optimizer="adamw", lr=0.01, momentum=0.9)
    uninterrupted = Trainer(config, tiny_splits, device="cpu")
    uninterrupted.fit()
    interrupted = Trainer(config, tiny_splits, device="cpu")
    for metrics in interrupted.epochs():
        if metrics.epoch == 2:  # stopped at the switch: the next epoch is the first unfrozen one
            break
    save_checkpoint(tmp_path / "run", interrupted.state_dict())
    resumed = Trainer(config, tiny_splits, device="cpu")
    resumed.load_state_dict(load_checkpoint(tmp_path / "run"))
    resumed.fit()
    for (name, a), b in zip(resumed.model.state_dict().items(), uninterrupted.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in uninterrupted.history]


def test_unfreeze_epoch_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="unfreeze_epoch"):
        check_config(TrainConfig(unfreeze_epoch=-1))
