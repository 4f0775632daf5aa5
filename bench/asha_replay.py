"""Replay ASHA over recorded learning curves: which rungs would have paid off, and is the metric
at a rung any guide to the final one?

Input: the run folder of a search in which no trial was stopped (random sampler, grace period =
max_epochs, as `asha_vs_random.py` runs it), so every trial's whole curve is in history.parquet.
Output, from those curves alone (no training):

1. rung fidelity: Spearman rank correlation, over trials, of val_acc after each epoch with
   val_acc after the last. ASHA keeps the top 1/rf at a rung; when this is near 0 it keeps
   trials at random.
2. replays of Ray Tune's ASHA rule (a trial goes on if its result is at least the
   (1 - 1/rf) quantile of those recorded before it at that rung) with the run's concurrency and
   epoch times, over many random orders of the same trials: epochs spent when a trial first
   reached each target, against the same orders without early stopping. The sampler is random
   in both, so this measures what early stopping alone buys, not TPE.

    python bench/asha_replay.py RUN_DIR --rungs 1,3 2 2,4 --targets 0.5 0.55 --orders 500

`--pool` treats the trials of all the runs given as one set: random searches of the same space
with different seeds are independent draws from it, so replaying random orders of the pooled
trials without stopping estimates what random search costs on average, not in one lucky or
unlucky order (what ASHA + TPE's real runs in `asha_vs_random.py` are compared with).

    python bench/asha_replay.py RANDOM_RUN_0 RANDOM_RUN_1 RANDOM_RUN_2 --pool --targets 0.58 0.6

`--baseline OTHER_RUN` replays ASHA over RUN_DIR's curves and the no-stopping search over
OTHER_RUN's, pairing trials by configuration (both random searches with the same seed): for
instance ASHA on the `cyclic` schedule against random search on `onecycle`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tuner.rungs import rank_correlation


def load_curves(run_dir: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """trial_id -> val_acc per epoch, trial_id -> seconds per epoch; only trials with every epoch."""
    rows = pq.read_table(Path(run_dir) / "history.parquet",
                         columns=["trial_id", "training_iteration", "val_acc", "epoch_time_s"]).to_pylist()
    acc: dict[str, dict[int, float]] = {}
    secs: dict[str, dict[int, float]] = {}
    for r in rows:
        acc.setdefault(r["trial_id"], {})[r["training_iteration"]] = r["val_acc"]
        secs.setdefault(r["trial_id"], {})[r["training_iteration"]] = r["epoch_time_s"] or 1.0
    longest = max(len(v) for v in acc.values())
    full = {t: v for t, v in acc.items() if sorted(v) == list(range(1, longest + 1))}
    return ({t: [v[e] for e in range(1, longest + 1)] for t, v in full.items()},
            {t: [secs[t][e] for e in range(1, longest + 1)] for t in full})


def pooled(run_dirs: list[Path]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The complete curves of several runs as one set, keyed "<index of the run>/<trial_id>"."""
    curves: dict[str, list[float]] = {}
    secs: dict[str, list[float]] = {}
    for i, run_dir in enumerate(run_dirs):
        c, t = load_curves(run_dir)
        curves.update({f"{i}/{k}": v for k, v in c.items()})
        secs.update({f"{i}/{k}": v for k, v in t.items()})
    if len({len(v) for v in curves.values()}) > 1:
        raise SystemExit("--pool: the runs' trials have different numbers of epochs")
    return curves, secs


def config_keys(run_dir: Path) -> dict[str, str]:
    """trial_id -> its sampled configuration as text, to pair the trials of two runs."""
    table = pq.read_table(Path(run_dir) / "trials.parquet")
    names = sorted(n for n in table.column_names if n.startswith("config/"))
    return {row["trial_id"]: json.dumps({n: row[n] for n in names}, sort_keys=True) for row in table.to_pylist()}


def paired(run_dir: Path, baseline_dir: Path):
    """Curves of both runs restricted to the configurations they share, keyed by configuration."""
    out = []
    for folder in (run_dir, baseline_dir):
        curves, secs = load_curves(folder)
        keys = config_keys(folder)
        out.append(({keys[t]: c for t, c in curves.items()}, {keys[t]: s for t, s in secs.items()}))
    shared = sorted(set(out[0][0]) & set(out[1][0]))
    return [({k: c[k] for k in shared}, {k: s[k] for k in shared}) for c, s in out]


def spearman(a: list[float], b: list[float]) -> float:
    """The product's rank correlation (tuner/rungs.py, ties share their mean rank); NaN where undefined."""
    value = rank_correlation(list(a), list(b))
    return math.nan if value is None else value


def rung_fidelity(curves: dict[str, list[float]]) -> list[float]:
    finals = [c[-1] for c in curves.values()]
    epochs = len(next(iter(curves.values())))
    return [spearman([c[e] for c in curves.values()], finals) for e in range(epochs)]


def replay(order: list[str], curves: dict[str, list[float]], secs: dict[str, list[float]], *,
           rungs: list[int], rf: float, workers: int) -> list[tuple[float, float]]:
    """Epochs in the order they finish, as (val_acc, time); `rungs` empty: no early stopping."""
    recorded: dict[int, list[float]] = {m: [] for m in rungs}
    queue = list(reversed(order))
    running: list[tuple[float, int, str, int]] = []  # (time the next epoch ends, tiebreak, trial, epoch)
    finished: list[tuple[float, float]] = []
    tick = 0

    def start(now: float) -> None:
        nonlocal tick
        if queue:
            trial = queue.pop()
            tick += 1
            heapq.heappush(running, (now + secs[trial][0], tick, trial, 1))

    for _ in range(workers):
        start(0.0)
    while running:
        now, _, trial, epoch = heapq.heappop(running)
        value = curves[trial][epoch - 1]
        finished.append((value, now))
        go_on = epoch < len(curves[trial])
        if epoch in recorded:  # Ray's _Bracket.on_result: cutoff over those recorded before
            seen = recorded[epoch]
            if seen and value < float(np.nanpercentile(seen, (1 - 1 / rf) * 100)):
                go_on = False
            seen.append(value)
        if go_on:
            tick += 1
            heapq.heappush(running, (now + secs[trial][epoch], tick, trial, epoch + 1))
        else:
            start(now)
    return finished


def epochs_to(finished: list[tuple[float, float]], target: float) -> int | None:
    for spent, (value, _) in enumerate(finished, start=1):
        if value >= target:
            return spent
    return None


def compare(curves, secs, *, rungs: list[int], rf: float, workers: int, targets: list[float],
            orders: int, seed: int = 0, baseline=None) -> dict:
    """Median over random trial orders of epochs to each target, ASHA against no stopping (over
    `baseline`'s (curves, secs) of the same configurations when given: another schedule, say)."""
    base_curves, base_secs = baseline or (curves, secs)
    rng = random.Random(seed)
    ids = sorted(curves)
    per_target = {t: {"asha": [], "none": [], "ratio": []} for t in targets}  # epochs to t, per order
    spent = []
    for _ in range(orders):
        order = ids[:]
        rng.shuffle(order)
        asha = replay(order, curves, secs, rungs=rungs, rf=rf, workers=workers)
        none = replay(order, base_curves, base_secs, rungs=[], rf=rf, workers=workers)
        spent.append(len(asha) / len(none))
        for t in targets:
            a, b = epochs_to(asha, t), epochs_to(none, t)
            per_target[t]["asha"].append(math.inf if a is None else a)
            per_target[t]["none"].append(math.inf if b is None else b)
            per_target[t]["ratio"].append(math.inf if a is None else a / b if b else math.nan)
    out = {"rungs": rungs, "reduction_factor": rf, "epochs_spent_ratio": statistics.median(spent),
           "targets": {}}
    for t, d in per_target.items():
        reached = sum(math.isfinite(x) for x in d["asha"]) / orders
        none_quartiles = np.percentile(d["none"], [25, 75]).tolist()
        out["targets"][f"{t:g}"] = {"asha_median": statistics.median(d["asha"]),
                                    "none_median": statistics.median(d["none"]),
                                    "none_quartiles": none_quartiles,
                                    "median_ratio": statistics.median(d["ratio"]),
                                    "asha_reached": reached}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of searches that stopped no trial")
    parser.add_argument("--rungs", nargs="+", default=["1,3"], help="rung epochs, comma-separated, per variant")
    parser.add_argument("--reduction-factor", type=float, default=3)
    parser.add_argument("--workers", type=int, default=2, help="trials at once")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--baseline", type=Path, help="no-stopping run of the same configurations (same sampler "
                        "and seed) to compare against, e.g. another schedule; default: the run itself")
    parser.add_argument("--pool", action="store_true", help="treat the trials of all the runs as one set "
                        "(random searches of one space with different seeds): random search's average cost")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.pool and args.baseline:
        parser.error("--pool and --baseline do not go together")
    result = []
    runs = ([("+".join(map(str, args.runs)), *pooled(args.runs))] if args.pool
            else [(run_dir, *load_curves(run_dir)) for run_dir in args.runs])
    for run_dir, curves, secs in runs:
        baseline = None
        if args.baseline:
            (curves, secs), baseline = paired(run_dir, args.baseline)
            print(f"{run_dir} against {args.baseline}: {len(curves)} configurations in both; final val_acc "
                  f"Spearman {spearman([c[-1] for c in curves.values()], [baseline[0][k][-1] for k in curves]):.3f}")
        one = {"run": str(run_dir), "trials": len(curves), "baseline": str(args.baseline or run_dir),
               "fidelity": [round(x, 3) for x in rung_fidelity(curves)],
               "best_final": max(c[-1] for c in curves.values()), "variants": []}
        print(f"{run_dir}: {len(curves)} trials; Spearman(val_acc at epoch e, final) = {one['fidelity']}")
        for spec in args.rungs:
            rungs = [int(x) for x in spec.split(",")]
            res = compare(curves, secs, rungs=rungs, rf=args.reduction_factor, workers=args.workers,
                          targets=args.targets, orders=args.orders, baseline=baseline)
            one["variants"].append(res)
            line = ", ".join(f"{t}: {d['asha_median']} vs {d['none_median']} "
                             f"[{d['none_quartiles'][0]:g}-{d['none_quartiles'][1]:g}] "
                             f"(ratio {d['median_ratio']:.2f}, reached {d['asha_reached']:.0%})"
                             for t, d in res["targets"].items())
            print(f"  rungs {spec} rf {args.reduction_factor:g}: epochs spent "
                  f"{res['epochs_spent_ratio']:.2f}x; to target {line}")
        result.append(one)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
