"""In-memory data: the loaded splits (numpy), their tensor form, and batches by index slicing.

``MultimodalData`` is what the driver loads once and ships to every trial through the Ray object
store. A trial turns each split into a :class:`TensorSplit` once (pre-stacked tensors) and draws
:class:`Batch` objects from it by slicing with an index tensor: no per-example Python work and no
collation in the hot loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "BERT_UNCASED_KEEP_IDS",
    "BERT_UNCASED_MASK_ID",
    "DROPPABLE",
    "DROP_SETS",
    "SPLITS",
    "UNLABELED",
    "Batch",
    "ModalityDims",
    "MultimodalData",
    "SplitArrays",
    "TensorSplit",
    "drop_modality",
    "drop_set",
    "GROUP_CHUNK_BATCHES",
    "iterate_batches",
    "concat_batches",
    "length_grouped_order",
    "row_lengths",
    "text_extent",
    "trim_batch",
    "resample_to_length",
    "modality_permutations",
    "shuffle_modalities",
    "split_batch",
]

SPLITS = ("train", "valid", "test")
#: the optional fourth split: unlabeled clips (MIRD's external pool; labels absent or ignored,
#: stored as zeros). Same feature widths and padded lengths as train.
UNLABELED = "unlabeled"


@dataclass
class SplitArrays:
    """One split as loaded from an MMSA pickle or a Parquet folder (validated, numpy)."""

    ids: np.ndarray  # (N,) str
    raw_text: np.ndarray  # (N,) str
    text: np.ndarray  # (N, L, d_t) float32 text features (GloVe / BERT / synthetic)
    text_bert: np.ndarray | None  # (N, 3, L) int64: input ids, attention mask, segment ids
    audio: np.ndarray  # (N, L_a, d_a) float32
    vision: np.ndarray  # (N, L_v, d_v) float32
    text_lengths: np.ndarray  # (N,) int64, >= 1
    audio_lengths: np.ndarray  # (N,) int64, >= 1
    vision_lengths: np.ndarray  # (N,) int64, >= 1
    labels: np.ndarray  # (N,) float32 in [-3, 3]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> "SplitArrays":
        """The rows ``index`` of every array (used for unlabeled splits and tests)."""
        return SplitArrays(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                for f in dataclasses.fields(self)
            }
        )


@dataclass(frozen=True)
class ModalityDims:
    """Feature widths and padded sequence lengths, read from the data (never hard-coded)."""

    text: int
    audio: int
    vision: int
    text_len: int
    audio_len: int
    vision_len: int
    #: True when audio/vision are word-aligned with text (same length, aligned_50.pkl)
    aligned: bool
    #: True when the data has BERT token ids (``text_bert``)
    has_tokens: bool


@dataclass
class MultimodalData:
    """The validated train/valid/test splits of one data set, plus where it came from.

    ``splits`` may also hold :data:`UNLABELED` (an unlabeled pool, e.g. MIRD's external clips).
    """

    splits: dict[str, SplitArrays]
    #: the file or folder the data was read from (or "synthetic:...")
    source: str
    #: sha256 over the arrays' bytes; identifies the data in MLflow
    digest: str

    @property
    def unlabeled(self) -> SplitArrays | None:
        """The unlabeled pool, or None when the data has none."""
        return self.splits.get(UNLABELED)

    @property
    def dims(self) -> ModalityDims:
        tr = self.splits["train"]
        return ModalityDims(
            text=int(tr.text.shape[2]),
            audio=int(tr.audio.shape[2]),
            vision=int(tr.vision.shape[2]),
            text_len=int(tr.text.shape[1]),
            audio_len=int(tr.audio.shape[1]),
            vision_len=int(tr.vision.shape[1]),
            aligned=tr.text.shape[1] == tr.audio.shape[1] == tr.vision.shape[1],
            has_tokens=tr.text_bert is not None,
        )


@dataclass
class Batch:
    """A mini-batch; every tensor's first dimension is the batch (B)."""

    text: torch.Tensor  # (B, L, d_t) float
    text_bert: torch.Tensor | None  # (B, 3, L) long
    audio: torch.Tensor  # (B, L_a, d_a) float
    vision: torch.Tensor  # (B, L_v, d_v) float
    text_lengths: torch.Tensor  # (B,) long
    audio_lengths: torch.Tensor  # (B,) long
    vision_lengths: torch.Tensor  # (B,) long
    labels: torch.Tensor  # (B,) float
    #: row numbers in the split (for per-example outputs such as critic scores)
    index: torch.Tensor  # (B,) long
    #: which rows carry a label; None means all (MIRD mixes unlabeled rows into a batch)
    labeled: torch.Tensor | None = None  # (B,) bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            **{
                f.name: (
                    None
                    if getattr(self, f.name) is None
                    else getattr(self, f.name).to(device, non_blocking=non_blocking)
                )
                for f in dataclasses.fields(self)
            }
        )


@dataclass
class TensorSplit:
    """A split as pre-stacked tensors (pinned on CUDA hosts); batches are index slices."""

    text: torch.Tensor
    text_bert: torch.Tensor | None
    audio: torch.Tensor
    vision: torch.Tensor
    text_lengths: torch.Tensor
    audio_lengths: torch.Tensor
    vision_lengths: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: SplitArrays, pin_memory: bool = False) -> "TensorSplit":
        def t(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
            if a is None:
                return None
            x = torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)
            return x.pin_memory() if pin_memory else x

        return cls(
            text=t(arrays.text, torch.float32),
            text_bert=t(arrays.text_bert, torch.long),
            audio=t(arrays.audio, torch.float32),
            vision=t(arrays.vision, torch.float32),
            text_lengths=t(arrays.text_lengths, torch.long),
            audio_lengths=t(arrays.audio_lengths, torch.long),
            vision_lengths=t(arrays.vision_lengths, torch.long),
            labels=t(arrays.labels, torch.float32),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(
            text=self.text[index],
            text_bert=None if self.text_bert is None else self.text_bert[index],
            audio=self.audio[index],
            vision=self.vision[index],
            text_lengths=self.text_lengths[index],
            audio_lengths=self.audio_lengths[index],
            vision_lengths=self.vision_lengths[index],
            labels=self.labels[index],
            index=index,
        )


def iterate_batches(
    split: TensorSplit,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    trim: bool = False,
    group_by_length: bool = False,
) -> Iterator[Batch]:
    """Yield batches by slicing the pre-stacked tensors with a (shuffled) index.

    trim: each batch cut to its longest row (:func:`trim_batch`). group_by_length (with
    shuffle): rows of similar length share batches (:func:`length_grouped_order`)."""
    n = len(split)
    if shuffle and group_by_length:
        order = length_grouped_order(row_lengths(split), batch_size, generator)
    else:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        batch = split.batch(order[start : start + batch_size])
        yield trim_batch(batch) if trim else batch


#: batches per mega-batch of :func:`length_grouped_order` (Hugging Face's LengthGroupedSampler)
GROUP_CHUNK_BATCHES = 50


def row_lengths(split: TensorSplit) -> torch.Tensor:
    """(N,) long: what :func:`length_grouped_order` sorts by, each row's text steps
    (:func:`text_extent`: tokens, or text feature steps). Text sets the cost of the transformer
    backbones, and audio/vision frames grow with the words (aligned data: one per token)."""
    return text_extent(split.text_lengths, split.text_bert)


def length_grouped_order(lengths: torch.Tensor, batch_size: int,
                         generator: torch.Generator | None = None,
                         chunk_batches: int = GROUP_CHUNK_BATCHES) -> torch.Tensor:
    """A permutation of ``range(N)`` whose consecutive ``batch_size`` slices hold rows of similar
    length, still random (Hugging Face's ``group_by_length``, ``get_length_grouped_indices``):

    1. shuffle the rows (``randperm``);
    2. cut the shuffle into mega-batches of ``chunk_batches * batch_size`` rows and sort each by
       length, longest first (a stable sort: ties keep the shuffle's order);
    3. cut every mega-batch into batches and shuffle the batches (all of them, across
       mega-batches), so the epoch does not run from long to short; the last, possibly short
       batch of the epoch stays last, as with random batches (``drop_last`` drops the same
       number of rows).

    Every row appears exactly once. All draws come from ``generator``, so a seeded run repeats its
    order, and a resumed run (the generator's state is checkpointed) continues it.
    """
    n = int(lengths.shape[0])
    shuffled = torch.randperm(n, generator=generator)  # (N,)
    mega = max(1, int(chunk_batches) * int(batch_size))
    parts = []
    for start in range(0, n, mega):
        chunk = shuffled[start : start + mega]
        order = torch.sort(lengths[chunk], descending=True, stable=True).indices
        parts.append(chunk[order])
    grouped = torch.cat(parts) if parts else shuffled  # (N,)
    batches = list(grouped.split(int(batch_size)))
    full = len(batches) - (1 if n % batch_size else 0)  # the ragged last batch stays last
    perm = torch.randperm(full, generator=generator).tolist()
    return torch.cat([batches[i] for i in perm] + batches[full:]) if batches else grouped


def text_extent(text_lengths: torch.Tensor, text_bert: torch.Tensor | None) -> torch.Tensor:
    """(B,) long: the text steps a row needs, its length or, with token ids, one past its last
    attended position (larger than the length when the ids are left-padded, as XLNet's are)."""
    extent = text_lengths.long()
    if text_bert is not None:
        mask = text_bert[:, 1] > 0  # (B, L)
        steps = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (L,)
        extent = torch.maximum(extent, torch.where(mask, steps, 0).amax(dim=1))
    return extent


def trim_batch(batch: Batch) -> Batch:
    """``batch`` cut to the steps its rows use: the text (features, token ids, mask, segments) to
    the longest row's text, audio and vision to their longest rows' frames. Exact for a backbone
    whose outputs do not depend on the padded width (``Backbone.trim_padding``): it reads every
    sequence by its lengths or the attention mask, and those steps are all kept.

    When text, audio and vision share one padded length (word-aligned data, one frame per token)
    they are cut to one common width, the longest of the three, so that they stay aligned step by
    step. Returns ``batch`` itself when nothing can be cut."""
    text_len, audio_len, vision_len = (batch.text.shape[1], batch.audio.shape[1],
                                       batch.vision.shape[1])
    if len(batch) == 0:
        return batch
    widths = [
        int(text_extent(batch.text_lengths, batch.text_bert).max()),
        int(batch.audio_lengths.max()),
        int(batch.vision_lengths.max()),
    ]
    full = [text_len, audio_len, vision_len]
    widths = [min(max(w, 1), f) for w, f in zip(widths, full)]
    if text_len == audio_len == vision_len:
        widths = [max(widths)] * 3
    if widths == full:
        return batch
    t, a, v = widths
    return dataclasses.replace(
        batch,
        text=batch.text[:, :t].contiguous(),
        text_bert=None if batch.text_bert is None else batch.text_bert[:, :, :t].contiguous(),
        audio=batch.audio[:, :a].contiguous(),
        vision=batch.vision[:, :v].contiguous(),
    )


#: the Batch fields that carry each modality (permuted together by :func:`shuffle_modalities`)
MODALITY_FIELDS = {
    "text": ("text", "text_bert", "text_lengths"),
    "audio": ("audio", "audio_lengths"),
    "vision": ("vision", "vision_lengths"),
}


def modality_permutations(n: int, block_size: int | None = None,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """σ_l, σ_a, σ_v of MDM's Algorithm 1 for ``n`` rows: one independent permutation per modality
    (``"text"``, ``"audio"``, ``"vision"``, drawn in that order), each (n,) int64 on the CPU; with
    ``block_size`` each permutes within consecutive blocks of that many rows. Drawn with
    ``generator`` (default: torch's global generator)."""
    block = n if not block_size else int(block_size)
    return {m: torch.cat([torch.randperm(min(block, n - start), generator=generator) + start
                          for start in range(0, n, block)]) if n else torch.zeros(0, dtype=torch.long)
            for m in MODALITY_FIELDS}


def shuffle_modalities(batch: Batch, block_size: int | None = None,
                       generator: torch.Generator | None = None,
                       perms: dict[str, torch.Tensor] | None = None) -> Batch:
    """B̄ of MDM's Algorithm 1: each modality's *inputs* permuted independently over the batch.

    Row ``j`` of the result holds text row σ_l(j), audio row σ_a(j) and vision row σ_v(j) of
    ``batch`` (three independent permutations, each modality's lengths and token ids moving with
    its features), so the rows are samples of the product of the marginals Π_m p(X_m). With
    ``block_size`` the permutations stay within consecutive blocks of that many rows (the
    batches that :class:`~trainables.regularisers.base.Encoder` ``.sample`` concatenates), so each
    block is the shuffle of its own batch. Labels, ``index`` and ``labeled`` are the joint rows'
    (a product sample has no label of its own; nothing reads them). Permutations are drawn on the
    CPU from ``generator`` (default: torch's global generator) by :func:`modality_permutations`
    and applied on the batch's device; ``perms`` gives them instead (modality -> (n,) rows).
    """
    if perms is None:
        perms = modality_permutations(len(batch), block_size, generator)
    fields: dict[str, torch.Tensor | None] = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for modality, names in MODALITY_FIELDS.items():
        perm = perms[modality]
        for name in names:
            x = fields[name]
            if x is not None:
                fields[name] = x[perm.to(x.device)]
    return Batch(**fields)


def split_batch(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive row slices of ``batch`` of at most ``size`` rows (views, no copy)."""
    for start in range(0, len(batch), size):
        yield Batch(**{f.name: (None if getattr(batch, f.name) is None
                                else getattr(batch, f.name)[start:start + size])
                       for f in dataclasses.fields(batch)})


def concat_batches(batches: list[Batch]) -> Batch:
    """The rows of several batches (same padded shapes) as one batch."""
    out: dict[str, torch.Tensor | None] = {}
    for f in dataclasses.fields(Batch):
        parts = [getattr(b, f.name) for b in batches]
        if any(p is None for p in parts):
            if f.name == "labeled" and not all(p is None for p in parts):
                parts = [torch.ones(len(b), dtype=torch.bool, device=b.labels.device) if p is None else p
                         for p, b in zip(parts, batches)]
            else:
                out[f.name] = None
                continue
        out[f.name] = torch.cat(parts)
    return Batch(**out)


def resample_to_length(
    x: torch.Tensor,
    lengths: torch.Tensor,
    out_len: int,
    target_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average the valid frames of each sequence into equal segments, one per output step.

    Used to align unaligned audio/vision to the text's steps for early-fusion models: for row
    ``i`` with ``T_i = target_lengths[i]`` output steps (default ``out_len``), step ``j < T_i`` is
    the mean of input frames ``[floor(j*len_i/T_i), floor((j+1)*len_i/T_i))`` (at least one
    frame), the way MMSA's word-aligned features average the frames of each word. Frames beyond
    ``lengths`` never contribute; steps ``j >= T_i`` are zero (padding).

    x: (B, T, d); lengths: (B,) with 1 <= lengths <= T; target_lengths: (B,) in [1, out_len].
    Returns (B, out_len, d).
    """
    b, t, d = x.shape
    lengths = lengths.to(x.device).clamp(min=1, max=t)
    if target_lengths is None:
        targets = torch.full_like(lengths, out_len)
    else:
        targets = target_lengths.to(x.device).clamp(min=1, max=out_len)
    csum = torch.cat([x.new_zeros(b, 1, d), x.cumsum(dim=1)], dim=1)  # (B, T+1, d)
    steps = torch.arange(out_len + 1, device=x.device)  # (out_len+1,)
    bounds = (steps[None, :] * lengths[:, None]) // targets[:, None]  # (B, out_len+1)
    starts, ends = bounds[:, :-1].clamp(max=t - 1), bounds[:, 1:].clamp(max=t)
    ends = torch.maximum(ends, starts + 1)
    starts_e = starts.unsqueeze(-1).expand(-1, -1, d)  # (B, out_len, d)
    ends_e = ends.unsqueeze(-1).expand(-1, -1, d)
    total = csum.gather(1, ends_e) - csum.gather(1, starts_e)  # (B, out_len, d)
    mean = total / (ends - starts).unsqueeze(-1).to(x.dtype)
    valid = steps[None, :-1] < targets[:, None]  # (B, out_len)
    # where, not a product: non-finite padding must not turn the zero steps into NaN
    return torch.where(valid.unsqueeze(-1), mean, mean.new_zeros(()))


#: the modalities :func:`drop_modality` can remove (alone or as a ``+``-joined set)
DROPPABLE = ("text", "audio", "vision")
#: the sets the report removes from the test split, in its row order: each modality alone, and the
#: papers' text-with-one-other sets. MDM (Colombo et al., 2021, Sec. 5.3) always drops text and
#: keeps A (``text+vision``), V (``text+audio``) or A+V (``text``); Synergy (Shankar, 2021,
#: Sec. 5.5, Table 4) drops T, T+V and T+A.
DROP_SETS = ("text", "audio", "vision", "text+audio", "text+vision")
#: [PAD], [CLS], [SEP] of the uncased BERT vocabulary (MMSA's ``text_bert``): kept by a text drop
BERT_UNCASED_KEEP_IDS = (0, 101, 102)
#: [MASK] of the uncased BERT vocabulary: what every word id becomes in a text drop
BERT_UNCASED_MASK_ID = 103


def drop_set(dropped: str) -> tuple[str, ...]:
    """The modalities a drop-set name removes, in :data:`DROPPABLE` order:
    ``"text+audio"`` -> ``("text", "audio")``; ``"audio"`` -> ``("audio",)``."""
    parts = dropped.split("+") if isinstance(dropped, str) else []
    if not parts or any(p not in DROPPABLE for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"modality: expected one of {', '.join(DROPPABLE)} or a '+'-joined set "
                         f"of them (e.g. text+audio), got {dropped!r}")
    return tuple(m for m in DROPPABLE if m in parts)


def drop_modality(arrays: SplitArrays, dropped: str, *, mask_id: int = BERT_UNCASED_MASK_ID,
                  keep_ids: tuple[int, ...] = BERT_UNCASED_KEEP_IDS) -> SplitArrays:
    """A copy of ``arrays`` with a modality, or a ``+``-joined set of them (``"text+audio"``),
    removed, for the robustness evaluation.

    What "removed" means, per input (lengths are kept, so sequence models still run over the
    same number of steps, only of zeros):

    - ``audio`` / ``vision``: every feature value is 0.
    - ``text``: the text features (``text``, GloVe/BERT vectors) are 0; in the token input
      ``text_bert`` every attended id that is not in ``keep_ids`` ([CLS], [SEP], [PAD]) becomes
      ``mask_id`` ([MASK]), the attention mask and segment ids are kept, so a transformer reads
      ``[CLS] [MASK] ... [MASK] [SEP]``: as many token steps as the sentence had, none with a
      word. The steps are kept because MAG and MIRD feed audio and vision to the transformer *on
      the token steps*: removing the steps would remove A and V too, and MDM's protocol
      (text dropped, A, V or A+V kept) could not be measured. ``raw_text`` becomes ``""``.

    ``text_bert`` must already be in the model's vocabulary: a backbone that re-tokenises
    ``raw_text`` (:meth:`~trainables.backbones.base.Backbone.prepare_split`) is given the prepared
    split and its own ``mask_id`` / ``keep_ids``
    (:meth:`~trainables.backbones.base.Backbone.drop_inputs`). The input arrays are not modified;
    a modality not in ``dropped`` is the same array object.
    """
    removed = drop_set(dropped)
    changes: dict = {m: np.zeros_like(getattr(arrays, m)) for m in removed if m != "text"}
    if "text" in removed:
        tokens = arrays.text_bert
        if tokens is not None:
            ids, mask = tokens[:, 0], tokens[:, 1]  # (N, L) each
            words = (mask > 0) & ~np.isin(ids, np.asarray(keep_ids, dtype=ids.dtype))  # (N, L)
            tokens = tokens.copy()
            tokens[:, 0] = np.where(words, np.asarray(mask_id, dtype=ids.dtype), ids)
        changes.update(
            text=np.zeros_like(arrays.text),
            text_bert=tokens,
            raw_text=np.full(arrays.raw_text.shape, "", dtype=arrays.raw_text.dtype),
        )
    return dataclasses.replace(arrays, **changes)
