from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import TrainConfig, check_config, field_names
from trainables.data import Splits
from trainables.train import EpochMetrics, NonFiniteLossError, Trainer, lr_multiplier

TIMING = ("epoch_time_s", "train_images_per_sec")  # the only fields allowed to differ between runs


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in history]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_b = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, state_b[key]), key


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def test_training_learns_the_colours(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    trainer = Trainer(tiny_config.replace(epochs=3), tiny_splits, device="cpu")
    loss_before, acc_before, _ = trainer.evaluate(tiny_splits.train_images, tiny_splits.train_labels)
    history = trainer.fit()
    loss_after, acc_after, _ = trainer.evaluate(tiny_splits.train_images, tiny_splits.train_labels)
    assert loss_after < 0.5 * loss_before
    assert acc_after > 0.9 and acc_after > acc_before
    assert history[-1].train_loss < 0.5 * history[0].train_loss
    assert history[-1].val_acc >= 0.8  # 6 held-out images, 3 easy classes


def test_seeded_run_is_reproducible(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    # every source of randomness on: init, order, flip, crop, cutout, dropout
    config = tiny_config.replace(augment="crop_flip", crop_padding=2, cutout=4, dropout=0.2,
                                 label_smoothing=0.1, schedule="onecycle", epochs=3, seed=5)
    first, second = Trainer(config, tiny_splits, device="cpu"), Trainer(config, tiny_splits, device="cpu")
    first.fit()
    second.fit()
    assert _without_timing(first.history) == _without_timing(second.history)
    _assert_same_weights(first.model, second.model)
    other = Trainer(config.replace(seed=6), tiny_splits, device="cpu")
    other.fit()
    assert _without_timing(other.history) != _without_timing(first.history)


@pytest.mark.parametrize("ema", [0.0, 0.5], ids=["raw", "ema"])
def test_resume_mid_run_continues_exactly(tiny_config: TrainConfig, tiny_splits: Splits, tmp_path: Path,
                                          ema: float) -> None:
    config = tiny_config.replace(augment="crop_flip", crop_padding=2, dropout=0.2, schedule="onecycle",
                                 epochs=4, seed=3, ema=ema)
    uninterrupted = Trainer(config, tiny_splits, device="cpu")
    uninterrupted.fit()

    interrupted = Trainer(config, tiny_splits, device="cpu")
    for metrics in interrupted.epochs():
        if metrics.epoch == 2:
            break
    save_checkpoint(tmp_path / "run", interrupted.state_dict())
    del interrupted
    resumed = Trainer(config, tiny_splits, device="cpu")
    resumed.load_state_dict(load_checkpoint(tmp_path / "run"))
    assert resumed.epoch == 2 and len(resumed.history) == 2
    remaining = resumed.fit()
    assert [m.epoch for m in remaining] == [3, 4]
    assert _without_timing(resumed.history) == _without_timing(uninterrupted.history)
    _assert_same_weights(resumed.model, uninterrupted.model)
    _assert_same_weights(resumed.final_model, uninterrupted.final_model)
    assert resumed.scheduler.last_epoch == uninterrupted.scheduler.last_epoch == uninterrupted.total_steps


def test_ema_is_the_average_of_the_weights_with_the_half_life_asked(tiny_config: TrainConfig,
                                                                      tiny_splits: Splits) -> None:
    config = tiny_config.replace(epochs=2, ema=0.75, schedule="onecycle", batch_size=8)
    trainer = Trainer(config, tiny_splits, device="cpu")
    assert trainer.steps_per_epoch >= 3
    after_each_step = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: after_each_step.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
    history = trainer.fit()
    # by hand: start from the weights after the first step, then x <- d x + (1 - d) w, d^(0.75 epoch) = 1/2
    decay = 0.5 ** (1 / (0.75 * trainer.steps_per_epoch))
    expected = {k: v.double() for k, v in after_each_step[0].items()}
    for state in after_each_step[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k].double() for k in expected}
    averaged = trainer.final_model.state_dict()
    assert trainer.final_model is not trainer.model
    for key, value in expected.items():
        if value.is_floating_point() and key.endswith(("weight", "bias", "running_mean", "running_var")):
            assert torch.allclose(averaged[key].double(), value, atol=1e-5), key
    assert not torch.equal(averaged["fc.weight"], trainer.model.fc.weight.detach())
    # validation scores the average, and the state's "model" is the average
    val_loss, val_acc, _ = trainer.evaluate(tiny_splits.val_images, tiny_splits.val_labels)
    assert (history[-1].val_loss, history[-1].val_acc) == pytest.approx((val_loss, val_acc))
    raw = Trainer(config.replace(ema=0.0), tiny_splits, device="cpu")
    raw.model.load_state_dict(trainer.model.state_dict())
    assert raw.evaluate(tiny_splits.val_images, tiny_splits.val_labels)[0] != pytest.approx(val_loss)
    state = trainer.state_dict()
    _assert_same_weights_state(state["model"], averaged)
    _assert_same_weights_state(state["train_model"], trainer.model.state_dict())


def _assert_same_weights_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_huge_lr_raises_non_finite_loss(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    config = tiny_config.replace(lr=1e6, optimizer="sgd", schedule="constant", warmup_epochs=0.0, epochs=3)
    with pytest.raises(NonFiniteLossError, match="diverged") as error:
        Trainer(config, tiny_splits, device="cpu").fit()
    assert error.value.epoch >= 1 and error.value.step >= 1
    assert not math.isfinite(error.value.loss)


@pytest.mark.parametrize("changes", [
    {"optimizer": "adamw", "lr": 0.01},
    {"label_smoothing": 0.1},
    {"cutout": 4},
    {"augment": "flip"},
    {"augment": "crop_flip", "crop_padding": 2, "cutout": 3},
    {"dropout": 0.3, "nesterov": False},
    {"schedule": "cosine", "warmup_epochs": 1.0},
    {"schedule": "step"},
    {"momentum": 0.0},
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()))
def test_options_train(tiny_config: TrainConfig, tiny_splits: Splits, changes: dict) -> None:
    trainer = Trainer(tiny_config.replace(epochs=2, **changes), tiny_splits, device="cpu")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.val_loss) for m in history)
    assert not torch.equal(before["fc.weight"], trainer.model.fc.weight.detach())
    if changes.get("optimizer") == "adamw":
        assert isinstance(trainer.optimizer, torch.optim.AdamW)


def test_epoch_metrics_are_sane(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    config = tiny_config.replace(epochs=3, schedule="cosine", lr=0.04)
    trainer = Trainer(config, tiny_splits, device="cpu")
    history = trainer.fit()
    assert [m.epoch for m in history] == [1, 2, 3]
    for metrics in history:
        assert isinstance(metrics, EpochMetrics)
        assert 0.0 <= metrics.train_acc <= 1.0 and 0.0 <= metrics.val_acc <= 1.0
        assert metrics.train_loss > 0 and metrics.val_loss > 0
        assert metrics.epoch_time_s > 0 and metrics.train_images_per_sec > 0
        assert set(metrics.to_dict()) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                          "epoch_time_s", "train_images_per_sec"}
    assert history[-1].lr == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    assert history[0].lr == pytest.approx(0.04 * lr_multiplier(trainer.steps_per_epoch, schedule="cosine",
                                                               total_steps=trainer.total_steps, warmup_steps=0))
    assert trainer.history == [m.to_dict() for m in history]
    json.dumps(trainer.history)  # plain numbers, ready for a report


def test_val_metrics_are_those_of_evaluate(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    trainer = Trainer(tiny_config.replace(epochs=1), tiny_splits, device="cpu")
    (metrics,) = trainer.fit()
    val_loss, val_acc, predictions = trainer.evaluate(tiny_splits.val_images, tiny_splits.val_labels)
    assert (metrics.val_loss, metrics.val_acc) == pytest.approx((val_loss, val_acc))
    assert predictions.shape == tiny_splits.val_labels.shape
    assert val_acc == pytest.approx((predictions == tiny_splits.val_labels).float().mean().item())


def test_evaluate_does_not_depend_on_the_eval_batch_size(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    whole = Trainer(tiny_config, tiny_splits, device="cpu")
    chunked = Trainer(tiny_config.replace(eval_batch_size=5), tiny_splits, device="cpu")
    a = whole.evaluate(tiny_splits.train_images, tiny_splits.train_labels)
    b = chunked.evaluate(tiny_splits.train_images, tiny_splits.train_labels)
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == b[1] and torch.equal(a[2], b[2])


def test_train_acc_counts_the_images_actually_seen(tiny_splits: Splits, tiny_config: TrainConfig) -> None:
    """One class: every prediction is right, so train_acc must be 1, also when the data is under one batch."""
    n = 20
    splits = Splits.from_tensors(tiny_splits.train_images[:n], torch.zeros(n, dtype=torch.int64),
                    tiny_splits.val_images, torch.zeros(len(tiny_splits.val_labels), dtype=torch.int64),
                    ["only"], tiny_splits.mean, tiny_splits.std)
    for batch_size in (10, 32):  # 2 full batches; 1 batch of 20 < batch_size
        (metrics,) = Trainer(tiny_config.replace(batch_size=batch_size, epochs=1), splits, device="cpu").fit()
        assert metrics.val_acc == 1.0
        assert metrics.train_acc == 1.0, f"batch_size={batch_size}"


def test_onecycle_with_a_single_step(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    """One epoch of one batch (a smoke test, a tiny subset) must train, not divide by zero."""
    config = tiny_config.replace(schedule="onecycle", epochs=1, batch_size=len(tiny_splits.train_labels))
    trainer = Trainer(config, tiny_splits, device="cpu")
    assert trainer.total_steps == 1
    (metrics,) = trainer.fit()
    assert math.isfinite(metrics.train_loss)


def test_state_dict_carries_what_a_user_needs(tiny_config: TrainConfig, tiny_splits: Splits, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config.replace(epochs=1), tiny_splits, device="cpu")
    trainer.fit()
    save_checkpoint(tmp_path, trainer.state_dict())
    state = load_checkpoint(tmp_path)  # weights_only: plain values only
    assert TrainConfig.from_dict(state["config"]) == trainer.config
    assert state["classes"] == tiny_splits.classes and state["num_classes"] == 3
    assert state["mean"] == pytest.approx(list(tiny_splits.mean)) and state["epoch"] == 1
    assert len(state["history"]) == 1


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

def _curve(schedule: str, total: int, warmup: int = 0) -> list[float]:
    return [lr_multiplier(step, total_steps=total, warmup_steps=warmup, schedule=schedule) for step in range(total + 1)]


def test_onecycle_peaks_at_a_quarter_and_ends_near_zero() -> None:
    curve = _curve("onecycle", 100)
    assert max(curve) == pytest.approx(1.0)
    assert curve.index(max(curve)) in (24, 25)  # the peak at 25% of the steps
    assert curve[0] == pytest.approx(1 / 25)
    assert all(a < b for a, b in zip(curve[:24], curve[1:25]))  # up...
    assert all(a >= b for a, b in zip(curve[25:], curve[26:]))  # ...then down
    assert curve[99] < 0.02 and curve[100] == pytest.approx(0.0)


def test_cosine_ends_near_zero() -> None:
    curve = _curve("cosine", 100)
    assert curve[0] == pytest.approx(1.0) and curve[50] == pytest.approx(0.5) and curve[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(curve, curve[1:]))


def test_step_decays_tenfold_at_half_and_three_quarters() -> None:
    curve = _curve("step", 100)
    assert curve[:50] == pytest.approx([1.0] * 50)
    assert curve[50:75] == pytest.approx([0.1] * 25)
    assert curve[75:100] == pytest.approx([0.01] * 25)


def test_constant_is_constant() -> None:
    assert _curve("constant", 20) == [1.0] * 21


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_linear_warmup(schedule: str) -> None:
    curve = _curve(schedule, 100, warmup=10)
    assert curve[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert curve[10] == pytest.approx(1.0)
    assert curve[10:] == pytest.approx(_curve(schedule, 90))  # then the schedule over the remaining steps


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
@pytest.mark.parametrize("total_steps", [1, 2, 3, 7])
def test_every_step_the_scheduler_asks_for_is_defined(schedule: str, total_steps: int) -> None:
    """LambdaLR asks for steps 0..total_steps (the last after the final optimizer step)."""
    for step in range(total_steps + 1):
        value = lr_multiplier(step, total_steps=total_steps, warmup_steps=0, schedule=schedule)
        assert 0.0 <= value <= 1.0, (step, value)


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("schedule", "linear"), ("optimizer", "adam"), ("freeze", "all"), ("augment", "autoaugment"),
    ("stem", "deep"), ("lr", 0.0), ("lr", -0.1), ("batch_size", 0), ("epochs", 0), ("input_size", 0),
    ("eval_batch_size", 0), ("val_fraction", 0.0), ("val_fraction", 1.0), ("train_subset", 0),
    ("dropout", 1.0), ("dropout", -0.1), ("layer_decay", 0.0), ("layer_decay", 1.5), ("ema", -0.5),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("momentum", 1.0), ("weight_decay", -1e-4),
    ("warmup_epochs", -1.0), ("crop_padding", -4), ("cutout", -8), ("frozen_stages", -1),
    ("lr", "hello"), ("lr", float("inf")), ("nesterov", "yes"), ("batch_size", True), ("width", 0),
    ("width", "sixteen"), ("input_size", 4), ("arch", None),
])
def test_check_config_names_the_bad_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{key}:") as error:
        check_config(TrainConfig().replace(**{key: value}))
    assert repr(value) in str(error.value)


def test_check_config_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="cosine, onecycle, step, constant"):
        check_config(TrainConfig(schedule="linear"))


def test_trainer_validates_its_config(tiny_config: TrainConfig, tiny_splits: Splits) -> None:
    with pytest.raises(ValueError, match="^optimizer:"):
        Trainer(tiny_config.replace(optimizer="rmsprop"), tiny_splits, device="cpu")


def test_default_config_is_valid() -> None:
    check_config(TrainConfig())


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown training config keys") as error:
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1, "epoch": 3})
    assert "['epoch', 'learning_rate']" in str(error.value)


def test_config_round_trips_through_json() -> None:
    config = TrainConfig(arch="resnet18", width=32, lr=0.01, train_subset=500, pretrained="torchvision")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(config.to_dict()) == set(field_names())


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        TrainConfig().lr = 1.0  # type: ignore[misc]
