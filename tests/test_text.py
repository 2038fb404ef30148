"""trainables.text: offline errors, quiet loading, vocabulary detection, MMSA-layout tokenisation.

``conftest.py`` sets ``HF_HUB_OFFLINE=1`` before anything imports huggingface_hub, so hub names
that are not cached must fail at once, without a network request.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from trainables.text import (
    BERT_UNCASED_IDS,
    TextModelError,
    load_text_model,
    load_tokenizer,
    shared_tokenizer,
    text_hidden_size,
    tokenize_texts,
    uses_bert_uncased_vocab,
)


def _cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer("minilm")


@pytest.mark.parametrize("loader", [load_text_model, load_tokenizer], ids=["model", "tokenizer"])
def test_uncached_hub_name_fails_fast_offline(loader, monkeypatch):
    import huggingface_hub

    if not huggingface_hub.is_offline_mode():
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported")
    if _cached("bert-base-uncased"):
        pytest.skip("bert-base-uncased is in this machine's Hugging Face cache")
    # offline, it fails without a network request (checked by refusing every connection, not
    # by timing it: a duration on a loaded machine is no test; timings belong in bench/)
    attempts = []

    def no_network(sock, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(TextModelError) as info:
        loader("bert-base-uncased")
    assert not attempts, f"it tried the network: {attempts}"
    message = str(info.value)
    assert "\n" not in message
    assert "'bert-base-uncased'" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download bert-base-uncased" in message and "'minilm'" in message


def test_packaged_minilm_loads_offline_without_progress_bars(capfd):
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    model = load_text_model("minilm")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled() == enabled  # switched off only while loading
    assert not model.training  # eval mode, as documented
    assert text_hidden_size(model) == 384
    assert text_hidden_size(load_text_model("tiny-xlnet")) == 32


def test_bert_uncased_vocabulary_is_recognised(minilm_tokenizer):
    assert uses_bert_uncased_vocab(minilm_tokenizer)
    assert uses_bert_uncased_vocab(load_tokenizer("tiny-xlnet"))  # tiny models read MMSA's ids

    class Shifted:
        def convert_tokens_to_ids(self, token):
            return BERT_UNCASED_IDS[token] + 1

    assert not uses_bert_uncased_vocab(Shifted())
    assert not uses_bert_uncased_vocab(object())  # no token -> id table at all


def test_shared_tokenizer_is_loaded_once():
    assert shared_tokenizer("tiny-bert") is shared_tokenizer("tiny-bert")


def test_tokenize_texts_writes_the_mmsa_layout(minilm_tokenizer):
    texts = np.array(["the movie was good", "bad"], dtype=object)
    out = tokenize_texts(minilm_tokenizer, texts, max_len=8)
    assert out.shape == (2, 3, 8) and out.dtype == np.int64
    ids, mask, segments = out[:, 0], out[:, 1], out[:, 2]
    assert ids[0, :6].tolist() == [101, 1996, 3185, 2001, 2204, 102]
    assert mask.sum(axis=1).tolist() == [6, 3]
    assert (ids[mask == 0] == 0).all() and not segments.any()
    long = tokenize_texts(minilm_tokenizer, ["good " * 20], max_len=8)
    assert long[0, 1].all() and long[0, 0, -1] == 102  # truncated, still ends with [SEP]


def test_a_saved_folder_loads_from_disk(tmp_path):
    """A folder is local: it never takes the hub/cache path (even under HF_HUB_OFFLINE=1)."""
    load_text_model("tiny-bert").save_pretrained(tmp_path)
    model = load_text_model(str(tmp_path))
    assert type(model).__name__ == "BertModel" and text_hidden_size(model) == 32
