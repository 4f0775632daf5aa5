"""Confirmation before the refit (the space's `selection: {top_k, repeats}`, top_k > 1).

A search hands the refit its luckiest draw, not its best configuration: on the quick space one
trial's val_acc moves with its seed by a standard deviation of about 0.010, as much as the top
configurations differ (bench/README.md, "noise floor"). So the top_k distinct configurations, by
the objective, are trained `repeats` more times with fresh seeds, without early stopping, and the
configuration with the best mean over those fresh runs wins.

- The fresh seeds are the same for every configuration (seed + 1, seed + 2, ...): a seed draws the
  validation split and the training subset as well as the initial weights, so repeat r of every
  configuration is scored on the same fresh split, and the comparison is paired.
- The search's own run is shown but left out of the mean: it was chosen for being high, so it is
  biased up (the winner's curse) by more for a lucky configuration than for a good one.
- How likely the pick is to be truly the best (`p_best`): Monte Carlo over the posterior of the
  true means under a normal model with a flat prior and one noise level for all, its uncertainty
  drawn from the scaled inverse chi-square. The noise is what the comparison sees: with every
  run there, the residual of value = configuration + seed + noise (the seed's split moves every
  configuration alike and cancels); with a run missing, the pooled within-configuration
  variance. With one run each it cannot be estimated and p_best is None.

Pure functions of the search's table rows (no Ray, no files): tuner/search.py runs the stage,
tuner/_ray.py its trials.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from .results import SearchResults, TrialRecord, collect, finite, params_of

CONFIG_PREFIX = "config/"


@dataclass(frozen=True)
class ConfirmRun:
    """One confirmation trial: a search trial's configuration again, with a fresh seed."""

    index: int
    confirm_of: str          # the search trial whose configuration it repeats
    repeat: int              # 1 .. repeats
    seed: int
    params: dict[str, Any]   # the sampled params of that trial

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Confirmed:
    """One confirmed configuration: its runs and what they say."""

    trial_id: str                   # the search trial it came from
    params: dict[str, Any]
    search_value: float             # the search trial's own score (biased up: it was chosen for it)
    runs: list[dict[str, Any]]      # {trial_id, repeat, seed, value}; value None: the run gave no score
    mean: float | None              # over the fresh runs with a score
    std: float | None               # their sample standard deviation (None below 2 runs)
    p_best: float | None = None     # how likely its true mean is the best of the confirmed ones

    @property
    def values(self) -> list[float]:
        return [r["value"] for r in self.runs if finite(r["value"])]

    @property
    def by_seed(self) -> dict[int, float]:
        return {r["seed"]: r["value"] for r in self.runs if finite(r["value"])}


def candidates(trials: list[dict[str, Any]], *, metric: str, mode: str, top_k: int) -> list[dict[str, Any]]:
    """The top_k search trials with distinct configurations, by their best score, best first
    (errored and diverged trials have none). A configuration drawn twice counts once, by its
    better trial."""
    key = f"best_{metric}"
    scored = [t for t in trials if finite(t.get(key)) and t.get("stage", "search") == "search"]
    scored.sort(key=lambda t: t[key], reverse=mode == "max")
    chosen, seen = [], set()
    for row in scored:
        signature = json.dumps(params_of(row), sort_keys=True, default=str)
        if signature not in seen:
            seen.add(signature)
            chosen.append(row)
    return chosen[:top_k]


def plan_runs(chosen: list[dict[str, Any]], *, repeats: int, seed: int) -> list[ConfirmRun]:
    """repeats runs of each chosen configuration; repeat r has the seed seed + r for all of them."""
    runs = []
    for repeat in range(1, repeats + 1):  # repeat-major: an early stop leaves every configuration a run
        for row in chosen:
            runs.append(ConfirmRun(len(runs), row["trial_id"], repeat, seed + repeat, params_of(row)))
    return runs


def decide(chosen: list[dict[str, Any]], runs: list[ConfirmRun], outcomes: dict[int, dict[str, Any]], *,
           metric: str, mode: str, draws: int = 20_000) -> list[Confirmed]:
    """The confirmed configurations, the pick first, then by mean. outcomes: run index ->
    {trial_id, value}, the run's Ray trial and its best score by the objective (None: errored or
    diverged). A configuration without any scored run ranks after those with one, by its search
    score."""
    out = []
    for row in chosen:
        mine = [r for r in runs if r.confirm_of == row["trial_id"]]
        done = [outcomes.get(r.index, {}) for r in mine]
        good = [d.get("value") for d in done if finite(d.get("value"))]
        out.append(Confirmed(
            trial_id=row["trial_id"], params=params_of(row), search_value=row[f"best_{metric}"],
            runs=[{"trial_id": d.get("trial_id"), "repeat": r.repeat, "seed": r.seed, "value": d.get("value")}
                  for r, d in zip(mine, done)],
            mean=statistics.fmean(good) if good else None,
            std=statistics.stdev(good) if len(good) > 1 else None))
    sign = 1.0 if mode == "max" else -1.0
    out.sort(key=lambda c: (c.mean is not None, sign * (c.mean if c.mean is not None else c.search_value)),
             reverse=True)
    probabilities = p_best([c.by_seed for c in out], mode=mode, draws=draws)
    return [Confirmed(**{**c.__dict__, "p_best": p}) for c, p in zip(out, probabilities)]


def p_best(groups: list[dict[int, float]], *, mode: str, draws: int = 20_000, seed: int = 0) -> list[float | None]:
    """For each group of runs (seed -> value), the posterior probability that its true mean is the
    best (see the module's docstring). None for all when the noise cannot be estimated."""
    import numpy as np

    means, counts, residual, df, _ = _noise(groups)
    if df < 1:
        return [None] * len(groups)
    rng = np.random.default_rng(seed)
    sigma2 = df * max(residual, 1e-12) / rng.chisquare(df, size=(draws, 1))
    safe = np.where(counts > 0, counts, 1.0)
    true = means + rng.standard_normal((draws, len(groups))) * np.sqrt(sigma2 / safe)
    true = np.where(counts > 0, true, -np.inf if mode == "max" else np.inf)
    best = true.argmax(axis=1) if mode == "max" else true.argmin(axis=1)
    share = np.bincount(best, minlength=len(groups)) / draws
    return [float(share[i]) if counts[i] else None for i in range(len(groups))]


def _noise(groups: list[dict[int, float]]):
    """(means, run counts, the variance of one run that comparisons see, its degrees of freedom,
    whether it is the paired estimate).

    When every group ran the same seeds, a seed's shared effect (its validation split and
    training subset, the same for all) cancels in the comparison: the variance is the residual of
    the two-way model value = configuration + seed + noise, (k-1)(R-1) degrees of freedom. With a
    run missing, the pooled within-group variance, sum(n_i - 1) degrees of freedom."""
    import numpy as np

    means = np.array([statistics.fmean(g.values()) if g else math.nan for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    used = [g for g in groups if g]
    seeds = set(used[0]) if used else set()
    if len(used) == len(groups) >= 2 and len(seeds) >= 2 and all(set(g) == seeds for g in used):
        table = np.array([[g[s] for s in sorted(seeds)] for g in used])
        resid = table - table.mean(axis=1, keepdims=True) - table.mean(axis=0, keepdims=True) + table.mean()
        df = (table.shape[0] - 1) * (table.shape[1] - 1)
        return means, counts, float((resid ** 2).sum() / df), df, True
    df = sum(len(g) - 1 for g in used)
    if len(used) < 2 or df < 1:
        return means, counts, 0.0, 0, False
    pooled = sum(sum((x - statistics.fmean(g.values())) ** 2 for x in g.values()) for g in used) / df
    return means, counts, pooled, df, False


def noise_of(confirmed: list[Confirmed]) -> dict[str, Any]:
    """{noise_sd: one run's noise as the comparison sees it (None: unknown), paired: the seed's
    shared effect taken out}, for the summary."""
    _, _, variance, df, paired = _noise([c.by_seed for c in confirmed])
    return {"noise_sd": math.sqrt(variance) if df else None, "paired": paired}


# ---------------------------------------------------------------------------------------------
# The confirmation's trials into the search's tables and summary
# ---------------------------------------------------------------------------------------------

def combine(found: SearchResults, records: list[TrialRecord], runs: list[ConfirmRun], chosen: list[dict[str, Any]],
            *, max_epochs: int, seed: int) -> SearchResults:
    """The search's results with the confirmation runs added: a row each in the trials table
    (stage 'confirm', confirm_of = the search trial, repeat, seed, the configuration's params),
    their epochs in the history, and the pick in the summary (selected_*, confirmation). The
    search's rows get their seed (every search trial trains with the space's seed) and repeat 0."""
    summary = found.summary
    metric, mode = summary.metric, summary.mode
    by_index = {int(r.params["run"]["index"]): r for r in records if "run" in r.params}
    records = [TrialRecord(r.trial_id, {}, r.history, r.error, r.path, r.checkpoint_path, r.retries)
               for r in by_index.values()]
    collected = collect(records, metric=metric, mode=mode, max_epochs=max_epochs, num_samples=len(runs))
    rows = {row["trial_id"]: row for row in collected.trials}
    added, outcomes = [], {}
    for index, record in sorted(by_index.items()):
        run = runs[index]
        row = {**rows[record.trial_id], "stage": "confirm", "confirm_of": run.confirm_of, "repeat": run.repeat,
               "seed": run.seed, **{f"{CONFIG_PREFIX}{k}": v for k, v in run.params.items()}}
        added.append(row)
        outcomes[index] = {"trial_id": record.trial_id, "value": row.get(f"best_{metric}")}
    confirmed = decide(chosen, runs, outcomes, metric=metric, mode=mode)
    pick = confirmed[0]
    record = {"top_k": len(chosen), "repeats": max((r.repeat for r in runs), default=0),
              "seeds": sorted({r.seed for r in runs}), "runs": len(runs), "runs_scored": sum(
                  finite(o["value"]) for o in outcomes.values()),
              "epochs_spent": sum(row["epochs"] for row in added), **noise_of(confirmed),
              "configurations": [asdict(c) for c in confirmed]}
    new_summary = dataclasses.replace(summary, selected_trial_id=pick.trial_id, selected_config=pick.params,
                                      selected_value=pick.mean, confirmation=record)
    searched = [{**row, "confirm_of": None, "repeat": 0, "seed": seed} for row in found.trials]
    return SearchResults(searched + added, found.history + collected.history, new_summary)
