"""What Ray Tune, Optuna and MLflow add: one trial through ``tuner.search`` vs the bare loop.

The same trial config (default: TFN at its defaults, regulariser ``none``, 20 epochs, patience 0,
batch 32, lr 1e-3, seed 0, 1 CPU thread) on the MOSI-sized synthetic set (``data/synthetic-mosi``,
written first when missing), run twice, each as a fresh process, end to end (interpreter start,
imports, data load and validation included):

- **bare**: ``Trainer(cfg, data).fit()`` (``python bench/tune_overhead.py --bare ...``);
- **search**: ``python -m tuner.search --space one_trial.yaml`` with a one-trial space (random
  sampler, no pruner, ``num_samples: 1``, ``resources.cpu: 1``): a local Ray, the Optuna study in
  SQLite, the MLflow parent and trial runs, a checkpoint every ``checkpoint_every`` epochs (and on
  each improvement), the test evaluation and the model registration at the end.

Target: search / bare ≤ 1.15. ``--also-every-epoch`` adds a search with ``checkpoint_every: 1``
(a checkpoint after every epoch, the old behaviour) to show what the checkpoint policy saves.
Prints ready-to-paste Markdown.

``--profile`` runs both once more under cProfile (``python -m cProfile -o ...``: the driver
process; the trial's Ray worker is not profiled) and prints where the search's extra seconds go:
the phases ``tuner.search`` runs one after another (data load, Ray's start, the MLflow parent
run, ``Tuner.fit``, the summary) against the bare loop's, the MLflow and Optuna callbacks inside
``Tuner.fit``, imports and the rest of the process, and the exit after the profile ends (atexit:
Ray's shutdown). cProfile slows Python-heavy code, so these runs are not the timed ones above.

    python bench/tune_overhead.py                      # ~4 min on a quiet 2-core machine
    python bench/tune_overhead.py --backbone ef_lstm --also-every-epoch
    python bench/tune_overhead.py --backbone lmf --epochs 1 --profile   # the fixed cost, profiled
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backbones import DEFAULT_MOSI_DIR, command_line, machine_line  # noqa: E402


def trial_config(args) -> dict:
    flat = {"backbone": args.backbone, "regulariser": "none", "seed": 0, "lr": 1e-3,
            "batch_size": args.batch, "patience": 0}
    import yaml

    for item in args.set or []:
        key, _, value = item.partition("=")
        flat[key] = yaml.safe_load(value)
    return flat


def bare(config: dict, data_dir: str, epochs: int, threads: int) -> dict:
    """The bare loop, in this process: load, build, fit (what the parent times from outside)."""
    import torch

    from trainables.config import TrialConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    data = load_dataset(data_dir)
    cfg = TrialConfig.from_flat({**config, "max_epochs": epochs})
    trainer = Trainer(cfg, data, device="cpu", num_threads=threads)
    fit_start = time.perf_counter()
    history = trainer.fit()
    return {"fit_s": time.perf_counter() - fit_start, "load_build_s": fit_start - start,
            "epochs": len(history), "best_valid_mae": history[-1]["best_valid_mae"]}


def _run(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return wall, proc


def run_bare(args, config: dict, workdir: Path, profiler: list[str] = ()) -> tuple[float, dict]:
    cmd = [sys.executable, *profiler, str(Path(__file__).resolve()), "--bare", json.dumps(config),
           "--data", str(args.data), "--epochs", str(args.epochs)]
    wall, proc = _run(cmd, workdir)
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def run_search(args, config: dict, workdir: Path, name: str, profiler: list[str] = ()) -> float:
    import yaml

    space = {
        "name": name, "backbones": [config["backbone"]], "regularisers": [config["regulariser"]],
        "data": str(Path(args.data).resolve()),
        "fixed": {k: v for k, v in config.items() if k not in ("backbone", "regulariser")},
        "search": {"sampler": "random", "pruner": "none", "num_samples": 1,
                   "max_epochs": args.epochs, "seed": 0},
        "resources": {"cpu": 1},
    }
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(space))
    wall, _ = _run([sys.executable, *profiler, "-m", "tuner.search", "--space", f"{name}.yaml",
                    "--name", name], workdir)
    return wall


#: (label, file suffix, function): the phases each run goes through one after another, so their
#: cumulative times add up; a phase a run does not have is "–"
BARE_PHASES = (
    ("data load and validation", "trainables/data/__init__.py", "load_dataset"),
    ("Trainer build + fit (the trial)", "trainables/loop.py", "__init__"),
    ("", "trainables/loop.py", "fit"),
)
SEARCH_PHASES = (
    ("data load and validation", "tuner/preflight.py", "_load_data"),
    ("Ray's start (`init_ray`; the MLflow store opens beside it in a thread)", "tuner/preflight.py",
     "init_ray"),
    ("MLflow parent run (`start_search`)", "tuner/tracking.py", "start_search"),
    ("the trial: bare `Trainer` build + `fit`; search `Tuner.fit` (the trial's Ray worker: "
     "process start, data from the object store, epochs, checkpoints; the driver's callbacks)",
     "ray/tune/tuner.py", "fit"),
    ("summary: test evaluation, best model logged and registered (`summarise`)",
     "tuner/search.py", "summarise"),
)
#: driver work inside ``Tuner.fit`` (of which): (label, file suffix, function names)
INSIDE_FIT = (
    ("of which: MLflow logging of trial starts, results and ends (callback)",
     "tuner/tracking.py", ("on_trial_start", "on_trial_result", "on_trial_complete")),
    ("of which: Optuna sampler and pruner (searcher, scheduler)", "tuner/pruning.py",
     ("suggest", "on_trial_result", "on_trial_complete")),
)


def cumulative(stats: pstats.Stats, suffix: str, names: tuple[str, ...] | str) -> float | None:
    """Cumulative seconds of the functions ``names`` defined in a file ending in ``suffix``
    (summed over classes that share a name); None where no such function ran."""
    names = (names,) if isinstance(names, str) else names
    found = [ct for (file, _, func), (_, _, _, ct, _) in stats.stats.items()
             if file.replace(os.sep, "/").endswith(suffix) and func in names]
    return sum(found) if found else None


def profile_lines(bare_prof: Path, bare_wall: float, search_prof: Path,
                  search_wall: float) -> list[str]:
    """The breakdown of the two profiled runs: seconds per phase, bare and search, and the
    difference (where the search's extra seconds go)."""
    bare, search = pstats.Stats(str(bare_prof)), pstats.Stats(str(search_prof))
    rows: list[tuple[str, float | None, float | None]] = []
    b_load = cumulative(bare, *BARE_PHASES[0][1:])
    b_trial = sum(cumulative(bare, suffix, name) or 0.0 for _, suffix, name in BARE_PHASES[1:])
    s = {label: cumulative(search, suffix, name) for label, suffix, name in SEARCH_PHASES}
    labels = [label for label, _, _ in SEARCH_PHASES]
    rows.append((labels[0], b_load, s[labels[0]]))
    rows += [(label, None, s[label]) for label in labels[1:3]]
    rows.append((labels[3], b_trial, s[labels[3]]))
    inside = [(label, None, cumulative(search, suffix, names))
              for label, suffix, names in INSIDE_FIT]
    rows.append((labels[4], None, s[labels[4]]))
    b_rest = bare.total_tt - (b_load or 0.0) - b_trial
    s_rest = search.total_tt - sum(v or 0.0 for v in s.values())
    rows.insert(0, ("imports and the rest of the profiled process", b_rest,
                    s_rest))
    rows.append(("outside the profile: interpreter start, exit (atexit: Ray's shutdown; teardown)",
                 bare_wall - bare.total_tt, search_wall - search.total_tt))
    rows.append(("**total (the profiled run's wall)**", bare_wall, search_wall))

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines = ["", "Where the search's extra seconds go (cProfile of the driver process, one more "
             "run each; the phases run one after another; cProfile's overhead inflates "
             "Python-heavy phases):", "",
             "| phase | bare s | search s | search − bare s |", "|---|---:|---:|---:|"]
    for label, b, v in rows:
        lines.append(f"| {label} | {cell(b)} | {cell(v)} | {cell((v or 0.0) - (b or 0.0))} |")
        if label == labels[3]:
            lines += [f"| {lab} | – | {cell(v2)} | – |" for lab, _, v2 in inside]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--backbone", default="tfn", help="the trial's backbone (default tfn)")
    p.add_argument("--epochs", type=int, default=20, help="the trial's epochs (default 20)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", type=Path, default=DEFAULT_MOSI_DIR,
                   help=f"a Parquet data folder (default {DEFAULT_MOSI_DIR}, written if missing)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another trial-config key, e.g. --set backbone.hidden=16 (repeatable)")
    p.add_argument("--also-every-epoch", action="store_true",
                   help="also time the search with checkpoint_every 1 (every epoch)")
    p.add_argument("--profile", action="store_true",
                   help="also run each once under cProfile and print where the search's extra "
                        "seconds go (phases, callbacks, imports, exit)")
    p.add_argument("--bare", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.bare:  # the child process of run_bare
        print(json.dumps(bare(json.loads(args.bare), str(args.data), args.epochs, 1)))
        return 0

    if args.data == DEFAULT_MOSI_DIR and not (args.data / "train.parquet").exists():
        from bench.backbones import load_data

        load_data("mosi", args.data)  # writes it
    from trainables.config import TrialConfig

    config = trial_config(args)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
        workdir = Path(tmp)
        print("# bare loop ...", file=sys.stderr, flush=True)
        bare_wall, info = run_bare(args, config, workdir)
        print("# search, one trial ...", file=sys.stderr, flush=True)
        search_wall = run_search(args, config, workdir, "overhead")
        rows.append(("bare loop (`Trainer.fit`)", bare_wall, "–"))
        every_k = config.get("checkpoint_every", TrialConfig.checkpoint_every)
        rows.append((f"`tuner.search`, one trial (checkpoint_every {every_k})", search_wall,
                     f"{search_wall / bare_wall:.2f}×"))
        if args.also_every_epoch:
            print("# search, one trial, a checkpoint every epoch ...", file=sys.stderr, flush=True)
            every = run_search(args, {**config, "checkpoint_every": 1}, workdir, "every")
            rows.append(("`tuner.search`, one trial, checkpoint_every 1", every,
                         f"{every / bare_wall:.2f}×"))
        breakdown: list[str] = []
        if args.profile:
            print("# bare loop and search under cProfile ...", file=sys.stderr, flush=True)
            bare_prof, search_prof = workdir / "bare.prof", workdir / "search.prof"
            pb_wall, _ = run_bare(args, config, workdir, ["-m", "cProfile", "-o", str(bare_prof)])
            ps_wall = run_search(args, config, workdir, "profiled",
                                 ["-m", "cProfile", "-o", str(search_prof)])
            breakdown = profile_lines(bare_prof, pb_wall, search_prof, ps_wall)

    print(f"Command: `{command_line('bench/tune_overhead.py', argv)}`")
    print(machine_line("1 thread per trial", load_before))
    print(f"Trial: {json.dumps(config)}, {args.epochs} epochs, data {args.data}; each run a fresh "
          f"process, end to end (bare: {info['load_build_s']:.1f} s load + build, "
          f"{info['fit_s']:.1f} s fit)\n")
    print("| run | wall s | vs bare |")
    print("|---|---:|---:|")
    for label, wall, ratio in rows:
        print(f"| {label} | {wall:.1f} | {ratio} |")
    if breakdown:
        print("\n".join(breakdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
