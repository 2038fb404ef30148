"""Optuna samplers and Optuna pruners inside Ray Tune.

Ray's ``OptunaSearch`` samples configurations but creates its study with a no-op pruner and
tells Optuna COMPLETE for a trial that a Tune scheduler stopped. Two small pieces fix that:

- :class:`StudySearch` — an ``OptunaSearch`` whose study lives in an RDB storage (so pruning
  history survives a restarted driver), that reports each epoch's value once, tells Optuna
  PRUNED for pruned trials and FAIL for diverged ones, and gives an errored trial that
  ``--resume`` runs again a new Optuna trial (:meth:`StudySearch.reopen`). It is the only place
  that touches ``OptunaSearch``'s private attributes (``_ot_study``, ``_ot_trials``) and the
  study's storage (``Study._storage``).
- :class:`OptunaPruningScheduler` — a FIFO Tune scheduler that forwards every reported value to
  the Optuna trial and asks the Optuna pruner whether to stop it.

:class:`SearchBudget` ends a whole search after a number of trial-epochs (epochs summed over
trials, the cost that pruning saves), or once a trial reaches a given value.
:class:`StudySearchGenerator` is Tune's ``SearchGenerator`` for a search that such a stopper can
end: the trials the end cuts get their Optuna state, and a resume with a larger budget goes on.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

__all__ = ["StudySearch", "CellSearch", "CellSampler", "CellPruner", "StudySearchGenerator",
           "OptunaPruningScheduler", "SearchBudget", "CELL_ATTR", "cell_search", "cell_view",
           "make_pruner", "make_sampler", "snapshot_stopper"]

#: the Optuna user attribute that holds a trial's cell (:func:`tuner.spaces.cell_tag`)
CELL_ATTR = "cell"

log = logging.getLogger(__name__)


def make_sampler(name: str, seed: int, num_samples: int = 8) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for a ``search.sampler`` name.

    ``grid`` runs exactly the space's grid points, each enqueued in the study with all its
    values fixed (see :meth:`tuner.spaces.SearchSpace.grid_points`); Optuna's ``GridSampler``
    would enumerate the full product of every key, repeating the baseline ``none`` for each λ
    it does not have, so the grid's points are enqueued instead and this sampler never draws.
    """
    if name == "grid":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        # multivariate + group handle the conditional keys (regulariser.* only for some trials)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True,
            n_startup_trials=max(2, min(10, num_samples // 3)),
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}; known: grid, tpe, random, cmaes, qmc")


def make_pruner(name: str, grace_epochs: int, max_epochs: int,
                startup_trials: int = 2) -> optuna.pruners.BasePruner | None:
    """The Optuna pruner for a ``search.pruner`` name (None for ``none``); ``startup_trials`` is
    the median pruner's ``n_startup_trials`` (``search.startup_trials`` for a search's cells)."""
    if name == "none":
        return None
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                           n_warmup_steps=grace_epochs)
    if name in ("successive_halving", "asha"):
        # Optuna's SuccessiveHalvingPruner is the asynchronous variant (ASHA, Li et al. 2020)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=grace_epochs,
                                                      reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=grace_epochs, max_resource=max_epochs,
                                              reduction_factor=3)
    raise ValueError(f"unknown pruner {name!r}; known: none, median, successive_halving, "
                     "hyperband, asha")


class _CellStorage:
    """A study's storage as one cell sees it: the study's trials are that cell's trials only
    (user attribute :data:`CELL_ATTR`); everything else is the storage itself."""

    def __init__(self, storage: Any, cell: str) -> None:
        self._storage = storage
        self._cell = cell

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
                if t.user_attrs.get(CELL_ATTR) == self._cell]

    def get_n_trials(self, study_id: int, state: Any = None) -> int:
        states = None if state is None else (state if isinstance(state, tuple) else (state,))
        return len(self.get_all_trials(study_id, deepcopy=False, states=states))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def cell_view(study: optuna.Study, cell: str) -> optuna.Study:
    """``study`` as the sampler and pruner of ``cell`` see it: only that cell's trials, and the
    cell's own sampler and pruner (when the study's are a :class:`CellSampler` /
    :class:`CellPruner`). Writes go to the study's storage as they are."""
    view = object.__new__(optuna.Study)
    view.__dict__.update(study.__dict__)
    view._storage = _CellStorage(study._storage, cell)
    view._thread_local = type(study._thread_local)()  # no cache of the whole study's trials
    if isinstance(study.sampler, CellSampler):
        view.sampler = study.sampler.of(cell)
    if isinstance(study.pruner, CellPruner):
        view.pruner = study.pruner.of(cell)
    return view


def _cell_of(trial: optuna.trial.FrozenTrial) -> str:
    cell = trial.user_attrs.get(CELL_ATTR)
    if cell is None:
        raise RuntimeError(f"Optuna trial {trial.number} has no {CELL_ATTR!r} user attribute; "
                           "per-cell samplers and pruners need it (CellSearch sets it)")
    return cell


class CellSampler(optuna.samplers.BaseSampler):
    """One sampler per cell, each learning from its own cell's trials only (through
    :func:`cell_view`): TPE's good and bad trials, CMA-ES's generations, a random or QMC
    sampler's stream are per cell, so a weak backbone's trials are compared with each other."""

    def __init__(self, samplers: dict[str, optuna.samplers.BaseSampler]) -> None:
        self.samplers = dict(samplers)

    def of(self, cell: str) -> optuna.samplers.BaseSampler:
        try:
            return self.samplers[cell]
        except KeyError:
            raise RuntimeError(f"no sampler for cell {cell!r}") from None

    def _inner(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        cell = _cell_of(trial)
        return cell_view(study, cell), self.of(cell)

    def infer_relative_search_space(self, study, trial):
        view, sampler = self._inner(study, trial)
        return sampler.infer_relative_search_space(view, trial)

    def sample_relative(self, study, trial, search_space):
        view, sampler = self._inner(study, trial)
        return sampler.sample_relative(view, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        view, sampler = self._inner(study, trial)
        return sampler.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        view, sampler = self._inner(study, trial)
        sampler.before_trial(view, trial)

    def after_trial(self, study, trial, state, values) -> None:
        view, sampler = self._inner(study, trial)
        sampler.after_trial(view, trial, state, values)

    def reseed_rng(self) -> None:
        for sampler in self.samplers.values():
            sampler.reseed_rng()


class CellPruner(optuna.pruners.BasePruner):
    """One pruner per cell, asked with the cell's view of the study (:func:`cell_view`): a
    trial is compared with its own cell's trials only, e.g. a median pruner stops a trial worse
    than the median of its cell at the same epoch, not of every backbone's."""

    def __init__(self, pruners: dict[str, optuna.pruners.BasePruner]) -> None:
        self.pruners = dict(pruners)

    def of(self, cell: str) -> optuna.pruners.BasePruner:
        try:
            return self.pruners[cell]
        except KeyError:
            raise RuntimeError(f"no pruner for cell {cell!r}") from None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        cell = _cell_of(trial)
        return self.of(cell).prune(cell_view(study, cell), trial)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class StudySearch(OptunaSearch):
    """``OptunaSearch`` with a visible study and truthful final states."""

    def __init__(self, *args: Any, pruner: optuna.pruners.BasePruner | None = None,
                 **kwargs: Any) -> None:
        #: the Optuna pruner, installed on the study (OptunaSearch would install a no-op one)
        self.pruner = pruner or optuna.pruners.NopPruner()
        #: Tune trial ids that a pruner stopped
        self.pruned: set[str] = set()
        self._reported: dict[str, set[int]] = {}
        #: per running trial, its last result that Tune handed the searcher (value and status)
        self._last: dict[str, dict[str, Any]] = {}
        #: Tune trial ids that errored for good (told FAIL) -> the number of that Optuna trial;
        #: ``--resume`` runs them again (``resume_errored``): see :meth:`reopen`
        self.errored: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        self._ot_study.pruner = self.pruner

    # -- the private attributes of OptunaSearch, in one place -------------------------------
    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def optuna_trial(self, trial_id: str) -> optuna.Trial | None:
        return self._ot_trials.get(trial_id)

    def reopen(self, trial_id: str) -> optuna.Trial | None:
        """A trial that errored for good (told FAIL) runs again: ``--resume`` restarts errored
        trials from their last checkpoint (``Tuner.restore(resume_errored=True)``), and Tune
        tells the searcher nothing about it until its next result or its end.

        A finished Optuna trial cannot change state, and its FAIL is true of that attempt, so
        the resumed one is a new RUNNING Optuna trial with the same parameters and
        distributions, the first attempt's intermediate values (the epochs before its
        checkpoint, which the pruner compares and the resumed trial does not report again) and
        the user attribute ``retry_of`` (the failed trial's number). Returns it, or None for a
        trial that did not error. Called on the trial's first result (:meth:`report`) or at its
        end when it reported nothing (:meth:`on_trial_complete`); one that errors again before
        reporting keeps only its FAIL."""
        number = self.errored.pop(trial_id, None)
        if number is None:
            return None
        storage = self.study._storage
        study_id = storage.get_study_id_from_name(self.study.study_name)
        failed = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id,
                                                                                   number))
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=failed.params, distributions=failed.distributions,
            user_attrs={**failed.user_attrs, "retry_of": failed.number},
            intermediate_values=failed.intermediate_values)
        ot_trial = optuna.Trial(self.study, storage.create_new_trial(study_id, template))
        self._ot_trials[trial_id] = ot_trial
        self._reported[trial_id] = set(failed.intermediate_values)
        self._completed_trials.discard(trial_id)
        log.info("Tune trial %s runs again after an error: Optuna trial %d (trial %d stays FAIL)",
                 trial_id, ot_trial.number, number)
        return ot_trial

    # -- reporting ---------------------------------------------------------------------------
    def report(self, trial_id: str, value: Any, step: int) -> optuna.Trial | None:
        """Report ``value`` at ``step`` once (retried trials re-report steps they already did)."""
        ot_trial = self.optuna_trial(trial_id) or self.reopen(trial_id)
        if ot_trial is None or not _finite(value) or trial_id in self._completed_trials:
            return None
        steps = self._reported.setdefault(trial_id, set())
        if step not in steps:
            steps.add(step)
            with warnings.catch_warnings():
                # a trial retried from a checkpoint, or resumed by a new driver, re-reports steps
                warnings.simplefilter("ignore", UserWarning)
                ot_trial.report(float(value), step)
        return ot_trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.report(trial_id, result.get(self.metric), int(result.get("training_iteration", 0)))
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._last[trial_id] = {self.metric: result.get(self.metric),
                                    "trial_status": result.get("trial_status", "running")}

    def cut_open_trials(self) -> list[tuple[str, dict | None]]:
        """The search's stopper ended the search (its budget is spent): Tune stops every trial
        still running or pending without telling the searcher, so each would stay RUNNING in the
        study. Returns ``(trial_id, last result)`` for each trial not yet told, for
        :meth:`on_trial_complete`, and marks as pruned those cut after at least one reported
        epoch (Optuna keeps their last intermediate value as their value; the MLflow status of
        a trial cut while ``running`` reads ``pruned`` too). A trial whose last report closed it
        (completed, early_stopped, diverged) gets the state that report gives; one cut before
        its first epoch is told FAIL (nothing for a sampler to learn, like a restore's orphans).
        """
        cut = []
        for trial_id in list(self._ot_trials):
            if trial_id in self._completed_trials:
                continue
            last = self._last.get(trial_id)
            if self._reported.get(trial_id) and (last or {}).get("trial_status",
                                                                  "running") == "running":
                self.pruned.add(trial_id)
            cut.append((trial_id, last))
        return cut

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if not error:
            self.reopen(trial_id)  # an errored trial resumed that ends without a new report
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = (result or {}).get(self.metric)
        diverged = (result or {}).get("trial_status") == "diverged"
        if trial_id in self.pruned and not error:
            state, value = TrialState.PRUNED, None
        elif error or diverged or not _finite(value):
            # errored for good, or diverged (its best value from before the divergence is not
            # a result the sampler should learn from)
            state, value = TrialState.FAIL, None
        else:
            state = TrialState.COMPLETE
        try:
            self.study.tell(self._ot_trials[trial_id], value, state=state)
        except Exception as exc:  # never let bookkeeping stop the search
            log.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        if error:  # Tune gave up on it (FailureConfig); --resume may run it again
            self.errored[trial_id] = self._ot_trials[trial_id].number
        self._completed_trials.add(trial_id)
        self.forget(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Ray's restore of the searcher (``--resume``), then the study's orphans are told FAIL:
        trials the study holds as RUNNING that no restored Tune trial owns. The driver asked for
        them and was killed before Ray's next experiment snapshot recorded their Tune trials, so
        nothing will ever finish them (the resumed search asks for new ones), and a sampler
        would go on treating them as pending."""
        super().restore(checkpoint_path)
        owned = {ot_trial.number for ot_trial in self._ot_trials.values()}
        for orphan in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if orphan.number in owned:
                continue
            try:
                self.study.tell(orphan.number, state=TrialState.FAIL)
                log.info("Optuna trial %d: no Tune trial after the restore; told FAIL",
                         orphan.number)
            except Exception as exc:  # never let bookkeeping stop the search
                log.warning("could not fail the orphaned Optuna trial %d: %s", orphan.number, exc)

    def forget(self, trial_id: str) -> None:
        """Drop what is kept per running trial once it is told (its Optuna trial object, the
        steps it reported, its pruned mark): the study in the storage holds the finished trial,
        and a long search's driver keeps only the id (``_completed_trials``). OptunaSearch
        itself keeps every trial's Optuna object for the whole search (and pickles them all into
        every searcher checkpoint)."""
        self._ot_trials.pop(trial_id, None)
        self._reported.pop(trial_id, None)
        self._last.pop(trial_id, None)
        self.pruned.discard(trial_id)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a searcher pickled by an older version (a resumed search) lacks _last and errored
        self.__dict__.update(state)
        self.__dict__.setdefault("_last", {})
        self.__dict__.setdefault("errored", {})


class CellSearch(StudySearch):
    """A :class:`StudySearch` that serves every cell of the space (one row of the paper's
    table) with its own budget of trials.

    One study holds every trial (named after the search, as before); each trial carries its
    cell as the user attribute :data:`CELL_ATTR`, set before its first parameter is drawn, and
    its cell's keys are fixed (enqueued) so the sampler draws only the rest. With a
    :class:`CellSampler` and a :class:`CellPruner` on the study, each cell's sampler learns from
    its own trials and each trial is pruned against its own cell.

    Which cell the next trial serves: the first points (the grid, or the start points) in their
    order, then, among the cells with budget left, the one with the fewest trials so far (ties:
    the space's cell order). What was handed out is part of the searcher's state, which Tune
    saves in its experiment snapshot, so a resumed search goes on where it stopped.
    """

    def __init__(self, *args: Any, cells: list[tuple[str, dict[str, Any], int]],
                 first_points: list[tuple[str, dict[str, Any]]] = (), **kwargs: Any) -> None:
        #: cell tag -> the point that pins the cell's keys
        self.cell_points = {tag: dict(point) for tag, point, _ in cells}
        #: cell tag -> trials it gets; and how many it was handed so far
        self.cell_budget = {tag: int(budget) for tag, _, budget in cells}
        self.cell_assigned = {tag: 0 for tag in self.cell_points}
        #: points to run first, in order, each with its cell
        self.first = [(tag, dict(point)) for tag, point in first_points]
        unknown = [tag for tag, _ in self.first if tag not in self.cell_points]
        if unknown:
            raise ValueError(f"first point in unknown cell {unknown[0]!r}")
        kwargs.pop("points_to_evaluate", None)  # the first points go out one by one (suggest)
        super().__init__(*args, **kwargs)

    def next_cell(self) -> tuple[str, dict[str, Any], bool] | None:
        """The next trial's cell, the parameters it fixes and whether it is a first point, or
        None when every budget is handed out (hands nothing out: :meth:`suggest` does)."""
        while self.first:
            tag, point = self.first[0]
            if self.cell_assigned[tag] < self.cell_budget[tag]:
                return tag, point, True
            self.first.pop(0)  # its cell's budget is spent (not with SearchSpace.cell_budgets)
        open_cells = [tag for tag in self.cell_points
                      if self.cell_assigned[tag] < self.cell_budget[tag]]
        if not open_cells:
            return None
        tag = min(open_cells, key=lambda t: self.cell_assigned[t])
        return tag, self.cell_points[tag], False

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            choice = self.next_cell()
            if choice is None:
                from ray.tune.search import Searcher

                return Searcher.FINISHED
            tag, point, first = choice
            if first:
                self.first.pop(0)
            # the trial's cell keys are fixed, and its cell is known to the sampler as it draws
            self.study.enqueue_trial(point, user_attrs={CELL_ATTR: tag})
            self.cell_assigned[tag] += 1
        return super().suggest(trial_id)


def cell_search(space: Any, study_name: str, storage: optuna.storages.BaseStorage,
                **kwargs: Any) -> tuple[CellSearch, int]:
    """The searcher of a search of ``space`` (a :class:`tuner.spaces.SearchSpace`): a
    :class:`CellSearch` over the space's cells (:meth:`~tuner.spaces.SearchSpace.cell_budgets`)
    with a :class:`CellSampler` (the cell's seed is ``search.seed`` + its index) and, unless
    ``search.pruner`` is ``none``, a :class:`CellPruner`. Returns it and the number of trials
    (the sum of the budgets, Tune's ``num_samples``)."""
    from tuner.spaces import cell_tag

    settings = space.search
    budgets = space.cell_budgets()
    tags = [cell_tag(cell) for cell, _, _ in budgets]
    sampler = CellSampler({tag: make_sampler(settings.sampler, settings.seed + i, max(budget, 1))
                           for i, (tag, (_, _, budget)) in enumerate(zip(tags, budgets))})
    pruner = (CellPruner({tag: make_pruner(settings.pruner, settings.grace_epochs,
                                           settings.max_epochs, settings.startup_trials)
                          for tag in tags})
              if settings.pruner != "none" else None)
    searcher = CellSearch(
        space=space.define_by_run(settings.sampler, settings.max_epochs, settings.seed),
        metric=space.objective, mode=space.mode, sampler=sampler, pruner=pruner,
        study_name=study_name, storage=storage,
        cells=[(tag, point, budget) for tag, (_, point, budget) in zip(tags, budgets)],
        first_points=[(cell_tag(cell), point) for cell, point in space.first_points()],
        **kwargs)
    return searcher, sum(budget for _, _, budget in budgets)


def _study_search(searcher: Any) -> StudySearch | None:
    """The :class:`StudySearch` under Tune's wrappers (``ConcurrencyLimiter``), if any."""
    while not isinstance(searcher, StudySearch) and hasattr(searcher, "searcher"):
        searcher = searcher.searcher
    return searcher if isinstance(searcher, StudySearch) else None


class StudySearchGenerator(SearchGenerator):
    """Tune's ``SearchGenerator`` (what Tune wraps a searcher in), for a search that its stopper
    (:class:`SearchBudget`) may end.

    Tune ends such a search by calling ``set_finished`` and then stopping every trial still
    running or pending, without telling the searcher. Here ``set_finished`` first tells each of
    those trials (:meth:`StudySearch.cut_open_trials`, through any ``ConcurrencyLimiter``, which
    would otherwise hold their slots forever), so that Optuna's states agree with MLflow's.
    Such an end is also not saved as the searcher's end: Tune's snapshot would carry it into a
    resumed search, which would then run no trial whatever budget it is given. A resumed search
    whose stopper still says stop is refused before it starts (:func:`tuner.search.run_search`).
    Only ``TuneController._stop_experiment_if_needed`` calls ``set_finished``: for our stopper,
    or for ``fail_fast`` / Tune's server, which this project uses neither of.

    An errored trial that ``--resume`` runs again (:meth:`StudySearch.reopen`) was not suggested
    in this run, so a ``ConcurrencyLimiter`` would drop its end (it passes on only the trials it
    holds as live) and leave its new Optuna trial RUNNING: once reopened, such a trial is added
    to the limiter's live trials, where it also counts towards ``max_concurrent`` like any other.
    """

    def __init__(self, searcher: Any) -> None:
        super().__init__(searcher)
        self._ended_by_stopper = False

    def _hold_reopened(self, trial_id: str) -> None:
        """Make the ``ConcurrencyLimiter`` (if any) hold a trial the study reopened."""
        study_search = _study_search(self.searcher)
        if study_search is None or study_search.optuna_trial(trial_id) is None:
            return
        wrapper = self.searcher
        while wrapper is not study_search:
            live = getattr(wrapper, "live_trials", None)
            if live is not None and trial_id not in live:
                live.add(trial_id)
                wrapper.num_unfinished_live_trials += 1
            wrapper = wrapper.searcher

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)  # reaches StudySearch, which may reopen it
        self._hold_reopened(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        study_search = _study_search(self.searcher)
        if study_search is not None and not error:
            study_search.reopen(trial_id)  # one that ends without a result after the resume
        self._hold_reopened(trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)

    def set_finished(self) -> None:
        study_search = _study_search(self.searcher)
        if study_search is not None:
            for trial_id, result in study_search.cut_open_trials():
                self.searcher.on_trial_complete(trial_id, result=result)
        self._ended_by_stopper = True
        super().set_finished()

    def get_state(self) -> dict:
        state = super().get_state()
        if self._ended_by_stopper:
            state["finished"] = False  # the stopper decides again when the search is resumed
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._ended_by_stopper = False


class OptunaPruningScheduler(FIFOScheduler):
    """Stops a trial when the Optuna pruner says so; FIFO otherwise.

    Tune calls the scheduler before the searcher for each result, so the value is reported to
    the Optuna trial here first. A retried trial is added again (``on_trial_add``): nothing here
    depends on being told once.
    """

    def __init__(self, searcher: StudySearch, metric: str) -> None:
        super().__init__()
        self.searcher = searcher
        self._metric = metric  # TrialScheduler exposes it as the read-only ``metric``

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        trial_id = trial.trial_id
        step = int(result.get("training_iteration", 0))
        if result.get("trial_status", "running") != "running":
            return TrialScheduler.CONTINUE  # the trial ends by itself on this report
        ot_trial = self.searcher.report(trial_id, result.get(self.metric), step)
        if ot_trial is None:
            return TrialScheduler.CONTINUE
        if ot_trial.should_prune():  # asks the pruner installed on the study
            self.searcher.pruned.add(trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        pruner = self.searcher.pruner
        if isinstance(pruner, CellPruner) and pruner.pruners:
            return (f"Using Optuna pruner {type(next(iter(pruner.pruners.values()))).__name__} "
                    "per cell.")
        return f"Using Optuna pruner {type(pruner).__name__}."


class SearchBudget(Stopper):
    """Ends the search after ``trial_epochs`` reported epochs over all trials, or (with
    ``metric`` and ``reach``) as soon as one report's ``metric`` is at or below ``reach``.

    A budget in trial-epochs rather than in trials is what lets a pruned search run more
    trials: a trial stopped after one epoch costs one. Trials still running when the budget is
    spent are stopped, like pruned ones (their MLflow status reads ``pruned``, their Optuna
    state is PRUNED: see :class:`StudySearchGenerator`).

    ``search`` names the search it belongs to. A resumed search continues with the stopper that
    Tune pickled in its experiment snapshot (with what it spent), not with one given to the
    resumed run; :meth:`resume_with` sets the ``trial_epochs`` that the restored stopper of a
    search takes instead of its own (the resumed run's ``--budget-trial-epochs``), as it is
    unpickled in this process.
    """

    #: trial_epochs for the stoppers of resumed searches, by search name (see resume_with)
    _resumed_limits: dict[str, int] = {}

    def __init__(self, trial_epochs: int | None = None, metric: str | None = None,
                 reach: float | None = None, search: str | None = None) -> None:
        if trial_epochs is not None and trial_epochs < 1:
            raise ValueError(f"trial_epochs: expected >= 1, got {trial_epochs}")
        if (metric is None) != (reach is None):
            raise ValueError("metric and reach go together")
        self.trial_epochs = trial_epochs
        self.metric = metric
        self.reach = reach
        self.search = search
        self.spent = 0
        self.reached = False
        #: the last training_iteration counted per running trial
        self._last_step: dict[str, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune pickles the stopper with the search: one from an older version lacks _last_step
        self.__dict__.update(state)
        self.__dict__.setdefault("_last_step", {})
        self.__dict__.setdefault("search", None)
        limit = SearchBudget._resumed_limits.get(self.search) if self.search else None
        if limit is not None:
            self.trial_epochs = limit

    @classmethod
    def resume_with(cls, search: str, trial_epochs: int | None) -> None:
        """Until the next call for ``search``, its stopper unpickled in this process (Tune's
        restore of a resumed search) counts to ``trial_epochs`` (None: its own budget again)."""
        if trial_epochs is None:
            cls._resumed_limits.pop(search, None)
        else:
            if trial_epochs < 1:
                raise ValueError(f"trial_epochs: expected >= 1, got {trial_epochs}")
            cls._resumed_limits[search] = trial_epochs

    def __call__(self, trial_id: str, result: dict) -> bool:
        step = result.get("training_iteration")
        # Tune hands the stopper a finished trial's last report once more (its closing ``done``
        # notice, RESULT_DUPLICATE): the same epoch, not another one
        repeated = step is not None and self._last_step.get(trial_id) == step
        if result.get("done"):
            self._last_step.pop(trial_id, None)
        else:
            self._last_step[trial_id] = step
        if repeated:
            return False
        self.spent += 1
        value = result.get(self.metric) if self.metric else None
        if self.reach is not None and _finite(value) and value <= self.reach:
            self.reached = True
        return False

    def stop_all(self) -> bool:
        return self.reached or (self.trial_epochs is not None and self.spent >= self.trial_epochs)

    def spent_note(self) -> str:
        """Why this stopper ends a search, as a user reads it (once ``stop_all()``)."""
        if self.reached:
            return f"a trial reached {self.metric} <= {self.reach:g}"
        return (f"its budget of {self.trial_epochs} trial-epochs is spent ({self.spent} epochs "
                "ran)")


def snapshot_stopper(experiment: str) -> Any:
    """The stopper in the newest experiment snapshot of a Tune experiment (a local folder or a
    URI): what ``Tuner.restore`` + ``fit`` will continue with (None if there is no snapshot).

    Tune keeps its stopper in the snapshot's controller state; it has no public reader, so this
    is the one place that reads that file (with Tune's own helpers). Unpickling a
    :class:`SearchBudget` here applies :meth:`SearchBudget.resume_with`, as Tune's restore will."""
    from ray.tune.execution.experiment_state import (_find_newest_experiment_checkpoint,
                                                     get_fs_and_path)
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    fs, path = get_fs_and_path(experiment)
    newest = _find_newest_experiment_checkpoint(path, fs=fs)
    if newest is None:
        return None
    with fs.open_input_stream(newest) as f:
        state = _loads_with_cloudpickle(f.readall())
    return (state.get("runner_data") or {}).get("_stopper")
