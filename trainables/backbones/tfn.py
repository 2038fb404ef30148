"""Tensor Fusion Network (Zadeh et al., EMNLP 2017), Eq. 2-3.

Modality embedding subnetworks (Sec. 3.1):
    h_a = SubNet_a(mean_t a_t)      audio: masked time-average -> BatchNorm, dropout, 3-layer MLP
    h_v = SubNet_v(mean_t v_t)      vision: the same
    h_t = W_o dropout(LSTM(l_1 .. l_T))   text: LSTM final state -> linear (``text_out``)

Tensor fusion (Eq. 2-3): append a constant 1 to each embedding and take the 3-fold outer product

    z^m = [h_a; 1] ⊗ [h_v; 1] ⊗ [h_t; 1]      (B, A+1, V+1, T+1), flattened

so that z^m holds the unimodal terms (the slices against the 1s), the bimodal and the trimodal
interactions. Post-fusion MLP (Sec. 3.3): dropout -> Linear -> ReLU -> Linear -> ReLU -> Linear.

Features: ``"audio"``, ``"vision"``, ``"text"`` are the subnet outputs h_a, h_v, h_t; ``"fused"``
is the last post-fusion hidden layer (B, post_fusion_dim), not the (A+1)(V+1)(T+1)-wide tensor
(140,481 wide with the MOSI defaults) that MMSA returns as its fusion feature.

Departures from MMSA's TFN (``models/singleTask/TFN.py``):
- the time averages and the text LSTM use the sequence lengths (masked mean, packed LSTM);
  MMSA averages over the padded frames and runs the LSTM through the padding;
- the text dropout is applied to the LSTM state: MMSA's ``TextSubNet`` silently resets it to 0
  for a one-layer LSTM, so its ``dropouts[2]`` had no effect;
- the prediction is not squashed: MMSA maps it through ``6 * sigmoid(.) - 3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones._layers import FastDropout, SubnetEncoders, UnimodalSubnets
from trainables.backbones.base import Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims

__all__ = ["TFN", "TFNConfig"]


@dataclass
class TFNConfig:
    """TFN hyper-parameters; defaults are MMSA's ``config_regression.json`` for TFN on MOSI
    (hidden_dims [text 128, audio 32, video 128], text_out 32, post_fusion_dim 64,
    dropouts [audio 0.3, video 0.3, text 0.3, post-fusion 0.5])."""

    #: text LSTM hidden size
    text_hidden: int = 128
    #: width of the text subnet's output h_t (a TFN tensor axis)
    text_out: int = 32
    #: width of the audio subnet's output h_a (a TFN tensor axis)
    audio_hidden: int = 32
    #: width of the vision subnet's output h_v (a TFN tensor axis)
    vision_hidden: int = 128
    #: width of the two post-fusion hidden layers (the width of ``features["fused"]``)
    post_fusion_dim: int = 64
    audio_dropout: float = 0.3
    vision_dropout: float = 0.3
    text_dropout: float = 0.3
    post_fusion_dropout: float = 0.5
    #: how the post-fusion dropout mask over the (A+1)(V+1)(T+1)-wide tensor is drawn (see
    #: ``FastDropout``): "bits" (default: nn.Dropout's Bernoulli distribution from 1-32 random
    #: bits per element, one at p = 0.5, p exact for multiples of 2^-16 and to 2^-32 otherwise;
    #: several times cheaper than "uniform" on the CPU), "uniform" (``torch.rand``, this
    #: project's earlier default) or "bytes" (16 bits, p rounded to 2^-16). Each draws other random numbers: seeded runs differ between them
    dropout_mask: Literal["bits", "uniform", "bytes"] = "bits"

    def validate(self) -> None:
        for name in ("text_hidden", "text_out", "audio_hidden", "vision_hidden", "post_fusion_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("audio_dropout", "vision_dropout", "text_dropout", "post_fusion_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")
        if self.dropout_mask not in FastDropout.MASKS:
            raise ConfigError(f"dropout_mask: expected one of {', '.join(FastDropout.MASKS)}, "
                              f"got {self.dropout_mask!r}")


class InMajorLinear(nn.Module):
    """``linear`` (nn.Linear, its initial values kept) with the weight stored transposed, as the
    contiguous (in, out) parameter ``weight_t``: y = x W^T + b = addmm(b, x, weight_t), nn.Linear's
    own product, the same values bit for bit on the CPU.

    For TFN's (140,481 -> 64) post-fusion layer the layout is a speed choice: autograd then
    computes the weight gradient as z^T g (a tall product) instead of g^T z (a wide one with inner
    size B = 32), which MKL does 2-3x faster, and fused AdamW gets contiguous tensors (a strided
    view of the same layout would make its step ~3x slower). ``weight`` is W (out, in), a view.
    A state dict with nn.Linear's ``weight`` (out, in) loads too (checkpoints written before).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """x W^T + b; with ``alpha``, alpha · x W^T + b (the scale of a dropout mask folded in)."""
        return torch.addmm(self.bias, x, self.weight_t, alpha=alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "weight" in state_dict and prefix + "weight_t" not in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "weight_t"] = state_dict.pop(prefix + "weight").t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight stored (in, out)"


class TFN(SubnetEncoders, Backbone):
    name = "tfn"
    config_class = TFNConfig
    modality_separable = True
    has_stem = True
    critic_pairs_from_stem = True

    def __init__(self, config: TFNConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.subnets = UnimodalSubnets(dims, c.text_hidden, c.text_out, c.audio_hidden,
                                       c.vision_hidden, c.audio_dropout, c.vision_dropout,
                                       c.text_dropout)

        fusion_dim = (c.audio_hidden + 1) * (c.vision_hidden + 1) * (c.text_out + 1)
        # the mask over the ~140k-wide fusion tensor: same distribution as nn.Dropout, ~4x cheaper;
        # in place: the fusion tensor is a fresh product that nothing else reads (bmm saves its
        # inputs, not its output), so no second 140k-wide tensor per row is allocated
        self.post_fusion_dropout = FastDropout(c.post_fusion_dropout, inplace=True, mask=c.dropout_mask)
        self.post_fusion_1 = InMajorLinear(nn.Linear(fusion_dim, c.post_fusion_dim))
        self.post_fusion_2 = nn.Linear(c.post_fusion_dim, c.post_fusion_dim)
        self.head = nn.Linear(c.post_fusion_dim, 1)
        self.feature_dims = {
            "text": c.text_out,
            "audio": c.audio_hidden,
            "vision": c.vision_hidden,
            "fused": c.post_fusion_dim,
        }

    @staticmethod
    def tensor_fusion(h_a: torch.Tensor, h_v: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        """Eq. 2-3: flatten([h_a; 1] ⊗ [h_v; 1] ⊗ [h_t; 1]) -> (B, (A+1)(V+1)(T+1)).

        The 1 is appended last (the paper draws it first); the order of the flattened axes only
        permutes the columns of the next linear layer, so the model is the same.
        """
        one = h_a.new_ones(h_a.shape[0], 1)  # (B, 1)
        a1 = torch.cat([h_a, one], dim=1)  # (B, A+1)
        v1 = torch.cat([h_v, one], dim=1)  # (B, V+1)
        t1 = torch.cat([h_t, one], dim=1)  # (B, T+1)
        # two batched outer products, no loop over the batch: (B, A+1, V+1) then (B, (A+1)(V+1), T+1)
        av = torch.bmm(a1.unsqueeze(2), v1.unsqueeze(1))  # (B, A+1, V+1)
        avt = torch.bmm(av.reshape(av.shape[0], -1, 1), t1.unsqueeze(1))  # (B, (A+1)(V+1), T+1)
        return avt.reshape(avt.shape[0], -1)  # (B, (A+1)(V+1)(T+1))

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> BackboneOutput:
        """Tensor fusion (Eq. 2-3), the post-fusion MLP and the head on the embeddings."""
        h_t, h_a, h_v = unimodal["text"], unimodal["audio"], unimodal["vision"]
        z = self.tensor_fusion(h_a, h_v, h_t)  # (B, (A+1)(V+1)(T+1))
        # dropout(z) W^T = scale · (mask ⊙ z) W^T: the dropped elements zeroed, the scale
        # 1/(1-p) applied to the (B, P) product instead of the 140,481-wide tensor
        z, scale = self.post_fusion_dropout.masked(z)
        y1 = torch.relu(self.post_fusion_1(z, alpha=scale))  # (B, P)
        y2 = torch.relu(self.post_fusion_2(y1))  # (B, P)
        prediction = self.head(y2).squeeze(-1)  # (B,)
        return BackboneOutput(
            prediction=prediction,
            features={"text": h_t, "audio": h_a, "vision": h_v, "fused": y2},
        )

    def forward(self, batch: Batch) -> BackboneOutput:
        return self.fuse(self.encode(batch))
