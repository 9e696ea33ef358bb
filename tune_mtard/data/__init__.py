"""Datasets held in memory as tensors (``datasets``: the registry and loaders; ``splits``: train, validation
and test; ``loader``: batches, crop and flip on the data's own device)."""

from tune_mtard.data.datasets import DATASETS, DatasetInfo, load_data, register_dataset
from tune_mtard.data.loader import iterate_batches, num_batches
from tune_mtard.data.splits import DataBundle, Split

__all__ = ["DATASETS", "DataBundle", "DatasetInfo", "Split", "iterate_batches", "load_data", "num_batches",
           "register_dataset"]
