"""How much cheaper than the paper's grid is TPE + pruning at finding as good a configuration?

Runs the MDM grid (lr × λ × estimator, one backbone by default) exhaustively, then the smart
search (TPE + ASHA pruning by default) on the same space under a budget of trial-epochs, once
per seed, all through ``tuner.search`` on local Ray, and reports the trial-epochs (and wall time)
each needed to reach a configuration within 1% of the grid's best validation MAE. The grid needs
all of its trial-epochs to know its best; the smart search is charged every epoch any of its
trials reported up to the report that first came within 1% (epochs reported by trials running
beside it included). Every trial of every search trains with the same seed (``--train-seed``,
the grid's), so all searches optimise the same objective; only the samplers' seeds differ.
Because the grid's best is a minimum over many noisy trainings, the configuration each search
chose is also re-trained with other seeds (``--noise-seeds``): the spread says how much of the
1% is noise, and the means compare what each search would hand its user.

    python bench/search_efficiency.py                       # ef_lstm, MOSI-sized synthetic set
    python bench/search_efficiency.py --grid-from bench_out/search_efficiency/grid-X.json
    python bench/search_efficiency.py --seeds 0 1 2 --pruner median --grace 2

Every run that trains the grid stores it as ``grid-<stamp>.json`` in the work folder; pass it to
``--grid-from`` to reuse it (same backbone, epochs, data and overrides, checked).
Target (issue 6): the smart search needs <= 20% of the grid's trial-epochs. Trial-epochs do not
depend on the machine's load; wall times do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

STORE_VERSION = 1


@dataclass
class Trial:
    """One trial of a search as MLflow recorded it."""

    params: dict[str, str]
    status: str
    #: (timestamp in s, epoch, best validation value so far), one per epoch, in epoch order
    history: list[tuple[float, int, float]]

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def best(self) -> float:
        return min(v for _, _, v in self.history)


@dataclass
class SearchResult:
    """A finished search: when it started (s since the epoch), its wall time and its trials."""

    name: str
    started: float
    wall: float
    trials: list[Trial] = field(default_factory=list)
    #: the CPUs of the Ray it ran on (None: not recorded, e.g. a search stored before it was)
    cpus: float | None = None

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def best(self) -> float:
        return min(t.best for t in self.trials)

    @property
    def pruned(self) -> int:
        return sum(t.status == "pruned" for t in self.trials)

    def reach(self, target: float) -> tuple[int | None, float | None]:
        """Trial-epochs and seconds (from the start) until the first report at or below
        ``target``, counting every epoch any trial reported up to then; (None, None) if never."""
        events = sorted((ts, value) for t in self.trials for ts, _, value in t.history)
        for spent, (ts, value) in enumerate(events, start=1):
            if value <= target:
                return spent, ts - self.started
        return None, None

    def best_trial(self) -> Trial:
        return min(self.trials, key=lambda t: t.best)


def trial_curves(client: MlflowClient, experiment_id: str, search: str,
                 metric: str = "best_valid_mae") -> list[Trial]:
    """Each trial of a search: its params, status and per-epoch ``metric`` (one per epoch: a
    trial retried from a checkpoint re-reports epochs; the first report of each is kept)."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.search = '{search}' and tags.run_kind = 'trial'",
                              max_results=5000)
    trials = []
    for run in runs:
        per_step: dict[int, tuple[float, int, float]] = {}
        for m in sorted(client.get_metric_history(run.info.run_id, metric),
                        key=lambda m: m.timestamp):
            per_step.setdefault(m.step, (m.timestamp / 1000, m.step, m.value))
        if per_step:
            trials.append(Trial(params=dict(run.data.params),
                                status=run.data.tags.get("status", "?"),
                                history=[per_step[s] for s in sorted(per_step)]))
    return trials


@contextlib.contextmanager
def local_ray():
    """A fresh local Ray for one search (each pays Ray's start), shut down after; an already
    running Ray (the tests' fixture) is used as it is. ``address="local"``: never join a cluster
    that another user's ``ray start`` left as the machine's current one."""
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
    try:
        yield
    finally:
        if own:
            ray.shutdown()


def search_args(common: list[str], extra: list[str], name: str) -> argparse.Namespace:
    from tuner.search import build_parser

    return build_parser().parse_args(common + extra + ["--name", name])


def read_search(name: str, experiment: str = "mdm", metric: str = "best_valid_mae") -> SearchResult:
    """A finished search of the working folder's MLflow store: its start and wall time from the
    parent run (which starts before Ray does), its trials from the child runs."""
    client = MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id], filter_string=f"tags.search = '{name}' and tags.run_kind = 'search'")
    if not runs:
        raise SystemExit(f"no search named {name!r} in {Path('mlflow.db').resolve()}")
    parent = runs[0].info
    trials = trial_curves(client, parent.experiment_id, name, metric)
    started = parent.start_time / 1000
    # a search that was stopped (killed) has no end: it ran until its last report
    end = parent.end_time / 1000 if parent.end_time else max(
        (ts for t in trials for ts, _, _ in t.history), default=started)
    return SearchResult(name, started, end - started, trials)


def run_search(common: list[str], extra: list[str], name: str, stop_at: float | None = None,
               budget: int | None = None) -> SearchResult:
    """One search through ``tuner.search`` (its own local Ray), read back from the MLflow store
    in the working folder. ``budget``: trial-epochs at most; ``stop_at``: end it once a trial's
    best validation value is at or below this."""
    from tuner.pruning import SearchBudget
    from tuner.search import prepare_space, resolve_data
    from tuner.search import run_search as tuner_run_search

    args = search_args(common, extra, name)
    space = prepare_space(args)
    data = resolve_data(space.data)
    stop = None
    if budget is not None or stop_at is not None:
        stop = SearchBudget(trial_epochs=budget, metric=space.objective if stop_at else None,
                            reach=stop_at)
    import ray

    with local_ray():
        code = tuner_run_search(space, data, args, stop=stop)
        cpus = ray.cluster_resources().get("CPU")
    if code != 0:
        raise SystemExit(f"search {name} failed (exit {code})")
    result = read_search(name, space.name, space.objective)
    result.cpus = cpus
    return result


# -- searches stored as JSON, to reuse ------------------------------------------------------------

def grid_meta(args: argparse.Namespace) -> dict[str, Any]:
    """What a stored search must match to be compared with this run."""
    return {"version": STORE_VERSION, "space": "mdm", "backbone": args.backbone,
            "data": args.data, "max_epochs": args.max_epochs, "set": list(args.set),
            "train_seed": args.train_seed}


def save_search(path: Path, meta: dict[str, Any], result: SearchResult,
                flags: list[str] | None = None) -> Path:
    """Store a search (its settings, the flags that made it, its trials) for --grid-from and
    --smart-from."""
    path.write_text(json.dumps({"meta": meta, "flags": flags or [], "search": asdict(result)},
                               indent=1) + "\n")
    print(f"Stored search {result.name} as {path.resolve()}", flush=True)
    return path


def load_search(path: Path, meta: dict[str, Any], flag: str = "--grid-from") -> SearchResult:
    """A search stored by an earlier run; a mismatch of its settings is one clear error."""
    try:
        raw = json.loads(Path(path).read_text())
        stored, search = raw["meta"], raw["search"]
        trials = [Trial(t["params"], t["status"], [tuple(h) for h in t["history"]])
                  for t in search["trials"]]
        result = SearchResult(search["name"], search["started"], search["wall"], trials,
                              search.get("cpus"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{flag} {path}: not a stored search ({exc})") from None
    for key, value in meta.items():
        if stored.get(key) != value:
            raise SystemExit(f"{flag} {path}: {key} is {stored.get(key)!r} there, "
                             f"{value!r} here; run it again or pass the same settings")
    return result


# -- the noise of the grid's best ----------------------------------------------------------------

def chosen_point(space, trial: Trial) -> dict[str, Any]:
    """The sampled values (typed) of a trial, from its MLflow params (strings): the grid point
    it came from, or the values a sampler drew from the space's ``ranges``."""
    from tuner.tracking import parse_param

    params = trial.params
    point: dict[str, Any] = {"backbone": params["backbone"], "regulariser": params["regulariser"]}
    for key in sorted(set(space.grid) | set(space.ranges)):
        if not space.applies(key, point["backbone"], point["regulariser"]):
            continue
        if key not in params:
            raise SystemExit(f"the chosen trial has no param {key!r}: {params}")
        point[key] = value = parse_param(params[key])
        spec = space.ranges.get(key)
        if (spec is None or spec.choices is not None) and value not in [
                *space.grid.get(key, []), *(spec.choices if spec else [])]:
            raise SystemExit(f"the chosen trial's {key}={params[key]!r} is not in the space")
    return point


def reseed(common: list[str], point: dict[str, Any], seeds: list[int]) -> list[float]:
    """Best validation value of a configuration trained once per seed (Ray runs them side by
    side, through the same trainable as the search)."""
    from ray import tune

    from trainables.trainable import train_fusion
    from tuner.search import prepare_space, resolve_data

    space = prepare_space(search_args(common, [], "reseed"))
    data = resolve_data(space.data)
    config = {**point, **space.constants(point["backbone"], point["regulariser"],
                                         space.search.max_epochs, seeds[0])}
    config["seed"] = tune.grid_search(list(seeds))
    with local_ray():
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(train_fusion, data=data),
                                {"cpu": space.resources.cpu}),
            param_space=config,
            run_config=tune.RunConfig(storage_path=str(Path("ray_results").resolve()),
                                      name=f"reseed-{time.strftime('%Y%m%d-%H%M%S')}",
                                      verbose=0))
        results = tuner.fit()
    return [r.metrics[space.objective] for r in sorted(results, key=lambda r: r.config["seed"])]


# -- the report -----------------------------------------------------------------------------------

def fmt(value: float | int | None, spec: str = "") -> str:
    return "not reached" if value is None else format(value, spec)


def spread(values: list[float]) -> str:
    """median [min–max] of the values that exist; how many did not."""
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    if not got:
        return "not reached"
    text = f"{statistics.median(got):.0f} [{min(got):.0f}–{max(got):.0f}]"
    return text + (f", {missing} of {len(values)} not reached" if missing else "")


def describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in point.items() if k != "backbone")


def retrained_lines(retrained: list[tuple[str, dict[str, Any], list[float]]], seeds: list[int],
                    train_seed: int, target: float) -> list[str]:
    """The configuration each search chose, re-trained with other seeds: the fair comparison
    (a search's best value is one lucky draw; its choice is what a user keeps)."""
    lines = ["", f"The configuration each search chose (by its best validation MAE, training "
             f"seed {train_seed}), re-trained with seeds {' '.join(map(str, seeds))}:", "",
             "| search | chosen configuration | best valid MAE per seed | mean ± std |",
             "| --- | --- | --- | --- |"]
    for label, point, values in retrained:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {label} | {describe(point)} | {' '.join(f'{v:.4f}' for v in values)} | "
                     f"{statistics.mean(values):.4f} ± {std:.4f} |")
    grid_values = retrained[0][2]
    grid_mean = statistics.mean(grid_values)
    within = sum(v <= target for v in grid_values)
    lines.append("")
    lines.append(f"{within} of {len(grid_values)} re-trainings of the grid's own choice are "
                 f"within 1% of the grid's best (<= {target:.4f}).")
    if len(retrained) > 1:
        as_good = [label for label, _, values in retrained[1:]
                   if statistics.mean(values) <= grid_mean * 1.01]
        lines.append(f"Chosen configurations whose mean is within 1% of the grid's choice "
                     f"({grid_mean:.4f} -> <= {grid_mean * 1.01:.4f}) or better: "
                     f"{len(as_good)} of {len(retrained) - 1} smart searches"
                     f"{' (' + ', '.join(as_good) + ')' if as_good else ''}.")
    return lines


def machine() -> str:
    return (f"{platform.node()}, {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


def common_args(args: argparse.Namespace) -> list[str]:
    """The flags both searches share (space, data, epochs, overrides)."""
    data = args.data if args.data.startswith("synthetic:") else str(Path(args.data).resolve())
    common = ["--space", "mdm", "--backbone", args.backbone, "--data", data,
              "--max-epochs", str(args.max_epochs), "--set", f"fixed.patience={args.max_epochs}",
              "--set", f"fixed.seed={args.train_seed}"]
    for override in args.set:
        common += ["--set", override]
    return common


def add_grid_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the grid (shared with bench/search_speed.py)."""
    p.add_argument("--backbone", default="ef_lstm")
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--set", action="append", default=[],
                   help="extra space overrides for every search (e.g. fixed.batch_size=64)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="every trial of every search trains with this seed (fixed.seed), so all "
                        "searches optimise the same objective as the grid; the sampler seeds "
                        "vary (--seeds)")
    p.add_argument("--grid-from", type=Path,
                   help="a grid-*.json stored by an earlier run (same settings): reuse its trials "
                        "instead of training the grid again")
    p.add_argument("--workdir", default="bench_out/search_efficiency",
                   help="where the MLflow/Optuna stores, Ray results and tables go")


def enter_workdir(args: argparse.Namespace) -> Path:
    """Resolve the paths the user gave, then work inside the work folder."""
    if args.grid_from is not None:
        args.grid_from = args.grid_from.resolve()
    if not args.data.startswith("synthetic:"):
        args.data = str(Path(args.data).resolve())
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    return workdir


def the_grid(args: argparse.Namespace, common: list[str], stamp: str) -> SearchResult:
    """The grid: loaded from --grid-from, else trained (and stored for the next run)."""
    meta = grid_meta(args)
    if args.grid_from is not None:
        return load_search(args.grid_from, meta)
    flags = ["--sampler", "grid", "--pruner", "none"]
    grid = run_search(common, flags, f"grid-{stamp}")
    save_search(Path(f"grid-{stamp}.json"), meta, grid, common + flags)
    return grid


def add_smart_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the smart search (shared with bench/search_speed.py)."""
    p.add_argument("--sampler", default="tpe", help="sampler of the smart search")
    p.add_argument("--pruner", default="asha", help="pruner of the smart search")
    p.add_argument("--grace", type=int, default=1,
                   help="epochs before pruning (ASHA's first rung; reduction factor 3)")
    p.add_argument("--num-samples", type=int, default=500,
                   help="trials at most per smart search (the budget usually ends it first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one search per seed of the sampler (trials train with --train-seed)")


def smart_flags(args: argparse.Namespace, seed: int) -> list[str]:
    """tuner.search flags of the smart search for one seed."""
    return ["--sampler", args.sampler, "--pruner", args.pruner, "--seed", str(seed),
            "--set", f"search.grace_epochs={args.grace}", "--num-samples", str(args.num_samples)]


def seeded_searches(kind: str, flags, args: argparse.Namespace, common: list[str], stamp: str,
                    budget: int, stop_at: float | None,
                    stored: list[Path] | None) -> list[SearchResult]:
    """Searches of one kind: loaded from ``stored`` JSON files, else one per seed of
    ``args.seeds`` with ``flags(seed)`` (each stored as ``{kind}-{stamp}-s{seed}.json``)."""
    meta = grid_meta(args)
    if stored:
        return [load_search(path, meta, f"--{kind}-from") for path in stored]
    results = []
    for seed in args.seeds:
        name = f"{kind}-{stamp}-s{seed}"
        result = run_search(common, flags(seed), name, stop_at=stop_at, budget=budget)
        save_search(Path(f"{name}.json"), {**meta, "budget": budget, "stop_at": stop_at}, result,
                    common + flags(seed))
        results.append(result)
    return results


def seed_of(result: SearchResult) -> str:
    """The seed in a stored search's name (``...-s3``), else ``?``."""
    head, _, tail = result.name.rpartition("-s")
    return tail if head and tail.isdigit() else "?"


def resolve_paths(paths: list[Path] | None) -> list[Path]:
    return [path.resolve() for path in paths or []]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_flags(p)
    add_smart_flags(p)
    p.add_argument("--budget", type=float, default=0.2,
                   help="trial-epochs each smart search may spend, as a fraction of the grid's "
                        "(default 0.2: the target)")
    p.add_argument("--budget-trial-epochs", type=int,
                   help="the same as a number of trial-epochs (needed with --smart-only)")
    p.add_argument("--full", action="store_true",
                   help="let each smart search spend its whole budget instead of ending at its "
                        "first trial within 1%% (slower; shows its best within the budget)")
    p.add_argument("--smart-only", action="store_true",
                   help="only run and store the smart searches (whole budget), e.g. beside a grid "
                        "that is still training; compare later with --smart-from")
    p.add_argument("--smart-from", type=Path, nargs="+",
                   help="smart-*.json stored by earlier runs: report them instead of searching")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2, 3, 4],
                   help="re-train the configuration each search chose with these seeds "
                        "(none: skip)")
    args = p.parse_args(argv)
    if args.smart_only and not args.budget_trial_epochs:
        p.error("--smart-only needs --budget-trial-epochs (there is no grid to take 20% of)")
    args.smart_from = resolve_paths(args.smart_from)

    workdir = enter_workdir(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = common_args(args)
    def flags(seed: int) -> list[str]:
        return smart_flags(args, seed)

    if args.smart_only:
        seeded_searches("smart", flags, args, common, stamp, args.budget_trial_epochs, None, None)
        return 0
    grid = the_grid(args, common, stamp)
    target = grid.best * 1.01
    budget = args.budget_trial_epochs or max(1, int(args.budget * grid.trial_epochs))
    smart = seeded_searches("smart", flags, args, common, stamp, budget,
                            None if args.full else target, args.smart_from)
    retrained: list[tuple[str, dict[str, Any], list[float]]] = []
    if args.noise_seeds:
        from tuner.search import prepare_space

        space = prepare_space(search_args(common, [], "grid"))
        for label_, result in [("grid", grid)] + [(f"smart s{seed_of(r)}", r) for r in smart]:
            point = chosen_point(space, result.best_trial())
            retrained.append((label_, point, reseed(common, point, args.noise_seeds)))

    label = f"{args.sampler.upper() if args.sampler == 'tpe' else args.sampler} + {args.pruner}"
    lines = [
        f"MDM space, backbone {args.backbone}, {args.max_epochs} epochs max, data {args.data}; "
        f"smart search: {label} (grace {args.grace}, reduction factor 3), budget {budget} "
        f"trial-epochs, {'whole budget' if args.full else 'ends at its first trial within 1%'}",
        f"Machine: {machine()}",
        "",
        "| search | seed | trials | trial-epochs run | trial-epochs to within 1% of grid best | "
        "best valid MAE | wall (s) | wall to within 1% (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| grid (exhaustive) | 0 | {len(grid.trials)} | {grid.trial_epochs} | "
        f"{grid.trial_epochs} | {grid.best:.4f} | {grid.wall:.0f} | {grid.wall:.0f} |",
    ]
    for result in smart:
        spent, seconds = result.reach(target)
        lines.append(f"| {label} | {seed_of(result)} | {len(result.trials)} "
                     f"({result.pruned} pruned) | "
                     f"{result.trial_epochs} | {fmt(spent)} | {result.best:.4f} | "
                     f"{result.wall:.0f} | {fmt(seconds, '.0f')} |")
    reached = [r.reach(target)[0] for r in smart]
    lines += ["", f"Target: within 1% of {grid.best:.4f}, i.e. valid MAE <= {target:.4f}; "
              f"20% of the grid is {int(0.2 * grid.trial_epochs)} trial-epochs."]
    if smart:
        fractions = [r / grid.trial_epochs if r is not None else None for r in reached]
        hit = sum(f is not None and f <= 0.2 for f in fractions)
        lines.append(f"Smart search over {len(smart)} seeds: trial-epochs to within 1% "
                     f"{spread(reached)} (median [min–max]); within 20% of the grid's "
                     f"trial-epochs in {hit} of {len(smart)} seeds.")
    if retrained:
        lines += retrained_lines(retrained, args.noise_seeds, args.train_seed, target)
    lines.append("Trial-epochs do not depend on the machine's load; wall times do.")
    print("\n".join(lines))
    (workdir / f"result-{stamp}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
