"""``python -m tune_mtard.compare``: the ``compare`` command (tune_mtard/cli/compare.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("compare")
