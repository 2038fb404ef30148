"""The backbone contract: ``forward(batch) -> BackboneOutput(prediction, features)``.

Every regulariser reads only ``BackboneOutput.features`` (and the batch), so any backbone pairs
with any regulariser. ``features`` holds at least ``"text"``, ``"audio"``, ``"vision"`` (the
unimodal representations the model fuses, each (B, d_m)) and ``"fused"`` (B, d_f); a backbone
may add more (MIRD's shared/private representations, reconstructions).

A backbone that encodes each modality on its own before fusing (TFN, LMF, MMIM) may also offer
the split ``fuse(encode(batch)) == forward(batch)`` (``modality_separable = True``); the loop uses
it where a method needs the same rows with their modalities permuted (MDM's B̄): B̄'s unimodal
encodings are then B's rows permuted, and only the fusion runs twice. Such a backbone may further
split ``encode`` into ``encode_stem(stem(batch))`` (``has_stem = True``): ``stem`` is each
encoder up to its first random draw, so B̄'s stem is B's rows permuted even under dropout, and
B̄'s dropout masks are drawn afresh by ``encode_stem`` (MDM's model step with gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from trainables.data.batches import Batch, ModalityDims, SplitArrays, drop_modality

__all__ = ["MODALITIES", "Backbone", "BackboneOutput", "InputMismatchError"]

MODALITIES = ("text", "audio", "vision")


@dataclass
class BackboneOutput:
    """What a backbone returns (a typed output rather than a tuple)."""

    prediction: torch.Tensor  # (B,) sentiment score
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, d)

    def detached(self) -> "BackboneOutput":
        """The same output cut from the graph, for estimator steps."""
        return BackboneOutput(
            prediction=self.prediction.detach(),
            features={k: v.detach() for k, v in self.features.items()},
        )


class InputMismatchError(ValueError):
    """The data lacks what a backbone needs (e.g. token ids for a transformer backbone)."""


class Backbone(nn.Module):
    """Base class of fusion backbones.

    Subclasses set ``name`` (the registry key) and ``config_class`` (a dataclass of their
    hyper-parameters with the paper's defaults), build their layers in ``__init__(config, dims)``
    from the widths in ``dims`` (read from the data, never hard-coded), and set
    ``self.feature_dims`` to the width of every entry of ``BackboneOutput.features``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    #: "features" reads ``batch.text`` (GloVe/BERT features); "tokens" reads ``batch.text_bert``
    text_input: ClassVar[str] = "features"
    #: the outputs do not depend on the padded width: every sequence is read by its lengths or
    #: attention mask, so the loop cuts each batch to its longest row
    #: (:func:`~trainables.data.batches.trim_batch`; tests/test_loop.py checks every backbone).
    #: A backbone that reads steps past the lengths (a fixed-width layer) sets False.
    trim_padding: ClassVar[bool] = True
    #: ``encode``/``fuse`` split (see :meth:`encode`); False: only ``forward``
    modality_separable: ClassVar[bool] = False
    #: ``encode`` = ``encode_stem(stem(batch))`` with a draw-free ``stem`` (see :meth:`stem`)
    has_stem: ClassVar[bool] = False
    #: the stem holds the costly part of every encoder (TFN, LMF: the text LSTM), so MDM's no-grad
    #: critic pairs share only the stem and draw B̄'s dropout masks afresh (exact in distribution);
    #: False (MMIM: its text encoder is outside the stem) shares the whole unimodal encodings
    critic_pairs_from_stem: ClassVar[bool] = False

    def __init__(self, config: Any, dims: ModalityDims) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        self.feature_dims: dict[str, int] = {}

    @classmethod
    def check_inputs(cls, dims: ModalityDims) -> None:
        """Raise :class:`InputMismatchError` before training if the data cannot feed this model."""
        if cls.text_input == "tokens" and not dims.has_tokens:
            raise InputMismatchError(
                f"backbone {cls.name!r} reads BERT token ids but the data has no 'text_bert' key; "
                "use an MMSA file with text_bert or a feature-based backbone (ef_lstm, tfn, lmf, mfn)"
            )

    @classmethod
    def fused_problem(cls, config: Any) -> str | None:
        """Why this config's ``features["fused"]`` cannot serve a regulariser that reads the fused
        representation (one line naming the key to change), or None. Checked with the trial
        config (``TrialConfig.from_flat``) whenever the regulariser reads it
        (``Regulariser.reads_fused``), so such a pair is refused before any trial."""
        return None

    def prepare_split(self, arrays: SplitArrays) -> SplitArrays:
        """The split as this backbone reads it (once per split, before batching); default: as is.
        MAG re-tokenises ``raw_text`` when its encoder's vocabulary is not uncased BERT's."""
        return arrays

    def drop_inputs(self, arrays: SplitArrays, dropped: str) -> SplitArrays:
        """A split already prepared by :meth:`prepare_split` with the modalities of ``dropped``
        (``"text"``, ``"text+audio"``, ...) removed, for the robustness evaluation (see
        :func:`~trainables.data.batches.drop_modality`); default: a text drop turns every word id
        into the uncased BERT [MASK]. A backbone with its own vocabulary passes its own ids."""
        return drop_modality(arrays, dropped)

    def forward(self, batch: Batch) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The unimodal encodings, modality -> (B, ...) tensor, for a backbone with
        ``modality_separable``. Contract (``tests/test_speed.py`` checks every such backbone):
        ``encode(batch)[m]`` reads only modality ``m``'s inputs, row by row (BatchNorm's batch
        statistics aside, which a permutation of the rows leaves unchanged), so that the batch
        with its modalities permuted by σ_m encodes to ``encode(batch)[m][σ_m]``; and
        ``fuse(encode(batch))`` is ``forward(batch)``; ``fuse`` is row-wise (no batch statistics),
        so fusing the rows of two encodings at once is fusing each."""
        raise NotImplementedError(f"backbone {self.name!r} has no encode/fuse split")

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> BackboneOutput:
        """Everything after :meth:`encode`: the fusion and the head, on the unimodal encodings."""
        raise NotImplementedError(f"backbone {self.name!r} has no encode/fuse split")

    def stem(self, batch: Batch) -> dict[str, Any]:
        """Each modality's encoder up to its first random draw (dropout), modality -> a (B, ...)
        tensor or a tuple of them, for a backbone with ``has_stem``. Contract (``tests/test_speed.py``):
        ``encode_stem(stem(batch))`` is ``encode(batch)``, drawing its dropout masks in the same
        order; ``stem`` draws nothing and ``stem(batch)[m]`` reads only modality ``m``'s inputs,
        row by row (BatchNorm's batch statistics aside), so that the batch with its modalities
        permuted by σ_m has the stem ``stem(batch)[m][σ_m]``."""
        raise NotImplementedError(f"backbone {self.name!r} has no stem split")

    def encode_stem(self, stem: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The rest of :meth:`encode` on :meth:`stem`'s output (its dropout draws included)."""
        raise NotImplementedError(f"backbone {self.name!r} has no stem split")

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups. Pretrained text encoders get their own ``text_lr`` group;
        the default is one group for everything."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay, "name": "model"}]
