"""MIRD's unlabeled data (Qian et al., §3.7 Algorithm 1, §4.1): a fourth split ``unlabeled`` that
the loaders carry and check, ``--unlabeled PATH``, the synthetic pool (5x train), draws without
replacement within an epoch that survive a resume, and a search that stops before any trial when
a positive split rate has no unlabeled data to draw from, unless the labeled-rows fallback
(``unlabeled_source: train``) is asked for, which is then recorded."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from trainables.config import TrialConfig
from trainables.data import (
    UNLABELED,
    DataError,
    MultimodalData,
    arrays_from_mmsa,
    data_digest,
    load_dataset,
    write_parquet,
)
from trainables.data.synthetic import make_synthetic
from trainables.loop import Trainer
from tuner import data as data_cli
from tuner.search import main

TINY_MIRD = {"backbone.text_model": "tiny-bert", "backbone.z_dim": 8, "backbone.recon_steps": 4,
             "regulariser.inner_steps": 1, "regulariser.hidden": 8}


def labeled_only(data: MultimodalData) -> MultimodalData:
    splits = {k: v for k, v in data.splits.items() if k != UNLABELED}
    return MultimodalData(splits, data.source, data_digest(splits))


def row_keys(x: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(r).tobytes() for r in x}


def config(**flat) -> TrialConfig:
    base = {"backbone": "ef_lstm", "regulariser": "none", "max_epochs": 1, "batch_size": 32,
            "patience": 0, "seed": 0}
    if flat.get("backbone", "ef_lstm") == "ef_lstm":
        base["backbone.hidden"] = 8
    return TrialConfig.from_flat({**base, **flat})


# ----------------------------------------------------------------------------- synthetic pool


def test_synth_writes_a_pool_of_five_times_train_without_labels(small_raw):
    pool = small_raw[UNLABELED]
    assert len(pool["text"]) == 5 * len(small_raw["train"]["text"]) == 480
    assert "regression_labels" not in pool
    assert pool["audio"].shape[1:] == small_raw["train"]["audio"].shape[1:]
    # new videos (no clip shared with a labeled split), and the labeled splits do not change
    ids = set(pool["id"])
    assert not ids & {i for s in ("train", "valid", "test") for i in small_raw[s]["id"]}
    without = make_synthetic("small", seed=0, unlabeled_factor=0)
    assert UNLABELED not in without
    for split in ("train", "valid", "test"):
        for key, value in without[split].items():
            assert np.array_equal(value, small_raw[split][key]), (split, key)
    assert arrays_from_mmsa(without, "x").digest != arrays_from_mmsa(small_raw, "x").digest


def test_cli_synth_validate_convert_carry_the_pool(tmp_path, capsys):
    pkl = tmp_path / "s.pkl"
    assert data_cli.main(["synth", "--out", str(pkl), "--size", "small", "--fast-text",
                          "--unlabeled-factor", "2"]) == 0
    with open(pkl, "rb") as f:
        assert len(pickle.load(f)[UNLABELED]["text"]) == 192
    capsys.readouterr()
    assert data_cli.main(["validate", str(pkl)]) == 0
    assert "unlabeled 192 (no labels)" in capsys.readouterr().out
    out = tmp_path / "pq"
    assert data_cli.main(["convert", str(pkl), str(out)]) == 0
    assert "unlabeled.parquet" in capsys.readouterr().out
    assert "regression_labels" not in pq.read_schema(out / "unlabeled.parquet").names
    back = load_dataset(out)
    assert len(back.unlabeled) == 192 and not back.unlabeled.labels.any()
    assert back.digest == load_dataset(pkl).digest


# ----------------------------------------------------------------------------- loaders


def test_pickle_and_parquet_carry_the_split(small_data, small_pickle, tmp_path):
    from_pickle = load_dataset(small_pickle)
    assert len(from_pickle.unlabeled) == 480
    folder = write_parquet(small_data, tmp_path / "pq")
    back = load_dataset(folder)
    assert back.digest == small_data.digest
    assert np.array_equal(back.unlabeled.audio, small_data.unlabeled.audio)
    # written again without a pool, the old unlabeled.parquet goes away
    write_parquet(labeled_only(small_data), folder)
    assert not (folder / "unlabeled.parquet").exists() and load_dataset(folder).unlabeled is None


def test_unlabeled_parquet_added_to_an_old_folder_is_accepted(small_data, tmp_path):
    old = write_parquet(labeled_only(small_data), tmp_path / "old")
    pool_dir = write_parquet(small_data, tmp_path / "with")
    (old / "unlabeled.parquet").write_bytes((pool_dir / "unlabeled.parquet").read_bytes())
    data = load_dataset(old)
    assert len(data.unlabeled) == 480 and data.digest == small_data.digest


def test_unlabeled_flag_reads_pickle_train_split_or_parquet(small_data, small_raw_copy, tmp_path):
    labeled = write_parquet(labeled_only(small_data), tmp_path / "labeled")
    # a pickle without an 'unlabeled' split: its train split is the pool (labels ignored)
    other = {k: v for k, v in small_raw_copy.items() if k != UNLABELED}
    other["train"]["regression_labels"] = np.full(96, np.nan, dtype=np.float32)  # ignored
    pkl = tmp_path / "other.pkl"
    pkl.write_bytes(pickle.dumps(other))
    with pytest.warns(UserWarning, match="only load files you trust"):
        data = load_dataset(labeled, unlabeled=pkl)
    assert len(data.unlabeled) == 96 and str(pkl) in data.source
    assert np.array_equal(data.unlabeled.audio, small_data.splits["train"].audio)
    assert data.digest != small_data.digest
    # a .parquet file, and a folder (its unlabeled.parquet)
    full = write_parquet(small_data, tmp_path / "full")
    for path in (full / "unlabeled.parquet", full):
        data = load_dataset(labeled, unlabeled=path)
        assert len(data.unlabeled) == 480 and data.digest == small_data.digest


def test_pool_with_other_padded_lengths_is_fitted_to_train(small_raw_copy):
    pool = small_raw_copy[UNLABELED]
    pool["audio"] = np.concatenate([pool["audio"], np.ones_like(pool["audio"])], axis=1)  # 80
    pool["vision"] = pool["vision"][:, :30]
    pool["vision_lengths"] = np.minimum(pool["vision_lengths"], 30)
    del pool["id"], pool["raw_text"]
    data = arrays_from_mmsa(small_raw_copy, "x")
    u = data.unlabeled
    assert u.audio.shape == (480, 40, 5) and u.vision.shape == (480, 40, 20)
    assert u.ids[0] == "unlabeled_0" and u.raw_text[0] == ""


@pytest.mark.parametrize("key,width", [("audio", 5), ("vision", 20), ("text", 64)])
def test_pool_width_mismatch_is_one_clear_error(small_raw_copy, small_data, tmp_path, key, width,
                                                capsys):
    pool = small_raw_copy[UNLABELED]
    pool[key] = np.zeros((480, pool[key].shape[1], width + 3), dtype=np.float32)
    with pytest.raises(DataError) as err:
        arrays_from_mmsa(small_raw_copy, "pool.pkl")
    message = str(err.value)
    assert "pool.pkl: split 'unlabeled'" in message and f"key {key!r}" in message
    assert f"={width} like train" in message and "\n" not in message
    # the same through --unlabeled on the CLI: one error line naming the file
    pkl = tmp_path / "pool.pkl"
    pkl.write_bytes(pickle.dumps(small_raw_copy))
    folder = write_parquet(labeled_only(small_data), tmp_path / "labeled")
    capsys.readouterr()
    assert data_cli.main(["validate", str(folder), "--unlabeled", str(pkl)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(pkl) in errors[0] and f"={width} like train" in errors[0]


# ----------------------------------------------------------------------------- the loop


def test_s3_draws_unlabeled_rows_from_the_pool_not_from_train(small_data):
    """The MIRD pair at s = 3: every appended row is a pool row (never a train row), and the
    regulariser sees 3 unlabeled rows per labeled one."""
    trainer = Trainer(config(backbone="mird", regulariser="mird", unlabeled_rate=3.0,
                             task_loss="mse", **TINY_MIRD), small_data)
    assert len(trainer.unlabeled) == 3 * 96  # s x N_train rows of the 480-row pool
    pool, train = row_keys(small_data.unlabeled.audio), row_keys(small_data.splits["train"].audio)
    seen = []
    penalty = trainer.reg.penalty

    def spy(out, batch):
        seen.append(batch)
        return penalty(out, batch)

    trainer.reg.penalty = spy
    history = trainer.fit()
    assert trainer.status == "completed" and math.isfinite(history[-1]["train_loss"])
    assert seen
    for batch in seen:
        labeled = batch.labeled
        assert int((~labeled).sum()) == 3 * int(labeled.sum())
        extra = row_keys(batch.audio[~labeled].numpy())
        assert extra <= pool and not extra & train
        assert (batch.index[~labeled] == -1).all() and (batch.labels[~labeled] == 0).all()


def _drawn(trainer: Trainer) -> list[torch.Tensor]:
    """Wrap the pool's ``batch`` to record the pool rows each batch draws."""
    drawn = []
    take = trainer.unlabeled.batch

    def record(index):
        drawn.append(index.clone())
        return take(index)

    trainer.unlabeled.batch = record
    return drawn


def test_rows_are_drawn_without_replacement_within_an_epoch(small_data):
    trainer = Trainer(config(unlabeled_rate=2.0, max_epochs=2), small_data)
    drawn = _drawn(trainer)
    trainer.run_epoch()
    first = torch.cat(drawn)
    # s = 2: the trial's share of the pool is 2 x 96 rows, and an epoch passes over it once
    assert len(trainer.unlabeled) == 192
    assert sorted(first.tolist()) == list(range(192))  # every row once, no repeats
    drawn.clear()
    trainer.run_epoch()
    second = torch.cat(drawn)
    assert sorted(second.tolist()) == list(range(192))
    assert not torch.equal(first, second)  # a new permutation per epoch


def test_split_rate_is_the_amount_of_unlabeled_data(small_data):
    """s x N_train rows of the pool, the same for every seed, nested across rates (Fig. 6)."""
    def rows(rate, seed=0):
        trainer = Trainer(config(unlabeled_rate=rate, seed=seed), small_data)
        return row_keys(trainer.unlabeled.audio.numpy())

    pool = row_keys(small_data.unlabeled.audio)
    one, three = rows(1.0), rows(3.0)
    assert len(one) == 96 and len(three) == 288 and one < three < pool
    assert rows(1.0, seed=5) == one
    assert rows(5.0) == pool and rows(7.0) == pool  # more than the pool: all of it


def test_a_pass_uses_every_pool_row_once_before_any_repeats(small_data):
    # s = 6: an epoch needs 576 rows of a 480-row pool: all 480 first, then a new permutation
    # (the labeled-rows fallback at s > 1 works the same way over train)
    trainer = Trainer(config(unlabeled_rate=6.0), small_data)
    drawn = _drawn(trainer)
    trainer.run_epoch()
    rows = torch.cat(drawn)
    assert len(rows) == 576
    assert sorted(rows[:480].tolist()) == list(range(480))
    assert len(set(rows[480:].tolist())) == 96


def test_draw_position_survives_checkpoint_and_resume(small_data, tmp_path):
    a = Trainer(config(unlabeled_rate=1.0, max_epochs=3), small_data)
    a.run_epoch()
    a._next_unlabeled(50)  # mid-epoch position of epoch 2
    a.save(tmp_path)
    expected = a._next_unlabeled(100)  # crosses the end of the 96-row pass
    b = Trainer(config(unlabeled_rate=1.0, max_epochs=3), small_data)
    b.load(tmp_path)
    assert torch.equal(b._next_unlabeled(100), expected)
    # and a whole resumed epoch equals the uninterrupted one (CPU)
    # (the global RNG is the process's: c's epoch runs before d restores it)
    c = Trainer(config(unlabeled_rate=1.0, max_epochs=3), small_data)
    c.run_epoch()
    c.save(tmp_path / "c")
    drawn_c = _drawn(c)
    loss = c.run_epoch()["train_loss"]
    d = Trainer(config(unlabeled_rate=1.0, max_epochs=3), small_data)
    d.load(tmp_path / "c")
    drawn_d = _drawn(d)
    assert d.run_epoch()["train_loss"] == loss
    assert torch.equal(torch.cat(drawn_c), torch.cat(drawn_d))


def test_sources_without_a_pool(small_data):
    data = labeled_only(small_data)
    with pytest.raises(ValueError, match="no 'unlabeled' split"):
        Trainer(config(unlabeled_rate=1.0), data)
    fallback = Trainer(config(unlabeled_rate=1.0, unlabeled_source="train"), data)
    assert fallback.unlabeled is fallback.splits["train"]
    assert Trainer(config(), data).unlabeled is None  # s = 0: no pool needed or built
    with pytest.raises(Exception, match="unlabeled_source"):
        config(unlabeled_source="emovox")


# ----------------------------------------------------------------------------- the search


def space_file(tmp_path: Path, data: Path, **fixed) -> Path:
    space = {
        # orthogonal: a regulariser with terms on unlabeled rows (``none`` reads none, so a space
        # does not grid the split rate for it)
        "name": "unlab", "backbones": ["ef_lstm"], "regularisers": ["orthogonal"],
        "data": str(data),
        "grid": {"unlabeled_rate": [0, 3]},
        "fixed": {"batch_size": 32, "backbone.hidden": 8, "patience": 0, **fixed},
        "search": {"sampler": "grid", "pruner": "none", "max_epochs": 1, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_search_without_unlabeled_data_stops_before_any_trial(small_data, tmp_path,
                                                              monkeypatch, capsys):
    from tests.test_bad_input import assert_refused, run_main

    folder = write_parquet(labeled_only(small_data), tmp_path / "labeled")
    space = space_file(tmp_path, folder)
    for extra in ([], ["--dry-run"]):
        code, err = run_main(["--space", str(space), *extra], tmp_path, monkeypatch, capsys)
        assert_refused(code, err, tmp_path, "unlabeled_rate up to 3", "no 'unlabeled' split",
                       "--unlabeled PATH", "unlabeled_source=train", str(folder))
    # given with --unlabeled, the same space plans
    pool = write_parquet(small_data, tmp_path / "full") / "unlabeled.parquet"
    code, _ = run_main(["--space", str(space), "--dry-run", "--unlabeled", str(pool)],
                       tmp_path, monkeypatch, capsys)
    assert code == 0


@pytest.mark.slow
def test_labeled_rows_fallback_runs_and_is_recorded(small_data, tmp_path, monkeypatch, ray_local,
                                                     capsys):
    from mlflow.tracking import MlflowClient

    folder = write_parquet(labeled_only(small_data), tmp_path / "labeled")
    space = space_file(tmp_path, folder, unlabeled_source="train")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--space", str(space), "--name", "fallback"]) == 0
    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("unlab").experiment_id])
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    parent = next(r for r in runs if r.data.tags.get("run_kind") == "search")
    assert {c.data.params["unlabeled_source"] for c in children} == {"train"}
    assert sorted(float(c.data.params["unlabeled_rate"]) for c in children) == [0.0, 3.0]
    assert all(c.data.tags["status"] == "completed" for c in children)
    assert parent.data.tags["unlabeled_data"] == "none"


def test_old_synthetic_cache_without_a_pool_is_regenerated(tmp_path, monkeypatch, small_data):
    import trainables.data.synthetic as synthetic
    import trainables.text as text
    from tuner.search import resolve_data

    monkeypatch.chdir(tmp_path)
    old = write_parquet(labeled_only(small_data), tmp_path / "data" / "synthetic-small")
    calls = []

    def fake_write(path, **kwargs):
        calls.append(path)
        return write_parquet(small_data, path)

    monkeypatch.setattr(synthetic, "write_synthetic", fake_write)
    monkeypatch.setattr(text, "load_text_model", lambda *a, **k: None)
    monkeypatch.setattr(text, "load_tokenizer", lambda *a, **k: None)
    data = resolve_data("synthetic:small")
    assert calls == [Path("data") / "synthetic-small"] and len(data.unlabeled) == 480
    assert (old / "unlabeled.parquet").exists()
    resolve_data("synthetic:small")
    assert len(calls) == 1  # a complete cache is used as it is
    assert dataclasses.is_dataclass(data)
