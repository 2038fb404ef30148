"""Trust (issue 27): nothing is unpickled that the user did not name, input is bounded before it
is read, names cannot leave their folders, and secrets in URIs are never printed or logged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for any code in a hostile file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"weights": {"model": {}, "regulariser": {}}, "epoch": 1, "metrics": {},
                "config": {}, "extra": _Payload(marker)}, path)
    return path


def test_a_hostile_best_pt_does_not_run_at_load(tmp_path):
    from trainables.loop import load_best

    marker = tmp_path / "ran"
    best = _hostile(tmp_path / "best.pt", marker)
    with pytest.raises(ValueError, match=r"best\.pt: holds more than tensors and plain values"):
        load_best(best)
    assert not marker.exists()
    torch.load(best, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.is_dir()


def test_a_hostile_state_pt_does_not_run_at_resume(tmp_path):
    from types import SimpleNamespace

    from trainables.loop import STATE_FILE, Trainer

    marker = tmp_path / "ran"
    _hostile(tmp_path / STATE_FILE, marker)
    with pytest.raises(ValueError, match=r"state\.pt: holds more than tensors"):
        Trainer.load(SimpleNamespace(device="cpu"), tmp_path)  # what a resumed trial calls
    assert not marker.exists()
    # NumPy numbers still load (an older state.pt holds NumPy's RNG state as an array)
    import numpy as np

    from trainables.loop import _load_plain

    torch.save({"numpy": np.random.get_state(), "metric": np.float64(0.5)}, tmp_path / "old.pt")
    old = _load_plain(tmp_path / "old.pt", "cpu")
    assert old["numpy"][1].dtype == np.uint32 and old["metric"] == 0.5


def test_the_registered_model_does_not_run_a_replaced_best_pt(tmp_path, small_data):
    """A ``best.pt`` replaced in the artifact store: ``mlflow.pyfunc.load_model`` refuses it."""
    import mlflow.pyfunc

    from trainables.backbones import get_backbone
    from trainables.config import TrialConfig
    from trainables.loop import BEST_FILE
    from trainables.serving import save_pyfunc

    cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "regulariser": "none",
                                 "backbone.hidden": 8})
    model = get_backbone("ef_lstm")(cfg.backbone_cfg, small_data.dims)
    best = tmp_path / BEST_FILE
    torch.save({"weights": {"model": model.state_dict(), "regulariser": {}}, "epoch": 1,
                "metrics": {"valid_mae": 1.0}, "config": cfg.to_flat()}, best)
    path = save_pyfunc(best, small_data.dims, tmp_path / "model")
    marker = tmp_path / "ran"
    _hostile(path / "artifacts" / BEST_FILE, marker)
    with pytest.raises(Exception, match="holds more than tensors"):
        mlflow.pyfunc.load_model(str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# tuner.report reads a pickle only when the user names it; the warning comes before the read

def _search_info(tags: dict, space_data: str | None = None):
    from types import SimpleNamespace

    from tuner.report import SearchInfo

    parent = SimpleNamespace(data=SimpleNamespace(tags=tags), info=SimpleNamespace(run_id="p"))
    info = SearchInfo("1", "e", parent, [], "s1", "valid_mae", "min")
    client = SimpleNamespace(download_artifacts=lambda run, name: (_ for _ in ()).throw(OSError()))
    if space_data is not None:
        info.space = lambda client: {"data": space_data}
    return info, client


def test_report_refuses_a_recorded_pickle(tmp_path, monkeypatch):
    import pickle

    from tuner import report
    from tuner.search import UsageError

    marker = tmp_path / "ran"
    hostile = tmp_path / "features.pkl"
    hostile.write_bytes(pickle.dumps(_Payload(marker)))
    for tags, space_data in (({"data_source": str(hostile)}, None),  # the tag
                             ({}, str(hostile))):                      # effective_space.yaml
        info, client = _search_info(tags, space_data)
        with pytest.raises(UsageError, match=r"records its data as the pickle .*features\.pkl; "
                                             r"reading a pickle runs code.* pass --data "):
            report.load_search_data(client, info, None, "error")
        assert not marker.exists()
    # a recorded unlabeled pickle too
    info, client = _search_info({"data_source": "synthetic:small", "unlabeled_path": str(hostile)})
    with pytest.raises(UsageError, match="pass --unlabeled "):
        report.load_search_data(client, info, None, "error")
    assert not marker.exists()


def test_report_reads_a_recorded_parquet_folder(tmp_path, small_data):
    from trainables.data import write_parquet
    from tuner import report

    folder = write_parquet(small_data, tmp_path / "pq")
    info, client = _search_info({"data_source": str(folder), "data_digest": small_data.digest})
    assert report.load_search_data(client, info, None, "error").digest == small_data.digest


def test_the_pickle_warning_comes_before_the_pickle_is_read(small_pickle, monkeypatch, capsys):
    import trainables.data.mmsa as mmsa
    from tuner.search import _load_data

    seen = []

    def load(f):
        seen.append(capsys.readouterr().err)
        raise RuntimeError("stop here")

    monkeypatch.setattr(mmsa.pickle, "load", load)
    with pytest.raises(Exception, match="stop here"):
        _load_data(str(small_pickle), "error")
    assert seen and seen[0].startswith("warning: ") and "runs code" in seen[0]


# ---------------------------------------------------------------------------------------------
# bounded input: grids, YAML aliases, seeds, Parquet sizes

def _space(**extra):
    from tuner.spaces import space_from_dict

    return space_from_dict({"name": "t", "backbones": ["ef_lstm", "tfn"],
                            "regularisers": ["none", "mdm"], **extra}, "t.yaml")


def test_the_grid_is_counted_without_being_built(monkeypatch):
    from tuner.spaces import SearchSpace

    space = _space(grid={"lr": [1e-3, 2e-3, 1e-3], "regulariser.weight": [0.1, 0.2],
                         "backbone.hidden": [8, 16, 32]})
    built = len(space.grid_points())
    # lr's duplicate counts once; backbone.hidden is ef_lstm's, regulariser.weight mdm's
    assert built == 2 * 3 + 2 * 3 * 2 + 2 + 2 * 2
    monkeypatch.setattr(SearchSpace, "_grid_points", lambda self: pytest.fail("grid built"))
    assert space.grid_size() == built


def test_a_huge_grid_is_one_line_before_anything_is_built(monkeypatch):
    from tuner.spaces import SearchSpace, SpaceError

    monkeypatch.setattr(SearchSpace, "_grid_points", lambda self: pytest.fail("grid built"))
    keys = ("lr", "warmup", "grad_clip", "weight_decay", "unlabeled_rate", "regulariser.weight")
    grid = {k: [round(0.01 * (i + 1), 2) for i in range(20)] for k in keys}
    with pytest.raises(SpaceError) as caught:
        _space(grid=grid, search={"sampler": "grid"})
    message = str(caught.value)
    # 20^4 for each pair with none (which reads neither regulariser.weight nor unlabeled_rate),
    # 20^6 with mdm
    assert "\n" not in message and "grid: 128,320,000 points" in message
    assert "more than the 10,000 trials a grid search may run" in message
    assert _space(grid=grid).grid_size() == 128_320_000  # other samplers draw from it


def test_every_grid_value_is_validated():
    from tuner.spaces import SpaceError

    with pytest.raises(SpaceError, match=r"grid\.lr\[2\] \(ef_lstm \+ none\): .*lr: expected a "
                                         r"number, got 'fast'"):
        _space(grid={"lr": [1e-3, 2e-3, "fast"]})


def test_a_yaml_alias_bomb_is_one_line(tmp_path):
    from tuner.spaces import SpaceError, load_space

    # all inside grid.lr: each level lists the one before 9 times, 9^9 = 387 million values
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = ("name: bomb\nbackbones: [ef_lstm]\nregularisers: [none]\ngrid:\n  lr: [0.001, "
            + ", ".join(levels) + "]\n")
    assert len(text) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as caught:
        load_space(str(path))
    assert "more than 10,000 values once YAML aliases are expanded" in str(caught.value)
    assert len(str(caught.value)) < 300


def test_seeds_are_capped():
    from tuner.report import parse_seeds
    from tuner.search import UsageError

    assert parse_seeds("100") == list(range(100))
    for text in ("101", "10000000000", list(range(101)), ",".join(map(str, range(101)))):
        with pytest.raises(UsageError, match="at most 100 seeds"):
            parse_seeds(text)
    nested = [[1]] * 3
    with pytest.raises(UsageError, match="expected a count N or a comma list"):
        parse_seeds(nested, "recorded seeds")


def test_parquet_size_is_checked_from_the_footer_before_reading(small_data, tmp_path,
                                                                monkeypatch):
    import pyarrow.parquet as pq

    from trainables.data import DataError, write_parquet
    from trainables.data.parquet import MAX_BYTES_ENV, read_parquet, size_in_memory, split_file

    folder = write_parquet(small_data, tmp_path / "pq")
    files = [split_file(folder, s) for s in ("train", "valid", "test", "unlabeled")]
    counted = sum(size_in_memory(f) for f in files)
    arrays = sum(a.nbytes for split in small_data.splits.values() for a in
                 (split.text, split.text_bert, split.audio, split.vision) if a is not None)
    assert counted >= arrays  # never less than the tensors take
    # encodings do not hide what a file expands to: 40 MB of zeros in a file of a few KB
    import numpy as np
    import pyarrow as pa

    zeros = tmp_path / "zeros.parquet"
    pq.write_table(pa.table({"text": pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.zeros((250, 200, 200), np.float32))}), zeros)
    assert size_in_memory(zeros) >= 40_000_000 > 1000 * zeros.stat().st_size
    monkeypatch.setenv(MAX_BYTES_ENV, str(counted - 1))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a file was read"))
    with pytest.raises(DataError, match=r"pq: its Parquet files hold .* more than the .* "
                                        r"allowed .*nothing was read"):
        read_parquet(folder)
    monkeypatch.undo()
    monkeypatch.setenv(MAX_BYTES_ENV, str(counted))
    assert read_parquet(folder).digest == small_data.digest


# ---------------------------------------------------------------------------------------------
# names never leave their folders; the checks run before anything else

@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "x" * 101, "a b", "t'; --"])
def test_bad_names_are_refused(name):
    from tuner.spaces import SpaceError, check_name

    with pytest.raises(SpaceError, match="expected a name of letters, digits"):
        check_name(name, "--name")


def test_the_clis_refuse_an_escaping_name_before_anything_runs(capsys, monkeypatch):
    import tuner.report as report
    import tuner.search as search

    monkeypatch.setattr(search, "load_space", lambda *a: pytest.fail("the space was loaded"))
    assert search.main(["--space", "smoke", "--name", "../../escape"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --name '../../escape': expected a name") and err.count("\n") == 1
    monkeypatch.setattr(search, "check_tracking_uri", lambda *a: pytest.fail("MLflow opened"))
    for flag in ("--name", "--search"):
        assert report.main(["--experiment", "smoke", flag, "../x"]) == 2
        assert f"error: {flag} '../x': expected a name" in capsys.readouterr().err


def test_a_space_name_and_a_recorded_search_name_are_checked():
    from types import SimpleNamespace

    from tuner.report import find_search
    from tuner.search import UsageError
    from tuner.spaces import SpaceError

    with pytest.raises(SpaceError, match=r"t\.yaml: name '\.\./up': expected a name"):
        _space(name="../up")
    parent = SimpleNamespace(data=SimpleNamespace(tags={"run_kind": "search",
                                                        "search": "../../x"}, params={}),
                             info=SimpleNamespace(run_id="r1", run_name="r", experiment_id="1"))
    client = SimpleNamespace(get_run=lambda run_id: parent,
                             get_experiment=lambda i: SimpleNamespace(experiment_id="1", name="e"))
    with pytest.raises(UsageError, match="search run r1: its recorded name '../../x'"):
        find_search(client, None, "r1", None)


# ---------------------------------------------------------------------------------------------
# secrets in URIs are redacted wherever they are printed or recorded

def test_userinfo_is_redacted():
    from tuner.redact import redact_uris

    assert redact_uris("--optuna-storage postgresql://u:PASS@db:5432/o --x 1") == \
        "--optuna-storage postgresql://***@db:5432/o --x 1"
    assert redact_uris("https://tok@ml.example/a s3://K:S@b/x") == \
        "https://***@ml.example/a s3://***@b/x"
    assert redact_uris("postgresql://u:p@ss@h/db") == "postgresql://***@h/db"
    for plain in ("sqlite:////home/me/mlflow.db", "http://127.0.0.1:5000/#/x", "me@host"):
        assert redact_uris(plain) == plain


def test_command_lines_errors_and_notes_carry_no_password(capsys, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import optuna

    from tuner.report import plot_optuna
    from tuner.search import command_line, main

    tag = command_line("tuner.search", ["--space", "smoke", "--mlflow-uri",
                                        "postgresql://me:PASS@db/mlflow"])
    assert "PASS" not in tag and "postgresql://***@db/mlflow" in tag
    # an error line (the MLflow server does not answer)
    assert main(["--space", "smoke", "--mlflow-uri", "http://me:PASS@127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mlflow-uri http://***@127.0.0.1:9/") and "PASS" not in err
    # a report note: the Optuna storage cannot be opened, and its error echoes the URI
    def refuse(study_name, storage):
        raise ConnectionError(f"could not connect to {storage}")

    monkeypatch.setattr(optuna, "load_study", refuse)
    _, notes = plot_optuna(SimpleNamespace(name="s1"), "postgresql://me:PASS@db:5432/o", tmp_path)
    assert len(notes) == 1 and "PASS" not in notes[0]
    assert notes[0].count("postgresql://***@db:5432/o") == 2


# ---------------------------------------------------------------------------------------------
# --ui's log is a private file

def test_the_ui_log_is_a_private_temporary_file(monkeypatch):
    import stat
    import tempfile

    import tuner._ui as ui

    monkeypatch.setattr(ui.subprocess, "Popen", lambda *a, **k: None)  # no mlflow started
    logs = []
    for _ in range(2):
        local = ui.LocalUI("sqlite:///x.db", port=5999)
        logs.append(local.log_path)
        local._log.close()
    try:
        assert logs[0] != logs[1] and all(p.parent == Path(tempfile.gettempdir()) for p in logs)
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs)
        assert not any(p.name in ("mlflow-ui-5999.log", f"mlflow-ui-{os.getpid()}.log")
                       for p in logs)
    finally:
        for p in logs:
            p.unlink()


def test_an_mlflow_uri_with_credentials_is_checked_with_basic_auth_and_never_printed():
    """``https://USER:PASSWORD@host`` (MLflow's client sends the userinfo as HTTP basic auth): the
    pre-flight asks the server's /health with that header, not with the userinfo as part of the
    host (which urllib cannot open), and an unreachable one is named without its password."""
    import base64
    import http.server
    import socket
    import threading

    from tuner.preflight import UsageError, check_tracking_uri

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_uri(f"http://alice:s%40cret@127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    token = base64.b64encode(b"alice:s@cret").decode()
    assert seen == [("/health", f"Basic {token}")]

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError) as err:
        check_tracking_uri(f"http://alice:hunter2@127.0.0.1:{port}")
    assert "no MLflow server answers there" in str(err.value)
    assert "hunter2" not in str(err.value) and "http://***@127.0.0.1" in str(err.value)
