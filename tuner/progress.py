"""What a search prints while it runs: trials and trial-epochs done, and an ETA.

The estimate (also in docs/tracking.md, "Watching a search"):

- **seconds per trial-epoch, per cell** (:func:`cell_of`: a trial's backbone and regulariser):
  the mean of Tune's ``time_this_iter_s`` (an epoch's wall time with its evaluation, report and
  checkpoint) over every epoch of that cell seen so far;
- **epochs per trial**: the mean epochs of the trials that ended (pruning and early stopping
  shorten them), ``max_epochs`` before the first ends; a running trial is expected to reach
  that mean (at least one more epoch, at most ``max_epochs``);
- the trials not started yet cost the mean rate of the trials started so far (the mix of cells
  seen), ``epochs per trial`` each; with ``--budget-trial-epochs`` the remaining epochs are
  capped by what is left of the budget;
- **concurrency**: the trials running now (at most the trials left): the remaining seconds of
  work divided by it is the ETA.

:func:`cpu_projection` is the line printed before the first trial of a space with transformer
backbones that runs on CPUs only: from epoch timings of the same cells earlier in the MLflow
store (``epoch_seconds`` of trial runs without a GPU), or a note that the ETA follows once the
first epochs are timed.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.tune import Callback

__all__ = ["TRANSFORMER_BACKBONES", "ProgressCallback", "cell_of", "cpu_projection",
           "eta_seconds", "format_duration", "stored_epoch_seconds"]

#: backbones with a pretrained transformer text encoder: minutes per epoch on a CPU
TRANSFORMER_BACKBONES = ("mag_bert", "mag_xlnet", "mmim", "mird")
#: a progress line at most this often while epochs report (and at every trial's end)
INTERVAL_S = 60.0


def cell_of(config: dict[str, Any], cell_keys: "tuple[str, ...] | list[str] | None" = None) -> str:
    """The cell a trial's cost is kept under, as :func:`tuner.spaces.cell_label` writes it
    (``tfn + mdm (estimator=w)``): a run's ``cell`` tag where it has one (MLflow tags), else
    the cell of ``config`` by ``cell_keys`` (the space's ``cells``; default backbone and
    regulariser)."""
    from tuner.spaces import DEFAULT_CELL_KEYS, cell_label, parse_cell_tag
    from tuner.spaces import cell_of as space_cell_of

    if isinstance(config.get("cell"), str) and config["cell"]:
        return cell_label(parse_cell_tag(config["cell"]))
    try:
        return cell_label(space_cell_of(config, cell_keys or DEFAULT_CELL_KEYS))
    except KeyError:  # no backbone or regulariser: a run of something else
        return f"{config.get('backbone')} + {config.get('regulariser')}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds / 86400:.1f} days"


def eta_seconds(rates: dict[str, float], running: list[tuple[str, int]], ended_epochs: list[int],
                pending: int, max_epochs: int, budget_left: float | None = None) -> float:
    """The ETA of the estimate in this module's docstring.

    ``rates``: cell -> seconds per trial-epoch; ``running``: (cell, epochs done) per running
    trial; ``ended_epochs``: the epochs of each ended trial; ``pending``: trials not started;
    ``budget_left``: trial-epochs left of ``--budget-trial-epochs`` (None: no budget)."""
    if not rates:
        return math.nan
    mean_rate = sum(rates.values()) / len(rates)
    started = [rates.get(cell, mean_rate) for cell, _ in running]
    pending_rate = (sum(started) / len(started)) if started else mean_rate
    per_trial = (sum(ended_epochs) / len(ended_epochs)) if ended_epochs else max_epochs
    epochs, work = 0.0, 0.0
    for cell, done in running:
        left = min(max_epochs, max(per_trial, done + 1)) - done
        epochs += left
        work += left * rates.get(cell, mean_rate)
    epochs += pending * per_trial
    work += pending * per_trial * pending_rate
    if budget_left is not None and epochs > 0:
        work *= min(1.0, max(0.0, budget_left) / epochs)
    at_once = max(1, min(len(running) or 1, len(running) + pending))
    return work / at_once


class ProgressCallback(Callback):
    """Prints one progress line (trials done / planned, trial-epochs done / at most, running,
    pruned, ETA) at each trial's end and at most every ``interval_s`` while epochs report."""

    def __init__(self, trials: int, max_epochs: int, budget: int | None = None,
                 spent_before: int = 0, interval_s: float = INTERVAL_S,
                 cell_keys: "list[str] | None" = None) -> None:
        self.trials = trials
        #: the space's cell keys (tuner.spaces): costs are kept per row of the paper's table
        self.cell_keys = list(cell_keys) if cell_keys else None
        self.max_epochs = max_epochs
        self.budget = budget
        self.spent_before = spent_before
        self.interval_s = interval_s
        self.restart()

    def restart(self, budget: int | None = None, spent_before: int | None = None) -> None:
        """A fresh measurement (a resumed search; Tune unpickles the callback it started with)."""
        if budget is not None:
            self.budget = budget
        if spent_before is not None:
            self.spent_before = spent_before
        #: cell -> [seconds, epochs] measured in this run of the driver
        self.seconds: dict[str, list[float]] = {}
        self._last_print = -math.inf
        self._last_line = ""
        self._stream = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        seconds = result.get("time_this_iter_s", result.get("epoch_seconds"))
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and not result.get("done"):
            cell = self.seconds.setdefault(cell_of(trial.config, getattr(self, "cell_keys", None)), [0.0, 0])
            cell[0] += float(seconds)
            cell[1] += 1
        if time.monotonic() - self._last_print >= self.interval_s:
            self.print_line(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from tuner.tracking import final_status

        self.print_line(trials, ended=(trial, final_status(trial.last_result or {})))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.print_line(trials, ended=(trial, "errored"))

    def on_experiment_end(self, trials, **info) -> None:
        """The last line: a stopper (``--budget-trial-epochs``) ends trials without a
        trial-end callback."""
        self.print_line(trials)

    def line(self, trials, ended: tuple[Any, str] | None = None) -> str | None:
        """The progress line for Tune's trials now (None before the first timed epoch);
        ``ended``: the trial Tune is ending now and its status (Tune marks it after this)."""
        from tuner.tracking import final_status

        rates = {cell: s / n for cell, (s, n) in self.seconds.items() if n}
        if not rates:
            return None
        done, running, ended_epochs, counts, epochs_done = 0, [], [], {}, 0
        for trial in trials:
            last = trial.last_result or {}
            epochs = int(last.get("training_iteration") or 0)
            epochs_done += epochs
            if (ended and trial is ended[0]) or trial.status in ("TERMINATED", "ERROR"):
                status = (ended[1] if ended and trial is ended[0] else
                          "errored" if trial.status == "ERROR" else final_status(last))
                counts[status] = counts.get(status, 0) + 1
                done += 1
                ended_epochs.append(epochs)
            elif trial.status == "RUNNING":
                running.append((cell_of(trial.config, getattr(self, "cell_keys", None)), epochs))
        pending = max(0, self.trials - done - len(running))
        spent = epochs_done
        budget_left = None
        if self.budget:
            budget_left = self.budget - max(spent, self.spent_before)
        eta = eta_seconds(rates, running, ended_epochs, pending, self.max_epochs, budget_left)
        most = self.trials * self.max_epochs
        if self.budget:
            most = min(most, self.budget)
        per_cell = ", ".join(f"{cell} {rate:.1f} s" for cell, rate in sorted(rates.items()))
        ends = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none ended"
        per_trial = (f"{sum(ended_epochs) / len(ended_epochs):.1f}" if ended_epochs
                     else str(self.max_epochs))
        return (f"Progress: {done}/{self.trials} trials done ({ends}), {len(running)} running; "
                f"{epochs_done}/{most} trial-epochs; ETA {format_duration(eta)} (per trial-epoch "
                f"{per_cell}; {per_trial} epochs per trial so far; "
                f"{max(1, len(running))} at once)")

    def print_line(self, trials, ended=None) -> None:
        text = self.line(trials, ended)
        if text is None or text == self._last_line:
            return
        self._last_print, self._last_line = time.monotonic(), text
        print(text, file=self._stream or sys.stdout, flush=True)


# ---------------------------------------------------------------------- before the first trial
def stored_epoch_seconds(client, cells: list[tuple[str, str]], gpu: bool = False,
                         data_digest: str | None = None) -> dict[str, float]:
    """Per cell (``backbone/regulariser``), the median of the last ``epoch_seconds`` of the
    trial runs of that cell anywhere in an MLflow store, on CPUs only (``env.gpu_count`` 0) or
    with a GPU; runs on ``data_digest`` when there are any, else runs on any data."""
    import statistics

    from tuner.tracking import all_runs

    experiments = [e.experiment_id for e in client.search_experiments()]
    out: dict[str, float] = {}
    gpu_filter = "tags.`env.gpu_count` != '0'" if gpu else "tags.`env.gpu_count` = '0'"
    for backbone, regulariser in cells:
        base = (f"tags.run_kind = 'trial' and tags.backbone = '{backbone}' and "
                f"tags.regulariser = '{regulariser}' and {gpu_filter} and "
                "metrics.epoch_seconds > 0")
        values: list[float] = []
        for extra in ([f" and tags.data_digest = '{data_digest}'"] if data_digest else []) + [""]:
            for experiment in experiments:
                values += [r.data.metrics["epoch_seconds"]
                           for r in all_runs(client, experiment, base + extra)]
            if values:
                break
        if values:
            out[f"{backbone}/{regulariser}"] = statistics.median(values)
    return out


def cpu_projection(space, timings: dict[str, float], at_once: int) -> str | None:
    """The line before the first trial of a space with transformer backbones on CPUs only
    (None for other spaces, or with GPUs): the projected time from ``timings`` (cell ->
    seconds per trial-epoch, :func:`stored_epoch_seconds`), and that the space is for GPUs."""
    heavy = [b for b in space.backbones if b in TRANSFORMER_BACKBONES]
    if not heavy or space.resources.gpu > 0:
        return None
    trials = space.grid_size() if space.search.sampler == "grid" else space.search.num_samples
    most = trials * space.search.max_epochs
    cells = [f"{b}/{r}" for b in space.backbones for r in space.regularisers]
    known = [timings[c] for c in cells if c in timings]
    head = (f"note: space {space.name!r} has transformer backbones ({', '.join(heavy)}) and runs "
            "on CPUs only")
    tail = "it is meant for GPUs (--gpus-per-trial 1, or a GPU cluster: docs/cluster.md)"
    if not known:
        return (f"{head}: no epoch of its cells is timed in this MLflow store yet, so the "
                f"projected time follows as the ETA once the first epochs end; {tail}")
    rate = sum(known) / len(known)
    at_once = max(1, min(at_once, trials))
    return (f"{head}: projected about {format_duration(most * rate / at_once)} for at most "
            f"{most} trial-epochs at {format_duration(rate)} each (timed earlier in this MLflow "
            f"store, {len(known)} of {len(cells)} cells), {at_once} at once; {tail}")
