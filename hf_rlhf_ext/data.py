"""Loading data sets the way users name them: a Hub id, a local data file or folder that ``datasets.load_dataset``
reads, or a folder written by ``save_to_disk`` (which ``load_dataset`` cannot read)."""

from __future__ import annotations

import os

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def load_dataset_dict(name_or_path: str, config: str | None = None, default_split: str = "train") -> DatasetDict:
    """Always returns a ``DatasetDict``; a single ``Dataset`` becomes the ``default_split`` split."""
    if _is_saved_to_disk(name_or_path):
        data = load_from_disk(name_or_path)
    else:
        data = load_dataset(name_or_path, name=config)
    if isinstance(data, Dataset):
        data = DatasetDict({default_split: data})
    return data
