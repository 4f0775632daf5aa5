"""The project's error types, and the one check at the edge that raises them. No dependencies:
every module of tuner/ raises these, and only the CLI (tuner/cli.py) turns them into one line
and an exit code. A bug in the project's own code is none of these, so it shows as a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

# A user's mistake raised below tuner/ (those packages know nothing of tuner/): (module, class).
# The CLI looks them up in sys.modules, which imports nothing: an error of a module not yet
# imported cannot have been raised.
LOWER_USER_ERRORS = (("search_spaces._errors", "SpaceError"), ("trainables.data", "DataError"),
                     ("trainables.finetune", "PretrainedError"))


class UserError(Exception):
    """A user's mistake (a flag, a file, a space, a cluster that cannot give what was asked): the
    CLI prints the message, one line, and exits with exit_code."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause's text held

    @property
    def message(self) -> str:  # click.ClickException's name for the text, which callers read
        return str(self)


class SearchError(UserError):
    """A search, its space or its flags cannot run as asked."""


class ClusterError(UserError, RuntimeError):
    """Ray could not be started or joined, or cannot give what was asked."""


class RunFileError(UserError):
    """A file of a run folder (search.json, summary.json, a table, config.json) is missing, cut off
    or edited by hand."""


class StatusError(UserError):
    """Not a search folder."""


class ReportError(UserError):
    """The report cannot be drawn from this folder."""


class ExportError(UserError, ValueError):
    """A model folder cannot be exported or loaded for prediction."""


class SearchFailed(UserError):
    """No trial gave a result (every one errored): exit code 1, the tables and report written."""

    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C: the search stopped with its state saved."""

    exit_code = 130  # the shell's code for a SIGINT


Say = Callable[[str], None]  # where the core modules send a line for the user (the CLI: click.echo)


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def warn(line: str) -> None:
    """The default sink for warnings of the core modules: standard error, looked up when called."""
    print(line, file=sys.stderr)


def user_error(error: BaseException) -> UserError | None:
    """The error as a UserError when it is one (ours, or one of LOWER_USER_ERRORS, checked without
    importing the modules that define them); None for anything else."""
    if isinstance(error, UserError):
        return error
    if any(isinstance(error, getattr(sys.modules[module], name))
           for module, name in LOWER_USER_ERRORS if module in sys.modules):
        return UserError(str(error))
    return None


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
