"""Refit: the best configuration retrained on train + validation, tested once, saved to
RUN_DIR/best (metrics.json written once, with the search's val_acc), then exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.run import run_training

from .errors import ExportError, Say, warn
from .export import DEFAULT_FORMATS, export_model
from .storage import BEST_DIR



def refit_config(base: TrainConfig, best_config: dict[str, Any], epochs: int) -> TrainConfig:
    return base.replace(**best_config, epochs=epochs)


def refit_best(run_dir: str, found: Any, spec: Any, base: TrainConfig, say: Say = print,
               warn: Say = warn) -> dict[str, Any]:
    """found: results.SearchResults of the search; spec: its SearchSpec."""
    summary = found.summary
    warm = warm_start_checkpoint(found.trials, summary) if spec.refit.warm_start else None
    return refit(run_dir, config=refit_config(base, summary.refit_config, spec.refit.epochs or spec.budget.max_epochs),
                 val_acc=summary.refit_val_acc, warm_start_from=warm, formats=spec.export.formats, say=say, warn=warn)


def warm_start_checkpoint(trials: list[dict[str, Any]], summary: Any) -> str | None:
    """The latest checkpoint of the refit's configuration: its search trial's, or after a
    confirmation (which prunes nothing) its best-scoring run's that still has one."""
    chosen = summary.refit_trial_id
    mine = [t for t in trials if t["checkpoint"] and chosen in (t["trial_id"], t.get("confirm_of"))]
    key, sign = f"best_{summary.metric}", 1.0 if summary.mode == "max" else -1.0
    mine.sort(key=lambda t: sign * t[key] if t.get(key) is not None else -float("inf"), reverse=True)
    return mine[0]["checkpoint"] if mine else None


def refit(run_dir: str, *, config: TrainConfig, val_acc: float | None, warm_start_from: str | None = None,
          formats: Sequence[str] = DEFAULT_FORMATS, say: Say = print, warn: Say = warn) -> dict[str, Any]:
    out = Path(run_dir) / BEST_DIR
    initial = load_checkpoint(warm_start_from)["model"] if warm_start_from else None
    data = load_data(config.dataset, config.data_path, input_size=config.input_size,
                     storage_size=config.storage_size)  # its errors come first
    say(f"refit: {config.arch} on train + validation for {config.epochs} epochs -> {out}")
    with tqdm(total=config.epochs, desc="refit", unit="epoch", leave=False) as bar:
        def on_epoch(metrics):
            bar.set_postfix(train_loss=f"{metrics.train_loss:.3f}", img_s=f"{metrics.train_images_per_sec:.0f}")
            bar.update()
        metrics = run_training(config, out_dir=out, data=data, refit=True, on_epoch=on_epoch, initial_state=initial,
                               extra_metrics={"search_val_acc": val_acc})
    searched = f" (search val_acc {val_acc:.4f})" if val_acc is not None else ""
    say(f"test accuracy {metrics['test_acc']:.4f} on {metrics['test']['images']} images{searched}")
    try:
        written = export_model(out, formats=formats)
    except ExportError as error:  # the refit model is saved: a failed export must not lose it
        warn(f"export failed: {error}; fix it, then run: tune-resnet export {run_dir}")
        return metrics
    say(f"exported {', '.join(path.name for path in written.values())}, labels.txt, README.md to {out}")
    return metrics
