"""The BERT encoder on the real tokens only (issue 26, "remove padding") computes what the padded
forward of transformers does: hidden states, predictions, features, losses and gradients equal
within float rounding, for the encoder alone (sdpa and eager attention, an injection before a
layer), through MAG-BERT's gate (after the embeddings and before layer 1), MMIM's and MIRD's text
encoders, and MDM's critic passes. Ragged rows include a full-length row and a one-token row.

Eval mode, and train mode with every dropout at p = 0 (under dropout the two paths draw their
masks over different layouts, so seeded draws differ; the distribution is the same).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.test_backbones import TINY_BACKBONE, UNALIGNED, make_batch, make_dims
from trainables.backbones import get_backbone
from trainables.backbones._unpad import encode_unpadded, supports_unpad
from trainables.config import ConfigError, TrialConfig, build_dataclass
from trainables.data.batches import modality_permutations
from trainables.loop import Trainer
from trainables.text import load_text_model

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _tokens(lengths: list[int], length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths)
    mask = (torch.arange(length)[None, :] < n[:, None]).long()  # (B, L)
    ids = torch.randint(1000, 5000, (len(lengths), length), generator=g) * mask
    ids[:, 0] = 101
    segments = (torch.arange(length)[None, :] >= 3).long() * mask  # two segments where long enough
    return ids, mask, segments


@pytest.mark.parametrize("attention,rows_per_group", [("sdpa", 2), ("eager", 2), ("sdpa", 1), ("sdpa", 8)])
def test_encoder_on_real_tokens_is_the_padded_forward(attention, rows_per_group):
    """Hidden states (eval) and every weight's gradient (train, dropout 0) of the tiny BERT equal
    its padded forward's at the real positions; padded positions are zero; a per-token function
    before layer 1 (as MAG's gate at ``injection_layer: 1``) sees the same inputs. The attention
    in groups of 1, 2 or all rows (each group padded to its own longest row)."""
    torch.manual_seed(0)
    model = load_text_model("tiny-bert")
    model.set_attn_implementation(attention)
    assert supports_unpad(model)
    ids, mask, segments = _tokens([12, 1, 5, 12, 8, 2, 7], 12)
    real = mask.bool()
    shift = torch.randn(32)

    def inject(e: torch.Tensor) -> torch.Tensor:
        return torch.tanh(e + shift)  # (B, L, H)

    def padded() -> torch.Tensor:
        handle = model.encoder.layer[1].register_forward_pre_hook(
            lambda module, args, kwargs: ((inject(args[0]), *args[1:]), kwargs), with_kwargs=True)
        try:
            return model(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
        finally:
            handle.remove()

    def unpadded() -> torch.Tensor:
        return encode_unpadded(model, ids, mask, segments, before_layer=(1, inject),
                               rows_per_group=rows_per_group)

    with torch.no_grad():
        a, b = padded(), unpadded()
    torch.testing.assert_close(b[real], a[real], **TOL)
    assert torch.equal(b[~real], torch.zeros_like(b[~real]))
    assert not torch.allclose(a[~real], torch.zeros_like(a[~real]))  # padding is computed there

    model.train()
    _no_dropout(model)
    weight = torch.randn(12, 32)
    grads = []
    for run in (padded, unpadded):
        model.zero_grad()
        out = run()
        loss = (out * weight).masked_fill(~real.unsqueeze(-1), 0).pow(2).sum()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 30
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], **TOL, msg=key)


CASES = {
    "mag_bert": {},
    "mag_bert-layer1": {"injection_layer": 1},
    "mmim": {},
    "mird": {},
    "mird-sparsemax-pool": {"pool": "sparsemax"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_backbone_unpadded_is_padded(case):
    """Predictions, every feature (eval) and the loss's gradients (train, dropout 0) of each
    backbone with ``unpad: true`` equal those with ``unpad: false``."""
    name = case.split("-")[0]
    cls = get_backbone(name)
    torch.manual_seed(0)
    dims = make_dims(**UNALIGNED)
    model = cls(build_dataclass(cls.config_class, {**TINY_BACKBONE[name], **CASES[case]}), dims)
    assert model.unpad
    batch = make_batch(dims, b=20, seed=1)  # row 0 full, row 1 one token; 3 attention groups
    assert int(batch.text_bert[:, 1].sum(1).min()) == 1
    assert int(batch.text_bert[:, 1].sum(1).max()) == dims.text_len

    def run(unpad: bool, grad: bool):
        model.unpad = unpad
        model.zero_grad()
        out = model(batch)
        if not grad:
            return out, None
        loss = F.l1_loss(out.prediction, batch.labels) + sum(
            f.pow(2).mean() for f in out.features.values() if f.requires_grad)
        loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    model.eval()
    with torch.no_grad():
        (plain, _), (fast, _) = run(False, False), run(True, False)
    torch.testing.assert_close(fast.prediction, plain.prediction, **TOL)
    assert fast.features.keys() == plain.features.keys()
    for key in plain.features:
        torch.testing.assert_close(fast.features[key], plain.features[key], **TOL, msg=key)

    model.train()
    _no_dropout(model)
    (_, g_plain), (_, g_fast) = run(False, True), run(True, True)
    assert g_plain.keys() == g_fast.keys()
    assert any(k.startswith("text_encoder.encoder.layer.0.") for k in g_plain)
    for key in g_plain:
        torch.testing.assert_close(g_fast[key], g_plain[key], **TOL, msg=key)


@pytest.mark.parametrize("backbone", ["mag_bert", "mmim"])
def test_mdm_critic_passes_unpadded(small_data, backbone):
    """MDM's no-grad critic blocks (inference mode; MMIM through encode/fuse) give the same Z and
    Z̄ with the encoder on the real tokens."""
    flat = {"backbone": backbone, "regulariser": "mdm", "max_epochs": 1, "batch_size": 16,
            "seed": 0, "patience": 0, "regulariser.unroll": 2,
            **{f"backbone.{k}": v for k, v in TINY_BACKBONE[backbone].items()}}
    trainer = Trainer(TrialConfig.from_flat(flat), small_data, device="cpu", num_threads=1)
    model = trainer.model.train()
    _no_dropout(model)
    fresh = trainer.encoder.sample(2)
    lengths = fresh.text_bert[:, 1].sum(1)
    assert lengths.min() < lengths.max() == fresh.text_bert.shape[2]  # ragged, trimmed
    perms = modality_permutations(len(fresh), block_size=16)
    start = copy.deepcopy(model.state_dict())
    results = []
    for unpad in (False, True):
        model.load_state_dict(start)
        model.unpad = unpad
        results.append(trainer.encoder.pairs_no_grad(fresh, perms))
    (z, z_bar), (z_fast, z_bar_fast) = results
    torch.testing.assert_close(z_fast.features["fused"], z.features["fused"], **TOL)
    torch.testing.assert_close(z_bar_fast.features["fused"], z_bar.features["fused"], **TOL)


def test_unpad_is_a_checked_backbone_key():
    """On by default where the encoder supports it; mag_xlnet refuses it (no unpadded XLNet)."""
    base = {"regulariser": "none"}
    for name in ("mag_bert", "mmim", "mird"):
        assert TrialConfig.from_flat({**base, "backbone": name}).backbone_cfg.unpad is True
        off = TrialConfig.from_flat({**base, "backbone": name, "backbone.unpad": False})
        assert off.backbone_cfg.unpad is False
    assert TrialConfig.from_flat({**base, "backbone": "mag_xlnet"}).backbone_cfg.unpad is False
    with pytest.raises(ConfigError, match="unpad"):
        TrialConfig.from_flat({**base, "backbone": "mag_xlnet", "backbone.unpad": True})
    with pytest.raises(ConfigError, match="unpad"):
        TrialConfig.from_flat({**base, "backbone": "mmim", "backbone.unpad": "yes"})
    assert not supports_unpad(load_text_model("tiny-xlnet"))
