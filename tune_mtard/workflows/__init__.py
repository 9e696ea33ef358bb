"""The workflows: one module per command that is not the search (docs/architecture.md, "Layers").

``train`` (train.py), ``evaluate`` (evaluate.py), ``teachers`` (teachers.py), ``compare`` (compare.py) and
``compare --tune`` (tuned_compare.py) each put the core together for one command; ``tune_mtard/cli/<command>.py``
parses its flags and calls it. The search is its own layer, tune_mtard/search/.
"""
