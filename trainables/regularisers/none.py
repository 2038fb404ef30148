"""No regulariser: the un-regularised baseline is a trial like any other (penalty 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainables.backbones.base import BackboneOutput
from trainables.data.batches import Batch
from trainables.regularisers.base import Regulariser

__all__ = ["NoRegulariser", "NoneConfig"]


@dataclass
class NoneConfig:
    """No hyper-parameters."""


class NoRegulariser(Regulariser):
    name = "none"
    config_class = NoneConfig
    #: no term reads unlabeled rows (the task loss leaves them out), so the split rate s changes
    #: nothing it computes: a space does not repeat the baseline for every s
    trial_keys = ()

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:
        return out.prediction.new_zeros(())
