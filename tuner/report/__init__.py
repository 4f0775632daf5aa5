"""The report of a search: RUN_DIR/report.html with its plots in RUN_DIR/report/*.png, and the
Optuna study in RUN_DIR/optuna.journal (open it with `optuna-dashboard RUN_DIR/optuna.journal`):
the one the search wrote as it ran is kept, else it is written from the tables (tuner/journal.py).

    tune-resnet report runs/quick-cifar10      # also written when a search ends

The HTML references its PNGs by relative path and loads nothing else (no script, no font, no
CDN): copy the folder anywhere and it opens offline. Plots are matplotlib on the Agg backend.

The package, by what each module draws or does: run (the folder read back), study (the Optuna
study, journal and importances), curves (learning curves, best so far), params (importance,
parallel coordinates, slices), model (the refit model's curves, confusion matrix, test images),
figures (the list of plots, drawn to PNG), page (the HTML), style (what the plots share).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Say, warn as stderr
from ..storage import is_uri

from .figures import Plot, draw_figures, plots
from .page import render_html, summary_lines
from .run import BEST_DIR, JOURNAL_FILE, REPORT_DIR, REPORT_FILE, ReportError, Run, load_run
from .study import build_study, frozen_trials, param_distributions, write_journal

__all__ = ["BEST_DIR", "JOURNAL_FILE", "REPORT_DIR", "REPORT_FILE", "Plot", "ReportError", "Run", "build_study",
           "draw_figures", "frozen_trials", "load_run", "param_distributions", "plots", "render_html",
           "summary_lines", "write_journal", "write_report", "write_report_safely"]


def write_report(run_dir: str | Path) -> tuple[Path, list[str]]:
    """RUN_DIR/report.html, RUN_DIR/report/*.png and RUN_DIR/optuna.journal (the search's kept,
    else written); (html path, notes)."""
    run = load_run(run_dir)
    notes = []
    try:
        journal = write_journal(run)
    except Exception as error:  # the report is still worth having without the journal
        journal = None
        notes.append(f"{JOURNAL_FILE}: not written ({type(error).__name__}: {error})")
    drawn, figure_notes = draw_figures(run, build_study(run))
    path = run.folder / REPORT_FILE
    path.write_text(render_html(run, drawn, notes + figure_notes, journal))
    return path, notes + figure_notes


def write_report_safely(run_dir: str, say: Say = print, warn: Say = stderr) -> None:
    """At the end of a search: a report that fails warns in one line and never fails the search."""
    if is_uri(run_dir):
        say(f"report: skipped for remote storage; run: tune-resnet report <local copy of {run_dir}>")
        return
    try:
        path, notes = write_report(run_dir)
    except Exception as error:  # the search's tables and model are saved already: say so and go on
        why = (str(error).strip().splitlines() or [""])[0][:200]
        warn(f"report failed ({type(error).__name__}: {why}); try again: tune-resnet report {run_dir}")
        return
    say(f"report: {path}" + (f" ({len(notes)} parts left out; see its end)" if notes else ""))
