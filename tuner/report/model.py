"""The refit model in best/: its training curves and test confusion matrix (from best/metrics.json)
and a grid of test images with its predictions (loads the model, torch and the test split)."""

from __future__ import annotations

import math

from .run import BEST_DIR, Run, finite
from .style import pyplot

GRID_IMAGES = 32               # tiles in the test-image grid
GRID_POOL = 512                # test images classified (a seeded sample) to find the mistakes among


def plot_refit(run: Run):
    history = (run.metrics or {}).get("history") or []
    if not history:
        return None
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:blue")
    loss_ax.set(title="Training loss per epoch", xlabel="epoch", ylabel="training loss (cross-entropy, nats)")
    acc_ax.plot(epochs, [h["train_acc"] for h in history], marker="o", color="tab:orange")
    acc_ax.set(title="Training accuracy per epoch", xlabel="epoch",
               ylabel="train_acc (fraction of training images correct)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    test = run.metrics.get("test_acc")
    tested = f", test accuracy {test:.4f}" if finite(test) else ""
    fig.suptitle(f"Refit of the best configuration on train + validation{tested}")
    fig.tight_layout()
    return fig


def _classes(run: Run) -> list[str]:
    if run.meta and run.meta.get("classes"):
        return list(run.meta["classes"])
    return list(((run.metrics or {}).get("test") or {}).get("per_class") or {})


def plot_confusion(run: Run):
    test = (run.metrics or {}).get("test") or {}
    matrix = test.get("confusion_matrix")
    if not matrix:
        return None
    import numpy as np

    plt = pyplot()
    counts, classes = np.array(matrix), _classes(run)
    size = min(12, 3 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images (count)")
    if len(classes) <= 30:  # more names than that cannot be read anyway
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
    if len(classes) <= 15:
        for (row, col), count in np.ndenumerate(counts):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > counts.max() / 2 else "black")
    ax.set(title=f"Test confusion matrix ({test.get('images', counts.sum())} images, "
                 f"accuracy {test.get('accuracy', float('nan')):.4f})",
           xlabel="predicted class", ylabel="true class")
    fig.tight_layout()
    return fig


def _test_predictions(run: Run):
    """(uint8 images (N, 3, H, W), true labels, predicted labels) on a seeded sample of the test split."""
    import torch

    from trainables.data import load_data

    from ..export import load_raw_pixel_model

    model, _ = load_raw_pixel_model(run.folder / BEST_DIR)
    base = run.record.base_config
    data = load_data(base.dataset, base.data_path, input_size=base.input_size, storage_size=base.storage_size)
    index = torch.randperm(len(data.test_labels), generator=torch.Generator().manual_seed(0))[:GRID_POOL]
    images, labels = data.test_images[index], data.test_labels[index]
    with torch.inference_mode():  # the exported contract: float RGB 0-255, normalised inside
        logits = torch.cat([model(images[i:i + 256].float()) for i in range(0, len(index), 256)])
    return images, labels, logits.argmax(1)


def plot_test_images(run: Run):
    if not (run.folder / BEST_DIR / "weights.safetensors").is_file():
        return None
    images, labels, predicted = _test_predictions(run)
    classes = _classes(run)
    wrong = [i for i in range(len(labels)) if predicted[i] != labels[i]]
    shown = (wrong + [i for i in range(len(labels)) if predicted[i] == labels[i]])[:GRID_IMAGES]
    plt = pyplot()
    cols = min(8, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.55 * rows + 0.9), squeeze=False)
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ok = predicted[i] == labels[i]
        ax.set_title(f"{classes[predicted[i]]}\n(true {classes[labels[i]]})", fontsize=7,
                     color="tab:green" if ok else "tab:red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_visible(ax.has_data())
    size = images.shape[-1]
    fig.suptitle(f"Test images: predicted (true) label, mistakes first in red: {len(wrong)} wrong "
                 f"of {len(labels)} sampled", fontsize=10)
    fig.supxlabel(f"each tile: one test image, {size} x {size} pixels", fontsize=8)
    fig.tight_layout()
    return fig
