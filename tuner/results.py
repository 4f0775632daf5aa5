"""What a search found, typed: a row per trial, a row per trial-epoch, and the SearchSummary;
written once, at the end, as trials.parquet, history.parquet and summary.json; and the lines a
person reads at the end."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.config import TrainConfig

from . import storage
from .errors import RunFileError

HISTORY_COLUMNS = ("training_iteration", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                   "epoch_time_s", "train_images_per_sec", "time_total_s", "timestamp", "reported_at",
                   "between_epochs_s")
STATUSES = ("completed", "early_stopped", "diverged", "errored")


@dataclass(frozen=True)
class TrialRecord:
    """One trial as Ray Tune left it (tuner._ray.records reads them)."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]]   # one dict per reported epoch
    error: str | None
    path: str
    checkpoint_path: str | None     # the latest kept checkpoint
    retries: int = 0                # restarts after its process (or its node) died, from a checkpoint


@dataclass(frozen=True)
class SearchSummary:
    """What a search found: summary.json, and what `search` returns."""

    metric: str
    mode: str
    best_trial_id: str | None           # None: no trial reported a finite result
    best_value: float | None            # the best trial's best epoch, by the objective
    best_val_acc: float | None
    best_epoch: int | None
    best_config: dict[str, Any] | None  # the best trial's sampled params
    trials: int
    by_status: dict[str, int]
    epochs_spent: int
    epochs_without_early_stopping: int
    search_started_at: float | None = None  # unix seconds; bench/trial_overhead.py reads it
    retries: int = 0  # trial restarts after a process or node died (each trial's in trials.parquet)
    # After a confirmation (selection.top_k > 1, tuner/confirm.py): the confirmed pick, its mean over
    # the fresh runs, and the table of runs; None without one (the refit_* properties fall back to best_*).
    selected_trial_id: str | None = None
    selected_config: dict[str, Any] | None = None
    selected_value: float | None = None
    confirmation: dict[str, Any] | None = None

    @property
    def refit_trial_id(self) -> str | None:
        return self.selected_trial_id or self.best_trial_id

    @property
    def refit_config(self) -> dict[str, Any] | None:
        """The configuration the refit trains: the confirmed pick, else the best trial's."""
        return self.selected_config if self.selected_config is not None else self.best_config

    @property
    def refit_val_acc(self) -> float | None:
        """The search's val_acc for the refit's configuration (the model card's): the confirmed mean
        when val_acc is the objective and a confirmation ran, else the best trial's."""
        return self.selected_value if self.confirmation and self.metric == "val_acc" else self.best_val_acc
    # several objectives, constraints or selection.pick (tuner/pareto.py): the non-dominated trials
    # ({index, trial_id, status, values, config}, best first objective first) and the refit's pick
    front: list[dict[str, Any]] | None = None
    pick: dict[str, Any] | None = None

    @property
    def found(self) -> bool:
        return self.best_trial_id is not None

    def to_dict(self) -> dict[str, Any]:
        """summary.json: the fields, the best value also under best_<metric>."""
        values = dataclasses.asdict(self)
        best = values.pop("best_value")
        return {"metric": self.metric, "mode": self.mode, "best_trial_id": self.best_trial_id,
                f"best_{self.metric}": best, **{k: v for k, v in values.items() if k not in ("metric", "mode")}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchSummary:
        """From summary.json; a file without the fields raises RunFileError (storage.read_json's
        required= names them)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"best_value"}
        return cls(best_value=values.get(f"best_{values['metric']}"),
                   **{k: v for k, v in values.items() if k in names})


# what summary.json must hold: every field without a default (best_value is stored as best_<metric>)
SUMMARY_KEYS = tuple(f.name for f in dataclasses.fields(SearchSummary)
                     if f.default is dataclasses.MISSING and f.name != "best_value")


@dataclass(frozen=True)
class SearchResults:
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]
    summary: SearchSummary


def trial_status(*, epochs: int, diverged: bool, errored: bool, max_epochs: int) -> str:
    if errored:
        return "errored"
    if diverged:
        return "diverged"
    return "completed" if epochs >= max_epochs else "early_stopped"


def collect(records: list[TrialRecord], *, metric: str, mode: str, max_epochs: int, num_samples: int,
            started_at: float | None = None, measured: tuple[str, ...] = ()) -> SearchResults:
    """Best = best epoch of any trial, by the objective. measured: the columns each trial measured
    once (params, macs, latency_ms, ...), taken from its last report."""
    pick = max if mode == "max" else min
    trials, history = [], []
    for record in records:
        rows = [r for r in record.history if not r.get("diverged")]
        scored = [r for r in rows if finite(r.get(metric))]
        best_row = pick(scored, key=lambda r: r[metric]) if scored else {}
        last = rows[-1] if rows else {}
        trials.append({
            "trial_id": record.trial_id, "stage": "search",
            "status": trial_status(epochs=len(record.history), errored=bool(record.error), max_epochs=max_epochs,
                                   diverged=bool(record.history and record.history[-1].get("diverged"))),
            "epochs": len(record.history),
            "best_epoch": best_row.get("training_iteration"),
            "best_val_acc": best_row.get("val_acc"), "best_val_loss": best_row.get("val_loss"),
            "last_val_acc": last.get("val_acc"), "last_val_loss": last.get("val_loss"),
            "wall_time_s": (record.history[-1].get("time_total_s") if record.history else None),
            "node_ip": last.get("node_ip"), "node_id": last.get("node_id"), "gpu_ids": last.get("gpu_ids"),
            "cuda_visible_devices": last.get("cuda_visible_devices"),
            "started_at": record.history[0].get("started_at") if record.history else None,
            "pid": last.get("pid"), "setup_s": record.history[0].get("setup_s") if record.history else None,
            "ended_at": _ended_at(record.history[-1]) if record.history else None,
            "error": record.error, "path": record.path, "checkpoint": record.checkpoint_path,
            "retries": record.retries,
            **{name: (record.history[-1].get(name) if record.history else None) for name in measured},
            **{f"config/{k}": v for k, v in record.params.items()},
        })
        history += [{"trial_id": record.trial_id, **{c: r.get(c) for c in HISTORY_COLUMNS}}
                    for r in record.history]
    summary = _summary(trials, metric, mode, max_epochs, num_samples)
    return SearchResults(trials, history, dataclasses.replace(summary, search_started_at=started_at,
                                                              retries=sum(t["retries"] for t in trials)))


def _ended_at(row: dict[str, Any]) -> float | None:
    """The last report's time; Ray's own timestamp is rounded down to the second."""
    return row.get("reported_at") or row.get("timestamp")


def finite(value: Any) -> bool:
    """A real number, neither NaN nor infinite (a bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _summary(trials: list[dict], metric: str, mode: str, max_epochs: int, num_samples: int) -> SearchSummary:
    key = f"best_{metric}"
    scored = [t for t in trials if finite(t.get(key))]
    best = (max if mode == "max" else min)(scored, key=lambda t: t[key]) if scored else {}
    config = params_of(best) if best else None
    return SearchSummary(
        metric=metric, mode=mode, best_trial_id=best.get("trial_id"), best_value=best.get(key),
        best_val_acc=best.get("best_val_acc"), best_epoch=best.get("best_epoch"), best_config=config,
        trials=len(trials), by_status={s: sum(t["status"] == s for t in trials) for s in STATUSES},
        epochs_spent=sum(t["epochs"] for t in trials), epochs_without_early_stopping=num_samples * max_epochs)


def params_of(row: dict[str, Any]) -> dict[str, Any]:
    """A trials.parquet row's sampled params: its config/<name> columns, by name."""
    return {k[len("config/"):]: v for k, v in row.items() if k.startswith("config/")}


def search_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's own trials, without the confirmation runs (stage 'confirm') that follow it."""
    return [t for t in trials if t.get("stage", "search") == "search"]


def write(found: SearchResults, run_dir: str) -> None:
    """trials.parquet, history.parquet and summary.json into run_dir (a folder or a URI): this
    module owns the three files; search calls it once, at the end."""
    storage.write_tables(run_dir, found.trials, found.history)
    storage.write_json(run_dir, storage.SUMMARY_FILE, found.summary.to_dict())


def read_summary(run_dir: str | Path) -> SearchSummary:
    """summary.json of a finished search (a local folder)."""
    return SearchSummary.from_dict(storage.read_json(Path(run_dir) / storage.SUMMARY_FILE, required=SUMMARY_KEYS))


@dataclass(frozen=True)
class SearchRecord:
    """search.json: what refit, export, status and report need later, without the YAML at hand.
    Written by tuner.search before the first trial."""

    space: dict[str, Any]           # the SearchSpec, as JSON
    base_config: TrainConfig
    metric: str
    mode: str
    max_epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "base_config": self.base_config.to_dict(), "metric": self.metric,
                "mode": self.mode, "max_epochs": self.max_epochs}

    @property
    def refit_epochs(self) -> int:
        return self.space["refit"]["epochs"] or self.space["budget"]["max_epochs"]

    @property
    def export_formats(self) -> list[str]:
        return self.space["export"]["formats"]


def read_record(run_dir: str | Path) -> SearchRecord:
    """search.json of a search (a local folder); RunFileError when it is missing, cut off or edited."""
    path = Path(run_dir) / storage.SEARCH_FILE
    values = storage.read_json(path, required=("space", "base_config", "metric", "mode", "max_epochs"))
    try:
        record = SearchRecord(values["space"], TrainConfig.from_dict(values["base_config"]), values["metric"],
                              values["mode"], values["max_epochs"])
        record.refit_epochs, record.export_formats  # noqa: B018  (the keys refit reads are there)
    except (TypeError, ValueError, KeyError) as error:  # an edited file: a config the trainer refuses, a key gone
        raise RunFileError(f"{path}: edited or from another version ({error}); restore it from a copy") from None
    return record
