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
