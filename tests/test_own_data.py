"""A user's own photos end to end: mixed sizes and formats, a storage margin, fine-tuned from a
trained checkpoint and from torchvision's ImageNet layout; search, refit, export, predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner
from PIL import Image

from tuner.cli import main

from conftest import colour_image

pytestmark = pytest.mark.slow  # end to end: Ray, several trainings; `pytest -m "not slow"` skips

FORMATS = [("jpg", {"quality": 92}), ("png", {}), ("webp", {"quality": 90}), ("gif", {}), ("tif", {})]


def write_photos(root: Path, *, train: int = 14, test: int = 6) -> Path:
    """Two classes told apart by colour, every image another size (36-90 px, either orientation)
    and format; one CMYK JPEG and one RGBA PNG per class and split."""
    rng = np.random.default_rng(7)
    for split, count in (("train", train), ("test", test)):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(36, 91, size=2))
                image = Image.fromarray(colour_image(rng, channel, width=width, height=height))
                suffix, options = FORMATS[i % len(FORMATS)]
                if i == 0:
                    image, suffix = image.convert("CMYK"), "jpg"
                elif i == 1:
                    image, suffix = image.convert("RGBA"), "png"
                image.save(folder / f"{i:03d}.{suffix}", **options)
    return root


def predict_accuracy(model_dir: Path, test_folder: Path, runtime: str = "torch") -> float:
    result = CliRunner().invoke(main, ["predict", "--model", str(model_dir), str(test_folder), "--format", "json",
                                       "--runtime", runtime], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == sum(1 for _ in test_folder.rglob("*.*"))
    return sum(Path(row["path"]).parent.name == row["predictions"][0]["class"] for row in rows) / len(rows)


def space(folder: Path, photos: Path, *, pretrained: str, fixed: dict, params: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own",
        # input 32 cached at 40: training crops 32 px, validation, the test and predict see the centre
        "data": {"dataset": "imagefolder", "path": str(photos), "val_fraction": 0.25, "input_size": 32,
                 "storage_size": 40},
        "model": {"pretrained": pretrained},
        "budget": {"num_samples": 2, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        "sampler": {"type": "random", "seed": 0},
        "trial": {"cpus": 1, "gpus": 0},
        "params": params,
        "fixed": {"batch_size": 8, "eval_batch_size": 64, "schedule": "constant", "augment": "resized_crop",
                  "crop_scale": 0.5, **fixed},
        "refit": {"epochs": 2},
    }))
    return path


def test_photos_fine_tuned_from_a_trained_checkpoint(ray_session, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos")
    source = CliRunner().invoke(main, ["train", "--dataset", "imagefolder", "--data", str(photos), "--arch",
                                       "cifar_resnet", "--depth", "8", "--width", "4", "--epochs", "2",
                                       "--batch-size", "8", "--input-size", "32", "--out", str(tmp_path / "source")],
                                catch_exceptions=False)
    assert source.exit_code == 0, source.output
    path = space(tmp_path, photos, pretrained=str(tmp_path / "source"), fixed={"lr": 0.02},
                 params={"freeze": {"choice": ["linear", "stages"]}, "frozen_stages": {"value": 1, "when": {"freeze": "stages"}},
                         "unfreeze_epoch": {"value": 1}})
    result = CliRunner().invoke(main, ["search", "--space", str(path), "--storage", str(tmp_path / "runs")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    best = tmp_path / "runs" / "own" / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    config = json.loads((best / "config.json").read_text())["config"]
    assert (config["input_size"], config["storage_size"], config["unfreeze_epoch"]) == (32, 40, 1)
    assert metrics["test"]["images"] == 12
    # predict decodes each file as the cache did and takes the same centre crop: the same answers
    assert predict_accuracy(best, photos / "test") == pytest.approx(metrics["test_acc"])
    assert predict_accuracy(best, photos / "test", runtime="onnx") == pytest.approx(metrics["test_acc"])


def test_photos_fine_tuned_from_torchvision_weights(tmp_path: Path) -> None:
    """ImageNet ResNet-18 weights (random values, torchvision's file and layout) in the hub cache of
    a fresh process: the search, its trials (their own Ray) and the refit start from them."""
    photos = write_photos(tmp_path / "photos", train=8, test=4)
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(torchvision.models.resnet18().state_dict(), home / "hub" / "checkpoints" / name)
    path = space(tmp_path, photos, pretrained="torchvision",
                 fixed={"arch": "resnet18", "freeze": "linear", "unfreeze_epoch": 1, "layer_decay": 0.7},
                 params={"lr": {"loguniform": [1.0e-3, 1.0e-2]}})
    env = {**os.environ, "TORCH_HOME": str(home), "TUNE_RESNET_WEIGHTS_URL": "http://127.0.0.1:9/"}  # no download
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "search", "--space", str(path), "--storage",
                           str(tmp_path / "runs"), "--cpus", "2"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    best = tmp_path / "runs" / "own" / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert json.loads((best / "config.json").read_text())["config"]["arch"] == "resnet18"
    assert predict_accuracy(best, photos / "test") == pytest.approx(metrics["test_acc"])
