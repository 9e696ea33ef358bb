"""``--resume --retry-errored``: the infra-failed trials of a search run again from their last checkpoint, and no
other failed trial (docs/search.md, "Retrying infra failures").

Each retried trial stays the same Ray Tune trial (same id, folder and checkpoints: Ray resumes it as an unfinished
one, ``compat.resume_errored_trials``) and the same MLflow child run (reopened; the tags of its failure removed,
``retried_failure_kind: infra`` added; it ends FINISHED, or FAILED again). Its Optuna trial is FAIL and Optuna
cannot tell a trial twice, so the searcher asks a new one with the same params (user attribute ``retry_of``,
``searcher.retry_trial``). Trials that failed on their own (``failure_kind: trial``) or diverged stay failed.
"""

from __future__ import annotations

from pathlib import Path

from tune_mtard.search import compat
from tune_mtard.search.trials import FAILURE_KIND, TrialSummary, load_experiment_trials

RETRIED_TAG = "retried_failure_kind"  # on the child run of a retried trial: the kind of failure it was retried after
FAILURE_TAGS = ("failure", FAILURE_KIND, "trial_state")  # the child run's tags of the failure, removed on retry


def infra_failed(trials: list[TrialSummary]) -> list[str]:
    """The ids of the trials whose failure was the machinery's (``failure_kind: infra``): those a retry runs."""
    return [t.trial_id for t in trials if t.failed and t.failure_kind == "infra"]


def prepare_retries(folder: Path, parent) -> list[str]:
    """Before the search's Tuner is restored: choose the infra-failed trials, clear their child runs' failure
    tags (through the journal) and let Ray resume them. Returns their ids; none when no trial failed as infra,
    and the resume goes on as a plain ``--resume`` (saying so)."""
    trial_ids = infra_failed(load_experiment_trials(folder))
    if not trial_ids:
        print("--retry-errored: no trial of this search failed as infra; resuming it as --resume does", flush=True)
        return []
    print(f"--retry-errored: {len(trial_ids)} infra-failed trial(s) run again from their last checkpoint: "
          f"{', '.join(trial_ids)}", flush=True)
    for trial_id in trial_ids:
        parent.untag_child(trial_id, FAILURE_TAGS)
        parent.tag_child(trial_id, {RETRIED_TAG: "infra"})
    compat.resume_errored_trials(trial_ids)
    return trial_ids
