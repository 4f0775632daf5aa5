"""Training-loop throughput: the project's Trainer against a minimal hand-written PyTorch loop.

Same model, same images, same batch size, same optimizer, in the same process; rounds alternate
(project, hand-written, project, ...) so drift of a shared machine hits both alike. Only training
steps are timed (no validation). The hand-written loop does no augmentation at all: it is the
strictest reference, the least work a training step can be.

    python bench/train_throughput.py --data ../shared/datasets/cifar10-jpg.tar.gz
    python bench/train_throughput.py --data ... --device cuda --arch resnet18 --images 50000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.models import create_model
from trainables.train import Trainer


def hand_written_epochs(splits, config: TrainConfig, device: torch.device, epochs: int) -> list[float]:
    """The minimal loop: pre-normalised float images on the device, shuffle, step. Images/s per epoch."""
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    model = create_model(config.arch, num_classes=len(splits.classes), depth=config.depth, width=config.width,
                         input_size=config.input_size).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mean = torch.tensor(splits.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(splits.std, device=device).view(1, 3, 1, 1)
    images = ((splits.train_images.to(device).float() / 255) - mean) / std
    labels = splits.train_labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    steps = len(labels) // config.batch_size
    speeds = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # wait for the last step
        speeds.append(steps * config.batch_size / (time.perf_counter() - start))
    return speeds


def project_epochs(splits, config: TrainConfig, device: torch.device) -> tuple[list[float], float]:
    trainer = Trainer(config, splits, device=device)
    history = trainer.fit()
    return [m.train_images_per_sec for m in history], history[-1].val_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 image folder or .tar.gz")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--images", type=int, default=10_000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each loop")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = TrainConfig(dataset=args.dataset, data_path=args.data, arch=args.arch, width=args.width,
                         epochs=args.epochs, batch_size=args.batch_size, lr=0.2, label_smoothing=0.1,
                         weight_decay=5e-4, train_subset=args.images, seed=0)
    data = load_data(config.dataset, config.data_path, input_size=config.input_size)
    splits = make_splits(data, val_fraction=config.val_fraction, seed=config.seed, train_subset=args.images)
    project, hand, val_accs = [], [], []
    for round_ in range(args.rounds):
        speeds, val_acc = project_epochs(splits, config, device)
        project += speeds[1:] if len(speeds) > 1 else speeds  # the first epoch pays one-time warm-up
        val_accs.append(val_acc)
        speeds = hand_written_epochs(splits, config, device, args.epochs)
        hand += speeds[1:] if len(speeds) > 1 else speeds
        print(f"round {round_ + 1}: project {statistics.median(project):.0f} img/s, "
              f"hand-written {statistics.median(hand):.0f} img/s, val_acc {val_acc:.4f}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "arch": args.arch, "images": len(splits.train_labels),
        "epochs": args.epochs, "batch_size": args.batch_size, "torch": torch.__version__,
        "project_images_per_sec": statistics.median(project),
        "hand_written_images_per_sec": statistics.median(hand),
        "ratio": statistics.median(project) / statistics.median(hand),
        "val_acc_after_epochs": val_accs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
