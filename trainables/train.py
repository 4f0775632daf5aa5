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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import Splits, augment, center_crop, normalize
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


def channels_last_is_faster(device: torch.device) -> bool:
    """NHWC tensors and weights: faster on CUDA (tensor cores) and on the CPU too, where oneDNN's
    convolutions run NHWC natively (bench/README.md, "channels_last on the CPU, measured": the
    project's ResNet-20 loop at 1.34x its NCHW self on 2 cores, 2026-12-03)."""
    return True


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


class SplitImages:
    """One split's uint8 images as the loop reads them. On a GPU with room (device_data_share of its
    memory), the split is copied there once and batches are device gathers, as before. Otherwise the
    images stay memory-mapped on the host, shared by every process of the node: each chunk of
    batches is gathered there and, on a GPU, copied from pinned memory asynchronously."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None,
                 device: torch.device, *, on_device: bool):
        self.device = device
        self.labels = (labels[index] if index is not None else labels).to(device)
        if on_device and device.type != "cpu":
            rows = index if index is not None else torch.arange(len(labels))
            self.images = torch.empty((len(rows), *images.shape[1:]), dtype=torch.uint8, device=device)
            for start in range(0, len(rows), 4096):  # in pieces: no host copy of the whole split
                self.images[start:start + 4096] = images[rows[start:start + 4096]].to(device)
            self.index = None
        else:
            self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streams(self) -> bool:
        """Batches come from host memory to a GPU (worth prefetching)."""
        return self.device.type == "cuda" and self.images.device.type == "cpu"

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 images at these positions of the split, on the device."""
        if self.images.device == self.device or self.images.device.type == self.device.type == "cpu":
            rows = positions if self.index is None else self.index[positions.cpu()]
            return self.images[rows.to(self.images.device)]
        rows = positions.cpu() if self.index is None else self.index[positions.cpu()]
        return self.images[rows].pin_memory().to(self.device, non_blocking=True)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) on the device, in order."""
        for start in range(0, len(self), batch_size):
            positions = torch.arange(start, min(start + batch_size, len(self)))
            yield self.gather(positions), self.labels[start:start + batch_size]


def fits_on_device(images: torch.Tensor, index: torch.Tensor | None, device: torch.device, share: float) -> bool:
    """Whether a split's uint8 images take at most `share` of the GPU's memory."""
    if device.type != "cuda":
        return False
    rows = len(index) if index is not None else len(images)
    nbytes = rows * images[0].numel()
    return nbytes <= share * torch.cuda.get_device_properties(device).total_memory


class Trainer:
    def __init__(self, config: TrainConfig, splits: Splits, *, device: torch.device | str | None = None):
        self.config = model_config_of(config).replace(storage_size=config.image_storage_size)
        self.splits = splits
        self.device = torch.device(device) if device is not None else default_device()
        self.cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last_is_faster(self.device) else torch.contiguous_format
        if not self.cuda:
            flush_denormals()
        torch.manual_seed(config.seed)  # model initialisation
        self.model = build_model(self.config, num_classes=len(splits.classes))
        self.frozen = apply_freeze(self.model, config.freeze, config.frozen_stages)
        self.model.to(self.device, memory_format=self.memory_format)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = max(1, len(splits.train_index) // config.batch_size)  # drop_last
        # Batches are augmented CHUNK_IMAGES at a time: per-batch kernels would bound small models
        # by launch overhead on a GPU; the chunk bounds memory for large images.
        stored = self.config.storage_size
        self.chunk_steps = max(1, CHUNK_IMAGES * 32 * 32 // (config.batch_size * stored ** 2))
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
        # uint8 data (4x smaller than float): on the GPU when it fits, else mapped on the host
        on_device = fits_on_device(splits.images, splits.train_index, self.device, config.device_data_share)
        self.train_data = SplitImages(splits.images, splits.labels, splits.train_index, self.device, on_device=on_device)
        self.val_data = SplitImages(splits.images, splits.labels, splits.val_index, self.device, on_device=on_device)
        self.mean = torch.tensor(splits.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(splits.std, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        # with an unfreeze epoch, frozen parameters are in the optimizer from the start: without a
        # gradient they are skipped until they thaw, and the optimizer's state covers the whole run
        groups = param_groups(self.model, config, include_frozen=config.unfreeze_epoch > 0)
        for group in groups:
            group["lr"] = config.lr * group["lr_scale"]
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999), fused=self.cuda or None)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)

    def _lr_lambda(self, step: int) -> float:
        warmup = int(self.config.warmup_epochs * self.steps_per_epoch)
        return lr_multiplier(step, total_steps=self.total_steps, warmup_steps=warmup, schedule=self.config.schedule)

    def _unfreeze_if_due(self) -> None:
        """From unfreeze_epoch on, the whole network trains (frozen BatchNorm statistics adapt too)."""
        due = self.config.unfreeze_epoch and self.epoch >= self.config.unfreeze_epoch
        if due and (self.frozen or not all(p.requires_grad for p in self.model.parameters())):
            self.model.requires_grad_(True)
            self.frozen = []

    # --- one epoch ---------------------------------------------------------------------------

    def train_epoch(self) -> tuple[float, float, float]:
        """(mean train loss, train accuracy, training images per second) of one epoch."""
        config, epoch = self.config, self.epoch
        self._unfreeze_if_due()
        generator = torch.Generator(device=self.device).manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout
        order = torch.randperm(len(self.train_data), generator=generator, device=self.device)
        self.model.train()
        keep_frozen_statistics(self.frozen)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        self._sync()
        start = time.perf_counter()
        chunks = self._chunks(order)
        for step in range(self.steps_per_epoch):
            if step % self.chunk_steps == 0:  # augment many batches at once: fewer, larger kernels
                raw, chunk_labels = next(chunks)
                chunk_images = self._train_batch(raw, generator)
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
        chunks.close()
        self._check_finite(total_loss, self.steps_per_epoch - 1)
        elapsed = time.perf_counter() - start
        seen = min(self.steps_per_epoch * config.batch_size, len(self.train_data))  # a short set: one small batch
        return total_loss.item() / self.steps_per_epoch, correct.item() / seen, seen / elapsed

    def _chunks(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of each chunk of the epoch's order, on the device. Streamed from
        the host to a GPU, the next chunk is gathered and copied in a thread while this one trains."""
        size = self.chunk_steps * self.config.batch_size
        pieces = [order[start:start + size] for start in range(0, self.steps_per_epoch * self.config.batch_size, size)]
        if not pieces:  # fewer images than one batch: one short batch (see steps_per_epoch)
            pieces = [order]
        fetch = lambda positions: (self.train_data.gather(positions), self.train_data.labels[positions])
        if not self.train_data.streams:
            yield from (fetch(positions) for positions in pieces)
            return
        with ThreadPoolExecutor(1) as pool:  # torch's gather and copy release the GIL
            ahead = pool.submit(fetch, pieces[0])
            for positions in pieces[1:]:
                ready, ahead = ahead.result(), pool.submit(fetch, positions)
                yield ready
            yield ahead.result()

    def _train_batch(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> augmented float (N, 3, input_size, input_size)."""
        config = self.config
        images = normalize(images, self.mean, self.std)
        if config.augment == "resized_crop":
            images = augment(images, flip=True, crop_padding=0, cutout=config.cutout, generator=generator,
                             size=config.input_size, resized_crop=(config.crop_scale, config.crop_ratio))
        elif config.augment == "crop_flip":
            images = augment(images, flip=True, crop_padding=config.crop_padding, cutout=config.cutout,
                             generator=generator, size=config.input_size)
        else:  # none, or flip without a crop: the evaluation's centre crop
            images = center_crop(images, config.input_size)
            if config.augment == "flip" or config.cutout:
                images = augment(images, flip=config.augment == "flip", crop_padding=0, cutout=config.cutout,
                                 generator=generator)
        return images.contiguous(memory_format=self.memory_format)

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

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(mean loss, accuracy, predictions) on uint8 (N, 3, S, S) images: eval mode, their centre
        crop, no augmentation. The images may be a memory map: batches are read as they go."""
        on_device = images.device.type == self.device.type and self.device.type != "cpu"
        return self._evaluate(SplitImages(images, labels, None, self.device, on_device=on_device))

    @torch.inference_mode()
    def _evaluate(self, data: SplitImages) -> tuple[float, float, torch.Tensor]:
        model = self.ema.module if self.ema is not None else self.forward
        model.eval()
        total_loss, predictions = 0.0, []
        for images, target in data.batches(self.config.eval_batch_size):
            batch = normalize(center_crop(images, self.config.input_size), self.mean, self.std)
            batch = batch.contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                logits = model(batch).float()
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            predictions.append(logits.argmax(1).cpu())
        predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        accuracy = (predictions == data.labels.cpu()).float().mean().item() if len(data) else float("nan")
        return total_loss / max(1, len(data)), accuracy, predictions

    # --- the run -----------------------------------------------------------------------------

    def epochs(self) -> Iterator[EpochMetrics]:
        """Train the remaining epochs, yielding metrics after each (validation included)."""
        while self.epoch < self.config.epochs:
            start = time.perf_counter()
            train_loss, train_acc, images_per_sec = self.train_epoch()
            val_loss, val_acc = self._evaluate(self.val_data)[:2] if len(self.val_data) else (math.nan, math.nan)
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
