"""The regulariser contract: an ``nn.Module`` with its own networks and its own optimiser.

Call order, per training batch (``trainables.loop`` does this and nothing else):

1. ``out = backbone(batch)`` — one forward pass, with gradients.
2. ``reg.estimator_update(out, batch, encoder)`` — the regulariser updates its own estimator
   networks (MDM critic unroll, CLUB / BA likelihood, C-network) with its own optimiser
   (``reg.optimizer``). The default runs ``inner_steps`` times
   ``reg.estimator_step(out.detached(), batch)`` on *detached* features, so these steps never
   touch the backbone. A method whose estimator trains on other batches than the model step's
   (MDM's Algorithm 1: fresh batches and modality-shuffled inputs) overrides it and uses
   ``encoder`` (:class:`Encoder`) to draw and encode them. Returns floats to log.
3. ``pen = reg.step_penalty(out, batch, encoder)`` — a scalar with gradients into the backbone,
   already weighted (λ/α/β) and signed as in the paper: maximised bounds enter negated. The
   default is ``reg.penalty(out, batch)``; MDM also encodes the shuffled batch B̄ through
   ``encoder.shuffled`` (with gradients).
4. ``loss = reg.combine(task_loss, pen)`` — ``task_loss + pen`` unless a paper combines them
   differently (MIRD: logs of the terms).
5. One optimiser step of the backbone and of ``reg.main_parameters()`` on ``loss``.

After the epoch's last batch the loop calls ``reg.epoch_end()`` and logs its floats as
``train_<key>`` (default: none).

With ``estimator_pass == "epoch"`` (MMIM, Han et al. 2021, Algorithm 1) step 2 moves out of the
batch loop: at the start of each epoch the loop runs a pass of its own over every train minibatch
(its own shuffle; backbone in train mode, no gradients) calling ``estimator_step`` ``inner_steps``
times per batch; the model pass that follows runs steps 1 and 3-5 only.

Estimator parameters are everything not in ``main_parameters()``; the main optimiser never
sees them. Buffers (memories, moving covariances) live in ``state_dict`` so that they survive a
checkpoint round-trip; ``reg.optimizer``'s state is saved by the loop next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from trainables.backbones.base import BackboneOutput
from trainables.data.batches import Batch, shuffle_modalities

__all__ = ["REGULARISER_TRIAL_KEYS", "Encoder", "Regulariser", "float_detached"]

#: trial-config keys (``TrialConfig`` fields) whose effect depends on the regulariser: the split
#: rate s of MIRD (Qian et al., Algorithm 1, Fig. 6) and where its unlabeled rows come from. The
#: unlabeled rows carry no label, so only a regulariser's own terms read them; a search space
#: grids or samples such a key only for the regularisers that list it in ``trial_keys``
#: (``tuner.spaces.SearchSpace.applies``), so a baseline without such terms is not repeated
#: for every split rate.
REGULARISER_TRIAL_KEYS: tuple[str, ...] = ("unlabeled_rate", "unlabeled_source")


def float_detached(out: BackboneOutput) -> BackboneOutput:
    """``out`` cut from the graph, in float32: what estimator networks train on (they run in
    float32 even when the model step is autocast)."""
    return BackboneOutput(out.prediction.detach().float(),
                          {k: v.detach().float() for k, v in out.features.items()})


@dataclass
class Encoder:
    """The backbone as a regulariser may run it inside one training step (built by the loop).

    - ``forward(batch)``: the backbone on ``batch`` (moved to the device) with gradients, under
      the loop's mixed precision, in the model's current (training) mode.
    - ``forward_no_grad(batch)``: the same without gradients; features come back float32.
    - ``sample(k)``: ``k`` fresh training batches of the trial's batch size drawn at random
      (rows distinct within a batch, batches independent), concatenated into one :class:`Batch`
      of ``k`` blocks, so that one forward pass encodes them all.
    - ``batch_size``: the rows of one block of ``sample``.
    - ``pairs_no_grad(batch, perms)``: ``(out, out_bar)`` without gradients (float32): the
      backbone on ``batch`` and on ``shuffle_modalities(batch, perms=perms)``, block by block of
      ``batch_size`` rows in the order B_1, B̄_1, B_2, B̄_2, ... (``perms`` permute within the
      blocks), as that many sequential steps would (BatchNorm sees one block at a time). A
      backbone with an encode/fuse split encodes each block's modalities once and fuses them
      twice (B̄'s unimodal encodings are B's rows permuted; with ``critic_pairs_from_stem``
      only the stem is shared and B̄ draws its own dropout masks). None: the regulariser
      encodes B̄ itself through ``forward_no_grad``.
    - ``forward_shuffled(batch, perms=None)``: with gradients, the backbone on
      ``shuffle_modalities(batch, perms=perms)`` (perms drawn as ``shuffle_modalities`` draws
      them when None): the model step's B̄. For the batch the loop's step just encoded (its
      step 1) and a backbone with a draw-free stem (``Backbone.has_stem``: TFN, LMF, MMIM), B̄'s
      stem is B's rows permuted, so only the rest of the encoders (fresh dropout draws) and the
      fusion run; the random draws, their order, and BatchNorm's running statistics are those
      of the plain pass (``Trainer._encode_shuffled``). None: ``forward(shuffle_modalities(...))``.
    """

    forward: Callable[[Batch], BackboneOutput]
    forward_no_grad: Callable[[Batch], BackboneOutput]
    sample: Callable[[int], Batch]
    batch_size: int
    pairs_no_grad: Callable[[Batch, dict[str, torch.Tensor]], tuple[BackboneOutput, BackboneOutput]] | None = None
    forward_shuffled: Callable[..., BackboneOutput] | None = None

    def shuffled(self, batch: Batch, perms: dict[str, torch.Tensor] | None = None) -> BackboneOutput:
        """B̄ = ``shuffle_modalities(batch, perms=perms)`` encoded with gradients (see
        ``forward_shuffled``)."""
        if self.forward_shuffled is not None:
            return self.forward_shuffled(batch, perms)
        return self.forward(shuffle_modalities(batch, perms=perms))


class Regulariser(nn.Module):
    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    #: the keys of :data:`REGULARISER_TRIAL_KEYS` this regulariser reads. Default: all of them
    #: (the unlabeled rows reach ``estimator_update`` / ``step_penalty`` in the batch, marked by
    #: ``batch.labeled``); a regulariser without terms on unlabeled rows lists none.
    trial_keys: ClassVar[tuple[str, ...]] = REGULARISER_TRIAL_KEYS

    @classmethod
    def reads_fused(cls, config: Any) -> bool:
        """Whether a term of this config reads the backbone's fused representation
        ``features["fused"]`` (MDM's T_θ, Synergy's κ and L_d): then a backbone whose fused vector
        is its prediction (``Backbone.fused_problem``) is refused before any trial."""
        return False

    def __init__(self, config: Any, feature_dims: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.feature_dims = dict(feature_dims)
        #: the estimator optimiser, built by :meth:`build_optimizer` once the networks exist
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def inner_steps(self) -> int:
        """How many ``estimator_step`` calls precede each model step."""
        return 0

    @property
    def encodes_shuffled_batch(self) -> bool:
        """Whether the model step encodes its own batch again with the modalities shuffled
        (``encoder.shuffled``, MDM's B̄): the loop then keeps what that needs from step 1."""
        return False

    @property
    def estimator_pass(self) -> str:
        """Where the ``estimator_step`` calls go: ``"batch"``, ``inner_steps`` before each model
        step (default); ``"epoch"``, a separate estimator-only pass over all train minibatches
        before the epoch's model pass (no inner steps in the model pass)."""
        return "batch"

    def main_parameters(self) -> list[nn.Parameter]:
        """Regulariser parameters trained by the *model* optimiser on the total loss."""
        return []

    def estimator_parameters(self) -> list[nn.Parameter]:
        main = {id(p) for p in self.main_parameters()}
        return [p for p in self.parameters() if id(p) not in main and p.requires_grad]

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """AdamW over the estimator parameters (None when there are none)."""
        params = self.estimator_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=lr) if params else None
        return self.optimizer

    def estimator_step(self, out: BackboneOutput, batch: Batch) -> dict[str, float]:
        """One inner update of the estimator networks on detached features."""
        return {}

    def estimator_update(self, out: BackboneOutput, batch: Batch, encoder: Encoder) -> dict[str, float]:
        """Everything the estimator networks learn before one model step; returns the last
        update's floats to log. Default: ``inner_steps`` × :meth:`estimator_step` on this
        batch's detached features (nothing with ``estimator_pass == "epoch"``: the loop's epoch pass
        calls ``estimator_step`` instead)."""
        stats: dict[str, float] = {}
        if self.inner_steps and self.estimator_pass == "batch":
            det = float_detached(out)
            for _ in range(self.inner_steps):
                stats = self.estimator_step(det, batch)
        return stats

    def step_penalty(self, out: BackboneOutput, batch: Batch, encoder: Encoder) -> torch.Tensor:
        """The penalty of one model step (called under the loop's autocast). Default:
        :meth:`penalty`; a method that needs more forward passes (MDM's B̄) overrides it."""
        return self.penalty(out, batch)

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def combine(self, task_loss: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        return task_loss + penalty

    def epoch_end(self) -> dict[str, float]:
        """Called by the loop after each training epoch; floats to log as ``train_<key>`` (MDM:
        ``critic_collapsed``, whether its critic's output was constant over the epoch)."""
        return {}
