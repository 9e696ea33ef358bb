"""``python -m tune_mtard.train``: the ``train`` command (tune_mtard/cli/train.py)."""

if __name__ == "__main__":
    from tune_mtard.cli import run_command

    run_command("train")
