"""MAG-BERT and MAG-XLNet (Rahman et al., ACL 2020, "Integrating Multimodal Information in Large
Pretrained Transformers"), Sec. 3, Eq. 1-7.

A Multimodal Adaptation Gate (MAG) shifts every token's vector e inside a pretrained transformer
by what the audio a and vision v on that token add to it:

    g_v = ReLU(W_gv [v; e] + b_gv)          g_a = ReLU(W_ga [a; e] + b_ga)      gates   (Eq. 2-3)
    h   = g_v ⊙ (W_v v + b_v) + g_a ⊙ (W_a a + b_a)                             shift   (Eq. 4)
    α   = min(β_shift · ‖e‖₂ / (‖h‖₂ + ε), 1)                                   scale   (Eq. 6)
    m   = dropout(LayerNorm(e + α h))                                            (Eq. 5, 7)

and the rest of the transformer runs on m. ``injection_layer = k`` puts the gate on the input of
transformer layer k; k = 0 (the paper's best) is right after the embedding layer: for BERT e is the
embedding layer's output (word + position + token-type embeddings, LayerNorm, dropout), for XLNet
the dropped-out word embeddings (XLNet adds positions inside attention). As in the authors' code,
‖h‖ = 0 counts as ‖h‖ = 1, so α·h stays 0 there.

Where the gate sits. A forward pre-hook on transformer layer k, registered for the duration of one
forward call, replaces that layer's input hidden states by m. The encoder's own code builds the
attention masks (eager/SDPA, BERT's bidirectional mask, XLNet's two-stream masks), so nothing of
transformers is copied and any BERT-architecture model (``encoder.layer``: BERT, MiniLM, RoBERTa)
or XLNet model (``layer``, time-major hidden states) works. With ``unpad: true`` (the default for
MAG-BERT) a BERT-architecture encoder runs its layers on the real tokens only
(:func:`~trainables.backbones._unpad.encode_unpadded`: the same modules and mask, padding never
computed) and the gate is applied to layer k's padded input there; the real tokens' states are
the padded forward's up to float rounding. MAG-XLNet always runs the padded forward.

Read-out. MAG-BERT: BERT's pooler on [CLS] (tanh(W h_[CLS]), pretrained), dropout, linear.
MAG-XLNet: XLNet's sequence summary on the *last valid* token (tanh(W h_last), new weights),
dropout (``summary_last_dropout``), linear; "last valid" rather than "last" so that right-padded
ids (MMSA's ``text_bert``, the tiny test model) and XLNet's own left-padded ids both read the
summary token. ``fused`` is the pooled vector before the dropout.

Audio/vision on the token steps. Word-aligned data (``aligned_50.pkl``: as many frames as tokens)
is read step by step, as MMSA's MAG does (frames past a row's own length are zeroed). Otherwise
(unaligned data, or ids re-tokenised by the model's own tokenizer, whose tokens are not the frames'
grid) each row's valid frames are resampled with
:func:`~trainables.data.batches.resample_to_length` onto its *word* tokens (``target_lengths`` = the
number of tokens that are not [CLS]/[SEP]/[PAD]), in order, and the special tokens get zero
vectors, as in the authors' pipeline (zeros before and after each utterance).

Vocabularies. MMSA's ``text_bert`` ids are in the uncased BERT vocabulary. When the encoder's
tokenizer has another vocabulary (``xlnet-base-cased``'s sentencepiece, a cased BERT, RoBERTa;
:func:`trainables.text.uses_bert_uncased_vocab`), ``needs_own_tokens`` is True and the data layer
must replace ``text_bert`` by :meth:`MAGBert.prepare_split` (``raw_text`` tokenised with the model's
own tokenizer) before building batches; a forward on uncased-BERT ids in that case raises
:class:`~trainables.backbones.base.InputMismatchError`. The tiny test models and MiniLM read the
ids as they are.

Features (each (B, H), H = the encoder's width): ``"text"`` = masked mean over the valid tokens of
e, the vectors the gate shifts (before the gate, so a text-only summary at no extra cost, not a
second text-only pass of the encoder); ``"audio"`` / ``"vision"`` = masked means of W_a a / W_v v
over the tokens that carry the modality; ``"fused"`` = the pooled representation.

Training (document in the mag search spaces). The pretrained encoder has its own parameter group at
``text_lr`` (the paper fine-tunes everything at ~1e-5), the gate and the head are at ``lr``; the
paper warms the learning rate up over 10% of the steps and decays it linearly, i.e. set the trial's
``warmup: 0.1`` and ``text_lr: 1e-5`` in the space. ``freeze_text`` keeps the encoder's weights
fixed (gradients still flow through it to the gate): a cheap CPU variant, not the paper's.

Departures from the authors' code (``WasifurRahman/BERT_multimodal_transformer``): one AdamW
weight decay for each group (the authors exempt biases and LayerNorm weights); unaligned data is
resampled onto the tokens (the authors only read word-aligned features); XLNet pools the last valid
token, not the last position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from trainables.backbones._unpad import encode_unpadded, supports_unpad
from trainables.backbones.base import Backbone, BackboneOutput, InputMismatchError
from trainables.config import ConfigError
from trainables.data.batches import (
    Batch,
    ModalityDims,
    SplitArrays,
    drop_modality,
    resample_to_length,
)
from trainables.text import (
    DEFAULT_TEXT_MODEL,
    load_text_model,
    shared_tokenizer,
    text_hidden_size,
    tokenize_texts,
    uses_bert_uncased_vocab,
)

__all__ = [
    "GateOutput", "MAGBert", "MAGBertConfig", "MAGXLNet", "MAGXLNetConfig", "MultimodalAdaptationGate",
]

#: the [CLS] id of the uncased BERT vocabulary, which starts every row of MMSA's ``text_bert``
_BERT_CLS_ID = 101


@dataclass
class MAGBertConfig:
    """MAG hyper-parameters; defaults are the authors' (``multimodal_driver.py``: beta_shift 1.0,
    dropout_prob 0.5, injection after the embeddings)."""

    #: pretrained encoder (see :mod:`trainables.text`): "minilm" (packaged, offline), a folder, a
    #: hub name (bert-base-uncased, as in the paper, needs a download)
    text_model: str = DEFAULT_TEXT_MODEL
    #: β of Eq. 6: the largest shift relative to the token vector's norm
    beta_shift: float = 1.0
    #: dropout after the gate's LayerNorm (the transformer keeps its own hidden dropout)
    dropout: float = 0.5
    #: the gate shifts the input of this transformer layer (0 = right after the embeddings)
    injection_layer: int = 0
    #: keep the encoder's weights fixed (only the gate and the head train)
    freeze_text: bool = False
    #: run the encoder's per-token layers on the real tokens only (exact up to float rounding;
    #: :mod:`trainables.backbones._unpad`, docs/fidelity.md "Speed options"); false: the padded
    #: forward of transformers
    unpad: bool = True

    def validate(self) -> None:
        if not self.text_model:
            raise ConfigError("text_model: expected a model name or folder, got an empty string")
        if self.beta_shift < 0:
            raise ConfigError(f"beta_shift: expected a number >= 0, got {self.beta_shift}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout}")
        if self.injection_layer < 0:
            raise ConfigError(f"injection_layer: expected an integer >= 0, got {self.injection_layer}")


@dataclass
class MAGXLNetConfig(MAGBertConfig):
    """MAG-XLNet: the same gate in XLNet (the paper's xlnet-base-cased needs a download; the tests
    use the tiny random ``tiny-xlnet``)."""

    text_model: str = "xlnet-base-cased"
    #: no unpadded path for XLNet: its relative-position attention is written for the padded
    #: layout (docs/performance.md)
    unpad: bool = False

    def validate(self) -> None:
        super().validate()
        if self.unpad:
            raise ConfigError("unpad: mag_xlnet has no unpadded encoder (XLNet's relative-position "
                              "attention needs the padded layout); expected false")


@dataclass
class GateOutput:
    """What the gate returns: the shifted vectors and the parts the features and tests read."""

    shifted: torch.Tensor  # (B, L, H) m = dropout(LayerNorm(e + α h))
    shift: torch.Tensor  # (B, L, H) h
    alpha: torch.Tensor  # (B, L) α
    audio: torch.Tensor  # (B, L, H) W_a a + b_a
    vision: torch.Tensor  # (B, L, H) W_v v + b_v


class MultimodalAdaptationGate(nn.Module):
    """The MAG (Eq. 2-7): shifts token vectors e (B, L, H) by their audio (B, L, d_a) and vision
    (B, L, d_v)."""

    def __init__(self, hidden: int, audio: int, vision: int, beta_shift: float, dropout: float,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.gate_vision = nn.Linear(vision + hidden, hidden)  # W_gv
        self.gate_audio = nn.Linear(audio + hidden, hidden)  # W_ga
        self.proj_vision = nn.Linear(vision, hidden)  # W_v
        self.proj_audio = nn.Linear(audio, hidden)  # W_a
        self.beta_shift = beta_shift
        self.eps = eps
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> GateOutput:
        g_v = torch.relu(self.gate_vision(torch.cat([vision, e], dim=-1)))  # (B, L, H)
        g_a = torch.relu(self.gate_audio(torch.cat([audio, e], dim=-1)))  # (B, L, H)
        p_v = self.proj_vision(vision)  # (B, L, H)
        p_a = self.proj_audio(audio)  # (B, L, H)
        h = g_v * p_v + g_a * p_a  # (B, L, H)
        h_norm = h.norm(dim=-1)  # (B, L)
        # a zero shift has no scale: count its norm as 1 (the authors' choice); α·h = 0 anyway
        h_norm = torch.where(h_norm == 0, torch.ones_like(h_norm), h_norm)
        alpha = (self.beta_shift * e.norm(dim=-1) / (h_norm + self.eps)).clamp(max=1.0)  # (B, L)
        shifted = self.dropout(self.norm(e + alpha.unsqueeze(-1) * h))  # (B, L, H)
        return GateOutput(shifted=shifted, shift=h, alpha=alpha, audio=p_a, vision=p_v)


def _first_hidden(args: tuple, kwargs: dict, names: Sequence[str]) -> tuple[torch.Tensor, Any]:
    """A transformer layer's input hidden states and where they came from (position or name)."""
    if args:
        return args[0], 0
    for name in names:
        if name in kwargs:
            return kwargs[name], name
    raise RuntimeError(f"MAG: cannot find the hidden states among the layer's inputs {sorted(kwargs)}")


class MAGBert(Backbone):
    """MAG in a BERT-architecture encoder (BERT, the packaged MiniLM, RoBERTa, ...)."""

    name = "mag_bert"
    config_class = MAGBertConfig
    text_input = "tokens"
    #: "bert": layers at ``encoder.layer``, batch-major, [CLS] first; "xlnet": layers at ``layer``,
    #: time-major (L, B, H), summary token last
    architecture: ClassVar[str] = "bert"

    def __init__(self, config: MAGBertConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.text_encoder = load_text_model(c.text_model)
        # load_text_model returns eval mode; a new module trains until the loop says otherwise
        self.text_encoder.train()
        n_layers = len(self._layers())
        if not c.injection_layer < n_layers:
            raise ConfigError(
                f"injection_layer: {c.text_model!r} has {n_layers} layers, so 0 .. {n_layers - 1}; "
                f"got {c.injection_layer}"
            )
        hidden = text_hidden_size(self.text_encoder)
        enc_cfg = self.text_encoder.config

        self.tokenizer = shared_tokenizer(c.text_model)
        #: True when the data's uncased-BERT ids are not this encoder's: see :meth:`prepare_split`
        self.needs_own_tokens = not uses_bert_uncased_vocab(self.tokenizer)
        special = {getattr(self.tokenizer, f"{k}_token_id", None) for k in ("cls", "sep", "pad")}
        special_ids = torch.tensor(sorted(i for i in special if i is not None), dtype=torch.long)
        self.register_buffer("special_ids", special_ids, persistent=False)
        self._ids_checked = False

        self.gate = MultimodalAdaptationGate(hidden, dims.audio, dims.vision, c.beta_shift, c.dropout)
        pooler = getattr(self.text_encoder, "pooler", None) if self.architecture == "bert" else None
        #: BERT's pretrained pooler (inside the encoder) or a new tanh summary layer
        self.summary = None if pooler is not None else nn.Linear(hidden, hidden)
        head_dropout = getattr(enc_cfg, "summary_last_dropout", None)
        if head_dropout is None:
            head_dropout = getattr(enc_cfg, "hidden_dropout_prob", 0.1)
        self.head_dropout = nn.Dropout(float(head_dropout))
        self.head = nn.Linear(hidden, 1)
        self.feature_dims = {"text": hidden, "audio": hidden, "vision": hidden, "fused": hidden}

        if c.freeze_text:
            for p in self.text_encoder.parameters():
                p.requires_grad_(False)
        #: the encoder's layers run on the real tokens only (BERT-architecture encoders)
        self.unpad = bool(c.unpad) and self.architecture == "bert" and supports_unpad(self.text_encoder)

    # -- encoder plumbing -------------------------------------------------------------------------

    def _layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (not stored: a second reference would register them
        twice in the state dict)."""
        name = self.config.text_model
        model_type = getattr(self.text_encoder.config, "model_type", "")
        if self.architecture == "xlnet":
            layers = getattr(self.text_encoder, "layer", None) if model_type == "xlnet" else None
            other = "mag_bert"
        else:
            inner = getattr(self.text_encoder, "encoder", None)
            layers = getattr(inner, "layer", None) if model_type != "xlnet" else None
            other = "mag_xlnet"
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ConfigError(
                f"text_model {name!r} ({type(self.text_encoder).__name__}, model_type {model_type!r}) "
                f"is not a {self.architecture} encoder that {self.name} can gate; use {other} or a "
                f"{self.architecture} model"
            )
        return layers

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states (B, L, H)."""
        out = self.text_encoder(input_ids=ids, attention_mask=mask, token_type_ids=segments)
        return out.last_hidden_state

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[CLS] through BERT's pooler: (B, L, H) -> (B, H)."""
        if self.summary is None:
            return self.text_encoder.pooler(states)
        return torch.tanh(self.summary(states[:, 0]))

    # -- tokens -----------------------------------------------------------------------------------

    def tokenize(self, raw_text: Sequence[str], max_len: int) -> np.ndarray:
        """``raw_text`` in this encoder's own vocabulary: (N, 3, max_len) int64 = ids, mask,
        segment ids."""
        return tokenize_texts(self.tokenizer, raw_text, max_len)

    def prepare_split(self, arrays: SplitArrays) -> SplitArrays:
        """The split as this model reads it: unchanged when the data's ``text_bert`` ids are in the
        encoder's vocabulary; otherwise a copy whose ``text_bert`` is ``raw_text`` re-tokenised
        (same padded length). Called once per split by the data layer, before batching."""
        if not self.needs_own_tokens:
            return arrays
        max_len = arrays.text_bert.shape[2] if arrays.text_bert is not None else arrays.text.shape[1]
        return dataclasses.replace(arrays, text_bert=self.tokenize(list(arrays.raw_text), int(max_len)))

    def drop_inputs(self, arrays: SplitArrays, dropped: str) -> SplitArrays:
        """As the base class, with this encoder's own [MASK] and [CLS]/[SEP]/[PAD] ids (the ids of
        a prepared split are in its vocabulary). The words become [MASK] but keep their steps, so
        the gate still shifts every step by the audio and vision on it: "text dropped, A and V
        kept" (MDM Sec. 5.3), not "everything dropped"."""
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:  # a tokenizer without [MASK]: its unknown-word token
            mask_id = self.tokenizer.unk_token_id
        return drop_modality(arrays, dropped, mask_id=int(mask_id),
                             keep_ids=tuple(int(i) for i in self.special_ids.tolist()))

    def _check_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Once per model: refuse uncased-BERT ids when the encoder has another vocabulary."""
        if self._ids_checked or not self.needs_own_tokens:
            return
        first = ids[:, 0][mask[:, 0] > 0]
        own_cls_differs = self.tokenizer.cls_token_id != _BERT_CLS_ID
        if own_cls_differs and first.numel() and bool((first == _BERT_CLS_ID).all()):
            raise InputMismatchError(
                f"backbone {self.name!r} with text_model {self.config.text_model!r} got ids in the "
                "uncased BERT vocabulary (every row starts with [CLS]=101), which its tokenizer does "
                "not share; re-tokenise raw_text with model.prepare_split(arrays) before batching"
            )
        self._ids_checked = True

    # -- audio / vision on the tokens -------------------------------------------------------------

    def _on_tokens(
        self, x: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, words: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality on the token steps: (B, L, d) and where it has data (B, L) bool.

        tokens: (B, L) bool valid tokens; words: (B, L) bool valid tokens that are not special.
        """
        seq_len = tokens.shape[1]
        lengths = lengths.to(x.device).long().clamp(min=1, max=x.shape[1])  # (B,)
        if self.dims.aligned and not self.needs_own_tokens and x.shape[1] == seq_len:
            # word-aligned: frame t belongs to token t; frames past the row's length never count
            steps = torch.arange(seq_len, device=x.device)  # (L,)
            valid = (steps[None, :] < lengths[:, None]) & tokens  # (B, L)
            return torch.where(valid.unsqueeze(-1), x, x.new_zeros(())), valid
        n_words = words.sum(dim=1)  # (B,)
        on_steps = resample_to_length(x, lengths, seq_len, target_lengths=n_words.clamp(min=1))
        # on_steps: (B, L, d), the first n_words[b] steps hold row b's frames
        # the j-th word token (in order, wherever the padding is) takes resampled step j
        rank = (words.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        placed = on_steps.gather(1, rank.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (B, L, d)
        return torch.where(words.unsqueeze(-1), placed, x.new_zeros(())), words

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> BackboneOutput:
        ids, mask, segments = batch.text_bert.long().unbind(dim=1)  # (B, L) each
        self._check_ids(ids, mask)
        tokens = mask > 0  # (B, L)
        words = tokens & ~torch.isin(ids, self.special_ids)  # (B, L)
        # (B, L, d_a) / (B, L, d_v) on the token steps, and where each has data (B, L)
        audio, audio_valid = self._on_tokens(batch.audio, batch.audio_lengths, tokens, words)
        vision, vision_valid = self._on_tokens(batch.vision, batch.vision_lengths, tokens, words)

        time_major = self.architecture == "xlnet"
        gated: dict[str, Any] = {}

        def gate(e: torch.Tensor) -> torch.Tensor:
            """Eq. 2-7 on the injection layer's input e (B, L, H): its new input m (B, L, H)."""
            out = self.gate(e, audio, vision)
            gated["e"], gated["out"] = e, out
            return out.shifted

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden, where = _first_hidden(args, kwargs, ("hidden_states", "output_h"))
            e = hidden.transpose(0, 1) if time_major else hidden  # (B, L, H)
            m = gate(e)
            m = m.transpose(0, 1) if time_major else m  # the layer's layout
            if where == 0:
                return (m, *args[1:]), kwargs
            return args, {**kwargs, where: m}

        if self.unpad:  # the same layers on the real tokens; the gate on the padded layout
            states = encode_unpadded(self.text_encoder, ids, mask, segments,
                                     before_layer=(self.config.injection_layer, gate))  # (B, L, H)
        else:
            layer = self._layers()[self.config.injection_layer]
            handle = layer.register_forward_pre_hook(inject, with_kwargs=True)
            try:
                states = self._encode(ids, mask, segments)  # (B, L, H)
            finally:
                handle.remove()

        if "out" not in gated:  # a transformers version that calls its layers in another way
            raise RuntimeError(f"{self.name}: the gate's hook on layer {self.config.injection_layer} never ran")
        pooled = self._pool(states, mask)  # (B, H)
        prediction = self.head(self.head_dropout(pooled)).squeeze(-1)  # (B,)
        out: GateOutput = gated["out"]
        features = {
            "text": _masked_mean(gated["e"], tokens),  # (B, H)
            "audio": _masked_mean(out.audio, audio_valid),  # (B, H)
            "vision": _masked_mean(out.vision, vision_valid),  # (B, H)
            "fused": pooled,  # (B, H)
        }
        return BackboneOutput(prediction=prediction, features=features)

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """The pretrained encoder (BERT's pooler included) at ``text_lr``; the gate, the summary
        layer and the head at ``lr``. A frozen encoder has no group."""
        encoder = [p for p in self.text_encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in self.text_encoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [
            {"params": encoder, "lr": text_lr, "weight_decay": weight_decay, "name": "text_encoder"},
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        ]
        return [g for g in groups if g["params"]]


class MAGXLNet(MAGBert):
    """MAG in XLNet: the gate on the (time-major) input of XLNet layer k, the summary on the last
    valid token."""

    name = "mag_xlnet"
    config_class = MAGXLNetConfig
    architecture = "xlnet"

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        # no memory caching: every batch is a separate set of utterances
        out = self.text_encoder(
            input_ids=ids, attention_mask=mask, token_type_ids=segments, use_mems=False
        )
        return out.last_hidden_state

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """XLNet's summary token, the last valid position (right- or left-padded): (B, L, H) -> (B, H)."""
        steps = torch.arange(mask.shape[1], device=mask.device)  # (L,)
        last = torch.where(mask > 0, steps, -1).amax(dim=1).clamp(min=0)  # (B,)
        h_last = states[torch.arange(states.shape[0], device=states.device), last]  # (B, H)
        return torch.tanh(self.summary(h_last))


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, L, d) over the steps where ``valid`` (B, L) holds; a row with none gives 0."""
    total = torch.where(valid.unsqueeze(-1), x, x.new_zeros(())).sum(dim=1)  # (B, d)
    return total / valid.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
