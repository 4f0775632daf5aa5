"""The Optuna study, rebuilt from trials.parquet with the space's distributions: the study the
plots read, RUN_DIR/optuna.journal for optuna-dashboard where the search left none (older runs, a
run folder at a URI), and the parameter importances."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna

from .. import journal
from ..journal import JournalStudy, StudyShape, param_distributions
from ..results import params_of
from .run import JOURNAL_FILE, Run, curve, finite


def frozen_trials(run: Run) -> list[optuna.trial.FrozenTrial]:
    """One Optuna trial per Ray trial. Value: the trial's best epoch by the objective (what the
    summary ranks by); completed and ASHA-stopped trials are COMPLETE (Ray's OptunaSearch reports
    both so), diverged and errored ones FAIL. Per-epoch values become intermediate values."""
    distributions = param_distributions(run.record.space)
    out = []
    for trial in run.trials:
        params = {n: trial[f"config/{n}"] for n in distributions if trial.get(f"config/{n}") is not None}
        value = trial.get(f"best_{run.metric}")
        complete = trial["status"] in ("completed", "early_stopped") and finite(value)
        epochs, values = curve(run, trial["trial_id"], run.metric)
        try:
            out.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                value=value if complete else None, params=params,
                distributions={n: distributions[n] for n in params},
                user_attrs={"ray_trial_id": trial["trial_id"], "status": trial["status"], "epochs": trial["epochs"]},
                intermediate_values=dict(zip(epochs, values))))
        except ValueError:  # a value outside the space (the YAML changed since): leave that trial out
            continue
    return out


def build_study(run: Run) -> optuna.Study:
    """The study the plots read, in memory: ASHA-stopped trials COMPLETE with their best value, as
    the sampler saw them (the importances need their values); the journal's study calls them PRUNED."""
    direction = "maximize" if run.mode == "max" else "minimize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." in our output
    try:
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(study_name=run.name, direction=direction)
            study.set_metric_names([run.metric])
        study.add_trials(frozen_trials(run))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def write_journal(run: Run) -> Path:
    """RUN_DIR/optuna.journal for optuna-dashboard. The one the search wrote as its trials went
    (tuner/journal.py) is kept as it is when it holds every trial of trials.parquet (a search
    still to be resumed included). Otherwise (a run from before the live journal, a run folder at
    a URI read from a local copy, a journal the search stopped writing after an error) it is
    written afresh from the tables, by the same code in the same shape, and swapped in whole."""
    path = run.folder / JOURNAL_FILE
    if journal.is_live_and_whole(path, run.name, [t["trial_id"] for t in run.trials]):
        return path
    fresh = path.with_name(f".{JOURNAL_FILE}.new")  # built aside: a failure keeps the journal there was
    fresh.unlink(missing_ok=True)
    shape = StudyShape.of(run.name, run.record)
    replayed = JournalStudy(None, shape)
    replay(run, replayed)
    study = JournalStudy(fresh, shape, attrs={"run_dir": str(run.folder.resolve())})
    study.study.add_trials(replayed.study.get_trials(deepcopy=False))
    del study  # the backend holds no open file between writes; replace it now
    os.replace(fresh, path)
    return path


def replay(run: Run, study: JournalStudy) -> None:
    """Each trial of the tables told to the study as the search would have, in the table's order:
    its start, each epoch of history.parquet (with the trial's measured columns), its end."""
    for trial in run.trials:
        ray_id, status = trial["trial_id"], trial["status"]
        try:
            study.start(ray_id, params_of(trial))
        except ValueError:  # a value outside the space (the YAML changed since): leave that trial out
            continue
        rows = sorted(run.history_by_trial.get(ray_id, ()), key=lambda r: r["training_iteration"])
        measured = {m: trial.get(m) for m in study.shape.metrics}
        for i, row in enumerate(rows):
            study.report(ray_id, {**measured, **row, "diverged": status == "diverged" and i == len(rows) - 1})
        study.end(ray_id, status, int(trial.get("epochs") or 0))


def param_importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """Evaluator name -> {param: importance, normalised to sum 1}; evaluators that cannot run
    on these trials (too few, or one param never varied) are left out."""
    evaluators = {"PED-ANOVA": optuna.importance.PedAnovaImportanceEvaluator,
                  "fANOVA": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0)}  # needs scikit-learn
    out = {}
    for name, make in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(study, evaluator=make())
        except (ImportError, ValueError, RuntimeError, ZeroDivisionError):
            continue
        if found:
            out[name] = found
    return out
