"""Each MI bound, fed its optimal critic, gives the true mutual information of correlated
Gaussians (I = −½ log(1 − ρ²) per pair), at three correlations and with tight tolerances: the
formulas themselves (MDM's Eq. 6 and 7, Barber–Agakov, InfoNCE, CLUB's closed form), apart from
how well a critic is trained (the training tests are in test_mdm.py and test_mmim.py).

The optimal critics: DV (kl) T* = log p(x,y)/(p(x)p(y)); NWJ (f) T* = 1 + that log ratio; BA the
true conditional q = p(y|x) = N(ρx, 1 − ρ²), with which the bound is tight; InfoNCE the log ratio
as its score (a lower bound that reaches I as the batch grows); CLUB, with q = p(y|x), gives its
closed form ρ²/(1 − ρ²), an upper bound of I."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.backbones.base import BackboneOutput
from trainables.config import build_dataclass
from trainables.regularisers._estimators import _LOGVAR_LIMIT, CLUB, BarberAgakov, InfoNCE
from trainables.regularisers.mdm import MDM, MDMConfig

RHOS = (0.3, 0.6, 0.8)
N = 200_000  # samples: the Monte Carlo error of the DV/NWJ terms is < 1.1% at ρ = 0.8
TOL = {"rel": 0.03, "abs": 2e-3}  # halving (or doubling) any estimate fails at every ρ


def true_mi(rho: float) -> float:
    return -0.5 * math.log(1.0 - rho**2)


def log_ratio(x: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    """log p(x, y) / (p(x) p(y)) of a standard bivariate Gaussian pair with correlation ρ."""
    s = 1.0 - rho**2
    return -0.5 * math.log(s) - (rho**2 * x**2 - 2 * rho * x * y + rho**2 * y**2) / (2 * s)


def pairs(rho: float, n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y with correlation ρ and independent noise v, each (n, 1) float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1.0 - rho**2) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y, torch.randn(n, 1, generator=g, dtype=torch.float64)


class OptimalCritic(nn.Module):
    """T(z) = log ratio of (text, audio) + ``shift``, on MDM's unimodal input [z_l; z_a; z_v]."""

    def __init__(self, rho: float, shift: float) -> None:
        super().__init__()
        self.rho, self.shift = rho, shift

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return log_ratio(z[:, 0], z[:, 1], self.rho) + self.shift


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("estimator,shift", [("kl", 0.0), ("f", 1.0)])
def test_mdm_dv_and_nwj_with_the_optimal_critic_give_the_true_mi(estimator, shift, rho):
    """MDM's own estimate (joint rows against the independently permuted product rows, Eq. 6/7)
    with T* in place of its network: vision is independent noise, so the total correlation
    KL(p ‖ Π p_j) is I(text; audio)."""
    x, y, v = pairs(rho)
    reg = MDM(build_dataclass(MDMConfig, {"input": "unimodal", "estimator": estimator,
                                          "output": "none"}), {"text": 1, "audio": 1, "vision": 1})
    reg.critic = OptimalCritic(rho, shift)
    torch.manual_seed(1)  # the product sample's permutations
    out = BackboneOutput(prediction=torch.zeros(N), features={"text": x, "audio": y, "vision": v})
    with torch.no_grad():
        assert reg.dependency(out).item() == pytest.approx(true_mi(rho), **TOL)


def true_conditional(module: nn.Module, rho: float) -> None:
    """Set a GaussianConditional (hidden 2) to p(y|x) = N(ρx, 1 − ρ²): μ = ρ·relu(x) − ρ·relu(−x),
    log σ² the constant log(1 − ρ²) through the soft bound limit·tanh(raw/limit)."""
    with torch.no_grad():
        module.mu[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        module.mu[0].bias.zero_()
        module.mu[2].weight.copy_(torch.tensor([[rho, -rho]]))
        module.mu[2].bias.zero_()
        for layer in (module.logvar[0], module.logvar[2]):
            layer.weight.zero_()
            layer.bias.zero_()
        module.logvar[2].bias.fill_(_LOGVAR_LIMIT * math.atanh(math.log(1 - rho**2) / _LOGVAR_LIMIT))


@pytest.mark.parametrize("rho", RHOS)
def test_barber_agakov_with_the_true_conditional_is_the_true_mi(rho):
    x, y, _ = pairs(rho)
    ba = BarberAgakov(1, 1, hidden=2).double()
    true_conditional(ba.q, rho)
    with torch.no_grad():
        mu, logvar = ba.q.moments(x[:3])
        assert torch.allclose(mu, rho * x[:3]) and torch.allclose(logvar.exp(), torch.tensor(1 - rho**2, dtype=torch.float64))
        assert ba(x, y).item() == pytest.approx(true_mi(rho), **TOL)


@pytest.mark.parametrize("rho", RHOS)
def test_club_with_the_true_conditional_is_its_closed_form_upper_bound(rho):
    x, y, _ = pairs(rho)
    club = CLUB(1, 1, hidden=2).double()
    true_conditional(club.q, rho)
    with torch.no_grad():
        value = club(x, y).item()
    assert value == pytest.approx(rho**2 / (1 - rho**2), **TOL)
    assert value > true_mi(rho)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("negatives", ["predictions", "targets"])
def test_infonce_with_the_optimal_score_is_the_true_mi(negatives, rho):
    """s_ij = log ratio(x_j, y_i) (the score of y_i against x_j, as InfoNCE.scores orders it).
    One batch of 2048 (an n × n score matrix): the estimate's standard error is ~0.005 at ρ = 0.8
    (its positive term is a mean of log ratios), hence the wider absolute tolerance; halving the
    estimate still fails at every ρ."""
    x, y, _ = pairs(rho, 2048)
    nce = InfoNCE(1, 1, negatives=negatives)
    nce.scores = lambda a, b: log_ratio(a[None, :, 0], b[:, None, 0], rho)
    with torch.no_grad():
        assert nce(x, y).item() == pytest.approx(true_mi(rho), rel=0.03, abs=0.015)
