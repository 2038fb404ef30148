"""``python -m tuner.search --space NAME``: a hyperparameter search on Ray Tune + Optuna + MLflow.

Examples::

    python -m tuner.search --space smoke                      # the demo: local Ray, synthetic data
    python -m tuner.search --space smoke --num-samples 4 --max-epochs 3
    python -m tuner.search --space mdm --data ~/MOSI/unaligned_50.pkl --backbone tfn
    python -m tuner.search --space mdm --sampler grid --dry-run

Everything the user can get wrong (space file, flags, data) is checked before Ray starts and
reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from trainables.config import ConfigError, resolve_scoped
from trainables.data import DataError, MultimodalData
from tuner.preflight import (  # noqa: F401 - re-exported: the commands' shared pre-flight
    CONNECT_TIMEOUT_S, UsageError, _load_data, _OneLineParser, check_address, check_tracking_uri,
    exit_cli, init_ray, quiet_startup, ray_address, resolve_data, study_storage_for, warning_lines)
from tuner.redact import redact_uris
from tuner.spaces import (PRUNERS, SAMPLERS, SearchSpace, SpaceError, apply_overrides, cell_label,
                          NAME_PATTERN, check_name, load_space, narrow, split_scope)

__all__ = ["main", "build_parser", "resolve_data", "run_search"]

log = logging.getLogger("tuner.search")


#: Ray's smallest unit of a resource: smaller requests break Tune's trial start
RAY_RESOURCE_UNIT = 1e-4
def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m tuner.search",
        description="Hyperparameter search for MI-regularised multimodal fusion "
                    "(Ray Tune + Optuna sampling/pruning + MLflow tracking).",
        epilog="Example: python -m tuner.search --space smoke --num-samples 4 --max-epochs 3\n"
               "Pickles run code when loaded: only pass --data pickles you trust, or convert them "
               "once with `python -m tuner.data convert IN.pkl OUTDIR` and pass the Parquet folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True,
                   help="search space: a name in search_spaces/ (smoke, mdm, ...) or a YAML path")
    p.add_argument("--data", help="an MMSA pickle (aligned_50.pkl / unaligned_50.pkl), a Parquet "
                   "folder from `tuner.data convert`, or synthetic:mosi / synthetic:small "
                   "(default: the space's data, synthetic data generated on first use)")
    p.add_argument("--unlabeled", metavar="PATH",
                   help="unlabeled clips for MIRD's split rate s (unlabeled_rate), added as the "
                        "data's 'unlabeled' split: an MMSA pickle (its 'unlabeled' split, else its "
                        "'train' split; labels ignored), a .parquet file, or a Parquet folder (its "
                        "unlabeled.parquet, else train.parquet); widths must equal train's. "
                        "Default: the data's own 'unlabeled' split, if any")
    p.add_argument("--nonfinite", choices=("error", "zero"), default="error",
                   help="NaN/inf in features: stop with an error (default) or replace by 0 as "
                        "MMSA's loader does for -inf in MOSI audio")
    p.add_argument("--name", help="search name: the Ray experiment folder and the MLflow parent "
                   "run (default: SPACE-YYYYmmdd-HHMMSS)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's)")
    p.add_argument("--trials-per-cell", type=int, metavar="N",
                   help="trials for each cell (a row of the paper's table: backbone, regulariser, "
                        "and the space's other cells keys): cells x N trials instead of "
                        "--num-samples (default: the space's search.trials_per_cell)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial at most (default: the space's)")
    p.add_argument("--backbone", action="append",
                   help="only these backbones of the space (repeat the flag for several)")
    p.add_argument("--regulariser", action="append",
                   help="only these regularisers of the space (repeat the flag for several)")
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler (default: the space's)")
    p.add_argument("--pruner", choices=PRUNERS, help="Optuna pruner (default: the space's)")
    p.add_argument("--seed", type=int, help="seed of the sampler and the trials")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a space value, e.g. --set fixed.batch_size=64 "
                        "--set grid.lr=[0.001,0.0005] --set search.grace_epochs=3")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the space's)")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial; fractions such as 0.25 pack trials on one GPU")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (0: no limit)")
    p.add_argument("--budget-trial-epochs", type=int, metavar="N",
                   help="end the search after N epochs summed over all trials (pruned trials "
                        "cost only the epochs they ran); pair it with a large --num-samples")
    p.add_argument("--address", help="Ray cluster address: `auto` on a cluster node, or HOST:PORT "
                   "(default: $RAY_ADDRESS, which `ray job submit` sets, else a new local Ray)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--storage", help="where Ray keeps trial checkpoints (a folder or s3://...; "
                   "default: $TUNER_STORAGE or ./ray_results; shared storage on a cluster)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (the one named by --name, else the newest "
                        "of this space in --storage): finished trials are kept, unfinished and "
                        "errored ones continue from their last checkpoint, MLflow runs continue")
    p.add_argument("--ui", action="store_true",
                   help="start `mlflow ui` on 127.0.0.1 for the search's local store (SQLite or "
                        "folder) while the search runs, print its URL at the start, stop it at "
                        "the end (also on Ctrl-C or an error); an http(s) --mlflow-uri is a "
                        "server already: its URL is printed instead")
    p.add_argument("--ui-port", type=int, metavar="PORT",
                   help="the port of --ui (default: a free one)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (trials, trial-epochs, grid size) and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ray/Tune output")
    return p


def _positive(name: str, value: float | None, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name}: expected a value >= {minimum:g}, got {value:g}")


def prepare_space(args: argparse.Namespace) -> SearchSpace:
    """Load the space and apply every command-line override; validates before Ray starts."""
    if args.name is not None:
        check_name(args.name, "--name")  # a folder name in --storage and an MLflow filter
    space = load_space(args.space)
    sets = list(args.set)
    _positive("--num-samples", args.num_samples)
    _positive("--max-epochs", args.max_epochs)
    _positive("--trials-per-cell", getattr(args, "trials_per_cell", None))
    if args.num_samples is not None and getattr(args, "trials_per_cell", None) is not None:
        raise UsageError("--num-samples and --trials-per-cell: give one (the search runs "
                         "cells x --trials-per-cell trials)")
    _positive("--max-concurrent", args.max_concurrent, 0)
    _positive("--budget-trial-epochs", getattr(args, "budget_trial_epochs", None))
    if args.cpus_per_trial is not None and args.cpus_per_trial < RAY_RESOURCE_UNIT:
        raise UsageError(f"--cpus-per-trial: expected a value >= {RAY_RESOURCE_UNIT:g} (Ray's "
                         f"smallest CPU fraction), got {args.cpus_per_trial:g}")
    _positive("--gpus-per-trial", args.gpus_per_trial, 0)
    if args.gpus_per_trial and args.gpus_per_trial < RAY_RESOURCE_UNIT:
        raise UsageError(f"--gpus-per-trial: expected 0 or a value >= {RAY_RESOURCE_UNIT:g} "
                         f"(Ray's smallest GPU fraction), got {args.gpus_per_trial:g}")
    for flag, key in (("num_samples", "search.num_samples"), ("max_epochs", "search.max_epochs"),
                      ("sampler", "search.sampler"), ("pruner", "search.pruner"),
                      ("seed", "search.seed"), ("max_concurrent", "search.max_concurrent"),
                      ("cpus_per_trial", "resources.cpu"), ("gpus_per_trial", "resources.gpu"),
                      ("trials_per_cell", "search.trials_per_cell")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    if args.num_samples is not None:
        sets.append("search.trials_per_cell=null")  # --num-samples beats the space's per-cell
    if args.data:
        sets.append(f"data={args.data}")
    space = apply_overrides(space, sets)  # checked against the whole space as written
    # --backbone / --regulariser: names not in the space are an error there
    space, dropped = narrow(space, args.backbone, args.regulariser)
    if dropped:
        print(f"--backbone/--regulariser: dropped {', '.join(dropped)} (no remaining model has "
              "that field)", file=sys.stderr)
    return space


def check_models(space: SearchSpace, data: MultimodalData) -> None:
    """Every backbone of the space must be able to read this data (before any trial)."""
    from trainables.backbones import get_backbone

    for name in space.backbones:
        get_backbone(name).check_inputs(data.dims)


def _searched_values(space: SearchSpace, key: str) -> list[Any]:
    """Every value ``key`` can take in the space's trials (fixed, grid, ranges; a continuous
    range contributes its bounds; ``key@R`` scoped to a regulariser counts too), or [] when the
    space leaves it at its default."""
    values: list[Any] = []
    for written in dict.fromkeys([*space.fixed, *space.grid, *space.ranges]):
        if split_scope(written)[0] != key:
            continue
        if written in space.fixed:  # then in no other section (SearchSpace.check)
            values.append(space.fixed[written])
            continue
        values += list(space.grid.get(written, []))
        spec = space.ranges.get(written)
        if spec is not None:
            values += list(spec.choices) if spec.choices is not None else [spec.low, spec.high]
    return values


def check_unlabeled(space: SearchSpace, data: MultimodalData | None) -> None:
    """A space whose trials can draw unlabeled rows (``unlabeled_rate`` > 0) from the data
    (``unlabeled_source: data``, the default) needs data with an ``unlabeled`` split: stop before
    any trial, naming the ways to give one. ``unlabeled_source: train`` (the labeled-rows
    fallback) must be asked for explicitly. ``data`` None (a synthetic dry run): synthetic sets
    carry a pool."""
    if data is None or data.unlabeled is not None:
        return
    rates = [v for v in _searched_values(space, "unlabeled_rate")
             if isinstance(v, (int, float)) and v > 0]
    sources = _searched_values(space, "unlabeled_source") or ["data"]
    if rates and "data" in sources:
        raise UsageError(
            f"unlabeled_rate up to {max(rates):g} (space {space.name!r}) needs unlabeled data, but "
            f"{data.source} has no 'unlabeled' split; give one with --unlabeled PATH (an MMSA "
            "pickle, .parquet file or Parquet folder), as an 'unlabeled' split in the pickle or "
            "unlabeled.parquet in the Parquet folder, or re-use labeled training rows with their "
            "labels hidden (not the paper's method) with --set fixed.unlabeled_source=train")


def text_models(space: SearchSpace) -> dict[str, list[str]]:
    """The text encoders the space's trials can load: name -> the backbones that would load it
    (``backbone.text_model`` from fixed/grid/ranges, else each backbone's default)."""
    import dataclasses

    from trainables.backbones import get_backbone

    key = "backbone.text_model"
    used: dict[str, list[str]] = {}
    for backbone in space.backbones:
        fields = {f.name: f for f in dataclasses.fields(get_backbone(backbone).config_class)}
        if "text_model" not in fields:
            continue
        if key in space.fixed:
            names = [space.fixed[key]]
        else:
            names = list(space.grid.get(key, []))
            spec = space.ranges.get(key)
            names += list(spec.choices or []) if spec is not None else []
            names = names or [fields["text_model"].default]
        for name in names:
            used.setdefault(str(name), []).append(backbone)
    return used


def check_text_models(space: SearchSpace) -> None:
    """Load every text encoder a trial could ask for once, in the driver, before Ray starts: a
    name that cannot be loaded (not cached with HF_HUB_OFFLINE=1, no such folder) fails here
    with one line instead of failing every trial."""
    from trainables.text import TextModelError, load_text_model

    for name, backbones in text_models(space).items():
        try:
            load_text_model(name)
        except TextModelError as exc:
            raise UsageError(f"backbone.text_model of {', '.join(backbones)}: {exc}") from None


def check_ui(args: argparse.Namespace) -> None:
    """``--ui-port`` must be a port number that is free on 127.0.0.1 (and needs ``--ui``)."""
    from tuner._ui import port_free

    port = getattr(args, "ui_port", None)
    if port is None:
        return
    if not getattr(args, "ui", False):
        raise UsageError("--ui-port: only with --ui")
    if not 1 <= port <= 65535:
        raise UsageError(f"--ui-port {port}: expected a port number from 1 to 65535")
    if not port_free(port):
        raise UsageError(f"--ui-port {port}: something listens on 127.0.0.1:{port} already; "
                         "choose another port or leave --ui-port out (a free one)")


def check_storage(args: argparse.Namespace) -> None:
    """A local --storage must be a folder we can create or write; --resume --name must name a
    search that is there (else Ray fails after an MLflow parent run was already made)."""
    storage = storage_for(args)
    if "://" in storage:
        return  # s3://, gs://...: Ray and pyarrow check those
    root = Path(storage).expanduser()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        tempfile.TemporaryDirectory(dir=existing).cleanup()  # root passes os.access anywhere
    except OSError:
        raise UsageError(f"--storage {storage}: cannot write there ({existing} is not a writable "
                         "folder)") from None
    if args.resume and args.name and not (root / args.name / "tuner.pkl").is_file():
        found = sorted(p.parent.name for p in root.glob("*/tuner.pkl")) if root.is_dir() else []
        raise UsageError(f"--resume --name {args.name}: no such search in {root} (found: "
                         f"{', '.join(found) or 'none'}); pass --storage if it was elsewhere")


def autoscaler_node_resources(config_file: str | Path = "~/ray_bootstrap_config.yaml"
                              ) -> list[dict[str, float]]:
    """The resources of the node types a ``ray up`` cluster's autoscaler can still start (its
    head keeps the prepared cluster config in ``~/ray_bootstrap_config.yaml``); [] elsewhere."""
    path = Path(config_file).expanduser()
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return []
    types = (config or {}).get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        return []
    return [{k: float(v) for k, v in (t.get("resources") or {}).items()}
            for t in types.values() if isinstance(t, dict) and (t.get("max_workers") or 0) > 0]


def check_cluster_resources(space: SearchSpace) -> None:
    """After ``ray.init``: a trial must fit on one node of the cluster (a running one, or one
    the autoscaler can start: a cluster that scales from 0 GPUs has none yet), or Tune waits
    forever."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    check_trial_fits(space, nodes + autoscaler_node_resources())


def check_trial_fits(space: SearchSpace, nodes: list[dict[str, float]]) -> None:
    """A trial's resources must fit on one of ``nodes`` (Ray's resource dicts)."""
    for name, amount in space.resources.custom.items():
        most = max((n.get(name, 0.0) for n in nodes), default=0.0)
        if amount > most:
            raise UsageError(f"resources.custom.{name} {amount:g}: no node of the Ray cluster "
                             f"has that much {name} (the most is {most:g}); start nodes with "
                             f"`ray start --resources` or a cluster.yaml node type that has it")
    cpu, gpu = space.resources.cpu, space.resources.gpu
    most_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    most_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if cpu > most_cpu:
        raise UsageError(f"--cpus-per-trial / resources.cpu {cpu:g}: no node of the Ray cluster "
                         f"has that many CPUs (the largest has {most_cpu:g}); a trial runs on "
                         "one node")
    if gpu > 0 and most_gpu == 0:
        raise UsageError(f"--gpus-per-trial / resources.gpu {gpu:g}: the Ray cluster has no GPU "
                         f"({len(nodes)} node{'s' if len(nodes) != 1 else ''}); use "
                         "--gpus-per-trial 0 or a cluster with GPUs")
    if gpu > most_gpu:
        raise UsageError(f"--gpus-per-trial / resources.gpu {gpu:g}: no node of the Ray cluster "
                         f"has that many GPUs (the largest has {most_gpu:g}); a trial runs on "
                         "one node")


def plan(space: SearchSpace) -> dict[str, Any]:
    grid = space.grid_size()
    budgets = space.cell_budgets()
    trials = sum(n for _, _, n in budgets)
    settings = space.search
    if settings.sampler == "grid":
        rule = "the grid sampler: each cell runs its own grid points"
    elif settings.trials_per_cell:
        rule = f"trials_per_cell: {settings.trials_per_cell} for each of {len(budgets)} cells"
    else:
        rule = f"num_samples: {settings.num_samples} shared out over {len(budgets)} cells"
    asked = len(budgets) * settings.trials_per_cell if settings.trials_per_cell else (
        settings.num_samples)
    if settings.sampler != "grid" and trials != asked:
        rule += f"; {trials} trials, as a cell runs at least its start points"
    empty = [cell_label(c) for c, _, n in budgets if n == 0]
    return {"space": space.name, "sampler": settings.sampler, "pruner": space.search.pruner,
            "backbones": space.backbones, "regularisers": space.regularisers,
            "grid_size": grid, "trials": trials,
            # the rows of the paper's table; each has its own trials, sampler and pruner
            "cell_keys": list(space.cells),
            "budget": rule,
            "pruning": ("none" if settings.pruner == "none" else
                        f"{settings.pruner}, each trial against its own cell's trials"),
            "cells": {cell_label(c): n for c, _, n in budgets},
            **({"cells_without_trials": (f"{len(empty)} of {len(budgets)}: raise num_samples "
                                         "or set --trials-per-cell")} if empty else {}),
            # what runs first (for the grid: the grid points of the start points)
            "start_points": initial_points(space)[:len(space.start_points)],
            "max_epochs": space.search.max_epochs,
            "trial_epochs_at_most": trials * space.search.max_epochs,
            "resources_per_trial": space.resources.ray_resources(),
            "metric": f"{space.metric} ({space.mode}), a trial's value is its best epoch"}


def start_ui(tracking_uri: str, port: int | None):
    """``--ui``: an ``mlflow ui`` process on 127.0.0.1 for a local store (SQLite or folder), or
    None for a tracking server (:func:`print_start` says so); stop it with ``.stop()``."""
    from tuner._ui import LocalUI, local_store
    from tuner.tracking import absolute_sqlite_uri

    if not local_store(tracking_uri):
        return None
    return LocalUI(absolute_sqlite_uri(tracking_uri), port)  # its log: a private temporary file


def print_start(space: SearchSpace, name: str, tracker, ui=None, ui_asked: bool = False,
                budget: int | None = None, spent_before: int = 0) -> None:
    """What a user needs before the first trial: the plan (as ``--dry-run`` counts it), where
    MLflow records the search and how to watch it there (``ui``: the ``--ui`` process, whose
    start it waits for, so that its URL answers once the trials run)."""
    counts = plan(space)
    uri = tracker.tracking_uri
    runs = tracker.runs_url()
    budget_note = (f"; the search ends after {budget} trial-epochs (--budget-trial-epochs)"
                   if budget else "")
    if budget and spent_before:
        budget_note += f", {spent_before} of them spent before this resume"
    pruning = "no pruning" if counts["pruner"] == "none" else f"{counts['pruner']} pruner"
    print(f"Search {name!r}: {counts['trials']} trials ({counts['sampler']} sampler, "
          f"{pruning}) of up to {counts['max_epochs']} epochs each, at most "
          f"{counts['trial_epochs_at_most']} trial-epochs{budget_note}.")
    sizes = sorted(set(counts["cells"].values()))
    each = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    print(f"Cells (the rows of the table, by {', '.join(counts['cell_keys'])}): "
          f"{len(counts['cells'])}, {each} trials each; each cell's sampler learns from its own "
          "trials" + ("" if counts["pruner"] == "none" else
                      ", and the pruner compares a trial with its own cell's") + ".")
    print(f"MLflow {redact_uris(uri)}: experiment {tracker.experiment_name!r} (id {tracker.experiment_id}), "
          f"parent run {name!r} (id {tracker.parent_run_id}).")
    print(f"Watch the runs: {redact_uris(tracker.ui_command())}")
    print(f"  then open     {runs}")
    print(f"  this search   {tracker.runs_url(run_id=tracker.parent_run_id)}")
    if ui is not None:
        ui_runs = tracker.runs_url(port=ui.port)
        print(f"MLflow UI (--ui, pid {ui.pid}, it stops with the search): {ui_runs}")
        print(f"  this search   {tracker.runs_url(port=ui.port, run_id=tracker.parent_run_id)}",
              flush=True)
        problem = ui.wait_ready()
        if problem is not None:
            print(f"warning: --ui: {problem}; the search goes on", file=sys.stderr)
    elif ui_asked:
        print(f"--ui: {redact_uris(uri)} is an MLflow server already; nothing to start (open "
              "it, or the URL above through a forwarded port)")
    sys.stdout.flush()


def command_line(module: str, argv: list[str]) -> str:
    """The command that ran, as the MLflow ``command`` tag and ``report.md`` record it: with
    the userinfo of every URI in it (``--optuna-storage postgresql://USER:PASSWORD@...``)
    redacted."""
    return redact_uris(shlex.join([sys.executable, "-m", module, *argv]))


def concurrency(space: SearchSpace, cpus: float) -> int:
    """Trials at once on ``cpus`` CPUs: by the space's CPUs per trial and ``max_concurrent``."""
    at_once = max(1, int(cpus // max(space.resources.cpu, RAY_RESOURCE_UNIT)))
    limit = space.search.max_concurrent
    return min(at_once, limit) if limit else at_once


def _ray_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def projection_line(space: SearchSpace, client, data_digest: str | None, cpus: float) -> str | None:
    """The CPU-only projection of a transformer space (:func:`tuner.progress.cpu_projection`),
    from epoch timings in the MLflow store of ``client``; None for other spaces. A store that
    cannot be read gives the line without timings."""
    from tuner.progress import TRANSFORMER_BACKBONES, cpu_projection, stored_epoch_seconds

    if space.resources.gpu > 0 or not set(space.backbones) & set(TRANSFORMER_BACKBONES):
        return None
    try:
        timings = stored_epoch_seconds(client, [(b, r) for b in space.backbones
                                                for r in space.regularisers], False, data_digest)
    except Exception:  # noqa: BLE001 - a projection never stops a search
        timings = {}
    return cpu_projection(space, timings, concurrency(space, cpus))


def dry_run_projection(space: SearchSpace, args: argparse.Namespace,
                       data: MultimodalData | None) -> str | None:
    """``--dry-run``'s projection: only from a store that exists (a dry run creates none)."""
    from mlflow.tracking import MlflowClient

    from tuner.progress import TRANSFORMER_BACKBONES
    from tuner.tracking import DEFAULT_TRACKING_URI, absolute_sqlite_uri

    if space.resources.gpu > 0 or not set(space.backbones) & set(TRANSFORMER_BACKBONES):
        return None
    uri = args.mlflow_uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().exists():
        client = None
    else:
        if uri.startswith(("http://", "https://")):
            from tuner.tracking import HTTP_DEFAULTS

            for key, value in HTTP_DEFAULTS.items():  # seconds, not minutes, if it is down
                os.environ.setdefault(key, value)
        client = MlflowClient(tracking_uri=absolute_sqlite_uri(uri))
    if client is None:
        from tuner.progress import cpu_projection

        return cpu_projection(space, {}, concurrency(space, os.cpu_count() or 1))
    return projection_line(space, client, data.digest if data is not None else None,
                           os.cpu_count() or 1)


def tune_loggers(verbose: int) -> list:
    """The result loggers Tune needs (CSV: ``progress.csv``, which MLflow's sync reads; JSON),
    given explicitly without ``-v`` so that Tune adds no TensorBoard logger (see
    :func:`_tune_auto_loggers`)."""
    if verbose:
        return []
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


class _tune_auto_loggers:
    """Within: Tune adds its default loggers (CSV, JSON, TensorBoard) only with ``-v`` or when
    the search's callbacks lack the CSV logger (a search started by an older version, resumed:
    MLflow's sync needs its ``progress.csv``)."""

    KEY = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"

    def __init__(self, verbose: int, tuner=None) -> None:
        from ray.tune.logger import CSVLoggerCallback

        callbacks = (tuner._local_tuner.get_run_config().callbacks or []  # noqa: SLF001
                     if tuner is not None else [])
        has_csv = any(isinstance(c, CSVLoggerCallback) for c in callbacks)
        self.verbose = verbose or (tuner is not None and not has_csv)
        self.before: str | None = None

    def __enter__(self):
        self.before = os.environ.get(self.KEY)
        if not self.verbose:
            os.environ[self.KEY] = "1"
        return self

    def __exit__(self, *exc) -> None:
        if self.before is None:
            os.environ.pop(self.KEY, None)
        else:
            os.environ[self.KEY] = self.before


def run_search(space: SearchSpace, data: MultimodalData, args: argparse.Namespace,
               stop=None) -> int:
    """Run (or resume) the search; ``stop``: a Ray Tune stopper (default: --budget-trial-epochs)."""
    import optuna

    from tuner.pruning import SearchBudget
    from tuner.tracking import DEFAULT_TRACKING_URI, Tracker

    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = args.mlflow_uri or DEFAULT_TRACKING_URI
    storage = storage_for(args)
    study_storage = study_storage_for(args)

    # a snapshot per checkpoint is what makes --resume exact; it costs ~10 ms, so don't warn
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from mlflow.exceptions import MlflowException

    # MLflow's store opens while Ray starts (a new SQLite store runs its schema migrations: ~1.5 s
    # of the ~3 s Ray's start takes on 2 cores); its experiment exists, no run yet. Its INFO lines
    # ("Creating initial MLflow database tables...") would land among Ray's or before an error.
    if args.verbose == 0:
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-open") as pool:
        opening = pool.submit(Tracker, tracking_uri, experiment_name=space.name,
                              cell_keys=space.cells)
        init_ray(args.address, args.verbose)
        check_cluster_resources(space)  # before any MLflow run or trial exists
        try:
            tracker = opening.result()
        except MlflowException as exc:
            raise UsageError(f"--mlflow-uri {tracking_uri}: "
                             f"{' '.join(exc.message.split())[:300]}") from None
    if args.resume:
        parent = tracker.find_parent(name)
        if parent is not None:
            recorded = tracker.client.get_run(parent).data.tags.get("data_digest")
            if recorded and recorded != data.digest:
                raise UsageError(f"--resume {name}: the data changed since the search started "
                                 f"(sha256 {recorded[:12]}... then, {data.digest[:12]}... now)")
    budget = getattr(args, "budget_trial_epochs", None)
    spent_before = 0
    if args.resume:
        restored = resumed_budget(name, experiment_path(storage, name), budget)
        if restored is not None:
            budget, spent_before = restored.trial_epochs, restored.spent
    try:
        return _run(space, data, args, stop, name, tracker, tracking_uri, storage, study_storage,
                    budget, spent_before)
    finally:
        if args.resume:
            SearchBudget.resume_with(name, None)


def experiment_path(storage: str, name: str) -> str:
    """Where Ray keeps the experiment of search ``name`` in ``storage``."""
    return f"{storage.rstrip('/')}/{name}"


def resumed_budget(name: str, experiment: str, trial_epochs: int | None):
    """``--resume`` of a search that a trial-epoch budget (or a reached value) may have ended:
    its stopper, as Tune will restore it, counting to ``trial_epochs`` (the resumed run's
    ``--budget-trial-epochs``; None: the budget it started with), or None when it has none.

    Refused before anything runs: a search whose budget is spent (resuming it with the same
    budget would run no trial; a larger one continues it, counting what it spent already), and
    a budget for a search that started without one (Tune keeps a search's stopper)."""
    from tuner.pruning import SearchBudget, snapshot_stopper

    SearchBudget.resume_with(name, trial_epochs)  # before any unpickling of its stopper
    restored = snapshot_stopper(experiment)
    if not isinstance(restored, SearchBudget):
        if trial_epochs is not None:
            SearchBudget.resume_with(name, None)
            raise UsageError(f"--budget-trial-epochs {trial_epochs}: search {name!r} started "
                             "without a trial-epoch budget, and a resumed search keeps the "
                             "stopper it started with; resume it without the flag")
        return None
    if restored.stop_all():
        SearchBudget.resume_with(name, None)
        more = ("; nothing to continue" if restored.reached else
                f"; to continue it, pass a larger --budget-trial-epochs (the total over the "
                f"whole search, e.g. {restored.spent + (restored.trial_epochs or 0)})")
        raise UsageError(f"--resume {name}: the search ended because {restored.spent_note()}"
                         f"{more}")
    return restored


def _run(space: SearchSpace, data: MultimodalData, args: argparse.Namespace, stop, name: str,
         tracker, tracking_uri: str, storage: str, study_storage: str, budget: int | None,
         spent_before: int) -> int:
    """The part of :func:`run_search` after the checks: the MLflow parent run, Tune, summary."""
    import optuna
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig
    from ray.tune.search import ConcurrencyLimiter

    from trainables.trainable import train_fusion
    from tuner.progress import ProgressCallback
    from tuner.pruning import (OptunaPruningScheduler, SearchBudget, StudySearchGenerator,
                               cell_search)
    from tuner.tracking import (DiskSpaceGuard, MlflowTrialCallback, dataset_inputs,
                                environment_tags, git_commit, rebind_callbacks)

    settings = space.search
    unlabeled_path = (str(Path(args.unlabeled).expanduser().resolve())
                      if getattr(args, "unlabeled", None) else None)
    tracker.inputs = dataset_inputs(data, unlabeled_path)
    tracker.data_digest = data.digest
    tracker.objective, tracker.mode = space.objective, space.mode
    parent = tracker.start_search(
        name,
        params={"space": space.name, "sampler": settings.sampler, "pruner": settings.pruner,
                "num_samples": settings.num_samples, "max_epochs": settings.max_epochs,
                **({"trials_per_cell": settings.trials_per_cell}
                   if settings.trials_per_cell else {}),
                "cells": ",".join(space.cells),
                "grace_epochs": settings.grace_epochs, "seed": settings.seed,
                "backbones": ",".join(space.backbones),
                "regularisers": ",".join(space.regularisers),
                "cpu_per_trial": space.resources.cpu, "gpu_per_trial": space.resources.gpu,
                "metric": space.metric, "mode": space.mode},
        tags={"git_commit": git_commit(), "data_digest": data.digest, "data_source": data.source,
              **environment_tags(),
              # the report applies the selection rule again: an explicit mode may go against
              # the metric's direction
              "mode_explicit": str(space.mode_explicit).lower(),
              "unlabeled_data": (f"{len(data.unlabeled)} rows" if data.unlabeled is not None
                                 else "none"),
              **({"unlabeled_path": str(Path(args.unlabeled).expanduser().resolve())}
                 if getattr(args, "unlabeled", None) else {}),
              "command": command_line("tuner.search", sys.argv[1:])},
        files={"space.yaml": Path(space.source).read_text() if Path(space.source).is_file()
               else "", "effective_space.yaml": yaml.safe_dump(_space_dict(space))},
    )
    # --ui: the UI's process starts now, while the trials are prepared; it ends with the search
    ui = start_ui(tracking_uri, args.ui_port) if getattr(args, "ui", False) else None
    try:
        trainable = tune.with_resources(
            tune.with_parameters(train_fusion, data=data), space.resources.ray_resources())
        num_samples = sum(n for _, _, n in space.cell_budgets())
        if stop is None and budget and not args.resume:
            stop = SearchBudget(trial_epochs=budget, search=name)
        experiment = experiment_path(storage, name)
        if args.resume:
            # searcher (with its Optuna study in the RDB storage), scheduler and callbacks come
            # back from Ray's experiment checkpoint; finished trials stay finished, unfinished
            # and errored ones continue from their last checkpoint
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
            # write where --mlflow-uri says now; the ETA measures afresh
            rebind_callbacks(tuner, tracker, {"budget": budget, "spent_before": spent_before})
            print(f"Resuming search {name!r} from {redact_uris(experiment)}.", flush=True)
        else:
            # one study; each cell its own trials, sampler and pruner (tuner.pruning.CellSearch)
            searcher, num_samples = cell_search(
                space, study_name=name, storage=optuna.storages.RDBStorage(study_storage))
            pruner = searcher.study.pruner if settings.pruner != "none" else None
            search_alg = StudySearchGenerator(
                ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)
                if settings.max_concurrent else searcher)
            scheduler = (OptunaPruningScheduler(searcher, metric=space.objective)
                         if pruner is not None else None)
            tuner = tune.Tuner(
                trainable,
                tune_config=TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                       num_samples=num_samples,
                                       reuse_actors=reuse_workers(settings, args.address),
                                       trial_dirname_creator=_trial_dirname),
                run_config=RunConfig(
                    name=name, storage_path=storage, stop=stop,
                    callbacks=[MlflowTrialCallback(tracker), DiskSpaceGuard(storage),
                               ProgressCallback(num_samples, settings.max_epochs, budget,
                                                cell_keys=space.cells),
                               *tune_loggers(args.verbose)],
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    failure_config=FailureConfig(max_failures=2),
                    verbose=1 if args.verbose == 0 else 2,
                ),
            )
        if args.verbose == 0:
            # a failing trial is one line from MlflowTrialCallback; its traceback is in error.txt
            logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
        print_start(space, name, tracker, ui, ui_asked=getattr(args, "ui", False),
                    budget=budget, spent_before=spent_before)
        projection = projection_line(space, tracker.client, data.digest, _ray_cpus())
        if projection:
            print(projection, flush=True)
        try:
            with _tune_auto_loggers(args.verbose, tuner):
                results = tuner.fit()
        except BaseException as exc:
            tracker.finish_search("KILLED", None, None, None)
            full = _disk_full(exc)
            if full is None:
                raise
            print(redact_uris(
                f"error: no space left on device: {full or storage}; the search stopped. "
                f"Finished trials are kept (Ray: {experiment}, MLflow: {tracking_uri}). Free "
                f"some space, then continue with the same command plus --resume --name {name}"),
                file=sys.stderr)
            return 5
        return summarise(results, space, tracker, data, experiment)
    finally:
        if ui is not None:
            ui.stop()


def reuse_workers(settings, address: str | None) -> bool:
    """``search.reuse_workers``, with ``auto`` = only on a local Ray. On a cluster, when a node
    is lost, Tune may start the trials that ran there on that node's idle cached workers, which
    are dead too: each try is one more failure of the trial (tests/test_cluster.py lost a trial
    that way, its two retries spent on dead workers)."""
    if settings.reuse_workers == "auto":
        return ray_address(address) == "local"
    return bool(settings.reuse_workers)


def _disk_full(exc: BaseException) -> str | None:
    """The path a full disk refused (or "") if ``exc`` or its causes say so, else None.

    Tune wraps errors of callbacks and trials into TuneErrors that carry the traceback text."""
    import traceback

    from tuner.tracking import disk_full

    return disk_full("".join(traceback.format_exception(exc)))


def initial_points(space: SearchSpace) -> list[dict[str, Any]]:
    """What the study runs first: the whole grid for the grid sampler, else the start points."""
    if space.search.sampler == "grid":
        return space.grid_points()
    return [dict(p) for p in space.start_points]


def storage_for(args: argparse.Namespace) -> str:
    """Where Ray keeps the experiment: --storage, else $TUNER_STORAGE, else ./ray_results."""
    return args.storage or os.environ.get("TUNER_STORAGE") or str(Path("ray_results").resolve())


def find_resumable(space_name: str, storage: str) -> str:
    """The newest search of a space in the storage (for --resume without --name): a local
    folder, or a URI such as s3://bucket/path that pyarrow can list."""
    if "://" in storage:
        import fnmatch

        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        found = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
            if (info.type == pyarrow.fs.FileType.Directory
                    and fnmatch.fnmatchcase(info.base_name, f"{space_name}-*")):
                marker = fs.get_file_info(f"{info.path}/tuner.pkl")
                if marker.is_file:
                    found.append((marker.mtime_ns or 0, info.base_name))
        candidates = [name for _, name in sorted(found)]
    else:
        candidates = [p.name for p in sorted(
            (p for p in Path(storage).glob(f"{space_name}-*") if (p / "tuner.pkl").exists()),
            key=lambda p: p.stat().st_mtime)]
    # a folder whose name could not be a search's (--name is checked against NAME_PATTERN: it
    # names folders and goes into MLflow filters) was not written by a search: never resume it
    candidates = [name for name in candidates if NAME_PATTERN.fullmatch(name)]
    if not candidates:
        raise UsageError(f"--resume: no search of space {space_name!r} in {storage}; "
                         "pass --name NAME (and --storage if it was not the default)")
    return candidates[-1]


def _trial_dirname(trial) -> str:
    """Short trial folders (Ray's default puts the whole config in the name)."""
    config = trial.config
    return f"{trial.trial_id}-{config.get('backbone')}-{config.get('regulariser')}"


def _space_dict(space: SearchSpace) -> dict[str, Any]:
    import dataclasses

    raw = dataclasses.asdict(space)
    raw.pop("source", None)
    raw.pop("mode_explicit", None)  # not a YAML key; the tag of the same name records it
    return raw


def summarise(results, space: SearchSpace, tracker, data: MultimodalData,
              experiment: str = "") -> int:
    """Sync MLflow with Ray's results, close the parent run, print the summary.

    Exit codes: 0 all is well; 1 no trial finished with a finite metric; 3 some trials errored
    (the others finished, the best is chosen among them); 4 MLflow missed records it could not
    be given now (``--resume`` writes them once the store is back)."""
    from trainables.loop import BEST_FILE
    from trainables.trainable import evaluate_checkpoint
    from tuner.tracking import COUNTED, NEVER_BEST, final_status

    objective = space.objective
    counts: dict[str, int] = {}
    candidates = []
    errored = []
    for result in results:
        status = "errored" if result.error else final_status(result.metrics or {})
        counts[status] = counts.get(status, 0) + 1
        value = (result.metrics or {}).get(objective)
        if status == "errored":
            errored.append(result)
        elif status not in NEVER_BEST and isinstance(value, (int, float)) and math.isfinite(value):
            candidates.append(result)  # NEVER_BEST: not a diverged trial, whatever came before
    synced = tracker.sync_results(results)
    # the parent's live counts, final: as the summary counts (trials a stopper ended included)
    tracker.safely("live counts", tracker.log_progress, {
        **{key: sum(counts.get(s, 0) for s in statuses) for key, statuses in COUNTED.items()},
        "trials_running": 0,
        "trial_epochs_done": sum(int((r.metrics or {}).get("training_iteration") or 0)
                                 for r in results),
        "best_so_far": min((r.metrics[objective] for r in candidates),
                           key=lambda v: v if space.mode == "min" else -v, default=math.nan)})
    if synced:
        print(f"MLflow: wrote the records of {synced} trials that it had missed "
              f"(from Ray's results in {redact_uris(experiment)})", flush=True)
    for result in errored:
        trial_id = (result.metrics or {}).get("trial_id") or Path(str(result.path)).name
        lines = str(result.error).strip().splitlines()
        print(redact_uris(f"Trial {trial_id} errored: "
                          f"{lines[-1][:300] if lines else 'unknown error'} "
                          f"(traceback: {result.path}/error.txt)"), file=sys.stderr)
    sign = 1 if space.mode == "min" else -1
    best = min(candidates, key=lambda r: sign * r.metrics[objective], default=None)
    if best is None:
        tracker.finish_search("FAILED", None, None, None)
        print(f"No trial finished with a finite {space.metric}: {counts}", file=sys.stderr)
        return 1
    metrics = dict(best.metrics)
    best_run = None
    try:
        best_run = tracker.find_child(metrics.get("trial_id", ""))
    except Exception as exc:  # noqa: BLE001 - the store is down: warned about below
        tracker.record_failure("best run", exc)
    checkpoint_note = "none"
    if best.checkpoint is None:
        tracker.finish_search("FINISHED", metrics, None, best_run)
    else:
        with best.checkpoint.as_directory() as directory:
            checkpoint_file = Path(directory) / BEST_FILE
            if not any(k.startswith("test_") for k in metrics) and checkpoint_file.exists():
                # a trial stopped by the pruner never reached its own test evaluation
                metrics.update(evaluate_checkpoint(checkpoint_file, data, "test"))
            tracker.finish_search("FINISHED", metrics, checkpoint_file, best_run, data)
        checkpoint_note = f"{best.checkpoint.path}/{BEST_FILE}"

    config = resolve_scoped(best.config)  # regulariser.alpha@mird as the trial ran it: alpha
    print("\n" + "=" * 72)
    print(f"Search {tracker.search_name!r} finished: " +
          ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print("Best configuration (chosen on validation only):")
    for key in sorted(config):
        print(f"  {key}: {config[key]}")
    print(f"Best epoch {int(metrics.get('best_epoch', -1))}; its validation metrics:")
    print("  " + ", ".join(f"{k[len('best_valid_'):]} {metrics[k]:.4f}" for k in sorted(metrics)
                           if k.startswith("best_valid_")))
    print("Test metrics of that checkpoint (computed once, never used for selection):")
    print("  " + ", ".join(f"{k[len('test_'):]} {metrics[k]:.4f}" for k in sorted(metrics)
                           if k.startswith("test_")))
    print(f"Best checkpoint: {checkpoint_note}")
    print("  (also the artifact best_checkpoint/best.pt of the search's and the trial's MLflow runs)")
    if tracker.registered:
        print(f"Registered model: {tracker.registered}  "
              f"(mlflow.pyfunc.load_model; README: Use the best model)")
    print(f"Browse the runs:  {redact_uris(tracker.ui_command())}")
    print(f"             then {tracker.runs_url()}")
    if errored:
        print(f"{len(errored)} trials errored (see above); `--resume` retries them",
              file=sys.stderr)
    if tracker.incomplete:
        kinds = ", ".join(f"{kind} x{n}" for kind, n in tracker.failures.items())
        print(f"warning: MLflow missed records during this search ({kinds}); Ray's results in "
              f"{redact_uris(experiment)} are complete. When the store is back, run the same "
              f"command with --resume --name {tracker.search_name} to write what MLflow missed",
              file=sys.stderr)
        return 4
    return 3 if errored else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        space = prepare_space(args)
        selection = space.selection_warning()  # an explicit mode against the metric's direction
        if selection:
            print(f"warning: {selection}", file=sys.stderr)
        if not args.dry_run:  # the flags first: seconds, where the data can take a minute
            check_tracking_uri(args.mlflow_uri)
            check_address(args.address)
            check_storage(args)
            check_ui(args)
        data = None
        if not (args.dry_run and space.data.startswith("synthetic:")):
            data = _load_data(space.data, args.nonfinite, args.unlabeled)  # checked even then
            check_models(space, data)
        check_unlabeled(space, data)
        if not args.dry_run:
            check_text_models(space)
    except (SpaceError, UsageError, ConfigError, DataError, ValueError, OSError) as exc:
        print(f"error: {redact_uris(exc)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(plan(space), sort_keys=False).rstrip())
        projection = dry_run_projection(space, args, data)
        if projection:  # a YAML comment: the plan stays machine-readable
            print(f"# {projection}")
        return 0
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        if args.resume and not args.name:
            args.name = find_resumable(space.name, storage_for(args))
        return run_search(space, data, args)
    except UsageError as exc:
        print(f"error: {redact_uris(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are in MLflow and {redact_uris(storage_for(args))}; "
              f"continue with "
              f"python -m tuner.search --space {args.space} --resume --name {args.name}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_cli(main())
