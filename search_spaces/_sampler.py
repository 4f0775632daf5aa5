from __future__ import annotations

import warnings

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
