from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import optuna
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from search_spaces._errors import _AtKey, short_repr, to_space_error
from search_spaces._objective import (LATENCY_METRICS, MEASURED_METRICS, METRIC_MODES, TRAINING_METRICS, Constraint,
                                      PickRule, parse_constraint, parse_pick)
from search_spaces._params import ParamSpec, check_not_float_string, grid_space, order_params

ParamsSpec = Mapping[str, ParamSpec]

# ---------------------------------------------------------------- sections

_BEST_MODE = {"val_acc": "max", "val_loss": "min"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Section):
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagefolder: the caller knows which it supports
    path: str | None = None  # a folder or an archive; --data overrides
    val_fraction: float = Field(0.1, gt=0, lt=1)  # of the training split, held out for the search
    train_subset: PositiveInt | None = None  # training examples; None = all
    input_size: PositiveInt = 32  # pixels, square: what the model sees
    storage_size: PositiveInt | None = None  # pixels the images are cached at (None: 256 for 224, equal up to 64)


class ModelSpec(_Section):
    pretrained: str | None = None  # None, "torchvision", or a path to an exported model


class MetricSpec(_Section):
    """One objective: a metric and its mode (`latency_ms` alone means `{metric: latency_ms, mode: min}`)."""

    metric: Literal["val_acc", "val_loss", "params", "macs", "latency_ms", "latency_ms_b64"]
    mode: Literal["max", "min"]

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        data = {"metric": data} if isinstance(data, str) else data
        if not isinstance(data, dict):
            raise ValueError(f"expected a metric ({', '.join(METRIC_MODES)}) or {{metric: ..., mode: ...}}, "
                             f"got {short_repr(data)}")
        if "mode" not in data and "mode" not in data and data.get("metric") in METRIC_MODES:
            return {**data, "mode": METRIC_MODES[data["metric"]]}
        return data

    @model_validator(mode="after")
    def _check_mode(self) -> MetricSpec:
        if self.mode != METRIC_MODES[self.metric]:
            raise _AtKey(("mode",), f"expected '{METRIC_MODES[self.metric]}' for {self.metric}, got '{self.mode}'")
        return self


class ObjectiveSpec(_Section):
    """`{metric: val_acc, mode: max}`, or several objectives, `{metrics: [val_acc, latency_ms]}`
    (Optuna's multi-objective samplers; ASHA judges the first, which is val_acc or val_loss), with
    optional constraints on any metric (`constraints: ["latency_ms <= 5"]`)."""

    metric: Literal["val_acc", "val_loss"] = "val_acc"  # the first objective: what ASHA judges
    mode: Literal["max", "min"] = "max"
    metrics: tuple[MetricSpec, ...] = ()  # several objectives, `metric` first; empty: `metric` alone
    constraints: tuple[str, ...] = ()  # "METRIC <= NUMBER" (or <, >=, >): feasible trials hold them all

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        # `{metric: val_loss}` alone must not be maximised; `metrics` sets metric and mode from its first.
        if isinstance(data, list):
            raise _AtKey((), "expected a mapping, {metric: val_acc} or {metrics: [val_acc, latency_ms]}, got a "
                             "list; put the list under metrics")
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("metrics"), (list, tuple)) and data["metrics"]:
            first = MetricSpec.model_validate(data["metrics"][0]) if _is_metric(data["metrics"][0]) else None
            if first is not None and first.metric in TRAINING_METRICS:  # else the after-validator says why
                _check_agrees(data, first)
                return {**data, "metric": first.metric, "mode": first.mode}
        if "mode" not in data:
            return {**data, "mode": _BEST_MODE.get(data.get("metric", "val_acc"), "max")}
        return data

    @model_validator(mode="after")
    def _check_mode(self) -> ObjectiveSpec:
        if self.mode != _BEST_MODE[self.metric]:
            raise _AtKey(("mode",), f"expected '{_BEST_MODE[self.metric]}' for {self.metric}, got '{self.mode}'")
        names = [m.metric for m in self.metrics]
        if names and names[0] not in TRAINING_METRICS:
            raise _AtKey(("metrics", "0"), f"expected {' or '.join(TRAINING_METRICS)} first (ASHA judges the "
                                           f"first objective), got {names[0]!r}")
        for index, name in enumerate(names):
            if name in names[:index]:
                raise _AtKey(("metrics", str(index)), f"{name!r} is listed twice; expected each metric once")
        return self

    @field_validator("constraints")
    @classmethod
    def _check_constraints(cls, constraints: tuple[str, ...]) -> tuple[str, ...]:
        for index, text in enumerate(constraints):
            try:
                parse_constraint(text)
            except ValueError as err:
                raise _AtKey((str(index),), str(err)) from None
        return constraints

    @property
    def objectives(self) -> tuple[MetricSpec, ...]:
        """Every objective, the one ASHA judges first."""
        return self.metrics or (MetricSpec(metric=self.metric, mode=self.mode),)

    @property
    def several(self) -> bool:
        return len(self.objectives) > 1

    @property
    def parsed_constraints(self) -> tuple[Constraint, ...]:
        return tuple(parse_constraint(text) for text in self.constraints)


def _is_metric(item: Any) -> bool:
    """A first entry of `metrics` that validates; a bad one is left for the field's own error."""
    try:
        MetricSpec.model_validate(item)
    except (ValidationError, ValueError):
        return False
    return True


def _check_agrees(data: dict[str, Any], first: MetricSpec) -> None:
    """`metric`/`mode` next to `metrics` (as search.json writes it back) must be the first metric's."""
    for key in ("metric", "mode"):
        if key in data and data[key] != getattr(first, key):
            raise _AtKey((key,), f"{data[key]!r} but metrics starts with {getattr(first, key)!r}; "
                                 "expected metrics alone (its first is the one ASHA judges)")


class BudgetSpec(_Section):
    num_samples: PositiveInt = 16  # trials
    max_epochs: PositiveInt = 10  # per trial; ASHA's max_t
    grace_period: PositiveInt = 1  # epochs a trial runs before ASHA may stop it
    reduction_factor: float = Field(3, gt=1)  # ASHA keeps 1/reduction_factor at each rung
    time_limit_s: PositiveFloat | None = None  # wall clock for the whole search

    @model_validator(mode="after")
    def _check_grace(self) -> BudgetSpec:
        if self.grace_period > self.max_epochs:
            raise _AtKey(("grace_period",), f"expected <= max_epochs ({self.max_epochs}), got {self.grace_period}")
        return self


class SamplerSpec(_Section):
    type: Literal["tpe", "random", "cmaes", "qmc", "grid", "gp", "nsga2"] = "tpe"
    seed: int = 0  # same seed, same sampled configurations
    n_startup_trials: NonNegativeInt | None = None  # tpe/cmaes/gp random warm-up; None = Optuna's default
    multivariate: bool = True  # tpe only
    population_size: int | None = Field(None, ge=2)  # nsga2 only: trials per generation; None = Optuna's 50
    # tpe only: past this many trials, TPE models the best `window // 5` and the latest rest, so a
    # sample costs the same at trial 1,000 as at 300 (bench/many_trials.py); null: every trial
    window: PositiveInt | None = 300


class TrialSpec(_Section):
    cpus: PositiveFloat = 1  # per trial
    gpus: int | float | Literal["auto"] = 0  # per trial; a fraction shares one GPU
    hook: str | None = None  # module:callable, called by each trial at its start and epochs' ends (tuner/hooks.py)
    hook_args: dict[str, Any] = {}  # keyword arguments the hook is called with

    @field_validator("hook")
    @classmethod
    def _check_hook(cls, hook: str | None) -> str | None:
        if hook is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", hook):
            raise ValueError(f"expected module:callable (e.g. my_hooks:EpochLog), got {short_repr(hook)}")
        return hook

    @model_validator(mode="after")
    def _check_hook_args(self) -> TrialSpec:
        if self.hook_args and not self.hook:
            raise _AtKey(("hook_args",), "given without trial.hook")
        return self

    @field_validator("gpus", mode="before")
    @classmethod
    def _check_gpus(cls, gpus: Any) -> Any:
        if gpus == "auto":
            return gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0:
            raise ValueError(f"expected a number >= 0 or 'auto', got {short_repr(gpus)}")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"expected a fraction <= 1 or a whole number, got {gpus}")
        return gpus


class RefitSpec(_Section):
    epochs: PositiveInt | None = None  # None = budget.max_epochs
    warm_start: bool = False


class SelectionSpec(_Section):
    """Which configuration the refit gets. top_k > 1: the search's top_k distinct configurations
    are trained `repeats` more times each with fresh seeds (and so fresh validation splits), as
    trials of their own, without early stopping, and the best mean over those runs wins
    (tuner/confirm.py); top_k: 1 takes the search's best trial as it is."""

    top_k: PositiveInt = 1
    repeats: PositiveInt = 2  # fresh runs per confirmed configuration
    # which trial the refit takes: "best METRIC [with METRIC <= NUMBER [and ...]]" (tuner/pareto.py);
    # None: the best by the first objective among the trials that hold objective.constraints
    pick: str | None = None

    @field_validator("pick")
    @classmethod
    def _check_pick(cls, pick: str | None) -> str | None:
        if pick is not None:
            parse_pick(pick)  # its ValueError names what was expected
        return pick

    @property
    def pick_rule(self) -> PickRule | None:
        return parse_pick(self.pick) if self.pick is not None else None


class ExportSpec(_Section):
    # pt2: torch.export (torch.export.load(...).module()); torchscript on request: torch 2.10+ deprecates torch.jit
    formats: tuple[Literal["pt2", "onnx", "torchscript", "safetensors"], ...] = ("pt2", "onnx", "safetensors")


class TrackingSpec(_Section):
    """Where the search is logged besides its run folder (tuner/tracking.py). mlflow: a tracking URI
    (http://host:5000, sqlite:///mlflow.db, databricks, ...; --mlflow overrides); None: no MLflow."""

    mlflow: str | None = None
    experiment: str | None = None  # the MLflow experiment; None: the space's name
    registered_model: str | None = None  # the refit's model is registered under this name (MLflow Model Registry)

    @field_validator("mlflow", "experiment", "registered_model")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a non-empty string, got ''")
        return value


# ---------------------------------------------------------------- the spec

# with_overrides() keyword -> "section.field"
_OVERRIDES = {
    "num_samples": "budget.num_samples", "max_epochs": "budget.max_epochs", "grace_period": "budget.grace_period",
    "time_limit_s": "budget.time_limit_s", "seed": "sampler.seed", "sampler": "sampler.type",
    "cpus": "trial.cpus", "gpus": "trial.gpus", "data_path": "data.path", "train_subset": "data.train_subset",
    "pretrained": "model.pretrained", "mlflow": "tracking.mlflow",
}  # fmt: skip


class SearchSpec(_Section):
    """A validated search-space file. Build one with load_space() or parse_space()."""

    name: str
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    budget: BudgetSpec = BudgetSpec()
    sampler: SamplerSpec = SamplerSpec()
    trial: TrialSpec = TrialSpec()
    selection: SelectionSpec = SelectionSpec()
    refit: RefitSpec = RefitSpec()
    export: ExportSpec = ExportSpec()
    tracking: TrackingSpec = TrackingSpec()
    params: dict[str, ParamSpec]  # ordered parents first, so one pass samples them
    fixed: dict[str, Any] = {}  # passed to every trial unchanged
    _source: str = PrivateAttr("<space>")  # for error messages raised after loading

    @field_validator("params")
    @classmethod
    def _order_params(cls, params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not params:
            raise ValueError("expected at least one parameter, got none")
        return order_params(params)

    @field_validator("fixed")
    @classmethod
    def _check_fixed(cls, fixed: dict[str, Any]) -> dict[str, Any]:
        for name, value in fixed.items():
            for item in value if isinstance(value, list) else [value]:
                try:
                    check_not_float_string(item)
                except ValueError as err:
                    raise _AtKey((name,), str(err)) from None
        return fixed

    @model_validator(mode="after")
    def _check_grid(self) -> SearchSpec:
        if self.sampler.type == "grid":
            try:
                grid_space(self.params)
            except _AtKey as err:
                raise _AtKey(("params", *err.key), err.message) from None
        return self

    @model_validator(mode="after")
    def _check_objectives(self) -> SearchSpec:
        several = self.objective.several
        if self.sampler.type == "cmaes" and several:
            raise _AtKey(("sampler", "type"), "cmaes optimises one objective; expected tpe, nsga2, gp, random, "
                                              "qmc or grid with several objectives")
        if self.selection.top_k > 1 and (several or self.selection.pick):
            what = "several objectives" if several else "selection.pick"
            raise _AtKey(("selection", "top_k"), f"expected 1 with {what} (confirming the top configurations "
                                                 f"of a Pareto front is not built yet), got {self.selection.top_k}")
        return self

    @property
    def measured_metrics(self) -> tuple[str, ...]:
        """The metrics besides training's that the objectives, constraints and pick name: each trial
        measures these once (tuner/latency.py for latency)."""
        pick = self.selection.pick_rule
        named = [m.metric for m in self.objective.objectives] + [c.metric for c in self.objective.parsed_constraints]
        named += [pick.metric, *(c.metric for c in pick.constraints)] if pick else []
        if any(name in LATENCY_METRICS for name in named):  # one timing session measures both batch sizes
            named += LATENCY_METRICS
        return tuple(name for name in MEASURED_METRICS if name in named)

    @property
    def selects(self) -> bool:
        """Whether the refit's trial comes from a rule (several objectives, constraints or a pick)
        rather than from the best of one objective: then the summary holds a front and a pick."""
        return self.objective.several or bool(self.objective.constraints) or self.selection.pick is not None

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every active parameter; returns suggested and constant values alike."""
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            if param.is_active(values):
                values[name] = param.suggest(trial, name)
        return values

    def edge_cases(self) -> Iterator[tuple[str, Any, dict[str, Any]]]:
        """(name, value, params) for every value a parameter can take at an edge of its range
        (each choice, both ends of a range), with the parameters it depends on set so that it is
        active and the others at their first edge: what a sampler may draw at worst, for checking
        a space against the trainable before any trial starts."""
        first = {name: param.edges()[0] for name, param in self.params.items()}
        for name, param in self.params.items():
            for value in param.edges():
                forced = {name: value}
                pending = [name]
                while pending:  # its parents, their parents, ...: a value that makes each active
                    for parent, allowed in self.params[pending.pop()].when.items():
                        if parent not in forced:
                            forced[parent] = allowed[0]
                            pending.append(parent)
                params = self.sample(optuna.trial.FixedTrial({**first, **forced}))
                if name in params:
                    yield name, value, params

    def define_by_run(self) -> Callable[[optuna.Trial], dict[str, Any]]:
        """The `space` for Ray's OptunaSearch: suggests, and returns only the active constants."""
        # A partial, not a closure: Ray pickles the searcher (with its space) in checkpoints.
        return functools.partial(_active_constants, self)

    def resolved_config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **params}

    def with_overrides(self, **overrides: Any) -> SearchSpec:
        """A copy with command-line values applied (None = not given), validated again."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            if key not in _OVERRIDES:
                raise TypeError(f"unknown override {key!r}; expected one of {', '.join(_OVERRIDES)}")
            if value is not None:
                section, field = _OVERRIDES[key].split(".")
                sections.setdefault(section, getattr(self, section).model_dump())[field] = value
        budget = sections.get("budget", {})
        if "max_epochs" in budget and overrides.get("grace_period") is None:
            # A shorter run from the command line should not fail on the file's grace period.
            budget["grace_period"] = min(budget["grace_period"], budget["max_epochs"])
        return validate_space({**dict(self), **sections}, self._source)

    def describe(self) -> list[str]:
        """Lines for a --dry-run print."""
        width = max(map(len, self.params))
        lines = [f"space {self.name} ({self._source})", "params:"]
        lines += [f"  {name:<{width}}  {param.describe()}" for name, param in self.params.items()]
        lines += ["fixed:"] + [f"  {name} = {value!r}" for name, value in self.fixed.items()] if self.fixed else []
        for section in ("objective", "budget", "sampler", "trial", "data", "model", "selection", "refit", "export",
                        "tracking"):
            values = getattr(self, section).model_dump()
            lines.append(f"{section}: " + ", ".join(f"{key}={value}" for key, value in values.items()))
        return lines


def _active_constants(spec: SearchSpec, trial: optuna.Trial) -> dict[str, Any]:
    values = spec.sample(trial)
    return {name: value for name, value in values.items() if spec.params[name].kind == "value"}


def validate_space(data: dict[str, Any], source: str) -> SearchSpec:
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as err:
        raise to_space_error(err, source, SearchSpec) from None
    spec._source = source
    return spec
