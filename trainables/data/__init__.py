"""Data layer: MMSA pickles, Parquet folders, the synthetic generator, batches.

``load_dataset(path)`` is the one entry point: an MMSA ``.pkl`` file (unpickled, with a warning:
pickles run code) or a folder of ``train/valid/test.parquet`` written by
``python -m tuner.data convert`` (no pickle). Both are validated by the same function before
anything trains and give a :class:`MultimodalData`.

This package imports nothing else of the project (trials and tests use it without the driver).
"""

from __future__ import annotations

from pathlib import Path

from trainables.data.batches import (
    DROP_SETS,
    DROPPABLE,
    SPLITS,
    Batch,
    ModalityDims,
    MultimodalData,
    SplitArrays,
    TensorSplit,
    drop_modality,
    drop_set,
    iterate_batches,
    resample_to_length,
)
from trainables.data.mmsa import (
    NONFINITE_CHOICES,
    DataError,
    arrays_from_mmsa,
    data_digest,
    read_mmsa_pickle,
)
from trainables.data.parquet import has_parquet_splits, read_parquet, write_parquet

__all__ = [
    "DROPPABLE",
    "DROP_SETS",
    "NONFINITE_CHOICES",
    "SPLITS",
    "Batch",
    "DataError",
    "ModalityDims",
    "MultimodalData",
    "SplitArrays",
    "TensorSplit",
    "arrays_from_mmsa",
    "data_digest",
    "drop_modality",
    "drop_set",
    "iterate_batches",
    "load_dataset",
    "read_mmsa_pickle",
    "read_parquet",
    "resample_to_length",
    "write_parquet",
]

_WHAT_TO_PASS = (
    "pass an MMSA pickle (e.g. unaligned_50.pkl) or a folder with train/valid/test.parquet "
    "(python -m tuner.data convert IN.pkl OUTDIR; a synthetic set: python -m tuner.data synth --out DIR)"
)


def load_dataset(path: str | Path, nonfinite: str = "error") -> MultimodalData:
    """Load and validate a data set: an MMSA ``.pkl`` file or a Parquet folder.

    ``nonfinite``: ``"error"`` stops at NaN/inf in features; ``"zero"`` replaces them by 0 (real
    MOSI audio has ``-inf``). Raises :class:`DataError` (one line) for anything unusable.
    """
    if nonfinite not in NONFINITE_CHOICES:
        raise DataError(f"nonfinite: expected one of 'error', 'zero', found {nonfinite!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {_WHAT_TO_PASS}")
    if path.is_file() and path.suffix == ".pkl":
        return arrays_from_mmsa(read_mmsa_pickle(path), str(path), nonfinite=nonfinite)
    if path.is_dir():
        if has_parquet_splits(path) or any(path.glob("*.parquet")):
            return read_parquet(path, nonfinite=nonfinite)
        raise DataError(f"{path}: a folder without train.parquet, valid.parquet, test.parquet; "
                        f"{_WHAT_TO_PASS}")
    if path.suffix == ".parquet":
        raise DataError(f"{path}: a single split file; pass its folder {path.parent} "
                        "(it must hold train.parquet, valid.parquet, test.parquet)")
    raise DataError(f"{path}: unknown data format (expected a .pkl file or a Parquet folder); "
                    f"{_WHAT_TO_PASS}")
