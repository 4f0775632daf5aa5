"""The run folder, read back: the names of what a search and the report leave in it, the Run
(trials.parquet, history.parquet, summary.json, search.json, best/metrics.json, best/config.json)
and the few helpers every part of the report reads it with."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import ReportError
from ..results import SearchRecord, SearchSummary, finite, read_record, read_summary, search_rows  # noqa: F401  (finite: for the plots)
from ..storage import BEST_DIR

REPORT_FILE = "report.html"
REPORT_DIR = "report"          # the PNGs, referenced from report.html as report/<name>.png
JOURNAL_FILE = storage.JOURNAL_FILE  # written by the search as it runs (tuner/journal.py), else by the report

@dataclass(frozen=True)
class Run:
    folder: Path
    trials: list[dict[str, Any]]      # trials.parquet rows of the search's trials
    history: list[dict[str, Any]]     # history.parquet rows of those trials
    summary: SearchSummary            # summary.json
    record: SearchRecord              # search.json: space, base_config, metric, mode, max_epochs
    metrics: dict[str, Any] | None    # best/metrics.json of the refit, if there was one
    meta: dict[str, Any] | None       # best/config.json: classes, config, mean/std
    confirm_runs: list[dict[str, Any]] = field(default_factory=list)  # trials.parquet's confirmation rows

    @property
    def name(self) -> str:  # the run's name (--name, or the space's): its folder is storage/name
        return self.folder.resolve().name

    @cached_property
    def history_by_trial(self) -> dict[str, list[dict[str, Any]]]:
        """history's rows by trial, built once: a curve per trial scanned every row for each
        trial, which made the report quadratic in the trials (14 s at 1,000)."""
        index: dict[str, list[dict[str, Any]]] = {}
        for row in self.history:
            index.setdefault(row["trial_id"], []).append(row)
        return index

    @property
    def metric(self) -> str:
        return self.record.metric

    @property
    def mode(self) -> str:
        return self.record.mode


def load_run(run_dir: str | Path) -> Run:
    folder = Path(run_dir)
    missing = [n for n in (storage.TRIALS_FILE, storage.HISTORY_FILE, storage.SUMMARY_FILE, storage.SEARCH_FILE)
               if not (folder / n).is_file()]
    if missing:
        raise ReportError(f"{folder}: no {', '.join(missing)}; expected the folder of a finished search "
                          f"(for one still running: tune-resnet status {folder})")
    best = folder / BEST_DIR
    rows = storage.read_table(folder / storage.TRIALS_FILE)
    search = search_rows(rows)  # the plots and the study are the search's; the confirmation has its table
    ids = {t["trial_id"] for t in search}
    history = [h for h in storage.read_table(folder / storage.HISTORY_FILE) if h["trial_id"] in ids]
    return Run(folder, search, history, read_summary(folder), read_record(folder), storage.read_json(best / "metrics.json", optional=True),
               storage.read_json(best / "config.json", optional=True),
               [r for r in rows if r.get("stage") == "confirm"])


def curve(run: Run, trial_id: str, column: str = "val_acc") -> tuple[list[int], list[float]]:
    """(epochs, values) of one trial's column in history.parquet, in epoch order, finite values only."""
    rows = sorted((r for r in run.history_by_trial.get(trial_id, ()) if finite(r.get(column))),
                  key=lambda r: r["training_iteration"])
    return [r["training_iteration"] for r in rows], [r[column] for r in rows]

