"""A tiny real search (local Ray, Optuna, SQLite MLflow), then MLflow read back."""

import json
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from trainables.data.parquet import write_parquet
from tuner.search import main

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_space(tmp_path, small_data):
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "tiny",
        "backbones": ["ef_lstm"],
        "regularisers": ["none", "mdm"],
        "data": str(data_dir),
        # one learning rate that learns and one that cannot: the median pruner must stop some
        "ranges": {"lr": [0.005, 1.0e-7], "regulariser.estimator": ["kl", "w"]},
        "fixed": {"batch_size": 16, "patience": 0, "regulariser.unroll": 1,
                  "backbone.hidden": 16},
        # two learning trials first, so that the median pruner has a reference, then bad ones
        "start_points": [
            {"regulariser": "none", "lr": 0.005},
            {"regulariser": "mdm", "lr": 0.005, "regulariser.estimator": "kl"},
            {"regulariser": "mdm", "lr": 1.0e-7, "regulariser.estimator": "w"},
            {"regulariser": "none", "lr": 1.0e-7},
        ],
        "search": {"sampler": "random", "pruner": "median", "num_samples": 7, "max_epochs": 4,
                   "grace_epochs": 1, "seed": 1, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_tiny_search_is_tracked_in_mlflow(tmp_path, monkeypatch, tiny_space, small_data,
                                          ray_local, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(tiny_space), "--name", "e2e"]) == 0
    out, err = capsys.readouterr()
    assert "Best configuration (chosen on validation only)" in out
    # quiet by default: Ray's start-up notices are for -v
    assert "Token authentication" not in out + err and "TensorBoard" not in out + err
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert "#/experiments/" in out
    # before the first trial: the plan (as --dry-run counts it), the ui command, the runs URLs
    lines = out.splitlines()
    first_trial = next(i for i, line in enumerate(lines) if line.startswith("Trial "))
    plan_line = _index(lines, "Search 'e2e': 7 trials (random sampler, median pruner) of up to 4 "
                              "epochs each, at most 28 trial-epochs")
    ui_line = _index(lines, "mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000 "
                            "--host 127.0.0.1")
    parent_line = _index(lines, "http://127.0.0.1:5000/#/experiments/")
    assert plan_line < ui_line < parent_line < first_trial, out[:3000]
    # ... and still at the end
    assert _index(lines, "Browse the runs:") > first_trial
    # every URL opens the UI's Model-training workspace
    urls = re.findall(r"http://127\.0\.0\.1:5000/\S+", out)
    assert urls and all(u.endswith("?workflowType=machine_learning") for u in urls), urls
    # progress with an ETA once epochs are timed, the last one when every trial has ended
    progress = [line for line in lines if line.startswith("Progress: ")]
    assert progress and all(" ETA " in line and "ef_lstm + none" in line for line in progress)
    assert progress[-1].startswith("Progress: 7/7 trials done (") and "ETA 0 s" in progress[-1]
    assert re.search(r"; \d+/28 trial-epochs;", progress[-1]), progress[-1]

    client = MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "search"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1 and len(children) == 7
    parent = parents[0]
    # the search's own page, printed before the first trial
    this_search = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/"
                   f"{parent.info.run_id}?workflowType=machine_learning")
    assert _index(lines, this_search) < first_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data_digest"] == small_data.digest
    assert parent.data.tags["git_commit"]
    assert "tuner.search" in parent.data.tags["command"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)

    # the data as an MLflow dataset on every run; the environment on every run
    for run in (parent, *children):
        inputs = run.inputs.dataset_inputs
        assert [i.dataset.name for i in inputs][:1] == ["data"], inputs  # the Parquet folder
        assert inputs[0].dataset.digest == small_data.digest[:36]
        assert json.loads(inputs[0].dataset.profile)["train_rows"] == len(small_data.splits["train"])
        assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]
        assert run.data.tags["env.torch_version"] == torch.__version__
        assert run.data.tags["env.gpu_count"] == "0" and run.data.tags["env.git_commit"]
    # what each trial cost, and the parent's live counts
    for child in children:
        epochs = len(client.get_metric_history(child.info.run_id, "valid_mae"))
        assert child.data.metrics["cost.trial_epochs"] == epochs
        assert child.data.metrics["cost.peak_rss_mb"] > 50
        assert 0 < child.data.metrics["cost.wall_s"]
        assert child.data.tags["env.threads"] == "1"  # the trial's one CPU
    counts = {k: parent.data.metrics.get(k) for k in ("trials_completed", "trials_pruned",
                                                       "trials_failed", "trials_running")}
    assert counts["trials_completed"] + counts["trials_pruned"] == 7, counts
    assert counts["trials_pruned"] == sum(c.data.tags["status"] == "pruned" for c in children)
    assert counts["trials_failed"] == 0 and counts["trials_running"] == 0
    assert parent.data.metrics["best_so_far"] == pytest.approx(parent.data.metrics["best_valid_mae"])
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "trials_running")
            ][:1] == [1]  # live while the search ran (one trial at a time)

    statuses = {c.data.tags["status"] for c in children}
    assert "pruned" in statuses, statuses
    assert statuses <= {"pruned", "completed", "early_stopped"}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "valid_mae")
        epochs = sorted(m.step for m in history)
        assert epochs == list(range(1, len(epochs) + 1))
        assert child.data.params["backbone"] == "ef_lstm"
        assert "lr" in child.data.params and "regulariser" in child.data.params
        # the row of the table it belongs to (the space's default cells: backbone, regulariser)
        assert child.data.tags["cell"] == (f"backbone=ef_lstm,regulariser="
                                           f"{child.data.params['regulariser']}")
        if child.data.tags["status"] == "pruned":
            assert child.info.status == "KILLED"
            assert len(epochs) < 4
        else:
            assert len(epochs) == 4 and "test_mae" in child.data.metrics

    # the best trial's checkpoint is an artifact of the parent run, and it loads
    names = [a.path for a in client.list_artifacts(parent.info.run_id, "best_checkpoint")]
    assert names == ["best_checkpoint/best.pt"]
    local = client.download_artifacts(parent.info.run_id, "best_checkpoint/best.pt", str(tmp_path))
    best = torch.load(local, weights_only=True)  # tensors and plain values only
    assert set(best) >= {"weights", "epoch", "metrics", "config"}
    assert parent.data.metrics["best_valid_mae"] == pytest.approx(
        min(c.data.metrics["best_valid_mae"] for c in children))
    assert "test_mae" in parent.data.metrics
    # ... and registered as a model version of "<space>-best", with its metrics
    versions = client.search_model_versions("name = 'tiny-best'")
    assert len(versions) == 1
    assert versions[0].run_id == parent.data.tags["best_run_id"]
    assert float(versions[0].tags["best_valid_mae"]) == pytest.approx(
        parent.data.metrics["best_valid_mae"], rel=1e-5)
    assert "test_mae" in versions[0].tags and versions[0].tags["search"] == "e2e"
    space_files = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "space.yaml" in space_files

    # the Optuna study lives next to the MLflow store and knows which trials were pruned
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{Path('optuna.db').resolve()}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states
    # each cell (none, mdm) got its share of the 7 trials, and its Optuna trials know their cell
    cells = [t.user_attrs["cell"] for t in study.trials]
    assert sorted(cells) == sorted(c.data.tags["cell"] for c in children)
    assert sorted(cells.count(c) for c in set(cells)) == [3, 4]
    assert states.count(optuna.trial.TrialState.PRUNED) == sum(
        c.data.tags["status"] == "pruned" for c in children)


def _index(lines: list[str], text: str) -> int:
    """The first line that contains ``text``."""
    found = [i for i, line in enumerate(lines) if text in line]
    assert found, f"{text!r} not in the output"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_ui_serves_the_store_while_the_search_runs(tmp_path, monkeypatch, tiny_space, ray_local,
                                                   capsys):
    """--ui: `mlflow ui` answers on 127.0.0.1 during the search (polled from here while it runs),
    its URL is printed before the first trial, and it is gone (port closed, process group
    ended) when the search returns."""
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    seen: list[float] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            if _answers(f"http://127.0.0.1:{port}/health"):
                seen.append(time.monotonic())
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        assert main(["--space", str(tiny_space), "--name", "ui", "--ui", "--ui-port", str(port),
                     "--num-samples", "2", "--max-epochs", "1", "--pruner", "none"]) == 0
        ended = time.monotonic()
    finally:
        done.set()
        poller.join(timeout=10)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert seen and seen[0] < ended, "mlflow ui never answered during the search"
    first_trial = next(i for i, line in enumerate(lines) if line.startswith("Trial "))
    ui_line = _index(lines, "MLflow UI (--ui, pid ")
    assert ui_line < first_trial
    assert f"http://127.0.0.1:{port}/#/experiments/" in lines[ui_line]
    pid = int(re.search(r"pid (\d+)", lines[ui_line]).group(1))
    # gone with the search: the port is closed and no process of its group is left
    assert not _answers(f"http://127.0.0.1:{port}/health")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_ui_flags_are_checked_before_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--space", "smoke", "--ui", "--ui-port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--ui-port {port}: something listens on 127.0.0.1:{port}" in err
    assert main(["--space", "smoke", "--ui-port", "5000"]) == 2
    assert "--ui-port: only with --ui" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "data").exists()  # refused before the synthetic data is generated


def test_ui_only_for_a_local_store():
    from tuner._ui import local_store

    assert local_store("sqlite:///mlflow.db") and local_store("file:///tmp/mlruns")
    assert local_store("./mlruns")
    assert not local_store("http://10.0.0.5:5000") and not local_store("https://mlflow.example")


def test_bad_input_stops_before_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "smoke", "--data", str(tmp_path / "missing.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.pkl" in err and "\n" not in err
    assert main(["--space", "smoke", "--max-epochs", "0"]) == 2
    assert "--max-epochs: expected a value >= 1" in capsys.readouterr().err
    assert main(["--space", "smoke", "--backbone", "mfn"]) == 2
    assert "--backbone mfn: not in space 'smoke'" in capsys.readouterr().err


def test_dry_run_prints_the_plan(tmp_path, monkeypatch, tiny_space, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(tiny_space), "--dry-run", "--sampler", "grid"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["sampler"] == "grid" and plan["trials"] == plan["grid_size"]
    assert plan["trial_epochs_at_most"] == plan["trials"] * 4


@pytest.mark.parametrize("name, trials", [("mdm", 312), ("mmim", 1320), ("mird", 31),
                                          ("synergy", 420)])
def test_grid_dry_run_counts_the_papers_grid(tmp_path, monkeypatch, capsys, name, trials):
    monkeypatch.chdir(tmp_path)
    assert main(["--space", name, "--sampler", "grid", "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["trials"] == plan["grid_size"] == trials
    assert not (tmp_path / "data").exists()  # planning generates no data


def test_trial_epoch_budget_is_spent_exactly(tmp_path, monkeypatch, tiny_space, ray_local):
    """--budget-trial-epochs 5, one 2-epoch trial at a time, no pruning: 2 + 2 + 1 epochs. Tune
    hands a finished trial's last report to the stopper twice; counted twice, the search would
    stop after 4 epochs."""
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(tiny_space), "--name", "budget", "--pruner", "none",
                 "--max-epochs", "2", "--num-samples", "20", "--max-concurrent", "1",
                 "--budget-trial-epochs", "5"]) == 0
    client = MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string="tags.run_kind = 'trial'")
    epochs = sorted(len(client.get_metric_history(c.info.run_id, "valid_mae")) for c in children)
    assert epochs == [1, 2, 2]
