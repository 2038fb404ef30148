"""Low-rank Multimodal Fusion (Liu et al., ACL 2018), "Efficient Low-rank Multimodal Fusion with
Modality-Specific Factors", Sec. 3 (the low-rank fusion). "LFN" in the MDM and Synergy papers.

Modality embedding subnetworks (as in TFN, Sec. 3.1 there):
    z_a = SubNet_a(mean_t a_t)      audio: masked time-average -> BatchNorm, dropout, 3-layer MLP
    z_v = SubNet_v(mean_t v_t)      vision: the same
    z_t = W_o dropout(LSTM(l_1 .. l_T))   text: LSTM final state -> linear (``text_out``)

Tensor fusion would project Z = [z_a; 1] ⊗ [z_v; 1] ⊗ [z_t; 1] with a weight tensor W of shape
(A+1, V+1, T+1, d_h). LMF factorises W into ``rank`` sums of modality-specific factors,
W = Σ_r W_a^(r) ⊗ W_v^(r) ⊗ W_t^(r) with W_m^(r) ∈ R^{(d_m+1) × d_h}; by multilinearity
W·Z is computed without ever forming Z:

    h = Σ_r  λ_r ( [z_a;1] W_a^(r) ) ⊙ ( [z_v;1] W_v^(r) ) ⊙ ( [z_t;1] W_t^(r) )  +  b     ∈ R^{d_h}

with the factor tensors W_m of shape (rank, d_m+1, d_h) and one einsum per modality (no loop over
rank or batch). The paper sums the rank terms (λ_r = 1); the authors' code (and MMSA) learns
the rank weights λ ∈ R^rank, and so do we.

Prediction. d_h is ``output_dim``. With MMSA's regression default ``output_dim = 1`` the fusion
output h is the sentiment score itself (the authors' model has no layer after the fusion). With
``output_dim > 1`` a linear head reads dropout(h): ŷ = w^T dropout(h) + c (``post_fusion_dropout``).

Features: ``"audio"``, ``"vision"``, ``"text"`` are the subnet outputs z_a, z_v, z_t; ``"fused"``
is h (B, output_dim), the multimodal representation before the head. With the MMSA default it is
one wide (it *is* the prediction): set ``output_dim`` higher (e.g. 32) when a regulariser reads
``fused`` (MMIM's CPC predicts each modality from it; MDM's critic reads it as Z_avl, and a
1-wide Z_avl is the score itself: `search_spaces/mdm.yaml` sets 32).

Departures from MMSA's LMF (``models/singleTask/LMF.py``, ``trains/singleTask/LMF.py``):
- the time averages and the text LSTM use the sequence lengths (masked mean, packed LSTM); MMSA's
  data loader averages audio/vision over the padded frames and its LSTM runs through the padding;
- the text dropout acts on the LSTM state (MMSA's ``TextSubNet`` resets it to 0 for one layer);
- MMSA's ``post_fusion_dropout`` is built but never applied; ours acts only before the head that
  ``output_dim > 1`` adds;
- the constant 1 is appended last (MMSA prepends it): it only permutes the factors' rows;
- MMSA's trainer passes ``parameters()[:3]`` (the factors, ``factor_lr``) and ``[5:]`` (the
  subnets) to Adam, so the rank weights λ and the bias b are never trained there (they stay at
  their initial values). Here every parameter is trained; MMSA's MOSI ``factor_lr`` equals its
  ``learning_rate`` (1e-3), so one learning rate for all is the same setting otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones._layers import SubnetEncoders, UnimodalSubnets
from trainables.backbones.base import Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims

__all__ = ["LMF", "LMFConfig"]


@dataclass
class LMFConfig:
    """LMF hyper-parameters; defaults are MMSA's ``config_regression.json`` for LMF on MOSI
    (hidden_dims [text 128, audio 16, video 128], dropouts [audio 0.3, video 0.3, text 0.3,
    post-fusion 0.3], rank 3), ``text_out`` = text_hidden // 2 = 64 (hard-coded in MMSA's model)
    and ``output_dim`` 1 (MMSA's regression output)."""

    #: text LSTM hidden size
    text_hidden: int = 128
    #: width of the text subnet's output z_t
    text_out: int = 64
    #: width of the audio subnet's output z_a
    audio_hidden: int = 16
    #: width of the vision subnet's output z_v
    vision_hidden: int = 128
    #: number of modality-specific factors per modality (the rank r of the fusion weight tensor)
    rank: int = 3
    #: width d_h of the fusion output h (``features["fused"]``); 1 = h is the prediction (MMSA)
    output_dim: int = 1
    audio_dropout: float = 0.3
    vision_dropout: float = 0.3
    text_dropout: float = 0.3
    #: dropout on h before the linear head; used only when output_dim > 1 (see the module doc)
    post_fusion_dropout: float = 0.3

    def validate(self) -> None:
        for name in ("text_hidden", "text_out", "audio_hidden", "vision_hidden", "rank", "output_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("audio_dropout", "vision_dropout", "text_dropout", "post_fusion_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")


class LMF(SubnetEncoders, Backbone):
    name = "lmf"
    config_class = LMFConfig
    modality_separable = True
    has_stem = True
    critic_pairs_from_stem = True

    @classmethod
    def fused_problem(cls, config: LMFConfig) -> str | None:
        """At ``output_dim`` 1 (MMSA's) h is the score: a regulariser reading Z would act on the
        prediction (MDM's penalty gradient into LMF measured 3e-12, against 1e-4 to 5e-4 on
        EF-LSTM, TFN and MFN), a silent no-op."""
        if config.output_dim > 1:
            return None
        return ("backbone.output_dim: 1 makes LMF's fused representation the prediction itself, "
                "so a regulariser that reads it has nothing to act on; set backbone.output_dim "
                "> 1 (mdm.yaml and synergy.yaml use 32)")

    def __init__(self, config: LMFConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.subnets = UnimodalSubnets(dims, c.text_hidden, c.text_out, c.audio_hidden,
                                       c.vision_hidden, c.audio_dropout, c.vision_dropout,
                                       c.text_dropout)

        # modality-specific factors W_m: (rank, d_m + 1, d_h); Xavier-normal as the authors' code
        self.audio_factor = nn.Parameter(torch.empty(c.rank, c.audio_hidden + 1, c.output_dim))
        self.vision_factor = nn.Parameter(torch.empty(c.rank, c.vision_hidden + 1, c.output_dim))
        self.text_factor = nn.Parameter(torch.empty(c.rank, c.text_out + 1, c.output_dim))
        self.fusion_weights = nn.Parameter(torch.empty(1, c.rank))  # λ, one weight per rank
        self.fusion_bias = nn.Parameter(torch.zeros(1, c.output_dim))  # b
        for factor in (self.audio_factor, self.vision_factor, self.text_factor, self.fusion_weights):
            nn.init.xavier_normal_(factor)

        if c.output_dim > 1:
            self.post_fusion_dropout = nn.Dropout(c.post_fusion_dropout)
            self.head = nn.Linear(c.output_dim, 1)
        else:  # h is the score itself, as in MMSA: no dropout and no extra affine map
            self.post_fusion_dropout = nn.Identity()
            self.head = None
        self.feature_dims = {
            "text": c.text_out,
            "audio": c.audio_hidden,
            "vision": c.vision_hidden,
            "fused": c.output_dim,
        }

    def low_rank_fusion(self, z_a: torch.Tensor, z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """h = Σ_r λ_r ⊙_m ([z_m; 1] W_m^(r)) + b; z_m (B, d_m) -> h (B, output_dim)."""
        one = z_a.new_ones(z_a.shape[0], 1)  # (B, 1)
        product = None
        for z, factor in ((z_a, self.audio_factor), (z_v, self.vision_factor), (z_t, self.text_factor)):
            z1 = torch.cat([z, one], dim=1)  # (B, d_m + 1)
            projected = torch.einsum("bi,rio->bro", z1, factor)  # (B, rank, d_h)
            product = projected if product is None else product * projected
        return torch.einsum("r,bro->bo", self.fusion_weights[0], product) + self.fusion_bias  # (B, d_h)

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> BackboneOutput:
        """The low-rank fusion and the head on the embeddings."""
        z_t, z_a, z_v = unimodal["text"], unimodal["audio"], unimodal["vision"]
        h = self.low_rank_fusion(z_a, z_v, z_t)  # (B, d_h)
        if self.head is None:
            prediction = h[:, 0]  # (B,)
        else:
            prediction = self.head(self.post_fusion_dropout(h)).squeeze(-1)  # (B,)
        return BackboneOutput(
            prediction=prediction,
            features={"text": z_t, "audio": z_a, "vision": z_v, "fused": h},
        )

    def forward(self, batch: Batch) -> BackboneOutput:
        return self.fuse(self.encode(batch))
