from __future__ import annotations

import math

import re
from collections.abc import Mapping
from typing import Annotated, Any

import optuna
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from search_spaces._errors import _AtKey, did_you_mean, short_repr

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "value")
_MODIFIERS = ("log", "step", "when")
_RANGES = ("uniform", "loguniform", "int")


# PyYAML follows YAML 1.1: a float needs a dot and a signed exponent, so `1e-4` arrives as a string.
_UNDOTTED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_not_float_string(value: Any) -> Any:
    if isinstance(value, str) and _UNDOTTED_FLOAT.fullmatch(value):
        raise ValueError(f"expected a number written like 1.0e-4 (YAML reads {value} as a string), got {value!r}")
    return value


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return check_not_float_string(value)
    raise ValueError(f"expected a string, number or boolean, got {short_repr(value)}")


# Optuna's categorical distributions take these; anything else fails late, inside a trial.
Scalar = Annotated[Any, BeforeValidator(_scalar)]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class ParamSpec(BaseModel):
    """One searched parameter: a distribution or a constant, and when it exists."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    choice: tuple[Scalar, ...] | None = None
    value: Annotated[Any, BeforeValidator(check_not_float_string)] = None
    log: bool = False  # int only
    step: int | None = Field(None, ge=1)  # int only
    when: dict[str, tuple[Scalar, ...]] = {}  # parent -> values; all parents must match

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, (str, bool, int, float)):
            return {"value": data}  # `epochs: 5` is a constant
        if not isinstance(data, dict):
            raise ValueError(f"expected a distribution such as {{choice: [...]}} or a scalar, got {short_repr(data)}")
        kinds = [key for key in data if key not in _MODIFIERS]
        for key in kinds:
            if key not in DISTRIBUTIONS:
                hint = did_you_mean(key, DISTRIBUTIONS + _MODIFIERS)
                raise _AtKey((), f"unknown distribution {key!r}{hint}; expected one of {', '.join(DISTRIBUTIONS)}")
        if len(kinds) != 1:
            raise _AtKey((), f"expected exactly one of {', '.join(DISTRIBUTIONS)}, got {kinds or 'none'}")
        kind = kinds[0]
        if kind in _RANGES and not (isinstance(data[kind], list) and len(data[kind]) == 2):
            raise _AtKey((kind,), f"expected [low, high], got {short_repr(data[kind])}")
        if kind == "choice" and not (isinstance(data[kind], list) and data[kind]):
            raise _AtKey((kind,), f"expected a non-empty list, got {short_repr(data[kind])}")
        when = data.get("when", {})
        if not isinstance(when, dict):
            raise _AtKey(("when",), f"expected a mapping of parameter to value(s), got {short_repr(when)}")
        return {**data, "when": {key: v if isinstance(v, list) else [v] for key, v in when.items()}}

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        kind = self.kind
        if kind in _RANGES:
            low, high = self.bounds
            if not (math.isfinite(low) and math.isfinite(high)):
                raise _AtKey((kind,), f"expected finite bounds, got [{_fmt(low)}, {_fmt(high)}]")
            if low > high:
                raise _AtKey((kind,), f"expected low <= high, got [{_fmt(low)}, {_fmt(high)}]")
            if kind == "loguniform" and low <= 0:
                raise _AtKey((kind,), f"expected a positive lower bound on a log scale, got {_fmt(low)}")
        for modifier in ("log", "step"):
            if modifier in self.model_fields_set and kind != "int":
                raise _AtKey((modifier,), f"expected only with an int distribution, got {kind}")
        if kind == "int":
            self._check_int()
        if kind == "choice":
            for i, option in enumerate(self.choice):
                if option in self.choice[:i]:
                    raise _AtKey(("choice",), f"expected distinct values, got {option!r} twice")
        for parent, values in self.when.items():
            if not values:
                raise _AtKey(("when", parent), "expected at least one value, got []")
        return self

    def _check_int(self) -> None:
        low, high = self.int_
        if self.log and self.step is not None:
            raise _AtKey(("step",), f"expected no step with log: true, got {self.step}")
        if self.log and low < 1:
            raise _AtKey(("int",), f"expected a lower bound >= 1 on a log scale, got {low}")
        if self.step and (high - low) % self.step:
            raise _AtKey(("step",), f"expected a step that divides high - low ({high - low}), got {self.step}")

    @property
    def kind(self) -> str:
        return next(kind for kind in DISTRIBUTIONS if _field(kind) in self.model_fields_set)

    @property
    def bounds(self) -> tuple[Any, Any]:
        return getattr(self, _field(self.kind))

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """True when every parent was sampled (so is itself active) and took a listed value."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        kind = self.kind
        if kind == "value":
            return self.value
        if kind == "choice":
            return trial.suggest_categorical(name, list(self.choice))
        if kind == "int":
            return trial.suggest_int(name, *self.int_, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, *self.bounds, log=kind == "loguniform")

    def edges(self) -> tuple[Any, ...]:
        """The values a check should try: every choice, both ends of a range, the constant."""
        kind = self.kind
        if kind == "choice":
            return self.choice
        if kind == "value":
            return (self.value,)
        low, high = self.bounds
        return (low,) if low == high else (low, high)

    def can_take(self, value: Any) -> bool:
        kind = self.kind
        if kind == "choice":
            return value in self.choice
        if kind == "value":
            return value == self.value
        if kind == "int":
            low, high = self.int_
            whole = isinstance(value, int) and not isinstance(value, bool)
            return whole and low <= value <= high and (value - low) % (self.step or 1) == 0
        return False  # continuous: order_params() refuses conditions on these

    def describe(self) -> str:
        kind = self.kind
        if kind == "value":
            text = f"= {self.value!r}"
        elif kind == "choice":
            text = f"choice [{', '.join(_fmt(option) for option in self.choice)}]"
        else:
            text = f"{kind} [{_fmt(self.bounds[0])}, {_fmt(self.bounds[1])}]"
            text += " log" if self.log else f" step {self.step}" if self.step else ""
        conditions = [f"{parent} in [{', '.join(map(_fmt, values))}]" for parent, values in self.when.items()]
        return text + (f"  when {' and '.join(conditions)}" if conditions else "")


def _field(kind: str) -> str:
    return "int_" if kind == "int" else kind


def order_params(params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
    """Check every `when` and return the params with parents before children (else YAML order)."""
    for name, param in params.items():
        for parent, values in param.when.items():
            if parent not in params:
                hint = did_you_mean(parent, params)
                raise _AtKey((name, "when"), f"'{parent}' is not a defined parameter{hint}")
            if params[parent].kind in ("uniform", "loguniform"):
                message = f"expected a choice, int or value parameter to condition on, got {params[parent].kind}"
                raise _AtKey((name, "when", parent), message)
            for value in values:
                if not params[parent].can_take(value):
                    hint = did_you_mean(value, params[parent].choice or ())
                    message = f"expected a value that {parent} ({params[parent].describe()}) can take, got {value!r}"
                    raise _AtKey((name, "when", parent), message + hint)
    ordered: dict[str, ParamSpec] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise _AtKey((path[-1], "when"), f"expected conditions without a cycle, got {cycle}")
        if name not in ordered:
            for parent in params[name].when:
                visit(parent, (*path, name))
            ordered[name] = params[name]

    for name in params:
        visit(name, ())
    return ordered


def grid_space(params: Mapping[str, ParamSpec]) -> dict[str, list[Any]]:
    """The GridSampler search space: every suggested value, which needs discrete, unconditional params."""
    space = {}
    for name, param in params.items():
        if param.when:
            raise _AtKey((name, "when"), "expected no condition under sampler type grid, got one")
        if param.kind == "choice":
            space[name] = list(param.choice)
        elif param.kind == "int":
            low, high = param.int_
            space[name] = list(range(low, high + 1, param.step or 1))
        elif param.kind != "value":  # constants are never suggested, so not part of the grid
            raise _AtKey((name,), f"expected a choice or int parameter under sampler type grid, got {param.kind}")
    return space
