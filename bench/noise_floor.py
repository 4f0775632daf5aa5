"""How much of the spread in a search's final val_acc is the configuration, and how much is luck?

A search ranks configurations by one training run each. If the same configuration trained again
with another seed lands somewhere else, part of every ranking (and every "epochs until a trial
reached target T" figure) is the draw of the seed, and no sampler or early stopper can predict
it. This benchmark retrains configurations taken from finished random searches (no trial
stopped: every final val_acc is there) with fresh training seeds, on one fixed validation split,
and reports:

- per configuration: the val_acc its search saw, and the repeats' values, mean and spread;
- the within-configuration standard deviation (pooled over configurations: the seed's share),
  the between-configuration standard deviation of the means, and the repeatability
  (intraclass correlation: the share of the variance of one run's val_acc that the configuration
  explains; 1 = a run says all about its configuration, 0 = nothing);
- for each target: how often each configuration's repeats reach it, and so how much of reaching
  it is the configuration rather than the seed;
- the binomial standard error of an accuracy on the validation split (the split's own share,
  which is the same for every repeat and so not in the within-configuration figure).

    python bench/noise_floor.py RANDOM_RUN_0 RANDOM_RUN_1 RANDOM_RUN_2 --configs 8 --repeats 3 \\
        --targets 0.58 0.59 0.6 --out noise.json

`--config depth=20,lr=0.16,...` adds a configuration by its values (on the runs' base config), for
instance the best one an earlier search found (`oracle_bound.py` reads the repeats).

Configurations are picked at evenly spaced ranks of the pooled finals, from the best down to the
`--from-top` fraction (the weak ones are told apart by any method: the question is the top). Runs
go `--workers` at a time, one CPU thread each. No Ray: the project's Trainer, as the trials run it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.train import Trainer

_DATA: dict = {}


def finished_trials(run_dirs: list[Path]) -> list[dict]:
    """Every trial of the runs that trained all epochs (the search's trials.parquet): base config,
    sampled params, final val_acc."""
    trials = []
    for run_dir in run_dirs:
        meta = json.loads((run_dir / "search.json").read_text())
        for row in pq.read_table(run_dir / "trials.parquet").to_pylist():
            if row["epochs"] < meta["max_epochs"]:
                continue  # stopped early: its final value is not known
            params = {k.removeprefix("config/"): v for k, v in row.items() if k.startswith("config/") and v is not None}
            trials.append({"run": str(run_dir), "trial": row["trial_id"], "base": meta["base_config"],
                           "params": params, "final": row["last_val_acc"]})
    return trials


def pick(trials: list[dict], k: int, from_top: float, ids: tuple[str, ...] = ()) -> list[dict]:
    """k trials at evenly spaced ranks from the best to the from_top fraction of the ranking, and
    the trials named in ids (for instance the best of an ASHA + TPE search)."""
    ranked = sorted(trials, key=lambda t: -t["final"])
    last = max(0, min(len(ranked) - 1, round(from_top * (len(ranked) - 1))))
    ranks = {round(i * last / max(1, k - 1)) for i in range(k)}
    missing = set(ids) - {t["trial"] for t in ranked}
    if missing:
        raise ValueError(f"--trials: {', '.join(sorted(missing))} not among the finished trials of the runs given")
    ranks |= {r for r, t in enumerate(ranked) if t["trial"] in ids}
    return [{**ranked[r], "rank": r + 1} for r in sorted(ranks)]


def given_config(text: str, base: dict, index: int) -> dict:
    """A configuration named on the command line ("depth=20,lr=0.16"), as a picked trial: its values
    parsed as YAML scalars, checked by TrainConfig; it has no search value and no rank."""
    try:
        params = {key.strip(): yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in text.split(","))}
        TrainConfig.from_dict({**base, **params})  # validated when built
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config {text!r}: expected KEY=VALUE,... of a training config: {error}") from error
    return {"run": "--config", "trial": f"config{index}", "base": base, "params": params,
            "final": math.nan, "rank": 0}


def train_once(job: tuple[dict, int, int]) -> dict:
    """One run: the trial's configuration, training seed `seed`, validation split of `split_seed`."""
    trial, seed, split_seed = job
    torch.set_num_threads(1)
    base = trial["base"]
    key = (base["dataset"], base["data_path"], base["input_size"])
    if key not in _DATA:
        _DATA[key] = load_data(base["dataset"], base["data_path"], input_size=base["input_size"])
    config = TrainConfig.from_dict({**base, **trial["params"]})
    splits = make_splits(_DATA[key], val_fraction=config.val_fraction, seed=split_seed,
                         train_subset=config.train_subset)
    start = time.perf_counter()
    trainer = Trainer(replace(config, seed=seed), splits, device="cpu")
    curve = [m.val_acc for m in trainer.epochs()]
    return {"trial": trial["trial"], "seed": seed, "val_acc": curve, "seconds": time.perf_counter() - start,
            "val_images": len(splits.val_labels)}


def analyse(picked: list[dict], runs: list[dict], targets: list[float]) -> dict:
    by_trial: dict[str, list[dict]] = {}
    for run in runs:
        by_trial.setdefault(run["trial"], []).append(run)
    rows = []
    for trial in picked:
        finals = [r["val_acc"][-1] for r in by_trial[trial["trial"]]]
        rows.append({"rank": trial["rank"], "trial": trial["trial"], "params": trial["params"],
                     "search_final": trial["final"], "repeat_finals": finals,
                     "repeat_mean": statistics.fmean(finals), "repeat_sd": statistics.stdev(finals),
                     "reached": {f"{t:g}": sum(f >= t for f in finals) / len(finals) for t in targets}})
    repeats = min(len(r["repeat_finals"]) for r in rows)
    within_var = statistics.fmean(r["repeat_sd"] ** 2 for r in rows)
    means = [r["repeat_mean"] for r in rows]
    # The variance of means holds within_var / repeats of seed noise: take it out (ANOVA estimate).
    between_var = max(0.0, statistics.variance(means) - within_var / repeats)
    n_val = runs[0]["val_images"]
    p = statistics.fmean(means)
    return {
        "configs": rows,
        "repeats": repeats,
        "within_sd": math.sqrt(within_var),
        "between_sd": math.sqrt(between_var),
        "repeatability": between_var / (between_var + within_var) if between_var + within_var else float("nan"),
        "val_images": n_val,
        "binomial_se": math.sqrt(p * (1 - p) / n_val),
        # the search's best is the luckiest draw: how far its repeats fall back
        "best_search_final": rows[0]["search_final"], "best_repeat_mean": rows[0]["repeat_mean"],
        "seconds_per_run": statistics.median(r["seconds"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of searches with no trial stopped")
    parser.add_argument("--configs", type=int, default=8, help="configurations at evenly spaced ranks (0: only --trials)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh training seeds per configuration")
    parser.add_argument("--trials", nargs="*", default=[], help="also retrain these trial ids")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE,...",
                        help="also retrain these configurations, on the runs' base config (e.g. one an "
                             "earlier search found: depth=20,batch_size=64,lr=0.16,weight_decay=2.6e-5)")
    parser.add_argument("--from-top", type=float, default=0.5, help="pick from the best down to this fraction")
    parser.add_argument("--split-seed", type=int, default=0, help="the one validation split every run uses")
    parser.add_argument("--first-seed", type=int, default=1000, help="training seeds first-seed, first-seed+1, ...")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="*", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats: expected 2 or more (a spread needs two runs)")

    trials = finished_trials(args.runs)
    if len(trials) < 2:
        parser.error(f"{len(trials)} finished trials in the runs given; expected searches with no trial stopped")
    try:
        picked = pick(trials, args.configs, args.from_top, tuple(args.trials))
        picked += [given_config(text, trials[0]["base"], i) for i, text in enumerate(args.config, start=1)]
    except ValueError as error:
        parser.error(str(error))
    jobs = [(t, args.first_seed + i, args.split_seed) for i in range(args.repeats) for t in picked]
    print(f"{len(trials)} finished trials; retraining {len(picked)} configurations x {args.repeats} seeds "
          f"({len(jobs)} runs, {args.workers} at a time)", flush=True)
    runs = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for run in pool.imap_unordered(train_once, jobs):
            runs.append(run)
            print(f"  trial {run['trial']} seed {run['seed']}: val_acc {run['val_acc'][-1]:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    result = analyse(picked, runs, args.targets)
    for row in result["configs"]:
        reached = " ".join(f">={t}: {v:.0%}" for t, v in row["reached"].items())
        print(f"rank {row['rank']:3d} {row['params']}: search {row['search_final']:.4f}, repeats "
              f"{' '.join(f'{f:.4f}' for f in row['repeat_finals'])} (mean {row['repeat_mean']:.4f} "
              f"sd {row['repeat_sd']:.4f}) {reached}")
    print(f"within-configuration sd {result['within_sd']:.4f}, between-configuration sd {result['between_sd']:.4f}, "
          f"repeatability {result['repeatability']:.2f}; binomial se of one val_acc on "
          f"{result['val_images']} images {result['binomial_se']:.4f}")
    print(f"the search's best: {result['best_search_final']:.4f} in the search, {result['best_repeat_mean']:.4f} "
          f"on average over {result['repeats']} new seeds")
    if args.out:
        args.out.write_text(json.dumps({"runs": [str(r) for r in args.runs], "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items() if k != "runs"},
                                        "machine": platform.processor() or platform.machine(),
                                        "torch": torch.__version__, **result, "all_runs": runs}, indent=2))


if __name__ == "__main__":
    main()
