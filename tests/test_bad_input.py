"""Users' mistakes: each ends in one line on the terminal, exit code 2, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_image_folder
from test_search import write_space
from tuner.cli import main


def garbage_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "x.jpg").write_bytes(b"not a jpeg")
    return root


def one_class_unreadable(root: Path) -> Path:
    write_image_folder(root, classes={"red": 0, "green": 1})
    for path in (root / "train" / "green").iterdir():
        path.write_bytes(b"\x00" * 10)
    return root


def mismatched_classes(root: Path) -> Path:
    write_image_folder(root, classes={"red": 0, "green": 1})
    (root / "test" / "green").rename(root / "test" / "blue")
    return root


def not_an_archive(root: Path) -> Path:
    root.mkdir()
    (root / "data.tar.gz").write_bytes(b"this is no archive")
    return root / "data.tar.gz"


def empty_folder(root: Path) -> Path:
    root.mkdir()
    return root


# (how to make the data, space edits, what the one line must say)
CASES = {
    "missing data folder": (lambda root: root / "missing", {}, "does not exist"),
    "empty data folder": (empty_folder, {}, "has no train/<class>/"),
    "corrupt data folder": (garbage_folder, {}, "no readable images"),
    "a class with no readable images": (one_class_unreadable, {}, "train/green/"),
    "train and test classes differ": (mismatched_classes, {}, "differ"),
    "not an archive": (not_an_archive, {}, "not a readable .tar.gz/.tar/.zip archive"),
    "unknown dataset": (lambda root: write_image_folder(root), {"data": {"dataset": "mnist"}}, "unknown dataset"),
    "a single class": (lambda root: write_image_folder(root, classes={"red": 0}), {}, "a classifier needs at least 2"),
    "no image left to validate on": (lambda root: write_image_folder(root, train_per_class=1), {},
                                     "leaves no validation image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_exit_2_and_nothing_written(case, tmp_path):
    make, edits, message = CASES[case]
    data = make(tmp_path / "data")
    space = write_space(tmp_path, data, **edits)
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("Error: ") and message in lines[-1], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_space_file_that_is_not_yaml(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 binary: [")
    result = CliRunner().invoke(main, ["search", "--space", str(space)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "space.yaml" in result.output


def test_train_command_rejects_bad_values_in_one_line(tmp_path, image_folder):
    config = tmp_path / "train.yaml"
    config.write_text("arch: resnet21\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--dataset", "imagefolder",
                                       "--data", str(image_folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "resnet20" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_address_with_no_cluster_fails_fast(tmp_path, image_folder):
    space = write_space(tmp_path, image_folder)
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage",
                           str(tmp_path / "runs"), "--address", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--address: no Ray cluster at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("server", ["http", "silent"])
def test_address_of_something_that_is_not_ray_fails_fast(tmp_path, image_folder, server):
    """A port that answers but is no Ray head (a web server; a server that never speaks): one line,
    at once, where ray.init would print C++ warnings and retry for minutes."""
    import http.server
    import socketserver
    import threading

    if server == "http":
        listener = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    else:
        class Silent(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.recv(1024)
                threading.Event().wait(10)  # hold the connection open, say nothing

        listener = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Silent)
        listener.daemon_threads = True
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{listener.server_address[1]}"
    space = write_space(tmp_path, image_folder)
    try:
        done = subprocess.run([sys.executable, "-m", "tuner.cli", "search", "--space", str(space), "--storage",
                               str(tmp_path / "runs"), "--address", address],
                              capture_output=True, text=True, timeout=60)
    finally:
        listener.shutdown()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--address: {address} answers, but not as a Ray cluster" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # no Ray warnings before it
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_full_disk_is_one_line(tmp_path, image_folder, monkeypatch):
    import errno

    import trainables.data

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "train_images.npy"))

    monkeypatch.setattr(trainables.data.os, "posix_fallocate", full)  # the cache write meets a full disk
    result = CliRunner().invoke(main, ["data", "prepare", "--dataset", "imagefolder", "--data", str(image_folder)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: disk full writing") and "--resume" in result.output


def test_pretrained_weights_that_do_not_fit_their_config(tmp_path, image_folder, tiny_config):
    import json

    from trainables.checkpoint import save_weights
    from trainables.models import create_model

    other = create_model("cifar_resnet", num_classes=3, depth=14, width=4)  # not the depth-8 of its config
    save_weights(tmp_path / "model", other, {"config": tiny_config.to_dict(), "num_classes": 3,
                                             "classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3})
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"pretrained": str(tmp_path / "model")}))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--dataset", "imagefolder",
                                       "--data", str(image_folder), "--input-size", "16", "--epochs", "1",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "do not fit" in result.output.strip().splitlines()[-1] and "Traceback" not in result.output


def _checkpoint_file_that_is_not_one(root: Path) -> str:
    (root / "model").mkdir(parents=True)
    (root / "model" / "checkpoint.pt").write_bytes(b"truncated: not a torch file")
    return str(root / "model")


# Values a trial's model would refuse: found before any trial, whatever the params draw.
# (space edits, given tmp_path -> what the one line must say)
MODEL_CASES = {
    "frozen stages beyond the model's": (
        lambda root: {"params": {"frozen_stages": {"int": [1, 5]}}, "fixed": {"freeze": "stages"}},
        "params: frozen_stages = 5 (int [1, 5]): frozen_stages: expected 0..3 for this model, got 5"),
    "label smoothing of 1 or more": (
        lambda root: {"params": {"label_smoothing": {"uniform": [0.0, 1.5]}}},
        "params: label_smoothing = 1.5"),
    "a pretrained run that is not there": (
        lambda root: {"model": {"pretrained": str(root / "missing")}},
        "model: pretrained: "),
    "a pretrained checkpoint that is not one": (
        lambda root: {"model": {"pretrained": _checkpoint_file_that_is_not_one(root)}},
        "cannot be read"),
    "torchvision weights for a CIFAR ResNet": (
        lambda root: {"model": {"pretrained": "torchvision"}},
        "model: pretrained: torchvision has ImageNet weights for resnet18"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
@pytest.mark.parametrize("dry_run", [True, False])
def test_what_a_trials_model_would_refuse_fails_before_any_trial(case, dry_run, tmp_path, image_folder):
    edits, message = MODEL_CASES[case]
    space = write_space(tmp_path, image_folder, **edits(tmp_path))
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs"),
                                       *(["--dry-run"] if dry_run else [])])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_freeze_the_model_does_not_have(tmp_path, image_folder):
    config = tmp_path / "train.yaml"
    config.write_text("arch: resnet20\nfreeze: stages\nfrozen_stages: 4\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--dataset", "imagefolder",
                                       "--data", str(image_folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "frozen_stages: expected 0..3 for this model, got 4" in result.output
    assert not (tmp_path / "out").exists()


def test_a_search_whose_every_trial_errors_fails_with_the_first_error(ray_session, tmp_path, image_folder,
                                                                     tiny_config):
    """What no check can see before training (weights that do not fit their own config) errors in
    every trial: the search keeps its tables, names the first error and exits with 1, not 0."""
    from trainables.checkpoint import save_weights
    from trainables.models import create_model

    other = create_model("cifar_resnet", num_classes=3, depth=14, width=4)  # not the depth-8 of its config
    save_weights(tmp_path / "model", other, {"config": tiny_config.to_dict(), "num_classes": 3,
                                             "classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3})
    space = write_space(tmp_path, image_folder, model={"pretrained": str(tmp_path / "model")},
                        budget={"num_samples": 2, "max_epochs": 1, "grace_period": 1})
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs")])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1, result.output
    assert last.startswith("Error: no trial gave a result: 2 of 2 errored; the first error: ") and "do not fit" in last
    assert "Traceback" not in result.output
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["by_status"]["errored"] == 2 and summary["best_trial_id"] is None
    assert not (tmp_path / "runs" / "tiny" / "best").exists()
    assert len(list((tmp_path / "runs" / "tiny").glob("*/error.txt"))) == 2  # where the message points


@pytest.mark.parametrize("args, message", [
    (["search", "--space", "x.yaml", "--num-samples", "0"], "Invalid value for '--num-samples'"),
    (["search"], "Missing option '--space'"),
    (["serch"], "No such command 'serch'. Did you mean 'search'?"),
    (["--bad"], "No such option '--bad'"),
    (["data", "prepare", "--foo"], "No such option '--foo'. (see tune-resnet data prepare -h)"),
    (["predict", "--model", "m", "x.jpg", "--top-k", "0"], "Invalid value for '--top-k'"),
])
def test_mistakes_in_flags_are_one_line_too(args, message):
    result = CliRunner().invoke(main, args, prog_name="tune-resnet")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and message in lines[0] and "-h)" in lines[0], result.output


def test_a_bare_group_still_shows_its_help():
    result = CliRunner().invoke(main, ["data"], prog_name="tune-resnet")
    assert "prepare" in result.output and "Error" not in result.output



def test_paths_that_cannot_be_written_fail_before_any_work(tmp_path, image_folder):
    """A file where a folder should be: --storage (also with --dry-run) and train --out are refused
    in one line before data, Ray or training, so no finished work is lost at the save."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    space = write_space(tmp_path, image_folder)
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(blocker / "runs"), *extra])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith(f"Error: --storage: cannot write to {blocker / 'runs'}"), result.output
    result = CliRunner().invoke(main, ["train", "--dataset", "imagefolder", "--data", str(image_folder),
                                       "--input-size", "16", "--epochs", "1", "--out", str(blocker / "out")])
    assert result.exit_code == 2 and "Error: --out: cannot write to" in result.output, result.output
    assert "epoch" not in result.output  # refused before training, not after it


def test_a_finished_search_is_not_overwritten_by_the_same_name(tmp_path, image_folder):
    earlier = tmp_path / "runs" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / "search.json").write_text("{}")  # what every search writes first
    space = write_space(tmp_path, image_folder)
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "already holds a search; pass --resume to continue it, another --name" in result.output
    assert sorted(p.name for p in earlier.iterdir()) == ["search.json"]
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--name", "../escape", "--dry-run"])
    assert result.exit_code == 2 and "expected a plain folder name" in result.output, result.output


def test_a_nan_bound_is_refused_in_one_line(tmp_path, image_folder):
    space = write_space(tmp_path, image_folder, params={"lr": {"uniform": [float("nan"), 0.5]}})
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--dry-run"])
    assert result.exit_code == 2 and "params.lr.uniform: expected finite bounds" in result.output, result.output


def _damaged_run(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


SPACE_JSON = ('{"space": {"refit": {"epochs": 1}, "budget": {"max_epochs": 1}, "export": {"formats": []}}, '
              '"base_config": {}, "metric": "val_acc", "mode": "max", "max_epochs": 1}')
NO_RESULT = ('{"metric": "val_acc", "mode": "max", "best_trial_id": null, "best_val_acc": null, "best_epoch": null, '
             '"best_config": null, "trials": 1, "by_status": {"errored": 1}, "epochs_spent": 0, '
             '"epochs_without_early_stopping": 1}')


@pytest.mark.parametrize("command, files, message", [
    ("refit", {"search.json": '{"space": {"refit": ', "summary.json": "{}"}, "search.json: cut off or edited"),
    ("refit", {"search.json": "[1, 2]", "summary.json": "{}"}, "search.json: expected a JSON object"),
    ("refit", {"search.json": SPACE_JSON.replace('"base_config": {}', '"base_config": {"lr": -1}'),
               "summary.json": NO_RESULT}, "search.json: edited or from another version (lr: expected a positive"),
    ("refit", {"search.json": SPACE_JSON, "summary.json": '{"best_config": null}'}, "summary.json: missing metric"),
    ("refit", {"search.json": SPACE_JSON, "summary.json": NO_RESULT}, "no trial of this search gave a result"),
    ("status", {"search.json": "[1, 2]", "summary.json": "{}"}, "expected the run folder of a search"),
    ("status", {"search.json": SPACE_JSON, "trials.parquet": "cut"}, "trials.parquet: cannot be read as a table"),
    ("report", {"search.json": SPACE_JSON, "summary.json": NO_RESULT, "trials.parquet": "cut", "history.parquet": "cut"},
     "trials.parquet: cannot be read as a table"),
])
def test_a_run_folder_with_damaged_files_is_one_line(tmp_path, command, files, message):
    run = _damaged_run(tmp_path / "run", files)
    result = CliRunner().invoke(main, [command, str(run)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_train_config_yaml_error_says_where(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("arch: resnet20\nlr: [0.1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "line 2" in result.output, result.output


@pytest.mark.parametrize("data, message", [("missing", "does not exist"), ("mnist", "unknown dataset")])
def test_dry_run_checks_the_data_source_too(tmp_path, image_folder, data, message):
    edits = ({"data": {"path": str(tmp_path / "missing")}} if data == "missing"
             else {"data": {"dataset": "mnist"}})
    space = write_space(tmp_path, image_folder, **edits)
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--dry-run"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output


@pytest.mark.parametrize("hook, message", [
    ("no_such_module:Hook", "trial.hook: cannot import no_such_module:Hook (ModuleNotFoundError: No module named "
                            "'no_such_module'); put its module on PYTHONPATH on every node"),
    ("trial_hooks:NoSuchHook", "trial.hook: cannot import trial_hooks:NoSuchHook (AttributeError: "),
    ("trial_hooks:TESTS", "trial.hook: trial_hooks:TESTS is a PosixPath, not a class or function"),
])
def test_a_trial_hook_that_does_not_import_fails_before_the_search(ray_session, tmp_path, image_folder, hook, message):
    space = write_space(tmp_path, image_folder, trial={"hook": hook})
    result = CliRunner().invoke(main, ["search", "--space", str(space), "--storage", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {message}"), result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
