"""Does confirming the top configurations pick a better one than the search's argmax, at equal
total epochs? (issue 21; `selection: {top_k, repeats}`, tuner/confirm.py)

For each search seed, on the quick space (spaces/quick.yaml by default):

- plain: a search of --plain-trials trials (ASHA + TPE as the space says); its pick is the best
  trial's configuration (the argmax);
- confirmed: a search of --trials trials, then the top --top-k configurations trained --repeats
  more times with fresh seeds; its pick is the best mean of the fresh runs. --plain-trials is
  chosen so that both spend about the same epochs (both figures are reported).

Each distinct configuration picked (by either, and by two other rules computed from the same
runs: the confirmed search's own argmax before the confirmation, and the mean that counts the
search's run too) is then trained --retrain-seeds times with fresh seeds, each on the validation
split and training subset of its own seed (the split the search scored on would favour whatever
was lucky on it), by bench/noise_floor.py's train_once (the project's Trainer, no Ray). The
figure per rule is the retrained mean val_acc of its pick; the regret is the best retrained mean
of every configuration here minus it.

    python bench/confirm_vs_argmax.py --data ../shared/datasets/cifar10-jpg.tar.gz --seeds 0 1 2 \\
        --work /tmp/confirm-bench --json confirm.json

Searches whose run folder already holds a summary.json are read, not run again (--work kept).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_floor import train_once  # noqa: E402

RULES = ("plain_argmax", "confirmed", "confirmed_counting_search_run", "search_argmax_before_confirming")


def search(space: Path, data: str, work: Path, name: str, seed: int, trials: int) -> Path:
    from tuner.search import SearchOptions, run

    run_dir = work / name
    if not (run_dir / "summary.json").is_file():
        run(SearchOptions(space=str(space), data=data, storage=str(work), name=name, num_samples=trials, seed=seed,
                          refit=False))
    return run_dir


def picks(plain: Path, confirmed: Path) -> dict[str, dict]:
    """rule -> the configuration it picks (params), from the two searches' summaries and tables."""
    plain_summary = json.loads((plain / "summary.json").read_text())
    summary = json.loads((confirmed / "summary.json").read_text())
    table = summary["confirmation"]["configurations"]
    with_search = max(table, key=lambda c: statistics.fmean([c["search_value"]] + [r["value"] for r in c["runs"]
                                                                                   if r["value"] is not None]))
    return {"plain_argmax": plain_summary["best_config"], "confirmed": summary["selected_config"],
            "confirmed_counting_search_run": with_search["params"],
            "search_argmax_before_confirming": summary["best_config"]}


def epochs(run_dir: Path) -> int:
    return sum(r["epochs"] for r in pq.read_table(run_dir / "trials.parquet").to_pylist())


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def retrain(configs: dict[str, dict], base: dict, seeds: list[int], workers: int) -> dict[str, list[float]]:
    """config key -> final val_acc of each fresh seed (the seed draws the split and subset too)."""
    jobs = [({"trial": k, "base": base, "params": p}, s, s) for k, p in configs.items() for s in seeds]
    out: dict[str, list[float]] = {k: [] for k in configs}
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for run in pool.imap_unordered(train_once, jobs):
            out[run["trial"]].append(run["val_acc"][-1])
            print(f"  retrained {run['trial']} seed {run['seed']}: {run['val_acc'][-1]:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default="spaces/quick.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=10, help="trials of the search before the confirmation")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plain-trials", type=int, default=20, help="trials of the plain search (equal epochs)")
    parser.add_argument("--retrain-seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    space = yaml.safe_load(Path(args.space).read_text())
    plain_space, confirmed_space = args.work / "plain.yaml", args.work / "confirmed.yaml"
    plain_space.write_text(yaml.safe_dump({**space, "selection": {"top_k": 1}}))
    confirmed_space.write_text(yaml.safe_dump({**space, "selection": {"top_k": args.top_k, "repeats": args.repeats}}))
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": []}
    for seed in args.seeds:
        plain = search(plain_space, args.data, args.work, f"plain-{seed}", seed, args.plain_trials)
        confirmed = search(confirmed_space, args.data, args.work, f"confirmed-{seed}", seed, args.trials)
        result["seeds"].append({"seed": seed, "picks": picks(plain, confirmed), "epochs": {
            "plain": epochs(plain), "confirmed": epochs(confirmed)}})
        print(f"seed {seed}: {result['seeds'][-1]}", flush=True)
    base = json.loads((args.work / f"plain-{args.seeds[0]}" / "search.json").read_text())["base_config"]
    configs = {key(p): p for one in result["seeds"] for p in one["picks"].values()}
    seeds = list(range(args.first_seed, args.first_seed + args.retrain_seeds))
    print(f"retraining {len(configs)} configurations x {len(seeds)} fresh seeds", flush=True)
    finals = retrain(configs, base, seeds, args.workers)
    result["retrained"] = [{"params": configs[k], "finals": v, "mean": statistics.fmean(v), "sd": statistics.stdev(v)}
                           for k, v in finals.items()]
    best = max(statistics.fmean(v) for v in finals.values())
    within_sd = statistics.fmean(statistics.stdev(v) ** 2 for v in finals.values()) ** 0.5
    for one in result["seeds"]:
        one["retrained_mean"] = {rule: statistics.fmean(finals[key(p)]) for rule, p in one["picks"].items()}
        one["regret"] = {rule: best - m for rule, m in one["retrained_mean"].items()}
    result["best_known_mean"], result["within_sd"] = best, within_sd
    result["mean_by_rule"] = {rule: statistics.fmean(o["retrained_mean"][rule] for o in result["seeds"]) for rule in RULES}
    gains = [o["retrained_mean"]["confirmed"] - o["retrained_mean"]["plain_argmax"] for o in result["seeds"]]
    result["confirmed_minus_plain"] = {"per_seed": gains, "mean": statistics.fmean(gains),
                                       "half_within_sd": within_sd / 2}
    for one in result["seeds"]:
        print(f"seed {one['seed']} (epochs: plain {one['epochs']['plain']}, confirmed {one['epochs']['confirmed']}): "
              + ", ".join(f"{rule} {m:.4f}" for rule, m in one["retrained_mean"].items()))
    print(json.dumps({k: result[k] for k in ("best_known_mean", "within_sd", "mean_by_rule", "confirmed_minus_plain")},
                     indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
