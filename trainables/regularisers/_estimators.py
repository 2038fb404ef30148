"""Mutual-information estimators shared by the regularisers (and by the MI benchmark).

Every estimator follows one contract (the habit of CLUB's ``mi_estimators.py``):

    forward(x, y)        -> the estimate, a scalar in nats, differentiable w.r.t. x, y and θ
    learning_loss(x, y)  -> the scalar the estimator's own parameters θ minimise

Nothing about the task model leaks in: the caller decides what is detached, which optimiser
steps which parameters, and whether θ is frozen while gradients flow into the features
(:func:`call_frozen`). Rows of ``x`` and ``y`` are paired samples of p(x, y), shape (n, d_x) and
(n, d_y).

Contents, by kind (add new estimators to the matching section):

- helpers: :func:`call_frozen`, :func:`gaussian_log_prob`
- entropies: :func:`gaussian_entropy`, :func:`class_mixture_entropy` (MMIM's H(Y))
- variational conditionals: :class:`GaussianConditional`, q(y|x) = N(μ(x), diag σ²(x))
  (the q of BA, and of CLUB)
- lower bounds: :class:`BarberAgakov` (BA), :class:`InfoNCE` (CPC)
- upper bounds: :class:`CLUB` (MIRD)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "BarberAgakov",
    "CLUB",
    "GaussianConditional",
    "InfoNCE",
    "call_frozen",
    "class_mixture_entropy",
    "gaussian_entropy",
    "gaussian_log_prob",
]

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2PIE = math.log(2.0 * math.pi * math.e)
#: |log σ²| limit of GaussianConditional (σ² in [e^-10, e^10] ≈ [4.5e-5, 2.2e4]); a soft bound, so
#: that a dimension of y that x predicts exactly cannot drive log σ² (and log q) to infinity
_LOGVAR_LIMIT = 10.0


# ---------------------------------------------------------------------------------- helpers


def call_frozen(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` with its parameters detached: gradients reach the inputs but
    never the module's parameters (how a penalty uses an estimator that its own optimiser trains).
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args, kwargs)


def gaussian_log_prob(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(y; μ, diag e^logvar) per row: −½ Σ_k [(y−μ)²/σ² + log σ² + log 2π], (n, d) -> (n,).

    The −½ log σ² term is what makes this a normalised density. MMIM's official MMILB drops it
    (and the constant): its "likelihood" −(y−μ)²/(2σ²) is then maximised by σ² -> ∞, so the BA
    bound built on it is no bound at all.
    """
    return -0.5 * ((y - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=-1)


# ---------------------------------------------------------------------------------- entropies


def gaussian_entropy(y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Entropy (nats) of a Gaussian fitted to the rows of ``y``: ½ log det(2πe Σ̂), (n, d) -> ().

    Σ̂ is the unbiased sample covariance (divisor n − 1, or 1 for a single row) plus ``eps``·I.
    The diagonal loading keeps Σ̂ positive definite when there are fewer rows than dimensions
    (n ≤ d gives a rank ≤ n − 1 sample covariance; one row gives Σ̂ = 0): without it log det is
    −inf and its gradient NaN. With it, a direction the rows do not span contributes ½ log(2πe·ε):
    finite, and constant in the features (its gradient is zero). The log-determinant is taken in
    float64 (cheap at these widths) so that ill-conditioned Σ̂ keeps its precision.
    """
    n, d = y.shape
    y64 = y.double()
    centred = y64 - y64.mean(dim=0, keepdim=True)  # (n, d)
    cov = centred.T @ centred / max(n - 1, 1)  # (d, d)
    cov = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (0.5 * (d * _LOG_2PIE + torch.logdet(cov))).to(y.dtype)


def class_mixture_entropy(
    y: torch.Tensor, groups: torch.Tensor, num_groups: int, eps: float = 1e-5,
    weights: str = "proportional",
) -> torch.Tensor:
    """MMIM's approximation of H(Y) for a Gaussian mixture with one component per class.

    ``groups`` (n,) long gives each row's component in [0, num_groups); rows with any other value
    (e.g. −1) are left out. With n_c rows in component c and w_c = n_c / Σ n_c (``weights=
    "proportional"``) or w_c = 1 / (number of components with rows) (``"equal"``: MMIM's Eq. 7-8,
    w_pos = w_neg = ½),

        H(Y) ≈ Σ_c w_c · ½ log det(2πe Σ̂_c)          (Σ̂_c: see :func:`gaussian_entropy`)

    i.e. the mixture's entropy is replaced by the weighted entropies of its components. A mixture
    entropy has no closed form; this sum is its lower bound by concavity of entropy, and it differs
    from the upper bound Σ_c w_c(−log w_c + h_c) (Huber et al., 2008) by the mixing entropy
    H(w) ≤ log num_groups, which does not depend on the features. A component with no rows has
    weight 0; one with a single row has Σ̂_c = ε·I (finite, see :func:`gaussian_entropy`). With no
    rows at all the result is 0, still connected to ``y`` so ``backward`` works.
    """
    if weights not in ("proportional", "equal"):
        raise ValueError(f"weights: expected 'proportional' or 'equal', got {weights!r}")
    total = y.new_zeros(())
    counts = [int((groups == c).sum()) for c in range(num_groups)]
    n = sum(counts)
    if n == 0:
        return total + 0.0 * y.sum()
    filled = sum(1 for n_c in counts if n_c)
    for c, n_c in enumerate(counts):
        if n_c:
            w_c = n_c / n if weights == "proportional" else 1.0 / filled
            total = total + w_c * gaussian_entropy(y[groups == c], eps)
    return total


# ---------------------------------------------------------------------------------- variational conditionals


class GaussianConditional(nn.Module):
    """q(y|x) = N(y; μ(x), diag σ²(x)), μ and log σ² from two MLPs x -> hidden -> y (ReLU).

    ``forward(x, y)`` = E_p[log q(y|x)], a lower bound on −H(Y|X) (the gap is E_x KL(p(y|x) ‖
    q(y|x))); ``learning_loss`` is its negative, the likelihood fit of the BA and CLUB estimators.
    log σ² is soft-bounded to ±10 (``limit·tanh(raw/limit)``, identity near 0).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ(x), log σ²(x): (n, d_x) -> (n, d_y) each."""
        logvar = _LOGVAR_LIMIT * torch.tanh(self.logvar(x) / _LOGVAR_LIMIT)
        return self.mu(x), logvar

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(y_i|x_i) per row, (n,)."""
        mu, logvar = self.moments(x)
        return gaussian_log_prob(y, mu, logvar)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x, y).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.forward(x, y)


# ---------------------------------------------------------------------------------- lower bounds


class BarberAgakov(nn.Module):
    """Barber–Agakov lower bound (Barber & Agakov, NIPS 2003):

        I(X; Y) = H(Y) − H(Y|X) ≥ H(Y) + E_p[log q(y|x)]

    with q a :class:`GaussianConditional`. The bound is tight when q = p(y|x). H(Y) does not
    depend on q: ``forward(x, y, entropy)`` takes it from the caller (MMIM: a class mixture over a
    memory of batches, :func:`class_mixture_entropy`), or fits one Gaussian to the rows of ``y``
    when ``entropy`` is None (:func:`gaussian_entropy`, loaded with ``eps``). ``learning_loss`` is
    q's negative log-likelihood, the only part of the bound θ can move.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.q = GaussianConditional(x_dim, y_dim, hidden)
        self.eps = eps

    def forward(self, x: torch.Tensor, y: torch.Tensor, entropy: torch.Tensor | None = None) -> torch.Tensor:
        h = gaussian_entropy(y, self.eps) if entropy is None else entropy
        return h + self.q(x, y)

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.q.learning_loss(x, y)


class InfoNCE(nn.Module):
    """InfoNCE / CPC lower bound (van den Oord et al., 2018) with a predictor g: x -> ŷ.

    Scores are cosine similarities over a temperature, s_ij = cos(y_i, g(x_j)) / τ, and

        I(X; Y) ≥ log n + E_i[s_ii − logsumexp_j s_ij]  =  log n − L_NCE

    (``negatives="predictions"``, the default: for each true y_i, which of the n predictions in the
    batch came from its own x; MMIM's official CPC), or with logsumexp_j s_ji (``"targets"``: for
    each prediction g(x_i), which of the n y_j is its own; MMIM's Eq. 11). Both are InfoNCE bounds
    on the same I(X; Y); they differ in which side the batch's other rows are negatives for. The
    estimate never exceeds log n. With τ = 1 (MMIM) the scores lie in [−1, 1], so even perfectly aligned
    pairs cannot get near log n; smaller τ lets strongly dependent pairs approach it.

    g is linear for ``layers=1`` (MMIM's default), else ``layers`` linear maps with tanh between
    them (width d_y). Zero vectors are normalised with a floor (``F.normalize``) rather than
    divided by a zero norm (MMIM's official CPC gives NaN on an all-zero row).

    ``learning_loss`` = L_NCE − log n = −estimate: in MMIM, g is trained with the model on the
    total loss (the caller puts g's parameters in the model optimiser).
    """

    def __init__(self, x_dim: int, y_dim: int, layers: int = 1, temperature: float = 1.0,
                 negatives: str = "predictions") -> None:
        super().__init__()
        if negatives not in ("predictions", "targets"):
            raise ValueError(f"InfoNCE negatives: expected 'predictions' or 'targets', got {negatives!r}")
        #: what each pair is contrasted against: "predictions", the true y_i against all g(x_j)
        #: (softmax over j of s_ij); "targets", the prediction g(x_i) against all y_j (MMIM's
        #: Eq. 11: the other rows' h_m are the negatives)
        self.negatives = negatives
        if layers < 1:
            raise ValueError(f"InfoNCE layers: expected an integer >= 1, got {layers}")
        if temperature <= 0:
            raise ValueError(f"InfoNCE temperature: expected a number > 0, got {temperature}")
        modules: list[nn.Module] = [nn.Linear(x_dim, y_dim)]
        for _ in range(layers - 1):
            modules += [nn.Tanh(), nn.Linear(y_dim, y_dim)]
        self.predictor = nn.Sequential(*modules)
        self.temperature = temperature

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s_ij = cos(y_i, g(x_j)) / τ, (n, n)."""
        pred = nn.functional.normalize(self.predictor(x), dim=-1)  # (n, d_y)
        true = nn.functional.normalize(y, dim=-1)  # (n, d_y)
        return true @ pred.T / self.temperature  # (n, n)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.scores(x, y)  # (n, n): s_ij = cos(y_i, g(x_j)) / τ
        n = s.shape[0]
        dim = 1 if self.negatives == "predictions" else 0
        return math.log(n) + (s.diagonal() - torch.logsumexp(s, dim=dim)).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.forward(x, y)


# ---------------------------------------------------------------------------------- upper bounds


class CLUB(nn.Module):
    """CLUB, the contrastive log-ratio upper bound (Cheng et al., ICML 2020, Eq. 3 and 7):

        I_CLUB = E_p(x,y)[log q(y|x)] − E_p(x) E_p(y)[log q(y|x)]

    with q a :class:`GaussianConditional` fitted by likelihood (``learning_loss`` = −E_p log q(y|x),
    the paper's Algorithm 1). With q = p(y|x) this is an upper bound on I(X; Y) (Theorem 3.1); with
    a learned q (vCLUB) it stays one while KL(p(x, y) ‖ q(x, y)) ≤ KL(p(x)p(y) ‖ q(x, y))
    (Theorem 3.2), which a well-fitted q meets; a poorly fitted q can fall below the true MI.

    The second term averages log q(y_j|x_i) over all n² pairs of the batch (j = i included, as in
    the authors' ``mi_estimators.py``), in closed form: mean_j (y_j − μ_i)² = (μ_i − ȳ)² + s²_y
    per dimension (s²_y the batch variance, divisor n), so it costs O(n·d) rather than O(n²·d).
    The normalising terms of log q (½ log σ², ½ log 2π) are the same in both terms of row i and
    cancel. One row gives exactly 0 (its only pair is the joint one).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int) -> None:
        super().__init__()
        self.q = GaussianConditional(x_dim, y_dim, hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.q.moments(x)  # (n, d_y) each
        joint = (y - mu) ** 2  # (n, d_y): −2σ²·log q(y_i|x_i) up to the normaliser
        y_mean = y.mean(dim=0, keepdim=True)  # (1, d_y)
        y_var = y.var(dim=0, unbiased=False, keepdim=True)  # (1, d_y)
        product = (mu - y_mean) ** 2 + y_var  # (n, d_y): mean_j (y_j − μ_i)²
        return (0.5 * (product - joint) * torch.exp(-logvar)).sum(dim=-1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.q.learning_loss(x, y)
