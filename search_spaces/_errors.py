from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError


class SpaceError(ValueError):
    """A search-space file is invalid; ``str(err)`` is one line: ``<file>: <key>: <problem>``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        text = ": ".join(part for part in (source, key, message) if part)
        # One line, whatever the YAML or the input repr carried: the CLI prints it as is.
        super().__init__(" ".join(text.split()))

    def __reduce__(self) -> tuple[type[SpaceError], tuple[str, str, str]]:
        return SpaceError, (self.source, self.key, self.message)  # picklable despite the 3-argument init


class _AtKey(ValueError):
    """Raised inside pydantic validators to point below the location pydantic knows."""

    def __init__(self, key: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


def did_you_mean(word: Any, options: Iterable[Any]) -> str:
    matches = difflib.get_close_matches(str(word), [str(option) for option in options], n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_space_error(err: ValidationError, source: str, root: type[BaseModel]) -> SpaceError:
    """The first pydantic error as one line: where, what was expected, what arrived."""
    first = err.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _AtKey):
        return SpaceError(source, ".".join(loc + list(cause.key)), cause.message)
    if first["type"] == "extra_forbidden":
        known = _fields_at(root, loc[:-1])
        message = f"unknown key{did_you_mean(loc[-1], known)}; expected one of {', '.join(known)}"
    elif first["type"] == "missing":
        message = "expected a value, got nothing"
    elif first["type"] == "literal_error":
        options = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        got = first["input"]
        message = f"expected one of {', '.join(options)}, got {short_repr(got)}{did_you_mean(got, options)}"
    elif first["type"] in ("value_error", "assertion_error"):
        message = str(cause) if cause else first["msg"]
    else:
        # "Input should be a valid integer, got a number with ..." -> "expected a valid integer"
        expected = re.sub(r"^\w+ should (be |have )?", "expected ", first["msg"].split(", ")[0])
        expected = re.sub(r" or instance of \w+$", "", expected)
        message = f"{expected}, got {short_repr(first['input'])}"
    return SpaceError(source, ".".join(loc), message)


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys the (sub)model at `loc` accepts, for did-you-mean on an unknown key."""
    for part in loc:
        field = model.model_fields.get(part)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [field.alias or name for name, field in model.model_fields.items()]
