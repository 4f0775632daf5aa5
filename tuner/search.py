"""A search from start to end: space -> data cache -> Ray Tune (Optuna + ASHA) -> tables -> refit."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from search_spaces import SearchSpec, build_sampler, load_space
from trainables.config import (AUGMENTS, FREEZE_STRATEGIES, OPTIMIZERS, SCHEDULES, STEMS, TrainConfig,
                               check_config, field_names)
from trainables.data import check_source, check_splits, load_data
from trainables.finetune import PretrainedError, check_model, model_config_of
from trainables.models import list_models, model_macs

from . import _ray, results
from .errors import Interrupted, SearchError, SearchFailed, check_writable  # re-exported: their old home
from .progress import Progress
from .refit import BEST_DIR, refit_best
from .report import write_report_safely

# Set by the space's sections or by the search itself, never sampled as a param.
MANAGED = ("dataset", "data_path", "input_size", "storage_size", "val_fraction", "train_subset", "pretrained", "epochs", "seed")


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
            "input_size": spec.data.input_size, "storage_size": spec.data.storage_size,
            "val_fraction": spec.data.val_fraction,
            "train_subset": spec.data.train_subset, "pretrained": pretrained,
            "epochs": spec.budget.max_epochs, "seed": spec.sampler.seed}
    try:
        check_config(TrainConfig.from_dict(base))
    except (TypeError, ValueError) as error:
        raise SearchError(f"{getattr(spec, '_source', spec.name)}: fixed: {error}") from None
    return base


def check_params(spec: SearchSpec, base: dict[str, Any]) -> None:
    """Every value the sampler may draw at an edge of a range (each choice, both ends), in the
    base config, must be a config the trainable accepts and a model that builds from its start
    (from scratch, a checkpoint or torchvision's weights) with its freeze strategy:
    `depth: {choice: [8, 9]}` fails here in one line, not later in every trial that draws 9."""
    checked: set[tuple] = set()
    for name, value, params in spec.edge_cases():
        try:
            config = TrainConfig.from_dict({**base, **params})
            check_config(config)
            model = (config.arch, config.depth, config.width, config.stem, config.input_size, config.dropout,
                     config.pretrained, config.freeze, config.frozen_stages)
            if model not in checked:  # the pretrained start is there, the model builds, the freeze fits it
                check_model(config)
                checked.add(model)
        except (TypeError, ValueError) as error:
            key = str(error).split(":")[0]  # the config's checks name the key they refuse
            if key in params and key in spec.params:  # not always the parameter being tried
                name, value = key, params[key]
            elif key not in spec.params and _fails_alike(base, error):  # whatever the params draw
                section = "model" if key == "pretrained" else "fixed"
                raise SearchError(f"{getattr(spec, '_source', spec.name)}: {section}: {error}") from None
            raise SearchError(f"{getattr(spec, '_source', spec.name)}: params: {name} = {value!r} "
                              f"({spec.params[name].describe()}): {error}; change the range or drop "
                              f"the value") from None


def _fails_alike(base: dict[str, Any], error: Exception) -> bool:
    """The base config (fixed values and the model's start, no params) fails with the same error."""
    try:
        check_model(TrainConfig.from_dict(base))
    except (TypeError, ValueError) as own:
        return str(own) == str(error)
    return False


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
        starting = "" if cluster.embedded else " now (workers still starting? see `ray status`)"
        raise SearchError(f"--gpus: {options.gpus} asked, but the cluster has {cluster.gpus:g}{starting}; "
                          f"pass --gpus {cluster.gpus:g} or fewer")
    gpus, notice = spec.trial.gpus, None
    if gpus == "auto" and total_gpus and cluster.gpus:
        gpus, size = auto_gpus(spec)
        notice = (f"trial.gpus auto: {gpus:g} GPU per trial (the space's largest training step: {size})"
                  if size else None)
    if gpus == "auto" and not cluster.gpus:
        notice = "no GPU found: trials run on the CPU"
    gpus = (1.0 if total_gpus else 0.0) if gpus == "auto" else float(gpus)
    if gpus and not cluster.gpus:
        notice, gpus = "no GPU found: trials run on the CPU", 0.0
    elif gpus and not total_gpus:  # --gpus 0 on a machine with GPUs
        notice, gpus = "--gpus 0: trials run on the CPU", 0.0
    if gpus > cluster.max_gpus_per_node and cluster.gpus:
        raise SearchError(f"trial.gpus: {gpus:g} GPUs per trial, but no node has more than "
                          f"{cluster.max_gpus_per_node:g}; ask for {cluster.max_gpus_per_node:g} or fewer")
    if cpus > cluster.cpus:
        raise SearchError(f"trial.cpus: {cpus:g} CPUs per trial, but the cluster has {cluster.cpus:g}")
    _check_a_node_fits(cpus, gpus, cluster)
    by_cpu = _times(cluster.cpus, cpus)
    by_gpu = _times(total_gpus, gpus) if gpus else by_cpu
    # A trial runs on one node: count what fits node by node (2 nodes of 1 CPU hold no 2-CPU trial).
    by_node = sum(min(_times(c, cpus), _times(g, gpus) if gpus else _times(c, cpus))
                  for c, g in cluster.node_resources) or by_cpu
    concurrent = max(1, min(by_cpu, by_gpu, by_node, spec.budget.num_samples))
    if options.max_concurrent:
        concurrent = min(concurrent, options.max_concurrent)
    return Resources(cpus, gpus, concurrent, notice)


# Trials that share one GPU, by the multiply-accumulates of one training step (the largest model's
# MACs per image x the largest batch): a step of small kernels leaves most of a big GPU idle
# between launches, and other trials fill the gaps. On an H100 (bench/gpu_sharing.py,
# bench/README.md) four trials beat two and one from 5G MACs per step (ResNet-20 w16, batch 128:
# 3.1x one trial's images/s) up to 71G (ResNet-18, batch 128: 3.1x; ResNet-56 w32: 2.8x); at 142G
# (ResNet-18, batch 256) two give 1.6x; at 285G (batch 512) one trial fills the GPU (two: 0.9x).
SHARE_BELOW_STEP_MACS = ((80e9, 4), (160e9, 2))


def trials_per_gpu(step_macs: float | None) -> int:
    for limit, trials in SHARE_BELOW_STEP_MACS:
        if step_macs is not None and step_macs <= limit:
            return trials
    return 1


def auto_gpus(spec: SearchSpec) -> tuple[float, str | None]:
    """trial.gpus: auto where there are GPUs: the GPU share per trial, and the size it follows
    ('5.2G MACs, 40.8M per image x batch 128': one training step; None when unknown, then a GPU each)."""
    macs, batch = largest_model_macs(spec), largest_batch_size(spec)
    if macs is None:
        return 1.0, None
    step = macs * batch
    return 1.0 / trials_per_gpu(step), f"{_macs(step)} MACs, {_macs(macs)} per image x batch {batch}"


def _macs(count: float) -> str:
    return f"{count / 1e9:,.1f}G" if count >= 1e9 else f"{count / 1e6:,.1f}M"


def largest_batch_size(spec: SearchSpec) -> int:
    """The largest batch the space can sample (a choice's largest, a range's upper bound; the
    fixed or default batch too where a condition can leave batch_size out)."""
    base = int(TrainConfig.from_dict(base_config(spec)).batch_size)
    param = spec.params.get("batch_size")
    if param is None:
        return base
    if param.kind == "value":
        values = [param.value]
    elif param.kind == "choice":
        values = list(param.choice)
    else:
        values = [param.bounds[1]]
    return int(max(values + ([base] if param.when else [])))


def largest_model_macs(spec: SearchSpec) -> int | None:
    """MACs per image of the largest model the space can sample (conditions ignored, so an upper
    bound; a pretrained start's own architecture); None when a model parameter is a range rather
    than a list of choices, or the pretrained model cannot be read."""
    base = TrainConfig.from_dict(base_config(spec))
    options: dict[str, list[Any]] = {}
    for key in ("arch", "depth", "width", "stem"):
        param = spec.params.get(key)
        if param is None:
            options[key] = [getattr(base, key)]
        elif param.kind in ("choice", "value"):
            values = list(param.choice) if param.kind == "choice" else [param.value]
            options[key] = values + ([getattr(base, key)] if param.when else [])  # absent sometimes
        else:
            return None
    largest = None
    for values in itertools.product(*options.values()):
        try:
            config = model_config_of(base.replace(**dict(zip(options, values))))
            macs = model_macs(config.arch, depth=config.depth, width=config.width, stem=config.stem,
                              input_size=config.input_size)
        except PretrainedError:
            return None
        except (ValueError, TypeError):  # a combination the conditions exclude (depth of a resnet18)
            continue
        largest = macs if largest is None else max(largest, macs)
    return largest


def _times(have: float, need: float) -> int:
    """How many `need` fit in `have`; Ray counts resources in 1e-4 units, so 1 / 0.1 is 10, not 9."""
    return int(have / need + 1e-6)


def _check_a_node_fits(cpus: float, gpus: float, cluster: _ray.Cluster) -> None:
    """A trial that no single node can hold would wait forever: refuse it now."""
    if not cluster.node_resources or any(c >= cpus and g >= gpus for c, g in cluster.node_resources):
        return
    nodes = ", ".join(f"{c:g} CPU + {g:g} GPU" for c, g in sorted(set(cluster.node_resources), reverse=True))
    raise SearchError(f"trial.cpus: {cpus:g} CPU + {gpus:g} GPU per trial, but no node has that much "
                      f"(nodes: {nodes}); lower trial.cpus or --cpus-per-trial")


# ---------------------------------------------------------------------------------------------
# 3) the search
# ---------------------------------------------------------------------------------------------

def storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def asha_rungs(max_epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """Epochs at which ASHA decides (Ray stops at the first epoch >= grace * factor**k below max_t)."""
    rungs, at = [], float(grace_period)
    while at < max_epochs:
        rungs.append(math.ceil(at - 1e-9))
        at *= reduction_factor
    return rungs


def dry_run(spec: SearchSpec, options: SearchOptions) -> None:
    for line in spec.describe():
        click.echo(line)
    budget = spec.budget
    rungs = asha_rungs(budget.max_epochs, budget.grace_period, budget.reduction_factor)
    if not rungs:
        asha = "ASHA stops none: grace_period = max_epochs"
    else:
        at = f"epoch {rungs[0]}" if len(rungs) == 1 else f"epochs {', '.join(map(str, rungs[:-1]))} and {rungs[-1]}"
        asha = f"ASHA decides after {at}, keeping the best 1/{budget.reduction_factor:g}"
    click.echo(f"trials: {budget.num_samples}, up to {budget.max_epochs} epochs each ({asha})")
    gpus = spec.trial.gpus
    if gpus == "auto":
        share, size = auto_gpus(spec)
        gpus = f"auto (where there are GPUs: {share:g}" + (f"; largest training step {size})" if size else ")")
    click.echo(f"resources per trial: {spec.trial.cpus:g} CPU, {gpus} GPU; "
               f"total GPUs: {'all that Ray sees' if options.gpus is None else options.gpus}")
    click.echo(f"run folder: {storage_root(options.storage)}/{options.name or spec.name}")


def run(options: SearchOptions) -> dict[str, Any]:
    spec = load_spec(options)
    base = base_config(spec)
    check_params(spec, base)
    check_source(base["dataset"], base["data_path"])
    name = options.name or spec.name
    if "/" in name or "\\" in name or name in (".", ".."):
        raise SearchError(f"--name {name!r}: expected a plain folder name, the run's folder inside --storage")
    if "://" not in options.storage:
        check_writable(storage_root(options.storage), "--storage")
        folder = Path(storage_root(options.storage)) / name
        if not options.resume and (folder / "search.json").exists():  # a search ran there: keep it
            raise SearchError(f"--name {name}: {folder} already holds a search; pass --resume to continue it, "
                              "another --name for a new one, or remove the folder")
    if options.dry_run:
        dry_run(spec, options)
        return {}
    data = load_data(base["dataset"], base["data_path"], input_size=base["input_size"],
                     storage_size=base.get("storage_size"), progress=True)
    check_splits(data, val_fraction=base["val_fraction"])  # a split every trial can use
    click.echo(f"data: {len(data.train_labels)} train / {len(data.test_labels)} test images, "
               f"{len(data.classes)} classes, {data.image_size}px (cache {data.cache_path})")
    # Ray detects the GPUs itself (declaring --gpus would invent GPUs a CPU machine lacks);
    # --gpus caps how many of them the search uses.
    cluster = _ray.start(address=options.address, num_cpus=options.cpus, verbose=options.verbose)
    resources = plan_resources(spec, options, cluster)
    if resources.notice:
        click.echo(resources.notice)
    check_cluster_paths(storage_root(options.storage), base, cluster)
    plan = make_plan(spec, options, base, resources)
    run_dir = _ray.experiment_path(plan)
    resume = options.resume and _resume_possible(plan)
    click.echo(f"{'resuming' if resume else 'searching'}: {spec.budget.num_samples} trials, "
               f"{resources.max_concurrent} at a time ({resources.cpus_per_trial:g} CPU, "
               f"{resources.gpus_per_trial:g} GPU each) -> {run_dir}")
    _save_space(spec, run_dir, base, plan)  # first: `tune-resnet status` reads the budget from it
    progress = Progress(metric=plan.metric, mode=plan.mode, max_epochs=plan.max_epochs)
    callbacks = [_ray.ProgressCallback(progress), _ray.PruneCheckpoints(plan.metric, plan.mode),
                 _ray.BackUpState(run_dir)]
    search_started_at = time.time()
    grid = _ray.run_search(plan, callbacks=callbacks, resume=resume)
    found = results.collect(_ray.records(grid), metric=plan.metric, mode=plan.mode,
                            max_epochs=plan.max_epochs, num_samples=plan.num_samples)
    found.summary["search_started_at"] = search_started_at  # for bench/trial_overhead.py
    results.write(found, run_dir)
    if _ray.interrupted(grid, plan):
        raise Interrupted(f"interrupted with {found.summary['trials']} of {plan.num_samples} trials started; "
                          f"state saved in {run_dir}; continue with the same command plus --resume")
    for line in results.format_summary(found.summary):
        click.echo(line)
    if options.refit and found.summary["best_trial_id"] is not None:
        _refit_into_storage(run_dir, found, spec, base)
    write_report_safely(run_dir)  # report.html + optuna.journal; a failure prints one line
    if found.summary["best_trial_id"] is None:
        raise SearchFailed(no_result(found.trials, run_dir))
    return found.summary


def no_result(trials: list[dict[str, Any]], run_dir: str) -> str:
    errors = [t["error"] for t in trials if t.get("error")]
    first = f"; the first error: {errors[0]}" if errors else ""
    return " ".join(f"no trial gave a result: {len(errors)} of {len(trials)} errored{first}; each trial's "
                    f"error.txt is in its folder under {run_dir}".split())


def _resume_possible(plan: _ray.SearchPlan) -> bool:
    repaired = _ray.repair_state(_ray.experiment_path(plan))  # a driver killed while Ray saved its state
    if repaired:
        click.echo(repaired)
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
        base_config=base, cache_dir=os.environ.get("TUNE_RESNET_CACHE"), verbose=options.verbose,
        hook=spec.trial.hook, hook_args=spec.trial.hook_args)


def _save_space(spec: SearchSpec, run_dir: str, base: dict, plan: _ray.SearchPlan) -> None:
    """search.json: what refit/export/status need later, without the original YAML at hand."""
    record = {"space": spec.model_dump(mode="json"), "base_config": base,
              "metric": plan.metric, "mode": plan.mode, "max_epochs": plan.max_epochs}
    results.write_file(run_dir, "search.json", json.dumps(record, indent=2, default=str).encode())


# ---------------------------------------------------------------------------------------------
# 4) on a cluster: every node must see the storage and the inputs
# ---------------------------------------------------------------------------------------------

SHARED_HINT = "on a multi-node cluster use a shared folder (NFS) or a URI such as s3://bucket/runs"


def check_cluster_paths(storage: str, base: dict[str, Any], cluster: _ray.Cluster) -> None:
    """Trials write to --storage and read data.path/model.pretrained on their own node: on a
    multi-node cluster each of those must be there on every node, or trials fail one by one later."""
    if cluster.nodes < 2:
        return
    folder = storage[len("file://"):] if storage.startswith("file://") else storage
    if "://" not in folder:  # a URI other than file:// is the same place from everywhere
        missing = _missing_from_nodes(Path(folder))
        if missing:
            raise SearchError(f"--storage: {storage} is not visible from node {missing[0]}; {SHARED_HINT}")
        click.echo(f"storage: {storage} is visible from all {cluster.nodes} nodes")
    inputs = (("data.path", base.get("data_path")), ("model.pretrained", base.get("pretrained")))
    for key, path in inputs:
        if path and Path(path).is_absolute():  # not 'torchvision', not a download
            missing = _ray.nodes_missing(path)
            if missing:
                raise SearchError(f"{key}: {path} is not visible from node {missing[0]}; put it at the same "
                                  f"path on every node (file_mounts in cluster.yaml) or in a shared folder")


def _missing_from_nodes(folder: Path) -> list[str]:
    """Nodes that do not see a marker file written here, in the storage folder, by the driver."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".visible-{uuid.uuid4().hex}"
    marker.write_text("written by the tune-resnet driver to check that every node sees this folder\n")
    try:
        return _ray.nodes_missing(str(marker))
    finally:
        marker.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# 5) refit: trained and exported in a local folder, then copied to a URI storage
# ---------------------------------------------------------------------------------------------

def _refit_into_storage(run_dir: str, found: results.SearchResults, spec: SearchSpec, base: dict) -> None:
    if "://" not in run_dir:
        refit_best(run_dir, found, spec, base)
        return
    with tempfile.TemporaryDirectory(prefix="tune-resnet-refit-") as local:
        if spec.refit.warm_start:
            found = _with_local_checkpoint(found, f"{local}/warm-start")
        refit_best(local, found, spec, base)
        results.upload(f"{local}/{BEST_DIR}", f"{run_dir}/{BEST_DIR}")
    click.echo(f"uploaded {BEST_DIR}/ to {run_dir}/{BEST_DIR}")


def _with_local_checkpoint(found: results.SearchResults, local: str) -> results.SearchResults:
    """The best trial's checkpoint copied next to the refit, for a warm start from a URI."""
    trials = [dict(t) for t in found.trials]
    for trial in trials:
        if trial["trial_id"] == found.summary["best_trial_id"] and "://" in (trial["checkpoint"] or ""):
            trial["checkpoint"] = results.download(trial["checkpoint"], local)
    return dataclasses.replace(found, trials=trials)

