"""The words of a search's objective: the metrics a trial reports, their modes, constraints
(`latency_ms <= 5`) and the pick rule of `selection.pick` (`best val_acc with latency_ms <= 5`).

Parsing only: what a rule means for a table of trials is tuner/pareto.py's.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

from search_spaces._errors import did_you_mean

# metric -> the mode that makes sense for it (the only one accepted)
METRIC_MODES = {
    "val_acc": "max", "val_loss": "min",  # from training, every epoch; ASHA can judge them
    "params": "min",                      # weights of the model
    "macs": "min",                        # multiply-accumulates of one image
    "latency_ms": "min",                  # ms per image at batch 1, ONNX Runtime on the CPU (tuner/latency.py)
    "latency_ms_b64": "min",              # ms per batch of 64, the same way
}  # fmt: skip
TRAINING_METRICS = ("val_acc", "val_loss")  # the first objective is one of these: ASHA judges it
MEASURED_METRICS = ("params", "macs", "latency_ms", "latency_ms_b64")  # measured once per trial
LATENCY_METRICS = ("latency_ms", "latency_ms_b64")

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}  # fmt: skip
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CONSTRAINT = re.compile(rf"\s*(\w+)\s*(<=|>=|<|>)\s*({_NUMBER})\s*")
_PICK = re.compile(r"\s*best\s+(\w+)(?:\s+with\s+(.+?))?\s*")


@dataclass(frozen=True)
class Constraint:
    """metric op bound, e.g. latency_ms <= 5."""

    metric: str
    op: str
    bound: float

    def holds(self, value: float) -> bool:
        return _COMPARE[self.op](value, self.bound)

    def violation(self, value: float | None) -> float:
        """Optuna's constraint value: <= 0 when the constraint holds, above 0 by how much it fails
        (a missing or NaN value fails: inf)."""
        if value is None or math.isnan(value):
            return math.inf
        excess = value - self.bound if self.op in ("<=", "<") else self.bound - value
        # `< 5` at exactly 5 fails: the smallest normal step above 0 (denormals may be flushed to 0)
        return excess if self.holds(value) or excess > 0 else math.ulp(max(abs(self.bound), 1.0))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class PickRule:
    """best <metric> [with <constraint> [and <constraint> ...]]."""

    metric: str
    constraints: tuple[Constraint, ...] = ()

    def __str__(self) -> str:
        return f"best {self.metric}" + (" with " + " and ".join(map(str, self.constraints)) if self.constraints else "")


def _check_metric(name: str) -> str:
    if name not in METRIC_MODES:
        raise ValueError(f"unknown metric {name!r}{did_you_mean(name, METRIC_MODES)}; "
                         f"expected one of {', '.join(METRIC_MODES)}")
    return name


def parse_constraint(text: str) -> Constraint:
    """'latency_ms <= 5' -> Constraint; ValueError saying what was expected."""
    match = _CONSTRAINT.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected 'METRIC <= NUMBER' (or <, >=, >), e.g. 'latency_ms <= 5', got {text!r}")
    return Constraint(_check_metric(match[1]), match[2], float(match[3]))


def parse_pick(text: str) -> PickRule:
    """'best val_acc with latency_ms <= 5 and params <= 1e6' -> PickRule; ValueError otherwise."""
    match = _PICK.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected 'best METRIC' or 'best METRIC with METRIC <= NUMBER [and ...]', "
                         f"e.g. 'best val_acc with latency_ms <= 5', got {text!r}")
    parts = re.split(r"\s+and\s+", match[2]) if match[2] else []
    return PickRule(_check_metric(match[1]), tuple(parse_constraint(part) for part in parts))
