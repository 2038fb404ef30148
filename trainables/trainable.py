"""The Ray Tune function trainable: build, resume, loop over epochs, report with a checkpoint.

Reads like Ray's ``mnist_pytorch`` example on purpose; everything else is in
:mod:`trainables.loop`. Every report carries this epoch's validation metrics, the best-so-far
(``best_valid_*``, what the search optimises) and the trial's status; the last report of a
trial also carries ``test_*`` of its best-validation epoch. A non-finite loss ends the trial with
``trial_status == "diverged"`` (and a NaN metric) instead of raising, so the search goes on and
the retry machinery does not re-run a deterministic divergence.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from trainables.config import TrialConfig
from trainables.data.batches import MultimodalData
from trainables.loop import Trainer, load_best

__all__ = ["evaluate_checkpoint", "train_fusion", "trial_node_id", "trial_num_threads"]


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

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)

    node_id = trial_node_id()
    while not trainer.finished:
        metrics = trainer.run_epoch()
        with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
            trainer.save(directory)
            # the Ray node, so that the driver can record where each epoch ran
            tune.report({**metrics, "ray_node_id": node_id},
                        checkpoint=tune.Checkpoint.from_directory(directory))


def evaluate_checkpoint(best_file: str | Path, data: MultimodalData, split: str = "test",
                        device: str | None = None) -> dict[str, float]:
    """Metrics of the weights in a ``best.pt`` on one split (``{split}_mae``, ...)."""
    best = load_best(best_file)
    trainer = Trainer(TrialConfig.from_flat(best["config"]), data, device=device)
    return trainer.evaluate(split, best["weights"])
