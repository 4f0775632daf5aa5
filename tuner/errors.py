"""What a user's mistake ends in, and the checks at the edge that raise it: click only, so that
the CLI can name them at import time without loading torch, Ray or Optuna."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

# A user's mistake raised below tuner/, by modules the CLI imports only when a command runs:
# (module, class). The translator looks them up in sys.modules, which imports nothing: an error
# of a module not yet imported cannot have been raised.
USER_ERRORS = (("search_spaces._errors", "SpaceError"), ("trainables.data", "DataError"),
               ("trainables.finetune", "PretrainedError"), ("tuner._ray", "ClusterError"),
               ("tuner.hooks", "HookError"))


class SearchError(click.ClickException):
    """A user mistake: one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the cause's text held


class SearchFailed(click.ClickException):
    """No trial gave a result (every one errored): exit code 1, the tables and report written."""

    exit_code = 1


class Interrupted(click.ClickException):
    """Ctrl-C: the search stopped with its state saved."""

    exit_code = 130  # the shell's code for a SIGINT


def is_user_error(error: BaseException) -> bool:
    """One of USER_ERRORS, checked without importing the modules that define them."""
    return any(isinstance(error, getattr(sys.modules[module], name))
               for module, name in USER_ERRORS if module in sys.modules)


def check_writable(path: str | Path, flag: str) -> None:
    """A folder the command will write: it, or the nearest folder above it that exists, must be a
    writable folder, so that no finished work is lost for want of somewhere to put it."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SearchError(f"{flag}: {path} is a file; expected a folder to write into")
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:  # the real test (permission bits do not tell for root, /proc, read-only mounts): a folder made and removed
        os.rmdir(tempfile.mkdtemp(prefix=".tune-resnet-write-test-", dir=existing))
    except OSError as error:
        raise SearchError(f"{flag}: cannot write to {path} ({existing}: {error.strerror or error}); "
                          "pass a folder you can write to") from None
