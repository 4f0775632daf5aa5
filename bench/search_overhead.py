"""Wall time of a small search: `tune-resnet search` against a hand-written Ray Tune script.

Both do the same work on one shared Ray instance: 8 trials of the same TPE space (same seed),
ASHA over 2 epochs, the same ResNet on the same few hundred CIFAR-10 images, trained by the same
Trainer, a report and a checkpoint per epoch. The hand-written script is what Ray Tune's docs
show: a function trainable that loads its data and builds its model, `tune.report` with a
checkpoint each epoch, `OptunaSearch` + `ASHAScheduler`, default Tuner settings. What differs is
the service around the training: that is what this measures. Rounds alternate.

    python bench/search_overhead.py --data ../shared/datasets/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import ray
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.train import Trainer

SPACE = {
    "name": "bench-small",
    "data": {"dataset": "cifar10", "val_fraction": 0.01, "train_subset": 400},
    "budget": {"num_samples": 8, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 4},
    "trial": {"cpus": 1, "gpus": 0},
    "params": {"lr": {"loguniform": [0.01, 0.5]}, "batch_size": {"choice": [32, 64]}},
    "fixed": {"arch": "cifar_resnet", "depth": 8, "width": 16},
}


# ---------------------------------------------------------------------------------------------
# The hand-written script
# ---------------------------------------------------------------------------------------------

def hand_written_trainable(params, *, base):
    torch.set_num_threads(1)
    config = TrainConfig.from_dict({**base, **params})
    data = load_data(config.dataset, config.data_path, input_size=config.input_size)
    splits = make_splits(data, val_fraction=config.val_fraction, seed=config.seed, train_subset=config.train_subset)
    trainer = Trainer(config, splits)
    for metrics in trainer.epochs():
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), os.path.join(folder, "checkpoint.pt"))
            tune.report(metrics.to_dict(), checkpoint=tune.Checkpoint.from_directory(folder))


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 0.01, 0.5, log=True)
    trial.suggest_categorical("batch_size", [32, 64])


def run_hand_written(base: dict, storage: str, name: str) -> float:
    start = time.perf_counter()
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=4, multivariate=True, constant_liar=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(hand_written_trainable, base=base), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(space=space, metric="val_acc", mode="max", sampler=sampler),
            scheduler=ASHAScheduler(metric="val_acc", mode="max", max_t=2, grace_period=1, reduction_factor=2),
            num_samples=8),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
    tuner.fit()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------

def run_service(space_file: str, storage: str, name: str) -> float:
    from tuner.search import SearchOptions, run

    start = time.perf_counter()
    run(SearchOptions(space=space_file, storage=storage, name=name, refit=False))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    spec = {**SPACE, "data": {**SPACE["data"], "path": str(Path(args.data).resolve())}}
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(spec))
    base = {**spec["fixed"], "dataset": "cifar10", "data_path": spec["data"]["path"], "epochs": 2,
            "val_fraction": 0.01, "train_subset": 400, "seed": 0}
    load_data("cifar10", base["data_path"])  # both start with the cache built
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    service, hand = [], []
    for round_ in range(args.rounds):
        service.append(run_service(str(space_file), str(work), f"service-{round_}"))
        hand.append(run_hand_written(base, str(work), f"hand-{round_}"))
        print(f"round {round_ + 1}: service {service[-1]:.1f} s, hand-written {hand[-1]:.1f} s", flush=True)
    result = {"service_s": service, "hand_written_s": hand,
              "ratio_of_medians": statistics.median(service) / statistics.median(hand),
              "trials": 8, "max_epochs": 2, "train_images": 400, "cpus": 2}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
