"""tuner.report: the modality drop (unit), then a tiny search followed by a 3-seed report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainables.backbones import get_backbone
from trainables.config import TrialConfig
from trainables.data import DROPPABLE, TensorSplit, drop_modality, iterate_batches


class _Linear(nn.Module):
    """A constructed model: a linear map of the mean of the modalities it is told to read."""

    def __init__(self, dims, reads: tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reads = reads
        self.heads = nn.ModuleDict({m: nn.Linear(d, 1) for m, d in dims.items()})

    def forward(self, batch) -> torch.Tensor:
        total = torch.zeros(len(batch))
        for m in self.reads:
            total = total + self.heads[m](getattr(batch, m).mean(dim=1)).squeeze(-1)
        return total


def _predict(model, arrays) -> np.ndarray:
    split = TensorSplit.from_arrays(arrays)
    with torch.no_grad():
        return torch.cat([model(b) for b in iterate_batches(split, 16, shuffle=False)]).numpy()


@pytest.mark.parametrize("modality", DROPPABLE)
def test_drop_removes_exactly_that_modality(small_data, modality):
    test = small_data.splits["test"]
    dims = {"text": test.text.shape[2], "audio": test.audio.shape[2],
            "vision": test.vision.shape[2]}
    others = tuple(m for m in DROPPABLE if m != modality)
    ignores = _Linear(dims, reads=others)
    uses = _Linear(dims, reads=DROPPABLE)
    dropped = drop_modality(test, modality)

    # a model that ignores the modality is unaffected; one that reads it changes
    np.testing.assert_array_equal(_predict(ignores, test), _predict(ignores, dropped))
    assert np.abs(_predict(uses, test) - _predict(uses, dropped)).max() > 1e-4
    # the input is not modified, and the other modalities are the same arrays
    assert np.abs(getattr(test, modality)).sum() > 0
    assert not np.any(getattr(dropped, modality))
    for m in others:
        assert getattr(dropped, m) is getattr(test, m)
    np.testing.assert_array_equal(dropped.labels, test.labels)


def test_text_drop_masks_tokens_except_cls_and_sep(small_data):
    test = small_data.splits["test"]
    dropped = drop_modality(test, "text")
    ids, mask, segments = dropped.text_bert[:, 0], dropped.text_bert[:, 1], dropped.text_bert[:, 2]
    lengths = test.text_bert[:, 1].sum(axis=1)
    rows = np.arange(len(test))
    assert np.all(mask.sum(axis=1) == 2) and not np.any(segments)
    assert np.all(ids[:, 0] == 101)  # [CLS]
    assert np.all(ids[rows, lengths - 1] == 102)  # [SEP], the last attended token
    assert np.all(ids.astype(bool).sum(axis=1) == 2)  # every word id is [PAD] (0)
    assert set(dropped.raw_text) == {""}
    assert test.text_bert[:, 1].sum() > 2 * len(test)  # the input still has its words


def test_drop_changes_a_real_backbone_only_through_that_modality(small_data):
    """EF-LSTM reads every modality: each drop changes its predictions."""
    cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "backbone.hidden": 8})
    torch.manual_seed(0)
    model = get_backbone("ef_lstm")(cfg.backbone_cfg, small_data.dims).eval()
    test = small_data.splits["test"]
    full = _predict(lambda b: model(b).prediction, test)
    for modality in DROPPABLE:
        dropped = _predict(lambda b: model(b).prediction, drop_modality(test, modality))
        assert np.abs(full - dropped).max() > 1e-5, modality


def test_drop_rejects_an_unknown_modality(small_data):
    with pytest.raises(ValueError, match="modality: expected one of text, audio, vision"):
        drop_modality(small_data.splits["test"], "video")
