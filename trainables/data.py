"""Data: sources -> a uint8 tensor cache on disk -> seeded stratified splits -> batched augmentation.

Images are decoded once. Every later run (every trial of a search, every node of a cluster)
loads the cache, a single safetensors file, in well under a second: faster to load and
augment uint8 tensors than to decode JPEGs per epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CIFAR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CACHE_VERSION = 1  # bump when the cache layout changes


class DataError(ValueError):
    """A problem with the user's data: the message says what was wrong and what to do."""


@dataclass(frozen=True)
class ImageData:
    """The decoded dataset: uint8 images (N, 3, H, W), int64 labels, class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    cache_path: Path
    skipped: int = 0  # unreadable files left out at decode time

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("TUNE_RESNET_CACHE", Path.home() / ".cache" / "tune-resnet")).expanduser()


def load_data(dataset: str = "cifar10", data_path: str | os.PathLike | None = None, *,
              input_size: int = 32, cache_dir: Path | None = None) -> ImageData:
    """The decoded dataset, from the cache when it is there, else decoded once and cached.

    A file lock makes concurrent callers on one node (trials, nodes sharing a disk) decode once.
    """
    source = _resolve_source(dataset, data_path)
    folder = (cache_dir or cache_root()) / f"{dataset}-{input_size}px-{_fingerprint(source, input_size)}"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not (folder / "data.safetensors").exists():
            _build_cache(dataset, source, input_size, folder)
    return _read_cache(folder)


def _read_cache(folder: Path) -> ImageData:
    tensors = load_file(folder / "data.safetensors")
    meta = json.loads((folder / "meta.json").read_text())
    return ImageData(tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                     tensors["test_labels"], meta["classes"], folder, meta.get("skipped", 0))


def _build_cache(dataset: str, source: Path | None, input_size: int, folder: Path) -> None:
    if source is None or _is_cifar_batches(source, dataset):
        train, test, classes = _read_cifar(dataset, source, input_size)
        skipped = 0
    else:
        train, test, classes, skipped = _read_image_folder(source, input_size)
    tensors = {"train_images": train[0], "train_labels": train[1],
               "test_images": test[0], "test_labels": test[1]}
    tmp = folder / "data.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    meta = {"version": CACHE_VERSION, "dataset": dataset, "source": str(source), "classes": classes,
            "skipped": skipped, "input_size": input_size}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "data.safetensors")  # atomic: a reader never sees half a cache


def _fingerprint(source: Path | None, input_size: int) -> str:
    """Changes when the source's files change (names, sizes, times), so a stale cache is never used."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{source}|{input_size}".encode())
    if source is not None and source.is_file():
        stat = source.stat()
        digest.update(f"{stat.st_size}|{stat.st_mtime_ns}".encode())
    elif source is not None:
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                try:
                    stat = os.stat(os.path.join(root, name))
                except OSError:  # a broken link: unreadable, skipped at decode like any such file
                    digest.update(f"{root}/{name}|missing".encode())
                    continue
                digest.update(f"{root}/{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def check_source(dataset: str, data_path: str | os.PathLike | None) -> None:
    """A known dataset and, where one is given, a path that exists: what --dry-run can tell
    without reading any image."""
    _resolve_source(dataset, data_path)


def _resolve_source(dataset: str, data_path: str | os.PathLike | None) -> Path | None:
    if dataset not in (*CIFAR, "imagefolder"):
        raise DataError(f"dataset: unknown dataset {dataset!r}; expected cifar10, cifar100 or imagefolder")
    if data_path is None:
        if dataset == "imagefolder":
            raise DataError("dataset imagefolder needs a location: pass --data PATH (a folder or .tar.gz/.zip)")
        return None  # torchvision downloads into the cache
    path = Path(data_path).expanduser().resolve()
    if not path.exists():
        raise DataError(f"--data: {path} does not exist; expected an image folder, an archive or CIFAR python batches")
    return path


def _is_cifar_batches(path: Path, dataset: str) -> bool:
    return dataset in CIFAR and path.is_dir() and ((path / CIFAR[dataset]).is_dir() or path.name == CIFAR[dataset])


def _read_cifar(dataset: str, source: Path | None, input_size: int):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    root = source.parent if source is not None and source.name == CIFAR[dataset] else source
    download = root is None
    root = root or cache_root() / "downloads"
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as error:  # URLError, socket errors, a missing or corrupt batch file
        where = "download failed (no network?)" if download else f"cannot read CIFAR batches in {root}"
        raise DataError(f"{dataset}: {where}: {error}; pass --data PATH with a folder of the python "
                        "batches, an image folder or a .tar.gz of one") from None
    out = []
    for split in splits:
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        out.append((_resize_batch(images, input_size), torch.tensor(split.targets, dtype=torch.int64)))
    return out[0], out[1], list(splits[0].classes)


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _read_image_folder(source: Path, input_size: int):
    """train/<class>/* plus test/<class>/* (or val/<class>/*), from a folder or an archive."""
    entries = _list_archive(source) if source.is_file() else _list_folder(source)
    splits = _group_by_split(entries, source)
    classes = sorted(splits["train"])
    eval_name = "test" if "test" in splits else "val"
    if sorted(splits[eval_name]) != classes:
        raise DataError(f"{source}: class folders of train/ and {eval_name}/ differ "
                        f"(train: {classes}, {eval_name}: {sorted(splits[eval_name])}); make them the same")
    decoded, skipped = {}, 0
    for name in ("train", eval_name):
        items = [(reader, classes.index(cls)) for cls in classes for reader in splits[name][cls]]
        images, labels, bad = _decode_all(items, input_size)
        empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
        if empty:
            raise DataError(f"{source}: no readable images in {name}/{empty[0]}/; expected image files "
                            f"in every {name}/<class>/ folder")
        decoded[name], skipped = (images, labels), skipped + bad
    if skipped:
        log.warning("skipped %d unreadable image files in %s", skipped, source)
    return decoded["train"], decoded[eval_name], classes, skipped


def _list_folder(source: Path) -> list[tuple[str, object]]:
    return [(str(p.relative_to(source)), p) for p in source.rglob("*") if p.is_file()]


def _list_archive(source: Path) -> list[tuple[str, object]]:
    """(path inside the archive, raw bytes) of every file: read once, sequentially."""
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                return [(n, archive.read(n)) for n in archive.namelist() if not n.endswith("/")]
        with tarfile.open(source, "r:*") as archive:
            return [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(f"--data: {source} is not a readable .tar.gz/.tar/.zip archive ({error}); "
                        "pass an image folder or a valid archive") from None


def _group_by_split(entries: list[tuple[str, object]], source: Path) -> dict[str, dict[str, list]]:
    """{split: {class: [reader]}}; a common prefix folder (cifar10/train/...) is allowed."""
    splits: dict[str, dict[str, list]] = {}
    for name, reader in entries:
        parts = Path(name).parts
        for i in range(len(parts) - 2):
            if parts[i] in ("train", "test", "val") and len(parts) - i == 3:
                if not parts[-1].startswith("."):  # any other file is tried; unreadable ones are counted
                    splits.setdefault(parts[i], {}).setdefault(parts[i + 1], []).append((name, reader))
                break
    if "train" not in splits or not ({"test", "val"} & set(splits)):
        raise DataError(f"--data: {source} has no train/<class>/ and test/<class>/ (or val/<class>/) "
                        "image folders; lay the images out as train/<class>/*.jpg and test/<class>/*.jpg")
    # deterministic order by file name, whatever the file system or archive says
    return {split: {cls: [reader for _, reader in sorted(named, key=lambda item: item[0])]
                    for cls, named in classes.items()} for split, classes in splits.items()}


def _decode_all(items: list[tuple[object, int]], size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode in threads: PIL releases the GIL while it decodes."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda item: _decode_one(item[0], size), items, chunksize=256))
    keep = [i for i, array in enumerate(arrays) if array is not None]
    if not keep:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), len(items)
    images = torch.from_numpy(np.stack([arrays[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([items[i][1] for i in keep], dtype=torch.int64)
    return images, labels, len(items) - len(keep)


def decode_image(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: shorter side resized to size (bilinear), then centre-cropped.

    The one decoder of training data and of `tune-resnet predict`, so both see the same pixels.
    Raises what PIL raises for a file it cannot read.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        image = image.convert("RGB")
        if image.size != (size, size):
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def _decode_one(reader: object, size: int) -> np.ndarray | None:
    """decode_image, or None if unreadable."""
    try:
        return decode_image(reader, size)
    except Exception:  # truncated, corrupt or not an image at all: counted, not fatal
        return None


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    """What a training run sees. The test split is not here: only the refit asks for it."""

    train_images: torch.Tensor  # uint8 (N, 3, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, of the training images in [0, 1]
    std: tuple[float, float, float]


def make_splits(data: ImageData, *, val_fraction: float = 0.1, seed: int = 0,
                train_subset: int | None = None, merge_val: bool = False) -> Splits:
    """Hold out a stratified, seeded validation split; optionally subsample train, stratified.

    The validation split does not depend on train_subset, so every subset is scored on the same
    images. merge_val=True (the refit) trains on train + validation.
    """
    if not merge_val:
        check_splits(data, val_fraction=val_fraction)
    generator = torch.Generator().manual_seed(seed)
    labels = data.train_labels
    val_index, train_index = [], []
    for cls in range(len(data.classes)):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_index.append(members[:n_val])
        train_index.append(members[n_val:])
    val_index, train_index = torch.cat(val_index), torch.cat(train_index)
    if train_subset is not None and train_subset < len(train_index):
        train_index = _stratified_subset(train_index, labels, train_subset, generator)
    if merge_val:  # nothing is left to validate on: the refit is judged by the test split alone
        train_index, val_index = torch.cat([train_index, val_index]), val_index[:0]
    train_images = data.train_images[train_index]
    mean, std = channel_stats(train_images)
    return Splits(train_images, labels[train_index], data.train_images[val_index], labels[val_index],
                  data.classes, mean, std)


def check_splits(data: ImageData, *, val_fraction: float) -> None:
    """Data a classifier can be trained and validated on, from the counts alone (no copy):
    two classes or more, and images on both sides of the validation split."""
    if len(data.classes) < 2:
        raise DataError(f"{len(data.classes)} class ({', '.join(data.classes)}) in the training images; a classifier "
                        "needs at least 2: one folder per class, train/<class>/*")
    counts = data.train_labels.bincount(minlength=len(data.classes)).tolist()
    n_val = sum(round(n * val_fraction) for n in counts)  # as make_splits rounds, class by class
    if n_val == 0 or n_val == sum(counts):
        empty = "validation" if n_val == 0 else "training"
        raise DataError(f"val_fraction {val_fraction:g} of {sum(counts)} training images leaves no {empty} "
                        f"image; use more images (at least a few per class) or another val_fraction")


def _stratified_subset(index: torch.Tensor, labels: torch.Tensor, size: int,
                       generator: torch.Generator) -> torch.Tensor:
    """size items of index with class proportions kept (largest remainders get the leftovers)."""
    classes, counts = torch.unique(labels[index], return_counts=True)
    quota = counts.double() * size / len(index)
    take = quota.floor().long()
    leftover = size - int(take.sum())
    take[torch.argsort(quota - take, descending=True)[:leftover]] += 1
    chosen = []
    for cls, n in zip(classes, take):
        members = index[labels[index] == cls]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(chosen)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1], computed in chunks to bound memory."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        pixels = chunk.double().div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(1)
        total_sq += pixels.square().sum(1)
    count = images.numel() / 3
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------------------------------------
# Batches: normalise and augment on whatever device the batch lives on
# ---------------------------------------------------------------------------------------------

def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, standardised; mean/std shaped (1, 3, 1, 1), in [0, 1] units."""
    return (images.float().div_(255) - mean).div_(std)


def augment(images: torch.Tensor, *, flip: bool, crop_padding: int, cutout: int,
            generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, random crop with reflect padding, optional cutout, per image."""
    n, _, height, width = images.shape
    device = images.device
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if crop_padding:
        images = _random_crop(images, crop_padding, generator)
    if cutout:
        rows = torch.randint(0, height, (n, 1, 1), generator=generator, device=device)
        cols = torch.randint(0, width, (n, 1, 1), generator=generator, device=device)
        y = torch.arange(height, device=device)[None, :, None]
        x = torch.arange(width, device=device)[None, None, :]
        top, left = rows - cutout // 2, cols - cutout // 2  # a cutout x cutout square around (row, col)
        hole = (y >= top) & (y < top + cutout) & (x >= left) & (x < left + cutout)  # (N, H, W)
        images = images.masked_fill(hole[:, None], 0.0)  # 0 = the mean after normalisation
    return images


def _random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Two gathers instead of a Python loop over images: rows first, then columns."""
    n, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    rows = (dy + torch.arange(height, device=device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx + torch.arange(width, device=device))[:, None, None, :]   # (N, 1, 1, W)
    padded = padded.gather(2, rows.expand(n, channels, height, width + 2 * padding))
    return padded.gather(3, cols.expand(n, channels, height, width))
