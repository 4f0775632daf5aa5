"""Small models on a big GPU: total training throughput with 1, 2 and 4 trials sharing one GPU.

Each trial is a process of its own training the project's Trainer on the same GPU, as Ray runs
trials that ask for a fraction of one (`trial.gpus: 0.5` or `0.25`; the processes time-share
the GPU, no MPS). Every process loads the data and warms up first, then all start together;
the figure is all the training images of all processes over the wall time until the last one
ends. Validation runs after every epoch, as in a trial.

    python bench/gpu_sharing.py --data ../shared/datasets/cifar10-jpg.tar.gz --arch resnet20 --shares 1 2 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.train import Trainer, flush_denormals


def worker(config: TrainConfig, images: int | None, device: str, barrier, queue) -> None:
    flush_denormals()
    torch.set_num_threads(1)
    data = load_data(config.dataset, config.data_path, input_size=config.input_size)
    splits = make_splits(data, val_fraction=config.val_fraction, seed=config.seed, train_subset=images)
    trainer = Trainer(config.replace(epochs=config.epochs + 1), splits, device=device)
    trainer.train_epoch()  # warm-up: CUDA context, cuDNN autotuning, allocator
    trainer.epoch += 1
    trainer.evaluate(trainer.val_x, trainer.val_y)
    if trainer.cuda:
        torch.cuda.synchronize()
    barrier.wait()
    start = time.time()
    trained = 0
    for _ in range(config.epochs):
        trained += trainer.steps_per_epoch * config.batch_size
        trainer.train_epoch()
        trainer.epoch += 1
        trainer.evaluate(trainer.val_x, trainer.val_y)
    queue.put((start, time.time(), trained))


def measure(config: TrainConfig, images: int | None, device: str, shares: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(shares), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(config, images, device, barrier, queue)) for _ in range(shares)]
    for proc in procs:
        proc.start()
    runs = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    wall = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
    total = sum(n for *_, n in runs)
    return {"trials_per_gpu": shares, "wall_s": round(wall, 2), "images_per_sec": round(total / wall),
            "per_trial_images_per_sec": round(total / wall / shares)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=None, help="training images (default: all 45,000)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per trial")
    parser.add_argument("--shares", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    config = TrainConfig(data_path=args.data, arch=args.arch, width=args.width, batch_size=args.batch_size,
                         epochs=args.epochs, lr=0.2, label_smoothing=0.1)
    load_data(config.dataset, config.data_path)  # build the cache once, before the workers race for it
    rows = []
    for shares in args.shares:
        rows.append(measure(config, args.images, args.device, shares))
        rows[-1]["speedup"] = round(rows[-1]["images_per_sec"] / rows[0]["images_per_sec"], 2)
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "arch": args.arch,
              "width": args.width, "batch_size": args.batch_size, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
