"""MIRD regulariser: CLUB mutual-information minimisation + reconstruction, combined in logs.

Qian, Han, Li, He, Zheng, Zheng, "Mutual Information-based Representations Disentanglement for
Unaligned Multimodal Language Sequences" (MIRD; ``shared/papers/mird-qian.txt``). With the
private codes z^L, z^A, z^V, the shared code z^S and the inputs X^m, the paper minimises (Eq. 21)

    L = L_reg + L_recon + α · L_mim
    L_reg   = log MSE(ŷ, y)                                  (Eq. 18)
    L_recon = Σ_m log L_recon^m                              (Eq. 19)
    L_mim   = Σ_{pairs of {z^L, z^A, z^V, z^S}} Î(·;·)  +  Σ_m Î(X^m; z^S)      (Eq. 20)

each Î a CLUB estimate (Cheng et al., ICML 2020; :class:`~trainables.regularisers._estimators.CLUB`,
Eq. 10-12): Î = mean_i log q(y_i|x_i) − mean_{i,j} log q(y_j|x_i), q a Gaussian whose mean and
log-variance come from two-layer MLPs (§4.3: hidden 32), fitted by its negative log-likelihood
(Eq. 13, 15, 22) for T' = ``inner_steps`` (5) Adam steps at ``club_lr`` (1e-3) before each model
step (Algorithm 1). One CLUB network per pair. Directions (``pair_order="paper"``): q(z^S|z^m)
for the shared pairs (Eq. 10), q(z^L|z^V), q(z^A|z^V), q(z^A|z^L) for the private pairs (the
order of θ_var after Eq. 15), and q(z^S|X^m) for the input terms (Eq. 14-15). The input terms are
the paper's (Eq. 14, 20; ablated in Table 4, row 2): CLUB between z^S and each X^m, with X^m
summarised by its masked mean over valid time steps (the backbone's ``"input_<m>"`` feature) —
the paper does not say how a sequence enters its two-layer estimator; a mean over time is the
simplest summary a fully connected network can read.

How the terms reach the loop (which calls ``combine(task_loss, penalty(out, batch))``):

- :meth:`MIRDRegulariser.penalty` = α·L_mim + ``recon_weight``·Σ_m log L_recon^m, with the CLUB
  networks frozen (gradients reach the features, never q). L_recon^m = MSE(``recon_<m>``,
  ``target_<m>``) over *all* rows of the batch.
- :meth:`MIRDRegulariser.combine` = log L_task + penalty.

So the total is the paper's L (Eq. 21) when ``task_loss: mse`` (the MIRD space fixes it); L_mim is
not logged, as the paper says (its estimates can be negative). Every log is taken of
max(L, 1e-8) so a zero loss cannot give −inf. Unlabeled rows (``batch.labeled`` False; the split
rate s = ``TrialConfig.unlabeled_rate``, Algorithm 1's X^unlabeled) are left out of L_task by the
loop and so contribute only reconstruction and MI terms (§3.7); when a batch has no labeled row,
the loop's task loss is 0 and its log term is dropped (0), not floored. ``log_losses=False``
gives the plain sum L_task + Σ_m L_recon^m + α·L_mim instead.

On other backbones the regulariser uses what exists: the CLUB pairs among whichever of
``text``/``audio``/``vision``/``shared`` the backbone has (the three unimodal pairs on EF-LSTM,
TFN, ...); the input terms need ``shared`` and ``input_<m>``; the reconstruction terms need
``recon_<m>`` and ``target_<m>`` (only the ``mird`` backbone has them). The log combination of the
task loss applies everywhere (it is part of the method).

Departures, each a named option (docs/fidelity.md has the full table):

- ``standardise=False`` (default) feeds CLUB the raw codes, as Eq. 20 writes L_mim on z^m, z^S and
  X^m themselves. ``standardise=True`` (a named option) standardises every feature over the batch
  per dimension, (z − mean)/√(var + ε) with a relative ε (:func:`standardise`), with gradients
  through the statistics. MI is invariant to such maps, but CLUB with a learned q is not: the
  model can lower the estimate just by shrinking its codes faster than q's variance follows.
  Standardised, the penalty depends only on the codes' dependence structure (docs/fidelity.md has
  the measurement). q's log σ² is soft-bounded to ±10 (the shared ``GaussianConditional``) so
  that q can fit the conditional variance of standardised codes.
- ``pair_order="shared_first"``: q(z^m|z^S) and q(X̄^m|z^S) instead of the paper's directions
  (both bound the same MI; the learned estimates differ).
- The α default 0.1 is the paper's MOSI best (Fig. 7); the grid α ∈ {0.01, 0.1, 1, 10} and
  s ∈ {0..5} are the paper's (§5.6-5.7).

Where the paper is silent we follow it in spirit and say so: the estimator is updated on the
current batch's detached features, before the model step (Algorithm 1's order; the authors'
script updates it after the model step, on a fresh forward pass).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch
from trainables.regularisers._estimators import CLUB, call_frozen
from trainables.regularisers.base import Regulariser

__all__ = [
    "CODES",
    "LOG_FLOOR",
    "MIRDRegulariser",
    "MIRDRegulariserConfig",
    "code_pairs",
    "log_loss",
    "reconstruction_errors",
    "reconstruction_modalities",
    "reconstruction_term",
    "standardise",
    "zero_like_features",
]

#: the smallest loss a log is taken of (log 1e-8 ≈ −18.4): a zero loss cannot give −inf
LOG_FLOOR = 1e-8
#: the codes whose pairs are disentangled, the shared one first (it is x in its pairs)
CODES = ("shared", *MODALITIES)
#: feature-key prefixes of the mird backbone (kept in sync with trainables.backbones.mird, which
#: a regulariser must not import)
RECON_PREFIX, TARGET_PREFIX, INPUT_PREFIX = "recon_", "target_", "input_"


@dataclass
class MIRDRegulariserConfig:
    """MIRD's regulariser hyper-parameters (the paper, §4.3 and Fig. 7; the authors' script where
    the paper is silent). The split rate s is ``TrialConfig.unlabeled_rate``, not a field here."""

    #: α, the weight of the summed CLUB estimates [0.01, 0.1, 1, 10]
    alpha: float = 0.1
    #: T', CLUB likelihood steps per model step
    inner_steps: int = 5
    #: Adam learning rate of the CLUB networks (their own optimiser, §4.3; see ``estimator_lr``)
    club_lr: float = 1e-3
    #: hidden width of q's mean and log-variance MLPs (§4.3: 32)
    hidden: int = 32
    #: weight of the (log) reconstruction terms
    recon_weight: float = 1.0
    #: include I(z_S; X^m) for each modality (needs the ``shared`` and ``input_<m>`` features)
    use_input_mi: bool = True
    #: standardise features over the batch before CLUB (a named departure, see the module
    #: docstring); False = the raw codes of Eq. 20 (the paper)
    standardise: bool = False
    #: CLUB's conditioning direction: ``paper`` q(z^S|z^m), q(z^S|X^m) (Eq. 10-15), or
    #: ``shared_first`` q(z^m|z^S), q(X̄^m|z^S) (this code's earlier choice)
    pair_order: Literal["paper", "shared_first"] = "paper"
    #: L = log L_task + Σ log L_recon + α L_MI (the paper); False: L_task + Σ L_recon + α L_MI
    log_losses: bool = True

    @property
    def estimator_lr(self) -> float:
        """The learning rate the loop gives ``reg.build_optimizer``."""
        return self.club_lr

    def validate(self) -> None:
        for name in ("alpha", "recon_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.inner_steps < 0:
            raise ConfigError(f"inner_steps: expected an integer >= 0, got {self.inner_steps}")
        if self.club_lr <= 0:
            raise ConfigError(f"club_lr: expected a number > 0, got {self.club_lr}")
        if self.hidden < 1:
            raise ConfigError(f"hidden: expected an integer >= 1, got {self.hidden}")


# -------------------------------------------------------------------------------------- helpers


#: the paper's (x, y) pairs, q(y|x): θ_var's list after Eq. 15 — (V, L), (V, A), (L, A), then
#: (m, S) with q(z^S|z^m) (Eq. 10-13)
_PAPER_PAIRS = (("vision", "text"), ("vision", "audio"), ("text", "audio"),
                ("vision", "shared"), ("text", "shared"), ("audio", "shared"))


def code_pairs(feature_dims: dict[str, int], order: str = "shared_first") -> list[tuple[str, str]]:
    """The pairs among the codes present, as (x, y) with CLUB's q(y|x).

    ``"paper"``: the paper's direction, q(z^S|z^m) (Eq. 10-13) and q(z^L|z^V), q(z^A|z^V),
    q(z^A|z^L) (the order of θ_var after Eq. 15). ``"shared_first"``: (shared, text), ...,
    (audio, vision) — q(z^m|z^S) (the order the orthogonality baseline uses; symmetric there).
    """
    present = [name for name in CODES if name in feature_dims]
    if order == "paper":
        return [(x, y) for x, y in _PAPER_PAIRS if x in present and y in present]
    return list(itertools.combinations(present, 2))


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(z − mean)/√(var + ε) per dimension over the batch (divisor n), with gradients through the
    statistics. ε = ``eps`` × the mean variance of z's dimensions (+1e-12), relative rather than
    absolute so that the result is exactly invariant to z's scale: with an absolute ε, codes
    shrunk to variances near ε would still lower the CLUB estimate. A single row (or a constant
    dimension) becomes 0."""
    mean = z.mean(dim=0, keepdim=True)  # (1, d)
    var = z.var(dim=0, unbiased=False, keepdim=True)  # (1, d)
    floor = eps * var.mean() + 1e-12
    return (z - mean) / torch.sqrt(var + floor)


def log_loss(loss: torch.Tensor) -> torch.Tensor:
    """log max(loss, LOG_FLOOR); exactly 0 for a loss of exactly 0 (the loop's task loss of a batch
    without labeled rows), so that such a batch adds no constant and no gradient."""
    floored = torch.log(loss.clamp(min=LOG_FLOOR))
    return torch.where(loss > 0, floored, torch.zeros_like(floored))


def reconstruction_modalities(feature_dims: dict[str, int]) -> list[str]:
    """The modalities whose reconstruction and target the backbone provides."""
    return [m for m in MODALITIES if RECON_PREFIX + m in feature_dims and TARGET_PREFIX + m in feature_dims]


def reconstruction_errors(
    features: dict[str, torch.Tensor], modalities: list[str]
) -> dict[str, torch.Tensor]:
    """MSE(recon_m, target_m) over all rows and entries, per modality (scalars)."""
    return {
        m: ((features[RECON_PREFIX + m].float() - features[TARGET_PREFIX + m].float()) ** 2).mean()
        for m in modalities
    }


def reconstruction_term(
    features: dict[str, torch.Tensor], modalities: list[str], weight: float, use_logs: bool
) -> torch.Tensor | None:
    """weight · Σ_m log L_recon^m (or Σ_m L_recon^m); None when the backbone reconstructs nothing."""
    if not modalities or weight == 0:
        return None
    errors = reconstruction_errors(features, modalities)
    total = sum(log_loss(e) if use_logs else e for e in errors.values())
    return weight * total


def zero_like_features(out: BackboneOutput) -> torch.Tensor:
    """A zero scalar still connected to the features, so ``backward`` works on it."""
    return sum((f.sum() * 0.0 for f in out.features.values()), out.prediction.new_zeros(()))


# -------------------------------------------------------------------------------------- the regulariser


class MIRDRegulariser(Regulariser):
    name = "mird"
    config_class = MIRDRegulariserConfig

    def __init__(self, config: MIRDRegulariserConfig, feature_dims: dict[str, int]) -> None:
        super().__init__(config, feature_dims)
        pairs = code_pairs(feature_dims, config.pair_order)
        if config.use_input_mi and "shared" in feature_dims:
            inputs = [INPUT_PREFIX + m for m in MODALITIES if INPUT_PREFIX + m in feature_dims]
            # Eq. 14-15: q(z^S | X^m), X^m summarised by its masked mean over time
            pairs += ([(x, "shared") for x in inputs] if config.pair_order == "paper"
                      else [("shared", x) for x in inputs])
        if not pairs:
            raise ValueError(
                "regulariser 'mird' needs at least two of the features "
                f"{', '.join(CODES)}; the backbone has {', '.join(sorted(feature_dims))}"
            )
        #: (x, y) feature names of each CLUB term; the module key is f"{x}__{y}"
        self.pairs = pairs
        self.clubs = nn.ModuleDict(
            {f"{x}__{y}": CLUB(feature_dims[x], feature_dims[y], config.hidden) for x, y in pairs}
        )
        self.recon = reconstruction_modalities(feature_dims)

    @property
    def inner_steps(self) -> int:
        return self.config.inner_steps

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Adam over the CLUB networks, as the paper (§4.3: Adam, lr 1e-3, for the MIM module)."""
        params = self.estimator_parameters()
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None
        return self.optimizer

    # -- estimates ---------------------------------------------------------------------------------

    def _inputs(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The features CLUB reads, in float32, standardised if configured."""
        names = {name for pair in self.pairs for name in pair}
        prep = standardise if self.config.standardise else (lambda t: t)
        return {name: prep(features[name].float()) for name in names}

    def estimates(self, out: BackboneOutput, frozen: bool = True) -> dict[str, torch.Tensor]:
        """I_CLUB per pair (key f"{x}__{y}"), differentiable w.r.t. the features; with ``frozen``
        the CLUB networks' parameters are detached (the penalty's view)."""
        f = self._inputs(out.features)
        est = {}
        for x, y in self.pairs:
            club = self.clubs[f"{x}__{y}"]
            est[f"{x}__{y}"] = call_frozen(club, f[x], f[y]) if frozen else club(f[x], f[y])
        return est

    def learning_loss(self, out: BackboneOutput) -> torch.Tensor:
        """What the CLUB networks minimise: Σ_pairs −E_p log q(y|x) (their likelihood fit)."""
        f = self._inputs(out.features)
        return sum(self.clubs[f"{x}__{y}"].learning_loss(f[x], f[y]) for x, y in self.pairs)

    # -- the Regulariser contract ------------------------------------------------------------------

    def estimator_step(self, out: BackboneOutput, batch: Batch) -> dict[str, float]:
        """One likelihood step of every q on detached features (float32, autocast off: the CLUB
        optimiser has no gradient scaler). Logs the summed CLUB estimate before the step, the
        summed negative log-likelihood, and the reconstruction MSEs."""
        out = out.detached()
        out = BackboneOutput(out.prediction.float(), {k: v.float() for k, v in out.features.items()})
        errors = reconstruction_errors(out.features, self.recon)
        stats = {f"mird_recon_{m}": float(e) for m, e in errors.items()}
        if len(out.prediction) < 2:  # one row: no product sample, CLUB is 0 and q learns nothing
            return {"mird_club": 0.0, **stats}
        if self.optimizer is None:
            raise RuntimeError("MIRDRegulariser.estimator_step before build_optimizer(config.estimator_lr)")
        with torch.autocast(out.prediction.device.type, enabled=False):
            with torch.no_grad():
                club = sum(self.estimates(out, frozen=True).values())
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.learning_loss(out)
            loss.backward()
            self.optimizer.step()
        return {"mird_club": float(club), "mird_club_nll": float(loss.detach()), **stats}

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:
        """α·Σ I_CLUB (q frozen) + recon_weight·Σ_m log L_recon^m; see :meth:`combine`."""
        zero = zero_like_features(out)
        with torch.autocast(out.prediction.device.type, enabled=False):
            total = zero
            if len(out.prediction) >= 2 and self.config.alpha > 0:
                total = total + self.config.alpha * sum(self.estimates(out, frozen=True).values())
            c = self.config
            recon = reconstruction_term(out.features, self.recon, c.recon_weight, c.log_losses)
            if recon is not None:
                total = total + recon
        return total

    def combine(self, task_loss: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """log L_task + penalty (the paper's L); ``task_loss + penalty`` with ``log_losses=False``.

        A task loss of exactly 0 (a batch without labeled rows) contributes 0, not log(floor).
        """
        if not self.config.log_losses:
            return task_loss + penalty
        return log_loss(task_loss.float()) + penalty
