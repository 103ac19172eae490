"""Loading data sets the way users name them: a Hub id, a local data file (``.json``, ``.jsonl``, ``.csv``,
``.parquet``, ``.txt``) or folder that ``datasets.load_dataset`` reads, or a folder written by ``save_to_disk`` (which
``load_dataset`` cannot read)."""

from __future__ import annotations

import os

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .validation import DataValidationError

#: file extension -> the ``datasets`` builder that reads it (``load_dataset(path)`` alone rejects a single file)
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                 ".txt": "text", ".arrow": "arrow"}


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def load_dataset_dict(name_or_path: str, config: str | None = None, default_split: str = "train") -> DatasetDict:
    """Always returns a ``DatasetDict``; a single ``Dataset`` becomes the ``default_split`` split."""
    if _is_saved_to_disk(name_or_path):
        data = load_from_disk(name_or_path)
    elif os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in FILE_BUILDERS:
            raise DataValidationError(
                f"Cannot read the data file {name_or_path!r}: its extension {ext!r} is not one of "
                f"{sorted(FILE_BUILDERS)}. Convert it, or give a folder or a Hub data set."
            )
        kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
        data = load_dataset(FILE_BUILDERS[ext], data_files={default_split: name_or_path}, **kwargs)
    else:
        data = load_dataset(name_or_path, name=config)
    if isinstance(data, Dataset):
        data = DatasetDict({default_split: data})
    return data
