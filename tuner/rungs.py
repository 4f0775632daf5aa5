"""ASHA's rungs judged after the search, from its tables: does the objective at a rung rank the
trials as their final score does, and did a rung stop one value of a parameter that the final
scores do not hold against?

Pure functions of trials.parquet's and history.parquet's rows and the budget (no Ray, no
files, no printing): tuner/search.py prints screen.format_rungs() under the summary, the report draws
the same RungDiagnostics as a table and puts the warnings at the top.

A trial's final score is its objective at its last epoch, for the trials that ran all
max_epochs (status completed). The last epoch, not the best: the last is what the schedule ends
on and what the rung is meant to predict (bench/asha_replay.py measures the same), while a
trial's best epoch may be the rung's own epoch, which would correlate the rung with itself.

The correlation is taken over the trials that finished, a set the rung itself cut to the better
scores there: it reads lower than over all trials (asha_replay.py, over a search that stopped
none, measures that). The misranking warning is the GPU-scale depth case of bench/README.md:
the first rung stopped 16 of 18 depth-20 trials (the other depths: 30 of 54), and the two
depth-20 trials that went on ended as well as the best of the others.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


MIN_RANKED = 3            # finished trials a rank correlation needs
MIN_STOPPED = 3           # trials with one value a rung must stop before a warning
MOSTLY = 2 / 3            # ... and the share of that value's trials it stopped, at least
ALPHA = 0.05              # Fisher's exact test: stopped more often than the other values' trials

Row = Mapping[str, Any]


def asha_rungs(max_epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """Epochs at which ASHA decides (Ray stops at the first epoch >= grace * factor**k below max_t)."""
    rungs, at = [], float(grace_period)
    while at < max_epochs:
        rungs.append(math.ceil(at - 1e-9))
        at *= reduction_factor
    return rungs


@dataclass(frozen=True)
class Misranking:
    """A rung that stopped most trials with param = value, more often than the other values'
    trials, while one with the value that finished ends at least as well as the others' median."""

    epoch: int                 # the rung
    param: str
    value: Any
    stopped: int               # trials with the value that the rung stopped
    judged: int                # trials with the value that the rung judged (stopped or let go on)
    others_stopped: int        # the same for the trials with another value of param
    others_judged: int
    finished: int              # trials with the value that ran every epoch
    best_final: float          # the best of their final scores
    others_finished: int
    others_median_final: float
    p_value: float             # Fisher's exact test, one-sided: stopped more often than the others


@dataclass(frozen=True)
class Rung:
    epoch: int
    judged: int                # trials with a score at this epoch that the rung stopped or let go on
    stopped: int
    finished: int              # of those that went on, the trials that ran all max_epochs
    correlation: float | None  # Spearman(objective at this epoch, final) over the finished
    no_correlation: str | None  # why correlation is None
    misrankings: tuple[Misranking, ...] = ()

    @property
    def went_on(self) -> int:
        return self.judged - self.stopped


@dataclass(frozen=True)
class RungDiagnostics:
    metric: str
    mode: str
    max_epochs: int
    rungs: tuple[Rung, ...]

    @property
    def misrankings(self) -> list[Misranking]:
        return [m for rung in self.rungs for m in rung.misrankings]


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None where it is undefined:
    fewer than two pairs, or one side all equal."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy import stats  # here: `tune-resnet status` imports this module and never needs scipy

    return float(stats.spearmanr(a, b).statistic)


def discrete_params(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The choice and int parameters of a space as search.json holds it (SearchSpec as JSON)."""
    return [name for name, spec in params.items()
            if spec.get("choice") is not None or spec.get("int_", spec.get("int")) is not None]


def diagnose_space(space: Mapping[str, Any], trials: list[Row], history: list[Row], *, metric: str,
                   mode: str) -> RungDiagnostics:
    """The rungs of a search from its space (search.json's "space": budget and params) and tables."""
    budget = space["budget"]
    return diagnose(trials, history, rungs=asha_rungs(budget["max_epochs"], budget["grace_period"],
                                                      budget["reduction_factor"]),
                    metric=metric, mode=mode, max_epochs=budget["max_epochs"],
                    params=discrete_params(space["params"]))


def diagnose(trials: list[Row], history: list[Row], *, rungs: Iterable[int], metric: str, mode: str,
             max_epochs: int, params: Iterable[str] = ()) -> RungDiagnostics:
    """Each rung: the trials it judged and stopped, the rank correlation of the objective there
    with the final one over the trials that finished, and the parameter values it misranked."""
    scores = {(r["trial_id"], r["training_iteration"]): r[metric] for r in history if _finite(r.get(metric))}
    finals = {t["trial_id"]: t[f"last_{metric}"] for t in trials
              if t["status"] == "completed" and _finite(t.get(f"last_{metric}"))}
    by_id = {t["trial_id"]: t for t in trials}
    params = list(params)
    out = []
    for epoch in rungs:
        judged = {t["trial_id"]: verdict for t in trials
                  if (verdict := _verdict(t, epoch, scores)) is not None}
        ranked = [t for t in judged if t in finals]
        correlation = (rank_correlation([scores[t, epoch] for t in ranked], [finals[t] for t in ranked])
                       if len(ranked) >= MIN_RANKED else None)
        misranked = [m for p in params for m in _misrankings(epoch, p, judged, by_id, finals, mode)]
        out.append(Rung(epoch, len(judged), sum(v == "stopped" for v in judged.values()), len(ranked),
                        correlation, _why_none(correlation, len(ranked), metric), tuple(misranked)))
    return RungDiagnostics(metric, mode, max_epochs, tuple(out))


def _verdict(trial: Row, epoch: int, scores: Mapping[tuple[str, int], float]) -> str | None:
    """"stopped" at this rung, "went_on" past it, or None: never judged there (ended before it,
    diverged at it, or no score at it)."""
    if (trial["trial_id"], epoch) not in scores:
        return None
    epochs, status = trial["epochs"], trial["status"]
    if epochs > epoch or (epochs == epoch and status == "errored"):  # errored in the epoch after the rung
        return "went_on"
    return "stopped" if epochs == epoch and status == "early_stopped" else None


def _why_none(correlation: float | None, ranked: int, metric: str) -> str | None:
    if correlation is not None:
        return None
    if ranked < MIN_RANKED:
        return f"{ranked} finished; a rank correlation needs {MIN_RANKED}"
    return f"all {ranked} finished have the same {metric} at the rung or at the end"


def _misrankings(epoch: int, param: str, judged: Mapping[str, str], trials: Mapping[str, Row],
                 finals: Mapping[str, float], mode: str) -> list[Misranking]:
    key = f"config/{param}"
    values = {trials[t].get(key) for t in judged} - {None}
    found = (_misranking(epoch, param, value, judged, trials, finals, mode) for value in sorted(values, key=str))
    return [m for m in found if m is not None]


def _misranking(epoch: int, param: str, value: Any, judged: Mapping[str, str], trials: Mapping[str, Row],
                finals: Mapping[str, float], mode: str) -> Misranking | None:
    key = f"config/{param}"
    mine = [t for t in judged if trials[t].get(key) == value]
    others = [t for t in judged if trials[t].get(key) not in (None, value)]
    stopped = sum(judged[t] == "stopped" for t in mine)
    others_stopped = sum(judged[t] == "stopped" for t in others)
    if stopped < MIN_STOPPED or stopped < MOSTLY * len(mine) or not others:
        return None
    table = [[stopped, len(mine) - stopped], [others_stopped, len(others) - others_stopped]]
    from scipy import stats

    p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
    mine_final = [finals[t] for t in mine if t in finals]
    others_final = [finals[t] for t in others if t in finals]
    if p_value >= ALPHA or not mine_final or not others_final:
        return None
    # Its best, not its median: the rung left it few finished trials, the best of which says whether
    # it can end among the others (the depth case: 2 of 18 finished)
    best, others_median = (max if mode == "max" else min)(mine_final), statistics.median(others_final)
    if (best < others_median) if mode == "max" else (best > others_median):
        return None  # the finals agree with the rung: the value ends worse
    return Misranking(epoch, param, value, stopped, len(mine), others_stopped, len(others), len(mine_final),
                      best, len(others_final), others_median, p_value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# lines for a terminal and the report
# ---------------------------------------------------------------------------------------------
