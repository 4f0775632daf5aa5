"""The report of a search: RUN_DIR/report.html with its plots in RUN_DIR/report/*.png, and the
Optuna study in RUN_DIR/optuna.journal (open it with `optuna-dashboard RUN_DIR/optuna.journal`).

    tune-resnet report runs/quick-cifar10      # also written when a search ends

The HTML references its PNGs by relative path and loads nothing else (no script, no font, no
CDN): copy the folder anywhere and it opens offline. Plots are matplotlib on the Agg backend.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import optuna
import pyarrow.parquet as pq

REPORT_FILE = "report.html"
REPORT_DIR = "report"          # the PNGs, referenced from report.html as report/<name>.png
JOURNAL_FILE = "optuna.journal"
BEST_DIR = "best"
TOP_TRIALS = 10                # rows of the top-trials table
GRID_IMAGES = 32               # tiles in the test-image grid
GRID_POOL = 512                # test images classified (a seeded sample) to find the mistakes among
DPI = 110                      # 8 x 4.5 in -> 880 x 495 px
STATUS_STYLE = {  # status -> (colour, end-of-curve marker, legend text)
    "completed": ("tab:blue", "o", "completed (all epochs)"),
    "early_stopped": ("tab:red", "x", "stopped early by ASHA"),
    "diverged": ("tab:gray", "v", "diverged (NaN/inf loss)"),
    "errored": ("black", "v", "errored"),
}
PARAM_UNITS = {  # shown on axis labels; a param not listed gets "value"
    "lr": "peak learning rate", "weight_decay": "L2 coefficient", "batch_size": "images per step",
    "momentum": "coefficient", "dropout": "probability", "label_smoothing": "fraction of target mass",
    "width": "channels", "depth": "layers", "warmup_epochs": "epochs", "cutout": "pixels",
    "crop_padding": "pixels", "layer_decay": "lr factor per stage", "frozen_stages": "stages",
    "ema": "half-life, epochs",
}
VAL_ACC = "val_acc (fraction of validation images correct)"
METRIC_UNITS = {"val_acc": "fraction", "val_loss": "cross-entropy, nats"}


class ReportError(click.ClickException):
    """Not the folder of a finished search: one line, exit code 2."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# 1) the run folder, read back
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    folder: Path
    trials: list[dict[str, Any]]      # trials.parquet rows
    history: list[dict[str, Any]]     # history.parquet rows
    summary: dict[str, Any]           # summary.json
    record: dict[str, Any]            # search.json: space, base_config, metric, mode, max_epochs
    metrics: dict[str, Any] | None    # best/metrics.json of the refit, if there was one
    meta: dict[str, Any] | None       # best/config.json: classes, config, mean/std

    @property
    def name(self) -> str:  # the run's name (--name, or the space's): its folder is storage/name
        return self.folder.resolve().name

    @property
    def metric(self) -> str:
        return self.record.get("metric") or self.summary.get("metric", "val_acc")

    @property
    def mode(self) -> str:
        return self.record.get("mode") or self.summary.get("mode", "max")


def load_run(run_dir: str | Path) -> Run:
    folder = Path(run_dir)
    missing = [n for n in ("trials.parquet", "history.parquet", "summary.json", "search.json")
               if not (folder / n).is_file()]
    if missing:
        raise ReportError(f"{folder}: no {', '.join(missing)}; expected the folder of a finished search "
                          f"(for one still running: tune-resnet status {folder})")
    best = folder / BEST_DIR
    return Run(folder, pq.read_table(folder / "trials.parquet").to_pylist(),
               pq.read_table(folder / "history.parquet").to_pylist(),
               json.loads((folder / "summary.json").read_text()), json.loads((folder / "search.json").read_text()),
               _read_json(best / "metrics.json"), _read_json(best / "config.json"))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _objective(run: Run) -> str:
    return f"best {run.metric} ({METRIC_UNITS.get(run.metric, 'value')})"


def _curve(run: Run, trial_id: str, column: str = "val_acc") -> tuple[list[int], list[float]]:
    rows = sorted((r for r in run.history if r["trial_id"] == trial_id and _finite(r.get(column))),
                  key=lambda r: r["training_iteration"])
    return [r["training_iteration"] for r in rows], [r[column] for r in rows]


# ---------------------------------------------------------------------------------------------
# 2) the Optuna study, rebuilt from trials.parquet with the space's distributions
# ---------------------------------------------------------------------------------------------

def param_distributions(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Distributions of the sampled params of search.json's space (a SearchSpec.model_dump);
    constants (`value`) are not sampled, so they have none."""
    distributions = {}
    for name, param in space.get("params", {}).items():
        param = {key: value for key, value in param.items() if value is not None}
        ints = param.get("int", param.get("int_"))
        if "uniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["uniform"])
        elif "loguniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["loguniform"], log=True)
        elif ints is not None:
            distributions[name] = optuna.distributions.IntDistribution(
                *ints, log=bool(param.get("log")), step=param.get("step") or 1)
        elif "choice" in param:
            distributions[name] = optuna.distributions.CategoricalDistribution(param["choice"])
    return distributions


def frozen_trials(run: Run) -> list[optuna.trial.FrozenTrial]:
    """One Optuna trial per Ray trial. Value: the trial's best epoch by the objective (what the
    summary ranks by); completed and ASHA-stopped trials are COMPLETE (Ray's OptunaSearch reports
    both so), diverged and errored ones FAIL. Per-epoch values become intermediate values."""
    distributions = param_distributions(run.record.get("space", {}))
    out = []
    for trial in run.trials:
        params = {n: trial[f"config/{n}"] for n in distributions if trial.get(f"config/{n}") is not None}
        value = trial.get(f"best_{run.metric}")
        complete = trial["status"] in ("completed", "early_stopped") and _finite(value)
        epochs, values = _curve(run, trial["trial_id"], run.metric)
        try:
            out.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                value=value if complete else None, params=params,
                distributions={n: distributions[n] for n in params},
                user_attrs={"ray_trial_id": trial["trial_id"], "status": trial["status"], "epochs": trial["epochs"]},
                intermediate_values=dict(zip(epochs, values))))
        except ValueError:  # a value outside the space (the YAML changed since): leave that trial out
            continue
    return out


def build_study(run: Run, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    direction = "maximize" if run.mode == "max" else "minimize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." in our output
    try:
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(study_name=run.name, storage=storage, direction=direction)
            study.set_metric_names([run.metric])
        study.add_trials(frozen_trials(run))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def write_journal(run: Run) -> Path:
    """RUN_DIR/optuna.journal, written afresh: the study as the search ran it, for optuna-dashboard."""
    from optuna.storages.journal import JournalFileBackend

    path = run.folder / JOURNAL_FILE
    fresh = path.with_name(f".{JOURNAL_FILE}.new")  # built aside: a failure keeps the journal there was
    fresh.unlink(missing_ok=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(fresh)))
    study = build_study(run, storage)
    study.set_user_attr("run_dir", str(run.folder.resolve()))
    del study, storage  # the backend holds no open file between writes; replace it now
    os.replace(fresh, path)
    return path


# ---------------------------------------------------------------------------------------------
# 3) the plots: each a function of the run returning a matplotlib figure (None: nothing to draw)
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(run: Run):
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    best_id = run.summary.get("best_trial_id")
    for trial in run.trials:
        epochs, values = _curve(run, trial["trial_id"])
        if not epochs:
            continue
        colour, marker, _ = STATUS_STYLE.get(trial["status"], STATUS_STYLE["errored"])
        is_best = trial["trial_id"] == best_id
        ax.plot(epochs, values, color="tab:green" if is_best else colour, lw=2.5 if is_best else 1,
                alpha=1.0 if is_best else 0.55, zorder=3 if is_best else 2)
        ax.scatter(epochs[-1:], values[-1:], marker=marker, color=colour, s=55, zorder=4)
    handles = [Line2D([], [], color=c, marker=m, ls="-", lw=1, label=f"{text} (marker at its last epoch)")
               for status, (c, m, text) in STATUS_STYLE.items() if any(t["status"] == status for t in run.trials)]
    handles.append(Line2D([], [], color="tab:green", lw=2.5, label=f"best trial {best_id}"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(title=f"Learning curves: validation accuracy per epoch, {len(run.trials)} trials",
           xlabel="epoch (passes over the training split)", ylabel=VAL_ACC)
    ax.grid(alpha=0.3)
    return fig


def _epochs_in_order(run: Run) -> list[dict[str, Any]]:
    """Every reported epoch of every trial, in the order they ended (Ray's timestamp: whole seconds)."""
    rows = [r for r in run.history if _finite(r.get("val_acc")) and _finite(r.get("timestamp"))]
    return sorted(rows, key=lambda r: (r["timestamp"], r.get("time_total_s") or 0.0))


def _running_best(values: list[float]) -> list[float]:
    best, out = -math.inf, []
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def plot_best_vs_time(run: Run):
    rows = _epochs_in_order(run)
    if not rows:
        return None
    plt = _pyplot()
    start = min(r["timestamp"] - (r.get("time_total_s") or 0.0) for r in rows)  # the first trial's start
    seconds = [r["timestamp"] - start for r in rows]
    minutes = seconds[-1] > 300
    x = [s / 60 for s in seconds] if minutes else seconds
    values = [r["val_acc"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(x, values, s=12, color="tab:gray", alpha=0.6, label="an epoch of a trial")
    ax.step(x, _running_best(values), where="post", color="tab:green", lw=2, label="best so far")
    ax.set(title="Best validation accuracy so far against wall-clock time",
           xlabel=f"wall-clock time since the search started ({'min' if minutes else 's'})", ylabel=VAL_ACC)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def plot_best_vs_epochs(run: Run):
    rows = _epochs_in_order(run)
    if not rows:
        return None
    plt = _pyplot()
    x, values = list(range(1, len(rows) + 1)), [r["val_acc"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(x, values, s=12, color="tab:gray", alpha=0.6, label="an epoch of a trial")
    ax.step(x, _running_best(values), where="post", color="tab:green", lw=2, label="best so far")
    budget = run.summary.get("epochs_without_early_stopping")
    if budget:
        ax.axvline(budget, color="tab:red", ls="--", lw=1,
                   label=f"{budget} epochs: the same trials without early stopping")
        ax.set_xlim(0, max(budget, len(rows)) * 1.03)
    ax.set(title=f"Best validation accuracy so far against epochs spent ({len(rows)} in all)",
           xlabel="epochs spent, all trials together (count)", ylabel=VAL_ACC)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def param_importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """Evaluator name -> {param: importance, normalised to sum 1}; evaluators that cannot run
    on these trials (too few, or one param never varied) are left out."""
    evaluators = {"PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator,
                  "fANOVA": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0)}  # needs scikit-learn
    out = {}
    for name, make in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(study, evaluator=make())
        except (ImportError, ValueError, RuntimeError, ZeroDivisionError):
            continue
        if found:
            out[name] = found
    return out


def plot_importance(run: Run, study: optuna.Study):
    import numpy as np

    importances = param_importances(study)
    if not importances:
        return None
    plt = _pyplot()
    params = sorted({p for found in importances.values() for p in found},
                    key=lambda p: -max(found.get(p, 0.0) for found in importances.values()))[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(params)))
    height = 0.8 / len(importances)
    for i, (name, found) in enumerate(importances.items()):
        ax.barh(np.arange(len(params)) + i * height, [found.get(p, 0.0) for p in params], height=height,
                label=name)
    ax.set_yticks(np.arange(len(params)) + height * (len(importances) - 1) / 2, params)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    ax.set(title=f"Hyperparameter importance for best {run.metric} ({complete} complete trials)",
           xlabel="importance (share of the total, each evaluator sums to 1)", ylabel="hyperparameter")
    ax.legend(fontsize=8, loc="lower right", title="Optuna evaluator", title_fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_parallel(run: Run, study: optuna.Study):
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not study.best_trial.params:
        return None
    _pyplot()
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(
            study, target_name=_objective(run))
    fig = ax.figure
    fig.set_size_inches(9, 5)
    ax.set_title(f"Parallel coordinates: each line one trial, coloured by its best {run.metric}", pad=14)
    ax.set_xlabel("hyperparameter (each axis in its own units; log-scaled params on a log axis)")
    ax.set_ylabel(_objective(run))
    return fig


def plot_slices(run: Run):
    import numpy as np

    distributions = param_distributions(run.record.get("space", {}))
    names = [n for n in distributions if any(t.get(f"config/{n}") is not None for t in run.trials)]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _slice(ax, run, name, distributions[name], np.random.default_rng(0))
    if axes.flat[0].get_legend_handles_labels()[0]:  # none when no trial has a value (all errored)
        axes.flat[0].legend(fontsize=7)  # one legend: the statuses are the same in every panel
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"Best {run.metric} of each trial against each hyperparameter (slice plots)")
    fig.tight_layout()
    return fig


def _slice(ax, run: Run, name: str, distribution, rng) -> None:
    categorical = isinstance(distribution, optuna.distributions.CategoricalDistribution)
    for status, (colour, marker, text) in STATUS_STYLE.items():
        chosen = [t for t in run.trials if t["status"] == status and t.get(f"config/{name}") is not None
                  and _finite(t.get(f"best_{run.metric}"))]
        if not chosen:
            continue
        x = [t[f"config/{name}"] for t in chosen]
        if categorical:  # positions of the choices, jittered so equal values stay visible
            x = [distribution.choices.index(v) + rng.uniform(-0.15, 0.15) for v in x]
        ax.scatter(x, [t[f"best_{run.metric}"] for t in chosen], color=colour, marker=marker, s=25, label=text)
    if categorical:
        ax.set_xticks(range(len(distribution.choices)), [str(c) for c in distribution.choices])
    elif getattr(distribution, "log", False):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1 and 3 per decade: readable over a short range or a long one
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    scale = ", log scale" if getattr(distribution, "log", False) else ""
    ax.set(title=name, xlabel=f"{name} ({PARAM_UNITS.get(name, 'value')}{scale})",
           ylabel=_objective(run))
    ax.grid(alpha=0.3)


def plot_refit(run: Run):
    history = (run.metrics or {}).get("history") or []
    if not history:
        return None
    plt = _pyplot()
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
    tested = f", test accuracy {test:.4f}" if _finite(test) else ""
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

    plt = _pyplot()
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

    from .export import load_raw_pixel_model

    model, _ = load_raw_pixel_model(run.folder / BEST_DIR)
    base = run.record.get("base_config") or run.meta["config"]
    data = load_data(base["dataset"], base["data_path"], input_size=base["input_size"],
                     storage_size=base.get("storage_size"))
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
    plt = _pyplot()
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


# ---------------------------------------------------------------------------------------------
# 4) the HTML
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    file: str
    caption: str
    draw: Callable


def plots(study: optuna.Study) -> list[Plot]:
    return [
        Plot("learning_curves.png", "Validation accuracy per epoch of every trial; a cross marks where "
               "ASHA stopped a trial, a circle a trial that ran all its epochs.", plot_learning_curves),
        Plot("best_vs_time.png", "Best validation accuracy found so far against wall-clock time.",
               plot_best_vs_time),
        Plot("best_vs_epochs.png", "Best validation accuracy found so far against the epochs spent by all "
               "trials together; the dashed line is what the trials would have cost without early stopping.",
               plot_best_vs_epochs),
        Plot("importance.png", "Hyperparameter importance from Optuna's evaluators, on the trials' best "
               "validation scores.", lambda run: plot_importance(run, study)),
        Plot("parallel_coordinates.png", "Parallel coordinates (Optuna): each line one trial.",
               lambda run: plot_parallel(run, study)),
        Plot("slices.png", "Each trial's best score against each hyperparameter.", plot_slices),
        Plot("refit_curves.png", "The refit of the best configuration on train + validation.", plot_refit),
        Plot("confusion_matrix.png", "Confusion matrix of the refit model on the test split.", plot_confusion),
        Plot("test_images.png", "Test images with predicted and true labels, mistakes first.", plot_test_images),
    ]


def draw_figures(run: Run, study: optuna.Study) -> tuple[list[Plot], list[str]]:
    """Write every figure that applies to RUN_DIR/report/; (drawn, notes on the ones left out)."""
    out = run.folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    drawn, notes = [], []
    plt = _pyplot()
    for figure in plots(study):
        (out / figure.file).unlink(missing_ok=True)  # no stale plot from an earlier report
        try:
            fig = figure.draw(run)
        except Exception as error:  # one plot that fails must not cost the others
            notes.append(f"{figure.file}: not drawn ({type(error).__name__}: {str(error).strip()[:200]})")
            continue
        if fig is None:
            notes.append(f"{figure.file}: nothing to draw for this run")
            continue
        fig.savefig(out / figure.file, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        drawn.append(figure)
    return drawn, notes


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def top_trials_table(run: Run) -> str:
    key = f"best_{run.metric}"
    scored = sorted((t for t in run.trials if _finite(t.get(key))), key=lambda t: t[key],
                    reverse=run.mode == "max")[:TOP_TRIALS]
    params = sorted({k for t in run.trials for k in t if k.startswith("config/")})
    header = ["rank", "trial", "status", "epochs", f"best {run.metric}", "best epoch", "wall time (s)"]
    rows = [[i, t["trial_id"], t["status"], t["epochs"], t[key], t.get("best_epoch"),
             round(t["wall_time_s"], 1) if _finite(t.get("wall_time_s")) else None]
            + [t.get(p) for p in params] for i, t in enumerate(scored, start=1)]
    return _table(header + [p[len("config/"):] for p in params], rows)


def per_class_table(run: Run) -> str:
    per_class = ((run.metrics or {}).get("test") or {}).get("per_class") or {}
    rows = [[name, v.get("precision"), v.get("recall")] for name, v in per_class.items()]
    return _table(["class", "precision (fraction)", "recall (fraction)"], rows) if rows else ""


def summary_lines(run: Run) -> list[str]:
    from .results import format_summary

    lines = format_summary(run.summary)
    if run.metrics and _finite(run.metrics.get("test_acc")):
        lines.append(f"refit: {run.metrics.get('epochs')} epochs on {run.metrics.get('train_images')} images, "
                     f"test accuracy {run.metrics['test_acc']:.4f} on {run.metrics['test']['images']} test images")
    else:
        lines.append("refit: none in this run folder (tune-resnet refit RUN_DIR makes one)")
    return lines


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
pre, code { background: #f5f5f5; } pre { padding: .8em; overflow-x: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ddd; padding: .25em .5em; }
th { background: #f0f0f0; } .notes { color: #777; font-size: .85em; }
"""


def render_html(run: Run, drawn: list[Plot], notes: list[str], journal: Path | None) -> str:
    e = html.escape
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(run.name)}: search report"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Search report: {e(run.name)}</h1><p>{e(str(run.folder.resolve()))}, written {e(when)}</p>",
             "<h2>Summary</h2><pre>" + e("\n".join(summary_lines(run))) + "</pre>"]
    for figure in drawn:
        parts.append(f"<figure><img src='{REPORT_DIR}/{figure.file}' alt='{e(figure.caption)}'>"
                     f"<figcaption>{e(figure.caption)}</figcaption></figure>")
    parts.append(f"<h2>Top trials by best {e(run.metric)}</h2>" + top_trials_table(run))
    if per_class_table(run):
        parts.append("<h2>Test precision and recall per class</h2>" + per_class_table(run))
    parts.append("<h2>Tracking</h2><ul>"
                 f"<li>TensorBoard logs of every trial: <code>tensorboard --logdir {e(str(run.folder))}</code></li>"
                 + (f"<li>Optuna study (name <code>{e(run.name)}</code>): <code>optuna-dashboard "
                    f"{e(str(journal))}</code></li>" if journal else "") + "</ul>")
    if notes:
        parts.append("<p class='notes'>" + "<br>".join(e(n) for n in notes) + "</p>")
    return "\n".join(parts) + "\n</body></html>\n"


# ---------------------------------------------------------------------------------------------
# 5) entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dir: str | Path) -> tuple[Path, list[str]]:
    """RUN_DIR/report.html, RUN_DIR/report/*.png and RUN_DIR/optuna.journal; (html path, notes)."""
    run = load_run(run_dir)
    notes = []
    try:
        journal = write_journal(run)
    except Exception as error:  # the report is still worth having without the journal
        journal = None
        notes.append(f"{JOURNAL_FILE}: not written ({type(error).__name__}: {error})")
    drawn, figure_notes = draw_figures(run, build_study(run))
    path = run.folder / REPORT_FILE
    path.write_text(render_html(run, drawn, notes + figure_notes, journal))
    return path, notes + figure_notes


def write_report_safely(run_dir: str) -> None:
    """At the end of a search: a report that fails prints one line and never fails the search."""
    if "://" in run_dir:
        click.echo(f"report: skipped for remote storage; run: tune-resnet report <local copy of {run_dir}>")
        return
    try:
        path, notes = write_report(run_dir)
    except Exception as error:  # the search's tables and model are saved already: say so and go on
        why = (str(error).strip().splitlines() or [""])[0][:200]
        click.echo(f"report failed ({type(error).__name__}: {why}); try again: tune-resnet report {run_dir}", err=True)
        return
    click.echo(f"report: {path}" + (f" ({len(notes)} parts left out; see its end)" if notes else ""))
