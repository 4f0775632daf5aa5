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
from .pareto import Choice, choice
from .storage import BEST_DIR



def refit_config(base: TrainConfig, best_config: dict[str, Any], epochs: int) -> TrainConfig:
    return base.replace(**best_config, epochs=epochs)


def refit_best(run_dir: str, found: Any, spec: Any, base: TrainConfig, say: Say = print,
               warn: Say = warn) -> dict[str, Any]:
    """found: results.SearchResults of the search; spec: its SearchSpec. The trial refit is the best,
    or the one selection.pick names (tuner/pareto.py)."""
    chosen = choice(found.summary)
    if chosen is None:
        warn(f"refit: skipped: selection.pick {found.summary.pick['rule']!r}: {found.summary.pick['why']}; "
             f"refit a trial of the front with: tune-resnet refit {run_dir} --pick N")
        return {}
    if found.summary.pick is not None:
        say(f"refit: trial {chosen.trial_id}, by the {chosen.reason}")
    warm = warm_start_checkpoint(found.trials, found.summary) if spec.refit.warm_start else None
    if spec.refit.warm_start and warm is None:  # the search keeps the checkpoints of its best val_acc only
        warn(f"refit.warm_start: trial {chosen.trial_id} has no checkpoint left (the search kept those of its "
             "best trials); the refit starts from scratch")
    return refit(run_dir, config=refit_config(base, chosen.config, spec.refit.epochs or spec.budget.max_epochs),
                 val_acc=chosen.val_acc, warm_start_from=warm, formats=spec.export.formats, say=say, warn=warn,
                 search_metrics=search_metrics(chosen, threads=int(max(1, spec.trial.cpus))))


def search_metrics(chosen: Choice, *, threads: int) -> dict[str, Any]:
    """What metrics.json keeps of the search's figures for the refit trial: its id, why it was taken,
    the latencies it measured and with how many threads (the export measures again with as many)."""
    measured = {f"search_{k}": v for k, v in chosen.values.items() if k not in ("val_acc", "val_loss")}
    return {"search_trial_id": chosen.trial_id, "search_selection": chosen.reason, **measured,
            "latency_threads": threads}


def warm_start_checkpoint(trials: list[dict[str, Any]], summary: Any) -> str | None:
    """The latest checkpoint of the refit's configuration: its search trial's, or after a
    confirmation (which prunes nothing) its best-scoring run's that still has one."""
    chosen = choice(summary)
    mine = [t for t in trials if t["checkpoint"] and chosen and chosen.trial_id in (t["trial_id"], t.get("confirm_of"))]
    key, sign = f"best_{summary.metric}", 1.0 if summary.mode == "max" else -1.0
    mine.sort(key=lambda t: sign * t[key] if t.get(key) is not None else -float("inf"), reverse=True)
    return mine[0]["checkpoint"] if mine else None


def refit(run_dir: str, *, config: TrainConfig, val_acc: float | None, warm_start_from: str | None = None,
          formats: Sequence[str] = DEFAULT_FORMATS, say: Say = print, warn: Say = warn,
          search_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
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
                               extra_metrics={"search_val_acc": val_acc, **(search_metrics or {})})
    searched = f" (search val_acc {val_acc:.4f})" if val_acc is not None else ""
    say(f"test accuracy {metrics['test_acc']:.4f} on {metrics['test']['images']} images{searched}")
    try:
        written = export_model(out, formats=formats)
    except ExportError as error:  # the refit model is saved: a failed export must not lose it
        warn(f"export failed: {error}; fix it, then run: tune-resnet export {run_dir}")
        return metrics
    say(f"exported {', '.join(path.name for path in written.values())}, labels.txt, README.md to {out}")
    return metrics
