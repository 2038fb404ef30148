"""Synergy / C-Network (Shankar, arXiv 2110.00385): the statistics behave as their definitions say
(the paper's kurtosis is minimised, its covariance update is D5 of the App. D algorithm, its KL is a
Donsker–Varadhan estimate, its Q and g are four-layer LeakyReLU MLPs), the C-network is trained only
in ``estimator_step``, the backbone only through ``penalty``, and S survives a checkpoint."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from trainables.backbones.base import BackboneOutput
from trainables.config import ConfigError, build_dataclass
from trainables.regularisers import get_regulariser
from trainables.regularisers.synergy import (
    DonskerVaradhanKL,
    InvertibleMLP,
    InvertibleNet,
    Synergy,
    SynergyConfig,
    gaussian_kl,
    gaussian_kurtosis,
    clip_norms,
    gaussian_mmd,
    mardia_kurtosis,
)

DIMS = {"text": 6, "audio": 5, "vision": 7, "fused": 12}
SMALL = {"hidden": 16, "proj_dim": 4, "coupling_layers": 2}


def make_reg(seed: int = 0, dims: dict[str, int] = DIMS, **cfg) -> Synergy:
    torch.manual_seed(seed)
    reg = Synergy(build_dataclass(SynergyConfig, {**SMALL, **cfg}), dims)
    reg.build_optimizer(reg.config.estimator_lr)
    return reg


def features(b: int = 32, seed: int = 0, requires_grad: bool = False,
             dims: dict[str, int] = DIMS) -> BackboneOutput:
    """Every modality a noisy linear view of 3 shared factors; fused a fixed linear map of all three."""
    g = torch.Generator().manual_seed(seed)
    w = torch.Generator().manual_seed(99)
    s = torch.randn(b, 3, generator=g)
    feats = {m: s @ torch.randn(3, dims[m], generator=w) + 0.5 * torch.randn(b, dims[m], generator=g)
             for m in ("text", "audio", "vision")}
    concat = torch.cat([feats[m] for m in ("text", "audio", "vision")], dim=-1)
    feats["fused"] = torch.tanh(concat @ torch.randn(concat.shape[1], dims["fused"], generator=w) / 3.0)
    for f in feats.values():
        f.requires_grad_(requires_grad)
    return BackboneOutput(prediction=torch.zeros(b), features=feats)


def c_network_params(reg: Synergy) -> list[nn.Parameter]:
    """Everything ``estimator_step`` trains: θ_C (Q_i, g_i) and, for "kl", the DV critics."""
    critics = [] if reg.critics is None else list(reg.critics.parameters())
    return [*reg.predictors.parameters(), *reg.flows.parameters(), *critics]


def fit(reg: Synergy, steps: int, b: int = 32) -> None:
    reg.train()
    for i in range(steps):
        reg.estimator_step(features(b, seed=100 + i), None)


# -- the invertible network ------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [4, 7])
def test_invertible_net_round_trip(dim):
    torch.manual_seed(0)
    net = InvertibleNet(dim, hidden=16, layers=4)
    x = torch.randn(64, dim)
    torch.testing.assert_close(net(x), x, rtol=0, atol=0)  # starts as the identity
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    y = net(x)
    assert (y - x).abs().max() > 0.1  # a real transformation now, of every coordinate
    assert ((y - x).abs().amax(0) > 1e-3).all()
    torch.testing.assert_close(net.inverse(y), x, rtol=1e-4, atol=1e-4)  # float32 rounding
    net, x = net.double(), x.double()  # exact up to float64 rounding
    torch.testing.assert_close(net.inverse(net(x)), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net(net.inverse(x)), x, rtol=1e-10, atol=1e-10)


# -- the statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize("median_heuristic,bandwidths", [(True, (0.5, 1.0, 2.0)), (False, (1.0, 2.0))])
def test_mmd_is_zero_for_one_distribution_and_grows_with_the_shift(median_heuristic, bandwidths):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 4, generator=g), torch.randn(512, 4, generator=g)
    mmd = lambda a, b: gaussian_mmd(a, b, bandwidths, median_heuristic).item()  # noqa: E731
    same = mmd(x, y)
    shifted = [mmd(x, y + s) for s in (1.0, 0.5, 0.25)]
    assert abs(same) < 0.01, same
    assert shifted[0] > 0.1 and shifted[0] > 20 * abs(same), (shifted, same)
    assert shifted[0] > shifted[1] > shifted[2] > same, (shifted, same)


def test_mmd_ignores_the_pairing_of_rows():
    """Paired rows (y_b = x_b + small noise) have the same marginals: the estimate stays ~0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 4, generator=g)
    y = x + 0.05 * torch.randn(512, 4, generator=g)
    assert abs(gaussian_mmd(x, y).item()) < 0.01


def test_gaussian_kl_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 3, generator=g), torch.randn(4096, 3, generator=g)
    assert abs(gaussian_kl(x, y).item()) < 0.01
    # N(μ, I) vs N(0, 4I): ½ (3/4 + |μ|²/4 − 3 + 3 log 4)
    mu = torch.tensor([1.0, 0.0, -1.0])
    expected = 0.5 * (3 / 4 + 2 / 4 - 3 + 3 * math.log(4))
    assert gaussian_kl(x + mu, 2 * y).item() == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("d", [2, 4, 8])
def test_mardia_kurtosis_is_d_d_plus_2_for_gaussians_and_larger_for_heavy_tails(d):
    torch.manual_seed(0)
    target = d * (d + 2)
    n = 8192
    # Mardia's κ is affine invariant: correlated Gaussians give d(d+2) too (a well-conditioned mix, so
    # that the diagonal loading stays negligible; see the next test for an ill-conditioned one)
    mix = torch.linalg.qr(torch.randn(d, d)).Q * torch.linspace(1.0, 3.0, d)
    gauss = torch.randn(n, d) @ mix + 3.0
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n, d)) @ mix
    student = torch.distributions.StudentT(5.0).sample((n, d)) @ mix
    k_gauss = mardia_kurtosis(gauss).item()
    assert k_gauss == pytest.approx(target, rel=0.05)
    # independent coordinates with excess kurtosis 3 (Laplace) add 3 per coordinate: d(d+2) + 3d
    assert mardia_kurtosis(laplace).item() > target + 1.5 * d
    assert mardia_kurtosis(student).item() > target * 1.1


def test_gaussian_reference_accounts_for_loading_and_degenerate_directions():
    torch.manual_seed(0)
    d, n = 6, 8192
    assert gaussian_kurtosis(torch.eye(d), 1e-8).item() == pytest.approx(d * (d + 2), rel=1e-5)
    # one coordinate constant (as TFN's fused vector has), one of tiny variance: both drop out
    x = torch.randn(n, d) * torch.tensor([1.0, 2.0, 0.5, 1.0, 1e-4, 0.0])
    cov = x.T @ x / n
    reference = gaussian_kurtosis(cov).item()
    assert reference == pytest.approx(4 * 6, rel=0.02)
    assert mardia_kurtosis(x, x.mean(0), cov).item() == pytest.approx(reference, rel=0.05)
    # the gaussian_target option: all 3 coordinates, Gaussian where it varies: no penalty
    reg = make_reg(dims={**DIMS, "fused": 3}, kurtosis_dim=None, kurtosis="gaussian_target")
    fused = torch.cat([torch.randn(4096, 2), torch.ones(4096, 1)], dim=1)
    assert reg.kurtosis_loss(fused).item() < 0.01


def test_gaussian_reference_for_a_batch_that_drifted_from_the_running_statistics():
    """κ_G is the expected κ of N(μ + δ, Σ_b) whitened by (μ, Σ): checked against Monte Carlo."""
    torch.manual_seed(0)
    d, n = 4, 200_000
    cov = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    a = torch.randn(d, d) * 0.5
    batch_cov = a @ a.T + torch.eye(d)
    offset = torch.tensor([0.5, -0.3, 0.0, 0.2])
    z = torch.randn(n, d, dtype=torch.float64) @ torch.linalg.cholesky(batch_cov.double()).T + offset.double()
    monte_carlo = mardia_kurtosis(z, torch.zeros(d, dtype=torch.float64), cov.double(), diag_load=1e-8).item()
    assert gaussian_kurtosis(cov, 1e-8, batch_cov, offset).item() == pytest.approx(monte_carlo, rel=0.02)
    assert gaussian_kurtosis(cov, 1e-8, batch_cov, offset).item() > 1.5 * d * (d + 2)  # far from k(k+2)


def test_gaussian_target_option_is_zero_for_gaussian_batches_whatever_the_drift():
    reg = make_reg(dims={**DIMS, "fused": 4}, kurtosis_dim=4, cov_decay=0.9, kurtosis="gaussian_target")
    reg.train()
    torch.manual_seed(0)
    reg.kurtosis_loss(torch.randn(4096, 4), update=True)  # S of N(0, I)
    reg.eval()
    drifted = torch.randn(4096, 4) * torch.tensor([3.0, 1.0, 0.5, 2.0]) + 1.0  # wider, shifted
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((4096, 4))
    assert reg.kurtosis_loss(drifted).item() < 0.01
    assert reg.kurtosis_loss(heavy).item() > 0.05
    # the ratio is scale-free: the same heavy-tailed batch, 10x wider, gives about the same loss
    assert reg.kurtosis_loss(10 * heavy).item() == pytest.approx(reg.kurtosis_loss(heavy).item(), rel=0.2)


def test_clip_caps_the_norm_of_each_difference_and_keeps_its_direction():
    torch.manual_seed(0)
    d = torch.randn(256, 3)
    d[0] = 1e3  # one wild row
    capped = clip_norms(d, 2.0)
    assert capped.norm(dim=1).max().item() == pytest.approx(2.0, rel=1e-5)
    short = d.norm(dim=1) <= 2.0
    torch.testing.assert_close(capped[short], d[short])  # short rows untouched
    torch.testing.assert_close(capped[0], d[0] / d[0].norm() * 2.0)
    zero = torch.zeros(4, 3, requires_grad=True)
    clip_norms(zero, 1.0).sum().backward()
    assert torch.isfinite(zero.grad).all()  # a zero difference: no NaN gradient
    x = d + 1.0
    assert mardia_kurtosis(x, max_norm=2.0).item() < mardia_kurtosis(x).item()


# -- the paper's defaults (Sec. 2.2, 2.3, 4.1, App. C, App. D) ----------------------------------------


def _unit_variance(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n rows of d independent unit-variance coordinates: light, Gaussian or heavy tails."""
    if kind == "uniform":  # excess kurtosis −1.2
        return (torch.rand(n, d, generator=g) * 2.0 - 1.0) * math.sqrt(3.0)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g)
    if kind == "laplace":  # excess kurtosis 3
        e = -torch.log(torch.rand(n, d, generator=g))
        sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
        return sign * e / math.sqrt(2.0)
    # Student-t with 5 degrees of freedom (excess kurtosis 6), scaled to unit variance
    chi2 = sum(torch.randn(n, d, generator=g) ** 2 for _ in range(5))
    return torch.randn(n, d, generator=g) / torch.sqrt(chi2 / 5.0) / math.sqrt(5.0 / 3.0)


def test_kurtosis_loss_rises_with_the_kurtosis_of_the_fused_code():
    """Sec. 4.1: the fused code "should have low kurtosis", and L_κ = κ is minimised (D6): the
    default loss orders light < Gaussian < heavy tails, on a fresh S and on one that has run."""
    d, n = 6, 4096
    kinds = ["uniform", "gaussian", "laplace", "student"]
    mix = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5))).Q
    for warm in (False, True):
        losses = []
        for i, kind in enumerate(kinds):
            reg = make_reg(dims={**DIMS, "fused": d})  # the defaults: kurtosis "minimise", full width
            g = torch.Generator().manual_seed(10 + i)
            if warm:
                reg.train()
                for _ in range(3):
                    reg.kurtosis_loss(_unit_variance(kind, n, d, g) @ mix, update=True)
                reg.eval()
            losses.append(reg.kurtosis_loss(_unit_variance(kind, n, d, g) @ mix).item())
        assert losses == sorted(losses) and len(set(losses)) == 4, dict(zip(kinds, losses))
        assert losses[1] > 1.1 * losses[0] and losses[2] > 1.1 * losses[1], dict(zip(kinds, losses))
    # and the kurtosis term is κ itself, in units of a Gaussian's d(d+2) ("raw": κ), not a distance
    # to a Gaussian's value
    z = _unit_variance("uniform", n, d, torch.Generator().manual_seed(3))
    kappa = mardia_kurtosis(z).item()
    assert make_reg(dims={**DIMS, "fused": d}).kurtosis_loss(z).item() == pytest.approx(kappa / (d * (d + 2)),
                                                                                        rel=1e-4)
    raw = make_reg(dims={**DIMS, "fused": d}, kurtosis_units="raw")
    assert raw.kurtosis_loss(z).item() == pytest.approx(kappa, rel=1e-4)


def _train_dv(shift: float, steps: int = 400, seed: int = 0) -> tuple[DonskerVaradhanKL, torch.Tensor]:
    """A DV critic trained on samples of P = N((shift, 0), I) against Q = N(0, I)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([shift, 0.0])
    dv = DonskerVaradhanKL(2, hidden=32)
    opt = torch.optim.Adam(dv.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = torch.randn(256, 2, generator=g) + mu, torch.randn(256, 2, generator=g)
        opt.zero_grad()
        dv.learning_loss(x, y).backward()
        opt.step()
    return dv, mu


def _dv_by_quadrature(dv: DonskerVaradhanKL, mu: torch.Tensor) -> float:
    """E_P[T] − log E_Q[e^T] by a Riemann sum over a fine grid (not by sampling): the value of the
    bound for this critic, which the DV inequality puts at or below KL(P ‖ Q) exactly."""
    step = 0.04
    axis = torch.arange(-9.0, 11.0, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    log_q = -0.5 * (grid**2).sum(1) - math.log(2 * math.pi)
    log_p = -0.5 * ((grid - mu.double()) ** 2).sum(1) - math.log(2 * math.pi)
    with torch.no_grad():
        t = dv.critic(grid.float()).squeeze(-1).double()
    area = step**2
    e_p = (torch.exp(log_p) * t).sum() * area
    log_e_q = torch.logsumexp(log_q + t, 0) + math.log(area)
    return float(e_p - log_e_q)


def test_dv_kl_estimate_is_below_the_closed_form_and_rises_with_it():
    """Sec. 2.2: the neural Donsker–Varadhan estimate is a lower bound on KL, tight at the best
    critic: after training, below the closed form, close to it, and ordered like it. The bound is
    evaluated by quadrature, not on samples: log E_Q[e^T] on samples is dominated by a few tail
    rows (its minibatch value scatters by ±0.2 nats here), so a sampled check would be flaky."""
    estimates = {}
    for shift in (1.0, 2.0):  # closed form: KL(N(μ, I) ‖ N(0, I)) = ‖μ‖²/2 = 0.5 and 2.0
        dv, mu = _train_dv(shift)
        kl = shift**2 / 2.0
        exact = _dv_by_quadrature(dv, mu)
        assert exact < kl, (shift, exact, kl)
        assert exact > 0.6 * kl, (shift, exact, kl)
        estimates[kl] = exact
    assert estimates[2.0] > estimates[0.5] + 0.5 * (2.0 - 0.5), estimates


def test_synergy_kl_is_the_dv_estimate_and_gaussian_kl_the_closed_form():
    out = features(b=64)
    reg = make_reg(divergence="kl")
    expected = sum(reg.critics[m](*reg.project(m, out.features)) for m in ("text", "audio", "vision"))
    torch.testing.assert_close(reg.alignment_loss(out.features), expected)
    closed = make_reg(divergence="gaussian_kl")
    assert closed.critics is None
    expected = sum(gaussian_kl(*closed.project(m, out.features)) for m in ("text", "audio", "vision"))
    torch.testing.assert_close(closed.alignment_loss(out.features), expected)
    # the critics ascend their bound in estimator_step: the DV estimate grows on a fixed batch
    reg = make_reg(divergence="kl", c_lr=3e-3, gamma_l2=0.0, gamma_d=0.0)  # only the critics learn
    before = reg.alignment_loss(out.features).item()
    for _ in range(50):
        reg.estimator_step(out, None)
    assert reg.alignment_loss(out.features).item() > before + 0.05


def _layers(module: nn.Module) -> tuple[int, list[type]]:
    kinds = [type(m) for m in module.modules() if not list(m.children())]
    return sum(k is nn.Linear for k in kinds), [k for k in kinds if k is not nn.Linear]


def test_q_g_and_critics_are_four_layer_leaky_relu_mlps():
    """App. C: "For both the Q and the g function we used a four layer MLP with LeakyRelu"."""
    reg = make_reg()
    for m in ("text", "audio", "vision"):
        linears, others = _layers(reg.predictors[m])
        assert linears == 4 and others == [nn.LeakyReLU] * 3, (m, reg.predictors[m])
    reg = make_reg(divergence="kl")
    for m in ("text", "audio", "vision"):
        linears, others = _layers(reg.critics[m])
        assert linears == 4 and others == [nn.LeakyReLU] * 3, (m, reg.critics[m])
        assert isinstance(reg.flows[m], InvertibleMLP) and len(reg.flows[m].linears) == 4
        assert all(lin.weight.shape == (SMALL["proj_dim"],) * 2 for lin in reg.flows[m].linears)
    rest = 5 + 7  # Q_text reads audio and vision
    assert reg.predictors["text"][0].in_features == rest and reg.predictors["text"][-1].out_features == 6
    assert isinstance(make_reg(g_network="coupling").flows["text"], InvertibleNet)  # the option


def test_invertible_mlp_round_trip():
    torch.manual_seed(0)
    net = InvertibleMLP(5)
    with torch.no_grad():
        for lin in net.linears:
            lin.weight.add_(0.3 * torch.randn_like(lin.weight))
            lin.bias.normal_(0.0, 0.3)
    x = torch.randn(64, 5)
    y = net(x)
    assert (y - x).abs().max() > 0.1
    torch.testing.assert_close(net.inverse(y), x, rtol=1e-3, atol=1e-3)  # float32 rounding
    net, x = net.double(), x.double()
    torch.testing.assert_close(net.inverse(net(x)), x, rtol=1e-9, atol=1e-9)


# -- running statistics -----------------------------------------------------------------------------


def test_covariance_update_is_the_papers_rule():
    """App. D, D4-D5 on two small batches by hand: Z_diff = clip(Z − Z̄) with the batch mean, norms
    capped; S = clipped covariance after the first batch, then S = α·S + Σ Z_diff Z_diffᵀ / N (no
    (1 − α) factor); κ (D6) uses the unclipped differences and the loaded S."""
    dims = {**DIMS, "fused": 2}
    reg = make_reg(dims=dims, cov_decay=0.5, kurtosis_clip=1.5, kurtosis_dim=64, diag_load=1e-3)
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [10.0, 10.0]])  # the last row gets clipped
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [3.0, 3.0], [-3.0, -3.0]])

    def by_hand(z):
        diff = z - z.mean(0)
        rms = math.sqrt((diff**2).sum(1).mean().item())
        norms = diff.norm(dim=1, keepdim=True)
        clipped = diff * torch.clamp(1.5 * rms / norms, max=1.0)
        return diff, clipped.T @ clipped / z.shape[0]

    def kappa_by_hand(diff, s):
        loaded = s + (1e-3 * torch.diagonal(s).mean() + 1e-6) * torch.eye(2)
        q = (diff @ torch.linalg.inv(loaded) * diff).sum(1)  # (z − z̄)ᵀ (S + diag c)⁻¹ (z − z̄)
        return (q**2).mean()

    reg.train()
    assert int(reg.kappa_count) == 0 and torch.equal(reg.kappa_cov, torch.zeros(2, 2))
    diff_a, term_a = by_hand(a)
    assert not torch.allclose(term_a, diff_a.T @ diff_a / 4)  # the clip was active
    kappa_a, _ = reg.kurtosis(a, update=True)
    torch.testing.assert_close(reg.kappa_cov, term_a)
    torch.testing.assert_close(kappa_a, kappa_by_hand(diff_a, term_a))

    diff_b, term_b = by_hand(b)
    kappa_b, _ = reg.kurtosis(b, update=True)
    torch.testing.assert_close(reg.kappa_cov, 0.5 * term_a + term_b)  # S ← α·S + Σ/N
    torch.testing.assert_close(kappa_b, kappa_by_hand(diff_b, 0.5 * term_a + term_b))
    assert int(reg.kappa_count) == 2

    ema = make_reg(dims=dims, cov_decay=0.5, kurtosis_clip=1.5, cov_update="ema")
    ema.kurtosis(a, update=True)
    ema.kurtosis(b, update=True)
    torch.testing.assert_close(ema.kappa_cov, 0.5 * term_a + 0.5 * term_b)  # the named option


def test_s_moves_once_per_training_penalty_and_carries_no_graph():
    reg = make_reg()
    reg.train()
    reg.penalty(features(seed=1), None)
    reg.penalty(features(seed=2), None)
    assert int(reg.kappa_count) == 2
    assert not reg.kappa_cov.requires_grad and reg.kappa_cov.grad_fn is None
    # neither evaluation, the C-network step nor a batch of one moves it
    before = {k: v.clone() for k, v in reg.state_dict().items() if k.startswith("kappa_")}
    reg.estimator_step(features(seed=3), None)
    reg.penalty(features(b=1, seed=4), None)
    reg.eval()
    reg.penalty(features(seed=5), None)
    for k, v in before.items():
        assert torch.equal(reg.state_dict()[k], v), k


def test_running_statistics_carry_no_gradient_across_batches():
    reg = make_reg()
    reg.train()
    first = features(seed=1, requires_grad=True)
    reg.penalty(first, None)
    second = features(seed=2, requires_grad=True)
    reg.penalty(second, None).backward()
    assert all(f.grad is None for f in first.features.values())
    assert second.features["fused"].grad is not None


def test_state_dict_round_trip_gives_identical_penalty():
    reg = make_reg(seed=0)
    reg.train()
    for i in range(4):
        out = features(seed=10 + i)
        reg.estimator_step(out, None)
        reg.penalty(out, None)
    reg_state, opt_state = io.BytesIO(), io.BytesIO()
    torch.save(reg.state_dict(), reg_state)
    torch.save(reg.optimizer.state_dict(), opt_state)
    reg_state.seek(0)
    opt_state.seek(0)

    clone = make_reg(seed=42)  # other random projections and weights
    assert not torch.equal(clone.proj_joint_text, reg.proj_joint_text)
    clone.load_state_dict(torch.load(reg_state))
    clone.optimizer.load_state_dict(torch.load(opt_state))
    assert int(clone.kappa_count) == 4

    out = features(seed=20)
    for mode in ("eval", "train"):  # train mode also updates the buffers, identically
        for r in (reg, clone):
            r.train(mode == "train")
        assert clone.penalty(out, None).item() == reg.penalty(out, None).item()
    # one more C-network step (the optimiser state came along) keeps them identical
    for r in (reg, clone):
        r.train()
        r.estimator_step(out, None)
        r.eval()
    assert clone.penalty(out, None).item() == reg.penalty(out, None).item()


# -- who trains what ---------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["mmd", "kl", "gaussian_kl"])
def test_estimator_step_changes_only_the_c_network(divergence):
    backbone = nn.ModuleDict({m: nn.Linear(4, w) for m, w in DIMS.items()})
    x = torch.randn(32, 4)
    feats = {m: layer(x) for m, layer in backbone.items()}
    out = BackboneOutput(prediction=feats["text"].sum(-1), features=feats)
    reg = make_reg(divergence=divergence)
    c_before = [p.detach().clone() for p in c_network_params(reg)]
    buffers_before = {k: v.clone() for k, v in reg.named_buffers()}
    backbone_before = copy.deepcopy(backbone.state_dict())

    reg.train()
    logged = reg.estimator_step(out, None)  # not detached by the caller: must not matter
    logged.update(reg.estimator_step(out.detached(), None))

    assert set(logged) == {"synergy_l2", "synergy_d"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in logged.values())
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, backbone_before[k]) for k, v in backbone.state_dict().items())
    names = ["predictors", "flows"] + (["critics"] if divergence == "kl" else [])
    start = 0
    for name in names:
        now = list(getattr(reg, name).parameters())
        before = c_before[start: start + len(now)]
        start += len(now)
        assert any(not torch.equal(a, b) for a, b in zip(now, before)), f"{name} did not move"
    assert (reg.critics is None) == (divergence != "kl")
    for k, v in reg.named_buffers():
        assert torch.equal(v, buffers_before[k]), k  # projections and running statistics untouched
    assert reg.main_parameters() == []
    assert {id(p) for p in reg.estimator_parameters()} == {id(p) for p in c_network_params(reg)}


def test_c_network_learns_to_predict_dependent_modalities():
    reg = make_reg(hidden=32, c_lr=3e-3)
    probe = features(b=256, seed=7)
    start = reg.prediction_loss(probe.features).item()
    fit(reg, steps=150, b=64)
    assert reg.prediction_loss(probe.features).item() < 0.6 * start


@pytest.mark.parametrize("divergence", ["mmd", "kl", "gaussian_kl"])
@pytest.mark.parametrize("target", ["minimise", "gaussian_target", "gaussian_ratio"])
def test_penalty_trains_the_features_never_the_c_network(divergence, target):
    reg = make_reg(divergence=divergence, kurtosis=target, beta=0.5)
    fit(reg, steps=20)
    reg.train()
    for i in range(3):  # some running statistics, so the blend is exercised
        reg.penalty(features(seed=30 + i), None)
    reg.eval()
    reg.optimizer.zero_grad(set_to_none=True)
    out = features(requires_grad=True)

    pen = reg.penalty(out, None)
    assert pen.shape == () and pen.requires_grad and pen.dtype == torch.float32
    assert pen.item() == pytest.approx(0.5 * reg.regularisation(out).item(), rel=1e-6)
    pen.backward()
    assert all(p.grad is None for p in c_network_params(reg)), "penalty reached the C-network"
    for name, f in out.features.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, name

    # a small step of the features along −∇penalty lowers L_reg
    norm = torch.sqrt(sum((f.grad**2).sum() for f in out.features.values()))
    stepped = BackboneOutput(out.prediction,
                             {k: (v - 0.01 * v.grad / norm).detach() for k, v in out.features.items()})
    with torch.no_grad():
        before, after = reg.regularisation(out).item(), reg.regularisation(stepped).item()
    assert after < before, (before, after)


def test_each_term_is_weighted_by_its_gamma():
    reg = make_reg(beta=2.0, gamma_l2=0.5, gamma_d=3.0, gamma_kappa=0.25)
    reg.eval()
    out = features()
    t = reg.terms(out)
    expected = 2.0 * (0.5 * t["l2"] + 3.0 * t["d"] + 0.25 * t["kappa"])
    assert reg.penalty(out, None).item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(v.item() != 0.0 for v in t.values())


# -- numerical safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["mmd", "kl", "gaussian_kl"])
@pytest.mark.parametrize("b", [1, 2])
def test_batches_of_one_and_two_are_finite(divergence, b):
    reg = make_reg(divergence=divergence)
    reg.train()
    for _ in range(2):  # once with empty running statistics, once with some
        out = features(b=b, requires_grad=True)
        logged = reg.estimator_step(out, None)
        assert all(math.isfinite(v) for v in logged.values())
        terms = reg.terms(out)
        assert all(torch.isfinite(v) for v in terms.values())
        if b == 1:
            assert terms["d"].item() == 0.0 and terms["kappa"].item() == 0.0
        pen = reg.penalty(out, None)
        assert torch.isfinite(pen)
        pen.backward()
        for name, f in out.features.items():
            if b == 1 and name == "fused":  # only L_L2 is defined for one row, and it reads no fused
                assert f.grad is None
            else:
                assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0, name
    assert int(reg.kappa_count) == (0 if b == 1 else 2)


@pytest.mark.parametrize("divergence", ["mmd", "kl"])
@pytest.mark.parametrize("kurtosis", ["minimise", "gaussian_target", "gaussian_ratio"])
@pytest.mark.parametrize("kind", ["constant", "huge", "tiny"])
def test_degenerate_features_stay_finite(kind, kurtosis, divergence):
    reg = make_reg(kurtosis=kurtosis, divergence=divergence)
    reg.train()
    out = features()
    scale = {"constant": 0.0, "huge": 1e4, "tiny": 1e-4}[kind]
    feats = {k: (v * scale if kind != "constant" else torch.ones_like(v)).requires_grad_(True)
             for k, v in out.features.items()}
    out = BackboneOutput(out.prediction, feats)
    for _ in range(2):
        assert all(math.isfinite(v) for v in reg.estimator_step(out, None).values())
        pen = reg.penalty(out, None)
        assert torch.isfinite(pen)
    pen.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats.values())


def test_wide_fused_representation_is_projected_for_the_kurtosis():
    dims = {**DIMS, "fused": 300}
    reg = make_reg(dims=dims, kurtosis_dim=8)
    assert reg.kappa_proj.shape == (300, 8) and reg.kappa_cov.shape == (8, 8)
    torch.testing.assert_close(reg.kappa_proj.T @ reg.kappa_proj, torch.eye(8), rtol=0, atol=1e-5)
    narrow = make_reg(kurtosis_dim=64)  # wider than the fused vector: no projection
    assert narrow.kappa_proj is None and narrow.kappa_cov.shape == (12, 12)
    full = make_reg(dims=dims, kurtosis_dim=None)  # the paper: κ of the full fused vector
    assert full.kappa_proj is None and full.kappa_cov.shape == (300, 300)
    full.train()
    assert torch.isfinite(full.penalty(features(b=16, dims=dims), None))
    out = features(b=16, dims=dims)
    reg.train()
    assert torch.isfinite(reg.penalty(out, None))


def test_concat_joint_uses_the_unimodal_widths():
    reg = make_reg(joint="concat")
    assert reg.proj_joint_text.shape == (6 + 5 + 7, SMALL["proj_dim"])
    assert torch.isfinite(reg.penalty(features(), None))


# -- config and registry --------------------------------------------------------------------------------


def test_config_and_registry():
    assert get_regulariser("synergy") is Synergy
    cfg = build_dataclass(SynergyConfig, {"c_lr": 3e-4, "bandwidths": [1, 2.5], "divergence": "kl"})
    assert cfg.estimator_lr == 3e-4 and cfg.bandwidths == (1.0, 2.5)
    assert make_reg(inner_steps=3).inner_steps == 3 and make_reg().inner_steps == 1
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(SynergyConfig, {"gamma_k": 1.0})
    for key, value in [("divergence", "js"), ("cov_decay", 1.0), ("diag_load", 0.0), ("beta", -1.0),
                       ("bandwidths", []), ("proj_dim", 1), ("kurtosis", "zero"),
                       ("cov_update", "mean"), ("g_network", "flow"), ("l2_reduction", "max"),
                       ("kurtosis_dim", 0), ("kurtosis_units", "sigma")]:
        with pytest.raises(ConfigError, match=key):
            build_dataclass(SynergyConfig, {key: value})
    with pytest.raises(ValueError, match="fused"):
        Synergy(SynergyConfig(), {"text": 4, "audio": 4, "vision": 4})
    with pytest.raises(RuntimeError, match="build_optimizer"):
        Synergy(SynergyConfig(**SMALL), DIMS).estimator_step(features(), None)


# -- in the loop ---------------------------------------------------------------------------------------


def test_loop_resumes_exactly_with_the_c_network_and_running_statistics(small_data, tmp_path):
    """Through the real loop and its checkpoint: the C-network, its optimiser and the running
    kurtosis statistics all come back, so a resumed trial continues exactly."""
    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    flat = {"backbone": "tfn", "regulariser": "synergy", "max_epochs": 3, "batch_size": 16, "patience": 0,
            "seed": 3, "backbone.text_hidden": 16, "backbone.post_fusion_dim": 16,
            **{f"regulariser.{k}": v for k, v in SMALL.items()}}
    full = Trainer(TrialConfig.from_flat(flat), small_data).fit()
    assert all(math.isfinite(h["train_penalty"]) for h in full)
    assert {"train_synergy_l2", "train_synergy_d"} <= set(full[-1])
    first = Trainer(TrialConfig.from_flat(flat), small_data)
    first.run_epoch()
    assert int(first.reg.kappa_count) > 0
    first.save(tmp_path)
    second = Trainer(TrialConfig.from_flat(flat), small_data)
    second.load(tmp_path)
    rest = [second.run_epoch(), second.run_epoch()]
    for history in (full[1:], rest):
        for h in history:
            h.pop("epoch_seconds")
    assert full[1:] == rest
