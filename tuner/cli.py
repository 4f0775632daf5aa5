"""tune-resnet: search, train, refit and prepare data for ResNet image classifiers.

Imports here are light (click, yaml, the torch-free trainables.config): `tune-resnet -h` and
`status` load neither torch, Ray nor Optuna. A command imports what it needs when it runs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import time
from pathlib import Path

import click
import yaml

from trainables.config import DATASETS, FREEZE_STRATEGIES, IMAGENET_ARCHS, OPTIMIZERS, SCHEDULES, TrainConfig

from .errors import SearchError, check_writable, user_error


def torch_command(command):
    """A command that runs a model: denormals flushed before its first parallel op (worker threads
    inherit the mode). Not in the group's callback, which runs before `search -h` is parsed and for
    `status`; `data prepare` decodes to uint8, where no denormal arises, and goes without."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from trainables.train import flush_denormals

        flush_denormals()
        return command(*args, **kwargs)
    return wrapper


class OneLineErrors(click.Group):
    """Where the project's errors become what a user sees: a user's mistake (tuner.errors.UserError,
    the lower packages' own, click's usage errors, a path that cannot be read or written, a full
    disk) is one line and its exit code, never a traceback; anything else is a bug and shows whole."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        with _one_line(ctx):
            return super().invoke(ctx)


class _Exit(click.ClickException):
    """A UserError as click shows it: 'Error: <one line>', then its exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


@contextlib.contextmanager
def _one_line(ctx: click.Context):
    try:
        yield
    except click.UsageError as error:
        if isinstance(error, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # a bare group: its help
            raise
        where = error.ctx.command_path if error.ctx else ctx.command_path
        raise _Exit(f"{error.format_message()} (see {where} -h)") from None
    except OSError as error:
        raise _os_error(error) from None
    except Exception as error:
        mistake = user_error(error)  # ours, or SpaceError, DataError, PretrainedError from below
        if mistake is None:
            raise
        raise _Exit(str(mistake), mistake.exit_code) from None


def _os_error(error: OSError) -> Exception:
    if error.errno == errno.ENOSPC:
        return _Exit(f"disk full writing {error.filename or 'results'}: free space, or point --storage (and "
                     "TUNE_RESNET_CACHE) at a larger disk, then run again with --resume")
    if error.filename is None:  # not about a path the user gave: a fault, shown whole
        return error
    what = error.strerror or str(error).splitlines()[0]
    return _Exit(f"{error.filename}: {what}; check the path and its permissions (--data, --storage, --out, "
                 "TUNE_RESNET_CACHE)")


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Find, train and ship ResNet image classifiers: Ray Tune trials, Optuna samplers, ASHA."""


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------

@main.command()
@click.option("--space", required=True, type=click.Path(dir_okay=False), help="Search-space YAML file.")
@click.option("--gpus", type=click.IntRange(min=0), help="Total GPUs to use [default: all that Ray sees].")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), help="GPUs per trial; a fraction shares one.")
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs for an embedded Ray [default: all].")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), help="CPUs per trial.")
@click.option("--num-samples", type=click.IntRange(min=1), help="Number of trials.")
@click.option("--max-epochs", type=click.IntRange(min=1), help="Epochs a trial may run at most.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Trials at once [default: as resources allow].")
@click.option("--data", type=click.Path(), help="Image folder, archive or CIFAR batches folder.")
@click.option("--train-subset", type=click.IntRange(min=1), help="Train on a stratified subset of N images.")
@click.option("--seed", type=int, help="Sampler and data-split seed.")
@click.option("--name", help="Run name [default: the space's name].")
@click.option("--storage", default="runs", help="Folder or URI (s3://, gs://) the run lands in.")
@click.option("--address", help="Join a running Ray cluster ('auto'); by default Ray starts embedded.")
@click.option("--resume", is_flag=True, help="Continue an interrupted search (same --name and --storage).")
@click.option("--dry-run", is_flag=True, help="Print the resolved space, trials and resources, then exit.")
@click.option("--refit/--no-refit", default=True, help="Refit the best configuration on train+val and test it.")
@click.option("--mlflow", metavar="URI", help="Log the search, its trials and the refit's model to MLflow at URI "
              "(http://host:5000, sqlite:///mlflow.db, ...) [default: the space's tracking.mlflow]; "
              "pip install 'tune-resnet[mlflow]'.")
@click.option("-v", "--verbose", is_flag=True, help="Ray's full output.")
@torch_command
def search(**kwargs) -> None:
    """Search hyperparameters over a YAML space; refit and test the best configuration."""
    from .search import SearchOptions, run

    start = time.monotonic()
    run(SearchOptions(**kwargs), say=click.echo, warn=functools.partial(click.echo, err=True))
    click.echo(f"done in {time.monotonic() - start:.0f} s")


@main.command("refit")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--epochs", type=click.IntRange(min=1), help="Refit epochs [default: the space's].")
@click.option("--pick", type=click.IntRange(min=0),
              help="Refit entry N of the Pareto front the summary lists [default: selection.pick, else the best].")
@click.option("--mlflow", metavar="URI", help="Log the refit as a run with its model to MLflow at URI, under the "
              "search's run there when it has one [default: the space's tracking.mlflow].")
@torch_command
def refit_command(run_dir: str, epochs: int | None, pick: int | None, mlflow: str | None) -> None:
    """Refit the best configuration of a finished search (its best, the confirmed pick, or the one --pick names) on train+val; test it once."""
    from trainables.finetune import check_model

    from . import results, storage, tracking
    from .pareto import choice
    from .refit import refit, refit_config, search_metrics

    record, summary = results.read_record(run_dir), results.read_summary(run_dir)
    tracked = record.space.get("tracking") or {}
    uri = mlflow or tracked.get("mlflow")
    tracking.check_installed(uri)
    if not summary.found:
        raise SearchError(f"{run_dir}: no trial of this search gave a result, so there is nothing to refit")
    chosen = choice(summary, pick)
    if chosen is None:
        raise SearchError(f"{run_dir}: selection.pick {summary.pick['rule']!r}: {summary.pick['why']}; "
                          "refit a trial of the front with --pick N")
    try:  # the config the refit would train, checked before it starts
        config = refit_config(record.base_config, chosen.config, epochs or record.refit_epochs)
        check_model(config)
    except (TypeError, ValueError) as error:
        raise SearchError(f"{run_dir}: the chosen configuration cannot be trained: {error}") from None
    click.echo(f"refit: trial {chosen.trial_id}, by the {chosen.reason}")
    threads = int(max(1, record.space.get("trial", {}).get("cpus", 1)))
    warn = functools.partial(click.echo, err=True)
    log = tracking.SearchLog(uri, warn, what="refit")
    log.attach(experiment=tracked.get("experiment") or record.space.get("name") or "tune-resnet",
               run_dir=str(Path(run_dir).resolve()), name=Path(run_dir).name)
    metrics = refit(run_dir, config=config, val_acc=chosen.val_acc, formats=record.export_formats, say=click.echo,
                    warn=warn, search_metrics=search_metrics(chosen, threads=threads))
    log.refit(Path(run_dir) / storage.BEST_DIR, metrics, register=tracked.get("registered_model"), say=click.echo)
    log.detach()


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

TRAIN_FLAGS = ("dataset", "data_path", "arch", "depth", "width", "epochs", "batch_size", "lr",
               "optimizer", "schedule", "weight_decay", "label_smoothing", "train_subset", "input_size",
               "pretrained", "freeze", "frozen_stages", "ema", "seed", "compile")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML of training-config values.")
@click.option("--dataset", type=click.Choice(DATASETS))
@click.option("--data", "data_path", type=click.Path(), help="Image folder, archive or CIFAR batches folder.")
@click.option("--arch", help="Model name (resnet20, cifar_resnet, resnet18, ...).")
@click.option("--depth", type=int, help="cifar_resnet depth, 6n+2.")
@click.option("--width", type=int, help="Base width.")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS))
@click.option("--schedule", type=click.Choice(SCHEDULES))
@click.option("--weight-decay", type=float)
@click.option("--label-smoothing", type=float)
@click.option("--train-subset", type=click.IntRange(min=1))
@click.option("--input-size", type=click.IntRange(min=8))
@click.option("--pretrained", help="'torchvision' or a run folder of this project.")
@click.option("--freeze", type=click.Choice(FREEZE_STRATEGIES))
@click.option("--frozen-stages", type=click.IntRange(min=0))
@click.option("--ema", type=click.FloatRange(min=0.0),
              help="Half-life in epochs of a moving average of the weights, which is evaluated and saved (0 = off).")
@click.option("--seed", type=int)
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.")
@click.option("--refit", is_flag=True, help="Train on train+val and evaluate the test split once.")
@click.option("--out", "out_dir", default="runs/train", type=click.Path(file_okay=False), help="Output folder.")
@torch_command
def train(config_file: str | None, refit: bool, out_dir: str, **flags) -> None:
    """Train one configuration; write checkpoint, weights and metrics.json to --out."""
    from tqdm import tqdm

    from trainables.data import check_splits, load_data
    from trainables.run import run_training

    config = _train_config(config_file, flags)
    check_writable(out_dir, "--out")  # before training: hours of it must not be lost at the save
    data = load_data(config.dataset, config.data_path, input_size=config.input_size,
                     storage_size=config.storage_size, progress=True)  # its errors before the bar
    if not refit:
        check_splits(data, val_fraction=config.val_fraction)
    with tqdm(total=config.epochs, desc=config.arch, unit="epoch") as bar:
        def on_epoch(m):
            bar.set_postfix(loss=f"{m.train_loss:.3f}", val_acc=f"{m.val_acc:.4f}", img_s=f"{m.train_images_per_sec:.0f}")
            bar.update()
        metrics = run_training(config, out_dir=out_dir, data=data, refit=refit, on_epoch=on_epoch)
    shown = {k: metrics.get(k) for k in ("epochs", "val_acc", "val_loss", "test_acc", "train_images_per_sec")}
    click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items() if v is not None))
    click.echo(f"saved to {Path(out_dir).resolve()}")


def _train_config(config_file: str | None, flags: dict) -> TrainConfig:
    from trainables.finetune import check_model

    values = {}
    if config_file:
        try:
            values = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SearchError(f"--config: cannot read {config_file}: {error}") from None  # with line and column
        if not isinstance(values, dict):
            raise SearchError(f"--config: {config_file}: expected a mapping of training-config keys")
    values.update({k: v for k, v in flags.items() if v is not None})
    if values.get("data_path"):
        values["data_path"] = str(Path(values["data_path"]).expanduser().resolve())
    try:
        config = TrainConfig.from_dict(values)  # validated as it is built
        check_model(config)  # the pretrained start is there, the freeze fits the model
    except (TypeError, ValueError) as error:
        raise SearchError(f"{config_file or 'train'}: {error}") from None
    return config


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

@main.group()
def data() -> None:
    """Data cache commands."""


@data.command("prepare")
@click.option("--dataset", type=click.Choice(DATASETS), default="cifar10")
@click.option("--data", "data_path", type=click.Path(), help="Image folder, archive or CIFAR batches folder.")
@click.option("--input-size", type=click.IntRange(min=8), default=32)
@click.option("--storage-size", type=click.IntRange(min=8), help="Cached side [default: input size up to 64 px, else 8/7 of it].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1)
@click.option("--seed", type=int, default=0)
@click.option("--weights", "weights_archs", multiple=True, type=click.Choice(IMAGENET_ARCHS),
              help="Download torchvision's ImageNet weights for this arch into torch's hub cache "
                   "(repeatable); given without --dataset/--data, only the weights are fetched.")
@click.pass_context
def prepare(ctx: click.Context, dataset: str, data_path: str | None, input_size: int, storage_size: int | None,
            val_fraction: float, seed: int, weights_archs: tuple[str, ...]) -> None:
    """Decode the images once into the tensor cache and fetch pretrained weights (run it on every
    node of a cluster)."""
    from trainables.finetune import fetch_torchvision_weights

    for arch in weights_archs:
        click.echo(f"weights: {arch} -> {fetch_torchvision_weights(arch)}")
    given = {name: ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
             for name in ("dataset", "data_path")}
    if weights_archs and not any(given.values()):  # `data prepare --weights resnet50`: no dataset asked for
        return
    _prepare_data(dataset, data_path, input_size=input_size, storage_size=storage_size,
                  val_fraction=val_fraction, seed=seed)


def _prepare_data(dataset: str, data_path: str | None, *, input_size: int, storage_size: int | None,
                  val_fraction: float, seed: int) -> None:
    from trainables.data import load_data, make_splits

    start = time.monotonic()
    found = load_data(dataset, data_path, input_size=input_size, storage_size=storage_size, progress=True)
    elapsed = time.monotonic() - start
    splits = make_splits(found, val_fraction=val_fraction, seed=seed)
    counts = found.train_labels.bincount(minlength=len(found.classes)).tolist()
    click.echo(f"cache: {found.cache_path} ({elapsed:.1f} s)")
    click.echo(f"images: {found.image_size}x{found.image_size}, {len(found.classes)} classes, "
               f"{found.skipped} unreadable files skipped")
    click.echo(f"splits: train {len(splits.train_labels)}, val {len(splits.val_labels)} "
               f"(seed {seed}), test {len(found.test_labels)}")
    click.echo("train images per class: " + ", ".join(f"{c} {n}" for c, n in zip(found.classes, counts)))


# ---------------------------------------------------------------------------------------------
# export, predict
# ---------------------------------------------------------------------------------------------

@main.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--formats", default="pt2,onnx,safetensors",
              help="Comma-separated: pt2 (torch.export), onnx, safetensors, torchscript (deprecated by torch).")
@torch_command
def export_command(run_dir: str, formats: str) -> None:
    """Export a model folder (or RUN_DIR/best) for use without tune-resnet; write a model card."""
    from .export import export_model

    written = export_model(run_dir, formats=formats)
    folder = next(iter(written.values())).parent
    click.echo(f"exported {', '.join(f'{name} ({path.name})' for name, path in written.items())} "
               f"+ labels.txt, README.md to {folder}")


SKIPS_SHOWN = 10


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Model folder (RUN_DIR/best, train --out) or a search's RUN_DIR.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=1, help="Classes shown per image.")
@click.option("--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--runtime", type=click.Choice(["auto", "pt2", "onnx", "torchscript", "torch"]), default="auto",
              help="auto: the first export config.json lists of pt2, onnx, torchscript, else the weights; "
                   "torch: weights.safetensors; the others: the export of that name.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass.")
@torch_command
def predict(model_dir: str, images: tuple[str, ...], top_k: int, output_format: str, runtime: str,
            batch_size: int) -> None:
    """Classify image files and folders (walked recursively), preprocessed as in training."""
    from .predict import format_predictions, predict as predict_images

    skips = []

    def skipped(path: Path, why: str) -> None:  # the first few named; a folder of 10,000 is one count
        skips.append(path)
        if len(skips) <= SKIPS_SHOWN:
            click.echo(f"skipped {path}: {why}", err=True)

    found = predict_images(model_dir, images, top_k=top_k, runtime=runtime, batch_size=batch_size, on_skip=skipped)
    if len(skips) > SKIPS_SHOWN:
        click.echo(f"skipped {len(skips) - SKIPS_SHOWN} more unreadable files", err=True)
    if not found:
        raise SearchError(f"no image could be read among {', '.join(images)}: {len(skips)} unreadable "
                          "(expected image files: JPEG, PNG, ...)")
    click.echo(format_predictions(found, output_format))


# ---------------------------------------------------------------------------------------------
# report, status
# ---------------------------------------------------------------------------------------------

@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@torch_command
def report_command(run_dir: str) -> None:
    """Write RUN_DIR/report.html (plots in RUN_DIR/report/) and RUN_DIR/optuna.journal."""
    from .report import write_report

    path, notes = write_report(run_dir)
    for note in notes:
        click.echo(f"left out: {note}")
    click.echo(f"report: {path} (opens offline); Optuna study: optuna-dashboard {Path(run_dir, 'optuna.journal')}")


@main.command("status")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def status_command(run_dir: str) -> None:
    """One screen on a search, running or finished, read from its folder (safe from another shell)."""
    from .screen import format_status
    from .status import read_status

    for line in format_status(read_status(run_dir)):
        click.echo(line)


if __name__ == "__main__":
    main()
