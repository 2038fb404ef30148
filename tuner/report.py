"""``python -m tuner.report --experiment NAME``: results of a finished search that can be published.

With ``--table`` it writes the papers' tables instead (:mod:`tuner.table`): every cell (backbone x
regulariser variant) its own best trial on validation, re-run over the seeds and tested against its
backbone's ``none`` cell. Without it, it is an ablation at fixed hyperparameters:

A search ends with one best trial, i.e. one lucky seed. The report takes the search's best
configuration (chosen on the validation metric only, never on test), re-trains it with N seeds next
to its twin without regulariser (``regulariser: none``, every other hyper-parameter the same), and
reports:

- test metrics (MAE, Corr, Acc-2 has0/non0, F1 has0/non0, Acc-7) as mean ± sample std over the
  seeds per variant, with the two-sided Mann–Whitney U p-value per metric (as MDM's tables);
- modality-drop robustness as the papers measure it: each re-run's best-validation checkpoint
  evaluated on test with a set of modalities removed (:data:`trainables.data.DROP_SETS`: text,
  audio, vision, text+audio, text+vision; :func:`trainables.data.batches.drop_modality`), as the
  ratio Acc-2(drop) / Acc-2(full) (MDM, Colombo et al. 2021, Sec. 5.3: text dropped, A, V or A+V
  kept) and as the raw Acc-2(drop) (Synergy, Shankar 2021, Sec. 5.5, Table 4: T, T+V, T+A
  dropped). Evaluation only: nothing of it chooses a trial, an epoch or a weight;
- for a regulariser with a critic (MDM), the test examples its statistic network scores as most
  and least dependent;
- PNG plots: validation curves of the search's trials (pruned ones marked), best-so-far over
  trial-epochs, Optuna's hyper-parameter importances and parallel coordinates, robustness bars;
- ``report.md`` linking everything, with the seeds, the data hash and the command line.

The re-runs are one Ray Tune grid over seed × variant on the project's trainable
(:func:`trainables.trainable.train_fusion`); each is an MLflow child run of a new ``report`` run,
itself a child of the search's parent run. Tables, plots and the report are artifacts of the report
run and of the search's parent run (under ``report/<name>/``).

Examples::

    python -m tuner.report --experiment smoke                 # the newest search of space smoke
    python -m tuner.report --run-id 3f2a... --seeds 10 --cpus-per-trial 2
    python -m tuner.report --experiment mdm --search mdm-20260101-120000 --regulariser mdm
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainables.config import ConfigError, TrialConfig
from trainables.data import DROP_SETS, DROPPABLE, DataError, MultimodalData, drop_set
from tuner.preflight import UsageError  # one error type (one line, exit 2) for the project's CLIs
from tuner.redact import redact_uris
from tuner.spaces import MAX_SEEDS, SpaceError, check_name
from tuner.tracking import NEVER_BEST, all_runs, finite, parse_param

__all__ = ["COLLAPSE_METRIC", "REPORT_METRICS", "ROBUSTNESS_METRICS", "build_parser",
           "collapsed_note", "main", "mann_whitney", "robustness_table", "train_rerun"]

log = logging.getLogger("tuner.report")

#: the test metrics of the table, in its row order (keys of trainables.metrics.compute_metrics)
REPORT_METRICS = ("mae", "corr", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "acc7")
#: the Acc-2 variants of the robustness measures (ratio drop/full and raw Acc-2 with the drop)
ROBUSTNESS_METRICS = ("acc2_has0", "acc2_non0")
#: the label of the twin without regulariser
BASELINE = "none"
#: the per-epoch metric of a critic whose output was constant over the epoch
#: (``trainables.regularisers.mdm.MDM.epoch_end``, logged by the loop with the ``train_`` prefix)
COLLAPSE_METRIC = "train_critic_collapsed"


def collapsed_note(run: Any) -> str | None:
    """A one-line flag for a run whose critic collapsed in its last epoch (MDM's statistic
    network with a constant output, e.g. a saturated sigmoid W critic): its D was exactly 0 and
    its penalty had no gradient, so it trained as the baseline. ``run``: an MLflow run, or a
    mapping of its metrics (a Tune result). None when the run's critic did not collapse or it
    has no critic."""
    metrics = getattr(getattr(run, "data", None), "metrics", run) or {}
    value = metrics.get(COLLAPSE_METRIC)
    if not isinstance(value, (int, float)) or value < 0.5:
        return None
    return ("critic collapsed: its output was constant over the last epoch "
            f"({COLLAPSE_METRIC} = 1), so the estimate was 0 and the penalty gave no gradient; "
            "this run trained as the baseline")



# ---------------------------------------------------------------------------------- the CLI
def build_parser() -> argparse.ArgumentParser:
    from tuner.preflight import OneLineParser
    from tuner.tracking import DEFAULT_TRACKING_URI

    p = OneLineParser(
        prog="python -m tuner.report",
        description="Multi-seed re-runs of a search's best configuration against its "
                    "unregularised twin (an ablation at fixed hyperparameters): test metrics with "
                    "Mann-Whitney U p-values, modality-drop robustness, critic scores, plots and a "
                    "Markdown report. With --table: the papers' tables, every cell (backbone x "
                    "regulariser variant) its own best trial, re-run over the seeds and tested "
                    "against its backbone's none cell.",
        epilog="Examples: python -m tuner.report --experiment smoke --seeds 10\n"
               "          python -m tuner.report --table --experiment mdm --seeds 10 --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment (= space name) of the search; "
                       "its newest search unless --search names one")
    which.add_argument("--run-id", help="the MLflow run id of a search's parent run")
    p.add_argument("--search", action="append",
                   help="with --experiment: the search name (its parent run's `search` tag, the "
                        "--name given to tuner.search); with --table repeat it to merge searches "
                        "(of any space) on the same data into one table")
    p.add_argument("--table", action="store_true",
                   help="the papers' table instead of the single-pair ablation: every cell "
                        "(backbone x regulariser variant) its own best trial, re-run over the "
                        "seeds, tested against its backbone's `none` cell (docs/report.md)")
    p.add_argument("--dataset", choices=("mosi", "mosei"),
                   help="with --table: the data is CMU-MOSI / CMU-MOSEI; table.md shows the "
                        "papers' own numbers beside ours")
    p.add_argument("--dry-run", action="store_true",
                   help="with --table: print the cells, the chosen trials, the re-runs and their "
                        "trial-epochs, and exit")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                        f"{DEFAULT_TRACKING_URI})")
    p.add_argument("--optuna-storage", help="the search's Optuna study storage (default: "
                   "$OPTUNA_STORAGE or sqlite:///optuna.db, as tuner.search)")
    p.add_argument("--seeds", help="N (seeds 0..N-1) or a comma list such as 0,1,2 (default: "
                   "the search space's `seeds`, whose own default is 0..9)")
    p.add_argument("--regulariser", help="report the best trial of this regulariser (default: "
                   "the best trial; if that is unregularised, the best regularised one)")
    p.add_argument("--max-epochs", type=int, help="epochs per re-run at most (default: the "
                   "chosen trial's max_epochs)")
    p.add_argument("--data", help="the data to re-train on (default: the search's); its sha256 "
                   "must equal the search's data hash")
    p.add_argument("--unlabeled", metavar="PATH",
                   help="the unlabeled data the re-runs draw from (MIRD's unlabeled_rate), as "
                        "tuner.search's flag (default: the search's --unlabeled, if it had one)")
    p.add_argument("--nonfinite", choices=("error", "zero"), default="error",
                   help="NaN/inf in features: as tuner.search's flag of the same name")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per re-run (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per re-run (default 0)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="re-runs at once (default 0: as many as the resources allow)")
    p.add_argument("--top-k", type=int, default=5,
                   help="critic scores: the k most and k least dependent test examples (default 5)")
    p.add_argument("--name", help="report name (default: report-SEARCH-YYYYmmdd-HHMMSS)")
    p.add_argument("--out", help="output folder (default: reports/NAME)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", help="where Ray keeps the re-runs' checkpoints "
                   "(default: ./ray_results)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ray/Tune output")
    return p


def parse_seeds(text: str | list[int], where: str = "--seeds") -> list[int]:
    """``"N"`` -> ``[0, ..., N-1]``; ``"a,b,c"`` (or a list) -> ``[a, b, c]``; at least two
    distinct seeds."""
    from tuner.spaces import short

    shown = text if isinstance(text, str) and len(text) <= 200 else short(text)
    try:
        if isinstance(text, list):
            if len(text) > MAX_SEEDS:
                raise OverflowError
            seeds = [int(s) for s in text]
        elif "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            if int(text) > MAX_SEEDS:
                raise OverflowError
            seeds = list(range(int(text)))
    except (ValueError, TypeError):
        raise UsageError(f"{where} {shown}: expected a count N or a comma list of integers"
                         ) from None
    except OverflowError:
        raise UsageError(f"{where} {shown}: at most {MAX_SEEDS} seeds (each is two training "
                         "runs)") from None
    if len(seeds) > MAX_SEEDS:
        raise UsageError(f"{where} {shown}: at most {MAX_SEEDS} seeds (each is two training runs)")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise UsageError(f"{where} {shown}: expected at least 2 distinct seeds (a p-value needs "
                         f"several runs per variant)")
    return seeds


# ---------------------------------------------------------------------------------- MLflow
@dataclass
class SearchInfo:
    """What the report reads of a finished search."""

    experiment_id: str
    experiment_name: str
    parent: Any  # mlflow Run of the search
    trials: list[Any]  # mlflow Runs of its trials
    name: str
    metric: str
    mode: str

    @property
    def objective(self) -> str:
        return f"best_{self.metric}"

    @property
    def data_digest(self) -> str:
        return self.parent.data.tags.get("data_digest", "")

    def space(self, client) -> dict[str, Any]:
        """The space as the search ran it (its ``effective_space.yaml`` artifact; {} if none)."""
        try:
            text = client.download_artifacts(self.parent.info.run_id, "effective_space.yaml")
            return yaml.safe_load(Path(text).read_text()) or {}
        except Exception:  # an older search without the artifact
            return {}


def find_search(client, experiment: str | None, run_id: str | None,
                search: str | None) -> SearchInfo:
    """The search's parent run and its trials, from an experiment name or a run id."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            parent = client.get_run(run_id)
        except MlflowException:
            raise UsageError(f"--run-id {run_id}: no such MLflow run") from None
        if parent.data.tags.get("run_kind") != "search":
            raise UsageError(f"--run-id {run_id}: not a search's parent run (its run_kind tag is "
                             f"{parent.data.tags.get('run_kind')!r}, expected 'search')")
        exp = client.get_experiment(parent.info.experiment_id)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments()))
            raise UsageError(f"--experiment {experiment}: no such MLflow experiment "
                             f"(known: {names or 'none'})")
        where = "tags.run_kind = 'search'" + (f" and tags.search = '{search}'" if search else "")
        parents = client.search_runs([exp.experiment_id], filter_string=where, max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if not parents:
            raise UsageError(f"--experiment {experiment}: no search run"
                             + (f" named {search!r}" if search else ""))
        parent = parents[0]
    name = parent.data.tags.get("search", parent.info.run_name)
    try:  # a record is not to be trusted: it names a folder (reports/) and MLflow filters
        check_name(name, f"search run {parent.info.run_id}: its recorded name")
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    trials = all_runs(client, exp.experiment_id,
                       f"tags.search = '{name}' and tags.run_kind = 'trial'")
    params = parent.data.params
    return SearchInfo(exp.experiment_id, exp.name, parent, trials, name,
                      params.get("metric", "valid_mae"), params.get("mode", "min"))


def check_search_selection(info: SearchInfo) -> str | None:
    """The search's selection rule again (``tuner.spaces.check_selection``): its metric must be a
    validation metric, and its mode the metric's direction unless the search recorded that its
    space set mode explicitly (tag ``mode_explicit``; a search from before that tag has not).
    Raises UsageError; returns the warning for an explicit mode against the direction."""
    from tuner.spaces import check_selection

    where = f"search {info.name!r}: "
    try:
        warning = check_selection(info.metric, info.mode, True, where)
    except SpaceError as exc:
        raise UsageError(str(exc)) from None
    if warning and info.parent.data.tags.get("mode_explicit") != "true":
        natural = "max" if info.mode == "min" else "min"
        raise UsageError(f"{where}mode: {info.mode} contradicts metric {info.metric}, which is "
                         f"better when {'higher' if natural == 'max' else 'lower'} (mode "
                         f"{natural}), and the search does not record that its space set mode "
                         f"explicitly; run the search again with mode: {natural}")
    return warning


def choose_trial(info: SearchInfo, regulariser: str | None) -> tuple[Any, str]:
    """The best trial by the search's validation objective; returns it and a note on the choice.

    As in the search's own summary, a diverged, errored or interrupted trial is never chosen
    (``tracking.NEVER_BEST``), whatever its validation value before it stopped."""
    key = info.objective
    scored = [t for t in info.trials if finite(t.data.metrics.get(key))
              and t.data.tags.get("status") not in NEVER_BEST]
    if not scored:
        raise UsageError(f"search {info.name!r}: no completed or pruned trial has a finite {key}")
    sign = 1.0 if info.mode == "min" else -1.0

    def best_of(runs):
        return min(runs, key=lambda r: sign * r.data.metrics[key])

    overall = best_of(scored)
    if regulariser:
        chosen = [t for t in scored if t.data.params.get("regulariser") == regulariser]
        if not chosen:
            raise UsageError(f"--regulariser {regulariser}: search {info.name!r} has no trial "
                             f"of it with a finite {key}")
        best = best_of(chosen)
        return best, f"the best {regulariser} trial by {key} ({info.mode})"
    if overall.data.params.get("regulariser") != BASELINE:
        return overall, f"the best trial by {key} ({info.mode})"
    regularised = [t for t in scored if t.data.params.get("regulariser") != BASELINE]
    if not regularised:
        raise UsageError(f"search {info.name!r}: every trial is unregularised; nothing to "
                         "compare with the twin without regulariser")
    best = best_of(regularised)
    return best, (f"the best regularised trial by {key} ({info.mode}); the overall best trial "
                  f"{overall.info.run_id} is unregularised")


def trial_config(run) -> dict[str, Any]:
    """The full flat trial config of an MLflow trial run (validated by :class:`TrialConfig`)."""
    flat = {k: parse_param(v) for k, v in run.data.params.items()}
    try:
        return TrialConfig.from_flat(flat).to_flat()
    except ConfigError as exc:
        raise UsageError(f"run {run.info.run_id}: its params are not a trial config ({exc})") from None


def twin_config(flat: dict[str, Any]) -> dict[str, Any]:
    """The same configuration without regulariser."""
    twin = {k: v for k, v in flat.items() if not k.startswith("regulariser.")}
    twin["regulariser"] = BASELINE
    return TrialConfig.from_flat(twin).to_flat()


def load_search_data(client, info: SearchInfo, spec: str | None, nonfinite: str,
                     unlabeled: str | None = None) -> MultimodalData:
    """The search's data (or ``spec``) with its unlabeled data (the search's ``--unlabeled``, or
    ``unlabeled``), checked against the search's data hash (which covers the unlabeled split)."""
    from tuner.preflight import load_data

    if spec is None:
        spec = info.space(client).get("data") or info.parent.data.tags.get("data_source")
        if not spec or not isinstance(spec, str):
            raise UsageError(f"search {info.name!r}: records no data source; pass --data")
        refuse_recorded_pickle(info, spec, "--data")
    if unlabeled is None:
        unlabeled = info.parent.data.tags.get("unlabeled_path")
        if unlabeled:
            refuse_recorded_pickle(info, unlabeled, "--unlabeled")
    data = load_data(spec, nonfinite, unlabeled)
    if info.data_digest and data.digest != info.data_digest:
        raise UsageError(f"{spec}: not the search's data (sha256 {data.digest[:12]}... here, "
                         f"{info.data_digest[:12]}... recorded by search {info.name!r})")
    return data


def refuse_recorded_pickle(info: SearchInfo, path: str, flag: str) -> None:
    """A data path read from the search's MLflow record (which anyone who can write to the
    store can change) is never unpickled: a recorded ``.pkl`` must be named by the user with
    ``flag``. A recorded Parquet folder or ``synthetic:`` set is read without any pickle."""
    if not path.startswith("synthetic:") and Path(path).suffix == ".pkl":
        raise UsageError(
            f"search {info.name!r} records its data as the pickle {path}; reading a pickle runs "
            f"code stored in it, so tuner.report reads one only when you name it: pass "
            f"{flag} {path} if you trust that file (or {flag} with a Parquet folder of it: "
            f"python -m tuner.data convert {path} OUTDIR)")


# ---------------------------------------------------------------------------------- re-runs
def train_rerun(config: dict[str, Any], data: MultimodalData,
                variants: dict[str, dict[str, Any]]) -> None:
    """One cell of the seed × variant grid: the variant's flat config with this seed, trained by
    the project's trainable."""
    from trainables.trainable import train_fusion

    train_fusion({**variants[config["variant"]], "seed": int(config["seed"])}, data)


def _rerun_callback(tracker, variants: dict[str, dict[str, Any]], report_name: str):
    from tuner.tracking import MlflowTrialCallback

    class RerunCallback(MlflowTrialCallback):
        """Mirrors each re-run into a child run of the report run (params: its full config)."""

        def _run_id(self, trial) -> str:
            if trial.trial_id in self.run_ids:
                return self.run_ids[trial.trial_id]
            run_id = self.tracker.find_child(trial.trial_id)
            if run_id is None:
                variant, seed = trial.config["variant"], int(trial.config["seed"])
                flat = {**variants[variant], "seed": seed}
                run = self.client.create_run(
                    self.tracker.experiment_id, run_name=f"{report_name}-{variant}-seed{seed}",
                    tags={"mlflow.parentRunId": self.tracker.parent_run_id,
                          "search": self.tracker.search_name, "run_kind": "rerun",
                          "ray_trial_id": trial.trial_id, "variant": variant,
                          "backbone": str(flat["backbone"]),
                          "regulariser": str(flat["regulariser"]), "seed": str(seed),
                          "status": "running"})
                run_id = run.info.run_id
                self.tracker._log_params(run_id, flat)
                self.tracker.log_inputs(run_id)
            self.run_ids[trial.trial_id] = run_id
            return run_id

    return RerunCallback(tracker)


@dataclass
class Rerun:
    variant: str
    seed: int
    run_id: str
    status: str
    test: dict[str, float]
    best_file: Path | None
    drop: dict[str, dict[str, float]] = field(default_factory=dict)  # drop set -> test metrics
    scores: np.ndarray | None = None
    #: :func:`collapsed_note` of the re-run (None: its critic did not collapse)
    collapsed: str | None = None


def run_reruns(variants: dict[str, dict[str, Any]], seeds: list[int], data: MultimodalData,
               tracker, args: argparse.Namespace, report_name: str) -> list[Rerun]:
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    from tuner.preflight import init_ray
    from tuner.tracking import final_status

    init_ray(args.address, args.verbose)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(
        tune.with_parameters(train_rerun, data=data, variants=variants),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    callback = _rerun_callback(tracker, variants, report_name)
    storage = args.storage or str(Path("ray_results").resolve())
    tuner = tune.Tuner(
        trainable,
        param_space={"variant": tune.grid_search(list(variants)),
                     "seed": tune.grid_search(seeds)},
        tune_config=TuneConfig(
            max_concurrent_trials=args.max_concurrent or None,
            # every re-run asks for the same resources: reuse the worker processes
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"{t.trial_id}-{t.config['variant']}-s{t.config['seed']}"),
        run_config=RunConfig(name=report_name, storage_path=storage, callbacks=[callback],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=1),
                             verbose=1 if args.verbose else 0),
    )
    results = tuner.fit()
    reruns = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id", "")
        best_file = None
        if result.checkpoint is not None:
            candidate = Path(result.checkpoint.path) / "best.pt"
            best_file = candidate if candidate.exists() else None
        status = "errored" if result.error else final_status(metrics)
        reruns.append(Rerun(config.get("variant", "?"), int(config.get("seed", -1)),
                            callback.run_ids.get(trial_id) or tracker.find_child(trial_id) or "",
                            status,
                            {k[len("test_"):]: float(v) for k, v in metrics.items()
                             if k.startswith("test_") and isinstance(v, (int, float))},
                            best_file, collapsed=collapsed_note(metrics)))
    return sorted(reruns, key=lambda r: (list(variants).index(r.variant), r.seed))


def probe_reruns(reruns: list[Rerun], data: MultimodalData, client) -> None:
    """Drop-set test metrics and critic scores of each re-run's best checkpoint (logged to its
    MLflow run as ``test_drop_<set>_<metric>`` and ``robustness_<set>_<acc2 variant>``, the set's
    ``+`` written ``_``). Runs after every re-run has chosen its checkpoint on validation."""
    from mlflow.entities import Metric

    from trainables.trainable import probe_checkpoint

    for rerun in reruns:
        if rerun.best_file is None:
            continue
        dropped, rerun.scores = probe_checkpoint(rerun.best_file, data, DROP_SETS, "test")
        rerun.drop = {d: {k[len("test_"):]: v for k, v in metrics.items()}
                      for d, metrics in dropped.items()}
        if rerun.run_id:
            now = int(time.time() * 1000)
            batch = [Metric(f"test_drop_{metric_name(d)}_{k}", v, now, 0)
                     for d, values in rerun.drop.items() for k, v in values.items()
                     if k in REPORT_METRICS and finite(v)]
            batch += [Metric(f"robustness_{metric_name(d)}_{k}", ratio, now, 0)
                      for d in rerun.drop for k in ROBUSTNESS_METRICS
                      if finite(ratio := robustness_ratio(rerun, d, k))]
            client.log_batch(rerun.run_id, metrics=batch)


def metric_name(dropped: str) -> str:
    """A drop set in an MLflow metric key, where ``+`` is not allowed: ``text+audio`` ->
    ``text_audio`` (the CSV and the report keep ``text+audio``)."""
    return "_".join(drop_set(dropped))


def kept(dropped: str) -> str:
    """The modalities a drop set leaves (MDM's x-axis): ``text+vision`` -> ``audio``."""
    removed = drop_set(dropped)
    return "+".join(m for m in DROPPABLE if m not in removed) or "none"


def dropped_metric(rerun: Rerun, dropped: str, metric: str) -> float:
    """``metric`` on test with ``dropped`` removed (Synergy's raw Acc-2^corrupt)."""
    return rerun.drop.get(dropped, {}).get(metric, math.nan)


def robustness_ratio(rerun: Rerun, dropped: str, metric: str) -> float:
    """``metric`` with ``dropped`` removed over ``metric`` on the full test set (MDM's
    Acc-2^corrupt / Acc-2)."""
    full = rerun.test.get(metric, math.nan)
    value = dropped_metric(rerun, dropped, metric)
    return value / full if finite(full) and full > 0 and finite(value) else math.nan


# ---------------------------------------------------------------------------------- statistics
def mann_whitney(a: list[float], b: list[float]) -> float:
    """Two-sided Mann–Whitney U p-value of two samples (NaNs dropped); 1.0 when every value of
    both samples is the same (no evidence of a difference), NaN when a sample is empty."""
    from scipy.stats import mannwhitneyu

    a = [x for x in a if finite(x)]
    b = [x for x in b if finite(x)]
    if not a or not b:
        return math.nan
    if len(set(a) | set(b)) == 1:
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and count of the finite
    values."""
    x = np.array([v for v in values if finite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size)


def metrics_table(reruns: list[Rerun], variants: list[str]) -> list[dict[str, Any]]:
    """One row per test metric: mean, std, n per variant and the Mann–Whitney p-value."""
    rows = []
    for metric in REPORT_METRICS:
        row: dict[str, Any] = {"metric": metric}
        samples = {}
        for v in variants:
            samples[v] = [r.test.get(metric, math.nan) for r in reruns if r.variant == v]
            row[f"{v}_mean"], row[f"{v}_std"], row[f"{v}_n"] = mean_std(samples[v])
        row["p_value"] = mann_whitney(samples[variants[0]], samples[variants[1]])
        rows.append(row)
    return rows


#: the two robustness measures: column prefix -> per-rerun value (drop set, Acc-2 variant)
ROBUSTNESS_MEASURES = {"ratio": robustness_ratio, "acc2": dropped_metric}


def robustness_table(reruns: list[Rerun], variants: list[str]) -> list[dict[str, Any]]:
    """One row per drop set (:data:`DROP_SETS`) × Acc-2 variant: per variant the ratio
    Acc-2(drop) / Acc-2(full) (MDM) and the raw Acc-2(drop) (Synergy), each as mean, std, n,
    with a Mann–Whitney p-value per measure."""
    rows = []
    for dropped in DROP_SETS:
        for metric in ROBUSTNESS_METRICS:
            row: dict[str, Any] = {"dropped": dropped, "kept": kept(dropped), "metric": metric}
            for measure, value_of in ROBUSTNESS_MEASURES.items():
                samples = {}
                for v in variants:
                    samples[v] = [value_of(r, dropped, metric) for r in reruns if r.variant == v]
                    (row[f"{v}_{measure}_mean"], row[f"{v}_{measure}_std"],
                     row[f"{v}_{measure}_n"]) = mean_std(samples[v])
                row[f"{measure}_p_value"] = mann_whitney(samples[variants[0]],
                                                         samples[variants[1]])
            rows.append(row)
    return rows


def scores_table(reruns: list[Rerun], data: MultimodalData, k: int) -> list[dict[str, Any]]:
    """The k test examples with the highest and the k with the lowest critic score (mean over
    the seeds of the regularised variant)."""
    stacked = [r.scores for r in reruns if r.scores is not None]
    if not stacked:
        return []
    scores = np.stack(stacked)  # (seeds, N)
    mean, std = scores.mean(axis=0), scores.std(axis=0)
    test = data.splits["test"]
    order = np.argsort(-mean, kind="stable")
    k = min(k, len(order) // 2 or 1)
    rows = []
    for which, index in (("most dependent", order[:k]), ("least dependent", order[::-1][:k])):
        for rank, i in enumerate(index, 1):
            rows.append({"group": which, "rank": rank, "row": int(i), "id": str(test.ids[i]),
                         "label": float(test.labels[i]), "score_mean": float(mean[i]),
                         "score_std": float(std[i]), "text": str(test.raw_text[i])[:100]})
    return rows


# ---------------------------------------------------------------------------------- output
def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]], variants: list[str], keys: list[str],
                   measure: str = "") -> str:
    """Rows as Markdown: the ``keys`` columns, then ``mean ± std (n)`` per variant, then p;
    ``measure`` picks the columns ``{variant}_{measure}_mean`` ... and ``{measure}_p_value``."""
    col = f"{measure}_" if measure else ""
    header = keys + [f"{v} (mean ± std, n)" for v in variants] + ["p (Mann–Whitney U)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[k]) for k in keys]
        cells += [f"{_fmt(row[f'{v}_{col}mean'])} ± {_fmt(row[f'{v}_{col}std'])} "
                  f"({row[f'{v}_{col}n']})" for v in variants]
        cells.append(_fmt(row[f"{col}p_value"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plain_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(r[c]) if not isinstance(r[c], str) else r[c] for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _default_style():
    """Our plots in matplotlib's default style (Optuna's plots switch pyplot to ggplot)."""
    return _pyplot().style.context("default")


def _in_default_style(func):
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _default_style():
            return func(*args, **kwargs)

    return wrapper


@_in_default_style
def plot_search_curves(client, info: SearchInfo, out: Path) -> list[Path]:
    """Validation curves of every trial (pruned ones dashed and marked x) and the best-so-far
    validation value over cumulative trial-epochs."""
    plt = _pyplot()
    metric = info.metric
    points = []  # (timestamp, step, value, trial index)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pruned_label = done_label = False
    for i, trial in enumerate(sorted(info.trials, key=lambda r: r.info.start_time)):
        history = sorted(client.get_metric_history(trial.info.run_id, metric),
                         key=lambda m: m.step)
        history = [m for m in history if finite(m.value)]
        if not history:
            continue
        points += [(m.timestamp, m.step, m.value, i) for m in history]
        steps, values = [m.step for m in history], [m.value for m in history]
        if trial.data.tags.get("status") == "pruned":
            ax.plot(steps, values, "--", color="0.6", lw=1,
                    label=None if pruned_label else "pruned")
            ax.plot(steps[-1], values[-1], "x", color="tab:red", ms=7)
            pruned_label = True
        else:
            ax.plot(steps, values, "-", lw=1.3, alpha=0.85,
                    label=None if done_label else "completed / early stopped")
            done_label = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"Search {info.name}: {len(info.trials)} trials ({metric}, pruned marked x)")
    if pruned_label or done_label:
        ax.legend()
    curves = out / "search_valid_curves.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    points.sort()
    sign = 1.0 if info.mode == "min" else -1.0
    best, xs, ys = math.inf, [], []
    for n, (_, _, value, _) in enumerate(points, 1):
        best = min(best, sign * value)
        xs.append(n)
        ys.append(sign * best)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step(xs, ys, where="post")
    ax.set_xlabel("cumulative trial-epochs (in the order they were reported)")
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title(f"Search {info.name}: best-so-far {metric}")
    best_path = out / "search_best_so_far.png"
    fig.tight_layout()
    fig.savefig(best_path, dpi=120)
    plt.close(fig)
    return [curves, best_path]


def plot_optuna(info: SearchInfo, storage: str, out: Path) -> tuple[list[Path], list[str]]:
    """Optuna's hyper-parameter importances and parallel coordinates of the search's study;
    a note instead of a plot where the study or a plot is unavailable."""
    import optuna

    plt = _pyplot()
    notes: list[str] = []
    try:
        study = optuna.load_study(study_name=info.name, storage=storage)
    except Exception as exc:  # KeyError (no such study), a storage that cannot be opened, ...
        return [], [redact_uris(f"Optuna study {info.name!r} not available in {storage} "
                                f"({type(exc).__name__}: {exc}); skipped the importance and "
                                "parallel-coordinates plots")]
    from optuna.visualization import matplotlib as ovm

    paths = []
    for fname, make in (("optuna_param_importances.png", ovm.plot_param_importances),
                        ("optuna_parallel_coordinate.png", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make(study)
            fig = np.ravel(axes)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=120)
            plt.close(fig)
            paths.append(out / fname)
        except Exception as exc:  # e.g. too few completed trials for importances
            notes.append(f"{fname}: skipped ({type(exc).__name__}: {exc})")
            plt.close("all")
    return paths, [redact_uris(note) for note in notes]


def _letters(modalities: str) -> str:
    """The papers' letters: ``text+audio`` -> ``T+A``."""
    return "+".join(m[0].upper() for m in modalities.split("+"))


@_in_default_style
def plot_robustness(rows: list[dict[str, Any]], variants: list[str], out: Path) -> Path:
    """Bars per drop set and variant: top row the ratio Acc-2(drop) / Acc-2(full) (MDM), bottom
    row the raw Acc-2(drop) (Synergy); one column per Acc-2 variant."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(ROBUSTNESS_MEASURES), len(ROBUSTNESS_METRICS),
                             figsize=(12, 8), sharey="row", squeeze=False)
    width = 0.8 / len(variants)
    x = np.arange(len(DROP_SETS))
    titles = {"ratio": "{m}(drop) / {m}(full)  [MDM]", "acc2": "{m}(drop)  [Synergy]"}
    for i, measure in enumerate(ROBUSTNESS_MEASURES):
        for ax, metric in zip(axes[i], ROBUSTNESS_METRICS):
            sel = [next(r for r in rows if r["dropped"] == d and r["metric"] == metric)
                   for d in DROP_SETS]
            for j, v in enumerate(variants):
                ax.bar(x + (j - (len(variants) - 1) / 2) * width,
                       [r[f"{v}_{measure}_mean"] for r in sel], width,
                       yerr=[r[f"{v}_{measure}_std"] for r in sel], capsize=3, label=v)
            if measure == "ratio":
                ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
            ax.set_xticks(x, [f"drop {_letters(d)}\nkeep {_letters(kept(d))}" for d in DROP_SETS])
            ax.set_title(titles[measure].format(m=metric))
        axes[i][0].set_ylabel(("robustness ratio" if measure == "ratio" else "Acc-2 with the drop")
                              + "\n(mean ± std over seeds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = out / "robustness.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- report.md
def write_markdown(out: Path, *, info: SearchInfo, chosen, choice_note: str, config: dict,
                   seeds: list[int], variants: list[str], command: str, report_run: str,
                   reruns: list[Rerun], metric_rows, robust_rows, score_rows, plots: list[Path],
                   notes: list[str]) -> Path:
    reg = variants[0]
    lines = [
        f"# Report on search `{info.name}`",
        "",
        f"- Experiment: `{info.experiment_name}`; search parent run `{info.parent.info.run_id}`; "
        f"report run `{report_run}`",
        f"- Data: `{info.parent.data.tags.get('data_source', '?')}`, "
        f"data hash (sha256) `{info.data_digest}`",
        f"- Unlabeled rows (`unlabeled_rate` {config.get('unlabeled_rate', 0)}): "
        + (f"labeled training rows with their labels hidden (`unlabeled_source: train`, not the "
           f"paper's method)" if config.get("unlabeled_source") == "train"
           else f"the data's `unlabeled` split "
                f"({info.parent.data.tags.get('unlabeled_data', 'not recorded')})"),
        f"- Code: git `{info.parent.data.tags.get('git_commit', '?')}` (search)",
        f"- Seeds: {', '.join(map(str, seeds))} ({len(seeds)} per variant)",
        f"- Command: `{command}`",
        "",
        "## Configuration",
        "",
        f"Trial run `{chosen.info.run_id}` ({info.objective} = "
        f"{_fmt(chosen.data.metrics[info.objective])}), chosen on validation only: "
        f"{choice_note}. "
        f"Re-trained as `{reg}` and as its twin `{BASELINE}` (same hyper-parameters, "
        "`regulariser: none`), once per seed; every re-run picks its epoch on validation and is "
        "evaluated on test once, with that epoch's weights.",
        "",
        "| key | value |", "|---|---|",
        *[f"| {k} | {config[k]} |" for k in sorted(config) if k != "seed"],
        "",
        "## Test metrics",
        "",
        "Mean ± sample standard deviation over the seeds (n finite runs), and the two-sided "
        f"Mann–Whitney U p-value of `{reg}` against `{BASELINE}` (scipy). Files: "
        "[metrics.csv](metrics.csv), per run: [runs.csv](runs.csv).",
        "",
        markdown_table(metric_rows, variants, ["metric"]),
        "",
        "## Modality-drop robustness",
        "",
        "Each re-run's best-validation checkpoint is evaluated once more on the test set with a "
        "set of modalities removed (`dropped`; `kept` is what remains). Two protocols:",
        "",
        "- **MDM** (Colombo et al., EMNLP 2021, Sec. 5.3, Fig. 2 and 4): train on all modalities, "
        "drop text at inference and keep A (`text+vision`), V (`text+audio`) or A+V (`text`); "
        "the measure is the ratio Acc-2(drop) / Acc-2(full) (1 = no loss).",
        "- **Synergy** (Shankar, 2021, Sec. 5.5, Table 4): drop T (`text`), T+V (`text+vision`) "
        "or T+A (`text+audio`); the measure is the raw binary accuracy Acc-2(drop).",
        "",
        "The single drops `audio` and `vision` are in neither paper and are reported as well. "
        "Removed means: audio / vision features set to 0; text features set to 0 and every word "
        "of the BERT token input replaced by `[MASK]` (attention mask, `[CLS]`/`[SEP]` and the "
        "token steps kept, so MAG still receives audio and vision on every word step; the "
        "papers do not say how they removed text), raw text emptied; sequence lengths kept. "
        "Nothing here chooses anything: trials and epochs were chosen on validation before. "
        "File: [robustness.csv](robustness.csv).",
        "",
        "Ratio Acc-2(drop) / Acc-2(full) (MDM):",
        "",
        markdown_table(robust_rows, variants, ["dropped", "kept", "metric"], "ratio"),
        "",
        "Acc-2 with the drop (Synergy):",
        "",
        markdown_table(robust_rows, variants, ["dropped", "kept", "metric"], "acc2"),
        "",
        "![robustness](robustness.png)",
        "",
    ]
    lines += ["## Critic scores", ""]
    if score_rows:
        lines += [
            f"Per-example score of the `{reg}` statistic network T_θ on the joint sample of each "
            "test example (eval mode; T's logit for the paper's sigmoid critic, which does not "
            "saturate; mean ± std over the seeds): high = the critic finds the "
            "modalities dependent. File: [critic_scores.csv](critic_scores.csv).",
            "",
            "| group | rank | id | label | score | text |", "|---|---|---|---|---|---|",
            *[f"| {r['group']} | {r['rank']} | {r['id']} | {_fmt(r['label'], 2)} | "
              f"{_fmt(r['score_mean'])} ± {_fmt(r['score_std'])} | "
              f"{r['text'].replace('|', '/')} |" for r in score_rows],
            "",
        ]
    else:
        lines += [f"`{reg}` has no critic with per-example scores (only MDM has); none listed.", ""]
    lines += ["## Search plots", ""]
    for p in plots:
        if p.name != "robustness.png":
            lines += [f"![{p.stem}]({p.name})", ""]
    notes = list(notes)
    if collapsed_note(chosen):
        notes.append(f"the chosen trial `{chosen.info.run_id}`: {collapsed_note(chosen)}")
    notes += [f"re-run {r.variant}/seed {r.seed}: {r.collapsed}" for r in reruns if r.collapsed]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Re-runs", "", "| variant | seed | status | MLflow run |", "|---|---|---|---|",
              *[f"| {r.variant} | {r.seed} | {r.status}"
                f"{' (critic collapsed)' if r.collapsed else ''} | `{r.run_id}` |" for r in reruns],
              ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------- main
def output_dir(args: argparse.Namespace, kind: str, search: str) -> tuple[str, Path]:
    """The run's name (``--name``, else ``<kind>-<search>-<time>``) and its output folder
    (``--out``, else ``reports/<name>``), created; shared by the report and the table."""
    name = args.name or f"{kind}-{search}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or Path("reports") / name)
    out.mkdir(parents=True, exist_ok=True)
    return name, out


def start_driver_run(client, tracking_uri: str, info: SearchInfo, *, name: str, kind: str,
                     tags: dict[str, str], data: MultimodalData, unlabeled: str | None):
    """The MLflow run of a report or a table (``run_kind`` ``kind``), a child of the search's
    parent run: the data's tags and dataset inputs, the git commit and the ``env.*`` tags of
    where it runs (tuner.tracking.environment_tags). Returns a :class:`~tuner.tracking.Tracker`
    whose trial runs (the re-runs) become the new run's children, and the run's id."""
    from tuner.tracking import Tracker, dataset_inputs, environment_tags, git_commit

    tracker = Tracker(tracking_uri, info.experiment_name)
    run_id = client.create_run(
        info.experiment_id, run_name=name,
        tags={"mlflow.parentRunId": info.parent.info.run_id, "run_kind": kind, "search": name,
              **tags, "data_digest": data.digest, "data_source": data.source,
              "git_commit": git_commit(), **environment_tags()}).info.run_id
    tracker.parent_run_id, tracker.search_name = run_id, name
    tracker.inputs = dataset_inputs(data, str(Path(unlabeled).expanduser().resolve())
                                    if unlabeled else None)
    tracker.log_inputs(run_id)
    return tracker, run_id


def print_environment_and_cost(client, infos: "SearchInfo | list[SearchInfo]", run_id: str,
                               reruns: list[Rerun]) -> str:
    """Where the report or table ran, whether its re-runs ran elsewhere (``env.*`` tags), and
    what each search cost per cell (:func:`tuner.tracking.cost_per_cell`). Returns the
    environment line."""
    from tuner.tracking import cost_per_cell, environments_differ, format_environment

    line = f"Environment: {format_environment(client.get_run(run_id).data.tags)}"
    print(line)
    envs = {}
    for rerun in reruns:
        if rerun.run_id:
            envs[f"{rerun.variant} seed {rerun.seed}"] = client.get_run(rerun.run_id).data.tags
    differ = environments_differ(envs)
    if differ:
        print(f"warning: the re-runs ran in different environments: {differ}")
    for info in infos if isinstance(infos, list) else [infos]:
        rows = cost_per_cell(info.trials)
        if rows:
            print(f"Cost of search {info.name!r} per cell (wall seconds and trial-epochs summed "
                  "over its trials, peak memory the largest of a trial):")
            print(plain_table([{k: (_fmt(v, 1) if isinstance(v, float) else v)
                               for k, v in r.items()} for r in rows]))
    return line


def run_report(args: argparse.Namespace, command: str) -> int:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from tuner.preflight import check_address, check_tracking_uri, study_storage_for
    from tuner.tracking import DEFAULT_TRACKING_URI, absolute_sqlite_uri

    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UsageError(f"--max-epochs: expected a value >= 1, got {args.max_epochs}")
    if args.top_k < 1:
        raise UsageError(f"--top-k: expected a value >= 1, got {args.top_k}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise UsageError("--cpus-per-trial must be > 0, --gpus-per-trial and --max-concurrent >= 0")
    if args.search and not args.experiment:
        raise UsageError("--search: use it with --experiment (--run-id names the search already)")
    for flag in ("experiment", "search", "name"):
        for value in (lambda v: v if isinstance(v, list) else [v])(getattr(args, flag)):
            if value is None:
                continue
            try:
                check_name(value, f"--{flag}")
            except SpaceError as exc:
                raise UsageError(str(exc)) from None
    if args.search and len(args.search) > 1:
        raise UsageError("--search: several searches merge only into a table (--table)")
    if args.dataset or args.dry_run:
        raise UsageError(f"{'--dataset' if args.dataset else '--dry-run'}: only with --table")
    check_tracking_uri(args.mlflow_uri)
    check_address(args.address)
    # absolute: MLflow caches one store per URI string per process
    tracking_uri = absolute_sqlite_uri(args.mlflow_uri or DEFAULT_TRACKING_URI)
    client = MlflowClient(tracking_uri=tracking_uri)
    info = find_search(client, args.experiment, args.run_id,
                       args.search[0] if args.search else None)
    selection = check_search_selection(info)
    if selection:
        print(f"warning: {selection}", file=sys.stderr)
    if args.seeds is None:
        seeds = parse_seeds(info.space(client).get("seeds") or list(range(10)),
                            f"search {info.name!r}: its space's seeds")
    chosen, choice_note = choose_trial(info, args.regulariser)
    config = trial_config(chosen)
    if args.max_epochs is not None:
        config["max_epochs"] = args.max_epochs
    reg = config["regulariser"]
    if collapsed_note(chosen):
        print(f"warning: chosen trial {chosen.info.run_id}: {collapsed_note(chosen)}",
              file=sys.stderr)
    variants = {reg: config, BASELINE: twin_config(config)}
    data = load_search_data(client, info, args.data, args.nonfinite, args.unlabeled)

    name, out = output_dir(args, "report", info.name)
    print(f"Report {name!r} on search {info.name!r}: {choice_note}, trial run "
          f"{chosen.info.run_id}; re-training {reg} and {BASELINE} with seeds "
          f"{', '.join(map(str, seeds))} ({2 * len(seeds)} runs).", flush=True)

    tracker, report_run = start_driver_run(
        client, tracking_uri, info, name=name, kind="report",
        tags={"report_of": info.name, "chosen_run_id": chosen.info.run_id, "command": command},
        data=data, unlabeled=getattr(args, "unlabeled", None))
    client.log_batch(report_run, params=[
        Param("seeds", ",".join(map(str, seeds))), Param("regulariser", reg),
        Param("backbone", str(config["backbone"])), Param("max_epochs", str(config["max_epochs"])),
        Param("objective", info.objective), Param("chosen_run_id", chosen.info.run_id)])
    try:
        reruns = run_reruns(variants, seeds, data, tracker, args, name)
        probe_reruns(reruns, data, client)
    except BaseException:
        client.set_terminated(report_run, status="KILLED")
        raise

    labels = list(variants)
    metric_rows = metrics_table(reruns, labels)
    robust_rows = robustness_table(reruns, labels)
    score_rows = scores_table([r for r in reruns if r.variant == reg], data, args.top_k)
    write_csv(metric_rows, out / "metrics.csv")
    write_csv(robust_rows, out / "robustness.csv")
    write_csv(score_rows, out / "critic_scores.csv")
    write_csv([{"variant": r.variant, "seed": r.seed, "status": r.status, "run_id": r.run_id,
                "critic_collapsed": r.collapsed is not None,
                **{f"test_{m}": r.test.get(m, math.nan) for m in REPORT_METRICS},
                **{f"robustness_{metric_name(d)}_{k}": robustness_ratio(r, d, k)
                   for d in DROP_SETS for k in ROBUSTNESS_METRICS},
                **{f"test_drop_{metric_name(d)}_{k}": dropped_metric(r, d, k)
                   for d in DROP_SETS for k in ROBUSTNESS_METRICS}} for r in reruns],
              out / "runs.csv")

    plots = plot_search_curves(client, info, out)
    optuna_plots, notes = plot_optuna(info, args.optuna_storage or study_storage_for(args), out)
    plots += optuna_plots
    plots.append(plot_robustness(robust_rows, labels, out))
    write_markdown(out, info=info, chosen=chosen, choice_note=choice_note, config=config,
                   seeds=seeds, variants=labels, command=command, report_run=report_run,
                   reruns=reruns, metric_rows=metric_rows, robust_rows=robust_rows,
                   score_rows=score_rows, plots=plots, notes=notes)

    now = int(time.time() * 1000)
    summary = []
    for row in metric_rows:
        for v in labels:
            summary += [Metric(f"test_{row['metric']}_mean_{v}", row[f"{v}_mean"], now, 0),
                        Metric(f"test_{row['metric']}_std_{v}", row[f"{v}_std"], now, 0)]
        summary.append(Metric(f"test_{row['metric']}_pvalue", row["p_value"], now, 0))
    for row in robust_rows:
        stem = f"{metric_name(row['dropped'])}_{row['metric']}"  # not `name`: the report's
        for measure, prefix in (("ratio", "robustness"), ("acc2", "test_drop")):
            key = f"{prefix}_{stem}"
            summary += [Metric(f"{key}_mean_{v}", row[f"{v}_{measure}_mean"], now, 0)
                        for v in labels]
            summary.append(Metric(f"{key}_pvalue", row[f"{measure}_p_value"], now, 0))
    summary = [m for m in summary if finite(m.value)]
    for start in range(0, len(summary), 1000):
        client.log_batch(report_run, metrics=summary[start:start + 1000])
    client.log_artifacts(report_run, str(out))
    client.log_artifacts(info.parent.info.run_id, str(out), f"report/{name}")
    failed = [r for r in reruns if not r.test]
    client.set_terminated(report_run, status="FINISHED" if not failed else "FAILED")

    print("\n" + "=" * 72)
    print_environment_and_cost(client, info, report_run, reruns)
    print(f"Test metrics over seeds {', '.join(map(str, seeds))} ({reg} vs {BASELINE}; "
          "p: two-sided Mann-Whitney U):")
    print(plain_table(metric_rows))
    for measure, title in (("ratio", "Acc-2(drop) / Acc-2(full) (MDM)"),
                           ("acc2", "Acc-2(drop) (Synergy)")):
        print(f"\nRobustness, {title}:")
        print(plain_table([{k: r[k] for k in ("dropped", "kept", "metric")}
                           | {k: r[k] for k in r if k.startswith(tuple(f"{v}_{measure}_"
                                                                     for v in labels))}
                           | {"p_value": r[f"{measure}_p_value"]} for r in robust_rows]))
    if score_rows:
        print(f"\n{reg} critic scores, most and least dependent test examples:")
        print(plain_table([{k: r[k] for k in ("group", "rank", "id", "label", "score_mean")}
                           for r in score_rows]))
    for note in notes:
        print(f"note: {note}")  # redacted by plot_optuna
    for r in reruns:
        if r.collapsed:
            print(f"warning: re-run {r.variant}/seed {r.seed}: {r.collapsed}", file=sys.stderr)
    if failed:
        print(f"warning: {len(failed)} re-run(s) ended without test metrics: "
              + ", ".join(f"{r.variant}/seed {r.seed} ({r.status})" for r in failed),
              file=sys.stderr)
    print(f"\nReport: {out / 'report.md'} (also artifacts of MLflow runs {report_run} and "
          f"{info.parent.info.run_id} under report/{name}/)")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tuner.search import command_line

    command = command_line("tuner.report", sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        if args.table:
            from tuner.table import run_table

            return run_table(args, command)
        return run_report(args, command)
    except (UsageError, ConfigError, DataError) as exc:
        print(f"error: {redact_uris(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from tuner.preflight import exit_cli

    exit_cli(main())
