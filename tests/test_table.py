"""tuner.table (``python -m tuner.report --table``): the choice per cell, the merge of searches and
the statistics on a fake MLflow store of synthetic trial runs (no Ray, no training), then one
tiny real search and table."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tuner.preflight import UsageError
from tuner.report import REPORT_METRICS, Rerun
from tuner.spaces import cell_of

DIGEST = "ab" * 32
MDM_CELLS = ["backbone", "regulariser", "regulariser.estimator"]
SYN_CELLS = ["backbone", "regulariser", "regulariser.divergence"]


# ---------------------------------------------------------------------------------- fake store
def add_search(client: MlflowClient, experiment: str, name: str, trials: list[dict], root: Path, *,
               cells: list[str] | None = None, table: dict | None = None,
               backbones=("ef_lstm", "tfn"), regularisers=("none", "mdm"),
               digest: str = DIGEST, metric: str = "valid_mae", mode: str = "min") -> list[str]:
    """A finished search as tuner.search leaves it: a parent run (tags, params,
    effective_space.yaml) and one trial run per ``trials`` item ({params..., "value": best
    validation value, "status": ...}). Returns the trial run ids in order."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=(root / experiment).as_uri())  # not ./mlruns
    parent = client.create_run(exp_id, run_name=name, tags={
        "run_kind": "search", "search": name, "data_digest": digest,
        "data_source": "synthetic:small"}).info.run_id
    client.log_batch(parent, params=[Param("metric", metric), Param("mode", mode)])
    space = {"name": experiment, "backbones": list(backbones), "regularisers": list(regularisers),
             "grid": {"lr": [0.002, 0.001], "regulariser.weight": [0.1, 0.01]},
             "seeds": [0, 1, 2], "cells": cells or ["backbone", "regulariser"]}
    if table is not None:
        space["table"] = table
    client.log_text(parent, yaml.safe_dump(space), "effective_space.yaml")
    ids = []
    for i, t in enumerate(trials):
        t = dict(t)
        value, status = t.pop("value"), t.pop("status", "completed")
        run = client.create_run(exp_id, run_name=f"{name}-{i}", start_time=1000 + i, tags={
            "mlflow.parentRunId": parent, "run_kind": "trial", "search": name,
            "status": status})
        params = {"max_epochs": 2, "batch_size": 16, "patience": 0, **t}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(f"best_{metric}", value, 0, 0)] if value is not None
                         else [])
        ids.append(run.info.run_id)
    return ids


def trial(backbone, regulariser, lr, value, **extra):
    return {"backbone": backbone, "regulariser": regulariser, "lr": lr, "value": value, **extra}


#: search "alpha" (MDM's cells): the best trial overall is regularised at lr 0.002; the none
#: cell's own best is at lr 0.001; a diverged trial has the lowest value of its cell
ALPHA = [
    trial("ef_lstm", "mdm", 0.002, 0.50, **{"regulariser.estimator": "kl", "regulariser.weight": 0.1}),
    trial("ef_lstm", "mdm", 0.001, 0.55, **{"regulariser.estimator": "kl", "regulariser.weight": 0.1}),
    trial("ef_lstm", "mdm", 0.001, 0.10, status="diverged",
          **{"regulariser.estimator": "kl", "regulariser.weight": 0.01}),
    trial("ef_lstm", "mdm", 0.002, 0.58, **{"regulariser.estimator": "w", "regulariser.weight": 0.1}),
    trial("ef_lstm", "mdm", 0.001, 0.56, status="pruned",
          **{"regulariser.estimator": "w", "regulariser.weight": 0.01}),
    trial("ef_lstm", "none", 0.002, 0.70),
    trial("ef_lstm", "none", 0.001, 0.60),
    trial("ef_lstm", "none", 0.0005, None, status="errored"),
    trial("tfn", "none", 0.002, 0.66),
    trial("tfn", "none", 0.001, 0.64),
    trial("tfn", "mdm", 0.001, 0.61, **{"regulariser.estimator": "f", "regulariser.weight": 0.1}),
]
#: search "beta" (another space, Synergy's cells): shares the cell tfn + none, where its trial
#: beats alpha's; adds tfn + synergy
BETA = [
    trial("tfn", "none", 0.0005, 0.63),
    trial("tfn", "none", 0.002, 0.69),
    trial("tfn", "synergy", 0.001, 0.62, **{"regulariser.divergence": "mmd"}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store with searches alpha (experiment mdm_like) and beta (synergy_like)
    on the same data, and gamma on other data."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    ids = {"alpha": add_search(client, "mdm_like", "alpha", ALPHA, root, cells=MDM_CELLS,
                               table={"test": "mann_whitney", "alpha": 0.05}),
           "beta": add_search(client, "synergy_like", "beta", BETA, root, backbones=("tfn",),
                              cells=SYN_CELLS, regularisers=("none", "synergy"),
                              table={"test": "paired_t"}),
           "gamma": add_search(client, "synergy_like", "gamma", BETA[:1], root, digest="cd" * 32),
           "delta": add_search(client, "synergy_like", "delta", BETA[:1], root,
                               metric="valid_corr", mode="max")}
    return uri, client, ids


def open_searches(client, experiment, *names):
    from argparse import Namespace

    from tuner.table import open_searches as _open

    return _open(client, Namespace(experiment=experiment, search=list(names) or None))


# ---------------------------------------------------------------------------------- choice
def test_each_cell_gets_its_own_argmin_on_validation(store):
    """Done-when: for every cell, the chosen trial is the argmin of the validation objective
    among that cell's own usable trials; the none cell's lr is its own argmin's (0.001), not the
    best regularised trial's (0.002); a diverged trial is never chosen."""
    from tuner.table import choose_cells

    _, client, ids = store
    searches = open_searches(client, "mdm_like", "alpha")
    chosen, notes = choose_cells(searches)
    # the expected choice, computed here from the trials' own params
    expected: dict = {}
    for run_id, t in zip(ids["alpha"], ALPHA):
        if t.get("status", "completed") in ("diverged", "errored") or t["value"] is None:
            continue
        params = {k: str(v) for k, v in t.items() if k not in ("value", "status")}
        cell = cell_of(params, MDM_CELLS)
        if cell not in expected or t["value"] < expected[cell][1]:
            expected[cell] = (run_id, t["value"], t["lr"])
    assert {c.cell: c.run.info.run_id for c in chosen} == {k: v[0] for k, v in expected.items()}
    by_row = {(c.backbone, c.row_name): c for c in chosen}
    assert float(by_row["ef_lstm", "none"].run.data.params["lr"]) == 0.001
    assert float(by_row["ef_lstm", "mdm (estimator=kl)"].run.data.params["lr"]) == 0.002
    assert by_row["ef_lstm", "mdm (estimator=kl)"].value == 0.50  # not the diverged 0.10
    assert by_row["ef_lstm", "mdm (estimator=w)"].value == 0.56  # a pruned trial counts
    assert by_row["ef_lstm", "none"].trials == 2  # the errored trial is not a candidate
    # the papers' layout: backbones in the space's order, none first in each block
    assert [(c.backbone, c.row_name) for c in chosen] == [
        ("ef_lstm", "none"), ("ef_lstm", "mdm (estimator=kl)"), ("ef_lstm", "mdm (estimator=w)"),
        ("tfn", "none"), ("tfn", "mdm (estimator=f)")]
    assert len({c.label for c in chosen}) == len(chosen)


def test_a_maximised_metric_chooses_the_highest():
    from tuner.report import SearchInfo
    from tuner.spaces import TableSettings
    from tuner.table import TableSearch, choose_cells

    def run(run_id, reg, value, status="completed"):
        return SimpleNamespace(
            info=SimpleNamespace(run_id=run_id, start_time=0),
            data=SimpleNamespace(metrics={"best_valid_corr": value}, tags={"status": status},
                                 params={"backbone": "tfn", "regulariser": reg}))

    trials = [run("a", "none", 0.3), run("b", "none", 0.5), run("c", "none", 0.9, "diverged"),
              run("d", "mdm", 0.2)]
    info = SearchInfo("1", "e", None, trials, "s", "valid_corr", "max")
    chosen, _ = choose_cells([TableSearch(info, ("backbone", "regulariser"), TableSettings(), {})])
    assert {c.regulariser: c.run.info.run_id for c in chosen} == {"none": "b", "mdm": "d"}


def test_searches_merge_only_on_the_same_data_and_metric(store):
    _, client, _ = store
    with pytest.raises(UsageError, match="ran on other data than search 'alpha'"):
        open_searches(client, "mdm_like", "alpha", "gamma")
    with pytest.raises(UsageError, match="selects by valid_corr .max., search 'alpha' by "
                                         "valid_mae .min."):
        open_searches(client, "mdm_like", "alpha", "delta")
    with pytest.raises(UsageError, match="--search nope: no search of that name"):
        open_searches(client, "mdm_like", "nope")


# ---------------------------------------------------------------------------------- statistics
def fake_reruns(labels: list[str], seeds: list[int]) -> list[Rerun]:
    """Test metrics per label and seed, distinct and deterministic."""
    reruns = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng(100 + i)
        for seed in seeds:
            test = {m: float(rng.uniform(0.4, 0.9)) for m in REPORT_METRICS}
            test["mae"] = 0.8 - 0.03 * i + 0.02 * float(rng.standard_normal())
            reruns.append(Rerun(label, seed, "", "completed", test, None))
    return reruns


def test_statistics_equal_scipy_and_hand_computed_values(store):
    """p-values are scipy's on the stored re-runs (Mann-Whitney for alpha's space, the paired
    t-test for beta's), p_holm >= p_value and is Holm's; the effect size and the interval match
    values computed here by hand."""
    from scipy.stats import mannwhitneyu, ttest_rel

    from tuner.table import choose_cells, table_rows

    _, client, _ = store
    chosen, _ = choose_cells(open_searches(client, "mdm_like", "alpha", "beta"))
    seeds = list(range(6))
    reruns = fake_reruns([c.label for c in chosen], seeds)
    flagged = next(r for r in reruns if r.variant == chosen[-1].label)
    flagged.collapsed = "critic collapsed: ..."
    rows = table_rows(chosen, reruns, "mae")
    # a collapsed critic is counted on its cell's row (issue 23: the table flags such runs)
    assert [r["collapsed_reruns"] for r in rows] == [0] * (len(rows) - 1) + [1]
    assert {r["chosen_collapsed"] for r in rows} == {"false"}

    def mae(label):
        return np.array([r.test["mae"] for r in reruns if r.variant == label])

    compared = [r for r in rows if r["regulariser"] != "none"]
    assert len(compared) == 4 and all(r["baseline"] for r in compared)
    for r in compared:
        x, y = mae(r["label"]), mae(r["baseline"])
        if r["regulariser"] == "synergy":  # beta's space: the paired t-test
            assert r["test"] == "paired_t"
            assert r["p_value"] == pytest.approx(ttest_rel(x, y).pvalue, rel=1e-12)
            d = x - y
            assert r["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
        else:
            assert r["test"] == "mann_whitney"
            assert r["p_value"] == pytest.approx(
                mannwhitneyu(x, y, alternative="two-sided").pvalue, rel=1e-12)
            pooled = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)  # equal n
            assert r["effect_size"] == pytest.approx((x.mean() - y.mean()) / pooled)
        assert r["diff_mean"] == pytest.approx(x.mean() - y.mean())
        assert r["ci_low"] < r["diff_mean"] < r["ci_high"]
        assert r["p_holm"] >= r["p_value"]
        assert r["test_mae_mean"] == pytest.approx(x.mean())
        assert r["test_mae_std"] == pytest.approx(x.std(ddof=1))
        assert r["n"] == len(seeds)
    # Holm by hand: the k-th smallest of m p-values times (m - k + 1), kept monotone
    ps = sorted(r["p_value"] for r in compared)
    expected, running = [], 0.0
    for k, p in enumerate(ps):
        running = max(running, min(1.0, (len(ps) - k) * p))
        expected.append(running)
    assert sorted(r["p_holm"] for r in compared) == pytest.approx(expected)
    for r in rows:
        if r["regulariser"] == "none":
            assert math.isnan(r["p_value"]) and r["baseline"] == ""


def test_holm_effect_size_and_interval_by_hand():
    from tuner.table import bootstrap_interval, cohen_d, compare, holm

    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                               nan_ok=True)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    # d = (2 - 1) / sqrt(((1) + (1)) / 2) with samples [1, 2, 3] and [0, 1, 2]
    assert cohen_d(np.array([1.0, 2, 3]), np.array([0.0, 1, 2])) == pytest.approx(1.0)
    # constant samples: the interval is the difference itself
    assert bootstrap_interval((np.array([1.0, 1, 1]), np.array([0.25, 0.25])), False) == (0.75, 0.75)
    # x = [0, 1] re-sampled has mean 0 (1/4), 0.5 (1/2) or 1 (1/4): the 2.5% and 97.5%
    # percentiles of mean(x*) - 0 are 0 and 1
    assert bootstrap_interval((np.array([0.0, 1.0]), np.array([0.0, 0.0])), False) == (0.0, 1.0)
    # paired: the differences [1, 1, 1] give the interval [1, 1]; d_z is undefined (sd 0)
    res = compare("paired_t", {0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert (res["ci_low"], res["ci_high"], res["diff_mean"]) == (1.0, 1.0, 1.0)
    assert math.isnan(res["effect_size"])
    # equal samples: no evidence of a difference
    same = compare("mann_whitney", {0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert same["p_value"] == 1.0 and same["diff_mean"] == 0.0
    assert compare("paired_t", {0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})["p_value"] == 1.0
    # pairs by seed: a seed missing on one side is left out
    res = compare("paired_t", {0: 1.0, 1: 2.5, 2: 2.0, 3: 9.0}, {0: 0.0, 1: 2.0, 2: 0.5})
    assert res["diff_mean"] == pytest.approx(1.0)  # (1 + 0.5 + 1.5) / 3


# ---------------------------------------------------------------------------------- the command
def test_merged_table_reruns_a_shared_cell_once(store, tmp_path, monkeypatch, capsys, small_data):
    """Done-when: two searches with one shared cell (tfn + none) merge into one table; the
    shared cell is chosen from the trials of both (beta's is better) and re-run once; table.csv,
    table.md (papers' values on --dataset mosi), the heatmap and the MLflow table run."""
    import tuner.table as table
    from tuner.report import main

    uri, client, ids = store
    calls = []

    def reruns(variants, seeds, data, tracker, args, name):
        calls.append((dict(variants), list(seeds), tracker.parent_run_id))
        return fake_reruns(list(variants), seeds)

    monkeypatch.setattr(table, "run_reruns", reruns)
    data = dataclasses.replace(small_data, digest=DIGEST)  # the searches' data, as recorded
    monkeypatch.setattr(table, "load_search_data", lambda *a, **k: data)
    out = tmp_path / "out"
    assert main(["--table", "--experiment", "mdm_like", "--search", "alpha", "--search", "beta",
                 "--seeds", "4", "--mlflow-uri", uri, "--out", str(out), "--name", "t1",
                 "--dataset", "mosi", "--max-epochs", "3"]) == 0
    assert len(calls) == 1  # one Ray Tune grid for every cell
    variants, seeds, table_run = calls[0]
    assert seeds == [0, 1, 2, 3]
    tfn_none = [k for k, v in variants.items() if v["backbone"] == "tfn"
                and v["regulariser"] == "none"]
    assert len(tfn_none) == 1  # the shared cell, re-run once
    assert variants[tfn_none[0]]["lr"] == 0.0005  # beta's trial beat alpha's 0.64
    assert all(v["max_epochs"] == 3 for v in variants.values())
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backbone"], r["regulariser"], r["variant"]) for r in rows] == [
        ("ef_lstm", "none", ""), ("ef_lstm", "mdm", "estimator=kl"),
        ("ef_lstm", "mdm", "estimator=w"), ("tfn", "none", ""), ("tfn", "mdm", "estimator=f"),
        ("tfn", "synergy", "divergence=mmd")]
    shared = rows[3]
    assert shared["trial_run_id"] == ids["beta"][0] and shared["search"] == "beta"
    assert rows[0]["trial_run_id"] == ids["alpha"][6]
    for col in ("n", "p_value", "p_holm", "effect_size", "ci_low", "ci_high",
                *(f"test_{m}_{s}" for m in REPORT_METRICS for s in ("mean", "std"))):
        assert col in rows[0]
    assert rows[5]["test"] == "paired_t" and rows[1]["test"] == "mann_whitney"
    assert json.loads(rows[1]["configuration"]) == {"lr": "0.002", "regulariser.weight": "0.1"}
    md = (out / "table.md").read_text()
    assert "### ef_lstm" in md and "### tfn" in md and md.count("### tfn") == 1
    assert "| mdm (estimator=kl) |" in md
    assert "MDM (Table 1)" in md  # the paper's EF-LSTM + L_kl value beside ours on MOSI
    assert (out / "table_heatmap.png").stat().st_size > 1000
    run = client.get_run(table_run)
    assert run.data.tags["run_kind"] == "table" and run.data.tags["table_of"] == "alpha,beta"
    # where it ran (issue 25) and on which data: env tags, a dataset input, said in table.md
    assert run.data.tags["env.torch_version"] and run.data.tags["env.python"]
    digests = [d.dataset.digest for d in run.inputs.dataset_inputs]
    assert digests[0] == DIGEST[:36] and len(digests) == 1 + (small_data.unlabeled is not None)
    assert "- Environment: " in md
    assert run.info.status == "FINISHED"
    assert {"table.csv", "table.md", "table_heatmap.png", "robustness.csv"} <= {
        a.path for a in client.list_artifacts(table_run)}
    assert f"test_mae_mean_{rows[0]['label']}" in run.data.metrics
    # without --dataset: no papers' values, and table.md says why
    monkeypatch.setattr(table, "run_reruns", reruns)
    assert main(["--table", "--experiment", "mdm_like", "--search", "alpha", "--seeds", "2",
                 "--mlflow-uri", uri, "--out", str(tmp_path / "o2"), "--name", "t2"]) == 0
    md = (tmp_path / "o2" / "table.md").read_text()
    assert "MDM (Table 1)" not in md and "not CMU-MOSI or CMU-MOSEI" in md
    capsys.readouterr()


def test_dry_run_prints_cells_chosen_trials_and_reruns(store, capsys):
    from tuner.report import main

    uri, _, ids = store
    assert main(["--table", "--dry-run", "--experiment", "mdm_like", "--search", "alpha",
                 "--search", "beta", "--seeds", "3", "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "14 trials" in out and "6 cells" in out
    assert ids["beta"][0] in out  # the shared cell's chosen trial
    assert "6 cells x 3 seeds (0, 1, 2) = 18 runs, at most 36 trial-epochs" in out
    # no search yet: the space's plan (MDM's paper grid: 312 trials, 24 cells x 10 seeds)
    assert main(["--table", "--dry-run", "--experiment", "mdm", "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "the grid has 312 points" in out and "24 cells" in out
    assert "24 cells x 10 seeds = 240 runs, at most 7200 trial-epochs" in out


def test_the_papers_numbers_are_well_formed():
    """tuner/paper_results.csv (docs/paper-results-audit.md) loads with every row checked, covers
    the tables it says it does, and names each cell as tuner.table does, so that a paper's value
    can meet our cell: every variant key is a cell key of a shipped space of that regulariser."""
    from tuner.spaces import load_space
    from tuner.table import PAPER_VALUE_RANGES, load_paper_results

    rows = load_paper_results()  # every row checked: names, ranges, notes, no duplicate key
    assert all(isinstance(r["value"], float) for r in rows)
    assert {(r["paper"], r["table"]) for r in rows} == {
        ("MDM", "Table 1"), ("MDM", "Table 2"), ("MMIM", "Table 2"), ("Synergy", "Table 2"),
        ("Synergy", "Table 3"), ("MIRD", "Table 1"), ("MIRD", "Table 5")}
    for table, dataset in (("Table 2", "mosi"), ("Table 3", "mosei")):  # Synergy's captions
        assert {r["dataset"] for r in rows if r["paper"] == "Synergy" and r["table"] == table} \
            == {dataset}
    assert {m for _, m in PAPER_VALUE_RANGES} == set(REPORT_METRICS)
    cell_keys: dict[str, set[str]] = {}
    for path in sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml")):
        space = load_space(str(path))
        for reg in space.regularisers:
            cell_keys.setdefault(reg, set()).update(
                k.partition(".")[2] for k in space.cells if k.startswith("regulariser.")
                and space.applies(k, space.backbones[0], reg))
    for r in rows:
        keys = {item.partition("=")[0] for item in r["variant"].split(",") if item}
        assert keys == cell_keys.get(r["regulariser"], set()), r


def test_a_bad_row_of_the_papers_numbers_is_one_line(tmp_path):
    """Each check of load_paper_results fails on its own broken row, naming file, line, field."""
    from tuner.table import PAPER_COLUMNS, load_paper_results

    good = ["MDM", "Table 1", "mosi", "ef_lstm", "mdm", "estimator=kl", "acc2_non0", "0.764",
            "L_kl"]
    cases = {  # column -> (bad value, what the one line says)
        "table": ("Tab. 1", r"paper, table: expected a paper's name and 'Table N'"),
        "dataset": ("iemocap", r"dataset: expected one of mosi, mosei, got 'iemocap'"),
        "backbone": ("lfn", r"backbone: expected one of .*got 'lfn'"),
        "regulariser": ("mmd", r"regulariser: expected one of .*got 'mmd'"),
        "variant": ("estimator=wasserstein", r"variant: 'estimator=wasserstein' is not a mdm "
                    r"setting \(expected key=value, a field of MDMConfig, estimator one of kl, f, w\)"),
        "metric": ("acc2", r"metric: expected one of .*got 'acc2'"),
        "value": ("76.4", r"value: acc2_non0 on mosi expected in \[0.6, 0.95\] .*got 76.4"),
        "note": ("", r"note: expected the paper's name"),
    }
    header = "# a comment line\n" + ",".join(PAPER_COLUMNS) + "\n"
    ok = tmp_path / "ok.csv"
    ok.write_text(header + ",".join(good) + "\n")
    assert load_paper_results(ok)[0]["value"] == 0.764
    for column, (bad, message) in cases.items():
        row = list(good)
        row[PAPER_COLUMNS.index(column)] = bad
        path = tmp_path / f"{column}.csv"
        path.write_text(header + ",".join(good) + "\n" + ",".join(row) + "\n")
        with pytest.raises(UsageError, match=f"^{path}: line 4: {message}"):
            load_paper_results(path)
    twice = tmp_path / "twice.csv"
    twice.write_text(header + ",".join(good) + "\n" + ",".join(good[:-1] + ["again"]) + "\n")
    with pytest.raises(UsageError, match=f"{twice}: line 4: the same paper, table, dataset, "
                                         "cell and metric as line 3"):
        load_paper_results(twice)
    columns = tmp_path / "columns.csv"
    columns.write_text("paper,table,value\nMDM,Table 1,0.7\n")
    with pytest.raises(UsageError, match="expected the columns paper,table,dataset"):
        load_paper_results(columns)


def test_a_bad_table_test_in_a_space_is_one_line():
    from tuner.spaces import SpaceError, space_from_dict

    raw = {"backbones": ["ef_lstm"], "regularisers": ["none", "mdm"], "table": {"test": "wilcoxon"}}
    with pytest.raises(SpaceError, match="x.yaml: table: test: expected one of .mann_whitney., .paired_t., got .wilcoxon."):
        space_from_dict(raw, "x.yaml")
    raw["table"] = {"test": "paired_t", "alpha": 1.5}
    with pytest.raises(SpaceError, match="x.yaml: table: alpha: expected a level between 0 and 1"):
        space_from_dict(raw, "x.yaml")


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_search_then_table_end_to_end(tmp_path, monkeypatch, small_data, ray_local, capsys):
    """A real grid search (EF-LSTM, none and MDM, two learning rates, one epoch) and its table
    over 2 seeds: each cell's own best trial, 4 re-runs as children of the MLflow table run, and
    p-values equal to scipy's on the re-runs' test MAE."""
    from scipy.stats import mannwhitneyu

    from trainables.data.parquet import write_parquet
    from tuner.report import main as report
    from tuner.search import main as search

    monkeypatch.chdir(tmp_path)
    space = {"name": "tinytable", "backbones": ["ef_lstm"], "regularisers": ["none", "mdm"],
             "data": str(write_parquet(small_data, tmp_path / "data")),
             "grid": {"lr": [0.005, 0.001]},
             "fixed": {"batch_size": 32, "patience": 0, "regulariser.unroll": 1,
                       "regulariser.estimator": "kl", "backbone.hidden": 8},
             "search": {"sampler": "grid", "pruner": "none", "max_epochs": 1, "seed": 0},
             "seeds": [0, 1]}
    (tmp_path / "tinytable.yaml").write_text(yaml.safe_dump(space))
    assert search(["--space", str(tmp_path / "tinytable.yaml"), "--name", "s1"]) == 0
    capsys.readouterr()
    assert report(["--table", "--experiment", "tinytable", "--out", "out", "--name", "tt"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tinytable")
    trials = client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'")
    with open("out/table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["regulariser"] for r in rows] == ["none", "mdm"]
    for row in rows:
        own = [t for t in trials if t.data.params["regulariser"] == row["regulariser"]]
        assert row["trial_run_id"] == min(own, key=lambda t: t.data.metrics["best_valid_mae"]).info.run_id
        assert row["n"] == "2"
    table_run = client.search_runs([exp.experiment_id], "tags.run_kind = 'table'")[0]
    reruns = client.search_runs([exp.experiment_id],
                                f"tags.mlflow.parentRunId = '{table_run.info.run_id}'")
    assert len(reruns) == 4 and {r.data.tags["run_kind"] for r in reruns} == {"rerun"}
    mae = {cell: [r.data.metrics["test_mae"] for r in reruns if r.data.tags["cell"] == cell]
           for cell in ("backbone=ef_lstm,regulariser=none", "backbone=ef_lstm,regulariser=mdm")}
    values = list(mae.values())
    expected = (1.0 if len(set(values[0] + values[1])) == 1
                else mannwhitneyu(values[1], values[0], alternative="two-sided").pvalue)
    assert float(rows[1]["p_value"]) == pytest.approx(expected)
    assert (tmp_path / "out" / "table.md").read_text().count("### ef_lstm") == 1
