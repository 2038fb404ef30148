"""Selection follows validation when test disagrees; --resume refuses changed data, keeps the
pruning history and reproduces an uninterrupted search (issue 19, "Behaviour with no test")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from trainables.data import arrays_from_mmsa
from trainables.data.parquet import write_parquet
from tuner.search import main

pytestmark = pytest.mark.slow

GOOD, BAD = 0.005, 1.0e-7  # a learning rate that learns in 2 epochs, one that cannot


def write_space(tmp_path: Path, data_dir: Path, name: str, *, start_points, num_samples: int,
                max_epochs: int, pruner: str = "none", regularisers=("none",),
                lr=(GOOD, BAD), startup_trials: int | None = None) -> Path:
    space = {
        "name": name, "backbones": ["ef_lstm"], "regularisers": list(regularisers),
        "data": str(data_dir),
        "ranges": {"lr": list(lr) if isinstance(lr, tuple) else lr},
        "fixed": {"batch_size": 16, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1,
                  **({"regulariser.unroll": 1} if "mdm" in regularisers else {})},
        "start_points": start_points,
        "search": {"sampler": "random", "pruner": pruner, "num_samples": num_samples,
                   "max_epochs": max_epochs, "grace_epochs": 1, "seed": 0,
                   "max_concurrent": 1,
                   **({"startup_trials": startup_trials} if startup_trials else {})},
        "resources": {"cpu": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def trial_runs(client: MlflowClient, experiment: str, search: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id],
                              f"tags.run_kind = 'trial' and tags.search = '{search}'")


# ------------------------------------------------------------------ validation against test
def test_selection_follows_validation_when_test_disagrees(tmp_path, monkeypatch, small_raw_copy,
                                                          ray_local, capsys):
    """Test labels all 0: a model that never learns (lr 1e-7, predictions near 0) is then the
    best on test and the worst on validation. The search's summary, its parent run and
    registered model, Optuna's values and the report's choice all pick a learning trial."""
    from tuner.report import choose_trial, find_search

    raw = small_raw_copy
    raw["test"]["regression_labels"] = np.zeros_like(raw["test"]["regression_labels"])
    data_dir = write_parquet(arrays_from_mmsa(raw, "planted"), tmp_path / "data")
    space = write_space(tmp_path, data_dir, "planted", num_samples=3, max_epochs=2,
                        regularisers=("none", "mdm"),
                        start_points=[{"regulariser": "none", "lr": GOOD},
                                      {"regulariser": "mdm", "lr": GOOD},
                                      {"regulariser": "none", "lr": BAD}])
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(space), "--name", "sel"]) == 0
    out = capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = trial_runs(client, "planted", "sel")
    assert len(runs) == 3 and {r.data.tags["status"] for r in runs} == {"completed"}
    (planted,) = [r for r in runs if float(r.data.params["lr"]) == BAD]
    # the plant worked: best on test, worst on validation, by a margin
    others = [r for r in runs if r is not planted]
    for other in others:
        assert planted.data.metrics["test_mae"] < other.data.metrics["test_mae"] - 0.1
        assert planted.data.metrics["best_valid_mae"] > other.data.metrics["best_valid_mae"] + 0.05
    best_valid = min(others, key=lambda r: r.data.metrics["best_valid_mae"])

    # the search's summary and parent run
    summary = out[out.index("Best configuration (chosen on validation only)"):]
    assert f"lr: {GOOD}" in summary.split("Best epoch")[0]
    exp = client.get_experiment_by_name("planted")
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'search'")
    assert parent.data.tags["best_run_id"] == best_valid.info.run_id
    assert parent.data.metrics["best_valid_mae"] == pytest.approx(
        best_valid.data.metrics["best_valid_mae"])
    assert parent.data.metrics["test_mae"] == pytest.approx(best_valid.data.metrics["test_mae"])
    (version,) = client.search_model_versions("name = 'planted-best'")
    assert version.run_id == best_valid.info.run_id

    # Optuna's values are the validation values, and its best trial is a learning one
    study = optuna.load_study(study_name="sel", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(r.data.metrics["best_valid_mae"] for r in runs))
    assert study.best_trial.params["lr"] == GOOD
    assert study.best_value == pytest.approx(best_valid.data.metrics["best_valid_mae"])

    # the report: by default (the best regularised trial) and for the unregularised twin
    info = find_search(client, "planted", None, "sel")
    chosen, _ = choose_trial(info, None)
    assert chosen.info.run_id != planted.info.run_id
    assert chosen.data.params["regulariser"] == "mdm" and float(chosen.data.params["lr"]) == GOOD
    chosen, _ = choose_trial(info, "none")
    assert chosen.info.run_id != planted.info.run_id and float(chosen.data.params["lr"]) == GOOD


# ------------------------------------------------------------------------------- --resume
def test_resume_refuses_changed_data_before_any_trial(tmp_path, monkeypatch, small_data,
                                                      small_raw_copy, ray_local, capsys):
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = write_space(tmp_path, data_dir, "hashed", num_samples=1, max_epochs=1,
                        start_points=[{"regulariser": "none", "lr": GOOD}])
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(space), "--name", "h1"]) == 0
    capsys.readouterr()

    raw = small_raw_copy
    raw["train"]["regression_labels"] = -raw["train"]["regression_labels"]
    changed = write_parquet(arrays_from_mmsa(raw, "changed"), tmp_path / "changed")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hashed")
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    trials_on_disk = sorted(p.name for p in (tmp_path / "ray_results" / "h1").iterdir())

    code = main(["--space", str(space), "--name", "h1", "--resume", "--data", str(changed)])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--resume h1: the data changed since the search started" in lines[0]
    assert "Traceback" not in err and not any(line.startswith("Trial ") for line in out.splitlines())
    # nothing ran: no new MLflow run, no new trial in Ray's experiment, the study as it was
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == before
    assert sorted(p.name for p in (tmp_path / "ray_results" / "h1").iterdir()) == trials_on_disk
    study = optuna.load_study(study_name="h1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 1

    # the same data resumes (nothing left to run)
    assert main(["--space", str(space), "--name", "h1", "--resume"]) == 0


def trials_in_order(client: MlflowClient, experiment: str, search: str) -> list[tuple]:
    """(lr, status, best_valid_mae, valid_mae history) of a search's trials, in start order
    (interrupted runs that a resume replaced left out)."""
    runs = sorted((r for r in trial_runs(client, experiment, search)
                   if r.data.tags["status"] != "interrupted"), key=lambda r: r.info.start_time)
    return [(float(r.data.params["lr"]), r.data.tags["status"], r.data.metrics["best_valid_mae"],
             [m.value for m in sorted(client.get_metric_history(r.info.run_id, "valid_mae"),
                                      key=lambda m: m.step)])
            for r in runs]


class InterruptAtTrial:
    """A Tune stopper that raises KeyboardInterrupt (Ctrl-C in the driver) at the first report of
    the ``n``-th trial, while ``$T19_INTERRUPT`` is 1: Tune pickles it with the search, and the
    resumed search unpickles it disarmed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[str] = []

    def __call__(self, trial_id: str, result: dict) -> bool:
        if trial_id not in self.seen:
            self.seen.append(trial_id)
        if os.environ.get("T19_INTERRUPT") == "1" and len(self.seen) >= self.n:
            raise KeyboardInterrupt
        return False

    def stop_all(self) -> bool:
        return False


def test_resume_keeps_pruning_history_and_reproduces_the_uninterrupted_search(
        tmp_path, monkeypatch, small_data, ray_local, capsys):
    """A median-pruned search interrupted (Ctrl-C in the driver) at its 4th trial, after two
    learning trials and a pruned bad one, then resumed, ends with the same trials and values as
    the same search run without a stop; the resumed part still prunes its bad trials, which the
    median pruner (2 startup trials) can only do with the earlier trials' intermediate values."""
    from ray.tune import Stopper

    from tuner.search import build_parser, prepare_space, resolve_data, run_search

    Stopper.register(InterruptAtTrial)
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = write_space(tmp_path, data_dir, "resumed", num_samples=5, max_epochs=3,
                        pruner="median", lr=(GOOD, 0.003, BAD), startup_trials=2,
                        start_points=[{"regulariser": "none", "lr": GOOD},
                                      {"regulariser": "none", "lr": 0.003},
                                      {"regulariser": "none", "lr": BAD},
                                      {"regulariser": "none", "lr": BAD}])
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(space), "--name", "whole"]) == 0
    args = build_parser().parse_args(["--space", str(space), "--name", "cut"])
    prepared = prepare_space(args)
    monkeypatch.setenv("T19_INTERRUPT", "1")
    with pytest.raises(KeyboardInterrupt):
        run_search(prepared, resolve_data(prepared.data), args, stop=InterruptAtTrial(4))
    monkeypatch.delenv("T19_INTERRUPT")
    capsys.readouterr()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="cut", storage=storage)
    states = [t.state.name for t in study.trials]
    before = [(t.state.name, t.intermediate_values) for t in study.trials[:3]]
    assert states[:3] == ["COMPLETE", "COMPLETE", "PRUNED"], states

    assert main(["--space", str(space), "--name", "cut", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Resuming search 'cut'" in out
    whole, cut = trials_in_order(client, "resumed", "whole"), trials_in_order(client, "resumed", "cut")
    # the same trials (configs the sampler drew included) with exactly the same values; the
    # order may differ: the trial running at the interrupt is re-run after the others
    assert sorted(cut) == sorted(whole) and len(cut) == 5
    # pruned after the resume: the median pruner's 2 startup trials all ran before the
    # interrupt, so it prunes only if it still sees their intermediate values
    assert [t[1] for t in cut[3:]] == ["pruned", "pruned"]
    study = optuna.load_study(study_name="cut", storage=storage)
    kept = [(t.state.name, t.intermediate_values) for t in study.trials]
    assert kept[:3] == [(s, v) for s, v in before]  # the earlier history, as it was
    assert [s for s, _ in kept].count("PRUNED") == 3 and [s for s, _ in kept].count("COMPLETE") == 2


# ------------------------------------------------------------- a budget-ended search, resumed
def test_budget_ended_search_resumes_with_a_larger_budget_only(tmp_path, monkeypatch,
                                                               small_data, ray_local, capsys):
    """--budget-trial-epochs 4 with 3-epoch trials, one at a time: a trial of 3 epochs, then one
    cut after 1 epoch, which MLflow calls pruned and Optuna must too (PRUNED, its last
    intermediate value as value), not leave RUNNING. Resumed with the same budget (or none),
    the search says its budget is spent and runs nothing; with 8, it goes on to 8 trial-epochs
    in all."""
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = write_space(tmp_path, data_dir, "budget", num_samples=20, max_epochs=3,
                        lr=(GOOD, 0.003), start_points=[{"regulariser": "none", "lr": GOOD}])
    monkeypatch.chdir(tmp_path)
    cmd = ["--space", str(space), "--name", "b1"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def state():
        study = optuna.load_study(study_name="b1", storage=storage)
        runs = sorted(trial_runs(client, "budget", "b1"), key=lambda r: r.info.start_time)
        return ([(t.state.name, t.value, t.intermediate_values) for t in study.trials],
                [(r.data.tags["status"], len(client.get_metric_history(r.info.run_id,
                                                                       "valid_mae")))
                 for r in runs])

    assert main(cmd + ["--budget-trial-epochs", "4"]) == 0
    trials, runs = state()
    assert runs == [("completed", 3), ("pruned", 1)]
    assert [s for s, _, _ in trials] == ["COMPLETE", "PRUNED"]
    _, value, steps = trials[1]
    assert list(steps) == [1] and value == steps[1]
    # the summary, the progress line and the parent's live counts say the same
    out = capsys.readouterr().out
    assert "Search 'b1' finished: 1 completed, 1 pruned" in out
    assert [line for line in out.splitlines() if line.startswith("Progress: ")][-1].startswith(
        "Progress: 2/20 trials done (1 completed, 1 pruned), 0 running; 4/4 trial-epochs;")
    parent = client.get_run(client.search_runs(
        [client.get_experiment_by_name("budget").experiment_id],
        "tags.run_kind = 'search'")[0].info.run_id).data.metrics
    assert (parent["trials_completed"], parent["trials_pruned"], parent["trials_running"]) == \
        (1, 1, 0)

    for flags in (["--budget-trial-epochs", "4"], [], ["--budget-trial-epochs", "3"]):
        assert main(cmd + ["--resume", *flags]) == 2
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        assert "budget of" in lines[0] and "trial-epochs is spent (4 epochs ran)" in lines[0]
        assert "pass a larger --budget-trial-epochs" in lines[0]
        assert "Traceback" not in err and "Resuming" not in out
        assert state() == (trials, runs)  # nothing ran, nothing changed

    assert main(cmd + ["--resume", "--budget-trial-epochs", "8"]) == 0
    out = capsys.readouterr().out
    assert "the search ends after 8 trial-epochs" in out and "4 of them spent" in out
    trials, runs = state()
    assert runs == [("completed", 3), ("pruned", 1), ("completed", 3), ("pruned", 1)]
    assert [s for s, _, _ in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert sum(n for _, n in runs) == 8


def test_budget_spent_at_a_trials_last_epoch_leaves_it_complete(tmp_path, monkeypatch,
                                                                 small_data, ray_local):
    """The budget runs out on the last epoch of a trial: that trial completed (MLflow) and is
    COMPLETE in Optuna with its value, not PRUNED."""
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = write_space(tmp_path, data_dir, "edge", num_samples=20, max_epochs=2,
                        lr=(GOOD, 0.003), start_points=[{"regulariser": "none", "lr": GOOD}])
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(space), "--name", "e1", "--budget-trial-epochs", "2"]) == 0
    study = optuna.load_study(study_name="e1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = trial_runs(client, "edge", "e1")
    assert [r.data.tags["status"] for r in runs] == ["completed"]
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert study.trials[0].value == pytest.approx(runs[0].data.metrics["best_valid_mae"])
