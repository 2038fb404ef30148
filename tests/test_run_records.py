"""What every run records about where it ran and what it cost, the data as MLflow datasets, the
live counts, the ETA and the CPU projection: fast checks without Ray (the end-to-end search in
tests/test_search_e2e.py checks the same records in a real store). The CUDA calls are replaced
by stand-ins: no GPU is needed."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from trainables.environment import collect_environment, cuda_environment
from trainables.trainable import reset_peak_memory, trial_cost
from tuner.progress import ProgressCallback, cell_of, cpu_projection, eta_seconds
from tuner.tracking import (cost_per_cell, dataset_inputs, environments_differ,
                            format_environment, runs_url, search_counts)


class FakeCuda:
    """``torch.cuda`` as a machine with two GPUs sees it (what Ray's CUDA_VISIBLE_DEVICES
    leaves), with a peak of 1.5 GiB allocated."""

    def __init__(self):
        self.resets = []

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def get_device_name(self, index):
        return "NVIDIA H100 80GB HBM3"

    def reset_peak_memory_stats(self, device):
        self.resets.append(device)

    def max_memory_allocated(self, device):
        return 3 * 2**29


def test_environment_names_versions_hardware_and_determinism():
    env = collect_environment()
    assert env["torch_version"] == torch.__version__
    assert env["threads"] == str(torch.get_num_threads())
    for key in ("python", "ray_version", "optuna_version", "mlflow_version",
                "transformers_version", "cpu_model", "cuda_version", "cudnn_version",
                "gpu_count", "gpu_model", "deterministic_algorithms", "cudnn_deterministic",
                "git_commit", "git_dirty"):
        assert env[key] and env[key] != "unknown", key
    assert env["git_dirty"] in ("true", "false")
    # a GPU node: its model and count, through the CUDA calls a trial makes there
    gpu = cuda_environment(FakeCuda())
    assert gpu["gpu_count"] == "2" and gpu["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert collect_environment(FakeCuda())["gpu_count"] == "2"


def test_trial_cost_peak_memory_on_cpu_and_cuda():
    reset_peak_memory("cpu")
    cost = trial_cost("cpu")
    assert set(cost) == {"cost.peak_rss_mb"} and 10 < cost["cost.peak_rss_mb"] < 1e6
    cuda = FakeCuda()
    reset_peak_memory("cuda:0", cuda)
    assert cuda.resets == [torch.device("cuda:0")]
    assert trial_cost("cuda:0", cuda)["cost.peak_cuda_allocated_mb"] == 1536.0


def test_environments_differ_names_the_tag_and_the_runs():
    env = {"env.torch_version": "2.13.0", "env.gpu_model": "none", "env.threads": "2",
           "status": "completed"}
    same = {"mdm seed 0": env, "mdm seed 1": {**env, "status": "pruned"}}
    assert environments_differ(same) is None  # other tags do not count
    other = {**same, "none seed 0": {**env, "env.torch_version": "2.12.1", "env.threads": "1"}}
    assert environments_differ(other) == (
        "env.threads: 1 (none seed 0), 2 (mdm seed 0, mdm seed 1); "
        "env.torch_version: 2.12.1 (none seed 0), 2.13.0 (mdm seed 0, mdm seed 1)")
    line = format_environment({**env, "env.gpu_count": "0", "env.git_commit": "ab" * 20,
                               "env.git_dirty": "true"})
    assert "torch 2.13.0" in line and "no GPU" in line and "git abababababab (dirty)" in line
    assert format_environment({}) == "not recorded"


def test_dataset_inputs_name_digest_sizes_widths_and_unlabeled_pool(small_data):
    inputs = dataset_inputs(small_data)
    labeled = inputs[0]
    assert labeled.dataset.digest == small_data.digest[:36]
    profile = json.loads(labeled.dataset.profile)
    assert profile["sha256"] == small_data.digest
    assert profile["train_rows"] == len(small_data.splits["train"])
    assert profile["audio_width"] == small_data.dims.audio
    schema = json.loads(json.loads(labeled.dataset.schema)["mlflow_tensorspec"]["features"])
    assert {s["name"]: s["tensor-spec"]["shape"][-1] for s in schema}["vision"] == \
        small_data.dims.vision
    assert [(t.key, t.value) for t in labeled.tags] == [("mlflow.data.context", "training")]
    assert small_data.unlabeled is not None  # the synthetic set carries a pool
    pool = inputs[1].dataset
    assert pool.name == f"{labeled.dataset.name}:unlabeled" and pool.digest != labeled.dataset.digest
    assert json.loads(pool.profile)["unlabeled_rows"] == len(small_data.unlabeled)


def test_urls_open_the_model_training_workspace():
    assert runs_url("3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert runs_url("3", "abc", port=5001).endswith(
        ":5001/#/experiments/3/runs/abc?workflowType=machine_learning")


def _trial(trial_id, status, epochs, value=None, config=None, trial_status="running"):
    return SimpleNamespace(trial_id=trial_id, status=status, config=config or {},
                           last_result={"training_iteration": epochs, "best_valid_mae": value,
                                        "trial_status": trial_status} if epochs else {})


def test_live_counts_follow_tunes_trials():
    trials = [_trial("a", "TERMINATED", 4, 0.9, trial_status="completed"),
              _trial("b", "TERMINATED", 1, 1.5),  # stopped while running: pruned
              _trial("c", "ERROR", 2, 0.1),  # errored: never the best
              _trial("d", "RUNNING", 2, 0.8),
              _trial("e", "PENDING", 0)]
    counts = search_counts(trials, "best_valid_mae", "min", {"e": "running"})
    assert counts == {"trials_completed": 1, "trials_pruned": 1, "trials_failed": 1,
                      "trials_running": 2, "trial_epochs_done": 9, "best_so_far": 0.8}
    assert search_counts(trials, "best_valid_mae", "max")["best_so_far"] == 1.5


def test_eta_uses_cell_rates_pruning_concurrency_and_budget():
    rates = {"tfn/none": 2.0, "mag_bert/none": 10.0}
    # two running (one per cell), 2 pending; ended trials ran 2 epochs on average (pruning)
    eta = eta_seconds(rates, [("tfn/none", 1), ("mag_bert/none", 1)], [1, 3], 2, max_epochs=4)
    # running: 1 more epoch each (2 + 10); pending: 2 trials x 2 epochs x mean rate 6; 2 at once
    assert eta == pytest.approx((2 + 10 + 2 * 2 * 6) / 2)
    # a budget of 3 trial-epochs left of the 6 expected: half the work
    assert eta_seconds(rates, [("tfn/none", 1), ("mag_bert/none", 1)], [1, 3], 2, 4, 3) == \
        pytest.approx(eta / 2)
    assert math.isnan(eta_seconds({}, [], [], 3, 4))


def test_progress_line_reports_plan_epochs_and_eta():
    progress = ProgressCallback(trials=4, max_epochs=3)
    config = {"backbone": "tfn", "regulariser": "none"}
    assert progress.line([]) is None  # nothing timed yet
    running = _trial("a", "RUNNING", 1, 1.0, config)
    progress.on_trial_result(0, [running], running, {"time_this_iter_s": 5.0})
    progress.interval_s = math.inf
    done = _trial("b", "RUNNING", 1, 1.2, config)
    line = progress.line([running, done], ended=(done, "pruned"))
    # a pruned after 1 epoch; a runs to 3 at most... to the mean of ended trials (1), at least
    # one more: 1 epoch x 5 s; 2 pending x 1 epoch x 5 s; 1 running
    assert line == ("Progress: 1/4 trials done (1 pruned), 1 running; 2/12 trial-epochs; ETA 15 s "
                    "(per trial-epoch tfn + none 5.0 s; 1.0 epochs per trial so far; 1 at once)")
    assert cell_of(config) == "tfn + none"
    # keyed by the row of the paper's table: the space's cell keys, or a run's cell tag
    mdm = {"backbone": "tfn", "regulariser": "mdm", "regulariser.estimator": "w"}
    assert cell_of(mdm, ["backbone", "regulariser", "regulariser.estimator"]) == \
        "tfn + mdm (estimator=w)"
    assert cell_of({**mdm, "cell": "backbone=tfn,regulariser=mdm,regulariser.estimator=kl"}) == \
        "tfn + mdm (estimator=kl)"


def test_cost_per_cell_sums_wall_seconds_and_epochs():
    def run(backbone, wall, epochs, rss):
        return SimpleNamespace(data=SimpleNamespace(
            tags={"backbone": backbone, "regulariser": "none"},
            metrics={"cost.wall_s": wall, "cost.trial_epochs": epochs, "cost.peak_rss_mb": rss}))

    rows = cost_per_cell([run("tfn", 10.0, 2, 900.0), run("tfn", 5.0, 1, 1200.0),
                          run("mmim", 60.0, 1, 3000.0)])
    assert [r["cell"] for r in rows] == ["mmim + none", "tfn + none"]
    assert rows[1]["trials"] == 2 and rows[1]["wall_s"] == 15.0 and rows[1]["trial_epochs"] == 3
    assert rows[1]["peak_rss_mb"] == 1200.0 and math.isnan(rows[1]["peak_cuda_allocated_mb"])


def test_cpu_projection_of_a_transformer_space(tmp_path, monkeypatch, capsys):
    """A transformer space on CPUs: one line, from the store's epoch timings when it has them
    (also for --dry-run), else saying that the ETA follows; a GPU space or TFN: no line."""
    from tuner.search import main
    from tuner.spaces import load_space
    from tuner.tracking import Tracker

    space = load_space("mmim")
    line = cpu_projection(space, {"mmim/none": 60.0, "mmim/mmim": 60.0}, at_once=2)
    # the plan's 60 trials x 40 epochs at 60 s, 2 at once: 20 h
    assert "projected about 20 h 0 min for at most 2400 trial-epochs" in line
    assert "meant for GPUs" in line
    assert cpu_projection(load_space("smoke"), {}, 2) is None
    assert "projected time follows as the ETA" in cpu_projection(space, {}, 2)

    monkeypatch.chdir(tmp_path)
    assert main(["--space", "mmim", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\n# note: space 'mmim' has transformer backbones" in out
    assert "no epoch of its cells is timed" in out and yaml.safe_load(out)["trials"] == 60
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates no store
    tracker = Tracker("sqlite:///mlflow.db", "earlier")
    tracker.start_search("s", {}, {}, {})
    run_id = tracker.create_child("t1", {"backbone": "mmim", "regulariser": "mmim"})
    tracker.client.set_tag(run_id, "env.gpu_count", "0")
    tracker.client.log_metric(run_id, "epoch_seconds", 30.0)
    assert main(["--space", "mmim", "--dry-run", "--max-concurrent", "1"]) == 0
    out = capsys.readouterr().out
    assert "projected about 20 h 0 min for at most 2400 trial-epochs at 30 s each" in out, out
    assert main(["--space", "mmim", "--dry-run", "--gpus-per-trial", "1"]) == 0
    assert "projected" not in capsys.readouterr().out


def test_quiet_start_up_hides_rays_notices_unless_verbose(monkeypatch):
    """Without -v: Ray's token-auth notice, Tune's "took long" hints, Optuna's and MLflow's INFO
    lines are not emitted, warnings of Optuna and MLflow still are; Tune gets explicit CSV and
    JSON loggers (no TensorBoard logger, so no TensorBoard hint)."""
    import logging

    from tuner.preflight import QUIET_LOGGERS, quiet_startup
    from tuner.search import tune_loggers

    for name in QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    quiet_startup(1)
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert token.isEnabledFor(logging.WARNING)
    quiet_startup(0)
    assert not token.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("ray.tune.utils.util").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
    assert logging.getLogger("optuna").isEnabledFor(logging.WARNING)
    assert {type(c).__name__ for c in tune_loggers(0)} == {"CSVLoggerCallback",
                                                           "JsonLoggerCallback"}
    assert tune_loggers(1) == []
