"""Which trial failures Ray retries, and what the terminal shows of them (docs/search.md, "Outcomes").

Only infra failures (a lost worker, actor or node, the host's or a card's memory, a full disk) are retried,
from the trial's last checkpoint, up to ``search.max_failures`` times; a trial's own error and divergence
end it at once. The terminal gets one line per failed or retried trial; the traceback stays in the trial's
``error.txt`` (Ray's record, beside its ``result.json``) and on its MLflow run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs
from ray.tune import Callback

from tune_mtard.search import compat
from tune_mtard.search.storage_fs import folder_on
from tune_mtard.search.trials import error_file_text, error_kind, read_divergence, trial_failure_kind

# Ray's controller logs each failed trial's whole traceback to the driver's terminal unless this is 0.
PRINT_TRACEBACKS = "TUNE_PRINT_ALL_TRIAL_ERRORS"


def retry_infra_failures_only(max_failures: int) -> None:
    """For the Tuners this driver builds: infra-only retries, ``max_failures`` of them per trial (this
    session's ``search.max_failures``), and no traceback on the terminal."""
    os.environ[PRINT_TRACEBACKS] = "0"
    compat.retry_only_infra_failures(error_kind, max_failures)
    compat.save_failed_trial_states()


class FailureLines(Callback):
    """One line on the terminal per trial that fails, and per infra failure Ray retries (out of this session's
    count: a resumed Tuner unpickles its callbacks as the first session built them)."""

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial.trial_id}: infra failure ({_error_line(trial)}); retry "
              f"{trial.num_failures} of {compat.infra_retries()}, from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        diverged = read_divergence(folder_on(trial.storage.storage_filesystem, trial.path))
        line = _error_line(trial)
        kind = trial_failure_kind(trial, diverged)
        print(f"trial {trial.trial_id} failed ({kind}): {'diverged' if diverged else line}; the traceback is in "
              f"{trial.error_file}", flush=True)


def _error_line(trial) -> str:
    """The last line of the traceback Ray wrote for the trial's latest failure (on the driver's disk)."""
    if not trial.error_file:
        return "error"
    return error_file_text(folder_on(pyarrow.fs.LocalFileSystem(), str(Path(trial.error_file).parent)))
