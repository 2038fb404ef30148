"""Bad input, every path: each mistake is one ``error:`` line naming the file/key/flag, exit code
2, no traceback, and no trial (no Ray results folder, no MLflow run).

Most rows fail before Ray starts; the two resource rows need a Ray cluster to compare with (the
module's ``ray_local``, 2 CPUs). The table in docs/bad-input.md ("What you can get wrong") lists these
messages.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainables.data import load_dataset
from trainables.data.parquet import write_parquet
from tuner.search import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def parquet_dir(small_data, tmp_path_factory):
    return write_parquet(small_data, tmp_path_factory.mktemp("bad-input") / "data")


def closed_port() -> int:
    """A localhost port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HTTP = []


def http_port() -> int:
    """A localhost port where an HTTP/1 server (not Ray) listens, for this test session."""
    if not _HTTP:
        import http.server
        import threading

        class Quiet(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # not on the test's stderr
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _HTTP.append(server)
    return _HTTP[0].server_address[1]


def tiny_space(data: Path | str, **changes) -> dict:
    """A valid one-trial space; ``changes`` replace (or, when None, remove) top-level keys."""
    space = {
        "name": "bad",
        "backbones": ["ef_lstm"],
        "regularisers": ["none"],
        "data": str(data),
        "fixed": {"batch_size": 16, "backbone.hidden": 8},
        "search": {"sampler": "random", "pruner": "none", "num_samples": 1, "max_epochs": 1},
        "resources": {"cpu": 1},
    }
    for key, value in changes.items():
        if value is None:
            space.pop(key, None)
        else:
            space[key] = value
    return space


def write_space(tmp_path: Path, space: dict | str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    return path


def write_pickle(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    return path


def assert_refused(code: int, err: str, tmp_path: Path, *expected: str) -> str:
    """Exit code 2, exactly one ``error:`` line containing ``expected``, no trial, no run."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith(("error: ", "warning: "))]
    assert code == 2, err
    assert len(errors) == 1 and not others, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert not (tmp_path / "ray_results").exists()
    db = tmp_path / "mlflow.db"
    if db.exists():  # an error after MLflow was opened must still leave no run behind
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    return errors[0]


def run_main(argv: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- data
def _drop_split(raw):
    del raw["valid"]


def _drop_key(raw):
    del raw["test"]["audio"]


def _wrong_width(raw):
    raw["valid"]["audio"] = np.zeros((len(raw["valid"]["audio"]), 40, 74), dtype=np.float32)


def _nan(raw):
    raw["train"]["vision"][0, 0, 0] = np.nan


DATA_ROWS = {
    "missing-split": (_drop_split, ["bad.pkl", "missing split 'valid'"]),
    "missing-key": (_drop_key, ["bad.pkl", "split 'test' key 'audio': missing"]),
    "wrong-width": (_wrong_width, ["split 'valid' key 'audio': expected (N=48, L_a, 5) like train",
                                   "found (48, 40, 74)"]),
    "nan": (_nan, ["split 'train' key 'vision': expected finite values", "--nonfinite zero"]),
}


@pytest.mark.parametrize("row", sorted(DATA_ROWS))
def test_bad_data(row, small_raw_copy, tmp_path, monkeypatch, capsys):
    change, expected = DATA_ROWS[row]
    change(small_raw_copy)
    pkl = write_pickle(tmp_path, small_raw_copy)
    code, err = run_main(["--space", "smoke", "--data", str(pkl)], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, *expected)
    assert "warning: " in err and "only load files you trust" in err  # the pickle warning


def test_missing_data_file(tmp_path, monkeypatch, capsys):
    code, err = run_main(["--space", "smoke", "--data", str(tmp_path / "nope.pkl")],
                         tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "nope.pkl: no such file or folder", "tuner.data convert")


# ----------------------------------------------------------------------------- space YAML
YAML_ROWS = {
    "unknown-key": (dict(batchsize=32), ["space.yaml", "unknown key 'batchsize'"]),
    "unknown-fixed-key": (dict(fixed={"batchsize": 32}),
                          ["space.yaml: fixed.batchsize: unknown key; known:", "batch_size"]),
    "unknown-model-field": (dict(fixed={"batch_size": 16, "backbone.hiden": 32}),
                            ["space.yaml: fixed.backbone.hiden: no backbone (ef_lstm) or "
                             "regulariser (none) of this space has that field"]),
    "bad-type": (dict(search={"num_samples": "many"}),
                 ["space.yaml: search: num_samples: expected an integer, got 'many'"]),
    "bad-range": (dict(ranges={"lr": {"low": 0.1, "high": 0.01}}),
                  ["ranges.lr: expected low <= high"]),
    "empty-backbones": (dict(backbones=[]),
                        ["space.yaml: backbones: expected a name or a non-empty list of names"]),
    "empty-grid-list": (dict(grid={"lr": []}), ["grid.lr: expected a non-empty list"]),
    "unknown-backbone": (dict(backbones=["ef_lstn"]), ["space.yaml: backbones:", "'ef_lstn'"]),
    "unknown-regulariser": (dict(regularisers=["mdn"]),
                            ["space.yaml: regularisers:", "'mdn'"]),
    "unknown-sampler": (dict(search={"sampler": "sobol"}),
                        ["search: sampler: expected one of 'grid', 'tpe'", "got 'sobol'"]),
    "unknown-pruner": (dict(search={"pruner": "patient"}),
                       ["search: pruner: expected one of 'none', 'median'", "got 'patient'"]),
    "missing-regularisers": (dict(regularisers=None), ["missing key 'regularisers'"]),
}


@pytest.mark.parametrize("row", sorted(YAML_ROWS))
def test_bad_space_yaml(row, parquet_dir, tmp_path, monkeypatch, capsys):
    changes, expected = YAML_ROWS[row]
    path = write_space(tmp_path, tiny_space(parquet_dir, **changes))
    code, err = run_main(["--space", str(path)], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, *expected)


# ----------------------------------------------------------------------------- selection rule
VALID = "valid_mae, valid_corr, valid_acc2_has0, valid_f1_has0, valid_acc2_non0, valid_f1_non0"
SELECTION_ROWS = {
    # every trial would run, pick its best epoch by training loss, and the search fail at its end
    "train-metric": (dict(metric="train_loss"), [],
                     ["space.yaml: metric: 'train_loss' is not a validation metric", VALID]),
    # every trial would error (test metrics exist only once, for the best checkpoint)
    "test-metric": (dict(metric="test_mae"), [],
                    ["space.yaml: metric: 'test_mae' is not a validation metric", VALID]),
    "unknown-metric": (dict(metric="valid_accuracy"), [],
                       ["metric: 'valid_accuracy' is not a validation metric", "valid_acc7"]),
    "set-test-metric": ({}, ["--set", "metric=test_corr"],
                        ["metric: 'test_corr' is not a validation metric"]),
    # the YAML's mode: min was chosen for valid_mae, not for the metric set on the command line
    "set-metric-against-mode": (dict(metric="valid_mae", mode="min"),
                                ["--set", "metric=valid_corr"],
                                ["space.yaml: --set metric=valid_corr: the space's mode min was set "
                                 "for metric valid_mae, but valid_corr is better when higher; "
                                 "add --set mode=max"]),
}


@pytest.mark.parametrize("row", sorted(SELECTION_ROWS))
@pytest.mark.parametrize("dry_run", [False, True])
def test_only_validation_metrics_select(row, dry_run, parquet_dir, tmp_path, monkeypatch, capsys):
    changes, flags, expected = SELECTION_ROWS[row]
    path = write_space(tmp_path, tiny_space(parquet_dir, **changes))
    flags = [*flags, *(["--dry-run"] if dry_run else [])]
    code, err = run_main(["--space", str(path), *flags], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, *expected)
    assert "warning: " not in err


def _dry_run(space: dict, flags: list[str], tmp_path, monkeypatch, capsys) -> tuple[dict, str]:
    path = write_space(tmp_path, space)
    monkeypatch.chdir(tmp_path)
    code = main(["--space", str(path), "--dry-run", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    return yaml.safe_load(out), err


def test_mode_defaults_to_the_metric_direction(parquet_dir, tmp_path, monkeypatch, capsys):
    """Without ``mode``, the metric's direction: ``valid_corr`` alone is max, also when the metric
    comes from ``--set``; no warning."""
    plan, err = _dry_run(tiny_space(parquet_dir, metric="valid_corr"), [], tmp_path, monkeypatch,
                         capsys)
    assert plan["metric"].startswith("valid_corr (max)") and "warning" not in err
    plan, err = _dry_run(tiny_space(parquet_dir), ["--set", "metric=valid_f1_non0"], tmp_path,
                         monkeypatch, capsys)
    assert plan["metric"].startswith("valid_f1_non0 (max)") and "warning" not in err
    plan, err = _dry_run(tiny_space(parquet_dir), [], tmp_path, monkeypatch, capsys)
    assert plan["metric"].startswith("valid_mae (min)") and "warning" not in err
    # a YAML mode that agrees with the metric set on the command line is kept
    plan, err = _dry_run(tiny_space(parquet_dir, metric="valid_corr", mode="max"),
                         ["--set", "metric=valid_acc7"], tmp_path, monkeypatch, capsys)
    assert plan["metric"].startswith("valid_acc7 (max)") and "warning" not in err


@pytest.mark.parametrize("how", ["yaml", "set"])
def test_an_explicit_mode_against_the_metric_warns(how, parquet_dir, tmp_path, monkeypatch,
                                                    capsys):
    """A mode set on purpose against the metric's direction is kept, with one warning line in
    the dry-run (and at the search's start: the same code path, before Ray)."""
    if how == "yaml":
        space, flags = tiny_space(parquet_dir, metric="valid_corr", mode="min"), []
    else:
        space, flags = tiny_space(parquet_dir, metric="valid_corr"), ["--set", "mode=min"]
    plan, err = _dry_run(space, flags, tmp_path, monkeypatch, capsys)
    assert plan["metric"].startswith("valid_corr (min)")
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line == (f"warning: {tmp_path / 'space.yaml'}: mode: min with metric valid_corr, which "
                    "is better when higher: the lowest valid_corr selects each trial's best epoch "
                    "and the best trial (mode is set explicitly)")


def test_every_shipped_space_selects_by_a_validation_metric():
    from tuner.spaces import SELECTION_METRICS, SPACES_DIR, load_space

    for path in sorted(SPACES_DIR.glob("*.yaml")):
        space = load_space(str(path))
        assert space.metric in SELECTION_METRICS and space.selection_warning() is None, path


def test_the_report_applies_the_selection_rule(tmp_path, monkeypatch, capsys):
    """``tuner.report`` re-checks the metric and mode its search recorded, before it re-trains:
    a search from before the rule (no ``mode_explicit`` tag) may hold either mistake."""
    from mlflow.tracking import MlflowClient

    from tuner import report

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old")

    def search_run(metric: str, mode: str, **tags) -> str:
        run = client.create_run(exp, tags={"run_kind": "search", "search": f"s-{metric}-{mode}",
                                           **tags})
        client.log_param(run.info.run_id, "metric", metric)
        client.log_param(run.info.run_id, "mode", mode)
        return run.info.run_id

    cases = [
        (search_run("train_loss", "min"),
         ["search 's-train_loss-min': metric: 'train_loss' is not a validation metric", VALID]),
        (search_run("test_mae", "min", mode_explicit="true"),
         ["metric: 'test_mae' is not a validation metric"]),
        (search_run("valid_corr", "min"),
         ["search 's-valid_corr-min': mode: min contradicts metric valid_corr, which is better "
          "when higher (mode max)", "run the search again with mode: max"]),
    ]
    for run_id, expected in cases:
        code = report.main(["--run-id", run_id, "--mlflow-uri", uri, "--seeds", "0,1"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        for text in expected:
            assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    # an explicit mode against the direction passes the rule with a warning (the report then
    # stops for another reason: this search has no trials)
    run_id = search_run("valid_corr", "min", mode_explicit="true")
    assert report.main(["--run-id", run_id, "--mlflow-uri", uri, "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err
    assert ("warning: search 's-valid_corr-min': mode: min with metric valid_corr, which is better "
            "when higher") in err
    assert "no completed or pruned trial has a finite best_valid_corr" in err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "reports").exists()
    assert [r.data.tags["run_kind"] for r in client.search_runs([exp])] == ["search"] * 4


def test_space_not_yaml_and_unknown_space(tmp_path, monkeypatch, capsys):
    path = write_space(tmp_path, "name: x\nbackbones: [ef_lstm\n")
    code, err = run_main(["--space", str(path)], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "space.yaml: not valid YAML (line 3)")
    code, err = run_main(["--space", "smok"], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "unknown search space 'smok'; known:", "smoke")


# ----------------------------------------------------------------------------- flags
FLAG_ROWS = {
    "zero-epochs": (["--max-epochs", "0"], ["--max-epochs: expected a value >= 1, got 0"]),
    "negative-epochs": (["--max-epochs", "-3"], ["--max-epochs: expected a value >= 1, got -3"]),
    "zero-samples": (["--num-samples", "0"], ["--num-samples: expected a value >= 1, got 0"]),
    "not-a-number": (["--num-samples", "many"],
                     ["argument --num-samples: invalid int value: 'many'", "--help"]),
    "unknown-sampler": (["--sampler", "sobol"], ["argument --sampler: invalid choice: 'sobol'"]),
    "cpus-below-ray-unit": (["--cpus-per-trial", "0.00001"],
                            ["--cpus-per-trial: expected a value >= 0.0001"]),
    "zero-cpus": (["--cpus-per-trial", "0"], ["--cpus-per-trial: expected a value >= 0.0001"]),
    "negative-gpus": (["--gpus-per-trial", "-1"], ["--gpus-per-trial: expected a value >= 0"]),
    "backbone-not-in-space": (["--backbone", "tfn"], ["--backbone tfn: not in space 'bad'"]),
    "bad-set": (["--set", "fixed.lr=fast"],
                ["space.yaml: ef_lstm + none: trial config: lr: expected a number, got 'fast'"]),
    "set-without-value": (["--set", "fixed.lr"], ["--set 'fixed.lr': expected key=value"]),
    "unreachable-mlflow": (lambda: ["--mlflow-uri", f"http://127.0.0.1:{closed_port()}"],
                           ["--mlflow-uri http://127.0.0.1:", "no MLflow server answers there",
                            "sqlite:///mlflow.db"]),
    "mlflow-folder-missing": (["--mlflow-uri", "sqlite:////no/such/folder/mlflow.db"],
                              ["--mlflow-uri sqlite:////no/such/folder/mlflow.db: the folder "
                               "/no/such/folder does not exist"]),
    "unreachable-address": (lambda: ["--address", f"127.0.0.1:{closed_port()}"],
                            ["--address 127.0.0.1:", "no Ray head answers there",
                             "ray start --head"]),
    "address-not-ray": (lambda: ["--address", f"127.0.0.1:{http_port()}"],
                        ["--address 127.0.0.1:", "something listens there, but not a Ray head"]),
    "storage-not-writable": (["--storage", "/proc/ray_results"],
                             ["--storage /proc/ray_results: cannot write there (/proc is not a "
                              "writable folder)"]),
    "resume-unknown-name": (["--resume", "--name", "nope"],
                            ["--resume --name nope: no such search in", "ray_results (found: none)"]),
    "address-not-host-port": (["--address", "my-cluster"],
                              ["--address my-cluster: expected HOST:PORT"]),
}


@pytest.mark.parametrize("row", sorted(FLAG_ROWS))
def test_bad_flag(row, parquet_dir, tmp_path, monkeypatch, capsys):
    flags, expected = FLAG_ROWS[row]
    flags = flags() if callable(flags) else flags
    path = write_space(tmp_path, tiny_space(parquet_dir))
    code, err = run_main(["--space", str(path), *flags], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, *expected)


def test_text_encoder_that_cannot_load(small_data, parquet_dir, tmp_path, monkeypatch, capsys):
    """A text model is loaded once in the driver, before Ray: no trial sees the error."""
    space = tiny_space(parquet_dir, backbones=["mag_bert"],
                       fixed={"batch_size": 16, "backbone.text_model": "tiny-bert"})
    path = write_space(tmp_path, space)
    missing = tmp_path / "no-such-model"
    code, err = run_main(["--space", str(path), "--set", f"fixed.backbone.text_model={missing}"],
                         tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "backbone.text_model of mag_bert:",
                   f"text model '{missing}': no such folder")
    import huggingface_hub

    if not huggingface_hub.is_offline_mode():
        pytest.skip("HF_HUB_OFFLINE was not set before huggingface_hub was imported")
    code, err = run_main(["--space", str(path), "--set", "fixed.backbone.text_model=no-such/model"],
                         tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "backbone.text_model of mag_bert:",
                   "text model 'no-such/model': the model is not in the Hugging Face cache",
                   "HF_HUB_OFFLINE=1")


# ------------------------------------------------------------- resources the cluster lacks
def test_resources_the_cluster_lacks(parquet_dir, tmp_path, monkeypatch, capsys, ray_local):
    """Tune would wait forever for a trial that fits no node; refused after ray.init, before
    any MLflow run or trial."""
    import ray

    from tuner.search import check_address

    check_address(ray.get_runtime_context().gcs_address)  # a real head passes the --address check
    path = write_space(tmp_path, tiny_space(parquet_dir))
    code, err = run_main(["--space", str(path), "--cpus-per-trial", "64"],
                         tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "--cpus-per-trial / resources.cpu 64: no node of the Ray "
                   "cluster has that many CPUs (the largest has 2)")
    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray cluster has a GPU")
    code, err = run_main(["--space", str(path), "--gpus-per-trial", "1"],
                         tmp_path, monkeypatch, capsys)
    assert_refused(code, err, tmp_path, "--gpus-per-trial / resources.gpu 1: the Ray cluster has "
                   "no GPU (1 node)", "--gpus-per-trial 0")


# ----------------------------------------------------------------------------- the real CLI
@pytest.mark.parametrize("kind", ["yaml", "mlflow"])
def test_cli_prints_one_line_and_no_traceback(kind, parquet_dir, tmp_path):
    if kind == "yaml":
        flags = ["--space", str(write_space(tmp_path, tiny_space(parquet_dir, backbones=["nope"])))]
    else:
        flags = ["--space", str(write_space(tmp_path, tiny_space(parquet_dir))),
                 "--mlflow-uri", f"http://127.0.0.1:{closed_port()}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "tuner.search", *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert_refused(proc.returncode, proc.stderr, tmp_path,
                   "backbones:" if kind == "yaml" else "--mlflow-uri")


# ----------------------------------------------------------------------------- safety
def test_parquet_path_never_unpickles(parquet_dir, small_data, monkeypatch):
    import _pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read while loading Parquet")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    data = load_dataset(parquet_dir)
    assert data.digest == small_data.digest


def test_pickles_warn_and_servers_bind_localhost(small_pickle, tmp_path):
    with pytest.warns(UserWarning, match="only load files you trust"):
        load_dataset(small_pickle)
    from types import SimpleNamespace

    from tuner.tracking import Tracker

    # what the search prints at its end (an MLflow store costs ~20 s to create under load)
    command = Tracker.ui_command(SimpleNamespace(tracking_uri="sqlite:///mlflow.db"))
    assert command.startswith("mlflow ui ") and "--host 127.0.0.1" in command
    # the README and the docs pages it links to (the cluster and safety pages hold server commands)
    readme = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    # every server command, up to the end of its code span, comment or table cell
    servers = re.findall(r"(?:mlflow (?:ui|server)|optuna-dashboard) [^`#|)\n]*", readme)
    assert len(servers) >= 5, servers  # the README's mlflow ui and optuna-dashboard lines, ...
    assert sum(s.startswith("optuna-dashboard") for s in servers) >= 3, servers
    unbound = [s for s in servers if "--host 127.0.0.1" not in s]
    assert not unbound, f"server commands without --host 127.0.0.1: {unbound}"
