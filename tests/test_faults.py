"""Faults during a search: a trial's worker killed mid-trial resumes from its checkpoint; a
trial that raises is recorded as errored and the search goes on."""

import os

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.ray_record import assert_resumed_from_checkpoints
from tests.waiting import wait_until
from trainables.data.parquet import write_parquet
from tuner.search import main

pytestmark = pytest.mark.slow


def trial_workers() -> list[psutil.Process]:
    """This test's trial workers: the ``ray::ImplicitFunc`` / ``ray::train_fusion`` processes
    among this process's descendants (the ``ray_local`` Ray's raylet, started by this process,
    starts them), never another job's workers on the same machine."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmdline.startswith("ray::ImplicitFunc") or cmdline.startswith("ray::train_fusion"):
            found.append(proc)
    return found


def test_killed_worker_resumes_from_checkpoint(tmp_path, monkeypatch, small_data, ray_local):
    import threading

    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "faults", "backbones": ["tfn"], "regularisers": ["none"], "data": str(data_dir),
        "fixed": {"batch_size": 8, "patience": 0, "lr": 0.001, "checkpoint_every": 1},
        "search": {"sampler": "random", "pruner": "none", "num_samples": 1, "max_epochs": 12,
                   "seed": 0},
        "resources": {"cpu": 1},
    }
    (tmp_path / "faults.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    killed = []
    search_over = threading.Event()  # no kill after the search: later tests' workers are ours too

    def killer():
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

        def third_epoch_and_its_worker():
            if search_over.is_set():
                return True
            try:
                runs = client.search_runs(
                    [client.get_experiment_by_name("faults").experiment_id],
                    filter_string="tags.run_kind = 'trial'")
                enough = runs and len(
                    client.get_metric_history(runs[0].info.run_id, "valid_mae")) >= 3
            except Exception:  # the store is being created
                enough = False
            return enough and trial_workers()

        workers = wait_until(third_epoch_and_its_worker, timeout=300, interval=0.2,
                             raise_on_timeout=False)
        if search_over.is_set():
            return
        for proc in workers or []:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
            killed.append(proc.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        assert main(["--space", "faults.yaml", "--name", "f1"]) == 0
    finally:
        search_over.set()
        thread.join(timeout=30)
    assert killed, "the trial's worker process was not found"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (child,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                                  filter_string="tags.run_kind = 'trial'")
    assert child.data.tags["status"] == "completed"
    assert child.data.tags.get("retries") == "1"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "valid_mae")]
    # it went on from its last checkpoint: every epoch is there, at most the one in flight twice
    assert set(steps) == set(range(1, 13))
    assert len(steps) <= 13
    # Ray's own record: after the kill the trial went on from its last checkpoint (with one every
    # epoch: at most the epoch in flight again), not from epoch 1
    (trial_dir,) = (tmp_path / "ray_results" / "f1").glob("*/result.json")
    assert_resumed_from_checkpoints(trial_dir.parent, 12)
