from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import trainables.data as data_module
from trainables.data import DataError, ImageData, Splits, augment, channel_stats, load_data, make_splits
from conftest import CLASS_CHANNEL, IMAGE_SIZE, TEST_PER_CLASS, TRAIN_PER_CLASS, colour_image

CLASSES = sorted(CLASS_CHANNEL)


def _load(path: Path, **options) -> ImageData:
    return load_data("imagefolder", path, input_size=options.pop("input_size", IMAGE_SIZE), **options)


def _assert_same_data(a: ImageData, b: ImageData) -> None:
    assert a.classes == b.classes
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        same = torch.equal(getattr(a, name), getattr(b, name))
        assert same, f"{name} differ"


def _sorted_images(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


# ---------------------------------------------------------------------------------------------
# Image folders and the cache
# ---------------------------------------------------------------------------------------------

def test_image_folder_is_decoded_into_the_cache(image_folder: Path, data_cache: Path) -> None:
    data = _load(image_folder)
    n_classes = len(CLASS_CHANNEL)
    assert data.train_images.shape == (TRAIN_PER_CLASS * n_classes, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert data.test_images.shape == (TEST_PER_CLASS * n_classes, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64
    assert data.classes == CLASSES
    assert data.image_size == IMAGE_SIZE and data.skipped == 0
    assert data.cache_path.parent == data_cache
    assert {p.name for p in data.cache_path.glob("*.npy")} == {"train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"}
    assert (data.cache_path / "meta.json").is_file()
    for images, labels, per_class in ((data.train_images, data.train_labels, TRAIN_PER_CLASS),
                                      (data.test_images, data.test_labels, TEST_PER_CLASS)):
        assert torch.bincount(labels).tolist() == [per_class] * n_classes
        for label, name in enumerate(CLASSES):  # each label's images have its class's bright channel
            mean_colour = images[labels == label].double().mean(dim=(0, 2, 3))
            assert int(mean_colour.argmax()) == CLASS_CHANNEL[name]


def test_decoded_pixels_are_the_files_pixels(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=2, test_per_class=1)
    data = _load(folder)
    first = np.array(Image.open(folder / "train" / "blue" / "blue_000.png"))  # label 0, sorted first
    assert torch.equal(data.train_images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_second_load_comes_from_the_cache(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _load(image_folder)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")
    monkeypatch.setattr(data_module, "_decode_one", no_decoding)
    monkeypatch.setattr(data_module, "_read_image_folder", no_decoding)
    second = _load(image_folder)
    assert second.cache_path == first.cache_path
    _assert_same_data(first, second)


def test_cache_is_per_input_size(image_folder: Path) -> None:
    small, large = _load(image_folder, input_size=8), _load(image_folder, input_size=IMAGE_SIZE)
    assert small.cache_path != large.cache_path
    assert small.train_images.shape[-2:] == (8, 8) and large.train_images.shape[-2:] == (16, 16)


def test_cache_is_rebuilt_when_a_file_changes(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=3, test_per_class=1)
    before = _load(folder)
    changed = folder / "train" / "blue" / "blue_000.png"  # label 0: the first training image
    Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 7, dtype=np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit, whatever the clock
    after = _load(folder)
    assert after.cache_path != before.cache_path
    assert torch.equal(after.train_images[0], torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 7, dtype=torch.uint8))
    assert torch.equal(after.train_images[1:], before.train_images[1:])


def _tar_gz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as archive:
        archive.add(folder, arcname="dataset")  # a prefix folder inside: dataset/train/<class>/...
    return out


def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, Path("dataset") / path.relative_to(folder))  # directories too
    return out


@pytest.mark.parametrize("make_archive", [_tar_gz, _zip], ids=["tar.gz", "zip"])
def test_archive_gives_the_same_tensors_as_the_folder(image_folder: Path, tmp_path: Path,
                                                      make_archive: Callable[[Path, Path], Path]) -> None:
    suffix = ".tar.gz" if make_archive is _tar_gz else ".zip"
    archive = make_archive(image_folder, tmp_path / f"images{suffix}")
    from_folder, from_archive = _load(image_folder), _load(archive)
    for label in range(len(CLASSES)):  # the same images per class...
        assert _sorted_images(from_archive.train_images[from_archive.train_labels == label]) == \
            _sorted_images(from_folder.train_images[from_folder.train_labels == label])
    # ...and in the same order, so that a seed gives the same split whichever form the data has
    _assert_same_data(from_folder, from_archive)


def test_val_folder_instead_of_test(make_image_folder: Callable[..., Path]) -> None:
    data = _load(make_image_folder(train_per_class=4, test_per_class=2, eval_split="val"))
    assert data.classes == CLASSES
    assert len(data.train_labels) == 12 and len(data.test_labels) == 6


def test_images_of_another_size_are_resized_and_centre_cropped(make_image_folder: Callable[..., Path]) -> None:
    data = _load(make_image_folder(train_per_class=3, test_per_class=1, width=20, height=24), input_size=16)
    assert data.train_images.shape == (9, 3, 16, 16) and data.test_images.shape == (3, 3, 16, 16)
    assert data.image_size == 16
    for label, name in enumerate(CLASSES):
        mean_colour = data.train_images[data.train_labels == label].double().mean(dim=(0, 2, 3))
        assert int(mean_colour.argmax()) == CLASS_CHANNEL[name]


def test_resize_keeps_the_centre(tmp_path: Path) -> None:
    """A 16x32 image (wide) with a distinct centre square: only the centre survives at 16 px."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 8:24] = 200
    for split in ("train", "test"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "d" / split / "a" / "x.png")
    data = _load(tmp_path / "d", input_size=16)
    assert torch.equal(data.train_images[0], torch.full((3, 16, 16), 200, dtype=torch.uint8))


def test_unreadable_files_are_skipped_and_counted(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=4, test_per_class=2)
    (folder / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    (folder / "train" / "green" / "notes.txt").write_text("not an image")
    png = (folder / "test" / "blue" / "blue_000.png").read_bytes()
    (folder / "test" / "blue" / "truncated.png").write_bytes(png[:40])
    (folder / "train" / "red" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not counted
    data = _load(folder)
    assert data.skipped == 3
    assert len(data.train_labels) == 12 and len(data.test_labels) == 6


def test_a_class_with_no_readable_images_is_an_error(make_image_folder: Callable[..., Path]) -> None:
    """A class whose every file is unreadable must not silently become a class with no images."""
    folder = make_image_folder(train_per_class=3, test_per_class=1)
    for path in (folder / "train" / "red").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="red"):
        _load(folder)


def test_a_split_with_no_readable_images_is_an_error(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=3, test_per_class=1)
    for path in (folder / "test").rglob("*.png"):
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable images in test"):
        _load(folder)


def test_class_folders_without_images_are_an_error(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        (tmp_path / "d" / split / "a" / "README.txt").write_text("images go here")
    with pytest.raises(DataError, match="no readable images in train"):
        _load(tmp_path / "d")


@pytest.mark.parametrize("layout", ["empty", "train only", "no class folders", "other names"])
def test_folder_without_the_layout_is_an_error(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    image = Image.fromarray(colour_image(np.random.default_rng(0), 0))
    if layout == "train only":
        (folder / "train" / "a").mkdir(parents=True)
        image.save(folder / "train" / "a" / "x.png")
    elif layout == "no class folders":
        for split in ("train", "test"):
            (folder / split).mkdir()
            image.save(folder / split / "x.png")
    elif layout == "other names":
        for split in ("training", "testing"):
            (folder / split / "a").mkdir(parents=True)
            image.save(folder / split / "a" / "x.png")
    with pytest.raises(DataError, match="train/<class>"):
        _load(folder)


def test_train_and_test_classes_must_match(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=2, test_per_class=1)
    shutil.rmtree(folder / "test" / "green")
    with pytest.raises(DataError, match="differ") as error:
        _load(folder)
    assert "green" in str(error.value)


@pytest.mark.parametrize("name", ["images.tar.gz", "images.zip", "images.txt"])
def test_a_file_that_is_not_an_archive_is_an_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(DataError, match="archive"):
        _load(path)


def test_unknown_dataset_is_an_error(image_folder: Path) -> None:
    with pytest.raises(DataError, match="imagenet"):
        load_data("imagenet", image_folder)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path / "nowhere")
    with pytest.raises(DataError, match="imagefolder"):
        load_data("imagefolder", None)


# ---------------------------------------------------------------------------------------------
# CIFAR python batches, read through torchvision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["root", "folder"])
def test_cifar_batches_are_read_through_torchvision(cifar_batches: dict, cifar10_root: Path, which: str) -> None:
    data = load_data("cifar10", cifar_batches[which])  # the parent folder or cifar-10-batches-py itself
    assert data.classes == cifar_batches["classes"]
    assert data.train_images.dtype == torch.uint8
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(data, name), cifar_batches[name].to(getattr(data, name).dtype)), name


def test_cifar_batches_are_resized(cifar10_root: Path) -> None:
    data = load_data("cifar10", cifar10_root, input_size=16)
    assert data.train_images.shape == (20, 3, 16, 16) and data.train_images.dtype == torch.uint8


def test_corrupt_cifar_batches_are_an_error(cifar_batches: dict) -> None:
    # Without the md5 patch torchvision finds the files do not match the real CIFAR-10.
    with pytest.raises(DataError, match="cannot read CIFAR batches"):
        load_data("cifar10", cifar_batches["root"])


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

CLASS_SIZES = [40, 25, 13]  # unbalanced on purpose


@pytest.fixture(scope="module")
def numbered_data() -> ImageData:
    """Image i is filled with the value i, so a split's images tell which items it holds."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(CLASS_SIZES)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
    return ImageData(images, labels, images[:0], labels[:0], ["a", "b", "c"], Path("unused"))


def _ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5])
def test_validation_split_is_stratified(numbered_data: ImageData, val_fraction: float) -> None:
    splits = make_splits(numbered_data, val_fraction=val_fraction, seed=0)
    val_counts = torch.bincount(splits.val_labels, minlength=3).tolist()
    for count, size in zip(val_counts, CLASS_SIZES):
        assert abs(count - size * val_fraction) <= 1
    train_ids, val_ids = _ids(splits.train_images), _ids(splits.val_images)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(sum(CLASS_SIZES)))
    labels = numbered_data.train_labels
    assert splits.val_labels.tolist() == [int(labels[i]) for i in val_ids]  # labels travel with images
    assert splits.train_labels.tolist() == [int(labels[i]) for i in train_ids]
    assert splits.classes == ["a", "b", "c"]


def test_splits_are_deterministic_per_seed(numbered_data: ImageData) -> None:
    first, again = make_splits(numbered_data, seed=3), make_splits(numbered_data, seed=3)
    assert _ids(first.val_images) == _ids(again.val_images)
    assert _ids(first.train_images) == _ids(again.train_images)
    other = make_splits(numbered_data, seed=4)
    assert set(_ids(other.val_images)) != set(_ids(first.val_images))


@pytest.mark.parametrize("train_subset", [10, 31, 50])
def test_train_subset_is_stratified_and_leaves_validation_alone(numbered_data: ImageData, train_subset: int) -> None:
    full = make_splits(numbered_data, val_fraction=0.2, seed=1)
    subset = make_splits(numbered_data, val_fraction=0.2, seed=1, train_subset=train_subset)
    assert _ids(subset.val_images) == _ids(full.val_images)
    assert len(subset.train_labels) == train_subset
    assert set(_ids(subset.train_images)) <= set(_ids(full.train_images))
    full_counts = torch.bincount(full.train_labels, minlength=3)
    subset_counts = torch.bincount(subset.train_labels, minlength=3)
    expected = full_counts.double() * train_subset / len(full.train_labels)
    assert ((subset_counts - expected).abs() < 1).all(), (subset_counts, expected)


def test_train_subset_larger_than_the_split_is_the_split(numbered_data: ImageData) -> None:
    full = make_splits(numbered_data, seed=1)
    assert _ids(make_splits(numbered_data, seed=1, train_subset=10_000).train_images) == _ids(full.train_images)


@pytest.mark.parametrize("train_subset", [None, 20])
def test_merge_val_trains_on_train_and_validation(numbered_data: ImageData, train_subset: int | None) -> None:
    plain = make_splits(numbered_data, val_fraction=0.2, seed=2, train_subset=train_subset)
    merged = make_splits(numbered_data, val_fraction=0.2, seed=2, train_subset=train_subset, merge_val=True)
    assert sorted(_ids(merged.train_images)) == sorted(_ids(plain.train_images) + _ids(plain.val_images))
    assert len(merged.train_labels) == len(merged.train_images)


def test_split_statistics_are_those_of_the_training_images(image_data: ImageData) -> None:
    splits = make_splits(image_data, seed=0)
    pixels = splits.train_images.double() / 255
    torch.testing.assert_close(torch.tensor(splits.mean, dtype=torch.float64), pixels.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(splits.std, dtype=torch.float64),
                               pixels.std(dim=(0, 2, 3), unbiased=False))


def test_channel_stats_matches_a_direct_computation() -> None:
    images = torch.randint(0, 256, (5000, 3, 3, 2), dtype=torch.uint8,  # > one 4096-image chunk
                           generator=torch.Generator().manual_seed(0))
    images[:, 1] //= 4  # channels differ
    mean, std = channel_stats(images)
    pixels = images.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), pixels.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), pixels.std(dim=(0, 2, 3), unbiased=False))


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

def _images(n: int = 64, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("flip", "crop_padding", "cutout"),
                         [(False, 0, 0), (True, 0, 0), (False, 2, 0), (True, 4, 0), (True, 2, 3)])
def test_augment_keeps_shape_and_dtype(flip: bool, crop_padding: int, cutout: int) -> None:
    images = _images()
    out = augment(images, flip=flip, crop_padding=crop_padding, cutout=cutout, generator=_gen())
    assert out.shape == images.shape and out.dtype == images.dtype
    if not (flip or crop_padding or cutout):
        assert torch.equal(out, images)


def test_flip_gives_the_image_or_its_mirror() -> None:
    images = _images()
    out = augment(images, flip=True, crop_padding=0, cutout=0, generator=_gen())
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()  # 64 coin tosses: both sides come up


@pytest.mark.parametrize("padding", [1, 3])
def test_crop_is_a_window_of_the_reflect_padded_image(padding: int) -> None:
    images = _images(n=32)
    out = augment(images, flip=False, crop_padding=padding, cutout=0, generator=_gen())
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
    size = images.shape[-1]
    offsets = set()
    for i in range(len(images)):
        windows = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + size, dx:dx + size])]
        assert windows, f"image {i} is no window of its padded image"
        offsets.add(windows[0])
    assert len(offsets) > 1  # the offset is random per image


def test_augment_is_deterministic_for_a_generator_seed() -> None:
    images = _images()
    options = {"flip": True, "crop_padding": 2, "cutout": 3}
    first = augment(images, generator=_gen(7), **options)
    assert torch.equal(first, augment(images, generator=_gen(7), **options))
    assert not torch.equal(first, augment(images, generator=_gen(8), **options))


@pytest.mark.parametrize("side", [3, 4, 5])
def test_cutout_zeroes_a_square_of_the_given_side(side: int) -> None:
    images = torch.ones(200, 3, 16, 16)
    out = augment(images, flip=False, crop_padding=0, cutout=side, generator=_gen())
    holes = out[:, 0] == 0  # (N, H, W)
    assert torch.equal(holes[:, None].expand_as(out), out == 0)  # the same hole in every channel
    sides = []
    for hole in holes:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(rows) and len(cols), "no pixel was zeroed"
        # a filled axis-aligned rectangle (a square clipped by the image border)
        assert hole.sum() == len(rows) * len(cols)
        assert hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        sides.append((len(rows), len(cols)))
    assert max(max(s) for s in sides) == side, "the hole is larger than cutout"
    assert (side, side) in sides  # unclipped holes are side x side


# ---------------------------------------------------------------------------------------------
# Photos as users have them: orientation, modes, sizes; the storage size and its centre crop
# ---------------------------------------------------------------------------------------------

def _photo_folder(root: Path) -> Path:
    """train/ and test/ of two classes, each image in another mode, size or format."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = colour_image(rng, channel, width=48, height=32)
            Image.fromarray(base).save(folder / "rgb.jpg", quality=95)
            Image.fromarray(base).convert("L").save(folder / "grey.png")
            Image.fromarray(base).convert("P").save(folder / "palette.gif")
            Image.fromarray(base).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
            rgba = Image.fromarray(base).convert("RGBA")
            rgba.putalpha(0)  # fully transparent: laid on white
            rgba.save(folder / "transparent.png")
            Image.fromarray(base).resize((300, 200)).save(folder / "large.webp")
    return root


def test_photos_of_every_mode_are_decoded(tmp_path: Path) -> None:
    data = _load(_photo_folder(tmp_path / "photos"), input_size=16)
    assert data.skipped == 0 and data.train_images.shape == (12, 3, 16, 16)
    transparent = data.train_images[data.train_labels == 0][-1]  # blue: sorted file names, transparent.png last
    assert torch.all(transparent == 255)
    for label, channel in ((0, 2), (1, 0)):  # each class's bright channel survives every format but grey
        colour = [0, 2, 3, 4]  # cmyk.jpg, large.webp, palette.gif, rgb.jpg: not grey.png, transparent.png
        images = data.train_images[data.train_labels == label][colour].double().mean(dim=(0, 2, 3))
        assert int(images.argmax()) == channel


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = 255  # left half white as viewed
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 high, 20 wide on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
    decoded = data_module.decode_image(tmp_path / "photo.jpg", 20)  # shorter side 20: the centre 20x20
    assert decoded.shape == (20, 20, 3)
    assert decoded[:, :8].mean() > 200 and decoded[:, 12:].mean() < 50  # white left, dark right, as viewed


def test_decoding_uses_all_cores_and_skips_unreadable_files(make_image_folder: Callable[..., Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_image_folder(train_per_class=90, test_per_class=3)
    (folder / "train" / "red" / "zz_broken.png").write_bytes(b"not an image")
    workers = []
    original = data_module.ProcessPoolExecutor

    def spy(max_workers, **kwargs):
        workers.append(max_workers)
        return original(max_workers, **kwargs)
    monkeypatch.setattr(data_module, "ProcessPoolExecutor", spy)
    monkeypatch.setattr(data_module.os, "cpu_count", lambda: 2)
    data = _load(folder)
    assert workers[0] == 2  # 270 training images: more than one task per core
    assert data.skipped == 1 and len(data.train_labels) == 270
    reference = torch.from_numpy(np.array(Image.open(folder / "train" / "red" / "red_089.png"))).permute(2, 0, 1)
    assert torch.equal(data.train_images[-1], reference)  # the rows after the skipped file are in place


def test_storage_size_keeps_a_margin_and_evaluation_sees_its_centre(make_image_folder: Callable[..., Path]) -> None:
    folder = make_image_folder(train_per_class=4, test_per_class=1, width=40, height=30)
    stored = load_data("imagefolder", folder, input_size=16, storage_size=24)
    assert stored.image_size == 24 and stored.cache_path.name.startswith("imagefolder-24px-")
    path = sorted((folder / "train" / "blue").iterdir())[0]
    expected = data_module.center_crop(stored.train_images[0], 16).permute(1, 2, 0).numpy()
    assert np.array_equal(data_module.decode_centre(path, storage_size=24, input_size=16), expected)


@pytest.mark.parametrize("input_size, expected", [(16, 16), (32, 32), (64, 64), (224, 256), (96, 110)])
def test_default_storage_size(input_size: int, expected: int) -> None:
    from trainables.config import resolve_storage_size

    assert resolve_storage_size(input_size) == expected


def test_resized_crop_of_the_whole_image_is_the_image() -> None:
    images = torch.rand(4, 3, 12, 12)
    generator = torch.Generator().manual_seed(0)
    same = augment(images, flip=False, crop_padding=0, cutout=0, generator=generator, resized_crop=(1.0, 1.0))
    assert torch.allclose(same, images, atol=1e-5)
    flipped = augment(images, flip=True, crop_padding=0, cutout=0, generator=torch.Generator().manual_seed(1),
                      resized_crop=(1.0, 1.0))
    for image, out in zip(images, flipped):  # each image is itself or its mirror
        assert torch.allclose(out, image, atol=1e-5) or torch.allclose(out, image.flip(2), atol=1e-5)


def test_resized_crop_takes_crops_of_the_scale_asked() -> None:
    """A 64-px image whose pixel value is its column: a crop of area share s has columns spanning
    about sqrt(s) of the width when the ratio is 1."""
    columns = torch.arange(64.0).expand(32, 3, 64, 64).contiguous()
    out = augment(columns, flip=False, crop_padding=0, cutout=0, generator=torch.Generator().manual_seed(0),
                  size=16, resized_crop=(0.25, 1.0))
    assert out.shape == (32, 3, 16, 16)
    spans = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) * 16 / 15 / 64  # fraction of the width covered
    assert spans.min() >= 0.5 - 0.05 and spans.max() <= 1.0 + 1e-4


def test_training_from_the_map_equals_training_from_memory(tiny_config, tiny_splits) -> None:
    from trainables.train import Trainer

    copied = Splits(tiny_splits.images.clone(), tiny_splits.labels.clone(), tiny_splits.train_index,
                    tiny_splits.val_index, tiny_splits.classes, tiny_splits.mean, tiny_splits.std)
    a = Trainer(tiny_config, tiny_splits, device="cpu").fit()
    b = Trainer(tiny_config, copied, device="cpu").fit()
    assert [m.val_loss for m in a] == [m.val_loss for m in b]


def test_the_cache_is_memory_mapped(image_folder: Path) -> None:
    data = _load(image_folder)
    assert data.train_images.untyped_storage().nbytes() == data.train_images.numel()  # no copy...
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if maps:  # ...but the file's pages, mapped
        assert str(data.cache_path / "train_images.npy") in maps
