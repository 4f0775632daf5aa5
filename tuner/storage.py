"""A run folder, local or at a URI (s3://, gs://, file://): the one module that knows its file
names, where the refit model lives (best/), and how its files are written and read back.

    RUN_DIR/search.json        the space, base config and budget      (written by search, first)
    RUN_DIR/trial_*/result.json one JSON line per epoch                (written by Ray Tune; no progress.csv)
    RUN_DIR/status-index.jsonl a line per trial started or ended       (appended by search as trials go;
                                                                        `status` reads it, not every trial)
    RUN_DIR/optuna.journal     the Optuna study, for optuna-dashboard  (written by search as trials go, in a
                                                                        local folder; else by report)
    RUN_DIR/trials.parquet     a row per trial                         (written by search, at the end)
    RUN_DIR/history.parquet    a row per trial-epoch                   (written by search, at the end)
    RUN_DIR/summary.json       the best trial and the epochs spent     (written by search, at the end)
    RUN_DIR/confirm/           the confirmation runs' Ray experiment   (selection.top_k > 1; tuner/confirm.py)
    RUN_DIR/best/              the refit model and its exports         (written by refit, then export)
    RUN_DIR/report.html        the report                              (written by report)

Reading a file of the run that is missing, cut off or edited by hand raises RunFileError naming
it; any other exception here is a bug. pyarrow is imported when a table or a URI is touched, so
`tune-resnet status` stays quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import RunFileError

BEST_DIR = "best"
SEARCH_FILE = "search.json"
SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.parquet"
CONFIRM_DIR = "confirm"  # the confirmation runs' Ray experiment (tuner/confirm.py), inside the run folder
HISTORY_FILE = "history.parquet"
RESULT_FILE = "result.json"    # Ray Tune's, in each trial's folder
STATUS_INDEX = "status-index.jsonl"  # tuner.status's index of the trials (tuner._ray.StatusIndex appends it)
JOURNAL_FILE = "optuna.journal"      # the study for optuna-dashboard (tuner/journal.py; rebuilt by the report)


def is_uri(path: str) -> bool:
    return "://" in path


def storage_root(storage: str) -> str:
    """--storage as the searches will use it: a URI as given, a folder made absolute."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def local_path(storage: str) -> str | None:
    """The local folder behind a plain path or a file:// URI; None for remote storage."""
    if storage.startswith("file://"):
        return storage[len("file://"):]
    return None if is_uri(storage) else storage


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a folder or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    """A file or folder at path (local or URI)."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_file(run_dir: str, name: str, data: bytes) -> None:
    """One file into run_dir (a folder or a URI); a local file is swapped in whole (a reader never
    sees half of it)."""
    fs, root = filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    if not is_uri(run_dir):
        tmp = Path(root, f".{name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, Path(root, name))
        return
    with fs.open_output_stream(f"{root}/{name}") as stream:
        stream.write(data)


def write_json(run_dir: str, name: str, value: Any) -> None:
    write_file(run_dir, name, json.dumps(value, indent=2, default=str).encode())


def append_lines(run_dir: str, name: str, lines: Iterable[str]) -> None:
    """Lines appended to a file of a local run folder, each whole (one write, flushed): a reader
    may see the last one cut off, never one mixed with another. URIs cannot be appended to: skipped."""
    if is_uri(run_dir):
        return
    text = "".join(line + "\n" for line in lines)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # Ray makes the folder: maybe not yet at the search's start
    with open(Path(run_dir, name), "a") as out:
        out.write(text)


def write_tables(run_dir: str, trials: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """trials.parquet and history.parquet into run_dir."""
    import pyarrow.parquet as pq

    fs, root = filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    pq.write_table(_table(trials), f"{root}/{TRIALS_FILE}", filesystem=fs)
    pq.write_table(_table(history), f"{root}/{HISTORY_FILE}", filesystem=fs)


def _table(rows: list[dict[str, Any]]):
    """Every key of every row a column: pyarrow's from_pylist takes the first row's keys only, which
    would drop a conditional param absent from the first trial, or the confirmation runs' columns."""
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])


def upload(local_dir: str, uri: str) -> None:
    """A local folder's files to a URI (s3://, gs://, file://, ...), keeping their relative paths."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)  # a local or mounted destination needs its folder
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local_dir: str) -> str:
    """A folder at a URI into local_dir; returns local_dir."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    pafs.LocalFileSystem().create_dir(local_dir, recursive=True)
    pafs.copy_files(root, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


# ---------------------------------------------------------------------------------------------
# Reading (local run folders: status, report, refit and export run where the files are)
# ---------------------------------------------------------------------------------------------

def read_json(path: str | Path, *, required: Iterable[str] = (), optional: bool = False) -> dict[str, Any] | None:
    """A JSON object file of a run. Missing: None when optional, else RunFileError; cut off, not an
    object, or without a required key: RunFileError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if optional:
            return None
        raise RunFileError(f"{path}: not found; expected the folder of a finished search") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise RunFileError(f"{path}: cut off or edited ({error}); restore it from a copy, or run the "
                           "search again") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(value).__name__}; restore it from a copy")
    missing = [key for key in required if key not in value]
    if missing:
        raise RunFileError(f"{path}: missing {', '.join(missing)}; restore it from a copy, or run the search again")
    return value


def read_table(path: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """A parquet table of a run as rows; a file that is not parquet (cut off) is a RunFileError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except FileNotFoundError:
        raise RunFileError(f"{path}: not found; expected the folder of a finished search") from None
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as error:
        raise RunFileError(f"{path}: cannot be read as a table ({str(error).splitlines()[0]}); it may be cut "
                           "off: restore it from a copy, or run the search again") from None


def parse_result_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """A trial's result.json (one JSON object per reported epoch, appended as it happens) as rows in
    epoch order. A line cut short by a write in progress is skipped; a retried trial's repeated
    epoch keeps its later report. The one parser of result.json: search, status and report."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            by_epoch[int(row.get("training_iteration", len(by_epoch) + 1))] = row
    return [by_epoch[k] for k in sorted(by_epoch)]


def read_result_rows(trial_dir: str, fs=None) -> list[dict[str, Any]]:
    """parse_result_lines of trial_dir/result.json, on a pyarrow filesystem or locally; [] when the
    trial has reported nothing yet."""
    try:
        if fs is None:
            text = Path(trial_dir, RESULT_FILE).read_text()
        else:
            with fs.open_input_stream(f"{trial_dir}/{RESULT_FILE}") as stream:
                text = stream.read().decode()
    except OSError:  # FileNotFoundError included
        return []
    return parse_result_lines(text.splitlines())
