"""MAG-BERT / MAG-XLNet: the gate's arithmetic, where it sits, parameter groups, freezing, token
alignment and the re-tokenisation hook for encoders with another vocabulary.

The contract tests (shapes, determinism, padding, state dicts, every regulariser) are in
``test_backbones.py``; these tests use the tiny random encoders except one on the packaged MiniLM.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.backbones import get_backbone
from trainables.backbones.base import InputMismatchError
from trainables.backbones.mag import MAGBert, MAGXLNet, MultimodalAdaptationGate
from trainables.config import ConfigError, build_dataclass
from trainables.data.batches import Batch, ModalityDims, TensorSplit
from trainables.text import tokenize_texts, uses_bert_uncased_vocab


def dims(text_len=12, audio_len=20, vision_len=15, audio=5, vision=7) -> ModalityDims:
    return ModalityDims(text=16, audio=audio, vision=vision, text_len=text_len, audio_len=audio_len,
                        vision_len=vision_len, aligned=text_len == audio_len == vision_len, has_tokens=True)


def build(name: str, d: ModalityDims | None = None, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    cls = get_backbone(name)
    cfg.setdefault("text_model", "tiny-xlnet" if name == "mag_xlnet" else "tiny-bert")
    return cls(build_dataclass(cls.config_class, cfg), d or dims())


def bert_batch(d: ModalityDims, b: int = 4, seed: int = 0) -> Batch:
    """[CLS] w1 .. wn [SEP] [PAD] ..., ragged lengths, in the uncased BERT vocabulary."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(3, d.text_len + 1, (b,), generator=g)  # tokens incl. [CLS]/[SEP]
    n[0] = d.text_len
    steps = torch.arange(d.text_len)
    mask = (steps[None, :] < n[:, None]).long()
    ids = torch.randint(1000, 5000, (b, d.text_len), generator=g) * mask
    ids[:, 0] = 101
    ids[torch.arange(b), n - 1] = 102
    return Batch(
        text=torch.randn(b, d.text_len, d.text, generator=g),
        text_bert=torch.stack([ids, mask, torch.zeros_like(mask)], dim=1),
        audio=torch.randn(b, d.audio_len, d.audio, generator=g),
        vision=torch.randn(b, d.vision_len, d.vision, generator=g),
        text_lengths=n,
        audio_lengths=torch.randint(1, d.audio_len + 1, (b,), generator=g),
        vision_lengths=torch.randint(1, d.vision_len + 1, (b,), generator=g),
        labels=torch.empty(b).uniform_(-3, 3, generator=g),
        index=torch.arange(b),
    )


def step(model, batch, lr=1e-2, text_lr=1e-3, weight_decay=0.01) -> None:
    model.train()
    opt = torch.optim.AdamW(model.param_groups(lr, text_lr, weight_decay))
    loss = F.l1_loss(model(batch).prediction, batch.labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


# --------------------------------------------------------------------------- the gate


def gate(hidden=6, audio=3, vision=4, beta=1.0):
    torch.manual_seed(0)
    return MultimodalAdaptationGate(hidden, audio, vision, beta_shift=beta, dropout=0.0).eval()


def test_gate_shapes_and_equations():
    g = gate(beta=0.7)
    e, a, v = torch.randn(2, 5, 6), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    out = g(e, a, v)
    assert out.shifted.shape == out.shift.shape == out.audio.shape == out.vision.shape == (2, 5, 6)
    assert out.alpha.shape == (2, 5)
    # Eq. 2-7 written out
    g_v = torch.relu(g.gate_vision(torch.cat([v, e], -1)))
    g_a = torch.relu(g.gate_audio(torch.cat([a, e], -1)))
    h = g_v * g.proj_vision(v) + g_a * g.proj_audio(a)
    alpha = torch.minimum(0.7 * e.norm(dim=-1) / (h.norm(dim=-1) + 1e-6), torch.ones(2, 5))
    torch.testing.assert_close(out.shift, h)
    torch.testing.assert_close(out.alpha, alpha)
    torch.testing.assert_close(out.shifted, F.layer_norm(e + alpha[..., None] * h, (6,)))


def test_alpha_clamps_at_one_and_scales_large_shifts_down():
    e, a, v = torch.randn(1, 4, 6), torch.randn(1, 4, 3), torch.randn(1, 4, 4)
    big = gate(beta=1e3)(e, a, v)
    assert torch.equal(big.alpha, torch.ones(1, 4))  # a small shift passes whole
    g = gate(beta=0.05)
    with torch.no_grad():
        g.proj_audio.weight.mul_(100.0)  # a shift much larger than the token vector
    small = g(e, a, v)
    assert (small.alpha < 1).all()
    # the applied shift's norm is exactly β‖e‖ (up to ε) when α < 1
    torch.testing.assert_close((small.alpha[..., None] * small.shift).norm(dim=-1), 0.05 * e.norm(dim=-1),
                               rtol=1e-4, atol=1e-6)


def test_closed_gates_give_no_shift():
    g = gate()
    with torch.no_grad():
        for lin in (g.gate_audio, g.gate_vision):
            lin.weight.zero_()
            lin.bias.fill_(-1.0)  # ReLU(-1) = 0: both gates closed
    e = torch.randn(2, 3, 6, requires_grad=True)
    out = g(e, torch.randn(2, 3, 3), torch.randn(2, 3, 4))
    assert torch.equal(out.shift, torch.zeros(2, 3, 6))
    torch.testing.assert_close(out.shifted, F.layer_norm(e, (6,)))
    out.shifted.sum().backward()  # ‖h‖ = 0 must not poison the gradient
    assert torch.isfinite(e.grad).all()


# --------------------------------------------------------------------------- in the encoder


@pytest.mark.parametrize("name,unpad", [("mag_bert", False), ("mag_bert", True), ("mag_xlnet", False)])
def test_zero_beta_only_renormalises_the_token_vectors(name, unpad):
    """β = 0 gives m = LayerNorm(e): the gated encoder must equal the plain encoder run on
    LayerNorm(e) (for BERT that is e itself up to ε, as BERT's e is already layer-normed).
    With ``unpad`` (the encoder's layers on the real tokens, not called as a module) the pooled
    [CLS] state is compared."""
    model = build(name, beta_shift=0.0, unpad=unpad).eval()
    batch = bert_batch(model.dims)
    ids, mask, seg = batch.text_bert.unbind(1)
    states = {}

    def keep(module, args, output) -> None:
        states["h"] = output.last_hidden_state

    with torch.no_grad():
        enc = model.text_encoder
        if name == "mag_bert":
            plain = enc(input_ids=ids, attention_mask=mask, token_type_ids=seg).last_hidden_state
        else:
            e = F.layer_norm(enc.word_embedding(ids), (32,))
            plain = enc(inputs_embeds=e, attention_mask=mask, token_type_ids=seg,
                        use_mems=False).last_hidden_state
        handle = enc.register_forward_hook(keep)
        out = model(batch)
        handle.remove()
    if unpad:
        assert "h" not in states  # the padded forward did not run
        torch.testing.assert_close(out.features["fused"], enc.pooler(plain), rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(states["h"], plain, rtol=1e-4, atol=1e-4)
    assert not model._layers()[0]._forward_pre_hooks  # the gate's hook lives for one forward only


@pytest.mark.parametrize("name", ["mag_bert", "mag_xlnet"])
def test_injection_layer(name):
    batch = bert_batch(dims())
    preds = [build(name, injection_layer=k).eval()(batch).prediction for k in (0, 1)]
    assert not torch.allclose(preds[0], preds[1])  # same weights (seed), gate at another layer
    with pytest.raises(ConfigError, match="injection_layer"):
        build(name, injection_layer=2)  # the tiny encoders have 2 layers


def test_wrong_architecture_is_refused():
    with pytest.raises(ConfigError, match="mag_xlnet"):
        build("mag_bert", text_model="tiny-xlnet")
    with pytest.raises(ConfigError, match="mag_bert"):
        build("mag_xlnet", text_model="tiny-bert")


def test_features_are_what_the_docstring_says():
    model = build("mag_bert").eval()
    batch = bert_batch(model.dims)
    ids, mask, seg = batch.text_bert.unbind(1)
    out = model(batch)
    with torch.no_grad():
        e = model.text_encoder.embeddings(input_ids=ids, token_type_ids=seg)  # (B, L, H)
        text = (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.features["text"], text)
    assert out.features["fused"].abs().max() <= 1  # tanh of BERT's pooler
    assert set(out.features) == {"text", "audio", "vision", "fused"}


# --------------------------------------------------------------------------- optimiser groups


@pytest.mark.parametrize("name", ["mag_bert", "mag_xlnet"])
def test_param_groups_split_encoder_and_rest(name):
    model = build(name)
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, text_lr=1e-5, weight_decay=0.01)}
    assert set(groups) == {"text_encoder", "model"}
    assert groups["text_encoder"]["lr"] == 1e-5 and groups["model"]["lr"] == 1e-3
    enc = {id(p) for p in groups["text_encoder"]["params"]}
    rest = {id(p) for p in groups["model"]["params"]}
    assert enc == {id(p) for p in model.text_encoder.parameters()}
    assert not enc & rest
    assert enc | rest == {id(p) for p in model.parameters()}  # none missing
    assert {id(p) for p in model.gate.parameters()} | {id(p) for p in model.head.parameters()} <= rest


@pytest.mark.parametrize("name", ["mag_bert", "mag_xlnet"])
def test_freeze_text_keeps_the_encoder(name):
    model = build(name, freeze_text=True)
    groups = model.param_groups(lr=1e-2, text_lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["model"]
    before = copy.deepcopy(model.state_dict())
    step(model, bert_batch(model.dims), weight_decay=0.1)
    after = model.state_dict()
    for key in before:
        if key.startswith("text_encoder."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["gate.proj_audio.weight"], after["gate.proj_audio.weight"])
    assert model.gate.proj_audio.weight.grad is not None  # gradients flow through the frozen encoder


# --------------------------------------------------------------------------- audio/vision on tokens


def test_unaligned_frames_land_on_word_tokens_only():
    model = build("mag_bert", dims(text_len=8, audio_len=6))
    ids = torch.tensor([[101, 2000, 2001, 2002, 102, 0, 0, 0]])  # 3 words
    mask = (ids > 0).long()
    tokens = mask > 0
    words = tokens & ~torch.isin(ids, model.special_ids)
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1)  # frames 0..5
    placed, valid = model._on_tokens(x, torch.tensor([6]), tokens, words)
    # 6 frames onto 3 words: means of (0,1), (2,3), (4,5); [CLS]/[SEP]/[PAD] get 0
    assert placed[0, :, 0].tolist() == [0.0, 0.5, 2.5, 4.5, 0.0, 0.0, 0.0, 0.0]
    assert valid[0].tolist() == [False, True, True, True, False, False, False, False]
    # left padding (XLNet's own ids): the same words, in order, at the end
    ids_left = torch.tensor([[0, 0, 0, 2000, 2001, 2002, 102, 101]])
    tokens_left = ids_left > 0
    words_left = tokens_left & ~torch.isin(ids_left, model.special_ids)
    placed_left, _ = model._on_tokens(x, torch.tensor([6]), tokens_left, words_left)
    assert placed_left[0, :, 0].tolist() == [0.0, 0.0, 0.0, 0.5, 2.5, 4.5, 0.0, 0.0]


def test_aligned_frames_are_read_step_by_step():
    model = build("mag_bert", dims(text_len=5, audio_len=5, vision_len=5))
    tokens = torch.tensor([[True, True, True, True, False]])
    x = torch.arange(1, 6, dtype=torch.float32).view(1, 5, 1)
    placed, valid = model._on_tokens(x, torch.tensor([3]), tokens, tokens)
    assert placed[0, :, 0].tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]  # past the audio length: zero
    assert valid[0].tolist() == [True, True, True, False, False]


def test_xlnet_pools_the_last_valid_token():
    model = build("mag_xlnet")
    states = torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # right- and left-padded
    pooled = model._pool(states, mask)
    expected = torch.tanh(model.summary(torch.stack([states[0, 2], states[1, 3]])))
    torch.testing.assert_close(pooled, expected)


# --------------------------------------------------------------------------- vocabularies


def other_vocab_tokenizer():
    """A word-level tokenizer with XLNet's layout (left padding, ``<sep> <cls>`` at the end) and a
    vocabulary that is not BERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "the a movie film was is good bad great funny not really i it this".split()
    vocab = {"<pad>": 0, "<unk>": 1, "<sep>": 2, "<cls>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A <sep> <cls>", special_tokens=[("<sep>", 2), ("<cls>", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   sep_token="<sep>", cls_token="<cls>", padding_side="left")


def with_tokenizer(model, tokenizer):
    """What the model would be with an encoder of another vocabulary (xlnet-base-cased online)."""
    model.tokenizer = tokenizer
    model.needs_own_tokens = not uses_bert_uncased_vocab(tokenizer)
    model.special_ids = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    return model


def test_tiny_models_read_the_data_ids_as_they_are(small_data):
    for name in ("mag_bert", "mag_xlnet"):
        model = build(name, small_data.dims)
        assert model.needs_own_tokens is False
        assert model.prepare_split(small_data.splits["train"]) is small_data.splits["train"]


def test_other_vocabulary_retokenises_raw_text(small_data):
    """Simulates the one-line loop change: ``TensorSplit.from_arrays(model.prepare_split(arr))``."""
    tokenizer = other_vocab_tokenizer()
    assert not uses_bert_uncased_vocab(tokenizer)
    model = with_tokenizer(build("mag_xlnet", small_data.dims), tokenizer)
    train = small_data.splits["train"]
    prepared = model.prepare_split(train)
    assert prepared is not train and train.text_bert is not None  # the data itself is untouched
    assert prepared.text_bert.shape == train.text_bert.shape
    expected = tokenize_texts(tokenizer, list(train.raw_text), train.text_bert.shape[2])
    np.testing.assert_array_equal(prepared.text_bert, expected)
    ids, mask = prepared.text_bert[0, 0], prepared.text_bert[0, 1]
    assert ids[-1] == 3 and ids[-2] == 2 and mask[-1] == 1  # <sep> <cls>, left-padded
    # a batch from the prepared split trains; one from the raw split is refused
    batch = TensorSplit.from_arrays(prepared).batch(torch.arange(8))
    step(model, batch)
    assert torch.isfinite(model.eval()(batch).prediction).all()
    fresh = with_tokenizer(build("mag_xlnet", small_data.dims), tokenizer)
    with pytest.raises(InputMismatchError, match="prepare_split"):
        fresh(TensorSplit.from_arrays(train).batch(torch.arange(8)))


# --------------------------------------------------------------------------- the packaged MiniLM


def test_mag_bert_on_the_packaged_minilm_trains():
    """The real pretrained MiniLM (offline): forward and backward on a small batch."""
    d = dims(text_len=16, audio_len=30, vision_len=24)
    model = MAGBert(build_dataclass(MAGBert.config_class, {}), d)  # default text_model: minilm
    assert model.config.text_model == "minilm" and model.needs_own_tokens is False
    assert model.feature_dims == {"text": 384, "audio": 384, "vision": 384, "fused": 384}
    batch = bert_batch(d, b=4)
    out = model(batch)
    assert out.prediction.shape == (4,)
    F.l1_loss(out.prediction, batch.labels).backward()
    enc_grads = [p.grad for p in model.text_encoder.parameters() if p.grad is not None]
    assert enc_grads and all(torch.isfinite(g).all() for g in enc_grads)
    assert model.text_encoder.pooler.dense.weight.grad is not None
    assert model.gate.gate_audio.weight.grad.abs().sum() > 0


def test_xlnet_default_is_the_papers_model():
    assert MAGXLNet.config_class().text_model == "xlnet-base-cased"
    assert dataclasses.fields(MAGXLNet.config_class)[0].name == "text_model"


def test_trains_in_the_loop_with_warmup_and_two_learning_rates(small_data):
    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    cfg = TrialConfig.from_flat({
        "backbone": "mag_bert", "backbone.text_model": "tiny-bert", "regulariser": "none",
        "max_epochs": 2, "batch_size": 32, "lr": 1e-3, "text_lr": 1e-5, "warmup": 0.1, "seed": 1,
    })
    trainer = Trainer(cfg, small_data)
    base_lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert base_lrs["text_encoder"] == 1e-5 and base_lrs["model"] == 1e-3
    history = trainer.fit()
    assert len(history) == 2 and all(np.isfinite(h["valid_mae"]) for h in history)
