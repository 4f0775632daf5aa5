"""Fine-tuning: pretrained starting points, freeze strategies, optimizer parameter groups."""

from __future__ import annotations

import functools
import http.client
import logging
import os
from pathlib import Path
from urllib.error import HTTPError

import torch
from filelock import FileLock
from torch import nn

from .checkpoint import CHECKPOINT_FILE, CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from .config import TrainConfig
from .models import IMAGENET_ARCHS, ResNet, create_model, resolve_stem

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """The pretrained starting point cannot be used; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Building a model, from scratch or from a pretrained starting point
# ---------------------------------------------------------------------------------------------

def build_model(config: TrainConfig, num_classes: int) -> ResNet:
    if config.pretrained is None:
        return _create(config, num_classes)
    if config.pretrained == "torchvision" or config.pretrained.startswith("torchvision:"):
        return _from_torchvision(config, num_classes)
    return _from_checkpoint(config, num_classes)


def _create(config: TrainConfig, num_classes: int) -> ResNet:
    return create_model(config.arch, num_classes=num_classes, depth=config.depth, width=config.width,
                        stem=config.stem, input_size=config.input_size, dropout=config.dropout)


def model_config_of(config: TrainConfig) -> TrainConfig:
    """The config that describes the model actually built: a checkpoint's architecture wins over
    the config's, a torchvision start is its ImageNet ResNet, and the stem is never left 'auto'."""
    if config.pretrained is None:
        resolved = config
    elif config.pretrained.startswith("torchvision"):
        resolved = config.replace(arch=_torchvision_arch(config), width=None)
    else:
        saved = TrainConfig.from_dict(_saved_config(config.pretrained, _stamp(config.pretrained)))
        resolved = config.replace(arch=saved.arch, depth=saved.depth, width=saved.width,
                                  stem=resolve_stem(saved.arch, saved.stem, saved.input_size))
    return resolved.replace(stem=resolve_stem(resolved.arch, resolved.stem, resolved.input_size))


def _stamp(path: str) -> tuple:
    """What changes when the files a checkpoint is read from do: the pre-trial check's cache key."""
    found = Path(path).expanduser()
    files = [found / name for name in (CHECKPOINT_FILE, WEIGHTS_FILE, CONFIG_FILE)] if found.is_dir() else [found]
    return tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)


@functools.lru_cache(maxsize=8)
def _saved_config(path: str, stamp: tuple) -> dict:
    """A pretrained run's config, read once per file version: the pre-trial check asks for it for
    every edge of every param, and a ResNet-18 checkpoint is tens of MB."""
    return _load_pretrained(path)["config"]


PRETRAINED_EXPECTED = "expected a run folder with checkpoint.pt or weights.safetensors + config.json written by tune-resnet"


def _load_pretrained(path: str) -> dict:
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError as error:
        raise PretrainedError(f"pretrained: {error}; {PRETRAINED_EXPECTED}") from None
    except Exception as error:  # truncated, not a torch file, not ours: torch.load raises many kinds
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedError(f"pretrained: {path}: cannot be read ({first}); {PRETRAINED_EXPECTED}") from None
    missing = [key for key in ("config", "model", "num_classes") if key not in checkpoint]
    if missing:
        raise PretrainedError(f"pretrained: {path}: no {', '.join(missing)} in it; {PRETRAINED_EXPECTED}")
    return checkpoint


def _from_checkpoint(config: TrainConfig, num_classes: int) -> ResNet:
    checkpoint = _load_pretrained(config.pretrained)
    saved = TrainConfig.from_dict(checkpoint["config"])
    model = create_model(saved.arch, num_classes=checkpoint["num_classes"], depth=saved.depth,
                         width=saved.width, stem=saved.stem, input_size=saved.input_size,
                         dropout=config.dropout)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # weights that do not fit the architecture their config names
        raise PretrainedError(f"pretrained: {config.pretrained}: its weights do not fit its own config "
                              f"({saved.arch}): {str(error).splitlines()[0]}; re-export the model") from None
    if checkpoint["num_classes"] != num_classes:
        log.info("pretrained head has %d classes, data has %d: new head", checkpoint["num_classes"], num_classes)
        model.replace_head(num_classes)
    return model


def _torchvision_arch(config: TrainConfig) -> str:
    arch = config.pretrained.split(":", 1)[1] if ":" in config.pretrained else config.arch
    if arch not in IMAGENET_ARCHS:
        raise PretrainedError(f"pretrained: torchvision has ImageNet weights for {', '.join(IMAGENET_ARCHS)}, "
                              f"not {arch!r}; pick one of those as arch")
    return arch


# torchvision's ImageNet weights: downloaded on first use into torch's hub cache, once per node

WEIGHTS_MIRROR_ENV = "TUNE_RESNET_WEIGHTS_URL"  # a base URL in place of https://download.pytorch.org/models/


def torchvision_url(arch: str) -> str:
    """torchvision's own URL of its ImageNet weights for `arch`; the file name ends in the first
    hex digits of the file's sha256, which torch's download checks."""
    import torchvision.models as tvm

    return tvm.get_weight(f"{arch.replace('resnet', 'ResNet')}_Weights.IMAGENET1K_V1").url


def weights_source(arch: str) -> tuple[str, Path]:
    """(URL to download from, file in torch's hub cache). A mirror keeps the file name, and with
    it the hash the file is checked against: it can serve torchvision's weights and nothing else."""
    url = torchvision_url(arch)
    name = url.rsplit("/", 1)[-1]
    mirror = os.environ.get(WEIGHTS_MIRROR_ENV, "").strip()
    if mirror:
        url = f"{mirror.rstrip('/')}/{name}"
    return url, Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_torchvision_weights(arch: str) -> Path:
    """The local file of torchvision's ImageNet weights for `arch`, downloaded if not cached yet.
    Trials that start together on one node wait on the lock and read the one file it downloads."""
    url, path = weights_source(arch)
    if path.is_file():  # cached (or put there by hand): no network, no lock, a read-only cache works
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.is_file():  # another process may have downloaded it while this one waited
            _download(arch, url, path)
    return path


def _download(arch: str, url: str, path: Path) -> None:
    """torch's own download: a progress bar on stderr, a temporary file moved into place only
    when complete and its sha256 matches the prefix in its name (else removed)."""
    found = torch.hub.HASH_REGEX.search(path.name)
    hash_prefix = found.group(1) if found else None
    original = torchvision_url(arch)
    mirror = "" if url != original else f" (or set {WEIGHTS_MIRROR_ENV} to a mirror of {original.rsplit('/', 1)[0]}/)"
    remedy = f"copy {original} to {path} on this machine{mirror}, or use pretrained: <run folder> of this project"
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise PretrainedError(f"pretrained: ImageNet weights for {arch} from {url} are corrupt (their sha256 "
                              f"does not start with {hash_prefix}); not cached; {remedy}") from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, no DNS, 404, cut off, bad URL
        reason = error if isinstance(error, HTTPError) else getattr(error, "reason", error)
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__
        raise PretrainedError(f"pretrained: cannot download ImageNet weights for {arch} from {url} "
                              f"({first}); {remedy}") from None


def _from_torchvision(config: TrainConfig, num_classes: int) -> ResNet:
    """ImageNet weights from torch's hub cache, downloaded there on first use."""
    arch = _torchvision_arch(config)
    state = torch.load(fetch_torchvision_weights(arch), map_location="cpu", weights_only=True)
    model = create_model(arch, num_classes=1000, width=64, stem=config.stem,
                         input_size=config.input_size, dropout=config.dropout)
    if model.conv1.weight.shape != state["conv1.weight"].shape:
        log.info("small-image stem: the 7x7 ImageNet stem conv is not used, conv1 starts fresh")
        state = {k: v for k, v in state.items() if not k.startswith("conv1.")}
    model.load_state_dict(state, strict=False)
    if num_classes != 1000:
        model.replace_head(num_classes)
    return model


def check_model(config: TrainConfig) -> None:
    """What a run would refuse about its model, found without training or memory: the pretrained
    start is there (a checkpoint of this project, or torchvision's weights: downloaded now into the
    hub cache if missing, so a machine that cannot get them fails here, before any trial), the
    model builds (shapes only) and the freeze strategy fits it. Raises ValueError naming the key."""
    resolved = model_config_of(config)  # reads a pretrained checkpoint's config; checks a torchvision arch
    if config.pretrained is not None and config.pretrained.startswith("torchvision"):
        fetch_torchvision_weights(resolved.arch)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(resolved.arch, num_classes=10, depth=resolved.depth, width=resolved.width,
                             stem=resolved.stem, input_size=resolved.input_size, dropout=resolved.dropout)
    apply_freeze(model, config.freeze, config.frozen_stages)


# ---------------------------------------------------------------------------------------------
# Freeze strategies
# ---------------------------------------------------------------------------------------------

def apply_freeze(model: ResNet, strategy: str, frozen_stages: int = 0) -> list[nn.Module]:
    """Turn off gradients per strategy; return the frozen modules, whose BatchNorm stays in eval.

    none: everything trains. linear: only the classifier. stages: the stem and the first
    frozen_stages stages are frozen. bn: only BatchNorm affine parameters and the head train
    (BatchNorm statistics adapt to the new data: that is the point of BN tuning).
    """
    if strategy == "none":
        return []
    if strategy == "bn":
        for module in model.modules():
            trainable = isinstance(module, nn.BatchNorm2d) or module is model.fc
            for param in module.parameters(recurse=False):
                param.requires_grad_(trainable)
        return []
    if strategy == "linear":
        frozen = model.stem_modules() + model.stages
    elif strategy == "stages":
        if not 0 <= frozen_stages <= model.num_stages:
            raise ValueError(f"frozen_stages: expected 0..{model.num_stages} for this model, got {frozen_stages}")
        frozen = model.stem_modules() + model.stages[:frozen_stages]
    else:
        raise ValueError(f"freeze: expected one of none, linear, stages, bn, got {strategy!r}")
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def keep_frozen_statistics(frozen: list[nn.Module]) -> None:
    """Call after model.train(): frozen BatchNorm layers keep their running statistics."""
    for module in frozen:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


# ---------------------------------------------------------------------------------------------
# Optimizer parameter groups
# ---------------------------------------------------------------------------------------------

def param_groups(model: ResNet, config: TrainConfig, *, include_frozen: bool = False) -> list[dict]:
    """No weight decay on BatchNorm parameters and biases; layer-wise lr decay from the head down.
    include_frozen: frozen parameters too (they thaw later: config.unfreeze_epoch).

    Depth ids: stem 0, stage k is k (1-based), head num_stages + 1; a parameter at depth d gets
    lr * layer_decay ** (num_stages + 1 - d).
    """
    top = model.num_stages + 1
    depth_of = {id(p): 0 for m in model.stem_modules() for p in m.parameters()}
    for k, stage in enumerate(model.stages, start=1):
        depth_of.update({id(p): k for p in stage.parameters()})
    groups: dict[tuple[float, bool], dict] = {}  # as few groups as the scales allow: fewer optimizer kernels
    for param in model.parameters():
        if not (param.requires_grad or include_frozen):
            continue
        scale = config.layer_decay ** (top - depth_of.get(id(param), top))
        decay = param.ndim > 1  # conv and linear weights; BN weights and all biases are 1-d
        group = groups.setdefault((scale, decay), {
            "params": [], "weight_decay": config.weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())
