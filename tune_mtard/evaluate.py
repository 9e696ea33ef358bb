"""``python -m tune_mtard.evaluate``: the ``evaluate`` command (tune_mtard/cli/evaluate.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("evaluate")
