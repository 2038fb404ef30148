"""tuner.report: the modality drop and the robustness measures (unit), then a tiny search followed
by a 3-seed report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainables.backbones import get_backbone
from trainables.config import TrialConfig
from trainables.data import DROP_SETS, DROPPABLE, TensorSplit, drop_modality, drop_set, iterate_batches


class _Linear(nn.Module):
    """A constructed model: a linear map of the mean of the modalities it is told to read."""

    def __init__(self, dims, reads: tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reads = reads
        self.heads = nn.ModuleDict({m: nn.Linear(d, 1) for m, d in dims.items()})

    def forward(self, batch) -> torch.Tensor:
        total = torch.zeros(len(batch))
        for m in self.reads:
            total = total + self.heads[m](getattr(batch, m).mean(dim=1)).squeeze(-1)
        return total


def _predict(model, arrays) -> np.ndarray:
    split = TensorSplit.from_arrays(arrays)
    with torch.no_grad():
        return torch.cat([model(b) for b in iterate_batches(split, 16, shuffle=False)]).numpy()


def expected_p(a: list[float], b: list[float]) -> float:
    """The two-sided Mann-Whitney p-value of two samples, computed here with scipy; 1.0 when every
    value is the same (scipy gives NaN there; the report says "no evidence of a difference")."""
    from scipy.stats import mannwhitneyu

    if len(set(a) | set(b)) == 1:
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def test_the_drop_sets_are_the_papers():
    """Each modality alone, MDM's text drops keeping A / V / A+V and Synergy's T, T+A, T+V."""
    assert DROP_SETS == ("text", "audio", "vision", "text+audio", "text+vision")
    assert [drop_set(d) for d in DROP_SETS] == [("text",), ("audio",), ("vision",),
                                                ("text", "audio"), ("text", "vision")]
    assert drop_set("vision+text") == ("text", "vision")  # the order a user writes is free


@pytest.mark.parametrize("dropped", DROP_SETS)
def test_drop_removes_exactly_that_set(small_data, dropped):
    test = small_data.splits["test"]
    dims = {"text": test.text.shape[2], "audio": test.audio.shape[2],
            "vision": test.vision.shape[2]}
    removed = drop_set(dropped)
    others = tuple(m for m in DROPPABLE if m not in removed)
    ignores = _Linear(dims, reads=others)
    uses = _Linear(dims, reads=DROPPABLE)
    out = drop_modality(test, dropped)

    # a model that ignores the set is unaffected; one that reads it changes
    np.testing.assert_array_equal(_predict(ignores, test), _predict(ignores, out))
    assert np.abs(_predict(uses, test) - _predict(uses, out)).max() > 1e-4
    # the input is not modified, and the other modalities are the same arrays
    for m in removed:
        assert np.abs(getattr(test, m)).sum() > 0
        assert not np.any(getattr(out, m))
    for m in others:
        assert getattr(out, m) is getattr(test, m)
    if "text" not in removed:
        assert out.text_bert is test.text_bert and out.raw_text is test.raw_text
    np.testing.assert_array_equal(out.labels, test.labels)


def test_text_drop_masks_every_word_and_keeps_the_steps(small_data):
    """Text removed = every word id [MASK] (103), [CLS]/[SEP]/[PAD], the attention mask and the
    segment ids as they were: a transformer still has the token steps that MAG puts audio and
    vision on."""
    test = small_data.splits["test"]
    dropped = drop_modality(test, "text")
    ids, mask, segments = dropped.text_bert[:, 0], dropped.text_bert[:, 1], dropped.text_bert[:, 2]
    before = test.text_bert[:, 0]
    lengths = test.text_bert[:, 1].sum(axis=1)
    rows = np.arange(len(test))
    np.testing.assert_array_equal(mask, test.text_bert[:, 1])
    np.testing.assert_array_equal(segments, test.text_bert[:, 2])
    assert np.all(ids[:, 0] == 101)  # [CLS]
    assert np.all(ids[rows, lengths - 1] == 102)  # [SEP], the last attended token
    words = (mask > 0) & ~np.isin(before, (0, 101, 102))
    assert words.sum() > len(test)  # the input had words
    assert np.all(ids[words] == 103) and np.all(ids[~words] == before[~words])
    assert set(dropped.raw_text) == {""}
    assert not np.any(dropped.text)


def test_mag_still_reads_audio_and_vision_with_text_dropped(small_data):
    """MAG puts audio and vision on the token steps: after the text drop it still receives all
    of them (MDM's "text dropped, A / V / A+V kept"), and dropping audio too changes its output.
    Dropping the token steps themselves would have dropped A and V with the text."""
    cfg = TrialConfig.from_flat({"backbone": "mag_bert", "backbone.text_model": "tiny-bert"})
    torch.manual_seed(0)
    model = get_backbone("mag_bert")(cfg.backbone_cfg, small_data.dims).eval()
    test = model.prepare_split(small_data.splits["test"])

    def run(arrays):
        split = TensorSplit.from_arrays(arrays)
        with torch.no_grad():
            outs = [model(b) for b in iterate_batches(split, 16, shuffle=False)]
        return {k: torch.cat([o.features[k] for o in outs]).numpy() for k in outs[0].features} | {
            "prediction": torch.cat([o.prediction for o in outs]).numpy()}

    full, no_text = run(test), run(model.drop_inputs(test, "text"))
    for m in ("audio", "vision"):  # the gate's A / V on every word step, as with the text
        np.testing.assert_allclose(no_text[m], full[m], rtol=0, atol=1e-6)
        assert np.abs(full[m]).max() > 1e-3
    assert np.abs(no_text["text"] - full["text"]).max() > 1e-4
    no_text_audio = run(model.drop_inputs(test, "text+audio"))
    assert np.abs(no_text_audio["prediction"] - no_text["prediction"]).max() > 1e-5
    # only W_a's bias is left: the same vector in every row
    np.testing.assert_allclose(no_text_audio["audio"], no_text_audio["audio"][:1].repeat(len(test), 0),
                               rtol=0, atol=1e-6)


def test_drop_changes_a_real_backbone_only_through_that_modality(small_data):
    """EF-LSTM reads every modality: each drop changes its predictions."""
    cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "backbone.hidden": 8})
    torch.manual_seed(0)
    model = get_backbone("ef_lstm")(cfg.backbone_cfg, small_data.dims).eval()
    test = small_data.splits["test"]
    full = _predict(lambda b: model(b).prediction, test)
    for modality in DROPPABLE:
        dropped = _predict(lambda b: model(b).prediction, drop_modality(test, modality))
        assert np.abs(full - dropped).max() > 1e-5, modality


def test_probe_checkpoint_matches_evaluate_checkpoint(small_data, tmp_path):
    """The report's one-build probe gives the same drop metrics as evaluating each drop alone,
    and MDM's critic scores one value per test row (none for an unregularised model)."""
    from trainables.loop import BEST_FILE, Trainer
    from trainables.trainable import critic_scores, evaluate_checkpoint, probe_checkpoint

    for reg, extra in (("mdm", {"regulariser.unroll": 1}), ("none", {})):
        cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "backbone.hidden": 8, "lr": 0.01,
                                     "max_epochs": 1, "regulariser": reg, **extra})
        trainer = Trainer(cfg, small_data, device="cpu")
        trainer.fit()
        trainer.save(tmp_path / reg)
        best = tmp_path / reg / BEST_FILE
        dropped, scores = probe_checkpoint(best, small_data, DROP_SETS, "test", device="cpu")
        assert list(dropped) == list(DROP_SETS)
        for modality in DROP_SETS:
            assert dropped[modality] == evaluate_checkpoint(best, small_data, "test", "cpu",
                                                            drop=modality)
        assert evaluate_checkpoint(best, small_data, "test", "cpu") == trainer.test_metrics
        if reg == "mdm":
            assert scores.shape == (len(small_data.splits["test"]),)
            assert np.all(np.isfinite(scores))  # T's logit (sigmoid critic)
            np.testing.assert_array_equal(scores, critic_scores(best, small_data, "test", "cpu"))
        else:
            assert scores is None


def test_the_report_never_chooses_a_trial_that_did_not_finish_cleanly():
    """choose_trial follows the search's own rule (tracking.NEVER_BEST): a diverged, errored or
    interrupted trial is not the best, however good its validation value before it stopped."""
    from types import SimpleNamespace

    from tuner.report import SearchInfo, choose_trial
    from tuner.search import UsageError

    def run(run_id, status, value, regulariser="mdm"):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                               data=SimpleNamespace(metrics={"best_valid_mae": value},
                                                    tags={"status": status},
                                                    params={"regulariser": regulariser}))

    trials = [run("diverged", "diverged", 0.1), run("errored", "errored", 0.2),
              run("interrupted", "interrupted", 0.3), run("pruned", "pruned", 0.6),
              run("completed", "completed", 0.5)]
    info = SearchInfo("1", "e", None, trials, "s", "valid_mae", "min")
    chosen, _ = choose_trial(info, None)
    assert chosen.info.run_id == "completed"
    # a higher-is-better objective (mode max): the highest value is the best
    up = [SimpleNamespace(info=t.info, data=SimpleNamespace(
        metrics={"best_valid_corr": t.data.metrics["best_valid_mae"]}, tags=t.data.tags,
        params=t.data.params)) for t in trials]
    chosen, note = choose_trial(SearchInfo("1", "e", None, up, "s", "valid_corr", "max"), None)
    assert chosen.info.run_id == "pruned" and note.endswith("(max)")
    with pytest.raises(UsageError, match="no completed or pruned trial has a finite"):
        choose_trial(SearchInfo("1", "e", None, trials[:3], "s", "valid_mae", "min"), None)


def test_a_collapsed_critic_is_flagged_from_its_logged_metric():
    """``collapsed_note`` reads ``train_critic_collapsed`` (MDM.epoch_end, logged by the loop)
    from an MLflow run or a Tune result; the report lists it per re-run and for the chosen trial."""
    from types import SimpleNamespace

    from tuner.report import COLLAPSE_METRIC, collapsed_note

    assert COLLAPSE_METRIC == "train_critic_collapsed"
    assert collapsed_note({COLLAPSE_METRIC: 1.0}).startswith("critic collapsed")
    assert collapsed_note(SimpleNamespace(data=SimpleNamespace(metrics={COLLAPSE_METRIC: 1.0})))
    assert collapsed_note({COLLAPSE_METRIC: 0.0}) is None and collapsed_note({}) is None
    assert collapsed_note(SimpleNamespace(data=SimpleNamespace(metrics={}))) is None


def test_drop_rejects_an_unknown_modality(small_data):
    for bad in ("video", "text+video", "text+text", "", "text+"):
        with pytest.raises(ValueError, match="modality: expected one of text, audio, vision"):
            drop_modality(small_data.splits["test"], bad)


def _trained_ef_lstm(small_data, directory: Path) -> Path:
    from trainables.loop import BEST_FILE, Trainer

    cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "backbone.hidden": 8, "lr": 0.01,
                                 "max_epochs": 2, "regulariser": "none", "seed": 0})
    trainer = Trainer(cfg, small_data, device="cpu")
    trainer.fit()
    trainer.save(directory)
    return directory / BEST_FILE


def test_robustness_of_a_model_that_ignores_audio(small_data, tmp_path):
    """A trained EF-LSTM whose audio path is zeroed (its audio projection W_a, b_a = 0, so no
    audio value reaches the LSTM) next to the same model as trained: through the report's own
    probe and tables, the ratio for `audio` is exactly 1 and dropping `text+audio` is dropping
    `text`; the model that reads audio is changed by the audio drop."""
    from trainables.loop import load_best
    from trainables.trainable import evaluate_checkpoint
    from tuner.report import (ROBUSTNESS_METRICS, Rerun, metric_name, probe_reruns,
                              robustness_ratio, robustness_table)

    reads = _trained_ef_lstm(small_data, tmp_path / "reads")
    best = load_best(reads)
    model = best["weights"]["model"]
    assert model["proj.audio.weight"].abs().sum() > 0
    model["proj.audio.weight"].zero_()
    model["proj.audio.bias"].zero_()
    (tmp_path / "ignores").mkdir()
    ignores = tmp_path / "ignores" / reads.name
    torch.save(best, ignores)

    class Client:  # the MLflow client of probe_reruns: records what would be logged
        logged: dict[str, list] = {}

        def log_batch(self, run_id, metrics):
            self.logged[run_id] = metrics

    reruns = []
    for variant, path in (("ignores_audio", ignores), ("reads_audio", reads)):
        full = evaluate_checkpoint(path, small_data, "test", "cpu")
        reruns.append(Rerun(variant, 0, f"run-{variant}", "completed",
                            {k[len("test_"):]: v for k, v in full.items()}, path))
    client = Client()
    probe_reruns(reruns, small_data, client)
    ignoring, reading = reruns

    assert list(ignoring.drop) == list(DROP_SETS)
    assert ignoring.drop["audio"] == ignoring.test  # every metric, not only Acc-2
    assert ignoring.drop["text+audio"] == ignoring.drop["text"]
    assert ignoring.drop["text"] != ignoring.test
    assert reading.drop["audio"]["mae"] != reading.test["mae"]
    for k in ROBUSTNESS_METRICS:
        assert robustness_ratio(ignoring, "audio", k) == 1.0

    rows = robustness_table(reruns, ["ignores_audio", "reads_audio"])
    assert [(r["dropped"], r["metric"]) for r in rows] == [
        (d, k) for d in DROP_SETS for k in ROBUSTNESS_METRICS]
    assert [r["kept"] for r in rows[::2]] == ["audio+vision", "text+vision", "text+audio",
                                             "vision", "audio"]
    measures = [f"{v}_{m}_{s}" for v in ("ignores_audio", "reads_audio")
                for m in ("ratio",) for s in ("mean", "std", "n")]
    assert list(rows[0]) == ["dropped", "kept", "metric", *measures, "ratio_p_value",
                             *[c.replace("_ratio_", "_acc2_") for c in measures], "acc2_p_value"]
    by = {(r["dropped"], r["metric"]): r for r in rows}
    for k in ROBUSTNESS_METRICS:
        assert by["audio", k]["ignores_audio_ratio_mean"] == 1.0
        assert by["audio", k]["ignores_audio_acc2_mean"] == ignoring.test[k]
        assert by["text+audio", k]["ignores_audio_acc2_mean"] == by["text", k]["ignores_audio_acc2_mean"]
        assert by["text+audio", k]["ignores_audio_ratio_mean"] == by["text", k]["ignores_audio_ratio_mean"]
        for d in DROP_SETS:
            assert by[d, k]["reads_audio_acc2_mean"] == reading.drop[d][k]
            assert by[d, k]["reads_audio_ratio_mean"] == pytest.approx(reading.drop[d][k] / reading.test[k])

    # what each re-run logs to MLflow: the same names with '+' written '_' (MLflow-safe)
    assert metric_name("text+audio") == "text_audio" and metric_name("audio") == "audio"
    logged = {m.key: m.value for m in client.logged["run-ignores_audio"]}
    assert logged["robustness_audio_acc2_has0"] == 1.0
    assert logged["test_drop_text_audio_acc2_has0"] == logged["test_drop_text_acc2_has0"]
    assert {f"robustness_{metric_name(d)}_{k}" for d in DROP_SETS for k in ROBUSTNESS_METRICS
            } <= set(logged)
    assert not any("+" in key for key in logged)


def test_robustness_outputs_show_every_drop_set(tmp_path):
    """The plot and report.md carry every drop set, both measures and both papers."""
    from tuner.report import ROBUSTNESS_METRICS, Rerun, markdown_table, plot_robustness, robustness_table

    rng = np.random.default_rng(0)
    reruns = [Rerun(v, s, "", "completed", {k: 0.8 for k in ROBUSTNESS_METRICS}, None,
                    drop={d: {k: float(rng.uniform(0.4, 0.8)) for k in ROBUSTNESS_METRICS}
                          for d in DROP_SETS})
              for v in ("mdm", "none") for s in range(3)]
    rows = robustness_table(reruns, ["mdm", "none"])
    path = plot_robustness(rows, ["mdm", "none"], tmp_path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    for measure in ("ratio", "acc2"):
        table = markdown_table(rows, ["mdm", "none"], ["dropped", "kept", "metric"], measure)
        for d in DROP_SETS:
            assert f"| {d} |" in table


# ------------------------------------------------------------------ a tiny search, then the report
@pytest.fixture
def tiny_search_space(tmp_path, small_data):
    import yaml

    from trainables.data.parquet import write_parquet

    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "tinyreport",
        "backbones": ["ef_lstm"],
        "regularisers": ["none", "mdm"],
        "data": str(data_dir),
        "ranges": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                   "regulariser.weight": {"low": 0.01, "high": 0.3, "log": True}},
        "fixed": {"batch_size": 32, "patience": 0, "regulariser.unroll": 1,
                  "backbone.hidden": 8},
        # selection by a higher-is-better metric (mode max, its direction): each trial's best
        # epoch, the search's best trial and the report's choice among the two MDM trials
        "metric": "valid_corr",
        "start_points": [{"regulariser": "mdm", "lr": 0.005, "regulariser.weight": 0.1},
                         {"regulariser": "none", "lr": 0.005},
                         {"regulariser": "mdm", "lr": 0.002, "regulariser.weight": 0.3}],
        # 4 trials over the 2 cells (none, mdm), 2 each: mdm's are its two start points, none
        # runs its start point and one random draw
        "search": {"sampler": "random", "pruner": "none", "num_samples": 4, "max_epochs": 2,
                   "seed": 0, "max_concurrent": 4},
        "resources": {"cpu": 0.5},  # the four trials at once on the 2-CPU test Ray
        "seeds": [0, 1, 2],  # the report's default seeds
    }
    path = tmp_path / "tinyreport.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_after_a_tiny_search(tmp_path, monkeypatch, tiny_search_space, small_data,
                                    ray_local, capsys):
    import csv

    from mlflow.tracking import MlflowClient

    from tuner import report, search

    monkeypatch.chdir(tmp_path)
    assert search.main(["--space", str(tiny_search_space), "--name", "s1"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert report.main(["--experiment", "tinyreport", "--top-k", "3",
                        "--name", "r1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Test metrics over seeds 0, 1, 2" in printed and "Robustness" in printed

    client = MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("tinyreport")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("run_kind") == "search"]
    (rep,) = [r for r in runs if r.data.tags.get("run_kind") == "report"]
    trials = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    reruns = [r for r in runs if r.data.tags.get("run_kind") == "rerun"]
    assert rep.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == rep.info.run_id for r in reruns)
    # where the report and its re-runs ran, the data they used, what the search cost per cell
    assert f"Environment: Python {rep.data.tags['env.python']}, torch " in printed
    assert "different environments" not in printed  # one machine, one checkout
    assert "Cost of search 's1' per cell" in printed and "ef_lstm + mdm" in printed
    for run in (rep, *reruns):
        assert run.data.tags["env.torch_version"] and run.data.tags["env.git_commit"]
        assert run.inputs.dataset_inputs[0].dataset.digest == small_data.digest[:36]
    assert all(r.data.metrics["cost.peak_rss_mb"] > 0 for r in reruns)

    # mode max: each trial's best epoch is its highest valid_corr (every epoch's, from MLflow)
    assert parent.data.params["mode"] == "max" and len(trials) == 4
    history = {t.info.run_id: [m.value for m in client.get_metric_history(t.info.run_id,
                                                                          "valid_corr")]
               for t in trials}
    assert any(len(set(h)) == 2 for h in history.values())  # a trial whose corr changed
    for t in trials:
        assert t.data.metrics["best_valid_corr"] == pytest.approx(max(history[t.info.run_id]))
    # the search's best trial and the report's choice (the best regularised trial) are the
    # highest best_valid_corr, never the lowest
    best = max(trials, key=lambda t: t.data.metrics["best_valid_corr"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_valid_corr"] == best.data.metrics["best_valid_corr"]
    chosen = client.get_run(rep.data.tags["chosen_run_id"])
    mdm_trials = [t for t in trials if t.data.params["regulariser"] == "mdm"]
    assert len({t.data.metrics["best_valid_corr"] for t in mdm_trials}) == 2
    assert chosen.info.run_id == max(mdm_trials, key=lambda t: t.data.metrics["best_valid_corr"]
                                     ).info.run_id
    # 3 seeds x {mdm, none}; the twin has the chosen trial's hyper-parameters but no regulariser
    by_variant = {v: sorted((r for r in reruns if r.data.tags["variant"] == v),
                            key=lambda r: int(r.data.params["seed"])) for v in ("mdm", "none")}
    assert [int(r.data.params["seed"]) for r in by_variant["mdm"]] == [0, 1, 2]
    assert [int(r.data.params["seed"]) for r in by_variant["none"]] == [0, 1, 2]
    shared = {k: v for k, v in chosen.data.params.items()
              if k != "seed" and not k.startswith("regulariser")}
    for r in reruns:
        assert {k: r.data.params[k] for k in shared} == shared
        assert r.data.params["regulariser"] == r.data.tags["variant"]
    assert all(r.data.params[k] == chosen.data.params[k] for r in by_variant["mdm"]
               for k in chosen.data.params if k.startswith("regulariser."))

    # the table: its rows and columns, and the numbers of the runs stored in MLflow
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows] == list(report.REPORT_METRICS)
    assert list(rows[0]) == ["metric", "mdm_mean", "mdm_std", "mdm_n", "none_mean", "none_std",
                             "none_n", "p_value"]
    for row in rows:
        key = f"test_{row['metric']}"
        samples = {v: [r.data.metrics[key] for r in by_variant[v]] for v in by_variant}
        for v, values in samples.items():
            assert int(row[f"{v}_n"]) == 3
            assert float(row[f"{v}_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert float(row[f"{v}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
            assert rep.data.metrics[f"{key}_mean_{v}"] == pytest.approx(np.mean(values))
        assert float(row["p_value"]) == pytest.approx(expected_p(samples["mdm"], samples["none"]))

    # robustness: one row per drop set x Acc-2 variant, with the ratio (MDM) and the raw Acc-2
    # (Synergy); each run's values logged to its run under MLflow-safe names (+ -> _)
    with open(out / "robustness.csv") as f:
        robust = list(csv.DictReader(f))
    assert [(r["dropped"], r["metric"]) for r in robust] == [
        (d, k) for d in ("text", "audio", "vision", "text+audio", "text+vision")
        for k in ("acc2_has0", "acc2_non0")]
    for row in robust:  # each p-value is the test of the stored runs' values, not just in [0, 1]
        name = f"{row['dropped'].replace('+', '_')}_{row['metric']}"
        for measure, key in (("ratio", f"robustness_{name}"), ("acc2", f"test_drop_{name}")):
            values = {v: [r.data.metrics[key] for r in by_variant[v]] for v in by_variant}
            assert float(row[f"{measure}_p_value"]) == pytest.approx(
                expected_p(values["mdm"], values["none"])), (name, measure)
    for r in reruns:
        for d in ("text", "text_audio", "text_vision"):
            ratio = r.data.metrics[f"robustness_{d}_acc2_has0"]
            assert ratio == pytest.approx(r.data.metrics[f"test_drop_{d}_acc2_has0"]
                                          / r.data.metrics["test_acc2_has0"])
    for row in robust:
        name = f"{row['dropped'].replace('+', '_')}_{row['metric']}"
        values = [r.data.metrics[f"robustness_{name}"] for r in by_variant["mdm"]]
        assert float(row["mdm_ratio_mean"]) == pytest.approx(np.mean(values))
        raw = [r.data.metrics[f"test_drop_{name}"] for r in by_variant["mdm"]]
        assert float(row["mdm_acc2_mean"]) == pytest.approx(np.mean(raw))
        assert rep.data.metrics[f"robustness_{name}_mean_mdm"] == pytest.approx(np.mean(values))
        assert rep.data.metrics[f"test_drop_{name}_mean_mdm"] == pytest.approx(np.mean(raw))

    # MDM's critic: the k most and k least dependent test examples, with their labels
    with open(out / "critic_scores.csv") as f:
        scores = list(csv.DictReader(f))
    test = small_data.splits["test"]
    assert [r["group"] for r in scores] == ["most dependent"] * 3 + ["least dependent"] * 3
    for r in scores:
        assert float(r["label"]) == pytest.approx(float(test.labels[int(r["row"])]))
    assert float(scores[0]["score_mean"]) >= float(scores[-1]["score_mean"])

    # plots: valid PNG files, in the output folder and in MLflow
    pngs = ["search_valid_curves.png", "search_best_so_far.png", "optuna_param_importances.png",
            "optuna_parallel_coordinate.png", "robustness.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report/r1")}
    assert {f"report/r1/{n}" for n in pngs + ["report.md", "metrics.csv"]} <= logged
    assert {a.path for a in client.list_artifacts(rep.info.run_id)} >= set(pngs)

    # report.md: seeds, data hash, command line, links
    md = (out / "report.md").read_text()
    assert "Seeds: 0, 1, 2" in md
    assert small_data.digest in md and parent.data.tags["data_digest"] == small_data.digest
    assert "tuner.report --experiment tinyreport --top-k 3" in md
    for name in pngs + ["metrics.csv", "robustness.csv", "critic_scores.csv"]:
        assert f"({name})" in md, name
    assert "Colombo et al." in md and "Shankar" in md and "| text+vision | audio |" in md

    # other data than the search's is refused before anything trains
    import dataclasses

    from trainables.data.mmsa import data_digest
    from trainables.data.parquet import write_parquet

    splits = dict(small_data.splits)
    splits["test"] = splits["test"].subset(np.arange(len(splits["test"]) - 1))
    other = write_parquet(dataclasses.replace(small_data, splits=splits,
                                              digest=data_digest(splits)), tmp_path / "other")
    assert report.main(["--experiment", "tinyreport", "--data", str(other)]) == 2
    assert "not the search's data" in capsys.readouterr().err


def test_report_errors_name_the_problem(tmp_path, monkeypatch, capsys):
    from tuner import report

    monkeypatch.chdir(tmp_path)
    assert report.main(["--experiment", "x", "--seeds", "1"]) == 2
    assert "--seeds 1: expected at least 2 distinct seeds" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert report.main(["--experiment", "nope", "--mlflow-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own INFO lines
    assert err.startswith("error: --experiment nope: no such MLflow experiment (known: Default)")
    assert report.main(["--run-id", "0123abc", "--mlflow-uri", uri]) == 2
    assert "--run-id 0123abc: no such MLflow run" in capsys.readouterr().err


# ------------------------------------------------------------------ the report's error paths
def _recorded_search(client, name: str, trials: list[dict], tags: dict | None = None) -> tuple:
    """A search as tuner.search records it in MLflow (parent run, one completed child run per
    flat config of ``trials``); returns the parent's and the children's run ids."""
    from mlflow.entities import Metric, Param

    exp = client.create_experiment(name)
    parent = client.create_run(exp, run_name=name, tags={
        "run_kind": "search", "search": name, **(tags or {})}).info.run_id
    client.log_batch(parent, params=[Param("metric", "valid_mae"), Param("mode", "min")])
    children = []
    for i, flat in enumerate(trials):
        run = client.create_run(exp, run_name=f"{name}-{i}", tags={
            "mlflow.parentRunId": parent, "run_kind": "trial", "search": name,
            "ray_trial_id": f"t{i}", "status": "completed"}).info.run_id
        client.log_batch(run, metrics=[Metric("best_valid_mae", 1.0 + i, 0, 0)],
                         params=[Param(k, str(v)) for k, v in flat.items()])
        client.set_terminated(run)
        children.append(run)
    client.set_terminated(parent)
    return parent, children


@pytest.mark.slow
def test_report_error_paths(tmp_path, monkeypatch, capsys, small_data, ray_local):
    """Each refusal is one line and exit 2, before anything trains: a run id that is not a search,
    a --regulariser the search does not have, trial params that are not a trial config, a search
    that records no data. A re-run that ends without test metrics (here: every re-run diverges)
    gives exit 1 and a FAILED report run."""
    from mlflow.tracking import MlflowClient

    from trainables.data.parquet import write_parquet
    from tuner import report

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    good = {"backbone": "ef_lstm", "regulariser": "mdm", "lr": 1e38, "batch_size": 32,
            "max_epochs": 1, "backbone.hidden": 8, "regulariser.unroll": 1}
    data_dir = write_parquet(small_data, tmp_path / "data")
    parent, (trial,) = _recorded_search(client, "diverges", [good], tags={
        "data_source": str(data_dir), "data_digest": small_data.digest})
    _, (bad,) = _recorded_search(client, "badparams", [{**good, "backbone.hiden": 8}])
    _recorded_search(client, "nodata", [good])

    def refused(args: list[str]) -> str:
        assert report.main([*args, "--mlflow-uri", uri, "--seeds", "0,1"]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1, lines
        return lines[0]

    assert f"--run-id {trial}: not a search's parent run (its run_kind tag is 'trial'" in refused(
        ["--run-id", trial])
    assert "--regulariser synergy: search 'diverges' has no trial of it" in refused(
        ["--experiment", "diverges", "--regulariser", "synergy"])
    assert "--regulariser nope: search 'diverges' has no trial of it" in refused(
        ["--experiment", "diverges", "--regulariser", "nope"])
    line = refused(["--experiment", "badparams"])
    assert f"run {bad}: its params are not a trial config" in line and "hiden" in line
    assert "search 'nodata': records no data source; pass --data" in refused(
        ["--experiment", "nodata"])
    assert not list(tmp_path.glob("reports/*")) and not (tmp_path / "ray_results").exists()

    # lr 1e38: every re-run diverges in its first epoch and has no test metrics
    assert report.main(["--experiment", "diverges", "--mlflow-uri", uri, "--seeds", "0,1",
                        "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "warning: 4 re-run(s) ended without test metrics" in err, err[-2000:]
    (rep,) = client.search_runs([client.get_experiment_by_name("diverges").experiment_id],
                                "tags.run_kind = 'report'")
    assert rep.info.status == "FAILED" and rep.data.tags["mlflow.parentRunId"] == parent
