"""Compute to reach a target validation accuracy: ASHA + TPE against random search without early
stopping, same space, same epochs per trial (`bench/spaces/quick8.yaml`, the quick demo's former 8-epoch space, by default), over several seeds.
By default both run the same number of trials; `--asha-trials` gives ASHA more, so that both
spend about the same epochs (ASHA's trials are cheaper: it stops most of them early).

Epochs are counted in the order they finished (history.parquet timestamps): the figure is how
many training epochs each search had spent when one of its trials first reached the target. A
search that never reaches it counts as not reaching it (never as its whole budget).

    python bench/asha_vs_random.py --data ../shared/datasets/cifar10-jpg.tar.gz \
        --trials 24 --seeds 0 1 2 --targets 0.46 0.48 0.50
    # the same budget of epochs: 24 full trials against 72 that ASHA mostly stops early
    python bench/asha_vs_random.py --data DATA --trials 24 --asha-trials 72 --seeds 0 1 2 --targets 0.57 0.59
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tuner.search import SearchOptions, run


def epochs_to_target(run_dir: Path, target: float) -> int | None:
    rows = sorted(pq.read_table(run_dir / "history.parquet").to_pylist(),
                  key=lambda r: r.get("reported_at") or r["timestamp"])
    for spent, row in enumerate(rows, start=1):
        if row["val_acc"] is not None and row["val_acc"] >= target:
            return spent
    return None


def variants(space: dict) -> dict[str, dict]:
    return {
        "asha_tpe": space,
        # random search, and a grace period of max_epochs: ASHA never stops a trial
        "random_no_stopping": {**space, "sampler": {**space["sampler"], "type": "random"},
                               "budget": {**space["budget"], "grace_period": space["budget"]["max_epochs"]}},
    }


def summarise(runs: list[dict], targets: list[float]) -> list[dict]:
    """Per target: median epochs to reach it over seeds (a miss counts as infinitely many)."""
    rows = []
    for target in targets:
        key = f"{target:g}"
        row = {"target": target}
        for name in ("asha_tpe", "random_no_stopping"):
            found = [r[name]["epochs_to_target"][key] for r in runs if name in r]
            if found:
                row[name] = found
                row[f"{name}_median"] = statistics.median(math.inf if x is None else x for x in found)
        a, b = row.get("asha_tpe_median", math.inf), row.get("random_no_stopping_median", math.inf)
        row["ratio"] = a / b if math.isfinite(a) and math.isfinite(b) else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default="bench/spaces/quick8.yaml")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default: the space's)")
    parser.add_argument("--asha-trials", type=int, default=None,
                        help="trials for ASHA + TPE (default: --trials): more, for the same epochs in all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.44])
    parser.add_argument("--variants", nargs="+", choices=["asha_tpe", "random_no_stopping"],
                        default=["asha_tpe", "random_no_stopping"], help="searches to run")
    parser.add_argument("--reuse", help="JSON of an earlier run (same seeds and targets) to take the "
                        "variants not run from: random search does not depend on ASHA's settings")
    parser.add_argument("--work", help="folder for the searches' run folders (default: a new temporary one); "
                        "asha_replay.py and sampler_quality.py read them afterwards")
    parser.add_argument("--json")
    args = parser.parse_args()
    earlier = {r["seed"]: r for r in json.loads(Path(args.reuse).read_text())["runs"]} if args.reuse else {}
    space = yaml.safe_load(Path(args.space).read_text())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-asha-"))
    work.mkdir(parents=True, exist_ok=True)
    trials = args.trials or space["budget"]["num_samples"]
    result: dict = {"space": args.space, "trials": trials, "asha_trials": args.asha_trials or trials,
                    "max_epochs": space["budget"]["max_epochs"], "seeds": args.seeds, "runs": []}
    for seed in args.seeds:
        one = {"seed": seed}
        for name, spec in variants(space).items():
            if name not in args.variants:
                if not earlier:  # a variant on its own: no comparison in this run's summary
                    continue
                if seed not in earlier or name not in earlier[seed]:
                    parser.error(f"--reuse has no {name} result for seed {seed}")
                missing = {f"{t:g}" for t in args.targets} - set(earlier[seed][name]["epochs_to_target"])
                if missing:
                    parser.error(f"--reuse has no {name} result for targets {sorted(missing)}")
                one[name] = earlier[seed][name]
                continue
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            summary = run(SearchOptions(space=str(path), data=args.data, storage=str(work), name=f"{name}-{seed}",
                                        num_samples=result["asha_trials"] if name == "asha_tpe" else trials,
                                        seed=seed, refit=False))
            one[name] = {"epochs_to_target": {f"{t:g}": epochs_to_target(work / f"{name}-{seed}", t)
                                              for t in args.targets}, "run_dir": str(work / f"{name}-{seed}"),
                         "epochs_spent": summary.epochs_spent, "best_val_acc": summary.best_val_acc}
            print(f"seed {seed} {name}: {one[name]}", flush=True)
        result["runs"].append(one)
        result["summary"] = summarise(result["runs"], args.targets)
        if args.json:  # after every seed: a long benchmark keeps what it has measured
            Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
