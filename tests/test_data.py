"""The data layer: MMSA pickles, Parquet folders, validation messages, the tuner.data CLI."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from trainables.data import (
    DataError,
    MultimodalData,
    SplitArrays,
    arrays_from_mmsa,
    load_dataset,
    read_mmsa_pickle,
    read_parquet,
    write_parquet,
)
from trainables.data.parquet import FORMAT_VERSION
from tuner.data import main

SRC = "data/x.pkl"


def _error(raw, nonfinite: str = "error") -> str:
    """The message of the DataError that validating ``raw`` raises (asserted to be one line)."""
    with pytest.raises(DataError) as info:
        arrays_from_mmsa(raw, SRC, nonfinite=nonfinite)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(SRC)
    return message


def _assert_same(a: MultimodalData, b: MultimodalData) -> None:
    for split in ("train", "valid", "test"):
        for f in dataclasses.fields(SplitArrays):
            x, y = getattr(a.splits[split], f.name), getattr(b.splits[split], f.name)
            if x is None or y is None:
                assert x is None and y is None, f.name
                continue
            assert x.dtype == y.dtype, (split, f.name)
            assert x.shape == y.shape, (split, f.name)
            assert np.array_equal(x, y), (split, f.name)
    assert a.digest == b.digest


# ---------------------------------------------------------------------------------- reading


def test_pickle_reads_with_a_warning(small_pickle, small_data):
    with pytest.warns(UserWarning, match=r"runs code.*python -m tuner\.data convert"):
        data = load_dataset(small_pickle)
    assert data.source == str(small_pickle)
    _assert_same(data, small_data)
    tr = data.splits["train"]
    assert tr.text.dtype == np.float32 and tr.audio.dtype == np.float32
    assert tr.text_bert.dtype == np.int64 and tr.labels.dtype == np.float32
    assert tr.audio_lengths.dtype == np.int64 and tr.text_lengths.min() >= 1
    assert [len(data.splits[s]) for s in ("train", "valid", "test")] == [96, 48, 48]


def test_pickle_reader_documents_the_risk():
    doc = read_mmsa_pickle.__doc__
    assert "runs code" in doc and "trust" in doc and "Parquet" in doc


def test_parquet_round_trip_is_exact(small_data, tmp_path):
    out = write_parquet(small_data, tmp_path / "pq")
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet",
                                                     "unlabeled.parquet", "valid.parquet"]
    assert "regression_labels" not in pq.read_schema(out / "unlabeled.parquet").names
    meta = pq.read_schema(out / "valid.parquet").metadata
    assert meta[b"mifusion.digest"].decode() == small_data.digest
    assert meta[b"mifusion.format_version"].decode() == FORMAT_VERSION
    assert "fixed_shape_tensor" in str(pq.read_schema(out / "train.parquet").field("audio").type)
    back = load_dataset(out)
    assert back.source == str(out)
    _assert_same(back, small_data)
    assert back.splits["train"].text.flags.writeable


def test_parquet_needs_no_pickle(small_data, tmp_path, monkeypatch):
    out = write_parquet(small_data, tmp_path / "pq")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while reading Parquet")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert read_parquet(out).digest == small_data.digest


def test_parquet_detects_changed_or_missing_files(small_data, tmp_path):
    out = write_parquet(small_data, tmp_path / "pq")
    table = pq.read_table(out / "test.parquet")
    labels = table.column("regression_labels").to_numpy().copy()
    labels[0] = -labels[0] if labels[0] != 0 else 1.0
    table = table.set_column(table.schema.get_field_index("regression_labels"),
                             "regression_labels", [labels])
    pq.write_table(table, out / "test.parquet")
    with pytest.raises(DataError, match="digest mismatch"):
        read_parquet(out)
    (out / "valid.parquet").unlink()
    with pytest.raises(DataError, match=r"missing valid\.parquet.*tuner\.data convert"):
        load_dataset(out)
    (out / "train.parquet").write_bytes(b"not parquet")
    (out / "valid.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable Parquet file"):
        read_parquet(out)


def test_parquet_is_validated_like_a_pickle(small_data, tmp_path):
    out = write_parquet(small_data, tmp_path / "pq")
    table = pq.read_table(out / "valid.parquet")
    lengths = table.column("audio_lengths").to_numpy().copy()
    lengths[3] = 999
    table = table.set_column(table.schema.get_field_index("audio_lengths"), "audio_lengths",
                             [lengths])
    pq.write_table(table.replace_schema_metadata({}), out / "valid.parquet")
    with pytest.raises(DataError, match=r"split 'valid' key 'audio_lengths': expected lengths <= 40"):
        read_parquet(out)


def test_digest_is_stable_and_content_based(small_raw, small_raw_copy, small_data):
    assert arrays_from_mmsa(small_raw, "a").digest == small_data.digest
    assert arrays_from_mmsa(small_raw, "somewhere/else").digest == small_data.digest
    assert re.fullmatch(r"[0-9a-f]{64}", small_data.digest)
    small_raw_copy["test"]["regression_labels"][0] += np.float32(1 / 3) * (
        -1 if small_raw_copy["test"]["regression_labels"][0] > 0 else 1)
    assert arrays_from_mmsa(small_raw_copy, "a").digest != small_data.digest


def test_load_dataset_paths(tmp_path, small_data):
    with pytest.raises(DataError, match=r"nope\.pkl: no such file or folder; pass an MMSA pickle"):
        load_dataset(tmp_path / "nope.pkl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without train.parquet"):
        load_dataset(tmp_path / "empty")
    out = write_parquet(small_data, tmp_path / "pq")
    with pytest.raises(DataError, match="pass its folder"):
        load_dataset(out / "train.parquet")
    with pytest.raises(DataError, match="nonfinite"):
        load_dataset(out, nonfinite="drop")


# ------------------------------------------------------------------- validation, one per error


def test_error_not_a_dict():
    message = _error([1, 2, 3])
    assert "expected a dict of splits train, valid, test" in message and "found list" in message


def test_error_missing_split(small_raw_copy):
    del small_raw_copy["valid"]
    message = _error(small_raw_copy)
    assert "missing split 'valid'" in message and "found 'train', 'test'" in message


def test_error_missing_key(small_raw_copy):
    del small_raw_copy["test"]["audio"]
    message = _error(small_raw_copy)
    assert message.startswith(f"{SRC}: split 'test' key 'audio': missing; expected the MMSA keys")
    assert "found " in message and "vision" in message


def test_error_ragged_n(small_raw_copy):
    small_raw_copy["valid"]["vision"] = small_raw_copy["valid"]["vision"][:-1]
    message = _error(small_raw_copy)
    assert "split 'valid' key 'vision'" in message
    assert "N=48 rows like 'regression_labels', found (47, 40, 20)" in message


def test_error_wrong_rank(small_raw_copy):
    small_raw_copy["train"]["audio"] = small_raw_copy["train"]["audio"].mean(axis=2)
    message = _error(small_raw_copy)
    assert message == (f"{SRC}: split 'train' key 'audio': expected rank 3 (N=96, L_a, d_a), "
                       "found shape (96, 40)")


def test_error_width_differs_from_train(small_raw_copy):
    small_raw_copy["valid"]["audio"] = np.zeros((48, 40, 74), dtype=np.float32)
    assert _error(small_raw_copy) == (
        f"{SRC}: split 'valid' key 'audio': expected (N=48, L_a, 5) like train, found (48, 40, 74)")


def test_error_text_bert_not_three_rows(small_raw_copy):
    small_raw_copy["test"]["text_bert"] = small_raw_copy["test"]["text_bert"][:, :2]
    message = _error(small_raw_copy)
    assert "split 'test' key 'text_bert': expected (N=48, 3, L=50)" in message
    assert "found (48, 2, 50)" in message


def test_error_nan_in_features(small_raw_copy):
    vision = small_raw_copy["train"]["vision"]
    vision[0, 0, 0] = np.nan
    vision[5, 3, 2] = np.nan
    message = _error(small_raw_copy)
    assert "split 'train' key 'vision': expected finite values, found 2 non-finite" in message
    assert "(2 NaN, 0 inf)" in message


def test_error_inf_in_audio_suggests_zero(small_raw_copy):
    small_raw_copy["valid"]["audio"][1, 0, :] = -np.inf
    message = _error(small_raw_copy)
    assert "split 'valid' key 'audio'" in message and "5 non-finite" in message
    assert "nonfinite='zero'" in message and "--nonfinite zero" in message


def test_nonfinite_zero_replaces_by_zero(small_raw_copy, small_raw):
    small_raw_copy["valid"]["audio"][1, 0, :] = -np.inf
    small_raw_copy["test"]["text"][2, 1, 3] = np.nan
    data = arrays_from_mmsa(small_raw_copy, SRC, nonfinite="zero")
    audio = data.splits["valid"].audio
    assert np.isfinite(audio).all() and (audio[1, 0] == 0).all()
    assert np.array_equal(audio[2:], small_raw["valid"]["audio"][2:])
    assert data.splits["test"].text[2, 1, 3] == 0
    assert np.isinf(small_raw_copy["valid"]["audio"][1, 0, 0])  # the input is not modified


def test_error_nan_label_even_with_zero(small_raw_copy):
    small_raw_copy["train"]["regression_labels"][7] = np.nan
    for mode in ("error", "zero"):
        message = _error(small_raw_copy, nonfinite=mode)
        assert "split 'train' key 'regression_labels': expected finite labels" in message
        assert "found 1 NaN/inf of 96" in message


def test_error_labels_out_of_range(small_raw_copy):
    small_raw_copy["test"]["regression_labels"][3] = 3.5
    message = _error(small_raw_copy)
    assert "split 'test' key 'regression_labels': expected labels in [-3, 3]" in message
    assert "found 1 outside" in message and "max 3.5" in message


def test_error_negative_length(small_raw_copy):
    small_raw_copy["train"]["vision_lengths"][4] = -1
    message = _error(small_raw_copy)
    assert "split 'train' key 'vision_lengths': expected lengths >= 0, found 1 negative (min -1)" in message


def test_error_length_longer_than_sequence(small_raw_copy):
    small_raw_copy["valid"]["audio_lengths"][0] = 41
    message = _error(small_raw_copy)
    assert message == (f"{SRC}: split 'valid' key 'audio_lengths': expected lengths <= 40 (the padded "
                       "length of 'audio' (48, 40, 5)), found 1 longer (max 41)")


def test_error_fractional_length(small_raw_copy):
    small_raw_copy["valid"]["audio_lengths"] = small_raw_copy["valid"]["audio_lengths"] + 0.5
    assert "expected integer lengths, found 48 fractional" in _error(small_raw_copy)


def test_error_mask_not_binary(small_raw_copy):
    small_raw_copy["train"]["text_bert"][0, 1, 0] = 2
    message = _error(small_raw_copy)
    assert "split 'train' key 'text_bert': expected an attention mask (text_bert[:, 1]) of 0/1" in message
    assert "found 1 other values (e.g. [2])" in message


def test_error_not_numeric(small_raw_copy):
    small_raw_copy["test"]["vision"] = np.array(["a"] * 48, dtype=object)
    message = _error(small_raw_copy)
    assert "split 'test' key 'vision': expected a numeric array, found dtype object" in message


def test_error_tokens_in_some_splits_only(small_raw_copy):
    del small_raw_copy["valid"]["text_bert"]
    message = _error(small_raw_copy)
    assert "split 'valid' key 'text_bert'" in message and "all splits must have token ids" in message


def test_zero_length_becomes_one_zero_frame(small_raw_copy, small_raw):
    small_raw_copy["train"]["audio_lengths"][2] = 0
    data = arrays_from_mmsa(small_raw_copy, SRC)
    tr = data.splits["train"]
    assert tr.audio_lengths[2] == 1 and (tr.audio[2, 0] == 0).all()
    assert np.array_equal(tr.audio[3], small_raw["train"]["audio"][3])
    assert small_raw_copy["train"]["audio"][2, 0].any()  # the input is not modified


def test_optional_keys_and_extra_keys(small_raw_copy, small_data):
    for split in ("train", "valid", "test"):
        part = small_raw_copy[split]
        del part["text_bert"], part["audio_lengths"]
        part["annotations"] = ["Positive"] * len(part["id"])
        part["classification_labels"] = np.zeros(len(part["id"]))
        part["regression_labels"] = part["regression_labels"][:, None]  # (N, 1) is accepted
    data = arrays_from_mmsa(small_raw_copy, SRC)
    assert not data.dims.has_tokens and data.splits["train"].text_bert is None
    tr, ref = data.splits["train"], small_data.splits["train"]
    assert (tr.audio_lengths == 40).all()  # no lengths: every row is full length
    # text lengths from the features' trailing zero rows equal the attention mask's
    assert np.array_equal(tr.text_lengths, ref.text_lengths)
    assert tr.labels.shape == (96,)


def test_text_bert_float64_becomes_int64(small_raw, small_data):
    assert small_raw["train"]["text_bert"].dtype == np.float64  # as MMSA stores it
    tb = small_data.splits["train"].text_bert
    assert tb.dtype == np.int64 and set(np.unique(tb[:, 1])) <= {0, 1}
    assert np.array_equal(small_data.splits["train"].text_lengths, tb[:, 1].sum(axis=1))


def test_aligned_and_unaligned_dims(small_data):
    from trainables.data.synthetic import make_synthetic

    dims = small_data.dims
    assert (dims.text, dims.audio, dims.vision) == (64, 5, 20)
    assert (dims.text_len, dims.audio_len, dims.vision_len) == (50, 40, 40)
    assert not dims.aligned and dims.has_tokens
    aligned = arrays_from_mmsa(make_synthetic("small", seed=0, aligned=True), "aligned").dims
    assert aligned.aligned and aligned.audio_len == aligned.vision_len == aligned.text_len == 50


# ------------------------------------------------------------------------------------ the CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    return errors[0]


def test_cli_synth_validate_convert(tmp_path, capsys):
    pkl = tmp_path / "s.pkl"
    assert main(["synth", "--out", str(pkl), "--size", "small", "--fast-text", "--seed", "3"]) == 0
    assert f"wrote {pkl}" in capsys.readouterr().out

    assert main(["validate", str(pkl)]) == 0
    captured = capsys.readouterr()
    summary = captured.out.strip()
    assert len(summary.splitlines()) == 1
    assert "train 96, valid 48, test 48" in summary and "unaligned" in summary
    assert "audio 40x5" in summary and "with token ids" in summary
    with pytest.warns(UserWarning, match="runs code"):
        digest = load_dataset(pkl).digest
    assert digest in summary
    assert captured.err.startswith("warning: ") and "runs code" in captured.err

    out = tmp_path / "pq"
    assert main(["convert", str(pkl), str(out)]) == 0
    assert read_parquet(out).digest == digest
    assert main(["validate", str(out)]) == 0
    assert digest in capsys.readouterr().out

    folder = tmp_path / "aligned"
    assert main(["synth", "--out", str(folder), "--size", "small", "--fast-text", "--aligned"]) == 0
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 0
    captured = capsys.readouterr()
    assert " aligned;" in captured.out and captured.err == ""


def test_cli_errors_are_one_line(tmp_path, capsys, small_raw_copy):
    assert main(["validate", str(tmp_path / "missing.pkl")]) == 2
    assert "missing.pkl: no such file or folder" in _one_error_line(capsys)

    small_raw_copy["valid"]["audio"][0, 0, 0] = -np.inf
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(small_raw_copy))
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "split 'valid' key 'audio'" in line and "--nonfinite zero" in line
    assert main(["convert", str(bad), str(tmp_path / "out"), "--nonfinite", "zero"]) == 0
    assert load_dataset(tmp_path / "out").splits["valid"].audio[0, 0, 0] == 0

    bad.write_bytes(b"\x80\x04not a pickle")
    assert main(["validate", str(bad)]) == 2
    assert "not a readable pickle" in _one_error_line(capsys)


def test_cli_help_and_usage(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "runs code" in top and "synth" in top and "convert" in top and "Examples" in top
    assert main(["synth", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--size", "--seed", "--aligned", "--fast-text"):
        assert flag in text
    assert "python -m tuner.data synth --out" in text
    for command in ("validate", "convert"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--nonfinite" in text and "runs code" in text and "Example" in text
    assert main(["synth"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


def test_length_grouped_order_is_a_seeded_permutation_of_sorted_chunks():
    from trainables.data.batches import length_grouped_order

    lengths = torch.as_tensor(np.random.default_rng(0).integers(3, 51, size=1003))
    order = length_grouped_order(lengths, 10, torch.Generator().manual_seed(1), chunk_batches=5)
    assert sorted(order.tolist()) == list(range(1003))
    batches = order.split(10)
    assert len(batches[-1]) == 3  # the ragged batch stays last
    # each batch comes from one sorted chunk of 50 rows: its lengths span a fifth of the range
    spans = [int(lengths[b].max() - lengths[b].min()) for b in batches[:-1]]
    assert np.mean(spans) < 0.3 * 47 and max(spans) < 47
    # the batches are shuffled: the epoch does not run from long to short within a chunk
    firsts = [int(lengths[b].max()) for b in batches[:10]]
    assert firsts != sorted(firsts, reverse=True)
    again = length_grouped_order(lengths, 10, torch.Generator().manual_seed(1), chunk_batches=5)
    assert torch.equal(order, again)
    assert not torch.equal(order, length_grouped_order(lengths, 10, torch.Generator().manual_seed(2),
                                                       chunk_batches=5))


def test_trim_batch_cuts_to_the_longest_row_and_keeps_alignment(small_data):
    from trainables.data.batches import TensorSplit, text_extent, trim_batch

    split = TensorSplit.from_arrays(small_data.splits["train"])
    batch = split.batch(torch.arange(8))
    out = trim_batch(batch)
    assert out.text.shape[1] == out.text_bert.shape[2] == int(batch.text_lengths.max()) < 50
    assert out.audio.shape[1] == int(batch.audio_lengths.max())
    assert out.vision.shape[1] == int(batch.vision_lengths.max())
    assert torch.equal(out.text_bert, batch.text_bert[:, :, :out.text.shape[1]])
    assert not batch.text_bert[:, 1, out.text.shape[1]:].any()  # only padding was cut
    # left-padded ids (XLNet's own tokenizer): the extent is the last attended step + 1
    left = batch.text_bert.flip(-1)
    assert torch.equal(text_extent(batch.text_lengths, left), torch.full((8,), 50))
    # a batch whose longest rows fill the padding is returned as it is
    tokens = batch.text_bert.clone()
    tokens[0, 1] = 1
    filled = dataclasses.replace(
        batch, text_bert=tokens, audio_lengths=torch.full_like(batch.audio_lengths, 40),
        vision_lengths=torch.full_like(batch.vision_lengths, 40))
    assert trim_batch(filled) is filled
