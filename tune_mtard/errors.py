"""Errors that the command-line entry points turn into exit codes."""


class ConfigError(ValueError):
    """Bad user input (config key, flag, path, checkpoint): exit code 2, one line, no traceback.

    ``key`` names the offending dotted config key, flag or path so the message can start with it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
