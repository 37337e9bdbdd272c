"""Datasets of the harness: reading, filtering and the leave-one-out split.

``load_dataset(name)`` resolves a recipe in ``datasets/`` or an atomic folder in
the data dir and returns a :class:`SplitData`. Methods receive only its
:class:`TrainView`.
"""

from bench.data.process import DatasetConfig
from bench.data.recipes import list_datasets, load_dataset
from bench.data.types import SplitData, TrainView

__all__ = ["DatasetConfig", "SplitData", "TrainView", "list_datasets", "load_dataset"]
