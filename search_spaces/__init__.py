"""YAML search spaces -> validated specs -> Optuna define-by-run functions and samplers.

Knows YAML, pydantic and Optuna only: never torch, ray or click.
"""

from __future__ import annotations

from search_spaces._errors import SpaceError
from search_spaces._loader import load_space, parse_space
from search_spaces._objective import (LATENCY_METRICS, MEASURED_METRICS, METRIC_MODES, Constraint, PickRule,
                                      parse_constraint, parse_pick)
from search_spaces._params import DISTRIBUTIONS, ParamSpec
from search_spaces._sampler import build_sampler
from search_spaces._spec import (
    BudgetSpec,
    DataSpec,
    ExportSpec,
    TrackingSpec,
    MetricSpec,
    ModelSpec,
    ObjectiveSpec,
    ParamsSpec,
    RefitSpec,
    SamplerSpec,
    SearchSpec,
    SelectionSpec,
    TrialSpec,
)

__all__ = [
    "DISTRIBUTIONS",
    "LATENCY_METRICS",
    "MEASURED_METRICS",
    "METRIC_MODES",
    "BudgetSpec",
    "Constraint",
    "DataSpec",
    "ExportSpec",
    "TrackingSpec",
    "MetricSpec",
    "ModelSpec",
    "ObjectiveSpec",
    "ParamSpec",
    "ParamsSpec",
    "PickRule",
    "RefitSpec",
    "SamplerSpec",
    "SearchSpec",
    "SelectionSpec",
    "SpaceError",
    "TrialSpec",
    "build_sampler",
    "load_space",
    "parse_constraint",
    "parse_pick",
    "parse_space",
]
