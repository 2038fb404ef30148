"""Optuna inside Tune without Ray running: the grid is run exactly, pruned trials are told
PRUNED, diverged ones FAIL, and repeated reports (retries) are harmless."""

import math
import pickle

import optuna
import pytest

from tuner.pruning import (OptunaPruningScheduler, SearchBudget, StudySearch, make_pruner,
                           make_sampler)
from tuner.search import initial_points
from tuner.spaces import space_from_dict

SPACE = {
    "name": "g", "backbones": ["ef_lstm", "tfn"], "regularisers": ["none", "mdm"],
    "grid": {"lr": [0.001, 0.002, 0.005], "regulariser.weight": [1.0, 0.1],
             "regulariser.estimator": ["kl", "f", "w"]},
    "search": {"sampler": "grid", "max_epochs": 3},
}


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def searcher_for(space, pruner=None):
    return StudySearch(
        space=space.define_by_run(space.search.sampler, 3, 0), metric=space.objective,
        mode="min", sampler=make_sampler(space.search.sampler, 0), pruner=pruner,
        storage=optuna.storages.RDBStorage("sqlite:///:memory:"), study_name="t",
        points_to_evaluate=initial_points(space) or None,
    )


def test_grid_sampler_runs_exactly_the_grid():
    space = space_from_dict(SPACE, "g.yaml")
    points = space.grid_points()
    # per backbone: none x 3 lr + mdm x 3 lr x 2 weights x 3 estimators
    assert len(points) == 2 * (3 + 18)
    searcher = searcher_for(space)
    seen = []
    for i in range(len(points)):
        config = searcher.suggest(f"t{i}")
        sampled = {k: v for k, v in config.items()
                   if k in ("backbone", "regulariser") or k in space.grid}
        seen.append(tuple(sorted(sampled.items())))
        searcher.on_trial_complete(f"t{i}", {space.objective: 1.0})
    assert sorted(seen) == sorted(tuple(sorted(p.items())) for p in points)


def test_pruned_and_diverged_trials_get_their_optuna_state():
    space = space_from_dict({**SPACE, "search": {"sampler": "random", "max_epochs": 3}}, "g.yaml")
    pruner = make_pruner("median", grace_epochs=2, max_epochs=3)
    searcher = searcher_for(space, pruner)
    scheduler = OptunaPruningScheduler(searcher, metric=space.objective)
    running = {"trial_status": "running"}
    # two reference trials that learn
    for i in range(2):
        searcher.suggest(f"good{i}")
        for step, value in enumerate([1.0, 0.8, 0.6], start=1):
            decision = scheduler.on_trial_result(None, FakeTrial(f"good{i}"), {
                space.objective: value, "training_iteration": step, **running})
            assert decision == "CONTINUE"
        searcher.on_trial_complete(f"good{i}", {space.objective: 0.6})
    # a bad one is pruned after the grace epoch; a repeated report (a retry) changes nothing
    searcher.suggest("bad")
    assert scheduler.on_trial_result(None, FakeTrial("bad"), {
        space.objective: 1.5, "training_iteration": 1, **running}) == "CONTINUE"
    assert scheduler.on_trial_result(None, FakeTrial("bad"), {
        space.objective: 1.5, "training_iteration": 1, **running}) == "CONTINUE"
    assert scheduler.on_trial_result(None, FakeTrial("bad"), {
        space.objective: 1.5, "training_iteration": 2, **running}) == "STOP"
    searcher.on_trial_complete("bad", {space.objective: 1.5})
    # a diverged one ends itself with a NaN value
    searcher.suggest("nan")
    searcher.on_trial_complete("nan", {space.objective: math.nan, "trial_status": "diverged"})
    states = {t.number: t.state for t in searcher.study.trials}
    assert list(states.values()) == [optuna.trial.TrialState.COMPLETE] * 2 + [
        optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    bad = searcher.study.trials[2]
    assert bad.intermediate_values == {1: 1.5, 2: 1.5}


@pytest.mark.parametrize("name", ["none", "median", "successive_halving", "hyperband", "asha"])
def test_every_pruner_builds(name):
    pruner = make_pruner(name, grace_epochs=2, max_epochs=10)
    assert (pruner is None) == (name == "none")


@pytest.mark.parametrize("name", ["median", "successive_halving", "hyperband", "asha"])
def test_every_pruner_prunes_a_planted_bad_trial(name):
    """Through the searcher and the scheduler, as in a search: reference trials that learn run to
    the end; a planted trial far worse at every epoch is stopped before its last epoch is spent
    in vain, and the study records it PRUNED."""
    max_epochs = 3
    space = space_from_dict({**SPACE, "search": {"sampler": "random", "max_epochs": max_epochs}},
                            "g.yaml")
    searcher = searcher_for(space, make_pruner(name, grace_epochs=1, max_epochs=max_epochs))
    scheduler = OptunaPruningScheduler(searcher, metric=space.objective)
    running = {"trial_status": "running"}
    curve = [1.0, 0.8, 0.6]
    n_good = 6  # enough that each of hyperband's brackets holds reference trials
    for i in range(n_good):
        searcher.suggest(f"good{i}")
        for step, value in enumerate(curve, start=1):
            assert scheduler.on_trial_result(None, FakeTrial(f"good{i}"), {
                space.objective: value, "training_iteration": step, **running}) == "CONTINUE"
        searcher.on_trial_complete(f"good{i}", {space.objective: curve[-1]})
    searcher.suggest("bad")
    decisions = []
    for step, value in enumerate([v + 5.0 for v in curve], start=1):
        decisions.append(scheduler.on_trial_result(None, FakeTrial("bad"), {
            space.objective: value, "training_iteration": step, **running}))
        if decisions[-1] == "STOP":
            break
    assert decisions[-1] == "STOP", f"{name} never pruned the bad trial: {decisions}"
    searcher.on_trial_complete("bad", {space.objective: 5.0 + curve[len(decisions) - 1]})
    states = [t.state for t in searcher.study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * n_good + [
        optuna.trial.TrialState.PRUNED]
    assert len(decisions) < max_epochs, f"{name} let the bad trial run to its last epoch"


def _sampled(name: str, seed: int, trials: int = 9) -> list[dict]:
    """The parameters ``make_sampler(name, seed)`` draws over a float and a conditional pair."""
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.suggest_categorical("c", ["a", "b"]) == "a":
            x += trial.suggest_float("y", 0.0, 1.0)
        return x

    study = optuna.create_study(sampler=make_sampler(name, seed=seed))
    study.optimize(objective, n_trials=trials)
    return [t.params for t in study.trials]


# cmaes: Optuna's CmaEsSampler imports the package cmaes at its first draw (in the lock since
# --sampler cmaes failed there without it)
@pytest.mark.parametrize("name", ["grid", "tpe", "random", "cmaes", "qmc"])
def test_every_sampler_is_seeded_and_set_as_documented(name, caplog):
    """The seed fixes the draws (and another seed changes them); the settings each sampler is
    documented with (tuner/pruning.py, docs/search-spaces.md) are the ones it has."""
    import logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.enable_propagation()  # Optuna's warnings reach caplog
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            first = _sampled(name, seed=0)
        assert _sampled(name, seed=0) == first
        assert _sampled(name, seed=1) != first
    finally:
        optuna.logging.disable_propagation()
    sampler = make_sampler(name, seed=0, num_samples=30)
    if name in ("grid", "random"):  # grid: its points are enqueued, the sampler never draws
        assert type(sampler) is optuna.samplers.RandomSampler
    if name == "tpe":  # the conditional regulariser.* keys sampled jointly, with their group
        assert sampler._multivariate and sampler._group
        assert [make_sampler("tpe", 0, n)._n_startup_trials for n in (3, 12, 30, 90)] == [
            2, 4, 10, 10]  # num_samples // 3, at least 2 and at most 10
    if name in ("cmaes", "qmc"):  # the categorical keys are sampled independently, silently
        assert not [r for r in caplog.records if "independent" in r.getMessage()], caplog.text
    if name == "qmc":  # a Sobol sequence: after the first (independent) trial, 8 trials put one
        assert sampler._qmc_type == "sobol"  # x in each eighth of [0, 1)
        assert sorted(int(p["x"] * 8) for p in first[1:]) == list(range(8))


def test_search_budget_counts_trial_epochs_and_stops_at_a_reached_value():
    budget = SearchBudget(trial_epochs=3)
    for trial_id in ("a", "b", "a"):
        assert not budget.stop_all()
        assert budget(trial_id, {"best_valid_mae": 1.0}) is False  # never stops one trial
    assert budget.stop_all() and budget.spent == 3

    reach = SearchBudget(metric="best_valid_mae", reach=0.5)
    reach("a", {"best_valid_mae": float("nan")})
    reach("a", {"best_valid_mae": 0.6})
    assert not reach.stop_all()
    reach("b", {"best_valid_mae": 0.5})
    assert reach.stop_all() and reach.spent == 3
    # Tune repeats a finished trial's last report with done=True (RESULT_DUPLICATE): one epoch
    counted = SearchBudget(trial_epochs=10)
    for step in (1, 2):
        counted("a", {"training_iteration": step, "best_valid_mae": 1.0})
    counted("a", {"training_iteration": 2, "best_valid_mae": 1.0, "done": True})
    counted("b", {"training_iteration": 1, "best_valid_mae": 1.0})
    counted("b", {"training_iteration": 1, "best_valid_mae": 1.0, "done": True})
    assert counted.spent == 3
    # a trial retried from its checkpoint re-runs epochs: those are spent again
    counted("c", {"training_iteration": 5})
    counted("c", {"training_iteration": 4})
    counted("c", {"training_iteration": 5})
    assert counted.spent == 6
    # a resumed search unpickles the stopper it was started with, maybe from an older version
    old = SearchBudget(trial_epochs=10)
    del old.__dict__["_last_step"]
    restored = pickle.loads(pickle.dumps(old))
    restored("a", {"training_iteration": 1})
    assert restored.spent == 1
    with pytest.raises(ValueError, match="go together"):
        SearchBudget(reach=0.5)
    with pytest.raises(ValueError, match="trial_epochs"):
        SearchBudget(trial_epochs=0)


def test_a_finished_trial_leaves_only_its_id_in_the_searcher():
    """A long search's driver must not keep each finished trial's Optuna object and reported
    steps (issue 10, "Load"): once told, the study in the storage holds the trial."""
    space = space_from_dict({**SPACE, "search": {"sampler": "random", "max_epochs": 3}}, "g.yaml")
    searcher = searcher_for(space, make_pruner("median", grace_epochs=1, max_epochs=3))
    scheduler = OptunaPruningScheduler(searcher, metric=space.objective)
    for i in range(3):
        searcher.suggest(f"t{i}")
        scheduler.on_trial_result(None, FakeTrial(f"t{i}"), {
            space.objective: 1.0 + i, "training_iteration": 1, "trial_status": "running"})
    searcher.pruned.add("t2")  # as if the pruner had stopped it
    for i in range(3):
        searcher.on_trial_complete(f"t{i}", {space.objective: 1.0 + i})
    assert searcher.optuna_trial("t0") is None
    assert not searcher._ot_trials and not searcher._reported and not searcher.pruned
    # a late or repeated message about a finished trial changes nothing
    assert searcher.report("t0", 0.5, 2) is None
    searcher.on_trial_complete("t0", {space.objective: 0.1})
    trials = searcher.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [
        optuna.trial.TrialState.PRUNED]
    assert [t.value for t in trials[:2]] == [1.0, 2.0]
    assert trials[0].intermediate_values == {1: 1.0}


def test_restore_fails_the_orphans_of_a_killed_driver(tmp_path):
    """--resume after SIGKILL: a trial the killed driver asked the study for, after Ray's last
    experiment snapshot, has no Tune trial and would stay RUNNING in the study forever; the
    restored searcher tells it FAIL and keeps the in-flight trial that Ray knows running."""
    space = space_from_dict({**SPACE, "search": {"sampler": "random", "max_epochs": 3}}, "g.yaml")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def make():
        return StudySearch(
            space=space.define_by_run("random", 3, 0), metric=space.objective, mode="min",
            sampler=make_sampler("random", 0), storage=optuna.storages.RDBStorage(storage),
            study_name="k")

    searcher = make()
    searcher.suggest("done")
    searcher.on_trial_complete("done", {space.objective: 1.0})
    searcher.suggest("inflight")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's experiment snapshot
    searcher.suggest("orphan")  # then the driver is killed

    restored = make()
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = [t.state.name for t in optuna.load_study(study_name="k", storage=storage).trials]
    assert states == ["COMPLETE", "RUNNING", "FAIL"]
    restored.on_trial_complete("inflight", {space.objective: 0.5})  # the in-flight one goes on
    study = optuna.load_study(study_name="k", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert study.best_value == 0.5


def test_an_errored_trial_that_resume_runs_again_gets_a_new_optuna_trial(tmp_path):
    """``--resume`` restarts errored trials (told FAIL when Tune gave up on them): the resumed
    attempt is a new Optuna trial with the same parameters and the first attempt's epochs, and
    its end reaches the study through a ConcurrencyLimiter that did not suggest it. One that
    errors again before reporting stays one FAIL; one that ends without a report is told too."""
    from ray.tune.search import ConcurrencyLimiter

    from tuner.pruning import StudySearchGenerator

    space = space_from_dict({**SPACE, "search": {"sampler": "random", "max_epochs": 3}}, "g.yaml")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def make():
        searcher = StudySearch(
            space=space.define_by_run("random", 3, 0), metric=space.objective, mode="min",
            sampler=make_sampler("random", 0), storage=optuna.storages.RDBStorage(storage),
            study_name="e", pruner=make_pruner("median", grace_epochs=1, max_epochs=3))
        limiter = ConcurrencyLimiter(searcher, max_concurrent=3)
        return searcher, limiter, StudySearchGenerator(limiter), OptunaPruningScheduler(
            searcher, metric=space.objective)

    def result(value, step):
        return {space.objective: value, "training_iteration": step, "trial_status": "running"}

    searcher, limiter, generator, scheduler = make()
    for trial_id in ("a", "b", "c"):
        limiter.suggest(trial_id)
        scheduler.on_trial_result(None, FakeTrial(trial_id), result(1.0, 1))
        generator.on_trial_result(trial_id, result(1.0, 1))
        generator.on_trial_complete(trial_id, error=True)  # Tune gave up on it
    assert [t.state.name for t in searcher.study.trials] == ["FAIL"] * 3
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's experiment snapshot
    limiter_state = limiter.get_state()

    searcher, limiter, generator, scheduler = make()  # --resume
    searcher.restore(str(tmp_path / "searcher.pkl"))
    limiter.set_state(limiter_state)
    assert not limiter.live_trials
    # a: reports epochs 1 (again, from its checkpoint), 2 and 3, then completes
    for step, value in ((1, 1.0), (2, 0.8), (3, 0.7)):
        assert scheduler.on_trial_result(None, FakeTrial("a"), result(value, step)) == "CONTINUE"
        generator.on_trial_result("a", result(value, step))
    assert "a" in limiter.live_trials  # it counts towards max_concurrent, and its end gets through
    generator.on_trial_complete("a", {space.objective: 0.7})
    # b: its checkpoint was its last epoch: it ends without a new report
    generator.on_trial_complete("b", {space.objective: 1.0})
    # c: errors again before reporting
    generator.on_trial_complete("c", error=True)

    trials = optuna.load_study(study_name="e", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    for retried, failed in ((trials[3], trials[0]), (trials[4], trials[1])):
        assert retried.params == failed.params and retried.distributions == failed.distributions
        assert retried.user_attrs["retry_of"] == failed.number
    assert trials[3].intermediate_values == {1: 1.0, 2: 0.8, 3: 0.7} and trials[3].value == 0.7
    assert trials[4].intermediate_values == {1: 1.0} and trials[4].value == 1.0
    assert not limiter.live_trials and not searcher._ot_trials
    assert searcher.errored == {"c": 2}  # a later --resume may run it again


# ------------------------------------------------- each pruner in a real (tiny) search
GOOD_LRS, BAD_LR = (0.005, 0.003), 1.0e-7  # two learning rates that learn; one that cannot move
MAX_EPOCHS = 3


def hyperband_name(prefix: str) -> str:
    """A search name whose study puts trials 0 (a learning one) and 2 (the planted one) in
    Hyperband's first bracket (min_resource 1). Optuna assigns a trial to a bracket by
    crc32(f"{study_name}_{number}") modulo the brackets' allocation (optuna/pruners/_hyperband.py:
    min 1, max 3, factor 3 gives 2 brackets, of allocation 3 and 2); in the second bracket
    (min_resource 3 = max_epochs) nothing can be pruned before the last epoch."""
    import binascii

    for i in range(100):
        name = f"{prefix}{i}"
        if all(binascii.crc32(f"{name}_{n}".encode()) % 5 < 3 for n in (0, 2)):
            return name
    raise AssertionError("no name found")


@pytest.fixture(scope="module")
def tiny_data_dir(small_data, tmp_path_factory):
    from trainables.data.parquet import write_parquet

    return write_parquet(small_data, tmp_path_factory.mktemp("prune") / "data")


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband", "asha"])
def test_every_pruner_prunes_a_planted_bad_trial_in_a_real_search(
        pruner, tiny_data_dir, tmp_path, monkeypatch, ray_local, capsys):
    """A real search (tuner.search: Ray Tune, Optuna, MLflow; EF-LSTM on the small synthetic set,
    one CPU per trial, one trial at a time): two trials that learn, then one planted with an
    lr so small that the model does not move. The planted trial is pruned before its last
    epoch (MLflow status ``pruned``, fewer epochs than max_epochs, Optuna PRUNED); the trial
    that ran first, with no competitor, completes."""
    import yaml
    from mlflow.tracking import MlflowClient

    from tuner.search import main

    space = {
        "name": "prune", "backbones": ["ef_lstm"], "regularisers": ["none"],
        "data": str(tiny_data_dir), "ranges": {"lr": [*GOOD_LRS, BAD_LR]},
        "fixed": {"batch_size": 16, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1},
        "start_points": [{"lr": lr} for lr in (*GOOD_LRS, BAD_LR)],
        "search": {"sampler": "random", "pruner": pruner, "num_samples": 3,
                   "max_epochs": MAX_EPOCHS, "grace_epochs": 1, "seed": 0, "max_concurrent": 1},
        "resources": {"cpu": 1},
    }
    (tmp_path / "prune.yaml").write_text(yaml.safe_dump(space))
    name = hyperband_name("hb") if pruner == "hyperband" else pruner
    monkeypatch.chdir(tmp_path)
    assert main(["--space", "prune.yaml", "--name", name]) == 0
    capsys.readouterr()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("prune").experiment_id],
                              "tags.run_kind = 'trial'")
    by_lr = {float(r.data.params["lr"]): r for r in runs}
    assert sorted(by_lr) == sorted((*GOOD_LRS, BAD_LR))
    epochs = {lr: len(client.get_metric_history(r.info.run_id, "valid_mae"))
              for lr, r in by_lr.items()}
    status = {lr: r.data.tags["status"] for lr, r in by_lr.items()}
    assert status[BAD_LR] == "pruned" and epochs[BAD_LR] < MAX_EPOCHS, (status, epochs)
    assert status[GOOD_LRS[0]] == "completed" and epochs[GOOD_LRS[0]] == MAX_EPOCHS, (status,
                                                                                    epochs)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.params["lr"]: t.state for t in study.trials}
    assert states[BAD_LR] == optuna.trial.TrialState.PRUNED
    assert states[GOOD_LRS[0]] == optuna.trial.TrialState.COMPLETE
