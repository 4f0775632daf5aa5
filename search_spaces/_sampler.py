from __future__ import annotations

import threading
import warnings
from typing import Any

import optuna

from search_spaces._params import grid_space
from search_spaces._spec import ParamsSpec, SamplerSpec


def build_sampler(spec: SamplerSpec, *, params: ParamsSpec, concurrency: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a spec names, seeded, set up for `concurrency` trials at once."""
    startup = {} if spec.n_startup_trials is None else {"n_startup_trials": spec.n_startup_trials}
    # group/QMC are flagged experimental; choosing them here is deliberate, so say it once, not per search.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.type == "tpe":
            return optuna.samplers.TPESampler(
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
