"""A search from start to end: space -> data cache -> Ray Tune (Optuna + ASHA) -> tables -> refit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from search_spaces import SearchSpec, build_sampler, load_space
from trainables.config import (AUGMENTS, FREEZE_STRATEGIES, OPTIMIZERS, SCHEDULES, STEMS, TrainConfig,
                               check_config, field_names)
from trainables.data import load_data
from trainables.models import list_models

from . import _ray, results
from .progress import Progress
from .refit import refit_best

# Set by the space's sections or by the search itself, never sampled as a param.
MANAGED = ("dataset", "data_path", "input_size", "val_fraction", "train_subset", "pretrained", "epochs", "seed")


class SearchError(click.ClickException):
    """A user mistake: one line, exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class SearchOptions:
    space: str
    gpus: int | None = None
    gpus_per_trial: float | None = None
    cpus: int | None = None
    cpus_per_trial: float | None = None
    num_samples: int | None = None
    max_epochs: int | None = None
    max_concurrent: int | None = None
    data: str | None = None
    train_subset: int | None = None
    seed: int | None = None
    name: str | None = None
    storage: str = "runs"
    address: str | None = None
    resume: bool = False
    dry_run: bool = False
    refit: bool = True
    verbose: bool = False


# ---------------------------------------------------------------------------------------------
# 1) the space and the base config
# ---------------------------------------------------------------------------------------------

def load_spec(options: SearchOptions) -> SearchSpec:
    allowed = {"arch": list_models(), "freeze": FREEZE_STRATEGIES, "optimizer": OPTIMIZERS,
               "schedule": SCHEDULES, "augment": AUGMENTS, "stem": STEMS}
    names = [n for n in field_names() if n not in MANAGED]
    spec = load_space(options.space, param_names=names, allowed_values=allowed)
    return spec.with_overrides(num_samples=options.num_samples, max_epochs=options.max_epochs,
                               seed=options.seed, gpus=options.gpus_per_trial, cpus=options.cpus_per_trial,
                               data_path=options.data, train_subset=options.train_subset)


def base_config(spec: SearchSpec) -> dict[str, Any]:
    """Everything a trial gets besides its sampled params; paths made absolute before Ray starts."""
    data_path = str(Path(spec.data.path).expanduser().resolve()) if spec.data.path else None
    pretrained = spec.model.pretrained
    if pretrained and not pretrained.startswith("torchvision"):
        pretrained = str(Path(pretrained).expanduser().resolve())
    base = {**spec.fixed, "dataset": spec.data.dataset, "data_path": data_path,
            "input_size": spec.data.input_size, "val_fraction": spec.data.val_fraction,
            "train_subset": spec.data.train_subset, "pretrained": pretrained,
            "epochs": spec.budget.max_epochs, "seed": spec.sampler.seed}
    try:
        check_config(TrainConfig.from_dict(base))
    except (TypeError, ValueError) as error:
        raise SearchError(f"{options_source(spec)}: fixed: {error}") from None
    return base


def options_source(spec: SearchSpec) -> str:
    return getattr(spec, "_source", spec.name)


# ---------------------------------------------------------------------------------------------
# 2) resources
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    notice: str | None = None


def plan_resources(spec: SearchSpec, options: SearchOptions, cluster: _ray.Cluster) -> Resources:
    """Per-trial CPUs/GPUs and how many trials run at once; refuse what no node can give."""
    cpus = spec.trial.cpus
    total_gpus = cluster.gpus if options.gpus is None else options.gpus
    if options.gpus is not None and cluster.gpus and options.gpus > cluster.gpus:
        raise SearchError(f"--gpus: {options.gpus} asked, but the cluster has {cluster.gpus:g}; "
                          f"pass --gpus {cluster.gpus:g} or fewer")
    gpus = spec.trial.gpus
    gpus = (1.0 if total_gpus else 0.0) if gpus == "auto" else float(gpus)
    notice = None
    if gpus and not cluster.gpus:
        notice, gpus = "no GPU found: trials run on the CPU", 0.0
    if gpus > cluster.max_gpus_per_node and cluster.gpus:
        raise SearchError(f"trial.gpus: {gpus:g} GPUs per trial, but no node has more than "
                          f"{cluster.max_gpus_per_node:g}; ask for {cluster.max_gpus_per_node:g} or fewer")
    if cpus > cluster.cpus:
        raise SearchError(f"trial.cpus: {cpus:g} CPUs per trial, but the cluster has {cluster.cpus:g}")
    by_cpu = int(cluster.cpus // cpus)
    by_gpu = int(total_gpus // gpus) if gpus else by_cpu
    concurrent = max(1, min(by_cpu, by_gpu, spec.budget.num_samples))
    if options.max_concurrent:
        concurrent = min(concurrent, options.max_concurrent)
    return Resources(cpus, gpus, concurrent, notice)


# ---------------------------------------------------------------------------------------------
# 3) the search
# ---------------------------------------------------------------------------------------------

def storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def dry_run(spec: SearchSpec, options: SearchOptions) -> None:
    for line in spec.describe():
        click.echo(line)
    click.echo(f"trials: {spec.budget.num_samples}, up to {spec.budget.max_epochs} epochs each "
               f"(ASHA grace {spec.budget.grace_period}, reduction {spec.budget.reduction_factor:g})")
    click.echo(f"resources per trial: {spec.trial.cpus:g} CPU, {spec.trial.gpus} GPU; "
               f"total GPUs: {'all that Ray sees' if options.gpus is None else options.gpus}")
    click.echo(f"run folder: {storage_root(options.storage)}/{options.name or spec.name}")


def run(options: SearchOptions) -> dict[str, Any]:
    spec = load_spec(options)
    base = base_config(spec)
    if options.dry_run:
        dry_run(spec, options)
        return {}
    data = load_data(base["dataset"], base["data_path"], input_size=base["input_size"])
    click.echo(f"data: {len(data.train_labels)} train / {len(data.test_labels)} test images, "
               f"{len(data.classes)} classes, {data.image_size}px (cache {data.cache_path})")
    cluster = _ray.start(address=options.address, num_cpus=options.cpus,
                         num_gpus=options.gpus if options.address is None and options.gpus else None,
                         verbose=options.verbose)
    resources = plan_resources(spec, options, cluster)
    if resources.notice:
        click.echo(resources.notice)
    plan = make_plan(spec, options, base, resources)
    run_dir = _ray.experiment_path(plan)
    resume = options.resume and _resume_possible(plan)
    click.echo(f"{'resuming' if resume else 'searching'}: {spec.budget.num_samples} trials, "
               f"{resources.max_concurrent} at a time ({resources.cpus_per_trial:g} CPU, "
               f"{resources.gpus_per_trial:g} GPU each) -> {run_dir}")
    progress = Progress(metric=plan.metric, mode=plan.mode, max_epochs=plan.max_epochs)
    try:
        grid = _ray.run_search(plan, callbacks=[_ray.ProgressCallback(progress)], resume=resume)
    except KeyboardInterrupt:
        raise SearchError(f"interrupted: state saved in {run_dir}; continue with the same command plus --resume")
    found = results.collect(_ray.records(grid), metric=plan.metric, mode=plan.mode,
                            max_epochs=plan.max_epochs, num_samples=plan.num_samples)
    _save_space(spec, run_dir, base, plan)
    results.write(found, run_dir)
    for line in results.format_summary(found.summary):
        click.echo(line)
    if options.refit and found.summary["best_trial_id"] is not None:
        refit_best(run_dir, found, spec, base)
    return found.summary


def _resume_possible(plan: _ray.SearchPlan) -> bool:
    if _ray.can_resume(plan):
        return True
    click.echo(f"--resume: nothing to resume at {_ray.experiment_path(plan)}; starting a new search")
    return False


def make_plan(spec: SearchSpec, options: SearchOptions, base: dict, resources: Resources) -> _ray.SearchPlan:
    sampler = build_sampler(spec.sampler, params=spec.params, concurrency=resources.max_concurrent)
    return _ray.SearchPlan(
        name=options.name or spec.name, storage=storage_root(options.storage),
        define_by_run=spec.define_by_run(), sampler=sampler, metric=spec.objective.metric,
        mode=spec.objective.mode, num_samples=spec.budget.num_samples, max_epochs=spec.budget.max_epochs,
        grace_period=spec.budget.grace_period, reduction_factor=spec.budget.reduction_factor,
        time_limit_s=spec.budget.time_limit_s, max_concurrent=resources.max_concurrent,
        cpus_per_trial=resources.cpus_per_trial, gpus_per_trial=resources.gpus_per_trial,
        base_config=base, cache_dir=os.environ.get("TUNE_RESNET_CACHE"), verbose=options.verbose)


def _save_space(spec: SearchSpec, run_dir: str, base: dict, plan: _ray.SearchPlan) -> None:
    """search.json: what refit/export/status need later, without the original YAML at hand."""
    if "://" in run_dir:
        return
    record = {"space": spec.model_dump(mode="json"), "base_config": base,
              "metric": plan.metric, "mode": plan.mode, "max_epochs": plan.max_epochs}
    Path(run_dir, "search.json").write_text(json.dumps(record, indent=2, default=str))

