"""Mutual Dependency Maximisation (Colombo, Chapuis, Labeau, Clavel, EMNLP 2021), Eq. 6-8, Alg. 1.

"Improving Multimodal Fusion via Mutual Dependency Maximisation". The task loss is regularised by
a measure D of the dependency between the unimodal representations Z = (Z_l, Z_a, Z_v) that the
backbone fuses:

    L = L_down − λ · D(Z)

D compares the joint p(Z) with the product of its marginals q = p(Z_l) p(Z_a) p(Z_v) through a
statistic network T_θ on the concatenation z = [z_l; z_a; z_v] (d = d_l + d_a + d_v):

    kl  (Eq. 6, Donsker–Varadhan):  D = E_p[T] − log E_q[e^T]
    f   (Eq. 7, f-divergence/NWJ):  D = E_p[T] − E_q[e^(T−1)]
    w   (Eq. 8, Wasserstein-1):     D = E_p[T] − E_q[T],  T 1-Lipschitz

Samples: p is the batch as it is; q is the batch with each modality's rows permuted
independently (``torch.randperm``, so the trial seed fixes it). Training (Algorithm 1): per batch,
``unroll`` critic steps that maximise D w.r.t. θ on detached Z (:meth:`MDM.estimator_step`), then
one model step on L (:meth:`MDM.penalty` gives −λ·D with θ frozen and gradients into Z).

T_θ (the paper's architecture): Linear layers d → d/2 → d → d → d/4 → d/4 → 1, LeakyReLU and
dropout 0.4 after each hidden layer, and a sigmoid on the output.

Design choices (each is a config field):

- ``output="sigmoid"`` (default, as in the paper). The sigmoid bounds T in (0, 1), which caps the
  KL estimate at 1 nat and the f estimate at 1 − 1/e, whatever the true dependency; in exchange D
  stays O(1), so the λ grid means the same thing across backbones and the DV/NWJ exponentials can
  never overflow. ``output="none"`` gives the usual unbounded MINE/NWJ critic, whose estimates are
  proper lower bounds on the total correlation KL(p ‖ q) (the test suite checks them against the
  closed form on Gaussians).
- ``lipschitz="gp"`` (default) for ``w``: the paper clips the critic's weights (WGAN) to keep T
  Lipschitz. Clipping caps capacity and makes the critic's scale depend on the clip constant; we
  use a gradient penalty as in WGAN-GP (Gulrajani et al. 2017) on random interpolates ẑ between
  joint and product samples, added to the critic loss only, in its one-sided form
  ``gp_weight·E[max(0, ‖∇T(ẑ)‖ − 1)²]`` (Petzka et al. 2018): the two-sided form also forces the
  slope up to 1, which fights the sigmoid output (in our runs on Gaussians it kept the sigmoid
  critic's "w" estimate near 0 where the one-sided form found the dependency).
  ``lipschitz="spectral"`` wraps every critic layer in spectral normalisation instead. With either,
  dropout in training mode rescales activations by 1/(1−p), so T is only Lipschitz up to that
  factor while dropout is on; the GP variant measures the network as it runs, so it absorbs it.
- Numerical safety: the KL term uses ``logsumexp(T_q) − log n`` (no overflow of e^T); the f
  term clamps T − 1 at ``_MAX_EXPONENT`` (= 30) before the exponential (inactive with the sigmoid;
  with ``output="none"`` it stops one runaway critic value from turning the loss into inf, at the
  price of a zero gradient for values past the clamp).
- A batch of one row has no product sample distinct from the joint (its only permutation is
  itself); D is defined as 0 there and the critic is not updated.
- The DV term's gradient is biased in mini-batches; MINE corrects it with a moving average of
  E_q[e^T]. The paper describes no correction, and we add none.

Sources: the paper's text and the project's notes on it (PAPERS.md); the authors' code was not
available to check these choices against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch
from trainables.regularisers.base import Regulariser

__all__ = ["MDM", "MDMConfig", "StatisticNetwork"]

#: largest exponent the f-divergence term feeds to exp (e^30 ≈ 1e13, finite in float32, where
#: autocast runs exp)
_MAX_EXPONENT = 30.0


@dataclass
class MDMConfig:
    """MDM hyper-parameters. The paper fixes ``unroll`` (10), the critic's dropout (0.4) and its
    sigmoid output; it gives no λ grid and no critic learning rate (ours: 0.1 and 1e-3)."""

    #: λ in L = L_down − λ·D(Z)
    weight: float = 0.1
    #: dependency measure: "kl" (Donsker–Varadhan, Eq. 6), "f" (NWJ, Eq. 7), "w" (Wasserstein, Eq. 8)
    estimator: Literal["kl", "f", "w"] = "kl"
    #: critic steps per model step (Algorithm 1's Unroll)
    unroll: int = 10
    #: AdamW learning rate of the critic T_θ (its own optimiser; see ``estimator_lr``)
    critic_lr: float = 1e-3
    #: dropout after each hidden layer of T_θ
    dropout: float = 0.4
    #: T_θ's output: "sigmoid" (the paper) or "none" (unbounded)
    output: Literal["sigmoid", "none"] = "sigmoid"
    #: how "w" keeps T 1-Lipschitz: "gp" gradient penalty, "spectral" spectral normalisation
    lipschitz: Literal["gp", "spectral"] = "gp"
    #: weight of the gradient penalty (WGAN-GP's 10); used only with estimator "w" and lipschitz "gp"
    gp_weight: float = 10.0

    @property
    def estimator_lr(self) -> float:
        """The learning rate the loop gives ``reg.build_optimizer`` (every regulariser config
        with estimator networks exposes one under this name)."""
        return self.critic_lr

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: expected a number >= 0, got {self.weight}")
        if self.unroll < 0:
            raise ConfigError(f"unroll: expected an integer >= 0, got {self.unroll}")
        if self.critic_lr <= 0:
            raise ConfigError(f"critic_lr: expected a number > 0, got {self.critic_lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout}")
        if self.gp_weight < 0:
            raise ConfigError(f"gp_weight: expected a number >= 0, got {self.gp_weight}")


class StatisticNetwork(nn.Module):
    """T_θ: R^d -> R, the paper's MLP d → d/2 → d → d → d/4 → d/4 → 1 (widths floored at 1)."""

    def __init__(self, d: int, dropout: float, output: str, spectral: bool) -> None:
        super().__init__()
        widths = [d, max(1, d // 2), d, d, max(1, d // 4), max(1, d // 4), 1]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(w_in, w_out)
            layers.append(spectral_norm(linear) if spectral else linear)
            if i < len(widths) - 2:
                layers += [nn.LeakyReLU(), nn.Dropout(dropout)]
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (n, d) -> T (n,)."""
        return self.net(z).squeeze(-1)


class MDM(Regulariser):
    name = "mdm"
    config_class = MDMConfig

    def __init__(self, config: MDMConfig, feature_dims: dict[str, int]) -> None:
        super().__init__(config, feature_dims)
        missing = [m for m in MODALITIES if m not in feature_dims]
        if missing:
            raise ValueError(
                f"regulariser 'mdm' reads features {', '.join(MODALITIES)}; the backbone lacks "
                f"{', '.join(missing)} (has {', '.join(sorted(feature_dims))})"
            )
        d = sum(feature_dims[m] for m in MODALITIES)
        spectral = config.estimator == "w" and config.lipschitz == "spectral"
        self.critic = StatisticNetwork(d, config.dropout, config.output, spectral)

    @property
    def inner_steps(self) -> int:
        return self.config.unroll

    # -- samples -------------------------------------------------------------------------------

    @staticmethod
    def joint(features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Samples of p: the unimodal features side by side, (B, d)."""
        return torch.cat([features[m] for m in MODALITIES], dim=-1)

    @staticmethod
    def product(features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Samples of q = Π_m p(Z_m): each modality's rows permuted independently, (B, d)."""
        parts = []
        for m in MODALITIES:
            x = features[m]
            parts.append(x[torch.randperm(x.shape[0], device=x.device)])
        return torch.cat(parts, dim=-1)

    # -- the estimate --------------------------------------------------------------------------

    def _divergence(self, t_p: torch.Tensor, t_q: torch.Tensor) -> torch.Tensor:
        """D from critic values on joint (n,) and product (n,) samples: Eq. 6, 7 or 8."""
        est = self.config.estimator
        if est == "kl":
            # log E_q[e^T] = logsumexp(T_q) − log n: never forms e^T, so no overflow
            return t_p.mean() - (torch.logsumexp(t_q, dim=0) - math.log(t_q.shape[0]))
        if est == "f":
            return t_p.mean() - torch.exp((t_q - 1.0).clamp(max=_MAX_EXPONENT)).mean()
        return t_p.mean() - t_q.mean()

    def _critic_values(self, features: dict[str, torch.Tensor], frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """T on the joint and on a product sample; ``frozen`` runs T with detached parameters,
        so gradients reach the features but never θ."""
        z_p, z_q = self.joint(features), self.product(features)  # (B, d) each
        z = torch.cat([z_p, z_q], dim=0)  # (2B, d): one pass for both samples
        if frozen:
            params = {n: p.detach() for n, p in self.critic.named_parameters()}
            t = functional_call(self.critic, params, (z,))
        else:
            t = self.critic(z)
        return t[: z_p.shape[0]], t[z_p.shape[0] :]  # (B,), (B,)

    def dependency(self, out: BackboneOutput) -> torch.Tensor:
        """D(Z) on this batch, differentiable w.r.t. both θ and the features (a scalar; 0 for a
        batch of one row)."""
        if len(out.prediction) < 2:
            return self._zero(out)
        return self._divergence(*self._critic_values(out.features, frozen=False))

    def gradient_penalty(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """E[max(0, ‖∇_ẑ T(ẑ)‖ − 1)²] on ẑ = u·z_p + (1−u)·z_q, u ~ U(0, 1) per row.

        One-sided (Petzka et al., ICLR 2018) rather than WGAN-GP's two-sided (‖∇T‖ − 1)²: the
        constraint is ‖∇T‖ ≤ 1, and the two-sided form also pushes the slope *up* to 1
        everywhere, which a sigmoid-output critic can only meet with huge pre-activations (it then
        learns the penalty instead of D).
        """
        z_p, z_q = self.joint(features), self.product(features)  # (B, d) each
        u = torch.rand(z_p.shape[0], 1, device=z_p.device, dtype=z_p.dtype)  # (B, 1)
        z_hat = (u * z_p + (1.0 - u) * z_q).requires_grad_(True)  # (B, d)
        (grad,) = torch.autograd.grad(self.critic(z_hat).sum(), z_hat, create_graph=True)  # (B, d)
        return ((grad.norm(dim=-1) - 1.0).clamp(min=0.0) ** 2).mean()

    def learning_loss(self, out: BackboneOutput) -> torch.Tensor:
        """What the critic minimises: −D (+ the gradient penalty for "w" with "gp")."""
        return self._critic_objective(out)[0]

    def _critic_objective(self, out: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, D): the GP is a constraint on θ, not part of the dependency that is reported."""
        d = self.dependency(out)
        loss = -d
        c = self.config
        if c.estimator == "w" and c.lipschitz == "gp" and c.gp_weight > 0:
            loss = loss + c.gp_weight * self.gradient_penalty(out.features)
        return loss, d

    # -- the Regulariser contract --------------------------------------------------------------

    def estimator_step(self, out: BackboneOutput, batch: Batch) -> dict[str, float]:
        """One critic update maximising D w.r.t. θ; the features are detached here too, so even a
        caller that forgets ``out.detached()`` cannot reach the backbone.

        Runs in float32 with autocast off: the critic is small, and its optimiser has no gradient
        scaler, so fp16 gradients (AMP on CUDA) could underflow to zero.
        """
        out = out.detached()
        if len(out.prediction) < 2:
            return {"mdm_dependency": 0.0}
        if self.optimizer is None:
            raise RuntimeError("MDM.estimator_step before build_optimizer(config.estimator_lr)")
        out = BackboneOutput(out.prediction.float(), {k: v.float() for k, v in out.features.items()})
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(out.prediction.device.type, enabled=False):
            loss, d = self._critic_objective(out)
        loss.backward()
        self.optimizer.step()
        return {"mdm_dependency": float(d.item())}

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:
        """−λ·D(Z), with the critic frozen: gradients reach the features, never θ."""
        if len(out.prediction) < 2:
            return self._zero(out)
        d = self._divergence(*self._critic_values(out.features, frozen=True))
        return -self.config.weight * d

    @torch.no_grad()
    def scores(self, out: BackboneOutput) -> torch.Tensor:
        """T_θ on each example's joint sample, (B,): the paper's per-example explanation signal.

        With the sigmoid output this is T's logit (the value before the sigmoid): the same order
        of examples, but a trained critic drives many examples' sigmoid to exactly 1.0 in float32,
        which would tie them. Computed without dropout (eval mode) so a score does not depend on
        the draw; the module's train/eval mode is restored afterwards.
        """
        was_training = self.critic.training
        self.critic.eval()
        try:
            net = self.critic.net
            if isinstance(net[-1], nn.Sigmoid):
                net = net[:-1]
            return net(self.joint(out.features)).squeeze(-1)
        finally:
            self.critic.train(was_training)

    @staticmethod
    def _zero(out: BackboneOutput) -> torch.Tensor:
        """A zero scalar still connected to the features, so ``backward`` works on it."""
        return sum((f.sum() * 0.0 for f in out.features.values()), out.prediction.new_zeros(()))
