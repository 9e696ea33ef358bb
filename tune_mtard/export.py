"""``python -m tune_mtard.export``: the ``export`` command (tune_mtard/cli/export.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("export")
