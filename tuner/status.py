"""`tune-resnet status RUN_DIR`: one screen on a running or finished search, read from its folder.

Only files are read, never Ray itself, so it works from another shell (or another machine on
shared storage) while the search runs:

- each Ray trial folder's result.json: one JSON line per reported epoch, appended as it happens;
- Ray's experiment_state-*.json: every trial's status (PENDING, RUNNING, TERMINATED, ERROR),
  saved by the driver every few seconds, so it may lag the result.json files a little;
- search.json (the budget) and trials.parquet (the final statuses), once the search has ended.

A search also appends a status index (status-index.jsonl: a line when a trial starts, reports an
epoch (its history row: what the screen shows and what the tables may need) and ends, written by the driver as it happens). Where
it is, only it is read: `status` answers as fast with 1,000 trials ended as with 10 (it read
each trial's result.json and Ray's 23 MB state before), and is current, where the run folder's
result.json files and state are Ray's copies, made every 10 s or more.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .errors import RunFileError, StatusError

STATUSES = ("running", "pending", "completed", "early_stopped", "ended", "diverged", "errored")


@dataclass
class TrialState:
    trial_id: str
    status: str                                   # one of STATUSES; ended: completed or stopped early,
                                                  # which is which unknown without the budget
    rows: list[dict[str, Any]] = field(default_factory=list)  # result.json, one per epoch

    @property
    def epochs(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Budget:
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int | None = None   # None: unknown until search.json is written
    max_epochs: int | None = None


@dataclass(frozen=True)
class SearchStatus:
    folder: Path
    budget: Budget
    trials: list[TrialState]
    finished: bool
    started_at: float | None          # unix seconds
    last_update: float | None         # unix seconds: the newest file of the run
    confirmation: SearchStatus | None = None   # RUN_DIR/confirm's runs (selection.top_k > 1), once started
    summary: dict[str, Any] | None = None      # summary.json, once the search has written it


# ---------------------------------------------------------------------------------------------
# 1) reading the folder
# ---------------------------------------------------------------------------------------------

def read_budget(folder: Path) -> Budget:
    """From search.json, which a search writes before its first trial. Ray's tuner.pkl holds the
    same, but it is a pickle: unpickling a folder's file could run anything, so it is never read."""
    record = _json(folder / storage.SEARCH_FILE)
    if not record:
        return Budget()
    budget = record.get("space", {}).get("budget", {})
    return Budget(record.get("metric", "val_acc"), record.get("mode", "max"),
                  budget.get("num_samples"), record.get("max_epochs") or budget.get("max_epochs"))


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON file of the run, or None while it is missing or being written."""
    try:
        return storage.read_json(path, optional=True)
    except RunFileError:
        return None


def trial_folders(folder: Path) -> dict[Path, list[dict[str, Any]]]:
    """Ray's trial folders (those with a result.json or params.json) -> their result rows."""
    return {path: storage.read_result_rows(str(path)) for path in sorted(folder.iterdir())
            if path.is_dir() and ((path / storage.RESULT_FILE).is_file() or (path / "params.json").is_file())}


def experiment_state(folder: Path) -> tuple[dict[str, dict[str, Any]], float | None]:
    """({trial_id: {status, logdir, last_result}}, search start) from the newest experiment_state-*.json.

    Each trial is a JSON string in it; fields Ray could not write as JSON are cloudpickled
    blobs, which are not needed here and are never unpickled."""
    files = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    state = _json(files[-1]) if files else None
    if not state:
        return {}, None
    trials = {}
    for entry in state.get("trial_data", []):
        try:
            trial = json.loads(entry[0])
            metadata = json.loads(entry[1]) if len(entry) > 1 and isinstance(entry[1], str) else {}
        except (ValueError, TypeError, IndexError):
            continue
        trials[trial.get("trial_id")] = {"status": trial.get("status"), "logdir": trial.get("relative_logdir"),
                                         "last_result": metadata.get("last_result") or {}}
    return trials, (state.get("stats") or {}).get("start_time")


def final_statuses(folder: Path, newest_live: float) -> dict[str, str] | None:
    """trial_id -> status from trials.parquet, when it is newer than every live file, or when
    no trial is live (the search ended; a resumed one running again is read live instead)."""
    path = folder / storage.TRIALS_FILE
    if not path.is_file() or path.stat().st_mtime < newest_live:
        return None
    return {row["trial_id"]: row["status"] for row in storage.read_table(path)
            if row.get("stage", "search") == "search"}  # not the confirmation's runs


# ---------------------------------------------------------------------------------------------
# 2) one status per trial
# ---------------------------------------------------------------------------------------------

def classify(rows: list[dict[str, Any]], ray_status: str | None, max_epochs: int | None,
             error_after_results: bool = False) -> str:
    """One of STATUSES, from what Ray says (if its state file knows the trial) and how many
    epochs the trial reported against max_epochs (None: unknown)."""
    if ray_status == "ERROR" or (ray_status is None and error_after_results):
        return "errored"
    if rows and rows[-1].get("diverged"):
        return "diverged"
    if max_epochs and len(rows) >= max_epochs:
        return "completed"
    if ray_status == "TERMINATED" and not max_epochs:
        return "ended" if rows else "errored"
    if ray_status == "TERMINATED":  # ended before max_epochs: ASHA stopped it (or the time limit)
        return "early_stopped" if rows else "errored"
    if ray_status == "PENDING" and not rows:
        return "pending"
    return "running"


def read_status(run_dir: str | Path) -> SearchStatus:
    folder = Path(run_dir)
    budget = read_budget(folder)
    status = _read_trials(folder, budget)
    confirm = folder / storage.CONFIRM_DIR
    if confirm.is_dir():
        record = _json(folder / storage.SEARCH_FILE) or {}
        selection = record.get("space", {}).get("selection", {})
        runs = selection.get("top_k", 0) * selection.get("repeats", 0) or None  # at most: fewer configs, fewer runs
        try:
            confirming = _read_trials(confirm, Budget(budget.metric, budget.mode, runs, budget.max_epochs), tables=False)
            status = dataclasses.replace(status, confirmation=confirming)
        except StatusError:  # the folder made, no run started yet
            pass
    return dataclasses.replace(status, summary=_json(folder / storage.SUMMARY_FILE))


def _read_trials(folder: Path, budget: Budget, tables: bool = True) -> SearchStatus:
    """The trials of one Ray experiment folder; tables: the folder may hold trials.parquet (the search's).
    From the folder's status index when the search wrote one (the running trials' result.json
    only), else from every trial folder and Ray's experiment state (older runs)."""
    index = read_index(folder)
    if index is not None:
        trials, newest = _indexed_trials(folder, budget, index[0])
        return _status(folder, budget, trials, newest, index[1], tables)
    ray_trials, started_at = experiment_state(folder)
    folders = trial_folders(folder)
    if not folders and not ray_trials and not (folder / storage.TRIALS_FILE).is_file():
        raise StatusError(f"{folder}: no Ray trial folders, experiment_state-*.json or trials.parquet; "
                          "expected the run folder of a search (storage/name)")
    by_logdir = {info["logdir"]: trial_id for trial_id, info in ray_trials.items() if info.get("logdir")}
    trials: dict[str, TrialState] = {}
    for path, rows in folders.items():
        trial_id = by_logdir.get(path.name) or next((r["trial_id"] for r in rows if r.get("trial_id")), path.name)
        ray_status = ray_trials.get(trial_id, {}).get("status")
        error = path / "error.txt"
        late_error = error.is_file() and error.stat().st_mtime >= _mtime(path / "result.json")
        trials[trial_id] = TrialState(trial_id, classify(rows, ray_status, budget.max_epochs, late_error), rows)
    for trial_id, info in ray_trials.items():  # known to Ray, no folder yet
        if trial_id not in trials:
            trials[trial_id] = TrialState(trial_id, classify([], info["status"], budget.max_epochs))
    newest = max([_mtime(p / "result.json") for p in folders] + [_mtime(p) for p in folder.glob("experiment_state-*.json")]
                 + [0.0])
    return _status(folder, budget, trials, newest, started_at, tables)


def _status(folder: Path, budget: Budget, trials: dict[str, TrialState], newest: float, started_at: float | None,
            tables: bool) -> SearchStatus:
    """The trials read live, their final statuses from trials.parquet once the search has ended."""
    live_done = bool(trials) and all(t.status not in ("running", "pending") for t in trials.values())
    final = final_statuses(folder, 0.0 if live_done else newest) if tables else None
    if final is not None:  # ended: its tables are the truth, even for trial folders since deleted
        history = _history_by_trial(folder)
        for trial_id, status in final.items():
            trials.setdefault(trial_id, TrialState(trial_id, status, history.get(trial_id, []))).status = status
    if started_at is None:
        starts = [r["timestamp"] - r.get("time_total_s", 0.0) for t in trials.values() for r in t.rows[:1]
                  if isinstance(r.get("timestamp"), (int, float))]
        started_at = min(starts) if starts else None
    last_update = max(newest, _mtime(folder / storage.TRIALS_FILE)) or None
    finished = final is not None or (not tables and live_done)
    return SearchStatus(folder, budget, list(trials.values()), finished, started_at, last_update)


# ---------------------------------------------------------------------------------------------
# the status index: a line per trial started or ended, appended by the search's driver
# ---------------------------------------------------------------------------------------------

INDEX_FIELDS = ("trial_id", "training_iteration", "epoch", "timestamp", "time_total_s", "epoch_time_s", "diverged",
                "node_id", "val_acc", "val_loss",
                # the rest of a history.parquet row and of the trial's columns: what the tables take from
                # the index for an epoch Ray's copy of result.json lacks, or a trial --resume kept
                "train_loss", "train_acc", "lr", "train_images_per_sec", "reported_at", "between_epochs_s",
                "started_at", "setup_s", "pid", "node_ip")


def index_row(result: dict[str, Any], metrics: str | tuple[str, ...]) -> dict[str, Any]:
    """What the screen reads of one reported epoch (best so far, epochs, epoch time, clock), with
    the search's objectives (what --resume tells the sampler of a trial Ray's state never knew)."""
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    return {key: result.get(key) for key in (*INDEX_FIELDS, *metrics) if result.get(key) is not None}


def index_lines(event: str, trial_id: str, *, at: float, logdir: str | None = None, ray_status: str | None = None,
                row: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> list[str]:
    """The index's line for an event: 'search' (started at `at`), 'start' (of a trial, in its folder
    logdir, with its sampled params), 'epoch' (a report: its index_row), 'end' (Ray's final status)
    or 'kept' (a trial that ended after Ray's last save and that --resume kept: tuner._ray.keep_unsaved)."""
    if event == "search":
        return [json.dumps({"search_started": at})]
    if event == "start":
        plain = {k: v for k, v in (params or {}).items() if v is None or isinstance(v, (str, int, float, bool))}
        return [json.dumps({"trial_id": trial_id, "started": at, "logdir": logdir, "params": plain})]
    if event == "epoch":
        return [json.dumps({"trial_id": trial_id, "row": row})]
    if event == "kept":
        return [json.dumps({"trial_id": trial_id, "kept": at})]
    return [json.dumps({"trial_id": trial_id, "ended": ray_status, "at": at})]


def read_index(folder: Path) -> tuple[dict[str, dict[str, Any]], float | None] | None:
    """({trial_id: {logdir, params, status, rows, kept}}, search start) from the folder's status
    index: Ray's status of each trial (RUNNING until it ended), its sampled params, its reported
    epochs (a repeated epoch, a retry's, by its later report), and whether --resume kept it (it
    ended after Ray's last save: tuner._ray.keep_unsaved). None when there is no index (an older run)."""
    try:
        text = (folder / storage.STATUS_INDEX).read_text()
    except OSError:
        return None
    trials: dict[str, dict[str, Any]] = {}
    started_at = None
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # the last line, caught half-written
            continue
        if "search_started" in event:
            started_at = started_at or event["search_started"]
            continue
        entry = trials.setdefault(event["trial_id"], {"logdir": None, "params": None, "status": "RUNNING",
                                                      "rows": {}, "kept": False})
        if "row" in event:
            entry["rows"][int(event["row"].get("training_iteration", len(entry["rows"]) + 1))] = event["row"]
        elif "started" in event:  # (again, after a retry or a resume: running again)
            entry.update(logdir=event.get("logdir") or entry["logdir"], status="RUNNING",
                         params=event.get("params") or entry["params"])
        elif "kept" in event:
            entry["kept"] = True
        else:
            entry["status"] = event.get("ended")
    for entry in trials.values():
        entry["rows"] = [entry["rows"][epoch] for epoch in sorted(entry["rows"])]
    return trials, started_at


def _indexed_trials(folder: Path, budget: Budget, index: dict[str, dict[str, Any]]) -> tuple[dict[str, TrialState], float]:
    """TrialStates from the index alone; and the newest time a live file of the run changed."""
    trials = {trial_id: TrialState(trial_id, classify(entry["rows"], entry["status"], budget.max_epochs), entry["rows"])
              for trial_id, entry in index.items()}
    live = [folder / storage.STATUS_INDEX, *folder.glob("experiment_state-*.json")]
    return trials, max(_mtime(path) for path in live)


def _history_by_trial(folder: Path) -> dict[str, list[dict[str, Any]]]:
    path = folder / storage.HISTORY_FILE
    if not path.is_file():
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in storage.read_table(path):
        out.setdefault(row["trial_id"], []).append(row)
    return {k: sorted(v, key=lambda r: r.get("training_iteration") or 0) for k, v in out.items()}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
