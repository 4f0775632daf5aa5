"""Faults, for real: a driver killed with SIGKILL and resumed, a trial process killed mid-run and
retried from its checkpoint, a learning rate that makes the loss explode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_journal import check_resumed_journal, journal_while_running
from test_search import run_tables, search, write_space
from trial_hooks import with_tests_on_path
from tuner import status
from tuner._ray import CheckpointPacer
from tuner.journal import JOURNAL_FILE
from tuner.ray_state import STATE_BACKUP, back_up_state, repair_state


def reported_trials(experiment: Path) -> int:
    """Trials that reported at least one epoch."""
    return sum(1 for path in experiment.glob("trial_*/result.json") if path.stat().st_size)


def saved_statuses(folder: Path) -> dict[str, str]:
    """trial id -> Ray's status in the newest experiment state in FOLDER; empty when none or cut off."""
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        trials = [json.loads(entry[0]) for entry in json.loads(states[-1].read_text())["trial_data"]]
    except (IndexError, ValueError, KeyError):
        return {}
    return {t["trial_id"]: t.get("status") for t in trials}


def ended_by_index(folder: Path) -> set[str]:
    """Trial ids the status index (written by the driver as trials go) has ended (TERMINATED)."""
    index = status.read_index(folder)
    return {trial_id for trial_id, entry in (index[0] if index else {}).items() if entry["status"] == "TERMINATED"}


def ended_after_the_save(folder: Path) -> set[str]:
    """Ended by the index, running (or pending) in the saved state: ended after Ray's last save."""
    statuses = saved_statuses(folder)
    return {t for t in ended_by_index(folder) if statuses.get(t) in ("RUNNING", "PENDING", "PAUSED")}


def ended_in_saved_state(folder: Path) -> set[str]:
    """Trial ids that the newest experiment state in FOLDER has ended (TERMINATED); empty when there
    is none, or it is cut off. What --resume restores is this state, not the result.json files: Ray
    uploads its staging folder in a background thread, file by file, so a result.json in the run
    folder can be ahead of the state beside it (seen on CI: a trial with its 3 epochs in result.json
    was still running in the state, and the resume ran its epoch 3 again from its epoch-2 checkpoint,
    as Ray promises: nothing lost beyond the last checkpoint)."""
    return {trial_id for trial_id, status_ in saved_statuses(folder).items() if status_ == "TERMINATED"}


def started_per_trial(folder: Path) -> dict[str, int]:
    """How many times each trial started, by the status index (a retry or a resume starts it again)."""
    counts: dict[str, int] = {}
    for line in (folder / "status-index.jsonl").read_text().splitlines():
        event = json.loads(line) if line.endswith("}") else {}
        if "started" in event:
            counts[event["trial_id"]] = counts.get(event["trial_id"], 0) + 1
    return counts


def driver_after_two_trials(space: Path, storage: Path, name: str, *, backed_up: bool = False,
                            ended_after_save: bool = False) -> subprocess.Popen:
    """A search driver in its own process group (with its embedded Ray), once two trials reported and
    Ray's saved state in the run folder (with backed_up: in the copy of it) has one ended; with
    ended_after_save, Ray saves every 3 s and the driver is left once a trial has ended since."""
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage", str(storage),
               "--name", name, "--max-concurrent", "1", "--no-refit", "--cpus", "1"]
    # Ray saves its state into the run folder every 10 s or more (its own period, at most 5% of the
    # time: the search no longer forces a save per trial); these trials take a second, so here Ray
    # saves at every step, and the folder holds what a kill would find in a real search.
    env = with_tests_on_path({**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "3" if ended_after_save else "0"})
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env)
    deadline = time.monotonic() + 240

    def ready() -> bool:  # and a trial ended in the state --resume will read: the test's claim is about it
        if reported_trials(storage / name) < 2:
            return False
        if not ended_in_saved_state(storage / name / STATE_BACKUP if backed_up else storage / name):
            return False
        return not ended_after_save or bool(ended_after_the_save(storage / name))

    while not ready() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, driver.stdout.read().decode()
    return driver


@pytest.mark.parametrize("state", ["as saved", "cut off", "a trial ended since"])
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_session, image_folder, tmp_path, state):
    """SIGKILL may land while Ray copies its state into the run folder, leaving the files empty
    ("cut off", made certain here): --resume then puts back the copy taken when a trial ended.
    The live optuna.journal is read while the search runs and checked after (tests/test_journal.py)."""
    slow = {"trial": {"cpus": 1, "gpus": 0, "hook": "trial_hooks:Pause", "hook_args": {"sleep_s": 0.7}}}
    space = write_space(tmp_path, image_folder, budget={"num_samples": 6, "max_epochs": 3},
                        **(slow if state == "a trial ended since" else {}))  # trials that span a save of Ray's
    storage = tmp_path / "runs"
    experiment = storage / "killed"
    driver = driver_after_two_trials(space, storage, "killed", backed_up=state == "cut off",
                                     ended_after_save=state == "a trial ended since")
    journal = journal_while_running(experiment / JOURNAL_FILE, "killed", driver)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray, at once
    driver.wait()
    before = {p.parent.name: p.read_text() for p in experiment.glob("trial_*/result.json")}
    # Ray rewrites these copies in place at each save: a kill can catch one empty (seen once)
    assert 1 <= sum(1 for text in before.values() if text) < 6, before
    if state == "cut off":
        for path in [*experiment.glob("experiment_state-*.json"), *experiment.glob("search*state-*")]:
            path.write_bytes(b"")
    # the state the resume restores: the run folder's (as saved: the kill may have cut it off too) or the copy
    saved = ended_in_saved_state(experiment) or ended_in_saved_state(experiment / STATE_BACKUP)
    assert saved
    # what had ended, by the status index the driver wrote as trials went: those that ended after
    # Ray's last save too (the resume marks them ended in the state it restores)
    ended, since = ended_by_index(experiment), ended_after_the_save(experiment)
    starts = started_per_trial(experiment)
    assert saved <= ended

    again = ["--space", str(space), "--storage", str(storage), "--name", "killed", "--max-concurrent", "1",
             "--no-refit", "--resume"]
    if state == "a trial ended since":  # its trials import trial_hooks: a driver with the tests on PYTHONPATH
        done = subprocess.run([sys.executable, "-m", "tuner.cli", "search", *again, "--cpus", "1"], text=True,
                              env=with_tests_on_path(dict(os.environ)), capture_output=True, timeout=300)
        code, output = done.returncode, done.stdout + done.stderr
    else:
        code, output = search(*again)
    assert code == 0, output
    assert "resuming" in output
    if state == "cut off":  # (as saved, the kill may still have cut the copy off: no claim either way)
        assert "restored the copy taken after its last whole save" in output, output
    trials, history, summary = run_tables(experiment)
    assert len(trials) == 6 and summary["trials"] == 6  # num_samples honoured in total
    assert len({t["trial_id"] for t in trials}) == 6
    for trial in trials:  # no epoch reported twice; epochs continue 1..n
        epochs = [h["training_iteration"] for h in history if h["trial_id"] == trial["trial_id"]]
        assert epochs == list(range(1, trial["epochs"] + 1))
    after = {p.parent.name: p.read_text() for p in experiment.glob("trial_*/result.json")}
    for name, text in before.items():  # a trial that had ended was not run again, not even in part
        if name.split("_")[1] in ended:
            assert after[name] == text, name
    assert all(started_per_trial(experiment)[trial_id] == starts[trial_id] for trial_id in ended), (ended, starts)
    if since:  # (state "a trial ended since" makes it near certain: Ray may still save between check and kill)
        assert f"--resume: {len(since)} trial(s) ended after Ray last saved its state" in output, output
    check_resumed_journal(experiment / JOURNAL_FILE, "killed", journal, trials, ended)


def test_trials_that_started_and_ended_after_rays_last_save_are_kept(ray_session, image_folder, tmp_path):
    """Ray saves its state every 10 s or more; with short trials a killed driver's last seconds can
    hold many that started and ended since (79 of 151 in bench/many_trials.py --kill-resume 300).
    Ray's restored state never knew them: --resume keeps them from the status index (their params
    and epochs), tells the saved sampler, and Ray draws that many fewer, so the search ends at
    num_samples with their work in the tables. Here Ray saves once, at its first step."""
    space = write_space(tmp_path, image_folder, budget={"num_samples": 6, "max_epochs": 3})
    storage = tmp_path / "runs"
    experiment = storage / "unsaved"
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage", str(storage),
               "--name", "unsaved", "--max-concurrent", "1", "--no-refit", "--cpus", "1"]
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "3600"})
    deadline = time.monotonic() + 240
    while (len(ended_by_index(experiment) - set(saved_statuses(experiment))) < 2 or not saved_statuses(experiment)) \
            and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, driver.stdout.read().decode()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    unsaved = ended_by_index(experiment) - set(saved_statuses(experiment))
    ended, starts = ended_by_index(experiment), started_per_trial(experiment)
    params = {trial_id: entry["params"] for trial_id, entry in status.read_index(experiment)[0].items()}

    code, output = search("--space", str(space), "--storage", str(storage), "--name", "unsaved", "--max-concurrent",
                          "1", "--no-refit", "--resume")
    assert code == 0, output
    assert f"--resume: {len(unsaved)} trial(s) started and ended after Ray last saved its state; kept" in output, output
    trials, history, summary = run_tables(experiment)
    assert len(trials) == 6 and summary["trials"] == 6 and len({t["trial_id"] for t in trials}) == 6
    by_id = {t["trial_id"]: t for t in trials}
    assert unsaved <= set(by_id)  # their work kept, not drawn again
    for trial_id in unsaved:
        epochs = [h["training_iteration"] for h in history if h["trial_id"] == trial_id]
        assert epochs == list(range(1, by_id[trial_id]["epochs"] + 1)) and epochs
        assert by_id[trial_id]["config/lr"] == params[trial_id]["lr"]
        assert by_id[trial_id]["best_val_acc"] is not None and by_id[trial_id]["started_at"] is not None
        assert all(h["train_loss"] is not None and h["lr"] is not None for h in history if h["trial_id"] == trial_id)
    assert all(started_per_trial(experiment)[trial_id] == starts[trial_id] for trial_id in ended)  # none run again

    import pickle
    sampler = pickle.loads(max(experiment.glob("searcher-state-*.pkl")).read_bytes())["_ot_study"]
    told = [t.params for t in sampler.trials if t.state.is_finished()]
    assert all({"lr": params[t]["lr"], "batch_size": params[t]["batch_size"]} in told for t in unsaved), told
    check_resumed_journal(experiment / JOURNAL_FILE, "unsaved", {}, trials, ended)


def test_killed_trial_continues_from_its_checkpoint(image_folder, tmp_path):
    """The space's trial hook (tests/trial_hooks.py) kills the trial's process once epoch 2 trained,
    before its report; the driver runs in a subprocess with an embedded Ray, the hook's module on
    PYTHONPATH for its workers. The environment variables that once injected faults are set too,
    and do nothing."""
    marker, log, old_marker, old_barrier = (tmp_path / name for name in ("crashed", "hook.jsonl", "env-crashed",
                                                                          "env-barrier"))
    old_barrier.mkdir()
    env = with_tests_on_path({**os.environ, "TUNE_RESNET_CRASH_AT_EPOCH": "1",
                              "TUNE_RESNET_CRASH_MARKER": str(old_marker), "TUNE_RESNET_BARRIER": f"{old_barrier}:2"})
    hook = {"hook": "trial_hooks:CrashAt", "hook_args": {"epoch": 2, "marker": str(marker), "log": str(log)}}
    space = write_space(tmp_path, image_folder, budget={"num_samples": 1, "max_epochs": 4, "grace_period": 4},
                        trial=hook)
    command = [sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage",
               str(tmp_path / "runs"), "--name", "crash", "--no-refit", "--cpus", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert marker.exists(), "the fault hook never fired"
    trials, history, _ = run_tables(tmp_path / "runs" / "crash")
    assert trials[0]["status"] == "completed" and trials[0]["epochs"] == 4
    assert [h["training_iteration"] for h in history] == [1, 2, 3, 4]  # continued, not restarted
    assert history[2]["time_total_s"] > history[1]["time_total_s"]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # epoch 1 was always checkpointed (the first save is due at once); epoch 2 never reported
    assert [(c["call"], c["epoch"]) for c in calls] == [("start", 0), ("epoch_end", 1), ("epoch_end", 2),
                                                        ("start", 1), ("epoch_end", 2), ("epoch_end", 3),
                                                        ("epoch_end", 4)]
    assert all(c["reported"] == c["epoch"] for c in calls if c["call"] == "epoch_end")
    assert calls[2]["pid"] != calls[3]["pid"]  # the retry ran in a new process
    assert not old_marker.exists() and not any(old_barrier.iterdir())  # no environment variable read


def test_exploding_loss_is_diverged_not_a_crash(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, budget={"num_samples": 2, "max_epochs": 2, "grace_period": 2},
                        params={"lr": {"choice": [1.0e+6, 0.05]}},
                        fixed={"arch": "cifar_resnet", "depth": 8, "width": 4, "schedule": "constant", "batch_size": 8,
                               "optimizer": "sgd", "augment": "none", "eval_batch_size": 64},
                        sampler={"type": "grid", "seed": 0})
    code, output = search("--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "boom",
                          "--max-concurrent", "1")
    assert code == 0, output
    trials, _, summary = run_tables(tmp_path / "runs" / "boom")
    by_lr = {t["config/lr"]: t for t in trials}
    assert by_lr[1.0e6]["status"] == "diverged"
    assert by_lr[0.05]["status"] == "completed"
    assert summary["by_status"]["diverged"] == 1
    assert summary["best_config"]["lr"] == 0.05
    assert "1 diverged" in output


def test_ctrl_c_stops_with_state_saved_and_explains_resume(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, budget={"num_samples": 6, "max_epochs": 3})
    storage = tmp_path / "runs"
    driver = driver_after_two_trials(space, storage, "stopped")
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0].decode()
    assert driver.returncode == 130, output
    assert "--resume" in output.strip().splitlines()[-1]
    assert Path(storage / "stopped" / "trials.parquet").exists()  # what finished is kept
    code, output = search("--space", str(space), "--storage", str(storage), "--name", "stopped",
                          "--max-concurrent", "1", "--no-refit", "--resume")
    assert code == 0, output
    assert len(pq.read_table(storage / "stopped" / "trials.parquet")) == 6


def test_checkpoint_pacer_saves_every_epoch_while_cheap_and_the_last_always():
    now = [0.0]
    pacer = CheckpointPacer(share=0.05, clock=lambda: now[0])
    saved = []
    for epoch in range(1, 11):  # 1-second epochs
        now[0] += 1.0
        if pacer.due(final=epoch == 10):
            start = now[0]
            now[0] += 0.01 if epoch < 5 else 0.12  # saving becomes slow from epoch 5 (a bigger state)
            pacer.saved(start)
            saved.append(epoch)
    # cheap (1% of an epoch): every epoch; slow (12%): once per 0.12 / 0.05 = 2.4 s, and the last
    assert saved == [1, 2, 3, 4, 5, 8, 10]


def test_state_backup_keeps_the_last_whole_copy_and_repair_puts_it_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ("experiment_state-2026-01-01_00-00-00.json", "search_gen_state-2026-01-01_00-00-00.json",
             "searcher-state-2026-01-01_00-00-00.pkl")
    for i, name in enumerate(names):
        (run / name).write_text('{"saved": 1}' if name.startswith("experiment") else f"pickle {i}")
    (run / "history.parquet").write_bytes(b"not state")
    assert repair_state(str(run)) is None  # nothing damaged: nothing done
    assert back_up_state(str(run))
    assert sorted(p.name for p in (run / STATE_BACKUP).iterdir()) == sorted(names)

    (run / names[0]).write_text('{"saved": 2, "cut')  # a copy cut off half-way
    assert not back_up_state(str(run))  # the whole copy stays
    assert (run / STATE_BACKUP / names[0]).read_text() == '{"saved": 1}'

    assert "restored the copy" in repair_state(str(run))
    assert (run / names[0]).read_text() == '{"saved": 1}' and (run / names[2]).read_text() == "pickle 2"

    (run / names[2]).write_bytes(b"")
    for copy in (run / STATE_BACKUP).iterdir():
        copy.unlink()
    with pytest.raises(Exception, match="is damaged .* and there is no whole copy"):
        repair_state(str(run))


def test_asha_rungs_after_a_resume_hold_what_they_held_before_it(tmp_path):
    """Ray saves no scheduler with an experiment: a restored search gets the one pickled at its
    start, rungs empty. ResumableASHA, restored that way, tells itself what the status index holds:
    its rungs then match those of the ASHA that ran the search, and a poor first epoch after the
    resume is stopped, where Ray's ASHA as restored would let it go on."""
    import pickle
    import random

    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from tuner import storage
    from tuner._ray import ResumableASHA

    run_dir = tmp_path / "moved" / "search"  # where the run folder is now: Ray's restored trials name it
    experiment = StorageContext(storage_path=str(run_dir.parent), experiment_dir_name=run_dir.name)

    settings = dict(time_attr="training_iteration", metric="val_acc", mode="max", max_t=8, grace_period=1,
                    reduction_factor=2)
    live, restored_plain = ASHAScheduler(**settings), pickle.loads(pickle.dumps(ASHAScheduler(**settings)))
    restored = pickle.loads(pickle.dumps(ResumableASHA(**settings)))  # as tuner.pkl holds it
    rng, lines, ids = random.Random(0), [], [f"t{i:02d}" for i in range(14)]
    for i, trial_id in enumerate(ids):  # the search before the driver was killed: 12 trials ended, 2 running
        trial = Trial("x", stub=True, trial_id=trial_id)
        live.on_trial_add(None, trial)
        lines += status.index_lines("start", trial_id, at=0.0, params={})
        for epoch in range(1, 9):
            result = {"training_iteration": epoch, "val_acc": rng.random() if i < 12 else 1.0}  # the 2 go on
            lines += status.index_lines("epoch", trial_id, at=0.0, row=status.index_row(result, "val_acc"))
            stop = live.on_trial_result(None, trial, result) == TrialScheduler.STOP
            if i >= 12 and epoch == 3:  # running at the kill; its checkpoint is from epoch 2
                break
            if stop or epoch == 8:
                live.on_trial_complete(None, trial, result)
                lines += status.index_lines("end", trial_id, at=0.0, ray_status="TERMINATED")
                break
    storage.append_lines(str(run_dir), storage.STATUS_INDEX, lines)
    rungs = lambda scheduler: scheduler.debug_string().splitlines()[1:]  # noqa: E731 (without its stop count)
    assert any("None" not in rung for rung in rungs(live))

    for scheduler in (restored, restored_plain):  # Ray's restore: each trial of its saved state added again
        for trial_id in ids:
            scheduler.on_trial_add(None, Trial("x", stub=True, trial_id=trial_id, storage=experiment))
    assert rungs(restored) != rungs(restored_plain)
    for trial_id in ids[12:]:  # the running two restart from their checkpoints: epoch 3 again
        result = {"training_iteration": 3, "val_acc": 0.5}
        live.on_trial_result(None, Trial("x", stub=True, trial_id=trial_id), result)
        restored.on_trial_result(None, Trial("x", stub=True, trial_id=trial_id), result)
    assert rungs(restored) == rungs(live)

    poor = {"training_iteration": 1, "val_acc": -1.0}  # a new trial, after the resume
    for scheduler in (restored, restored_plain):
        scheduler.on_trial_add(None, Trial("x", stub=True, trial_id="new"))
    assert restored.on_trial_result(None, Trial("x", stub=True, trial_id="new"), poor) == TrialScheduler.STOP
    assert restored_plain.on_trial_result(None, Trial("x", stub=True, trial_id="new"), poor) == TrialScheduler.CONTINUE
