"""Does the sampler learn? The configurations TPE draws in a search with ASHA, against random draws
from the same space, scored by what every trial has, stopped or not: its val_acc after the first
rung (epoch 1 by default), which on the quick spaces ranks configurations much as the final
val_acc does (Spearman 0.72 to 0.86: `asha_replay.py`).

Input: random searches that stopped no trial (the `random_no_stopping-<seed>` folders of
`asha_vs_random.py`) and ASHA + TPE searches of the same space (`asha_tpe-<seed>`). Output, per
ASHA + TPE run and block of trials in the order they started: the mean first-rung val_acc, the
share of trials above the 75th and 90th percentile of the random draws', the share ASHA let past
its first rung and the epochs it trained per trial, the final val_acc of the trials it let
finish, and what the sampler settled on in the last block it reached (the commonest choice and
its share, the median of numbers).

    python bench/sampler_quality.py --random RANDOM_RUN_0 RANDOM_RUN_1 --runs ASHA_TPE_RUN_0 \
        ASHA_TPE_RUN_1 --blocks 4 24 48 72
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def trials_in_order(run_dir: Path, rung: int = 1) -> list[dict]:
    """The run's trials in the order they started, each with its val_acc per epoch ("curve")."""
    trials = sorted(pq.read_table(Path(run_dir) / "trials.parquet").to_pylist(), key=lambda t: t["started_at"])
    curves: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for row in pq.read_table(Path(run_dir) / "history.parquet",
                             columns=["trial_id", "training_iteration", "val_acc"]).to_pylist():
        curves[row["trial_id"]][row["training_iteration"]] = row["val_acc"]
    out = []
    for trial in trials:
        curve = curves.get(trial["trial_id"], {})
        if rung in curve:  # a trial that errored before its first rung has nothing to score
            out.append({**trial, "curve": curve, "rung_val_acc": curve[rung]})
    return out


def params_of(trial: dict) -> dict:
    return {k.removeprefix("config/"): v for k, v in trial.items() if k.startswith("config/")}


def settled_on(trials: list[dict]) -> dict:
    """Per parameter: the commonest value and its share (choices) or the median (numbers)."""
    params = [params_of(t) for t in trials]
    out = {}
    for name in sorted(params[0]):
        values = [p[name] for p in params]
        if all(isinstance(v, float) for v in values):
            out[name] = {"median": statistics.median(values)}
        else:
            value, count = collections.Counter(values).most_common(1)[0]
            out[name] = {"commonest": value, "share": count / len(values)}
    return out


def compare(random_trials: list[dict], run_trials: list[dict], blocks: list[int], max_epochs: int,
            rung: int = 1) -> dict:
    """Blocks of the run's trials (ends given, in start order) against the random draws."""
    ref = np.array([t["rung_val_acc"] for t in random_trials])
    p75, p90 = np.percentile(ref, [75, 90])
    finals = [t["curve"][max_epochs] for t in random_trials if max_epochs in t["curve"]]
    result = {"random": {"trials": len(ref), "mean": float(ref.mean()), "p75": float(p75), "p90": float(p90),
                         "final_mean": statistics.fmean(finals) if finals else None,
                         "final_p75": float(np.percentile(finals, 75)) if finals else None},
              "blocks": []}
    start, last = 0, []
    for end in blocks:
        block = run_trials[start:end]
        if not block:
            break
        last = block
        values = np.array([t["rung_val_acc"] for t in block])
        done = [t["curve"][max_epochs] for t in block if max_epochs in t["curve"]]
        result["blocks"].append({"trials": f"{start + 1}-{start + len(block)}", "mean": float(values.mean()),
                                 "above_random_p75": float(np.mean(values > p75)),
                                 "above_random_p90": float(np.mean(values > p90)),
                                 "past_rung": float(np.mean([max(t["curve"]) > rung for t in block])),
                                 "epochs_per_trial": statistics.fmean(max(t["curve"]) for t in block),
                                 "finished": len(done), "final_mean": statistics.fmean(done) if done else None})
        start = end
    if last:
        result["last_block_settled_on"] = settled_on(last)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", nargs="+", type=Path, required=True, help="random searches that stopped no trial")
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="ASHA + TPE searches of the same space")
    parser.add_argument("--rung", type=int, default=1, help="the epoch every trial reaches (ASHA's first rung)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 24, 48, 72],
                        help="ends of the blocks of trials, in start order (the first: TPE's random start-up)")
    parser.add_argument("--json")
    args = parser.parse_args()
    random_trials = [t for run in args.random for t in trials_in_order(run, args.rung)]
    max_epochs = max(max(t["curve"]) for t in random_trials)
    results = []
    for run in args.runs:
        res = compare(random_trials, trials_in_order(run, args.rung), args.blocks, max_epochs, args.rung)
        results.append({"run": str(run), **res})
        ref = res["random"]
        print(f"{run}: val_acc after epoch {args.rung}, random draws ({ref['trials']}): mean {ref['mean']:.3f}, "
              f"p75 {ref['p75']:.3f}, p90 {ref['p90']:.3f}; their finals: mean {ref['final_mean']:.3f}, "
              f"p75 {ref['final_p75']:.3f}")
        for b in res["blocks"]:
            final = f"{b['final_mean']:.3f}" if b["final_mean"] is not None else "-"
            print(f"  trials {b['trials']}: mean {b['mean']:.3f}, above random's p75 {b['above_random_p75']:.0%}, "
                  f"p90 {b['above_random_p90']:.0%}; past the rung {b['past_rung']:.0%}, "
                  f"{b['epochs_per_trial']:.1f} epochs per trial, {b['finished']} finished, final mean {final}")
        print(f"  last block settled on: {json.dumps(res.get('last_block_settled_on'), default=str)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
