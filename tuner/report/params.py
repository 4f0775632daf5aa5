"""The hyperparameters against the objective: importance (Optuna's evaluators), parallel
coordinates (Optuna's plot) and slices (each trial's best score against each hyperparameter)."""

from __future__ import annotations

import math
import warnings

import optuna

from .run import Run, finite
from .study import param_distributions, param_importances
from .style import STATUS_STYLE, pyplot

PARAM_UNITS = {  # shown on axis labels; a param not listed gets "value"
    "lr": "peak learning rate", "weight_decay": "L2 coefficient", "batch_size": "images per step",
    "momentum": "coefficient", "dropout": "probability", "label_smoothing": "fraction of target mass",
    "width": "channels", "depth": "layers", "warmup_epochs": "epochs", "cutout": "pixels",
    "crop_padding": "pixels", "layer_decay": "lr factor per stage", "frozen_stages": "stages",
    "ema": "half-life, epochs",
}
METRIC_UNITS = {"val_acc": "fraction", "val_loss": "cross-entropy, nats"}


def _objective(run: Run) -> str:
    return f"best {run.metric} ({METRIC_UNITS.get(run.metric, 'value')})"


def plot_importance(run: Run, study: optuna.Study):
    import numpy as np

    importances = param_importances(study)
    if not importances:
        return None
    plt = pyplot()
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


PARALLEL_TRIALS = 100  # lines of the parallel coordinates: the best ones when there are more


def plot_parallel(run: Run, study: optuna.Study):
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not study.best_trial.params:
        return None
    pyplot()
    shown = _best_trials_study(study, complete) if len(complete) > PARALLEL_TRIALS else study
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(
            shown, target_name=_objective(run))
    fig = ax.figure
    fig.set_size_inches(9, 5)
    which = f"the best {PARALLEL_TRIALS} of {len(complete)} trials" if shown is not study else "each line one trial"
    ax.set_title(f"Parallel coordinates: {which}, coloured by its best {run.metric}", pad=14)
    ax.set_xlabel("hyperparameter (each axis in its own units; log-scaled params on a log axis)")
    ax.set_ylabel(_objective(run))
    return fig


def _best_trials_study(study: optuna.Study, complete: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    """A study of the best PARALLEL_TRIALS complete trials: 1,000 lines are one blot of colour."""
    best = sorted(complete, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        shown = optuna.create_study(direction=study.direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    shown.add_trials(best[:PARALLEL_TRIALS])
    return shown


def plot_slices(run: Run):
    import numpy as np

    distributions = param_distributions(run.record.space)
    names = [n for n in distributions if any(t.get(f"config/{n}") is not None for t in run.trials)]
    if not names:
        return None
    plt = pyplot()
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
                  and finite(t.get(f"best_{run.metric}"))]
        if not chosen:
            continue
        x = [t[f"config/{name}"] for t in chosen]
        if categorical:  # positions of the choices, jittered so equal values stay visible
            x = [distribution.choices.index(v) + rng.uniform(-0.15, 0.15) for v in x]
        size, alpha = (25, 1.0) if len(run.trials) <= 100 else (8, 0.5)  # 1,000 points: smaller, see-through
        ax.scatter(x, [t[f"best_{run.metric}"] for t in chosen], color=colour, marker=marker, s=size, alpha=alpha,
                   label=text)
    if categorical:
        ax.set_xticks(range(len(distribution.choices)), [str(c) for c in distribution.choices])
    elif getattr(distribution, "log", False):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1 and 3 per decade: readable over a short range or a long one
        decades = math.log10(distribution.high / distribution.low)  # over 3 decades, 1 and 3 overlap
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0) if decades <= 3 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    scale = ", log scale" if getattr(distribution, "log", False) else ""
    ax.set(title=name, xlabel=f"{name} ({PARAM_UNITS.get(name, 'value')}{scale})",
           ylabel=_objective(run))
    ax.grid(alpha=0.3)
