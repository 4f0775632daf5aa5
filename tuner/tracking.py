"""MLflow tracking of a search: a parent run for the search, a child run per trial, a run for the
refit with its model. Optional: `pip install 'tune-resnet[mlflow]'`; mlflow is imported only when
a search names a tracking URI (`--mlflow URI` or the space's `tracking.mlflow`).

    search (parent run: the space's settings, the summary, report.html and its plots)
    ├── trial 1a2b3c (child run: sampled params, metrics per epoch, the outcome)
    ├── ...
    └── refit (child run: its config, metrics per epoch, test metrics, the confusion matrix, and
               the exported ONNX model as an MLflow model, registered under tracking.registered_model)

Who writes what:
- Each trial logs its own run from its own process and node (TrialLog, a trial hook): the params
  when it starts, one batch of metrics per epoch (step = epoch). A restarted or resumed trial
  finds its run again by its `trial_id` tag and goes on logging into it.
- The driver (SearchLog) creates the parent run, ends each trial's run with its outcome when Ray
  says the trial ended (the trial itself cannot: ASHA stops it inside a report), logs the refit,
  and ends the parent run: FINISHED, KILLED after an interruption, FAILED when no trial scored.
- Trial outcomes: the `outcome` tag holds completed | early_stopped | diverged | errored; the run's
  status is FINISHED, KILLED (stopped early by ASHA), FAILED (diverged or errored).

A tracking server that cannot be reached never stops a search: the driver says so in one line,
once (at the start, or at its first failed call), and goes on without it; a trial that fails to
log stops logging quietly, and its first call is not retried (a server gone mid-search costs each
later trial one refused connection). MLflow's HTTP retries are bounded here (MLFLOW_HTTP_REQUEST_* unless
set): its default of 7 retries with exponential backoff would hold a search for minutes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import SearchError, first_line

# Unless the user set them: a dead server costs seconds, not minutes (MLflow reads them per request);
# no progress bars or run links printed into the search's output.
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
FIRST_CALL_TIMEOUT_S = "10"  # a trial's first call to the server (TrialLog), as the driver's probe (problem)
EPOCH_METRICS = ("val_acc", "val_loss", "train_loss", "train_acc", "lr", "epoch_time_s", "train_images_per_sec")
MEASURED = ("params", "macs", "latency_ms", "latency_ms_b64")  # objectives a trial measures once (tuner/latency.py)
RUN_STATUS = {"completed": "FINISHED", "early_stopped": "KILLED", "diverged": "FAILED", "errored": "FAILED"}
MODEL_NAME = "model"  # the refit run's MLflow model: runs:/<refit run id>/model, or models:/<register>/<version>


@dataclass(frozen=True)
class Target:
    """What a trial needs to log itself (picklable: it travels to every trial)."""

    uri: str
    experiment_id: str
    parent_run_id: str


def client(uri: str):
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_installed(uri: str | None) -> None:
    if uri and importlib.util.find_spec("mlflow") is None:
        raise SearchError(f"tracking.mlflow {uri}: MLflow is not installed; install it with "
                          "pip install 'tune-resnet[mlflow]', or leave --mlflow out")


def problem(uri: str) -> str | None:
    """Why the tracking server at uri cannot be used (one try, no retries), or None."""
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=FIRST_CALL_TIMEOUT_S):
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as error:  # refused, timed out, not an MLflow server, a bad URI...
            return first_line(error)
    return None


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _find_run(mlflow_client: Any, experiment_id: str, **tags: str) -> str | None:
    """The newest run of the experiment with these tag values, or None."""
    where = " and ".join(f"tags.{name} = '{value}'" for name, value in tags.items())
    runs = mlflow_client.search_runs([experiment_id], filter_string=where, max_results=1,
                                     order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _params(values: Mapping[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(str(name), str(value)[:6000]) for name, value in values.items()]


def _metrics(values: Mapping[str, Any], step: int, names: tuple[str, ...] | None = None) -> list:
    from mlflow.entities import Metric

    at = int(time.time() * 1000)
    return [Metric(name, float(value), at, step) for name, value in values.items()
            if (names is None or name in names) and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)]


# ---------------------------------------------------------------------------------------------
# A trial's own run: logged from the trial's process
# ---------------------------------------------------------------------------------------------

class TrialLog:
    """A trial hook (tuner/hooks.py) that logs the trial into its MLflow run. At its first error it
    stops logging (the driver tells the user once: its own call fails too, or the trial's outcome
    still reaches the run)."""

    def __init__(self, target: Target, trial_id: str, params: Mapping[str, Any]) -> None:
        self.target, self.trial_id, self.params = target, trial_id, dict(params)
        self.client: Any = None
        self.run_id: str | None = None

    def on_start(self, trainer: Any) -> None:
        self._guard(self._open)

    def on_epoch_end(self, trainer: Any, row: Mapping[str, Any]) -> None:
        if self.run_id:
            self._guard(lambda: self.client.log_batch(self.run_id, metrics=_metrics(row, int(row["epoch"]),
                                                                                    EPOCH_METRICS + MEASURED)))

    def _open(self) -> None:
        self.client = client(self.target.uri)
        # the trial's first call is not retried: a server gone since the search began costs each
        # later trial one refused connection (or one timeout), not MLflow's retries and backoff
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=FIRST_CALL_TIMEOUT_S):
            run_id = _find_run(self.client, self.target.experiment_id, trial_id=self.trial_id,
                               parent=self.target.parent_run_id)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.target.parent_run_id, "parent": self.target.parent_run_id,
                    "trial_id": self.trial_id, "stage": "trial"}
            run_id = self.client.create_run(self.target.experiment_id, run_name=f"trial {self.trial_id}",
                                            tags=tags).info.run_id
            self.client.log_batch(run_id, params=_params(self.params))
        else:  # restarted after a crash, or resumed: the same run goes on
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _guard(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception:  # the server went away: training goes on, unlogged
            self.run_id = None


# ---------------------------------------------------------------------------------------------
# The driver's side: the parent run, the trials' ends, the refit
# ---------------------------------------------------------------------------------------------

class SearchLog:
    """The driver's MLflow calls. Inactive (every method does nothing) without a tracking URI, or
    once a call failed: that failure is told to `warn` in one line, once."""

    def __init__(self, uri: str | None, warn: Callable[[str], None], *, verbose: bool = False,
                 what: str = "search") -> None:
        self.uri, self.warn, self.verbose, self.what = uri, warn, verbose, what
        self.target: Target | None = None
        self.client: Any = None
        self.made_parent = False  # attach: no search run was found, one was made for the refit

    @property
    def active(self) -> bool:
        return self.target is not None

    def start(self, *, experiment: str, run_dir: str, name: str, params: Mapping[str, Any], resume: bool) -> None:
        """The search's parent run: created, or on --resume the run of the same run folder reopened."""
        if not self.uri:
            return
        if self._connect():
            self._guard(lambda: self._start(experiment, run_dir, name, params, resume))

    def attach(self, *, experiment: str, run_dir: str, name: str) -> None:
        """For a refit of a finished search (`tune-resnet refit --mlflow`): the search's parent run,
        found by its run folder and left as it is, or a new one made for the refit (ended by detach)."""
        if self.uri and self._connect():
            self._guard(lambda: self._attach(experiment, run_dir, name))

    def _attach(self, experiment: str, run_dir: str, name: str) -> None:
        experiment_id, run_id, self.made_parent = self._parent(experiment, run_dir, name, find=True)
        self.target = Target(self.uri, experiment_id, run_id)

    def detach(self) -> None:
        """After attach: a parent run made for the refit is ended."""
        if self.active and self.made_parent:
            self._guard(lambda: self.client.set_terminated(self.target.parent_run_id, status="FINISHED"))

    def _connect(self) -> bool:
        why = problem(self.uri)
        if why:
            self.warn(f"tracking: MLflow at {self.uri} cannot be reached ({why}); the {self.what} goes on without it")
            return False
        if not self.verbose:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # registration's progress lines
        self.client = client(self.uri)
        return True

    def _start(self, experiment: str, run_dir: str, name: str, params: Mapping[str, Any], resume: bool) -> None:
        experiment_id, run_id, made = self._parent(experiment, run_dir, name, find=resume)
        if made:
            self.client.log_batch(run_id, params=_params(params))
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.target = Target(self.uri, experiment_id, run_id)

    def _parent(self, experiment: str, run_dir: str, name: str, *, find: bool) -> tuple[str, str, bool]:
        """(experiment id, the search's run id, whether that run was made now): with find, the run
        of the same run folder when there is one; the experiment is made when missing."""
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = _find_run(self.client, experiment_id, run_dir=run_dir, stage="search") if find else None
        if run_id is not None:
            return experiment_id, run_id, False
        run = self.client.create_run(experiment_id, run_name=name, tags={"run_dir": run_dir, "stage": "search"})
        return experiment_id, run.info.run_id, True

    def trial_ended(self, trial_id: str, outcome: str) -> None:
        """Tag and end a trial's run (created here, FAILED, when the trial never got to open it)."""
        if self.active:
            self._guard(lambda: self._end_trial(trial_id, outcome))

    def _end_trial(self, trial_id: str, outcome: str) -> None:
        target = self.target
        run_id = _find_run(self.client, target.experiment_id, trial_id=trial_id, parent=target.parent_run_id)
        if run_id is None:
            tags = {"mlflow.parentRunId": target.parent_run_id, "parent": target.parent_run_id,
                    "trial_id": trial_id, "stage": "trial"}
            run_id = self.client.create_run(target.experiment_id, run_name=f"trial {trial_id}", tags=tags).info.run_id
        self.client.set_tag(run_id, "outcome", outcome)
        self.client.set_terminated(run_id, status=RUN_STATUS[outcome])

    def refit(self, model_dir: str | Path, metrics: Mapping[str, Any], *, register: str | None,
              say: Callable[[str], None]) -> None:
        """The refit as a run of its own, with its model (best/model.onnx) as an MLflow model."""
        if self.active and metrics:
            self._guard(lambda: say(log_refit(self.client, self.target, Path(model_dir), metrics, register)))

    def finish(self, status: str, summary: Any = None, run_dir: str | None = None) -> None:
        """End the parent run: its summary figures and, from a local run folder, the summary and report."""
        if self.active:
            self._guard(lambda: self._finish(status, summary, run_dir))

    def _finish(self, status: str, summary: Any, run_dir: str | None) -> None:
        run_id = self.target.parent_run_id
        if summary is not None:
            figures = {"trials": summary.trials, **{f"trials_{k}": v for k, v in summary.by_status.items()},
                       f"best_{summary.metric}": summary.best_value, "epochs_spent": summary.epochs_spent,
                       "retries": summary.retries}
            self.client.log_batch(run_id, metrics=_metrics(figures, 0))
        folder = Path(run_dir) if run_dir and "://" not in run_dir else None
        for name in ("summary.json", "search.json", "report.html"):
            if folder and (folder / name).is_file():
                self.client.log_artifact(run_id, str(folder / name))
        if folder and (folder / "report").is_dir():
            self.client.log_artifacts(run_id, str(folder / "report"), "report")
        self.client.set_terminated(run_id, status=status)

    def _guard(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as error:  # the server went away mid-search: say it once, go on without it
            self.warn(f"tracking: MLflow at {self.uri} stopped answering ({first_line(error)}); "
                      f"the {self.what} goes on without it")
            self.target = None


def log_refit(mlflow_client: Any, target: Target, model_dir: Path, metrics: Mapping[str, Any],
              register: str | None) -> str:
    """The refit's run under the search's: config, per-epoch and test metrics, the confusion
    matrix, the model card, and the ONNX model with its signature and labels. Returns a line to say."""
    meta = json.loads((model_dir / "config.json").read_text())
    run_id = mlflow_client.create_run(target.experiment_id, run_name="refit", tags={
        "mlflow.parentRunId": target.parent_run_id, "parent": target.parent_run_id, "stage": "refit",
        "search_trial_id": str(metrics.get("search_trial_id", ""))}).info.run_id
    mlflow_client.log_batch(run_id, params=_params(meta["config"]))
    for row in metrics.get("history", []):
        mlflow_client.log_batch(run_id, metrics=_metrics(row, int(row["epoch"]), EPOCH_METRICS))
    test = metrics.get("test", {})
    mlflow_client.log_batch(run_id, metrics=_metrics({"test_acc": metrics.get("test_acc"), "test_loss":
                                                      metrics.get("test_loss"), "search_val_acc":
                                                      metrics.get("search_val_acc")}, int(metrics.get("epochs", 0))))
    if "confusion_matrix" in test:
        mlflow_client.log_dict(run_id, {"classes": meta["classes"], "rows": "true class", "columns": "predicted",
                                        "matrix": test["confusion_matrix"]}, "confusion_matrix.json")
    for name in ("metrics.json", "config.json", "labels.txt", "README.md"):
        if (model_dir / name).is_file():
            mlflow_client.log_artifact(run_id, str(model_dir / name), "best")
    where = f"runs:/{run_id}/{MODEL_NAME}"
    if not (model_dir / "model.onnx").is_file():
        mlflow_client.set_terminated(run_id)
        return (f"tracking: refit run {run_id} logged without a model: {model_dir} has no model.onnx "
                "(add onnx to export.formats)")
    info = _log_onnx_model(target.uri, run_id, model_dir, meta, register)
    mlflow_client.set_terminated(run_id)
    registered = f", registered as {register} version {info.registered_model_version}" if register else ""
    return f"tracking: refit run {run_id}, model {where}{registered}"


def _log_onnx_model(uri: str, run_id: str, model_dir: Path, meta: dict[str, Any], register: str | None) -> Any:
    """best/model.onnx as MLflow's ONNX flavour: pyfunc predict takes float32 (N, 3, H, W) RGB
    pixel values in [0, 255], decoded as tune-resnet predict decodes, and returns {'logits': (N, classes)};
    the class names are the model's metadata (`classes`) and labels.txt."""
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size, classes = int(meta["config"]["input_size"]), list(meta["classes"])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), "images")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "logits")]))
    metadata = {"classes": classes, "input": meta.get("input"), "source": "tune-resnet"}
    extra = [str(model_dir / n) for n in ("labels.txt", "README.md") if (model_dir / n).is_file()]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.onnx.log_model(onnx.load(str(model_dir / "model.onnx")), name=MODEL_NAME, signature=signature,
                                     metadata=metadata, extra_files=extra or None, registered_model_name=register)
