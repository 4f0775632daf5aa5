"""MLflow tracking against a real MLflow server (SQLite backend, local artifact root) started on
127.0.0.1 for this module: a tiny search logged to it and read back with MLflow's client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tuner import tracking
from tuner.cli import main

from test_search import write_space

mlflow = pytest.importorskip("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store and a proxied local artifact root; its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def run_search(*args: str):
    result = CliRunner().invoke(main, ["search", *args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def tracked_search(ray_session, image_folder, tmp_path_factory, mlflow_server):
    folder = tmp_path_factory.mktemp("tracked")
    space = write_space(folder, image_folder, budget={"num_samples": 4, "max_epochs": 3},
                        tracking={"experiment": "tracked-tiny", "registered_model": "tiny-resnet"})
    result = run_search("--space", str(space), "--storage", str(folder / "runs"), "--name", "tracked",
                        "--max-concurrent", "1", "--mlflow", mlflow_server)
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tracked-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return folder / "runs" / "tracked", result.output, client, runs


def by_stage(runs, stage):
    return [r for r in runs if r.data.tags.get("stage") == stage]


@pytest.mark.slow
def test_one_parent_run_and_one_child_run_per_trial_with_metrics_per_epoch(tracked_search):
    run_dir, output, client, runs = tracked_search
    [parent] = by_stage(runs, "search")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["num_samples"] == "4" and parent.data.tags["run_dir"] == str(run_dir)
    trials = pq.read_table(run_dir / "trials.parquet").to_pylist()
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
    children = by_stage(runs, "trial")
    assert len(children) == len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    status = {"completed": "FINISHED", "early_stopped": "KILLED", "diverged": "FAILED", "errored": "FAILED"}
    for trial in trials:
        [run] = [r for r in children if r.data.tags["trial_id"] == trial["trial_id"]]
        assert run.data.tags["outcome"] == trial["status"] and run.info.status == status[trial["status"]]
        assert float(run.data.params["lr"]) == pytest.approx(trial["config/lr"])
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        epochs = {h["training_iteration"]: h["val_acc"] for h in history if h["trial_id"] == trial["trial_id"]}
        assert logged == pytest.approx(epochs)
    assert {t["status"] for t in trials} >= {"early_stopped"}  # ASHA stopped some: KILLED in MLflow
    summary = json.loads((run_dir / "summary.json").read_text())
    assert parent.data.metrics["best_val_acc"] == pytest.approx(summary["best_val_acc"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "report.html", "report"} <= artifacts
    assert output.count("tracking:") == 1  # the refit's line, nothing about a failure


@pytest.mark.slow
def test_refit_run_logs_a_model_that_predicts_as_tune_resnet_predict(tracked_search, image_folder):
    run_dir, output, client, runs = tracked_search
    [refit] = by_stage(runs, "refit")
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert refit.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    assert refit.info.status == "FINISHED"
    confusion = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=refit.info.run_id, artifact_path="confusion_matrix.json", tracking_uri=client.tracking_uri)).read_text())
    assert confusion["matrix"] == metrics["test"]["confusion_matrix"]
    assert f"model runs:/{refit.info.run_id}/model, registered as tiny-resnet version 1" in output

    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-resnet/1")
    classes = model.metadata.metadata["classes"]
    paths, images = decoded_test_images(run_dir / "best", image_folder / "test")
    predicted = [classes[i] for i in model.predict(images)["logits"].argmax(axis=1)]
    served = CliRunner().invoke(main, ["predict", "--model", str(run_dir / "best"), "--format", "json",
                                       str(image_folder / "test")], catch_exceptions=False)
    by_predict = {p["path"]: p["predictions"][0]["class"] for p in json.loads(served.output)}
    assert predicted == [by_predict[str(p)] for p in paths]
    accuracy = np.mean([c == p.parent.name for c, p in zip(predicted, paths)])
    assert abs(accuracy - metrics["test_acc"]) <= 0.005


@pytest.mark.slow
def test_refit_command_logs_a_refit_run_under_the_search_run(tracked_search):
    """`tune-resnet refit RUN --mlflow URI` after the search: a second refit run under the search's
    parent run (found by its run folder, left FINISHED), its model registered as the space says."""
    run_dir, _, client, runs = tracked_search
    [parent] = by_stage(runs, "search")
    result = CliRunner().invoke(main, ["refit", str(run_dir), "--epochs", "1", "--mlflow", client.tracking_uri],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    refits = by_stage(client.search_runs([parent.info.experiment_id], max_results=100), "refit")
    assert len(refits) == 2 and {r.data.tags["mlflow.parentRunId"] for r in refits} == {parent.info.run_id}
    newest = max(refits, key=lambda r: r.info.start_time)
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and newest.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    assert newest.info.status == "FINISHED" and client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert f"model runs:/{newest.info.run_id}/model, registered as tiny-resnet version 2" in result.output


@pytest.mark.slow
def test_refit_command_with_an_unreachable_server_is_one_line_and_refits(tracked_search):
    run_dir = tracked_search[0]
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["refit", str(run_dir), "--epochs", "1", "--mlflow", dead],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "tracking" in line]  # stderr's lines included
    assert len(lines) == 1 and lines[0].startswith(f"tracking: MLflow at {dead} cannot be reached"), lines
    assert lines[0].endswith("the refit goes on without it")
    assert json.loads((run_dir / "best" / "metrics.json").read_text())["epochs"] == 1


def decoded_test_images(model_dir: Path, folder: Path):
    """The images as tune-resnet predict decodes them: float32 (N, 3, H, W) pixel values."""
    from trainables.config import image_sizes
    from trainables.data import decode_centre
    from tuner.predict import find_images

    meta = json.loads((model_dir / "config.json").read_text())
    storage_size, input_size = image_sizes(meta["config"])
    paths = list(find_images([folder]))
    images = np.stack([decode_centre(p, storage_size=storage_size, input_size=input_size) for p in paths])
    return paths, np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.mark.slow
def test_an_unreachable_server_is_one_line_and_the_search_completes(ray_session, image_folder, tmp_path):
    space = write_space(tmp_path, image_folder, budget={"num_samples": 2, "max_epochs": 2})
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_search("--space", str(space), "--storage", str(tmp_path / "runs"), "--name", "dead",
                        "--mlflow", dead, "--no-refit")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "tracking" in line or "mlflow" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"tracking: MLflow at {dead} cannot be reached"), lines
    assert (tmp_path / "runs" / "dead" / "summary.json").is_file()


def test_a_server_that_goes_away_mid_search_is_told_once(mlflow_server):
    """The driver's calls after a failure do nothing: one line, however many trials end after it."""
    said = []
    log = tracking.SearchLog(mlflow_server, said.append)
    log.start(experiment="goes-away", run_dir="/tmp/x", name="x", params={"a": 1}, resume=False)
    assert log.active and said == []
    log.client = tracking.client(f"http://127.0.0.1:{free_port()}")  # as if the server had stopped
    for trial_id in ("a", "b", "c"):
        log.trial_ended(trial_id, "completed")
    log.finish("FINISHED")
    assert len(said) == 1 and said[0].startswith(f"tracking: MLflow at {mlflow_server} stopped answering")
    assert not log.active


@pytest.fixture
def hanging_up_server():
    """A TCP server on 127.0.0.1 that accepts each connection and closes it at once (a server
    gone bad); its URI and the list of connections it took."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    taken: list[int] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            taken.append(1)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    listener.close()


def test_a_trial_whose_server_is_gone_tries_once_and_trains_unlogged(hanging_up_server):
    """A trial's first call is not retried: one connection, where the driver's calls (MLflow's
    bounded retries) take three."""
    uri, taken = hanging_up_server
    log = tracking.TrialLog(tracking.Target(uri, "0", "parent"), "t1", {"lr": 0.1})
    log.on_start(None)
    assert log.run_id is None and len(taken) == 1
    log.on_epoch_end(None, {"epoch": 1, "val_acc": 0.5})  # nothing more is tried
    assert len(taken) == 1
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    with pytest.raises(Exception):
        tracking.client(uri).search_experiments(max_results=1)
    assert len(taken) == 1 + 1 + int(tracking.ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])


def test_resume_reopens_the_parent_run_of_the_same_run_folder(mlflow_server):
    first = tracking.SearchLog(mlflow_server, pytest.fail)
    first.start(experiment="resumed", run_dir="/runs/r", name="r", params={}, resume=False)
    first.finish("KILLED")
    again = tracking.SearchLog(mlflow_server, pytest.fail)
    again.start(experiment="resumed", run_dir="/runs/r", name="r", params={}, resume=True)
    assert again.target.parent_run_id == first.target.parent_run_id
    other = tracking.SearchLog(mlflow_server, pytest.fail)
    other.start(experiment="resumed", run_dir="/runs/r", name="r", params={}, resume=False)
    assert other.target.parent_run_id != first.target.parent_run_id


def test_a_trial_restarted_logs_into_its_own_run_again(mlflow_server):
    log = tracking.SearchLog(mlflow_server, pytest.fail)
    log.start(experiment="restarts", run_dir="/runs/t", name="t", params={}, resume=False)
    for attempt in (1, 2):  # the first process died after epoch 1; the second restores and goes on
        trial = tracking.TrialLog(log.target, "t1", {"lr": 0.1})
        trial.on_start(None)
        trial.on_epoch_end(None, {"epoch": attempt, "val_acc": 0.5 * attempt, "note": "not a metric"})
    log.trial_ended("t1", "completed")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([log.target.experiment_id], filter_string="tags.trial_id = 't1'")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.5, 1.0]
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"


def test_without_mlflow_installed_the_flag_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(tracking.SearchError, match=r"pip install 'tune-resnet\[mlflow\]'"):
        tracking.check_installed("http://127.0.0.1:5000")
    tracking.check_installed(None)  # no tracking asked for: nothing to check
