"""One training loop for every backbone x regulariser pair (no per-model trainers).

Per batch: forward once; ``reg.estimator_update`` (by default ``reg.inner_steps`` estimator
updates on detached features; MDM's critic unroll on fresh batches); the model step on
``reg.combine(task_loss, reg.step_penalty(out, batch, encoder))`` with AdamW, gradient
clipping, fused AdamW and mixed precision (fp16 AMP on CUDA, bf16 autocast on CPUs with native bf16
when ``cpu_bf16``). Per epoch: validation metrics, best-epoch bookkeeping on the
validation metric only, early stopping. When the trial ends (max epochs or patience), the best
epoch's weights are evaluated once on test. Test metrics never steer anything.

A regulariser with ``estimator_pass == "epoch"`` (MMIM's stage 1, Han et al. 2021, Algorithm 1)
gets its estimator updates in a pass of their own over the epoch's batches, before the model
pass, instead of per batch (:meth:`Trainer._estimator_pass`).

The loop knows nothing of Ray: :mod:`trainables.trainable` wraps it for Tune, tests drive it
directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import pickle
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainables.backbones import get_backbone
from trainables.backbones.base import BackboneOutput
from trainables.config import TrialConfig
from trainables.data.batches import (Batch, MultimodalData, TensorSplit, concat_batches, iterate_batches,
                                     modality_permutations, row_lengths, shuffle_modalities, split_batch,
                                     trim_batch)
from trainables.metrics import compute_metrics
from trainables.regularisers import get_regulariser
from trainables.regularisers.base import Encoder, float_detached

__all__ = ["STATE_FILE", "BEST_FILE", "Trainer", "TrialStatus", "cpu_supports_bf16", "keep_freed_memory", "make_adamw",
           "seed_everything"]

#: the full resumable state (model, optimisers, regulariser buffers, RNG, counters)
STATE_FILE = "state.pt"
#: the best-validation weights (what the search registers and the report re-evaluates)
BEST_FILE = "best.pt"


class TrialStatus:
    RUNNING = "running"
    COMPLETED = "completed"  # ran max_epochs
    EARLY_STOPPED = "early_stopped"  # patience exhausted
    DIVERGED = "diverged"  # non-finite loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class _Best:
    value: float = math.nan
    epoch: int = -1
    metrics: dict[str, float] | None = None
    state: dict[str, Any] | None = None  # model + regulariser weights on CPU


def _task_loss(kind: str, pred: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor | None):
    if labeled is not None:
        pred, labels = pred[labeled], labels[labeled]
        if pred.numel() == 0:
            return pred.new_zeros(())
    pred = pred.float()
    if kind == "mse":
        return F.mse_loss(pred, labels)
    return F.l1_loss(pred, labels)


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: glibc ``mallopt`` parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_KEEP = {_M_TRIM_THRESHOLD: 1 << 30, _M_MMAP_MAX: 0}


def keep_freed_memory(keep: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse (``keep``) or set its default values back
    (its adaptive mmap threshold stays off once set: glibc cannot re-enable it); True when set
    (glibc only; elsewhere a no-op returning False).

    Allocations above glibc's mmap threshold (at most 32 MiB, however it adapts) each get their own
    ``mmap``, returned to the OS on ``free``, so every training step of TFN page-faults its 36 MB
    post-fusion weight gradient in again (~15 ms a step on one core, ~10% of a TFN epoch, ~15% of
    TFN + MDM). With mmap off and a high trim threshold the freed blocks stay in the heap and are
    reused — what PyTorch's CPU tuning guide gets from jemalloc / tcmalloc. Values are unchanged."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    values = _KEEP if keep else _GLIBC_DEFAULTS
    return all(mallopt(param, value) == 1 for param, value in values.items())


def make_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device (CPU and CUDA
    float tensors): one pass per parameter instead of ~10 elementwise kernels, ~5x cheaper than
    the for-each AdamW over TFN's 9M-parameter post-fusion layer on the CPU. Same update rule."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a torch build without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr)


def _cat_outputs(outs: list[BackboneOutput]) -> BackboneOutput:
    """The rows of several outputs as one (new tensors: outside inference mode they are normal
    tensors, which autograd may save)."""
    return BackboneOutput(torch.cat([o.prediction for o in outs]),
                          {k: torch.cat([o.features[k] for o in outs]) for k in outs[0].features})


def _rows(value: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a tensor, or of each tensor of a tuple (a stem entry)."""
    if isinstance(value, tuple):
        return tuple(_rows(v, index) for v in value)
    return value[index.to(value.device)]


def _halves(out: BackboneOutput) -> tuple[BackboneOutput, BackboneOutput]:
    """The first and the second half of ``out``'s rows."""
    n = len(out.prediction) // 2
    return (BackboneOutput(out.prediction[:n], {k: v[:n] for k, v in out.features.items()}),
            BackboneOutput(out.prediction[n:], {k: v[n:] for k, v in out.features.items()}))


@contextlib.contextmanager
def _batchnorm_updates_twice(model: torch.nn.Module):
    """Within the block, every BatchNorm of ``model`` that updates running statistics folds two
    updates with the same batch statistics s into one: r ← (1−m)²·r + (1 − (1−m)²)·s is two
    steps of r ← (1−m)·r + m·s; ``num_batches_tracked`` counts both. For the unimodal pass that
    stands for B's and B̄'s (the same rows, permuted: the same statistics)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats and m.momentum is not None]
    before = [(m, m.momentum, int(m.num_batches_tracked)) for m in norms]
    for m in norms:
        m.momentum = 1.0 - (1.0 - m.momentum) ** 2
    try:
        yield
    finally:
        for m, momentum, tracked in before:
            m.momentum = momentum
            if int(m.num_batches_tracked) > tracked:  # it updated (not a one-row batch)
                m.num_batches_tracked.add_(1)


class Trainer:
    """Builds model, regulariser and optimisers from a :class:`TrialConfig` and trains them."""

    def __init__(
        self,
        cfg: TrialConfig,
        data: MultimodalData,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.cfg = cfg
        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            keep_freed_memory(cfg.cpu_keep_freed_memory)
        seed_everything(cfg.seed)
        dims = data.dims
        backbone_cls = get_backbone(cfg.backbone)
        backbone_cls.check_inputs(dims)
        self.model = backbone_cls(cfg.backbone_cfg, dims).to(self.device)
        reg_cls = get_regulariser(cfg.regulariser)
        self.reg = reg_cls(cfg.regulariser_cfg, self.model.feature_dims).to(self.device)
        self.reg.build_optimizer(getattr(cfg.regulariser_cfg, "estimator_lr", cfg.lr))

        groups = self.model.param_groups(cfg.lr, cfg.text_lr, cfg.weight_decay)
        reg_main = self.reg.main_parameters()
        if reg_main:
            groups.append({"params": reg_main, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                           "name": "regulariser"})
        self.optimizer = make_adamw(groups, cfg.lr)
        self._clip_params = [p for g in groups for p in g["params"]]

        # mixed precision: fp16 AMP with a grad scaler on CUDA; bf16 autocast (no scaler) on CPUs
        # with native bf16 when cfg.cpu_bf16 asks for it; else float32
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.float16
        elif cfg.cpu_bf16:
            if cpu_supports_bf16():
                self.amp_dtype = torch.bfloat16
            else:
                warnings.warn("cpu_bf16: this CPU has no native bf16 (avx512_bf16 / amx_bf16 in "
                              "/proc/cpuinfo); training in float32", stacklevel=2)
        self.amp = self.amp_dtype is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        if cfg.compile and self.device.type == "cuda":
            self.model.compile()  # in place: the state-dict keys stay the same
        #: cut every batch to its longest row (exact for this backbone: Backbone.trim_padding)
        self.trim = bool(getattr(backbone_cls, "trim_padding", False))
        pin = self.device.type == "cuda"
        self.splits = {name: TensorSplit.from_arrays(self.model.prepare_split(arr), pin_memory=pin)
                       for name, arr in data.splits.items() if arr is not data.unlabeled}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        #: the unlabeled rows this trial draws from (labels never read). Qian et al.'s split rate
        #: s is the ratio of unlabeled to labeled *data* (Fig. 6; the pool is 5x train, s <= 5):
        #: the trial uses s x N_train rows of the data's "unlabeled" split (all of it if it is
        #: smaller), the same rows for every trial and seed (a fixed, nested choice: the s = 2
        #: rows hold the s = 1 rows), and one epoch passes over them once at s x B per batch.
        #: ``unlabeled_source: train`` uses train (labels hidden) instead. None when s = 0.
        self.unlabeled: TensorSplit | None = None
        if cfg.unlabeled_rate > 0:
            if cfg.unlabeled_source == "train":
                self.unlabeled = self.splits["train"]
            elif data.unlabeled is None:
                raise ValueError(
                    f"unlabeled_rate {cfg.unlabeled_rate:g}: {data.source} has no 'unlabeled' "
                    "split; add one (--unlabeled PATH) or set unlabeled_source: train")
            else:
                pool = data.unlabeled
                n_use = min(len(pool), round(cfg.unlabeled_rate * len(self.splits["train"])))
                chosen = np.sort(np.random.default_rng(0x0B1AB).permutation(len(pool))[:n_use])
                self.unlabeled = TensorSplit.from_arrays(
                    self.model.prepare_split(pool.subset(chosen)), pin_memory=pin)
        #: the pool's draw order: a permutation per epoch (and per pass, when an epoch needs more
        #: rows than the pool has), consumed in order; its own generator, seeded from the trial
        #: seed, so the labeled batches' order is the same for every split rate s
        self.unlabeled_generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([cfg.seed, 0x0B1AB]).generate_state(1)[0]))
        self.unlabeled_order: torch.Tensor | None = None
        self.unlabeled_pos = 0
        self.unlabeled_epoch = -1  # the epoch ``unlabeled_order`` was drawn for
        #: what a regulariser may run of the backbone within a step (MDM's fresh batches and B̄)
        self.encoder = Encoder(forward=self._encode, forward_no_grad=self._encode_no_grad,
                               sample=self._sample_batches,
                               batch_size=min(cfg.batch_size, len(self.splits["train"])),
                               pairs_no_grad=self._encode_pairs_no_grad,
                               forward_shuffled=self._encode_shuffled)
        #: B̄ from B's unimodal encodings (Backbone.encode / fuse); not with a cumulative-average
        #: BatchNorm (momentum None), whose two updates cannot be folded into one
        self.separable = bool(getattr(self.model, "modality_separable", False)) and all(
            m.momentum is not None for m in self.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        #: the model step's B̄ from B's stem (Backbone.stem / encode_stem, :meth:`_encode_shuffled`;
        #: any BatchNorm momentum: B̄'s running-statistics update is replayed, not folded); not
        #: with a compiled model, whose compiled ``forward`` the stem path would bypass
        self.stemmed = (bool(getattr(self.model, "modality_separable", False))
                        and bool(getattr(self.model, "has_stem", False))
                        and not (cfg.compile and self.device.type == "cuda"))
        #: (B, B's stem, the inputs B's BatchNorms saw) of the step in progress, for B̄
        self._step_stem: tuple[Batch, dict[str, Any], list] | None = None

        steps_per_epoch = math.ceil(len(self.splits["train"]) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.max_epochs
        warmup_steps = int(cfg.warmup * total_steps)
        self.scheduler = None
        if cfg.warmup > 0:
            def schedule(step: int) -> float:
                if step < warmup_steps:
                    return (step + 1) / max(1, warmup_steps)
                return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

        self.epoch = 0  # epochs finished
        self.bad_epochs = 0
        self.status = TrialStatus.RUNNING
        self.best = _Best()
        self.test_metrics: dict[str, float] | None = None

    # ------------------------------------------------------------------ training
    @property
    def finished(self) -> bool:
        return self.status != TrialStatus.RUNNING

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    # -- the backbone as regularisers see it within a step (regularisers.base.Encoder) ----------
    def _encode(self, batch: Batch) -> BackboneOutput:
        with self._autocast():
            return self.model(batch.to(self.device, non_blocking=True))

    def _encode_no_grad(self, batch: Batch) -> BackboneOutput:
        """The backbone without gradients (inference mode), in chunks of the trial's batch size
        on every device, each cut to its longest row: a large batch (MDM's critic blocks with
        ``input="unimodal"``) is then the sequential passes that many steps would run (BatchNorm
        normalises each block with its own statistics, as it does the model step's batch), and on
        the CPU it is faster too (measured 1.5x on TFN and MAG-BERT, the activations staying in
        cache)."""
        outs = []
        for part in split_batch(batch, self.encoder.batch_size):
            with torch.inference_mode():
                outs.append(float_detached(self._encode(self._ready(part))))
        return _cat_outputs(outs)

    def _encode_pairs_no_grad(self, batch: Batch, perms: dict[str, torch.Tensor]
                              ) -> tuple[BackboneOutput, BackboneOutput]:
        """:attr:`Encoder.pairs_no_grad`: ``batch`` (blocks of the encoder's batch size) and its
        modality shuffle by ``perms`` (within the blocks), without gradients (inference mode),
        block by block: B_1, B̄_1, B_2, B̄_2, ... as Algorithm 1's sequential critic steps would
        encode them (BatchNorm normalises each with its own block's statistics and updates its
        running statistics in that order). Each block is cut to its longest row (B̄'s rows are
        B's, so the same widths).

        A backbone with an encode/fuse split (``modality_separable``) encodes each block's
        modalities once: B̄'s unimodal encodings are B's rows permuted by σ_m, so only the fusion
        runs for both, in one pass of 2·size rows (the fusion is row-wise). BatchNorm sees the
        same rows (permuted) in B̄, hence the same batch statistics; its running statistics get
        the two updates of the plain pair in one (momentum 1 − (1 − m)²,
        :func:`_batchnorm_updates_twice`). Where the backbone's stem holds the costly part of
        its encoders (``critic_pairs_from_stem``: TFN, LMF) only the stem is shared: B and B̄ draw
        dropout masks of their own (B's, then B̄'s, then the fusion's for both), so (Z, Z̄) has
        the sequential algorithm's joint distribution. Otherwise (MMIM, whose stem leaves out the
        text encoder) the unimodal encodings are shared, so dropout in the unimodal encoders
        draws one mask per row that B and B̄ share (permuted), instead of two independent ones:
        each of Z and Z̄ has the same distribution as before, their joint distribution does not
        (docs/fidelity.md, "Speed")."""
        size = self.encoder.batch_size
        outs, outs_bar = [], []
        separable = self.separable
        from_stem = bool(getattr(self.model, "critic_pairs_from_stem", False))
        for k, part in enumerate(split_batch(batch, size)):
            part, start = self._ready(part), k * size
            block_perms = {m: p[start:start + size] - start for m, p in perms.items()}
            with torch.inference_mode(), self._autocast():
                if separable and from_stem:
                    with _batchnorm_updates_twice(self.model):
                        stem = self.model.stem(part)
                    # B's and B̄'s own dropout masks (in that order), one fusion of 2·size rows
                    unimodal = self.model.encode_stem(stem)
                    unimodal_bar = self.model.encode_stem({m: _rows(v, block_perms[m])
                                                           for m, v in stem.items()})
                    both = self.model.fuse({m: torch.cat([u, unimodal_bar[m]])
                                            for m, u in unimodal.items()})
                    out, out_bar = _halves(both)
                elif separable:
                    with _batchnorm_updates_twice(self.model):
                        unimodal = self.model.encode(part)
                    # B and B̄ fused in one pass of 2·size rows (fuse is row-wise), halved
                    both = self.model.fuse({m: torch.cat([u, u[block_perms[m].to(u.device)]])
                                            for m, u in unimodal.items()})
                    out, out_bar = _halves(both)
                else:
                    out = self.model(part)
                    out_bar = self.model(shuffle_modalities(part, perms=block_perms))
                outs.append(float_detached(out))
                outs_bar.append(float_detached(out_bar))
        return _cat_outputs(outs), _cat_outputs(outs_bar)

    def _encode_step(self, batch: Batch) -> BackboneOutput:
        """Step 1, the model step's forward pass on B (under the caller's autocast). When the
        regulariser will encode B̄ (``encodes_shuffled_batch``) and the backbone has a draw-free
        stem, the pass runs as ``fuse(encode_stem(stem(B)))`` (the same operations and draws as
        ``forward``) and keeps the stem and the inputs of B's BatchNorms for
        :meth:`_encode_shuffled`."""
        self._step_stem = None
        if not (self.stemmed and self.reg.encodes_shuffled_batch):
            return self.model(batch)
        seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
                 for m in self.model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                 and m.track_running_stats]
        try:
            stem = self.model.stem(batch)
        finally:
            for hook in hooks:
                hook.remove()
        self._step_stem = (batch, stem, seen)
        return self.model.fuse(self.model.encode_stem(stem))

    def _encode_shuffled(self, batch: Batch, perms: dict[str, torch.Tensor] | None = None) -> BackboneOutput:
        """:attr:`Encoder.forward_shuffled`: B̄ = ``shuffle_modalities(batch, perms=perms)``
        with gradients (perms drawn as ``shuffle_modalities`` draws them when None).

        For the batch of the step in progress, when :meth:`_encode_step` kept its stem: B̄'s stem
        is B's stem with each modality's rows permuted by σ_m (the stem draws nothing and is
        row-wise; its BatchNorms see the same rows, permuted, hence the same batch statistics),
        so the stem (TFN's and LMF's text LSTM, MMIM's audio and vision LSTMs) does not run again;
        ``encode_stem`` then draws B̄'s own dropout masks, in the plain pass's order, and the
        fusion runs on B̄'s rows. B̄'s BatchNorms update their running statistics here, where
        the plain pass does, from the inputs they saw in B (the same rows). Gradients reach the
        stem through both B and B̄ (the permutation is an index, which autograd follows)."""
        if perms is None:
            perms = modality_permutations(len(batch))
        step = self._step_stem
        if step is None or step[0] is not batch:
            return self._encode(shuffle_modalities(batch, perms=perms))
        _, stem, norm_inputs = step
        with self._autocast():
            with torch.no_grad():  # B̄'s running-statistics update; the values come from B's pass
                for module, x in norm_inputs:
                    module(x)
            permuted = {m: _rows(v, perms[m]) for m, v in stem.items()}
            return self.model.fuse(self.model.encode_stem(permuted))

    def _sample_batches(self, k: int) -> Batch:
        """``k`` random training batches (distinct rows within each) as one batch of ``k`` blocks,
        drawn with the trial's generator (so a seeded run repeats them). Uniformly random even
        with ``group_by_length``: these are MDM's samples of the joint distribution and, shuffled
        within their blocks, of the product of the marginals (B̄); length-homogeneous blocks
        would make B̄ a product of marginals *given the length*. Cut to the longest row."""
        train, size = self.splits["train"], self.encoder.batch_size
        index = torch.cat([torch.randperm(len(train), generator=self.generator)[:size] for _ in range(k)])
        return self._ready(train.batch(index))

    def _ready(self, batch: Batch) -> Batch:
        """``batch`` cut to its longest row (backbones that mask their padding), on the device."""
        return (trim_batch(batch) if self.trim else batch).to(self.device, non_blocking=True)

    def _train_batches(self):
        """One shuffled pass over train (the trial's generator; length-grouped batches with
        ``group_by_length``), unlabeled rows mixed in at the split rate, each batch cut to its
        longest row, on the device."""
        for batch in iterate_batches(self.splits["train"], self.cfg.batch_size, shuffle=True,
                                     generator=self.generator,
                                     group_by_length=self.cfg.group_by_length):
            if self.cfg.unlabeled_rate > 0:
                batch = self._with_unlabeled(batch)
            yield self._ready(batch)

    def train_epoch(self) -> dict[str, float]:
        """One pass over train. Returns mean losses; raises nothing on divergence (see status)."""
        self.model.train()
        self.reg.train()
        stage1 = self._estimator_pass() if self.reg.estimator_pass == "epoch" else {}
        totals: dict[str, torch.Tensor] = {}
        est_totals: dict[str, float] = {}
        n_batches = 0
        for batch in self._train_batches():
            with self._autocast():
                out = self._encode_step(batch)
            est_stats = self.reg.estimator_update(out, batch, self.encoder)
            for k, v in est_stats.items():  # the last inner step's estimates
                est_totals[k] = est_totals.get(k, 0.0) + float(v)
            with self._autocast():
                task = _task_loss(self.cfg.task_loss, out.prediction, batch.labels, batch.labeled)
                pen = self.reg.step_penalty(out, batch, self.encoder)
                loss = self.reg.combine(task, pen)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self._step_stem = None
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._clip_params, self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler is not None:
                self.scheduler.step()
            for k, v in (("loss", loss), ("task_loss", task), ("penalty", pen)):
                totals[k] = totals.get(k, 0.0) + v.detach().float()
            n_batches += 1
        stats = {f"train_{k}": float(v) / max(n_batches, 1) for k, v in totals.items()}
        stats.update({f"train_{k}": v / max(n_batches, 1) for k, v in est_totals.items()})
        stats.update(stage1)
        stats.update({f"train_{k}": float(v) for k, v in self.reg.epoch_end().items()})
        return stats

    def _estimator_pass(self) -> dict[str, float]:
        """The estimator-only pass of a regulariser with ``estimator_pass == "epoch"`` (MMIM's
        stage 1, Algorithm 1 of Han et al. 2021): over every train minibatch, in a shuffle of its
        own, the backbone runs in train mode (dropout on, as the official solver's stage 0) without
        gradients, and ``reg.estimator_step`` runs ``inner_steps`` times on the features. Nothing
        but the regulariser's estimator networks changes; the model pass follows with no inner
        steps. Returns the mean of each batch's last estimates, as ``train_<key>``. The pass runs
        in inference mode (no autograd bookkeeping; the same values as ``torch.no_grad``)."""
        totals: dict[str, float] = {}
        n_batches = 0
        for batch in self._train_batches():
            with torch.inference_mode(), self._autocast():
                out = self.model(batch)
            # new (normal) tensors: q's steps may save them for their backward pass; the fused
            # MLP is part of the pass although q reads only h_t, h_a, h_v: it is < 1% of it (the
            # text encoder is the pass), and skipping it would shift the dropout draws that follow
            det = _cat_outputs([float_detached(out)])
            est_stats: dict[str, float] = {}
            for _ in range(self.reg.inner_steps):
                est_stats = self.reg.estimator_step(det, batch)
            for k, v in est_stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
        return {f"train_{k}": v / max(n_batches, 1) for k, v in totals.items()}

    def _next_unlabeled(self, k: int) -> torch.Tensor:
        """The next ``k`` rows of the pool: without replacement within an epoch (a fresh
        permutation at each epoch's first draw, consumed in order across its batches), drawing a
        new permutation only when an epoch needs more rows than the pool holds."""
        assert self.unlabeled is not None
        parts = []
        while k > 0:
            if (self.unlabeled_order is None or self.unlabeled_epoch != self.epoch
                    or self.unlabeled_pos >= len(self.unlabeled_order)):
                self.unlabeled_order = torch.randperm(len(self.unlabeled),
                                                      generator=self.unlabeled_generator)
                self.unlabeled_pos, self.unlabeled_epoch = 0, self.epoch
            take = self.unlabeled_order[self.unlabeled_pos:self.unlabeled_pos + k]
            self.unlabeled_pos += len(take)
            k -= len(take)
            parts.append(take)
        return torch.cat(parts)

    def _with_unlabeled(self, batch: Batch) -> Batch:
        """Append ``round(unlabeled_rate * B)`` unlabeled rows from the pool (Qian et al.,
        Algorithm 1: X^labeled ∪ X^unlabeled); ``labeled`` marks the labeled ones.

        The appended rows' labels are set to 0 and never enter the task loss (the loop drops
        unlabeled rows; regularisers see ``batch.labeled``)."""
        k = int(round(self.cfg.unlabeled_rate * len(batch)))
        if k == 0 or self.unlabeled is None:
            return batch
        index = self._next_unlabeled(k)
        merged = concat_batches([batch, self.unlabeled.batch(index)])
        merged.labels[len(batch):] = 0.0
        merged.index[len(batch):] = -1  # not rows of the labeled split
        merged.labeled = torch.zeros(len(merged), dtype=torch.bool)
        merged.labeled[: len(batch)] = True
        return merged

    @torch.inference_mode()
    def predict(self, split: str, state: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predictions and labels on ``split`` in row order (with the weights in ``state`` if
        given). With trimming the rows run in order of text length, each batch cut to its longest
        row (in eval mode a row's prediction does not depend on the other rows of its batch)."""
        if state is not None:
            current = self._weights(copy_to_cpu=True)  # a copy: loading overwrites live tensors
            self._load_weights(state)
        self.model.eval()
        data = self.splits[split]
        order = (torch.sort(row_lengths(data), descending=True, stable=True).indices if self.trim
                 else torch.arange(len(data)))
        preds = torch.empty(len(data))
        size = max(self.cfg.batch_size, 256)
        for start in range(0, len(data), size):
            index = order[start:start + size]
            batch = self._ready(data.batch(index))
            with self._autocast():
                out = self.model(batch)
            preds[index] = out.prediction.float().cpu()
        if state is not None:
            self._load_weights(current)
        return preds.numpy(), data.labels.numpy().copy()

    def evaluate(self, split: str, state: dict[str, Any] | None = None) -> dict[str, float]:
        preds, labels = self.predict(split, state)
        if not np.all(np.isfinite(preds)):
            return {f"{split}_{k}": math.nan for k in compute_metrics([0.0], [0.0])}
        return {f"{split}_{k}": v for k, v in compute_metrics(preds, labels).items()}

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best.epoch < 0:
            return True
        return value < self.best.value if self.cfg.mode == "min" else value > self.best.value

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch, validate, update the best epoch and the stopping state.

        Returns the metrics to report for this epoch. When this epoch ends the trial, the best
        epoch's weights are evaluated on test and ``test_*`` metrics are included (once).
        """
        if self.finished:
            raise RuntimeError("the trial has already finished")
        start = time.perf_counter()
        train_stats = self.train_epoch()
        self.epoch += 1
        metrics: dict[str, Any] = {"epoch": self.epoch, **train_stats}
        if not math.isfinite(train_stats.get("train_loss", math.nan)):
            self.status = TrialStatus.DIVERGED
            metrics.update(self.evaluate("valid"))
        else:
            metrics.update(self.evaluate("valid"))
            value = metrics.get(self.cfg.metric)
            if value is None:
                raise KeyError(f"metric {self.cfg.metric!r} is not among {sorted(metrics)}")
            if not math.isfinite(value):
                self.status = TrialStatus.DIVERGED
            elif self._improved(value):
                self.best = _Best(value, self.epoch,
                                  {k: v for k, v in metrics.items() if k.startswith("valid_")},
                                  self._weights(copy_to_cpu=True))
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            if not self.finished:
                if self.epoch >= self.cfg.max_epochs:
                    self.status = TrialStatus.COMPLETED
                elif self.cfg.patience and self.bad_epochs >= self.cfg.patience:
                    self.status = TrialStatus.EARLY_STOPPED
        if self.finished and self.best.state is not None and self.test_metrics is None:
            self.test_metrics = self.evaluate("test", self.best.state)
        metrics.update(self.summary())
        metrics["epoch_seconds"] = time.perf_counter() - start
        # the first numeric keys are the columns of Tune's progress table
        first = ("epoch", f"best_{self.cfg.metric}", self.cfg.metric, "train_task_loss")
        return {**{k: metrics[k] for k in first if k in metrics}, **metrics}

    def summary(self) -> dict[str, Any]:
        """Best-so-far and status keys, included in every report."""
        out: dict[str, Any] = {"trial_status": self.status, "best_epoch": self.best.epoch,
                               "diverged": self.status == TrialStatus.DIVERGED}
        best_metrics = self.best.metrics or {}
        for key in (self.cfg.metric, *best_metrics):
            out[f"best_{key}"] = best_metrics.get(key, math.nan)
        if self.test_metrics:
            out.update(self.test_metrics)
        return out

    def checkpoint_due(self) -> bool:
        """Whether the epoch just run should be checkpointed: at the trial's end, when it improved
        the best validation metric (so the latest checkpoint always holds the best weights, also
        for a trial the scheduler stops), and every ``cfg.checkpoint_every`` epochs (resume)."""
        return (self.finished or self.best.epoch == self.epoch
                or self.epoch % self.cfg.checkpoint_every == 0)

    def fit(self) -> list[dict[str, Any]]:
        """Run to the end without Ray (tests, benchmarks, the report's re-runs)."""
        history = []
        while not self.finished:
            history.append(self.run_epoch())
        return history

    # ------------------------------------------------------------------ state
    def _weights(self, copy_to_cpu: bool = False) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "regulariser": self.reg.state_dict()}
        if copy_to_cpu:
            state = {k: {n: t.detach().to("cpu", copy=True) for n, t in v.items()}
                     for k, v in state.items()}
        return state

    def _load_weights(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.reg.load_state_dict(state["regulariser"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "reg_optimizer": None if self.reg.optimizer is None else self.reg.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "unlabeled": {"generator": self.unlabeled_generator.get_state(),
                          "order": self.unlabeled_order, "pos": self.unlabeled_pos,
                          "epoch": self.unlabeled_epoch},
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "epoch": self.epoch,
            "bad_epochs": self.bad_epochs,
            "status": self.status,
            "best": {"value": self.best.value, "epoch": self.best.epoch,
                     "metrics": self.best.metrics},
            "test_metrics": self.test_metrics,
            "config": self.cfg.to_flat(),
        }

    def load_state_dict(self, state: dict[str, Any], best_state: dict[str, Any] | None) -> None:
        self._load_weights(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.reg.optimizer is not None and state["reg_optimizer"] is not None:
            self.reg.optimizer.load_state_dict(state["reg_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if state.get("unlabeled") is not None:  # where the pool's draw order stood
            pool = state["unlabeled"]
            self.unlabeled_generator.set_state(pool["generator"].cpu())
            self.unlabeled_order = None if pool["order"] is None else pool["order"].cpu()
            self.unlabeled_pos, self.unlabeled_epoch = pool["pos"], pool["epoch"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_rng_from(rng["numpy"]))
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.epoch = state["epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.status = state["status"]
        best = state["best"]
        self.best = _Best(best["value"], best["epoch"], best["metrics"],
                          best_state["weights"] if best_state else None)
        self.test_metrics = state["test_metrics"]

    def save(self, directory: str | Path) -> None:
        """Write the resumable state and the best weights into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / STATE_FILE)
        if self.best.state is not None:
            torch.save({"weights": self.best.state, "epoch": self.best.epoch,
                        "metrics": self.best.metrics, "config": self.cfg.to_flat()},
                       directory / BEST_FILE)

    def load(self, directory: str | Path) -> None:
        """Read what :meth:`save` wrote. Both files are read with ``weights_only=True``: tensors
        and plain Python values only, so a replaced file cannot run code here."""
        directory = Path(directory)
        state = _load_plain(directory / STATE_FILE, self.device)
        best_path = directory / BEST_FILE
        best = _load_plain(best_path, "cpu") if best_path.exists() else None
        self.load_state_dict(state, best)


#: what NumPy arrays and scalars of plain numeric dtypes need to unpickle: they rebuild numbers
#: from bytes, nothing else (a state.pt written before the NumPy RNG state was stored as a
#: tensor holds a uint32 array; a metric may be a NumPy scalar). Object arrays stay refused.
_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray,
                  np.dtype, *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32,
                                                          np.int64, np.uint8, np.uint16,
                                                          np.uint32, np.uint64, np.float16,
                                                          np.float32, np.float64))]


def _numpy_rng_state() -> tuple:
    """NumPy's global RNG state with its key array as a tensor (loads with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_rng_from(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return name, keys.astype(np.uint32), pos, has_gauss, cached


def _load_plain(path: Path, map_location) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists, tuples, dicts
    and NumPy numbers (:data:`_NUMPY_GLOBALS`) only (PyTorch's restricted unpickler); anything
    else stops with one line naming the file, before any of its code could run."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = next((line.strip() for line in str(exc).splitlines()
                      if "Unsupported global" in line or "Unsupported operand" in line), "")
        why = f": {first[:200]}" if first else ""
        raise ValueError(f"{path}: holds more than tensors and plain values, so it was not "
                         f"loaded (weights_only=True refused it{why}); a checkpoint written by "
                         "this project never does") from None


def load_best(path: str | Path) -> dict[str, Any]:
    """Read a ``best.pt`` written by :meth:`Trainer.save` (weights, epoch, metrics, config) with
    ``weights_only=True`` (see :func:`_load_plain`): loading it runs no code from the file."""
    return _load_plain(Path(path), "cpu")
