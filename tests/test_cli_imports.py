"""The CLI imports what a command needs when it runs: help and the import itself load neither
torch, Ray nor Optuna (each seconds on a small machine). Checked in a fresh interpreter, since
this one has them all loaded already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

    from tuner.errors import LOWER_USER_ERRORS

    for module, name in LOWER_USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


def test_only_the_cli_knows_click():
    """Core modules raise the project's own errors; tuner/cli.py alone turns them into click's."""
    import ast

    root = Path(__file__).resolve().parents[1]
    knowing = []
    for path in sorted([*root.glob("tuner/**/*.py"), *root.glob("trainables/*.py"), *root.glob("search_spaces/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "click" for name in names):
                knowing.append(str(path.relative_to(root)))
    assert knowing == ["tuner/cli.py"]


def test_no_function_of_the_packages_is_over_40_lines():
    """The layout's rule (README "Layout"): a function that grows past 40 lines is split."""
    import ast

    root = Path(__file__).resolve().parents[1]
    long = []
    for path in sorted([*root.glob("tuner/**/*.py"), *root.glob("trainables/*.py"), *root.glob("search_spaces/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 40:
                long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_a_bug_in_our_code_is_a_traceback_not_a_one_line_error(tmp_path, monkeypatch):
    """A TypeError or KeyError raised by the project's own code is not a user's mistake: it is
    not dressed up as 'the file may be cut off', it propagates whole."""
    from click.testing import CliRunner

    from tuner import cli, status

    def buggy(run_dir):
        return {}["no such key"]

    monkeypatch.setattr(status, "read_status", buggy)
    result = CliRunner().invoke(cli.main, ["status", str(tmp_path)])
    assert isinstance(result.exception, KeyError) and result.exit_code == 1


def test_a_user_error_raised_in_a_core_module_is_one_line_and_its_exit_code(tmp_path):
    from click.testing import CliRunner

    from tuner import cli

    result = CliRunner().invoke(cli.main, ["status", str(tmp_path)])  # an empty folder: StatusError
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ") and "expected the run folder of a search" in result.output
