"""Nothing lost: the driver killed with SIGKILL mid-search, then --resume."""

import os
import signal
import subprocess
import sys

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.mlflow_store import trials_with_status
from tests.ray_record import assert_resumed_from_checkpoints
from tests.waiting import wait_until
from trainables.data.parquet import write_parquet

pytestmark = pytest.mark.slow


def test_sigkill_driver_then_resume(tmp_path, small_data, ray_local, monkeypatch, capsys):
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "killme", "backbones": ["ef_lstm"], "regularisers": ["none", "mdm"],
        "data": str(data_dir),
        "ranges": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}},
        "fixed": {"batch_size": 16, "patience": 0, "regulariser.unroll": 1,
                  "backbone.hidden": 16, "backbone.num_layers": 1},
        "search": {"sampler": "random", "pruner": "none", "num_samples": 4, "max_epochs": 6,
                   "seed": 0, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    (tmp_path / "killme.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "-m", "tuner.search", "--space", "killme.yaml", "--name", "k1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "mlflow.db"

    def one_done_and_the_next_running() -> bool:
        assert proc.poll() is None, "the search ended before it could be killed"
        return trials_with_status(db, "completed") >= 1 and trials_with_status(db, "running") >= 1

    # kill once a trial has finished and the next one is running (trials follow each other
    # within a fraction of a second in a reused worker: poll, don't sleep a fixed time)
    try:
        wait_until(one_done_and_the_next_running, timeout=400, interval=0.1,
                   message="no trial finished while the next one ran")
    except BaseException:  # leave no search (nor its Ray) running behind a failed test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait(timeout=30)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killme")
    before = {r.data.tags["ray_trial_id"]: r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("run_kind") == "trial"}
    done_before = {t for t, r in before.items() if r.data.tags["status"] == "completed"}
    assert done_before and len(done_before) < 4

    # the resumed search runs in this process, on the tests' shared Ray (CI time: no second
    # interpreter and Ray start); what it resumes is all on disk (Ray's experiment, the stores)
    from tuner.search import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["--space", "killme.yaml", "--name", "k1", "--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Resuming search 'k1'" in out

    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "search"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # a trial started after Ray's last experiment snapshot is unknown to the resumed search,
    # which runs a new one in its place: its run is closed as interrupted, its study trial FAIL
    orphans = [c for c in children if c.data.tags["status"] == "interrupted"]
    assert all(c.info.status == "KILLED" for c in orphans) and len(orphans) <= 1
    children = [c for c in children if c not in orphans]
    trial_ids = [c.data.tags["ray_trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 4  # every trial once, none lost
    study = optuna.load_study(study_name="k1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4 + ["FAIL"] * len(orphans)
    for child in children:
        assert child.data.tags["status"] == "completed"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "valid_mae")]
        assert set(steps) == set(range(1, 7))
        if child.data.tags["ray_trial_id"] in done_before:
            assert sorted(steps) == list(range(1, 7))  # finished before the kill: not re-run
        # Ray's own record: the trial in flight at the kill went on from its last checkpoint
        (trial_dir,) = (tmp_path / "ray_results" / "k1").glob(
            f"{child.data.tags['ray_trial_id']}-*")
        assert_resumed_from_checkpoints(trial_dir, 6)


def test_restored_callback_of_an_older_version_is_reset(tmp_path):
    """``Tuner.restore`` unpickles the MLflow callback saved when the search started; a callback
    pickled by an older version of the class (here: without ``nodes``) must still work after
    ``rebind_callbacks`` points it at the resumed search's tracker."""
    from types import SimpleNamespace

    from ray.tune import RunConfig

    from tuner.tracking import MlflowTrialCallback, Tracker, rebind_callbacks

    old = Tracker(f"sqlite:///{tmp_path / 'old.db'}", experiment_name="compat")
    callback = MlflowTrialCallback(old)
    callback.run_ids["t1"] = "stale"
    del callback.nodes  # what unpickling an older callback gives
    new = Tracker(f"sqlite:///{tmp_path / 'new.db'}", experiment_name="compat")
    run_config = RunConfig(callbacks=[callback])
    tuner = SimpleNamespace(_local_tuner=SimpleNamespace(get_run_config=lambda: run_config))
    rebind_callbacks(tuner, new)
    assert callback.tracker is new
    assert callback.nodes == {} and callback.run_ids == {} and callback.logged_steps == {}


def test_callback_keeps_only_the_id_of_a_finished_trial(tmp_path):
    """The MLflow callback drops a trial's run id, node and logged epochs once its run is
    closed (issue 10, "Load": the driver's memory stays flat over many trials); a repeated
    completion neither reopens nor duplicates the run."""
    from types import SimpleNamespace

    from tuner.tracking import MlflowTrialCallback, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="flat")
    tracker.start_search("s", params={}, tags={}, files={})
    callback = MlflowTrialCallback(tracker)
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.01, "backbone": "ef_lstm"},
                            last_result={})
    callback.on_trial_start(0, [trial], trial)
    for epoch in (1, 2):
        trial.last_result = {"epoch": epoch, "valid_mae": 1.0 / epoch, "best_epoch": epoch,
                             "trial_status": "completed" if epoch == 2 else "running",
                             "ray_node_id": "n1", "node_ip": "127.0.0.1"}
        callback.on_trial_result(0, [trial], trial, trial.last_result)
    assert callback.run_ids and callback.nodes and callback.logged_steps
    callback.on_trial_complete(0, [trial], trial)
    callback.on_trial_complete(0, [trial], trial)
    assert callback.finished == {"t1"}
    assert callback.run_ids == {} and callback.nodes == {} and callback.logged_steps == {}
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.ray_trial_id = 't1'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["status"] == "completed" and runs[0].data.tags["ray_node_id"] == "n1"
    assert [m.step for m in tracker.client.get_metric_history(runs[0].info.run_id,
                                                             "valid_mae")] == [1, 2]


def test_sync_closes_a_child_run_that_ray_never_recorded(tmp_path):
    """A child run opened just before the driver was killed, for a trial Ray's experiment
    snapshot does not hold: the resumed search ran a new trial instead, so the end-of-search
    sync closes the orphan as ``interrupted`` (KILLED) and leaves the real trials alone."""
    from types import SimpleNamespace

    from tuner.tracking import INTERRUPTED_NOTE, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="orphans")
    tracker.start_search("s", params={}, tags={}, files={})
    real = tracker.create_child("t1", {"lr": 0.01, "backbone": "ef_lstm"})
    orphan = tracker.create_child("t9", {"lr": 0.02, "backbone": "ef_lstm"})
    report = {"trial_id": "t1", "epoch": 1, "training_iteration": 1, "valid_mae": 0.9,
              "best_valid_mae": 0.9, "best_epoch": 1, "trial_status": "completed",
              "test_mae": 1.0}
    result = SimpleNamespace(metrics=report, path=None, error=None,
                             metrics_dataframe=None)
    assert tracker.sync_results([result]) == 2
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert runs[real].info.status == "FINISHED" and runs[real].data.tags["status"] == "completed"
    assert runs[orphan].info.status == "KILLED"
    assert runs[orphan].data.tags["status"] == "interrupted"
    assert runs[orphan].data.tags["note"] == INTERRUPTED_NOTE
    assert tracker.sync_results([result]) == 0  # nothing left to write

