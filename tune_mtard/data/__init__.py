"""Datasets held in memory as tensors (``datasets``: the registry and loaders; ``splits``: train, validation
and test; ``loader``: batches, crop and flip on the data's own device), or image folders streamed from disk
(``folders``)."""

from tune_mtard.data.datasets import DATASETS, DatasetInfo, load_data, register_dataset
from tune_mtard.data.folders import FolderSplit, ImageView
from tune_mtard.data.loader import iterate_batches, num_batches
from tune_mtard.data.splits import DataBundle, Split

__all__ = ["DATASETS", "DataBundle", "DatasetInfo", "FolderSplit", "ImageView", "Split", "iterate_batches",
           "load_data", "num_batches", "register_dataset"]
