"""Ray's own record of a trial (``result.json`` in its trial folder: every report of every
attempt, in order), read to tell a trial that resumed from its checkpoint from one that restarted.
MLflow's step history cannot tell them apart: the MLflow callback skips epochs it has logged."""

from __future__ import annotations

import json
from pathlib import Path


def reports(trial_dir: Path) -> list[dict]:
    """Every report Ray recorded for the trial in ``trial_dir``, in order."""
    text = (Path(trial_dir) / "result.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_resumed_from_checkpoints(trial_dir: Path, epochs: int) -> int:
    """Each attempt after the first goes on at the epoch after the last one reported with a
    checkpoint (``checkpoint_dir_name``), never from epoch 1 again; every epoch 1..``epochs`` is
    reported. Returns how many times the epochs went back (the attempts after the first that
    reported anything); with a checkpoint every epoch, each repeats at most the epoch in flight."""
    rows = reports(trial_dir)
    seen = [r["epoch"] for r in rows]
    assert set(seen) == set(range(1, epochs + 1)), (trial_dir, seen)
    last_checkpoint, previous, resumed = 0, 0, 0
    for row in rows:
        epoch = row["epoch"]
        if epoch <= previous:  # a new attempt
            assert epoch == last_checkpoint + 1, (
                f"{trial_dir.name}: after epoch {previous} the trial went on at epoch {epoch}, but "
                f"its last checkpoint was at epoch {last_checkpoint} (restarted, not resumed): "
                f"{seen}")
            resumed += 1
        else:
            assert epoch == previous + 1, (trial_dir.name, seen)
        if row.get("checkpoint_dir_name"):
            last_checkpoint = epoch
        previous = epoch
    return resumed
