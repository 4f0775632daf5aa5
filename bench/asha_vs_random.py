"""Compute to reach a target validation accuracy: ASHA + TPE against random search without early
stopping, same space, same trial count, same epochs per trial (`spaces/quick.yaml` by default).

Epochs are counted in the order they finished (history.parquet timestamps): the figure is how
many training epochs each search had spent when one of its trials first reached the target.

    python bench/asha_vs_random.py --data ../shared/datasets/cifar10-jpg.tar.gz --target 0.44
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default="spaces/quick.yaml")
    parser.add_argument("--target", type=float, default=0.44)
    parser.add_argument("--json")
    args = parser.parse_args()
    space = yaml.safe_load(Path(args.space).read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    variants = {
        "asha_tpe": space,
        # random search, and a grace period of max_epochs: ASHA never stops a trial
        "random_no_stopping": {**space, "sampler": {**space["sampler"], "type": "random"},
                               "budget": {**space["budget"], "grace_period": space["budget"]["max_epochs"]}},
    }
    result = {"target_val_acc": args.target, "space": args.space}
    for name, spec in variants.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        summary = run(SearchOptions(space=str(path), data=args.data, storage=str(work), name=name, refit=False))
        result[name] = {"epochs_to_target": epochs_to_target(work / name, args.target),
                        "epochs_spent": summary["epochs_spent"], "best_val_acc": summary["best_val_acc"]}
        print(name, result[name], flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
