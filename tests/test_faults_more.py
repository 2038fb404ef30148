"""More faults during a search, each with "nothing finished is lost, nothing recorded twice":
a trial that raises (every attempt, or once), a trial that diverges, the MLflow store going away
mid-search, and the disk filling up. Failing trials come from test-only backbones
(tests/fault_plugins.py) that Ray workers register through ``worker_process_setup_hook``."""

from __future__ import annotations

import os

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests import fault_plugins
from trainables.data.parquet import write_parquet
from tuner.search import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_faulty(tmp_path_factory):
    """A local 2-CPU Ray whose workers know the failing test backbones."""
    import ray

    fault_plugins.register()
    markers = tmp_path_factory.mktemp("markers")
    os.environ["FAULT_MARKER_DIR"] = str(markers)
    # address="local": a new Ray even when other Ray instances run on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.fault_plugins.register",
                          "env_vars": {"FAULT_MARKER_DIR": str(markers)}})
    yield markers
    ray.shutdown()


def children(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("run_kind") == "trial"]


def test_raising_and_diverging_trials(tmp_path, monkeypatch, small_data, ray_faulty, capsys):
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "raising", "backbones": ["ef_lstm", "raise_always", "raise_once", "nan_later"],
        "regularisers": ["none"], "data": str(data_dir),
        "ranges": {"lr": [0.005, 1.0e-7]},
        "fixed": {"batch_size": 16, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1},
        # nan_later learns in its first epoch (lr 0.005) and then diverges; the others barely
        # move (lr 1e-7), so a diverged trial's pre-divergence value would be the best
        "start_points": [{"backbone": "ef_lstm", "lr": 1.0e-7},
                         {"backbone": "raise_always", "lr": 1.0e-7},
                         {"backbone": "raise_once", "lr": 1.0e-7},
                         {"backbone": "nan_later", "lr": 0.005}],
        "search": {"sampler": "random", "pruner": "none", "num_samples": 4, "max_epochs": 2,
                   "seed": 0, "max_concurrent": 2},
        "resources": {"cpu": 1},
    }
    (tmp_path / "raising.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    code = main(["--space", "raising.yaml", "--name", "r1"])
    out, err = capsys.readouterr()
    assert code == 3, err[-2000:]  # finished, but a trial errored
    assert "1 completed" not in out and "2 completed, 1 diverged, 1 errored" in out
    assert "Traceback" not in err  # one line per failure; the traceback is in error.txt
    assert err.count("raise_always: a deterministic bug in forward") >= 3  # 2 retries + final

    client = MlflowClient("sqlite:///mlflow.db")
    runs = {r.data.tags["backbone"]: r for r in children(client, "raising")}
    trial_ids = [r.data.tags["ray_trial_id"] for r in runs.values()]
    assert len(runs) == 4 and len(set(trial_ids)) == 4  # every trial once, the retried too

    always = runs["raise_always"]
    assert always.data.tags["status"] == "errored" and always.info.status == "FAILED"
    assert "RuntimeError: raise_always: a deterministic bug" in always.data.tags["error"]
    assert f"Trial {always.data.tags['ray_trial_id']} errored" in err

    once = runs["raise_once"]  # raised at the start of epoch 2, retried from epoch 1's checkpoint
    assert (ray_faulty / "raise_once.raised").exists()
    assert once.data.tags["status"] == "completed" and once.info.status == "FINISHED"
    assert once.data.tags["retries"] == "1"
    steps = [m.step for m in client.get_metric_history(once.info.run_id, "valid_mae")]
    assert sorted(steps) == [1, 2]  # each epoch once
    assert "test_mae" in once.data.metrics

    nan = runs["nan_later"]
    assert nan.data.tags["status"] == "diverged" and nan.info.status == "FAILED"
    assert runs["ef_lstm"].data.tags["status"] == "completed"

    # the diverged trial's first epoch beat everyone, yet it is not the best
    (parent,) = [r for r in client.search_runs([always.info.experiment_id])
                 if r.data.tags.get("run_kind") == "search"]
    assert nan.data.metrics["best_valid_mae"] < parent.data.metrics["best_valid_mae"]
    assert parent.data.tags["best_run_id"] in {runs["ef_lstm"].info.run_id, once.info.run_id}
    assert parent.info.status == "FINISHED"

    study = optuna.load_study(study_name="r1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]  # errored and diverged: FAIL
