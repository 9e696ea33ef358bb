"""The search machinery (docs/search.md): ``driver`` runs a search, ``searcher`` is its Optuna side,
``recorder`` its MLflow side, ``trials`` names trial states and ranks trials, ``export`` writes a trial's
run config, ``final_eval`` evaluates the top trials on the test split, and ``compat`` holds every use of a
private Ray or Optuna internal. ``python -m tune_mtard.search`` runs the ``search`` command."""
