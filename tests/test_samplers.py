"""Every sampler the config accepts survives what Ray Tune does with a search algorithm (docs/search.md,
"Samplers"): pickled into the tuner state and every experiment snapshot, and restored on --resume, whether
or not Optuna's sampler object itself pickles (NSGA-II stopped pickling in optuna 5.1). Each also runs a
tiny digits search end to end.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import optuna
import pytest
import ray.cloudpickle
from ray.tune.search import ConcurrencyLimiter
from searchkit import optuna_trials, search_args

from tune_mtard.cli import search
from tune_mtard.config import Distribution
from tune_mtard.config.search import SamplerConfig, SearchConfig
from tune_mtard.errors import ConfigError
from tune_mtard.search.samplers import samplers
from tune_mtard.search.searcher import PrunedAwareOptunaSearch, optuna_distributions, resumed_seed

SAMPLERS = samplers().names()
SPACE = {"balance.beta": Distribution(type="float", low=0.5, high=3.0),
         "train.lr": Distribution(type="float", low=0.01, high=0.2, log=True)}


def test_the_registry_holds_the_samplers_the_docs_name():
    assert SAMPLERS == ["tpe", "random", "nsga2", "gp", "cmaes"]


def searcher(folder, sampler_type: str, objectives: int = 1, name: str = "pickled") -> PrunedAwareOptunaSearch:
    metric = ["val_clean_acc", "val_robust_acc"][:objectives] if objectives > 1 else "val_w_robust_acc"
    mode = ["max"] * objectives if objectives > 1 else "max"
    return PrunedAwareOptunaSearch(space=optuna_distributions(SPACE), metric=metric, mode=mode, study_name=name,
                                   storage=optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}"),
                                   sampler_config=SamplerConfig(type=sampler_type, seed=3, n_startup_trials=1),
                                   full_epochs=2)


def finish(s, trial_id: str, value: float) -> None:
    metrics = {"epoch": 2, "val_w_robust_acc": value, "val_clean_acc": value, "val_robust_acc": value / 2}
    s.on_trial_complete(trial_id, metrics)


@pytest.mark.parametrize("sampler_type", SAMPLERS)
def test_the_search_algorithm_pickles_as_ray_tune_pickles_it_and_keeps_its_trials(tmp_path, sampler_type):
    objectives = 1 if sampler_type == "cmaes" else 2
    limiter = ConcurrencyLimiter(searcher(tmp_path, sampler_type, objectives), max_concurrent=2)
    first = limiter.suggest("t1")
    finish(limiter, "t1", 0.5)
    limiter.searcher.tell_pending()
    second = limiter.suggest("t2")
    # The tuner state (ray.cloudpickle, TunerInternal) and an experiment snapshot (Searcher.save_to_dir).
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(limiter))
    snapshot_dir, other = tmp_path / "snapshot", tmp_path / "other"
    snapshot_dir.mkdir()
    other.mkdir()
    limiter.save_to_dir(str(snapshot_dir), session_str="s")
    restored = ConcurrencyLimiter(searcher(other, sampler_type, objectives), max_concurrent=2)
    restored.restore_from_dir(str(snapshot_dir))
    for again in (copy, restored):
        inner = again.searcher
        assert type(inner.sampler_config) is SamplerConfig and inner.sampler_config.type == sampler_type
        study = inner._ot_study  # noqa: SLF001 (the test reads what Ray's OptunaSearch keeps)
        assert type(study.sampler).__name__ == type(limiter.searcher._ot_study.sampler).__name__
        assert all(t.study.sampler is study.sampler for t in inner._ot_trials.values())
        assert set(inner._ot_trials) == {"t1", "t2"}
        finish(again, "t2", 0.7)
        inner.tell_pending()
        third = again.suggest("t3")
        assert set(third) == set(SPACE) and third != first and third != second
    told = optuna.load_study(study_name="pickled", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert [t.state.name for t in told][:2] == ["COMPLETE", "COMPLETE"]


def test_a_sampler_rebuilt_after_n_trials_gets_a_seed_of_its_own_and_a_new_search_the_configured_one():
    assert resumed_seed(7, 0) == 7
    assert resumed_seed(7, 3) == resumed_seed(7, 3) != resumed_seed(7, 4)
    assert len({resumed_seed(7, n) for n in range(1, 50)}) == 49


def test_a_rebuilt_random_sampler_does_not_repeat_the_draws_of_the_search_it_resumes(tmp_path):
    s = searcher(tmp_path, "random")
    drawn = [s.suggest(f"t{i}") for i in range(3)]
    resumed = pickle.loads(pickle.dumps(s))
    assert resumed.suggest("t3") not in drawn


def test_an_unknown_sampler_or_one_that_cannot_take_the_objectives_is_a_config_error():
    with pytest.raises(ConfigError, match="search.sampler.type.*one of tpe, random, nsga2, gp, cmaes"):
        SearchConfig(sampler=SamplerConfig(type="bayes")).check()
    with pytest.raises(ConfigError, match="cmaes handles one objective only"):
        SearchConfig(sampler=SamplerConfig(type="cmaes"), objectives=["val_clean_acc", "val_robust_acc"]).check()


@pytest.mark.parametrize("sampler_type", SAMPLERS)
def test_a_tiny_search_finishes_with_each_sampler(space_file, ray_address, tmp_path, sampler_type):
    name = f"sampler-{sampler_type}"
    objectives = [] if sampler_type == "cmaes" else ["--set", "search.objectives=[val_clean_acc, val_robust_acc]"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = search.main(search_args(space_file, tmp_path, name, "--num-samples", "3",
                                       "--set", "train.epochs=1", "--set", "search.scheduler.type=fifo",
                                       "--set", f"search.sampler.type={sampler_type}",
                                       "--set", "search.sampler.n_startup_trials=1", *objectives))
    assert code == 0, out.getvalue()[-3000:]
    folder = tmp_path / "results" / name
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
    assert (folder / "best_config.yaml").is_file()
    assert [t.state.name for t in optuna_trials(folder, name)] == ["COMPLETE"] * 3
