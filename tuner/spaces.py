"""Search spaces: YAML -> validated :class:`SearchSpace` -> an Optuna define-by-run space.

A space file (``search_spaces/NAME.yaml``)::

    name: smoke
    backbones: [ef_lstm, tfn]          # "backbone" is accepted too; a string means one
    regularisers: [none, mdm]
    data: synthetic:mosi               # or a path to an MMSA pickle / Parquet folder
    metric: valid_mae                  # validation metric; the trial's value is its best epoch
    mode: min                          # default: the metric's direction (valid_corr: max)
    grid:    {lr: [0.002, 0.001]}      # the paper's values exactly (sampler: grid)
    ranges:  {lr: {low: 1.0e-4, high: 5.0e-3, log: true}}   # for the other samplers
    fixed:   {batch_size: 32}
    search:  {sampler: tpe, pruner: median, num_samples: 8, max_epochs: 6, grace_epochs: 2}
                                       # trials_per_cell: N instead of num_samples: N per cell
    resources: {cpu: 1, gpu: 0}      # custom: {accel_a10g: 1} for custom Ray resources
    seeds: [0, 1, 2]                   # seeds of the multi-seed report
    cells: [backbone, regulariser, regulariser.estimator]   # the keys of a table row
    table: {test: mann_whitney}        # the table's test against the baseline (tuner.table)

Keys of ``grid``/``ranges``/``fixed`` are trial-config keys (``lr``, ``batch_size``...) or
``backbone.X`` / ``regulariser.X`` fields. A key applies to a trial when the trial's backbone or
regulariser has that field (``regulariser.weight`` is not sampled for ``none``); a trial key whose
effect depends on the regulariser (``unlabeled_rate``, ``unlabeled_source``: see
``Regulariser.trial_keys``) applies to the regularisers that read it, so ``none`` is not repeated
for every split rate. A key that applies to none of the space's models is an error, so typos fail
before Ray starts.

A regulariser field may be scoped to one regulariser: ``regulariser.alpha@mird`` (in ``grid``,
``ranges``, ``fixed``, ``start_points``, ``cells`` and ``--set``) applies only to trials whose
regulariser is ``mird``, and is Optuna's parameter name, so a space over several regularisers
gives each its own values of a field name they share (``alpha``: MMIM's CPC weight and MIRD's
CLUB weight; ``beta``: MMIM's and Synergy's; ``weight``: MDM's λ and the orthogonality weight).
The trial runs it as ``regulariser.alpha`` (:func:`trainables.config.resolve_scoped`), which is
also its MLflow param, its cell key and its name in the table. A regulariser's trial keys scope
the same way (``unlabeled_rate@mird``: MIRD's split-rate grid, not MDM's). A key given both ways
(``regulariser.alpha`` and ``regulariser.alpha@mird``) is an error.

A trial's *cell* is the row of its paper's table that it belongs to: the values of the space's
``cells`` keys (default ``[backbone, regulariser]``; MDM adds ``regulariser.estimator``, one row
per L_kl / L_f / L_W). A cell key that a pair does not read is not part of that pair's cell (the
``none`` baseline of a backbone is one cell). Cell keys other than backbone and regulariser must be
searched over a finite list (``grid``, or ``ranges`` choices) or fixed. Budgets, pruning and the
table's choice of a configuration are made per cell (:func:`cell_of`,
:meth:`SearchSpace.cells_of_space`): each cell gets its own trials (``search.trials_per_cell``, else ``num_samples`` shared out evenly;
the grid sampler: the cell's grid points, :meth:`SearchSpace.cell_budgets`), its own sampler, which
learns from its own trials only, and a pruner that compares a trial with its own cell's trials
(:class:`tuner.pruning.CellSearch`).

Only a validation metric selects (:data:`SELECTION_METRICS`: ``valid_`` + each key of
``trainables.metrics.compute_metrics``); ``train_*``, ``test_*`` or an unknown name is an error.
``mode`` defaults to the metric's direction (``valid_mae``: min, every other one: max). A mode
against that direction is an error unless it was chosen for this metric (the YAML sets both, or
``--set mode=...``): then :meth:`SearchSpace.selection_warning` says so, and the search prints it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainables.backbones import get_backbone
from trainables.config import (SCOPE, ConfigError, TrialConfig, build_dataclass, check_scoped_key,
                                split_scope)
from trainables.metrics import METRIC_NAMES, mode_for
from trainables.regularisers import get_regulariser
from trainables.regularisers.base import REGULARISER_TRIAL_KEYS

__all__ = [
    "SAMPLERS",
    "PRUNERS",
    "SELECTION_METRICS",
    "RangeSpec",
    "SearchSettings",
    "Resources",
    "SearchSpace",
    "TableSettings",
    "TABLE_TESTS",
    "SpaceError",
    "DEFAULT_CELL_KEYS",
    "Cell",
    "cell_of",
    "cell_label",
    "cell_tag",
    "parse_cell_tag",
    "short_key",
    "split_scope",
    "MAX_GRID_POINTS",
    "MAX_SEEDS",
    "check_name",
    "check_selection",
    "load_space",
    "space_path",
]

SAMPLERS = ("grid", "tpe", "random", "cmaes", "qmc")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "asha")
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
#: what may choose a trial's best epoch and the best trial: the validation metrics the loop
#: reports each epoch (never train_*, which measure fitting, nor test_*, computed once per trial)
SELECTION_METRICS: tuple[str, ...] = tuple(f"valid_{name}" for name in METRIC_NAMES)


#: the most trials a grid search may have (the grid's points over all backbone x regulariser
#: pairs, counted as the product of the list lengths, before anything is built)
MAX_GRID_POINTS = 10_000
#: the most values a space may hold once YAML aliases are expanded (a real space has a few
#: hundred; a 600-byte alias bomb has billions, and would explode in any repr or copy)
MAX_SPACE_VALUES = 10_000
#: the most seeds of a multi-seed report (each is two training runs)
MAX_SEEDS = 100
#: what a space name, a search name and a report name must look like: they become folder names
#: (Ray's storage, MLflow artifacts, reports/) and MLflow filter strings
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: Any, where: str) -> str:
    """``name`` if it matches :data:`NAME_PATTERN`, else a one-line SpaceError naming ``where``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if isinstance(name, str) and len(name) <= 120 else "that value"
        raise SpaceError(f"{where} {shown}: expected a name of letters, digits, '.', '_' and '-' "
                         "(1 to 100 characters, starting with a letter or digit): it becomes a "
                         "folder name and an MLflow filter")
    return name


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (of a value that :func:`count_values`
    bounds; another one too large to show is named by its type)."""
    if count_values(value, 1000) > 1000:
        return f"<a {type(value).__name__} of more than 1,000 values>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def cut(text: str, limit: int = 400) -> str:
    """``text`` cut to ``limit`` characters (a message that quotes a user's value)."""
    return text if len(text) <= limit else text[:limit] + "..."


def count_values(value: Any, limit: int = MAX_SPACE_VALUES) -> int:
    """The values in ``value`` (nested lists and mappings, each alias counted as often as it
    appears), counting only up to ``limit + 1``: a YAML alias bomb stops after ``limit`` steps."""
    seen, stack = 0, [value]
    while stack and seen <= limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return seen


class SpaceError(ValueError):
    """A search-space file that cannot be used; one line naming the file and key."""


#: the keys of a table row when a space names none
DEFAULT_CELL_KEYS: tuple[str, ...] = ("backbone", "regulariser")
#: a cell: ``((key, value text), ...)`` in the space's ``cells`` order, keys its pair does not read
#: left out; hashable, and the same whether built from a trial config or from MLflow params
Cell = tuple[tuple[str, str], ...]


def _cell_text(value: Any) -> str:
    # MLflow logs a param as ``str(value)`` (tracking._param_value); a cell built from a config
    # and one built from the logged params must compare equal
    return str(value)


def cell_of(params: dict[str, Any], cell_keys: "tuple[str, ...] | list[str]" = DEFAULT_CELL_KEYS) -> Cell:
    """The cell of one trial from its flat config or its MLflow params: ``(key, str(value))`` for
    each of ``cell_keys`` that the trial has. A key its pair does not read is absent from the
    trial's params (the space samples only keys that apply), so e.g. ``regulariser.estimator``
    is not part of a ``none`` trial's cell. A scoped cell key ``regulariser.X@R`` is part of the
    cells of ``R``'s trials only, as ``regulariser.X`` (its MLflow param's name): a cell is the
    same whichever form its space wrote."""
    missing = [k for k in ("backbone", "regulariser") if k not in params]
    if missing:
        raise KeyError(f"a trial's cell needs {', '.join(missing)}")
    out = []
    for key in cell_keys:
        base, scope = split_scope(key)
        if scope is None:
            if key in params:
                out.append((key, _cell_text(params[key])))
        elif str(params["regulariser"]) == scope and (key in params or base in params):
            out.append((base, _cell_text(params[key] if key in params else params[base])))
    return tuple(out)


def short_key(key: str) -> str:
    """A key as tables show it: ``regulariser.alpha@mird`` and ``regulariser.alpha`` -> ``alpha``,
    ``lr`` -> ``lr``."""
    base, _ = split_scope(key)
    return base.partition(".")[2] or base


def cell_label(cell: Cell) -> str:
    """``tfn + mdm (estimator=kl)``: the backbone, the regulariser and the other keys of the
    cell by their short names, for tables and messages."""
    values = dict(cell)
    rest = [f"{short_key(key)}={value}" for key, value in cell
            if key not in ("backbone", "regulariser")]
    text = f"{values.get('backbone')} + {values.get('regulariser')}"
    return f"{text} ({', '.join(rest)})" if rest else text


def cell_tag(cell: Cell) -> str:
    """The cell as one MLflow tag value: ``backbone=tfn,regulariser=mdm,regulariser.estimator=kl``
    (:func:`parse_cell_tag` reads it back)."""
    return ",".join(f"{key}={value}" for key, value in cell)


def parse_cell_tag(text: str) -> Cell:
    """The cell that :func:`cell_tag` wrote."""
    return tuple(tuple(item.split("=", 1)) for item in text.split(",") if item)  # type: ignore[misc]


def _direction(metric: str) -> str:
    return "lower" if mode_for(metric) == "min" else "higher"


def check_selection(metric: str, mode: str, mode_explicit: bool, where: str = "") -> str | None:
    """The selection rule: ``metric`` must be one of :data:`SELECTION_METRICS`, and ``mode`` its
    direction (:func:`trainables.metrics.mode_for`) unless ``mode_explicit``. Raises SpaceError
    (prefixed by ``where``); returns a warning for an explicit mode against the direction, else
    None."""
    if metric not in SELECTION_METRICS:
        raise SpaceError(f"{where}metric: {metric!r} is not a validation metric; trials and their "
                         f"best epochs are chosen by one of {', '.join(SELECTION_METRICS)}")
    natural = mode_for(metric)
    if mode == natural:
        return None
    if not mode_explicit:
        raise SpaceError(f"{where}mode: {mode} contradicts metric {metric}, which is better when "
                         f"{_direction(metric)} (mode {natural}); set mode: {natural}, or set "
                         f"mode: {mode} explicitly to select that way on purpose")
    return (f"{where}mode: {mode} with metric {metric}, which is better when {_direction(metric)}: "
            f"the {'lowest' if mode == 'min' else 'highest'} {metric} selects each trial's best "
            "epoch and the best trial (mode is set explicitly)")


@dataclass
class RangeSpec:
    """A continuous/integer range (``low``, ``high``, ``log``, ``step``) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None

    def validate(self) -> None:
        if self.choices is not None:
            if not self.choices:
                raise ConfigError("choices: expected a non-empty list")
            if self.low is not None or self.high is not None:
                raise ConfigError("give either choices or low/high, not both")
            return
        if self.low is None or self.high is None:
            raise ConfigError("expected low and high (or choices)")
        if not self.low <= self.high:
            raise ConfigError(f"expected low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"log ranges need low > 0, got {self.low}")


@dataclass
class SearchSettings:
    sampler: Literal["grid", "tpe", "random", "cmaes", "qmc"] = "tpe"
    pruner: Literal["none", "median", "successive_halving", "hyperband", "asha"] = "median"
    #: trials to run, shared out evenly over the space's cells (ignored by the grid sampler,
    #: which runs the whole grid, and when ``trials_per_cell`` is set)
    num_samples: int = 8
    #: trials each cell gets (TPE, random, CMA-ES, QMC): the search runs cells x this many
    #: trials instead of ``num_samples``; the grid sampler runs each cell's grid
    trials_per_cell: int | None = None
    max_epochs: int = 10
    #: a pruner may stop a trial once it has run this many epochs (not before)
    grace_epochs: int = 2
    #: the median pruner stops a trial only once this many trials of its cell have reported
    #: (Optuna's ``n_startup_trials``). 1: a cell's first trial is the reference of its second,
    #: so a cell of 2-3 trials can prune at all (with 2, a cell of 2 trials never prunes)
    startup_trials: int = 1
    #: seed of the sampler and of every trial
    seed: int = 0
    #: trials running at once (0 = as many as the resources allow)
    max_concurrent: int = 0
    #: start a trial in the worker process of a finished one (Ray Tune's ``reuse_actors``: skips
    #: the ~3 s of process start, imports and data fetch per trial); every trial seeds all RNGs
    #: and sets its threads itself, so results do not depend on it. ``auto``: on a local Ray
    #: only; on a cluster a lost node's idle workers would each take one of the retries of the
    #: trials moved off it. ``false``: a fresh process per trial (e.g. for a plugin model that
    #: keeps global state)
    reuse_workers: Literal["auto", True, False] = "auto"

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: expected >= 1, got {self.num_samples}")
        if self.trials_per_cell is not None and self.trials_per_cell < 1:
            raise ConfigError(f"trials_per_cell: expected >= 1, got {self.trials_per_cell}")
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs: expected >= 1, got {self.max_epochs}")
        if self.grace_epochs < 1:
            raise ConfigError(f"grace_epochs: expected >= 1, got {self.grace_epochs}")
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent: expected >= 0, got {self.max_concurrent}")
        if self.startup_trials < 0:
            raise ConfigError(f"startup_trials: expected >= 0, got {self.startup_trials}")


@dataclass
class Resources:
    #: CPUs per trial (also the trial's torch threads)
    cpu: float = 1.0
    #: GPUs per trial; fractions (0.25) pack trials on one GPU (accounting only, no isolation)
    gpu: float = 0.0
    #: custom Ray resources per trial, e.g. ``{accel_a10g: 1}`` for nodes started with
    #: ``ray start --resources='{"accel_a10g": 1}'`` (or a cluster.yaml node type's resources)
    custom: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.cpu <= 0:
            raise ConfigError(f"cpu: expected > 0, got {self.cpu}")
        if self.gpu < 0:
            raise ConfigError(f"gpu: expected >= 0, got {self.gpu}")
        for name, amount in self.custom.items():
            if not isinstance(name, str) or not name or name.lower() in ("cpu", "gpu", "memory",
                                                                        "custom_resources"):
                raise ConfigError(f"custom: expected custom resource names (cpu and gpu have "
                                  f"their own keys), got {name!r}")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ConfigError(f"custom.{name}: expected a number > 0, got {amount!r}")

    def ray_resources(self) -> dict[str, float]:
        """The trial's request for ``tune.with_resources``."""
        return {"cpu": self.cpu, "gpu": self.gpu, **{k: float(v) for k, v in self.custom.items()}}


#: the tests the table (:mod:`tuner.table`) can run against a backbone's ``none`` cell
TABLE_TESTS = ("mann_whitney", "paired_t")


@dataclass
class TableSettings:
    """How ``python -m tuner.report --table`` compares a cell with its backbone's ``none`` cell:
    the paper's own test (MDM, Table 1: two-sided Wilcoxon-Mann-Whitney over 10 seeds; MMIM,
    Table 2: a paired t-test; ``mann_whitney`` where a paper names none) and the level below
    which Holm's corrected p-value marks a cell significant."""

    test: Literal["mann_whitney", "paired_t"] = "mann_whitney"
    alpha: float = 0.05

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha: expected a level between 0 and 1, got {self.alpha}")


@dataclass
class SearchSpace:
    name: str
    backbones: list[str]
    regularisers: list[str]
    description: str = ""
    data: str = "synthetic:mosi"
    metric: str = "valid_mae"
    mode: Literal["min", "max"] = "min"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    ranges: dict[str, RangeSpec] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: Resources = field(default_factory=Resources)
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    #: configurations tried first, in order (e.g. a paper's best); unnamed keys are sampled
    start_points: list[dict[str, Any]] = field(default_factory=list)
    #: the keys that make a row of the paper's table (a trial's *cell*); see the module docstring
    cells: list[str] = field(default_factory=lambda: list(DEFAULT_CELL_KEYS))
    #: the table's statistics (:class:`TableSettings`)
    table: TableSettings = field(default_factory=TableSettings)
    #: where the space was read from (for messages and MLflow)
    source: str = ""
    #: whether ``mode`` was chosen for this metric (the YAML has the key, or ``--set mode=``)
    #: rather than derived from it; not a YAML key
    mode_explicit: bool = field(default=False, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- helpers
    @property
    def objective(self) -> str:
        """What Tune and Optuna optimise: the trial's best validation value so far."""
        return f"best_{self.metric}"

    @staticmethod
    def applies(key: str, backbone: str, regulariser: str) -> bool:
        """Whether ``key`` changes what a ``backbone`` x ``regulariser`` trial computes: a
        ``backbone.X`` / ``regulariser.X`` field of its config class; a trial key of
        :data:`~trainables.regularisers.base.REGULARISER_TRIAL_KEYS` (``unlabeled_rate``) when
        the regulariser lists it in ``trial_keys`` (``none`` reads no unlabeled row); any other
        trial key always. A scoped key ``regulariser.X@R`` applies to ``R``'s trials only (when
        ``R`` has the field)."""
        key, scope = split_scope(key)
        if scope is not None and scope != regulariser:
            return False
        head, dot, rest = key.partition(".")
        if not dot:
            if key in REGULARISER_TRIAL_KEYS:
                keys = getattr(get_regulariser(regulariser), "trial_keys", REGULARISER_TRIAL_KEYS)
                return key in keys
            return True
        cls = get_backbone(backbone) if head == "backbone" else get_regulariser(regulariser)
        return rest in {f.name for f in dataclasses.fields(cls.config_class)}

    def model_pairs(self) -> list[tuple[str, str]]:
        return list(itertools.product(self.backbones, self.regularisers))

    def cell(self, point: dict[str, Any]) -> Cell:
        """The cell of a trial of this space (its flat config or MLflow params)."""
        return cell_of(point, self.cells)

    def cell_values(self, key: str, sampler: str) -> list[Any]:
        """The values a cell key takes in this space under ``sampler`` (the grid's list for the
        grid sampler, else the ranges' choices or the grid's list; a fixed key's one value)."""
        if key in self.fixed:
            return [self.fixed[key]]
        spec = self.ranges.get(key) if sampler != "grid" else None
        if spec is not None:
            return list(spec.choices or [])
        return list(self.grid.get(key, []))

    def cells_of_space(self, sampler: str | None = None) -> list[Cell]:
        """Every cell this space can produce under ``sampler`` (default: the space's own), in
        backbone, regulariser, value order."""
        return [cell for cell, _ in self.cell_points(sampler)]

    def cell_points(self, sampler: str | None = None) -> list[tuple[Cell, dict[str, Any]]]:
        """:meth:`cells_of_space`, each cell with the point that pins it: backbone, regulariser
        and the other cell keys its pair reads, with the space's own (typed) values."""
        sampler = sampler or self.search.sampler
        out: dict[Cell, dict[str, Any]] = {}
        for backbone, reg in self.model_pairs():
            keys = [k for k in self.cells if k not in ("backbone", "regulariser")
                    and self.applies(k, backbone, reg)]
            for values in itertools.product(*(self.cell_values(k, sampler) for k in keys)):
                point = {"backbone": backbone, "regulariser": reg, **dict(zip(keys, values))}
                out.setdefault(self.cell(point), point)
        return list(out.items())

    def first_points(self, sampler: str | None = None) -> list[tuple[Cell, dict[str, Any]]]:
        """What a search runs first, in order, each point with its cell: the whole grid for the
        grid sampler (:meth:`grid_points`), else the start points. A start point that leaves a
        cell key open goes to the first cell that agrees with it (and whose pair reads all its
        keys), and is completed with that cell's values."""
        sampler = sampler or self.search.sampler
        cells = self.cell_points(sampler)
        points = self.grid_points() if sampler == "grid" else [dict(p) for p in self.start_points]
        out = []
        for point in points:
            match = next(((cell, {**pinned, **point}) for cell, pinned in cells
                          if all(point.get(k, v) == v for k, v in pinned.items())
                          and all(self.applies(k, pinned["backbone"], pinned["regulariser"])
                                  for k in point)), None)
            if match is None:
                raise SpaceError(f"{self.source or self.name}: start point {point} is in no cell "
                                 f"of this space ({', '.join(cell_label(c) for c, _ in cells)})")
            out.append(match)
        return out

    def cell_budgets(self, sampler: str | None = None) -> list[tuple[Cell, dict[str, Any], int]]:
        """The trials each cell gets, in :meth:`cell_points` order, with the point that pins it.

        Grid sampler: the cell's grid points. Otherwise ``search.trials_per_cell`` each when set,
        else ``search.num_samples`` shared out evenly (the first cells get one more when it does
        not divide). A cell runs at least its start points."""
        sampler = sampler or self.search.sampler
        cells = self.cell_points(sampler)
        firsts: dict[Cell, int] = {}
        for cell, _ in self.first_points(sampler):
            firsts[cell] = firsts.get(cell, 0) + 1
        per_cell = self.search.trials_per_cell
        base, extra = divmod(self.search.num_samples, len(cells))
        out = []
        for i, (cell, point) in enumerate(cells):
            if sampler == "grid":
                budget = firsts.get(cell, 0)
            else:
                budget = max(per_cell if per_cell else base + (i < extra), firsts.get(cell, 0))
            out.append((cell, point, budget))
        return out

    def grid_points(self) -> list[dict[str, Any]]:
        """The paper's grid, expanded per backbone x regulariser; keys that do not apply to a
        pair are left out, so ``none`` does not repeat for every λ. The grid point of each start
        point (the first one that agrees with all its keys) comes first, in ``start_points``
        order, so the grid sampler also tries e.g. a paper's best configuration first."""
        points = self._grid_points()
        first: list[int] = []
        for start in self.start_points:
            want = {"backbone": self.backbones[0], "regulariser": self.regularisers[0], **start}
            match = next((i for i, point in enumerate(points) if i not in first
                          and all(k in point and point[k] == v for k, v in want.items())), None)
            if match is not None:
                first.append(match)
        return [points[i] for i in first] + [p for i, p in enumerate(points) if i not in first]

    def _grid_points(self) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = []
        seen: set[tuple] = set()
        for backbone, reg in self.model_pairs():
            keys = [k for k in sorted(self.grid) if self.applies(k, backbone, reg)]
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = {"backbone": backbone, "regulariser": reg, **dict(zip(keys, values))}
                ident = tuple(sorted((k, repr(v)) for k, v in point.items()))
                if ident not in seen:
                    seen.add(ident)
                    points.append(point)
        return points

    def constants(self, backbone: str, regulariser: str, max_epochs: int, seed: int) -> dict[str, Any]:
        """Fixed values for one pair, plus what every trial needs from the space."""
        out = {k: v for k, v in self.fixed.items() if self.applies(k, backbone, regulariser)}
        # ``fixed.seed`` pins the trials' training seed (the sampler keeps ``search.seed``): every
        # trial of every sampler seed then trains the same way, e.g. to compare samplers
        out.setdefault("seed", seed)
        out.update({"max_epochs": max_epochs, "metric": self.metric, "mode": self.mode})
        return out

    def selection_warning(self) -> str | None:
        """The warning for an explicit mode against the metric's direction (None if none)."""
        return check_selection(self.metric, self.mode, self.mode_explicit,
                               f"{self.source or self.name}: ")

    def trial_config(self, point: dict[str, Any]) -> TrialConfig:
        """Validate one sampled point (raises ConfigError naming the key)."""
        return TrialConfig.from_flat(point)

    def check(self) -> None:
        """Validate names and keys against the registries and config classes."""
        where = self.source or self.name
        check_selection(self.metric, self.mode, self.mode_explicit, f"{where}: ")
        for name in self.backbones:
            try:
                get_backbone(name)
            except ValueError as exc:
                raise SpaceError(f"{where}: backbones: {exc}") from None
        for name in self.regularisers:
            try:
                get_regulariser(name)
            except ValueError as exc:
                raise SpaceError(f"{where}: regularisers: {exc}") from None
        trial_keys = sorted(f.name for f in dataclasses.fields(TrialConfig)
                            if f.name not in ("backbone_cfg", "regulariser_cfg"))
        self._check_scoped(where)
        for section in ("grid", "ranges", "fixed"):
            for key in getattr(self, section):
                if "." not in key and split_scope(key)[0] not in trial_keys:
                    raise SpaceError(f"{where}: {section}.{key}: unknown key; known: "
                                     f"{', '.join(trial_keys)}, backbone.X, regulariser.X")
                pairs = self.model_pairs()
                if "." not in key and not any(self.applies(key, b, r) for b, r in pairs):
                    raise SpaceError(
                        f"{where}: {section}.{key}: no regulariser of this space "
                        f"({', '.join(self.regularisers)}) reads it (it only matters for "
                        "regularisers with terms on unlabeled rows, e.g. mird, orthogonal)")
                if not any(self.applies(key, b, r) for b, r in self.model_pairs()):
                    raise SpaceError(
                        f"{where}: {section}.{key}: no backbone ({', '.join(self.backbones)}) or "
                        f"regulariser ({', '.join(self.regularisers)}) of this space has that field"
                    )
                if section == "grid" and not getattr(self, section)[key]:
                    raise SpaceError(f"{where}: grid.{key}: expected a non-empty list")
        sampled = {"backbone", "regulariser", *self.grid, *self.ranges}
        for i, point in enumerate(self.start_points):
            if not isinstance(point, dict):
                raise SpaceError(f"{where}: start_points[{i}]: expected a mapping, got {point!r}")
            for key in point:
                if key not in sampled:
                    raise SpaceError(f"{where}: start_points[{i}].{key}: not a searched key "
                                     f"(known: {', '.join(sorted(sampled))})")
            if point.get("backbone", self.backbones[0]) not in self.backbones or point.get(
                    "regulariser", self.regularisers[0]) not in self.regularisers:
                raise SpaceError(f"{where}: start_points[{i}]: backbone/regulariser not in "
                                 "this space")
        for key in self.fixed:
            if key in self.grid or key in self.ranges:
                raise SpaceError(f"{where}: fixed.{key}: also in grid/ranges; a key is either "
                                 "fixed or searched")
        self._check_cells(where)
        if self.search.sampler == "grid":
            size = self.grid_size()
            if size > MAX_GRID_POINTS:
                raise SpaceError(
                    f"{where}: grid: {size:,} points (the product of the grid's list lengths, per "
                    f"backbone x regulariser) is more than the {MAX_GRID_POINTS:,} trials a grid "
                    "search may run; use fewer values (or --backbone/--regulariser), or a sampler "
                    "that draws from the grid, e.g. --sampler tpe --num-samples N")
        self.first_points()  # every start point lies in a cell
        # every pair must build with the fixed values and one value of each sampled key
        for backbone, reg in self.model_pairs():
            point = {"backbone": backbone, "regulariser": reg,
                     **self.constants(backbone, reg, self.search.max_epochs, self.search.seed)}
            for key, values in self.grid.items():
                if self.applies(key, backbone, reg):
                    point[key] = values[0]
            for key, spec in self.ranges.items():
                if self.applies(key, backbone, reg):
                    point[key] = spec.choices[0] if spec.choices is not None else (
                        int(spec.low) if spec.type == "int" else spec.low)
            try:
                self.trial_config(point)
            except (ConfigError, ValueError) as exc:
                raise SpaceError(f"{where}: {backbone} + {reg}: {cut(str(exc))}"
                                 ) from None
            # every other grid value too (a grid trial may get any of them)
            for key, values in self.grid.items():
                if not self.applies(key, backbone, reg):
                    continue
                for i, value in enumerate(values[1:], 1):
                    try:
                        self.trial_config({**point, key: value})
                    except (ConfigError, ValueError) as exc:
                        raise SpaceError(f"{where}: grid.{key}[{i}] ({backbone} + {reg}): "
                                         f"{cut(str(exc))}") from None

    def _check_scoped(self, where: str) -> None:
        """Scoped keys (``regulariser.X@R``, ``unlabeled_rate@R``): ``R`` a regulariser of this
        space that has the key, and the key not also given unscoped (in any section)."""
        sections = [(s, list(getattr(self, s))) for s in ("grid", "ranges", "fixed")]
        sections.append(("cells", [k for k in self.cells if SCOPE in k]))
        for section, keys in sections:
            for key in keys:
                if SCOPE not in key:
                    continue
                try:
                    base, scope = check_scoped_key(key)
                except ConfigError as exc:
                    raise SpaceError(f"{where}: {section}.{key}: {exc}") from None
                if scope not in self.regularisers:
                    raise SpaceError(f"{where}: {section}.{key}: regulariser {scope!r} is not in "
                                     f"this space ({', '.join(self.regularisers)})")
                if section == "cells":
                    continue
                plain = next((f"{s}.{base}" for s in ("grid", "ranges", "fixed")
                              if base in getattr(self, s)), None)
                if plain is not None:
                    raise SpaceError(f"{where}: {section}.{key}: {plain} sets the same key of "
                                     f"{scope!r} trials; give one of them")

    def _check_cells(self, where: str) -> None:
        if not isinstance(self.cells, list) or not all(isinstance(k, str) for k in self.cells):
            raise SpaceError(f"{where}: cells: expected a list of keys, got {self.cells!r}")
        bases = [split_scope(k)[0] for k in self.cells]
        if self.cells[:2] != list(DEFAULT_CELL_KEYS) or len(set(bases)) != len(bases):
            raise SpaceError(f"{where}: cells: expected [backbone, regulariser, ...] without "
                             f"repeats, got {self.cells!r}")
        trial_keys = {f.name for f in dataclasses.fields(TrialConfig)}
        for key in self.cells[2:]:
            known = (any(self.applies(key, b, r) for b, r in self.model_pairs()) if "." in key
                     else key in trial_keys)
            if not known:
                raise SpaceError(f"{where}: cells: {key!r} is not a field of any backbone or "
                                 "regulariser of this space, nor a trial key")
            spec = self.ranges.get(key)
            if key not in self.fixed and key not in self.grid and (spec is None or spec.choices is None):
                raise SpaceError(f"{where}: cells: {key!r} must be fixed or searched over a list "
                                 "(grid, or ranges choices): a table row is one value of it")
            if key in self.grid and spec is not None and spec.choices is None:
                raise SpaceError(f"{where}: cells: {key!r} has a continuous range; give "
                                 f"ranges.{key} as a list of choices")

    def define_by_run(self, sampler: str, max_epochs: int, seed: int) -> "DefineByRun":
        """An Optuna define-by-run function for OptunaSearch (conditional keys per model)."""
        return DefineByRun(self, use_ranges=sampler != "grid", max_epochs=max_epochs, seed=seed)

    def grid_size(self) -> int:
        """The grid's points, counted without building them: per backbone x regulariser pair, the
        product of the numbers of distinct values of the grid keys that apply to the pair
        (what :meth:`grid_points` would return)."""
        total = 0
        for backbone, reg in dict.fromkeys(self.model_pairs()):
            total += math.prod(len({repr(v) for v in self.grid[k]}) for k in self.grid
                               if self.applies(k, backbone, reg))
        return total


@dataclass
class DefineByRun:
    """Samples one trial's config: backbone, regulariser, then every key that applies to them.

    A picklable object rather than a closure, because Tune checkpoints the searcher with it
    (a resumed search restores it).
    """

    space: SearchSpace
    use_ranges: bool
    max_epochs: int
    seed: int

    def __call__(self, trial) -> dict[str, Any]:
        space = self.space
        backbone = trial.suggest_categorical("backbone", list(space.backbones))
        reg = trial.suggest_categorical("regulariser", list(space.regularisers))
        keys = sorted(set(space.grid) | (set(space.ranges) if self.use_ranges else set()))
        for key in keys:
            if not space.applies(key, backbone, reg):
                continue
            spec = space.ranges.get(key) if self.use_ranges else None
            if spec is None:
                trial.suggest_categorical(key, list(space.grid[key]))
            elif spec.choices is not None:
                trial.suggest_categorical(key, list(spec.choices))
            elif spec.type == "int":
                trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log,
                                  step=int(spec.step or 1))
            else:
                trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)
        return space.constants(backbone, reg, self.max_epochs, self.seed)


def space_path(name_or_path: str) -> Path:
    """``smoke`` -> search_spaces/smoke.yaml (next to the package, or in the working directory);
    an existing file path is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SpaceError(f"{name_or_path}: no such search-space file")
        return candidate
    for root in (SPACES_DIR, Path.cwd() / "search_spaces"):
        path = root / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) if SPACES_DIR.is_dir() else []
    raise SpaceError(f"unknown search space {name_or_path!r}; known: {', '.join(known) or '(none)'}"
                     " (or pass a path to a YAML file)")


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise SpaceError(f"{where}: expected a name or a non-empty list of names, got {value!r}")


def space_from_dict(raw: Any, source: str) -> SearchSpace:
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if count_values(raw) > MAX_SPACE_VALUES:
        raise SpaceError(f"{source}: more than {MAX_SPACE_VALUES:,} values once YAML aliases are "
                         "expanded (an alias bomb?); a search space has a few hundred")
    raw = dict(raw)
    for singular, plural in (("backbone", "backbones"), ("regulariser", "regularisers")):
        if singular in raw:
            if plural in raw:
                raise SpaceError(f"{source}: give {singular!r} or {plural!r}, not both")
            raw[plural] = raw.pop(singular)
    for key in ("backbones", "regularisers"):
        if key not in raw:
            raise SpaceError(f"{source}: missing key {key!r}")
        raw[key] = _as_list(raw[key], f"{source}: {key}")
    raw.setdefault("name", Path(source).stem)
    check_name(raw["name"], f"{source}: name")
    try:
        if "ranges" in raw:
            if not isinstance(raw["ranges"], dict):
                raise ConfigError(f"ranges: expected a mapping, got {raw['ranges']!r}")
            raw["ranges"] = {
                k: build_dataclass(RangeSpec, v if isinstance(v, dict) else {"choices": v},
                                   f"ranges.{k}")
                for k, v in raw["ranges"].items()
            }
        for key, cls in (("search", SearchSettings), ("resources", Resources),
                         ("table", TableSettings)):
            if key in raw:
                if not isinstance(raw[key], dict):
                    raise ConfigError(f"{key}: expected a mapping, got {raw[key]!r}")
                raw[key] = build_dataclass(cls, raw[key], key)
        if "grid" in raw:
            if not isinstance(raw["grid"], dict):
                raise ConfigError(f"grid: expected a mapping, got {raw['grid']!r}")
            for k, v in raw["grid"].items():
                if not isinstance(v, list) or not v:
                    raise ConfigError(f"grid.{k}: expected a non-empty list, got {short(v)}")
        if "cells" in raw:
            raw["cells"] = _as_list(raw["cells"], f"{source}: cells")
        if "seeds" in raw and (not isinstance(raw["seeds"], list) or not raw["seeds"]
                               or len(raw["seeds"]) > MAX_SEEDS
                               or not all(type(v) is int for v in raw["seeds"])):
            raise ConfigError(f"seeds: expected a non-empty list of at most {MAX_SEEDS} integers, "
                              f"got {short(raw['seeds'])}")
        space = build_dataclass(SearchSpace, {**raw, "source": source})
    except ConfigError as exc:
        raise SpaceError(f"{source}: {exc}") from None
    space.mode_explicit = "mode" in raw
    if not space.mode_explicit and space.metric in SELECTION_METRICS:
        space.mode = mode_for(space.metric)
    space.check()
    return space


def load_space(name_or_path: str) -> SearchSpace:
    path = space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise SpaceError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return space_from_dict(raw, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``--set key=value``: the value is parsed as YAML (numbers, lists, true/false)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise SpaceError(f"--set {text!r}: expected key=value, e.g. --set fixed.batch_size=64")
    return key.strip(), yaml.safe_load(value)


def narrow(space: SearchSpace, backbones: list[str] | None = None,
           regularisers: list[str] | None = None) -> tuple[SearchSpace, list[str]]:
    """``space`` restricted to some of its backbones / regularisers (``--backbone``,
    ``--regulariser``). The space was checked as written (typos are errors); keys that apply to
    no remaining backbone x regulariser pair are dropped, and start points of removed models are
    dropped. Returns the narrowed space and the dropped keys (``section.key``), for the plan."""
    for flag, key, chosen in (("backbone", "backbones", backbones), ("regulariser", "regularisers", regularisers)):
        missing = [c for c in chosen or [] if c not in getattr(space, key)]
        if missing:
            raise SpaceError(f"--{flag} {missing[0]}: not in space {space.name!r} "
                             f"({', '.join(getattr(space, key))})")
    kept_b = list(backbones or space.backbones)
    kept_r = list(regularisers or space.regularisers)
    pairs = list(itertools.product(kept_b, kept_r))
    dropped: list[str] = []
    sections = {}
    for section in ("grid", "ranges", "fixed"):
        values = {}
        for key, value in getattr(space, section).items():
            if any(SearchSpace.applies(key, b, r) for b, r in pairs):
                values[key] = value
            else:
                dropped.append(f"{section}.{key}")
        sections[section] = values
    sampled = {"backbone", "regulariser", *sections["grid"], *sections["ranges"]}
    starts = []
    for point in space.start_points:
        if point.get("backbone", kept_b[0]) in kept_b and point.get("regulariser", kept_r[0]) in kept_r:
            kept = {k: v for k, v in point.items() if k in sampled}
            if kept:
                starts.append(kept)
    cells = [k for k in space.cells if k in DEFAULT_CELL_KEYS or "." not in k
             or any(SearchSpace.applies(k, b, r) for b, r in pairs)]
    narrowed = dataclasses.replace(space, backbones=kept_b, regularisers=kept_r, start_points=starts,
                                   cells=cells, **sections)
    narrowed.mode_explicit = space.mode_explicit  # replace() leaves init=False fields at default
    narrowed.check()
    return narrowed, dropped


def apply_overrides(space: SearchSpace, overrides: list[str]) -> SearchSpace:
    """Apply ``--set section.key=value`` overrides (e.g. ``fixed.lr=0.001``,
    ``grid.regulariser.weight=[1,0.1]``, ``search.pruner=none``) and re-validate."""
    if not overrides:
        return space
    raw = dataclasses.asdict(space)
    raw["ranges"] = {k: {f: v for f, v in r.items() if v is not None and not (f == "log" and v is False)
                         and not (f == "type" and v == "float")}
                     for k, r in raw["ranges"].items()}
    source = raw.pop("source")
    raw.pop("mode_explicit")
    set_keys: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        set_keys[key] = value
        section, dot, rest = key.partition(".")
        if section in ("grid", "ranges", "fixed", "search", "resources", "table") and dot:
            raw[section][rest] = value
        elif not dot and section in raw:
            raw[section] = value
        else:
            raise SpaceError(
                f"--set {key}: expected a space key (name, data, metric, mode, seeds, backbones, "
                "regularisers) or grid.K / ranges.K / fixed.K / search.K / resources.K / table.K"
            )
    if "mode" not in set_keys:
        metric = set_keys.get("metric", space.metric)
        if not space.mode_explicit:
            raw.pop("mode")  # derived from the metric, which may have changed
        elif (metric != space.metric and metric in SELECTION_METRICS
              and mode_for(metric) != space.mode):
            # the YAML's mode was chosen for its own metric, not for this one
            raise SpaceError(f"{source}: --set metric={metric}: the space's mode {space.mode} was "
                             f"set for metric {space.metric}, but {metric} is better when "
                             f"{_direction(metric)}; add --set mode={mode_for(metric)} (or --set "
                             f"mode={space.mode} to select that way on purpose)")
    return space_from_dict(raw, source)

