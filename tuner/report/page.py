"""report.html itself: the summary lines, ASHA's rungs (tuner/rungs.py) and their warnings, the
top-trials and per-class tables, and the page around the figures (inline style only: no script, no font, no CDN)."""

from __future__ import annotations

import datetime
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..rungs import RungDiagnostics, diagnose_space
from ..screen import format_misranking
from .run import REPORT_DIR, Run, finite

if TYPE_CHECKING:  # only its file and caption are read here
    from .figures import Plot

TOP_TRIALS = 10                # rows of the top-trials table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def top_trials_table(run: Run) -> str:
    key = f"best_{run.metric}"
    scored = sorted((t for t in run.trials if finite(t.get(key))), key=lambda t: t[key],
                    reverse=run.mode == "max")[:TOP_TRIALS]
    params = sorted({k for t in run.trials for k in t if k.startswith("config/")})
    header = ["rank", "trial", "status", "epochs", f"best {run.metric}", "best epoch", "wall time (s)"]
    rows = [[i, t["trial_id"], t["status"], t["epochs"], t[key], t.get("best_epoch"),
             round(t["wall_time_s"], 1) if finite(t.get("wall_time_s")) else None]
            + [t.get(p) for p in params] for i, t in enumerate(scored, start=1)]
    return _table(header + [p[len("config/"):] for p in params], rows)


def per_class_table(run: Run) -> str:
    per_class = ((run.metrics or {}).get("test") or {}).get("per_class") or {}
    rows = [[name, v.get("precision"), v.get("recall")] for name, v in per_class.items()]
    return _table(["class", "precision (fraction)", "recall (fraction)"], rows) if rows else ""


def summary_lines(run: Run) -> list[str]:
    from ..screen import format_selection, format_summary

    lines = format_summary(run.summary) + format_selection(run.summary)
    if run.metrics and finite(run.metrics.get("test_acc")):
        lines.append(f"refit: {run.metrics.get('epochs')} epochs on {run.metrics.get('train_images')} images, "
                     f"test accuracy {run.metrics['test_acc']:.4f} on {run.metrics['test']['images']} test images")
    else:
        lines.append("refit: none in this run folder (tune-resnet refit RUN_DIR makes one)")
    return lines


def selection_section(run: Run) -> str:
    """The confirmation (selection.top_k > 1): each confirmed configuration's runs, mean, standard
    deviation and P(best), the pick first; empty without one."""
    record = run.summary.confirmation
    if not record:
        return ""
    header = ["", "search trial", f"search {run.metric}", "mean of fresh runs", "sd", "P(best)", "runs (seed: value)"]
    rows = [["pick" if i == 0 else "", c["trial_id"], c["search_value"], c["mean"], c["std"],
             None if c["p_best"] is None else f"{c['p_best']:.0%}",
             ", ".join(f"{r['seed']}: {'-' if r['value'] is None else format(r['value'], '.4f')}" for r in c["runs"])]
            for i, c in enumerate(record["configurations"])]
    note = (f"<p>The top {record['top_k']} configurations of the search, trained {record['repeats']} more times "
            "each with fresh seeds (a fresh validation split and training subset per seed, the same for all) and "
            "no early stopping; the best mean goes to the refit. The search's own score is shown, not averaged: "
            "it was chosen for being high. P(best): the posterior probability that a configuration's true mean "
            "is the best, under a normal model with one pooled noise level (tuner/confirm.py).</p>")
    return "<h2>Selection: the top configurations confirmed</h2>" + note + _table(header, rows)


def rung_warnings(diagnostics: RungDiagnostics) -> str:
    """The misranking warnings, for the top of the page."""
    return "".join(f"<p class='warning'>{html.escape(format_misranking(m, diagnostics.metric))}</p>"
                   for m in diagnostics.misrankings)


def rungs_section(diagnostics: RungDiagnostics) -> str:
    """ASHA's rungs: trials judged, stopped and finished, and the rank correlation of the objective
    at the rung with the final one; empty when ASHA had no rung or no trial reached one."""
    if not any(rung.judged for rung in diagnostics.rungs):
        return ""
    metric = diagnostics.metric
    header = ["rung (epoch)", "judged", "stopped", "went on", "finished",
              f"Spearman({metric} at the rung, {metric} after epoch {diagnostics.max_epochs})"]
    rows = [[r.epoch, r.judged, r.stopped, r.went_on, r.finished,
             f"{r.correlation:+.2f}" if r.correlation is not None else f"none: {r.no_correlation}"]
            for r in diagnostics.rungs]
    note = ("<p>Over the trials that finished, which the rung itself chose by their score there: a rung that "
            "ranks well reads near 1, one that stops the future best near 0 or below.</p>")
    return "<h2>ASHA's rungs</h2>" + note + _table(header, rows) + rung_warnings(diagnostics)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
pre, code { background: #f5f5f5; } pre { padding: .8em; overflow-x: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ddd; padding: .25em .5em; }
th { background: #f0f0f0; } .notes { color: #777; font-size: .85em; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: .5em .8em; }
"""


def render_html(run: Run, drawn: list[Plot], notes: list[str], journal: Path | None) -> str:
    e = html.escape
    rungs = diagnose_space(run.record.space, run.trials, run.history, metric=run.metric, mode=run.mode)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(run.name)}: search report"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Search report: {e(run.name)}</h1><p>{e(str(run.folder.resolve()))}, written {e(when)}</p>",
             rung_warnings(rungs), "<h2>Summary</h2><pre>" + e("\n".join(summary_lines(run))) + "</pre>",
             selection_section(run), rungs_section(rungs)]
    for figure in drawn:
        parts.append(f"<figure><img src='{REPORT_DIR}/{figure.file}' alt='{e(figure.caption)}'>"
                     f"<figcaption>{e(figure.caption)}</figcaption></figure>")
    parts.append(f"<h2>Top trials by best {e(run.metric)}</h2>" + top_trials_table(run))
    if per_class_table(run):
        parts.append("<h2>Test precision and recall per class</h2>" + per_class_table(run))
    parts.append("<h2>Tracking</h2><ul>"
                 f"<li>TensorBoard logs of every trial: <code>tensorboard --logdir {e(str(run.folder))}</code></li>"
                 + (f"<li>Optuna study (name <code>{e(run.name)}</code>): <code>optuna-dashboard "
                    f"{e(str(journal))}</code></li>" if journal else "") + "</ul>")
    if notes:
        parts.append("<p class='notes'>" + "<br>".join(e(n) for n in notes) + "</p>")
    return "\n".join(parts) + "\n</body></html>\n"
