"""Export a trained model folder for use without this project, and load it back without pickle.

    export_model("runs/cifar/best")   # -> model.pt2, model.onnx, labels.txt, README.md, config.json

The programs by default: torch.export's model.pt2 (torch.export.load(...).module()) and ONNX;
TorchScript's model.ts on request (`--formats torchscript`): torch >= 2.10 deprecates torch.jit.

Every export keeps one contract, written to config.json ("input") and the model card:
float32 (N, 3, H, W) RGB pixel values in [0, 255] in, logits (N, classes) out. The training
normalisation is inside the graph, so any runtime feeds decoded pixels and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from trainables.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from trainables.config import TrainConfig, image_sizes
from trainables.models import ResNet, count_macs, count_parameters, create_model
from trainables.run import METRICS_FILE

from .errors import ExportError, first_line
from .storage import BEST_DIR

FORMATS = ("pt2", "onnx", "torchscript", "safetensors")  # pt2: torch.export, TorchScript's successor
DEFAULT_FORMATS = ("pt2", "onnx", "safetensors")           # tuner/cli.py's export --formats spells it out too
PROGRAMS = ("pt2", "onnx", "torchscript")                  # formats holding the graph, not only weights
FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts", "safetensors": WEIGHTS_FILE}
LABELS_FILE = "labels.txt"
CARD_FILE = "README.md"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_OPSET = 17               # onnxruntime >= 1.14 and most other runtimes run it


class RawPixelModel(nn.Module):
    """RGB pixel values in [0, 255] in, logits out: the training normalisation travels with the model."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, H, W) float32 in [0, 255]
        # the same operations as trainables.data.normalize, out of place: an input is never modified
        return self.model((x / 255 - self.mean) / self.std)  # (N, num_classes)


# ---------------------------------------------------------------------------------------------
# Loading: safetensors + JSON only, never checkpoint.pt
# ---------------------------------------------------------------------------------------------

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder (config.json + weights.safetensors), or a search's run folder holding best/."""
    path = Path(path).expanduser()
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise ExportError(f"{path} {problem}; expected a model folder written by tune-resnet "
                          "(RUN_DIR/best or the --out of tune-resnet train)")
    for folder in (path, path / BEST_DIR):
        if (folder / CONFIG_FILE).is_file():
            if not (folder / WEIGHTS_FILE).is_file():
                raise ExportError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; expected both")
            return folder
    raise ExportError(f"{path} has no {CONFIG_FILE}; expected a model folder written by tune-resnet "
                      "(RUN_DIR/best or the --out of tune-resnet train)")


def read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((model_dir / CONFIG_FILE).read_text())
        TrainConfig.from_dict(meta["config"])  # checked when built: a hand-edited "32" is no size
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{model_dir / CONFIG_FILE}: not a tune-resnet model config ({error!r})") from None
    missing = [key for key in ("classes", "num_classes", "mean", "std") if key not in meta]
    if missing:
        raise ExportError(f"{model_dir / CONFIG_FILE}: missing {', '.join(missing)}; "
                          "expected a tune-resnet model config")
    if not isinstance(meta["classes"], list) or len(meta["classes"]) != meta["num_classes"]:
        raise ExportError(f"{model_dir / CONFIG_FILE}: {len(meta['classes'])} class names for "
                          f"num_classes {meta['num_classes']}; expected one name per class (re-export the model)")
    return meta


def load_model(model_dir: str | os.PathLike) -> tuple[ResNet, dict[str, Any]]:
    """(the model in eval mode on CPU, config.json's contents), from weights.safetensors + config.json."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    config = TrainConfig.from_dict(meta["config"])
    try:
        # the .safetensors path, not the folder: load_checkpoint(folder) would prefer checkpoint.pt
        weights = load_checkpoint(model_dir / WEIGHTS_FILE)["model"]
        model = create_model(config.arch, num_classes=meta["num_classes"], depth=config.depth,
                             width=config.width, stem=config.stem, input_size=config.input_size,
                             dropout=config.dropout)
        model.load_state_dict(weights)
    except Exception as error:  # SafetensorError, a config that does not match the weights, ...
        raise ExportError(f"{model_dir}: cannot rebuild the model from {WEIGHTS_FILE} + {CONFIG_FILE}: "
                          f"{first_line(error)}") from None
    return model.eval(), meta


def load_raw_pixel_model(model_dir: str | os.PathLike) -> tuple[RawPixelModel, dict[str, Any]]:
    model, meta = load_model(model_dir)
    return RawPixelModel(model, meta["mean"], meta["std"]).eval(), meta


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ExportError(f"formats: expected a comma-separated list of {', '.join(FORMATS)}, got {text!r}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Writers: one per format, each to the path it is given (export_model stages them all, then
# swaps them in together: a failure or crash mid-export leaves the old files and config)
# ---------------------------------------------------------------------------------------------

def _write_torchscript(model: RawPixelModel, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # torch >= 2.10 marks torch.jit deprecated; it still saves and loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, path)


def _write_onnx(model: RawPixelModel, example: torch.Tensor, path: Path | io.BytesIO) -> None:
    # dynamo=False: the TorchScript-based exporter needs neither onnxscript nor a network
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        target = str(path) if isinstance(path, Path) else path  # a file, or a buffer (onnx_bytes)
        torch.onnx.export(model, (example,), target, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _write_pt2(model: RawPixelModel, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)  # any batch size: the graph must not specialise to the example's 2
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def example_images(size: int) -> torch.Tensor:
    """What the graphs are traced with: two images, so nothing in a graph specialises to a batch of one."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


def onnx_bytes(model: nn.Module, *, mean: Sequence[float], std: Sequence[float], input_size: int) -> bytes:
    """The ONNX program export_model writes for this model (CPU, eval mode), in memory: what a trial
    times (tuner/latency.py) is the graph its export would ship."""
    buffer = io.BytesIO()
    _write_onnx(RawPixelModel(model, mean, std).eval(), example_images(input_size), buffer)
    return buffer.getvalue()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export.save wants a .pt2 ending


WRITERS = {"torchscript": _write_torchscript, "onnx": _write_onnx, "pt2": _write_pt2}
# safetensors needs no writer: weights.safetensors is the source every other export is made from


# ---------------------------------------------------------------------------------------------
# export_model
# ---------------------------------------------------------------------------------------------

def export_model(model_dir: str | os.PathLike, formats: Iterable[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """Write the exports, labels.txt, README.md; update config.json. Returns {format: file}."""
    formats = parse_formats(formats)
    model_dir = resolve_model_dir(model_dir)
    model, meta = load_model(model_dir)
    earlier = _read_metrics(model_dir)  # read before anything is written: a bad file changes nothing
    wrapped = RawPixelModel(model, meta["mean"], meta["std"]).eval()
    size = meta["config"]["input_size"]
    example = example_images(size)
    written = {name: model_dir / FILES[name] for name in formats}
    staged = [name for name in formats if name in WRITERS]
    try:
        for name in staged:
            try:
                WRITERS[name](wrapped, example, _tmp(written[name]))
            except Exception as error:  # a missing exporter dependency, an unsupported operator, ...
                raise ExportError(f"{name} export of {model_dir} failed: {first_line(error)}; "
                                  "the folder's earlier files are unchanged") from None
        for name in staged:  # every format made: now swap them in, then the config that lists them
            os.replace(_tmp(written[name]), written[name])
    finally:  # after a failure, the staged files of the formats made before it
        for name in staged:
            _tmp(written[name]).unlink(missing_ok=True)
    stats = {"parameters": count_parameters(model), "macs_per_image": count_macs(model, size)}
    threads = int(earlier.get("latency_threads") or 1)  # as the search's trials timed it
    meta = {**meta, "latency": _latency(model_dir, meta, formats, size, threads=threads)}
    meta = _update_config(model_dir, meta, model, formats, stats)
    # metrics.json is the training's (trainables.run), read for the card and never rewritten here
    (model_dir / LABELS_FILE).write_text("".join(f"{name}\n" for name in meta["classes"]))
    (model_dir / CARD_FILE).write_text(model_card(meta, {**earlier, **stats}))
    return written


def _latency(model_dir: Path, meta: dict[str, Any], formats: Sequence[str], size: int, *,
             threads: int) -> dict[str, Any] | None:
    """model.onnx timed by ONNX Runtime on the CPU (tuner/latency.py: median ms at batch 1 and 64),
    with as many threads as the search's trials had (metrics.json's latency_threads, else 1); the
    earlier figure when this export wrote no ONNX; None without onnxruntime."""
    if "onnx" not in formats:
        return meta.get("latency") if "onnx" in meta.get("exports", {}) else None
    try:
        import onnxruntime
    except ImportError:
        return None
    from .latency import measure_onnx

    figures = measure_onnx(model_dir / FILES["onnx"], input_size=size, threads=threads)
    return {**figures, "threads": threads, "runtime": f"onnxruntime {onnxruntime.__version__}, CPU"}


def layer_depth(model: ResNet) -> int:
    """Weighted layers on the main path: the stem conv, 2 or 3 convs per block, the classifier."""
    convs_per_block = sum(1 for name, _ in model.layer1[0].named_children() if name.startswith("conv"))
    return 2 + convs_per_block * sum(len(stage) for stage in model.stages)


def input_contract(meta: dict[str, Any]) -> dict[str, Any]:
    size = meta["config"]["input_size"]
    return {"name": INPUT_NAME, "size": size, "shape": ["batch", 3, size, size], "layout": "NCHW",
            "dtype": "float32", "channels": "RGB", "range": [0, 255], "normalised_inside": True,
            "mean": list(meta["mean"]), "std": list(meta["std"]),  # of pixels in [0, 1]: (x/255 - mean)/std
            "resize": f"shorter side to {image_sizes(meta['config'])[0]} px (bilinear), then centre crop {size}x{size}"}


def _update_config(model_dir: Path, meta: dict[str, Any], model: ResNet, formats: Sequence[str],
                   stats: dict[str, int]) -> dict[str, Any]:
    """config.json gains the resolved model, the input/output contract and the export files."""
    config = meta["config"]
    previous = {k: v for k, v in meta.get("exports", {}).items() if (model_dir / v).is_file()}
    meta = {**meta,
            "model": {"arch": config["arch"], "depth": layer_depth(model), "width": model.conv1.out_channels,
                      "stem": config["stem"], "stages": model.num_stages, "num_classes": meta["num_classes"],
                      **stats},
            "input": input_contract(meta),
            "output": {"name": OUTPUT_NAME, "shape": ["batch", meta["num_classes"]], "dtype": "float32",
                       "kind": "logits", "softmax_inside": False},
            "exports": {**previous, **{name: FILES[name] for name in formats}},
            "labels": LABELS_FILE}
    _write_json(model_dir / CONFIG_FILE, meta)
    return meta


def _read_metrics(model_dir: Path) -> dict[str, Any]:
    path = model_dir / METRICS_FILE
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as error:
        raise ExportError(f"{path}: cut off or edited ({first_line(error)}); restore it, or delete it to "
                          "export without the search and test figures") from None
    if not isinstance(metrics, dict):
        raise ExportError(f"{path}: expected a JSON object; restore it, or delete it to export without the "
                          "search and test figures")
    return metrics


def _write_json(path: Path, value: Any) -> None:
    _tmp(path).write_text(json.dumps(value, indent=2))
    os.replace(_tmp(path), path)


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------

def model_card(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    sections = [_card_model(meta, metrics), _card_accuracy(meta, metrics), _card_contract(meta), _card_usage(meta)]
    return "\n\n".join(sections) + "\n"


def _card_model(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    config, model = meta["config"], meta["model"]
    files = ", ".join(f"`{f}` ({name})" for name, f in meta["exports"].items())
    source = config["data_path"] or "torchvision download"
    trained = f"{metrics['train_images']} training images" if metrics.get("train_images") else "training images"
    return "\n".join([
        f"# {config['arch']} image classifier ({meta['num_classes']} classes)", "",
        f"- Architecture: {config['arch']}, depth {model['depth']}, base width {model['width']}, "
        f"{config['stem']} stem, "
        f"{model['stages']} stages",
        f"- Parameters: {model['parameters']:,}",
        f"- MACs per image: {model['macs_per_image']:,} ({config['input_size']}x{config['input_size']} input)",
        *_card_latency(meta, metrics),
        f"- Data: {config['dataset']} ({source}), {trained}, {meta.get('epoch', config['epochs'])} epochs",
        f"- Classes ({meta['num_classes']}, in output order): {', '.join(meta['classes'])}",
        f"- Files: {files}, `{LABELS_FILE}`, `{CONFIG_FILE}` (config, classes, contract), `{METRICS_FILE}`",
    ])


def _card_latency(meta: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The latency measured at export, and the search's figure for the same configuration."""
    timing = meta.get("latency")
    if not timing:
        return []
    threads = f"{timing['threads']} thread{'s' if timing['threads'] > 1 else ''}"
    line = (f"- Latency (`{FILES['onnx']}`, {timing['runtime']}, {threads}, median of repeated runs, measured at "
            f"export): {timing['latency_ms']:.3g} ms per image at batch 1, {timing['latency_ms_b64']:.3g} ms "
            "per batch of 64")
    if metrics.get("search_latency_ms") is not None:
        line += (f"; the search measured {metrics['search_latency_ms']:.3g} ms at batch 1 for this configuration "
                 f"(trial {metrics.get('search_trial_id')})")
    return [line]


def _card_accuracy(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    lines = ["## Accuracy", ""]
    if metrics.get("search_val_acc") is not None:
        lines.append(f"- Search validation accuracy (best trial): {metrics['search_val_acc']:.4f}")
    if metrics.get("val_acc") is not None:
        lines.append(f"- Validation accuracy: {metrics['val_acc']:.4f}")
    test = metrics.get("test")
    if not test:
        lines.append("- Test accuracy: not measured (trained without a refit, which tests once)")
        return "\n".join(lines)
    lines += [f"- Test accuracy: {test['accuracy']:.4f} on {test['images']} images (evaluated once, after the refit)",
              "", "| class | precision | recall |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} |" for name, v in test["per_class"].items()]
    return "\n".join(lines)


def _card_contract(meta: dict[str, Any]) -> str:
    contract = meta["input"]
    mean = ", ".join(f"{v:.4f}" for v in contract["mean"])
    std = ", ".join(f"{v:.4f}" for v in contract["std"])
    return "\n".join([
        "## Input and output", "",
        f"- Input `{INPUT_NAME}`: float32 `(N, 3, {contract['size']}, {contract['size']})`, NCHW, RGB, "
        "pixel values in [0, 255]; any batch size N.",
        f"- Preprocessing before the model: decode to RGB, resize the shorter side to {contract['size']} px "
        "(bilinear), centre-crop to a square. Nothing else.",
        f"- Normalisation is inside the model: `(x / 255 - mean) / std` with mean ({mean}) and std ({std}).",
        f"- Output `{OUTPUT_NAME}`: float32 `(N, {meta['num_classes']})` logits in the order of `{LABELS_FILE}`; "
        "apply softmax for probabilities.",
    ])


def _card_usage(meta: dict[str, Any]) -> str:
    """A snippet per program in the folder (pt2, onnx, torchscript), each runnable without tune-resnet."""
    size = meta["input"]["size"]
    prepare = (f'image = ImageOps.fit(Image.open("image.jpg").convert("RGB"), ({size}, {size}), Image.BILINEAR)'
               "  # ~ training's resize + centre crop")
    head = ["from PIL import Image, ImageOps", f'classes = open("{LABELS_FILE}").read().splitlines()', prepare]
    torch_x = "x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float()  # RGB 0-255"
    snippets = {
        "pt2": ("With plain PyTorch (torch.export; no tune-resnet needed):",
                ["import numpy as np, torch", *head, f'model = torch.export.load("{FILES["pt2"]}").module()',
                 torch_x, "print(classes[model(x).argmax(1).item()])"]),
        "onnx": ("With onnxruntime:",
                 ["import numpy as np, onnxruntime as ort", *head,
                  f'session = ort.InferenceSession("{FILES["onnx"]}")',
                  "x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None]  # RGB 0-255",
                  f'print(classes[session.run(None, {{"{INPUT_NAME}": x}})[0].argmax()])']),
        "torchscript": ("With TorchScript (deprecated by torch 2.10+, still loads):",
                        ["import numpy as np, torch", *head, f'model = torch.jit.load("{FILES["torchscript"]}")',
                         torch_x, "print(classes[model(x).argmax(1).item()])"]),
    }
    lines = ["## Use", ""]
    for name in (n for n in PROGRAMS if n in meta["exports"]):
        title, code = snippets[name]
        lines += [title, "", "```python", *code, "```", ""]
    return "\n".join([*lines, "Or with tune-resnet, preprocessing exactly as in training (the first of "
                      f"{', '.join(FILES[n] for n in PROGRAMS)} listed here, else {WEIGHTS_FILE}):", "", "```sh",
                      "tune-resnet predict --model . IMAGE_OR_FOLDER... --top-k 3", "```"])
