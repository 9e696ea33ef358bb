"""``python -m tune_mtard.bench``: the ``bench`` command (tune_mtard/cli/bench.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("bench")
