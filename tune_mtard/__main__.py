"""``python -m tune_mtard <command> ...``: the same as the ``tune-mtard`` console script."""

from tune_mtard.cli import main

main()
