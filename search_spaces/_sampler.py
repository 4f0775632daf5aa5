from __future__ import annotations

import heapq
import threading
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search_spaces._params import grid_space
from search_spaces._spec import ParamsSpec, SamplerSpec


def build_sampler(spec: SamplerSpec, *, params: ParamsSpec, concurrency: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a spec names, seeded, set up for `concurrency` trials at once."""
    startup = {} if spec.n_startup_trials is None else {"n_startup_trials": spec.n_startup_trials}
    # group/QMC are flagged experimental; choosing them here is deliberate, so say it once, not per search.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.type == "tpe":
            return WindowedTPESampler(
                window=spec.window,
                seed=spec.seed,
                multivariate=spec.multivariate,
                # group=True lets multivariate TPE model each conditional sub-space jointly.
                group=spec.multivariate and any(param.when for param in params.values()),
                # Without it, parallel workers asking at once get near-identical suggestions.
                constant_liar=concurrency > 1,
                **startup,
            )
        if spec.type == "nsga2":
            # Several objectives: NSGA-II's first generation (population_size trials) is random. Constraint
            # values reach it per trial (Trial.set_constraint, tuner/_ray.py), as they reach TPE and GP.
            population = {} if spec.population_size is None else {"population_size": spec.population_size}
            return PicklableNSGAIISampler(seed=spec.seed, **population)
        if spec.type == "random":
            return optuna.samplers.RandomSampler(seed=spec.seed)
        if spec.type == "cmaes":
            # Categorical and conditional params fall back to a seeded RandomSampler: expected.
            return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False, **startup)
        if spec.type == "qmc":
            # Scrambled, so the seed picks the sequence rather than only the independent sampler.
            return optuna.samplers.QMCSampler(seed=spec.seed, scramble=True, warn_independent_sampling=False)
        if spec.type == "gp":
            # A Gaussian process over the params every trial has (categorical ones too); the conditional
            # ones, absent from some trials, fall back to a seeded RandomSampler, as under cmaes. Trials
            # still running enter its acquisition (qLogEI), so it needs no constant liar. Needs torch.
            return optuna.samplers.GPSampler(seed=spec.seed, warn_independent_sampling=False, **startup)
        return optuna.samplers.GridSampler(grid_space(params), seed=spec.seed)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that pickles: Ray pickles the searcher with its sampler (the Tuner's state, --resume),
    and Optuna 5.1's genetic samplers hold a threading.Lock, which cannot be. The lock guards a
    cache within one process, so a copy gets a fresh one."""

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class WindowedTPESampler(optuna.samplers.TPESampler):
    """TPE that models a bounded set of trials: past `window` finished trials, the best
    `window // 5` (its "good" group takes the best 10%, at most 25) and the latest others, with
    the running ones (the constant liar). Up to `window` trials it is TPESampler exactly.

    TPE's cost per sample grows with the trials it has seen (measured with Optuna 5.1 on the
    project's 2-core CPU: 3 ms at 100 trials, 13 ms at 1,000, with 4 parameters), and Ray's
    OptunaSearch asks in the driver's loop, between trials. Optuna weighs older trials down
    already (its default weights ramp up to the latest 25); the window drops the oldest of the
    "bad" group, which TPE's density barely uses once there are hundreds."""

    def __init__(self, *, window: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._window = window

    def _sample(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super()._sample(_Windowed(study, self._window) if self._window else study, trial, search_space)


class _Windowed:
    """A study whose _get_trials keeps, past `window` finished trials, the best window // 5 and
    the latest others (and every running one); everything else is the study's own."""

    def __init__(self, study: optuna.Study, window: int) -> None:
        self._study, self._window = study, window

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        trials = self._study._get_trials(*args, **kwargs)
        done = [t for t in trials if t.state != TrialState.RUNNING]
        if len(done) <= self._window or len(self._study.directions) > 1:  # several objectives: no "best", all
            return trials
        keep_best = self._window // 5
        scored = [t for t in done if t.state == TrialState.COMPLETE and t.values]
        sign = -1.0 if self._study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        best = {t.number for t in heapq.nsmallest(keep_best, scored, key=lambda t: sign * t.values[0])}
        latest = {t.number for t in done[-(self._window - keep_best):]}
        return [t for t in trials if t.state == TrialState.RUNNING or t.number in best or t.number in latest]
