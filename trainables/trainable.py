"""The Ray Tune function trainable: build, resume, loop over epochs, report (with a checkpoint
every ``checkpoint_every`` epochs, on each validation improvement and at the end).

Reads like Ray's ``mnist_pytorch`` example on purpose; everything else is in
:mod:`trainables.loop`. Every report carries this epoch's validation metrics, the best-so-far
(``best_valid_*``, what the search optimises) and the trial's status; the last report of a
trial also carries ``test_*`` of its best-validation epoch. A non-finite loss ends the trial with
``trial_status == "diverged"`` (and a NaN metric) instead of raising, so the search goes on and
the retry machinery does not re-run a deterministic divergence.

Every report also carries what the trial costs so far (:func:`trial_cost`: the peak resident
memory of the trial's process and, on CUDA, the peak allocated GPU memory), and the first report
of each start the environment it runs in (``env.*``, :func:`trainables.environment.collect_environment`):
the driver records both in the trial's MLflow run.
"""

from __future__ import annotations

import re
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from trainables.config import TrialConfig
from trainables.data.batches import DROP_SETS, MultimodalData, TensorSplit, iterate_batches
from trainables.environment import collect_environment
from trainables.loop import Trainer, load_best

__all__ = ["critic_scores", "evaluate_checkpoint", "peak_rss_mb", "probe_checkpoint",
           "reset_peak_memory", "train_fusion", "trial_cost", "trial_node_id",
           "trial_num_threads"]

#: the prefix of the environment keys in a trial's first report (and of the MLflow tags)
ENV_PREFIX = "env."
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device | str, cuda=None) -> None:
    """Start counting peak memory from now: a reused Ray worker ran other trials before.

    Linux resets a process's peak resident set (``VmHWM``) when ``5`` is written to
    ``/proc/self/clear_refs``; where that is refused, :func:`peak_rss_mb` falls back to the
    process's lifetime peak. On CUDA, torch's peak allocated memory is reset too (``cuda``: the
    ``torch.cuda`` module; tests pass a stand-in)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        (cuda or torch.cuda).reset_peak_memory_stats(torch.device(device))


def peak_rss_mb() -> float:
    """The peak resident memory of this process in MiB since :func:`reset_peak_memory`
    (``VmHWM``), else since it started (``getrusage``)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def trial_cost(device: torch.device | str, cuda=None) -> dict[str, float]:
    """What the trial's process used so far: ``cost.peak_rss_mb`` and, on CUDA,
    ``cost.peak_cuda_allocated_mb`` (torch's peak of allocated tensor memory, not the cache)."""
    cost = {"cost.peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.device(device).type == "cuda":
        allocated = (cuda or torch.cuda).max_memory_allocated(torch.device(device))
        cost["cost.peak_cuda_allocated_mb"] = round(allocated / 2**20, 1)
    return cost


def trial_num_threads() -> int | None:
    """CPU threads for this trial: the CPUs Ray assigned to it (None outside Ray)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker
        return None
    return max(1, int(cpus)) if cpus else 1


def trial_node_id() -> str:
    """The id of the Ray node this trial runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # not inside a Ray worker
        return ""


def train_fusion(config: dict[str, Any], data: MultimodalData) -> None:
    """Train one backbone + regulariser configuration; ``data`` comes via ``tune.with_parameters``."""
    cfg = TrialConfig.from_flat(config)
    trainer = Trainer(cfg, data, num_threads=trial_num_threads())
    reset_peak_memory(trainer.device)
    # where this start of the trial runs (a retry may run on another node): first report only
    environment = {ENV_PREFIX + k: v for k, v in collect_environment().items()}

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)

    node_id = trial_node_id()
    while not trainer.finished:
        # the Ray node, so that the driver can record where each epoch ran
        metrics = {**trainer.run_epoch(), "ray_node_id": node_id, **trial_cost(trainer.device),
                   **environment}
        environment = {}
        if not trainer.checkpoint_due():  # a TFN checkpoint is ~146 MB: not every epoch
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
            trainer.save(directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _evaluate_dropped(trainer: Trainer, data: MultimodalData, split: str, dropped: str,
                      weights: dict[str, Any]) -> dict[str, float]:
    """``trainer``'s metrics on ``split`` with the modalities of ``dropped`` removed: the split as
    the model reads it (:meth:`prepare_split`), then :meth:`drop_inputs` (the model's own token
    ids); the trainer's own copy of the split is restored."""
    full = trainer.splits[split]
    arrays = trainer.model.drop_inputs(trainer.model.prepare_split(data.splits[split]), dropped)
    trainer.splits[split] = TensorSplit.from_arrays(arrays)
    try:
        return trainer.evaluate(split, weights)
    finally:
        trainer.splits[split] = full


def evaluate_checkpoint(best_file: str | Path, data: MultimodalData, split: str = "test",
                        device: str | None = None, drop: str | None = None) -> dict[str, float]:
    """Metrics of the weights in a ``best.pt`` on one split (``{split}_mae``, ...); ``drop``
    names a modality or a ``+``-joined set (``"text+audio"``) removed from that split first (the
    robustness evaluation; see :func:`trainables.data.batches.drop_modality`)."""
    best = load_best(best_file)
    trainer = Trainer(TrialConfig.from_flat(best["config"]), data, device=device)
    if drop is not None:
        return _evaluate_dropped(trainer, data, split, drop, best["weights"])
    return trainer.evaluate(split, best["weights"])


def critic_scores(best_file: str | Path, data: MultimodalData, split: str = "test",
                  device: str | None = None) -> np.ndarray | None:
    """Per-example scores of the regulariser's critic on ``split`` (rows in split order), for
    regularisers with a ``scores(out)`` method (MDM's statistic network T_θ on the joint
    sample); None for the others."""
    return probe_checkpoint(best_file, data, (), split, device)[1]


@torch.inference_mode()
def probe_checkpoint(best_file: str | Path, data: MultimodalData,
                     drops: tuple[str, ...] = DROP_SETS, split: str = "test",
                     device: str | None = None) -> tuple[dict[str, dict[str, float]],
                                                         np.ndarray | None]:
    """What the report asks of one ``best.pt``, with one model build: the metrics on ``split``
    with each drop set of ``drops`` removed (``{"text+audio": {f"{split}_mae": ...}, ...}``), and
    the critic's per-example scores on the full split (None when the regulariser has no
    ``scores``). Only evaluates: the weights are the checkpoint's, chosen on validation before.
    """
    best = load_best(best_file)
    trainer = Trainer(TrialConfig.from_flat(best["config"]), data, device=device)
    dropped = {name: _evaluate_dropped(trainer, data, split, name, best["weights"])
               for name in drops}
    scores = getattr(trainer.reg, "scores", None)
    if scores is None:
        return dropped, None
    trainer._load_weights(best["weights"])
    trainer.model.eval()
    trainer.reg.eval()
    out = []
    for batch in iterate_batches(trainer.splits[split], 256, shuffle=False, trim=trainer.trim):
        features = trainer.model(batch.to(trainer.device))
        out.append(scores(features).float().cpu())
    return dropped, torch.cat(out).numpy()
