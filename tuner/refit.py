"""Refit: the best configuration retrained on train + validation, tested once, saved to RUN_DIR/best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import click
from tqdm import tqdm

from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.run import run_training

from .export import DEFAULT_FORMATS, ExportError, export_model

BEST_DIR = "best"


def refit_config(base: dict[str, Any], best_config: dict[str, Any], epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({**base, **best_config, "epochs": epochs})


def refit_best(run_dir: str, found: Any, spec: Any, base: dict[str, Any]) -> dict[str, Any]:
    summary = found.summary
    best = next(t for t in found.trials if t["trial_id"] == summary["best_trial_id"])
    warm = best["checkpoint"] if spec.refit.warm_start else None
    return refit(run_dir, base=base, best_config=summary["best_config"],
                 epochs=spec.refit.epochs or spec.budget.max_epochs, val_acc=summary["best_val_acc"],
                 warm_start_from=warm, formats=spec.export.formats)


def refit(run_dir: str, *, base: dict[str, Any], best_config: dict[str, Any], epochs: int,
          val_acc: float | None, warm_start_from: str | None = None,
          formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Any]:
    config = refit_config(base, best_config, epochs)
    out = Path(run_dir) / BEST_DIR
    initial = load_checkpoint(warm_start_from)["model"] if warm_start_from else None
    data = load_data(config.dataset, config.data_path, input_size=config.input_size,
                     storage_size=config.storage_size)  # its errors come first
    click.echo(f"refit: {config.arch} on train + validation for {epochs} epochs -> {out}")
    with tqdm(total=epochs, desc="refit", unit="epoch", leave=False) as bar:
        def on_epoch(metrics):
            bar.set_postfix(train_loss=f"{metrics.train_loss:.3f}", img_s=f"{metrics.train_images_per_sec:.0f}")
            bar.update()
        metrics = run_training(config, out_dir=out, data=data, refit=True, on_epoch=on_epoch, initial_state=initial)
    metrics["search_val_acc"] = val_acc
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    searched = f" (search val_acc {val_acc:.4f})" if val_acc is not None else ""
    click.echo(f"test accuracy {metrics['test_acc']:.4f} on {metrics['test']['images']} images{searched}")
    try:
        written = export_model(out, formats=formats)
    except ExportError as error:  # the refit model is saved: a failed export must not lose it
        click.echo(f"export failed: {error}; fix it, then run: tune-resnet export {run_dir}", err=True)
        return metrics
    click.echo(f"exported {', '.join(path.name for path in written.values())}, labels.txt, README.md to {out}")
    return metrics
