"""MLflow tracking from the driver: one experiment per space, a parent run per search, a child
run per trial (params, per-epoch metrics, status), the best checkpoint as an artifact.

Everything is logged by the driver (a Tune callback), so trials need no access to the tracking
store and a cluster's workers need no MLflow credentials. Runs are found again by tags
(``search``, ``ray_trial_id``), so a resumed search writes into the same runs instead of
duplicating them.
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from trainables.config import TrialConfig

__all__ = ["DEFAULT_TRACKING_URI", "Tracker", "MlflowTrialCallback", "final_status", "git_commit"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
METRIC_PREFIXES = ("valid_", "train_", "best_", "test_")
METRIC_KEYS = ("epoch", "epoch_seconds", "best_epoch")
TERMINAL = {"completed": "FINISHED", "early_stopped": "FINISHED", "pruned": "KILLED",
            "diverged": "FAILED", "errored": "FAILED"}


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
                 artifact_root: str | Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
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
                      best_checkpoint: Path | None, best_run_id: str | None) -> None:
        run_id = self.parent_run_id
        if run_id is None:
            return
        if best:
            self.client.log_batch(run_id, metrics=[
                Metric(k, v, _now_ms(), 0) for k, v in trial_metrics(best).items()
                if k.startswith(("best_", "test_"))
            ])
        if best_run_id:
            self.client.set_tag(run_id, "best_run_id", best_run_id)
        if best_checkpoint is not None and best_checkpoint.exists():
            self.client.log_artifact(run_id, str(best_checkpoint), "best_checkpoint")
            if best_run_id:
                self.client.log_artifact(best_run_id, str(best_checkpoint), "best_checkpoint")
                self.register_best(best_run_id, best or {})
        self.client.set_terminated(run_id, status=status)

    @property
    def registered_model_name(self) -> str:
        return f"{self.experiment_name}-best"

    def register_best(self, run_id: str, metrics: dict[str, Any]) -> str:
        """Register the best trial's checkpoint as a new version of ``<space>-best``."""
        name = self.registered_model_name
        try:
            self.client.get_registered_model(name)
        except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST
            self.client.create_registered_model(
                name, description=f"Best checkpoints of searches over the space "
                                  f"{self.experiment_name!r} (best.pt: weights, config, metrics)")
        tags = {k: f"{v:.6g}" for k, v in trial_metrics(metrics).items()
                if k.startswith(("best_valid_", "test_"))}
        tags["search"] = str(self.search_name)
        version = self.client.create_model_version(
            name, source=f"runs:/{run_id}/best_checkpoint", run_id=run_id, tags=tags,
            description=f"best trial of search {self.search_name!r}, chosen on validation",
        )
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

    def runs_url(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs"

    def ui_command(self, port: int = 5000) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        # explicit, although it is MLflow's default: the UI must not listen beyond this machine
        return f"mlflow ui --backend-store-uri {self.tracking_uri} --port {port} --host 127.0.0.1"


class MlflowTrialCallback(Callback):
    """A Tune callback that mirrors each trial into a child run of the search's parent run."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_ids: dict[str, str] = {}
        self.finished: set[str] = set()
        self.nodes: dict[str, str] = {}  # trial id -> the Ray node of its last result

    def _run_id(self, trial) -> str:
        trial_id = trial.trial_id
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        run_id = self.tracker.find_child(trial_id)
        if run_id is None:
            config = dict(trial.config)
            try:
                params = TrialConfig.from_flat(config).to_flat()
            except ValueError:
                params = config
            run = self.client.create_run(
                self.tracker.experiment_id,
                run_name=f"{trial_id}-{config.get('backbone')}-{config.get('regulariser')}",
                tags={
                    "mlflow.parentRunId": self.tracker.parent_run_id,
                    "search": self.tracker.search_name,
                    "run_kind": "trial",
                    "ray_trial_id": trial_id,
                    "backbone": str(config.get("backbone")),
                    "regulariser": str(config.get("regulariser")),
                    "seed": str(config.get("seed")),
                    "status": "running",
                },
            )
            run_id = run.info.run_id
            self.tracker._log_params(run_id, params)
        self.run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ts = _now_ms()
        metrics = [Metric(k, v, ts, step) for k, v in trial_metrics(result).items()
                   if not k.startswith("test_")]
        metrics += [Metric(k, v, ts, 0) for k, v in trial_metrics(result).items()
                    if k.startswith("test_")]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        node = result.get("ray_node_id")
        if node and self.nodes.get(trial.trial_id) != node:
            self._record_node(run_id, node, result.get("node_ip"))
            self.nodes[trial.trial_id] = node

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
        run_id = self._run_id(trial)
        tags = {"status": status, **(extra_tags or {})}
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=TERMINAL.get(status, "FINISHED"))
        self.finished.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        status = final_status(last)
        best = last.get("best_epoch")
        self._finish(trial, status, {"best_epoch": str(best)} if best is not None else None)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        self.client.set_tag(run_id, "retries", str(getattr(trial, "num_failures", "?")))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        message = ""
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(error_file).exists():
            lines = Path(error_file).read_text(errors="replace").strip().splitlines()
            message = lines[-1][:500] if lines else ""
        self._finish(trial, "errored", {"error": message or "see the Ray trial log"})


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
