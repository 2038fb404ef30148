"""The benchmark scripts still run: each bench's ``main(argv)`` on a tiny setting prints its table."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown table in ``text`` (header and rule left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_mi_gaussian_prints_a_table(capsys, tmp_path):
    mi = load_bench("mi_gaussian")
    out = tmp_path / "mi.md"
    assert mi.main(["--dims", "1", "2", "--rhos", "0.0", "0.8", "--steps", "12", "--batch", "16",
                    "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert len(rows) == 4 and all(len(r) == 3 + len(mi.COLUMNS) + 1 for r in rows)
    assert rows[1][:3] == ["1", "0.8", f"{mi.true_mi(1, 0.8):.3f}"]
    assert all("±" in cell for row in rows for cell in row[3:-1])  # mean ± std over 2 seeds
    assert "| d | ρ | true MI |" in printed and out.read_text().strip() in printed


def test_mi_truth_and_club_ideal():
    mi = load_bench("mi_gaussian")
    assert mi.true_mi(5, 0.0) == 0.0
    assert mi.true_mi(1, 0.8) == pytest.approx(0.5108, abs=1e-4)
    assert mi.club_ideal(2, 0.8) == pytest.approx(2 * 0.64 / 0.36)


def test_backbones_prints_the_columns_of_the_performance_table(capsys, monkeypatch, small_data):
    """docs/performance.md's "Backbones" table has the header the bench prints first; a backbone
    timed on fewer batches says so in its cell."""
    bench = load_bench("backbones")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--backbones", "lmf", "ef_lstm", "--max-epoch-s", "0",
                       "--probe-batches", "1"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("|"))
    doc = (BENCH.parent / "docs" / "performance.md").read_text()
    section = doc.split("## Backbones", 1)[1].split("\n## ", 1)[0]
    assert header == next(line for line in section.splitlines() if line.startswith("|"))
    summary, detail = [table_rows(part) for part in printed.split("In detail")]
    batches = -(-len(small_data.splits["train"]) // 32)
    assert [r[0] for r in summary] == ["lmf", "ef_lstm"] == [r[0] for r in detail]
    for row, full in zip(summary, detail):
        assert row[2] == full[2]  # parameters: the total
        # the same seconds, rounded to 1 decimal from the unrounded value (the detail shows 2 decimals,
        # so re-rounding its text can land on the other side of a .x5 boundary)
        value, note = row[3].split(" ", 1)
        assert value.startswith("~") and note == f"(1 of {batches} batches, extrapolated)", row[3]
        assert abs(float(value[1:]) - float(full[4].lstrip("~"))) <= 0.05 + 0.005 + 1e-9, (row[3], full[4])
        assert row[4] == full[6]  # valid CPU s/pass


def test_backbones_ab_times_both_on_the_same_batches(capsys, monkeypatch, small_data):
    """``--ab KEY=VALUE`` times each backbone as A and as A plus the key, and prints B / A."""
    bench = load_bench("backbones")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--backbones", "lmf", "--max-epoch-s", "0",
                       "--probe-batches", "1", "--ab", "backbone.rank=2"]) == 0
    printed = capsys.readouterr().out
    summary = table_rows(printed.split("In detail")[0])
    assert [r[0] for r in summary] == ["lmf", "lmf (backbone.rank=2)"]
    ab = table_rows(printed.split("A/B in this process")[1])
    assert len(ab) == 1 and ab[0][0] == "lmf"
    assert float(ab[0][3]) > 0 and float(ab[0][6]) > 0  # B / A of the train epoch, of the valid pass


def test_regularisers_prints_a_table(capsys, monkeypatch, small_data):
    bench = load_bench("regularisers")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--backbones", "lmf", "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert [r[1] for r in rows] == list(bench.REGULARISERS)
    assert all(r[0] == "lmf" and r[4].startswith("~") for r in rows), rows  # all timed, extrapolated
    assert rows[0][6] == "1.00" and "Note:" in printed


def test_search_accounting_charges_every_epoch_up_to_the_first_hit(tmp_path):
    bench = load_bench("search_efficiency")
    Trial = bench.Trial
    # two trials side by side: b's second epoch (t=105) is the first within the target, after
    # a's first (t=101) and b's first (t=103); a's later epochs are not charged
    search = bench.SearchResult("smart-x-s4", 100.0, 20.0, [
        Trial({"lr": "0.001"}, "completed", [(101, 1, 0.9), (107, 2, 0.7), (109, 3, 0.6)]),
        Trial({"lr": "0.002"}, "pruned", [(103, 1, 0.85), (105, 2, 0.75)]),
    ])
    assert search.reach(0.8) == (3, 5.0) and search.reach(0.5) == (None, None)
    assert (search.trial_epochs, search.pruned, search.best) == (5, 1, 0.6)
    assert bench.seed_of(search) == "4"
    meta = {"version": bench.STORE_VERSION, "backbone": "ef_lstm", "max_epochs": 3}
    path = bench.save_search(tmp_path / "s.json", meta, search)
    assert bench.load_search(path, meta) == search
    with pytest.raises(SystemExit, match="backbone is 'ef_lstm' there, 'tfn' here"):
        bench.load_search(path, {**meta, "backbone": "tfn"})


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, small_data):
    """Flags for a 3-point MDM grid (none + two estimators) of 2 epochs on the small set."""
    from trainables.data.parquet import write_parquet

    root = tmp_path_factory.mktemp("search_bench")
    data_dir = write_parquet(small_data, root / "data")
    return ("--data", str(data_dir), "--max-epochs", "2", "--workdir", str(root / "out"),
            "--set", "grid.lr=[0.005]", "--set", "grid.regulariser.weight=[0.1]",
            "--set", "grid.regulariser.estimator=[kl,w]", "--set", "fixed.batch_size=16",
            "--set", "fixed.backbone.hidden=16", "--set", "fixed.regulariser.unroll=1")


@pytest.fixture(scope="module")
def efficiency_run(tiny_grid, ray_local):
    """search_efficiency.py once: the grid, one smart search (sampler seed 1), each one's
    chosen configuration re-trained with seed 1; its work folder."""
    bench = load_bench("search_efficiency")
    assert bench.main([*tiny_grid, "--budget", "1", "--seeds", "1", "--noise-seeds", "1"]) == 0
    return Path(tiny_grid[tiny_grid.index("--workdir") + 1])


def newest(folder: Path, pattern: str) -> tuple[str, list[list[str]]]:
    text = sorted(folder.glob(pattern))[-1].read_text()
    return text, table_rows(text)


def stored_reports(stored: Path) -> list[float]:
    """Every report (best validation MAE so far) of every trial of a stored search, in time order,
    read from its JSON (not through the bench's own accounting)."""
    trials = json.loads(stored.read_text())["search"]["trials"]
    return [value for _, value in sorted((h[0], h[2]) for t in trials for h in t["history"])]


def first_hit(stored: Path, target: float) -> int | None:
    """Trial-epochs a stored search had spent at its first report at or below ``target``."""
    return next((i for i, v in enumerate(stored_reports(stored), 1) if v <= target), None)


def grid_target(grid: Path) -> float:
    return min(stored_reports(grid)) * 1.01


def test_search_efficiency_stores_and_reuses_the_searches(tiny_grid, efficiency_run):
    bench = load_bench("search_efficiency")
    out = efficiency_run
    text, rows = newest(out, "result-*.md")
    searches, chosen = text.split("re-trained with seeds 1:")
    rows = table_rows(searches)
    assert rows[0][:5] == ["grid (exhaustive)", "0", "3", "6", "6"]
    assert rows[1][1] == "1" and int(rows[1][3]) <= 6 + 1  # the budget, + a trial beside it
    grid, smart = sorted(out.glob("grid-*.json")), sorted(out.glob("smart-*.json"))
    assert len(grid) == 1 and len(smart) == 1
    hit = first_hit(smart[0], grid_target(grid[0]))  # which branch this run took, from its data
    assert rows[1][4] == ("not reached" if hit is None else str(hit)), (rows[1], hit)
    assert rows[1][5] == f"{min(stored_reports(smart[0])):.4f}"
    # every trial of every search trained with the grid's seed (--train-seed 0), not the
    # sampler's
    for stored in grid + smart:
        trials = json.loads(stored.read_text())["search"]["trials"]
        assert {t["params"]["seed"] for t in trials} == {"0"}, stored
    # the choice of each search re-trained: one row each, its own seed-1 value
    picked = table_rows(chosen)
    assert [row[0] for row in picked] == ["grid", "smart s1"]
    smart_best = min(json.loads(smart[0].read_text())["search"]["trials"],
                     key=lambda t: min(h[2] for h in t["history"]))["params"]
    assert f"lr={float(smart_best['lr']):.3g}" in picked[1][1]
    for row in picked:
        assert 0 < float(row[2]) == float(row[3].split(" ± ")[0])
    assert "of 1 re-trainings of the grid's own choice" in chosen
    assert "of 1 smart searches" in chosen

    # both reused: nothing trained, the same rows
    time.sleep(1)  # a new result-<stamp>.md
    assert bench.main([*tiny_grid, "--grid-from", str(grid[0]), "--smart-from", str(smart[0]),
                       "--noise-seeds"]) == 0
    assert table_rows(newest(out, "result-*.md")[0]) == rows
    assert len(list(out.glob("*.json"))) == 2
    with pytest.raises(SystemExit, match="max_epochs is 2 there, 3 here"):
        bench.main([*tiny_grid, "--max-epochs", "3", "--grid-from", str(grid[0])])


def test_search_speed_times_ours_and_a_serial_random_search(tiny_grid, efficiency_run):
    """The grid and our search come from search_efficiency's run; the random search runs."""
    bench = load_bench("search_speed")
    out = efficiency_run
    grid, smart = sorted(out.glob("grid-*.json"))[0], sorted(out.glob("smart-*.json"))[0]
    assert bench.main([*tiny_grid, "--grid-from", str(grid), "--ours-from", str(smart),
                       "--seeds", "0", "--budget", "1"]) == 0
    text, _ = newest(out, "speed-*.md")
    ours, random = table_rows(text.split("Best valid MAE so far at fixed points")[0])
    assert ours[0].startswith("ours: tpe + asha") and random[0].startswith("serial random")
    budget = 6  # the grid's 3 trials x 2 epochs
    assert int(ours[3]) <= budget + 1 and int(random[3]) <= budget
    stored = sorted(out.glob("random-*.json"))
    assert len(stored) == 1
    trials = sorted(json.loads(stored[0].read_text())["search"]["trials"],
                    key=lambda t: t["history"][0][0])
    # one at a time, no pruning: each trial ran both epochs, but the last may be cut short by
    # the target or the budget
    assert all(len(t["history"]) == 2 for t in trials[:-1]) and int(random[2]) == len(trials)
    assert all(a["history"][-1][0] <= b["history"][0][0] for a, b in zip(trials, trials[1:]))
    target = grid_target(grid)
    hits = {"ours": first_hit(smart, target), "random": first_hit(stored[0], target)}
    if hits["random"] is None:  # serial, no pruning: it spends exactly the budget (Tune's
        assert int(random[3]) == budget  # repeated last report of a trial is not an epoch)
    for row, stored_json, hit in ((ours, smart, hits["ours"]), (random, stored[0], hits["random"])):
        assert row[4] == ("> budget" if hit is None else str(hit)), (row, hit)
        assert row[5].startswith("> ") == (hit is None)
        assert row[6] == f"{min(stored_reports(stored_json)):.4f}"  # each search's best
        assert row[8] == str(budget)
    assert ours[9] == "2 × 1 = 2"  # the tests' 2-CPU Ray, a trial per CPU
    cpus = os.cpu_count()
    assert random[9] == f"1 × {cpus} = {cpus}"  # one trial at a time with every CPU
    assert ("Median wall to target" in text) == (hits["ours"] is not None)
    assert ("no speed-up is claimed" in text) == (hits["ours"] is None)
    # ours came from a file: the conditions are not equal, and the printout says why
    assert "Not equal conditions:" in text and "loaded from files" in text
    # the best so far after 1, 3 and 6 trial-epochs (a quarter, half and all of the budget)
    points = table_rows(text.split("at fixed points")[1].split("Time to equal quality")[0])
    assert [r[:2] for r in points] == [["ours", "1"], ["serial random", "0"]]
    for row, stored_json in zip(points, (smart, stored[0])):
        reports = stored_reports(stored_json)
        assert row[2 + 4:] == [f"{min(reports[:k]):.4f}{' †' if k > len(reports) else ''}"
                               for k in (1, 3, 6)], (row, reports)
    quality = table_rows(text.split("Time to equal quality")[1])
    assert len(quality) == 1 and quality[0][0] == "1" and quality[0][3] == "0"
    assert float(quality[0][1]) == min(min(h[2] for h in t["history"]) for t in json.loads(
        smart.read_text())["search"]["trials"])
    assert "Median speed-up to equal quality" in text


def test_search_speed_says_whether_conditions_were_equal():
    """One run at equal budgets and threads, spent in full, says so; any difference is named."""
    bench = load_bench("search_speed")
    Result = load_bench("search_efficiency").SearchResult
    ours, theirs = Result("smart-x-s0", 0.0, 10.0), Result("random-x-s0", 0.0, 10.0)
    equal = {"budget": 6, "stop_at": None, "at_once": 2, "threads": 1}
    same = [("ours", ours, equal), ("serial random", theirs, {**equal, "at_once": 1,
                                                                  "threads": 2})]
    assert bench.conditions_lines(same, loaded=False)[-1] == (
        "Equal conditions: every search ran in this run with a budget of 6 trial-epochs, spent "
        "in full, and 2 CPU threads in all.")
    other = [same[0], ("serial random", theirs, {**equal, "budget": 12, "stop_at": 0.5})]
    line = bench.conditions_lines(other, loaded=True)[-1]
    assert line.startswith("Not equal conditions: trial-epoch budgets differ (ours s0: 6, "
                           "serial random s0: 12)")
    assert "threads" not in line and "loaded from files" in line and "ended at the target" in line


@pytest.mark.slow
def test_many_trials_checks_every_trial_once(capsys, tmp_path, small_data):
    """A few trials at once through ``tuner.search``: each in MLflow once, the SQLite stores
    intact, the Optuna study complete (the 200-trial run is in docs/performance.md)."""
    from trainables.data.parquet import write_parquet

    bench = load_bench("many_trials")
    data = write_parquet(small_data, tmp_path / "data")
    out = tmp_path / "many.md"
    assert bench.main(["--trials", "4", "--concurrent", "2", "--epochs", "1", "--data", str(data),
                       "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    measures = {row[0]: row[1] for row in table_rows(printed) if len(row) == 2}
    assert measures["MLflow child runs / distinct trial ids / Ray trials"] == "4 / 4 / 4"
    assert measures["duplicated / missing in MLflow / unfinished runs"] == "0 / 0 / 0"
    assert measures["PRAGMA integrity_check mlflow.db / optuna.db"] == "ok / ok"
    assert measures["Optuna trials (states)"] == "4 (COMPLETE 4)"
    checks = [line for line in printed.splitlines() if line.endswith(("| pass |", "| FAIL |"))]
    assert len(checks) == 7 and all(line.endswith("| pass |") for line in checks), checks
    assert out.read_text().strip() in printed


def test_many_trials_memory_check_sees_a_leak():
    """The flat-memory figure: a driver growing 1 MB per trial started is reported as such,
    a flat one (noise only) near zero."""
    bench = load_bench("many_trials")
    trials, t = 100, np.arange(400) * 0.5
    started = np.minimum(trials, (np.arange(400) // 4) + 1)
    mb = 600 + np.where(started < trials, started, trials).astype(float)  # +1 MB per trial
    noise = np.random.default_rng(0).normal(0, 2, 400)
    for rss, expected in ((mb, 1024), (np.full(400, 600.0) + noise, 0)):
        samples = [(ti, int(r * 2**20), 1000, int(s)) for ti, r, s in zip(t, rss, started)]
        summary = bench.memory_summary(samples, None, trials)
        assert summary["kb_per_trial"] == pytest.approx(expected, abs=50), summary


def test_epoch_speed_prints_tables(capsys, monkeypatch, small_data, tmp_path):
    bench = load_bench("epoch_speed")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--models", "lmf", "ef_lstm", "--epochs", "2",
                       "--no-mmsa"]) == 0
    printed = capsys.readouterr().out
    assert "by parts" not in printed  # no MMSA run, no parts table
    speed, curves = [table_rows(part) for part in printed.split("Validation MAE")]
    assert [r[0] for r in speed] == ["lmf", "ef_lstm"]
    assert all(r[4] == "–" and r[5].endswith("×") for r in speed)  # no MMSA column without MMSA
    assert [(r[0], r[1]) for r in curves] == [("lmf", "ours"), ("lmf", "plain"),
                                             ("ef_lstm", "ours"), ("ef_lstm", "plain")]
    # the MMSA pickle holds what MMSA's MMDataset reads, and reads back as the same data
    from trainables.data import arrays_from_mmsa, read_mmsa_pickle

    with pytest.warns(UserWarning, match="pickle"):  # our own file: the warning is expected
        raw = read_mmsa_pickle(bench.write_mmsa_pickle(small_data, tmp_path / "d.pkl"))
    back = arrays_from_mmsa(raw, "pkl")
    assert back.digest == small_data.digest


def test_epoch_speed_bert_models_time_their_parts(capsys, monkeypatch, small_data):
    """MAG-BERT reads the aligned variant, MMIM runs its two-stage epoch (stage 1 timed on its
    own), no plain loop for either, and no timed epoch holds a test evaluation."""
    bench = load_bench("epoch_speed")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    seen = {}
    real_run_ours = bench.run_ours

    def spy(name, data, args):
        seen[name] = data.dims.aligned
        return real_run_ours(name, data, args)

    monkeypatch.setattr(bench, "run_ours", spy)
    assert bench.main(["--size", "small", "--models", "mag_bert", "mmim", "--epochs", "2",
                       "--no-mmsa", "--text-model", "tiny-bert"]) == 0
    assert seen == {"mag_bert": True, "mmim": False}
    printed = capsys.readouterr().out
    speed, curves = [table_rows(part) for part in printed.split("Validation MAE")]
    assert [r[0] for r in speed] == ["mag_bert", "mmim"]
    assert all(r[3] == "–" and r[4] == "–" for r in speed)  # no plain loop, no MMSA
    assert [(r[0], r[1]) for r in curves] == [("mag_bert", "ours"), ("mmim", "ours")]
    assert "Data of mag_bert: synthetic:small, word-aligned" in printed
    args = bench.argparse.Namespace(seed=0, batch=16, epochs=2, cpu_bf16=False,
                                    text_model="tiny-bert", threads=1)
    flat = bench.ours_config("mmim", args)
    assert flat["regulariser"] == "mmim" and flat["regulariser.schedule"] == "two_stage"
    ours = bench.run_ours("mmim", small_data, args)
    assert len(ours["stage1_wall"]) == len(ours["valid_wall"]) == 2  # one of each per epoch
    assert all(0 < s < w for s, w in zip(ours["stage1_wall"], ours["wall"]))


MMSA_PYTHON = Path("/tmp/mmsa-venv/bin/python")


@pytest.mark.slow
@pytest.mark.skipif(not MMSA_PYTHON.exists(), reason="no MMSA venv at /tmp/mmsa-venv (see "
                    "bench/epoch_speed.py's docstring)")
def test_epoch_speed_against_mmsa(capsys, monkeypatch, small_data):
    """MMSA's own TFN, MAG-BERT and MMIM trainers run (with bench/_mmsa_run.py's patches) and
    are timed by parts beside ours."""
    bench = load_bench("epoch_speed")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--models", "tfn", "mag_bert", "mmim",
                       "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Note:" not in printed, printed  # every MMSA run worked
    speed = table_rows(printed.split("Ours vs MMSA by parts")[0])
    assert all(r[4] != "–" and r[6].endswith("×") for r in speed), speed
    parts = table_rows(printed.split("Ours vs MMSA by parts")[1].split("Validation MAE")[0])
    assert [(r[0], r[1]) for r in parts] == [(m, loop) for m in ("tfn", "mag_bert", "mmim")
                                             for loop in ("ours", "MMSA")]
    stage1 = {(r[0], r[1]): r[6] for r in parts}
    assert stage1[("mmim", "ours")] != "–" and stage1[("mmim", "MMSA")] != "–"
    assert stage1[("tfn", "MMSA")] == "–"


def test_gpu_check_without_cuda_says_so_in_one_line(capsys, monkeypatch):
    bench = load_bench("gpu_check")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--parts", "a", "c", "--epochs", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device")


def test_gpu_check_arguments(capsys):
    bench = load_bench("gpu_check")
    args = bench.build_parser().parse_args([])
    assert args.parts == ["a", "b", "c", "d"] and args.epochs == 4 and args.trials == 8
    assert args.mdm_epochs == 2
    args = bench.build_parser().parse_args(["--parts", "b", "--trials", "3", "--cpus-per-trial",
                                            "4", "--search-epochs", "1"])
    assert (args.parts, args.trials, args.cpus_per_trial, args.search_epochs) == (["b"], 3, 4.0, 1)
    with pytest.raises(SystemExit) as exc:
        bench.build_parser().parse_args(["--parts", "e"])
    assert exc.value.code == 2 and "invalid choice: 'e'" in capsys.readouterr().err
    # part b's Ray bookkeeping: the most trials whose intervals overlap
    assert bench.most_at_once([(0, 10), (1, 5), (5, 8), (9, 12)]) == 2
    assert bench.most_at_once([(0, 4), (1, 4), (2, 4), (3, 4)]) == 4
    assert bench.most_at_once([(0, 1), (1, 2)]) == 1


def test_epoch_speed_profile_prints_the_top_ops(capsys, monkeypatch, small_data):
    bench = load_bench("epoch_speed")
    monkeypatch.setattr(bench, "load_data", lambda size, data_dir: (small_data, "synthetic:small (fixture)"))
    assert bench.main(["--size", "small", "--models", "lmf", "--profile", "2", "--batch",
                       "16"]) == 0
    printed = capsys.readouterr().out
    assert "Profile of lmf's training step (2 batches of 16, 1 thread(s))" in printed
    assert "ours s/epoch" not in printed  # --profile times nothing else
    rows = table_rows(printed)
    assert len(rows) == 12 + 1 and rows[-1][0].endswith("other ops")
    ops = [r[0].strip("`") for r in rows[:-1]]
    assert "aten::mm" in ops or "aten::addmm" in ops  # LMF's fusion is matrix products
    shares = [float(r[3].rstrip("%")) for r in rows]
    assert sum(shares) == pytest.approx(100, abs=0.05 * len(shares))  # each rounded to 0.1
    assert shares[:-1] == sorted(shares[:-1], reverse=True)  # by self CPU time
    with pytest.raises(SystemExit):
        bench.main(["--size", "small", "--models", "lmf", "--profile", "0"])


def test_tune_overhead_prints_a_table(capsys, small_data, tmp_path, monkeypatch):
    from trainables.data.parquet import write_parquet

    bench = load_bench("tune_overhead")
    data_dir = write_parquet(small_data, tmp_path / "data")
    # CI time: one profiled pair of fresh processes, not four. The timed runs are run under
    # cProfile into the files the --profile step reads, and that step reuses them (a timed
    # wall under cProfile is still a wall; the table's arithmetic is what this checks)
    runs = {"bare": bench.run_bare, "search": bench.run_search}
    done: dict = {}

    def once(kind):
        def run(args, config, workdir, *rest, profiler=()):
            if kind not in done:
                prof = workdir / f"{kind}.prof"
                done[kind] = runs[kind](args, config, workdir, *rest,
                                        profiler=["-m", "cProfile", "-o", str(prof)])
            return done[kind]
        return run

    monkeypatch.setattr(bench, "run_bare", once("bare"))
    monkeypatch.setattr(bench, "run_search", once("search"))
    assert bench.main(["--backbone", "lmf", "--epochs", "2", "--data", str(data_dir),
                       "--set", "batch_size=32", "--profile"]) == 0
    timed, profiled = capsys.readouterr().out.split("Where the search's extra seconds go")
    rows = table_rows(timed)
    assert [r[0].split(" ")[0] for r in rows] == ["bare", "`tuner.search`,"]
    assert float(rows[0][1]) > 0 and rows[1][2].endswith("×")
    phases = {r[0].split(" (")[0].split(":")[0]: r[1:] for r in table_rows(profiled)}
    assert list(phases) == ["imports and the rest of the profiled process",
                            "data load and validation", "Ray's start", "MLflow parent run",
                            "the trial", "of which", "summary", "outside the profile",
                            "**total"]
    # every phase was found in the profiles (a renamed function would print "–")
    for name in ("data load and validation", "the trial"):
        assert all(float(v) > 0 for v in phases[name][:2]), phases[name]
    for name in ("Ray's start", "MLflow parent run", "summary"):
        assert phases[name][0] == "–" and float(phases[name][1]) > 0, phases[name]
    # the phases and the rest add up to the profiled run's wall, in each column
    for col in (0, 1):
        parts = [float(v[col]) for k, v in phases.items()
                 if k not in ("of which", "**total") and v[col] != "–"]
        assert sum(parts) == pytest.approx(float(phases["**total"][col]), abs=0.05)


def test_option_effect_pairs_the_seeds(capsys, monkeypatch):
    """bench/group_by_length.py: each seed trains both settings (the real configs, a stand-in
    Trainer whose best MAE is known); the table, the per-seed differences and the paired t-test
    are those values'; a key that is already the default is refused."""
    from types import SimpleNamespace

    from scipy import stats

    import trainables.loop

    def best_of(cfg):  # what the stand-in "learns": seed-dependent, the option adds 0.01 (seed+1)
        return 1.0 + 0.1 * cfg.seed + (0.01 * (cfg.seed + 1) if cfg.group_by_length else 0.0)

    class Trainer:
        def __init__(self, cfg, data, device):
            assert device == "cpu" and cfg.backbone == "mag_bert" and cfg.max_epochs == 2
            self.cfg, self.data = cfg, data

        def train_epoch(self):
            return {}

        def fit(self):
            for _ in range(self.cfg.max_epochs):
                self.train_epoch()
            self.best = SimpleNamespace(value=best_of(self.cfg))

    monkeypatch.setattr(trainables.loop, "Trainer", Trainer)
    bench = load_bench("group_by_length")
    with pytest.raises(SystemExit):
        bench.main(["--option", "group_by_length=false"])
    assert "that is the default already" in capsys.readouterr().err
    assert bench.main(["--size", "small", "--epochs", "2", "--seeds", "0", "1", "2",
                       "--option", "group_by_length=true", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    default, option = table_rows(printed)
    assert default[:3] == ["group_by_length=false (default)", "1.000, 1.100, 1.200", "1.100 ± 0.100"]
    assert option[:3] == ["group_by_length=true", "1.010, 1.120, 1.230", "1.120 ± 0.110"]
    line = next(x for x in printed.splitlines() if x.startswith("per seed, option minus default"))
    p = stats.ttest_rel([1.01, 1.12, 1.23], [1.0, 1.1, 1.2]).pvalue
    assert line == (f"per seed, option minus default: +0.010, +0.020, +0.030; mean +0.020 ± 0.010 "
                    f"(sd); paired t-test p = {p:.3f}")
