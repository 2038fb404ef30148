"""Model-specific tests of LMF and MFN (the registry-wide contract is in test_backbones.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_backbones import ALIGNED, UNALIGNED, make_batch, make_dims
from trainables.backbones import get_backbone
from trainables.backbones.lmf import LMF, LMFConfig
from trainables.backbones.mfn import MFN, MFNConfig
from trainables.data.batches import Batch

TINY_LMF = dict(text_hidden=8, text_out=4, audio_hidden=3, vision_hidden=5)
TINY_MFN = dict(text_hidden=6, audio_hidden=4, vision_hidden=5, mem_dim=7, attention_hidden=8,
                proposal_hidden=6, gamma1_hidden=9, gamma2_hidden=5, out_hidden=8)


def test_lfn_is_an_alias_of_lmf():
    assert get_backbone("lfn") is LMF


# ---------------------------------------------------------------------------------------- LMF


def _random_factors(model: LMF, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.audio_factor, model.vision_factor, model.text_factor, model.fusion_weights,
                  model.fusion_bias):
            p.copy_(torch.randn(p.shape, generator=g))


def test_lmf_rank_one_is_the_explicit_product_of_modality_projections():
    model = LMF(LMFConfig(**TINY_LMF, rank=1, output_dim=2), make_dims())
    _random_factors(model)
    g = torch.Generator().manual_seed(1)
    z_a, z_v, z_t = (torch.randn(3, n, generator=g) for n in (3, 5, 4))
    h = model.low_rank_fusion(z_a, z_v, z_t)
    assert h.shape == (3, 2)
    model.requires_grad_(False)
    lam, bias = model.fusion_weights[0, 0].item(), model.fusion_bias[0]
    for i in range(3):
        for o in range(2):
            # h_o = λ ([z_a;1]·w_a[:, o]) ([z_v;1]·w_v[:, o]) ([z_t;1]·w_t[:, o]) + b_o, in scalars
            pa = sum(float(x) * float(w) for x, w in zip([*z_a[i], 1.0], model.audio_factor[0, :, o]))
            pv = sum(float(x) * float(w) for x, w in zip([*z_v[i], 1.0], model.vision_factor[0, :, o]))
            pt = sum(float(x) * float(w) for x, w in zip([*z_t[i], 1.0], model.text_factor[0, :, o]))
            expected = lam * pa * pv * pt + bias[o].item()
            assert h[i, o].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_lmf_equals_tensor_fusion_with_the_reconstructed_low_rank_weight():
    """The factorised computation equals projecting the full TFN tensor Z with
    W = Σ_r λ_r w_a^(r) ⊗ w_v^(r) ⊗ w_t^(r)."""
    model = LMF(LMFConfig(**TINY_LMF, rank=3, output_dim=2), make_dims())
    _random_factors(model, seed=2)
    g = torch.Generator().manual_seed(3)
    z_a, z_v, z_t = (torch.randn(4, n, generator=g) for n in (3, 5, 4))
    one = torch.ones(4, 1)
    za1, zv1, zt1 = (torch.cat([z, one], dim=1) for z in (z_a, z_v, z_t))
    tensor = torch.einsum("ba,bv,bt->bavt", za1, zv1, zt1)  # TFN's Z, (B, A+1, V+1, T+1)
    weight = torch.einsum(
        "r,rao,rvo,rto->avto", model.fusion_weights[0], model.audio_factor, model.vision_factor,
        model.text_factor,
    )  # (A+1, V+1, T+1, d_h)
    expected = torch.einsum("bavt,avto->bo", tensor, weight) + model.fusion_bias
    torch.testing.assert_close(model.low_rank_fusion(z_a, z_v, z_t), expected, rtol=1e-4, atol=1e-5)


def test_lmf_default_output_is_the_fusion_and_all_parameters_train():
    dims = make_dims()
    torch.manual_seed(0)
    model = LMF(LMFConfig(), dims)
    batch = make_batch(dims)
    out = model(batch)
    assert out.features["fused"].shape == (8, 1)
    torch.testing.assert_close(out.prediction, out.features["fused"][:, 0])
    F.l1_loss(out.prediction, batch.labels).backward()
    # MMSA's trainer leaves the rank weights and the bias out of its optimiser; ours trains them
    assert model.fusion_weights.grad is not None and model.fusion_weights.grad.abs().sum() > 0
    assert model.fusion_bias.grad is not None and model.fusion_bias.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- MFN


def reference_mfn(model: MFN, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor):
    """MFN stepped one time step at a time with ``LSTMCell``s, in the authors' (and MMSA's) order,
    on inputs whose every step is valid; reads ``model``'s weights. Eval mode only (no dropout)."""
    cells = {}
    for m, x in (("text", text), ("audio", audio), ("vision", vision)):
        cells[m] = nn.LSTMCell(x.shape[2], model.hidden[m])  # PyTorch's own cell step
        cells[m].load_state_dict(model.lstm[m].state_dict())
    b, steps = text.shape[:2]
    h = {m: torch.zeros(b, model.hidden[m]) for m in cells}
    c = {m: torch.zeros(b, model.hidden[m]) for m in cells}
    mem = torch.zeros(b, model.config.mem_dim)
    xs = {"text": text, "audio": audio, "vision": vision}
    for t in range(steps):
        prev_cs = torch.cat([c[m] for m in cells], dim=1)
        for m in cells:
            h[m], c[m] = cells[m](xs[m][:, t], (h[m], c[m]))
        c_star = torch.cat([prev_cs, torch.cat([c[m] for m in cells], dim=1)], dim=1)
        attended = torch.softmax(model.attention(c_star), dim=1) * c_star
        c_hat = torch.tanh(model.proposal(attended))
        both = torch.cat([attended, mem], dim=1)
        gamma1 = torch.sigmoid(model.gamma1_out(torch.relu(model.gamma1_in(both))))
        gamma2 = torch.sigmoid(model.gamma2_out(torch.relu(model.gamma2_in(both))))
        mem = gamma1 * mem + gamma2 * c_hat
    fused = torch.cat([h["text"], h["audio"], h["vision"], mem], dim=1)
    # "fused" is the input of D_out's final linear layer (MDM's Z_avl)
    return model.out(fused).squeeze(-1), {**h, "fused": torch.relu(model.out[0](fused))}


def _mfn(dims, seed: int = 0) -> MFN:
    torch.manual_seed(seed)
    return MFN(MFNConfig(**TINY_MFN), dims).eval()


def _row(batch: Batch, i: int, aligned: bool) -> Batch:
    """Row i alone with all of its padding cut off (aligned: every view cut to the text length)."""
    n = {m: int(getattr(batch, f"{m}_lengths")[i]) for m in ("text", "audio", "vision")}
    cut = {m: (n["text"] if aligned else n[m]) for m in n}
    return Batch(
        text=batch.text[i : i + 1, : cut["text"]], text_bert=None,
        audio=batch.audio[i : i + 1, : cut["audio"]], vision=batch.vision[i : i + 1, : cut["vision"]],
        text_lengths=batch.text_lengths[i : i + 1], audio_lengths=batch.audio_lengths[i : i + 1],
        vision_lengths=batch.vision_lengths[i : i + 1], labels=batch.labels[i : i + 1],
        index=batch.index[i : i + 1],
    )


@torch.no_grad()
def test_mfn_equals_the_step_by_step_reference_on_full_rows():
    dims = make_dims(**ALIGNED)
    model = _mfn(dims)
    batch = make_batch(dims)
    full = torch.full_like(batch.text_lengths, dims.text_len)
    batch.text_lengths = batch.audio_lengths = batch.vision_lengths = full
    out = model(batch)
    pred, feats = reference_mfn(model, batch.text, batch.audio, batch.vision)
    torch.testing.assert_close(out.prediction, pred, rtol=1e-5, atol=1e-5)
    for name in ("text", "audio", "vision", "fused"):
        torch.testing.assert_close(out.features[name], feats[name], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mfn_ragged_rows_equal_the_reference_on_each_row_cut_to_its_length():
    """Freezing the state past a row's last word equals stopping there."""
    dims = make_dims(**ALIGNED)
    model = _mfn(dims, seed=1)
    batch = make_batch(dims, seed=3)
    batch.audio_lengths = batch.vision_lengths = batch.text_lengths.clone()
    out = model(batch)
    for i in range(len(batch)):
        n = int(batch.text_lengths[i])
        pred, feats = reference_mfn(model, batch.text[i : i + 1, :n], batch.audio[i : i + 1, :n],
                                    batch.vision[i : i + 1, :n])
        torch.testing.assert_close(out.prediction[i : i + 1], pred, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.features["fused"][i : i + 1], feats["fused"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["unaligned", "aligned"])
@torch.no_grad()
def test_mfn_padding_invariance(layout):
    """A row's outputs do not depend on its padding (values or amount) nor on the other rows."""
    aligned = layout == "aligned"
    dims = make_dims(**(ALIGNED if aligned else UNALIGNED))
    model = _mfn(dims, seed=2)
    batch = make_batch(dims, seed=4)
    out = model(batch)
    # (a) each row alone with no padding at all
    for i in range(len(batch)):
        alone = model(_row(batch, i, aligned))
        torch.testing.assert_close(alone.prediction, out.prediction[i : i + 1], rtol=1e-5, atol=1e-6)
        for name, value in out.features.items():
            torch.testing.assert_close(alone.features[name], value[i : i + 1], rtol=1e-5, atol=1e-6)
    # (b) more padding steps, filled with huge and non-finite values
    longer = copy.copy(batch)
    for m in ("text", "audio", "vision"):
        x = getattr(batch, m)
        extra = torch.full((x.shape[0], 5, x.shape[2]), float("nan"))
        extra[:, ::2] = 1e6
        setattr(longer, m, torch.cat([x, extra], dim=1))
    bigger = dict(ALIGNED if aligned else UNALIGNED)
    for m in ("text", "audio", "vision"):
        bigger[f"{m}_len"] += 5
    model.dims = make_dims(**bigger)
    out_longer = model(longer)
    torch.testing.assert_close(out_longer.prediction, out.prediction, rtol=1e-5, atol=1e-6)
    for name in out.features:
        torch.testing.assert_close(out_longer.features[name], out.features[name], rtol=1e-5, atol=1e-6)


def test_mfn_padding_cannot_reach_gradients():
    dims = make_dims(**UNALIGNED)
    model = _mfn(dims).train()
    batch = make_batch(dims)
    for m in ("text", "audio", "vision"):
        x = getattr(batch, m).clone()
        pad = torch.arange(x.shape[1])[None, :] >= getattr(batch, f"{m}_lengths")[:, None]
        x[pad] = float("inf")
        setattr(batch, m, x)
    F.l1_loss(model(batch).prediction, batch.labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -------------------------------------------------------------------------------- both learn


def _synthetic(n: int = 64, seed: int = 0) -> tuple[Batch, object]:
    """Label = a function of the audio and vision means only (text is noise)."""
    dims = make_dims(text=8, audio=4, vision=6, text_len=8, audio_len=12, vision_len=10)
    batch = make_batch(dims, b=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    offset_a, offset_v = torch.randn(n, 4, generator=g), torch.randn(n, 6, generator=g)
    batch.audio = offset_a[:, None, :] + 0.3 * batch.audio
    batch.vision = offset_v[:, None, :] + 0.3 * batch.vision
    batch.labels = (1.5 * torch.tanh(offset_a[:, 0]) - offset_v[:, 1]).clamp(-3, 3)
    return batch, dims


@pytest.mark.parametrize(
    "name,config", [("lmf", TINY_LMF), ("mfn", TINY_MFN)], ids=["lmf", "mfn"]
)
def test_learns_a_function_of_the_audio_and_vision_means(name, config):
    batch, dims = _synthetic()
    torch.manual_seed(0)
    cls = get_backbone(name)
    model = cls(cls.config_class(**config), dims)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.l1_loss(model(batch).prediction, batch.labels).item()

    before = loss()
    model.train()
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        F.l1_loss(model(batch).prediction, batch.labels).backward()
        opt.step()
    after = loss()
    # well below the start and below the best constant prediction: it reads the audio/vision means
    constant = F.l1_loss(batch.labels.median().expand_as(batch.labels), batch.labels).item()
    assert after < 0.6 * before and after < 0.6 * constant, (before, constant, after)
