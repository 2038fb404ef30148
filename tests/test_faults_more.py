"""More faults during a search, each with "nothing finished is lost, nothing recorded twice":
a trial that raises (every attempt, or once), a trial that diverges, the MLflow store going away
mid-search, and the disk filling up. Failing trials come from test-only backbones
(tests/fault_plugins.py) that Ray workers register through ``worker_process_setup_hook``."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests import fault_plugins
from tests.mlflow_store import trials_with_status
from tests.ray_record import assert_resumed_from_checkpoints
from tests.waiting import wait_until
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
    # the workers import tests.fault_plugins: pytest put the repository on the driver's
    # sys.path only, so give it to the workers (they inherit the driver's environment)
    root = str(Path(__file__).resolve().parents[1])
    env_vars = {"FAULT_MARKER_DIR": str(markers),
                "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                              if p)}
    if ray.is_initialized():  # the shared plain Ray of the modules before (conftest.ray_local)
        ray.shutdown()
    # address="local": a new Ray even when other Ray instances run on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.fault_plugins.register",
                          "env_vars": env_vars})
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
    # the whole summary line: the retried trial counts as completed once (Ray's own table prints
    # "Trial train_fusion_<id> completed ...", so a bare "1 completed" substring test is flaky)
    assert "Search 'r1' finished: 2 completed, 1 diverged, 1 errored\n" in out, out[-3000:]
    assert "Traceback" not in err  # one line per failure; the traceback is in error.txt
    assert err.count("raise_always: a deterministic bug in forward") >= 3  # 2 retries + final

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
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
    # Ray's record: the retry went on at epoch 2 from epoch 1's checkpoint, not at epoch 1
    (trial_dir,) = (tmp_path / "ray_results" / "r1").glob(f"{once.data.tags['ray_trial_id']}-*")
    assert_resumed_from_checkpoints(trial_dir, 2)

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


def test_errored_trial_fixed_then_resumed_gets_a_new_optuna_trial(tmp_path, monkeypatch,
                                                                   small_data, ray_faulty,
                                                                   capsys, caplog):
    """A trial that errored for good was told FAIL; after a fix, ``--resume`` runs it again from
    its checkpoint. Its finished FAIL cannot change, so the resumed attempt is a new Optuna
    trial with the same parameters and the first attempt's epochs (the pruner's history), told
    COMPLETE with the value Ray and MLflow record; nothing stays RUNNING, no tell is refused.
    A ConcurrencyLimiter (max_concurrent) must pass that trial's end on to the study too."""
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "fixed", "backbones": ["ef_lstm", "raise_until_fixed"], "regularisers": ["none"],
        "data": str(data_dir), "ranges": {"lr": [0.005, 0.002]},
        "fixed": {"batch_size": 16, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1},
        "start_points": [{"backbone": "raise_until_fixed"}, {"backbone": "ef_lstm"}],
        "search": {"sampler": "random", "pruner": "median", "num_samples": 2, "max_epochs": 3,
                   "grace_epochs": 1, "seed": 0, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    (tmp_path / "fixed.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="tuner.pruning")
    assert main(["--space", "fixed.yaml", "--name", "f1"]) == 3  # the bug: errored
    study = optuna.load_study(study_name="f1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    first = {t.params["backbone"]: t for t in study.trials}
    assert first["raise_until_fixed"].state.name == "FAIL"
    assert first["raise_until_fixed"].intermediate_values.keys() == {1}  # epoch 1 ran
    capsys.readouterr()

    # resumed before the fix: one more try (Tune keeps its failure count: 3 before, so the 4th
    # is final), which errors before a new report; its FAIL is all there is
    assert main(["--space", "fixed.yaml", "--name", "f1", "--resume"]) == 3
    again = capsys.readouterr().err
    assert "errored for good after 4 failures (RuntimeError: raise_until_fixed" in again
    study = optuna.load_study(study_name="f1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]

    (ray_faulty / "raise_until_fixed.fixed").touch()  # the fix
    code = main(["--space", "fixed.yaml", "--name", "f1", "--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "Search 'f1' finished: 2 completed\n" in out, out[-2000:]
    refused = [r.getMessage() for r in caplog.records if r.name == "tuner.pruning"
               and r.levelno >= logging.WARNING]
    assert not refused, refused

    study = optuna.load_study(study_name="f1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    failed, retried = trials[0], trials[2]
    assert failed.params == retried.params and failed.distributions == retried.distributions
    assert retried.user_attrs["retry_of"] == failed.number
    assert retried.intermediate_values.keys() == {1, 2, 3}
    assert retried.intermediate_values[1] == failed.intermediate_values[1]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for r in children(client, "fixed")
              if r.data.tags["backbone"] == "raise_until_fixed"]
    assert run.data.tags["status"] == "completed"
    assert retried.value == pytest.approx(run.data.metrics["best_valid_mae"])


def test_reused_worker_reproduces_fresh_runs(tmp_path, monkeypatch, small_data, ray_faulty, capsys):
    """search.reuse_workers (default auto: on a local Ray): trials run one after another in one
    worker process, and each gives exactly what its configuration gives in a fresh process (the
    test's own)."""
    import json

    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    tiny_space(tmp_path, small_data, "reuse", num_samples=4, backbones=["pid_probe"],
               regularisers=["none", "mdm"], seed=3, fixed={"backbone.dropout": 0.2})
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "reuse.yaml", "--name", "u1"]) == 0, capsys.readouterr().err[-2000:]
    pids = (ray_faulty / "pid_probe.pids").read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 1, pids  # one process ran all four trials

    trials = [[json.loads(line) for line in path.read_text().splitlines()]
              for path in (tmp_path / "ray_results" / "u1").glob("*/result.json")]
    assert len(trials) == 4
    assert {t[-1]["config"]["regulariser"] for t in trials} == {"none", "mdm"}
    for reports in trials:
        fresh = Trainer(TrialConfig.from_flat(reports[-1]["config"]), small_data, device="cpu",
                        num_threads=1).fit()
        assert [r["valid_mae"] for r in reports] == [h["valid_mae"] for h in fresh]
        assert reports[-1]["test_mae"] == fresh[-1]["test_mae"]


# ---------------------------------------------------------------- the MLflow server goes away
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on localhost over a SQLite store in ``root``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts")],
        cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        assert proc.poll() is None, "mlflow server did not start"
        return False

    wait_until(healthy, timeout=300, interval=0.5, message="mlflow server did not answer")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tiny_space(tmp_path: Path, small_data, name: str, num_samples: int, epochs: int = 2,
               backbones=("ef_lstm",), regularisers=("none",), seed: int = 0,
               fixed: dict | None = None) -> Path:
    """A small random search, one trial at a time, written to ``tmp_path / f"{name}.yaml"``."""
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": name, "backbones": list(backbones), "regularisers": list(regularisers),
        "data": str(data_dir),
        "ranges": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}},
        "fixed": {"batch_size": 16, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1, **(fixed or {})},
        "search": {"sampler": "random", "pruner": "none", "num_samples": num_samples,
                   "max_epochs": epochs, "seed": seed, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def assert_each_trial_once(client: MlflowClient, experiment: str, trials: int, epochs: int):
    runs = children(client, experiment)
    # a trial started after Ray's last experiment snapshot before the stop: --resume ran a new
    # trial in its place and closed this one's run (tracking.Tracker.sync_results)
    interrupted = [r for r in runs if r.data.tags["status"] == "interrupted"]
    assert all(r.info.status == "KILLED" for r in interrupted) and len(interrupted) <= 1
    runs = [r for r in runs if r.data.tags["status"] != "interrupted"]
    ids = [r.data.tags["ray_trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == trials, ids  # none lost, none twice
    for run in runs:
        assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid_mae")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps  # every epoch once
        assert "test_mae" in run.data.metrics and "lr" in run.data.params
    return runs


def ray_trials_on_disk(experiment_dir: Path) -> dict[str, int]:
    """Trial folder -> number of reports in its progress.csv."""
    return {p.parent.name: len(p.read_text().strip().splitlines()) - 1
            for p in experiment_dir.glob("*/progress.csv")}


def test_mlflow_server_down_mid_search_then_resume_syncs(tmp_path, monkeypatch, small_data,
                                                         ray_faulty, capsys):
    epochs = 6  # a trial lasts a few seconds even in a reused worker: the kill lands mid-search
    tiny_space(tmp_path, small_data, "offline", num_samples=3, epochs=epochs)
    monkeypatch.chdir(tmp_path)
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    killed = []

    def killer():  # the server dies once the first trial is recorded as completed
        if wait_until(lambda: server.poll() is not None
                      or trials_with_status(tmp_path / "server.db", "completed") >= 1,
                      timeout=400, interval=0.05, raise_on_timeout=False) \
                and server.poll() is None:
            stop(server)
            killed.append(time.time())

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        code = main(["--space", "offline.yaml", "--name", "o1",
                     "--mlflow-uri", f"http://127.0.0.1:{port}"])
    finally:
        thread.join(timeout=30)
        stop(server)
    out, err = capsys.readouterr()
    assert killed, "the server was not killed mid-search"
    assert code == 4, err[-2000:]  # finished, MLflow incomplete
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow http")]
    assert len(warnings) == 1 and "store unreachable" in warnings[0], err[-2000:]
    assert "--resume --name o1" in err
    assert "Search 'o1' finished: 3 completed" in out
    # Ray's results on disk are complete
    reports = ray_trials_on_disk(tmp_path / "ray_results" / "o1")
    assert len(reports) == 3 and set(reports.values()) == {epochs}

    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    before = children(client, "offline")
    assert 1 <= sum(r.data.tags["status"] == "completed" for r in before) < 3

    # the server comes back (another port, the same store): --resume writes what it missed
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        code = main(["--space", "offline.yaml", "--name", "o1", "--resume",
                     "--mlflow-uri", f"http://127.0.0.1:{port}"])
        out, err = capsys.readouterr()
        assert code == 0, err[-2000:]
        assert "MLflow: wrote the records of" in out
        assert_each_trial_once(client, "offline", trials=3, epochs=epochs)
        (parent,) = [r for r in client.search_runs([before[0].info.experiment_id])
                     if r.data.tags.get("run_kind") == "search"]
        assert parent.info.status == "FINISHED" and "best_valid_mae" in parent.data.metrics
        assert len(client.search_model_versions("name = 'offline-best'")) == 1
        # a second resume finds nothing to write and records nothing twice
        assert main(["--space", "offline.yaml", "--name", "o1", "--resume",
                     "--mlflow-uri", f"http://127.0.0.1:{port}"]) == 0
        assert "MLflow: wrote" not in capsys.readouterr().out
        assert_each_trial_once(client, "offline", trials=3, epochs=epochs)
        assert len(client.search_model_versions("name = 'offline-best'")) == 1
    finally:
        stop(server)


# ---------------------------------------------------------------- the disk fills up
@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free (to the last byte by default)."""
    filler = disk / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):  # down to the last partial block
            try:
                while shutil.disk_usage(disk).free - size >= leave:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_disk_full_mid_search_then_resume(tmp_path, monkeypatch, small_data, ray_faulty, capsys,
                                         small_disk):
    # 6 epochs: a trial lasts a few seconds even in a reused worker, so the disk fills while
    # the second one runs
    epochs = 6
    tiny_space(tmp_path, small_data, "fulldisk", num_samples=3, epochs=epochs)
    monkeypatch.chdir(tmp_path)  # MLflow (sqlite) in tmp_path; Ray's storage on the small disk
    filled = []

    def filler():  # the disk fills once the first trial is recorded as completed
        if wait_until(lambda: trials_with_status(tmp_path / "mlflow.db", "completed") >= 1,
                      timeout=400, interval=0.05, raise_on_timeout=False):
            # less room than a step may write: the search stops before Ray's uploads fail
            filled.append(fill(small_disk, leave=256 * 1024))

    thread = threading.Thread(target=filler, daemon=True)
    thread.start()
    cmd = ["--space", "fulldisk.yaml", "--name", "d1", "--storage", str(small_disk)]
    code = main(cmd)
    thread.join(timeout=30)
    out, err = capsys.readouterr()
    assert filled, "the disk was not filled mid-search"
    assert code == 5, err[-3000:]
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: no space left on device")]
    assert str(small_disk) in line and "MiB free" in line and "--resume --name d1" in line

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = [r for r in children(client, "fulldisk") if r.data.tags["status"] == "completed"]
    assert 1 <= len(done) < 3  # what finished before the disk filled is in MLflow ...
    reports = ray_trials_on_disk(small_disk / "d1")  # ... and intact on disk
    for run in done:
        (folder,) = [f for f in reports if f.startswith(run.data.tags["ray_trial_id"])]
        assert reports[folder] == epochs
        assert list((small_disk / "d1" / folder).glob("checkpoint_*/best.pt"))

    filled[0].unlink()  # space again: --resume continues
    code = main(cmd + ["--resume"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Search 'd1' finished: 3 completed" in out, out
    assert_each_trial_once(client, "fulldisk", trials=3, epochs=epochs)
