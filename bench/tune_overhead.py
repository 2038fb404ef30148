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

    python bench/tune_overhead.py                      # ~4 min on a quiet 2-core machine
    python bench/tune_overhead.py --backbone ef_lstm --also-every-epoch
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_bare(args, config: dict, workdir: Path) -> tuple[float, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", json.dumps(config),
           "--data", str(args.data), "--epochs", str(args.epochs)]
    wall, proc = _run(cmd, workdir)
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def run_search(args, config: dict, workdir: Path, name: str) -> float:
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
    wall, _ = _run([sys.executable, "-m", "tuner.search", "--space", f"{name}.yaml",
                    "--name", name], workdir)
    return wall


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

    print(f"Command: `{command_line('bench/tune_overhead.py', argv)}`")
    print(machine_line("1 thread per trial", load_before))
    print(f"Trial: {json.dumps(config)}, {args.epochs} epochs, data {args.data}; each run a fresh "
          f"process, end to end (bare: {info['load_build_s']:.1f} s load + build, "
          f"{info['fit_s']:.1f} s fit)\n")
    print("| run | wall s | vs bare |")
    print("|---|---:|---:|")
    for label, wall, ratio in rows:
        print(f"| {label} | {wall:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
