"""Search spaces: YAML validation (one line naming file and key) and the Optuna space."""

import re
import dataclasses

import optuna
import pytest
import yaml

from tuner.spaces import SpaceError, apply_overrides, load_space, narrow, space_from_dict, space_path

BASE = {
    "name": "t",
    "backbones": ["ef_lstm", "tfn"],
    "regularisers": ["none", "mdm"],
    "grid": {"lr": [0.001, 0.002], "regulariser.weight": [0.1, 1.0]},
    "ranges": {"lr": {"low": 1e-4, "high": 1e-2, "log": True},
               "regulariser.estimator": ["kl", "f", "w"]},
    "fixed": {"batch_size": 16},
    "search": {"num_samples": 3, "max_epochs": 2},
}


def write(tmp_path, raw, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_shipped_space_loads():
    for name in ["smoke", "mdm", "mmim", "mird", "synergy", "leaderboard"]:
        space = load_space(name)
        assert space.name == name
        assert space.backbones and space.regularisers


@pytest.mark.parametrize("name, expected", [
    # 6 backbones x (none: 4 lr + mdm: 4 lr x 4 λ x 3 estimators)
    ("mdm", 6 * (4 + 4 * 4 * 3)),
    # none: 2 batch x 3 lr x 2 d_ah x 2 d_vh; mmim: 2 x 3 x 2 lr_lld x 3 α x 3 β x 2 d_ah x 2 d_vh
    # x 3 memory
    ("mmim", 2 * 3 * 2 * 2 + 2 * 3 * 2 * 3 * 3 * 2 * 2 * 3),
    # mird: 4 α x 6 split rates; orthogonal: 6 split rates; none reads no unlabeled row: 1
    ("mird", 4 * 6 + 6 + 1),
    # 6 backbones x (none: 2 batch x 5 lr + synergy: 2 x 5 x 3 β x 2 divergences, MMD and KL)
    ("synergy", 6 * (2 * 5 + 2 * 5 * 3 * 2)),
    # 4 backbones x (none: 4 lr; mdm: 4 lr x 4 λ x 3 estimators; mmim: 4 x 3 α x 3 β; mird: 4 x
    # 4 α; synergy: 4 x 3 β x 2 divergences; orthogonal: 4 lr), each weight on its own paper's grid
    ("leaderboard", 4 * (4 + 4 * 4 * 3 + 4 * 3 * 3 + 4 * 4 + 4 * 3 * 2 + 4)),
])
def test_paper_grids_have_the_papers_size(name, expected):
    space = load_space(name)
    points = space.grid_points()
    assert len(points) == expected
    assert len({tuple(sorted(p.items())) for p in points}) == expected  # no duplicates
    for point in points[:: max(1, len(points) // 25)]:  # a sample builds into trial configs
        space.trial_config({**point, **space.constants(point["backbone"], point["regulariser"],
                                                       space.search.max_epochs, 0)})


def test_mird_grid_runs_the_baseline_once_per_other_combination():
    """The split rate s changes nothing for ``none`` (no term reads unlabeled rows): one `none`
    point per backbone x lr, however many split rates; the regularisers that read them get all."""
    from tuner.spaces import space_path

    raw = yaml.safe_load(space_path("mird").read_text())
    raw["fixed"].pop("lr")
    raw["grid"]["lr"] = [1e-5, 1e-4, 1e-3]
    space = space_from_dict(raw, "mird.yaml")
    points = space.grid_points()
    baseline = [p for p in points if p["regulariser"] == "none"]
    assert sorted((p["backbone"], p["lr"]) for p in baseline) == [("mird", 1e-5), ("mird", 1e-4),
                                                                  ("mird", 1e-3)]
    assert all("unlabeled_rate" not in p for p in baseline)
    for reg, per_lr in (("orthogonal", 6), ("mird", 4 * 6)):
        assert len([p for p in points if p["regulariser"] == reg]) == 3 * per_lr
    assert all("unlabeled_rate" in p for p in points if p["regulariser"] != "none")
    # the samplers' define-by-run space and the fixed values follow the same rule
    trial = optuna.trial.FixedTrial({"backbone": "mird", "regulariser": "none", "lr": 1e-4,
                                     "regulariser.alpha": 0.1})
    space.define_by_run("tpe", 2, 0)(trial)  # asks for no unlabeled_rate (FixedTrial would raise)
    del raw["grid"]["unlabeled_rate"], raw["ranges"]["unlabeled_rate"]
    fixed = space_from_dict({**raw, "fixed": {**raw["fixed"], "unlabeled_rate": 2}}, "mird.yaml")
    assert "unlabeled_rate" not in fixed.constants("mird", "none", 2, 0)
    assert fixed.constants("mird", "mird", 2, 0)["unlabeled_rate"] == 2
    with pytest.raises(SpaceError, match="grid.unlabeled_rate: no regulariser of this space"):
        space_from_dict({**BASE, "regularisers": ["none"], "grid": {"unlabeled_rate": [0, 1]},
                         "ranges": {}}, "t.yaml")


@pytest.mark.parametrize("reg", ["mdm", "synergy"])
def test_lmf_whose_fused_vector_is_the_score_is_refused_with_a_reader_of_z(reg):
    """LMF at output_dim 1 (MMSA's) has h = the score: MDM's critic and Synergy's κ would act on
    the prediction. A space pairing them fails before any trial, naming backbone.output_dim."""
    raw = {**BASE, "backbones": ["lmf"], "regularisers": ["none", reg], "grid": {},
           "ranges": {}}
    with pytest.raises(SpaceError, match=rf"t.yaml: lmf \+ {reg}: .*backbone.output_dim: 1 "):
        space_from_dict(raw, "t.yaml")
    ok = space_from_dict({**raw, "fixed": {"backbone.output_dim": 32}}, "t.yaml")
    assert ok.grid_points()
    space_from_dict({**raw, "regularisers": ["none", "mmim"]}, "t.yaml")  # reads no fused Z


def test_grid_skips_keys_that_do_not_apply():
    space = space_from_dict(BASE, "t.yaml")
    points = space.grid_points()
    # per backbone: none x 2 lr + mdm x 2 lr x 2 weights = 6
    assert len(points) == 2 * (2 + 4)
    assert all("regulariser.weight" not in p for p in points if p["regulariser"] == "none")


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"bakbones": ["tfn"]}, "unknown key 'bakbones'"),
        ({"backbones": ["tnf"]}, "backbones: unknown backbone 'tnf'; known:"),
        ({"regularisers": []}, "regularisers: expected a name or a non-empty list"),
        ({"grid": {"lr": []}}, "grid.lr: expected a non-empty list"),
        ({"grid": {"regulariser.wieght": [1]}}, "grid.regulariser.wieght: no backbone"),
        ({"fixed": {"batch_size": "big"}}, "batch_size: expected an integer, got 'big'"),
        ({"fixed": {"lr": 0.1}}, "fixed.lr: also in grid/ranges"),
        ({"search": {"sampler": "bayes"}}, "search: sampler: expected one of"),
        ({"search": {"pruner": "early"}}, "search: pruner: expected one of"),
        ({"search": {"num_samples": 0}}, "num_samples: expected >= 1"),
        ({"search": {"reuse_workers": "yes"}},
         "reuse_workers: expected one of 'auto', true, false, got 'yes'"),
        ({"ranges": {"lr": {"low": 1.0, "high": 0.1}}}, "ranges.lr: expected low <= high"),
        ({"resources": {"cpu": 0}}, "resources: cpu: expected > 0"),
        ({"mode": "down"}, "mode: expected one of 'min', 'max'"),
    ],
)
def test_bad_space_is_one_line_naming_file_and_key(tmp_path, patch, needle):
    path = write(tmp_path, {**BASE, **patch})
    with pytest.raises(SpaceError) as info:
        load_space(str(path))
    message = str(info.value)
    assert str(path) in message and needle in message, message
    assert "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbackbones: [tfn\n")
    with pytest.raises(SpaceError, match=r"bad.yaml: not valid YAML \(line"):
        load_space(str(path))


def test_unknown_space_name_lists_known():
    with pytest.raises(SpaceError, match="unknown search space 'smok'; known: .*smoke"):
        load_space("smok")


def test_overrides_are_validated():
    space = space_from_dict(BASE, "t.yaml")
    changed = apply_overrides(space, ["fixed.batch_size=64", "search.pruner=none",
                                      "backbones=[tfn]"])
    assert changed.fixed["batch_size"] == 64 and changed.search.pruner == "none"
    assert changed.backbones == ["tfn"]
    with pytest.raises(SpaceError, match="expected a space key"):
        apply_overrides(space, ["nothing.here=1"])
    with pytest.raises(SpaceError, match="batch_size: expected an integer"):
        apply_overrides(space, ["fixed.batch_size=lots"])


def test_define_by_run_samples_only_applicable_keys():
    space = space_from_dict(BASE, "t.yaml")
    fn = space.define_by_run("tpe", max_epochs=2, seed=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        constants = fn(trial)
        params = trial.params
        seen.add(params["regulariser"])
        if params["regulariser"] == "none":
            assert "regulariser.weight" not in params and "regulariser.estimator" not in params
        else:
            assert params["regulariser.estimator"] in ("kl", "f", "w")
        assert 1e-4 <= params["lr"] <= 1e-2  # from the range, not the grid
        assert constants["batch_size"] == 16 and constants["max_epochs"] == 2
        space.trial_config({**params, **constants})  # every sample builds
        study.tell(trial, 0.0)
    assert seen == {"none", "mdm"}


def test_fixed_seed_pins_the_training_seed_and_search_seed_seeds_the_rest():
    space = space_from_dict(BASE, "t.yaml")
    assert space.constants("ef_lstm", "none", 2, seed=7)["seed"] == 7
    pinned = apply_overrides(space, ["fixed.seed=0"])
    for sampler_seed in (1, 2):
        assert pinned.constants("ef_lstm", "none", 2, seed=sampler_seed)["seed"] == 0
        fn = pinned.define_by_run("tpe", max_epochs=2, seed=sampler_seed)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sampler_seed))
        assert fn(study.ask())["seed"] == 0


def test_smoke_space_is_small():
    space = load_space("smoke")
    assert space.search.num_samples * space.search.max_epochs <= 64
    assert dataclasses.asdict(space)["resources"]["cpu"] >= 1


def test_reuse_workers_auto_means_a_local_ray_only(monkeypatch):
    """``auto`` reuses worker processes on a local Ray, not on a cluster (a lost node's dead idle
    workers would take the retries of its trials); true/false are taken as said."""
    from types import SimpleNamespace

    from tuner.search import reuse_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    auto, on, off = (SimpleNamespace(reuse_workers=v) for v in ("auto", True, False))
    assert reuse_workers(auto, None) and reuse_workers(auto, "local")
    assert not reuse_workers(auto, "auto") and not reuse_workers(auto, "10.0.0.1:6379")
    assert reuse_workers(on, "auto") and not reuse_workers(off, None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it
    assert not reuse_workers(auto, None)
    space = space_from_dict({**BASE, "search": {"reuse_workers": True}}, "x.yaml")
    assert space.search.reuse_workers is True


@pytest.mark.parametrize("name", ["smoke", "mdm", "mmim", "mird", "synergy"])
def test_every_paper_space_narrows_to_each_of_its_models(name):
    """``--backbone X`` / ``--regulariser Y``: keys of the space that apply to no remaining model
    are dropped (not an error), and every narrowed space still validates and has points."""
    from tuner.spaces import narrow

    space = load_space(name)
    for backbone in space.backbones:
        narrowed, _ = narrow(space, [backbone])
        assert narrowed.backbones == [backbone] and narrowed.grid_points()
    for reg in space.regularisers:
        narrowed, dropped = narrow(space, None, [reg])
        assert narrowed.regularisers == [reg] and narrowed.grid_points()
        if reg == "none":
            assert not any(k.startswith(("grid.regulariser.", "ranges.regulariser.")) for k in narrowed.grid) and \
                all(not k.startswith("regulariser.") for k in (*narrowed.grid, *narrowed.ranges, *narrowed.fixed))
            assert any(d.startswith(("grid.regulariser.", "fixed.regulariser.")) for d in dropped) or \
                not any(k.startswith("regulariser.") for k in (*space.grid, *space.fixed))


def test_narrowing_keeps_typos_an_error():
    from tuner.spaces import SpaceError, apply_overrides

    with pytest.raises(SpaceError, match="wieght"):
        apply_overrides(load_space("mdm"), ["grid.regulariser.wieght=[1.0]"])


def test_smoke_grid_has_the_readme_count(tmp_path, monkeypatch, capsys):
    """The README: the smoke space's grid is 42 trials (2 backbones x (3 lr without regulariser
    + 3 lr x 2 weights x 3 estimators with MDM))."""
    from tuner.search import main

    assert len(load_space("smoke").grid_points()) == 42
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "smoke", "--sampler", "grid", "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["trials"] == plan["grid_size"] == 42


# ------------------------------------------------------------------------------ cells
def test_cells_are_the_rows_of_the_papers_tables():
    from tuner.spaces import cell_label, cell_of, cell_tag, parse_cell_tag

    mdm = load_space("mdm")
    cells = mdm.cells_of_space()
    # six backbones x (none + one row per estimator): MDM's Table 1 rows
    assert len(cells) == 6 * 4
    labels = {cell_label(c) for c in cells}
    assert {"tfn + none", "tfn + mdm (estimator=kl)", "tfn + mdm (estimator=f)",
            "tfn + mdm (estimator=w)"} <= labels
    # the estimator is not part of the baseline's cell (none does not read it)
    assert cell_of({"backbone": "tfn", "regulariser": "none", "lr": 0.001}, mdm.cells) == (
        ("backbone", "tfn"), ("regulariser", "none"))
    # a cell built from a typed config equals the one built from MLflow's param strings
    typed = mdm.cell({"backbone": "lmf", "regulariser": "mdm", "regulariser.estimator": "w",
                      "lr": 0.002})
    logged = mdm.cell({"backbone": "lmf", "regulariser": "mdm", "regulariser.estimator": "w",
                       "lr": "0.002"})
    assert typed == logged and parse_cell_tag(cell_tag(typed)) == typed
    assert len(load_space("synergy").cells_of_space()) == 6 * 3
    assert load_space("smoke").cells == ["backbone", "regulariser"]


@pytest.mark.parametrize("cells, message", [
    (["regulariser", "backbone"], "expected [backbone, regulariser"),
    (["backbone", "regulariser", "regulariser.nope"], "not a field"),
    (["backbone", "regulariser", "regulariser.weight"], "continuous range"),
    (["backbone", "regulariser", "lr"], "continuous range"),
])
def test_bad_cells_are_one_line(tmp_path, cells, message):
    raw = yaml.safe_load(space_path("smoke").read_text())
    raw["cells"] = cells
    with pytest.raises(SpaceError, match=re.escape(message)):
        space_from_dict(raw, "x.yaml")


def test_narrowing_drops_cell_keys_no_pair_reads():
    space, _ = narrow(load_space("mdm"), backbones=["tfn"], regularisers=["none"])
    assert space.cells_of_space() == [(("backbone", "tfn"), ("regulariser", "none"))]
