"""Confirmation before the refit (selection: {top_k, repeats}; tuner/confirm.py): the top
configurations trained again with fresh seeds through real Ray, the pick by the mean, resumed
after the driver is killed in the middle of it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_search import run_tables, write_space
from trial_hooks import with_tests_on_path
from tuner import confirm
from tuner.cli import main
from tuner.status import experiment_state

# val_acc by lr and seed (tests/trial_hooks.py:ScoreTable): the search runs with seed 0, the
# confirmation with seeds 1 and 2. lr 0.01 is the luckiest single run (0.9), lr 0.02 the best mean.
SCORES = {"0.01": {"0": 0.90, "1": 0.50, "2": 0.55}, "0.02": {"0": 0.80, "1": 0.75, "2": 0.70},
          "0.03": {"0": 0.70, "1": 0.60, "2": 0.65}, "0.04": {"0": 0.10, "1": 0.99, "2": 0.99}}


def scored_space(folder: Path, images: Path, *, sleep_s: float = 0.0, **sections) -> Path:
    """4 configurations (a grid over lr), all epochs run (no ASHA stop), val_acc from SCORES."""
    hook = {"hook": "trial_hooks:ScoreTable", "hook_args": {"scores": SCORES, "sleep_s": sleep_s}}
    return write_space(folder, images, params={"lr": {"choice": [0.01, 0.02, 0.03, 0.04]}},
                       sampler={"type": "grid", "seed": 0}, trial=hook,
                       budget={"num_samples": 4, "max_epochs": 2, "grace_period": 2},
                       selection={"top_k": 3, "repeats": 2}, **sections)


def by_stage(trials: list[dict]) -> tuple[list[dict], list[dict]]:
    return [t for t in trials if t["stage"] == "search"], [t for t in trials if t["stage"] == "confirm"]


def driver(space: Path, storage: Path, name: str, *flags: str, save_every_step: bool = False) -> subprocess.Popen:
    """A search in a process of its own, with its embedded Ray, the tests' folder on PYTHONPATH so
    its trials import trial_hooks (the session's Ray started before this test could set it).
    save_every_step: Ray saves its state after every step rather than every ~10 s, so what ended
    before a kill is on disk (tests/test_resume.py does the same)."""
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage", str(storage),
               "--name", name, "--cpus", "2", *flags]
    env = with_tests_on_path({**os.environ, **({"TUNE_GLOBAL_CHECKPOINT_S": "0"} if save_every_step else {})})
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)


@pytest.mark.slow
def test_the_pick_follows_the_mean_of_fresh_runs_not_the_luckiest_run(image_folder, tmp_path):
    space = scored_space(tmp_path, image_folder)
    process = driver(space, tmp_path / "runs", "confirmed")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    run_dir = tmp_path / "runs" / "confirmed"
    trials, history, summary = run_tables(run_dir)
    searched, runs = by_stage(trials)
    assert len(searched) == 4 and summary["trials"] == 4
    lr_of = {t["trial_id"]: t["config/lr"] for t in searched}
    # the top 3 by the search's score (lr 0.04, the unluckiest, is left out), 2 runs each, seeds 1 and 2
    assert sorted(lr_of[t["confirm_of"]] for t in runs) == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03]
    for t in runs:
        assert t["config/lr"] == lr_of[t["confirm_of"]] and t["status"] == "completed" and t["epochs"] == 2
    assert sorted((lr_of[t["confirm_of"]], t["seed"]) for t in runs) == [
        (lr, seed) for lr in (0.01, 0.02, 0.03) for seed in (1, 2)]
    assert {t["seed"] for t in searched} == {0}
    assert {h["trial_id"] for h in history} == {t["trial_id"] for t in trials}  # their epochs too
    # the search's best is the lucky lr 0.01; the pick is lr 0.02, the best mean of the fresh runs
    assert summary["best_config"] == {"lr": 0.01} and summary["best_val_acc"] == pytest.approx(0.9)
    assert summary["selected_config"] == {"lr": 0.02} and summary["selected_value"] == pytest.approx(0.725)
    table = summary["confirmation"]["configurations"]
    assert [c["params"]["lr"] for c in table] == [0.02, 0.03, 0.01]
    assert [c["mean"] for c in table] == pytest.approx([0.725, 0.625, 0.525])
    assert table[0]["p_best"] > table[1]["p_best"] > table[2]["p_best"]
    assert "selected: trial" in output and "P(best)" in output
    # the refit trained the pick, and its card states the confirmed mean
    refit_config = json.loads((run_dir / "best" / "config.json").read_text())
    assert refit_config["config"]["lr"] == 0.02
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert metrics["search_val_acc"] == pytest.approx(0.725)
    # status and the report show the table; the report's study holds the search's 4 trials only
    status = CliRunner().invoke(main, ["status", str(run_dir)])
    assert status.exit_code == 0 and "selected: trial" in status.output and "trials: 4 planned" in status.output
    page = (run_dir / "report.html").read_text()
    assert "Selection: the top configurations confirmed" in page and "0.7250" in page


@pytest.mark.slow
def test_resume_in_the_middle_of_the_confirmation(image_folder, tmp_path):
    """SIGKILL of the driver (and its embedded Ray) once a confirmation run has finished and the
    others are under way; --resume runs no search trial again, nor a finished confirmation run."""
    space = scored_space(tmp_path, image_folder, sleep_s=1.0)
    storage, name = tmp_path / "runs", "killed"
    confirm_dir = storage / name / "confirm"
    process = driver(space, storage, name, "--max-concurrent", "1", "--no-refit", save_every_step=True)
    deadline = time.monotonic() + 240

    def finished_runs() -> int:
        return sum(1 for p in confirm_dir.glob("confirm_*/result.json") if p.read_text().count("\n") == 2)

    def saved_as_ended() -> set[str]:
        """The runs' folders that Ray's saved state calls ended: what a resume must not run again (a
        run that ended after Ray's last save may run again; README, Reliability)."""
        trials, _ = experiment_state(confirm_dir) if confirm_dir.is_dir() else ({}, None)
        return {t["logdir"] for t in trials.values() if t["status"] == "TERMINATED" and t.get("logdir")}

    while not saved_as_ended() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read()
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its embedded Ray, at once
    process.wait()
    ended = saved_as_ended()
    before = {p.parent.name: p.read_text().count("\n") for p in confirm_dir.glob("*/result.json")}
    assert ended and 1 <= finished_runs() < 6
    status = CliRunner().invoke(main, ["status", str(storage / name)])  # what is done, read from the files
    assert status.exit_code == 0, status.output
    assert re.search(r"confirmation: [1-5] of 6 runs done", status.output), status.output

    process = driver(space, storage, name, "--max-concurrent", "1", "--no-refit", "--resume")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert "resuming the confirmation" in output
    trials, history, summary = run_tables(storage / name)
    searched, runs = by_stage(trials)
    assert len(searched) == 4 and len(runs) == 6 and len({t["trial_id"] for t in trials}) == 10
    for trial in trials:  # no epoch reported twice
        epochs = [h["training_iteration"] for h in history if h["trial_id"] == trial["trial_id"]]
        assert epochs == [1, 2], (trial["trial_id"], epochs)
    after = {p.parent.name: p.read_text().count("\n") for p in confirm_dir.glob("*/result.json")}
    for folder in ended:  # ended, as Ray's state saved before the kill says: not run again
        assert before[folder] == after[folder] == 2, folder
    assert summary["selected_config"] == {"lr": 0.02}


# ---------------------------------------------------------------------------------------------
# The pure parts
# ---------------------------------------------------------------------------------------------

def row(trial_id: str, value: float | None, **params) -> dict:
    return {"trial_id": trial_id, "stage": "search", "best_val_acc": value,
            **{f"config/{k}": v for k, v in params.items()}}


def test_candidates_are_the_top_distinct_configurations():
    trials = [row("a", 0.5, lr=1), row("b", 0.9, lr=2), row("c", 0.8, lr=2), row("d", None, lr=3),
              row("e", 0.7, lr=4), {**row("f", 0.99, lr=5), "stage": "confirm"}]
    chosen = confirm.candidates(trials, metric="val_acc", mode="max", top_k=3)
    assert [t["trial_id"] for t in chosen] == ["b", "e", "a"]  # c repeats b's configuration; d has no score
    lowest = confirm.candidates([row("a", 0.5), row("b", 0.2)], metric="val_acc", mode="min", top_k=1)
    assert [t["trial_id"] for t in lowest] == ["b"]


def test_runs_are_paired_by_seed_across_configurations():
    runs = confirm.plan_runs([row("a", 0.9, lr=1), row("b", 0.8, lr=2)], repeats=3, seed=7)
    assert [(r.confirm_of, r.seed) for r in runs] == [("a", 8), ("b", 8), ("a", 9), ("b", 9), ("a", 10), ("b", 10)]
    assert [r.index for r in runs] == list(range(6)) and runs[1].params == {"lr": 2}


def test_decide_ranks_by_mean_and_p_best_follows_the_evidence():
    chosen = [row("lucky", 0.95, lr=1), row("good", 0.90, lr=2)]
    runs = confirm.plan_runs(chosen, repeats=3, seed=0)
    values = {"lucky": [0.80, 0.82, 0.81], "good": [0.88, 0.89, 0.87]}
    outcomes = {r.index: {"trial_id": f"c{r.index}", "value": values[r.confirm_of][r.repeat - 1]} for r in runs}
    decided = confirm.decide(chosen, runs, outcomes, metric="val_acc", mode="max")
    assert [c.trial_id for c in decided] == ["good", "lucky"]
    assert decided[0].mean == pytest.approx(0.88) and decided[0].std == pytest.approx(0.01)
    assert decided[0].p_best > 0.99 and decided[0].p_best + decided[1].p_best == pytest.approx(1.0)
    noise = {("good", 1): 0.03, ("good", 2): -0.02, ("good", 3): -0.01, ("lucky", 1): -0.02, ("lucky", 2): 0.03,
             ("lucky", 3): -0.01}
    close = {r.index: {"trial_id": None, "value": 0.85 + noise[r.confirm_of, r.repeat] + (r.confirm_of == "good") * 0.001}
             for r in runs}
    even = confirm.decide(chosen, runs, close, metric="val_acc", mode="max")
    assert 0.4 < even[0].p_best < 0.65  # 0.001 apart with a noise of 0.03: a coin toss


def test_p_best_lets_the_seeds_shared_effect_cancel():
    """A fresh seed draws a split on which every configuration scores higher or lower alike: with
    the runs paired by seed, a small but steady lead is clear; unpaired (a run missing) it is not."""
    split = {1: 0.05, 2: -0.04, 3: 0.00}
    a = {s: 0.80 + e + 0.010 for s, e in split.items()}
    b = {s: 0.80 + e + (0.001 if s == 2 else -0.001) for s, e in split.items()}
    paired = confirm.p_best([a, b], mode="max")
    assert paired[0] > 0.95
    unpaired = confirm.p_best([a, {s: v for s, v in b.items() if s != 3}], mode="max")
    assert 0.5 < unpaired[0] < 0.8


def test_a_failed_run_is_left_out_and_one_run_each_gives_no_p_best():
    chosen = [row("a", 0.9, lr=1), row("b", 0.8, lr=2)]
    runs = confirm.plan_runs(chosen, repeats=2, seed=0)
    outcomes = {0: {"trial_id": "x", "value": 0.7}, 1: {"trial_id": "y", "value": 0.6},
                2: {"trial_id": "z", "value": None}, 3: {"trial_id": "w", "value": 0.65}}
    decided = confirm.decide(chosen, runs, outcomes, metric="val_acc", mode="max")
    assert decided[0].trial_id == "a" and decided[0].values == [0.7] and decided[0].std is None
    assert decided[1].mean == pytest.approx(0.625)
    assert confirm.p_best([{1: 0.7}, {1: 0.6}], mode="max") == [None, None]


def test_dry_run_says_what_the_confirmation_adds(image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, selection={"top_k": 3, "repeats": 2})
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("then confirmation: the top 3 configurations trained 2 more times each with fresh seeds, up to 6 "
            "trials of 3 epochs (18 epochs, on top of the search's)") in result.output


@pytest.mark.parametrize("selection, message", [
    ({"top_k": 0}, "selection.top_k: "), ({"repeats": 0}, "selection.repeats: "), ({"top": 2}, "selection.top: ")])
def test_a_bad_selection_is_one_line(image_folder, tmp_path, selection, message):
    space = write_space(tmp_path, image_folder, selection=selection)
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--dry-run"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_tables_keep_the_columns_of_every_row(tmp_path):
    """pyarrow's from_pylist takes the first row's keys: a conditional param absent from the first
    trial, or the confirmation's columns, must not be dropped."""
    from tuner import storage

    storage.write_tables(str(tmp_path), [{"trial_id": "a"}, {"trial_id": "b", "config/momentum": 0.9}],
                         [{"trial_id": "a", "val_acc": 0.5}])
    rows = storage.read_table(tmp_path / storage.TRIALS_FILE)
    assert rows == [{"trial_id": "a", "config/momentum": None}, {"trial_id": "b", "config/momentum": 0.9}]
