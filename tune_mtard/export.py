"""Write a complete run config for the best (or a named) trial of a finished or interrupted search.

``python -m tune_mtard.export --experiment DIR [--trial ID] [--out FILE]``: DIR is ``<storage>/<name>``.
The best trial is chosen as the search chooses it (SPEC section 5): the highest ``search.metric`` at its
last report among trials that ran the full ``train.epochs``, or among all trials if none did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tune_mtard.cli import ArgumentParser, run
from tune_mtard.config import load_config
from tune_mtard.errors import ConfigError
from tune_mtard.search import reproducible_values
from tune_mtard.tuning import BEST_CONFIG, SPACE_FILE, best_trial, load_experiment_trials


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tune_mtard.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="the search's folder, <storage>/<name>")
    parser.add_argument("--trial", default=None, help="a trial id (default: the best trial)")
    parser.add_argument("--out", default=None, help=f"output file (default: DIR/{BEST_CONFIG}, or DIR/trial_<ID>.yaml)")
    args = parser.parse_args(argv)

    folder = Path(args.experiment).resolve()
    if not (folder / SPACE_FILE).is_file():
        raise ConfigError("--experiment", f"{folder} is not a tune-mtard search folder (no {SPACE_FILE})")
    cfg = load_config(folder / SPACE_FILE, check_files=False)
    trials = load_experiment_trials(folder)
    if args.trial is not None:
        chosen = [t for t in trials if t.trial_id == args.trial]
        if not chosen:
            known = ", ".join(t.trial_id for t in trials) or "none"
            raise ConfigError("--trial", f"no trial {args.trial!r} in {folder} (trials: {known})")
        trial = chosen[0]
    else:
        trial = best_trial(trials, cfg.search.metric, cfg.search.mode, cfg.train.epochs)
        if trial is None:
            raise ConfigError("--experiment", f"no trial in {folder} has reported {cfg.search.metric} yet")
    out = Path(args.out) if args.out else folder / (BEST_CONFIG if args.trial is None else f"trial_{trial.trial_id}.yaml")
    cfg.run_config().with_values(reproducible_values(cfg, trial.sampled)).dump(out)
    metric = cfg.search.metric
    print(f"trial {trial.trial_id}: {metric} {trial.metric(metric):.4f} after {trial.epochs}/{cfg.train.epochs} epochs")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
