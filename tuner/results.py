"""Results of a search as tables: trials.parquet (a row per trial), history.parquet (a row per
trial-epoch), summary.json; and the summary a person reads at the end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

HISTORY_COLUMNS = ("training_iteration", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                   "epoch_time_s", "train_images_per_sec", "time_total_s", "timestamp", "reported_at",
                   "between_epochs_s")
STATUSES = ("completed", "early_stopped", "diverged", "errored")


@dataclass(frozen=True)
class SearchResults:
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def trial_status(*, epochs: int, diverged: bool, errored: bool, max_epochs: int) -> str:
    if errored:
        return "errored"
    if diverged:
        return "diverged"
    return "completed" if epochs >= max_epochs else "early_stopped"


def collect(records: list, *, metric: str, mode: str, max_epochs: int, num_samples: int) -> SearchResults:
    """records: tuner._ray.TrialRecord items. Best = best epoch of any trial, by the objective."""
    pick = max if mode == "max" else min
    trials, history = [], []
    for record in records:
        rows = [r for r in record.history if not r.get("diverged")]
        scored = [r for r in rows if _finite(r.get(metric))]
        best_row = pick(scored, key=lambda r: r[metric]) if scored else {}
        last = rows[-1] if rows else {}
        trials.append({
            "trial_id": record.trial_id,
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
            **{f"config/{k}": v for k, v in record.params.items()},
        })
        history += [{"trial_id": record.trial_id, **{c: r.get(c) for c in HISTORY_COLUMNS}}
                    for r in record.history]
    return SearchResults(trials, history, _summary(trials, metric, mode, max_epochs, num_samples))


def _ended_at(row: dict[str, Any]) -> float | None:
    """The last report's time; Ray's own timestamp is rounded down to the second."""
    return row.get("reported_at") or row.get("timestamp")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _summary(trials: list[dict], metric: str, mode: str, max_epochs: int, num_samples: int) -> dict:
    key = f"best_{metric}"
    scored = [t for t in trials if _finite(t.get(key))]
    best = (max if mode == "max" else min)(scored, key=lambda t: t[key]) if scored else None
    epochs = sum(t["epochs"] for t in trials)
    return {
        "metric": metric, "mode": mode,
        "best_trial_id": best["trial_id"] if best else None,
        f"best_{metric}": best[key] if best else None,
        "best_val_acc": best["best_val_acc"] if best else None,
        "best_epoch": best["best_epoch"] if best else None,
        "best_config": {k[len("config/"):]: v for k, v in best.items() if k.startswith("config/")} if best else None,
        "trials": len(trials),
        "by_status": {s: sum(t["status"] == s for t in trials) for s in STATUSES},
        "epochs_spent": epochs,
        "epochs_without_early_stopping": num_samples * max_epochs,
    }


def write(results: SearchResults, run_dir: str) -> None:
    """trials.parquet, history.parquet and summary.json into run_dir (a folder or a URI)."""
    fs, root = _filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    pq.write_table(pa.Table.from_pylist(results.trials), f"{root}/trials.parquet", filesystem=fs)
    pq.write_table(pa.Table.from_pylist(results.history), f"{root}/history.parquet", filesystem=fs)
    with fs.open_output_stream(f"{root}/summary.json") as stream:
        stream.write(json.dumps(results.summary, indent=2).encode())


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def write_file(run_dir: str, name: str, data: bytes) -> None:
    """One file into run_dir (a folder or a URI)."""
    fs, root = _filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as stream:
        stream.write(data)


def upload(local_dir: str, uri: str) -> None:
    """A local folder's files to a URI (s3://, gs://, file://, ...), keeping their relative paths."""
    fs, root = _filesystem(uri)
    fs.create_dir(root, recursive=True)  # a local or mounted destination needs its folder
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local_dir: str) -> str:
    """A folder at a URI into local_dir; returns local_dir."""
    fs, root = _filesystem(uri)
    pafs.LocalFileSystem().create_dir(local_dir, recursive=True)
    pafs.copy_files(root, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def format_summary(summary: dict[str, Any]) -> list[str]:
    metric = summary["metric"]
    by_status = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in summary["by_status"].items() if n)
    saved = 1 - summary["epochs_spent"] / max(1, summary["epochs_without_early_stopping"])
    lines = [f"trials: {summary['trials']} ({by_status})",
             f"epochs: {summary['epochs_spent']} spent of {summary['epochs_without_early_stopping']} "
             f"without early stopping ({saved:.0%} saved)"]
    if summary["best_trial_id"] is None:
        return lines + ["best: none (no trial reported a finite result)"]
    lines.append(f"best {metric}: {summary[f'best_{metric}']:.4f} (trial {summary['best_trial_id']}, "
                 f"epoch {summary['best_epoch']})")
    lines += [f"  {k} = {v}" for k, v in summary["best_config"].items()]
    return lines
