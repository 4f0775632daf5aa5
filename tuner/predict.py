"""Classify image files with a model folder: preprocessed exactly as the training images were.

Reads weights.safetensors + config.json (runtime torch) or an export (model.pt2, model.onnx,
model.ts); never checkpoint.pt. By default (runtime auto) the export that ships: the first of
pt2, onnx, torchscript that config.json lists, else the weights. Images are decoded by trainables.data.decode_image, the
decoder of the training data, so a model sees the same pixels it was tested on.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import UnidentifiedImageError

from trainables.config import image_sizes
from trainables.data import decode_centre

from .export import (FILES, INPUT_NAME, OUTPUT_NAME, PROGRAMS, ExportError, first_line, load_raw_pixel_model,
                     read_meta, resolve_model_dir)

RUNTIMES = ("auto", "pt2", "onnx", "torchscript", "torch")  # tuner/cli.py's --runtime spells them out too
OUTPUT_FORMATS = ("table", "json", "csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Logits = Callable[[np.ndarray], np.ndarray]  # float32 (N, 3, H, W) RGB 0-255 -> (N, classes) logits


@dataclass(frozen=True)
class Prediction:
    path: str
    classes: list[str]          # top-k, most probable first
    probabilities: list[float]


# ---------------------------------------------------------------------------------------------
# Finding and decoding images
# ---------------------------------------------------------------------------------------------

def find_images(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given (whatever their name: a named file is always tried); folders walked
    recursively for image files, in sorted order, hidden files and folders left out."""
    for path in map(Path, paths):
        if not path.is_dir():
            yield path
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            yield from (Path(root, f) for f in sorted(files)
                        if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))


def _decode(path: Path, size: tuple[int, int]) -> np.ndarray | str:
    """(input, input, 3) uint8 for size (storage, input), or why the file could not be read."""
    if path.exists() and not path.is_file():  # a pipe or a device: reading it could wait forever
        return "not a regular file"
    try:
        return decode_centre(path, storage_size=size[0], input_size=size[1])
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except OSError as error:
        return error.strerror or first_line(error)
    except Exception as error:  # a decoder bug on a hostile file must cost one image, not the run
        return first_line(error)


# ---------------------------------------------------------------------------------------------
# Runtimes: each a function of a float32 RGB 0-255 batch
# ---------------------------------------------------------------------------------------------

def choose_runtime(model_dir: Path, meta: dict) -> str:
    """runtime auto: the export that ships, so predict runs what users deploy. In PROGRAMS order:
    pt2 (torch's own format, on this torch), onnx (when onnxruntime is installed: an optional
    extra), torchscript (a folder exported before pt2 was the default); else the weights. Only
    exports config.json lists: a retrain into the folder rewrites config.json without them, so a
    stale export of earlier weights is never chosen."""
    listed = meta.get("exports", {})
    for name in PROGRAMS:
        if listed.get(name) == FILES[name] and (model_dir / FILES[name]).is_file():
            if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
                continue
            return name
    return "torch"


def load_runtime(model_dir: Path, runtime: str, device: torch.device) -> Logits:
    if runtime == "torch":
        return _torch_runtime(load_raw_pixel_model(model_dir)[0], device)
    path = model_dir / FILES[runtime]
    if not path.is_file():
        raise ExportError(f"--runtime {runtime}: {path} does not exist; "
                          f"run: tune-resnet export {model_dir} --formats {runtime}")
    try:
        if runtime == "onnx":
            return _onnx_runtime(path, device)
        if runtime == "pt2":
            return _torch_runtime(torch.export.load(str(path)).module(), device)
        with warnings.catch_warnings():  # torch >= 2.10 marks torch.jit deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            return _torch_runtime(torch.jit.load(str(path), map_location=device), device)
    except ExportError:
        raise
    except Exception as error:  # a truncated or foreign file
        raise ExportError(f"{path}: cannot load it ({first_line(error)}); "
                          f"re-export: tune-resnet export {model_dir} --formats {runtime}") from None


def _torch_runtime(model: torch.nn.Module, device: torch.device) -> Logits:
    model = model.to(device)

    @torch.inference_mode()
    def logits(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    return logits


def _onnx_runtime(path: Path, device: torch.device) -> Logits:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--runtime onnx needs onnxruntime: pip install 'tune-resnet[export]'") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------

def predict(model_dir: str | os.PathLike, paths: Iterable[str | os.PathLike], *, top_k: int = 1,
            runtime: str = "auto", batch_size: int = 64, device: str | None = None,
            on_skip: Callable[[Path, str], None] | None = None) -> list[Prediction]:
    """Top-k classes per readable image; unreadable ones go to on_skip(path, why) and are left out."""
    model_dir = resolve_model_dir(model_dir)
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    meta = read_meta(model_dir)
    size, classes = image_sizes(meta["config"]), meta["classes"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    logits = load_runtime(model_dir, choose_runtime(model_dir, meta) if runtime == "auto" else runtime, device)
    predictions = []
    for batch_paths, images in _batches(find_images(paths), size, batch_size, on_skip):
        batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)  # NHWC -> NCHW
        probabilities = _softmax(logits(batch))
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions += [Prediction(str(p), [classes[i] for i in row], [float(probs[i]) for i in row])
                        for p, row, probs in zip(batch_paths, top, probabilities)]
    return predictions


def _batches(paths: Iterable[Path], size: tuple[int, int], batch_size: int,
             on_skip: Callable[[Path, str], None] | None) -> Iterator[tuple[list[Path], list[np.ndarray]]]:
    """(paths, decoded images) of up to batch_size files at a time, decoded in threads (PIL
    releases the GIL); the unreadable ones go to on_skip."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = list(pool.map(lambda path: _decode(path, size), chunk))
            for path, image in zip(chunk, decoded):
                if isinstance(image, str) and on_skip:
                    on_skip(path, image)
            keep = [(path, image) for path, image in zip(chunk, decoded) if not isinstance(image, str)]
            if keep:
                yield [path for path, _ in keep], [image for _, image in keep]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------

def format_predictions(predictions: list[Prediction], output_format: str) -> str:
    return {"table": format_table, "json": format_json, "csv": format_csv}[output_format](predictions)


def format_table(predictions: list[Prediction]) -> str:
    """Aligned columns: path, top-1 class, its probability, then the rest of the top k."""
    top_k = max((len(p.classes) for p in predictions), default=1)
    header = ["path", "class", "probability"] + (["top-k"] if top_k > 1 else [])
    rows = [[p.path, p.classes[0], f"{p.probabilities[0]:.4f}"]
            + ([", ".join(f"{c} {q:.4f}" for c, q in zip(p.classes, p.probabilities))] if top_k > 1 else [])
            for p in predictions]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def format_json(predictions: list[Prediction]) -> str:
    return json.dumps([{"path": p.path, "predictions": [{"class": c, "probability": q}
                                                         for c, q in zip(p.classes, p.probabilities)]}
                       for p in predictions], indent=2)


def format_csv(predictions: list[Prediction]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "probability"])
    for p in predictions:
        ranked = enumerate(zip(p.classes, p.probabilities), start=1)
        writer.writerows([p.path, rank, cls, f"{probability:.6f}"] for rank, (cls, probability) in ranked)
    return out.getvalue().rstrip("\n")
