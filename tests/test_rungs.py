"""ASHA's rungs judged from a search's tables (tuner/rungs.py): on tables built here by
tuner.results.collect from constructed learning curves; no Ray, no training, no files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from search_spaces import parse_space
from tuner import results
from tuner.rungs import (Misranking, asha_rungs, diagnose, diagnose_space, discrete_params,
                         rank_correlation)
from tuner.screen import format_rungs


def tables(curves: dict[str, tuple[dict, list[float]]], *, max_epochs: int, ending: dict[str, str] | None = None):
    """trials and history rows as a search writes them: trial id -> (params, val_acc per epoch);
    a curve shorter than max_epochs is a trial ASHA stopped after its last epoch, unless `ending`
    says it errored or diverged."""
    ending = ending or {}
    records = []
    for trial_id, (params, values) in curves.items():
        history = [{"training_iteration": e, "val_acc": v, "val_loss": 1 - v, "time_total_s": float(e),
                    "diverged": int(ending.get(trial_id) == "diverged" and e == len(values))}
                   for e, v in enumerate(values, start=1)]
        records.append(SimpleNamespace(trial_id=trial_id, params=params, history=history, path=f"/runs/{trial_id}",
                                       error="boom" if ending.get(trial_id) == "errored" else None,
                                       checkpoint_path=None, retries=0))
    found = results.collect(records, metric="val_acc", mode="max", max_epochs=max_epochs, num_samples=len(curves))
    return found.trials, found.history


def ladder(start: float, final: float, epochs: int, stop: int | None = None) -> list[float]:
    """A straight learning curve from start to final over `epochs`, cut after `stop` epochs."""
    step = (final - start) / max(1, epochs - 1)
    return [round(start + step * e, 4) for e in range(epochs)][:stop]


# A first rung that ranks the finals well: rungs after epochs 1 and 2 of 4 (grace 1, factor 2);
# the higher a trial starts, the higher it ends.
GOOD = {f"g{i:02d}": ({"depth": (8, 14)[i % 2]}, ladder(0.2 + 0.03 * i, 0.5 + 0.03 * i, 4,
                                                         stop=1 if i < 4 else 2 if i < 6 else None))
        for i in range(11)}

# The GPU-scale depth case of bench/README.md, in small: after epoch 1 depth 20 looks worst and the
# rung stops 6 of its 7 trials (the others: 3 of 11), while the one that went on ends best.
DEPTH = {
    **{f"d20-{i}": ({"depth": 20, "lr": 0.1 + i / 100}, [0.20 + i / 100]) for i in range(6)},
    "d20-6": ({"depth": 20, "lr": 0.2}, [0.26, 0.60, 0.85]),
    **{f"d8-{i}": ({"depth": 8, "lr": 0.1 + i / 100}, [0.40 + i / 100, 0.55, 0.60 + i / 100]) for i in range(4)},
    **{f"d8-{i}": ({"depth": 8, "lr": 0.1 + i / 100}, [0.30 + i / 100]) for i in range(4, 6)},
    **{f"d14-{i}": ({"depth": 14, "lr": 0.1 + i / 100}, [0.42 + i / 100, 0.58, 0.70 + i / 100]) for i in range(4)},
    "d14-4": ({"depth": 14, "lr": 0.3}, [0.31]),
}


def test_the_rungs_are_ray_tunes_arithmetic():
    assert asha_rungs(8, 1, 3) == [1, 3] and asha_rungs(4, 1, 2) == [1, 2] and asha_rungs(3, 3, 3) == []
    # tests/test_search.py checks these against Ray Tune's own _Bracket


def test_a_rung_that_ranks_the_finals_well():
    trials, history = tables(GOOD, max_epochs=4)
    found = diagnose(trials, history, rungs=[1, 2], metric="val_acc", mode="max", max_epochs=4, params=["depth"])
    first, second = found.rungs
    assert (first.epoch, first.judged, first.stopped, first.went_on, first.finished) == (1, 11, 4, 7, 5)
    assert (second.epoch, second.judged, second.stopped, second.finished) == (2, 7, 2, 5)
    assert first.correlation == pytest.approx(1.0) and second.correlation == pytest.approx(1.0)
    assert found.misrankings == []
    lines = format_rungs(found)
    assert lines == ["ASHA's rungs: Spearman of the val_acc at each rung with the final val_acc (epoch 4), "
                     "over the trials that finished",
                     "  epoch 1: 11 judged, 4 stopped, 7 went on; Spearman +1.00 over 5 finished",
                     "  epoch 2: 7 judged, 2 stopped, 5 went on; Spearman +1.00 over 5 finished"]


@pytest.mark.parametrize("metric, mode", [("val_acc", "max"), ("val_loss", "min")])
def test_a_first_rung_that_stops_the_best_depth_warns(metric, mode):
    trials, history = tables(DEPTH, max_epochs=3)
    found = diagnose(trials, history, rungs=[1], metric=metric, mode=mode, max_epochs=3, params=["depth"])
    (rung,) = found.rungs
    assert (rung.judged, rung.stopped, rung.finished) == (18, 9, 9)
    (warning,) = found.misrankings  # depth 8 lost 2 of 6 and depth 14 1 of 5: no warning for them
    assert isinstance(warning, Misranking)
    assert (warning.epoch, warning.param, warning.value) == (1, "depth", 20)
    assert (warning.stopped, warning.judged, warning.others_stopped, warning.others_judged) == (6, 7, 3, 11)
    assert (warning.finished, warning.others_finished) == (1, 8)
    assert warning.p_value < 0.05
    final = 0.85 if metric == "val_acc" else 0.15
    assert warning.best_final == pytest.approx(final)
    line = format_rungs(found)[-1]
    assert line.startswith("warning: the rung at epoch 1 stopped 6 of 7 trials with depth = 20 "
                           "(other depth: 3 of 11), yet depth = 20 ends as well "
                           f"(best final {metric} {final:.4f} of 1 finished, the others' median ")
    assert "\n" not in line and "budget.grace_period" in line


def test_no_warning_when_the_finals_agree_with_the_rung():
    worse = {**DEPTH, "d20-6": ({"depth": 20, "lr": 0.2}, [0.26, 0.40, 0.60])}  # below the others' median 0.665
    trials, history = tables(worse, max_epochs=3)
    assert diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3,
                    params=["depth"]).misrankings == []
    # nor when no depth-20 trial went on: the finals say nothing about it
    gone = {k: v for k, v in DEPTH.items() if k != "d20-6"}
    trials, history = tables(gone, max_epochs=3)
    assert diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3,
                    params=["depth"]).misrankings == []


def test_no_warning_for_a_value_the_sampler_drew_most_of_the_time():
    """A value that is most of the stopped trials because it is most of all trials is no misranking."""
    popular = {f"p{i:02d}": ({"depth": 14 if i % 5 else 8}, [0.2 + i / 100] if i % 3 else [0.5 + i / 100, 0.6, 0.7])
               for i in range(15)}
    trials, history = tables(popular, max_epochs=3)
    found = diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3, params=["depth"])
    assert found.rungs[0].stopped == 10 and found.misrankings == []


def test_too_few_finished_trials_give_no_correlation_and_say_why():
    few = {"a": ({}, [0.5, 0.6, 0.7]), "b": ({}, [0.4, 0.5, 0.6]), "c": ({}, [0.2]), "d": ({}, [0.1])}
    trials, history = tables(few, max_epochs=3)
    (rung,) = diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3).rungs
    assert (rung.judged, rung.stopped, rung.finished, rung.correlation) == (4, 2, 2, None)
    assert rung.no_correlation == "2 finished; a rank correlation needs 3"
    assert format_rungs(diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3))[1] == (
        "  epoch 1: 4 judged, 2 stopped, 2 went on; no rank correlation (2 finished; a rank correlation needs 3)")
    same = {k: ({}, [0.5, 0.6, 0.7]) for k in "xyz"}
    trials, history = tables(same, max_epochs=3)
    (rung,) = diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3).rungs
    assert rung.correlation is None and rung.no_correlation.startswith("all 3 finished have the same val_acc")


def test_no_rungs_or_no_trial_at_a_rung_prints_nothing():
    trials, history = tables(GOOD, max_epochs=4)
    assert format_rungs(diagnose(trials, history, rungs=[], metric="val_acc", mode="max", max_epochs=4)) == []
    assert format_rungs(diagnose([], [], rungs=[1, 2], metric="val_acc", mode="max", max_epochs=4)) == []


def test_errored_and_diverged_trials_at_a_rung():
    """A trial that errored after reporting the rung's epoch went on (ASHA let it); one that
    diverged there was never judged."""
    curves = {"ok": ({}, [0.5, 0.6, 0.7]), "err": ({}, [0.4]), "nan": ({}, [0.3]), "stop": ({}, [0.2])}
    trials, history = tables(curves, max_epochs=3, ending={"err": "errored", "nan": "diverged"})
    (rung,) = diagnose(trials, history, rungs=[1], metric="val_acc", mode="max", max_epochs=3).rungs
    assert (rung.judged, rung.stopped, rung.went_on, rung.finished) == (3, 1, 2, 1)


def test_diagnose_space_reads_the_budget_and_the_discrete_params_of_search_json():
    space = parse_space({"name": "s", "budget": {"max_epochs": 3, "grace_period": 1, "reduction_factor": 3},
                         "params": {"depth": {"choice": [8, 14, 20]}, "lr": {"loguniform": [0.01, 1.0]},
                                    "width": {"int": [4, 8], "step": 4}, "ema": 0.5}}).model_dump(mode="json")
    assert discrete_params(space["params"]) == ["depth", "width"]
    trials, history = tables(DEPTH, max_epochs=3)
    found = diagnose_space(space, trials, history, metric="val_acc", mode="max")
    assert [r.epoch for r in found.rungs] == [1] and found.max_epochs == 3
    assert [(m.param, m.value) for m in found.misrankings] == [("depth", 20)]


def test_rank_correlation_is_spearmans_with_mean_ranks_for_ties():
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([0.5, 0.45, 0.5], [0.8, 0.75, 0.7]) == pytest.approx(0.0)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None and rank_correlation([1], [2]) is None
