"""How few epochs could any search need to reach a target? An oracle's cost against random search's.

Issue 8 asks ASHA + TPE to reach a target val_acc with at most a third of the epochs random search
without early stopping needs. Any search has to train some configuration far enough, with a
lucky enough seed, to reach the target. The cheapest conceivable sampler is an oracle that knows
the space's best configuration before the search starts and draws nothing else. This benchmark
replays such an oracle over repeated runs of the best configurations known (each repeat a whole
learning curve with a fresh training seed, from `noise_floor.py --out`), counted as
`asha_vs_random.py` counts a search (epochs in the order they finish, `--workers` trials at a
time, until some trial first reached the target), over many orders of the repeats:

- the oracle without early stopping, for each configuration, and the best of them per target
  (picking the best after seeing the repeats flatters the oracle: a bound on the safe side);
- the same oracle under ASHA's rule (Ray Tune's, as `asha_replay.py` replays it): the runs of one
  configuration differ only by their seed, so this shows what stopping saves when the sampler
  is perfect;
- random search without early stopping over the pooled curves of random searches of the space.

Where the oracle needs more than a third of random search's epochs, no sampler and no early
stopper meets the bar at that target.

    python bench/noise_floor.py RANDOM_RUN --configs 1 --from-top 0 --repeats 8 \\
        --config depth=20,batch_size=64,lr=0.16,weight_decay=2.6e-5 --out oracle_runs.json
    python bench/oracle_bound.py --random RANDOM_RUN --repeats oracle_runs.json \\
        --targets 0.57 0.58 0.59 0.6 --orders 2000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np

from asha_replay import epochs_to, pooled, replay  # a sibling: python puts bench/ on the path


def repeat_curves(noise_json: Path) -> dict[str, dict]:
    """trial id -> {"params", "curves": {seed: val_acc per epoch}, "secs": {seed: seconds per epoch}}."""
    data = json.loads(Path(noise_json).read_text())
    configs = {row["trial"]: {"params": row["params"], "curves": {}, "secs": {}} for row in data["configs"]}
    for run in data["all_runs"]:
        curve, key = run["val_acc"], f"{run['trial']}/{run['seed']}"
        configs[run["trial"]]["curves"][key] = curve
        configs[run["trial"]]["secs"][key] = [run["seconds"] / len(curve)] * len(curve)
    return configs


def median_epochs(curves: dict, secs: dict, *, targets: list[float], rungs: list[int], rf: float,
                  workers: int, orders: int, seed: int = 0) -> dict[str, dict]:
    """Per target: the median and quartiles over random orders of the epochs spent until some
    trial first reached it (inf: never in that order), and the share of orders that reach it."""
    rng = random.Random(seed)
    ids = sorted(curves)
    spent: dict[float, list[float]] = {t: [] for t in targets}
    for _ in range(orders):
        rng.shuffle(ids)
        finished = replay(ids, curves, secs, rungs=rungs, rf=rf, workers=workers)
        for t in targets:
            found = epochs_to(finished, t)
            spent[t].append(math.inf if found is None else found)
    return {f"{t:g}": {"median": statistics.median(v), "quartiles": np.percentile(v, [25, 75], method="nearest").tolist(),
                       "reached": sum(math.isfinite(x) for x in v) / orders} for t, v in spent.items()}


def bound(random_curves: tuple[dict, dict], oracles: dict[str, dict], *, targets: list[float],
          rungs: list[int], rf: float, workers: int, orders: int) -> dict:
    """Random search's cost, each oracle's with and without stopping, and per target the best."""
    common = {"targets": targets, "rf": rf, "workers": workers, "orders": orders}
    result = {"random": median_epochs(*random_curves, rungs=[], **common), "oracles": {}, "targets": {}}
    for trial, oracle in oracles.items():
        finals = [c[-1] for c in oracle["curves"].values()]
        result["oracles"][trial] = {
            "params": oracle["params"], "repeats": len(finals), "final_mean": statistics.fmean(finals),
            "finals": finals,
            "no_stopping": median_epochs(oracle["curves"], oracle["secs"], rungs=[], **common),
            "asha": median_epochs(oracle["curves"], oracle["secs"], rungs=rungs, **common)}
    for t in targets:
        key = f"{t:g}"
        best = min(result["oracles"], key=lambda k: result["oracles"][k]["no_stopping"][key]["median"])
        oracle = result["oracles"][best]
        random_median = result["random"][key]["median"]
        best_asha = min(o["asha"][key]["median"] for o in result["oracles"].values())
        result["targets"][key] = {
            "random_median": random_median, "a_third": random_median / 3, "oracle": best,
            "oracle_median": oracle["no_stopping"][key]["median"], "oracle_asha_median": best_asha,
            "oracle_over_random": oracle["no_stopping"][key]["median"] / random_median
            if math.isfinite(random_median) else math.nan}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", nargs="+", type=Path, required=True,
                        help="run folders of random searches that stopped no trial (pooled)")
    parser.add_argument("--repeats", nargs="+", type=Path, required=True,
                        help="noise_floor.py --out files: repeated runs of the best configurations")
    parser.add_argument("--targets", type=float, nargs="+", required=True)
    parser.add_argument("--rungs", default="1,3", help="ASHA's rung epochs for the oracle under stopping")
    parser.add_argument("--reduction-factor", type=float, default=3)
    parser.add_argument("--workers", type=int, default=2, help="trials at once, as in the searches")
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    oracles: dict[str, dict] = {}
    for path in args.repeats:
        oracles.update(repeat_curves(path))
    result = bound(pooled(args.random), oracles, targets=args.targets,
                   rungs=[int(x) for x in args.rungs.split(",")], rf=args.reduction_factor,
                   workers=args.workers, orders=args.orders)
    for trial, oracle in result["oracles"].items():
        print(f"{trial} {oracle['params']}: {oracle['repeats']} runs, final mean {oracle['final_mean']:.4f}; "
              + ", ".join(f"{t}: {d['median']:g} ({d['reached']:.0%})" for t, d in oracle["no_stopping"].items()))
    print("target | random search: median [quartiles] | a third | oracle, no stopping | oracle + ASHA | oracle / random")
    for key, row in result["targets"].items():
        q = result["random"][key]["quartiles"]
        print(f"{key} | {row['random_median']:g} [{q[0]:g}-{q[1]:g}] | {row['a_third']:.1f} | "
              f"{row['oracle_median']:g} ({row['oracle']}) | {row['oracle_asha_median']:g} | "
              f"{row['oracle_over_random']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"random_runs": [str(r) for r in args.random],
                                         "repeats": [str(r) for r in args.repeats], **result}, indent=2))


if __name__ == "__main__":
    main()
