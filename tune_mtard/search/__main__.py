"""``python -m tune_mtard.search``: the ``search`` command (tune_mtard/cli/search.py)."""

from tune_mtard.cli import run_command

run_command("search")
