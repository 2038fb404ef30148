"""Memory Fusion Network (Zadeh et al., AAAI 2018), "Memory Fusion Network for Multi-view
Sequential Learning", Sec. 3 (System of LSTMs, Delta-memory Attention Network, Multi-view Gated
Memory).

For every step t = 1 .. T of the (word-level) sequence, with modalities m ∈ {l, a, v}:

    h_m^t, c_m^t = LSTM_m(x_m^t, h_m^{t-1}, c_m^{t-1})          System of LSTMs (one per view)
    c^[t-1,t]    = [c_l^{t-1}; c_a^{t-1}; c_v^{t-1}; c_l^t; c_a^t; c_v^t]   (``window`` = 2 steps)
    a^[t-1,t]    = softmax(D_a(c^[t-1,t]))                       DMAN: which dimensions changed
    ĉ^[t-1,t]    = a^[t-1,t] ⊙ c^[t-1,t]
    û^t          = tanh(D_u(ĉ^[t-1,t]))                          proposed memory update
    γ_1^t        = σ(D_γ1([ĉ^[t-1,t]; u^{t-1}]))                 retain gate
    γ_2^t        = σ(D_γ2([ĉ^[t-1,t]; u^{t-1}]))                 update gate
    u^t          = γ_1^t ⊙ u^{t-1} + γ_2^t ⊙ û^t                 Multi-view Gated Memory
    ŷ            = D_out([h_l^T; h_a^T; h_v^T; u^T])

Each D_* is Linear -> ReLU -> dropout -> Linear (hidden sizes and dropouts in the config). The
gates read [ĉ; u^{t-1}] as in the authors' released code (pliang279/MFN), which MMSA copies.

Computation order. The LSTMs never read the memory and the DMAN reads only the cell states, so
the model is computed in three passes that give the same function as stepping everything together
(``tests/test_lmf_mfn.py`` checks it against an MMSA-style loop of ``LSTMCell``s): (1) each view's
LSTM, with its input projections W_ih x^t for all steps in one matmul and one recurrent matmul per
step; (2) the DMAN and D_u, and the ĉ part of the gates' first layers, for all steps at once; (3)
the gated memory, the one loop that must read u^{t-1}: one small matmul per step plus the gates'
output layers. ``nn.LSTM`` is not used because it does not return the cell states c^t for every
step, which the DMAN reads.

Per-step alignment. MFN steps all views on one time grid. On word-aligned data (``aligned_50.pkl``)
the steps are used as they are. On unaligned data audio and vision are resampled onto the text's
steps with :func:`trainables.data.batches.resample_to_length` (``target_lengths=text_lengths``):
row i's valid frames are cut into ``text_lengths[i]`` equal segments, one mean per word, as for
EF-LSTM (see :mod:`trainables.backbones.ef_lstm`). MMSA instead requires aligned data for MFN.

Lengths. A view's state is frozen (``torch.where`` on a step mask) after its last valid step on
the text grid (its own length on aligned data, the text length after resampling), and the memory
after the row's last word, so padding never changes a row's final state; padding inputs are also
zeroed so that even non-finite padding cannot reach a gradient. Steps past the batch's longest
text are not run at all. MMSA runs every row through all padded steps.

Features: ``"text"``, ``"audio"``, ``"vision"`` are the final hidden states h_l^T, h_a^T, h_v^T of
the view LSTMs (each at the row's own last step); ``"fused"`` is the input of the output
network's final linear layer, ReLU(W_1 [h_l^T; h_a^T; h_v^T; u^T]) (B, ``out_hidden``): the
representation a fusion regulariser reads (MDM's Z_avl, the input of the linear head A_θp,
Colombo et al. 2021, Fig. 3), so its gradient reaches the memory and the view LSTMs.

Departures from MMSA's MFN (``models/singleTask/MFN.py``) besides the lengths and the unaligned
input: none in the model; MMSA's output is not squashed either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones._layers import clamp_lengths, step_mask
from trainables.backbones.base import MODALITIES, Backbone, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, ModalityDims, resample_to_length

__all__ = ["MFN", "MFNConfig"]


@dataclass
class MFNConfig:
    """MFN hyper-parameters; defaults are MMSA's ``config_regression.json`` for MFN on MOSI
    (hidden_dims [text 256, audio 32, video 256], memsize 400, windowsize 2, NN1Config
    {shapes 32, drop 0.2}, NN2Config {64, 0.0}, gamma1Config {256, 0.7}, gamma2Config {32, 0.5},
    outConfig {128, 0.0}). MMSA's config names are given next to each field."""

    #: text LSTM hidden size (hidden_dims[0])
    text_hidden: int = 256
    #: audio LSTM hidden size (hidden_dims[1])
    audio_hidden: int = 32
    #: vision LSTM hidden size (hidden_dims[2])
    vision_hidden: int = 256
    #: width of the multi-view gated memory u (memsize)
    mem_dim: int = 400
    #: steps of cell states the DMAN compares (windowsize; 2 = [t-1, t], the paper's Delta)
    window: int = 2
    #: hidden width / dropout of the DMAN attention network D_a (NN1Config)
    attention_hidden: int = 32
    attention_dropout: float = 0.2
    #: hidden width / dropout of the memory-proposal network D_u (NN2Config)
    proposal_hidden: int = 64
    proposal_dropout: float = 0.0
    #: hidden width / dropout of the retain-gate network D_γ1 (gamma1Config)
    gamma1_hidden: int = 256
    gamma1_dropout: float = 0.7
    #: hidden width / dropout of the update-gate network D_γ2 (gamma2Config)
    gamma2_hidden: int = 32
    gamma2_dropout: float = 0.5
    #: hidden width / dropout of the output network D_out (outConfig)
    out_hidden: int = 128
    out_dropout: float = 0.0

    def validate(self) -> None:
        for name in ("text_hidden", "audio_hidden", "vision_hidden", "mem_dim", "attention_hidden",
                     "proposal_hidden", "gamma1_hidden", "gamma2_hidden", "out_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.window < 2:
            raise ConfigError(
                f"window: expected an integer >= 2 (the DMAN compares c^(t-1) with c^t), got {self.window}"
            )
        for name in ("attention_dropout", "proposal_dropout", "gamma1_dropout", "gamma2_dropout",
                     "out_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")


def _mlp(in_size: int, hidden: int, out_size: int, dropout: float) -> nn.Sequential:
    """An MFN sub-network D_*: Linear -> ReLU -> dropout -> Linear (as in the authors' code)."""
    return nn.Sequential(
        nn.Linear(in_size, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_size)
    )


class MFN(Backbone):
    name = "mfn"
    config_class = MFNConfig

    def __init__(self, config: MFNConfig, dims: ModalityDims) -> None:
        super().__init__(config, dims)
        c = config
        self.hidden = {"text": c.text_hidden, "audio": c.audio_hidden, "vision": c.vision_hidden}
        in_sizes = {"text": dims.text, "audio": dims.audio, "vision": dims.vision}
        # one LSTM per view (the System of LSTMs); the cells hold the weights, forward steps them
        self.lstm = nn.ModuleDict({m: nn.LSTMCell(in_sizes[m], self.hidden[m]) for m in MODALITIES})
        total_hidden = sum(self.hidden.values())
        window_dim = total_hidden * c.window  # width of c^[t-w+1, t]
        self.attention = _mlp(window_dim, c.attention_hidden, window_dim, c.attention_dropout)  # D_a
        self.proposal = _mlp(window_dim, c.proposal_hidden, c.mem_dim, c.proposal_dropout)  # D_u
        # the gate networks are kept as separate layers: their first layer's input [ĉ; u] is split
        # in forward (the ĉ part is batched over all steps, the u part runs per step)
        self.gamma1_in = nn.Linear(window_dim + c.mem_dim, c.gamma1_hidden)
        self.gamma1_drop = nn.Dropout(c.gamma1_dropout)
        self.gamma1_out = nn.Linear(c.gamma1_hidden, c.mem_dim)
        self.gamma2_in = nn.Linear(window_dim + c.mem_dim, c.gamma2_hidden)
        self.gamma2_drop = nn.Dropout(c.gamma2_dropout)
        self.gamma2_out = nn.Linear(c.gamma2_hidden, c.mem_dim)
        self.out = _mlp(total_hidden + c.mem_dim, c.out_hidden, 1, c.out_dropout)  # D_out
        self.feature_dims = {
            "text": c.text_hidden,
            "audio": c.audio_hidden,
            "vision": c.vision_hidden,
            "fused": c.out_hidden,
        }

    def _on_text_steps(
        self, x: torch.Tensor, lengths: torch.Tensor, text_lengths: torch.Tensor, text_len: int, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One view on the text's first ``steps`` of ``text_len`` steps: (B, steps, d), padding
        zeroed, and the valid steps per row (B,)."""
        if self.dims.aligned and x.shape[1] == text_len:
            # word-aligned already; a view may end before the text (never after it)
            lengths = torch.minimum(clamp_lengths(lengths.to(x.device), text_len), text_lengths)
            x = x[:, :steps]  # (B, T, d)
            mask = step_mask(lengths, steps).unsqueeze(-1)  # (B, T, 1)
            return torch.where(mask, x, x.new_zeros(())), lengths
        # equal segments of each row's valid frames, one per word; zero past the text length
        x = resample_to_length(x, lengths, steps, target_lengths=text_lengths)  # (B, T, d)
        # resample_to_length zeroes steps past the text by multiplying by a mask, which lets
        # non-finite padding through (inf * 0 = nan); select instead
        mask = step_mask(text_lengths, steps).unsqueeze(-1)  # (B, T, 1)
        return torch.where(mask, x, x.new_zeros(())), text_lengths

    @staticmethod
    def _run_lstm(
        cell: nn.LSTMCell, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step one view's LSTM over x (B, T, d); the state is frozen after each row's ``lengths``.
        Returns the final hidden state (B, H) and the cell state of every step (B, T, H)."""
        b, steps, _ = x.shape
        hidden = cell.hidden_size
        # input projections of all steps in one matmul, both biases folded in: T x (B, 4H)
        x_proj = F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh).unbind(1)
        w_hh = cell.weight_hh.t()  # (H, 4H)
        valid = step_mask(lengths, steps).unsqueeze(-1).unbind(1)  # T x (B, 1)
        h = x.new_zeros(b, hidden)
        c = x.new_zeros(b, hidden)
        cells = []
        for t in range(steps):
            gates = torch.addmm(x_proj[t], h, w_hh)  # (B, 4H), PyTorch's gate order i, f, g, o
            s = torch.sigmoid(gates)  # (the g block of s is unused)
            g = torch.tanh(gates[:, 2 * hidden : 3 * hidden])
            c_new = torch.addcmul(s[:, hidden : 2 * hidden] * c, s[:, :hidden], g)  # f ⊙ c + i ⊙ g
            h_new = s[:, 3 * hidden :] * torch.tanh(c_new)  # o ⊙ tanh(c)
            c = torch.where(valid[t], c_new, c)
            h = torch.where(valid[t], h_new, h)
            cells.append(c)
        return h, torch.stack(cells, dim=1)

    def forward(self, batch: Batch) -> BackboneOutput:
        c = self.config
        text = batch.text
        text_lengths = clamp_lengths(batch.text_lengths.to(text.device), text.shape[1])  # (B,)
        # no row changes state past its last word, so steps past the longest text are skipped
        steps = int(text_lengths.max())
        b = text.shape[0]

        text_mask = step_mask(text_lengths, steps)  # (B, T)
        text_steps = torch.where(text_mask.unsqueeze(-1), text[:, :steps], text.new_zeros(()))  # (B, T, d_t)
        inputs = {"text": (text_steps, text_lengths)}
        for m in ("audio", "vision"):
            inputs[m] = self._on_text_steps(
                getattr(batch, m), getattr(batch, f"{m}_lengths"), text_lengths, text.shape[1], steps
            )

        # (1) System of LSTMs
        last_h, cells = {}, []
        for m in MODALITIES:
            last_h[m], c_m = self._run_lstm(self.lstm[m], *inputs[m])  # (B, H_m), (B, T, H_m)
            cells.append(c_m)
        cells_seq = torch.cat(cells, dim=-1)  # (B, T, H_sum)

        # (2) DMAN over the window [c^{t-w+1}; ..; c^t] (zeros before the first step), all steps at once
        padded = torch.cat([cells_seq.new_zeros(b, c.window - 1, cells_seq.shape[2]), cells_seq], dim=1)
        c_window = torch.cat([padded[:, k : k + steps] for k in range(c.window)], dim=-1)  # (B, T, wH)
        attention = torch.softmax(self.attention(c_window), dim=-1)  # (B, T, wH)
        c_hat = attention * c_window  # (B, T, wH)
        u_hat = torch.tanh(self.proposal(c_hat))  # (B, T, mem)
        # the gates' first layers on [ĉ; u]: the ĉ part for all steps now, the u part per step
        d = c_hat.shape[-1]
        gate_pre = torch.cat(
            [
                F.linear(c_hat, self.gamma1_in.weight[:, :d], self.gamma1_in.bias),
                F.linear(c_hat, self.gamma2_in.weight[:, :d], self.gamma2_in.bias),
            ],
            dim=-1,
        ).unbind(1)  # T x (B, G1 + G2)
        gate_mem = torch.cat([self.gamma1_in.weight[:, d:], self.gamma2_in.weight[:, d:]]).t()  # (mem, G1+G2)

        # (3) Multi-view Gated Memory, frozen after each row's last word
        u_hat_t = u_hat.unbind(1)  # T x (B, mem)
        text_valid_t = text_mask.unsqueeze(-1).unbind(1)  # T x (B, 1)
        memory = text.new_zeros(b, c.mem_dim)  # u^0 = 0, (B, mem)
        for t in range(steps):
            hidden = torch.relu(torch.addmm(gate_pre[t], memory, gate_mem))  # (B, G1 + G2)
            h1, h2 = hidden.split([c.gamma1_hidden, c.gamma2_hidden], dim=-1)
            gamma1 = torch.sigmoid(self.gamma1_out(self.gamma1_drop(h1)))  # retain, (B, mem)
            gamma2 = torch.sigmoid(self.gamma2_out(self.gamma2_drop(h2)))  # update, (B, mem)
            memory = torch.where(text_valid_t[t], gamma1 * memory + gamma2 * u_hat_t[t], memory)

        fused = torch.cat([last_h["text"], last_h["audio"], last_h["vision"], memory], dim=-1)  # (B, H + mem)
        hidden = self.out[1](self.out[0](fused))  # D_out's hidden layer, (B, out_hidden)
        prediction = self.out[3](self.out[2](hidden)).squeeze(-1)  # (B,)
        features = {m: last_h[m] for m in MODALITIES}
        features["fused"] = hidden  # the input of the final linear layer
        return BackboneOutput(prediction=prediction, features=features)
