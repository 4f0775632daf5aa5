"""Checkpoints on disk. Loading never unpickles arbitrary objects.

Two forms, both carrying the config:
- `checkpoint.pt`: the full training state (model, optimizer, scheduler, epoch, history),
  written with torch.save and read with `torch.load(weights_only=True)`.
- `weights.safetensors` + `config.json`: weights only, the exported form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write state to folder/checkpoint.pt atomically (a crash mid-write leaves the old one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)
    return folder / CHECKPOINT_FILE


def save_weights(folder: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """weights.safetensors + config.json (meta: config, classes, mean, std, num_classes...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A dict with at least config, model (state dict), num_classes, classes, mean, std."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / CHECKPOINT_FILE).exists():
            path = path / CHECKPOINT_FILE
        elif (path / WEIGHTS_FILE).exists():
            path = path / WEIGHTS_FILE
        else:
            raise FileNotFoundError(f"{path} holds neither {CHECKPOINT_FILE} nor {WEIGHTS_FILE}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        meta = json.loads((path.parent / CONFIG_FILE).read_text())
        return {**meta, "model": load_file(path)}
    return torch.load(path, map_location="cpu", weights_only=True)
