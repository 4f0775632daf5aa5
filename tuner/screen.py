"""What a person reads in a terminal: the summary at the end of a search and the screen of
`tune-resnet status`. Lines of text from typed values (results.SearchSummary, status.SearchStatus);
nothing is read or written here.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from .results import SearchSummary, finite
from .rungs import Misranking, Rung, RungDiagnostics
from .status import STATUSES, SearchStatus, TrialState

ALWAYS_SHOWN = ("running", "pending", "completed", "early_stopped", "errored")  # the others when > 0
SHOWN_TRIALS = 12  # rows of the trial table; the rest are counted


def format_summary(summary: SearchSummary) -> list[str]:
    by_status = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in summary.by_status.items() if n)
    saved = 1 - summary.epochs_spent / max(1, summary.epochs_without_early_stopping)
    retried = f"; {summary.retries} restarts from a checkpoint after a process or node died" if summary.retries else ""
    lines = [f"trials: {summary.trials} ({by_status}{retried})",
             f"epochs: {summary.epochs_spent} spent of {summary.epochs_without_early_stopping} "
             f"without early stopping ({saved:.0%} saved)"]
    if not summary.found:
        return lines + ["best: none (no trial reported a finite result)"]
    lines.append(f"best {summary.metric}: {summary.best_value:.4f} (trial {summary.best_trial_id}, "
                 f"epoch {summary.best_epoch})")
    lines += [f"  {k} = {v}" for k, v in summary.best_config.items()]
    return lines + format_front(summary)


def format_front(summary: SearchSummary) -> list[str]:
    """Several objectives, constraints or selection.pick: the Pareto front, a line per trial with its
    index for `refit --pick N` (* marks the pick), and the pick rule's trial."""
    if summary.front is None:
        return []
    pick = summary.pick or {}
    lines = [f"Pareto front: {len(summary.front)} of {summary.trials} trials that no other beats on every "
             "objective (refit another with: tune-resnet refit RUN_DIR --pick N)"]
    for entry in summary.front:
        mark = "*" if entry["trial_id"] == pick.get("trial_id") else " "
        config = ", ".join(f"{k}={_short(v)}" for k, v in entry["config"].items())
        values = _metric_values(entry["values"])
        lines.append(f" {mark}[{entry['index']}] trial {entry['trial_id']}: {values} ({config})")
    if pick.get("trial_id") is None:
        return lines + [f"pick ({pick.get('rule')}): none, {pick.get('why')}"]
    where = f"[{pick['front_index']}]" if pick.get("front_index") is not None else "not on the front"
    return lines + [f"pick ({pick['rule']}): trial {pick['trial_id']} {where}: {_metric_values(pick['values'])}"]


def _metric_values(values: dict[str, float]) -> str:
    units = {"latency_ms": " ms", "latency_ms_b64": " ms"}
    return ", ".join(f"{name} {value:.4f}" if name.startswith("val_") else f"{name} {_short(value)}{units.get(name, '')}"
                     for name, value in values.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if 0.01 <= abs(value) < 1 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def format_selection(summary: SearchSummary) -> list[str]:
    """The confirmation's table (selection.top_k > 1): each confirmed configuration's mean, standard
    deviation and runs against its search score, and how likely the pick is truly the best."""
    record = summary.confirmation
    if not record:
        return []
    lines = [f"confirmation: the top {record['top_k']} configurations, {record['repeats']} fresh runs each "
             f"(seeds {', '.join(map(str, record['seeds']))}; {record['epochs_spent']} epochs)" + _noise_text(record),
             f"  {'trial':<14} {'search':>7} {'mean':>7} {'sd':>7} {'P(best)':>8}  runs"]
    for number, row in enumerate(record["configurations"]):
        runs = " ".join("-" if r["value"] is None else f"{r['value']:.4f}" for r in row["runs"])
        mark = "*" if number == 0 else " "
        lines.append(f"{mark} {row['trial_id']:<14} {row['search_value']:>7.4f} {_number(row['mean']):>7} "
                     f"{_number(row['std']):>7} {_percent(row['p_best']):>8}  {runs}")
    pick = record["configurations"][0]
    lines.append(f"selected: trial {pick['trial_id']}'s configuration (* above), mean {summary.metric} "
                 f"{_number(pick['mean'])} over its fresh runs" +
                 ("" if pick["trial_id"] == summary.best_trial_id else
                  f"; the search's best trial, {summary.best_trial_id}, scored {summary.best_value:.4f} once"))
    return lines + [f"  {k} = {v}" for k, v in pick["params"].items()]


def _noise_text(record: dict[str, Any]) -> str:
    if record.get("noise_sd") is None:
        return ""
    how = "paired by seed, the seed's shared effect taken out" if record.get("paired") else "pooled"
    return f"; the noise of one run, {how}: sd {record['noise_sd']:.4f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def best_so_far(status: SearchStatus) -> tuple[float, str, int] | None:
    metric, sign = status.budget.metric, 1 if status.budget.mode == "max" else -1
    found = [(row[metric], t.trial_id, int(row.get("training_iteration", 0)), row.get("timestamp") or 0)
             for t in status.trials for row in t.rows
             if not row.get("diverged") and finite(row.get(metric))]
    best = max(found, key=lambda f: (sign * f[0], -f[3])) if found else None  # a tie: the first to get there
    return best[:3] if best else None


def mean_epoch_time(status: SearchStatus) -> float | None:
    """Seconds per epoch of one trial: the median of the reported epoch times (robust to the
    first epoch's warm-up and to a retried epoch)."""
    times = [r["epoch_time_s"] for t in status.trials for r in t.rows if isinstance(r.get("epoch_time_s"), (int, float))]
    return statistics.median(times) if times else None


def estimate_left(status: SearchStatus) -> str | None:
    """Time left, from the median epoch time and the epochs the budget still allows: trials not
    finished are assumed to run as many epochs as the finished ones did on average (ASHA's
    observed stopping), or max_epochs before any finished."""
    budget, epoch_s = status.budget, mean_epoch_time(status)
    if status.finished or not budget.max_epochs or not budget.num_samples or epoch_s is None:
        return None
    done = [t.epochs for t in status.trials if t.status not in ("running", "pending")]
    expected = statistics.mean(done) if done else budget.max_epochs
    running = [t for t in status.trials if t.status == "running"]
    unstarted = max(0, budget.num_samples - len(status.trials)) + sum(t.status == "pending" for t in status.trials)
    left = sum(max(0.0, expected - t.epochs) for t in running) + unstarted * expected
    worst = sum(budget.max_epochs - t.epochs for t in running) + unstarted * budget.max_epochs
    at_once = max(1, len(running))
    if not running and not unstarted:
        return "time left: no trial left to run (the refit and the report may still be running)"
    return (f"time left: ~{_clock(left * epoch_s / at_once)} (an estimate: ~{left:.0f} epochs left at "
            f"{epoch_s:.1f} s each, {at_once} trial{'s' if at_once > 1 else ''} at a time; "
            f"up to {_clock(worst * epoch_s / at_once)} if no more trials are stopped early)")


def format_status(status: SearchStatus, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    budget = status.budget
    counts = {s: sum(t.status == s for t in status.trials) for s in STATUSES}
    unstarted = max(0, (budget.num_samples or 0) - len(status.trials))
    counts["pending"] += unstarted
    live = unstarted or counts["running"] or counts["pending"]
    state = ("finished" if status.finished else "running" if live
             else "trials done, tables not written yet (refitting, or the search was stopped)")
    updated = f", last update {_clock(now - status.last_update)} ago" if status.last_update else ""
    planned = f"{budget.num_samples} planned" if budget.num_samples else "planned count unknown (no readable search.json)"
    lines = [f"run {status.folder}: {state}{updated}",
             f"trials: {planned} | " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ALWAYS_SHOWN)]
    best = best_so_far(status)
    lines.append(f"best {budget.metric} so far: {best[0]:.4f} (trial {best[1]}, epoch {best[2]})" if best
                 else f"best {budget.metric} so far: - (no epoch reported yet)")
    epochs = sum(t.epochs for t in status.trials)
    if status.started_at:
        end = max((r.get("timestamp", 0) for t in status.trials for r in t.rows), default=now) if status.finished else now
        lines.append(f"time spent: {_clock(max(0.0, end - status.started_at))}, {epochs} epochs reported"
                     + (f" of at most {budget.num_samples * budget.max_epochs}" if budget.num_samples and budget.max_epochs else ""))
    left = estimate_left(status)
    if left:
        lines.append(left)
    return lines + trial_table(status) + confirmation_lines(status)


def confirmation_lines(status: SearchStatus) -> list[str]:
    """The confirmation stage (selection.top_k > 1): its runs while they go, the table once written."""
    summary = status.summary or {}
    if summary.get("confirmation"):
        return format_selection(SearchSummary.from_dict(summary))
    confirming = status.confirmation
    if confirming is None:
        return []
    counts = {s: sum(t.status == s for t in confirming.trials) for s in STATUSES}
    planned = confirming.budget.num_samples
    return [f"confirmation: {counts['completed']} of {planned or len(confirming.trials)} runs done, "
            f"{counts['running']} running" + (f", {counts['errored']} errored" if counts["errored"] else "")]


def trial_table(status: SearchStatus) -> list[str]:
    metric, sign = status.budget.metric, 1 if status.budget.mode == "max" else -1
    order = {s: i for i, s in enumerate(STATUSES)}

    def best(t: TrialState) -> float | None:
        values = [r[metric] for r in t.rows if isinstance(r.get(metric), (int, float)) and not r.get("diverged")]
        return max(values, key=lambda v: sign * v) if values else None

    ranked = sorted(status.trials, key=lambda t: (order.get(t.status, 9), -sign * (best(t) or 0.0)))
    max_epochs = status.budget.max_epochs
    lines = [f"  {'trial':<12} {'status':<14} {'epochs':>7} {'best ' + metric:>14} {'last ' + metric:>14}"]
    for t in ranked[:SHOWN_TRIALS]:
        last = t.rows[-1].get(metric) if t.rows else None
        epochs = f"{t.epochs}/{max_epochs}" if max_epochs else str(t.epochs)
        lines.append(f"  {t.trial_id[:12]:<12} {t.status:<14} {epochs:>7} {_num(best(t)):>14} {_num(last):>14}")
    if len(ranked) > SHOWN_TRIALS:
        lines.append(f"  ... {len(ranked) - SHOWN_TRIALS} more")
    return lines


def _num(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "-"


def format_rungs(diagnostics: RungDiagnostics) -> list[str]:
    """What the end of a search prints under the summary: a line per rung, a line per warning;
    nothing when ASHA had no rung or no trial reached one."""
    if not any(rung.judged for rung in diagnostics.rungs):
        return []
    metric = diagnostics.metric
    lines = [f"ASHA's rungs: Spearman of the {metric} at each rung with the final {metric} "
             f"(epoch {diagnostics.max_epochs}), over the trials that finished"]
    lines += [f"  epoch {rung.epoch}: {rung.judged} judged, {rung.stopped} stopped, {rung.went_on} went on; "
              + correlation_text(rung) for rung in diagnostics.rungs]
    return lines + [format_misranking(m, metric) for m in diagnostics.misrankings]


def correlation_text(rung: Rung) -> str:
    if rung.correlation is None:
        return f"no rank correlation ({rung.no_correlation})"
    return f"Spearman {rung.correlation:+.2f} over {rung.finished} finished"


def format_misranking(m: Misranking, metric: str) -> str:
    """One line: which rung stopped which value, how often against the others, and the finals."""
    return (f"warning: the rung at epoch {m.epoch} stopped {m.stopped} of {m.judged} trials with {m.param} = "
            f"{m.value} (other {m.param}: {m.others_stopped} of {m.others_judged}), yet {m.param} = {m.value} "
            f"ends as well (best final {metric} {m.best_final:.4f} of {m.finished} finished, the others' median "
            f"{m.others_median_final:.4f} of {m.others_finished}): the rung may rank {m.param} wrongly; "
            f"consider a later first rung (budget.grace_period)")
