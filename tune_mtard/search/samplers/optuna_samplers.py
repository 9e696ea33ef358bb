"""The samplers Optuna ships that a search can use (docs/search.md, "Samplers"): one definition each.

Optuna is imported inside each builder: config validation reads this registry and must not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tune_mtard.search.samplers import register_sampler

if TYPE_CHECKING:
    from tune_mtard.config.search import SamplerConfig


@register_sampler("tpe", multi_objective=True, summary="Tree-structured Parzen Estimator after "
                                                       "`n_startup_trials` random trials (the default)")
def tpe(config: SamplerConfig, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.n_startup_trials)


@register_sampler("random", multi_objective=True, summary="independent uniform (or log-uniform) draws")
def random_sampler(config: SamplerConfig, seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@register_sampler("nsga2", multi_objective=True, summary="NSGA-II, the evolutionary multi-objective sampler")
def nsga2(config: SamplerConfig, seed: int):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed)


@register_sampler("gp", multi_objective=True, summary="Gaussian-process Bayesian optimisation after "
                                                      "`n_startup_trials` random trials: for small budgets of "
                                                      "expensive trials")
def gp(config: SamplerConfig, seed: int):
    import optuna

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=config.n_startup_trials)


@register_sampler("cmaes", multi_objective=False, summary="CMA-ES after `n_startup_trials` random trials "
                                                          "(one objective; categorical keys drawn at random)")
def cmaes(config: SamplerConfig, seed: int):
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=config.n_startup_trials,
                                        warn_independent_sampling=False)
