"""Shared fixtures: tiny, learnable datasets written to disk, and a tiny training config.

Nothing here touches the real CIFAR data or ~/.cache: every test gets its own data cache.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.config import TrainConfig
from trainables.data import ImageData, Splits, load_data, make_splits

# Tiny models gain nothing from more threads, and on a busy machine (a search running beside the
# tests) OpenMP threads spin against each other: one training epoch measured 100x slower with 2.
torch.set_num_threads(1)

# Class name -> the colour channel that is bright in its images, so a model can learn them.
# Label order is the sorted class names (blue=0, green=1, red=2), not this order.
CLASS_CHANNEL = {"red": 0, "green": 1, "blue": 2}
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 6
IMAGE_SIZE = 16  # pixels

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR_TRAIN_PER_BATCH = 4  # images in each of data_batch_1..5
CIFAR_TEST_IMAGES = 6


def colour_image(rng: np.random.Generator, channel: int, *, width: int = IMAGE_SIZE,
                 height: int = IMAGE_SIZE) -> np.ndarray:
    """(height, width, 3) uint8: dark noise with one channel bright."""
    pixels = rng.normal(60.0, 25.0, size=(height, width, 3))
    pixels[..., channel] += 140.0
    return pixels.clip(0, 255).astype(np.uint8)


def write_image_folder(root: Path, *, train_per_class: int = TRAIN_PER_CLASS,
                       test_per_class: int = TEST_PER_CLASS, width: int = IMAGE_SIZE,
                       height: int = IMAGE_SIZE, eval_split: str = "test",
                       classes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """root/train/<class>/*.png and root/<eval_split>/<class>/*.png, written with PIL."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), (eval_split, test_per_class)):
        for name, channel in (classes or CLASS_CHANNEL).items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = colour_image(rng, channel, width=width, height=height)
                Image.fromarray(image).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets a fresh, empty data cache: nothing touches ~/.cache/tune-resnet."""
    cache = tmp_path_factory.mktemp("tune-resnet-cache")
    monkeypatch.setenv("TUNE_RESNET_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes (blue, green, red), 24 train + 6 test 16x16 PNGs each. Do not modify it."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "shapes")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """make_image_folder("name", **options) -> a fresh image folder under tmp_path."""
    def make(name: str = "images", **options) -> Path:
        return write_image_folder(tmp_path / name, **options)
    return make


@pytest.fixture(scope="session")
def image_data(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageData:
    """image_folder decoded once per session, in a cache of its own."""
    return load_data("imagefolder", image_folder, input_size=IMAGE_SIZE,
                     cache_dir=tmp_path_factory.mktemp("session-cache"))


@pytest.fixture(scope="session")
def tiny_splits(image_data: ImageData) -> Splits:
    """66 train / 6 validation images of image_folder."""
    return make_splits(image_data, val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def tiny_config(image_folder: Path) -> TrainConfig:
    """A ResNet-8 of width 4 on image_folder: 4 steps of 16 images per epoch, on CPU in well under 1 s."""
    return TrainConfig(dataset="imagefolder", data_path=str(image_folder), input_size=IMAGE_SIZE,
                       arch="cifar_resnet", depth=8, width=4, batch_size=16, eval_batch_size=64,
                       epochs=2, lr=0.05, schedule="constant", augment="none", seed=0)


# ---------------------------------------------------------------------------------------------
# Fake CIFAR-10 python batches
# ---------------------------------------------------------------------------------------------

def _pickle(path: Path, value: object) -> str:
    """Write value as the CIFAR batches are written; return the file's md5."""
    path.write_bytes(pickle.dumps(value, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cifar_batches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with 32x32 images.

    Returns {"root", "folder", "md5", "train_images", "train_labels", "test_images",
    "test_labels", "classes"}; images are uint8 (N, 3, 32, 32). The md5s are the files' own:
    torchvision checks them against the real CIFAR's, so tests use `cifar10_root`, which swaps them in.
    """
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    md5: dict[str, str] = {}
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    batches = [(f"data_batch_{i}", "train", CIFAR_TRAIN_PER_BATCH) for i in range(1, 6)]
    for name, split, count in batches + [("test_batch", "test", CIFAR_TEST_IMAGES)]:
        data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
        targets = [int(t) for t in rng.integers(0, 10, size=count)]
        md5[name] = _pickle(folder / name, {"batch_label": name, "data": data, "labels": targets})
        images[split].append(data.reshape(count, 3, 32, 32))
        labels[split] += targets
    md5["batches.meta"] = _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES,
                                                             "num_cases_per_batch": CIFAR_TRAIN_PER_BATCH,
                                                             "num_vis": 3072})
    return {"root": root, "folder": folder, "md5": md5, "classes": CIFAR10_CLASSES,
            "train_images": torch.from_numpy(np.concatenate(images["train"])),
            "train_labels": torch.tensor(labels["train"]),
            "test_images": torch.from_numpy(np.concatenate(images["test"])),
            "test_labels": torch.tensor(labels["test"])}


@pytest.fixture
def cifar10_root(cifar_batches: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake batches' root, with torchvision's CIFAR10 expecting their md5s (it still checks them)."""
    from torchvision.datasets import CIFAR10

    md5 = cifar_batches["md5"]
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return cifar_batches["root"]


# ---------------------------------------------------------------------------------------------
# Ray: one embedded instance for the whole session (start-up costs seconds)
# ---------------------------------------------------------------------------------------------

DECLARED_GPUS = 4  # GPUs Ray believes it has: allocation is checked through the ids it hands out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, num_gpus=DECLARED_GPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
