"""MMIM (Han, Chen, Poria, EMNLP 2021): the shared estimators measure what they claim, the
regulariser keeps q (its own optimiser) and the CPC maps (the model's) apart, its memory is a
checkpointed FIFO, and the backbone trains end to end with a text encoder in its own lr group."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainables.backbones import get_backbone
from trainables.backbones.base import BackboneOutput
from trainables.backbones.mmim import MMIM, MMIMConfig
from trainables.config import ConfigError, TrialConfig, build_dataclass
from trainables.data.batches import Batch, ModalityDims
from trainables.loop import Trainer
from trainables.regularisers import get_regulariser
from trainables.regularisers._estimators import (
    BarberAgakov,
    InfoNCE,
    class_mixture_entropy,
    gaussian_entropy,
    gaussian_log_prob,
)
from trainables.regularisers.mmim import MMIMRegulariser, MMIMRegulariserConfig

DIMS = {"text": 12, "audio": 6, "vision": 5, "fused": 10}


def correlated(n: int, d: int, rho: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y ~ N(0, I_d) with corr(x_k, y_k) = ρ: I(X; Y) = −d/2 · log(1 − ρ²)."""
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1.0 - rho**2) * torch.randn(n, d, generator=g)


def fit(estimator: nn.Module, sample, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(estimator.parameters(), lr=lr)
    for _ in range(steps):
        x, y = sample()
        opt.zero_grad()
        estimator.learning_loss(x, y).backward()
        opt.step()


# ---------------------------------------------------------------------------------- estimators


def test_gaussian_log_prob_is_the_normalised_density():
    """The −½ log σ² term is there (the official MMILB drops it)."""
    g = torch.Generator().manual_seed(0)
    y, mu, logvar = (torch.randn(7, 3, generator=g) for _ in range(3))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(y).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(y, mu, logvar), ref)


def test_ba_bound_on_correlated_gaussians_is_below_the_true_mi_and_grows_with_rho():
    d = 2
    h_true = 0.5 * d * math.log(2 * math.pi * math.e)  # H(Y), Y ~ N(0, I_d)
    bounds = []
    for rho in (0.3, 0.6, 0.9):
        torch.manual_seed(0)
        ba = BarberAgakov(d, d, hidden=16)
        g = torch.Generator().manual_seed(1)
        fit(ba, lambda: correlated(256, d, rho, g), steps=200, lr=1e-2)
        x, y = correlated(20000, d, rho, torch.Generator().manual_seed(2))
        with torch.no_grad():
            bound = ba(x, y, entropy=torch.tensor(h_true)).item()
            fitted = ba(x, y).item()  # H(Y) from a Gaussian fitted to the sample
        true_mi = -d / 2 * math.log(1 - rho**2)
        assert bound < true_mi + 0.03, (rho, bound, true_mi)
        assert bound > true_mi - 0.15, (rho, bound, true_mi)
        assert fitted == pytest.approx(bound, abs=0.05)
        bounds.append(bound)
    assert bounds[0] < bounds[1] < bounds[2], bounds


def test_infonce_is_at_most_log_n_and_near_it_for_strongly_dependent_pairs():
    n, d = 64, 32
    # never above log n, trained or not, whatever the dependency
    g = torch.Generator().manual_seed(0)
    for tau in (1.0, 0.1):
        est = InfoNCE(d, d, temperature=tau)
        for rho in (0.0, 0.9, 1.0):
            x, y = correlated(n, d, rho, g)
            assert est(x, y).item() <= math.log(n) + 1e-6

    torch.manual_seed(0)
    dependent, independent = InfoNCE(d, d, temperature=0.1), InfoNCE(d, d, temperature=0.1)
    g = torch.Generator().manual_seed(1)
    fit(dependent, lambda: correlated(n, d, 0.99, g), steps=200, lr=1e-2)
    fit(independent, lambda: correlated(n, d, 0.0, g), steps=200, lr=1e-2)
    with torch.no_grad():
        high = dependent(*correlated(n, d, 0.99, torch.Generator().manual_seed(2))).item()
        low = independent(*correlated(n, d, 0.0, torch.Generator().manual_seed(2))).item()
    assert math.log(n) - 0.3 < high <= math.log(n), high
    assert low < 0.5, low


def test_infonce_predictor_depth_and_zero_rows():
    est = InfoNCE(10, 4, layers=3)
    assert [m.out_features for m in est.predictor if isinstance(m, nn.Linear)] == [4, 4, 4]
    assert sum(isinstance(m, nn.Tanh) for m in est.predictor) == 2
    x, y = torch.randn(5, 10), torch.randn(5, 4)
    y[0] = 0.0  # an all-zero feature row: finite, not NaN
    assert torch.isfinite(est(x, y))


def test_gaussian_entropy_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 1.0, 2.0])
    y = torch.randn(50000, 3, generator=g) * scale
    exact = 0.5 * 3 * math.log(2 * math.pi * math.e) + torch.log(scale).sum().item()
    assert gaussian_entropy(y, eps=0.0).item() == pytest.approx(exact, abs=0.02)


def test_class_mixture_entropy_is_finite_with_diagonal_loading():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(9, 4, generator=g, requires_grad=True)
    cases = {
        "class of one sample": torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1]),
        "one class only": torch.zeros(9, dtype=torch.long),
        "fewer rows than dimensions": torch.tensor([0, 0, 1, 1, 1, -1, -1, -1, -1]),
        "no grouped rows": torch.full((9,), -1),
    }
    for name, groups in cases.items():
        h = class_mixture_entropy(y, groups, 2, eps=1e-3)
        (grad,) = torch.autograd.grad(h, y)
        assert torch.isfinite(h) and torch.isfinite(grad).all(), name
    one = class_mixture_entropy(y[:1], torch.tensor([1]), 2, eps=1e-3)  # a batch of one
    assert one.item() == pytest.approx(0.5 * 4 * math.log(2 * math.pi * math.e * 1e-3), rel=1e-5)
    # weights are the class proportions; a single class is its own Gaussian entropy
    torch.testing.assert_close(
        class_mixture_entropy(y, cases["one class only"], 2), gaussian_entropy(y)
    )


def test_mixture_weights_equal_as_eq_8_or_proportional():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(12, 3, generator=g)
    groups = torch.tensor([0] * 8 + [1] * 4)
    h_pos, h_neg = gaussian_entropy(y[:8]), gaussian_entropy(y[8:])
    equal = class_mixture_entropy(y, groups, 2, weights="equal")
    torch.testing.assert_close(equal, 0.5 * (h_pos + h_neg))  # Eq. 7 with w_c = ½ (Eq. 8)
    torch.testing.assert_close(class_mixture_entropy(y, groups, 2, weights="proportional"),
                               (8 * h_pos + 4 * h_neg) / 12)
    # one empty component: the other has all the weight either way
    one = torch.zeros(12, dtype=torch.long)
    torch.testing.assert_close(class_mixture_entropy(y, one, 2, weights="equal"), gaussian_entropy(y))
    assert MMIMRegulariserConfig().mixture_weights == "equal"


def test_cpc_negatives_are_the_other_rows_targets_as_eq_11():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 10, generator=g), torch.randn(8, 4, generator=g)
    torch.manual_seed(0)
    targets = InfoNCE(10, 4, negatives="targets")
    predictions = copy.deepcopy(targets)
    predictions.negatives = "predictions"
    s = targets.scores(x, y)  # s_ij = cos(y_i, g(x_j))
    # Eq. 11: for G(Z_i), the softmax runs over the batch's h_m^j
    torch.testing.assert_close(targets(x, y), math.log(8) + (s.diagonal() - torch.logsumexp(s, 0)).mean())
    torch.testing.assert_close(predictions(x, y),
                               math.log(8) + (s.diagonal() - torch.logsumexp(s, 1)).mean())
    assert targets(x, y).item() != pytest.approx(predictions(x, y).item())
    assert all(m.negatives == "targets" for m in make_reg().cpc.values())
    assert all(m.negatives == "predictions" for m in make_reg(cpc_negatives="predictions").cpc.values())


# ---------------------------------------------------------------------------------- regulariser


def make_reg(seed: int = 0, dims=DIMS, **cfg) -> MMIMRegulariser:
    torch.manual_seed(seed)
    reg = MMIMRegulariser(build_dataclass(MMIMRegulariserConfig, cfg), dims)
    reg.build_optimizer(reg.config.estimator_lr)
    return reg


def features(b: int = 16, seed: int = 0, requires_grad: bool = False, labels=None):
    """Unimodal views of a shared factor, as a backbone would give them, and a batch of labels."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, 3, generator=g)
    w = torch.Generator().manual_seed(99)
    feats = {}
    for name, width in DIMS.items():
        proj = torch.randn(3, width, generator=w)
        feats[name] = (s @ proj + 0.5 * torch.randn(b, width, generator=g)).requires_grad_(requires_grad)
    if labels is None:
        labels = torch.where(s[:, 0] > 0, 1.5, -1.5)
        labels[::5] = 0.0  # neutral rows: in no mixture component
    out = BackboneOutput(prediction=torch.zeros(b), features=feats)
    return out, SimpleNamespace(labels=labels, labeled=None)


def test_config_and_registry():
    assert get_regulariser("mmim") is MMIMRegulariser
    cfg = build_dataclass(MMIMRegulariserConfig, {"lr_lld": 5e-3, "memory_size": 3})
    assert cfg.estimator_lr == 5e-3
    defaults = MMIMRegulariserConfig()
    assert (defaults.alpha, defaults.beta, defaults.lr_lld, defaults.memory_size) == (0.1, 0.1, 1e-3, 1)
    assert make_reg().inner_steps == 1 and make_reg(inner_steps=3).inner_steps == 3
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(MMIMRegulariserConfig, {"gamma": 0.1})
    with pytest.raises(ConfigError, match="diag_load"):
        build_dataclass(MMIMRegulariserConfig, {"diag_load": 0.0})
    with pytest.raises(ConfigError, match="memory_size"):
        build_dataclass(MMIMRegulariserConfig, {"memory_size": -1})
    with pytest.raises(ValueError, match="fused"):
        MMIMRegulariser(MMIMRegulariserConfig(), {"text": 4, "audio": 4, "vision": 4})


def test_parameters_split_cpc_maps_to_the_model_and_q_to_the_estimator_optimiser():
    reg = make_reg()
    main = {id(p) for p in reg.main_parameters()}
    est = {id(p) for p in reg.estimator_parameters()}
    assert main == {id(p) for p in reg.cpc.parameters()} and main
    assert est == {id(p) for p in reg.ba.parameters()} and est
    assert {id(p) for p in reg.optimizer.param_groups[0]["params"]} == est
    assert reg.optimizer.param_groups[0]["lr"] == reg.config.lr_lld
    # q's optimiser: the official optimizer_mmilb, Adam with weight decay 1e-4 (src/solver.py)
    assert type(reg.optimizer) is torch.optim.Adam
    assert reg.optimizer.param_groups[0]["weight_decay"] == 1e-4
    earlier = make_reg(lld_optimizer="adamw", lld_weight_decay=0.01)
    assert type(earlier.optimizer) is torch.optim.AdamW
    assert earlier.optimizer.param_groups[0]["weight_decay"] == 0.01
    # q predicts audio and vision from text (the official mi_ta / mi_tv)
    assert reg.ba["audio"].q.mu[0].in_features == DIMS["text"]
    assert reg.ba["vision"].q.mu[-1].out_features == DIMS["vision"]


def test_estimator_step_changes_only_the_q_networks():
    backbone = nn.ModuleDict({m: nn.Linear(4, w) for m, w in DIMS.items()})
    x = torch.randn(16, 4)
    feats = {m: layer(x) for m, layer in backbone.items()}
    out = BackboneOutput(prediction=feats["fused"].sum(-1), features=feats)
    _, batch = features()
    reg = make_reg()
    before = copy.deepcopy(reg.state_dict())
    backbone_before = copy.deepcopy(backbone.state_dict())

    logged = reg.estimator_step(out, batch)  # not detached by the caller: must not matter
    logged.update(reg.estimator_step(out.detached(), batch))

    assert set(logged) == {"mmim_lld"} and math.isfinite(logged["mmim_lld"])
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, backbone_before[k]) for k, v in backbone.state_dict().items())
    after = reg.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("ba.") for k in changed), changed
    assert {k for k in before if k.startswith("ba.")} == changed  # every q weight moved
    assert all(p.grad is None for p in reg.cpc.parameters())
    assert len(reg.memory) == 0


def test_estimator_step_raises_the_likelihood():
    reg = make_reg(lr_lld=5e-3)
    out, batch = features(b=64)
    first = reg.estimator_step(out, batch)["mmim_lld"]
    for _ in range(100):
        last = reg.estimator_step(out, batch)["mmim_lld"]
    assert last > first + 1.0, (first, last)


def test_penalty_is_minus_alpha_cpc_minus_beta_ba_and_trains_the_cpc_maps_only():
    reg = make_reg(alpha=0.3, beta=0.05)
    reg.eval()
    out, batch = features(requires_grad=True)
    est = reg.bounds(out, batch)
    pen = reg.penalty(out, batch)
    assert pen.item() == pytest.approx(-0.3 * est["cpc"].item() - 0.05 * est["ba"].item(), rel=1e-6)
    parts = [est[f"cpc_{m}"].item() for m in ("text", "audio", "vision")]
    assert est["cpc"].item() == pytest.approx(sum(parts))
    for m in ("text", "audio", "vision"):
        assert est[f"cpc_{m}"].item() <= math.log(16) + 1e-6
    pen.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.cpc.parameters())
    assert all(p.grad is None for p in reg.ba.parameters()), "the penalty trained q"
    for name, f in out.features.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, name


def test_penalty_gradient_raises_the_bounds():
    reg = make_reg(alpha=1.0, beta=1.0)
    train_out, train_batch = features(b=32, seed=1)
    for _ in range(50):
        reg.estimator_step(train_out, train_batch)  # a q that fits these features
    reg.train()
    reg.penalty(train_out, train_batch)  # one batch in the memory
    reg.eval()  # no memory push below: both evaluations see the same memory

    out, batch = features(b=32, requires_grad=True)
    pen = reg.penalty(out, batch)
    pen.backward()
    norm = torch.sqrt(sum((f.grad**2).sum() for f in out.features.values()))
    stepped = BackboneOutput(
        out.prediction, {k: (v - 0.05 * v.grad / norm).detach() for k, v in out.features.items()}
    )
    with torch.no_grad():
        before, after = reg.bounds(out, batch), reg.bounds(stepped, batch)
    total = lambda e: (e["cpc"] + e["ba"]).item()  # noqa: E731
    assert total(after) > total(before), (before, after)
    assert after["ba"].item() > before["ba"].item()
    assert after["cpc"].item() > before["cpc"].item()


@pytest.mark.parametrize("case", ["batch of one", "one class", "all neutral"])
def test_degenerate_batches_give_finite_penalties_and_gradients(case):
    reg = make_reg(memory_size=2)
    b = 1 if case == "batch of one" else 8
    labels = {"batch of one": torch.tensor([2.0]), "one class": torch.full((8,), -1.0),
              "all neutral": torch.zeros(8)}[case]
    reg.train()
    for seed in range(3):  # an empty memory, then a filling one, then a full one
        out, batch = features(b=b, seed=seed, requires_grad=True, labels=labels)
        reg.estimator_step(out, batch)
        pen = reg.penalty(out, batch)
        pen.backward()
        assert torch.isfinite(pen), (case, seed)
        assert all(torch.isfinite(f.grad).all() for f in out.features.values()), (case, seed)
    assert len(reg.memory) == 2


@pytest.mark.parametrize("neutral", ["positive", "excluded"])
def test_memory_is_a_fifo_of_exactly_memory_size_batches(neutral):
    """Neutral rows (label 0) join the non-negative component (Sec. 3.4), or none (official)."""
    reg = make_reg(memory_size=2, neutral=neutral)
    reg.train()
    pushed = []
    for seed in range(4):
        out, batch = features(b=10, seed=seed)
        reg.penalty(out, batch)
        keep = batch.labels != 0 if neutral == "excluded" else torch.ones(10, dtype=torch.bool)
        assert (batch.labels == 0).any()
        f = out.features
        pushed.append((f["audio"][keep], f["vision"][keep], batch.labels[keep]))
        assert len(reg.memory) == min(seed + 1, 2)
    last_two = pushed[-2:]
    assert reg.memory.slot_sizes.tolist() == [len(a) for a, _, _ in last_two]
    torch.testing.assert_close(reg.memory.rows("audio"), torch.cat([a for a, _, _ in last_two]))
    torch.testing.assert_close(reg.memory.rows("vision"), torch.cat([v for _, v, _ in last_two]))
    labels = torch.cat([s for _, _, s in last_two])
    assert torch.equal(reg.memory.groups, torch.where(labels >= 0, 0, 1))
    # evaluation never writes the memory; memory_size 0 stores nothing
    reg.eval()
    reg.penalty(*features(b=10, seed=9))
    assert reg.memory.slot_sizes.tolist() == [len(a) for a, _, _ in last_two]
    none = make_reg(memory_size=0)
    none.penalty(*features())
    assert len(none.memory) == 0 and none.memory.rows("audio").shape == (0, DIMS["audio"])


def test_memory_changes_the_entropy_but_carries_no_gradient():
    reg = make_reg(memory_size=1)
    out, batch = features(b=16, requires_grad=True)
    empty = reg.bounds(out, batch)["entropy_audio"].item()
    reg.train()
    reg.penalty(*features(b=16, seed=5))
    assert not reg.memory.rows("audio").requires_grad
    assert reg.bounds(out, batch)["entropy_audio"].item() != empty


def test_state_dict_round_trip_keeps_memory_and_gives_an_identical_penalty():
    reg = make_reg(memory_size=3)
    reg.train()
    for seed in range(2):  # a memory that is not full yet: 2 of 3 batches
        out, batch = features(seed=seed)
        reg.estimator_step(out, batch)
        reg.penalty(out, batch)
    buffer, opt_buffer = io.BytesIO(), io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    torch.save(reg.optimizer.state_dict(), opt_buffer)
    buffer.seek(0)
    opt_buffer.seek(0)

    clone = make_reg(seed=42, memory_size=3)  # other weights, an empty memory
    clone.load_state_dict(torch.load(buffer))
    clone.optimizer.load_state_dict(torch.load(opt_buffer))
    assert len(clone.memory) == 2
    for name in ("audio", "vision"):
        assert torch.equal(clone.memory.rows(name), reg.memory.rows(name))
    for r in (reg, clone):
        r.eval()
    out, batch = features(seed=7)
    assert clone.penalty(out, batch).item() == reg.penalty(out, batch).item()

    # training goes on identically: one more estimator step and memory push on each
    for r in (reg, clone):
        r.train()
        r.estimator_step(out, batch)
        r.penalty(out, batch)
        r.eval()
    assert len(clone.memory) == len(reg.memory) == 3
    assert clone.penalty(out, batch).item() == reg.penalty(out, batch).item()
    # a checkpoint of another memory size does not load silently
    with pytest.raises(RuntimeError, match="slot_sizes"):
        make_reg(memory_size=1).load_state_dict(reg.state_dict())


def test_regulariser_sits_on_feature_based_backbones_of_other_widths():
    reg = make_reg(dims={"text": 6, "audio": 5, "vision": 128, "fused": 12})
    g = torch.Generator().manual_seed(0)
    out = BackboneOutput(torch.zeros(8), {k: torch.randn(8, w, generator=g) for k, w in
                                          {"text": 6, "audio": 5, "vision": 128, "fused": 12}.items()})
    _, batch = features(b=8)
    assert torch.isfinite(reg.penalty(out, batch))  # 128-d vision from 8 rows: loaded covariance


# ---------------------------------------------------------------------------------- backbone


def token_batch(b: int = 6, seed: int = 0) -> Batch:
    """Unaligned random inputs with ragged lengths and BERT ids (rows padded past their length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 1, 4, 7, 10, 2])[:b]
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.randint(1, 100, (b, 10), generator=g) * mask
    return Batch(
        text=torch.randn(b, 10, 16, generator=g), text_bert=torch.stack([ids, mask, 0 * mask], dim=1),
        audio=torch.randn(b, 20, 5, generator=g), vision=torch.randn(b, 15, 7, generator=g),
        text_lengths=lengths, audio_lengths=torch.tensor([20, 3, 1, 20, 9, 11])[:b],
        vision_lengths=torch.tensor([15, 15, 2, 1, 8, 4])[:b],
        labels=torch.empty(b).uniform_(-3, 3, generator=g), index=torch.arange(b),
    )


TOKEN_DIMS = ModalityDims(text=16, audio=5, vision=7, text_len=10, audio_len=20, vision_len=15,
                          aligned=False, has_tokens=True)


def tiny_mmim(**cfg) -> MMIM:
    torch.manual_seed(0)
    return MMIM(build_dataclass(MMIMConfig, {"text_model": "tiny-bert", **cfg}), TOKEN_DIMS)


def test_backbone_defaults_and_registry():
    assert get_backbone("mmim") is MMIM and MMIM.text_input == "tokens"
    c = MMIMConfig()
    assert (c.text_model, c.d_ah, c.d_vh, c.d_prjh) == ("minilm", 16, 16, 128)
    with pytest.raises(ConfigError, match="dropout_prj"):
        build_dataclass(MMIMConfig, {"dropout_prj": 1.0})
    with pytest.raises(ConfigError, match="XLNet"):
        tiny_mmim(text_model="tiny-xlnet")


def test_text_encoder_has_its_own_lr_group():
    model = tiny_mmim()
    groups = model.param_groups(lr=1e-3, text_lr=5e-5, weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["text_encoder"]["lr"] == 5e-5 and by_name["model"]["lr"] == 1e-3
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert {id(p) for p in by_name["text_encoder"]["params"]} == text_ids
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter once


def test_features_are_cls_and_lstm_states_and_token_padding_is_ignored():
    model = tiny_mmim(d_aout=6, d_vout=5, d_prjh=10)
    assert model.feature_dims == {"text": 32, "audio": 6, "vision": 5, "fused": 10}
    model.eval()
    batch = token_batch()
    with torch.no_grad():
        ref = model(batch)
        ids, mask, seg = batch.text_bert.unbind(1)
        enc = model.text_encoder(input_ids=ids, attention_mask=mask, token_type_ids=seg)
        torch.testing.assert_close(ref.features["text"], enc.last_hidden_state[:, 0])
        noisy = dataclasses.replace(batch, text_bert=batch.text_bert.clone())
        noisy.text_bert[:, 0][mask == 0] = 999  # other token ids under the attention mask's zeros
        out = model(noisy)
    torch.testing.assert_close(out.prediction, ref.prediction, rtol=1e-5, atol=1e-6)


def test_bidirectional_lstms_read_each_rows_valid_steps_both_ways():
    """``bidirectional: true`` (MMSA's MOSI config): h = W [forward final; backward final], the
    backward state being the one at each row's first step after reading its valid steps only."""
    model = tiny_mmim(bidirectional=True, d_ah=4)
    enc = model.audio_encoder
    assert enc.linear.in_features == 8 and model.feature_dims["audio"] == 16
    model.eval()
    batch = token_batch()
    with torch.no_grad():
        got = enc.lstm(batch.audio, batch.audio_lengths)  # (B, 8)
        lstm = enc.lstm.lstm
        for i, n in enumerate(batch.audio_lengths.tolist()):
            x = batch.audio[i, :n]  # (n, d): the valid steps only
            fwd = nn.LSTM(5, 4, batch_first=True)
            fwd.load_state_dict({k.replace("_reverse", ""): v for k, v in lstm.state_dict().items()
                                 if k.endswith("_l0")})
            bwd = nn.LSTM(5, 4, batch_first=True)
            bwd.load_state_dict({k.replace("_reverse", ""): v for k, v in lstm.state_dict().items()
                                 if k.endswith("_reverse")})
            want_f = fwd(x[None])[1][0][0, 0]
            want_b = bwd(x.flip(0)[None])[1][0][0, 0]
            torch.testing.assert_close(got[i], torch.cat([want_f, want_b]))
    assert tiny_mmim().audio_encoder.linear.in_features == 16  # the paper's unidirectional default


def test_xavier_init_reinitialises_every_non_text_matrix_only():
    default, xavier = tiny_mmim(), tiny_mmim(init="xavier")
    text = dict(default.text_encoder.named_parameters())
    for name, p in xavier.text_encoder.named_parameters():
        torch.testing.assert_close(p, text[name], rtol=0, atol=0)  # pretrained weights untouched
    ref = dict(default.named_parameters())
    for name, p in xavier.named_parameters():
        if name.startswith("text_encoder."):
            continue
        if p.dim() > 1:
            assert not torch.equal(p, ref[name]), name
            fan_out, fan_in = p.shape[0], p[0].numel()
            want = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(float(p.detach().std()) / want - 1) < 0.35, (name, want)
        else:  # biases keep PyTorch's initialisation
            torch.testing.assert_close(p, ref[name], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="init"):
        build_dataclass(MMIMConfig, {"init": "kaiming"})


def test_mmim_trains_end_to_end_and_resumes_exactly(small_data, tmp_path):
    flat = {"backbone": "mmim", "regulariser": "mmim", "backbone.text_model": "tiny-bert",
            "backbone.d_prjh": 32, "regulariser.memory_size": 2, "max_epochs": 2, "batch_size": 16,
            "patience": 0, "seed": 3}
    full = Trainer(TrialConfig.from_flat(flat), small_data)
    history = full.fit()
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert "train_mmim_lld" in history[-1] and math.isfinite(history[-1]["valid_mae"])
    assert len(full.reg.memory) == 2
    names = {g.get("name") for g in full.optimizer.param_groups}
    assert {"text_encoder", "model", "regulariser"} <= names

    first = Trainer(TrialConfig.from_flat(flat), small_data)
    first.run_epoch()
    first.save(tmp_path)
    second = Trainer(TrialConfig.from_flat(flat), small_data)
    second.load(tmp_path)
    assert torch.equal(second.reg.memory.rows("audio"), first.reg.memory.rows("audio"))
    last = second.run_epoch()
    strip = lambda h: {k: v for k, v in h.items() if k != "epoch_seconds"}  # noqa: E731
    assert strip(last) == strip(history[-1])


# ---------------------------------------------------------------------------------- Algorithm 1


def record_updates(trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
    """Wrap q's and the model's optimiser steps; each call appends ("q" | "model", batch index).
    A q step also checks that no backbone weight has moved since the epoch began (stage 1 never
    updates anything but q)."""
    events: list[tuple[str, torch.Tensor]] = []
    state: dict[str, dict] = {}
    estimator_step, model_step = trainer.reg.estimator_step, trainer.optimizer.step

    def q_step(out, batch):
        if not events or events[-1][0] == "model":  # a new epoch's stage 1
            state["model"] = copy.deepcopy(trainer.model.state_dict())
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, state["model"][k]), f"stage 1 moved {k}"
        events.append(("q", batch.index.clone()))
        return estimator_step(out, batch)

    def step(*args, **kwargs):
        events.append(("model", None))
        return model_step(*args, **kwargs)

    trainer.reg.estimator_step = q_step
    trainer.optimizer.step = step
    return events


def mmim_trainer(small_data, **flat) -> Trainer:
    return Trainer(TrialConfig.from_flat({
        "backbone": "mmim", "regulariser": "mmim", "backbone.text_model": "tiny-bert",
        "backbone.d_prjh": 16, "max_epochs": 2, "batch_size": 16, "patience": 0, "seed": 3,
        **flat}), small_data)


def test_an_epoch_runs_stage_1_over_all_batches_before_stage_2(small_data):
    """Algorithm 1: per epoch, stage 1 updates q on every minibatch (backbone untouched), then
    stage 2 updates the model on every minibatch, with no q step in between."""
    trainer = mmim_trainer(small_data)  # the default schedule
    events = record_updates(trainer)
    n_train = len(trainer.splits["train"])
    n = math.ceil(n_train / 16)
    history = trainer.fit()
    kinds = [kind for kind, _ in events]
    assert kinds == (["q"] * n + ["model"] * n) * 2, kinds
    for epoch in range(2):  # each stage-1 pass sees every training row once
        rows = torch.cat([index for _, index in events[2 * n * epoch: 2 * n * epoch + n]])
        assert sorted(rows.tolist()) == list(range(n_train))
    assert all(math.isfinite(h["train_mmim_lld"]) and math.isfinite(h["train_loss"])
               for h in history)
    assert trainer.reg.estimator_pass == "epoch" and trainer.reg.config.schedule == "two_stage"


def test_interleaved_schedule_keeps_one_q_step_before_each_model_step(small_data):
    trainer = mmim_trainer(small_data, **{"regulariser.schedule": "interleaved",
                                          "regulariser.inner_steps": 2, "max_epochs": 1})
    assert trainer.reg.estimator_pass == "batch"
    events = record_updates(trainer)
    n = math.ceil(len(trainer.splits["train"]) / 16)
    trainer.fit()
    assert [kind for kind, _ in events] == ["q", "q", "model"] * n


def test_q_width_is_tied_to_its_target_unless_given():
    reg = make_reg()  # hidden: null, the official MMILB's x -> d_y -> d_y
    for y in ("audio", "vision"):
        assert reg.ba[y].q.mu[0].out_features == DIMS[y] == reg.ba[y].q.logvar[0].out_features
    assert make_reg(hidden=8).ba["audio"].q.mu[0].out_features == 8
    with pytest.raises(ConfigError, match="schedule"):
        build_dataclass(MMIMRegulariserConfig, {"schedule": "alternating"})


def test_grid_tunes_the_lstm_hidden_sizes_and_starts_at_the_papers_mosi_best(tmp_path, monkeypatch,
                                                                               capsys):
    """Sec. 4.3's "hidden dim in {32, 64}" is the A- and V-LSTM hidden size (Table 3 lists them
    apart): 2 x 3 x 2 x 2 = 24 points for none, 2 x 3 x 2 x 3 x 3 x 2 x 2 x 3 = 1296 for mmim;
    the first trial is Table 3's MOSI column."""
    import yaml

    from tuner.search import main
    from tuner.spaces import load_space

    space = load_space("mmim")
    assert "regulariser.hidden" not in space.grid
    assert space.grid["backbone.d_ah"] == space.grid["backbone.d_vh"] == [32, 64]
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "mmim", "--sampler", "grid", "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["trials"] == plan["grid_size"] == 1320
    mosi_best = {"backbone": "mmim", "regulariser": "mmim", "batch_size": 32,
                 "regulariser.lr_lld": 5e-3, "lr": 1e-3, "regulariser.alpha": 0.3,
                 "regulariser.beta": 0.1, "backbone.d_vh": 32, "backbone.d_ah": 32,
                 "regulariser.memory_size": 1}
    assert plan["start_points"] == [mosi_best]
    assert space.grid_points()[0] == mosi_best
    assert main(["--space", "mmim", "--dry-run"]) == 0  # tpe: the same point first
    plan = yaml.safe_load(capsys.readouterr().out)
    assert [{"backbone": "mmim", **p} for p in plan["start_points"]] == [mosi_best]
    # Table 3's MOSEI best (A-LSTM 16, outside the paper's {32, 64}): the documented --set line
    # of mmim.yaml / docs/fidelity.md makes it the first point
    mosei_best = {"regulariser": "mmim", "batch_size": 64, "lr": 5e-4, "regulariser.lr_lld": 1e-3,
                  "regulariser.alpha": 0.1, "regulariser.beta": 0.05, "backbone.d_ah": 16,
                  "backbone.d_vh": 64, "regulariser.memory_size": 1}
    from tuner.spaces import apply_overrides
    start = yaml.safe_dump(mosei_best, default_flow_style=True).strip()
    mosei = apply_overrides(space, ["grid.backbone.d_ah=[16, 32, 64]",
                                    "ranges.backbone.d_ah=[16, 32, 64]", f"start_points=[{start}]"])
    assert mosei.grid_points()[0] == {"backbone": "mmim", **mosei_best}
