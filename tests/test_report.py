"""The search report and `tune-resnet status`, on run folders written here: no Ray, no search.

A generated run folder holds what a search leaves behind (trials.parquet, history.parquet,
summary.json, search.json) and a real refit model in best/, trained in a second on image_folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from click.testing import CliRunner
from PIL import Image

from search_spaces import parse_space
from trainables.run import run_training
from tuner import results
from tuner.cli import main
from tuner.report import JOURNAL_FILE, REPORT_DIR, REPORT_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_EPOCHS = 3
T0 = 1_700_000_000.0  # unix seconds: the generated search's start
PLOTS = ("learning_curves.png", "best_vs_time.png", "best_vs_epochs.png", "importance.png",
         "parallel_coordinates.png", "slices.png", "refit_curves.png", "confusion_matrix.png", "test_images.png")
SPACE = {
    "name": "generated",
    "data": {"dataset": "imagefolder", "val_fraction": 0.1, "input_size": 16},
    "budget": {"num_samples": 8, "max_epochs": MAX_EPOCHS, "grace_period": 1, "reduction_factor": 3},
    "params": {"lr": {"loguniform": [1.0e-3, 1.0]}, "batch_size": {"choice": [8, 16]},
               "optimizer": {"choice": ["sgd", "adamw"]},
               "momentum": {"uniform": [0.8, 0.95], "when": {"optimizer": "sgd"}},
               "width": {"int": [4, 8], "step": 4}},
    "fixed": {"arch": "cifar_resnet", "depth": 8, "schedule": "constant", "augment": "none"},
}
# trial id -> (params, val_acc per epoch, how it ended): 3 completed, 3 stopped by ASHA, 1 diverged, 1 errored
TRIALS = {
    "aaaa0001": ({"lr": 0.05, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9, "width": 8}, [0.5, 0.7, 0.8], None),
    "aaaa0002": ({"lr": 0.002, "batch_size": 8, "optimizer": "adamw", "width": 4}, [0.3], None),
    "aaaa0003": ({"lr": 0.2, "batch_size": 8, "optimizer": "sgd", "momentum": 0.85, "width": 4}, [0.45, 0.6, 0.75], None),
    "aaaa0004": ({"lr": 0.9, "batch_size": 16, "optimizer": "adamw", "width": 8}, [0.35], None),
    "aaaa0005": ({"lr": 0.01, "batch_size": 16, "optimizer": "sgd", "momentum": 0.95, "width": 4}, [0.4, 0.5], None),
    "aaaa0006": ({"lr": 0.1, "batch_size": 8, "optimizer": "adamw", "width": 8}, [0.5, 0.65, 0.7], None),
    "aaaa0007": ({"lr": 0.95, "batch_size": 8, "optimizer": "sgd", "momentum": 0.8, "width": 8}, [0.33], "diverged"),
    "aaaa0008": ({"lr": 0.003, "batch_size": 16, "optimizer": "adamw", "width": 4}, [0.2], "errored"),
}
EPOCH_S = 5.0  # seconds per generated epoch


def epoch_rows(trial_id: str, values: list[float], start: float, *, diverged: bool = False) -> list[dict]:
    """Rows as Ray writes them to result.json: our metrics plus Ray's own fields."""
    rows = []
    for epoch, val_acc in enumerate(values, start=1):
        rows.append({"trial_id": trial_id, "training_iteration": epoch, "epoch": epoch,
                     "train_loss": 1.2 - val_acc, "train_acc": val_acc + 0.05, "val_loss": 1.1 - val_acc,
                     "val_acc": val_acc, "lr": 0.1, "epoch_time_s": EPOCH_S, "train_images_per_sec": 900.0,
                     "time_total_s": epoch * EPOCH_S, "timestamp": int(start + epoch * EPOCH_S),
                     "started_at": start, "node_ip": "127.0.0.1", "gpu_ids": "", "cuda_visible_devices": "",
                     "diverged": int(diverged and epoch == len(values))})
    return rows


def base_config(image_folder: Path) -> dict:
    return {**SPACE["fixed"], "dataset": "imagefolder", "data_path": str(image_folder), "input_size": 16,
            "val_fraction": 0.1, "train_subset": None, "pretrained": None, "epochs": MAX_EPOCHS, "seed": 0}


def write_search_json(folder: Path, image_folder: Path) -> None:
    record = {"space": parse_space(SPACE).model_dump(mode="json"), "base_config": base_config(image_folder),
              "metric": "val_acc", "mode": "max", "max_epochs": MAX_EPOCHS}
    (folder / "search.json").write_text(json.dumps(record, indent=2))


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory, image_folder, image_data, tiny_config) -> Path:
    """A finished search's folder: tables written by tuner.results, a refit in best/."""
    folder = tmp_path_factory.mktemp("runs") / "generated"
    records = []
    for i, (trial_id, (params, values, ending)) in enumerate(TRIALS.items()):
        history = epoch_rows(trial_id, values, T0 + 4 * i, diverged=ending == "diverged")
        records.append(SimpleNamespace(trial_id=trial_id, params=params, history=history,
                                       error="RuntimeError: boom" if ending == "errored" else None,
                                       path=str(folder / f"trial_{trial_id}"), checkpoint_path=None, retries=0))
    found = results.collect(records, metric="val_acc", mode="max", max_epochs=MAX_EPOCHS, num_samples=len(TRIALS))
    results.write(found, str(folder))
    write_search_json(folder, image_folder)
    metrics = run_training(tiny_config, out_dir=folder / "best", data=image_data, refit=True)
    metrics["search_val_acc"] = found.summary.best_val_acc
    (folder / "best" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def rendered(generated_run, tmp_path_factory) -> tuple[Path, str]:
    with pytest.MonkeyPatch.context() as patch:  # the test-image grid decodes image_folder: a cache of its own
        patch.setenv("TUNE_RESNET_CACHE", str(tmp_path_factory.mktemp("report-cache")))
        code, output = invoke("report", str(generated_run))
    assert code == 0, output
    return generated_run, output


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def test_report_writes_every_plot_as_a_png_the_html_shows(rendered):
    folder, output = rendered
    assert "left out" not in output, output  # every plot applies to this run
    page = (folder / REPORT_FILE).read_text()
    for name in PLOTS:
        path = folder / REPORT_DIR / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
        assert width >= 400 and height >= 250, (name, image.size)
        assert f"src='{REPORT_DIR}/{name}'" in page, name
    assert sorted(p.name for p in (folder / REPORT_DIR).iterdir()) == sorted(PLOTS)


def test_report_opens_offline_and_says_what_the_search_found(rendered):
    folder, _ = rendered
    page = (folder / REPORT_FILE).read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best_trial_id"] == "aaaa0001"
    assert "aaaa0001" in page and "0.8" in page and "test accuracy" in page
    for name in ("blue", "green", "red"):  # the per-class table
        assert f"<td>{name}</td>" in page
    assert page.count("<tr>") >= 1 + 7 + 1 + 3  # top trials (7 scored) and per-class headers + rows


def test_report_shows_how_well_ashas_rungs_ranked(rendered):
    """One rung (epoch 1 of 3): 7 judged (the diverged trial was not), 2 stopped, 3 finished, whose
    epoch-1 val_acc (0.5, 0.45, 0.5) ranks their finals (0.8, 0.75, 0.7) no better than chance."""
    folder, _ = rendered
    page = (folder / REPORT_FILE).read_text()
    assert "<h2>ASHA's rungs</h2>" in page
    assert "<tr><td>1</td><td>7</td><td>2</td><td>5</td><td>3</td><td>+0.00</td></tr>" in page
    assert "class='warning'" not in page


def write_run(folder: Path, image_folder: Path, curves: dict[str, tuple[dict, list[float]]], params: dict) -> Path:
    """A search's tables from val_acc curves (a curve cut short: a trial ASHA stopped) and its search.json."""
    records = [SimpleNamespace(trial_id=trial_id, params=config, history=epoch_rows(trial_id, values, T0 + 4 * i),
                               error=None, path=str(folder / f"trial_{trial_id}"), checkpoint_path=None, retries=0)
               for i, (trial_id, (config, values)) in enumerate(curves.items())]
    results.write(results.collect(records, metric="val_acc", mode="max", max_epochs=MAX_EPOCHS,
                                  num_samples=len(curves)), str(folder))
    record = {"space": parse_space({**SPACE, "params": params}).model_dump(mode="json"),
              "base_config": base_config(image_folder), "metric": "val_acc", "mode": "max", "max_epochs": MAX_EPOCHS}
    (folder / "search.json").write_text(json.dumps(record))
    return folder


def test_report_of_a_search_whose_first_rung_misranks_warns_at_the_top(tmp_path, image_folder):
    """The depth case of bench/README.md in small (tests/test_rungs.py's DEPTH): the rung after
    epoch 1 stopped 6 of 7 depth-20 trials, and the one that went on ended best."""
    from test_rungs import DEPTH

    params = {"depth": {"choice": [8, 14, 20]}, "lr": {"loguniform": [0.05, 0.5]}}
    folder = write_run(tmp_path / "misranked", image_folder, DEPTH, params)
    code, output = invoke("report", str(folder))
    assert code == 0, output
    top, rest = (folder / REPORT_FILE).read_text().split("<h2>Summary</h2>")
    warning = "warning: the rung at epoch 1 stopped 6 of 7 trials with depth = 20 (other depth: 3 of 11)"
    assert f"<p class='warning'>{warning}" in top  # above everything else
    assert "<tr><td>1</td><td>18</td><td>9</td><td>9</td><td>9</td>" in rest and warning in rest


def read_journal(folder: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL_FILE)))
    return optuna.load_study(study_name=folder.name, storage=storage)


def test_journal_holds_the_study_for_optuna_dashboard(rendered):
    """A run without a live journal (older runs; a URI's, read from a local copy): the report
    writes it from the tables, in the shape the search writes it as it goes (tuner/journal.py)."""
    folder, _ = rendered
    study = read_journal(folder)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(study.trials) == len(TRIALS)
    states = {t.user_attrs["ray_trial_id"]: t.state for t in study.trials}
    assert [s.name for s in states.values()] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED", "PRUNED", "COMPLETE",
                                                 "FAIL", "FAIL"]  # stopped early by ASHA: PRUNED
    assert study.best_value == pytest.approx(0.8)
    assert study.best_trial.user_attrs["ray_trial_id"] == "aaaa0001"
    assert study.best_trial.user_attrs["status"] == "completed" and study.best_trial.user_attrs["epochs"] == 3
    assert study.best_trial.intermediate_values == {1: 0.5, 2: 0.7, 3: 0.8}
    assert study.best_trial.params == TRIALS["aaaa0001"][0]
    lr = study.best_trial.distributions["lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert "live" not in study.user_attrs and study.user_attrs["run_dir"] == str(folder.resolve())


def test_report_again_replaces_the_journal(rendered):
    folder, _ = rendered
    code, output = invoke("report", str(folder))
    assert code == 0, output
    assert len(read_journal(folder).trials) == len(TRIALS)


@pytest.mark.parametrize("started", [len(TRIALS), len(TRIALS) - 1])
def test_report_keeps_the_journal_the_search_wrote_unless_it_misses_trials(generated_run, tmp_path, started):
    """The search's live journal, every trial started (the ends not told: as after a Ctrl-C, which
    --resume continues) is kept byte for byte; one that misses a trial (the search stopped writing
    it after an error) is written afresh from the tables."""
    from tuner.journal import Mirror

    folder = tmp_path / "generated"
    shutil.copytree(generated_run, folder, ignore=shutil.ignore_patterns(JOURNAL_FILE, REPORT_DIR, REPORT_FILE))
    mirror = Mirror(str(folder))
    mirror.begin([])
    for trial_id, (params, _, _) in list(TRIALS.items())[:started]:
        mirror.start(trial_id, params)
    mirror.flush()  # as the driver does a second on, or when Ray saves its state
    written = (folder / JOURNAL_FILE).read_bytes()
    code, output = invoke("report", str(folder))
    assert code == 0, output
    study = read_journal(folder)
    assert len(study.trials) == len(TRIALS)
    if started == len(TRIALS):
        assert (folder / JOURNAL_FILE).read_bytes() == written and study.user_attrs["live"] is True
    else:
        assert "live" not in study.user_attrs and all(t.state.is_finished() for t in study.trials)
    assert f"optuna-dashboard {folder / JOURNAL_FILE}" in (folder / REPORT_FILE).read_text()


def test_report_without_a_refit_leaves_its_plots_out(generated_run, tmp_path):
    folder = tmp_path / "no-refit"
    shutil.copytree(generated_run, folder, ignore=shutil.ignore_patterns("best", REPORT_DIR, REPORT_FILE))
    code, output = invoke("report", str(folder))
    assert code == 0, output
    page = (folder / REPORT_FILE).read_text()
    for name in ("refit_curves.png", "confusion_matrix.png", "test_images.png"):
        assert not (folder / REPORT_DIR / name).exists() and name not in page.split("<p class='notes'>")[0]
    assert (folder / REPORT_DIR / "learning_curves.png").exists()


def test_report_of_a_folder_that_is_no_search_is_one_line(tmp_path):
    code, output = invoke("report", str(tmp_path))
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and "expected the folder of a finished search" in output


def test_a_report_that_fails_when_a_search_ends_is_one_line_and_no_error(tmp_path, capsys):
    from tuner.report import write_report_safely

    write_report_safely(str(tmp_path))  # not a finished search: the report cannot be written
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("report failed (ReportError") and "tune-resnet report" in captured.err


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

def test_status_of_a_finished_search(generated_run):
    code, output = invoke("status", str(generated_run))
    assert code == 0, output
    assert "finished" in output
    assert "3 completed" in output and "3 early_stopped" in output
    assert "1 diverged" in output and "1 errored" in output and "0 running" in output
    assert "best val_acc so far: 0.8000 (trial aaaa0001, epoch 3)" in output
    assert "time left" not in output
    assert len(output.splitlines()) <= 25  # one screen


def test_status_loads_neither_ray_torch_nor_optuna(generated_run):
    """Status reads files (JSON, and pyarrow for the tables), so it answers in about a second
    from another shell; checked in a fresh interpreter, this one has them all loaded."""
    probe = (f"from tuner.cli import main\ntry:\n    main(['status', {str(generated_run)!r}])\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "import sys\nprint('loaded:', *(m for m in ('ray', 'torch', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "finished" in done.stdout, done.stdout + done.stderr
    assert done.stdout.rpartition("loaded:")[2].split() == []


def write_trial_folder(run: Path, trial_id: str, values: list[float], start: float, *, torn: bool = False) -> Path:
    folder = run / f"trial_fn_{trial_id}_00000"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(TRIALS[trial_id][0]))
    lines = [json.dumps(row) for row in epoch_rows(trial_id, values, start)]
    if torn:  # a line caught half-written
        lines.append('{"trial_id": "' + trial_id + '", "val_a')
    (folder / "result.json").write_text("\n".join(lines) + ("\n" if lines and not torn else ""))
    return folder


def write_experiment_state(run: Path, statuses: dict[str, str]) -> None:
    """The shape of Ray's experiment_state-*.json: each trial a JSON string, with its run metadata."""
    trial_data = [[json.dumps({"trial_id": trial_id, "status": status,
                               "relative_logdir": f"trial_fn_{trial_id}_00000"}),
                   json.dumps({"last_result": {}, "num_failures": 0})] for trial_id, status in statuses.items()]
    state = {"trial_data": trial_data, "runner_data": {"_session_str": "2026-01-01_00-00-00"},
             "stats": {"start_time": T0}}
    (run / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))


@pytest.mark.parametrize("with_budget", [True, False], ids=["search.json", "no-search.json"])
def test_status_of_a_running_search_from_partial_trial_folders(tmp_path, image_folder, with_budget):
    run = tmp_path / "live"
    write_trial_folder(run, "aaaa0001", [0.5, 0.7, 0.8], T0)            # all epochs: completed
    write_trial_folder(run, "aaaa0002", [0.3], T0)                      # ASHA stopped it
    write_trial_folder(run, "aaaa0003", [0.45, 0.6], T0 + 20, torn=True)  # running, a line half-written
    write_trial_folder(run, "aaaa0004", [], T0 + 30)                    # started, no epoch yet
    write_trial_folder(run, "aaaa0008", [0.2], T0 + 5)                  # crashed
    write_experiment_state(run, {"aaaa0001": "TERMINATED", "aaaa0002": "TERMINATED", "aaaa0003": "RUNNING",
                                 "aaaa0004": "RUNNING", "aaaa0008": "ERROR", "aaaa0005": "PENDING"})
    if with_budget:
        write_search_json(run, image_folder)
    code, output = invoke("status", str(run))
    assert code == 0, output
    assert "running" in output.splitlines()[0]
    assert "2 running" in output and "1 errored" in output
    assert "best val_acc so far: 0.8000 (trial aaaa0001, epoch 3)" in output
    assert "aaaa0003" in output and "aaaa0005" in output
    if with_budget:  # 8 planned: 6 known to Ray, of which 1 pending, and 2 not created yet
        assert "8 planned" in output and "1 completed" in output and "1 early_stopped" in output
        assert "3 pending" in output
        assert "time left: ~" in output and "estimate" in output
    else:  # no budget known: completed cannot be told from stopped early, and no estimate
        assert "planned count unknown" in output and "1 pending" in output and "2 ended" in output
        assert "time left" not in output


def test_status_without_the_experiment_state_reads_the_trial_folders_alone(tmp_path, image_folder):
    run = tmp_path / "live"
    write_trial_folder(run, "aaaa0001", [0.5, 0.7, 0.8], T0)
    write_trial_folder(run, "aaaa0003", [0.45], T0 + 20)
    write_search_json(run, image_folder)
    code, output = invoke("status", str(run))
    assert code == 0, output
    assert "1 completed" in output and "1 running" in output and "6 pending" in output
    assert "time left: ~" in output


def test_status_of_a_folder_that_is_no_search_is_one_line(tmp_path):
    code, output = invoke("status", str(tmp_path))
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and "expected the run folder of a search" in output


def test_status_never_unpickles_the_run_folders_files(tmp_path):
    """A run folder may come from anyone: a tuner.pkl that would run a command when unpickled is
    left alone (the budget comes from search.json only)."""
    run = tmp_path / "someone-elses"
    write_trial_folder(run, "aaaa0001", [0.5, 0.7], T0)
    marker = tmp_path / "ran"
    (run / "tuner.pkl").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    code, output = invoke("status", str(run))
    assert code == 0, output
    assert "planned count unknown" in output
    assert not marker.exists()
