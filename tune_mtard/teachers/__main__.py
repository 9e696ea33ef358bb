"""``python -m tune_mtard.teachers``: the ``teachers`` command (tune_mtard/cli/teachers.py)."""

from tune_mtard.cli import run_command

run_command("teachers")
