"""One training run of one configuration, written to a folder: `tune-resnet train` and the refit.

A refit trains on train + validation and then, and only then, evaluates the test split, once.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import save_checkpoint, save_weights
from .config import TrainConfig
from .data import ImageData, load_data, make_splits
from .models import count_macs, count_parameters
from .train import EpochMetrics, Trainer

METRICS_FILE = "metrics.json"


def run_training(config: TrainConfig, *, out_dir: str | Path, data: ImageData | None = None,
                 refit: bool = False, device: str | None = None,
                 on_epoch: Callable[[EpochMetrics], None] | None = None,
                 initial_state: dict[str, Any] | None = None,
                 extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train config to the end, save checkpoint + weights + metrics.json in out_dir, return metrics.

    refit=True: train on train + validation, then evaluate the test split once.
    initial_state: model weights to start from (a refit warm-started from the best trial).
    extra_metrics: written into metrics.json with the rest (the refit's search val_acc): the file
    is written here, once.
    """
    start = time.perf_counter()
    data = data or load_data(config.dataset, config.data_path, input_size=config.input_size,
                             storage_size=config.storage_size)
    splits = make_splits(data, val_fraction=config.val_fraction, seed=config.seed,
                         train_subset=config.train_subset, merge_val=refit)
    trainer = Trainer(config, splits, device=device)
    if initial_state is not None:
        trainer.model.load_state_dict(initial_state)
    for metrics in trainer.epochs():
        if on_epoch:
            on_epoch(metrics)
    out_dir = Path(out_dir)
    state = trainer.state_dict()
    save_checkpoint(out_dir, state)
    save_weights(out_dir, trainer.final_model, {k: v for k, v in state.items()
                                                if k not in ("model", "train_model", "optimizer", "scheduler")})
    summary = _summary(trainer, refit)
    if refit:
        summary["test"] = evaluate_test(trainer, data)
        summary["test_acc"] = summary["test"]["accuracy"]
    # from the call to the test accuracy: data (cache), model build, training, checkpoint, test
    summary["wall_time_s"] = time.perf_counter() - start
    summary.update(extra_metrics or {})
    (out_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _summary(trainer: Trainer, refit: bool) -> dict[str, Any]:
    last = trainer.history[-1] if trainer.history else {}
    speeds = [h["train_images_per_sec"] for h in trainer.history]
    return {
        "epochs": trainer.epoch,
        "val_acc": None if refit else last.get("val_acc"),  # a refit has no validation split left
        "val_loss": None if refit else last.get("val_loss"),
        "train_loss": last.get("train_loss"),
        "train_images": len(trainer.splits.train_labels),
        # median over epochs: robust to the first epoch's warm-up (allocator, caches, compile)
        "train_images_per_sec": statistics.median(speeds) if speeds else None,
        "train_time_s": sum(h["epoch_time_s"] for h in trainer.history),  # epochs, validation included
        "parameters": count_parameters(trainer.model),
        "macs_per_image": _macs(trainer),
        "device": str(trainer.device),
        "history": trainer.history,
    }


def _macs(trainer: Trainer) -> int:
    """Of one image, on a CPU copy in eval mode: a forward in train mode would move BatchNorm's statistics."""
    return count_macs(copy.deepcopy(trainer.final_model).cpu().eval(), trainer.config.input_size)


def evaluate_test(trainer: Trainer, data: ImageData) -> dict[str, Any]:
    """Accuracy, loss, per-class precision and recall and the confusion matrix on the test split."""
    loss, accuracy, predictions = trainer.evaluate(data.test_images, data.test_labels)
    num_classes = len(data.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # rows: true, columns: predicted
    confusion.index_put_((data.test_labels, predictions), torch.ones_like(predictions), accumulate=True)
    true_positive = confusion.diag().double()
    precision = true_positive / confusion.sum(0).clamp_min(1)
    recall = true_positive / confusion.sum(1).clamp_min(1)
    return {"accuracy": accuracy, "loss": loss, "images": len(data.test_labels),
            "per_class": {name: {"precision": p, "recall": r} for name, p, r
                          in zip(data.classes, precision.tolist(), recall.tolist())},
            "confusion_matrix": confusion.tolist()}
