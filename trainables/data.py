"""Data: sources -> a uint8 cache on disk, memory-mapped -> seeded stratified splits -> batches.

Images are decoded once, by all cores, into one `.npy` file per split. Every later run (every
trial of a search, the refit, every node of a cluster) maps the cache read-only instead of
reading it: N trial processes on a node share one copy of the pixels in the page cache, so a
node's memory grows with the data once, not with data x trials (bench/README.md, "own data").
The cache keeps each image's shorter side resized to a storage size, centre-cropped square;
training crops from it, evaluation and `predict` take its centre crop at the input size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, ImageOps

from .config import resolve_storage_size

log = logging.getLogger(__name__)

CIFAR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CACHE_VERSION = 2  # bump when the cache layout changes (2: .npy files, memory-mapped; storage size)
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
META_FILE = "meta.json"  # written last: its presence means the cache is complete
DECODE_TASK = 64  # images per task of a decoding process: small enough for a smooth progress bar


class DataError(ValueError):
    """A problem with the user's data: the message says what was wrong and what to do."""


@dataclass(frozen=True)
class ImageData:
    """The decoded dataset: uint8 images (N, 3, S, S) at the storage size S, int64 labels, class
    names. The image tensors are read-only memory maps of the cache: index them, never write."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    cache_path: Path
    skipped: int = 0  # unreadable files left out at decode time

    @property
    def image_size(self) -> int:
        """The storage size: the side of every cached image."""
        return int(self.train_images.shape[-1])


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("TUNE_RESNET_CACHE", Path.home() / ".cache" / "tune-resnet")).expanduser()


def load_data(dataset: str = "cifar10", data_path: str | os.PathLike | None = None, *,
              input_size: int = 32, storage_size: int | None = None, cache_dir: Path | None = None,
              progress: bool = False) -> ImageData:
    """The decoded dataset, mapped from the cache when it is there, else decoded once and cached.

    storage_size: the side images are kept at (None: the default for input_size, see
    trainables.config.resolve_storage_size). A file lock makes concurrent callers on one node
    (trials, nodes sharing a disk) decode once.
    """
    size = resolve_storage_size(input_size, storage_size)
    source = _resolve_source(dataset, data_path)
    folder = (cache_dir or cache_root()) / f"{dataset}-{size}px-{_fingerprint(source, size)}"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if not (folder / META_FILE).exists():
            _build_cache(dataset, source, size, folder, progress=progress)
    return _read_cache(folder)


def _read_cache(folder: Path) -> ImageData:
    """Memory-maps the arrays copy-on-write: pages are read from the shared page cache and never
    copied unless written to (nothing writes; 'c' rather than 'r' so a stray in-place op costs a
    private page instead of a segfault)."""
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in ARRAYS}
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    meta = json.loads((folder / META_FILE).read_text())
    return ImageData(tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                     tensors["test_labels"], meta["classes"], folder, meta.get("skipped", 0))


def _build_cache(dataset: str, source: Path | None, size: int, folder: Path, *, progress: bool) -> None:
    if source is None or _is_cifar_batches(source, dataset):
        train, test, classes = _read_cifar(dataset, source, size)
        for split, (images, labels) in (("train", train), ("test", test)):
            _save_array(folder / f"{split}_images.npy", images.numpy())
            _save_array(folder / f"{split}_labels.npy", labels.numpy())
        skipped = 0
    else:
        classes, skipped = _read_image_folder(source, size, folder, progress=progress)
    meta = {"version": CACHE_VERSION, "dataset": dataset, "source": str(source), "classes": classes,
            "skipped": skipped, "storage_size": size}
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / META_FILE)  # atomic, and last: a reader never sees half a cache


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        np.save(out, array)
    os.replace(tmp, path)


def _fingerprint(source: Path | None, size: int) -> str:
    """Changes when the source's files change (names, sizes, times), so a stale cache is never used."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{source}|{size}".encode())
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


def _read_image_folder(source: Path, size: int, folder: Path, *, progress: bool) -> tuple[list[str], int]:
    """train/<class>/* plus test/<class>/* (or val/<class>/*), from a folder or an archive, decoded
    into folder/{train,test}_{images,labels}.npy; returns (classes, files skipped)."""
    entries = _list_archive(source) if source.is_file() else _list_folder(source)
    splits = _group_by_split(entries, source)
    classes = sorted(splits["train"])
    eval_name = "test" if "test" in splits else "val"
    if sorted(splits[eval_name]) != classes:
        raise DataError(f"{source}: class folders of train/ and {eval_name}/ differ "
                        f"(train: {classes}, {eval_name}: {sorted(splits[eval_name])}); make them the same")
    skipped = 0
    for name, split in (("train", "train"), (eval_name, "test")):
        items = [(reader, classes.index(cls)) for cls in classes for reader in splits[name][cls]]
        labels, bad = _decode_all(items, size, folder / f"{split}_images.npy",
                                  desc=f"decoding {name}/" if progress else None)
        empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
        if empty:
            raise DataError(f"{source}: no readable images in {name}/{empty[0]}/; expected image files "
                            f"in every {name}/<class>/ folder")
        _save_array(folder / f"{split}_labels.npy", labels)
        skipped += bad
    if skipped:
        log.warning("skipped %d unreadable image files in %s", skipped, source)
    return classes, skipped


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


# ---------------------------------------------------------------------------------------------
# Decoding: all cores, each process writing its images straight into the memory-mapped file
# ---------------------------------------------------------------------------------------------

_ITEMS: list = []  # the items being decoded: set before the pool forks, so workers inherit them unpickled


def _decode_all(items: list[tuple[object, int]], size: int, out: Path, *,
                desc: str | None = None) -> tuple[np.ndarray, int]:
    """Decode items (reader, label) into out (an (N, 3, size, size) uint8 .npy file), in processes:
    PIL's resize and colour conversion hold the GIL, so threads left all but one core idle. Returns
    (labels of the readable images, number of unreadable ones); out holds those images, in order."""
    tmp = out.with_name(out.name + ".decoding")
    _create_array(tmp, (len(items), 3, size, size))
    global _ITEMS
    _ITEMS = items
    tasks = [(start, min(start + DECODE_TASK, len(items))) for start in range(0, len(items), DECODE_TASK)]
    workers = min(os.cpu_count() or 1, max(1, len(tasks)))
    bad: list[int] = []
    try:
        # fork: the workers inherit the item list and run PIL and numpy only (no torch, no threads)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_decode_range, [(tmp, size, *task) for task in tasks])
            for failed in _progress(results, total=len(tasks), desc=desc):
                bad.extend(failed)
    finally:
        _ITEMS = []
    labels = np.array([label for _, label in items], dtype=np.int64)
    if bad:  # rare: rewrite without the unreadable images' rows
        keep = np.setdiff1d(np.arange(len(items)), bad)
        _save_array(out, np.load(tmp, mmap_mode="r")[keep])
        tmp.unlink()
        return labels[keep], len(bad)
    os.replace(tmp, out)
    return labels, 0


def _create_array(path: Path, shape: tuple[int, ...]) -> None:
    """An .npy file of zeros, its blocks allocated now: a full disk is an OSError here, not a
    SIGBUS in a worker writing to a page of a sparse file."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)


def _progress(results, *, total: int, desc: str | None):
    if desc is None:
        return results
    from tqdm import tqdm

    # disable=None: a bar on a terminal only, none in logs and pipes
    return tqdm(results, total=total, desc=desc, unit="img", unit_scale=DECODE_TASK, leave=False, disable=None)


def _decode_range(task: tuple[Path, int, int, int]) -> list[int]:
    """In a worker: decode _ITEMS[start:end] into their rows of the file; the positions it could not read.

    Rows go in with pwrite, not through a writable memory map: a map's flush is an msync of the
    whole file, which waited on the disk for every task (0.93-0.98x torchvision's DataLoader on
    disk, 1.04x on tmpfs: bench/README.md, "Own data at scale"); written pages reach the page
    cache at once, and nothing needs them on disk before meta.json marks the cache complete."""
    path, size, start, end = task
    row = 3 * size * size
    with open(path, "r+b") as file:
        header = _npy_header_size(file)
        failed = []
        for position in range(start, end):
            array = _decode_one(_ITEMS[position][0], size)
            if array is None:
                failed.append(position)
            else:  # HWC -> CHW
                os.pwrite(file.fileno(), np.ascontiguousarray(array.transpose(2, 0, 1)).data, header + position * row)
    return failed


def _npy_header_size(file) -> int:
    """Bytes before the array's data in an .npy file (its magic string and header)."""
    file.seek(0)
    major, _ = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    read(file)
    return file.tell()


def decode_image(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: shorter side resized to size (bilinear), then centre-cropped.

    The one decoder of training data and of `tune-resnet predict`, so both see the same pixels.
    EXIF orientation is applied (phone photos are stored sideways); grey, palette and CMYK images
    become RGB; transparent pixels are laid on white. Raises what PIL raises for a file it cannot read.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        image = _to_rgb(ImageOps.exif_transpose(image))
        if image.size != (size, size):
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def decode_centre(source: str | os.PathLike | bytes, *, storage_size: int, input_size: int) -> np.ndarray:
    """(input_size, input_size, 3) uint8: exactly what validation and the test saw of an image
    (decoded at the storage size as the cache was, then its centre crop)."""
    image = decode_image(source, storage_size)
    top = (storage_size - input_size) // 2
    return image[top:top + input_size, top:top + input_size]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG, TIFF): scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def _decode_one(reader: object, size: int) -> np.ndarray | None:
    """decode_image, or None if unreadable."""
    try:
        return decode_image(reader, size)
    except Exception:  # truncated, corrupt or not an image at all: counted, not fatal
        return None


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size of (..., S, S) images: what validation, the test, exports and
    predict all see of a cached image (training takes random crops of the same image)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    """What a training run sees: positions in the cached training images, which stay memory-mapped
    (a split is never copied whole). The test split is not here: only the refit asks for it."""

    images: torch.Tensor          # uint8 (N, 3, S, S): all the cached training images
    labels: torch.Tensor          # int64 (N,)
    train_index: torch.Tensor     # int64 positions in images
    val_index: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, of the training images in [0, 1]
    std: tuple[float, float, float]

    @classmethod
    def from_tensors(cls, train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, classes: list[str], mean: tuple, std: tuple) -> Splits:
        """Splits of images held in memory (tests, tools): train then validation, one after the other."""
        n_train, n_val = len(train_labels), len(val_labels)
        return cls(torch.cat([train_images, val_images]), torch.cat([train_labels, val_labels]),
                   torch.arange(n_train), torch.arange(n_train, n_train + n_val), classes, mean, std)

    @property
    def train_labels(self) -> torch.Tensor:
        return self.labels[self.train_index]

    @property
    def val_labels(self) -> torch.Tensor:
        return self.labels[self.val_index]

    @property
    def train_images(self) -> torch.Tensor:
        """A copy of the training split's images: for tests and small tools, not for training."""
        return self.images[self.train_index]

    @property
    def val_images(self) -> torch.Tensor:
        return self.images[self.val_index]


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
    mean, std = channel_stats(data.train_images, train_index)
    return Splits(data.train_images, torch.as_tensor(labels), train_index, val_index, data.classes, mean, std)


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


def channel_stats(images: torch.Tensor, index: torch.Tensor | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of images (or of images[index]), in chunks to bound memory."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    positions = index if index is not None else torch.arange(len(images))
    for chunk_index in positions.split(4096):
        # sorted: the chunk's rows are read from the memory map in file order
        chunk = images[chunk_index.sort().values] if index is not None else images[chunk_index[0]:chunk_index[-1] + 1]
        pixels = chunk.double().div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(1)
        total_sq += pixels.square().sum(1)
        count += pixels.shape[1]
    mean = total / max(1, count)
    std = (total_sq / max(1, count) - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------------------------------------
# Batches: normalise and augment on whatever device the batch lives on
# ---------------------------------------------------------------------------------------------

def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, standardised; mean/std shaped (1, 3, 1, 1), in [0, 1] units."""
    return (images.float().div_(255) - mean).div_(std)


def augment(images: torch.Tensor, *, flip: bool, crop_padding: int, cutout: int, generator: torch.Generator,
            size: int | None = None, resized_crop: tuple[float, float] | None = None) -> torch.Tensor:
    """Random augmentation of a batch of (N, 3, S, S) images into (N, 3, size, size), per image.

    resized_crop=(scale, ratio): a random crop of scale..1 of the area and aspect ratio 1/ratio..ratio,
    resized to size, flipped at random when flip (ImageNet fine-tuning's augmentation). Otherwise:
    a random horizontal flip, then a random size x size crop of the image reflect-padded by
    crop_padding. Then cutout, optionally.
    """
    n, _, height, width = images.shape
    size = size or height
    device = images.device
    if resized_crop is not None:
        images = _random_resized_crop(images, size, *resized_crop, flip=flip, generator=generator)
    else:
        if flip:
            flipped = torch.rand(n, generator=generator, device=device) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(3), images)
        if crop_padding or size != height:
            images = _random_crop(images, crop_padding, size, generator)
    if cutout:
        rows = torch.randint(0, size, (n, 1, 1), generator=generator, device=device)
        cols = torch.randint(0, size, (n, 1, 1), generator=generator, device=device)
        y = torch.arange(size, device=device)[None, :, None]
        x = torch.arange(size, device=device)[None, None, :]
        top, left = rows - cutout // 2, cols - cutout // 2  # a cutout x cutout square around (row, col)
        hole = (y >= top) & (y < top + cutout) & (x >= left) & (x < left + cutout)  # (N, H, W)
        images = images.masked_fill(hole[:, None], 0.0)  # 0 = the mean after normalisation
    return images


def _random_crop(images: torch.Tensor, padding: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Two gathers instead of a Python loop over images: rows first, then columns."""
    n, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect") if padding else images
    dy = torch.randint(0, height + 2 * padding - size + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, width + 2 * padding - size + 1, (n, 1), generator=generator, device=device)
    rows = (dy + torch.arange(size, device=device))[:, None, :, None]  # (N, 1, size, 1)
    cols = (dx + torch.arange(size, device=device))[:, None, None, :]  # (N, 1, 1, size)
    padded = padded.gather(2, rows.expand(n, channels, size, width + 2 * padding))
    return padded.gather(3, cols.expand(n, channels, size, size))


def _random_resized_crop(images: torch.Tensor, size: int, scale: float, ratio: float, *, flip: bool,
                         generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop (+ flip) for a whole batch in one grid_sample: each image's
    crop is an affine map of the output grid (sides as fractions of the image, centre anywhere the
    crop fits). A crop that would not fit is clamped to the image rather than redrawn."""
    n, device = images.shape[0], images.device
    uniform = torch.rand(n, 4, generator=generator, device=device)
    area = scale + (1.0 - scale) * uniform[:, 0]                     # fraction of the image's area
    aspect = torch.exp(math.log(ratio) * (2 * uniform[:, 1] - 1))    # width / height, log-uniform
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)                # fractions of the side
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (1 - crop_w) * (2 * uniform[:, 2] - 1)                # in [-1, 1] grid units
    centre_y = (1 - crop_h) * (2 * uniform[:, 3] - 1)
    mirror = 1.0 - 2.0 * (torch.rand(n, generator=generator, device=device) < 0.5).float() if flip else 1.0
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, centre_y
    grid = torch.nn.functional.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid.to(images.dtype), mode="bilinear",
                                           padding_mode="border", align_corners=False)
