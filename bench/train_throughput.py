"""Training-loop throughput: the project's Trainer against a minimal hand-written PyTorch loop.

Same model, same images, same batch size, same optimizer, in the same process; epochs of the two
alternate (project, hand-written, hand-written, project, ...) so drift of a shared machine hits
both alike. Only training steps are timed (no validation). The hand-written loop does no augmentation at all: it is the
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
from trainables.train import Trainer, flush_denormals


class HandWrittenLoop:
    """The minimal loop: pre-normalised float images on the device, shuffle, step."""

    def __init__(self, splits, config: TrainConfig, device: torch.device, *, channels_last: bool) -> None:
        self.device, self.batch_size = device, config.batch_size
        self.cuda = device.type == "cuda"
        torch.manual_seed(config.seed)
        self.model = create_model(config.arch, num_classes=len(splits.classes), depth=config.depth,
                                  width=config.width, input_size=config.input_size).to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        mean = torch.tensor(splits.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(splits.std, device=device).view(1, 3, 1, 1)
        images = ((splits.train_images.to(device).float() / 255) - mean) / std
        self.images = images.contiguous(memory_format=memory_format)
        self.labels = splits.train_labels.to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                         weight_decay=config.weight_decay)

    def epoch(self) -> float:
        """Images per second of one epoch of training steps."""
        steps = len(self.labels) // self.batch_size
        order = torch.randperm(len(self.labels), device=self.device)
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                loss = F.cross_entropy(self.model(self.images[index]), self.labels[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        loss.item()  # wait for the last step
        return steps * self.batch_size / (time.perf_counter() - start)


def project_epoch(trainer: Trainer) -> float:
    """One epoch of the project's loop (Trainer.train_epoch: the code every trial runs)."""
    speed = trainer.train_epoch()[2]
    trainer.epoch += 1
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 image folder or .tar.gz")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--images", type=int, default=10_000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs of each loop = rounds x epochs")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's model (the hand-written loop stays eager)")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="the project's loop keeps a weight average of this half-life in epochs, as "
                             "spaces/quick.yaml's trials do (the hand-written loop has none)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the timed epochs")
    parser.add_argument("--hand-contiguous", action="store_true",
                        help="the hand-written loop in NCHW (default: channels_last, NHWC, on any device)")
    parser.add_argument("--formats", action="store_true",
                        help="also time the project's loop with NCHW tensors (channels_last off), in the rotation")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    flush_denormals()  # what every entry point of the project does first; both loops share it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = TrainConfig(dataset=args.dataset, data_path=args.data, arch=args.arch, width=args.width,
                         epochs=args.epochs, batch_size=args.batch_size, lr=0.2, label_smoothing=0.1,
                         weight_decay=5e-4, train_subset=args.images, seed=0, compile=args.compile,
                         ema=args.ema)
    data = load_data(config.dataset, config.data_path, input_size=config.input_size)
    splits = make_splits(data, val_fraction=config.val_fraction, seed=config.seed, train_subset=args.images)
    # 1) accuracy: the project's loop as a run uses it, epochs with validation
    val_acc = None
    if not args.skip_accuracy:
        val_acc = Trainer(config, splits, device=device).fit()[-1].val_acc
        print(f"project loop: val_acc {val_acc:.4f} after {args.epochs} epochs", flush=True)
    # 2) speed: epochs of the loops alternate, in turn forwards and backwards (ABBA), so a shared
    # machine's drift hits them alike
    loops = {"project": Trainer(config.replace(epochs=2 * args.rounds * args.epochs), splits, device=device)}
    if args.ema:  # the same loop without the average, in the same rotation: what the average costs
        loops["project_no_ema"] = Trainer(config.replace(epochs=2 * args.rounds * args.epochs, ema=0.0),
                                          splits, device=device)
    if args.formats:  # the same loop, NCHW: what channels_last is worth on this device
        import trainables.train as train_module

        chosen = train_module.channels_last_is_faster
        train_module.channels_last_is_faster = lambda device: False
        loops["project_nchw"] = Trainer(config.replace(epochs=2 * args.rounds * args.epochs), splits, device=device)
        train_module.channels_last_is_faster = chosen
    hand_loop = HandWrittenLoop(splits, config, device, channels_last=not args.hand_contiguous)
    ema_seconds = [0.0]  # time inside the average's per-step update, within the timed epochs
    if args.ema:
        update = loops["project"].ema.update

        def timed_update(update=update):
            start = time.perf_counter()
            update()
            ema_seconds[0] += time.perf_counter() - start
        loops["project"].ema.update = timed_update
    steps = {name: (lambda t=trainer: project_epoch(t)) for name, trainer in loops.items()}
    steps["hand"] = hand_loop.epoch
    # warm-up: allocator, caches, kernels (and with --compile, the compilation: timed apart)
    warm = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        warm[name] = time.perf_counter() - start
    print("warm-up epoch: " + ", ".join(f"{name} {secs:.1f} s" for name, secs in warm.items()), flush=True)
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    ema_seconds[0], epoch_seconds = 0.0, {}
    for index in range(args.rounds * args.epochs):
        for name in list(steps) if index % 2 == 0 else list(steps)[::-1]:
            start = time.perf_counter()
            speeds[name].append(steps[name]())
            epoch_seconds[name] = epoch_seconds.get(name, 0.0) + time.perf_counter() - start
        print(f"epoch round {index + 1}: " + ", ".join(f"{name} {v[-1]:.0f} img/s" for name, v in speeds.items()),
              flush=True)
    project, hand = speeds["project"], speeds["hand"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "arch": args.arch, "images": len(splits.train_labels),
        "epochs": args.epochs, "batch_size": args.batch_size, "torch": torch.__version__, "compile": args.compile,
        "ema": args.ema, "warmup_epoch_s": {k: round(v, 2) for k, v in warm.items()},
        "project_images_per_sec": statistics.median(project),
        "hand_written_images_per_sec": statistics.median(hand),
        "ratio": statistics.median(project) / statistics.median(hand),
        # the same, epoch by epoch within a round: steadier when the machine's speed drifts
        "ratio_paired": statistics.median(p / h for p, h in zip(project, hand)),
        "val_acc_after_epochs": val_acc,
    }
    if args.formats:
        result["project_nchw_images_per_sec"] = statistics.median(speeds["project_nchw"])
        result["channels_last_ratio_paired"] = statistics.median(p / q for p, q in zip(project, speeds["project_nchw"]))
    result["hand_memory_format"] = "contiguous" if args.hand_contiguous else "channels_last"
    if args.ema:  # the loop with the weight average against the same loop without it
        result["project_no_ema_images_per_sec"] = statistics.median(speeds["project_no_ema"])
        result["ema_ratio"] = result["project_images_per_sec"] / result["project_no_ema_images_per_sec"]
        result["ema_ratio_paired"] = statistics.median(p / q for p, q in zip(project, speeds["project_no_ema"]))
        # what no drift can blur: the share of the project's timed epochs spent updating the average
        # (on a GPU, the host's time to launch the update, not the kernels')
        result["ema_update_share"] = ema_seconds[0] / epoch_seconds["project"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
