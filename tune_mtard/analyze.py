"""``python -m tune_mtard.analyze``: the ``analyze`` command (tune_mtard/cli/analyze.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("analyze")
