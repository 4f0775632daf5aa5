"""Planning a search: the space and the flags in, the configs, resources and Ray plan out.

Pure functions of their inputs (the space, SearchOptions, the Cluster Ray reported): no Ray, no
printing, no files written. tuner/search.py runs the plan; tuner/_ray.py carries it out.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from search_spaces import Constraint, SearchSpec, build_sampler, load_space
from trainables.config import AUGMENTS, FREEZE_STRATEGIES, OPTIMIZERS, SCHEDULES, STEMS, TrainConfig, field_names
from trainables.finetune import PretrainedError, check_model, model_config_of
from trainables.models import list_models, model_macs

from . import hooks
from .errors import SearchError
from .rungs import asha_rungs  # ASHA's arithmetic lives with the rung diagnostics
from .storage import storage_root


@dataclass(frozen=True)
class SearchOptions:
    """The flags of `tune-resnet search` (tuner/cli.py), or a script's equivalent."""

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
    mlflow: str | None = None  # an MLflow tracking URI: overrides the space's tracking.mlflow


@dataclass(frozen=True)
class Cluster:
    """What Ray reports it has (tuner._ray.start)."""

    cpus: float
    gpus: float
    nodes: int
    max_gpus_per_node: float
    embedded: bool
    node_resources: tuple[tuple[float, float], ...] = ()  # (CPUs, GPUs) of each alive node


@dataclass(frozen=True)
class SearchPlan:
    """Everything tuner._ray needs to run the search."""

    name: str
    storage: str                    # absolute folder or URI; the run lands in storage/name
    define_by_run: Callable          # optuna define-by-run space
    sampler: Any                     # an optuna sampler
    metric: str
    mode: str
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    time_limit_s: float | None
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    base_config: TrainConfig        # the sampled params replace its values
    cache_dir: str | None
    verbose: bool
    max_failures: int = 2
    hook: str | None = None                   # trial.hook: module:callable (tuner/hooks.py)
    hook_args: dict[str, Any] | None = None
    metrics: tuple[str, ...] = ()             # several objectives (Optuna's), `metric` first; () = `metric` alone
    modes: tuple[str, ...] = ()
    constraints: tuple[Constraint, ...] = ()  # told to Optuna per trial (Trial.set_constraint)
    measure: tuple[str, ...] = ()             # params, macs, latency_ms...: measured once by each trial
    tracking: Any = None                      # tuner.tracking.Target: each trial logs itself to MLflow

    @property
    def run_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


# ---------------------------------------------------------------------------------------------
# 1) the space and the base config
# ---------------------------------------------------------------------------------------------

# Set by the space's sections or by the search itself, never sampled as a param.
MANAGED = ("dataset", "data_path", "input_size", "storage_size", "val_fraction", "train_subset", "pretrained", "epochs", "seed")


def load_spec(options: SearchOptions) -> SearchSpec:
    allowed = {"arch": list_models(), "freeze": FREEZE_STRATEGIES, "optimizer": OPTIMIZERS,
               "schedule": SCHEDULES, "augment": AUGMENTS, "stem": STEMS}
    names = [n for n in field_names() if n not in MANAGED]
    spec = load_space(options.space, param_names=names, allowed_values=allowed)
    return spec.with_overrides(num_samples=options.num_samples, max_epochs=options.max_epochs,
                               seed=options.seed, gpus=options.gpus_per_trial, cpus=options.cpus_per_trial,
                               data_path=options.data, train_subset=options.train_subset,
                               mlflow=options.mlflow)


def base_config(spec: SearchSpec) -> TrainConfig:
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
        return TrainConfig.from_dict(base)
    except (TypeError, ValueError) as error:
        raise SearchError(f"{getattr(spec, '_source', spec.name)}: fixed: {error}") from None


def check_params(spec: SearchSpec, base: TrainConfig) -> None:
    """Every value the sampler may draw at an edge of a range (each choice, both ends), in the
    base config, must be a config the trainable accepts and a model that builds from its start
    (from scratch, a checkpoint or torchvision's weights) with its freeze strategy:
    `depth: {choice: [8, 9]}` fails here in one line, not later in every trial that draws 9."""
    checked: set[tuple] = set()
    for name, value, params in spec.edge_cases():
        try:
            config = base.replace(**params)
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


def _fails_alike(base: TrainConfig, error: Exception) -> bool:
    """The base config (fixed values and the model's start, no params) fails with the same error."""
    try:
        check_model(base)
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


def plan_resources(spec: SearchSpec, options: SearchOptions, cluster: Cluster) -> Resources:
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
    base = int(base_config(spec).batch_size)
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
    base = base_config(spec)
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


def _check_a_node_fits(cpus: float, gpus: float, cluster: Cluster) -> None:
    """A trial that no single node can hold would wait forever: refuse it now."""
    if not cluster.node_resources or any(c >= cpus and g >= gpus for c, g in cluster.node_resources):
        return
    nodes = ", ".join(f"{c:g} CPU + {g:g} GPU" for c, g in sorted(set(cluster.node_resources), reverse=True))
    raise SearchError(f"trial.cpus: {cpus:g} CPU + {gpus:g} GPU per trial, but no node has that much "
                      f"(nodes: {nodes}); lower trial.cpus or --cpus-per-trial")


# ---------------------------------------------------------------------------------------------
# 3) what --dry-run prints, and the plan for Ray
# ---------------------------------------------------------------------------------------------

def describe(spec: SearchSpec, options: SearchOptions) -> list[str]:
    """--dry-run: the resolved space, the trials and ASHA's rungs, the resources, the run folder."""
    lines = list(spec.describe())
    budget = spec.budget
    rungs = asha_rungs(budget.max_epochs, budget.grace_period, budget.reduction_factor)
    if not rungs:
        asha = "ASHA stops none: grace_period = max_epochs"
    else:
        at = f"epoch {rungs[0]}" if len(rungs) == 1 else f"epochs {', '.join(map(str, rungs[:-1]))} and {rungs[-1]}"
        asha = f"ASHA decides after {at}, keeping the best 1/{budget.reduction_factor:g}"
    lines.append(f"trials: {budget.num_samples}, up to {budget.max_epochs} epochs each ({asha})")
    selection = spec.selection
    if selection.top_k > 1:
        runs = min(selection.top_k, budget.num_samples) * selection.repeats
        lines.append(f"then confirmation: the top {selection.top_k} configurations trained {selection.repeats} more "
                     f"times each with fresh seeds, up to {runs} trials of {budget.max_epochs} epochs "
                     f"({runs * budget.max_epochs} epochs, on top of the search's); the best mean is refit")
    gpus = spec.trial.gpus
    if gpus == "auto":
        share, size = auto_gpus(spec)
        gpus = f"auto (where there are GPUs: {share:g}" + (f"; largest training step {size})" if size else ")")
    lines.append(f"resources per trial: {spec.trial.cpus:g} CPU, {gpus} GPU; "
                 f"total GPUs: {'all that Ray sees' if options.gpus is None else options.gpus}")
    return lines + [f"run folder: {storage_root(options.storage)}/{options.name or spec.name}"]


def make_plan(spec: SearchSpec, options: SearchOptions, base: TrainConfig, resources: Resources) -> SearchPlan:
    if spec.trial.hook:
        hooks.check(spec.trial.hook)  # a name that does not import fails now, not in every trial
    sampler = build_sampler(spec.sampler, params=spec.params, concurrency=resources.max_concurrent)
    return SearchPlan(
        name=run_name(spec, options), storage=storage_root(options.storage),
        define_by_run=spec.define_by_run(), sampler=sampler, metric=spec.objective.metric,
        mode=spec.objective.mode, num_samples=spec.budget.num_samples, max_epochs=spec.budget.max_epochs,
        grace_period=spec.budget.grace_period, reduction_factor=spec.budget.reduction_factor,
        time_limit_s=spec.budget.time_limit_s, max_concurrent=resources.max_concurrent,
        cpus_per_trial=resources.cpus_per_trial, gpus_per_trial=resources.gpus_per_trial,
        base_config=base, cache_dir=os.environ.get("TUNE_RESNET_CACHE"), verbose=options.verbose,
        hook=spec.trial.hook, hook_args=spec.trial.hook_args, **_objectives(spec))


def _objectives(spec: SearchSpec) -> dict[str, Any]:
    """SearchPlan's fields for several objectives, constraints and measured metrics (latency needs onnxruntime)."""
    from .latency import check_available

    check_available(spec.measured_metrics)
    objectives = spec.objective.objectives if spec.objective.several else ()
    return {"metrics": tuple(m.metric for m in objectives), "modes": tuple(m.mode for m in objectives),
            "constraints": spec.objective.parsed_constraints, "measure": spec.measured_metrics}


def run_name(spec: SearchSpec, options: SearchOptions) -> str:
    """The run's folder name inside --storage: --name, else the space's name."""
    name = options.name or spec.name
    if "/" in name or "\\" in name or name in (".", ".."):
        raise SearchError(f"--name {name!r}: expected a plain folder name, the run's folder inside --storage")
    return name
