"""One frozen dataclass for everything a training run needs.

The config travels inside every checkpoint and every exported model, so it holds plain values
only (str, int, float, bool, None) and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DATASETS = ("cifar10", "cifar100", "imagefolder")
FREEZE_STRATEGIES = ("none", "linear", "stages", "bn")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
AUGMENTS = ("none", "flip", "crop_flip", "resized_crop")
STEMS = ("auto", "cifar", "small", "imagenet")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50")  # torchvision has ImageNet weights for these
CIFAR_DEPTHS = (20, 32, 44, 56, 110)                    # He et al. 2016's CIFAR ResNets, by name
ARCHS = ("cifar_resnet", *(f"resnet{d}" for d in CIFAR_DEPTHS), *IMAGENET_ARCHS)  # trainables.models builds each


@dataclass(frozen=True)
class TrainConfig:
    """Validated when built (check_config): a TrainConfig that exists is one the trainer accepts,
    so no caller checks it again. Dicts exist only at the disk edge (from_dict, to_dict)."""

    # --- data -------------------------------------------------------------------------------
    dataset: str = "cifar10"        # cifar10 | cifar100 | imagefolder
    data_path: str | None = None    # folder or archive; None = the dataset's cache/download dir
    input_size: int = 32            # pixels: the side of what the model sees
    storage_size: int | None = None  # pixels: the side images are cached at (shorter side resized,
    #                                 centre-cropped); training crops input_size from it, evaluation
    #                                 takes its centre. None = resolve_storage_size(input_size)
    val_fraction: float = 0.1       # stratified hold-out of the training split
    train_subset: int | None = None  # train on a stratified subset of this many images
    # --- model ------------------------------------------------------------------------------
    arch: str = "resnet20"          # a name from trainables.models.list_models()
    depth: int | None = None        # cifar_resnet only: 6n+2
    width: int | None = None        # base width; None = 16 (CIFAR ResNets) or 64 (ResNet-18/34/50)
    stem: str = "auto"              # auto | cifar | small | imagenet
    dropout: float = 0.0            # before the classifier
    pretrained: str | None = None   # None | "torchvision" | path to a checkpoint of this project
    freeze: str = "none"            # none | linear | stages | bn
    frozen_stages: int = 0          # with freeze=stages: stem + this many stages are frozen
    unfreeze_epoch: int = 0         # epochs trained with the freeze; then everything trains (0 = never)
    layer_decay: float = 1.0        # lr multiplier per stage going down from the head (1 = off)
    # --- optimisation -----------------------------------------------------------------------
    optimizer: str = "sgd"          # sgd | adamw
    lr: float = 0.1                 # peak learning rate
    momentum: float = 0.9           # sgd momentum; adamw beta1
    nesterov: bool = True
    weight_decay: float = 5e-4      # never applied to BatchNorm parameters or biases
    batch_size: int = 128
    epochs: int = 10
    schedule: str = "onecycle"      # cosine | onecycle | step | constant
    warmup_epochs: float = 0.0      # linear warm-up (cosine/step/constant); onecycle has its own
    label_smoothing: float = 0.0
    augment: str = "crop_flip"      # none | flip | crop_flip | resized_crop
    crop_padding: int = 4           # pixels of reflect padding for the random crop (crop_flip)
    crop_scale: float = 0.08        # resized_crop: smallest share of the image's area a crop covers
    crop_ratio: float = 4 / 3       # resized_crop: aspect ratios from 1/crop_ratio to crop_ratio
    cutout: int = 0                 # side of a random zeroed square, pixels (0 = off)
    ema: float = 0.0                # half-life, in epochs, of an exponential moving average of the
    #                                 weights; validation, test and exports use the average (0 = off)
    # --- run --------------------------------------------------------------------------------
    seed: int = 0
    eval_batch_size: int = 1024
    compile: bool = False           # torch.compile the model (pays off only for long runs)
    device_data_share: float = 0.25  # largest share of GPU memory the uint8 training data may take
    #                                  on the GPU; more data streams in batches from host memory

    def __post_init__(self) -> None:
        check_config(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently do nothing)."""
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; expected some of {field_names()}")
        return cls(**values)

    @property
    def image_storage_size(self) -> int:
        return resolve_storage_size(self.input_size, self.storage_size)


def image_sizes(config: dict[str, Any]) -> tuple[int, int]:
    """(storage size, input size) of a saved model's config dict; configs written before the
    storage size existed were cached at the input size."""
    return config.get("storage_size") or config["input_size"], config["input_size"]


SMALL_IMAGES = 64  # pixels: at most this, images are thumbnails (CIFAR-like) and kept whole


def resolve_storage_size(input_size: int, storage_size: int | None = None) -> int:
    """The side images are cached at. Small inputs are stored whole (the object fills a 32-px CIFAR
    image: cropping its border would cut it, so CIFAR stays as it was); ImageNet-sized inputs keep
    the customary margin of 8/7 (256 for 224) that random crops and the evaluation centre crop take
    from, as torchvision's ImageNet recipes resize to 256 and crop 224."""
    if storage_size is not None:
        return storage_size
    return input_size if input_size <= SMALL_IMAGES else round(input_size * 8 / 7)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def check_config(config: TrainConfig) -> None:
    """Validate values that types alone do not catch; raise ValueError naming the key. Every
    TrainConfig runs it when built."""
    _check_types(config)
    if config.arch not in ARCHS:
        raise ValueError(f"arch: unknown model {config.arch!r}; expected one of {', '.join(sorted(ARCHS))}")
    choices = {"freeze": FREEZE_STRATEGIES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
               "augment": AUGMENTS, "stem": STEMS}
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            raise ValueError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    _check_sizes(config)
    _check_ranges(config)


def _check_sizes(config: TrainConfig) -> None:
    if config.width is not None and config.width < 1:
        raise ValueError(f"width: expected a positive number of channels, got {config.width!r}")
    if config.input_size < 8:
        raise ValueError(f"input_size: expected at least 8 pixels, got {config.input_size!r}")
    if config.storage_size is not None and config.storage_size < config.input_size:
        raise ValueError(f"storage_size: expected at least input_size ({config.input_size}) pixels, "
                         f"got {config.storage_size!r}")
    if not 0.0 < config.crop_scale <= 1.0:
        raise ValueError(f"crop_scale: expected 0 < crop_scale <= 1 (a share of the image's area), got {config.crop_scale!r}")
    if not config.crop_ratio >= 1.0:
        raise ValueError(f"crop_ratio: expected a ratio >= 1 (crops from 1/ratio to ratio), got {config.crop_ratio!r}")
    if not 0.0 < config.device_data_share <= 1.0:
        raise ValueError(f"device_data_share: expected 0 < share <= 1 of GPU memory, got {config.device_data_share!r}")


def _check_ranges(config: TrainConfig) -> None:
    positive = ("lr", "batch_size", "epochs", "input_size", "eval_batch_size")
    for key in positive:
        if not getattr(config, key) > 0:
            raise ValueError(f"{key}: expected a positive number, got {getattr(config, key)!r}")
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number between 0 and 1, got {config.val_fraction!r}")
    if config.train_subset is not None and config.train_subset < 1:
        raise ValueError(f"train_subset: expected a positive integer, got {config.train_subset!r}")
    if not config.ema >= 0.0:
        raise ValueError(f"ema: expected a half-life in epochs >= 0 (0 = off), got {config.ema!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout: expected 0 <= dropout < 1, got {config.dropout!r}")
    if not 0.0 < config.layer_decay <= 1.0:
        raise ValueError(f"layer_decay: expected 0 < layer_decay <= 1, got {config.layer_decay!r}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 1, got {config.label_smoothing!r}")
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"momentum: expected 0 <= momentum < 1, got {config.momentum!r}")
    not_negative = ("weight_decay", "warmup_epochs", "crop_padding", "cutout", "frozen_stages", "unfreeze_epoch")
    for key in not_negative:
        if not getattr(config, key) >= 0:
            raise ValueError(f"{key}: expected a number >= 0, got {getattr(config, key)!r}")


_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_types(config: TrainConfig) -> None:
    """Each value of the type its field declares (an int where a float is asked is fine; a bool
    is not a number here), and numbers finite: a YAML typo fails here, naming the key."""
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        kinds = [k.strip() for k in str(field.type).split("|")]
        if value is None and "None" in kinds:
            continue
        named = [k for k in kinds if k != "None"]
        allowed = tuple(t for k in named for t in _TYPES[k])
        if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in named):
            raise ValueError(f"{field.name}: expected {' or '.join(named)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name}: expected a finite number, got {value!r}")
