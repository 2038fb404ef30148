"""The safe on-disk form of a data set: one Parquet file per split, read without any pickle.

Layout of a folder written by :func:`write_parquet`::

    OUTDIR/train.parquet  OUTDIR/valid.parquet  OUTDIR/test.parquet  [OUTDIR/unlabeled.parquet]

Each file has one row per example. ``text``, ``text_bert`` (if the data has token ids),
``audio`` and ``vision`` are columns of Arrow's canonical fixed-shape tensor extension type
(``arrow.fixed_shape_tensor``, shape ``[L, d]`` resp. ``[3, L]``), so any Arrow reader sees the
per-example arrays with their shapes; ``id``, ``raw_text``, ``audio_lengths``,
``vision_lengths`` and ``regression_labels`` are plain columns (MMSA's key names). The schema
metadata holds the format version and the data digest (:func:`trainables.data.mmsa.data_digest`).

:func:`read_parquet` turns the tables back into the MMSA raw-dict form and validates them with
the same function as a pickle (:func:`trainables.data.mmsa.arrays_from_mmsa`); a round trip gives
equal arrays and the same digest.

``unlabeled.parquet`` (optional) holds an unlabeled pool: the same columns without
``regression_labels``. It is written when the data has an ``unlabeled`` split and read when
present. The recorded digest covers it; a folder whose labeled files record the digest of the
labeled splits alone (an ``unlabeled.parquet`` added later, e.g. to a synthetic set generated
before pools existed) is accepted too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.data.batches import SPLITS, UNLABELED, MultimodalData, SplitArrays
from trainables.data.mmsa import DataError, arrays_from_mmsa, data_digest, unlabeled_from_mmsa

__all__ = ["FORMAT_VERSION", "MAX_BYTES_ENV", "check_size", "has_parquet_splits", "read_parquet",
           "read_unlabeled_parquet", "size_in_memory", "split_file", "write_parquet"]

#: bumped when the column layout changes; the reader refuses versions it does not know
FORMAT_VERSION = "1"
_META_FORMAT = b"mifusion.format"
_META_VERSION = b"mifusion.format_version"
_META_DIGEST = b"mifusion.digest"
_META_SPLIT = b"mifusion.split"
_META_SOURCE = b"mifusion.source"
_FORMAT_NAME = b"mmsa-parquet"

_TENSOR_COLUMNS = ("text", "text_bert", "audio", "vision")
_HINT = "write the folder with: python -m tuner.data convert IN.pkl OUTDIR"


#: the environment variable that sets the most bytes a data set's Parquet files may take in
#: memory once read (default: this machine's physical memory, which it must fit in anyway)
MAX_BYTES_ENV = "MIFUSION_MAX_DATA_BYTES"


def max_data_bytes() -> int:
    """The limit :func:`check_size` applies: ``$MIFUSION_MAX_DATA_BYTES``, else the physical
    memory of this machine."""
    value = os.environ.get(MAX_BYTES_ENV)
    if value:
        try:
            return int(float(value))
        except ValueError:
            raise DataError(f"${MAX_BYTES_ENV}={value!r}: expected a number of bytes") from None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size_in_memory(path: str | Path) -> int:
    """The bytes the file's rows take once read, from its footer alone (no data page is read):
    rows x width for every fixed-width column (a fixed-shape tensor's width is its shape times
    its item size), the uncompressed size for the others (strings). Encodings such as RLE and
    dictionaries make a file many thousand times smaller than that; this does not trust them."""
    path = Path(path)
    try:
        file = pq.ParquetFile(path)
        schema, meta = file.schema_arrow, file.metadata
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file "
                        f"({' '.join(str(exc).split())[:200]}); {_HINT}") from None
    rows = meta.num_rows
    variable: set[str] = set()
    total = 0
    for fld in schema:
        kind = fld.type
        cells = 1
        if isinstance(kind, pa.FixedShapeTensorType):
            kind, cells = kind.value_type, int(np.prod(kind.shape, dtype=object))
        width = _item_bytes(kind)
        if width is None:
            variable.add(fld.name)
            total += rows * 8  # offsets
        else:
            total += rows * cells * width
    for group in range(meta.num_row_groups):
        chunks = meta.row_group(group)
        for i in range(chunks.num_columns):
            chunk = chunks.column(i)
            if chunk.path_in_schema.split(".")[0] in variable:
                total += chunk.total_uncompressed_size
    return total


def _item_bytes(kind: pa.DataType) -> int | None:
    """Bytes per value of a fixed-width Arrow type (a bool counts 1), None for the others."""
    if isinstance(kind, pa.ExtensionType):
        return None
    try:
        return max(kind.bit_width, 8) // 8
    except ValueError:  # strings, lists: no fixed width
        return None


def check_size(paths: list[Path], where: str | Path) -> None:
    """Refuse, before reading any of them, Parquet files whose rows take more memory together
    than :func:`max_data_bytes` (as :func:`size_in_memory` counts them from their footers)."""
    limit = max_data_bytes()
    total = sum(size_in_memory(p) for p in paths)
    if total > limit:
        raise DataError(f"{where}: its Parquet files hold {_bytes(total)} once read (rows x "
                        f"widths, from their footers), more than the {_bytes(limit)} allowed "
                        f"(this machine's memory, or ${MAX_BYTES_ENV}); nothing was read")


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def split_file(folder: str | Path, split: str) -> Path:
    """``folder/<split>.parquet``."""
    return Path(folder) / f"{split}.parquet"


def has_parquet_splits(folder: str | Path) -> bool:
    """True when ``folder`` holds ``train.parquet``, ``valid.parquet`` and ``test.parquet``."""
    return all(split_file(folder, s).is_file() for s in SPLITS)


def write_parquet(data: MultimodalData, outdir: str | Path) -> Path:
    """Write ``data`` as ``outdir/{train,valid,test}.parquet`` and return ``outdir``.

    Each file is written to a temporary name and renamed, so a crash never leaves a half
    written split behind a complete-looking name.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if UNLABELED not in data.splits:
        # a pool left by an earlier write would be read back as this data's
        split_file(outdir, UNLABELED).unlink(missing_ok=True)
    for split in (*SPLITS, UNLABELED) if UNLABELED in data.splits else SPLITS:
        arrays = data.splits[split]
        columns: dict[str, pa.Array] = {
            "id": pa.array(arrays.ids.tolist(), type=pa.string()),
            "raw_text": pa.array(arrays.raw_text.tolist(), type=pa.string()),
        }
        for key in _TENSOR_COLUMNS:
            value = arrays.text_bert if key == "text_bert" else getattr(arrays, key)
            if value is not None:
                columns[key] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(value))
        columns["audio_lengths"] = pa.array(arrays.audio_lengths, type=pa.int64())
        columns["vision_lengths"] = pa.array(arrays.vision_lengths, type=pa.int64())
        if split != UNLABELED:  # an unlabeled pool has no labels
            columns["regression_labels"] = pa.array(arrays.labels, type=pa.float32())
        table = pa.table(columns).replace_schema_metadata({
            _META_FORMAT: _FORMAT_NAME,
            _META_VERSION: FORMAT_VERSION.encode(),
            _META_DIGEST: data.digest.encode(),
            _META_SPLIT: split.encode(),
            _META_SOURCE: str(data.source).encode("utf-8"),
        })
        target = split_file(outdir, split)
        tmp = target.with_name(target.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    return outdir


def read_parquet(folder: str | Path, nonfinite: str = "error") -> MultimodalData:
    """Read a folder written by :func:`write_parquet` (no pickle involved) and validate it.

    Raises :class:`DataError` for a missing or unreadable split file, an unknown format version,
    a column that is not a fixed-shape tensor, any problem :func:`arrays_from_mmsa` finds, and a
    digest that does not match the one recorded at writing time (files changed or mixed).
    """
    folder = Path(folder)
    missing = [split_file(folder, s).name for s in SPLITS if not split_file(folder, s).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected train.parquet, "
                        f"valid.parquet, test.parquet ({_HINT})")
    check_size([split_file(folder, s) for s in (*SPLITS, UNLABELED)
                if split_file(folder, s).is_file()], folder)
    raw: dict[str, dict[str, np.ndarray]] = {}
    digests: set[bytes | None] = set()
    for split in SPLITS:
        path = split_file(folder, split)
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:200]}); "
                            f"{_HINT}") from None
        meta = table.schema.metadata or {}
        version = meta.get(_META_VERSION)
        if version is not None and version.decode() != FORMAT_VERSION:
            raise DataError(f"{path}: format version {version.decode()!r}, this reader knows "
                            f"{FORMAT_VERSION!r}; re-convert the data with this version")
        digests.add(meta.get(_META_DIGEST))
        raw[split] = _raw_split(table, path)
    if split_file(folder, UNLABELED).is_file():
        raw[UNLABELED] = _raw_split(_read_table(split_file(folder, UNLABELED)), split_file(folder, UNLABELED))
    data = arrays_from_mmsa(raw, str(folder), nonfinite=nonfinite)
    if len(digests) > 1:
        raise DataError(f"{folder}: the split files were written from different data (their digests "
                        f"differ); {_HINT}")
    (recorded,) = digests
    accepted = {data.digest}
    if UNLABELED in data.splits:  # a pool added to a folder written without one
        accepted.add(data_digest({s: data.splits[s] for s in SPLITS}))
    if recorded is not None and recorded.decode() not in accepted:
        raise DataError(f"{folder}: digest mismatch: expected {recorded.decode()[:12]}... (recorded "
                        f"when written), found {data.digest[:12]}... (the files were changed); {_HINT}")
    return data


def _read_table(path: Path) -> pa.Table:
    check_size([path], path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:200]}); "
                        f"{_HINT}") from None
    version = (table.schema.metadata or {}).get(_META_VERSION)
    if version is not None and version.decode() != FORMAT_VERSION:
        raise DataError(f"{path}: format version {version.decode()!r}, this reader knows "
                        f"{FORMAT_VERSION!r}; re-convert the data with this version")
    return table


def read_unlabeled_parquet(path: str | Path, train: SplitArrays, nonfinite: str = "error") -> SplitArrays:
    """One Parquet split file's rows as an unlabeled pool for data whose train split is ``train``
    (labels ignored; widths checked; see :func:`trainables.data.mmsa.unlabeled_from_mmsa`)."""
    path = Path(path)
    raw = _raw_split(_read_table(path), path)
    return unlabeled_from_mmsa(raw, str(path), UNLABELED, train, nonfinite)


def _raw_split(table: pa.Table, path: Path) -> dict[str, np.ndarray]:
    """One table in MMSA's raw-dict form (validation happens in :func:`arrays_from_mmsa`)."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if name in _TENSOR_COLUMNS:
            if not isinstance(column.type, pa.FixedShapeTensorType):
                raise DataError(f"{path}: key {name!r}: expected an arrow.fixed_shape_tensor column, "
                                f"found {column.type}; {_HINT}")
            # Arrow's buffers are read-only; copy so the arrays behave like a pickle's
            # (writable, owned: torch.as_tensor warns on read-only arrays)
            out[name] = np.array(column.combine_chunks().to_numpy_ndarray())
        elif name in ("id", "raw_text"):
            out[name] = np.asarray(column.to_pylist(), dtype=object)
        else:
            out[name] = np.array(column.to_numpy())
    return out
