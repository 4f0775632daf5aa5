"""Own data at scale: cache build rate, memory of concurrent trials, a trial's speed from the map.

Three parts, each printed as a JSON line (and gathered into --json):

  build   a generated folder of photos (JPEG, 256-512 px on the shorter side, 10 classes): the
          first cache build (all cores, storage size 256 for input 224) against torchvision's
          ImageFolder + DataLoader(num_workers=cores) decoding the same folder to the same size
          (Resize(256) + CenterCrop(256)), in the same run. The DataLoader runs before and after
          the build, so both meet the files in the page cache; the cache's write-back to disk is
          waited for (os.sync) before the second DataLoader run.
  memory  1, 2 and 4 concurrent trial processes on the whole CIFAR-10 training split, cached at
          32 and at 64 px: each maps the cache, makes its splits (per-channel statistics read
          every training image), trains 20 steps of a ResNet-20 and validates; then their
          proportional set sizes (PSS: shared pages divided among the processes that map them)
          are summed while all of them are alive, in all and for the cache's pages alone. A third
          run caches at 64 px and trains at 32 (random 32-px crops of the 64-px images): the same
          model and activations as at 32 px, so what grows is the data alone.
  speed   a CPU trial's training images/s reading batches from the memory-mapped cache against
          the same trial with the split copied into memory; epochs alternate (ABBA).

    python bench/own_data.py --cifar ../shared/datasets/cifar10-jpg.tar.gz --work /tmp/own --json own.json
    python bench/own_data.py --cifar ... --work /tmp/own --parts memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [f"class_{i}" for i in range(10)]


# ---------------------------------------------------------------------------------------------
# build: generated photos, our cache build against ImageFolder + DataLoader
# ---------------------------------------------------------------------------------------------

def _photo(task: tuple[Path, int]) -> None:
    """A smooth random picture with texture, 256-512 px on its shorter side, either orientation."""
    path, seed = task
    rng = np.random.default_rng(seed)
    short, long = int(rng.integers(256, 513)), int(rng.integers(256, 769))
    width, height = (long, short) if rng.random() < 0.5 else (short, max(short, long))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_photos(folder: Path, count: int) -> Path:
    if (folder / "done").exists():
        return folder
    tasks = []
    for index in range(count):
        split = "test" if (index // len(CLASSES)) % 10 == 0 else "train"  # a tenth of each class to test
        target = folder / split / CLASSES[index % len(CLASSES)]
        target.mkdir(parents=True, exist_ok=True)
        tasks.append((target / f"{index:06d}.jpg", index))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_photo, tasks, chunksize=64))
    (folder / "done").write_text(str(count))
    return folder


def dataloader_rate(folder: Path, size: int) -> float:
    """Images/s of ImageFolder + DataLoader decoding train/ and test/ to size x size uint8."""
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    start, seen = time.perf_counter(), 0
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder / split), transform=transform),
                                             batch_size=64, num_workers=os.cpu_count())
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def part_build(args) -> dict:
    from trainables.data import load_data

    folder = make_photos(args.work / "photos", args.photos)
    count = sum(1 for _ in folder.rglob("*.jpg"))
    before = dataloader_rate(folder, 256)
    with tempfile.TemporaryDirectory(dir=args.work) as cache:
        start = time.perf_counter()
        data = load_data("imagefolder", folder, input_size=224, cache_dir=Path(cache))
        ours = count / (time.perf_counter() - start)
        cache_mb = sum(f.stat().st_size for f in data.cache_path.glob("*.npy")) / 2**20
        os.sync()  # the cache's write-back done before the DataLoader runs again, not competing with it
    after = dataloader_rate(folder, 256)
    return {"part": "build", "images": count, "storage_px": 256, "cores": os.cpu_count(),
            "cache_build_img_s": round(ours, 1), "dataloader_img_s_before": round(before, 1),
            "dataloader_img_s_after": round(after, 1), "ratio": round(ours / statistics.mean([before, after]), 3),
            "cache_mb": round(cache_mb, 1)}


# ---------------------------------------------------------------------------------------------
# memory: concurrent trial processes reading one cache
# ---------------------------------------------------------------------------------------------

TRIAL = """
import sys, torch
from trainables.config import TrainConfig
from trainables.data import load_data, make_splits
from trainables.train import Trainer
storage, size, cache, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
config = TrainConfig(dataset="cifar10", data_path=sys.argv[5], input_size=size, storage_size=storage,
                     arch="resnet20", batch_size=128, epochs=1, seed=0)
data = load_data(config.dataset, config.data_path, input_size=size, storage_size=storage,
                 cache_dir=__import__("pathlib").Path(cache))
splits = make_splits(data, val_fraction=0.1, seed=0)          # statistics read every training image
trainer = Trainer(config, splits, device="cpu")
trainer.steps_per_epoch = steps                                 # a few steps of the real loop
trainer.chunk_steps = min(trainer.chunk_steps, steps)
trainer.train_epoch()
trainer._evaluate(trainer.val_data)                             # the whole validation split
print("ready", flush=True)
sys.stdin.readline()                                            # alive until measured
"""


def pss_mb(pid: int) -> tuple[float, float]:
    """(PSS of the whole process, PSS of its mappings of the cache's .npy files), MB."""
    total = data = 0
    mapping = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not line[0].isupper():  # a mapping's header: address range, perms, offset, dev, inode, path
            mapping = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Pss:":
            total += int(fields[1])
            data += int(fields[1]) if mapping.endswith(".npy") else 0
    return total / 1024, data / 1024


def concurrent_pss(storage: int, size: int, trials: int, cache: Path, cifar: str, steps: int) -> tuple[float, float]:
    procs = [subprocess.Popen([sys.executable, "-c", TRIAL, str(storage), str(size), str(cache), str(steps), cifar],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(trials)]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"trial process failed (exit {proc.wait()})")
        measured = [pss_mb(proc.pid) for proc in procs]
        return sum(m[0] for m in measured), sum(m[1] for m in measured)
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()


def part_memory(args) -> dict:
    """(storage, input) 32/32 and 64/64 are the bar's two runs; 64/32 keeps the model's input (so its
    activations and workspace) at 32 px while the cache is 64 px: the data's own cost, isolated."""
    from trainables.data import load_data

    cache = args.work / "cifar-cache"
    rows, cache_mb = [], {}
    for storage, size in ((32, 32), (64, 64), (64, 32)):
        data = load_data("cifar10", args.cifar, input_size=size, storage_size=storage, cache_dir=cache)  # built before the trials
        cache_mb[storage] = sum(f.stat().st_size for f in data.cache_path.glob("*.npy")) / 2**20
        for trials in (1, 2, 4):
            total, mapped = concurrent_pss(storage, size, trials, cache, args.cifar, args.steps)
            rows.append({"storage": storage, "input": size, "trials": trials, "pss_mb": round(total, 1),
                         "cache_pages_pss_mb": round(mapped, 1),
                         "train_split_mb": round(data.train_images.numel() * 0.9 / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    four = {(row["storage"], row["input"]): row for row in rows if row["trials"] == 4}
    cache_growth = cache_mb[64] - cache_mb[32]
    growth = {f"{a[0]}/{a[1]} over 32/32": round((four[a]["pss_mb"] - four[(32, 32)]["pss_mb"]) / cache_growth, 3)
              for a in ((64, 64), (64, 32))}
    return {"part": "memory", "rows": rows, "cache_mb": {k: round(v, 1) for k, v in cache_mb.items()},
            "cache_growth_mb": round(cache_growth, 1), "pss_growth_4_trials_over_cache_growth": growth}


# ---------------------------------------------------------------------------------------------
# speed: a trial reading the map against the same trial with the data in memory
# ---------------------------------------------------------------------------------------------

def part_speed(args) -> dict:
    import torch

    from trainables.config import TrainConfig
    from trainables.data import Splits, load_data, make_splits
    from trainables.train import Trainer, flush_denormals

    flush_denormals()
    config = TrainConfig(dataset="cifar10", data_path=args.cifar, arch="resnet20", batch_size=128,
                         epochs=100, lr=0.2, train_subset=args.images, seed=0)
    data = load_data(config.dataset, config.data_path, input_size=32, cache_dir=args.work / "cifar-cache")
    mapped = make_splits(data, val_fraction=0.1, seed=0, train_subset=args.images)
    in_memory = Splits(mapped.images.clone(), mapped.labels.clone(), mapped.train_index, mapped.val_index,
                       mapped.classes, mapped.mean, mapped.std)  # the same split, copied out of the map
    loops = {"mapped": Trainer(config, mapped, device="cpu"), "in_memory": Trainer(config, in_memory, device="cpu")}
    speeds: dict[str, list[float]] = {name: [] for name in loops}
    for index in range(1 + 2 * args.rounds):  # the first epoch of each: warm-up, not counted
        for name in (list(loops) if index % 2 == 0 else list(loops)[::-1]):
            speed = loops[name].train_epoch()[2]
            loops[name].epoch += 1
            if index:
                speeds[name].append(speed)
    ratios = [m / c for m, c in zip(speeds["mapped"], speeds["in_memory"])]
    return {"part": "speed", "images": len(mapped.train_index), "threads": torch.get_num_threads(),
            "mapped_img_s": round(statistics.median(speeds["mapped"]), 1),
            "in_memory_img_s": round(statistics.median(speeds["in_memory"]), 1),
            "ratio_paired": round(statistics.median(ratios), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="CIFAR-10 image folder or .tar.gz")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "own-data-bench")
    parser.add_argument("--parts", default="build,memory,speed")
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each memory trial")
    parser.add_argument("--images", type=int, default=4000, help="training images of the speed part")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parts = {"build": part_build, "memory": part_memory, "speed": part_speed}
    results = []
    for name in args.parts.split(","):
        results.append(parts[name](args))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
