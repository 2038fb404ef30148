"""Mutual Dependency Maximisation (Colombo, Chapuis, Labeau, Clavel, EMNLP 2021), Eq. 5-8, Alg. 1.

"Improving Multimodal Fusion via Mutual Dependency Maximisation". The task loss is regularised by
a measure D of the dependency between the modalities as the fusion model sees them (Eq. 5):

    L = L_down − λ · D

D is estimated by a statistic network T_θ that reads the *fused* representation
Z_avl = f_θe(X_a, X_v, X_l), the input of the backbone's final linear head A_θp
(``features["fused"]``; Fig. 3 and Table 4 of the paper: d_in = dim Z_avl). Samples of the joint
p are Z_avl of a batch B; samples of the product of the marginals q = Π_j p(X_j) are
Z̄_avl = f_θe(B̄), the *same encoder* run on B̄, the batch whose audio, vision and language inputs
are permuted independently (σ_a, σ_v, σ_l of Algorithm 1; :func:`shuffle_modalities`):

    kl  (Eq. 6, Donsker–Varadhan):  D = E_p[T] − log E_q[e^T]
    f   (Eq. 7, f-divergence/NWJ):  D = E_p[T] − E_q[e^(T−1)]
    w   (Eq. 8, Wasserstein-1):     D = E_p[T] − E_q[T],  T 1-Lipschitz

Eq. 8 is printed in the paper as E_p[T] − log E_q[T]; the Wasserstein-1 distance that Eq. 4
defines has the Kantorovich–Rubinstein dual sup_{T 1-Lipschitz} E_p[T] − E_q[T] (the paper's
own sketch of proof cites Kantorovich–Rubinstein for Eq. 8), so the code uses that form. The
printed form is not a dual of W: with the sigmoid critic T > 0, so its log is always defined, but
it is unbounded: a constant T = c gives c − log c → ∞ as c → 0, so a critic maximising it runs to
T → 0 whatever the dependency.

A critic whose output is constant over an epoch (a saturated sigmoid, seen with ``w``) estimates
D = 0 for ``kl`` and ``w`` and gives the penalty no gradient: the run then trains as the baseline.
:meth:`MDM.epoch_end` detects it (T's range over every critic read of the epoch) and reports
``critic_collapsed`` (the loop logs ``train_critic_collapsed`` per epoch), with one warning line
per trial; ``tuner.report`` flags such runs. On independent modalities a constant T is a right
answer (e.g. NWJ's optimum T = 1); on dependent ones it is a collapse.

Training (Algorithm 1), per model step, in :meth:`MDM.estimator_update` and :meth:`MDM.step_penalty`:

1. ``unroll`` critic steps. Each samples its own batch B of the training set and builds its own
   B̄ from it; all 2·``unroll`` batches are encoded up front without gradients, block by block in
   the order B_1, B̄_1, B_2, ... (the encoder does not change during the unroll, so this is
   exactly the sequential algorithm, BatchNorm statistics included), and each step updates θ on
   the empirical Eq. 6/7/8 (maximising D). For a backbone that encodes each modality before
   fusing (TFN, LMF, MMIM), the loop encodes each B_i's modalities once and fuses them twice:
   B̄_i's unimodal encodings are B_i's rows permuted; TFN and LMF share only the encoders' stem
   (up to their dropout), so B̄_i draws its own dropout masks (docs/fidelity.md, "Speed").
2. The model step: the loop's own batch B, its shuffle B̄, both encoded *with* gradients; the
   penalty −λ·D(Z, Z̄) is read with T_θ frozen, so gradients reach f_θe (the fusion layers and
   everything below them, through both Z and Z̄) and never θ. For a backbone whose encoders
   have a draw-free stem (TFN, LMF: BatchNorm and the text LSTM; MMIM: its audio and vision
   LSTMs), B̄ reuses B's stem rows permuted and draws its own dropout masks
   (``encoder.shuffled``): the same computation and random draws as its own pass.

T_θ (Table 4): Linear layers d_in → d_in/2 → d_in → d_in → d_in/4 → d_in/4 → 1, LeakyReLU and
dropout 0.4 after each hidden layer, and a sigmoid on the output.

Named options (each departs from the paper; see docs/fidelity.md):

- ``input="unimodal"``: T reads the unimodal features [z_l; z_a; z_v] (d_in = d_l + d_a + d_v) and
  q is built by permuting those *features* after encoding. The MDM gradient then never reaches
  the layers between the unimodal encoders and the head. Cheaper (no B̄ forward pass).
- ``critic_batches="same"``: the ``unroll`` critic steps all run on the model step's own batch
  (and its B̄), as this project did before it followed Algorithm 1: no extra forward passes, but
  the critic fits the very rows on which the penalty is then read.

Choices where the paper is silent (the authors' code was not available to check them):

- ``output="sigmoid"`` (default, Table 4). The sigmoid bounds T in (0, 1), which caps the
  KL estimate at 1 nat and the f estimate at 1 − 1/e, whatever the true dependency; in exchange D
  stays O(1), so the λ grid means the same thing across backbones and the DV/NWJ exponentials can
  never overflow. ``output="none"`` gives the usual unbounded MINE/NWJ critic, whose estimates are
  proper lower bounds on the total correlation KL(p ‖ q) (the test suite checks them against the
  closed form on Gaussians).
- How T is kept 1-Lipschitz for ``w``: the paper only requires T ∈ L (the 1-Lipschitz functions)
  and does not say how it enforces it. ``lipschitz="gp"`` (default) adds a one-sided gradient
  penalty ``gp_weight·E[max(0, ‖∇T(ẑ)‖ − 1)²]`` on random interpolates ẑ between joint and
  product samples to the critic's loss only (Gulrajani et al. 2017; one-sided as Petzka et al.
  2018: the two-sided form also forces the slope up to 1, which fights the sigmoid output).
  ``lipschitz="spectral"`` wraps every critic layer in spectral normalisation instead. With
  either, dropout in training mode rescales activations by 1/(1−p), so T is only Lipschitz up to
  that factor while dropout is on; the GP variant measures the network as it runs, so it absorbs it.
- The unroll batches and B̄ are encoded with the backbone in training mode (dropout on), as the
  model step's are; λ and the critic's learning rate are not given (ours: grid / 1e-3).
- B̄ is the shuffle of B's own rows ("shuffling the samples from the joint distribution in a
  batch", Sec. 3.2), the permutations drawn within the batch.
- Numerical safety: the KL term uses ``logsumexp(T_q) − log n`` (no overflow of e^T); the f
  term clamps T − 1 at ``_MAX_EXPONENT`` (= 30) before the exponential (inactive with the sigmoid;
  with ``output="none"`` it stops one runaway critic value from turning the loss into inf, at the
  price of a zero gradient for values past the clamp).
- A batch of one row has no product sample distinct from the joint (its only permutation is
  itself); D is defined as 0 there and the critic is not updated.
- The DV term's gradient is biased in mini-batches; MINE corrects it with a moving average of
  E_q[e^T]. The paper describes no correction, and we add none.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch, concat_batches, modality_permutations, shuffle_modalities
from trainables.regularisers.base import Encoder, Regulariser

__all__ = ["MDM", "MDMConfig", "StatisticNetwork"]

#: largest exponent the f-divergence term feeds to exp (e^30 ≈ 1e13, finite in float32, where
#: autocast runs exp)
_MAX_EXPONENT = 30.0
#: T's spread over an epoch at or below this (relative to max(1, |T|)) counts as constant: a
#: saturated sigmoid gives exactly 1.0 (or 0.0) in float32 whatever the dropout mask
_COLLAPSE_TOL = 1e-6

log = logging.getLogger(__name__)


@dataclass
class MDMConfig:
    """MDM hyper-parameters. The paper fixes ``unroll`` (10), the critic's shape, dropout (0.4)
    and sigmoid output (Table 4); it gives no λ grid and no critic learning rate (ours: 0.1 and
    1e-3). ``input`` and ``critic_batches`` default to Algorithm 1; their other values are the
    named departures documented in docs/fidelity.md."""

    #: λ in L = L_down − λ·D (Eq. 5)
    weight: float = 0.1
    #: dependency measure: "kl" (Donsker–Varadhan, Eq. 6), "f" (NWJ, Eq. 7), "w" (Wasserstein, Eq. 8)
    estimator: Literal["kl", "f", "w"] = "kl"
    #: critic steps per model step (Algorithm 1's Unroll)
    unroll: int = 10
    #: what T_θ reads: "fused" (Z_avl, the head's input; the paper) or "unimodal" ([z_l; z_a; z_v],
    #: product sample by permuting features after encoding)
    input: Literal["fused", "unimodal"] = "fused"
    #: where the critic steps' batches come from: "fresh" (each step samples its own B and B̄,
    #: Algorithm 1) or "same" (every step on the model step's batch)
    critic_batches: Literal["fresh", "same"] = "fresh"
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
        needed = ("fused",) if config.input == "fused" else MODALITIES
        missing = [m for m in needed if m not in feature_dims]
        if missing:
            raise ValueError(
                f"regulariser 'mdm' (input={config.input}) reads features {', '.join(needed)}; the "
                f"backbone lacks {', '.join(missing)} (has {', '.join(sorted(feature_dims))})"
            )
        #: d_in of Table 4: dim Z_avl (or d_l + d_a + d_v with input="unimodal")
        self.d_in = sum(feature_dims[m] for m in needed)
        spectral = config.estimator == "w" and config.lipschitz == "spectral"
        self.critic = StatisticNetwork(self.d_in, config.dropout, config.output, spectral)
        #: B̄'s encoding from estimator_update, reused by step_penalty (critic_batches="same")
        self._pending_bar: BackboneOutput | None = None
        #: T's smallest and largest value over this epoch's critic reads in training mode
        #: (critic steps and penalty), detached tensors; reset by :meth:`epoch_end`
        self._t_range: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_collapse = False

    @classmethod
    def reads_fused(cls, config: MDMConfig) -> bool:
        """T_θ reads Z_avl (Fig. 3, Table 4) unless ``input="unimodal"``."""
        return config.input == "fused"

    @property
    def inner_steps(self) -> int:
        return self.config.unroll

    @property
    def encodes_shuffled_batch(self) -> bool:
        """The model step encodes B̄ with gradients unless ``input="unimodal"``."""
        return self.config.input == "fused"

    # -- samples -------------------------------------------------------------------------------

    @staticmethod
    def joint(features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``input="unimodal"``: samples of p, the unimodal features side by side, (B, d)."""
        return torch.cat([features[m] for m in MODALITIES], dim=-1)

    @staticmethod
    def product(features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``input="unimodal"``: samples of q, each modality's feature rows permuted
        independently after encoding, (B, d)."""
        parts = []
        for m in MODALITIES:
            x = features[m]
            parts.append(x[torch.randperm(x.shape[0], device=x.device)])
        return torch.cat(parts, dim=-1)

    def z_joint(self, out: BackboneOutput) -> torch.Tensor:
        """What T reads for the joint sample: Z_avl = ``features["fused"]`` (B, d_in), or the
        unimodal concatenation with ``input="unimodal"``."""
        return out.features["fused"] if self.config.input == "fused" else self.joint(out.features)

    def pair(self, out: BackboneOutput, out_bar: BackboneOutput | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, Z̄), each (B, d_in): Z of the batch and Z̄ = f_θe(B̄) of its modality-shuffled
        inputs (``out_bar``, required for ``input="fused"``); with ``input="unimodal"`` Z̄ is
        the features permuted after encoding and ``out_bar`` is ignored."""
        if self.config.input == "unimodal":
            return self.joint(out.features), self.product(out.features)
        if out_bar is None:
            raise ValueError("MDM with input='fused' needs Z̄ = f(B̄): pass out_bar, the backbone's "
                             "output on the batch with its modalities shuffled (shuffle_modalities)")
        return out.features["fused"], out_bar.features["fused"]

    # -- the estimate --------------------------------------------------------------------------

    def _divergence(self, t_p: torch.Tensor, t_q: torch.Tensor) -> torch.Tensor:
        """D from critic values on joint (n,) and product (n,) samples: Eq. 6, 7 or 8."""
        est = self.config.estimator
        if est == "kl":  # Eq. 6
            # log E_q[e^T] = logsumexp(T_q) − log n: never forms e^T, so no overflow
            return t_p.mean() - (torch.logsumexp(t_q, dim=0) - math.log(t_q.shape[0]))
        if est == "f":  # Eq. 7
            return t_p.mean() - torch.exp((t_q - 1.0).clamp(max=_MAX_EXPONENT)).mean()
        return t_p.mean() - t_q.mean()  # Eq. 8 as the Kantorovich–Rubinstein dual

    def _critic_values(self, z_p: torch.Tensor, z_q: torch.Tensor, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """T on the joint (B, d) and product (B, d) samples; ``frozen`` runs T with detached
        parameters, so gradients reach the samples but never θ."""
        z = torch.cat([z_p, z_q], dim=0)  # (2B, d): one pass for both samples
        if frozen:
            params = {n: p.detach() for n, p in self.critic.named_parameters()}
            t = functional_call(self.critic, params, (z,))
        else:
            t = self.critic(z)
        if self.training:
            self._track(t)
        return t[: z_p.shape[0]], t[z_p.shape[0] :]  # (B,), (B,)

    # -- critic collapse -----------------------------------------------------------------------

    @torch.no_grad()
    def _track(self, t: torch.Tensor) -> None:
        """Widen this epoch's range of T by ``t`` (no host sync: the range stays on the device)."""
        lo, hi = t.detach().min().float(), t.detach().max().float()
        if self._t_range is not None:
            lo, hi = torch.minimum(self._t_range[0], lo), torch.maximum(self._t_range[1], hi)
        self._t_range = (lo, hi)

    def epoch_end(self) -> dict[str, float]:
        """``critic_collapsed`` 1.0 when T was constant over every critic read of the epoch (its
        range within ``_COLLAPSE_TOL``), else 0.0, and ``critic_range`` (max − min of T). A
        collapsed critic reports D = 0 (``kl``, ``w``) and gives the penalty no gradient, so the
        run trains as the baseline; the first such epoch of a trial logs one warning line."""
        if self._t_range is None:
            return {}
        lo, hi = (float(v) for v in self._t_range)
        self._t_range = None
        spread = hi - lo
        collapsed = spread <= _COLLAPSE_TOL * max(1.0, abs(hi))
        if collapsed and not self._warned_collapse:
            self._warned_collapse = True
            log.warning("regulariser mdm (estimator %s): the critic's output was constant "
                        "(T = %.6g) over a whole epoch: D is 0 and the penalty has no gradient, "
                        "so this run trains as the baseline (metric train_critic_collapsed; "
                        "right only if the modalities are independent)",
                        self.config.estimator, hi)
        return {"critic_collapsed": float(collapsed), "critic_range": spread}

    def estimate(self, z_p: torch.Tensor, z_q: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """D(Z, Z̄), a scalar (0 for a batch of one row)."""
        if z_p.shape[0] < 2:
            return z_p.sum() * 0.0 + z_q.sum() * 0.0
        return self._divergence(*self._critic_values(z_p, z_q, frozen))

    def dependency(self, out: BackboneOutput, out_bar: BackboneOutput | None = None) -> torch.Tensor:
        """D on this batch, differentiable w.r.t. both θ and the features (a scalar; 0 for a
        batch of one row)."""
        return self.estimate(*self.pair(out, out_bar))

    def gradient_penalty(self, z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """E[max(0, ‖∇_ẑ T(ẑ)‖ − 1)²] on ẑ = u·z_p + (1−u)·z_q, u ~ U(0, 1) per row.

        One-sided (Petzka et al., ICLR 2018) rather than WGAN-GP's two-sided (‖∇T‖ − 1)²: the
        constraint is ‖∇T‖ ≤ 1, and the two-sided form also pushes the slope *up* to 1
        everywhere, which a sigmoid-output critic can only meet with huge pre-activations (it then
        learns the penalty instead of D).
        """
        u = torch.rand(z_p.shape[0], 1, device=z_p.device, dtype=z_p.dtype)  # (B, 1)
        z_hat = (u * z_p + (1.0 - u) * z_q).requires_grad_(True)  # (B, d)
        (grad,) = torch.autograd.grad(self.critic(z_hat).sum(), z_hat, create_graph=True)  # (B, d)
        return ((grad.norm(dim=-1) - 1.0).clamp(min=0.0) ** 2).mean()

    def _critic_objective(self, z_p: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, D): what the critic minimises, −D (+ the gradient penalty for "w" with "gp");
        the GP is a constraint on θ, not part of the dependency that is reported."""
        d = self.estimate(z_p, z_q)
        loss = -d
        c = self.config
        if c.estimator == "w" and c.lipschitz == "gp" and c.gp_weight > 0:
            loss = loss + c.gp_weight * self.gradient_penalty(z_p, z_q)
        return loss, d

    def learning_loss(self, out: BackboneOutput, out_bar: BackboneOutput | None = None) -> torch.Tensor:
        """What the critic minimises on this batch."""
        return self._critic_objective(*self.pair(out, out_bar))[0]

    def critic_step(self, z_p: torch.Tensor, z_q: torch.Tensor) -> dict[str, float]:
        """One update of θ maximising the empirical Eq. 6/7/8 on (Z, Z̄), detached here so no
        step can reach the backbone.

        Runs in float32 with autocast off: the critic is small, and its optimiser has no gradient
        scaler, so fp16 gradients (AMP on CUDA) could underflow to zero.
        """
        z_p, z_q = z_p.detach().float(), z_q.detach().float()
        if z_p.shape[0] < 2:
            return {"mdm_dependency": 0.0}
        if self.optimizer is None:
            raise RuntimeError("MDM.critic_step before build_optimizer(config.estimator_lr)")
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(z_p.device.type, enabled=False):
            loss, d = self._critic_objective(z_p, z_q)
        loss.backward()
        self.optimizer.step()
        return {"mdm_dependency": float(d.item())}

    # -- the Regulariser contract --------------------------------------------------------------

    def estimator_step(self, out: BackboneOutput, batch: Batch | None,
                       out_bar: BackboneOutput | None = None) -> dict[str, float]:
        """One critic update on this batch's (Z, Z̄) (``out_bar``: the encoding of B̄, needed for
        ``input="fused"``); features are detached, so even a caller that forgets
        ``out.detached()`` cannot reach the backbone."""
        if len(out.prediction) < 2:
            return {"mdm_dependency": 0.0}
        return self.critic_step(*self.pair(out.detached(), None if out_bar is None else out_bar.detached()))

    def estimator_update(self, out: BackboneOutput, batch: Batch, encoder: Encoder) -> dict[str, float]:
        """Algorithm 1's inner loop: ``unroll`` critic steps before the model step.

        ``critic_batches="fresh"`` (the paper): each step on its own random training batch B_i
        and its shuffle B̄_i, all encoded without gradients up front (:meth:`_fresh_pairs`).
        ``"same"``: every step on the model step's batch (and, for ``input="fused"``, its B̄,
        encoded once with gradients and reused by :meth:`step_penalty`)."""
        c = self.config
        self._pending_bar = None
        if c.unroll == 0:
            return {}
        if c.critic_batches == "fresh":
            pairs = self._fresh_pairs(encoder)
        elif len(batch) < 2:
            return {"mdm_dependency": 0.0}
        elif c.input == "fused":
            self._pending_bar = encoder.shuffled(batch)
            z = (out.features["fused"], self._pending_bar.features["fused"])
            pairs = (z for _ in range(c.unroll))
        else:
            det = out.detached()
            pairs = (self.pair(det) for _ in range(c.unroll))
        stats: dict[str, float] = {}
        for z_p, z_q in pairs:
            stats = self.critic_step(z_p, z_q)
        return stats

    def _fresh_pairs(self, encoder: Encoder):
        """(Z_i, Z̄_i) of ``unroll`` fresh training batches, one per critic step. The batches and
        (``input="fused"``) their shuffles B̄_i are encoded without gradients up front, block by
        block in the order B_1, B̄_1, B_2, ... (``encoder.pairs_no_grad``): the encoder does not
        change during the unroll, so this is the sequential algorithm; with ``input="unimodal"``
        each Z̄_i is the block's features permuted, drawn just before its step."""
        c = self.config
        fresh = encoder.sample(c.unroll)  # unroll blocks of batch_size rows
        size = encoder.batch_size
        blocks = [slice(i * size, (i + 1) * size) for i in range(c.unroll)]
        if c.input == "fused":
            perms = modality_permutations(len(fresh), block_size=size)  # σ_l, σ_a, σ_v per block
            if encoder.pairs_no_grad is not None:
                out, out_bar = encoder.pairs_no_grad(fresh, perms)
                z_p, z_q = out.features["fused"], out_bar.features["fused"]
            else:
                both = concat_batches([fresh, shuffle_modalities(fresh, perms=perms)])
                z = encoder.forward_no_grad(both).features["fused"]  # (2·unroll·size, d_in)
                z_p, z_q = z[: len(fresh)], z[len(fresh):]
            for rows in blocks:
                yield z_p[rows], z_q[rows]
        else:
            feats = encoder.forward_no_grad(fresh).features
            for rows in blocks:
                block = {m: feats[m][rows] for m in MODALITIES}
                yield self.joint(block), self.product(block)

    def step_penalty(self, out: BackboneOutput, batch: Batch, encoder: Encoder) -> torch.Tensor:
        """Eq. 5's −λ·D on the model step's batch B and its B̄ = shuffle_modalities(B), both
        encoded with gradients (Algorithm 1's last two lines), T_θ frozen."""
        out_bar = None
        if self.config.input == "fused" and len(batch) >= 2:
            out_bar = self._pending_bar if self._pending_bar is not None else encoder.shuffled(batch)
        self._pending_bar = None
        return self.penalty(out, batch, out_bar)

    def penalty(self, out: BackboneOutput, batch: Batch | None,
                out_bar: BackboneOutput | None = None) -> torch.Tensor:
        """−λ·D(Z, Z̄) with the critic frozen: gradients reach the features, never θ."""
        if len(out.prediction) < 2:
            return self._zero(out)
        return -self.config.weight * self.estimate(*self.pair(out, out_bar), frozen=True)

    @torch.no_grad()
    def scores(self, out: BackboneOutput) -> torch.Tensor:
        """T_θ on each example's joint sample Z, (B,): the paper's per-example explanation signal
        (Sec. 5.4).

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
            return net(self.z_joint(out).float()).squeeze(-1)
        finally:
            self.critic.train(was_training)

    @staticmethod
    def _zero(out: BackboneOutput) -> torch.Tensor:
        """A zero scalar still connected to the features, so ``backward`` works on it."""
        return sum((f.sum() * 0.0 for f in out.features.values()), out.prediction.new_zeros(()))
