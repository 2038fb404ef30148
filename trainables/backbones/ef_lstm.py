"""Early-fusion LSTM (EF-LSTM; "FLSTM" in the Synergy paper), as benchmarked in MMSA.

Early fusion concatenates the modalities at every step and runs one LSTM over the fused sequence:

    x_t = [W_t l_t ; W_a a_t ; W_v v_t]        (per-step modality projections, see below)
    h_T = LSTM(x_1 .. x_T)                      (last layer's state at each row's last word)
    ŷ   = w^T ReLU(W_h dropout(h_T)) + b

Per-step alignment. Early fusion needs the three modalities on one time grid. On word-aligned
data (``aligned_50.pkl``: L = L_a = L_v) the steps are used as they are. On unaligned data the
audio and vision frames are resampled onto the text's steps with
:func:`trainables.data.batches.resample_to_length`: row ``i``'s ``audio_lengths[i]`` valid frames
are cut into ``text_lengths[i]`` equal segments and each word step gets the mean of its segment
(the way MMSA's word-aligned features average the frames of each word; we have no word timings,
so segments are equal-length). Frames beyond a modality's length never contribute.

Unimodal representations. MMSA's EF-LSTM feeds the raw concatenation to the LSTM and so has no
unimodal representation for MDM (or any regulariser) to read. We give each modality its own
per-step linear projection (W_t, W_a, W_v) before the concatenation. Because the LSTM's input map
is linear too, this changes the model class only by bounding the rank of each modality's input
weights by ``proj_dim``; in exchange the projections are learned unimodal codes, and
``features["text" | "audio" | "vision"]`` is the mean of a modality's projections over its valid
steps (B, proj_dim). ``features["fused"]`` is the input of the final linear layer ``out``,
ReLU(W·dropout(h)) over the LSTM's final hidden state h (B, hidden): the representation a fusion
regulariser reads (MDM's Z_avl, Colombo et al. 2021, Fig. 3), so its gradient reaches the LSTM.

Departure from MMSA: MMSA normalises the fused input with ``BatchNorm1d(seq_len)``, i.e. one
statistic per *time position* pooled over rows and feature channels. It mixes padding steps into
the statistics and ties the model to the padded length, so we leave it out; with it, padding
would change predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.backbones._layers import LengthLSTM, clamp_lengths, masked_mean, step_mask
from trainables.backbones.base import Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims, resample_to_length

__all__ = ["EFLSTM", "EFLSTMConfig"]


@dataclass
class EFLSTMConfig:
    """EF-LSTM hyper-parameters; defaults are MMSA's ``config_regression.json`` for MOSI
    (``ef_lstm``: hidden_dims 128, num_layers 4, dropout 0.5), except ``proj_dim`` (ours)."""

    #: LSTM hidden size (the width of ``features["fused"]``)
    hidden: int = 128
    #: stacked LSTM layers
    num_layers: int = 4
    #: dropout between LSTM layers and on the final state before the head
    dropout: float = 0.5
    #: width of each modality's per-step projection (the width of the unimodal features); 64 makes
    #: MDM's critic input d = 192, the same as TFN's MOSI default (32 + 32 + 128)
    proj_dim: int = 64

    def validate(self) -> None:
        for name in ("hidden", "num_layers", "proj_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout}")


class EFLSTM(Backbone):
    name = "ef_lstm"
    config_class = EFLSTMConfig

    def __init__(self, config: EFLSTMConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.proj = nn.ModuleDict(
            {
                "text": nn.Linear(dims.text, c.proj_dim),
                "audio": nn.Linear(dims.audio, c.proj_dim),
                "vision": nn.Linear(dims.vision, c.proj_dim),
            }
        )
        self.lstm = LengthLSTM(3 * c.proj_dim, c.hidden, num_layers=c.num_layers, dropout=c.dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.linear = nn.Linear(c.hidden, c.hidden)
        self.out = nn.Linear(c.hidden, 1)
        self.feature_dims = {
            "text": c.proj_dim,
            "audio": c.proj_dim,
            "vision": c.proj_dim,
            "fused": c.hidden,
        }

    def _on_text_steps(
        self, x: torch.Tensor, lengths: torch.Tensor, text_lengths: torch.Tensor, text_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality on the text's step grid: (B, L, d) and the valid steps per row (B,)."""
        if self.dims.aligned and x.shape[1] == text_len:
            # word-aligned already: zero the steps past this modality's own length so that
            # padding values cannot reach the LSTM (text steps may outlast them)
            lengths = clamp_lengths(lengths.to(x.device), text_len)
            mask = step_mask(lengths, text_len).unsqueeze(-1)  # (B, L, 1)
            return torch.where(mask, x, x.new_zeros(())), lengths
        x = resample_to_length(x, lengths, text_len, target_lengths=text_lengths)  # (B, L, d)
        return x, text_lengths

    def forward(self, batch: Batch) -> BackboneOutput:
        text = batch.text
        text_len = text.shape[1]
        # text padding needs no masking: the packed LSTM and the masked mean never read it
        text_lengths = clamp_lengths(batch.text_lengths.to(text.device), text_len)  # (B,)
        audio, audio_lengths = self._on_text_steps(batch.audio, batch.audio_lengths, text_lengths, text_len)
        vision, vision_lengths = self._on_text_steps(
            batch.vision, batch.vision_lengths, text_lengths, text_len
        )

        steps = {
            "text": (self.proj["text"](text), text_lengths),  # (B, L, proj_dim)
            "audio": (self.proj["audio"](audio), audio_lengths),  # (B, L, proj_dim)
            "vision": (self.proj["vision"](vision), vision_lengths),  # (B, L, proj_dim)
        }
        fused_in = torch.cat([p for p, _ in steps.values()], dim=-1)  # (B, L, 3 * proj_dim)
        h = self.lstm(fused_in, text_lengths)  # (B, hidden)
        y = torch.relu(self.linear(self.dropout(h)))  # (B, hidden)
        prediction = self.out(y).squeeze(-1)  # (B,)

        features = {name: masked_mean(p, n) for name, (p, n) in steps.items()}  # name -> (B, proj_dim)
        features["fused"] = y  # the input of the final linear head
        return BackboneOutput(prediction=prediction, features=features)
