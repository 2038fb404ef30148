"""MIRD: the CLUB estimator bounds MI from above, sparsemax is the simplex projection, the
regulariser minimises CLUB with its own networks kept apart, the log combination stays finite,
the backbone exposes its documented features and really loads its pretrained encoder, and the
pair trains with unlabeled rows mixed in."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from trainables.backbones import get_backbone
from trainables.backbones._layers import masked_mean
from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.backbones.mird import MIRD, MIRDConfig, sparsemax
from trainables.config import ConfigError, TrialConfig, build_dataclass
from trainables.data.batches import TensorSplit, resample_to_length
from trainables.loop import Trainer, _task_loss
from trainables.regularisers import get_regulariser
from trainables.regularisers._estimators import CLUB
from trainables.regularisers.mird import MIRDRegulariser, MIRDRegulariserConfig, log_loss, standardise
from trainables.regularisers.orthogonal import Orthogonal, OrthogonalConfig

TINY = {"text_model": "tiny-bert", "z_dim": 8, "recon_steps": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops; on a shared CPU, intra-op threads waiting on each other make
    them two orders of magnitude slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ helpers


def correlated(n: int, rho: float, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """d independent pairs with correlation ρ: I(X; Y) = −d/2 · log(1 − ρ²)."""
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1.0 - rho**2) * torch.randn(n, d, generator=g)
    return x, y


def codes(n: int, g: torch.Generator, rho: float = 0.8, d: int = 4) -> BackboneOutput:
    """text/audio/vision/shared codes that are noisy views of common factors."""
    s = torch.randn(n, d, generator=g)
    features = {name: rho * s + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
                for name in ("text", "audio", "vision", "shared")}
    features["fused"] = torch.cat([features[k] for k in ("text", "audio", "vision", "shared")], dim=-1)
    return BackboneOutput(prediction=torch.zeros(n), features=features)


CODE_DIMS = {"text": 4, "audio": 4, "vision": 4, "shared": 4, "fused": 16}


def make_reg(feature_dims=CODE_DIMS, seed: int = 0, **cfg) -> MIRDRegulariser:
    torch.manual_seed(seed)
    reg = MIRDRegulariser(build_dataclass(MIRDRegulariserConfig, cfg), feature_dims)
    reg.build_optimizer(reg.config.estimator_lr)
    return reg


def fit(reg: MIRDRegulariser, steps: int, n: int = 128, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        reg.estimator_step(codes(n, g), None)


def total_club(reg: MIRDRegulariser, out: BackboneOutput) -> float:
    with torch.no_grad():
        return float(sum(reg.estimates(out).values()))


@pytest.fixture(scope="module")
def tiny_batch(small_data):
    """8 real rows of the small synthetic set (token ids, unaligned audio/vision)."""
    return TensorSplit.from_arrays(small_data.splits["train"]).batch(torch.arange(8))


def tiny_mird(small_data, seed: int = 0, **cfg) -> MIRD:
    torch.manual_seed(seed)
    return MIRD(build_dataclass(MIRDConfig, {**TINY, **cfg}), small_data.dims)


# ------------------------------------------------------------------------------------ CLUB


def test_club_upper_bounds_gaussian_mi_and_grows_with_rho():
    d = 2
    estimates = {}
    for rho in (0.0, 0.5, 0.8):
        torch.manual_seed(0)
        club = CLUB(d, d, hidden=32)
        opt = torch.optim.Adam(club.parameters(), lr=5e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            x, y = correlated(256, rho, d, g)
            opt.zero_grad()
            club.learning_loss(x, y).backward()
            opt.step()
        x, y = correlated(8192, rho, d, torch.Generator().manual_seed(2))
        with torch.no_grad():
            estimates[rho] = club(x, y).item()
    true = {rho: -d / 2 * math.log(1 - rho**2) for rho in estimates}
    assert abs(estimates[0.0]) < 0.05, estimates
    for rho in (0.5, 0.8):
        assert estimates[rho] >= true[rho] - 0.05, (estimates, true)  # an upper bound
    assert estimates[0.0] < estimates[0.5] < estimates[0.8], estimates
    # with q = p(y|x) CLUB is ρ²/(1−ρ²) per dimension; a fitted q lands close to it
    assert estimates[0.8] == pytest.approx(d * 0.64 / 0.36, rel=0.25)


def test_club_product_term_matches_all_pairs():
    """The closed-form product term equals the mean over all n² pairs (x_i, y_j)."""
    torch.manual_seed(0)
    club = CLUB(3, 2, hidden=8)
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    mu, logvar = club.q.moments(x)
    log_q = lambda yy: -0.5 * (((yy - mu) ** 2) * torch.exp(-logvar)).sum(-1)  # noqa: E731
    joint = log_q(y).mean()
    product = torch.stack([log_q(y[j].expand_as(y)) for j in range(7)]).mean()
    torch.testing.assert_close(club(x, y), joint - product)
    assert club(x[:1], y[:1]).item() == 0.0  # one row: no product sample


# ------------------------------------------------------------------------------------ sparsemax


def projection_by_enumeration(z: torch.Tensor) -> torch.Tensor:
    """argmin_{p in simplex} ‖p − z‖² by trying every support S: the projection onto the face of S
    is p_S = z_S − τ_S with τ_S = (Σ z_S − 1)/|S|; keep the feasible candidate nearest to z."""
    n = z.numel()
    best, best_dist = None, math.inf
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            idx = list(support)
            tau = (z[idx].sum() - 1) / size
            p = torch.zeros_like(z)
            p[idx] = z[idx] - tau
            if (p[idx] >= 0).all():
                dist = ((p - z) ** 2).sum().item()
                if dist < best_dist:
                    best, best_dist = p, dist
    return best


def test_sparsemax_is_the_euclidean_projection_onto_the_simplex():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 6):
        for scale in (0.1, 1.0, 5.0):
            z = scale * torch.randn(4, n, generator=g, dtype=torch.float64)
            p = sparsemax(z)
            for row in range(4):
                torch.testing.assert_close(p[row], projection_by_enumeration(z[row]))


def test_sparsemax_sums_to_one_is_sparse_and_keeps_the_order():
    z = torch.tensor([[3.0, 1.0, 0.2, -1.0, 2.5], [0.1, 0.0, -0.1, 0.05, 0.02]])
    p = sparsemax(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    assert (p >= 0).all()
    assert (p[0] == 0).sum() >= 3  # spread-out scores: exact zeros
    assert (p[1] > 0).all()  # close scores: dense, like softmax
    for row in range(2):
        order = torch.argsort(z[row], descending=True)
        assert (p[row][order].diff() <= 0).all()  # the larger the score, the larger the weight
    # shift invariance and a sparser output than softmax
    torch.testing.assert_close(sparsemax(z + 7.0), p)
    assert ((torch.softmax(z, -1) > 0).sum() > (p > 0).sum())


def test_sparsemax_other_dim_mask_and_jacobian():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sparsemax(z, dim=1), sparsemax(z.transpose(1, 2)).transpose(1, 2))

    mask = torch.tensor([True, True, False, True, False, False])
    zz = z[:, :, 0] * 3  # (3, 6)
    masked = sparsemax(zz, mask=mask)
    assert (masked[:, ~mask] == 0).all()
    torch.testing.assert_close(masked[:, mask], sparsemax(zz[:, mask]))
    assert (sparsemax(zz, mask=torch.zeros(6, dtype=torch.bool)) == 0).all()

    # autograd gives sparsemax's Jacobian diag(s) − s sᵀ / |S|
    v = torch.tensor([1.0, 0.8, -0.5, 0.3], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(sparsemax, v)
    s = (sparsemax(v) > 0).double()
    torch.testing.assert_close(jac, torch.diag(s) - torch.outer(s, s) / s.sum())


# ------------------------------------------------------------------------------------ regulariser


def test_pairs_follow_the_available_features():
    # the paper's directions: q(z^L|z^V), q(z^A|z^V), q(z^A|z^L) (θ_var after Eq. 15),
    # q(z^S|z^m) (Eq. 10) and q(z^S|X^m) (Eq. 14)
    reg = make_reg()
    assert reg.pairs == [("vision", "text"), ("vision", "audio"), ("text", "audio"),
                         ("vision", "shared"), ("text", "shared"), ("audio", "shared")]
    old = make_reg(pair_order="shared_first")
    assert old.pairs == [("shared", "text"), ("shared", "audio"), ("shared", "vision"),
                         ("text", "audio"), ("text", "vision"), ("audio", "vision")]
    generic = make_reg({"text": 4, "audio": 3, "vision": 5, "fused": 8})
    assert generic.pairs == [("vision", "text"), ("vision", "audio"), ("text", "audio")]
    assert generic.recon == []
    full = make_reg({**CODE_DIMS, "input_text": 6, "input_audio": 2, "input_vision": 3})
    assert full.pairs[-3:] == [(f"input_{m}", "shared") for m in ("text", "audio", "vision")]
    assert full.clubs["input_audio__shared"].q.mu[0].in_features == 2  # q(z^S | X^A)
    assert isinstance(full.optimizer, torch.optim.Adam)  # §4.3: Adam for the MIM module
    assert len(make_reg({**CODE_DIMS, "input_text": 6}, use_input_mi=False).pairs) == 6
    with pytest.raises(ValueError, match="at least two"):
        make_reg({"text": 4, "fused": 4})


def test_penalty_gradient_lowers_the_club_estimate_and_skips_q():
    reg = make_reg(alpha=1.0, recon_weight=0.0)
    fit(reg, steps=150)
    reg.optimizer.zero_grad(set_to_none=True)
    out = codes(64, torch.Generator().manual_seed(5))
    for f in out.features.values():
        f.requires_grad_(True)
    pen = reg.penalty(out, None)
    before = total_club(reg, out)
    assert pen.item() == pytest.approx(before, rel=1e-5)  # α = 1, no reconstruction
    assert before > 1.0  # dependent codes read as dependent
    pen.backward()
    assert all(p.grad is None for p in reg.parameters()), "the penalty trained q"
    norm = torch.sqrt(sum((f.grad**2).sum() for f in out.features.values()))
    stepped = BackboneOutput(out.prediction, {k: (v - 0.1 * v.grad / norm).detach()
                                              for k, v in out.features.items()})
    assert total_club(reg, stepped) < before  # minimisation: −∇penalty lowers CLUB


def test_estimator_step_updates_only_the_club_networks():
    backbone = nn.ModuleDict({m: nn.Linear(6, w) for m, w in CODE_DIMS.items()})
    x = torch.randn(16, 6)
    feats = {m: layer(x) for m, layer in backbone.items()}
    out = BackboneOutput(prediction=feats["text"].sum(-1), features=feats)
    reg = make_reg()
    before_q = copy.deepcopy(reg.state_dict())
    before_backbone = copy.deepcopy(backbone.state_dict())
    logged = reg.estimator_step(out, None)  # not detached by the caller: still safe
    assert set(logged) == {"mird_club", "mird_club_nll"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in logged.values())
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, before_backbone[k]) for k, v in backbone.state_dict().items())
    changed = [k for k, v in reg.state_dict().items() if not torch.equal(v, before_q[k])]
    assert changed and all(k.startswith("clubs.") for k in changed)
    assert reg.main_parameters() == []
    assert {id(p) for p in reg.estimator_parameters()} == {id(p) for p in reg.clubs.parameters()}
    assert reg.inner_steps == 5 and make_reg(inner_steps=2).inner_steps == 2


def test_state_dict_round_trip_gives_identical_penalty():
    reg = make_reg()
    fit(reg, steps=5)
    reg_state, opt_state = io.BytesIO(), io.BytesIO()
    torch.save(reg.state_dict(), reg_state)
    torch.save(reg.optimizer.state_dict(), opt_state)
    reg_state.seek(0)
    opt_state.seek(0)
    clone = make_reg(seed=42)
    clone.load_state_dict(torch.load(reg_state))
    clone.optimizer.load_state_dict(torch.load(opt_state))
    out = codes(32, torch.Generator().manual_seed(9))
    assert clone.penalty(out, None).item() == reg.penalty(out, None).item()
    for r in (reg, clone):  # the optimiser state came along: one more step keeps them equal
        r.estimator_step(out, None)
    assert clone.penalty(out, None).item() == reg.penalty(out, None).item()


def test_standardised_penalty_ignores_the_scale_of_the_codes():
    assert MIRDRegulariserConfig().standardise is False  # the default: Eq. 20's raw codes
    reg = make_reg(standardise=True)  # the named option
    fit(reg, steps=20)
    out = codes(64, torch.Generator().manual_seed(3))
    small = BackboneOutput(out.prediction, {k: 1e-3 * v for k, v in out.features.items()})
    assert reg.penalty(small, None).item() == pytest.approx(reg.penalty(out, None).item(), rel=1e-3)
    z = torch.randn(10, 3) * 5 + 2
    torch.testing.assert_close(standardise(z).mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    assert (standardise(z[:1]) == 0).all()


def test_combine_takes_logs_and_is_finite_for_a_zero_task_loss():
    reg = make_reg()
    pen = torch.tensor(0.7, requires_grad=True)
    task = torch.tensor(0.5, requires_grad=True)
    total = reg.combine(task, pen)
    assert total.item() == pytest.approx(math.log(0.5) + 0.7, abs=1e-6)
    total.backward()
    assert task.grad.item() == pytest.approx(2.0)  # d log L / dL = 1/L
    # a batch without labeled rows: the loop's task loss is 0, the task term drops out
    pred = torch.randn(4, requires_grad=True)
    zero = _task_loss("mse", pred, torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    assert reg.combine(zero, pen).item() == pytest.approx(0.7)
    tiny = torch.tensor(1e-30, requires_grad=True)
    assert torch.isfinite(reg.combine(tiny, pen))
    reg.combine(tiny, pen).backward()
    assert torch.isfinite(tiny.grad)
    assert log_loss(torch.tensor(0.0)).item() == 0.0
    plain = make_reg(log_losses=False)
    assert plain.combine(task, pen).item() == pytest.approx(1.2)


def test_batch_of_one_is_finite():
    reg = make_reg()
    out = codes(1, torch.Generator().manual_seed(0))
    for f in out.features.values():
        f.requires_grad_(True)
    pen = reg.penalty(out, None)
    assert torch.isfinite(pen) and pen.item() == 0.0
    pen.backward()
    assert reg.estimator_step(out, None) == {"mird_club": 0.0}


def test_config_and_registry():
    assert get_regulariser("mird") is MIRDRegulariser
    assert get_regulariser("orthogonal") is Orthogonal
    assert get_backbone("mird") is MIRD
    cfg = build_dataclass(MIRDRegulariserConfig, {"club_lr": 3e-4, "alpha": 10})
    assert cfg.estimator_lr == 3e-4 and cfg.alpha == 10.0 and cfg.inner_steps == 5
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(MIRDRegulariserConfig, {"split_rate": 3})  # s is TrialConfig.unlabeled_rate
    with pytest.raises(ConfigError, match="alpha"):
        build_dataclass(MIRDRegulariserConfig, {"alpha": -1})
    with pytest.raises(ConfigError, match="align"):
        build_dataclass(MIRDConfig, {"align": "softmax"})
    with pytest.raises(ConfigError, match="weight"):
        build_dataclass(OrthogonalConfig, {"weight": -0.1})


# ------------------------------------------------------------------------------------ orthogonal


def test_orthogonality_penalty_is_scale_free_and_minimised():
    reg = Orthogonal(OrthogonalConfig(weight=1.0), CODE_DIMS)
    assert reg.inner_steps == 0 and list(reg.parameters()) == []
    dep = codes(256, torch.Generator().manual_seed(0), rho=0.9)
    ind = codes(256, torch.Generator().manual_seed(0), rho=0.0)
    p_dep, p_ind = reg.penalty(dep, None).item(), reg.penalty(ind, None).item()
    assert p_dep > 10 * p_ind and p_ind < 0.5
    scaled = BackboneOutput(dep.prediction, {k: 1e-3 * v for k, v in dep.features.items()})
    assert reg.penalty(scaled, None).item() == pytest.approx(p_dep, rel=1e-4)
    # correlations: u against itself has ones on the diagonal
    u = dep.features["text"]
    corr = torch.corrcoef(torch.cat([u, dep.features["audio"]], 1).T)[:4, 4:]
    assert reg.orthogonality(dep)["text__audio"].item() == pytest.approx((corr**2).sum().item(), rel=1e-4)
    for f in dep.features.values():
        f.requires_grad_(True)
    pen = reg.penalty(dep, None)
    pen.backward()
    stepped = BackboneOutput(
        dep.prediction, {k: (v - 1e-2 * v.grad).detach() for k, v in dep.features.items()}
    )
    assert reg.penalty(stepped, None).item() < p_dep
    one = codes(1, torch.Generator().manual_seed(0))
    assert reg.penalty(one, None).item() == 0.0


# ------------------------------------------------------------------------------------ backbone


def test_backbone_features_are_the_documented_keys(small_data, tiny_batch):
    model = tiny_mird(small_data)
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch)
    expected = {"text", "audio", "vision", "shared", "fused"}
    expected |= {f"{p}{m}" for p in ("recon_", "target_", "input_") for m in MODALITIES}
    assert set(out.features) == expected == set(model.feature_dims)
    f = out.features
    p = torch.cat([f["text"], f["audio"], f["vision"], f["shared"]], -1)  # Eq. (16)
    # "fused" is the input of the regressor's final linear layer (MDM's Z_avl): ReLU(W_1 p)
    torch.testing.assert_close(f["fused"], torch.relu(model.head[0](p)))
    for m in MODALITIES:
        x, n = getattr(tiny_batch, m), getattr(tiny_batch, f"{m}_lengths")
        steps = model.recon_steps[m]
        assert steps == 4
        torch.testing.assert_close(f[f"target_{m}"], resample_to_length(x, n, steps).flatten(1))
        torch.testing.assert_close(f[f"input_{m}"], masked_mean(x, n))
        assert f[f"recon_{m}"].shape == f[f"target_{m}"].shape == (8, steps * x.shape[-1])
    # the regulariser finds the full method: 6 code pairs, 3 input pairs, 3 reconstructions
    reg = get_regulariser("mird")(MIRDRegulariserConfig(), model.feature_dims)
    assert len(reg.pairs) == 9 and reg.recon == list(MODALITIES)
    # the orthogonal baseline keeps MIRD's log reconstruction terms; only the MI term differs
    recon = sum(math.log(((f[f"recon_{m}"] - f[f"target_{m}"]) ** 2).mean().item()) for m in MODALITIES)
    no_mi = MIRDRegulariser(MIRDRegulariserConfig(alpha=0.0), model.feature_dims)
    no_orth = Orthogonal(OrthogonalConfig(weight=0.0), model.feature_dims)
    assert no_mi.penalty(out, tiny_batch).item() == pytest.approx(recon, rel=1e-5)
    assert no_orth.penalty(out, tiny_batch).item() == pytest.approx(recon, rel=1e-5)


@pytest.mark.parametrize("align,pool,gate", [("resample", "cls", "relu"),
                                             ("sparsemax", "sparsemax", "sigmoid"),
                                             ("sparsemax", "mean", "sigmoid")])
def test_backbone_variants_train(small_data, tiny_batch, align, pool, gate):
    model = tiny_mird(small_data, align=align, pool=pool, gate=gate)
    reg = make_reg(model.feature_dims, inner_steps=1, hidden=8)
    out = model(tiny_batch)
    reg.estimator_step(out.detached(), tiny_batch)
    task = _task_loss("mse", out.prediction, tiny_batch.labels, None)
    loss = reg.combine(task, reg.penalty(out, tiny_batch))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.mag.gate_audio.weight.grad is not None
    assert model.decoders["audio"].out.weight.grad.abs().sum() > 0  # the recon term trains decoders
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


def test_pretrained_encoder_weights_are_loaded_and_grouped(small_data):
    import transformers

    from trainables.text import resolve_model_path

    model = MIRD(MIRDConfig(z_dim=8, recon_steps=2), small_data.dims)  # text_model "minilm"
    reference = transformers.AutoModel.from_pretrained(resolve_model_path("minilm"), local_files_only=True)
    ours = model.text_encoder.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.5.output.dense.weight"):
        assert torch.equal(ours[key], reference.state_dict()[key]), key
    groups = model.param_groups(lr=1e-3, text_lr=1e-5, weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["text_encoder"]["lr"] == 1e-5 and by_name["model"]["lr"] == 1e-3
    encoder_ids = {id(p) for p in model.text_encoder.parameters()}
    assert {id(p) for p in by_name["text_encoder"]["params"]} == encoder_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_trainer_runs_the_mird_pair_with_unlabeled_rows(small_data):
    cfg = TrialConfig.from_flat({
        "backbone": "mird", "regulariser": "mird", "max_epochs": 1, "batch_size": 32, "patience": 0,
        "task_loss": "mse", "unlabeled_rate": 2.0, "seed": 0,
        **{f"backbone.{k}": v for k, v in TINY.items()},
        "regulariser.inner_steps": 2, "regulariser.hidden": 8,
    })
    trainer = Trainer(cfg, small_data)
    seen = []
    penalty = trainer.reg.penalty

    def spy(out, batch):
        seen.append((len(out.prediction), len(batch), int(batch.labeled.sum())))
        return penalty(out, batch)

    trainer.reg.penalty = spy
    history = trainer.fit()
    assert trainer.status == "completed"
    last = history[-1]
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["valid_mae"])
    assert {"train_mird_club", "train_mird_recon_audio"} <= set(last)
    # the regulariser sees every row, labeled (1/3) and unlabeled (2/3)
    assert seen and all(n == b == 3 * k for n, b, k in seen)
