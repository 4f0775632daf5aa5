"""What keeps a search's driver from growing with its trials (issue 22), checked for what it does,
not timed (bench/many_trials.py times it): the state backup copies only what changed and still
restores; the status index gives the screen the trial folders give; old checkpoints of a running
trial go only once a save of Ray's names a newer one; a report of 300 trials stays readable."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from test_report import (T0, TRIALS, epoch_rows, write_experiment_state, write_search_json,
                         write_trial_folder)
from tuner import _ray, results, status, storage
from tuner._ray import KEEP_CHECKPOINTS, PruneCheckpoints
from tuner.ray_state import STATE_BACKUP, StateBackup, repair_state
from tuner.screen import format_status

STATE = "experiment_state-2026-01-01_00-00-00.json"
OTHERS = ("search_gen_state-2026-01-01_00-00-00.json", "searcher-state-2026-01-01_00-00-00.pkl")


# ---------------------------------------------------------------------------------------------
# the state backup: only what changed, from Ray's staging folder, and it still restores
# ---------------------------------------------------------------------------------------------

def write_state(folder: Path, saved: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE).write_text(json.dumps({"saved": saved}))
    for name in OTHERS:
        (folder / name).write_text(f"pickle {saved}")


def test_backup_copies_the_files_when_one_changed_and_still_restores(tmp_path):
    run, staging = tmp_path / "run", tmp_path / "staging"
    write_state(staging, 1)
    backup = StateBackup(str(run), source=str(staging))
    assert backup.update() and backup.copies == 1
    first = {p.name: p.stat().st_mtime_ns for p in (run / STATE_BACKUP).iterdir()}
    assert sorted(first) == sorted([STATE, *OTHERS])

    assert backup.update() and backup.copies == 1  # nothing changed: nothing copied
    assert {p.name: p.stat().st_mtime_ns for p in (run / STATE_BACKUP).iterdir()} == first

    (staging / STATE).write_text(json.dumps({"saved": 2, "trials": ["more"]}))  # Ray saved again
    assert backup.update() and backup.copies == 2
    assert json.loads((run / STATE_BACKUP / STATE).read_text())["saved"] == 2
    assert (run / STATE_BACKUP / OTHERS[0]).stat().st_mtime_ns != first[OTHERS[0]]  # copied with it: one save's set

    write_state(run, 2)
    (run / STATE).write_bytes(b"")  # Ray's copy into the run folder, cut off by a kill
    assert "restored the copy" in repair_state(str(run))
    assert json.loads((run / STATE).read_text())["saved"] == 2


def test_a_save_within_one_tick_of_the_file_clock_is_still_copied(tmp_path):
    """Ray saves search_gen_state (the concurrency limiter's running trials) by rename; two saves
    within one tick of the kernel's coarse file clock, with trial ids of one length, leave size and
    mtime alike. The backup then kept the limiter's state of the save before beside the searcher's
    of the save after, and --resume waited forever for a trial it counted as running."""
    run, staging = tmp_path / "run", tmp_path / "staging"
    write_state(staging, 1)
    backup = StateBackup(str(run), source=str(staging))
    assert backup.update()
    gen = staging / OTHERS[0]
    before = gen.stat()
    fresh = staging / ".gen.tmp"  # as Ray's _atomic_save writes it
    fresh.write_text("pickle 2")
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
    os.replace(fresh, gen)
    assert (gen.stat().st_size, gen.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert backup.update() and backup.copies == 2
    assert (run / STATE_BACKUP / OTHERS[0]).read_text() == "pickle 2"


def test_backup_of_the_run_folder_skips_a_file_cut_off(tmp_path):
    run = tmp_path / "run"
    write_state(run, 1)
    backup = StateBackup(str(run))
    assert backup.update()
    (run / STATE).write_text('{"saved": 2, "cu')
    assert not backup.update() and backup.copies == 1
    assert json.loads((run / STATE_BACKUP / STATE).read_text()) == {"saved": 1}


# ---------------------------------------------------------------------------------------------
# old checkpoints of a running trial: deleted once a backed-up save of Ray's names newer ones
# ---------------------------------------------------------------------------------------------

def fake_trial(folder: Path, trial_id: str) -> SimpleNamespace:
    storage_context = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), trial_fs_path=str(folder))
    return SimpleNamespace(trial_id=trial_id, storage=storage_context)


def test_running_trial_keeps_its_last_checkpoints_and_those_ray_may_name(tmp_path):
    backup = SimpleNamespace(copies=0)
    prune = PruneCheckpoints("val_acc", "max", backup)
    trial = fake_trial(tmp_path / "trial", "t1")
    paths = []
    for epoch in range(1, 7):
        path = tmp_path / "trial" / f"checkpoint_{epoch:06d}"
        path.mkdir(parents=True)
        paths.append(path)
        prune.on_checkpoint(0, [trial], trial, SimpleNamespace(path=str(path)))
        prune.on_step_end(0, [trial])  # no save of Ray's since: nothing deleted
        assert all(p.exists() for p in paths)
        if epoch in (3, 6):  # Ray saves its state (naming the newest) and it is backed up
            backup.copies += 1
            prune.on_step_end(0, [trial])
    # the save at epoch 3 named checkpoint 3; the one at epoch 6, checkpoint 6: 1 and 2 are gone
    # then (named by no save), and at epoch 6 what precedes the checkpoint named at epoch 3
    assert [p.exists() for p in paths] == [False, False, True, True, True, True][:len(paths)]
    backup.copies += 1
    prune.on_step_end(0, [trial])
    assert sum(p.exists() for p in paths) == KEEP_CHECKPOINTS and paths[-1].exists()


# ---------------------------------------------------------------------------------------------
# status from the index: the screen the trial folders and Ray's state give
# ---------------------------------------------------------------------------------------------

LIVE = {"aaaa0001": ([0.5, 0.7, 0.8], "TERMINATED"), "aaaa0002": ([0.3], "TERMINATED"),
        "aaaa0003": ([0.45, 0.6], "RUNNING"), "aaaa0004": ([], "RUNNING"), "aaaa0007": ([0.33], "TERMINATED"),
        "aaaa0008": ([0.2], "ERROR")}


def write_index(run: Path) -> None:
    lines = status.index_lines("search", "", at=T0)
    for trial_id, (values, ray_status) in LIVE.items():
        lines += status.index_lines("start", trial_id, at=T0, logdir=f"trial_fn_{trial_id}_00000")
        for row in epoch_rows(trial_id, values, T0):
            lines += status.index_lines("epoch", trial_id, at=T0, row=status.index_row(row, "val_acc"))
        if ray_status != "RUNNING":
            lines += status.index_lines("end", trial_id, at=T0 + 10, ray_status=ray_status)
    lines.append('{"trial_id": "aaaa0005", "star')  # a line caught half-written
    storage.append_lines(str(run), storage.STATUS_INDEX, lines)


def test_status_from_the_index_gives_the_screen_of_the_trial_folders(tmp_path, image_folder):
    run = tmp_path / "live"
    for trial_id, (values, _) in LIVE.items():
        write_trial_folder(run, trial_id, values, T0)
    write_experiment_state(run, {trial_id: ray_status for trial_id, (_, ray_status) in LIVE.items()})
    write_search_json(run, image_folder)
    before = format_status(status.read_status(run), now=T0 + 100)
    write_index(run)
    for trial_id in LIVE:  # the index says it all: the trial folders are not read
        (run / f"trial_fn_{trial_id}_00000" / "result.json").write_text("not read\n")
    (run / STATE).write_text("not read either")
    after = format_status(status.read_status(run), now=T0 + 100)
    assert after[1:] == before[1:]  # (line 0: when the folder last changed)
    assert "2 running" in after[1] and "1 errored" in after[1] and "2 early_stopped" in after[1]


def test_status_of_a_finished_search_with_an_index_reads_its_tables(tmp_path, image_folder):
    run = tmp_path / "done"
    write_index(run)
    records = [SimpleNamespace(trial_id=t, params=TRIALS[t][0], history=epoch_rows(t, v, T0), error=None,
                               path=str(run / t), checkpoint_path=None, retries=0) for t, (v, _) in LIVE.items()]
    results.write(results.collect(records, metric="val_acc", mode="max", max_epochs=3, num_samples=8), str(run))
    write_search_json(run, image_folder)
    lines = format_status(status.read_status(run), now=T0 + 100)
    assert "finished" in lines[0] and "0 running" in lines[1]


# ---------------------------------------------------------------------------------------------
# the report of 300 trials: readable plots, not 300 legend entries or 300 coloured curves
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_run(tmp_path_factory, image_folder) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "big"
    rng, records = random.Random(0), []
    for i in range(300):
        params = {"lr": 10 ** rng.uniform(-3, 0), "batch_size": rng.choice([8, 16]), "optimizer": "adamw",
                  "width": rng.choice([4, 8])}
        epochs = rng.choice([1, 1, 3])
        values = [min(0.99, rng.uniform(0.2, 0.6) + 0.1 * e) for e in range(epochs)]
        records.append(SimpleNamespace(trial_id=f"t{i:07d}", params=params, history=epoch_rows(f"t{i:07d}", values, T0 + i),
                                       error=None, path=str(folder / f"t{i}"), checkpoint_path=None, retries=0))
    results.write(results.collect(records, metric="val_acc", mode="max", max_epochs=3, num_samples=300), str(folder))
    write_search_json(folder, image_folder)
    return folder


def test_report_of_300_trials_highlights_the_best_and_keeps_legends_short(big_run):
    from tuner.report import build_study, load_run
    from tuner.report.curves import HIGHLIGHTED, plot_learning_curves
    from tuner.report.params import PARALLEL_TRIALS, plot_parallel

    run = load_run(big_run)
    fig = plot_learning_curves(run)
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) <= 6
    assert any("the other 280 trials" in t.get_text() for t in ax.get_legend().get_texts())
    assert len(ax.lines) == HIGHLIGHTED  # the rest: one grey collection
    assert "the best 20 in colour" in ax.get_title()
    fig = plot_parallel(run, build_study(run))
    assert f"the best {PARALLEL_TRIALS} of 300" in fig.axes[0].get_title()
    assert len(fig.axes[0].collections[0].get_segments()) == PARALLEL_TRIALS


# ---------------------------------------------------------------------------------------------
# TPE with a bounded cost: itself up to its window, a bounded set of trials past it
# ---------------------------------------------------------------------------------------------

def study_with(n: int, sampler):
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    rng = random.Random(0)
    study.add_trials([optuna.trial.create_trial(params={"x": rng.random()}, distributions={"x": FloatDistribution(0, 1)},
                                                value=rng.random()) for _ in range(n)])
    return study


def test_windowed_tpe_is_tpe_up_to_its_window_and_bounded_past_it():
    import optuna

    from search_spaces._sampler import WindowedTPESampler, _Windowed

    def draws(sampler, n):
        study = study_with(n, sampler)
        return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]

    plain = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True)
    windowed = WindowedTPESampler(window=50, seed=0, multivariate=True, constant_liar=True)
    assert draws(windowed, 40) == draws(plain, 40)
    study = study_with(200, None)
    kept = _Windowed(study, 50)._get_trials(deepcopy=False)
    assert len(kept) <= 50
    best = sorted(study.trials, key=lambda t: -t.value)[:10]
    assert {t.number for t in best} <= {t.number for t in kept}  # the best kept, with the latest
    assert study.trials[-1].number in {t.number for t in kept}
    assert len(draws(windowed, 200)) == 3


def test_the_callback_copies_after_the_steps_in_which_ray_saved_and_only_then(tmp_path, monkeypatch):
    """tuner._ray.BackUpState: Ray calls each callback's get_state as it saves its state; that
    step's end copies the set, and no other step looks at the files (at 1,000 trials, looking at
    them each step was the backup's whole cost)."""
    run, staging = tmp_path / "run", tmp_path / "staging"
    write_state(staging, 1)
    trial = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    callback = _ray.BackUpState(str(run))
    looked = []
    update = StateBackup.update
    monkeypatch.setattr(StateBackup, "update", lambda self: (looked.append(1), update(self))[1])
    for step in range(5):
        callback.on_step_end(step, [trial])
    assert looked == [] and not (run / STATE_BACKUP).exists()  # Ray did not save: nothing looked at

    assert callback.get_state() is None  # Ray saving its state (nothing of the callback's is saved)
    callback.on_step_end(5, [trial])
    assert callback.copies == 1 and len(looked) == 1
    assert json.loads((run / STATE_BACKUP / STATE).read_text())["saved"] == 1
    callback.on_step_end(6, [trial])
    assert len(looked) == 1  # once per save

    write_state(staging, 2)  # Ray's last save, after the last step
    callback.get_state()
    callback.on_experiment_end([trial])
    assert callback.copies == 2 and json.loads((run / STATE_BACKUP / STATE).read_text())["saved"] == 2

    older = pickle.loads(pickle.dumps(callback))  # a search started by an older version: Ray's pickled copy
    del older.__dict__["saved"]  # of a callback that had no such attribute, resumed by this one
    older.on_step_end(7, [trial])
    older.get_state()
    older.on_step_end(8, [trial])


def test_the_backup_is_one_saves_set_even_when_a_kill_cuts_the_swap(tmp_path):
    """The set is copied aside and swapped in by rename; a kill between the two renames leaves the
    previous whole set in .state-backup.old, which repair_state puts back."""
    run, staging = tmp_path / "run", tmp_path / "staging"
    write_state(staging, 1)
    backup = StateBackup(str(run), source=str(staging))
    assert backup.update()
    write_state(staging, 2)
    assert backup.update() and backup.copies == 2
    names = sorted(p.name for p in run.iterdir())
    assert names == [STATE_BACKUP], names  # no .new or .old left behind
    assert {p.read_text() for p in (run / STATE_BACKUP).iterdir() if p.name != STATE} == {"pickle 2"}

    (run / STATE_BACKUP).rename(run / f"{STATE_BACKUP}.old")  # killed after the first rename
    write_state(run, 3)
    (run / STATE).write_bytes(b"")
    assert "restored the copy" in repair_state(str(run))
    assert json.loads((run / STATE).read_text())["saved"] == 2


# ---------------------------------------------------------------------------------------------
# the tables from what the driver saw, where Ray's result.json copy stops short
# ---------------------------------------------------------------------------------------------

def test_a_history_short_of_the_last_result_is_completed_from_the_index(tmp_path):
    """A trial restarted after its node was lost: Ray's result.json in the run folder holds epochs
    1-2, the driver saw 1-4 (status index) and holds the last result whole."""
    run = tmp_path / "run"
    trial_dir = run / "trial_a"
    trial_dir.mkdir(parents=True)
    reports = [{"trial_id": "a", "training_iteration": e, "epoch": e, "val_acc": 0.1 * e, "train_loss": 2.0 - e / 10,
                "node_id": "worker" if e <= 2 else "head"} for e in range(1, 5)]
    (trial_dir / storage.RESULT_FILE).write_text("".join(json.dumps(r) + "\n" for r in reports[:2]))
    lines = status.index_lines("start", "a", at=T0, logdir="trial_a")
    for report in reports:
        lines += status.index_lines("epoch", "a", at=T0, row=status.index_row(report, "val_acc"))
    lines += status.index_lines("end", "a", at=T0, ray_status="TERMINATED")
    storage.append_lines(str(run), storage.STATUS_INDEX, lines)
    result = SimpleNamespace(metrics=reports[-1], path=str(trial_dir), filesystem=pafs.LocalFileSystem(),
                             checkpoint=None, error=None, config={})

    (record,) = _ray.records([result], str(run))
    assert [h["training_iteration"] for h in record.history] == [1, 2, 3, 4]
    assert record.history[2]["node_id"] == "head" and record.history[2]["val_acc"] == pytest.approx(0.3)
    assert record.history[3] == reports[3]  # the last result whole: train_loss too
    assert record.history[2]["train_loss"] == pytest.approx(1.7)  # the index keeps the history row
    # a history that is whole is left alone; without an index, the last result still ends it
    whole = SimpleNamespace(**{**vars(result), "metrics": reports[1]})
    assert [h["training_iteration"] for h in _ray.records([whole], str(run))[0].history] == [1, 2]
    assert [h["training_iteration"] for h in _ray.records([result])[0].history] == [1, 2, 4]
