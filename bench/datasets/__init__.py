"""Datasets for certseg.bench: the procedural street scenes (the default) and local Cityscapes / Pascal-Context.

The scenes themselves are drawn by ``certseg.training.scenes``; ``procedural_set`` makes a bench dataset of them.
"""

from certseg.bench.datasets.common import BenchDataset, DatasetError, DatasetItem
from certseg.bench.datasets.loader import open_dataset

__all__ = ["BenchDataset", "DatasetError", "DatasetItem", "open_dataset"]
