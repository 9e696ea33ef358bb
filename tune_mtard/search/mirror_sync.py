"""The Ray Tune callback that sends a search's driver files to its object store while it runs
(:mod:`tune_mtard.search.remote`; ray loads at import of this: only a running search needs it)."""

from __future__ import annotations

from ray.tune import Callback

from tune_mtard.search.remote import mirror_of


class PushDriverFiles(Callback):
    """Pushes the driver's files every ``remote.PUSH_EVERY_S`` and once more at the experiment's end. Pickled
    with the tuner, it holds only the folder: a restored search finds its own session's mirror."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_step_end(self, iteration, trials, **info):
        mirror_of(self.folder).push_if_due()

    def on_experiment_end(self, trials, **info):
        mirror_of(self.folder).push()
