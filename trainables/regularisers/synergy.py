"""Synergy / C-Network regulariser (Shankar, "Neural Dependency Coding inspired Multimodal Fusion",
arXiv 2110.00385): Sec. 4.1 (the three C-network losses), Sec. 2.2 (KL via Donsker–Varadhan, MMD),
Sec. 2.3 (Mardia's kurtosis), App. C (network shapes) and the algorithm of App. D.

The paper prints no equation numbers. The code cites sections and the steps of the App. D
algorithm, labelled here in the order the paper lists them:

    D1  encode X_i to Z_i, fuse to Z                                    (the backbone; the loop)
    D2  L_L2 = Σ_j ‖Q_i(Z^j_{−i}) − Z^j_i‖²                              prediction_loss
    D3  L_d  = d(p(g_i(Z^j_i)), p(g_i(Z^j)))                             alignment_loss
    D4  Z^j_diff = clip(Z^j − Z̄)                                         kurtosis
    D5  S = α·S + Σ_j Z^j_diff Z^jᵀ_diff / N                             kurtosis
    D6  L_κ = 1/N Σ_j [((Z^j − Z̄)ᵀ (S + diag(c))⁻¹ (Z^j − Z̄))²]         kurtosis, kurtosis_loss
    D7  L_reg = γ_L2·L_L2 + γ_d·L_d + γ_κ·L_κ                            _weighted
    D8  θ_C ← θ_C − η_MI ∇_θC L_reg          (the C-network: Q_i, g_i)   estimator_step
    D9  θ ← θ − η_task ∇_θ [L_task + β·L_reg]  (everything but θ_C)      penalty (+ the loop)

``docs/fidelity.md`` (section "Synergy / C-network") has the same list as a table: where each step
lives, and which named option departs from it and why.

What the defaults do (each "as the paper" unless it says otherwise):

- L_L2 (Sec. 4.1, D2): Q_i predicts Z_i from Z_{−i} = [Z_j]_{j≠i}; the squared error norm (summed
  over Z_i's dimensions) is averaged over the batch and summed over the modalities
  (``l2_reduction="norm"``). Sec. 4.1 writes the per-example ‖Q_i(Z_{−i}) − Z_i‖²; D2 sums it over
  the batch, which differs by the factor N and would tie γ_L2 to the batch size (a grid key):
  ``"sum"`` is D2 literally, ``"mse"`` also averages over dimensions (this module's earlier default).
- Q_i (App. C): "a four layer MLP with LeakyRelu activation": four Linear layers, LeakyReLU
  between them, no output activation. The paper gives no widths; the hidden width is ``hidden``.
- g_i (Sec. 4.1 and App. C): "a random projection of the features into a smaller dimensional
  vector space and then ... an invertible neural network", and App. C: g is "a four layer MLP with
  LeakyRelu activation". Both hold for ``g_network="mlp"`` (default): a fixed Gaussian projection
  P to ``proj_dim`` = k dims, then four square k × k Linear layers with LeakyReLU between them —
  invertible whenever the four weight matrices are (LeakyReLU is a bijection), which they are at
  their orthogonal initialisation and almost surely after it (:class:`InvertibleMLP` has the exact
  inverse). ``g_network="coupling"`` uses RealNVP affine couplings instead (invertible by
  construction, whatever the weights). Invertibility is what stops the minimising g_i from mapping
  both samples to one point (Sec. 4.1); a trained MLP's weights can still drift towards singular,
  which ``coupling`` rules out. Z_i and Z have different widths, so one matrix cannot project
  both: g_i has one projection per input width and one invertible network for both (the paper is
  silent on this).
- Z in L_d is the fused representation (D3: g_i(Z^j), Z the fused vector of D1); ``joint="concat"``
  uses [Z_text; Z_audio; Z_vision] instead.
- d (Sec. 4.1, "we use the MMD discrepancy ... and KL divergence"; Tables 2-3 report both, SMMD
  and SKL): ``divergence="mmd"`` (default; the paper's better variant and its ablation's) is the
  Gaussian-kernel MMD² of Sec. 2.2. The paper names no kernel or bandwidth: ours is the mean of
  Gaussian kernels at ``bandwidths`` × the median pairwise distance. Sec. 2.2 prints the estimator
  as sums over all pairs; we use the unbiased means (no (i, i) pairs; the cross term also leaves
  out the pairs (j, j), because the two samples are paired rows of one batch), so the value does
  not grow with N². ``divergence="kl"`` is the paper's KL: Sec. 2.2's neural Donsker–Varadhan
  estimate KL(P ‖ Q) ≥ E_P[T] − log E_Q[e^T] (:class:`DonskerVaradhanKL`), P = p(g_i(Z_i)), Q =
  p(g_i(Z)) (d(p; q) = E_p log p/q, Sec. 2.2), one critic T_i per modality. The paper prints the
  bound without the log, E_P[T] − E_Q[e^T]. That is a bound on KL too, a looser one: log x ≤ x − 1
  puts it at least 1 below the DV bound, its supremum is KL − 1 (NWJ's bound with T shifted by
  one), and its maximiser T* = log p/q is also a maximiser of DV. We use the log because the text
  names Donsker–Varadhan and MINE, whose bound has it, and it is the tighter of the two. The
  critic's shape is not given: we use App. C's four-layer LeakyReLU MLP.
  ``divergence="gaussian_kl"`` is the closed-form KL between Gaussian fits (not the paper's: it
  sees only means and covariances, and is unbounded in their ratio).
- The kurtosis (Sec. 2.3, Sec. 4.1, D4-D6) of the fused representation Z, with the batch mean Z̄
  (D4), differences Z^j − Z̄ whose norm is capped (D4, Sec. 4.1 "(a) we cap the max norm of the
  difference vectors"), the covariance S updated as S ← α·S + Σ_j Z_diff Z_diffᵀ / N (D5,
  ``cov_update="sum"``), diagonal loading S + diag(c) (D6, Sec. 4.1 "(b)"), and the unclipped
  differences in L_κ (D6). L_κ = κ is *minimised* (``kurtosis="minimise"``; Sec. 4.1: the
  representations "should have low kurtosis").
  Choices where the paper is silent: S starts at 0 (so after the first batch S is that batch's
  clipped covariance); the cap is ``kurtosis_clip`` × the batch's root-mean-square difference norm
  (detached; no value is given, and a relative cap keeps κ independent of the feature scale); c is
  ε·(tr S / k) + 1e-6 with ε = ``diag_load`` (relative, detached); α = ``cov_decay``; S is a buffer
  holding detached values, and gradients flow through this batch's term of D5 only (never across
  batches). D5 adds Σ/N without a (1 − α) factor, so S settles near Σ/(1 − α) and κ near (1 − α)²
  times Mardia's value; the weight γ_κ absorbs that constant.
  Units: D6 writes L_κ = κ, and the paper gives no γ_κ; by default (``kurtosis_units="gaussian"``)
  L_κ = κ / (k(k+2)), κ divided by Mardia's Gaussian value k(k+2) for the k-wide fused code: a
  constant factor per backbone, so the minimiser is the paper's and γ_κ's range is on a common
  order of magnitude (k is 32 to 944 in the synergy space). It does not make γ_κ mean the same on
  every backbone: under D5's lagging S, L_κ on Gaussian codes settles near 0.007-0.009 for k = 32-128
  and near 0.0033 for k = 384. ``kurtosis_units="raw"`` is κ itself: on TFN (k = 64, fused std
  ~0.04 at the start) raw κ's gradient is ~100-400× the task loss's even at β = 0.01, so with the
  gradient clip the task cannot train (valid MAE stays at the constant predictor's on the
  synthetic set).
  Named options that depart: ``kurtosis="gaussian_target"`` penalises (κ/κ_G − 1)², the relative
  distance to the value κ_G a Gaussian batch with this batch's covariance would give under the same
  S (it also penalises light tails, which the paper does not); ``"gaussian_ratio"`` penalises
  κ/κ_G (scale-free). ``cov_update="ema"``: S ← α·S + (1 − α)·Σ/N, which keeps κ on Mardia's scale
  (d(d+2) for a Gaussian). ``clip_in_kappa=True`` also caps the differences inside L_κ (Sec. 4.1
  says the norms are capped "during estimation"; D6 uses the raw differences). ``kurtosis_dim=k``
  first maps Z by a fixed random orthonormal projection to k dims (not the paper's: a cheaper,
  better conditioned k × k S on wide fused vectors; κ is affine invariant, so a Gaussian stays
  Gaussian). Sec. 4.1 also allows unimodal Z_i in the kurtosis; D6 uses the fused Z only, and so do we.
  With minimising κ and a lagging S (D5: S holds past batches, the current one enters with weight
  1 against ~1/(1 − α) for the history), shrinking the fused code also lowers κ: at steady state
  d log L_κ / d log scale ≈ 3 (measured on Gaussian codes: 2.4-3.2 for k = 32-128, 1.1 at k = 384;
  the ideal lag gives 4 − 4(1 − α) = 3.6), so most of L_κ's gradient shrinks Z, which the linear
  head can undo by growing its weights. This is D5/D6 as written; the task loss and β decide how
  far it goes (the paper does not discuss it; docs/fidelity.md says so too).
- Who minimises what (D7-D9): the C-network (Q_i, g_i) takes one AdamW step (lr ``c_lr`` = η_MI)
  on γ_L2·L_L2 + γ_d·L_d per batch in :meth:`Synergy.estimator_step` (L_κ has no C-network
  parameters), on detached features; the model's step minimises L_task + β·L_reg with the C-network
  frozen (:meth:`Synergy.penalty`: gradients reach the features, never Q or g). The KL critics T_i
  are not C-network parameters in the paper's sense: they *maximise* the DV bound (Sec. 2.2,
  "gradient ascent on the Donsker–Varadhan bound"), in the same ``estimator_step`` and optimiser,
  on detached g outputs, while g_i minimise the estimate with T_i frozen.
  One difference of order: D computes L_reg once and uses it for both D8 and D9; the loop's contract
  (``Regulariser``) recomputes L_reg in ``penalty`` after the C-network step, so D9 sees the
  C-network one step later than in D. S is updated once per model step (in ``penalty``, training
  mode only), as D5 does once per batch.
- Batches too small for a distribution: L_d and L_κ need ≥ 2 rows and are 0 for a batch of one
  (which also leaves S alone); L_L2 is per example and always defined.
- All of it runs in float32 with autocast off (Cholesky, kernels and logsumexp are not fp16-safe).

Defaults the paper does not give (ours): β = 0.1, γ_L2 = γ_d = γ_κ = 1, ``c_lr`` = 1e-3, α = 0.9,
every width, ``kurtosis_clip`` = 3, ``diag_load`` = 1e-3. The paper's grid (App. C: batch {32, 64},
lr {1e-2, 5e-3, 1e-3, 5e-4, 1e-4}, gradient clip 5, AdamW) is for the trial config, not for this
dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch
from trainables.regularisers.base import Regulariser

__all__ = [
    "AffineCoupling",
    "DonskerVaradhanKL",
    "InvertibleMLP",
    "InvertibleNet",
    "Synergy",
    "SynergyConfig",
    "clip_norms",
    "four_layer_mlp",
    "gaussian_kl",
    "gaussian_kurtosis",
    "gaussian_mmd",
    "load_covariance",
    "mardia_kurtosis",
]

#: bound on each coupling layer's log-scale: |s| ≤ 2, so one layer scales by at most e² ≈ 7.4
_MAX_LOG_SCALE = 2.0
#: absolute diagonal loading added to the relative one (keeps a constant batch invertible)
_ABS_LOAD = 1e-6


@dataclass
class SynergyConfig:
    """Synergy / C-Network hyper-parameters. The defaults are the paper's method; β, the γ's,
    ``c_lr``, α and the sizes are ours (the paper gives no values). See the module docstring."""

    #: β in L = L_task + β·L_reg (D9; the grid-able weight)
    beta: float = 0.1
    #: γ_L2: weight of the cross-modal prediction loss (D7)
    gamma_l2: float = 1.0
    #: γ_d: weight of the distribution alignment d(g_i(Z_i), g_i(Z)) (D7)
    gamma_d: float = 1.0
    #: γ_κ: weight of the kurtosis term (D7)
    gamma_kappa: float = 1.0
    #: d in L_d: "mmd" (MMD², Sec. 2.2), "kl" (Donsker–Varadhan neural estimate, Sec. 2.2, the
    #: paper's KL), "gaussian_kl" (closed-form KL between Gaussian fits; not the paper's)
    divergence: Literal["mmd", "kl", "gaussian_kl"] = "mmd"
    #: kernel widths: multiples of the median pairwise distance, or absolute σ's (median_heuristic off)
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)
    #: scale ``bandwidths`` by the (detached) median pairwise distance of the pooled sample
    median_heuristic: bool = True
    #: Z in L_d: "fused" (the backbone's fused representation) or "concat" ([Z_text; Z_audio; Z_vision])
    joint: Literal["fused", "concat"] = "fused"
    #: width k of g_i's random projection (and of its invertible network)
    proj_dim: int = 16
    #: invertible part of g_i: "mlp" (four square LeakyReLU layers, App. C) or "coupling" (RealNVP)
    g_network: Literal["mlp", "coupling"] = "mlp"
    #: hidden width of the predictors Q_i, the KL critics T_i and the coupling conditioners
    hidden: int = 64
    #: affine coupling layers in each invertible network f_i (g_network "coupling" only; 0: g_i = P)
    coupling_layers: int = 4
    #: L_L2 reduction: "norm" (batch mean of ‖·‖², Sec. 4.1), "sum" (batch sum, D2), "mse" (mean
    #: over the batch and the dimensions)
    l2_reduction: Literal["norm", "sum", "mse"] = "norm"
    #: L_κ: "minimise" (κ itself, the paper), "gaussian_target" ((κ/κ_G − 1)²), "gaussian_ratio" (κ/κ_G)
    kurtosis: Literal["minimise", "gaussian_target", "gaussian_ratio"] = "minimise"
    #: units of L_κ = κ ("minimise"): "gaussian" divides by k(k+2), a Gaussian's κ (a constant: the
    #: same minimiser; γ_κ then means the same on every fused width), "raw" is κ itself
    kurtosis_units: Literal["gaussian", "raw"] = "gaussian"
    #: None: κ of the full fused vector (the paper); k: of a fixed random orthonormal k-dim projection
    kurtosis_dim: int | None = None
    #: cap on each difference vector's norm (D4), in multiples of the batch's RMS difference norm
    kurtosis_clip: float = 3.0
    #: also cap the differences inside L_κ (D6 uses the raw ones)
    clip_in_kappa: bool = False
    #: "sum": S ← α·S + Σ/N (D5); "ema": S ← α·S + (1 − α)·Σ/N
    cov_update: Literal["sum", "ema"] = "sum"
    #: relative diagonal loading ε: S + diag(c), c = ε·(tr S / k) + 1e-6 (D6)
    diag_load: float = 1e-3
    #: α, the decay of S (D5)
    cov_decay: float = 0.9
    #: C-network updates per model step (D8: one)
    inner_steps: int = 1
    #: η_MI, the AdamW learning rate of the C-network and the KL critics (see ``estimator_lr``)
    c_lr: float = 1e-3

    @property
    def estimator_lr(self) -> float:
        """The learning rate the loop gives ``reg.build_optimizer``."""
        return self.c_lr

    def validate(self) -> None:
        for key in ("beta", "gamma_l2", "gamma_d", "gamma_kappa"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected a number >= 0, got {getattr(self, key)}")
        if not self.bandwidths or any(not b > 0 for b in self.bandwidths):
            raise ConfigError(f"bandwidths: expected a non-empty list of numbers > 0, "
                              f"got {list(self.bandwidths)}")
        if self.proj_dim < 2:
            raise ConfigError(f"proj_dim: expected an integer >= 2 (a coupling layer splits it), "
                              f"got {self.proj_dim}")
        if self.hidden < 1:
            raise ConfigError(f"hidden: expected an integer >= 1, got {self.hidden}")
        if self.coupling_layers < 0:
            raise ConfigError(f"coupling_layers: expected an integer >= 0, got {self.coupling_layers}")
        if self.kurtosis_dim is not None and self.kurtosis_dim < 1:
            raise ConfigError(f"kurtosis_dim: expected an integer >= 1 or null (the full width), "
                              f"got {self.kurtosis_dim}")
        if not self.kurtosis_clip > 0:
            raise ConfigError(f"kurtosis_clip: expected a number > 0, got {self.kurtosis_clip}")
        if not self.diag_load > 0:
            raise ConfigError(f"diag_load: expected a number > 0, got {self.diag_load}")
        if not 0.0 <= self.cov_decay < 1.0:
            raise ConfigError(f"cov_decay: expected a number in [0, 1), got {self.cov_decay}")
        if self.inner_steps < 0:
            raise ConfigError(f"inner_steps: expected an integer >= 0, got {self.inner_steps}")
        if not self.c_lr > 0:
            raise ConfigError(f"c_lr: expected a number > 0, got {self.c_lr}")


# -- networks (App. C: "a four layer MLP with LeakyRelu activation") ------------------------------


def four_layer_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """App. C's Q (and our KL critic): Linear d_in → h → h → h → d_out, LeakyReLU between layers."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), nn.LeakyReLU(),
        nn.Linear(hidden, d_out),
    )


class InvertibleMLP(nn.Module):
    """The invertible part of g_i (Sec. 4.1, App. C): four square k × k Linear layers with LeakyReLU
    between them. LeakyReLU is a bijection of R, so the map is invertible exactly when every weight
    matrix is; they start orthogonal (biases 0), and a trained matrix is singular with probability 0.
    ``inverse`` undoes it (``torch.linalg.solve`` per layer). The paper gives no slope: 0.2 keeps the
    inverse well conditioned (PyTorch's default 0.01 shrinks negative values up to 10⁶-fold over the
    three activations, which float32 cannot undo)."""

    def __init__(self, dim: int, layers: int = 4, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        for lin in self.linears:
            nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.linears):
            x = lin(x)  # (n, k)
            if i < len(self.linears) - 1:
                x = F.leaky_relu(x, self.negative_slope)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.linears))):
            if i < len(self.linears) - 1:
                y = torch.where(y >= 0, y, y / self.negative_slope)  # LeakyReLU⁻¹
            lin = self.linears[i]
            y = torch.linalg.solve(lin.weight, (y - lin.bias).T).T  # (n, k)
        return y


# -- the invertible network f_i ----------------------------------------------------------------


class AffineCoupling(nn.Module):
    """One RealNVP affine coupling layer on R^k: one half of the coordinates passes through and
    conditions an affine map of the other half, y_b = x_b · e^s(x_a) + t(x_a).

    ``flip`` swaps which half conditions, so that stacked layers transform every coordinate.
    """

    def __init__(self, dim: int, hidden: int, flip: bool) -> None:
        super().__init__()
        self.dim, self.flip = dim, flip
        self.split = dim // 2
        n_cond = dim - self.split if flip else self.split
        n_trans = dim - n_cond
        self.net = nn.Sequential(nn.Linear(n_cond, hidden), nn.ReLU(), nn.Linear(hidden, 2 * n_trans))
        # each layer starts as the identity: s = t = 0
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning half, transformed half) of x (n, k)."""
        a, b = x[:, : self.split], x[:, self.split :]
        return (b, a) if self.flip else (a, b)

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([trans, cond] if self.flip else [cond, trans], dim=-1)  # (n, k)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(cond).chunk(2, dim=-1)  # (n, k_b) each
        return _MAX_LOG_SCALE * torch.tanh(s / _MAX_LOG_SCALE), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond, trans = self._halves(x)
        s, t = self._scale_shift(cond)
        return self._join(cond, trans * torch.exp(s) + t)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, trans = self._halves(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (trans - t) * torch.exp(-s))


class InvertibleNet(nn.Module):
    """f: R^k -> R^k, ``layers`` affine couplings on alternating halves; ``inverse`` undoes it."""

    def __init__(self, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AffineCoupling(dim, hidden, flip=bool(i % 2)) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


# -- statistics ----------------------------------------------------------------------------------


def load_covariance(cov: torch.Tensor, diag_load: float) -> torch.Tensor:
    """Σ + ε·(tr Σ / k)·I + 1e-6·I for Σ (k, k): relative loading plus an absolute floor."""
    k = cov.shape[-1]
    scale = torch.diagonal(cov).mean().clamp(min=0.0).detach()
    eye = torch.eye(k, dtype=cov.dtype, device=cov.device)
    return cov + (diag_load * scale + _ABS_LOAD) * eye


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖x_a − y_b‖² (n, m) by explicit differences: exact, and its gradient at 0 is 0 (no sqrt)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0),
                 median_heuristic: bool = True) -> torch.Tensor:
    """Unbiased MMD² between samples x (n, k) and y (n, k) — paired rows, so the cross term omits
    the pairs (b, b) — with the kernel (1/|σ|) Σ_b exp(−‖·‖² / 2σ_b²), so MMD² ≤ 2 whatever the
    number of bandwidths. σ_b = bandwidths[b] × the detached median pairwise distance of the pooled
    sample, or bandwidths[b] itself. Needs n ≥ 2."""
    n = x.shape[0]
    if n < 2 or y.shape[0] != n:
        raise ValueError(f"gaussian_mmd needs two samples of the same size >= 2, got {n} and {y.shape[0]}")
    d_xx, d_yy, d_xy = _pairwise_sq(x, x), _pairwise_sq(y, y), _pairwise_sq(x, y)  # (n, n) each
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)  # (n, n)
    if median_heuristic:
        pooled = torch.cat([d_xx[off], d_yy[off], d_xy[off]]).detach()
        base = pooled.clamp(min=0.0).median().sqrt()
    else:
        base = x.new_ones(())
    mmd = x.new_zeros(())
    for mult in bandwidths:
        inv = 1.0 / (2.0 * (mult * base) ** 2).clamp(min=1e-12)
        k_xx, k_yy, k_xy = (torch.exp(-d * inv) for d in (d_xx, d_yy, d_xy))
        mmd = mmd + k_xx[off].mean() + k_yy[off].mean() - 2.0 * k_xy[off].mean()
    return mmd / len(bandwidths)


def _mean_cov(x: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)  # (k,)
    c = x - mu  # (n, k)
    return mu, c.T @ c / (x.shape[0] - 1 if unbiased else x.shape[0])  # (k, k)


def gaussian_kl(x: torch.Tensor, y: torch.Tensor, diag_load: float = 1e-3) -> torch.Tensor:
    """KL(N(μ_x, Σ_x) ‖ N(μ_y, Σ_y)) between Gaussian fits to x (n, k) and y (m, k), unbiased
    covariances loaded as :func:`load_covariance`. Needs n, m ≥ 2."""
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("gaussian_kl needs at least 2 rows in each sample")
    k = x.shape[1]
    mu_x, cov_x = _mean_cov(x, unbiased=True)
    mu_y, cov_y = _mean_cov(y, unbiased=True)
    l_x = torch.linalg.cholesky(load_covariance(cov_x, diag_load))  # (k, k)
    l_y = torch.linalg.cholesky(load_covariance(cov_y, diag_load))
    a = torch.linalg.solve_triangular(l_y, l_x, upper=False)  # L_y⁻¹ L_x: tr(Σ_y⁻¹ Σ_x) = ‖a‖²_F
    m = torch.linalg.solve_triangular(l_y, (mu_y - mu_x)[:, None], upper=False)  # (k, 1)
    logdet = 2.0 * (torch.log(torch.diagonal(l_y)).sum() - torch.log(torch.diagonal(l_x)).sum())
    return 0.5 * ((a**2).sum() + (m**2).sum() - k + logdet)


class DonskerVaradhanKL(nn.Module):
    """Neural KL estimate (Sec. 2.2; Belghazi et al. 2018's MINE on the Donsker–Varadhan bound):

        KL(P ‖ Q) ≥ E_{x∼P}[T(x)] − log E_{y∼Q}[e^{T(y)}]

    for every critic T, with equality at T = log dP/dQ + const. ``forward(x, y)`` is the bound on
    samples x ∼ P (n, k) and y ∼ Q (m, k); ``learning_loss`` its negative (the critic ascends the
    bound). A trained critic's estimate stays below the true KL (up to sampling noise). log E_Q[e^T]
    is ``logsumexp(T) − log m``, so e^T is never formed. T is App. C's four-layer LeakyReLU MLP
    (the paper does not say which critic it uses). The paper prints E_P[T] − E_Q[e^T] without the
    log; with it, as here, it is the Donsker–Varadhan bound the text names.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.critic = four_layer_mlp(dim, hidden, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_p = self.critic(x).squeeze(-1)  # (n,)
        t_q = self.critic(y).squeeze(-1)  # (m,)
        return t_p.mean() - (torch.logsumexp(t_q, dim=0) - math.log(t_q.shape[0]))

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.forward(x, y)


def clip_norms(diff: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """D4's clip: each row of ``diff`` (n, k) scaled down to norm ≤ ``max_norm`` (direction kept)."""
    norms = (diff**2).sum(-1, keepdim=True).clamp(min=1e-24).sqrt()  # (n, 1); no NaN gradient at 0
    return diff * (max_norm / norms).clamp(max=1.0)


def gaussian_kurtosis(cov: torch.Tensor, diag_load: float = 1e-3, batch_cov: torch.Tensor | None = None,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """The expected :func:`mardia_kurtosis` of Gaussian data N(mean + offset, batch_cov) whitened
    with ``cov`` (k, k), loaded as :func:`load_covariance`: E‖w‖⁴ for w ~ N(δ, C),

        (tr C + ‖δ‖²)² + 2 tr C² + 4 δᵀCδ,   C = L⁻¹ Σ_b L⁻ᵀ, δ = L⁻¹ offset.

    ``batch_cov`` defaults to ``cov`` and ``offset`` to 0, giving k(k+2) when the loading is
    negligible. κ_G of ``kurtosis="gaussian_target"``/``"gaussian_ratio"``."""
    batch_cov = cov if batch_cov is None else batch_cov
    chol = torch.linalg.cholesky(load_covariance(cov, diag_load))  # (k, k)
    half = torch.linalg.solve_triangular(chol, batch_cov, upper=False)  # L⁻¹ Σ_b
    c = torch.linalg.solve_triangular(chol, half.T, upper=False)  # L⁻¹ Σ_b L⁻ᵀ (Σ_b symmetric)
    trace, trace_sq = torch.diagonal(c).sum(), (c**2).sum()
    if offset is None:
        return trace**2 + 2.0 * trace_sq
    delta = torch.linalg.solve_triangular(chol, offset[:, None], upper=False)  # (k, 1)
    return (trace + (delta**2).sum()) ** 2 + 2.0 * trace_sq + 4.0 * (delta.T @ c @ delta).squeeze()


def mardia_kurtosis(z: torch.Tensor, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None,
                    diag_load: float = 1e-3, max_norm: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mardia's multivariate kurtosis (Sec. 2.3; the estimator of Sec. 4.1 and D6)

        κ = 1/n Σ_j [((z_j − μ)ᵀ (Σ + diag(c))⁻¹ (z_j − μ))²]       (d(d+2) for a Gaussian)

    of z (n, k). μ and Σ default to the batch's (maximum-likelihood Σ, as in Sec. 4.1 and Mardia's
    b_2); Σ is loaded as in :func:`load_covariance`. With ``max_norm`` the differences are first
    capped as in :func:`clip_norms`.
    """
    if mean is None or cov is None:
        batch_mean, batch_cov = _mean_cov(z, unbiased=False)
        mean = batch_mean if mean is None else mean
        cov = batch_cov if cov is None else cov
    diff = z - mean  # (n, k)
    if max_norm is not None:
        diff = clip_norms(diff, max_norm)
    chol = torch.linalg.cholesky(load_covariance(cov, diag_load))  # (k, k)
    u = torch.linalg.solve_triangular(chol, diff.T, upper=False)  # (k, n): L⁻¹(z − μ)
    return ((u**2).sum(0) ** 2).mean()


# -- the regulariser ---------------------------------------------------------------------------


class Synergy(Regulariser):
    name = "synergy"
    config_class = SynergyConfig

    def __init__(self, config: SynergyConfig, feature_dims: dict[str, int]) -> None:
        super().__init__(config, feature_dims)
        needed = (*MODALITIES, "fused")
        missing = [m for m in needed if m not in feature_dims]
        if missing:
            raise ValueError(
                f"regulariser 'synergy' reads features {', '.join(needed)}; the backbone lacks "
                f"{', '.join(missing)} (has {', '.join(sorted(feature_dims))})"
            )
        c = config
        dims = {m: feature_dims[m] for m in MODALITIES}
        d_joint = feature_dims["fused"] if c.joint == "fused" else sum(dims.values())
        k = c.proj_dim
        # Q_i: Z_{-i} -> Z_i, App. C's four-layer LeakyReLU MLP
        self.predictors = nn.ModuleDict({
            m: four_layer_mlp(sum(dims[o] for o in MODALITIES if o != m), c.hidden, dims[m])
            for m in MODALITIES
        })
        # the invertible part of g_i (Sec. 4.1, App. C)
        self.flows = nn.ModuleDict({
            m: InvertibleMLP(k) if c.g_network == "mlp" else InvertibleNet(k, c.hidden, c.coupling_layers)
            for m in MODALITIES
        })
        # d = KL (Sec. 2.2): one Donsker–Varadhan critic per modality, trained to ascend its bound
        self.critics = (nn.ModuleDict({m: DonskerVaradhanKL(k, c.hidden) for m in MODALITIES})
                        if c.divergence == "kl" else None)
        # the fixed random projections of g_i: one per input width (buffers: saved, never trained)
        for m in MODALITIES:
            self.register_buffer(f"proj_{m}", torch.randn(dims[m], k) / math.sqrt(dims[m]))
            self.register_buffer(f"proj_joint_{m}", torch.randn(d_joint, k) / math.sqrt(d_joint))
        # the kurtosis: S of D5 over the fused vector (or a fixed orthonormal projection of it)
        d_f = feature_dims["fused"]
        if c.kurtosis_dim is not None and c.kurtosis_dim < d_f:
            basis = torch.linalg.qr(torch.randn(d_f, c.kurtosis_dim)).Q  # (d_f, k_κ), orthonormal columns
            k_kappa = c.kurtosis_dim
        else:
            basis, k_kappa = None, d_f
        self.register_buffer("kappa_proj", basis)
        self.register_buffer("kappa_cov", torch.zeros(k_kappa, k_kappa))  # S, starting at 0
        self.register_buffer("kappa_count", torch.zeros((), dtype=torch.long))

    @classmethod
    def reads_fused(cls, config: SynergyConfig) -> bool:
        """L_κ reads the fused Z (D6), and L_d compares with it (D3, ``joint="fused"``)."""
        return config.gamma_kappa > 0 or (config.joint == "fused" and config.gamma_d > 0)

    @property
    def inner_steps(self) -> int:
        return self.config.inner_steps

    def c_network_parameters(self) -> list[nn.Parameter]:
        """θ_C of D8: the predictors Q_i and the invertible networks of g_i (not the KL critics)."""
        return [*self.predictors.parameters(), *self.flows.parameters()]

    # -- the three terms -----------------------------------------------------------------------

    @staticmethod
    def _call(module: nn.Module, frozen: bool, *args: torch.Tensor) -> torch.Tensor:
        """``module(*args)``; ``frozen`` runs it with detached parameters (gradients reach the
        inputs, never the parameters)."""
        if not frozen:
            return module(*args)
        return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)

    def prediction_loss(self, features: dict[str, torch.Tensor], frozen: bool = True) -> torch.Tensor:
        """L_L2 (Sec. 4.1, D2): Σ_i of ‖Q_i(Z_{−i}) − Z_i‖² reduced over the batch as
        ``l2_reduction`` says (default: the batch mean)."""
        how = self.config.l2_reduction
        loss = features[MODALITIES[0]].new_zeros(())
        for m in MODALITIES:
            rest = torch.cat([features[o] for o in MODALITIES if o != m], dim=-1)  # (B, d_{-i})
            sq = (self._call(self.predictors[m], frozen, rest) - features[m]) ** 2  # (B, d_i)
            if how == "norm":
                loss = loss + sq.sum(-1).mean()
            elif how == "sum":
                loss = loss + sq.sum()
            else:
                loss = loss + sq.mean()
        return loss

    def project(self, m: str, features: dict[str, torch.Tensor],
                frozen: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_m(Z_m), g_m(Z)), each (B, proj_dim): the random projection, then the invertible net."""
        if self.config.joint == "fused":
            joint = features["fused"]  # (B, d_f)
        else:
            joint = torch.cat([features[o] for o in MODALITIES], dim=-1)  # (B, d_t + d_a + d_v)
        flow = self.flows[m]
        uni = self._call(flow, frozen, features[m] @ getattr(self, f"proj_{m}"))
        return uni, self._call(flow, frozen, joint @ getattr(self, f"proj_joint_{m}"))

    def alignment_loss(self, features: dict[str, torch.Tensor], frozen: bool = True) -> torch.Tensor:
        """L_d (Sec. 4.1, D3) = Σ_i d(p(g_i(Z_i)), p(g_i(Z))); 0 for a batch of one row. The KL
        critics are always frozen here (they ascend their bound in :meth:`critic_loss`)."""
        c = self.config
        loss = features[MODALITIES[0]].new_zeros(())
        if features[MODALITIES[0]].shape[0] < 2:
            return loss
        for m in MODALITIES:
            uni, joint = self.project(m, features, frozen)
            if c.divergence == "mmd":
                loss = loss + gaussian_mmd(uni, joint, c.bandwidths, c.median_heuristic)
            elif c.divergence == "kl":
                loss = loss + self._call(self.critics[m], True, uni, joint)
            else:
                loss = loss + gaussian_kl(uni, joint, c.diag_load)
        return loss

    def critic_loss(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """−Σ_i DV_i on detached g outputs: what the KL critics minimise (0 unless ``divergence="kl"``
        and the batch has ≥ 2 rows)."""
        loss = features[MODALITIES[0]].new_zeros(())
        if self.critics is None or features[MODALITIES[0]].shape[0] < 2:
            return loss
        for m in MODALITIES:
            with torch.no_grad():
                uni, joint = self.project(m, features, frozen=True)
            loss = loss + self.critics[m].learning_loss(uni, joint)
        return loss

    def kurtosis(self, fused: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(κ, κ_G) of the fused representation (D4-D6); needs ≥ 2 rows.

        D4: differences from the batch mean Z̄, norms capped at ``kurtosis_clip`` × their RMS.
        D5: S = α·S_run + Σ_j Z_diff Z_diffᵀ / N (``cov_update="sum"``; "ema" weights the batch
        term by 1 − α; the first batch gives S = its own term). D6: κ with the unclipped
        differences (clipped too with ``clip_in_kappa``) and S + diag(c). κ_G is the κ a Gaussian
        batch with this batch's covariance would give under the same S. With ``update`` the buffer
        S takes the (detached) new value."""
        c = self.config
        z = fused if self.kappa_proj is None else fused @ self.kappa_proj  # (B, k)
        n = z.shape[0]
        diff = z - z.mean(0)  # (B, k): Z − Z̄, the batch mean (D4)
        max_norm = c.kurtosis_clip * (diff**2).sum(-1).mean().detach().sqrt()
        clipped = clip_norms(diff, max_norm)  # (B, k): D4
        batch_term = clipped.T @ clipped / n  # (k, k): Σ_j Z_diff Z_diffᵀ / N
        if int(self.kappa_count) == 0:
            s = batch_term
        elif c.cov_update == "sum":
            s = c.cov_decay * self.kappa_cov + batch_term  # D5
        else:
            s = c.cov_decay * self.kappa_cov + (1.0 - c.cov_decay) * batch_term
        if update:
            with torch.no_grad():
                self.kappa_cov.copy_(s.detach())
                self.kappa_count += 1
        zero = torch.zeros_like(z[0])
        kappa = mardia_kurtosis(diff, zero, s, c.diag_load, max_norm if c.clip_in_kappa else None)  # D6
        reference = gaussian_kurtosis(s, c.diag_load, diff.T @ diff / n)
        return kappa, reference

    def kurtosis_loss(self, fused: torch.Tensor, update: bool = False) -> torch.Tensor:
        """L_κ (D6): κ ("minimise", the paper; divided by the constant k(k+2) with
        ``kurtosis_units="gaussian"``), (κ/κ_G − 1)² ("gaussian_target") or κ/κ_G
        ("gaussian_ratio"); 0 for a batch of one row."""
        if fused.shape[0] < 2:
            return fused.new_zeros(())
        kappa, reference = self.kurtosis(fused, update)
        c = self.config
        how = c.kurtosis
        if how == "minimise":
            k = self.kappa_cov.shape[0]
            return kappa / (k * (k + 2)) if c.kurtosis_units == "gaussian" else kappa
        ratio = kappa / reference.clamp(min=1e-12)  # a constant batch has κ = κ_G = 0
        return (ratio - 1.0) ** 2 if how == "gaussian_target" else ratio

    def terms(self, out: BackboneOutput, frozen: bool = True,
              update: bool = False) -> dict[str, torch.Tensor]:
        """The unweighted terms {"l2", "d", "kappa"} in float32, autocast off."""
        feats = {k: v.float() for k, v in out.features.items()}
        with torch.autocast(feats["fused"].device.type, enabled=False):
            return {
                "l2": self.prediction_loss(feats, frozen),
                "d": self.alignment_loss(feats, frozen),
                "kappa": self.kurtosis_loss(feats["fused"], update),
            }

    def _weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_reg (D7)."""
        c = self.config
        return c.gamma_l2 * terms["l2"] + c.gamma_d * terms["d"] + c.gamma_kappa * terms["kappa"]

    def regularisation(self, out: BackboneOutput) -> torch.Tensor:
        """L_reg = γ_L2·L_L2 + γ_d·L_d + γ_κ·L_κ with the C-network frozen; leaves S alone."""
        return self._weighted(self.terms(out, frozen=True, update=False))

    # -- the Regulariser contract --------------------------------------------------------------

    def estimator_step(self, out: BackboneOutput, batch: Batch) -> dict[str, float]:
        """D8: one step of the C-network (Q_i, g_i) descending γ_L2·L_L2 + γ_d·L_d (L_κ has no
        C-network parameters), and, with ``divergence="kl"``, of the critics ascending their DV
        bounds, on detached features — detached here too, so even a caller that forgets cannot
        reach the backbone. S is not touched."""
        if self.optimizer is None:
            raise RuntimeError("Synergy.estimator_step before build_optimizer(config.estimator_lr)")
        feats = {k: v.detach().float() for k, v in out.features.items()}
        c = self.config
        with torch.autocast(feats["fused"].device.type, enabled=False):
            l2 = self.prediction_loss(feats, frozen=False)
            d = self.alignment_loss(feats, frozen=False)
            loss = c.gamma_l2 * l2 + c.gamma_d * d + self.critic_loss(feats)
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return {"synergy_l2": float(l2.item()), "synergy_d": float(d.item())}

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:
        """β·L_reg (D9) with the C-network and critics frozen: gradients reach the features, never
        Q, g or T. In training mode this also updates S (D5, once per call)."""
        pen = self.config.beta * self._weighted(self.terms(out, frozen=True, update=self.training))
        if not pen.requires_grad:  # e.g. γ_L2 = 0 on a batch of one: stay connected for backward
            pen = pen + self._zero(out)
        return pen

    @staticmethod
    def _zero(out: BackboneOutput) -> torch.Tensor:
        """A zero scalar still connected to the features, so ``backward`` works on it."""
        zero = out.prediction.new_zeros((), dtype=torch.float32)
        return sum((f.float().sum() * 0.0 for f in out.features.values()), zero)
