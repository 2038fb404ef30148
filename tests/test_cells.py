"""A search that serves every cell (a row of the paper's table): each cell its own budget of
trials, its own sampler, and a pruner that compares a trial with its own cell only. Driven
through the real Optuna samplers and pruners, without Ray (the searcher and the pruning
scheduler are what Tune calls)."""

import math

import optuna
import yaml

from tuner.pruning import (CELL_ATTR, OptunaPruningScheduler, StudySearch, cell_search,
                           cell_view, make_pruner, make_sampler)
from tuner.search import initial_points, main, plan
from tuner.spaces import cell_tag, space_from_dict


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def two_cells(**search):
    """ef_lstm is the strong cell, tfn the planted weak one (see ``value``)."""
    return space_from_dict({
        "name": "cells", "backbones": ["ef_lstm", "tfn"], "regularisers": ["none"],
        "grid": {"lr": [0.01, 0.003, 0.001, 0.03]},
        "ranges": {"lr": {"low": 1.0e-4, "high": 0.1, "log": True}},
        "search": {"sampler": "grid", "pruner": "median", "max_epochs": 3, "grace_epochs": 1,
                   **search},
    }, "cells.yaml")


def value(config) -> float:
    """A trial's validation MAE, the same at every epoch: tfn is 1.0 worse than ef_lstm
    whatever its learning rate, and each cell is best at lr 0.001."""
    base = 0.5 if config["backbone"] == "ef_lstm" else 1.5
    return base + min(1.0, 0.4 * abs(math.log10(config["lr"] / 0.001)))


def drive(searcher, space, trials=None, in_flight_at=None, first=0):
    """Run the trials the searcher hands out one at a time, as Tune would: each epoch's value
    to the pruning scheduler (which may stop it), then its end to the searcher. Returns
    ``(trial_id, config, pruned)`` per trial. ``in_flight_at``: stop after the first epoch of
    that trial and return (the snapshot point of an interrupted search)."""
    scheduler = OptunaPruningScheduler(searcher, metric=space.objective)
    out = []
    i = first
    while trials is None or i < first + trials:
        trial_id = f"t{i}"
        config = searcher.suggest(trial_id)
        if config == "FINISHED":
            break
        out.append(finish(searcher, scheduler, space, trial_id, config,
                          stop_after=1 if i == in_flight_at else None))
        if i == in_flight_at:
            break
        i += 1
    return out


def finish(searcher, scheduler, space, trial_id, config, first_step=1, stop_after=None):
    pruned = False
    for step in range(first_step, space.search.max_epochs + 1):
        decision = scheduler.on_trial_result(None, FakeTrial(trial_id), {
            space.objective: value(config), "training_iteration": step,
            "trial_status": "running"})
        if decision == "STOP":
            pruned = True
            break
        if stop_after == step:
            return trial_id, config, None
    searcher.on_trial_complete(trial_id, {space.objective: value(config)})
    return trial_id, config, pruned


def test_per_cell_pruning_keeps_the_weak_cells_best_configuration():
    """The planted weak cell (tfn, 1.0 worse at every learning rate): the global median pruner
    of one study cuts all of its trials, its best one included, after the first epoch; the per-
    cell pruner compares it with tfn's own trials, keeps its best (lr 0.001) to the end, and
    still prunes the cell's bad learning rate (0.03) and the strong cell's."""
    space = two_cells()
    storage = optuna.storages.InMemoryStorage()
    searcher, trials = cell_search(space, "per-cell", storage)
    assert trials == 8
    ran = drive(searcher, space)
    assert len(ran) == 8
    pruned = {(c["backbone"], c["lr"]): p for _, c, p in ran}
    assert pruned == {("ef_lstm", 0.01): False, ("ef_lstm", 0.003): False,
                      ("ef_lstm", 0.001): False, ("ef_lstm", 0.03): True,
                      ("tfn", 0.01): False, ("tfn", 0.003): False,
                      ("tfn", 0.001): False, ("tfn", 0.03): True}
    # each cell's best trial in the study is its lr 0.001 trial, completed
    study = searcher.study
    for backbone in ("ef_lstm", "tfn"):
        tag = cell_tag(space.cell({"backbone": backbone, "regulariser": "none"}))
        own = cell_view(study, tag).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert len(own) == 3
        assert all(t.user_attrs[CELL_ATTR] == tag for t in own)
        assert min(own, key=lambda t: t.value).params["lr"] == 0.001

    # the same trials with one study-wide median pruner (the search before cells)
    whole = StudySearch(
        space=space.define_by_run("grid", 3, 0), metric=space.objective, mode="min",
        sampler=make_sampler("grid", 0), pruner=make_pruner("median", 1, 3),
        storage=optuna.storages.InMemoryStorage(), study_name="global",
        points_to_evaluate=initial_points(space))
    ran = drive(whole, space, trials=8)
    pruned = {(c["backbone"], c["lr"]): p for _, c, p in ran}
    assert pruned[("tfn", 0.001)] is True  # the weak cell's best, cut by the strong cell's median


def test_a_cell_of_two_trials_prunes_its_second_by_default():
    """search.startup_trials (default 1): a cell's first trial is the reference of its second, so
    a cell of 2 trials (the smoke space's) can prune; with Optuna's habit of 2, it never does."""
    for startup, expected in ((None, True), (2, False)):
        extra = {} if startup is None else {"startup_trials": startup}
        space = space_from_dict({
            "name": "pair", "backbones": ["ef_lstm", "tfn"], "regularisers": ["none"],
            "grid": {"lr": [0.001, 0.01]},
            "search": {"sampler": "grid", "pruner": "median", "max_epochs": 3,
                       "grace_epochs": 1, **extra}}, "pair.yaml")
        searcher, _ = cell_search(space, f"pair{startup}", optuna.storages.InMemoryStorage())
        for pruner in searcher.study.pruner.pruners.values():
            assert pruner._n_startup_trials == (startup or 1)
        pruned = {(c["backbone"], c["lr"]): p for _, c, p in drive(searcher, space)}
        assert pruned == {("ef_lstm", 0.001): False, ("tfn", 0.001): False,
                          ("ef_lstm", 0.01): expected, ("tfn", 0.01): expected}


def test_every_cell_gets_its_budget_and_its_own_sampler():
    """TPE with trials_per_cell: each cell gets exactly its trials, in turns; each Optuna trial
    carries its cell; each cell's TPE sees only its own trials (its startup trials are its own,
    so the weak cell is searched like any other)."""
    space = two_cells(sampler="tpe", trials_per_cell=5, pruner="none")
    searcher, trials = cell_search(space, "budget", optuna.storages.InMemoryStorage())
    assert trials == 10
    ran = drive(searcher, space)
    assert [c["backbone"] for _, c, _ in ran] == ["ef_lstm", "tfn"] * 5
    assert searcher.suggest("one-more") == "FINISHED"
    for trial, (_, config, _) in zip(searcher.study.trials, ran):
        assert trial.user_attrs[CELL_ATTR] == cell_tag(space.cell(config))
    for tag, sampler in searcher.study.sampler.samplers.items():
        assert len(cell_view(searcher.study, tag).trials) == 5
        assert isinstance(sampler, optuna.samplers.TPESampler)
    # a start point goes first, into its own cell, and counts towards that cell's budget
    space = space_from_dict({**yaml.safe_load(yaml.safe_dump({
        "name": "cells", "backbones": ["ef_lstm", "tfn"], "regularisers": ["none"],
        "ranges": {"lr": {"low": 1.0e-4, "high": 0.1, "log": True}},
        "start_points": [{"backbone": "tfn", "lr": 0.001}],
        "search": {"sampler": "random", "pruner": "none", "num_samples": 3, "max_epochs": 1}}))},
        "s.yaml")
    searcher, trials = cell_search(space, "start", optuna.storages.InMemoryStorage())
    ran = drive(searcher, space)
    assert trials == 3 and [(c["backbone"], c["lr"]) for _, c, _ in ran][0] == ("tfn", 0.001)
    assert [c["backbone"] for _, c, _ in ran].count("ef_lstm") == 2  # 3 shared out: 2 + 1


def test_a_resumed_per_cell_search_makes_the_same_choice(tmp_path):
    """Tune saves the searcher in its experiment snapshot and restores it on --resume: the
    cells' budgets, what each was handed and each cell's TPE state come back, so the resumed
    search runs the same trials (an in-flight one goes on from its checkpoint) and chooses the
    same configuration per cell as one that ran through."""
    space = two_cells(sampler="tpe", trials_per_cell=5)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def make(name):
        return cell_search(space, name, optuna.storages.RDBStorage(storage))[0]

    whole = drive(make("whole"), space)

    cut = make("cut")
    before = drive(cut, space, in_flight_at=4)  # trial 4 has reported its first epoch ...
    assert before[-1][2] is None
    cut.save(str(tmp_path / "searcher.pkl"))  # ... at Ray's snapshot; then the driver dies
    resumed = make("cut")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    scheduler = OptunaPruningScheduler(resumed, metric=space.objective)
    trial_id, config, _ = before.pop()  # it goes on from its checkpoint (epoch 1)
    before.append(finish(resumed, scheduler, space, trial_id, config, first_step=2))
    after = drive(resumed, space, first=len(before))  # Tune's trial ids go on
    runs = [(c["backbone"], c["lr"], p) for _, c, p in before + after]
    assert runs == [(c["backbone"], c["lr"], p) for _, c, p in whole]
    assert len(runs) == 10 and any(p for *_, p in runs)  # TPE drew, the pruner pruned

    chosen = {}
    for name in ("whole", "cut"):
        study = optuna.load_study(study_name=name, storage=storage)
        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        chosen[name] = {cell: min((t for t in done if t.user_attrs[CELL_ATTR] == cell),
                                  key=lambda t: t.value).params
                        for cell in {t.user_attrs[CELL_ATTR] for t in done}}
    assert chosen["whole"] == chosen["cut"] and len(chosen["whole"]) == 2


def test_dry_run_lists_the_cells_and_their_trials(capsys):
    """The MDM paper's grid: 24 cells (6 backbones x none / L_kl / L_f / L_W), 312 trials."""
    assert main(["--space", "mdm", "--sampler", "grid", "--dry-run"]) == 0
    counts = yaml.safe_load(capsys.readouterr().out)
    assert counts["trials"] == 312 and len(counts["cells"]) == 24
    assert counts["cells"]["tfn + none"] == 4 and counts["cells"]["tfn + mdm (estimator=kl)"] == 16
    assert sum(counts["cells"].values()) == 312
    assert counts["trial_epochs_at_most"] == 312 * 30
    assert main(["--space", "mdm", "--trials-per-cell", "3", "--dry-run"]) == 0
    counts = yaml.safe_load(capsys.readouterr().out)
    assert counts["trials"] == 72 and set(counts["cells"].values()) == {3}
    assert "trials_per_cell: 3 for each of 24 cells" in counts["budget"]
    assert main(["--space", "mdm", "--trials-per-cell", "3", "--num-samples", "9",
                 "--dry-run"]) == 2
    assert "--num-samples and --trials-per-cell: give one" in capsys.readouterr().err
    space = two_cells(sampler="random", num_samples=1)
    assert plan(space)["cells_without_trials"].startswith("1 of 2")
