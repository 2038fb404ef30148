"""Small pieces the feature-based backbones share: length masks, masked means, packed LSTMs.

Every helper takes the per-row valid lengths, so padding rows never reach a result: a backbone
that builds on these is padding-invariant by construction (the contract tests check it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from trainables.data.batches import Batch

__all__ = ["FastDropout", "LengthLSTM", "SubNet", "UnimodalSubnets", "clamp_lengths", "masked_mean", "step_mask"]


def clamp_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Lengths as int64 in [1, max_len]: a zero-length row would make a mean divide by zero
    and ``pack_padded_sequence`` refuse the batch, so an (invalid) empty row counts one step."""
    return lengths.long().clamp(min=1, max=max_len)


def step_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True on the valid steps ``t < lengths[b]``."""
    steps = torch.arange(max_len, device=lengths.device)  # (L,)
    return steps[None, :] < clamp_lengths(lengths, max_len)[:, None]


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the valid steps of each row: x (B, L, d), lengths (B,) -> (B, d).

    ``torch.where`` rather than multiplying by the mask, so that even non-finite padding
    (0 * inf = nan) cannot leak into the mean.
    """
    b, length, _ = x.shape
    lengths = clamp_lengths(lengths.to(x.device), length)
    mask = step_mask(lengths, length).unsqueeze(-1)  # (B, L, 1)
    total = torch.where(mask, x, x.new_zeros(())).sum(dim=1)  # (B, d)
    return total / lengths.unsqueeze(-1).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _field_flags(w: int, t: int, keep: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8 // w) ``dtype``: for each byte value b, whether each of its w-bit fields (field k:
    bits k·w to k·w + w − 1) keeps (field >= t) or, with ``keep`` false, drops (field < t) its
    element; 1 or 0 as uint8, all ones (-1) or 0 as int32."""
    b = torch.arange(256)[:, None]
    fields = (b >> (torch.arange(8 // w)[None, :] * w)) & (2**w - 1)
    flags = (fields >= t) if keep else (fields < t)
    return (flags.to(dtype) if dtype == torch.uint8 else -flags.to(dtype)).to(device)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask for very wide activations (TFN's ~140k-wide fusion tensor).

    ``mask="bits"``: each element is kept when an integer of w random bits, uniform on
    [0, 2^w), is at least ``t = p · 2^w``, with w the fewest of 1, 2, 4, 8 and 16 for which
    ``p · 2^w`` is an integer (p = 0.5, TFN's post-fusion dropout, takes one bit per element), else
    w = 32 with p rounded to the nearest multiple of 2^-32. The bits come from ``random_`` on
    int64 (the default generator, so seeded runs repeat), 64 / w elements per draw. Below 8 bits a
    byte holds 8 / w elements: its w-bit fields, lowest first, expanded through a 256-row table of
    keep flags (one gather instead of a comparison per element). Kept elements are scaled by
    1 / (1 − p_w) (p_w: p as the bits represent it), so the expectation is kept exactly.
    P(drop) = p_w, which is p itself for any multiple of 2^-32 (0.5, 0.25, ...) and within 2^-33
    of p otherwise: finer than ``torch.rand``'s float32 uniforms, which are multiples of 2^-24.
    Every bit of the generator is uniform and independent, so each element's field is too: this
    is nn.Dropout's Bernoulli distribution, not an approximation of it (docs/fidelity.md), drawn
    cheaper than with ``torch.rand`` on the CPU (the generator is serial: the mask is one of the
    costliest ops of a TFN step), the fewer bits the cheaper. :meth:`masked` leaves the scale to
    the caller (TFN folds it into its next layer).

    ``mask="uniform"``: ``u >= p`` for ``u ~ U[0, 1)`` from ``torch.rand`` (float32, multiples of
    2^-24), scaled by ``1 / (1 - p)``; this project's earlier default, kept for comparison.

    ``mask="bytes"``: 16 random bits per element whatever p, so p is rounded to a multiple of
    2^-16 (0.3 -> 0.3000030); kept elements are scaled by 1 / (1 - p_rounded). Superseded by
    ``"bits"``, which represents every p at least as finely (with twice the draws where p
    needs 32 bits).

    Each mask draws other random numbers than the others: seeded runs differ between them.

    ``inplace=True`` multiplies the input by the mask in place when no graph is being recorded
    (``torch.no_grad``: MDM's critic batches), so no second activation-sized tensor is allocated;
    the caller must not need the input again. With gradients it stays out of place: in place on
    a view (TFN's reshaped outer product) makes autograd copy the whole gradient back through the
    view's base, measured slower than the extra tensor. Same parameters and state dict as
    ``nn.Dropout`` (it has none).
    """

    MASKS = ("bits", "uniform", "bytes")

    def __init__(self, p: float = 0.5, inplace: bool = False, mask: str = "bits") -> None:
        super().__init__(p, inplace)
        if mask not in self.MASKS:
            raise ValueError(f"FastDropout mask: expected one of {', '.join(self.MASKS)}, got {mask!r}")
        self.mask = mask

    @staticmethod
    def bit_width(p: float) -> tuple[int, int]:
        """(w, t): the bits per element of ``mask="bits"`` and the drop threshold t = p_w · 2^w
        (drop when the w-bit integer is below t): the fewest w in (1, 2, 4, 8, 16) with p · 2^w
        an integer, else 32 with p · 2^32 rounded."""
        for w in (1, 2, 4, 8, 16):
            t = p * 2**w
            if t == int(t):
                return w, int(t)
        return 32, min(round(p * 2**32), 2**32 - 1)

    def _widths(self) -> tuple[int, int]:
        return self.bit_width(self.p) if self.mask == "bits" else (16, round(self.p * 65536))

    @staticmethod
    def _random_bytes(n: int, w: int, device: torch.device) -> torch.Tensor:
        """The bytes of ceil(n · w / 64) random int64 words (the default generator), as many as n
        elements of w bits fill."""
        per_word = 64 // w
        words = torch.empty((n + per_word - 1) // per_word, dtype=torch.int64,
                            device=device).random_(-2**63, None)
        return words.view(torch.uint8)[:(n * w + 7) // 8]

    def _packed_flags(self, x: torch.Tensor, w: int, t: int, keep: bool,
                      dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """For w < 8: the keep (or drop) flags of x's n elements, shape of x, as 0/1 bytes
        (``dtype`` uint8) or as int32 0/-1 (all bits set: an AND mask for float32's bits), from
        n · w random bits: element i is field i mod (8 / w) of random byte i div (8 / w)."""
        n = x.numel()
        table = _field_flags(w, t, keep, dtype, x.device)  # (256, 8 // w)
        index = self._random_bytes(n, w, x.device).to(torch.int32)
        if dtype == torch.uint8:  # the 8 / w flags of a byte read as one integer: a 1-D gather
            row = {1: torch.int64, 2: torch.int32, 4: torch.int16}[w]
            flags = table.view(row).view(-1)[index].view(torch.uint8)
        else:
            flags = table.index_select(0, index).view(-1)
        return flags[:n].view(x.shape)

    def _drop(self, x: torch.Tensor, keep: bool = False) -> tuple[torch.Tensor, float]:
        """(drop, scale): where to zero x (bool, shape of x) and 1 / P(keep) for the rest; with
        ``keep``, the complement (where to keep x) from the same draws."""
        n = x.numel()
        if self.mask == "uniform":
            # uniforms in float32 even under bf16 autocast (a bf16 uniform would quantise 1 - p)
            u = torch.rand(x.shape, dtype=torch.float32, device=x.device)
            return (u >= self.p if keep else u < self.p), 1.0 / (1.0 - self.p)
        w, t = self._widths()
        if w < 8:
            return self._packed_flags(x, w, t, keep).view(torch.bool), 2**w / (2**w - t)
        # the random bytes read as signed w-bit integers: uniform on [-2^(w-1), 2^(w-1))
        u = self._random_bytes(n, w, x.device).view(
            {8: torch.int8, 16: torch.int16, 32: torch.int32}[w]).view(x.shape)
        threshold = t - 2**(w - 1)
        return (u >= threshold if keep else u < threshold), 2**w / (2**w - t)  # P(drop) = t / 2^w

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled mask, float32, shape of x: 0 or 1 / P(keep)."""
        drop, scale = self._drop(x)
        return (~drop).to(torch.float32).mul_(scale)

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped elements zeroed, scale): ``forward(x) == scale * masked(x)[0]``,
        for a caller that folds the scale into what follows (TFN's post-fusion layer multiplies
        its product by it, ``addmm``'s alpha: exact for p = 0.5, whose scale 2 is a power of two,
        and within a rounding otherwise), saving two passes over a 140,481-wide tensor. In place
        under the same rule as :meth:`forward`. Scale 1.0 when nothing is dropped (eval, p = 0)."""
        if not self.training or self.p == 0.0:
            return x, 1.0
        in_place = self.inplace and not (torch.is_grad_enabled() and x.requires_grad)
        if self.p == 1.0:
            return (x.mul_(0.0) if in_place else x * 0.0), 1.0
        # x times the keep mask read as bytes (0 or 1): the values of masked_fill(drop, 0) for
        # finite x (a dropped negative element is -0.0, which sums as 0.0), in about half the
        # time on the CPU (a bool masked_fill_ over TFN's 64 x 140,481 critic rows took 41-50 ms,
        # the multiply 21-23 ms)
        w, t = self._widths()
        if in_place and w < 8 and x.dtype == torch.float32:  # w < 8: only mask="bits"
            # AND float32's bits with 0 or all ones: the values of masked_fill(drop, 0) (+0.0),
            # the same draws as the flags of _drop; no int-to-float cast (TFN's critic blocks:
            # 64 x 140,481 elements, 22 -> 13 ms a block on one thread with the draw)
            x.view(torch.int32).bitwise_and_(self._packed_flags(x, w, t, True, torch.int32))
            return x, 2**w / (2**w - t)
        keep, scale = self._drop(x, keep=True)
        keep = keep.view(torch.uint8)
        return (x.mul_(keep) if in_place else x * keep), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        in_place = self.inplace and not (torch.is_grad_enabled() and x.requires_grad)
        if self.p == 1.0:
            return x.mul_(0.0) if in_place else x * 0.0
        keep = self._keep(x).to(x.dtype)
        return x.mul_(keep) if in_place else x * keep  # 0 or 1/(1-p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask={self.mask}"


class LengthLSTM(nn.Module):
    """A batch-first LSTM run on packed sequences; returns the last layer's final hidden state.

    Packing (rather than running over the padded tensor, as MMSA's subnets do) makes the final
    state the one at each row's own last valid step, and padding steps are never read.
    """

    def __init__(self, in_size: int, hidden: int, num_layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.bidirectional = bidirectional
        #: width of the returned state: ``hidden``, or ``2 * hidden`` when bidirectional
        self.out_size = hidden * (2 if bidirectional else 1)
        self.lstm = nn.LSTM(
            in_size,
            hidden,
            num_layers=num_layers,
            # nn.LSTM applies dropout between layers only and warns when there is one layer
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
            bidirectional=bidirectional,
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_in), lengths (B,) -> (B, hidden), or (B, 2 * hidden) when bidirectional:
        [forward state at the last valid step; backward state at the first step]."""
        # pack_padded_sequence wants the lengths on the CPU whatever the device of x
        lengths = clamp_lengths(lengths, x.shape[1]).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        # h_n: (num_layers * directions, B, hidden), in the input's row order
        _, (h_n, _) = self.lstm(packed)
        if self.bidirectional:
            return torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2 * hidden)
        return h_n[-1]


class SubNet(nn.Module):
    """TFN's pre-fusion MLP for a time-averaged modality: BatchNorm -> dropout -> 3 x (Linear, ReLU).

    (Zadeh et al., EMNLP 2017, Sec. 3.1 "Modality Embedding Subnetworks"; sizes as in MMSA.)
    """

    def __init__(self, in_size: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_size)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(in_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The BatchNorm, x (B, in_size) -> (B, in_size): no random draws (the stem of
        :meth:`UnimodalSubnets.stem`)."""
        if self.training and x.shape[0] == 1:
            # One row has no batch statistics (BatchNorm1d raises): a last batch of size 1 is
            # normalised with the running statistics instead, and does not update them.
            return nn.functional.batch_norm(
                x, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                self.norm.bias, training=False, eps=self.norm.eps,
            )
        return self.norm(x)

    def after_norm(self, normed: torch.Tensor) -> torch.Tensor:
        """Dropout and the MLP on the normalised input, (B, in_size) -> (B, hidden)."""
        return self.mlp(self.drop(normed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_size) -> (B, hidden)."""
        return self.after_norm(self.normalise(x))


class UnimodalSubnets(nn.Module):
    """TFN's modality embedding subnetworks, shared by TFN and LMF (LMF reuses them, Liu et al.
    2018 Sec. 3.2): audio and vision :class:`SubNet` MLPs over their masked means, and a packed
    text LSTM followed by dropout and a linear layer."""

    def __init__(self, dims, text_hidden: int, text_out: int, audio_hidden: int,
                 vision_hidden: int, audio_dropout: float, vision_dropout: float,
                 text_dropout: float) -> None:
        super().__init__()
        self.audio_subnet = SubNet(dims.audio, audio_hidden, audio_dropout)
        self.vision_subnet = SubNet(dims.vision, vision_hidden, vision_dropout)
        self.text_lstm = LengthLSTM(dims.text, text_hidden)
        self.text_dropout = nn.Dropout(text_dropout)
        self.text_out = nn.Linear(text_hidden, text_out)

    def stem(self, batch) -> dict[str, torch.Tensor]:
        """Each modality's encoder up to its first random draw: the BatchNormed masked means of
        audio and vision (B, d_a), (B, d_v), and the text LSTM's final state (B, text_hidden).
        Row-wise but for BatchNorm's batch statistics, which a permutation of the rows leaves
        unchanged; no dropout (a one-layer LSTM draws none)."""
        return {"audio": self.audio_subnet.normalise(masked_mean(batch.audio, batch.audio_lengths)),
                "vision": self.vision_subnet.normalise(masked_mean(batch.vision, batch.vision_lengths)),
                "text": self.text_lstm(batch.text, batch.text_lengths)}

    def from_stem(self, stem: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rest of each encoder on :meth:`stem`'s output: dropout and the MLPs (audio, vision,
        then text: the order in which ``forward`` draws its dropout masks)."""
        h_a = self.audio_subnet.after_norm(stem["audio"])  # (B, A)
        h_v = self.vision_subnet.after_norm(stem["vision"])  # (B, V)
        h_t = self.text_out(self.text_dropout(stem["text"]))  # (B, T)
        return h_t, h_a, h_v

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """batch -> (h_text (B, text_out), h_audio (B, audio_hidden), h_vision (B, vision_hidden))."""
        return self.from_stem(self.stem(batch))


class SubnetEncoders:
    """``encode``, ``stem`` and ``encode_stem`` of a backbone whose unimodal encoders are one
    :class:`UnimodalSubnets` in ``self.subnets`` (TFN, LMF): the three modality embeddings as
    ``{"text", "audio", "vision"}`` (B, d_m), and their split at the first dropout draw."""

    subnets: UnimodalSubnets

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The modality embedding subnetworks: text (B, T), audio (B, A), vision (B, V)."""
        h_t, h_a, h_v = self.subnets(batch)
        return {"text": h_t, "audio": h_a, "vision": h_v}

    def stem(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The subnetworks up to their dropout: the BatchNormed audio and vision means and the text
        LSTM's final state (:meth:`UnimodalSubnets.stem`)."""
        return self.subnets.stem(batch)

    def encode_stem(self, stem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dropout and the subnetworks' layers after it, on :meth:`stem`'s output."""
        h_t, h_a, h_v = self.subnets.from_stem(stem)
        return {"text": h_t, "audio": h_a, "vision": h_v}
