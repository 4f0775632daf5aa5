"""The search over time: learning curves of every trial, and the best validation accuracy so far
against wall-clock time and against the epochs spent."""

from __future__ import annotations

import math
from typing import Any

from .run import Run, curve, finite
from .style import STATUS_STYLE, pyplot

VAL_ACC = "val_acc (fraction of validation images correct)"


HIGHLIGHTED = 20  # curves drawn in colour with their end markers; the others (when more) are a grey mass


def plot_learning_curves(run: Run):
    """Every trial's curve; with more than HIGHLIGHTED trials, the best HIGHLIGHTED by the objective
    in colour and the rest thin and grey, so 1,000 trials read as a density, not a tangle."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    shown, rest = _highlighted(run)
    grey = [list(zip(*curve(run, t["trial_id"]))) for t in rest]
    grey = [points for points in grey if points]
    if grey:  # one collection: fast, and drawn under the highlighted curves
        ax.add_collection(LineCollection(grey, colors="tab:gray", linewidths=0.6,
                                         alpha=max(0.04, min(0.4, 20 / len(grey))), zorder=1))
    best_id = run.summary.best_trial_id
    for trial in shown:
        _draw_curve(ax, run, trial, trial["trial_id"] == best_id)
    handles = [Line2D([], [], color=c, marker=m, ls="-", lw=1, label=f"{text} (marker at its last epoch)")
               for status, (c, m, text) in STATUS_STYLE.items() if any(t["status"] == status for t in shown)]
    if grey:
        handles.append(Line2D([], [], color="tab:gray", lw=1, label=f"the other {len(grey)} trials"))
    handles.append(Line2D([], [], color="tab:green", lw=2.5, label=f"best trial {best_id}"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.autoscale_view()
    ax.xaxis.get_major_locator().set_params(integer=True)
    which = f"the best {len(shown)} in colour" if rest else "all"
    ax.set(title=f"Learning curves: validation accuracy per epoch, {len(run.trials)} trials ({which})",
           xlabel="epoch (passes over the training split)", ylabel=VAL_ACC)
    ax.grid(alpha=0.3)
    return fig


def _highlighted(run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the trials drawn in colour, the others): all of them up to HIGHLIGHTED + a few, else the best."""
    if len(run.trials) <= HIGHLIGHTED + 5:
        return list(run.trials), []
    key, sign = f"best_{run.metric}", 1 if run.mode == "max" else -1
    ranked = sorted(run.trials, key=lambda t: -sign * t[key] if finite(t.get(key)) else math.inf)
    return ranked[:HIGHLIGHTED], ranked[HIGHLIGHTED:]


def _draw_curve(ax, run: Run, trial: dict[str, Any], is_best: bool) -> None:
    epochs, values = curve(run, trial["trial_id"])
    if not epochs:
        return
    colour, marker, _ = STATUS_STYLE.get(trial["status"], STATUS_STYLE["errored"])
    ax.plot(epochs, values, color="tab:green" if is_best else colour, lw=2.5 if is_best else 1,
            alpha=1.0 if is_best else 0.55, zorder=3 if is_best else 2)
    ax.scatter(epochs[-1:], values[-1:], marker=marker, color=colour, s=55, zorder=4)


def _epochs_in_order(run: Run) -> list[dict[str, Any]]:
    """Every reported epoch of every trial, in the order they ended (Ray's timestamp: whole seconds)."""
    rows = [r for r in run.history if finite(r.get("val_acc")) and finite(r.get("timestamp"))]
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
    plt = pyplot()
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
    plt = pyplot()
    x, values = list(range(1, len(rows) + 1)), [r["val_acc"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(x, values, s=12, color="tab:gray", alpha=0.6, label="an epoch of a trial")
    ax.step(x, _running_best(values), where="post", color="tab:green", lw=2, label="best so far")
    budget = run.summary.epochs_without_early_stopping
    if budget:
        ax.axvline(budget, color="tab:red", ls="--", lw=1,
                   label=f"{budget} epochs: the same trials without early stopping")
        ax.set_xlim(0, max(budget, len(rows)) * 1.03)
    ax.set(title=f"Best validation accuracy so far against epochs spent ({len(rows)} in all)",
           xlabel="epochs spent, all trials together (count)", ylabel=VAL_ACC)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig
