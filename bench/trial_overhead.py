"""Per-trial overhead of a search: time from the driver starting a trial to its first training
step (actor start, imports, data, model build), and between epochs (checkpoint, report).

A trial process that Ray starts fresh pays for the process, `import torch`, the data cache and
(on a GPU) the CUDA context; a reused one (the service sets reuse_actors) pays for the model
alone. Figures come from the search's own tables (trials.parquet: started_at = first training
step, ended_at, setup_s, pid; history.parquet: between_epochs_s, epoch_time_s; summary.json:
search_started_at).

    python bench/trial_overhead.py --data ../shared/datasets/cifar10-jpg.tar.gz --trials 12
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from tuner.search import SearchOptions, run


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def concurrency(trials: list[dict]) -> int:
    events = sorted([(t["started_at"], 1) for t in trials] + [(t["ended_at"], -1) for t in trials])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def overheads(run_dir: Path) -> dict:
    """Each trial's start gap: from the moment its slot was free (the search's start, or the end
    of the trial that held the slot) to its first training step, split by whether its process was
    fresh or reused; and the gap between epochs (checkpoint + report)."""
    started = json.loads((run_dir / "summary.json").read_text())["search_started_at"]
    trials = sorted((t for t in pq.read_table(run_dir / "trials.parquet").to_pylist() if t["started_at"]),
                    key=lambda t: t["started_at"])
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
    slots = [started] * concurrency(trials)  # when each slot was last free
    seen_pids: set = set()
    fresh, reused = [], []
    for trial in trials:
        free = heapq.heappop(slots)
        heapq.heappush(slots, trial["ended_at"])
        gap = max(0.0, trial["started_at"] - free)
        (reused if trial["pid"] in seen_pids else fresh).append((gap, trial["setup_s"]))
        seen_pids.add(trial["pid"])
    between = [r["between_epochs_s"] for r in history if r["between_epochs_s"] is not None]
    epoch = [r["epoch_time_s"] for r in history]
    return {
        "trials": len(trials), "concurrent": concurrency(trials), "processes": len(seen_pids),
        "epochs": len(history),
        "fresh_process": {"trials": len(fresh), "start_gap_s": median([g for g, _ in fresh]),
                          "setup_s": median([s for _, s in fresh])},
        "reused_process": {"trials": len(reused), "start_gap_s": median([g for g, _ in reused]),
                           "setup_s": median([s for _, s in reused])},
        "between_epochs_s": median(between), "epoch_time_s": median(epoch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default="bench/spaces/quick8.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    start = time.perf_counter()
    run(SearchOptions(space=args.space, data=args.data, storage=str(work), name="overhead", refit=False,
                      num_samples=args.trials, max_epochs=args.max_epochs, train_subset=args.train_subset))
    result = {"space": args.space, "wall_s": round(time.perf_counter() - start, 1), **overheads(work / "overhead")}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
