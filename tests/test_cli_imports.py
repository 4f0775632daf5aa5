"""The CLI imports what a command needs when it runs: help and the import itself load neither
torch, Ray nor Optuna (each seconds on a small machine). Checked in a fresh interpreter, since
this one has them all loaded already."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("ray", "torch", "optuna")


def modules_loaded_by(code: str) -> set[str]:
    """Which of HEAVY a fresh interpreter holds after running code."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return set(done.stdout.rpartition("loaded:")[2].split())


def run_cli(*args: str) -> str:  # click's standalone mode would exit before the probe prints
    return f"from tuner.cli import main\ntry:\n    main({list(args)!r})\nexcept SystemExit as e:\n    assert not e.code, e.code"


def test_importing_the_cli_loads_neither_ray_torch_nor_optuna():
    assert modules_loaded_by("import tuner.cli") == set()


@pytest.mark.parametrize("args", [["--help"], ["search", "-h"], ["train", "-h"], ["data", "prepare", "-h"],
                                  ["predict", "-h"], ["status", "-h"]])
def test_help_loads_neither_ray_torch_nor_optuna(args):
    assert modules_loaded_by(run_cli(*args)) == set()


def test_the_error_classes_stay_where_they_were():  # moved to tuner.errors, re-exported
    from tuner import errors, search

    assert search.SearchError is errors.SearchError and search.check_writable is errors.check_writable
    assert search.SearchFailed is errors.SearchFailed and search.Interrupted is errors.Interrupted


def test_the_translator_names_classes_that_exist():
    import importlib

    from tuner.errors import USER_ERRORS

    for module, name in USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)
