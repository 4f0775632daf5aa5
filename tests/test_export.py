"""Export and prediction: every export reproduces the trained model; predict preprocesses as training did.

One tiny model is trained (refit=True) and exported once per module; the tests read it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import trainables.run as run_module
import tuner.predict as predict_module
from trainables.checkpoint import CHECKPOINT_FILE, load_checkpoint
from trainables.config import TrainConfig
from trainables.data import ImageData, decode_image, normalize
from trainables.run import run_training
from trainables.train import Trainer
from tuner.cli import main
from search_spaces._spec import ExportSpec
from tuner.export import DEFAULT_FORMATS, FORMATS, export_model, load_raw_pixel_model
from tuner.predict import RUNTIMES
from tuner.refit import refit, refit_config

ATOL = 1e-4  # logits; the exports run the same float32 operations, in another order at most


# ---------------------------------------------------------------------------------------------
# Fixtures: one refit model, exported in every format
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(image_data: ImageData, tiny_config: TrainConfig, tmp_path_factory: pytest.TempPathFactory):
    """The refit model in memory (the Trainer) and on disk, exported: model_dir, trainer, metrics."""
    trainers: list[Trainer] = []

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    model_dir = tmp_path_factory.mktemp("refit") / "best"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "Trainer", RecordingTrainer)
        # ema: exports must ship the weight average, the model that was tested, not the raw weights
        metrics = run_training(tiny_config.replace(epochs=3, ema=0.5), out_dir=model_dir, data=image_data,
                               refit=True, device="cpu")
    export_model(model_dir, formats=FORMATS)
    trainer = trainers[0]
    trainer.final_model.eval()
    return SimpleNamespace(model_dir=model_dir, trainer=trainer, metrics=metrics, data=image_data)


def _in_memory_logits(trained, images: torch.Tensor) -> torch.Tensor:
    """The trained model as training evaluated it: uint8 images normalised outside the model."""
    trainer = trained.trainer
    with torch.inference_mode():
        return trainer.final_model(normalize(images, trainer.mean, trainer.std))


@pytest.fixture(scope="module")
def expected(trained, image_folder: Path) -> dict[str, str]:
    """{path of a test image: the in-memory model's class}, decoding the files as predict does."""
    paths = sorted((image_folder / "test").rglob("*.png"))
    images = torch.from_numpy(np.stack([decode_image(p, 16) for p in paths])).permute(0, 3, 1, 2)
    assert torch.equal(images, trained.data.test_images)  # the same pixels the refit was tested on
    classes = trained.data.classes
    return {str(p): classes[i] for p, i in zip(paths, _in_memory_logits(trained, images).argmax(1).tolist())}


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Exports reproduce the model
# ---------------------------------------------------------------------------------------------

def _exported_logits(model_dir: Path, export: str, batch: torch.Tensor) -> torch.Tensor:
    if export == "safetensors":
        return load_raw_pixel_model(model_dir)[0](batch)
    if export == "torchscript":
        return torch.jit.load(str(model_dir / "model.ts"))(batch)
    if export == "pt2":
        return torch.export.load(str(model_dir / "model.pt2")).module()(batch)
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("export", FORMATS)
def test_export_reproduces_the_in_memory_model(trained, export: str) -> None:
    images = trained.data.test_images  # uint8 (18, 3, 16, 16)
    expected = _in_memory_logits(trained, images)
    for count in (1, 7, len(images)):  # traced/exported with 2 images: the batch axis must be free
        with torch.inference_mode():
            got = _exported_logits(trained.model_dir, export, images[:count].float())  # RGB 0-255 in
        torch.testing.assert_close(got, expected[:count], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated in torch 2.10+, still works
def test_torchscript_loads_with_plain_torch(trained, tmp_path: Path) -> None:
    code = ("import sys, json, torch\n"
            f"model = torch.jit.load({str(trained.model_dir / 'model.ts')!r})\n"
            "x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255\n"
            "ours = sorted(m for m in sys.modules if m.split('.')[0] in ('trainables', 'tuner', 'search_spaces'))\n"
            "print(json.dumps({'logits': model(x).tolist(), 'ours': ours}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["ours"] == []
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        expected = trained.trainer.final_model((x / 255 - trained.trainer.mean) / trained.trainer.std)
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, atol=ATOL, rtol=0)


def test_model_card_snippets_run_without_this_project(trained, expected, tmp_path: Path) -> None:
    """The card's plain-torch and onnxruntime snippets, run as written on one test image."""
    card = (trained.model_dir / "README.md").read_text()
    snippets = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
    assert len(snippets) == 3  # one per program in the folder: pt2, onnx, torchscript
    folder = shutil.copytree(trained.model_dir, tmp_path / "model")
    path = next(iter(expected))
    shutil.copy(path, folder / "image.jpg")  # a PNG by content: PIL goes by content, not name
    check = "import sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('trainables', 'tuner')]\n"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", "\n".join(snippets) + check], cwd=folder,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected[path]] * 3


def test_config_metrics_labels_and_card(trained) -> None:
    folder, data = trained.model_dir, trained.data
    meta = json.loads((folder / "config.json").read_text())
    assert meta["classes"] == data.classes == (folder / "labels.txt").read_text().splitlines()
    assert meta["input"] | {"mean": None, "std": None} == {
        "name": "images", "size": 16, "shape": ["batch", 3, 16, 16], "layout": "NCHW", "dtype": "float32",
        "channels": "RGB", "range": [0, 255], "normalised_inside": True, "mean": None, "std": None,
        "resize": "shorter side to 16 px (bilinear), then centre crop 16x16"}
    assert meta["input"]["mean"] == pytest.approx(trained.trainer.mean.flatten().tolist())
    assert meta["exports"] == {"torchscript": "model.ts", "onnx": "model.onnx",
                               "safetensors": "weights.safetensors", "pt2": "model.pt2"}
    assert all((folder / name).is_file() for name in meta["exports"].values())
    assert TrainConfig.from_dict(meta["config"]).stem == "cifar"  # resolved, never 'auto'
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["macs_per_image"] == _macs_by_hand(trained.trainer.model, 16)
    parameters = sum(p.numel() for p in trained.trainer.model.parameters())
    assert metrics["parameters"] == meta["model"]["parameters"] == parameters
    assert metrics["test_acc"] == trained.metrics["test_acc"] and set(metrics["test"]["per_class"]) == set(data.classes)
    card = (folder / "README.md").read_text()
    for text in ("cifar_resnet, depth 8, base width 4", f"{metrics['macs_per_image']:,}", "| blue |",
                 f"Test accuracy: {metrics['test_acc']:.4f} on 18 images", "pixel values in [0, 255]",
                 'torch.export.load("model.pt2").module()', 'torch.jit.load("model.ts")',
                 'ort.InferenceSession("model.onnx")'):
        assert text in card


def _macs_by_hand(model: torch.nn.Module, size: int) -> int:
    """Convolution and linear multiply-adds counted from layer shapes, independently of FlopCounterMode."""
    macs = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(output.numel() * k)
        else:
            macs.append(output.numel() * module.in_features)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return sum(macs)


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------

def _parse(output: str, output_format: str) -> dict[str, list[tuple[str, float]]]:
    """{path: [(class, probability), ...]} from any of the three formats."""
    found: dict[str, list[tuple[str, float]]] = {}
    if output_format == "json":
        for item in json.loads(output):
            found[item["path"]] = [(p["class"], p["probability"]) for p in item["predictions"]]
    elif output_format == "csv":
        for row in csv.DictReader(io.StringIO(output)):
            found.setdefault(row["path"], []).append((row["class"], float(row["probability"])))
            assert int(row["rank"]) == len(found[row["path"]])
    else:
        header, *rows = output.splitlines()
        assert header.split() == ["path", "class", "probability"]
        for row in rows:
            path, cls, probability = row.rsplit(None, 2)
            found[path] = [(cls, float(probability))]
    return found


@pytest.mark.parametrize(("output_format", "runtime"), [("table", "torch"), ("json", "onnx"),
                                                         ("csv", "torchscript"), ("json", "pt2"), ("csv", "auto")])
def test_predict_matches_the_model_and_its_test_accuracy(trained, expected, image_folder: Path,
                                                         output_format: str, runtime: str) -> None:
    result = _run("predict", "--model", trained.model_dir, image_folder / "test", "--format", output_format,
                  "--runtime", runtime, "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    found = _parse(result.stdout, output_format)
    assert list(found) == list(expected)  # every image, in walk order
    assert {path: top[0][0] for path, top in found.items()} == expected
    accuracy = np.mean([top[0][0] == Path(path).parent.name for path, top in found.items()])
    assert accuracy == pytest.approx(trained.metrics["test_acc"], abs=1e-6)


@pytest.mark.parametrize("output_format", ["table", "json", "csv"])
def test_predict_top_k(trained, expected, output_format: str) -> None:
    paths = list(expected)[:4]
    result = _run("predict", "--model", trained.model_dir, *paths, "--top-k", "3", "--format", output_format)
    assert result.exit_code == 0, result.output
    if output_format == "table":
        header, *rows = result.stdout.splitlines()
        assert header.split() == ["path", "class", "probability", "top-k"]
        assert [row.split()[1] for row in rows] == [expected[p] for p in paths]
        assert all(row.count(",") == 2 for row in rows)  # three classes in the top-k column
        return
    found = _parse(result.stdout, output_format)
    for path in paths:
        classes, probabilities = zip(*found[path])
        assert classes[0] == expected[path] and sorted(classes) == ["blue", "green", "red"]
        assert list(probabilities) == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_predict_skips_an_unreadable_image(trained, expected, image_folder: Path, tmp_path: Path) -> None:
    images = shutil.copytree(image_folder / "test", tmp_path / "images")
    (images / "red" / "broken.png").write_bytes(b"not a png at all")
    (images / "notes.txt").write_text("not an image name: never tried")
    result = _run("predict", "--model", trained.model_dir, images, "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"skipped {images / 'red' / 'broken.png'}: not an image file PIL can read"]
    found = _parse(result.stdout, "json")
    assert len(found) == len(expected)
    assert {Path(p).relative_to(images).as_posix(): top[0][0] for p, top in found.items()} == \
        {Path(p).relative_to(image_folder / "test").as_posix(): cls for p, cls in expected.items()}


def test_predict_with_nothing_readable_exits_2(trained, tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    result = _run("predict", "--model", trained.model_dir, tmp_path / "broken.jpg", tmp_path / "missing.png")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith("Error: no image could be read")
    assert result.stderr.count("skipped") == 2


def test_a_folder_of_many_unreadable_files_is_counted_not_listed(trained, tmp_path: Path) -> None:
    for i in range(25):
        (tmp_path / f"notes_{i:02d}.jpg").write_text("not an image")
    result = _run("predict", "--model", trained.model_dir, tmp_path)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 12, result.stderr  # 10 named, a count, the error
    assert lines[10] == "skipped 15 more unreadable files"
    assert lines[11].startswith("Error: no image could be read") and "25 unreadable" in lines[11]


# ---------------------------------------------------------------------------------------------
# Safety: no pickle is ever trusted
# ---------------------------------------------------------------------------------------------

class _Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_hostile_checkpoint_is_refused_and_predict_never_reads_it(trained, expected, tmp_path: Path,
                                                                     writer: str) -> None:
    marker = tmp_path / "pwned"
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    hostile = {"model": {}, "config": {}, "payload": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(hostile, model_dir / CHECKPOINT_FILE)
    else:
        (model_dir / CHECKPOINT_FILE).write_bytes(pickle.dumps(hostile, protocol=2))  # torch.load's default
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(model_dir)
    assert not marker.exists()
    path = next(iter(expected))
    result = _run("predict", "--model", model_dir, path, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert _parse(result.stdout, "csv")[path][0][0] == expected[path]
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))  # the control: a plain unpickle runs the payload
    assert (tmp_path / "control").exists()


# ---------------------------------------------------------------------------------------------
# tune-resnet export, and errors
# ---------------------------------------------------------------------------------------------

def test_export_command_reexports_a_run_folder(trained, expected, tmp_path: Path) -> None:
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "run" / "best")
    for name in ("model.ts", "model.onnx", "model.pt2", "labels.txt", "README.md"):
        (model_dir / name).unlink()
    result = _run("export", tmp_path / "run")  # the run folder: its best/ is exported
    assert result.exit_code == 0, result.output
    assert all((model_dir / name).is_file() for name in ("model.pt2", "model.onnx", "labels.txt", "README.md"))
    assert not (model_dir / "model.ts").exists()  # TorchScript only on request
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["exports"] == {"pt2": "model.pt2", "onnx": "model.onnx", "safetensors": "weights.safetensors"}
    card = (model_dir / "README.md").read_text()
    assert 'torch.export.load("model.pt2").module()' in card and "torch.jit" not in card
    result = _run("export", model_dir, "--formats", "torchscript")
    assert result.exit_code == 0, result.output
    assert json.loads((model_dir / "config.json").read_text())["exports"] == {
        "pt2": "model.pt2", "onnx": "model.onnx", "safetensors": "weights.safetensors", "torchscript": "model.ts"}
    assert 'torch.jit.load("model.ts")' in (model_dir / "README.md").read_text()
    path = next(iter(expected))
    result = _run("predict", "--model", tmp_path / "run", path, "--runtime", "onnx", "--format", "csv")
    assert result.exit_code == 0 and _parse(result.stdout, "csv")[path][0][0] == expected[path]


def test_the_cli_spells_out_the_export_modules_defaults() -> None:
    """The CLI names them without importing tuner.export (torch): the same values, checked here."""
    options = {p.name: p for p in main.commands["export"].params + main.commands["predict"].params}
    assert options["formats"].default == ",".join(DEFAULT_FORMATS) == ",".join(ExportSpec().formats)
    assert tuple(options["runtime"].type.choices) == RUNTIMES and options["runtime"].default == "auto"
    assert DEFAULT_FORMATS == ("pt2", "onnx", "safetensors") and "torchscript" in FORMATS


def _predict_recording_runtime(monkeypatch, model_dir: Path, path: str):
    """(the runtime predict loaded, its csv result)."""
    chosen = []
    load = predict_module.load_runtime
    monkeypatch.setattr(predict_module, "load_runtime",
                        lambda folder, runtime, device: chosen.append(runtime) or load(folder, runtime, device))
    result = _run("predict", "--model", model_dir, path, "--format", "csv")
    assert result.exit_code == 0, result.output
    return chosen[0], _parse(result.stdout, "csv")[path][0][0]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize(("case", "runtime"), [("every export", "pt2"), ("no pt2 file", "onnx"),
                                               ("no pt2, no onnxruntime", "torchscript"),
                                               ("old folder: model.ts and onnx", "onnx"),
                                               ("old folder: model.ts alone", "torchscript"),
                                               ("retrained: exports unlisted", "torch")])
def test_predict_auto_runs_the_first_export_listed(trained, expected, tmp_path: Path, monkeypatch, case: str,
                                                   runtime: str) -> None:
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    if case.startswith("no pt2"):
        (model_dir / "model.pt2").unlink()  # config.json still lists it
    if case == "no pt2, no onnxruntime":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name == "onnxruntime" else find_spec(name, *args))
    if case.startswith("old folder"):  # exported before pt2 was the default
        (model_dir / "model.pt2").unlink()
        kept = {"torchscript": "model.ts", "safetensors": "weights.safetensors"}
        if case.endswith("and onnx"):
            kept["onnx"] = "model.onnx"
        else:
            (model_dir / "model.onnx").unlink()
        _edit_config(model_dir, lambda meta: meta.update(exports=kept))
    if case.startswith("retrained"):  # save_weights rewrites config.json without exports: those files are stale
        _edit_config(model_dir, lambda meta: meta.pop("exports"))
    path = next(iter(expected))
    assert _predict_recording_runtime(monkeypatch, model_dir, path) == (runtime, expected[path])


def _edit_config(model_dir: Path, edit) -> Path:
    meta = json.loads((model_dir / "config.json").read_text())
    edit(meta)
    (model_dir / "config.json").write_text(json.dumps(meta))
    return model_dir


@pytest.mark.parametrize("problem", ["missing", "no config", "bad format", "no onnx export", "classes cut",
                                     "size as text", "config key gone"])
def test_user_mistakes_end_in_one_line_and_exit_2(trained, image_folder: Path, tmp_path: Path, problem: str) -> None:
    image = next((image_folder / "test").rglob("*.png"))
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    (model_dir / "model.onnx").unlink()
    if problem == "classes cut":  # config.json edited by hand
        _edit_config(model_dir, lambda meta: meta.update(classes=meta["classes"][:1]))
    elif problem == "size as text":
        _edit_config(model_dir, lambda meta: meta["config"].update(input_size=str(meta["config"]["input_size"])))
    elif problem == "config key gone":
        _edit_config(model_dir, lambda meta: meta.pop("mean"))
    args, message = {
        "missing": (["predict", "--model", tmp_path / "nope", image], "does not exist"),
        "no config": (["predict", "--model", image_folder, image], "has no config.json"),
        "bad format": (["export", model_dir, "--formats", "onnx,tflite"], "formats: expected"),
        "no onnx export": (["predict", "--model", model_dir, image, "--runtime", "onnx"], "tune-resnet export"),
        "classes cut": (["predict", "--model", model_dir, image], "expected one name per class"),
        "size as text": (["predict", "--model", model_dir, image], "input_size: expected int"),
        "config key gone": (["export", model_dir], "missing mean"),
    }[problem]
    result = _run(*args)
    assert result.exit_code == 2
    assert len(result.output.splitlines()) == 1 and message in result.output, result.output
    assert _run("export", tmp_path / "nope").exit_code == 2


# ---------------------------------------------------------------------------------------------
# The refit: tests once, then exports
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("refit_run", [True, False])
def test_refit_evaluates_the_test_split_exactly_once(image_data: ImageData, tiny_config: TrainConfig,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     refit_run: bool) -> None:
    calls: list[torch.Tensor] = []
    evaluate = Trainer._evaluate  # every evaluation, validation and test, goes through it

    def spy(self, data):
        calls.append(data.images)
        return evaluate(self, data)
    monkeypatch.setattr(Trainer, "_evaluate", spy)
    run_training(tiny_config, out_dir=tmp_path, data=image_data, refit=refit_run, device="cpu")
    test = image_data.test_images
    on_test = [x for x in calls if x.shape == test.shape and torch.equal(x.cpu(), test)]
    assert len(on_test) == (1 if refit_run else 0)
    # a plain run validates every epoch; a refit has no validation split left: the test is all
    assert len(calls) == (1 if refit_run else tiny_config.epochs)


def test_refit_exports_and_keeps_the_search_figures(image_folder: Path, tiny_config: TrainConfig,
                                                    tmp_path: Path) -> None:
    metrics = refit(str(tmp_path), config=refit_config(tiny_config, {"lr": 0.05}, epochs=1),
                    val_acc=0.75, formats=("safetensors",))
    best = tmp_path / "best"
    saved = json.loads((best / "metrics.json").read_text())
    assert saved["search_val_acc"] == 0.75 and saved["test_acc"] == metrics["test_acc"]
    assert saved["macs_per_image"] > 0 and saved["parameters"] == metrics["parameters"]
    assert json.loads((best / "config.json").read_text())["exports"] == {"safetensors": "weights.safetensors"}
    assert (best / "labels.txt").read_text().splitlines() == ["blue", "green", "red"]
    assert "Search validation accuracy (best trial): 0.7500" in (best / "README.md").read_text()
    assert not (best / "model.onnx").exists()


def test_export_with_a_cut_off_metrics_file_changes_nothing(trained, tmp_path: Path) -> None:
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    (model_dir / "metrics.json").write_text('{"test_acc": 0.9, "cut')
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    result = _run("export", model_dir)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert "metrics.json: cut off or edited" in result.output
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before  # no export half-written


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_predict_skips_a_named_pipe_instead_of_waiting_on_it(trained, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    result = _run("predict", "--model", trained.model_dir, tmp_path / "pipe.jpg")
    assert result.exit_code == 2 and "skipped" in result.stderr and "not a regular file" in result.stderr


def test_an_export_that_fails_partway_changes_nothing(trained, tmp_path: Path, monkeypatch) -> None:
    """TorchScript is made first; when the ONNX exporter then fails, the folder keeps its earlier
    model.ts and config.json (the files a reader pairs), and no staged file is left behind."""
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "best")
    weights = model_dir / "weights.safetensors"
    before = {path.name: path.read_bytes() for path in model_dir.iterdir()}
    # new weights (as after another refit), so a new model.ts would differ from the old one
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)

    def broken_exporter(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise RuntimeError("Exporting the operator 'aten::mystery' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    result = _run("export", model_dir, "--formats", "torchscript,onnx")
    assert result.exit_code == 2, result.output
    assert "onnx export of" in result.output and "aten::mystery" in result.output
    assert "earlier files are unchanged" in result.output
    assert "Traceback" not in result.output
    after = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.name != "weights.safetensors"}
    assert after == {name: data for name, data in before.items() if name != "weights.safetensors"}
    monkeypatch.undo()
    result = _run("export", model_dir, "--formats", "torchscript,onnx")  # the exporter works again: all swapped in
    assert result.exit_code == 0, result.output
    assert (model_dir / "model.ts").read_bytes() != before["model.ts"]
    assert (model_dir / "model.onnx").read_bytes() != before["model.onnx"]
    assert not list(model_dir.glob(".*.tmp*"))
