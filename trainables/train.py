"""The training loop: a plain object of (config, splits), no Ray, no CLI.

    trainer = Trainer(config, splits)
    for metrics in trainer.epochs():   # one EpochMetrics per epoch, from wherever it stands
        ...                            # report, checkpoint (trainer.state_dict()), stop early

Resuming continues exactly: every epoch's data order, augmentation and dropout come from
generators seeded by (seed, epoch), so a run restored at an epoch boundary replays the same
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .config import TrainConfig, check_config
from .data import Splits, augment, normalize
from .finetune import apply_freeze, build_model, keep_frozen_statistics, model_config_of, param_groups

NAN_CHECK_EVERY = 64  # steps; checking every step would sync the GPU every step
CHUNK_IMAGES = 16_384  # 32x32-pixel equivalents augmented together (200 MB of float32)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the configuration diverged."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}: the run diverged")
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int                  # 1-based: epochs completed
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float                   # at the end of the epoch, head group
    epoch_time_s: float         # train + validation
    train_images_per_sec: float  # training steps alone

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU: they appear as a run trains and slow every kernel
    that meets them (measured: 10% of a ResNet-20 epoch). Call it first thing in a process: OpenMP
    worker threads copy the floating-point mode of the thread that starts them."""
    torch.set_flush_denormal(True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule: a multiplier of the peak lr per optimizer step
# ---------------------------------------------------------------------------------------------

def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    # 1) onecycle: linear up over the first 25% of steps, then linear down to zero
    if schedule == "onecycle":
        peak = max(1, int(0.25 * total_steps))
        return (step + 1) / peak if step < peak else max(0.0, (total_steps - step) / max(1, total_steps - peak))
    # 2) linear warm-up for the others
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    # 3) the decay proper
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":  # x0.1 at half and at three quarters of the run
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0  # constant


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------

class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, per step.

    avg <- decay * avg + (1 - decay) * weights after every optimizer step; the first update copies.
    torch.optim.swa_utils.AveragedModel does the same, but regroups every tensor on each call and
    updates integer buffers (BatchNorm's batch counts) one tensor at a time with four kernels each:
    on a GPU that host work cost 20% of a ResNet-20 epoch (bench/README.md, "the weight average's
    cost"). Here the tensor lists are made once (parameters and buffers are updated in place, so
    the references stay valid) and each step is one fused lerp and one fused copy.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.started = False
        averaged, weights = self._tensors(self.module), self._tensors(model)
        floats = [a.is_floating_point() for a in averaged]
        self._avg_floats = [a for a, f in zip(averaged, floats) if f]
        self._floats = [w for w, f in zip(weights, floats) if f]
        self._avg_others = [a for a, f in zip(averaged, floats) if not f]
        self._others = [w for w, f in zip(weights, floats) if not f]

    @staticmethod
    def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*model.parameters(), *model.buffers())]

    @torch.no_grad()
    def update(self) -> None:
        if self._avg_floats:
            if self.started:
                torch._foreach_lerp_(self._avg_floats, self._floats, 1.0 - self.decay)
            else:
                torch._foreach_copy_(self._avg_floats, self._floats)
        if self._avg_others:
            torch._foreach_copy_(self._avg_others, self._others)
        self.started = True


class Trainer:
    def __init__(self, config: TrainConfig, splits: Splits, *, device: torch.device | str | None = None):
        check_config(config)
        self.config = model_config_of(config)
        self.splits = splits
        self.device = torch.device(device) if device is not None else default_device()
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            flush_denormals()
        torch.manual_seed(config.seed)  # model initialisation
        self.model = build_model(self.config, num_classes=len(splits.classes))
        self.frozen = apply_freeze(self.model, config.freeze, config.frozen_stages)
        self.model.to(self.device, memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = max(1, len(splits.train_labels) // config.batch_size)  # drop_last
        # Batches are augmented CHUNK_IMAGES at a time: per-batch kernels would bound small models
        # by launch overhead on a GPU; the chunk bounds memory for large images.
        self.chunk_steps = max(1, CHUNK_IMAGES * 32 * 32 // (config.batch_size * config.input_size ** 2))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        # An exponential moving average of the weights (BatchNorm statistics included) is what
        # validation scores, the test measures and exports ship. At a high learning rate the raw
        # weights bounce around the valley floor; the average sits near it, so an early epoch's
        # score says more about where the run will end (what ASHA's early rungs decide on).
        self.ema: WeightAverage | None = None
        if config.ema > 0:
            decay = 0.5 ** (1.0 / (config.ema * self.steps_per_epoch))  # per optimizer step
            self.ema = WeightAverage(self.model, decay)
        # Data lives on the device as uint8 (4x smaller than float); batches are made from it.
        self.train_x = splits.train_images.to(self.device)
        self.train_y = splits.train_labels.to(self.device)
        self.val_x = splits.val_images.to(self.device)
        self.val_y = splits.val_labels.to(self.device)
        self.mean = torch.tensor(splits.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(splits.std, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        groups = param_groups(self.model, config)
        for group in groups:
            group["lr"] = config.lr * group["lr_scale"]
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999), fused=self.cuda or None)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)

    def _lr_lambda(self, step: int) -> float:
        warmup = int(self.config.warmup_epochs * self.steps_per_epoch)
        return lr_multiplier(step, total_steps=self.total_steps, warmup_steps=warmup, schedule=self.config.schedule)

    # --- one epoch ---------------------------------------------------------------------------

    def train_epoch(self) -> tuple[float, float, float]:
        """(mean train loss, train accuracy, training images per second) of one epoch."""
        config, epoch = self.config, self.epoch
        generator = torch.Generator(device=self.device).manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout
        order = torch.randperm(len(self.train_y), generator=generator, device=self.device)
        self.model.train()
        keep_frozen_statistics(self.frozen)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        self._sync()
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            if step % self.chunk_steps == 0:  # augment many batches at once: fewer, larger kernels
                chunk = order[step * config.batch_size:(step + self.chunk_steps) * config.batch_size]
                chunk_images, chunk_labels = self._train_batch(chunk, generator), self.train_y[chunk]
            offset = (step % self.chunk_steps) * config.batch_size
            images = chunk_images[offset:offset + config.batch_size]
            labels = chunk_labels[offset:offset + config.batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                logits = self.forward(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
            total_loss += loss.detach()
            correct += (logits.argmax(1) == labels).sum()
            if (step + 1) % NAN_CHECK_EVERY == 0:
                self._check_finite(total_loss, step)
        self._check_finite(total_loss, self.steps_per_epoch - 1)
        elapsed = time.perf_counter() - start
        seen = min(self.steps_per_epoch * config.batch_size, len(self.train_y))  # a short set: one small batch
        return total_loss.item() / self.steps_per_epoch, correct.item() / seen, seen / elapsed

    def _train_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        config = self.config
        images = normalize(self.train_x[index], self.mean, self.std)
        if config.augment != "none" or config.cutout:
            crop = config.crop_padding if config.augment == "crop_flip" else 0
            images = augment(images, flip=config.augment != "none", crop_padding=crop,
                             cutout=config.cutout, generator=generator)
        return images.contiguous(memory_format=torch.channels_last) if self.cuda else images

    def _check_finite(self, total_loss: torch.Tensor, step: int) -> None:
        value = total_loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(self.epoch + 1, step + 1, value)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def final_model(self) -> torch.nn.Module:
        """The model that is evaluated and shipped: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @torch.inference_mode()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(mean loss, accuracy, predictions) on uint8 images, in eval mode, no augmentation."""
        model = self.ema.module if self.ema is not None else self.forward
        model.eval()
        total_loss, predictions = 0.0, []
        for start in range(0, len(labels), self.config.eval_batch_size):
            batch = normalize(images[start:start + self.config.eval_batch_size].to(self.device), self.mean, self.std)
            target = labels[start:start + self.config.eval_batch_size].to(self.device)
            if self.cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                logits = model(batch).float()
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            predictions.append(logits.argmax(1).cpu())
        predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        accuracy = (predictions == labels.cpu()).float().mean().item() if len(labels) else float("nan")
        return total_loss / max(1, len(labels)), accuracy, predictions

    # --- the run -----------------------------------------------------------------------------

    def epochs(self) -> Iterator[EpochMetrics]:
        """Train the remaining epochs, yielding metrics after each (validation included)."""
        while self.epoch < self.config.epochs:
            start = time.perf_counter()
            train_loss, train_acc, images_per_sec = self.train_epoch()
            val_loss, val_acc = self.evaluate(self.val_x, self.val_y)[:2] if len(self.val_y) else (math.nan, math.nan)
            self.epoch += 1
            metrics = EpochMetrics(self.epoch, train_loss, train_acc, val_loss, val_acc,
                                   self.optimizer.param_groups[-1]["lr"], time.perf_counter() - start,
                                   images_per_sec)
            self.history.append(metrics.to_dict())
            yield metrics

    def fit(self) -> list[EpochMetrics]:
        return list(self.epochs())

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly, plus what a user of the model needs (config, classes...).

        "model" holds the weights to use (the average, with ema); "train_model" the weights training
        continues from, when they differ."""
        extra = {"train_model": self.model.state_dict()} if self.ema is not None else {}
        return {"config": self.config.to_dict(), "model": self.final_model.state_dict(), **extra,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch, "history": list(self.history), "classes": list(self.splits.classes),
                "num_classes": len(self.splits.classes), "mean": list(self.splits.mean),
                "std": list(self.splits.std)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.started = state["epoch"] > 0  # not started: the next update copies
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
