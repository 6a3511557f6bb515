"""Dataset readers for the mmseg layouts used by the FLOSS authors (see :mod:`floss.data.datasets.registry`).

>>> ds = open_dataset("cityscapes", "data/cityscapes", "val")      # doctest: +SKIP
>>> sample = ds[0]; sample.image.shape, sample.label.shape           # doctest: +SKIP
"""
from floss.data.datasets.reader import (IGNORE_INDEX, DatasetLayoutError, Sample, SegDataset, UnreadableFileError,
                                   open_dataset, read_image, read_label)
from floss.data.datasets.registry import ALIASES, DATASETS, Layout, SplitDirs, available_datasets, get_layout, resolve_name

__all__ = ["ALIASES", "DATASETS", "IGNORE_INDEX", "DatasetLayoutError", "Layout", "Sample", "SegDataset",
           "SplitDirs", "UnreadableFileError", "available_datasets", "get_layout", "open_dataset", "read_image",
           "read_label", "resolve_name"]
