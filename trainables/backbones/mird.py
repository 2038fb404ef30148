"""MIRD backbone: private/shared disentangled representations with modality reconstruction.

Qian et al., "Mutual Information-based Representations Disentanglement for Unaligned Multimodal
Language Sequences" (MIRD; ``shared/papers/mird-qian.txt``), §3.2-3.6. The model is split into a
backbone (this file) and a regulariser (:mod:`trainables.regularisers.mird`: CLUB terms,
reconstruction losses and the log-loss combination, Eq. 10-22), so that MIRD's regulariser can
sit on another backbone and this backbone can be trained with any regulariser.

    z^m  = W_m LSTM_m(X^m)                              private code, m ∈ {L, A, V}   (Eq. 1)
    z^S  = W_S dropout(pool(BERT(MAG(E(ids), X̃^A, X̃^V))))  shared code (WSA-BERT) (Eq. 2-7)
    X̂^m = Dec_m([z^m; z^S])                             reconstruction              (Eq. 8)
    ŷ    = w^T dropout(ReLU(W_h [z^L; z^A; z^V; z^S])) + b   two-layer regressor  (Eq. 16-17)

Shared code z^S. The pretrained text encoder (``text_model``; the packaged MiniLM by default)
reads ``batch.text_bert``. A forward hook on its embedding layer shifts every token embedding w_k
by the audio/vision on that token with the paper's adaptive gates (Eq. 3-6, after MAG, Rahman et
al., ACL 2020): G^m = σ(W_g^m [w; x̃^m]) (``gate="sigmoid"``, Eq. 3; ``"relu"`` is Rahman et al.'s
MAG), H = G^V ⊙ W_V x̃^V + G^A ⊙ W_A x̃^A (Eq. 4), w' = w + min(ε‖w‖/‖h‖, 1)·h (Eq. 5-6,
ε = ``beta_shift`` = 1 as §4.3), followed by MAG's LayerNorm and dropout (not in Eq. 5: a
departure kept because the shift lands on the embedding layer's normalised output). The
encoder's layers run on w' (with ``unpad: true``, the default, on the real tokens only:
:func:`~trainables.backbones._unpad.encode_unpadded`, equal up to float rounding). Departure: the paper injects into BERT's *middle* word
representations W^mid ("at the intermediate stage"; the layer is not given); we inject after the
embedding layer, as MAG-BERT does. The hook leaves the encoder's own code untouched, so any
BERT-architecture model works. Audio/vision on the token steps (``align``, Eq. 2):

- ``"sparsemax"`` (default): X̃^m = Sparsemax(f_sim(W, X^m))·X^m, the paper's word-anchored
  sparse attention — each token's embedding queries the modality's frames, q_t·W_k x_f / √H,
  :func:`sparsemax` over the valid frames (exact zeros elsewhere), and x̃_t is the weighted mean
  of the raw frames. f_sim is "a fully connected network and inner product similarity"; we add
  the 1/√H scale and mask padding frames (the authors' code attends over padding too).
- ``"resample"``: :func:`~trainables.data.batches.resample_to_length` cuts each row's valid frames
  into as many equal segments as it has tokens (the EF-LSTM's alignment); cheaper, no parameters.

z^S averages the encoder's last hidden states over the words (``pool="mean"``, Eq. 7: "Pooling
(·) is the average pooling function", masked by the attention mask), then dropout and a linear
map to ``z_dim``. Options: ``pool="sparsemax"`` (a learned score per token, sparsemax over the
words) and ``pool="cls"`` (the [CLS] state, as the authors' code pools with BERT's pooler).

Pretrained weights (PAPERS.md trap). As we read the authors' code, it calls ``from_pretrained``
on the whole multimodal model, whose shared BERT sits under ``mult_encoder.model.`` where no
checkpoint key matches, so that encoder keeps its random initialisation. Here the encoder is built by
:func:`trainables.text.load_text_model` (``AutoModel.from_pretrained`` on the model itself), so it
really holds the pretrained weights (a test compares them), and it has its own parameter group at
``text_lr`` (the paper: 1e-5 for BERT, 1e-3 for the rest; MAG, pooling, encoders, decoders and
head are in the ``lr`` group).

Private codes (Eq. 1: "LSTM and subsequent fully connected networks"). Each z^m is a packed
single-layer LSTM over the modality's valid steps (its final state), then a linear map. For text
the paper's input is the word sequence; ours is the ``text`` features (GloVe/BERT features in
MMSA files), which keeps one transformer per model (the authors' code uses a second, separately
fine-tuned BERT or an LSTM over token embeddings).

Reconstruction (Eq. 8, 19; decided for cost, documented departure). Decoders are single-layer LSTMs fed
[z_m; z_S] at every step (the authors feed it once and then the previous state) with a linear
read-out. They decode at a reduced time resolution of R_m = min(``recon_steps``, padded length of
m) steps, and the target is the input resampled onto R_m steps with
:func:`~trainables.data.batches.resample_to_length` (each row's valid frames cut into R_m equal
segments and averaged), so padding never enters a target and a 375-frame MOSI audio track costs
16 decoder steps. Text is reconstructed as its *features* (``batch.text``) with MSE, like audio
and vision; the paper reconstructs the token ids with a cross-entropy over the 30,522-word
vocabulary, which on CPU would cost more than the rest of the model together (B·L·30,522 logits per
batch) and, with a 50-token target squeezed to R steps, has no one-token-per-step target.

Features (every entry (B, width); the widths are in ``feature_dims``):

- ``"text"``, ``"audio"``, ``"vision"``: private codes z_L, z_A, z_V (``z_dim``)
- ``"shared"``: z_S (``z_dim``)
- ``"fused"``: the input of the regressor's final linear layer, ReLU(W_1 p) with
  p = [z_L; z_A; z_V; z_S] (``z_dim``): the representation a fusion regulariser reads (MDM's
  Z_avl, the input of the linear head A_θp)
- ``"recon_<m>"``: the decoder output for m, (B, R_m, d_m) flattened to (B, R_m·d_m)
- ``"target_<m>"``: the resampled input it should match, same layout (data: no gradient)
- ``"input_<m>"``: the masked mean of modality m's input over its valid steps (B, d_m) (data), the
  pooled X^m of the regulariser's I(z_S; X^m) terms

so a regulariser computes the reconstruction MSE of m as ``mse(recon_<m>, target_<m>)`` from
``BackboneOutput.features`` alone (see :data:`RECON_PREFIX`, :data:`TARGET_PREFIX`).

Defaults: the paper (d = 64, ε = 1, average pooling, sigmoid gates, sparsemax alignment); where it
is silent, the authors' ``run_training_recon_mim_sl.py`` (dropout 0.5 in MAG, before z^S and in
the head); ``recon_steps`` is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones._layers import LengthLSTM, clamp_lengths, masked_mean, step_mask
from trainables.backbones._unpad import encode_unpadded, supports_unpad
from trainables.backbones.base import MODALITIES, Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims, resample_to_length
from trainables.text import DEFAULT_TEXT_MODEL, load_text_model

__all__ = [
    "INPUT_PREFIX",
    "MAGGate",
    "MIRD",
    "MIRDConfig",
    "RECON_PREFIX",
    "TARGET_PREFIX",
    "SequenceDecoder",
    "WordAnchoredAttention",
    "sparsemax",
]

#: feature-key prefixes (``f"{prefix}{modality}"``) of the reconstruction outputs, their targets
#: and the pooled inputs
RECON_PREFIX = "recon_"
TARGET_PREFIX = "target_"
INPUT_PREFIX = "input_"


@dataclass
class MIRDConfig:
    """MIRD backbone hyper-parameters (defaults: the authors' script, except where noted)."""

    #: pretrained BERT-architecture encoder of z_S (see :mod:`trainables.text`)
    text_model: str = DEFAULT_TEXT_MODEL
    #: width of every code z_L, z_A, z_V, z_S (the paper's d = 64)
    z_dim: int = 64
    #: audio/vision onto the token steps: word-anchored sparsemax attention or equal-segment means
    align: Literal["sparsemax", "resample"] = "sparsemax"
    #: pooling of the encoder's token states into z_S: the paper's average over the words
    #: (Eq. 7), sparsemax attention over words, or the [CLS] state (the authors' code)
    pool: Literal["mean", "sparsemax", "cls"] = "mean"
    #: MAG's gate activation: the paper's sigmoid (Eq. 3) or ReLU (Rahman et al.'s MAG)
    gate: Literal["sigmoid", "relu"] = "sigmoid"
    #: MAG's β: the shift h is scaled to at most β·‖e‖
    beta_shift: float = 1.0
    #: dropout after MAG's LayerNorm
    mag_dropout: float = 0.5
    #: dropout on the pooled encoder state before the z_S projection
    shared_dropout: float = 0.5
    #: dropout in the prediction head
    head_dropout: float = 0.5
    #: decoder steps per modality (at most the padded length); ours, for cost
    recon_steps: int = 16
    #: run the text encoder's per-token layers on the real tokens only (exact up to float
    #: rounding; :mod:`trainables.backbones._unpad`, docs/fidelity.md "Speed options"); false:
    #: the padded forward of transformers
    unpad: bool = True

    def validate(self) -> None:
        for name in ("z_dim", "recon_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.beta_shift <= 0:
            raise ConfigError(f"beta_shift: expected a number > 0, got {self.beta_shift}")
        for name in ("mag_dropout", "shared_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")


def sparsemax(z: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, ICML 2016): the Euclidean projection of z onto the simplex,

        sparsemax(z) = argmin_{p ≥ 0, Σp = 1} ‖p − z‖²  =  max(z − τ(z), 0)

    where, with z sorted decreasingly z_(1) ≥ z_(2) ≥ ..., the support size is
    k(z) = max{k : 1 + k·z_(k) > Σ_{j≤k} z_(j)} and τ(z) = (Σ_{j≤k(z)} z_(j) − 1) / k(z).
    Vectorised over every other dimension (a sort and a cumsum along ``dim``). Autograd through
    the sort and the cumsum gives sparsemax's Jacobian, diag(s) − s sᵀ/|S| with s the support.

    ``mask`` (bool, broadcastable to z): entries where it is False get exactly 0 and do not change
    the others. They are moved to max(z_valid) − 2, below τ, which is never less than
    max(z) − 1 (the largest output is at most 1). A slice with no valid entry gives all zeros.

    Computed in (at least) float32 and returned in z's dtype: under CUDA autocast the scores
    arrive in float16, whose cumulative sums over hundreds of frames would misplace τ.
    """
    dtype = z.dtype
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if mask is not None:
        mask = torch.broadcast_to(mask, z.shape)
        top = z.masked_fill(~mask, float("-inf")).amax(dim=dim, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
        z = torch.where(mask, z, top - 2.0)
    z = z.movedim(dim, -1)
    # sparsemax(z + c) = sparsemax(z): shifting by the (detached) max keeps the cumsums small
    z = z - z.amax(dim=-1, keepdim=True).detach()
    zs, _ = torch.sort(z, dim=-1, descending=True)  # (..., n)
    n = z.shape[-1]
    k = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)  # (n,)
    cumsum = zs.cumsum(dim=-1)  # (..., n)
    in_support = 1.0 + k * zs > cumsum  # (..., n): a prefix of the sorted entries
    k_z = in_support.sum(dim=-1, keepdim=True)  # (..., 1), >= 1 (k = 1 always qualifies)
    tau = (cumsum.gather(-1, k_z - 1) - 1.0) / k_z.to(z.dtype)  # (..., 1)
    p = (z - tau).clamp(min=0.0).movedim(-1, dim)
    if mask is not None:
        p = torch.where(mask, p, torch.zeros_like(p))
    return p.to(dtype)


class WordAnchoredAttention(nn.Module):
    """One modality's frames onto the token steps: each token embedding queries the frames and
    sparsemax picks a few of them (the authors' WSA alignment, masked and scaled)."""

    def __init__(self, in_size: int, hidden: int) -> None:
        super().__init__()
        self.key = nn.Linear(in_size, hidden)
        self.scale = hidden**-0.5

    def forward(self, e: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """e (B, L, H) token embeddings, x (B, T, d) frames, lengths (B,) -> (B, L, d)."""
        valid = step_mask(lengths.to(x.device), x.shape[1])  # (B, T)
        x = torch.where(valid.unsqueeze(-1), x, x.new_zeros(()))  # padding never enters
        scores = e @ self.key(x).transpose(1, 2) * self.scale  # (B, L, T)
        weights = sparsemax(scores, dim=-1, mask=valid.unsqueeze(1))  # (B, L, T), rows sum to 1
        return weights @ x  # (B, L, d)


class MAGGate(nn.Module):
    """Multimodal Adaptation Gate (Rahman et al., ACL 2020): shifts each token embedding by its
    audio and vision, e' = dropout(LayerNorm(e + α·h)), α = min(β‖e‖/‖h‖, 1)."""

    def __init__(self, hidden: int, audio: int, vision: int, beta_shift: float, dropout: float,
                 gate: str = "sigmoid") -> None:
        super().__init__()
        self.activation = torch.sigmoid if gate == "sigmoid" else torch.relu
        self.gate_audio = nn.Linear(audio + hidden, hidden)
        self.gate_vision = nn.Linear(vision + hidden, hidden)
        self.proj_audio = nn.Linear(audio, hidden)
        self.proj_vision = nn.Linear(vision, hidden)
        self.beta_shift = beta_shift
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        """e (B, L, H), audio (B, L, d_a), vision (B, L, d_v) -> (B, L, H)."""
        g_a = self.activation(self.gate_audio(torch.cat([audio, e], dim=-1)))  # (B, L, H), Eq. 3
        g_v = self.activation(self.gate_vision(torch.cat([vision, e], dim=-1)))  # (B, L, H)
        h = g_a * self.proj_audio(audio) + g_v * self.proj_vision(vision)  # (B, L, H), Eq. 4
        # a zero shift has no direction to scale: the floor keeps α finite (and α·h = 0 there)
        ratio = self.beta_shift * e.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-6)  # (B, L)
        alpha = ratio.clamp(max=1.0).unsqueeze(-1)  # (B, L, 1), Eq. 6 (ε = beta_shift)
        return self.dropout(self.norm(e + alpha * h))  # Eq. 5, then MAG's LayerNorm + dropout


class SequenceDecoder(nn.Module):
    """An LSTM that unrolls a code into ``steps`` frames: the code is the input at every step."""

    def __init__(self, code_size: int, out_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(code_size, code_size, batch_first=True)
        self.out = nn.Linear(code_size, out_size)

    def forward(self, code: torch.Tensor, steps: int) -> torch.Tensor:
        """code (B, c) -> (B, steps, out)."""
        h, _ = self.lstm(code.unsqueeze(1).expand(-1, steps, -1))  # (B, steps, c)
        return self.out(h)


class MIRD(Backbone):
    name = "mird"
    config_class = MIRDConfig
    text_input = "tokens"

    def __init__(self, config: MIRDConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.text_encoder = load_text_model(c.text_model)
        if not hasattr(self.text_encoder, "embeddings"):
            raise ConfigError(
                f"text_model {c.text_model!r}: MIRD injects audio/vision after a BERT-style "
                f"embedding layer, which {type(self.text_encoder).__name__} lacks; use a BERT-"
                "architecture model (e.g. 'minilm', bert-base-uncased)"
            )
        hidden = int(self.text_encoder.config.hidden_size)
        #: the encoder's layers run on the real tokens only (BERT-architecture encoders)
        self.unpad = bool(c.unpad) and supports_unpad(self.text_encoder)
        widths = {"text": dims.text, "audio": dims.audio, "vision": dims.vision}
        padded = {"text": dims.text_len, "audio": dims.audio_len, "vision": dims.vision_len}

        self.private = nn.ModuleDict({m: LengthLSTM(widths[m], c.z_dim) for m in MODALITIES})
        self.private_out = nn.ModuleDict({m: nn.Linear(c.z_dim, c.z_dim) for m in MODALITIES})

        self.align = None
        if c.align == "sparsemax":
            self.align = nn.ModuleDict(
                {m: WordAnchoredAttention(widths[m], hidden) for m in ("audio", "vision")}
            )
        self.mag = MAGGate(hidden, dims.audio, dims.vision, c.beta_shift, c.mag_dropout, c.gate)
        self.pool_score = nn.Linear(hidden, 1) if c.pool == "sparsemax" else None
        self.shared_dropout = nn.Dropout(c.shared_dropout)
        self.shared_out = nn.Linear(hidden, c.z_dim)

        #: decoder steps per modality
        self.recon_steps = {m: min(c.recon_steps, padded[m]) for m in MODALITIES}
        self.decoders = nn.ModuleDict({m: SequenceDecoder(2 * c.z_dim, widths[m]) for m in MODALITIES})

        self.head = nn.Sequential(
            nn.Linear(4 * c.z_dim, c.z_dim), nn.ReLU(), nn.Dropout(c.head_dropout), nn.Linear(c.z_dim, 1)
        )
        self.feature_dims = {m: c.z_dim for m in MODALITIES}
        self.feature_dims.update({"shared": c.z_dim, "fused": c.z_dim})
        for m in MODALITIES:
            self.feature_dims[RECON_PREFIX + m] = self.recon_steps[m] * widths[m]
            self.feature_dims[TARGET_PREFIX + m] = self.recon_steps[m] * widths[m]
            self.feature_dims[INPUT_PREFIX + m] = widths[m]

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """The pretrained encoder at ``text_lr``; everything else (new layers) at ``lr``."""
        encoder = [p for p in self.text_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": encoder, "lr": text_lr, "weight_decay": weight_decay, "name": "text_encoder"},
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        ]

    # -- parts ------------------------------------------------------------------------------------

    def _on_tokens(
        self, name: str, e: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor, token_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Modality ``name``'s frames on the token steps, (B, L, d)."""
        if self.align is not None:
            return self.align[name](e, x, lengths)
        return resample_to_length(x, lengths, e.shape[1], target_lengths=token_lengths)

    def shared(self, batch: Batch) -> torch.Tensor:
        """z_S (B, z_dim): the encoder over the MAG-shifted token embeddings, pooled over words."""
        tokens = batch.text_bert.long()
        ids, attention, segments = tokens[:, 0], tokens[:, 1], tokens[:, 2]  # (B, L) each
        token_lengths = clamp_lengths(attention.sum(dim=1), ids.shape[1])  # (B,)
        audio_lengths = clamp_lengths(batch.audio_lengths.to(ids.device), batch.audio.shape[1])
        vision_lengths = clamp_lengths(batch.vision_lengths.to(ids.device), batch.vision.shape[1])

        def inject(module: nn.Module, args: tuple, e: torch.Tensor) -> torch.Tensor:
            # e: the embedding layer's output (B, L, H); what we return replaces it
            audio = self._on_tokens("audio", e, batch.audio, audio_lengths, token_lengths)  # (B, L, d_a)
            vision = self._on_tokens("vision", e, batch.vision, vision_lengths, token_lengths)  # (B, L, d_v)
            return self.mag(e, audio, vision)

        handle = self.text_encoder.embeddings.register_forward_hook(inject)
        try:
            if self.unpad:  # the layers on the real tokens only (the hook still runs)
                states = encode_unpadded(self.text_encoder, ids, attention, segments)  # (B, L, H)
            else:
                states = self.text_encoder(
                    input_ids=ids, attention_mask=attention, token_type_ids=segments
                ).last_hidden_state  # (B, L, H)
        finally:
            handle.remove()
        if self.config.pool == "mean":  # Eq. 7: average pooling over the words
            mask = attention.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)
        elif self.pool_score is None:
            pooled = states[:, 0]  # (B, H): the [CLS] state
        else:
            scores = self.pool_score(states).squeeze(-1)  # (B, L)
            weights = sparsemax(scores, dim=-1, mask=attention.bool())  # (B, L), zero on padding
            pooled = (weights.unsqueeze(-1) * states).sum(dim=1)  # (B, H)
        return self.shared_out(self.shared_dropout(pooled))

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> BackboneOutput:
        inputs = {
            "text": (batch.text, batch.text_lengths),
            "audio": (batch.audio, batch.audio_lengths),
            "vision": (batch.vision, batch.vision_lengths),
        }
        inputs = {m: (x, clamp_lengths(n.to(x.device), x.shape[1])) for m, (x, n) in inputs.items()}
        z = {m: self.private_out[m](self.private[m](x, n)) for m, (x, n) in inputs.items()}  # (B, z_dim)
        z_s = self.shared(batch)  # (B, z_dim)
        p = torch.cat([z["text"], z["audio"], z["vision"], z_s], dim=-1)  # (B, 4 z_dim): p of Eq. (16)
        fused = self.head[1](self.head[0](p))  # (B, z_dim): the final linear layer's input
        prediction = self.head[3](self.head[2](fused)).squeeze(-1)  # (B,)

        features = dict(z)
        features["shared"] = z_s
        features["fused"] = fused
        for m, (x, n) in inputs.items():
            steps = self.recon_steps[m]
            recon = self.decoders[m](torch.cat([z[m], z_s], dim=-1), steps)  # (B, R_m, d_m)
            target = resample_to_length(x, n, steps)  # (B, R_m, d_m): valid frames only
            features[RECON_PREFIX + m] = recon.flatten(1)  # (B, R_m·d_m)
            features[TARGET_PREFIX + m] = target.flatten(1)  # (B, R_m·d_m)
            features[INPUT_PREFIX + m] = masked_mean(x, n)  # (B, d_m)
        return BackboneOutput(prediction=prediction, features=features)
