"""MMSA pickles (``aligned_50.pkl`` / ``unaligned_50.pkl``): read, validate, build :class:`MultimodalData`.

The schema (MMSA, Yu et al. 2021; CMU-MOSI / MOSEI / SIMS feature files)::

    {split: {"id", "raw_text", "text", "text_bert"?, "audio", "vision",
             "audio_lengths"?, "vision_lengths"?, "regression_labels", ...}}   split in train/valid/test

plus an optional fourth split ``unlabeled`` (MIRD's pool of unlabeled clips): the same keys
without labels (``regression_labels``, if present, is ignored; ``id`` and ``raw_text`` may be
missing and then become ``unlabeled_<i>`` and ``""``). Its feature widths must equal train's; its
padded sequence lengths are cut or zero-padded to train's (a row's length is clipped with it), so
its rows can share a batch with train rows. :func:`unlabeled_from_mmsa` validates such a split
on its own, for a pool from another file (``--unlabeled PATH``).

``text`` (N, L, d_t) features; ``text_bert`` (N, 3, L) input ids / attention mask / segment ids
(stored as float64 by MMSA); ``audio`` (N, L_a, d_a); ``vision`` (N, L_v, d_v); lengths (N,)
ints; ``regression_labels`` (N,) in [-3, 3]. Other keys (``annotations``,
``classification_labels``, ``regression_labels_T`` ...) are ignored. Widths and lengths are read
from the file: 768-d BERT or 300-d GloVe text, 5- or 74-d audio, 20- or 35-d vision, aligned or not.

:func:`arrays_from_mmsa` is the one validator of the data layer: the Parquet reader turns its
tables into the same raw dict and calls it, so both formats are checked identically. Every
problem is reported as one :class:`DataError` line naming the file, split, key, what was expected
and what was found, before anything trains.

Normalisations (documented because they change the arrays a model sees):

- a length of 0 (seen in real MMSA files: clips without a detected face or voice) becomes 1, and
  that row's first frame is set to zeros, so every row has at least one (all-zero) frame and
  pooling never divides by zero;
- missing ``audio_lengths`` / ``vision_lengths`` (aligned files) mean every row has full length;
- ``text_lengths`` is the attention mask's sum when ``text_bert`` is present, otherwise the index
  of the last non-all-zero row of ``text`` plus one (padding is trailing in MMSA; an all-zero
  word vector inside a sentence, e.g. an out-of-vocabulary GloVe word, does not cut it short),
  and at least 1;
- with ``nonfinite="zero"`` NaN/inf feature values become 0 (what MMSA's own loader does with the
  ``-inf`` in MOSI's audio); labels are never repaired: a NaN label is always an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trainables.data.batches import SPLITS, UNLABELED, MultimodalData, SplitArrays

__all__ = [
    "DataError",
    "LABEL_RANGE",
    "NONFINITE_CHOICES",
    "arrays_from_mmsa",
    "data_digest",
    "read_mmsa_pickle",
    "unlabeled_from_mmsa",
    "with_unlabeled",
]

#: labels must lie in [-LABEL_RANGE, LABEL_RANGE] (MOSI/MOSEI sentiment scale)
LABEL_RANGE = 3.0
#: what to do with NaN/inf in features: stop with an error, or replace them by 0
NONFINITE_CHOICES = ("error", "zero")

_REQUIRED = ("id", "raw_text", "text", "audio", "vision", "regression_labels")
_OPTIONAL = ("text_bert", "audio_lengths", "vision_lengths")
# the feature keys, their symbolic shape for messages, and the name of their length key
_FEATURES = {
    "text": ("L", "d_t"),
    "audio": ("L_a", "d_a"),
    "vision": ("L_v", "d_v"),
}
# float32 has 24 bits of mantissa; labels a hair outside [-3, 3] from float rounding are clipped
_LABEL_TOL = 1e-5


class DataError(ValueError):
    """The data cannot be used; the one-line message names the file, split, key and the fix."""


def read_mmsa_pickle(path: str | Path) -> dict:
    """Unpickle an MMSA feature file and return its raw dict (not yet validated).

    Security: unpickling runs code stored in the file. Only load pickles you trust (e.g. the
    official MMSA downloads). The Parquet form (``python -m tuner.data convert IN.pkl OUTDIR``)
    holds the same arrays, needs no pickle to read, and loads faster; prefer it.

    Emits a :class:`UserWarning` saying the above on every call.
    """
    path = Path(path)
    warnings.warn(
        f"{path}: reading a pickle runs code stored in the file; only load files you trust. "
        f"Convert it once to the safe Parquet form: python -m tuner.data convert {path} OUTDIR",
        UserWarning,
        stacklevel=2,
    )
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an MMSA pickle such as unaligned_50.pkl")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:  # unpickling can raise anything the file's code raises
        raise DataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {_one_line(exc)}); "
            "expected an MMSA feature file such as unaligned_50.pkl"
        ) from None


def arrays_from_mmsa(raw: Any, source: str, nonfinite: str = "error") -> MultimodalData:
    """Validate an MMSA-schema dict and return the typed, normalised :class:`MultimodalData`.

    ``source`` names the file or folder in error messages and in the result. ``nonfinite``:
    ``"error"`` (default) stops at the first NaN/inf in a feature array; ``"zero"`` replaces
    them by 0. Features become float32, ``text_bert`` int64, labels float32, lengths int64.
    Arrays that need no conversion are shared with ``raw``, never modified in place.
    """
    if nonfinite not in NONFINITE_CHOICES:
        raise DataError(f"nonfinite: expected one of 'error', 'zero', found {nonfinite!r}")
    if not isinstance(raw, Mapping):
        raise DataError(
            f"{source}: expected a dict of splits train, valid, test (MMSA schema), "
            f"found {type(raw).__name__}"
        )
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        found = ", ".join(repr(k) for k in list(raw)[:8]) or "no splits"
        raise DataError(
            f"{source}: missing split {missing[0]!r}; expected splits 'train', 'valid', 'test', "
            f"found {found}"
        )
    splits: dict[str, SplitArrays] = {}
    for split in SPLITS:
        splits[split] = _validate_split(raw[split], source, split, nonfinite, splits.get("train"))
    if raw.get(UNLABELED) is not None:
        splits[UNLABELED] = _validate_split(raw[UNLABELED], source, UNLABELED, nonfinite,
                                            splits["train"], labeled=False)
    return MultimodalData(splits=splits, source=source, digest=data_digest(splits))


def unlabeled_from_mmsa(part: Any, source: str, split: str, train: SplitArrays,
                        nonfinite: str = "error") -> SplitArrays:
    """Validate one split of another file as an unlabeled pool for data whose train split is
    ``train`` (widths must match; labels are ignored). ``split`` names it in messages."""
    if nonfinite not in NONFINITE_CHOICES:
        raise DataError(f"nonfinite: expected one of 'error', 'zero', found {nonfinite!r}")
    return _validate_split(part, source, split, nonfinite, train, labeled=False)


def with_unlabeled(data: MultimodalData, pool: SplitArrays, source: str) -> MultimodalData:
    """``data`` with ``pool`` as its unlabeled split (replacing one it had); the digest covers it
    and the source names where it came from."""
    splits = {name: arrays for name, arrays in data.splits.items() if name != UNLABELED}
    splits[UNLABELED] = pool
    return MultimodalData(splits=splits, source=f"{data.source} + unlabeled {source}",
                          digest=data_digest(splits))


def data_digest(splits: Mapping[str, SplitArrays]) -> str:
    """sha256 (hex) over every array of every split: dtype, shape and bytes, strings as UTF-8.

    Depends on the content only (not on the file format or path), so a pickle and its Parquet
    conversion have the same digest. An unlabeled split is included when present (data without
    one keeps the digest it always had).
    """
    h = hashlib.sha256(b"mifusion-data-v1")
    for split in (*SPLITS, UNLABELED) if UNLABELED in splits else SPLITS:
        arrays = splits[split]
        for f in dataclasses.fields(SplitArrays):
            value = getattr(arrays, f.name)
            h.update(f"|{split}/{f.name}|".encode())
            if value is None:
                h.update(b"none")
            elif value.dtype.kind in "USO":
                for s in value.tolist():
                    b = str(s).encode("utf-8")
                    h.update(len(b).to_bytes(8, "little"))
                    h.update(b)
            else:
                value = np.ascontiguousarray(value)
                h.update(f"{value.dtype.str}{value.shape}".encode())
                h.update(memoryview(value).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# validation of one split


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _shape(a: np.ndarray) -> str:
    return "(" + ", ".join(str(int(s)) for s in a.shape) + ("," if a.ndim == 1 else "") + ")"


class _Where:
    """Builds the ``file: split 's' key 'k': ...`` prefix of every message."""

    def __init__(self, source: str, split: str):
        self.source, self.split = source, split

    def error(self, key: str | None, message: str) -> DataError:
        key_part = f" key {key!r}" if key else ""
        return DataError(f"{self.source}: split {self.split!r}{key_part}: {message}")


def _numeric(part: Mapping, key: str, where: _Where) -> np.ndarray:
    try:
        arr = np.asarray(part[key])
    except (ValueError, TypeError) as exc:
        raise where.error(key, f"expected a numeric array, found values numpy cannot stack "
                               f"({_one_line(exc)})") from None
    if arr.dtype.kind not in "fiub":
        raise where.error(key, f"expected a numeric array, found dtype {arr.dtype} "
                               f"with shape {_shape(arr)}")
    return arr


def _strings(part: Mapping, key: str, where: _Where, n: int) -> np.ndarray:
    arr = np.asarray(part[key], dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise where.error(key, f"expected (N={n},) strings, found shape {_shape(arr)}")
    if arr.shape[0] != n:
        raise where.error(key, f"expected N={n} rows like 'regression_labels', found {arr.shape[0]}")
    values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
    return np.array(values, dtype=str)


def _check_rows(arr: np.ndarray, key: str, where: _Where, n: int, expected: str) -> None:
    if arr.shape[0] != n:
        raise where.error(key, f"expected {expected} with N={n} rows like 'regression_labels', "
                               f"found {_shape(arr)}")


def _vector(arr: np.ndarray, key: str, where: _Where, n: int | None) -> np.ndarray:
    """A per-example column: (N,) or (N, 1)."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        label = "N" if n is None else f"N={n}"
        raise where.error(key, f"expected rank 1 ({label},), found shape {_shape(arr)}")
    if n is not None:
        _check_rows(arr, key, where, n, "(N,)")
    return arr


def _features(arr: np.ndarray, key: str, where: _Where, nonfinite: str) -> np.ndarray:
    """float32 copy (or view) of a feature array with NaN/inf handled."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = ~finite
        n_bad = int(bad.sum())
        if nonfinite == "zero":
            out = np.where(bad, np.float32(0), out)
        else:
            n_nan = int(np.isnan(out).sum())
            raise where.error(
                key,
                f"expected finite values, found {n_bad} non-finite of {out.size} ({n_nan} NaN, "
                f"{n_bad - n_nan} inf); pass nonfinite='zero' (CLI: --nonfinite zero) to replace "
                "them by 0 as MMSA's loader does",
            )
    return out


def _integral(arr: np.ndarray, key: str, where: _Where, what: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise where.error(key, f"expected integer {what}, found {int((~np.isfinite(arr)).sum())} "
                                   "NaN/inf")
        frac = arr != np.round(arr)
        if frac.any():
            raise where.error(key, f"expected integer {what}, found {int(frac.sum())} fractional "
                                   f"values (e.g. {float(arr[frac].flat[0]):g})")
    return arr.astype(np.int64)


def _lengths(part: Mapping, key: str, where: _Where, n: int, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N,) lengths for ``seq`` (N, L, d) and ``seq`` with zero-length rows' frame 0 zeroed."""
    full = seq.shape[1]
    if key not in part or part[key] is None:
        return np.full(n, full, dtype=np.int64), seq
    lengths = _integral(_vector(_numeric(part, key, where), key, where, n), key, where, "lengths")
    negative = lengths < 0
    if negative.any():
        raise where.error(key, f"expected lengths >= 0, found {int(negative.sum())} negative "
                               f"(min {int(lengths.min())})")
    longer = lengths > full
    if longer.any():
        seq_key = key.removesuffix("_lengths")
        raise where.error(
            key,
            f"expected lengths <= {full} (the padded length of '{seq_key}' {_shape(seq)}), "
            f"found {int(longer.sum())} longer (max {int(lengths.max())})",
        )
    empty = lengths == 0
    if empty.any():
        # a clip without frames becomes one frame of zeros (pooling needs >= 1 frame)
        seq = seq.copy()
        seq[empty, 0] = 0
        lengths = np.maximum(lengths, 1)
    return lengths, seq


def _fit_length(arr: np.ndarray, length: int) -> np.ndarray:
    """(N, T, d) cut or zero-padded to (N, length, d) (an unlabeled pool onto train's lengths)."""
    if arr.shape[1] >= length:
        return arr[:, :length]
    pad = np.zeros((arr.shape[0], length - arr.shape[1], *arr.shape[2:]), dtype=arr.dtype)
    return np.concatenate([arr, pad], axis=1)


def _validate_split(part: Any, source: str, split: str, nonfinite: str,
                    train: SplitArrays | None, labeled: bool = True) -> SplitArrays:
    """One split, validated. ``labeled=False`` (an unlabeled pool, ``train`` given): no labels
    (zeros, whatever the part holds), ``id``/``raw_text`` optional, and every sequence cut or
    zero-padded to train's padded length so its rows can join a train batch."""
    where = _Where(source, split)
    if not isinstance(part, Mapping):
        raise where.error(None, f"expected a dict of arrays (MMSA schema), found {type(part).__name__}")
    required = _REQUIRED if labeled else tuple(_FEATURES)
    for key in required:
        if key not in part or part[key] is None:
            found = ", ".join(sorted(str(k) for k in part)) or "no keys"
            what = "the MMSA keys" if labeled else "the MMSA keys of an unlabeled split"
            raise where.error(key, f"missing; expected {what} {', '.join(required)} "
                                   f"(optional: {', '.join(_OPTIONAL)}), found {found}")
    if not labeled:
        assert train is not None
        return _validate_unlabeled(part, where, nonfinite, train)

    # labels define N
    labels = _vector(_numeric(part, "regression_labels", where), "regression_labels", where, None)
    n = int(labels.shape[0])
    if n == 0:
        raise where.error("regression_labels", "expected at least one example, found N=0")
    labels = labels.astype(np.float32)
    finite = np.isfinite(labels)
    if not finite.all():
        raise where.error("regression_labels",
                          f"expected finite labels in [-3, 3], found {int((~finite).sum())} NaN/inf "
                          f"of {n} (labels cannot be repaired: drop those rows)")
    outside = (labels < -LABEL_RANGE - _LABEL_TOL) | (labels > LABEL_RANGE + _LABEL_TOL)
    if outside.any():
        raise where.error("regression_labels",
                          f"expected labels in [-3, 3], found {int(outside.sum())} outside "
                          f"(min {float(labels.min()):g}, max {float(labels.max()):g})")
    labels = np.clip(labels, -LABEL_RANGE, LABEL_RANGE)

    ids = _strings(part, "id", where, n)
    raw_text = _strings(part, "raw_text", where, n)

    # features: rank, N, width like train, finite
    feats: dict[str, np.ndarray] = {}
    for key, (len_sym, dim_sym) in _FEATURES.items():
        arr = _feature_array(part, key, where, n)
        if arr.shape[1] == 0:
            raise where.error(key, f"expected (N={n}, {len_sym} >= 1, {dim_sym}), found {_shape(arr)}")
        if train is not None:
            width = getattr(train, key).shape[2]
            if arr.shape[2] != width:
                raise where.error(key, f"expected (N={n}, {len_sym}, {width}) like train, "
                                       f"found {_shape(arr)}")
        feats[key] = _features(arr, key, where, nonfinite)

    # token ids / mask / segments
    text_bert = None
    text_len = feats["text"].shape[1]
    if "text_bert" in part and part["text_bert"] is not None:
        tb = _numeric(part, "text_bert", where)
        if tb.ndim != 3 or tb.shape[1] != 3:
            raise where.error("text_bert", f"expected (N={n}, 3, L={text_len}) = ids, mask, segment "
                                           f"ids, found {_shape(tb)}")
        _check_rows(tb, "text_bert", where, n, f"(N, 3, L={text_len})")
        if tb.shape[2] != text_len:
            raise where.error("text_bert", f"expected (N={n}, 3, L={text_len}) like 'text' "
                                           f"{_shape(feats['text'])}, found {_shape(tb)}")
        if train is not None and train.text_bert is None:
            raise where.error("text_bert", "expected no 'text_bert' like train, found one "
                                           "(all splits must have token ids, or none)")
        text_bert = _integral(tb, "text_bert", where, "token ids / mask / segment ids")
        mask = text_bert[:, 1]
        bad_mask = (mask != 0) & (mask != 1)
        if bad_mask.any():
            values = np.unique(mask[bad_mask])[:5].tolist()
            raise where.error("text_bert", f"expected an attention mask (text_bert[:, 1]) of 0/1, "
                                           f"found {int(bad_mask.sum())} other values (e.g. {values})")
        if (text_bert[:, 0] < 0).any() or (text_bert[:, 2] < 0).any():
            raise where.error("text_bert", "expected non-negative token and segment ids, "
                                           f"found min {int(text_bert[:, [0, 2]].min())}")
        text_lengths = np.clip(mask.sum(axis=1), 1, text_len).astype(np.int64)
    else:
        if train is not None and train.text_bert is not None:
            raise where.error("text_bert", f"expected (N={n}, 3, L={text_len}) like train, found none "
                                           "(all splits must have token ids, or none)")
        nonzero = np.any(feats["text"] != 0, axis=2)  # (N, L)
        last = text_len - np.argmax(nonzero[:, ::-1], axis=1)  # index of last non-zero row + 1
        text_lengths = np.where(nonzero.any(axis=1), last, 1).astype(np.int64)

    audio_lengths, feats["audio"] = _lengths(part, "audio_lengths", where, n, feats["audio"])
    vision_lengths, feats["vision"] = _lengths(part, "vision_lengths", where, n, feats["vision"])

    return SplitArrays(
        ids=ids,
        raw_text=raw_text,
        text=feats["text"],
        text_bert=text_bert,
        audio=feats["audio"],
        vision=feats["vision"],
        text_lengths=text_lengths,
        audio_lengths=audio_lengths,
        vision_lengths=vision_lengths,
        labels=labels,
    )


def _feature_array(part: Mapping, key: str, where: "_Where", n: int) -> np.ndarray:
    """``part[key]`` as a numeric (N, L, d) array of ``n`` rows, or a one-line error."""
    len_sym, dim_sym = _FEATURES[key]
    arr = _numeric(part, key, where)
    if arr.ndim != 3:
        raise where.error(key, f"expected rank 3 (N={n}, {len_sym}, {dim_sym}), "
                               f"found shape {_shape(arr)}")
    _check_rows(arr, key, where, n, f"(N, {len_sym}, {dim_sym})")
    return arr


def _validate_unlabeled(part: Mapping, where: _Where, nonfinite: str,
                        train: SplitArrays) -> SplitArrays:
    """An unlabeled split: N from ``text``, widths checked against train, sequences fitted to
    train's padded lengths, then the labeled validation with zero labels."""
    text = _numeric(part, "text", where)
    if text.ndim != 3:
        raise where.error("text", f"expected rank 3 (N, L, d_t), found shape {_shape(text)}")
    n = int(text.shape[0])
    if n == 0:
        raise where.error("text", "expected at least one example, found N=0")
    fitted: dict[str, Any] = {}
    for key, (len_sym, dim_sym) in _FEATURES.items():
        arr = _feature_array(part, key, where, n)
        width = getattr(train, key).shape[2]
        if arr.shape[2] != width:
            raise where.error(key, f"expected width {dim_sym}={width} like train, i.e. "
                                   f"(N={n}, {len_sym}, {width}), found {_shape(arr)}")
        fitted[key] = _fit_length(arr, getattr(train, key).shape[1])
    full = {key: int(np.asarray(part[key]).shape[1]) for key in _FEATURES}
    for key in ("audio", "vision"):
        length_key = f"{key}_lengths"
        if part.get(length_key) is not None:
            lengths = _integral(_vector(_numeric(part, length_key, where), length_key, where, n),
                                length_key, where, "lengths")
            if (lengths > full[key]).any():  # checked against the file's own padding
                raise where.error(length_key, f"expected lengths <= {full[key]} (the padded "
                                              f"length of '{key}'), found "
                                              f"{int((lengths > full[key]).sum())} longer "
                                              f"(max {int(lengths.max())})")
            fitted[length_key] = np.minimum(lengths, getattr(train, key).shape[1])
        elif full[key] != getattr(train, key).shape[1]:
            fitted[length_key] = np.full(n, min(full[key], getattr(train, key).shape[1]))
    if part.get("text_bert") is not None and train.text_bert is not None:  # else unused: dropped
        tb = _numeric(part, "text_bert", where)
        if tb.ndim != 3 or tb.shape[1] != 3 or tb.shape[0] != n or tb.shape[2] != full["text"]:
            raise where.error("text_bert", f"expected (N={n}, 3, L={full['text']}) = ids, mask, "
                                           f"segment ids, found {_shape(tb)}")
        fitted["text_bert"] = np.moveaxis(_fit_length(np.moveaxis(tb, 2, 1),
                                                      train.text.shape[1]), 1, 2)
    ids = part.get("id")
    fitted["id"] = (np.array([f"unlabeled_{i}" for i in range(n)], dtype=object)
                    if ids is None else ids)
    raw_text = part.get("raw_text")
    fitted["raw_text"] = np.full(n, "", dtype=object) if raw_text is None else raw_text
    fitted["regression_labels"] = np.zeros(n, dtype=np.float32)  # never read: labels hidden
    return _validate_split(fitted, where.source, where.split, nonfinite, train)
