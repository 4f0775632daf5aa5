"""RUN_DIR/optuna.journal written as trials go (tuner/journal.py): the pure module against real
Optuna journal files, read back the way optuna-dashboard reads them (a fresh JournalStorage). The
journal of a real search: tests/test_search.py (a finished one), tests/test_resume.py (read while
it runs, then killed and resumed; the checks are here)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner import journal
from tuner.journal import JOURNAL_FILE, JournalStudy, Mirror, StudyShape

from test_report import MAX_EPOCHS, write_search_json

LR = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
BATCH = optuna.distributions.CategoricalDistribution([8, 16])
ONE = StudyShape("tiny", ("val_acc",), ("max",), {"lr": LR, "batch_size": BATCH}, max_epochs=3)
TWO = StudyShape("tiny", ("val_acc", "latency_ms"), ("max", "min"), {"lr": LR}, max_epochs=3)


def read(path: Path, name: str = "tiny") -> optuna.Study:
    """The study as another process sees it: a storage of its own on the file."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def by_ray_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["ray_trial_id"]: t for t in study.trials}


def epochs(study: JournalStudy, ray_id: str, values: list[float], **row) -> None:
    for epoch, value in enumerate(values, start=1):
        study.report(ray_id, {"training_iteration": epoch, "val_acc": value, **row})


# ---------------------------------------------------------------------------------------------
# JournalStudy: one Optuna trial per Ray trial
# ---------------------------------------------------------------------------------------------

def test_trials_appear_running_with_their_params_then_end_by_how_ray_ended_them(tmp_path):
    path = tmp_path / JOURNAL_FILE
    study = JournalStudy(path, ONE)
    study.start("done", {"lr": 0.01, "batch_size": 16, "arch": "cifar_resnet", "momentum": None})
    epochs(study, "done", [0.5, 0.8, 0.7])
    seen = read(path).trials[0]
    assert seen.state == TrialState.RUNNING and seen.params == {"lr": 0.01, "batch_size": 16}
    assert seen.intermediate_values == {1: 0.5, 2: 0.8, 3: 0.7} and seen.distributions["lr"] == LR

    study.end("done", "completed", 3)
    for ray_id, values, status in (("stopped", [0.4, 0.6], "early_stopped"), ("diverged", [0.3], "diverged"),
                                   ("errored", [], "errored")):
        study.start(ray_id, {"lr": 0.1, "batch_size": 8})
        epochs(study, ray_id, values)
        study.end(ray_id, status, len(values))
    trials = by_ray_id(read(path))
    assert trials["done"].state == TrialState.COMPLETE and trials["done"].value == 0.8  # the best epoch's
    assert trials["done"].user_attrs["best"] == {"epoch": 2, "val_acc": 0.8}
    assert trials["done"].user_attrs["status"] == "completed" and trials["done"].user_attrs["epochs"] == 3
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].intermediate_values == {1: 0.4, 2: 0.6}
    assert trials["stopped"].value == 0.6  # Optuna's rule for a pruned trial: its last intermediate value
    assert [trials[k].state for k in ("diverged", "errored")] == [TrialState.FAIL] * 2
    assert read(path).best_trial.number == trials["done"].number


def test_a_diverged_epoch_and_a_retried_epoch_leave_the_values_as_they_were(tmp_path):
    study = JournalStudy(tmp_path / JOURNAL_FILE, ONE)
    study.start("a", {"lr": 0.01})
    epochs(study, "a", [0.5, 0.6])
    study.report("a", {"training_iteration": 2, "val_acc": 0.1})  # a retry from epoch 1's checkpoint
    study.report("a", {"training_iteration": 3, "val_acc": 0.0, "diverged": 1})
    study.end("a", "diverged", 3)
    trial = read(tmp_path / JOURNAL_FILE).trials[0]
    assert trial.intermediate_values == {1: 0.5, 2: 0.6} and trial.state == TrialState.FAIL


def test_several_objectives_get_values_but_no_intermediate_values(tmp_path):
    """Optuna's Trial.report refuses a multi-objective study; a PRUNED trial is accepted, without values."""
    study = JournalStudy(tmp_path / JOURNAL_FILE, TWO)
    for ray_id, status in (("done", "completed"), ("stopped", "early_stopped")):
        study.start(ray_id, {"lr": 0.01})
        epochs(study, ray_id, [0.5, 0.7], latency_ms=2.5)
        study.end(ray_id, status, 2)
    seen = read(tmp_path / JOURNAL_FILE)
    assert seen.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert seen.metric_names == ["val_acc", "latency_ms"]
    trials = by_ray_id(seen)
    assert trials["done"].state == TrialState.COMPLETE and trials["done"].values == [0.7, 2.5]
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].values is None
    assert trials["stopped"].user_attrs["best"] == {"epoch": 2, "val_acc": 0.7, "latency_ms": 2.5}
    assert all(not t.intermediate_values for t in trials.values())
    assert [t.number for t in seen.best_trials] == [trials["done"].number]


def test_reopened_the_running_trial_continues_and_the_ended_ones_stay(tmp_path):
    """A driver killed and resumed: the same Ray trial id continues its journal trial."""
    path = tmp_path / JOURNAL_FILE
    first = JournalStudy(path, ONE)
    first.start("ended", {"lr": 0.01})
    epochs(first, "ended", [0.4])
    first.end("ended", "early_stopped", 1)
    first.start("running", {"lr": 0.02})
    epochs(first, "running", [0.5, 0.9])
    del first  # the driver dies here

    again = JournalStudy(path, ONE)
    assert again.running() == ["running"]
    again.start("running", {"lr": 0.02})  # Ray restores it and starts it again
    again.report("running", {"training_iteration": 3, "val_acc": 0.6})
    again.end("running", "completed", 3)
    again.start("ended", {"lr": 0.01})  # (Ray runs it again from its checkpoint: the journal keeps its end)
    again.report("ended", {"training_iteration": 2, "val_acc": 0.99})
    again.end("ended", "completed", 2)
    study = read(path)
    assert len(study.trials) == 2
    trials = by_ray_id(study)
    assert trials["running"].state == TrialState.COMPLETE and trials["running"].value == 0.9  # best from before
    assert trials["running"].intermediate_values == {1: 0.5, 2: 0.9, 3: 0.6}
    assert trials["ended"].state == TrialState.PRUNED and trials["ended"].intermediate_values == {1: 0.4}


def test_a_dead_writers_lock_and_cut_line_are_repaired(tmp_path):
    path = tmp_path / JOURNAL_FILE
    JournalStudy(path, ONE).start("a", {"lr": 0.01})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 6, "worker_id"')  # killed mid-line
    os.symlink(path, f"{path}.lock")  # and holding Optuna's lock
    began = time.monotonic()
    study = JournalStudy(path, ONE)
    study.report("a", {"training_iteration": 1, "val_acc": 0.5})
    assert time.monotonic() - began < 10  # not Optuna's 30-s grace period
    assert read(path).trials[0].intermediate_values == {1: 0.5}
    assert not os.path.lexists(f"{path}.lock")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gathered_lines_are_written_together_at_most_once_a_second_and_read_back_in_order(tmp_path, monkeypatch):
    """The live journal's backend: one lock and fsync for many lines; this process sees them all at once."""
    path, clock = tmp_path / JOURNAL_FILE, Clock()
    monkeypatch.setattr(journal.time, "monotonic", clock)
    writes = []
    original = optuna.storages.journal.JournalFileBackend.append_logs
    monkeypatch.setattr(optuna.storages.journal.JournalFileBackend, "append_logs",
                        lambda self, logs: (writes.append(len(logs)), original(self, logs))[1])
    study = JournalStudy(path, ONE, gather=True)  # made and written at once: the first line is due
    study.flush()
    made, flushes = sum(writes), len(writes)
    study.start("a", {"lr": 0.01})
    epochs(study, "a", [0.5, 0.8])
    assert read(path).trials == [] and sum(writes) == made  # held: none of them in the file yet
    assert study.study.trials[0].intermediate_values == {1: 0.5, 2: 0.8}  # but current here
    study.flush_if_due()
    assert read(path).trials == []  # not a second yet
    clock.now += journal.GATHER_S
    study.flush_if_due()
    assert len(writes) == flushes + 1 and read(path).trials[0].intermediate_values == {1: 0.5, 2: 0.8}
    study.end("a", "completed", 2)  # held again; a second on, the next line writes them all
    clock.now += journal.GATHER_S
    study.start("b", {"lr": 0.02})
    assert len(writes) == flushes + 2 and by_ray_id(read(path))["a"].state == TrialState.COMPLETE

    again = JournalStudy(path, ONE, gather=True)  # a resumed driver: the file's lines, numbered on from them
    again.report("b", {"training_iteration": 1, "val_acc": 0.3})
    again.end("b", "early_stopped", 1)
    again.flush()
    trials = by_ray_id(read(path))
    assert trials["b"].state == TrialState.PRUNED and trials["b"].intermediate_values == {1: 0.3}
    assert [t.number for t in read(path).trials] == [0, 1]


# ---------------------------------------------------------------------------------------------
# Mirror: the driver's handle, fed plain values; never raises
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def run_folder(tmp_path, image_folder) -> Path:
    """A run folder with search.json (tests/test_report.py's space: lr, batch_size, optimizer,
    momentum when sgd, width)."""
    folder = tmp_path / "runs" / "generated"
    folder.mkdir(parents=True)
    write_search_json(folder, image_folder)
    return folder


def test_mirror_takes_the_study_from_search_json_and_settles_with_rays_trials(run_folder):
    mirror = Mirror(str(run_folder))
    assert mirror.shape.metrics == ("val_acc",) and mirror.shape.max_epochs == MAX_EPOCHS
    assert isinstance(mirror.shape.distributions["width"], optuna.distributions.IntDistribution)
    mirror.begin([])
    for ray_id in ("ended-unseen", "lost", "still-running"):
        mirror.start(ray_id, {"lr": 0.01, "batch_size": 8, "optimizer": "adamw"})
        mirror.report(ray_id, {"training_iteration": 1, "val_acc": 0.5})
    mirror.settle([("ended-unseen", "TERMINATED", {"training_iteration": 1}),
                   ("still-running", "RUNNING", {"training_iteration": 1})])
    study = read(run_folder / JOURNAL_FILE, "generated")
    assert study.user_attrs["live"] is True and study.user_attrs["run_dir"] == str(run_folder.resolve())
    trials = by_ray_id(study)
    assert trials["ended-unseen"].state == TrialState.PRUNED  # 1 epoch of 3
    assert trials["lost"].state == TrialState.FAIL and trials["lost"].user_attrs["status"] == "lost"
    assert trials["still-running"].state == TrialState.RUNNING  # Ctrl-C: --resume continues it


def test_mirror_pickles_without_its_open_journal_and_the_copy_resumes_it(run_folder):
    mirror = Mirror(str(run_folder))
    restored = pickle.loads(pickle.dumps(mirror))  # Ray's tuner.pkl, taken when the Tuner is made
    mirror.begin([])
    mirror.start("a", {"lr": 0.01})
    mirror.end("a", {"training_iteration": 3, "val_acc": 0.7}, errored=False)  # no epoch reported: no value
    mirror.start("b", {"lr": 0.02})
    assert mirror.begun and not pickle.loads(pickle.dumps(mirror)).begun  # a copy begins again where it runs

    mirror.flush()  # Ray saving its state (tuner._ray.LiveJournal.get_state), then the driver dies

    restored.begin([("b", "PENDING", {})])  # the resumed search: Ray restored b
    restored.report("b", {"training_iteration": 1, "val_acc": 0.6})
    restored.end("b", {"training_iteration": 3}, errored=False)
    restored.flush()
    trials = by_ray_id(read(run_folder / JOURNAL_FILE, "generated"))
    assert trials["a"].state == TrialState.FAIL and trials["a"].user_attrs["status"] == "completed"
    assert trials["b"].state == TrialState.COMPLETE and trials["b"].value == 0.6 and len(trials) == 2


def test_mirror_writes_its_lines_a_second_apart_and_when_ray_saves(run_folder, monkeypatch):
    from tuner._ray import LiveJournal

    clock = Clock()
    monkeypatch.setattr(journal.time, "monotonic", clock)
    callback = LiveJournal(str(run_folder))
    callback.mirror.begin([])
    callback.mirror.start("a", {"lr": 0.01})
    callback.on_step_end(1, [])
    assert read(run_folder / JOURNAL_FILE, "generated").trials == []  # held: not a second yet
    assert callback.get_state() is None  # Ray saving its state: the journal is written first
    assert list(by_ray_id(read(run_folder / JOURNAL_FILE, "generated"))) == ["a"]
    callback.mirror.report("a", {"training_iteration": 1, "val_acc": 0.5})
    clock.now += journal.GATHER_S
    callback.on_step_end(2, [])
    assert read(run_folder / JOURNAL_FILE, "generated").trials[0].intermediate_values == {1: 0.5}


def test_an_abandoned_attempts_journal_is_replaced(run_folder):
    old = Mirror(str(run_folder))
    old.begin([])
    old.start("from-before", {"lr": 0.01})
    old.flush()
    new = Mirror(str(run_folder))
    new.begin([])  # --resume found nothing to resume: a new search, Ray knows none of the journal's trials
    new.start("new", {"lr": 0.01})
    new.flush()
    assert list(by_ray_id(read(run_folder / JOURNAL_FILE, "generated"))) == ["new"]


def test_mirror_errors_are_one_line_once_and_never_raised(run_folder, tmp_path):
    told = []
    (run_folder / JOURNAL_FILE).write_text("edited by hand\n{}\n")  # a journal Optuna cannot read
    mirror = Mirror(str(run_folder), warn=told.append)
    mirror.begin([])
    mirror.start("a", {"lr": 0.01})
    mirror.end("a", {}, errored=True)
    assert len(told) == 1 and told[0].startswith(f"{JOURNAL_FILE}: no longer written during this search (")
    assert "removed: the report writes it from the tables" in told[0] and not (run_folder / JOURNAL_FILE).exists()

    nothing = Mirror(str(tmp_path / "no-search-here"), warn=told.append)  # search.json missing: told, no raise
    nothing.begin([])
    assert len(told) == 2


def test_a_run_folder_at_a_uri_gets_no_live_journal():
    mirror = Mirror("s3://bucket/runs/x", warn=pytest.fail)
    mirror.begin([])
    mirror.start("a", {"lr": 0.01})
    assert mirror.begun and mirror.path is None
    assert journal.Mirror("file:///tmp/x", warn=lambda line: None).path == Path("/tmp/x") / JOURNAL_FILE


# ---------------------------------------------------------------------------------------------
# A search read while it runs, killed (SIGKILL) and resumed: tests/test_resume.py runs it
# ---------------------------------------------------------------------------------------------

def ended_in(path: Path, name: str) -> dict[str, tuple[int, TrialState]]:
    """Ray trial id -> (journal trial number, state) of the journal's trials, read as the dashboard would."""
    return {t.user_attrs["ray_trial_id"]: (t.number, t.state) for t in read(path, name).trials}


def finished(trials: dict[str, tuple[int, TrialState]]) -> int:
    return sum(state.is_finished() for _, state in trials.values())


def journal_while_running(path: Path, name: str, driver, *,
                          timeout_s: float = 120) -> dict[str, tuple[int, TrialState]]:
    """While the search runs (driver: its process, a trial ended), optuna.load_study on its journal
    sees the finished trials, more at a later read: the later read is returned."""
    first = finished(ended_in(path, name))
    deadline = time.monotonic() + timeout_s
    while finished(ended_in(path, name)) <= first and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    later = ended_in(path, name)
    assert driver.poll() is None and 1 <= first < finished(later), (first, later)
    return later


def check_resumed_journal(path: Path, name: str, before: dict[str, tuple[int, TrialState]], trials: list[dict],
                          ended: set[str] = frozenset()) -> None:
    """After a kill and --resume (tests/test_resume.py): each Ray trial of trials.parquet once in the
    journal, all ended; one RUNNING at the kill that Ray continued is the same journal trial; the ones
    ended before the kill stay as they were, the others end as trials.parquet says; a trial Ray
    lost with the driver (started after its last save) ended FAIL as `lost`, unless it had ended
    before the kill (in `ended`, by the status index): then it stays as it ended."""
    study = read(path, name)
    journal_ids = [t.user_attrs["ray_trial_id"] for t in study.trials]
    assert len(journal_ids) == len(set(journal_ids))  # no Ray trial twice
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    ray_ids = {t["trial_id"] for t in trials}
    assert ray_ids <= set(by_id) and all(t.state.is_finished() for t in study.trials)
    lost = [t for ray_id, t in by_id.items() if ray_id not in ray_ids and ray_id not in ended]
    assert all(t.state == TrialState.FAIL and t.user_attrs["status"] == "lost" for t in lost)
    assert all(by_id[ray_id].user_attrs["status"] != "lost" for ray_id in set(ended) & set(by_id))
    for ray_id, (number, state) in before.items():
        assert by_id[ray_id].number == number and (by_id[ray_id].state == state or not state.is_finished())
    expected = {"completed": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED}
    for trial in trials:
        if not before.get(trial["trial_id"], (0, TrialState.RUNNING))[1].is_finished():
            assert by_id[trial["trial_id"]].state == expected[trial["status"]], trial
