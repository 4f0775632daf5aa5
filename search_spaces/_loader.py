from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from search_spaces._errors import SpaceError, did_you_mean, short_repr
from search_spaces._spec import SearchSpec, validate_space


def load_space(
    path: str | Path,
    *,
    param_names: Collection[str] | None = None,
    allowed_values: Mapping[str, Collection[Any]] | None = None,
) -> SearchSpec:
    """Read a YAML search space; every mistake in it raises a one-line SpaceError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(source, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpaceError(source, "", f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start:  # an unclosed bracket is reported where the file ends: say where it opened
            problem += f" ({context} at line {start.line + 1})"
        raise SpaceError(source, where, problem) from None
    return parse_space(data, source=source, param_names=param_names, allowed_values=allowed_values)


def parse_space(
    data: dict[str, Any],
    *,
    source: str = "<space>",
    param_names: Collection[str] | None = None,
    allowed_values: Mapping[str, Collection[Any]] | None = None,
) -> SearchSpec:
    """Validate an already-parsed space; `param_names`/`allowed_values` come from the training config."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}: {short_repr(data)}"
        raise SpaceError(source, "", f"expected a mapping of sections at the top level, got {got}")
    spec = validate_space({"name": Path(source).stem, **data}, source)
    if param_names is not None:
        _check_names(spec, param_names, source)
    for name, allowed in (allowed_values or {}).items():
        _check_values(spec, name, list(allowed), source)
    return spec


def _check_names(spec: SearchSpec, param_names: Collection[str], source: str) -> None:
    for section in ("params", "fixed"):
        for name in getattr(spec, section):
            if name not in param_names:
                hint = did_you_mean(name, param_names)
                message = f"unknown parameter{hint}; expected one of {', '.join(sorted(param_names))}"
                raise SpaceError(source, f"{section}.{name}", message)


def _check_values(spec: SearchSpec, name: str, allowed: list[Any], source: str) -> None:
    """Every value `name` can take, from params or fixed, must be one the trainable accepts."""
    candidates: list[tuple[str, Any]] = []
    if name in spec.fixed:
        candidates.append((f"fixed.{name}", spec.fixed[name]))
    if name in spec.params:
        param = spec.params[name]
        if param.kind not in ("choice", "value"):
            raise SpaceError(source, f"params.{name}", f"expected a choice or a value, got {param.kind}")
        options = param.choice if param.kind == "choice" else (param.value,)
        candidates += [(f"params.{name}.{param.kind}", option) for option in options]
    for key, value in candidates:
        if value not in allowed:
            choices = ", ".join(map(str, allowed))
            raise SpaceError(source, key, f"expected one of {choices}, got {value!r}{did_you_mean(value, allowed)}")
