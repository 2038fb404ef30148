"""``python -m tuner.report --table``: the papers' tables, one row per cell.

A *cell* is a row of a paper's table (:mod:`tuner.spaces`: the space's ``cells`` keys, default
``[backbone, regulariser]``; MDM adds ``regulariser.estimator``, Synergy
``regulariser.divergence``). For each cell of one or several finished searches the table

1. chooses the cell's best trial on validation among **that cell's own trials** (the search's
   selection metric and mode; never a diverged, errored or interrupted trial,
   ``tracking.NEVER_BEST``). The ``none`` cell of a backbone is a cell like any other: its
   learning rate is the best of its own grid, not a regularised trial's (MDM, Sec. 4 and Table 1:
   the lr grid is searched per row);
2. re-trains every chosen configuration over the seeds, in one Ray Tune grid over cell x seed
   (:func:`tuner.report.run_reruns`): each re-run picks its epoch on validation and is evaluated
   on test once, with that epoch's weights;
3. compares each regularised cell with its backbone's ``none`` cell on the test counterpart of
   the selection metric (``valid_mae`` -> test MAE) with the paper's own test (the space's
   ``table.test``: ``mann_whitney``, MDM Table 1's two-sided Wilcoxon-Mann-Whitney, or
   ``paired_t``, MMIM Table 2's paired t-test over seeds), Holm's correction over all the table's
   comparisons, an effect size (Cohen's d; d_z for the paired test) and a percentile-bootstrap
   95% interval of the difference in means (cell minus baseline);
4. writes ``table.csv``, ``table.md`` (the papers' layout: a block per backbone, a row per
   regulariser variant, significant cells marked), ``table_heatmap.png``, ``robustness.csv`` and
   ``runs.csv``, and logs them to MLflow: a ``table`` run (a child of the first search's parent
   run) with the re-runs as its children.

Several searches (``--search A --search B``, spaces and experiments may differ) merge into one
leaderboard: their data must have the same sha256 (tag ``data_digest``) and they must select on
the same metric and mode; a cell in several searches is chosen among all its trials and re-run
once. The statistics are pure functions of the re-runs (:func:`compare`, :func:`holm`), tested
against scipy and hand-computed values.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuner.preflight import UsageError
from tuner.report import (REPORT_METRICS, ROBUSTNESS_METRICS, Rerun, SearchInfo, _fmt,
                          _in_default_style, _pyplot, check_search_selection, collapsed_note,
                          dropped_metric, find_search, kept, load_search_data, mann_whitney,
                          mean_std, output_dir, parse_seeds, plain_table,
                          print_environment_and_cost, probe_reruns, robustness_ratio,
                          run_reruns, start_driver_run, trial_config, write_csv)
from tuner.spaces import (DEFAULT_CELL_KEYS, TABLE_TESTS, Cell, TableSettings, cell_label, cell_of,
                          cell_tag, short_key, split_scope)
from trainables.data import DROP_SETS
from tuner.tracking import NEVER_BEST, finite

__all__ = ["BASELINE", "Chosen", "TableSearch", "bootstrap_interval", "choose_cells", "cohen_d",
           "compare", "holm", "load_paper_results", "table_rows", "run_table", "dry_run"]

BASELINE = "none"
#: the metrics' names in the papers' tables
METRIC_TITLES = {"mae": "MAE", "corr": "Corr", "acc2_has0": "Acc-2 has0",
                 "acc2_non0": "Acc-2 non0", "f1_has0": "F1 has0", "f1_non0": "F1 non0",
                 "acc7": "Acc-7"}
#: re-samples of the bootstrap intervals, and their seed (the table is reproducible)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
#: the papers' own numbers (item 5 of issue 24): paper, table, dataset, backbone, ...
PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
DATASETS = ("mosi", "mosei")
PAPER_COLUMNS = ("paper", "table", "dataset", "backbone", "regulariser", "variant", "metric",
                 "value", "note")
#: the range a paper's value of each metric can lie in, per dataset (our units): wide enough for
#: any model these papers print on CMU-MOSI / CMU-MOSEI, narrow enough to catch a percentage left
#: undivided, a column read into the wrong metric or MAE and Corr swapped
#: (docs/paper-results-audit.md)
PAPER_VALUE_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    **{(d, m): (0.60, 0.95) for d in DATASETS
       for m in ("acc2_has0", "acc2_non0", "f1_has0", "f1_non0")},
    **{(d, "acc7"): (0.25, 0.60) for d in DATASETS},
    **{(d, "corr"): (0.45, 0.90) for d in DATASETS},
    ("mosi", "mae"): (0.60, 1.20), ("mosei", "mae"): (0.45, 0.90),
}


# ---------------------------------------------------------------------------------- searches
@dataclass
class TableSearch:
    """One search of the table with what the table needs of its space."""

    info: SearchInfo
    cell_keys: tuple[str, ...]
    settings: TableSettings
    space: dict[str, Any]
    #: where the test came from (the search's space, or today's space file of the same name)
    settings_note: str = ""

    @property
    def name(self) -> str:
        return self.info.name

    def searched_keys(self) -> list[str]:
        """The keys the search sampled (grid or ranges), for the configuration column (scoped
        keys as the space wrote them, ``regulariser.alpha@mird``)."""
        keys = set(self.space.get("grid") or {}) | set(self.space.get("ranges") or {})
        cells = {split_scope(k)[0] for k in self.cell_keys}
        return sorted(k for k in keys if k not in self.cell_keys and split_scope(k)[0] not in cells)


def table_settings(space: dict[str, Any], experiment: str) -> tuple[TableSettings, str]:
    """The ``table`` settings of a search's space (its ``effective_space.yaml``); a search made
    before the key existed takes today's space file of its name, else the defaults."""
    from trainables.config import ConfigError, build_dataclass

    raw = space.get("table")
    if isinstance(raw, dict):
        try:
            return build_dataclass(TableSettings, raw, "table"), "its space"
        except ConfigError as exc:
            raise UsageError(f"search space {space.get('name', experiment)!r}: {exc}") from None
    from tuner.spaces import SpaceError, load_space

    try:
        return load_space(str(space.get("name") or experiment)).table, "today's space file"
    except (SpaceError, OSError):
        return TableSettings(), "the default (the search's space names no test)"


def load_table_search(client, info: SearchInfo) -> TableSearch:
    space = info.space(client)
    keys = tuple(space.get("cells") or DEFAULT_CELL_KEYS)
    settings, note = table_settings(space, info.experiment_name)
    if settings.test not in TABLE_TESTS:
        raise UsageError(f"search {info.name!r}: table.test {settings.test!r}; expected one of "
                         f"{', '.join(TABLE_TESTS)}")
    return TableSearch(info, keys, settings, space, note)


def find_named_search(client, experiment: str | None, name: str | None) -> SearchInfo:
    """``--search NAME``: the search of that name in ``experiment``, else in any experiment
    (its parent run's ``search`` tag); without a name, the newest search of ``experiment``."""
    if name is None or experiment is None:
        return find_search(client, experiment, None, name)
    where = f"tags.run_kind = 'search' and tags.search = '{name}'"
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and client.search_runs([exp.experiment_id], where, max_results=1):
        return find_search(client, experiment, None, name)
    found = []
    for other in client.search_experiments():
        if client.search_runs([other.experiment_id], where, max_results=1):
            found.append(other.name)
    if not found:
        raise UsageError(f"--search {name}: no search of that name in experiment {experiment!r} "
                         "nor in any other experiment")
    if len(found) > 1:
        raise UsageError(f"--search {name}: searches of that name in several experiments "
                         f"({', '.join(found)}); pass --experiment with the one you mean")
    return find_search(client, found[0], None, name)


def check_mergeable(searches: list[TableSearch]) -> None:
    """Searches merge only on the same data (sha256) and the same selection metric and mode."""
    first = searches[0].info
    names = [s.name for s in searches]
    if len(set(names)) != len(names):
        raise UsageError(f"--search: a search is named twice ({', '.join(names)})")
    for s in searches[1:]:
        info = s.info
        if not first.data_digest or not info.data_digest:
            missing = first if not first.data_digest else info
            raise UsageError(f"search {missing.name!r} records no data hash (tag data_digest): "
                             "cannot check that the searches ran on the same data")
        if info.data_digest != first.data_digest:
            raise UsageError(f"search {info.name!r} ran on other data than search {first.name!r} "
                             f"(sha256 {info.data_digest[:12]}... vs {first.data_digest[:12]}...); "
                             "a table merges searches of the same data only")
        if (info.metric, info.mode) != (first.metric, first.mode):
            raise UsageError(f"search {info.name!r} selects by {info.metric} ({info.mode}), search "
                             f"{first.name!r} by {first.metric} ({first.mode}); a table compares "
                             "trials on one selection metric only")


# ---------------------------------------------------------------------------------- choice
@dataclass
class Chosen:
    """A cell of the table and the trial chosen for it."""

    cell: Cell
    run: Any  # the chosen MLflow trial run
    search: TableSearch  # the search that ran it
    trials: int  # the cell's usable trials, over every search
    label: str = ""  # unique short name: the re-runs' variant, MLflow metric suffix

    @property
    def backbone(self) -> str:
        return dict(self.cell)["backbone"]

    @property
    def regulariser(self) -> str:
        return dict(self.cell)["regulariser"]

    @property
    def variant(self) -> str:
        """The cell's other keys: ``estimator=kl`` (empty for a two-key cell)."""
        return ",".join(f"{short_key(k)}={v}" for k, v in self.cell
                        if k not in DEFAULT_CELL_KEYS)

    @property
    def row_name(self) -> str:
        return self.regulariser + (f" ({self.variant})" if self.variant else "")

    @property
    def value(self) -> float:
        return float(self.run.data.metrics[self.search.info.objective])

    def configuration(self) -> dict[str, Any]:
        """The chosen trial's searched keys (lr, weights ...), as its MLflow params: a key scoped
        to a regulariser (``regulariser.alpha@mird``) by the name the trial ran it under
        (``regulariser.alpha``), in its own regulariser's cells only."""
        params = self.run.data.params
        out = {}
        for key in self.search.searched_keys():
            base, scope = split_scope(key)
            if scope in (None, self.regulariser) and base in params:
                out[base] = params[base]
        return dict(sorted(out.items()))


def usable(run, objective: str) -> bool:
    return (finite(run.data.metrics.get(objective))
            and run.data.tags.get("status") not in NEVER_BEST)


def choose_cells(searches: list[TableSearch]) -> tuple[list[Chosen], list[str]]:
    """Each cell's best trial on validation among its own trials of every search (ties: the
    earlier trial). Returns the chosen cells in the table's order (backbones as the searches list
    them, ``none`` first in each block) and notes on cells without a usable trial."""
    info = searches[0].info
    sign = 1.0 if info.mode == "min" else -1.0
    objective = info.objective
    pool: dict[Cell, list[tuple[Any, TableSearch]]] = {}
    unusable: dict[Cell, int] = {}
    notes = []
    for s in searches:
        for run in sorted(s.info.trials, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
            try:
                cell = cell_of(run.data.params, s.cell_keys)
            except KeyError:
                notes.append(f"trial run {run.info.run_id} of search {s.name!r} has no "
                             "backbone/regulariser params; left out")
                continue
            if usable(run, objective):
                pool.setdefault(cell, []).append((run, s))
            else:
                unusable[cell] = unusable.get(cell, 0) + 1
    for cell in unusable:
        if cell not in pool:
            notes.append(f"cell {cell_label(cell)}: none of its {unusable[cell]} trials finished "
                         f"with a finite {objective} (diverged, errored or interrupted); no row")
    chosen = []
    for cell, runs in pool.items():
        run, search = min(runs, key=lambda rs: sign * rs[0].data.metrics[objective])
        chosen.append(Chosen(cell, run, search, len(runs)))
    order_b, order_r = [], []
    for s in searches:
        for b in s.space.get("backbones") or []:
            order_b.append(b) if b not in order_b else None
        for r in s.space.get("regularisers") or []:
            order_r.append(r) if r not in order_r else None

    def index(seq, value):
        return seq.index(value) if value in seq else len(seq)

    chosen.sort(key=lambda c: (index(order_b, c.backbone), c.backbone,
                               c.regulariser != BASELINE, index(order_r, c.regulariser),
                               c.regulariser, c.variant))
    labels: set[str] = set()
    for c in chosen:
        label = re.sub(r"[^A-Za-z0-9_.]+", "_", "-".join(v for _, v in c.cell))
        while label in labels:
            label += "_"
        labels.add(label)
        c.label = label
    return chosen, notes


def baseline_of(chosen: list[Chosen]) -> dict[str, Chosen]:
    """Each backbone's ``none`` cell."""
    return {c.backbone: c for c in chosen if c.regulariser == BASELINE}


# ---------------------------------------------------------------------------------- statistics
def cohen_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean x - mean y) / pooled sample standard deviation; NaN when it is undefined."""
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        return math.nan
    pooled = math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    return float((x.mean() - y.mean()) / pooled) if pooled > 0 else math.nan


def bootstrap_interval(samples: tuple[np.ndarray, ...], paired: bool,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval (scipy.stats.bootstrap, fixed seed) of the difference in
    means: of ``mean(d)`` for one paired sample of differences, else of ``mean(x) - mean(y)``
    with x and y re-sampled independently. NaN where a sample has fewer than 2 values."""
    from scipy.stats import bootstrap

    if any(len(s) < 2 for s in samples):
        return math.nan, math.nan
    if paired:
        def statistic(d, axis=-1):
            return np.mean(d, axis=axis)
    else:
        def statistic(x, y, axis=-1):
            return np.mean(x, axis=axis) - np.mean(y, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning for constant samples
        res = bootstrap(samples, statistic, n_resamples=BOOTSTRAP_RESAMPLES, vectorized=True,
                        confidence_level=level, method="percentile",
                        rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_t(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided paired t-test p-value (scipy.stats.ttest_rel); 1.0 when every pair is equal
    (no evidence of a difference; scipy gives NaN), NaN with fewer than 2 pairs."""
    from scipy.stats import ttest_rel

    if len(x) < 2:
        return math.nan
    if np.all(x == y):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note on constant d
        return float(ttest_rel(x, y).pvalue)


def compare(test: str, cell: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    """A cell's test values against its baseline's (seed -> value): the difference in means,
    the test's p-value, the effect size and the bootstrap interval of the difference.

    ``mann_whitney``: every finite value of each side, two-sided Mann-Whitney U
    (:func:`tuner.report.mann_whitney`), Cohen's d, independent re-samples. ``paired_t``: the
    seeds finite on both sides, paired by seed, scipy's ``ttest_rel``, d_z = mean(d) / sd(d),
    re-samples of the differences."""
    if test == "paired_t":
        seeds = [s for s in cell if s in base and finite(cell[s]) and finite(base[s])]
        x = np.array([cell[s] for s in seeds], dtype=float)
        y = np.array([base[s] for s in seeds], dtype=float)
        d = x - y
        p = paired_t(x, y)
        sd = d.std(ddof=1) if len(d) > 1 else math.nan
        effect = float(d.mean() / sd) if finite(sd) and sd > 0 else math.nan
        low, high = bootstrap_interval((d,), paired=True)
        kind = "cohen_dz"
    elif test == "mann_whitney":
        x = np.array([v for v in cell.values() if finite(v)], dtype=float)
        y = np.array([v for v in base.values() if finite(v)], dtype=float)
        p = mann_whitney(list(x), list(y))
        effect = cohen_d(x, y)
        low, high = bootstrap_interval((x, y), paired=False)
        kind = "cohen_d"
    else:
        raise UsageError(f"table.test {test!r}: expected one of {', '.join(TABLE_TESTS)}")
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    return {"diff_mean": diff, "p_value": p, "effect_size": effect, "effect_size_kind": kind,
            "ci_low": low, "ci_high": high}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down correction: the i-th smallest of m finite p-values becomes
    max_{j<=i} min(1, (m - j + 1) p_(j)); NaN stays NaN (not counted in m)."""
    order = sorted((i for i, p in enumerate(pvalues) if finite(p)), key=lambda i: pvalues[i])
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------- rows
def seed_values(reruns: list[Rerun], label: str, metric: str) -> dict[int, float]:
    return {r.seed: r.test.get(metric, math.nan) for r in reruns if r.variant == label}


def table_rows(chosen: list[Chosen], reruns: list[Rerun], metric: str) -> list[dict[str, Any]]:
    """``table.csv``: one row per cell (see docs/report.md for every column). ``metric`` is the
    compared test metric (``mae`` for a search that selects by ``valid_mae``)."""
    base = baseline_of(chosen)
    rows = []
    for c in chosen:
        row: dict[str, Any] = {
            "backbone": c.backbone, "regulariser": c.regulariser, "variant": c.variant,
            "cell": cell_tag(c.cell), "label": c.label, "search": c.search.name,
            "trial_run_id": c.run.info.run_id, "selection": c.search.info.objective,
            "selection_value": c.value, "cell_trials": c.trials,
            "configuration": json.dumps(c.configuration(), sort_keys=True),
            # MDM's W critic saturated (tuner.report.collapsed_note): that arm trained as the
            # baseline in these runs, so a "no effect" there says nothing about the penalty
            "chosen_collapsed": str(collapsed_note(c.run) is not None).lower(),
            "collapsed_reruns": sum(1 for r in reruns if r.variant == c.label and r.collapsed),
        }
        values = {m: [v for v in seed_values(reruns, c.label, m).values()] for m in REPORT_METRICS}
        row["n"] = mean_std(values[metric])[2]
        for m in REPORT_METRICS:
            mean, std, _ = mean_std(values[m])
            row[f"test_{m}_mean"], row[f"test_{m}_std"] = mean, std
        ref = base.get(c.backbone)
        row.update({"baseline": "", "test": "", "compared_metric": metric, "diff_mean": math.nan,
                    "p_value": math.nan, "p_holm": math.nan, "effect_size": math.nan,
                    "effect_size_kind": "", "ci_low": math.nan, "ci_high": math.nan,
                    "significant": ""})
        if c.regulariser != BASELINE and ref is not None:
            test = c.search.settings.test
            row.update(baseline=ref.label, test=test,
                       **compare(test, seed_values(reruns, c.label, metric),
                                 seed_values(reruns, ref.label, metric)))
        rows.append(row)
    adjusted = holm([r["p_value"] for r in rows])
    for row, c, p in zip(rows, chosen, adjusted):
        row["p_holm"] = p
        if finite(p):
            row["significant"] = str(p < c.search.settings.alpha).lower()
    return rows


def robustness_rows(chosen: list[Chosen], reruns: list[Rerun]) -> list[dict[str, Any]]:
    """Per cell, drop set and Acc-2 variant: the ratio Acc-2(drop) / Acc-2(full) (MDM) and the
    raw Acc-2(drop) (Synergy), mean and std over the seeds (as :func:`tuner.report.
    robustness_table`, per cell)."""
    rows = []
    for c in chosen:
        mine = [r for r in reruns if r.variant == c.label]
        for dropped in DROP_SETS:
            for metric in ROBUSTNESS_METRICS:
                row = {"label": c.label, "backbone": c.backbone, "regulariser": c.regulariser,
                       "variant": c.variant, "dropped": dropped, "kept": kept(dropped),
                       "metric": metric}
                for measure, value_of in (("ratio", robustness_ratio), ("acc2", dropped_metric)):
                    mean, std, n = mean_std([value_of(r, dropped, metric) for r in mine])
                    row.update({f"{measure}_mean": mean, f"{measure}_std": std,
                                f"{measure}_n": n})
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- papers
def load_paper_results(path: Path = PAPER_RESULTS) -> list[dict[str, Any]]:
    """The numbers the papers print for CMU-MOSI / CMU-MOSEI (``tuner/paper_results.csv``),
    values in our units (accuracies and F1 as fractions), each row checked
    (:func:`check_paper_row`): a bad row is one line naming the file, line and field."""
    with open(path, newline="") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if not line.startswith("#")]
    reader = csv.DictReader(line for _, line in lines)
    if tuple(reader.fieldnames or ()) != PAPER_COLUMNS:
        raise UsageError(f"{path}: expected the columns {','.join(PAPER_COLUMNS)}, got "
                         f"{','.join(reader.fieldnames or ()) or 'none'}")
    rows, seen = [], {}
    for r in reader:
        where = f"{path}: line {lines[reader.line_num - 1][0]}"
        check_paper_row(r, where)
        key = tuple(r[c] for c in PAPER_COLUMNS[:7])
        if key in seen:
            raise UsageError(f"{where}: the same paper, table, dataset, cell and metric as "
                             f"line {seen[key]}")
        seen[key] = lines[reader.line_num - 1][0]
        rows.append(r)
    return rows


def check_paper_row(r: dict[str, Any], where: str) -> None:
    """One row of ``paper_results.csv``: known names (a backbone and a regulariser of the
    project, a variant that a cell of that regulariser can have, a metric of the report), a
    value in its metric's range (:data:`PAPER_VALUE_RANGES`, converted to float in place) and a
    note. Raises :class:`UsageError` naming ``where`` and the field."""
    import typing

    from trainables.backbones import BACKBONES
    from trainables.regularisers import REGULARISERS, get_regulariser

    if any(r.get(c) is None for c in PAPER_COLUMNS):
        raise UsageError(f"{where}: expected {len(PAPER_COLUMNS)} fields")
    if not r["paper"] or not re.fullmatch(r"Table \d+", r["table"]):
        raise UsageError(f"{where}: paper, table: expected a paper's name and 'Table N', got "
                         f"{r['paper']!r}, {r['table']!r}")
    for field, known in (("dataset", DATASETS), ("backbone", BACKBONES),
                         ("regulariser", REGULARISERS), ("metric", REPORT_METRICS)):
        if r[field] not in known:
            raise UsageError(f"{where}: {field}: expected one of {', '.join(known)}, "
                             f"got {r[field]!r}")
    if r["variant"]:
        config = get_regulariser(r["regulariser"]).config_class
        hints = typing.get_type_hints(config)
        for item in r["variant"].split(","):
            key, eq, value = item.partition("=")
            allowed = typing.get_args(hints.get(key))
            if not eq or key not in hints or (allowed and value not in allowed):
                raise UsageError(
                    f"{where}: variant: {item!r} is not a {r['regulariser']} setting (expected "
                    f"key=value, a field of {config.__name__}"
                    + (f", {key} one of {', '.join(allowed)}" if allowed else "") + ")")
    try:
        value = float(r["value"])
    except ValueError:
        raise UsageError(f"{where}: value: expected a number, got {r['value']!r}") from None
    low, high = PAPER_VALUE_RANGES[r["dataset"], r["metric"]]
    if not low <= value <= high:
        raise UsageError(f"{where}: value: {r['metric']} on {r['dataset']} expected in "
                         f"[{low}, {high}] (accuracies and F1 as fractions), got {r['value']}")
    if not r["note"].strip():
        raise UsageError(f"{where}: note: expected the paper's name for the row and our mappings")
    r["value"] = value


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of our seeds (NaN with < 2 values)."""
    x = np.array([v for v in values if finite(v)], dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    return bootstrap_interval((x,), paired=True)


def paper_rows(chosen: list[Chosen], reruns: list[Rerun], dataset: str,
               papers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The papers' values for our cells on ``dataset``, beside our mean and its interval."""
    rows = []
    for c in chosen:
        for p in papers:
            if p["dataset"] != dataset or p["backbone"] != c.backbone \
                    or p["regulariser"] != c.regulariser or (p["variant"] or "") != c.variant:
                continue
            values = list(seed_values(reruns, c.label, p["metric"]).values())
            mean = mean_std(values)[0]
            low, high = mean_interval(values)
            inside = (str(low <= p["value"] <= high).lower() if finite(low) else "")
            rows.append({"label": c.label, "backbone": c.backbone, "row": c.row_name,
                         "metric": p["metric"], "paper": p["paper"], "table": p["table"],
                         "paper_value": p["value"], "ours_mean": mean, "ours_low": low,
                         "ours_high": high, "inside": inside})
    return rows


# ---------------------------------------------------------------------------------- output
def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}" if finite(mean) else "–"


def _marks(row: dict[str, Any], alpha: float) -> str:
    if row["significant"] == "true":
        return " *"
    if finite(row["p_value"]) and row["p_value"] < alpha:
        return " †"
    return ""


def markdown(rows: list[dict[str, Any]], chosen: list[Chosen], robust: list[dict[str, Any]],
             papers: list[dict[str, Any]], *, title: str, header: list[str], dataset: str | None,
             metric: str, mode: str, notes: list[str], reruns: list[Rerun]) -> str:
    alpha = chosen[0].search.settings.alpha if chosen else 0.05
    lines = [f"# {title}", "", *header, "",
             f"Each row is a cell's own best trial on validation, re-trained once per seed; "
             "test metrics as mean ± sample std over the seeds. "
             f"Δ {METRIC_TITLES.get(metric, metric)} is the row minus its backbone's `{BASELINE}` row (lower is "
             f"{'better' if mode == 'min' else 'worse'}), with a percentile-bootstrap 95% "
             f"interval; p: the row's test against `{BASELINE}` (MW: two-sided Mann–Whitney U; "
             f"t: paired t-test over seeds), p_Holm: Holm's correction over the table's "
             f"{sum(finite(r['p_value']) for r in rows)} comparisons; d: Cohen's d (d_z, paired). "
             f"`*`: p_Holm < {alpha:g}; `†`: p < {alpha:g} before the correction only. "
             "Files: [table.csv](table.csv), [robustness.csv](robustness.csv), "
             "[runs.csv](runs.csv).", ""]
    cols = ["row", "configuration", "n", *(METRIC_TITLES[m] for m in REPORT_METRICS),
            f"Δ {METRIC_TITLES.get(metric, metric)} [95% CI]", "p", "p_Holm", "d"]
    by_label = {c.label: c for c in chosen}
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        lines += [f"### {backbone}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in (r for r in rows if r["backbone"] == backbone):
            config = ", ".join(f"{short_key(k)}={v}"
                               for k, v in json.loads(r["configuration"]).items())
            test = {"mann_whitney": "MW", "paired_t": "t"}.get(r["test"], "")
            collapsed = r["collapsed_reruns"] or r["chosen_collapsed"] == "true"
            cells = [by_label[r["label"]].row_name + (" ⚠" if collapsed else ""), config or "–",
                     str(r["n"])]
            cells += [_pm(r[f"test_{m}_mean"], r[f"test_{m}_std"]) for m in REPORT_METRICS]
            if r["regulariser"] == BASELINE:
                cells += ["(baseline)", "", "", ""]
            else:
                cells += [f"{_fmt(r['diff_mean'], 3)} [{_fmt(r['ci_low'], 3)}, "
                          f"{_fmt(r['ci_high'], 3)}]{_marks(r, alpha)}",
                          f"{_fmt(r['p_value'], 3)} ({test})" if test else "no baseline",
                          _fmt(r["p_holm"], 3), _fmt(r["effect_size"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![Δ vs baseline](table_heatmap.png)", ""]
    lines += ["## The papers' numbers", ""]
    if dataset is None:
        lines += ["Not shown: the data is not CMU-MOSI or CMU-MOSEI (pass `--dataset mosi` or "
                  "`--dataset mosei` when it is). The papers' values (`tuner/paper_results.csv`) "
                  "describe those data sets; beside synthetic or other data they would compare "
                  "unlike with unlike.", ""]
    elif not papers:
        lines += [f"No paper prints a value for these cells on CMU-{dataset.upper()}.", ""]
    else:
        lines += [f"CMU-{dataset.upper()}: the paper's value beside our mean and the "
                  "percentile-bootstrap 95% interval of our mean over the seeds.", "",
                  "| backbone | row | metric | paper (table) | paper | ours | ours 95% | inside |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in papers:
            lines.append(f"| {p['backbone']} | {p['row']} | {METRIC_TITLES[p['metric']]} | "
                         f"{p['paper']} ({p['table']}) | {_fmt(p['paper_value'], 3)} | "
                         f"{_fmt(p['ours_mean'], 3)} | [{_fmt(p['ours_low'], 3)}, "
                         f"{_fmt(p['ours_high'], 3)}] | {p['inside'] or '–'} |")
        lines.append("")
    lines += ["## Modality-drop robustness", "",
              "Acc-2 (has0) with a set of modalities removed at test time, over Acc-2 on the full "
              "test set (MDM, Sec. 5.3), per cell: mean ± std over the seeds. Raw Acc-2(drop) "
              "(Synergy, Table 4) and the non0 variant: [robustness.csv](robustness.csv).", "",
              "| backbone | row | " + " | ".join(f"drop {d}" for d in DROP_SETS) + " |",
              "|---|---|" + "---|" * len(DROP_SETS)]
    for c in chosen:
        sel = {r["dropped"]: r for r in robust if r["label"] == c.label
               and r["metric"] == "acc2_has0"}
        lines.append(f"| {c.backbone} | {c.row_name} | "
                     + " | ".join(_pm(sel[d]["ratio_mean"], sel[d]["ratio_std"])
                                  for d in DROP_SETS) + " |")
    lines += ["", "## Chosen trials", "",
              "| backbone | row | search | trial run | selection value | cell's trials |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {by_label[r['label']].row_name} | {r['search']} | "
                     f"`{r['trial_run_id']}` | {_fmt(r['selection_value'])} | {r['cell_trials']} |")
    failed = [r for r in reruns if not r.test]
    lines += ["", f"Re-runs: {len(reruns)} ({len(failed)} without test metrics)."]
    notes = list(notes) + [
        f"⚠ {r['backbone']} {by_label[r['label']].row_name}: the critic collapsed (its output "
        f"constant over an epoch, so the estimate was 0 and the penalty gave no gradient) in "
        f"{r['collapsed_reruns']} of {r['n']} re-runs"
        + (" and in the chosen trial" if r["chosen_collapsed"] == "true" else "")
        + "; where the modalities are dependent this arm trained as its baseline"
        for r in rows if r["collapsed_reruns"] or r["chosen_collapsed"] == "true"]
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


@_in_default_style
def plot_heatmap(rows: list[dict[str, Any]], chosen: list[Chosen], metric: str, mode: str,
                 out: Path) -> Path:
    """Backbones x regulariser variants: the change of the compared test metric against the
    backbone's ``none`` cell, significant cells marked (* Holm, † uncorrected)."""
    plt = _pyplot()
    alpha = chosen[0].search.settings.alpha if chosen else 0.05
    by_label = {c.label: c for c in chosen}
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    columns = list(dict.fromkeys(by_label[r["label"]].row_name for r in rows
                                 if r["regulariser"] != BASELINE))
    grid = np.full((len(backbones), max(len(columns), 1)), np.nan)
    marks = {}
    for r in rows:
        if r["regulariser"] == BASELINE:
            continue
        i, j = backbones.index(r["backbone"]), columns.index(by_label[r["label"]].row_name)
        grid[i, j] = r["diff_mean"]
        marks[i, j] = _marks(r, alpha).strip()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.5 * len(columns)),
                                    1.8 + 0.6 * len(backbones)))
    finite_values = grid[np.isfinite(grid)]
    bound = float(np.abs(finite_values).max()) if finite_values.size else 1.0
    # better = blue: for a metric minimised (MAE) a negative change is better
    cmap = "RdBu_r" if mode == "min" else "RdBu"
    image = ax.imshow(grid, cmap=cmap, vmin=-bound or -1, vmax=bound or 1, aspect="auto")
    for (i, j), mark in marks.items():
        value = grid[i, j]
        dark = np.isfinite(value) and abs(value) > 0.6 * bound
        ax.text(j, i, ("nan" if not np.isfinite(value) else f"{value:+.3f}") + mark,
                ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(backbones)), backbones)
    title = METRIC_TITLES.get(metric, metric)
    ax.set_title(f"Δ test {title} against none\n({'lower' if mode == 'min' else 'higher'} is "
                 f"better; * Holm p < {alpha:g}, † p < {alpha:g})", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"Δ {title}")
    fig.tight_layout()
    path = out / "table_heatmap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- CLI
def _seeds(args, searches: list[TableSearch]) -> list[int]:
    if args.seeds is not None:
        return parse_seeds(args.seeds)
    first = searches[0]
    return parse_seeds(first.space.get("seeds") or list(range(10)),
                       f"search {first.name!r}: its space's seeds")


def check_args(args: argparse.Namespace) -> None:
    if args.run_id:
        raise UsageError("--table: name the searches with --experiment and --search "
                         "(--run-id is the single-pair report's)")
    if args.regulariser:
        raise UsageError("--table: every regulariser is a row; --regulariser is the single-pair "
                         "report's")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UsageError(f"--max-epochs: expected a value >= 1, got {args.max_epochs}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise UsageError("--cpus-per-trial must be > 0, --gpus-per-trial and --max-concurrent >= 0")


def open_searches(client, args: argparse.Namespace) -> list[TableSearch]:
    names = args.search or [None]
    searches = [load_table_search(client, find_named_search(client, args.experiment, n))
                for n in names]
    for s in searches:
        warning = check_search_selection(s.info)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    check_mergeable(searches)
    return searches


def rerun_configs(chosen: list[Chosen], max_epochs: int | None) -> dict[str, dict[str, Any]]:
    variants = {}
    for c in chosen:
        config = trial_config(c.run)
        if max_epochs is not None:
            config["max_epochs"] = max_epochs
        variants[c.label] = config
    return variants


def dry_run(args: argparse.Namespace, tracking_uri: str) -> int:
    """``--table --dry-run``: the cells, the chosen trials (where the search exists), the
    re-runs (cells x seeds) and their trial-epochs; nothing is trained or written."""
    from mlflow.tracking import MlflowClient

    check_args(args)
    store = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None
    searches = []
    if store is None or Path(store).exists():
        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            searches = open_searches(client, args)
        except UsageError as exc:
            if args.search:  # a named search must exist
                raise
            print(f"({exc}: the table of the space's plan instead)")
    if searches:
        chosen, notes = choose_cells(searches)
        seeds = _seeds(args, searches)
        variants = rerun_configs(chosen, args.max_epochs)
        spent = sum(int(r.data.metrics.get("epoch", 0) or 0) for s in searches
                    for r in s.info.trials)
        trials = sum(len(s.info.trials) for s in searches)
        print(f"Table of {', '.join(repr(s.name) for s in searches)}: {trials} trials "
              f"({spent} trial-epochs spent), {len(chosen)} cells")
        rows = [{"cell": cell_label(c.cell), "trials": c.trials, "chosen": c.run.info.run_id,
                 c.search.info.objective: c.value, "max_epochs": variants[c.label]["max_epochs"],
                 "test": c.search.settings.test if c.regulariser != BASELINE else "baseline"}
                for c in chosen]
        print(plain_table(rows))
        epochs = sum(v["max_epochs"] for v in variants.values()) * len(seeds)
        print(f"Re-runs: {len(chosen)} cells x {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
              f"= {len(chosen) * len(seeds)} runs, at most {epochs} trial-epochs")
        for note in notes:
            print(f"note: {note}")
        return 0
    from tuner.spaces import SpaceError, load_space

    if not args.experiment:
        raise UsageError("--table --dry-run: name the space with --experiment")
    try:
        space = load_space(args.experiment)
    except SpaceError as exc:
        raise UsageError(f"--experiment {args.experiment}: no search in the MLflow store and "
                         f"not a space ({exc})") from None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else parse_seeds(space.seeds)
    sampler = space.search.sampler
    grid = space.grid_points()
    trials = len(grid) if sampler == "grid" else space.search.num_samples
    cells = space.cells_of_space(sampler)
    per_cell = {c: 0 for c in space.cells_of_space("grid")}
    for point in grid:
        per_cell[space.cell(point)] = per_cell.get(space.cell(point), 0) + 1
    max_epochs = args.max_epochs or space.search.max_epochs
    print(f"Space {space.name!r} (no search of it yet in {tracking_uri}): the search runs "
          f"{trials} trials ({sampler} sampler; the grid has {len(grid)} points) of up to "
          f"{space.search.max_epochs} epochs, at most {trials * space.search.max_epochs} "
          f"trial-epochs; {len(cells)} cells")
    print(plain_table([{"cell": cell_label(c), "grid points": per_cell.get(c, 0),
                        "test": space.table.test if dict(c)["regulariser"] != BASELINE
                        else "baseline"} for c in cells]))
    print(f"Then the table re-runs {len(cells)} cells x {len(seeds)} seeds = "
          f"{len(cells) * len(seeds)} runs, at most {len(cells) * len(seeds) * max_epochs} "
          f"trial-epochs")
    return 0


def run_table(args: argparse.Namespace, command: str) -> int:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from tuner.preflight import check_address, check_tracking_uri
    from tuner.tracking import DEFAULT_TRACKING_URI, absolute_sqlite_uri, format_environment

    check_tracking_uri(args.mlflow_uri)
    tracking_uri = absolute_sqlite_uri(args.mlflow_uri or DEFAULT_TRACKING_URI)
    if args.dry_run:
        return dry_run(args, tracking_uri)
    check_args(args)
    check_address(args.address)
    if args.seeds is not None:
        parse_seeds(args.seeds)  # a bad flag before MLflow is read
    paper_values = load_paper_results() if args.dataset else []  # a bad row before any re-run
    client = MlflowClient(tracking_uri=tracking_uri)
    searches = open_searches(client, args)
    seeds = _seeds(args, searches)
    chosen, notes = choose_cells(searches)
    if not chosen:
        raise UsageError(f"search(es) {', '.join(s.name for s in searches)}: no cell has a trial "
                         f"with a finite {searches[0].info.objective}")
    first = searches[0].info
    metric = first.metric[len("valid_"):]
    for c in chosen:
        if c.regulariser != BASELINE and c.backbone not in baseline_of(chosen):
            notes.append(f"{cell_label(c.cell)}: no {BASELINE} cell of {c.backbone} in the "
                         "searches; no test for it")
    for s in searches:
        if s.settings_note != "its space":
            notes.append(f"search {s.name!r}: test {s.settings.test} from {s.settings_note}")
    variants = rerun_configs(chosen, args.max_epochs)
    data = load_search_data(client, first, args.data, args.nonfinite, args.unlabeled)
    name, out = output_dir(args, "table", first.name)
    print(f"Table {name!r} of {', '.join(repr(s.name) for s in searches)}: {len(chosen)} cells, "
          f"each its own best trial by {first.objective} ({first.mode}); re-training each with "
          f"seeds {', '.join(map(str, seeds))} ({len(chosen) * len(seeds)} runs).", flush=True)

    tracker, table_run = start_driver_run(
        client, tracking_uri, first, name=name, kind="table",
        tags={"table_of": ",".join(s.name for s in searches), "command": command},
        data=data, unlabeled=args.unlabeled)
    client.log_batch(table_run, params=[
        Param("seeds", ",".join(map(str, seeds))), Param("objective", first.objective),
        Param("cells", str(len(chosen))), Param("dataset", args.dataset or "other"),
        Param("searches", ",".join(s.name for s in searches))])
    try:
        reruns = run_reruns(variants, seeds, data, tracker, args, name)
        probe_reruns(reruns, data, client)
    except BaseException:
        client.set_terminated(table_run, status="KILLED")
        raise
    by_label = {c.label: c for c in chosen}
    for r in reruns:
        if r.run_id and r.variant in by_label:
            client.set_tag(r.run_id, "cell", cell_tag(by_label[r.variant].cell))

    rows = table_rows(chosen, reruns, metric)
    robust = robustness_rows(chosen, reruns)
    papers = paper_rows(chosen, reruns, args.dataset, paper_values) if args.dataset else []
    write_csv(rows, out / "table.csv")
    write_csv(robust, out / "robustness.csv")
    write_csv(papers, out / "paper_values.csv")
    write_csv([{"label": r.variant, "seed": r.seed, "status": r.status, "run_id": r.run_id,
                **{f"test_{m}": r.test.get(m, math.nan) for m in REPORT_METRICS}}
               for r in reruns], out / "runs.csv")
    plot_heatmap(rows, chosen, metric, first.mode, out)
    header = ["- Searches: " + ", ".join(f"`{s.name}` (experiment `{s.info.experiment_name}`, "
                                          f"cells {list(s.cell_keys)}, test {s.settings.test})"
                                          for s in searches),
              f"- Table run `{table_run}`; data `{data.source}`, sha256 `{data.digest}`",
              f"- Selection: each cell's best `{first.objective}` ({first.mode}) among its own "
              "trials (validation only; never a diverged, errored or interrupted trial)",
              f"- Seeds: {', '.join(map(str, seeds))}", f"- Command: `{command}`",
              f"- Environment: {format_environment(client.get_run(table_run).data.tags)}"]
    (out / "table.md").write_text(markdown(
        rows, chosen, robust, papers, title=f"Table {name}", header=header, dataset=args.dataset,
        metric=metric, mode=first.mode, notes=notes, reruns=reruns))

    now = int(time.time() * 1000)
    summary = []
    for row in rows:
        for m in REPORT_METRICS:
            summary += [Metric(f"test_{m}_mean_{row['label']}", row[f"test_{m}_mean"], now, 0),
                        Metric(f"test_{m}_std_{row['label']}", row[f"test_{m}_std"], now, 0)]
        for key in ("p_value", "p_holm", "effect_size", "diff_mean"):
            summary.append(Metric(f"{key}_{row['label']}", row[key], now, 0))
    summary = [m for m in summary if finite(m.value)]
    for start in range(0, len(summary), 1000):
        client.log_batch(table_run, metrics=summary[start:start + 1000])
    client.log_artifacts(table_run, str(out))
    for s in searches:
        client.log_artifacts(s.info.parent.info.run_id, str(out), f"table/{name}")
    failed = [r for r in reruns if not r.test]
    client.set_terminated(table_run, status="FINISHED" if not failed else "FAILED")

    print("\n" + "=" * 72)
    print_environment_and_cost(client, [s.info for s in searches], table_run, reruns)
    print(plain_table([{"backbone": r["backbone"], "row": by_label[r["label"]].row_name,
                        "n": r["n"], f"test_{metric}": r[f"test_{metric}_mean"],
                        "diff": r["diff_mean"], "p": r["p_value"], "p_holm": r["p_holm"]}
                       for r in rows]))
    for note in notes:
        print(f"note: {note}")
    if failed:
        print(f"warning: {len(failed)} re-run(s) ended without test metrics: "
              + ", ".join(f"{r.variant}/seed {r.seed} ({r.status})" for r in failed),
              file=sys.stderr)
    print(f"\nTable: {out / 'table.md'} (also artifacts of MLflow run {table_run})")
    return 0 if not failed else 1
