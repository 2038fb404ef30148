"""Keys scoped to one regulariser (``regulariser.alpha@mird``): each regulariser's weights on its
own grid in one space (the ``leaderboard`` space), routed to that regulariser's trials only."""

import types

import optuna
import pytest
import yaml

from trainables.config import ConfigError, TrialConfig
from tuner.pruning import cell_search
from tuner.preflight import UsageError
from tuner.search import check_unlabeled, main
from tuner.spaces import (MAX_GRID_POINTS, SearchSpace, SpaceError, TableSettings,
                          apply_overrides, cell_label, cell_of, space_from_dict)
from tuner.table import Chosen, TableSearch

#: MMIM's and MIRD's α on their papers' grids (different lists: one Optuna name could not hold
#: both), MMIM's β, MDM's λ as ``weight``, and a fixed key scoped to MIRD
RAW = {
    "name": "scoped", "backbones": ["tfn"], "regularisers": ["none", "mmim", "mird", "mdm"],
    "grid": {"lr": [0.001, 0.0005],
             "regulariser.alpha@mmim": [0.05, 0.1, 0.3],
             "regulariser.beta@mmim": [0.05, 0.1, 0.3],
             "regulariser.alpha@mird": [0.01, 0.1, 1.0, 10.0],
             "regulariser.weight@mdm": [1.0, 0.01]},
    "ranges": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
               "regulariser.alpha@mmim": {"low": 0.01, "high": 0.5, "log": True},
               "regulariser.alpha@mird": [0.01, 0.1, 1.0, 10.0]},
    "fixed": {"regulariser.inner_steps@mird": 3, "regulariser.unroll": 2},
    "search": {"sampler": "grid", "pruner": "none", "max_epochs": 1},
}


def scoped(**changes) -> SearchSpace:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return space_from_dict(raw, "scoped.yaml")


def test_from_flat_gives_a_scoped_key_to_its_own_regulariser_only():
    flat = {"backbone": "tfn", "regulariser.alpha@mmim": 0.3, "regulariser.beta@mmim": 0.05,
            "regulariser.alpha@mird": 10.0, "regulariser.weight@mdm": 0.01}
    assert TrialConfig.from_flat({**flat, "regulariser": "mird"}).regulariser_cfg.alpha == 10.0
    mmim = TrialConfig.from_flat({**flat, "regulariser": "mmim"})
    assert (mmim.regulariser_cfg.alpha, mmim.regulariser_cfg.beta) == (0.3, 0.05)
    assert TrialConfig.from_flat({**flat, "regulariser": "mdm"}).regulariser_cfg.weight == 0.01
    none = TrialConfig.from_flat({**flat, "regulariser": "none"}).to_flat()
    assert not any(k.startswith("regulariser.") for k in none)
    # what MLflow logs: the field as the trial ran it
    assert TrialConfig.from_flat({**flat, "regulariser": "mird"}).to_flat()["regulariser.alpha"] == 10.0
    for bad, message in [
        ({"regulariser.alpha@mirdd": 1.0}, "'regulariser.alpha@mirdd': unknown regulariser 'mirdd'"),
        ({"regulariser.estimator@mird": "kl"}, "regulariser 'mird' has no field 'estimator'"),
        ({"backbone.hidden@mird": 8}, "only regulariser fields and unlabeled_rate, unlabeled_source take"),
        ({"regulariser.alpha@mird": 1.0, "regulariser.alpha": 2.0}, "both set 'regulariser.alpha'"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            TrialConfig.from_flat({"backbone": "tfn", "regulariser": "mird", **bad})


def test_a_scoped_key_applies_to_its_regulariser_and_counts_only_there():
    assert SearchSpace.applies("regulariser.alpha@mird", "tfn", "mird")
    assert not SearchSpace.applies("regulariser.alpha@mird", "tfn", "mmim")
    assert not SearchSpace.applies("regulariser.alpha@mird", "tfn", "none")
    assert SearchSpace.applies("regulariser.alpha", "tfn", "mmim")  # unscoped: every reader
    space = scoped()
    # none: 2 lr; mmim: 2 x 3 α x 3 β; mird: 2 x 4 α; mdm: 2 x 2 λ (not x mird's or mmim's grid)
    assert space.grid_size() == 2 + 2 * 3 * 3 + 2 * 4 + 2 * 2
    points = space.grid_points()
    assert len(points) == space.grid_size()
    by_reg = {r: [p for p in points if p["regulariser"] == r] for r in space.regularisers}
    assert [sorted(p) for p in by_reg["none"]] == [["backbone", "lr", "regulariser"]] * 2
    assert {p["regulariser.alpha@mird"] for p in by_reg["mird"]} == {0.01, 0.1, 1.0, 10.0}
    assert all("regulariser.alpha@mmim" not in p for p in by_reg["mird"])
    assert space.constants("tfn", "mird", 1, 0)["regulariser.inner_steps@mird"] == 3
    assert "regulariser.inner_steps@mird" not in space.constants("tfn", "mmim", 1, 0)
    # a start point may name a scoped key: the grid runs that point first, in the mird cell
    space = scoped(start_points=[{"regulariser": "mird", "regulariser.alpha@mird": 10.0}])
    assert space.grid_points()[0] == {"backbone": "tfn", "regulariser": "mird", "lr": 0.001,
                                      "regulariser.alpha@mird": 10.0}
    assert cell_label(space.first_points()[0][0]) == "tfn + mird"
    # a trial key a regulariser reads: MIRD's split rate for mird's points only (unscoped, it
    # would multiply mmim's and mdm's too), and the pre-flight sees it
    space = scoped(grid={"unlabeled_rate@mird": [0, 1, 2]})
    assert space.grid_size() == 2 + 2 * 3 * 3 + 2 * 4 * 3 + 2 * 2 == len(space.grid_points())
    assert TrialConfig.from_flat({"backbone": "tfn", "regulariser": "mird",
                                  "unlabeled_rate@mird": 2}).unlabeled_rate == 2
    with pytest.raises(UsageError, match="unlabeled_rate up to 2 .* needs unlabeled data"):
        check_unlabeled(space, types.SimpleNamespace(unlabeled=None, source="data.pkl"))


def test_a_scoped_grid_is_counted_per_regulariser_without_building_it(monkeypatch):
    """Under the grid sampler's limit (MAX_GRID_POINTS) only because MIRD's 50 values do not
    multiply MMIM's 50 x 50 (nor the baseline's): 2 + 2 x 50 x 50 + 2 x 50 points."""
    values = [round(0.01 * (i + 1), 2) for i in range(50)]
    raw = {"name": "big", "backbones": ["tfn"], "regularisers": ["none", "mmim", "mird"],
           "grid": {"lr": [0.001, 0.002], "regulariser.alpha@mmim": values,
                    "regulariser.beta@mmim": values, "regulariser.alpha@mird": values}}
    with monkeypatch.context() as patch:
        patch.setattr(SearchSpace, "_grid_points", lambda self: pytest.fail("grid built"))
        space = space_from_dict({**raw, "search": {"sampler": "tpe"}}, "big.yaml")
        assert space.grid_size() == 2 + 2 * 50 * 50 + 2 * 50 <= MAX_GRID_POINTS
    space = space_from_dict({**raw, "search": {"sampler": "grid"}}, "big.yaml")  # not refused
    assert len(space.grid_points()) == space.grid_size()


def test_each_regulariser_gets_its_own_optuna_parameter_and_config():
    """A grid search over the scoped space through the real searcher: every point runs, MMIM's
    and MIRD's α are two Optuna parameters (one name with two lists of choices is an error in
    Optuna), and each trial's config builds with its own regulariser's values."""
    space = scoped()
    searcher, trials = cell_search(space, "scoped", optuna.storages.InMemoryStorage())
    assert trials == space.grid_size()
    seen = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {space.objective: 1.0})
        reg = config["regulariser"]
        cfg = TrialConfig.from_flat(config).regulariser_cfg
        if reg in ("mmim", "mird"):
            assert cfg.alpha == config[f"regulariser.alpha@{reg}"]
        if reg == "mird":
            assert cfg.inner_steps == 3
        if reg == "mdm":
            assert cfg.weight == config["regulariser.weight@mdm"] and cfg.unroll == 2
        seen.append(tuple(sorted((k, v) for k, v in config.items()
                                 if k in ("regulariser", "lr") or k.startswith("regulariser."))))
    assert len(set(seen)) == trials  # the whole grid, each point once
    params = {reg: set() for reg in space.regularisers}
    for trial in searcher.study.trials:
        params[trial.params["regulariser"]] |= set(trial.params)
    assert params["mird"] == {"backbone", "regulariser", "lr", "regulariser.alpha@mird"}
    assert params["mmim"] == {"backbone", "regulariser", "lr", "regulariser.alpha@mmim",
                              "regulariser.beta@mmim"}
    # TPE (ranges): each regulariser's own range or list, under its own name
    space = scoped(search={"sampler": "tpe", "pruner": "none", "trials_per_cell": 1, "max_epochs": 1})
    fixed = optuna.trial.FixedTrial({"backbone": "tfn", "regulariser": "mird", "lr": 1e-3,
                                     "regulariser.alpha@mird": 10.0})
    space.define_by_run("tpe", 1, 0)(fixed)  # FixedTrial raises on a name it was not given


def test_the_cell_and_the_table_show_the_field_by_its_name():
    config = {"backbone": "tfn", "regulariser": "mdm", "regulariser.estimator@mdm": "kl"}
    logged = {"backbone": "tfn", "regulariser": "mdm", "regulariser.estimator": "kl"}
    keys = ["backbone", "regulariser", "regulariser.estimator@mdm"]
    assert cell_of(config, keys) == cell_of(logged, keys) == (
        ("backbone", "tfn"), ("regulariser", "mdm"), ("regulariser.estimator", "kl"))
    assert cell_of({"backbone": "tfn", "regulariser": "none"}, keys) == (
        ("backbone", "tfn"), ("regulariser", "none"))
    assert cell_label(cell_of(config, keys)) == "tfn + mdm (estimator=kl)"
    space = scoped(grid={"regulariser.estimator@mdm": ["kl", "w"]}, cells=keys)
    assert [cell_label(c) for c in space.cells_of_space()] == [
        "tfn + none", "tfn + mmim", "tfn + mird", "tfn + mdm (estimator=kl)",
        "tfn + mdm (estimator=w)"]
    # the table's configuration column: the chosen trial's own regulariser's keys, by their names
    search = TableSearch(info=None, cell_keys=("backbone", "regulariser"),
                         settings=TableSettings(), space=RAW)
    params = {"backbone": "tfn", "regulariser": "mird", "lr": "0.001", "regulariser.alpha": "1.0",
              "regulariser.beta": "0.1"}
    chosen = Chosen((("backbone", "tfn"), ("regulariser", "mird")),
                    types.SimpleNamespace(data=types.SimpleNamespace(params=params)), search, 1)
    assert chosen.configuration() == {"lr": "0.001", "regulariser.alpha": "1.0"}


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"regulariser.alpha@mirdd": [1.0]}},
     "scoped.yaml: grid.regulariser.alpha@mirdd: 'regulariser.alpha@mirdd': unknown regulariser "
     "'mirdd' after '@'"),
    ({"fixed": {"regulariser.estimator@mird": "kl"}},
     "scoped.yaml: fixed.regulariser.estimator@mird: 'regulariser.estimator@mird': regulariser "
     "'mird' has no field 'estimator'; its fields: alpha, "),
    ({"ranges": {"regulariser.beta@synergy": [0.1]}},
     "scoped.yaml: ranges.regulariser.beta@synergy: regulariser 'synergy' is not in this space "
     "(none, mmim, mird, mdm)"),
    ({"fixed": {"regulariser.alpha": 0.1}},
     "scoped.yaml: grid.regulariser.alpha@mird: fixed.regulariser.alpha sets the same key of "
     "'mird' trials; give one of them"),
    ({"grid": {"lr@mird": [0.1]}}, "scoped.yaml: grid.lr@mird: 'lr@mird': only regulariser fields"),
    ({"grid": {"unlabeled_rate@none": [1]}},
     "scoped.yaml: grid.unlabeled_rate@none: 'unlabeled_rate@none': regulariser 'none' does not "
     "read unlabeled_rate"),
    ({"cells": ["backbone", "regulariser", "regulariser.estimator@mmim"]},
     "scoped.yaml: cells.regulariser.estimator@mmim: 'regulariser.estimator@mmim': regulariser "
     "'mmim' has no field 'estimator'"),
])
def test_a_bad_scoped_key_is_one_line_naming_the_file_and_key(changes, message):
    with pytest.raises(SpaceError) as err:
        scoped(**changes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_leaderboard_dry_run_and_a_scoped_override(capsys):
    """The shipped leaderboard: 36 cells; the grid has 528 points, each regulariser on its own
    paper's grid; --set changes one regulariser's grid only."""
    assert main(["--space", "leaderboard", "--sampler", "grid", "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["grid_size"] == plan["trials"] == 4 * (4 + 48 + 36 + 16 + 24 + 4)
    cells = plan["cells"]
    assert len(cells) == 36 and sum(cells.values()) == 528
    assert (cells["tfn + none"], cells["tfn + mdm (estimator=kl)"], cells["tfn + mmim"],
            cells["tfn + mird"], cells["tfn + synergy (divergence=kl)"],
            cells["tfn + orthogonal"]) == (4, 16, 36, 16, 12, 4)
    assert main(["--space", "leaderboard", "--sampler", "grid", "--dry-run",
                 "--set", "grid.regulariser.alpha@mird=[0.1]"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["cells"]["tfn + mird"] == 4 and plan["cells"]["tfn + mmim"] == 36
    assert plan["grid_size"] == 528 - 4 * 12
    assert main(["--space", "leaderboard", "--dry-run"]) == 0  # the space's own: TPE, 6 a cell
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["trials"] == 36 * 6 and plan["trial_epochs_at_most"] == 36 * 6 * 30
    with pytest.raises(SpaceError, match="--set|grid.regulariser.alpha@mirdd"):
        apply_overrides(scoped(), ["grid.regulariser.alpha@mirdd=[0.1]"])
