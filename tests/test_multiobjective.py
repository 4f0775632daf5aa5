"""Several objectives: the YAML form and its errors, the Pareto front, the pick rule, constraint
values reaching Optuna through Ray's OptunaSearch, latency measured on the exported graph, and a
two-objective search through the CLI with real Ray whose refit follows the pick rule."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from search_spaces import SpaceError, parse_constraint, parse_pick, parse_space
from tuner import pareto
from tuner.cli import main
from tuner.results import SearchResults, SearchSummary
from tuner.screen import format_front

from test_search import run_tables, search, write_space

MINIMAL = {"name": "mo", "params": {"lr": {"loguniform": [1.0e-4, 0.1]}}}


def space(**sections) -> dict:
    return {**MINIMAL, **sections}


# ---------------------------------------------------------------------------------------------
# The YAML form
# ---------------------------------------------------------------------------------------------

def test_one_objective_reads_as_before():
    spec = parse_space(space(objective={"metric": "val_loss"}))
    assert (spec.objective.metric, spec.objective.mode, spec.objective.several) == ("val_loss", "min", False)
    assert spec.measured_metrics == () and not spec.selects


def test_several_objectives_take_their_modes_and_name_what_trials_measure():
    spec = parse_space(space(objective={"metrics": ["val_acc", {"metric": "latency_ms"}, "params"],
                                        "constraints": ["macs <= 1e7"]}))
    assert [(m.metric, m.mode) for m in spec.objective.objectives] == [
        ("val_acc", "max"), ("latency_ms", "min"), ("params", "min")]
    assert (spec.objective.metric, spec.objective.mode) == ("val_acc", "max")  # what ASHA judges
    assert spec.measured_metrics == ("params", "macs", "latency_ms", "latency_ms_b64") and spec.selects
    again = parse_space(spec.model_dump(mode="json") | {"params": MINIMAL["params"]})  # search.json reads back
    assert again.objective == spec.objective


def test_a_pick_alone_measures_what_it_names():
    spec = parse_space(space(selection={"pick": "best val_acc with latency_ms_b64 < 40"}))
    assert spec.measured_metrics == ("latency_ms", "latency_ms_b64") and spec.selects and not spec.objective.several


@pytest.mark.parametrize("sections, key, message", [
    ({"objective": {"metrics": ["latency_ms", "val_acc"]}}, "objective.metrics.0",
     "expected val_acc or val_loss first (ASHA judges the first objective), got 'latency_ms'"),
    ({"objective": {"metrics": ["val_acc", "latency"]}}, "objective.metrics.1.metric", "did you mean 'latency_ms'?"),
    ({"objective": {"metrics": ["val_acc", {"metric": "params", "mode": "max"}]}}, "objective.metrics.1.mode",
     "expected 'min' for params, got 'max'"),
    ({"objective": {"metrics": ["val_acc", "macs", "macs"]}}, "objective.metrics.2", "'macs' is listed twice"),
    ({"objective": {"metric": "val_loss", "metrics": ["val_acc", "macs"]}}, "objective.metric",
     "'val_loss' but metrics starts with 'val_acc'"),
    ({"objective": ["val_acc", "latency_ms"]}, "objective", "put the list under metrics"),
    ({"objective": {"metric": "val_acc", "constraints": ["latency_ms = 5"]}}, "objective.constraints.0",
     "expected 'METRIC <= NUMBER'"),
    ({"selection": {"pick": "top val_acc"}}, "selection.pick", "expected 'best METRIC' or"),
    ({"selection": {"pick": "best val_acc with latncy_ms <= 5"}}, "selection.pick", "did you mean 'latency_ms'?"),
    ({"objective": {"metrics": ["val_acc", "macs"]}, "selection": {"top_k": 3}}, "selection.top_k",
     "expected 1 with several objectives"),
    ({"objective": {"metrics": ["val_acc", "macs"]}, "sampler": {"type": "cmaes"}}, "sampler.type",
     "cmaes optimises one objective"),
    ({"sampler": {"type": "nsga2", "population_size": 1}}, "sampler.population_size", "greater than or equal to 2"),
])
def test_bad_objectives_are_one_line_naming_the_key(sections, key, message):
    with pytest.raises(SpaceError) as caught:
        parse_space(space(**sections), source="s.yaml")
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"s.yaml: {key}: ") and message in text, text


def test_a_bad_objective_through_the_cli_is_one_line_and_exit_code_2(image_folder, tmp_path):
    path = write_space(tmp_path, image_folder, objective={"metrics": ["val_acc", "latency_ms"],
                                                          "constraints": ["latency_ms <= fast"]})
    code, output = search("--space", str(path), "--storage", str(tmp_path / "runs"))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "objective.constraints.0" in lines[0], output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Rules, the front and the pick (pure)
# ---------------------------------------------------------------------------------------------

def test_constraints_and_pick_rules_parse():
    assert parse_constraint(" latency_ms<=5 ") == parse_constraint("latency_ms <= 5.0")
    rule = parse_pick("best val_acc with latency_ms <= 5 and params < 1e6")
    assert rule.metric == "val_acc" and [str(c) for c in rule.constraints] == ["latency_ms <= 5", "params < 1e+06"]
    assert str(parse_pick("best latency_ms")) == "best latency_ms"
    strict, loose = parse_constraint("macs < 10"), parse_constraint("macs >= 10")
    assert strict.violation(9) < 0 < strict.violation(10) and loose.violation(10) == 0 < loose.violation(9)
    assert strict.violation(None) == math.inf and strict.violation(float("nan")) == math.inf


def trial(trial_id: str, val_acc: float, latency: float, status: str = "completed", **config) -> dict:
    return {"trial_id": trial_id, "status": status, "best_val_acc": val_acc, "latency_ms": latency,
            "params": int(latency * 1000), **{f"config/{k}": v for k, v in config.items()}}


# val_acc (max) against latency_ms (min): a, c, e on the front; b is beaten by a, d by c
TRIALS = [trial("a", 0.80, 4.0, depth=20), trial("b", 0.70, 5.0, depth=14), trial("c", 0.60, 1.0, depth=8),
          trial("d", 0.55, 2.0, depth=8), trial("e", 0.90, 9.0, depth=32),
          trial("f", 0.99, 0.5, status="diverged"), trial("g", 0.95, 0.1, status="errored")]


def test_front_holds_exactly_the_non_dominated_trials():
    front = pareto.front(TRIALS, ["val_acc", "latency_ms"])
    assert [t["trial_id"] for t in front] == ["e", "a", "c"]  # best val_acc first; diverged/errored never
    assert pareto.non_dominated([(1, 1), (1, 1), (0, 2), (0, 0)]) == [0, 1, 2]  # ties both stay
    constrained = pareto.front(TRIALS, ["val_acc", "latency_ms"], [parse_constraint("latency_ms <= 5")])
    assert [t["trial_id"] for t in constrained] == ["a", "c"]


@pytest.mark.parametrize("rule, expected", [
    ("best val_acc", "e"), ("best val_acc with latency_ms <= 5", "a"), ("best val_acc with latency_ms < 4", "c"),
    ("best latency_ms", "c"), ("best latency_ms with val_acc >= 0.75", "a"), ("best val_acc with params <= 900", None),
])
def test_pick_rule_names_the_best_trial_that_holds_its_constraints(rule, expected):
    picked = pareto.pick(TRIALS, parse_pick(rule), ["val_acc", "latency_ms"])
    assert (picked["trial_id"] if picked else None) == expected


def summary_with_front(spec_sections: dict) -> SearchSummary:
    spec = parse_space(space(**spec_sections))
    summary = SearchSummary(metric="val_acc", mode="max", best_trial_id="e", best_value=0.9, best_val_acc=0.9,
                            best_epoch=3, best_config={"depth": 32}, trials=len(TRIALS), by_status={},
                            epochs_spent=10, epochs_without_early_stopping=21)
    return pareto.select(SearchResults(TRIALS, [], summary), spec).summary


def test_select_writes_the_front_and_the_pick_into_the_summary():
    summary = summary_with_front({"objective": {"metrics": ["val_acc", "latency_ms"]},
                                  "selection": {"pick": "best val_acc with latency_ms <= 5"}})
    assert [e["trial_id"] for e in summary.front] == ["e", "a", "c"] and summary.front[1]["index"] == 1
    assert summary.front[1]["values"]["latency_ms"] == 4.0 and summary.front[1]["config"] == {"depth": 20}
    assert summary.pick["trial_id"] == "a" and summary.pick["front_index"] == 1
    assert SearchSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary  # summary.json round trip
    chosen = pareto.choice(summary)
    assert (chosen.trial_id, chosen.config, chosen.val_acc) == ("a", {"depth": 20}, 0.8)
    assert pareto.choice(summary, 2).trial_id == "c"
    lines = format_front(summary)
    assert lines[0].startswith("Pareto front: 3 of 7 trials") and lines[2].startswith(" *[1] trial a: val_acc 0.8000")
    assert lines[-1].startswith("pick (best val_acc with latency_ms <= 5): trial a [1]")


def test_a_pick_no_trial_holds_says_why_and_refits_nothing():
    summary = summary_with_front({"objective": {"metrics": ["val_acc", "latency_ms"],
                                                "constraints": ["latency_ms <= 0.2"]}})
    assert summary.front == [] and pareto.choice(summary) is None
    assert summary.pick["why"] == "no trial holds latency_ms <= 0.2 (the nearest: 1)"
    with pytest.raises(Exception, match="expected a front index from 0 to -1|no Pareto front"):
        pareto.choice(summary, 0)


def test_one_objective_keeps_the_summary_without_a_front():
    summary = summary_with_front({})
    assert summary.front is None and summary.pick is None and format_front(summary) == []
    assert pareto.choice(summary).trial_id == "e"
    with pytest.raises(Exception, match="no Pareto front"):
        pareto.choice(summary, 0)


# ---------------------------------------------------------------------------------------------
# Optuna hears the constraints; latency on the exported graph
# ---------------------------------------------------------------------------------------------

def test_constraint_values_reach_optuna_through_ray_optuna_search():
    """Ray's OptunaSearch passes no constraint on; ours sets them per trial before its values."""
    from search_spaces import build_sampler
    from tuner._ray import ConstrainedOptunaSearch

    spec = parse_space(space(objective={"metrics": ["val_acc", "latency_ms"], "constraints": ["latency_ms <= 5"]},
                             sampler={"type": "nsga2", "seed": 0, "population_size": 4}))
    searcher = ConstrainedOptunaSearch(space=spec.define_by_run(), metric=["val_acc", "latency_ms"],
                                       mode=["max", "min"], constraints=spec.objective.parsed_constraints,
                                       sampler=build_sampler(spec.sampler, params=spec.params, concurrency=1))
    for index, latency in enumerate([3.0, 8.0, 5.0]):
        searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"val_acc": 0.5, "latency_ms": latency})
    trials = searcher._ot_study.trials
    assert [t.constraints for t in trials] == [{"latency_ms <= 5": -2.0}, {"latency_ms <= 5": 3.0},
                                               {"latency_ms <= 5": 0.0}]
    assert [t.values for t in trials] == [[0.5, 3.0], [0.5, 8.0], [0.5, 5.0]]


def test_latency_is_measured_on_the_graph_the_export_writes(tiny_config, tmp_path):
    import torch

    from trainables.models import count_parameters, create_model
    from tuner.export import onnx_bytes
    from tuner.latency import measure_onnx, trial_metrics

    def model(depth: int, width: int):
        return create_model("cifar_resnet", num_classes=3, depth=depth, width=width).to(
            memory_format=torch.channels_last)

    small, large = model(8, 4), model(20, 32)
    args = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": 16, "threads": 1}
    figures = [trial_metrics(m, names=("latency_ms", "params"), **args) for m in (small, large)]
    assert figures[0]["params"] == count_parameters(small) and set(figures[0]) == {"latency_ms", "latency_ms_b64",
                                                                                  "params"}
    assert 0 < figures[0]["latency_ms"] < figures[0]["latency_ms_b64"]
    assert figures[0]["latency_ms_b64"] < figures[1]["latency_ms_b64"]  # 100x the MACs: slower by far
    graph = onnx_bytes(small.eval(), mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16)
    assert graph[:2] and set(measure_onnx(graph, input_size=16, threads=1, names=("latency_ms",))) == {"latency_ms"}


# ---------------------------------------------------------------------------------------------
# A two-objective search through the CLI, real Ray and Optuna
# ---------------------------------------------------------------------------------------------

PICK = "best val_acc with params <= 50000"  # params: exact per architecture (width 16 has more), known to the test


@pytest.fixture(scope="module")
def two_objective_search(ray_session, image_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mo")
    path = write_space(
        folder, image_folder, objective={"metrics": ["val_acc", "latency_ms"], "constraints": ["latency_ms <= 1000"]},
        sampler={"type": "nsga2", "seed": 0, "population_size": 4}, selection={"pick": PICK},
        budget={"num_samples": 8, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        params={"lr": {"loguniform": [1.0e-2, 0.5]}, "depth": {"choice": [8, 14]}, "width": {"choice": [4, 8, 16]}},
        refit={"epochs": 1})
    code, output = search("--space", str(path), "--storage", str(folder / "runs"), "--name", "mo")
    assert code == 0, output
    return folder / "runs" / "mo", output


@pytest.mark.slow
def test_two_objective_search_yields_a_non_dominated_front(two_objective_search):
    run_dir, output = two_objective_search
    trials, _, summary = run_tables(run_dir)
    assert len(trials) == 8 and all(t["latency_ms"] > 0 and t["latency_ms_b64"] > 0 for t in trials)
    assert all(t["params"] > 0 for t in trials)  # the pick names params: measured too
    scored = [t for t in trials if t["status"] in ("completed", "early_stopped")]
    points = {t["trial_id"]: (t["best_val_acc"], -t["latency_ms"]) for t in scored}
    on_front = [e["trial_id"] for e in summary["front"]]
    assert on_front, output
    for trial_id in on_front:  # no trial beats a front member on both objectives ...
        assert not any(pareto.dominates(points[other], points[trial_id]) for other in points)
    for trial_id in set(points) - set(on_front):  # ... and every other trial is beaten by one of them
        assert any(pareto.dominates(points[member], points[trial_id]) for member in on_front)
    assert [e["index"] for e in summary["front"]] == list(range(len(on_front)))
    assert "Pareto front: " in output and f"pick ({PICK.replace('with', 'with latency_ms <= 1000 and')})" in output
    assert (run_dir / "report" / "pareto_front.png").exists()


@pytest.mark.slow
def test_the_refit_follows_the_pick_rule(two_objective_search):
    run_dir, output = two_objective_search
    trials, _, summary = run_tables(run_dir)
    allowed = [t for t in trials if t["status"] in ("completed", "early_stopped") and t["params"] <= 50000]
    expected = max(allowed, key=lambda t: (t["best_val_acc"], -t["latency_ms"]))
    assert summary["pick"]["trial_id"] == expected["trial_id"]
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert metrics["search_trial_id"] == expected["trial_id"] and metrics["search_selection"].startswith("pick: ")
    config = json.loads((run_dir / "best" / "config.json").read_text())
    assert (config["config"]["depth"], config["config"]["width"]) == (expected["config/depth"], expected["config/width"])
    assert config["model"]["parameters"] <= 50000
    card = (run_dir / "best" / "README.md").read_text()
    assert "- Latency (`model.onnx`, onnxruntime" in card and f"(trial {expected['trial_id']})" in card
    assert config["latency"]["latency_ms"] > 0 and config["latency"]["threads"] == 1


@pytest.mark.slow
def test_refit_pick_n_takes_that_front_entry(two_objective_search):
    run_dir, _ = two_objective_search
    _, _, summary = run_tables(run_dir)
    last = summary["front"][-1]
    result = CliRunner().invoke(main, ["refit", str(run_dir), "--pick", str(last["index"]), "--epochs", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"refit: trial {last['trial_id']}, by the --pick {last['index']}" in result.output
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert metrics["search_trial_id"] == last["trial_id"]
    assert metrics["search_latency_ms"] == pytest.approx(last["values"]["latency_ms"])
    result = CliRunner().invoke(main, ["refit", str(run_dir), "--pick", "99"], catch_exceptions=False)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"Error: --pick: expected a front index from 0 to {len(summary['front']) - 1}, got 99"]


@pytest.mark.slow
def test_the_journal_of_two_objectives_ends_each_trial_with_both(two_objective_search):
    """The live optuna.journal (tuner/journal.py) with several objectives: COMPLETE with the best
    epoch's val_acc and the latency; PRUNED without values; no intermediate values (Optuna's
    Trial.report refuses a multi-objective study)."""
    import optuna

    run_dir, _ = two_objective_search
    trials, _, _ = run_tables(run_dir)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal")))
    study = optuna.load_study(study_name="mo", storage=storage)
    assert study.metric_names == ["val_acc", "latency_ms"] and study.user_attrs["live"] is True
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert len(study.trials) == len(trials) == len(by_id)
    for trial in trials:
        mirrored = by_id[trial["trial_id"]]
        assert not mirrored.intermediate_values
        if trial["status"] == "completed":
            assert mirrored.values == pytest.approx([trial["best_val_acc"], trial["latency_ms"]])
        else:
            assert mirrored.state == optuna.trial.TrialState.PRUNED and mirrored.values is None


def test_space_file_round_trip_of_the_list_form(tmp_path):
    """The form the README shows, as YAML."""
    text = ("name: mo\nobjective:\n  metrics: [val_acc, latency_ms]\n  constraints: ['latency_ms <= 5']\n"
            "selection: {pick: best val_acc with latency_ms <= 5}\nsampler: {type: tpe}\n"
            "params:\n  lr: {loguniform: [1.0e-4, 0.1]}\n")
    spec = parse_space(yaml.safe_load(text))
    assert spec.selection.pick_rule == parse_pick("best val_acc with latency_ms <= 5")


def test_latency_median_leaves_out_runs_the_os_preempted():
    """A run that waits (here: sleeps, as a preempted one does) costs wall time but no CPU time."""
    import time

    from tuner.latency import median_ms

    calls = []

    def run():
        calls.append(None)
        if len(calls) % 2:
            time.sleep(0.02)  # off the CPU: 20 ms of wall time
        else:
            end = time.thread_time() + 0.002
            while time.thread_time() < end:  # on the CPU: 2 ms
                pass

    assert 1.5 < median_ms(run, warmup=0, budget_s=0.1) < 6
