"""The Ray Tune trainable of the product's layout (``trainables/``): a thin entry into
:mod:`tune_mtard.search.trial`, where the trainable ``train_bmtard`` lives with the rest of the search.

Kept so that ``tune_mtard.trainables.bmtard.train_bmtard``, the name a search started before the move pickled
in its Tuner state, still names the same function when that search is resumed.
"""

from tune_mtard.search.trial import (
    CHECKPOINT_PREFIX,
    EPOCH_KEY,
    CheckpointError,
    find_checkpoints,
    teacher_from_weights,
    train_bmtard,
    trial_config,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "EPOCH_KEY",
    "find_checkpoints",
    "teacher_from_weights",
    "train_bmtard",
    "trial_config",
]
