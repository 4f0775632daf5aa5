"""The Optuna study, rebuilt from trials.parquet with the space's distributions: the study the
plots read, RUN_DIR/optuna.journal for optuna-dashboard, and the parameter importances."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna

from .run import JOURNAL_FILE, Run, curve, finite


def param_distributions(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Distributions of the sampled params of search.json's space (a SearchSpec.model_dump);
    constants (`value`) are not sampled, so they have none."""
    distributions = {}
    for name, param in space.get("params", {}).items():
        param = {key: value for key, value in param.items() if value is not None}
        ints = param.get("int", param.get("int_"))
        if "uniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["uniform"])
        elif "loguniform" in param:
            distributions[name] = optuna.distributions.FloatDistribution(*param["loguniform"], log=True)
        elif ints is not None:
            distributions[name] = optuna.distributions.IntDistribution(
                *ints, log=bool(param.get("log")), step=param.get("step") or 1)
        elif "choice" in param:
            distributions[name] = optuna.distributions.CategoricalDistribution(param["choice"])
    return distributions


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


def build_study(run: Run, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    direction = "maximize" if run.mode == "max" else "minimize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." in our output
    try:
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(study_name=run.name, storage=storage, direction=direction)
            study.set_metric_names([run.metric])
        study.add_trials(frozen_trials(run))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def write_journal(run: Run) -> Path:
    """RUN_DIR/optuna.journal, written afresh: the study as the search ran it, for optuna-dashboard."""
    from optuna.storages.journal import JournalFileBackend

    path = run.folder / JOURNAL_FILE
    fresh = path.with_name(f".{JOURNAL_FILE}.new")  # built aside: a failure keeps the journal there was
    fresh.unlink(missing_ok=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(fresh)))
    study = build_study(run, storage)
    study.set_user_attr("run_dir", str(run.folder.resolve()))
    del study, storage  # the backend holds no open file between writes; replace it now
    os.replace(fresh, path)
    return path


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
