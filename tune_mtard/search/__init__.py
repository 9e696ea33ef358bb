"""The search machinery (docs/search.md): ``driver`` runs a search, ``searcher`` is its Optuna side,
``recorder`` its MLflow side, ``trials`` names trial states and ranks trials, ``export`` writes a trial's
run config, ``final_eval`` evaluates the top trials on the test split, ``sensitivity`` ranks and plots the
searched keys (docs/sensitivity.md; ``analyze`` redoes that for a search folder), and ``compat`` holds every
use of a private Ray or Optuna internal. ``python -m tune_mtard.search`` runs the ``search`` command."""
