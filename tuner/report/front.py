"""Several objectives: every trial's first objective (val_acc) against a second (latency_ms, params,
...), with the Pareto front drawn and the refit's pick marked (the front and the pick are
summary.json's, tuner/pareto.py)."""

from __future__ import annotations

from typing import Any

from ..pareto import SCORED, feasible, value
from search_spaces import METRIC_MODES, parse_constraint

from .run import Run
from .style import pyplot

AXIS = {"val_acc": "val_acc (fraction of validation images correct)", "val_loss": "val_loss",
        "latency_ms": "latency_ms (ms per image at batch 1, ONNX Runtime, CPU)",
        "latency_ms_b64": "latency_ms_b64 (ms per batch of 64, ONNX Runtime, CPU)",
        "params": "params (weights)", "macs": "macs (multiply-accumulates per image)"}


def second_metric(objective: dict[str, Any]) -> str | None:
    """The x axis: the second objective, else the first constraint's metric; None for neither."""
    metrics = [m["metric"] for m in objective.get("metrics") or []]
    if len(metrics) > 1:
        return metrics[1]
    named = [parse_constraint(c).metric for c in objective.get("constraints") or []]
    return next((m for m in named if m != objective.get("metric")), None)


def has_front(run: Run) -> bool:
    """A search with several objectives, constraints or selection.pick (its summary holds a front)."""
    return run.summary.front is not None


def plot_front(run: Run):
    objective = run.record.space.get("objective", {})
    x_metric, y_metric = second_metric(objective), run.metric
    if run.summary.front is None or x_metric is None:
        return None
    constraints = [parse_constraint(c) for c in objective.get("constraints") or []]
    scored = [t for t in run.trials if t["status"] in SCORED and value(t, x_metric) is not None
              and value(t, y_metric) is not None]
    if not scored:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for inside, colour, label in ((True, "tab:blue", "trial"), (False, "tab:gray", "trial outside the constraints")):
        group = [t for t in scored if feasible(t, constraints) == inside]
        if group:
            ax.scatter([value(t, x_metric) for t in group], [value(t, y_metric) for t in group], color=colour,
                       s=28, alpha=0.7, label=f"{label} ({len(group)})", zorder=2)
    _draw_front(ax, run, x_metric, y_metric)
    for constraint in constraints:  # a bound on one of the plane's metrics, dashed, where it cuts the trials
        line = {x_metric: ax.axvline, y_metric: ax.axhline}.get(constraint.metric)
        seen = [value(t, constraint.metric) for t in scored]
        if line and min(seen) <= constraint.bound <= max(seen):
            line(constraint.bound, color="tab:gray", ls="--", lw=1, label=f"constraint {constraint}")
    ax.set(title=f"{y_metric} against {x_metric}: {len(run.summary.front)} trials on the Pareto front",
           xlabel=AXIS.get(x_metric, x_metric), ylabel=AXIS.get(y_metric, y_metric))
    ax.legend(fontsize=8, loc="lower right" if METRIC_MODES[x_metric] == "min" else "lower left")
    ax.grid(alpha=0.3)
    return fig


def _draw_front(ax: Any, run: Run, x_metric: str, y_metric: str) -> None:
    """The front as a staircase through its trials (in the plane of these two metrics), and the pick."""
    points = sorted((e["values"].get(x_metric), e["values"].get(y_metric)) for e in run.summary.front)
    points = [(x, y) for x, y in points if x is not None and y is not None]
    if points:
        xs, ys = zip(*points)
        # the edge of what the front attains: held to the right of a point when smaller x is better
        ax.step(xs, ys, where="post" if METRIC_MODES[x_metric] == "min" else "pre", color="tab:red", lw=1.5,
                zorder=3, label="Pareto front")
        ax.scatter(xs, ys, color="tab:red", s=40, zorder=4)
        for entry in run.summary.front:
            if x_metric in entry["values"] and y_metric in entry["values"]:
                ax.annotate(f"[{entry['index']}]", (entry["values"][x_metric], entry["values"][y_metric]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    pick = run.summary.pick or {}
    if pick.get("trial_id") and x_metric in pick["values"] and y_metric in pick["values"]:
        ax.scatter([pick["values"][x_metric]], [pick["values"][y_metric]], marker="*", s=260, color="tab:green",
                   edgecolor="black", zorder=5, label=f"refit's pick: {pick['rule']}")
