"""Data layer: MMSA pickles, Parquet folders, the synthetic generator, batches.

``load_dataset(path)`` is the one entry point: an MMSA ``.pkl`` file (unpickled, with a warning:
pickles run code) or a folder of ``train/valid/test.parquet`` written by
``python -m tuner.data convert`` (no pickle). Both are validated by the same function before
anything trains and give a :class:`MultimodalData`. Either may carry a fourth split
``unlabeled`` (the pickle's key, or ``unlabeled.parquet``); ``load_dataset(path, unlabeled=OTHER)``
adds (or replaces) it from another file, see :func:`load_unlabeled`.

This package imports nothing else of the project (trials and tests use it without the driver).
"""

from __future__ import annotations

from pathlib import Path

from trainables.data.batches import (
    DROP_SETS,
    DROPPABLE,
    SPLITS,
    UNLABELED,
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
    unlabeled_from_mmsa,
    with_unlabeled,
)
from trainables.data.parquet import (
    has_parquet_splits,
    read_parquet,
    read_unlabeled_parquet,
    split_file,
    write_parquet,
)

__all__ = [
    "DROPPABLE",
    "DROP_SETS",
    "NONFINITE_CHOICES",
    "SPLITS",
    "UNLABELED",
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
    "load_unlabeled",
    "read_mmsa_pickle",
    "read_parquet",
    "resample_to_length",
    "unlabeled_from_mmsa",
    "with_unlabeled",
    "write_parquet",
]

_WHAT_TO_PASS = (
    "pass an MMSA pickle (e.g. unaligned_50.pkl) or a folder with train/valid/test.parquet "
    "(python -m tuner.data convert IN.pkl OUTDIR; a synthetic set: python -m tuner.data synth --out DIR)"
)


def load_dataset(path: str | Path, nonfinite: str = "error",
                 unlabeled: str | Path | None = None) -> MultimodalData:
    """Load and validate a data set: an MMSA ``.pkl`` file or a Parquet folder.

    ``nonfinite``: ``"error"`` stops at NaN/inf in features; ``"zero"`` replaces them by 0 (real
    MOSI audio has ``-inf``). ``unlabeled``: a file whose rows become the ``unlabeled`` split
    (replacing one the data has), see :func:`load_unlabeled`. Raises :class:`DataError` (one
    line) for anything unusable.
    """
    data = _load_labeled(path, nonfinite)
    if unlabeled is None:
        return data
    pool = load_unlabeled(unlabeled, data.splits["train"], nonfinite=nonfinite)
    return with_unlabeled(data, pool, str(Path(unlabeled).expanduser()))


_WHAT_UNLABELED = (
    "pass an MMSA pickle (its 'unlabeled' split, else its 'train' split is used), a .parquet file, "
    "or a Parquet folder (its unlabeled.parquet, else its train.parquet)"
)


def load_unlabeled(path: str | Path, train: SplitArrays, nonfinite: str = "error") -> SplitArrays:
    """An unlabeled pool from another file, validated against the data's ``train`` split.

    - an MMSA ``.pkl``: its ``unlabeled`` split if it has one, else its ``train`` split (labels,
      if any, are ignored; the pickle warning applies);
    - a ``.parquet`` file: its rows (a split file as :func:`write_parquet` writes it);
    - a Parquet folder: its ``unlabeled.parquet``, else its ``train.parquet``.

    Feature widths must equal train's (a :class:`DataError` names the file, key and width);
    padded lengths are fitted to train's (see :mod:`trainables.data.mmsa`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--unlabeled {path}: no such file or folder; {_WHAT_UNLABELED}")
    if path.is_file() and path.suffix == ".pkl":
        raw = read_mmsa_pickle(path)
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a dict of splits (MMSA schema), found "
                            f"{type(raw).__name__}")
        split = UNLABELED if raw.get(UNLABELED) is not None else "train"
        if raw.get(split) is None:
            raise DataError(f"{path}: no 'unlabeled' or 'train' split to use as unlabeled data "
                            f"(found {', '.join(map(repr, list(raw)[:8])) or 'no splits'})")
        return unlabeled_from_mmsa(raw[split], str(path), split, train, nonfinite)
    if path.is_dir():
        for name in (UNLABELED, "train"):
            if split_file(path, name).is_file():
                return read_unlabeled_parquet(split_file(path, name), train, nonfinite)
        raise DataError(f"--unlabeled {path}: a folder without unlabeled.parquet or "
                        f"train.parquet; {_WHAT_UNLABELED}")
    if path.suffix == ".parquet":
        return read_unlabeled_parquet(path, train, nonfinite)
    raise DataError(f"--unlabeled {path}: unknown format; {_WHAT_UNLABELED}")


def _load_labeled(path: str | Path, nonfinite: str) -> MultimodalData:
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
