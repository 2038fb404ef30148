"""MLflow tracking from the driver: one experiment per space, a parent run per search, a child
run per trial (params, per-epoch metrics, status), the best checkpoint as an artifact.

Everything is logged by the driver (a Tune callback), so trials need no access to the tracking
store and a cluster's workers need no MLflow credentials. Runs are found again by tags
(``search``, ``ray_trial_id``), so a resumed search writes into the same runs instead of
duplicating them.

The store is a record, not a dependency: a failed MLflow call (server gone, disk full, database
locked) never stops the search. It prints one warning per kind of failure, the tracker pauses
MLflow for ``RETRY_AFTER_S`` seconds, and :meth:`Tracker.sync_results` (run at the end of every
search and of every ``--resume``) writes what MLflow missed from Ray's results on disk: each
finished trial ends up in MLflow once, with every epoch once.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from trainables.config import TrialConfig
from trainables.data import MultimodalData
from tuner.redact import redact_uris
from tuner.spaces import DEFAULT_CELL_KEYS, cell_of, cell_tag

__all__ = ["DEFAULT_TRACKING_URI", "ENV_PREFIX", "absolute_sqlite_uri", "all_runs",
           "dataset_inputs", "DiskFull", "DiskSpaceGuard", "Tracker", "MlflowTrialCallback",
           "disk_full", "environment_tags", "environments_differ", "final_status",
           "format_environment", "git_commit", "rebind_callbacks", "runs_url"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
METRIC_PREFIXES = ("valid_", "train_", "best_", "test_", "cost.")
METRIC_KEYS = ("epoch", "epoch_seconds", "best_epoch")
TERMINAL = {"completed": "FINISHED", "early_stopped": "FINISHED", "pruned": "KILLED",
            "diverged": "FAILED", "errored": "FAILED", "interrupted": "KILLED"}
#: trial statuses never chosen as a search's best, whatever validation value came before:
#: a diverged trial's pre-divergence epochs, an errored one's, an interrupted one's partial run
NEVER_BEST = frozenset({"diverged", "errored", "interrupted"})
#: the prefix of the environment tags (:func:`environment_tags`); trials report them with it too
ENV_PREFIX = "env."
#: the query parameter that opens MLflow 3.x's Model-training workspace, not its GenAI one
WORKFLOW_QUERY = "workflowType=machine_learning"
#: the MLflow input tag that says what a dataset was used for
DATASET_CONTEXT_TAG = "mlflow.data.context"
#: the note on a child run that Ray never recorded (see :meth:`Tracker.sync_results`)
INTERRUPTED_NOTE = ("the driver stopped before Ray recorded this trial; the resumed search ran "
                    "a new trial in its place")
#: the artifact folders of the best trial's run: best.pt alone, and the MLflow Model (with best.pt)
CHECKPOINT_FOLDER = "best_checkpoint"
MODEL_FOLDER = "model"
#: after a failed MLflow call, MLflow is left alone this long (the search does not wait for it)
RETRY_AFTER_S = 30.0
#: an HTTP tracking server that does not answer costs the driver seconds, not MLflow's default
#: minutes of retries (7 retries with exponential backoff) per call; the user's env vars win
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class DiskFull(RuntimeError):
    """A trial (or the driver) could not write because its disk is full: the search stops, as
    if interrupted, so that ``--resume`` continues it once there is space."""


def disk_full(text: str) -> str | None:
    """If ``text`` (an error, a traceback) says the disk is full: what it names (a path, and
    for :class:`DiskFull` the free space), or ""; None otherwise."""
    if "no space left on device" not in text.lower() and "[errno 28]" not in text.lower():
        return None
    for line in text.splitlines():  # our own DiskFull says it best (the exception line)
        if "DiskFull: " in line and "No space left on device: " in line:
            return line.split("No space left on device: ", 1)[1].strip()
    for match in re.finditer(r"No space left on device: '([^'{}]+)'", text):
        return match.group(1)
    return ""


class DiskSpaceGuard(Callback):
    """Stops the search while the storage still has room for what one step writes.

    Ray uploads its experiment state and trial files into the storage folder in place: on a
    disk that runs full mid-copy they are cut short, and a cut experiment state cannot be
    resumed. This callback checks the free space of a local storage before every step of the
    Tune loop and raises :class:`DiskFull` when it is below ``FACTOR`` times the largest
    checkpoint seen (at least ``MIN_FREE`` bytes), so the search stops like an interrupted one
    and ``--resume`` continues it once there is space.
    """

    MIN_FREE = 1 << 20
    FACTOR = 3

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.largest = 0

    def _local(self) -> Path | None:
        path = Path(self.storage)
        return path if "://" not in self.storage and path.exists() else None

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        try:
            path = Path(checkpoint.path)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        except (OSError, AttributeError):
            return
        self.largest = max(self.largest, size)

    def on_step_begin(self, iteration, trials, **info) -> None:
        path = self._local()
        if path is None:
            return
        free = shutil.disk_usage(path).free
        needed = max(self.MIN_FREE, self.FACTOR * self.largest)
        if free < needed:
            raise DiskFull(f"[Errno 28] No space left on device: '{path}' (only "
                           f"{free / 2**20:.1f} MiB free, one step may write "
                           f"{needed / 2**20:.1f} MiB)")


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def parse_param(text: str) -> Any:
    """A value back from its MLflow param string (``str(value)`` when it was logged)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result that belong in MLflow."""
    out = {}
    for key, value in result.items():
        if not (key.startswith(METRIC_PREFIXES) or key in METRIC_KEYS):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """:func:`trial_metrics` plus what the trial cost so far, from Tune's own counters:
    ``cost.wall_s`` (the trial's wall seconds, Tune's ``time_total_s``) and ``cost.trial_epochs``
    (its epochs, Tune's ``training_iteration``); the trial reports the peak memory itself."""
    metrics = trial_metrics(result)
    for key, source in (("cost.wall_s", "time_total_s"),
                        ("cost.trial_epochs", "training_iteration")):
        if finite(result.get(source)):
            metrics[key] = float(result[source])
    return metrics


def result_environment(result: dict[str, Any]) -> dict[str, str]:
    """The ``env.*`` entries of a trial's report (its first report of each start has them)."""
    return {k: str(v) for k, v in result.items()
            if k.startswith(ENV_PREFIX) and isinstance(v, str)}


def final_status(last_result: dict[str, Any]) -> str:
    """A finished trial's status from its last report.

    A trial ends itself (completed / early_stopped / diverged, reported in ``trial_status``);
    one that was still ``running`` when it terminated was stopped by the scheduler, and the only
    scheduler that stops trials here is the Optuna pruner. Deriving it from the result (rather
    than from the pruner's memory) keeps it right for a search resumed by a new driver.
    """
    status = str(last_result.get("trial_status", "running"))
    return "pruned" if status == "running" else status


class Tracker:
    """The experiment and parent run of one search."""

    def __init__(self, tracking_uri: str, experiment_name: str,
                 artifact_root: str | Path | None = None,
                 cell_keys: "list[str] | tuple[str, ...]" = DEFAULT_CELL_KEYS) -> None:
        self.tracking_uri = tracking_uri
        #: the space's ``cells`` keys: each child run's ``cell`` tag (tuner.spaces.cell_tag)
        self.cell_keys = tuple(cell_keys)
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            # each retry is a urllib3 warning; the tracker prints one line per kind instead
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        _forget_artifact_repos()
        self.client = MlflowClient(tracking_uri=absolute_sqlite_uri(tracking_uri))
        #: failed MLflow calls during this search: kind -> count (one warning line per kind)
        self.failures: dict[str, int] = {}
        #: trials whose MLflow record missed something (synced by :meth:`sync_results`)
        self.missed: set[str] = set()
        self._paused_until = 0.0
        self._failures_since_sync = 0
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = None
            if artifact_root is None and tracking_uri.startswith("sqlite:"):
                artifact_root = Path("mlartifacts")
            if artifact_root is not None:
                location = (Path(artifact_root).resolve() / experiment_name).as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=location,
                # open the runs table, not the GenAI overview, in the 3.x UI
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            self.experiment_id = experiment.experiment_id
        self.experiment_name = experiment_name
        self.parent_run_id: str | None = None
        self.search_name: str | None = None
        #: the data as MLflow dataset inputs (:func:`dataset_inputs`), logged on every run
        self.inputs: list[Any] = []
        #: the data's sha256, also a tag of each trial run (epoch timings are found by it)
        self.data_digest: str | None = None
        #: what the parent's live ``best_so_far`` follows (the search sets them)
        self.objective: str | None = None
        self.mode = "min"
        #: ``models:/<space>-best/<version>`` once the best model is registered
        self.registered: str | None = None

    # ------------------------------------------------------------------ failures
    @property
    def available(self) -> bool:
        """False for a while after a failed call: the search does not wait for MLflow."""
        return time.monotonic() >= self._paused_until

    def safely(self, what: str, fn, *args, **kwargs) -> bool:
        """Run ``fn``; a failure is a warning (one line per kind), never an exception.

        Returns whether ``fn`` ran and succeeded (False while MLflow is paused)."""
        if not self.available:
            return False
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; none may stop a search
            self.record_failure(what, exc)
            return False
        return True

    def record_failure(self, what: str, exc: BaseException) -> None:
        kind = failure_kind(exc)
        self._paused_until = time.monotonic() + RETRY_AFTER_S
        first = kind not in self.failures
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self._failures_since_sync += 1
        if first:
            print(redact_uris(
                f"warning: MLflow {self.tracking_uri}: {kind} ({what}: {short_error(exc)}); "
                f"the search goes on, Ray keeps every result on disk, MLflow is retried every "
                f"{RETRY_AFTER_S:.0f} s and what it missed is written at the end (or by --resume)"),
                file=sys.stderr, flush=True)

    @property
    def incomplete(self) -> bool:
        """Whether MLflow lacks something of this search that the last sync could not write."""
        return bool(self.missed) or self._failures_since_sync > 0

    # ------------------------------------------------------------------ parent run
    def log_inputs(self, run_id: str) -> None:
        """The data's dataset inputs (:attr:`inputs`) on a run."""
        if self.inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)

    def log_progress(self, counts: dict[str, float]) -> None:
        """The parent run's live counts (``trials_completed``, ``trials_pruned``, ...): a
        metric each, the step the number of trials finished, so the row shows progress."""
        if self.parent_run_id is None:
            return
        step = int(sum(counts.get(k, 0) for k in ("trials_completed", "trials_pruned",
                                                  "trials_failed")))
        ts = _now_ms()
        metrics = [Metric(k, float(v), ts, step) for k, v in counts.items() if finite(v)]
        self.client.log_batch(self.parent_run_id, metrics=metrics)

    def find_parent(self, search_name: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.search = '{search_name}' and tags.run_kind = 'search'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_search(self, search_name: str, params: dict[str, Any], tags: dict[str, str],
                     files: dict[str, str]) -> str:
        """Create (or, for a resumed search, reopen) the parent run."""
        self.search_name = search_name
        run_id = self.find_parent(search_name)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=search_name,
                tags={"search": search_name, "run_kind": "search", **tags},
            )
            run_id = run.info.run_id
            self._log_params(run_id, params)
            self.log_inputs(run_id)
            for name, text in files.items():
                self.client.log_text(run_id, text, name)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.parent_run_id = run_id
        return run_id

    def finish_search(self, status: str, best: dict[str, Any] | None,
                      best_checkpoint: Path | None, best_run_id: str | None,
                      data: MultimodalData | None = None) -> None:
        """Close the parent run with the best trial's metrics, checkpoint and model version.

        With ``data`` (the search's data: its widths and an input example), the registered
        version is the best checkpoint as an MLflow Model (:meth:`log_best_model`); without, the
        ``best_checkpoint`` folder. Never raises: each step that fails is a warning (see
        :meth:`safely`)."""
        run_id = self.parent_run_id
        if run_id is None:
            return
        self._paused_until = 0.0  # the end of a search is worth one more try
        if best:
            self.safely("best metrics", self._log_best, run_id, best)
        if best_run_id:
            self.safely("best run tag", self.client.set_tag, run_id, "best_run_id", best_run_id)
        if best_checkpoint is not None and best_checkpoint.exists():
            self.safely("best checkpoint artifact", self.client.log_artifact, run_id,
                        str(best_checkpoint), "best_checkpoint")
            if best_run_id and self.safely("best checkpoint artifact", self.client.log_artifact,
                                           best_run_id, str(best_checkpoint), "best_checkpoint"):
                source = self.log_best_model(best_run_id, best_checkpoint, data)
                if source is not None:
                    self.safely("model registry", self.register_best, best_run_id, best or {},
                                source)
        self.safely("parent run status", self.client.set_terminated, run_id, status=status)

    def _log_best(self, run_id: str, best: dict[str, Any]) -> None:
        logged = self.client.get_run(run_id).data.metrics  # a resumed search logs changes only
        metrics = [Metric(k, v, _now_ms(), 0) for k, v in trial_metrics(best).items()
                   if k.startswith(("best_", "test_")) and logged.get(k) != v]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    @property
    def registered_model_name(self) -> str:
        return f"{self.experiment_name}-best"

    def log_best_model(self, run_id: str, best_file: Path,
                       data: MultimodalData | None) -> str | None:
        """Log ``best_file`` as an MLflow Model (pyfunc, :func:`trainables.serving.save_pyfunc`)
        in the artifact folder ``model`` of the best trial's run; returns the folder to register.

        ``"model"``: logged now, or already there (a resumed search logs it once).
        ``"best_checkpoint"``: without ``data``, or when the model cannot be written (a warning
        says why; the checkpoint folder is registered as before). None: the upload failed (the
        store: a warning, and ``--resume`` logs and registers it)."""
        if data is None:
            return CHECKPOINT_FOLDER
        listed: list[Any] = []
        if not self.safely("best model artifact",
                           lambda: listed.extend(self.client.list_artifacts(run_id, MODEL_FOLDER))):
            return None
        if any(a.path == f"{MODEL_FOLDER}/MLmodel" for a in listed):
            return MODEL_FOLDER
        with tempfile.TemporaryDirectory(prefix="best-model-") as tmp:
            try:
                from trainables.serving import model_input, save_pyfunc

                example = model_input(data.splits["train"], slice(0, 1))
                folder = save_pyfunc(best_file, data.dims, Path(tmp) / MODEL_FOLDER, example)
            except Exception as exc:  # noqa: BLE001 - a model that cannot be saved stops nothing
                print(f"warning: the best checkpoint could not be written as an MLflow Model "
                      f"({type(exc).__name__}: {short_error(exc)}); the registered version is "
                      f"the folder {CHECKPOINT_FOLDER} (best.pt) instead", file=sys.stderr,
                      flush=True)
                return CHECKPOINT_FOLDER
            if not self.safely("best model artifact", self.client.log_artifacts, run_id,
                               str(folder), MODEL_FOLDER):
                return None
        return MODEL_FOLDER

    def register_best(self, run_id: str, metrics: dict[str, Any],
                      source: str = "best_checkpoint") -> str:
        """Register the artifact folder ``source`` of the best trial's run (``model``: the MLflow
        Model; ``best_checkpoint``: the folder with best.pt) as a new version of
        ``<space>-best``; a run that has a version already (a resumed search) gets none."""
        name = self.registered_model_name
        try:
            self.client.get_registered_model(name)
        except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST
            self.client.create_registered_model(
                name, description=f"Best models of searches over the space "
                                  f"{self.experiment_name!r}: MLflow Models (pyfunc; "
                                  f"mlflow.pyfunc.load_model('models:/{name}/<version>')) that "
                                  f"hold best.pt (weights, config, metrics)")
        for version in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            self.registered = f"models:/{name}/{version.version}"
            return version.version  # already registered (a resumed search)
        tags = {k: f"{v:.6g}" for k, v in trial_metrics(metrics).items()
                if k.startswith(("best_valid_", "test_"))}
        tags["search"] = str(self.search_name)
        tags["format"] = "mlflow-pyfunc" if source == MODEL_FOLDER else "checkpoint"
        version = self.client.create_model_version(
            name, source=f"runs:/{run_id}/{source}", run_id=run_id, tags=tags,
            description=f"best trial of search {self.search_name!r}, chosen on validation",
        )
        self.registered = f"models:/{name}/{version.version}" + (
            "" if source == MODEL_FOLDER else f" (the {source} folder, not an MLflow Model)")
        return version.version

    # ------------------------------------------------------------------ child runs
    def find_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.search = '{self.search_name}' and tags.ray_trial_id = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[start:start + 100])

    def trial_runs(self) -> dict[str, Any]:
        """The child runs of this search by Ray trial id (the first one if a trial had two)."""
        runs: dict[str, Any] = {}
        for run in all_runs(
                self.client, self.experiment_id,
                f"tags.search = '{self.search_name}' and tags.run_kind = 'trial'",
                order_by=["attributes.start_time ASC"]):
            runs.setdefault(run.data.tags.get("ray_trial_id", ""), run)
        return runs

    def create_child(self, trial_id: str, config: dict[str, Any]) -> str:
        """A new child run for a trial: its tags and every effective parameter."""
        try:
            params = TrialConfig.from_flat(dict(config)).to_flat()
        except (ValueError, TypeError):
            params = dict(config)
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{trial_id}-{config.get('backbone')}-{config.get('regulariser')}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "search": self.search_name,
                "run_kind": "trial",
                "ray_trial_id": trial_id,
                "backbone": str(config.get("backbone")),
                "regulariser": str(config.get("regulariser")),
                "seed": str(config.get("seed")),
                "status": "running",
                **self._cell_tag(config),
                **({"data_digest": self.data_digest} if self.data_digest else {}),
            },
        )
        self._log_params(run.info.run_id, params)
        self.log_inputs(run.info.run_id)
        return run.info.run_id

    def _cell_tag(self, config: dict[str, Any]) -> dict[str, str]:
        """``{"cell": ...}``: the row of the paper's table the trial belongs to (none for a
        config without backbone or regulariser)."""
        try:
            cell = cell_of(config, getattr(self, "cell_keys", DEFAULT_CELL_KEYS))
        except KeyError:
            return {}
        return {"cell": cell_tag(cell)}

    def finish_child(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        tags = {"status": status, **(tags or {})}
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=TERMINAL.get(status, "FINISHED"))

    def sync_results(self, results) -> int:
        """Write into MLflow what it missed of the finished trials in a Tune ``ResultGrid``.

        Ray's results on disk are the truth: per trial, its ``progress.csv`` (every report), its
        last result, its error. A trial without a child run gets one; a child run gets the
        epochs it lacks (by ``epoch`` step, so nothing is logged twice), its test metrics, its
        status tag and terminal state. A child run still open whose trial Ray does not know
        (the driver was killed between creating it and Ray's next experiment snapshot, so the
        resumed search asked for a new trial instead) is closed as ``interrupted`` (KILLED).
        Returns how many trials needed writing; raises nothing (a failure is a warning and the
        rest waits for the next ``--resume``).
        """
        if self.parent_run_id is None:
            return 0
        self._paused_until = 0.0
        self._failures_since_sync = 0
        synced: list[int] = []

        def run() -> None:
            existing = self.trial_runs()
            known = set()
            for result in results:
                trial_id = _result_trial_id(result)
                known.add(trial_id)
                if trial_id and self._sync_one(result, trial_id, existing):
                    synced.append(1)
            for trial_id, orphan in existing.items():
                if trial_id not in known and orphan.info.status == "RUNNING":
                    self.finish_child(orphan.info.run_id, "interrupted", {"note": INTERRUPTED_NOTE})
                    synced.append(1)

        if self.safely("sync of finished trials", run):
            self.missed.clear()
            self._failures_since_sync = 0
        return len(synced)

    def _sync_one(self, result, trial_id: str, existing: dict[str, Any]) -> bool:
        last = dict(result.metrics or {})
        trial_dir = Path(str(result.path)) if result.path else None
        status = "errored" if result.error is not None else final_status(last)
        run = existing.get(trial_id)
        changed = False
        if run is None:
            config = dict(last.get("config") or {})
            if not config and trial_dir is not None and (trial_dir / "params.json").exists():
                config = json.loads((trial_dir / "params.json").read_text())
            run_id = self.create_child(trial_id, config)
            logged_steps: set[int] = set()
            logged_metrics: set[str] = set()
            changed = True
        else:
            run_id = run.info.run_id
            logged_metrics = set(run.data.metrics)
            logged_steps = ({int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}
                            if "epoch" in logged_metrics else set())
        reports = _reports(result)
        metrics: list[Metric] = []
        ts = _now_ms()
        for report in reports:
            step = int(report.get("epoch", report.get("training_iteration", 0)))
            if step in logged_steps:
                continue
            logged_steps.add(step)
            metrics += [Metric(k, v, ts, step) for k, v in result_metrics(report).items()
                        if not k.startswith("test_")]
        metrics += [Metric(k, v, ts, 0) for k, v in trial_metrics(last).items()
                    if k.startswith("test_") and k not in logged_metrics]
        environment = {}
        for report in reports:  # the newest start's environment
            environment.update(result_environment(report))
        known = run.data.tags if run is not None else {}
        if any(known.get(k) != v for k, v in environment.items()):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in environment.items()])
            changed = True
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
        changed = changed or bool(metrics)
        if run is None or run.info.status == "RUNNING" or run.data.tags.get("status") != status:
            tags = {}
            if last.get("best_epoch") is not None:
                tags["best_epoch"] = str(last["best_epoch"])
            if status == "errored":
                tags["error"] = _last_line(str(result.error)) or "see the Ray trial log"
            self.finish_child(run_id, status, tags)
            changed = True
        return changed

    def runs_url(self, host: str = "127.0.0.1", port: int = 5000,
                 run_id: str | None = None) -> str:
        """The runs table (or one run's page) in the UI's Model-training workspace."""
        return runs_url(self.experiment_id, run_id, host, port)

    def ui_command(self, port: int = 5000) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {redact_uris(self.tracking_uri)}"
        # explicit, although it is MLflow's default: the UI must not listen beyond this machine
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --port {port} --host 127.0.0.1"


class MlflowTrialCallback(Callback):
    """A Tune callback that mirrors each trial into a child run of the search's parent run.

    Every hook goes through :meth:`Tracker.safely`: when MLflow fails, the trial is remembered
    in ``tracker.missed`` and :meth:`Tracker.sync_results` writes it later.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.run_ids: dict[str, str] = {}
        self.finished: set[str] = set()
        self.nodes: dict[str, str] = {}  # trial id -> the Ray node of its last result
        #: epochs already in each trial's run: a trial retried from a checkpoint, or resumed,
        #: re-runs (deterministically) epochs it had reported; they are logged once
        self.logged_steps: dict[str, set[int]] = {}

    @property
    def client(self) -> MlflowClient:
        return self.tracker.client

    def _guard(self, what: str, trial, fn, *args) -> None:
        if not self.tracker.safely(what, fn, *args):
            self.tracker.missed.add(trial.trial_id)

    def _run_id(self, trial) -> str:
        trial_id = trial.trial_id
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        run_id = self.tracker.find_child(trial_id)
        if run_id is None:
            run_id = self.tracker.create_child(trial_id, dict(trial.config))
            steps: set[int] = set()
        else:
            steps = {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}
        self.logged_steps[trial_id] = steps
        self.run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guard("child run", trial, self._run_id, trial)
        self._progress(trials, {trial.trial_id: "running"})

    def _progress(self, trials, now: dict[str, str]) -> None:
        """The parent run's live counts (see :func:`search_counts`)."""
        self.tracker.safely("live counts", lambda: self.tracker.log_progress(
            search_counts(trials, self.tracker.objective, self.tracker.mode, now)))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._guard("per-epoch metrics", trial, self._log_result, trial, result)

    def _log_result(self, trial, result: dict[str, Any]) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        node = result.get("ray_node_id")
        if node and self.nodes.get(trial.trial_id) != node:
            self._record_node(run_id, node, result.get("node_ip"))
            self.nodes[trial.trial_id] = node
        logged = self.logged_steps.setdefault(trial.trial_id, set())
        environment = result_environment(result)
        if environment:  # the first report of each start of the trial: where it runs
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in environment.items()])
        if step in logged:
            return  # re-run after a retry or resume: already in MLflow
        ts = _now_ms()
        metrics = [Metric(k, v, ts, step) for k, v in result_metrics(result).items()
                   if not k.startswith("test_")]
        metrics += [Metric(k, v, ts, 0) for k, v in trial_metrics(result).items()
                    if k.startswith("test_")]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        logged.add(step)

    def _record_node(self, run_id: str, node: str, node_ip: Any) -> None:
        """Tags ``ray_node_id`` / ``node_ip`` (where the trial runs now) and ``ray_nodes`` (every
        node it ran on, in order: a trial retried on another node has two)."""
        seen = [n for n in self.client.get_run(run_id).data.tags.get("ray_nodes", "").split(",")
                if n]
        if node not in seen:
            seen.append(node)
        self.client.log_batch(run_id, tags=[RunTag("ray_node_id", node),
                                            RunTag("node_ip", str(node_ip)),
                                            RunTag("ray_nodes", ",".join(seen))])

    def _finish(self, trial, status: str, extra_tags: dict[str, str] | None = None) -> None:
        if trial.trial_id in self.finished:
            return
        self.tracker.finish_child(self._run_id(trial), status, extra_tags)
        self.finished.add(trial.trial_id)
        # a finished trial reports nothing more: keep only its id (a long search's driver
        # memory stays flat); anything later about it is found again in MLflow by tag
        self.run_ids.pop(trial.trial_id, None)
        self.nodes.pop(trial.trial_id, None)
        self.logged_steps.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        best = last.get("best_epoch")
        self._guard("trial status", trial, self._finish, trial, final_status(last),
                    {"best_epoch": str(best)} if best is not None else None)
        self._progress(trials, {trial.trial_id: final_status(last)})

    def _stop_if_disk_full(self, trial, message: str) -> None:
        path = disk_full(message)
        if path is not None:
            # every further attempt would fail the same way: stop as if interrupted
            raise DiskFull(f"trial {trial.trial_id}: [Errno 28] No space left on device: "
                           f"'{path or trial.path}'")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        attempts = getattr(trial, "num_failures", 0)
        self._stop_if_disk_full(trial, trial_error(trial))
        print(f"Trial {trial.trial_id} failed ({trial_error(trial)}); retrying it from its last "
              f"checkpoint (failure {attempts})", file=sys.stderr, flush=True)
        self._guard("retries tag", trial, self._set_retries, trial, attempts)

    def _set_retries(self, trial, attempts) -> None:
        self.client.set_tag(self._run_id(trial), "retries", str(attempts))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        message = trial_error(trial)
        self._stop_if_disk_full(trial, message)
        print(f"Trial {trial.trial_id} errored for good after {getattr(trial, 'num_failures', '?')} "
              f"failures ({message}); the search goes on", file=sys.stderr, flush=True)
        self._guard("trial status", trial, self._finish, trial, "errored",
                    {"error": message or "see the Ray trial log"})
        self._progress(trials, {trial.trial_id: "errored"})


#: the parent's live counts: which trial statuses each one counts
COUNTED = {"trials_completed": ("completed", "early_stopped"), "trials_pruned": ("pruned",),
           "trials_failed": ("diverged", "errored", "interrupted")}


def search_counts(trials, objective: str | None, mode: str = "min",
                  now: dict[str, str] | None = None) -> dict[str, float]:
    """A search's live counts from Tune's trials: ``trials_completed`` (early-stopped ones
    included), ``trials_pruned``, ``trials_failed`` (diverged, errored), ``trials_running``,
    ``trial_epochs_done`` and ``best_so_far`` (the best ``objective`` of any trial that did not
    diverge or error, running ones included; NaN before the first). ``now``: trials Tune is
    starting or ending now (id -> status: running, completed, ...), before it marks them so."""
    now = now or {}
    counts = {key: 0.0 for key in (*COUNTED, "trials_running", "trial_epochs_done")}
    best = math.nan
    sign = 1 if mode == "min" else -1
    for trial in trials:
        last = getattr(trial, "last_result", None) or {}
        counts["trial_epochs_done"] += float(last.get("training_iteration") or 0)
        status = now.get(trial.trial_id)
        state = getattr(trial, "status", None)
        if status is None:
            if state == "TERMINATED":
                status = final_status(last)
            elif state == "ERROR":
                status = "errored"
            elif state == "RUNNING":
                status = "running"
        for key, statuses in COUNTED.items():
            counts[key] += status in statuses
        counts["trials_running"] += status == "running"
        value = last.get(objective) if objective else None
        if status not in NEVER_BEST and finite(value) and not (
                finite(best) and sign * value >= sign * best):
            best = float(value)
    counts["best_so_far"] = best
    return counts


def _result_trial_id(result) -> str:
    """The Ray trial id of a ``ResultGrid`` entry ("" when neither its metrics nor its folder
    tell)."""
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    if not trial_id and result.path:
        trial_id = Path(str(result.path)).name.split("-")[0]  # tuner.search names folders ID-...
    return trial_id


def rebind_callbacks(tuner, tracker: Tracker, progress: dict[str, Any] | None = None) -> None:
    """Point the MLflow callback of a restored Tuner at this run's tracker.

    ``Tuner.restore`` unpickles the callbacks saved when the search started, with the tracking
    URI of that time; a resumed search must write where the user says now (a server that came
    back on another address). The only access to the Tuner's private run config is here.
    """
    run_config = tuner._local_tuner.get_run_config()  # noqa: SLF001 - no public accessor
    for callback in run_config.callbacks or []:
        if hasattr(callback, "restart"):  # tuner.progress.ProgressCallback: a fresh measure
            callback.restart(**(progress or {}))
        if isinstance(callback, MlflowTrialCallback):
            # a fresh state: also fills attributes that a callback pickled by an older version
            # of this class lacks (the per-trial state is read back from MLflow as needed)
            MlflowTrialCallback.__init__(callback, tracker)


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` with its path made absolute.

    MLflow caches one store per URI string for the whole process: a relative path would keep
    pointing at the folder of the first search run in this process (tests, notebooks)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def _forget_artifact_repos() -> None:
    """Drop MLflow's process-wide cache of artifact repositories.

    MLflow caches a run's artifact repository by run id alone, with the address of the server
    it first talked to; a search resumed in the same process against a server that came back
    on another address would upload to the dead one."""
    try:
        from mlflow.tracking._tracking_service import utils as service_utils

        service_utils._artifact_repos_cache.clear()  # noqa: SLF001 - see the docstring
    except (ImportError, AttributeError):
        pass


def trial_error(trial) -> str:
    """The last line of a Tune trial's error (the exception and its message)."""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).exists():
        return _last_line(Path(error_file).read_text(errors="replace"))
    return ""


def failure_kind(exc: BaseException) -> str:
    """A short name for why an MLflow call failed (one warning is printed per kind)."""
    text = f"{type(exc).__name__} {exc}".lower()
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left" in text \
            or "disk is full" in text:
        return "no space left on device"
    if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text \
            or "permission denied" in text:
        return "store not writable"
    if any(k in text for k in ("connection", "max retries", "timed out", "unreachable",
                               "name or service not known", "temporarily unavailable")):
        return "store unreachable"
    if "database is locked" in text:
        return "database locked"
    return f"call failed ({type(exc).__name__})"


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""


def _reports(result) -> list[dict[str, Any]]:
    """Every report of a trial, from Ray's progress.csv; the last one exactly as reported."""
    rows: list[dict[str, Any]] = []
    frame = getattr(result, "metrics_dataframe", None)
    if frame is not None and len(frame):
        for record in frame.to_dict("records"):
            row = {}
            for key, value in record.items():
                value = value.item() if hasattr(value, "item") else value
                if isinstance(value, float) and math.isnan(value):
                    continue  # a column this report did not have
                row[key] = value
            rows.append(row)
    if result.metrics:
        if rows and rows[-1].get("training_iteration") == result.metrics.get("training_iteration"):
            rows[-1] = dict(result.metrics)
        elif "epoch" in result.metrics or "training_iteration" in result.metrics:
            rows.append(dict(result.metrics))
    return rows


def all_runs(client: MlflowClient, experiment_id: str, filter_string: str,
             order_by: list[str] | None = None) -> list[Any]:
    """Every run of an experiment that matches ``filter_string``, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------- where a run ran
def environment_tags(cuda=None) -> dict[str, str]:
    """This process's environment as MLflow tags ``env.<key>`` (see
    :func:`trainables.environment.collect_environment` for the keys). The search's parent run
    and the report's re-runs get the driver's; each trial run gets its Ray worker's, from the
    trial's first report."""
    from trainables.environment import collect_environment

    return {ENV_PREFIX + k: v for k, v in collect_environment(cuda).items()}


def run_environment(tags: dict[str, str]) -> dict[str, str]:
    """The ``env.*`` tags of a run (its tags, e.g. ``run.data.tags``)."""
    return {k: v for k, v in tags.items() if k.startswith(ENV_PREFIX)}


def environments_differ(envs: dict[str, dict[str, str]]) -> str | None:
    """None when every run's ``env.*`` tags agree; else one line naming each differing tag and
    which runs had which value, e.g. ``env.torch_version: 2.13.0 (3 runs), 2.12.1 (run b)``.
    Every tag counts, the thread count too (it can change a float reduction's order).

    ``envs``: a label per run (its name or id) -> its tags (other tags are ignored). A tag one
    run lacks counts as ``missing``."""
    envs = {label: run_environment(tags) for label, tags in envs.items()}
    keys = sorted(set().union(*envs.values())) if envs else []
    parts = []
    for key in keys:
        groups: dict[str, list[str]] = {}
        for label, env in envs.items():
            groups.setdefault(env.get(key, "missing"), []).append(label)
        if len(groups) < 2:
            continue
        parts.append(f"{key}: " + ", ".join(
            f"{value} ({len(labels)} runs)" if len(labels) > 2 else
            f"{value} ({', '.join(labels)})" for value, labels in sorted(groups.items())))
    return "; ".join(parts) or None


def format_environment(tags: dict[str, str]) -> str:
    """A run's environment in one line, for a report or a summary."""
    env = {k[len(ENV_PREFIX):]: v for k, v in run_environment(tags).items()}
    if not env:
        return "not recorded"
    gpu = (f"{env.get('gpu_count', '?')} x {env.get('gpu_model', '?')}, CUDA "
           f"{env.get('cuda_version', '?')}, cuDNN {env.get('cudnn_version', '?')}"
           if env.get("gpu_count", "0") not in ("0", "unknown") else "no GPU")
    dirty = " (dirty)" if env.get("git_dirty") == "true" else ""
    return (f"Python {env.get('python', '?')}, torch {env.get('torch_version', '?')}, {gpu}; "
            f"CPU {env.get('cpu_model', '?')}, {env.get('threads', '?')} threads; "
            f"ray {env.get('ray_version', '?')}, optuna {env.get('optuna_version', '?')}, "
            f"mlflow {env.get('mlflow_version', '?')}, transformers "
            f"{env.get('transformers_version', '?')}; deterministic algorithms "
            f"{env.get('deterministic_algorithms', '?')}, cuDNN deterministic "
            f"{env.get('cudnn_deterministic', '?')}; git {env.get('git_commit', '?')[:12]}{dirty}")


# ---------------------------------------------------------------------- the data as datasets
def _tensor_schema(split) -> str:
    """The feature widths of a split (its arrays' dtypes and shapes, rows as -1) in MLflow's
    tensor-schema JSON, which the UI shows as the dataset's schema."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    specs = []
    for key in ("text", "text_bert", "audio", "vision"):
        array = getattr(split, key, None)
        if array is not None:
            specs.append(TensorSpec(np.dtype(array.dtype), (-1, *array.shape[1:]), name=key))
    labels = Schema([TensorSpec(np.dtype(split.labels.dtype), (-1,), name="labels")])
    return json.dumps(TensorDatasetSchema(features=Schema(specs), targets=labels).to_dict())


def _dataset(name: str, digest: str, source: str, schema_split, profile: dict[str, Any]):
    from mlflow.entities import Dataset

    uri = source if "://" in source or source.startswith("synthetic:") else \
        Path(source).expanduser().resolve().as_uri()
    return Dataset(name=name, digest=digest[:36],  # MLflow's column holds 36 characters
                   source_type="local" if uri.startswith("file:") else "code",
                   source=json.dumps({"uri": uri}), schema=_tensor_schema(schema_split),
                   profile=json.dumps(profile))


def dataset_name(data: MultimodalData) -> str:
    """What the runs table's Dataset column shows: the data file's or folder's name (for a
    pickle the folder and the file, ``MOSI/unaligned_50``), or the synthetic set's name."""
    source = data.source
    if source.startswith("synthetic:") or "://" in source:
        return source
    path = Path(source)
    if path.suffix in (".pkl", ".pickle"):
        return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return path.name or source


def split_digest(split) -> str:
    """sha256 over one split's arrays (dtype, shape, bytes; strings as UTF-8), in the way of
    :func:`trainables.data.mmsa.data_digest`: the unlabeled pool's own digest."""
    import dataclasses
    import hashlib

    import numpy as np

    h = hashlib.sha256(b"mifusion-split-v1")
    for field in dataclasses.fields(split):
        value = getattr(split, field.name)
        h.update(f"|{field.name}|".encode())
        if value is None:
            h.update(b"none")
        elif value.dtype.kind in "USO":
            for item in value.tolist():
                encoded = str(item).encode("utf-8")
                h.update(len(encoded).to_bytes(8, "little") + encoded)
        else:
            value = np.ascontiguousarray(value)
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(memoryview(value).cast("B"))
    return h.hexdigest()


def dataset_inputs(data: MultimodalData, unlabeled_source: str | None = None) -> list[Any]:
    """The search's data as MLflow dataset inputs (context ``training``): the labeled data
    (name, the first 36 characters of its sha256 as digest with the whole one in the profile,
    its source, the split sizes in the profile, the feature widths as schema) and, when the data
    has one, the unlabeled pool as a dataset of its own (``<name>:unlabeled``, its own digest)."""
    from mlflow.entities import DatasetInput, InputTag

    train = data.splits["train"]
    dims = data.dims
    profile = {"sha256": data.digest,
               **{f"{split}_rows": len(arrays) for split, arrays in data.splits.items()},
               "text_width": dims.text, "audio_width": dims.audio, "vision_width": dims.vision,
               "text_len": dims.text_len, "audio_len": dims.audio_len,
               "vision_len": dims.vision_len, "aligned": dims.aligned,
               "text_tokens": dims.has_tokens}
    tags = [InputTag(DATASET_CONTEXT_TAG, "training")]
    inputs = [DatasetInput(_dataset(dataset_name(data), data.digest, data.source, train,
                                    profile), tags=tags)]
    pool = data.unlabeled
    if pool is not None:
        digest = split_digest(pool)
        inputs.append(DatasetInput(_dataset(
            f"{dataset_name(data)}:unlabeled", digest, unlabeled_source or data.source, pool,
            {"sha256": digest, "unlabeled_rows": len(pool)}), tags=tags))
    return inputs


def runs_url(experiment_id: str, run_id: str | None = None, host: str = "127.0.0.1",
             port: int = 5000, base: str | None = None) -> str:
    """The UI's URL of an experiment's runs table (or one run's page), in the Model-training
    workspace (MLflow 3.x opens a fresh browser in its GenAI one without the query)."""
    base = (base or f"http://{host}:{port}").rstrip("/")
    run = f"/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{experiment_id}/runs{run}?{WORKFLOW_QUERY}"


# ---------------------------------------------------------------------- what a search cost
def cost_per_cell(runs) -> list[dict[str, Any]]:
    """Per cell (:func:`tuner.progress.cell_of` of the runs' ``backbone`` / ``regulariser``
    tags), what its trial runs cost: ``trials``, ``trial_epochs`` and ``wall_s`` summed (so
    ``wall_s`` is machine time, not the search's elapsed time), ``peak_rss_mb`` and
    ``peak_cuda_allocated_mb`` the largest of any trial (NaN where none was recorded)."""
    from tuner.progress import cell_of

    cells: dict[str, dict[str, Any]] = {}
    for run in runs:
        metrics = run.data.metrics
        cell = cells.setdefault(cell_of(run.data.tags), {
            "cell": cell_of(run.data.tags), "trials": 0, "trial_epochs": 0.0, "wall_s": 0.0,
            "peak_rss_mb": math.nan, "peak_cuda_allocated_mb": math.nan})
        cell["trials"] += 1
        for key in ("trial_epochs", "wall_s"):
            value = metrics.get(f"cost.{key}")
            if finite(value):
                cell[key] += value
        for key in ("peak_rss_mb", "peak_cuda_allocated_mb"):
            value = metrics.get(f"cost.{key}")
            if finite(value) and not value <= cell[key]:
                cell[key] = value
    return [cells[k] for k in sorted(cells)]
