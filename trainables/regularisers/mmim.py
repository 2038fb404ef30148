"""MultiModal InfoMax regulariser (Han, Chen, Poria, EMNLP 2021).

"Improving Multimodal Fusion with Hierarchical Mutual Information Maximization for Multimodal
Sentiment Analysis". Equation numbers are the paper's; docs/fidelity.md has the table. Two MI
lower bounds are maximised next to the task loss (Eq. 14, L_main = L_task + α L_CPC + β L_BA):

    penalty = −α · CPC − β · BA      (= α L_CPC + β L_BA up to the constant 3α log n)

Input level (Sec. 3.4), BA (Barber–Agakov, Eq. 3) between text and each of audio and vision,
text as X (q predicts h_a / h_v from h_t, the paper's choice and the official ``mi_ta``/``mi_tv``;
the ablation's vision -> audio pair is not implemented):

    BA = Σ_{m ∈ {a, v}} [ H(h_m) + E_p log q_m(h_m | h_t) ]           Eq. 3, Eq. 9 (L_BA = −BA)
    q_m(y|x) = N(y; μ(x), diag σ²(x)), μ and log σ² from MLPs x -> hidden -> y (ReLU)
    L_lld = −(1/N) Σ_{tv, ta} Σ_i log q(y_i | x_i)                    Eq. 4 (stage 1)

``hidden`` defaults to the width of y (the official ``MMILB``; the paper gives no q width).

H(h_m) is a two-component Gaussian mixture by polarity (Sec. 3.4: non-negative vs negative, so
label 0 joins the non-negative component), each component fitted by maximum likelihood (Eq. 5) to
the current batch plus a FIFO memory of the last ``memory_size`` batches (Sec. 3.4, Appendix A.1),
and its entropy replaced by the lower bound of Eq. 7 with equal weights (Eq. 8):

    H(Y) ≈ Σ_c w_c · ½ log det(2πe (Σ̂_c + ε I)),   w_pos = w_neg = ½        Eq. 6-8

Fusion level (Sec. 3.5), CPC between Z and each h_m, m ∈ {t, a, v}: a linear G_φ predicts h_m
from Z, scores are exp of normalised dot products (Eq. 10), and for each G(Z_i) the other rows'
h_m^j are the negatives (Eq. 11); CPC = Σ_m (log n − L_N^{z,m}) (Eq. 12,
:class:`~trainables.regularisers._estimators.InfoNCE`).

Training, Algorithm 1 (``schedule: two_stage``, the default; the loop's estimator pass, see
``Regulariser.estimator_pass``):
- stage 1, over every train minibatch of the epoch (its own shuffle, as the paper samples each
  stage's minibatches and the official DataLoader reshuffles per pass): encode (Eq. 2, backbone in
  train mode, no gradients), L_lld (Eq. 4), one step of q at η_lld (Adam with weight decay 1e-4,
  the official ``optimizer_mmilb``; the paper names no optimiser)
  (:meth:`MMIMRegulariser.estimator_step`);
- stage 2, over every minibatch: encode, GMM from batch + memory (Eq. 5), the memory update
  (dequeue the oldest, enqueue this batch: after the penalty, Appendix A.1), L_BA (Eq. 3, 8, 9),
  L_CPC (Eq. 10-12), L_main (Eq. 14), one step of everything except q
  (:meth:`MMIMRegulariser.penalty` with q frozen; the CPC maps G_φ are ``main_parameters()``).
``schedule: interleaved`` keeps this project's earlier order: ``inner_steps`` q steps on each batch
right before its model step (one forward pass per batch instead of two).

Where the paper is silent we follow the official code (declare-lab/Multimodal-Infomax,
``src/modules/encoders.py``, ``src/solver.py``), and where we depart from both we say why:
- D_sub ⊆ D of stage 1: the whole train set (the official code uses all of MOSI and the first
  half of each MOSEI epoch's batches).
- Gradient clipping (5.0, Sec. 4.3) applies to stage 2; stage-1 q steps are not clipped (the
  official code clips stage 0 over all parameters, the backbone's unused gradients included).
- log q keeps −½ log σ² and the constant, as Eq. 4's Gaussian log-likelihood (the official MMILB
  drops both; without the log σ² term the likelihood is maximised by σ² -> ∞); log σ² is
  soft-bounded to ±10.
- H(Y) is taken on h_m itself, as Eq. 5 (the official code takes it on ``tanh(W h_m)``, W: d -> d/4,
  a projection its optimisers never update).
- Covariances: unbiased (n_c − 1) and loaded with ``diag_load``·I (Eq. 5 is the biased ML
  estimate; the factor n_c/(n_c − 1) only shifts log det by a constant). Without the loading a
  class with fewer rows than dimensions gives log det = −inf: the NaN the paper's ablation
  reports "w/o history data" (Table 4) and the official code can hit with memory too.
- The ½·d·log 2πe constant of Eq. 6 is kept (H in nats); Eq. 8 drops it. No gradient changes.
- The memory lives in buffers (it survives checkpoints) and persists across epochs (the paper is
  silent; the official memory restarts every epoch and leaves H out of the loss for the first
  ``mem_size + 1`` batches). Before the memory fills, H is fitted to the batches seen so far.
- CPC normalises with a floor (no NaN on an all-zero row); τ is a config field (1 = Eq. 10).
- Options that restore the official code's choices: ``neutral: excluded`` (label 0 in neither
  component), ``mixture_weights: proportional`` (class proportions instead of ½; the official code
  uses ½ as the paper), ``cpc_negatives: predictions`` (for h_m^i the other rows' G(Z_j)).
- The official code with ``--contrast`` off drops the BA and CPC terms entirely; that is the ``none``
  regulariser here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainables.backbones.base import MODALITIES, BackboneOutput
from trainables.config import ConfigError
from trainables.data.batches import Batch
from trainables.regularisers._estimators import BarberAgakov, InfoNCE, call_frozen, class_mixture_entropy
from trainables.regularisers.base import Regulariser

__all__ = ["FeatureMemory", "MMIMRegulariser", "MMIMRegulariserConfig"]

#: the BA pairs (x, y): q predicts y's representation from x's (official ``mi_ta``, ``mi_tv``)
BA_PAIRS = (("text", "audio"), ("text", "vision"))
#: mixture components of H(Y): group ids of positive and negative examples
POSITIVE, NEGATIVE, NO_GROUP = 0, 1, -1


@dataclass
class MMIMRegulariserConfig:
    """MMIM regulariser hyper-parameters. Defaults: the official code's (alpha, beta, lr_lld
    ``--lr_mmilb``, memory ``mem_size``, ``--cpc_layers``); the paper's grid in brackets."""

    #: α, weight of the fusion-level CPC bound [0.05, 0.1, 0.3]
    alpha: float = 0.1
    #: β, weight of the input-level BA bound [0.05, 0.1, 0.3]
    beta: float = 0.1
    #: η_lld, the learning rate of the q networks (their own optimiser) [1e-3, 5e-3]
    lr_lld: float = 1e-3
    #: q's optimiser (the paper names none): "adam", the official ``optimizer_mmilb`` (``--optim``
    #: Adam, ``--weight_decay_club`` 1e-4 as Adam's L2 term), or "adamw" (decoupled decay; with
    #: ``lld_weight_decay`` 0.01, PyTorch's default, this project's earlier q optimiser)
    lld_optimizer: Literal["adam", "adamw"] = "adam"
    #: q's weight decay (the official ``--weight_decay_club``, 1e-4)
    lld_weight_decay: float = 1e-4
    #: past batches kept for the class covariances of H(Y) [1, 2, 3]; 0 = the current batch only
    memory_size: int = 1
    #: hidden width of the q networks' μ and log σ² MLPs; None = the width of the predicted
    #: representation y (h_a or h_v), as the official ``MMILB`` (x -> y_size -> y_size). The paper
    #: gives no width for q: its "hidden dim in {32, 64}" is the A/V-LSTM hidden size, which the
    #: search grids as ``backbone.d_ah`` / ``backbone.d_vh`` (Table 3 lists them apart)
    hidden: int | None = None
    #: where neutral rows (label 0) go in the two-component mixture of H(Y): "positive", the
    #: non-negative component (Sec. 3.4: "sentiment polarity (non-negative/negative)"), or
    #: "excluded", in neither (the official code: label > 0 vs label < 0)
    neutral: Literal["positive", "excluded"] = "positive"
    #: mixture weights of H(Y): "equal", w_pos = w_neg = ½ (Eq. 7-8, "we assume the prior
    #: probability ... is equal"; the official ¼(logdet Σ_+ + logdet Σ_−) too), or "proportional",
    #: the class proportions in batch + memory
    mixture_weights: Literal["equal", "proportional"] = "equal"
    #: layers of each CPC map Z -> h_m (1 = linear, the official default)
    cpc_layers: int = 1
    #: CPC negatives: "targets", for G(Z_i) the other rows' h_m (Eq. 11: H̃_m = H_m \ {h_m^i}), or
    #: "predictions", for h_m^i the other rows' G(Z_j) (the official ``CPC.forward``)
    cpc_negatives: Literal["targets", "predictions"] = "targets"
    #: CPC temperature τ (scores are cos / τ); the paper's normalised dot products are τ = 1
    temperature: float = 1.0
    #: ε of the diagonal loading Σ̂ + ε·I of the class covariances (ours; the official code has
    #: none). In feature units squared: keep it well below the features' per-dimension variances
    #: (at initialisation we measured medians of ~3e-4 for TFN, ~2e-3 for this MMIM backbone, ~5e-2
    #: for EF-LSTM), or it flattens the entropy gradient in low-variance directions
    diag_load: float = 1e-5
    #: "two_stage" (Algorithm 1): each epoch, stage 1 updates only q over every train minibatch,
    #: then stage 2 updates everything but q over every minibatch (the loop's estimator pass).
    #: "interleaved": ``inner_steps`` q steps on each batch right before its model step (this
    #: project's earlier default; one forward pass per batch instead of two)
    schedule: Literal["two_stage", "interleaved"] = "two_stage"
    #: q likelihood steps (stage 1) per minibatch (Algorithm 1: one)
    inner_steps: int = 1

    @property
    def estimator_lr(self) -> float:
        """The learning rate the loop gives ``reg.build_optimizer``."""
        return self.lr_lld

    def validate(self) -> None:
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        for name in ("memory_size", "inner_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden: expected an integer >= 1 or null, got {self.hidden}")
        for name in ("cpc_layers",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("lr_lld", "temperature", "diag_load"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        if self.lld_weight_decay < 0:
            raise ConfigError(f"lld_weight_decay: expected a number >= 0, "
                              f"got {self.lld_weight_decay}")


class FeatureMemory(nn.Module):
    """A FIFO of the last ``size`` batches of features (and their mixture groups), in buffers.

    The rows of all stored batches are concatenated oldest first in ``rows_<name>`` (N, d) and
    ``groups`` (N,); ``slot_sizes[k]`` is the row count of the k-th stored batch and ``filled`` how
    many batches are stored. A batch may store 0 rows (all neutral): it still takes a slot, so the
    memory always spans exactly the last ``size`` batches once ``size`` have been pushed.

    N changes with what is stored, so loading a state dict resizes the row buffers first (a plain
    ``load_state_dict`` would refuse the shape); the checkpoint round trip is exact.
    """

    def __init__(self, size: int, dims: dict[str, int]) -> None:
        super().__init__()
        self.size = size
        self.names = tuple(dims)
        self.register_buffer("slot_sizes", torch.zeros(size, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("groups", torch.zeros(0, dtype=torch.long))
        for name, d in dims.items():
            self.register_buffer(f"rows_{name}", torch.zeros(0, d))

    def __len__(self) -> int:
        """The number of stored batches."""
        return int(self.filled)

    def rows(self, name: str) -> torch.Tensor:
        return getattr(self, f"rows_{name}")

    @torch.no_grad()
    def push(self, features: dict[str, torch.Tensor], groups: torch.Tensor) -> None:
        """Store one batch (detached), dropping the oldest once ``size`` batches are held."""
        if self.size == 0:
            return
        k = int(self.filled)
        drop = 0
        if k == self.size:
            drop = int(self.slot_sizes[0])
            self.slot_sizes.copy_(torch.roll(self.slot_sizes, -1))
            k -= 1
        for name in self.names:
            old = self.rows(name)
            new = features[name].detach().to(old.device, old.dtype)
            setattr(self, f"rows_{name}", torch.cat([old[drop:], new]))
        self.groups = torch.cat([self.groups[drop:], groups.to(self.groups.device, torch.long)])
        self.slot_sizes[k] = groups.shape[0]
        self.filled.fill_(k + 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("groups", *(f"rows_{n}" for n in self.names)):
            incoming = state_dict.get(prefix + name)
            current = self._buffers[name]
            if incoming is not None and incoming.shape[1:] == current.shape[1:]:
                self._buffers[name] = current.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MMIMRegulariser(Regulariser):
    name = "mmim"
    config_class = MMIMRegulariserConfig

    def __init__(self, config: MMIMRegulariserConfig, feature_dims: dict[str, int]) -> None:
        super().__init__(config, feature_dims)
        needed = (*MODALITIES, "fused")
        missing = [m for m in needed if m not in feature_dims]
        if missing:
            raise ValueError(
                f"regulariser 'mmim' reads features {', '.join(needed)}; the backbone lacks "
                f"{', '.join(missing)} (has {', '.join(sorted(feature_dims))})"
            )
        c = config
        #: stage-1 estimators: q(h_y | h_x) per BA pair, keyed by the predicted modality
        self.ba = nn.ModuleDict(
            {y: BarberAgakov(feature_dims[x], feature_dims[y], c.hidden or feature_dims[y], c.diag_load)
             for x, y in BA_PAIRS}
        )
        #: CPC maps Z -> h_m, trained with the model (main_parameters)
        self.cpc = nn.ModuleDict(
            {
                m: InfoNCE(feature_dims["fused"], feature_dims[m], c.cpc_layers, c.temperature,
                           negatives=c.cpc_negatives)
                for m in MODALITIES
            }
        )
        self.memory = FeatureMemory(c.memory_size, {y: feature_dims[y] for _, y in BA_PAIRS})

    @property
    def inner_steps(self) -> int:
        return self.config.inner_steps

    @property
    def estimator_pass(self) -> str:
        """"epoch" for the paper's two stages (Algorithm 1), "batch" for ``interleaved``."""
        return "epoch" if self.config.schedule == "two_stage" else "batch"

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """q's optimiser at η_lld: the official ``optimizer_mmilb`` (Adam with L2 weight decay
        ``lld_weight_decay``, ``src/solver.py``), or AdamW with ``lld_optimizer="adamw"``."""
        params = self.estimator_parameters()
        cls = torch.optim.Adam if self.config.lld_optimizer == "adam" else torch.optim.AdamW
        decay = self.config.lld_weight_decay
        self.optimizer = cls(params, lr=lr, weight_decay=decay) if params else None
        return self.optimizer

    def main_parameters(self) -> list[nn.Parameter]:
        return list(self.cpc.parameters())

    # -- pieces ----------------------------------------------------------------------------------

    def groups(self, batch: Batch, n: int, device: torch.device) -> torch.Tensor:
        """Mixture component of each row, (B,): POSITIVE (label ≥ 0; label > 0 with ``neutral:
        excluded``), NEGATIVE (label < 0), or NO_GROUP (label 0 when excluded, unlabeled rows)."""
        labels = batch.labels.to(device)
        groups = torch.full((n,), NO_GROUP, dtype=torch.long, device=device)
        groups[labels >= 0 if self.config.neutral == "positive" else labels > 0] = POSITIVE
        groups[labels < 0] = NEGATIVE
        if batch.labeled is not None:
            groups[~batch.labeled.to(device)] = NO_GROUP
        return groups

    def entropy(self, y: torch.Tensor, name: str, groups: torch.Tensor) -> torch.Tensor:
        """H(h_name): the class mixture over the memory (no gradient) and this batch (gradient)."""
        memory = self.memory.rows(name).to(y.dtype)
        rows = torch.cat([memory, y])  # (N + B, d)
        all_groups = torch.cat([self.memory.groups, groups])  # (N + B,)
        return class_mixture_entropy(rows, all_groups, 2, self.config.diag_load,
                                     weights=self.config.mixture_weights)

    def bounds(self, out: BackboneOutput, batch: Batch, frozen: bool = True) -> dict[str, torch.Tensor]:
        """Every estimate on this batch (scalars): ``cpc_<m>``, ``entropy_<m>``, ``ba_<m>`` and
        their sums ``cpc``, ``ba``. ``frozen`` runs q with detached parameters. Reads the memory
        but never changes it."""
        f = {k: v.float() for k, v in out.features.items()}
        z = f["fused"]
        groups = self.groups(batch, z.shape[0], z.device)
        est: dict[str, torch.Tensor] = {}
        for m in MODALITIES:
            est[f"cpc_{m}"] = self.cpc[m](z, f[m])
        for x, y in BA_PAIRS:
            h = self.entropy(f[y], y, groups)
            est[f"entropy_{y}"] = h
            ba = self.ba[y]
            est[f"ba_{y}"] = call_frozen(ba, f[x], f[y], entropy=h) if frozen else ba(f[x], f[y], entropy=h)
        est["cpc"] = sum(est[f"cpc_{m}"] for m in MODALITIES)
        est["ba"] = sum(est[f"ba_{y}"] for _, y in BA_PAIRS)
        return est

    # -- the Regulariser contract ----------------------------------------------------------------

    def estimator_step(self, out: BackboneOutput, batch: Batch) -> dict[str, float]:
        """Stage 1: one step of the q networks (their own optimiser) on
        −Σ_pairs E log q(h_y | h_x), features detached here too (a caller that forgets
        ``out.detached()`` cannot reach the backbone). Float32 with autocast off: q's optimiser
        has no gradient scaler."""
        if self.optimizer is None:
            raise RuntimeError("MMIMRegulariser.estimator_step before build_optimizer(config.estimator_lr)")
        f = {k: v.detach().float() for k, v in out.features.items()}
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(f["fused"].device.type, enabled=False):
            loss = sum(self.ba[y].learning_loss(f[x], f[y]) for x, y in BA_PAIRS)
        loss.backward()
        self.optimizer.step()
        return {"mmim_lld": -float(loss.item())}

    def penalty(self, out: BackboneOutput, batch: Batch) -> torch.Tensor:
        """−α·CPC − β·BA with q frozen; in training mode, then stores this batch in the memory."""
        with torch.autocast(out.prediction.device.type, enabled=False):
            est = self.bounds(out, batch, frozen=True)
        pen = -self.config.alpha * est["cpc"] - self.config.beta * est["ba"]
        if self.training:
            groups = self.groups(batch, len(out.prediction), out.prediction.device)
            keep = groups != NO_GROUP
            self.memory.push({y: out.features[y][keep] for _, y in BA_PAIRS}, groups[keep])
        return pen
