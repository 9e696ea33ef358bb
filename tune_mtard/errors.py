"""Errors that the command-line entry points turn into exit codes (docs/cli.md, "Exit codes")."""


class ConfigError(ValueError):
    """Bad user input (config key, flag, path, checkpoint): exit code 2, one line, no traceback.

    ``key`` names the offending dotted config key, flag or path so the message can start with it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class Interrupted(Exception):
    """The user stopped the work (SIGINT or SIGTERM) where the signal itself was caught (Ray Tune catches SIGINT).

    Recorded as KILLED, never as a result; exit code 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signal_name: str = "SIGINT", message: str = ""):
        self.signal_name = signal_name
        super().__init__(message or f"interrupted by {signal_name}")

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


class RunFailed(RuntimeError):
    """A run failed in a way the user can act on (not a crash): exit code 1 and one line saying why."""


class Diverged(RunFailed):
    """A run's loss or balancer state became non-finite at ``step`` (1-based, over the whole run) in ``epoch``.

    Never a result: ``train`` exits 1, a search records the trial as failed (docs/search.md, "Outcomes").
    """

    def __init__(self, step: int, epoch: int):
        self.step = step
        self.epoch = epoch
        super().__init__(f"diverged: the loss or balancer state became non-finite at step {step} (epoch {epoch})")

    def __reduce__(self):  # picklable with its fields, so Ray hands it back to the driver intact
        return (Diverged, (self.step, self.epoch))

    def tags(self) -> dict[str, int]:
        """Where it diverged, as a diverged run's MLflow tags and a failed trial's record name it."""
        return {"diverged_step": self.step, "diverged_epoch": self.epoch}


class TeacherTrainingFailed(RunFailed):
    """A teacher's training ended at chance accuracy; nothing was cached."""
