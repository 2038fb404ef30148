"""MultiModal InfoMax backbone (Han, Chen, Poria, EMNLP 2021): the MMIM fusion network.

"Improving Multimodal Fusion with Hierarchical Mutual Information Maximization for Multimodal
Sentiment Analysis". The MI terms are the ``mmim`` *regulariser*
(:mod:`trainables.regularisers.mmim`), kept apart so that they can sit on any backbone and this
backbone can be trained with any regulariser.

    h_t = BERT(tokens)[CLS]                          text: pretrained encoder, own lr group
    h_a = W_a dropout(sLSTM_a(a_1 .. a_Ta))          audio: unidirectional LSTM, final state
    h_v = W_v dropout(sLSTM_v(v_1 .. v_Tv))          vision: the same
    Z   = tanh(W_2 tanh(W_1 dropout([h_t; h_a; h_v])))   fusion MLP (hidden ``d_prjh`` = 128)
    ŷ   = w^T Z + b

Features: ``"text"`` = h_t (the encoder's width, 384 for the packaged MiniLM), ``"audio"`` = h_a
(``d_aout``), ``"vision"`` = h_v (``d_vout``), ``"fused"`` = Z (``d_prjh``).

The LSTMs run on packed sequences of each row's own length (``audio_lengths``/``vision_lengths``),
so the model reads aligned and unaligned data alike and padding never reaches a result; the text
encoder reads ``text_bert`` (ids, attention mask, segment ids) and masks its padding itself. With
``unpad: true`` (default) its layers run on the real tokens only
(:func:`~trainables.backbones._unpad.encode_unpadded`; h_t equal up to float rounding).

Departures from the official code (declare-lab/Multimodal-Infomax, ``src/model.py``,
``src/modules/encoders.py``):
- the text encoder is any BERT-family model from :mod:`trainables.text` (default: the packaged
  MiniLM, which loads offline) instead of ``bert-base-uncased``; [CLS] is read at position 0, so
  XLNet-style encoders (summary token last) are refused;
- ``dropout_a``/``dropout_v`` act on the LSTM's final state as their help text says; the official
  ``RNNEncoder`` sets them to 0 for a one-layer LSTM (its default), so they had no effect there;
- PyTorch's default initialisation (the official solver and MMSA's trainer re-initialise every
  non-BERT matrix with Xavier-normal: ``init: xavier``; the paper is silent).

Named options for comparisons with MMSA (``pip install mmsa``, ``config_regression.json`` "mmim"):
``bidirectional: true`` reads the audio/vision sequences both ways, h = W [forward final state;
backward final state], as MMSA's MOSI/MOSEI configs; the paper's Eq. 2 says unidirectional, which
stays the default. ``init: xavier`` as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones._layers import LengthLSTM
from trainables.backbones._unpad import encode_unpadded, supports_unpad
from trainables.backbones.base import Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims
from trainables.text import DEFAULT_TEXT_MODEL, load_text_model

__all__ = ["MMIM", "MMIMConfig", "SequenceEncoder"]


@dataclass
class MMIMConfig:
    """MMIM backbone hyper-parameters; defaults are the official ``src/config.py``'s."""

    #: text encoder (see :mod:`trainables.text`): "minilm" (packaged, offline), a folder, a hub name
    text_model: str = DEFAULT_TEXT_MODEL
    #: audio LSTM hidden size: the paper's "A-LSTM hidden dim" (grid {32, 64}; Table 3: MOSI 32,
    #: MOSEI 16)
    d_ah: int = 16
    #: vision LSTM hidden size: the paper's "V-LSTM hidden dim" (grid {32, 64}; Table 3: MOSI 32,
    #: MOSEI 64)
    d_vh: int = 16
    #: width of h_a (the audio feature)
    d_aout: int = 16
    #: width of h_v (the vision feature)
    d_vout: int = 16
    #: stacked layers of each LSTM
    n_layer: int = 1
    #: dropout on the audio / vision LSTM's final state (and between layers when n_layer > 1)
    dropout_a: float = 0.1
    dropout_v: float = 0.1
    #: fusion MLP hidden width (the width of Z, ``features["fused"]``)
    d_prjh: int = 128
    #: dropout on the fusion MLP's input
    dropout_prj: float = 0.1
    #: audio / vision LSTMs read both directions (h = [forward; backward] final states before the
    #: linear map), as MMSA's MOSI/MOSEI configs (``bidirectional: true``). The paper's Eq. 2 uses
    #: unidirectional LSTMs (false, the default)
    bidirectional: bool = False
    #: initialisation of every non-text weight matrix: "default" (PyTorch's), or "xavier"
    #: (Xavier-normal, as the official solver and MMSA's trainer re-initialise them; the paper is
    #: silent)
    init: str = "default"
    #: run the text encoder's per-token layers on the real tokens only (exact up to float
    #: rounding; :mod:`trainables.backbones._unpad`, docs/fidelity.md "Speed options"); false:
    #: the padded forward of transformers
    unpad: bool = True

    def validate(self) -> None:
        for name in ("d_ah", "d_vh", "d_aout", "d_vout", "n_layer", "d_prjh"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("dropout_a", "dropout_v", "dropout_prj"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")
        if self.init not in ("default", "xavier"):
            raise ConfigError(f"init: expected 'default' or 'xavier', got {self.init!r}")
        if not self.text_model:
            raise ConfigError("text_model: expected a model name or folder, got an empty string")


class SequenceEncoder(nn.Module):
    """sLSTM: a unidirectional LSTM over the valid steps -> dropout -> linear, (B, L, d) -> (B, out)."""

    def __init__(self, in_size: int, hidden: int, out: int, num_layers: int, dropout: float,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.lstm = LengthLSTM(in_size, hidden, num_layers=num_layers, dropout=dropout,
                               bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(self.lstm.out_size, out)

    def stem(self, x: torch.Tensor, lengths: torch.Tensor):
        """Up to the first random draw: the LSTM's final state (B, hidden) for one layer (it draws
        nothing); with more layers the LSTM draws dropout between them, so the inputs ``(x,
        lengths)`` themselves."""
        if self.lstm.lstm.num_layers == 1:
            return self.lstm(x, lengths)
        return x, lengths

    def from_stem(self, stem) -> torch.Tensor:
        """The rest of the encoder on :meth:`stem`'s output, (B, out)."""
        state = self.lstm(*stem) if isinstance(stem, tuple) else stem
        return self.linear(self.dropout(state))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.from_stem(self.stem(x, lengths))  # (B, out)


class MMIM(Backbone):
    name = "mmim"
    config_class = MMIMConfig
    modality_separable = True
    has_stem = True
    text_input = "tokens"

    def __init__(self, config: MMIMConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.text_encoder = load_text_model(c.text_model)
        if getattr(self.text_encoder.config, "model_type", "") == "xlnet":
            raise ConfigError(
                f"text_model {c.text_model!r}: MMIM reads the [CLS] token at position 0 and needs a "
                "BERT-family encoder (XLNet puts its summary token last)"
            )
        d_t = int(self.text_encoder.config.hidden_size)
        self.audio_encoder = SequenceEncoder(dims.audio, c.d_ah, c.d_aout, c.n_layer, c.dropout_a,
                                             c.bidirectional)
        self.vision_encoder = SequenceEncoder(dims.vision, c.d_vh, c.d_vout, c.n_layer, c.dropout_v,
                                              c.bidirectional)
        self.fusion_dropout = nn.Dropout(c.dropout_prj)
        self.fusion_1 = nn.Linear(d_t + c.d_aout + c.d_vout, c.d_prjh)
        self.fusion_2 = nn.Linear(c.d_prjh, c.d_prjh)
        self.head = nn.Linear(c.d_prjh, 1)
        self.feature_dims = {"text": d_t, "audio": c.d_aout, "vision": c.d_vout, "fused": c.d_prjh}
        #: the encoder's layers run on the real tokens only (BERT-architecture encoders)
        self.unpad = bool(c.unpad) and supports_unpad(self.text_encoder)
        if c.init == "xavier":
            text_ids = {id(p) for p in self.text_encoder.parameters()}
            for p in self.parameters():
                if id(p) not in text_ids and p.dim() > 1:
                    nn.init.xavier_normal_(p)

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 2: h_t = the encoder's [CLS] (B, d_t), h_a (B, d_aout), h_v (B, d_vout)."""
        return self.encode_stem(self.stem(batch))

    def stem(self, batch: Batch) -> dict:
        """Each encoder up to its first random draw: the token ids (B, 3, L) for the text (the text
        encoder draws dropout from its embeddings on), the audio and vision LSTMs' final states
        (:meth:`SequenceEncoder.stem`)."""
        return {"text": batch.text_bert,
                "audio": self.audio_encoder.stem(batch.audio, batch.audio_lengths),
                "vision": self.vision_encoder.stem(batch.vision, batch.vision_lengths)}

    def encode_stem(self, stem: dict) -> dict[str, torch.Tensor]:
        """The text encoder's [CLS] and the sLSTMs' dropout and linear layers on :meth:`stem`'s
        output, in ``encode``'s order (text, audio, vision)."""
        ids, mask, segments = stem["text"].unbind(dim=1)  # (B, L) each
        if self.unpad:
            states = encode_unpadded(self.text_encoder, ids, mask, segments)  # (B, L, d_t)
        else:
            states = self.text_encoder(input_ids=ids, attention_mask=mask,
                                       token_type_ids=segments).last_hidden_state  # (B, L, d_t)
        return {"text": states[:, 0],  # (B, d_t): [CLS]
                "audio": self.audio_encoder.from_stem(stem["audio"]),  # (B, d_aout)
                "vision": self.vision_encoder.from_stem(stem["vision"])}  # (B, d_vout)

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> BackboneOutput:
        """The fusion MLP (Z) and the head on the unimodal encodings."""
        h_t, h_a, h_v = unimodal["text"], unimodal["audio"], unimodal["vision"]
        x = self.fusion_dropout(torch.cat([h_t, h_a, h_v], dim=-1))  # (B, d_t + d_aout + d_vout)
        z = torch.tanh(self.fusion_2(torch.tanh(self.fusion_1(x))))  # (B, d_prjh)
        prediction = self.head(z).squeeze(-1)  # (B,)
        return BackboneOutput(
            prediction=prediction,
            features={"text": h_t, "audio": h_a, "vision": h_v, "fused": z},
        )

    def forward(self, batch: Batch) -> BackboneOutput:
        return self.fuse(self.encode(batch))

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """The pretrained text encoder at ``text_lr`` (the paper's BERT lr 5e-5), the rest at ``lr``."""
        text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        text_ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in text_ids]
        return [
            {"params": text, "lr": text_lr, "weight_decay": weight_decay, "name": "text_encoder"},
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        ]
