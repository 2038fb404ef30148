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

__all__ = ["DEFAULT_TRACKING_URI", "absolute_sqlite_uri", "all_runs", "DiskFull", "DiskSpaceGuard", "Tracker", "MlflowTrialCallback", "disk_full",
           "final_status", "git_commit", "rebind_callbacks"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
METRIC_PREFIXES = ("valid_", "train_", "best_", "test_")
METRIC_KEYS = ("epoch", "epoch_seconds", "best_epoch")
TERMINAL = {"completed": "FINISHED", "early_stopped": "FINISHED", "pruned": "KILLED",
            "diverged": "FAILED", "errored": "FAILED", "interrupted": "KILLED"}
#: trial statuses never chosen as a search's best, whatever validation value came before:
#: a diverged trial's pre-divergence epochs, an errored one's, an interrupted one's partial run
NEVER_BEST = frozenset({"diverged", "errored", "interrupted"})
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
            },
        )
        self._log_params(run.info.run_id, params)
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
            metrics += [Metric(k, v, ts, step) for k, v in trial_metrics(report).items()
                        if not k.startswith("test_")]
        metrics += [Metric(k, v, ts, 0) for k, v in trial_metrics(last).items()
                    if k.startswith("test_") and k not in logged_metrics]
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

    def runs_url(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs"

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
        if step in logged:
            return  # re-run after a retry or resume: already in MLflow
        ts = _now_ms()
        metrics = [Metric(k, v, ts, step) for k, v in trial_metrics(result).items()
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


def _result_trial_id(result) -> str:
    """The Ray trial id of a ``ResultGrid`` entry ("" when neither its metrics nor its folder
    tell)."""
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    if not trial_id and result.path:
        trial_id = Path(str(result.path)).name.split("-")[0]  # tuner.search names folders ID-...
    return trial_id


def rebind_callbacks(tuner, tracker: Tracker) -> None:
    """Point the MLflow callback of a restored Tuner at this run's tracker.

    ``Tuner.restore`` unpickles the callbacks saved when the search started, with the tracking
    URI of that time; a resumed search must write where the user says now (a server that came
    back on another address). The only access to the Tuner's private run config is here.
    """
    run_config = tuner._local_tuner.get_run_config()  # noqa: SLF001 - no public accessor
    for callback in run_config.callbacks or []:
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
