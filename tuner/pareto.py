"""Several objectives, read off the trials table: the Pareto front (the trials no other trial
beats on every objective), the trials that hold the constraints, and the pick rule that names the
refit's trial (`selection.pick: best val_acc with latency_ms <= 5`, search_spaces._objective).

Pure functions of trials.parquet's rows; the summary gains the front and the pick (select()).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from search_spaces import METRIC_MODES, Constraint, PickRule, SearchSpec

from .errors import SearchError
from .results import SearchResults, SearchSummary, finite, params_of

SCORED = ("completed", "early_stopped")  # what Ray tells Optuna as COMPLETE; diverged/errored score nothing


def value(trial: dict[str, Any], metric: str) -> float | None:
    """A trial's figure: its best epoch's val_acc/val_loss (as the summary ranks), a measured column
    (params, macs, latency_ms, ...) otherwise; None when missing or not finite."""
    found = trial.get(f"best_{metric}" if metric in ("val_acc", "val_loss") else metric)
    return float(found) if finite(found) else None


def _signed(trial: dict[str, Any], metrics: Sequence[str]) -> tuple[float, ...]:
    """Values turned so that larger is better on every metric."""
    return tuple(value(trial, m) * (1 if METRIC_MODES[m] == "max" else -1) for m in metrics)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a (larger is better on each) is at least as good as b everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (equal points both stay), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def feasible(trial: dict[str, Any], constraints: Sequence[Constraint]) -> bool:
    values = [value(trial, c.metric) for c in constraints]
    return all(v is not None and c.holds(v) for c, v in zip(constraints, values))


def candidates(trials: Sequence[dict[str, Any]], metrics: Sequence[str],
               constraints: Sequence[Constraint] = ()) -> list[dict[str, Any]]:
    """Trials that scored, with every metric finite, holding every constraint."""
    return [t for t in trials if t.get("status") in SCORED and all(value(t, m) is not None for m in metrics)
            and feasible(t, constraints)]


def front(trials: Sequence[dict[str, Any]], metrics: Sequence[str],
          constraints: Sequence[Constraint] = ()) -> list[dict[str, Any]]:
    """The non-dominated trials among the feasible ones, best first objective first."""
    pool = candidates(trials, metrics, constraints)
    kept = [pool[i] for i in non_dominated([_signed(t, metrics) for t in pool])]
    return sorted(kept, key=lambda t: tuple(-v for v in _signed(t, metrics)))


def pick(trials: Sequence[dict[str, Any]], rule: PickRule, metrics: Sequence[str],
         constraints: Sequence[Constraint] = ()) -> dict[str, Any] | None:
    """The trial a pick rule names: the best by its metric among the trials that hold the objective's
    constraints and the rule's; ties go to the better on the objectives in order, then the earlier trial."""
    order = [rule.metric, *(m for m in metrics if m != rule.metric)]
    pool = candidates(trials, order, (*constraints, *rule.constraints))
    return max(pool, key=lambda t: _signed(t, order)) if pool else None


def shown_values(trial: dict[str, Any], metrics: Sequence[str]) -> dict[str, float]:
    """The objectives' values of a trial, with val_acc and the measured metrics it has."""
    names = dict.fromkeys([*metrics, "val_acc", "params", "macs", "latency_ms", "latency_ms_b64"])
    return {name: value(trial, name) for name in names if value(trial, name) is not None}


# ---------------------------------------------------------------------------------------------
# The summary's front and pick, and the trial a refit takes
# ---------------------------------------------------------------------------------------------

def select(found: SearchResults, spec: SearchSpec) -> SearchResults:
    """found with its summary's front and pick, for a space with several objectives, constraints or
    selection.pick; unchanged otherwise."""
    if not spec.selects:
        return found
    metrics = [m.metric for m in spec.objective.objectives]
    constraints = spec.objective.parsed_constraints
    rule = spec.selection.pick_rule or PickRule(metrics[0])
    entries = [_entry(i, t, metrics) for i, t in enumerate(front(found.trials, metrics, constraints))]
    chosen = pick(found.trials, rule, metrics, constraints)
    shown = str(PickRule(rule.metric, (*constraints, *rule.constraints)))
    if chosen is None:
        picked = {"rule": shown, "trial_id": None, "why": _none_holds(found.trials, rule, metrics, constraints)}
    else:
        index = next((e["index"] for e in entries if e["trial_id"] == chosen["trial_id"]), None)
        picked = {**_entry(index, chosen, metrics), "rule": shown, "front_index": index}
    summary = dataclasses.replace(found.summary, front=entries, pick=picked)
    return dataclasses.replace(found, summary=summary)


def _entry(index: int | None, trial: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    return {"index": index, "trial_id": trial["trial_id"], "status": trial["status"],
            "values": shown_values(trial, metrics), "config": params_of(trial)}


def _none_holds(trials: Sequence[dict[str, Any]], rule: PickRule, metrics: Sequence[str],
                constraints: Sequence[Constraint]) -> str:
    """Why no trial was picked: the first constraint no scored trial holds, with the nearest value."""
    scored = candidates(trials, [rule.metric, *metrics])
    if not scored:
        return "no trial scored"
    for constraint in (*constraints, *rule.constraints):
        values = [v for v in (value(t, constraint.metric) for t in scored) if v is not None]
        if values and not any(constraint.holds(v) for v in values):
            nearest = min(values) if constraint.op in ("<=", "<") else max(values)
            return f"no trial holds {constraint} (the nearest: {nearest:.4g})"
    return "no trial holds all of " + ", ".join(map(str, (*constraints, *rule.constraints)))


@dataclass(frozen=True)
class Choice:
    """The trial a refit takes, and why."""

    trial_id: str
    config: dict[str, Any]
    values: dict[str, float]  # the search's figures for it: val_acc, latency_ms, ...
    reason: str               # "best val_acc", "pick: best val_acc with latency_ms <= 5", "--pick 2"

    @property
    def val_acc(self) -> float | None:
        return self.values.get("val_acc")


def choice(summary: SearchSummary, index: int | None = None) -> Choice | None:
    """The refit's trial: the front's entry `index` (`refit --pick N`), else the summary's pick,
    else the best trial; None when the pick rule found no trial (summary.pick["why"] says why)."""
    if index is not None:
        if not summary.front:
            raise SearchError("--pick: this search has no Pareto front (one objective, no constraints, no "
                              "selection.pick); refit without --pick takes its best trial")
        if not 0 <= index < len(summary.front):
            raise SearchError(f"--pick: expected a front index from 0 to {len(summary.front) - 1}, got {index}")
        entry = summary.front[index]
        return Choice(entry["trial_id"], entry["config"], entry["values"], f"--pick {index}")
    if summary.pick is not None:
        if summary.pick.get("trial_id") is None:
            return None
        return Choice(summary.pick["trial_id"], summary.pick["config"], summary.pick["values"],
                      f"pick: {summary.pick['rule']}")
    if not summary.found:
        return None
    reason = (f"best mean {summary.metric} of the confirmation's fresh runs" if summary.confirmation
              else f"best {summary.metric}")
    return Choice(summary.refit_trial_id, summary.refit_config or {}, {"val_acc": summary.refit_val_acc}, reason)
