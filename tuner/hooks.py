"""Trial hooks: your own code, called by every trial of a search at its start and after each epoch.

A search space names one in its trial section (nothing is called without it):

    trial:
      hook: my_hooks:EpochLog             # module:callable, imported in each trial's process
      hook_args: {path: /tmp/epochs.log}  # keyword arguments it is called with (optional)

Each trial calls `EpochLog(**hook_args)` once and then, on the object it returns, `on_start(trainer)`
(the model built and, for a retried or resumed trial, restored: `trainer.epoch` is the last epoch
done) and `on_epoch_end(trainer, row)` after each epoch trained, just before its report and
checkpoint (`row`: the dict about to be reported; before, because Ray may stop a trial inside the
report of its last epoch or of one ASHA stops it at). An epoch whose loss turns non-finite ends
the trial as diverged without it. Either method may be left out; TrialHook is a base class with
both doing nothing. An exception in a hook fails the trial, as an error in training would. Only
the standard library is imported here: a hook module may import this one without loading torch
or Ray.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable

from .errors import UserError

HOOK_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # module:callable, both dotted names


class HookError(UserError, ValueError):
    """trial.hook names nothing that can be imported and called: one line, for the CLI."""


class TrialHook:
    """What a trial calls; subclass it, or write any object with one or both of these methods."""

    def on_start(self, trainer: Any) -> None:
        """Before the first epoch this process trains: trainer.epoch is 0, or the epoch restored."""

    def on_epoch_end(self, trainer: Any, row: Mapping[str, Any]) -> None:
        """After an epoch trained, before its report and checkpoint: row is what will be reported."""


def check(target: str) -> None:
    """On the driver, before any trial starts: the hook imports as a trial's process will import it,
    from the installed packages, PYTHONPATH, or the folder the search started in (Ray puts the
    driver's folder on its workers' path; the `tune-resnet` script does not put it on its own)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    resolve(target)


def resolve(target: str) -> Callable[..., Any]:
    """The callable that 'module:callable' names."""
    if not HOOK_PATTERN.fullmatch(target):
        raise HookError(f"trial.hook: expected module:callable (e.g. my_hooks:EpochLog), got {target!r}")
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as error:  # not found, or its module fails on import
        raise HookError(f"trial.hook: cannot import {target} ({type(error).__name__}: {error}); put its module "
                        "on PYTHONPATH on every node, or in the folder the search starts in") from None
    if not callable(found):
        raise HookError(f"trial.hook: {target} is a {type(found).__name__}, not a class or function")
    return found


def make(target: str | None, args: Mapping[str, Any] | None = None) -> Any:
    """The hook object a trial calls, or None when the search has none."""
    return resolve(target)(**(args or {})) if target else None


def call_all(hooks: list[Any], method: str, *args: Any) -> None:
    """call() on each hook in turn (None: no hook)."""
    for hook in hooks:
        call(hook, method, *args)


def call(hook: Any, method: str, *args: Any) -> None:
    """hook.method(*args), when there is a hook and it has that method."""
    function = getattr(hook, method, None)
    if function is not None:
        function(*args)
