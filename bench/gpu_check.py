"""GPU check: fp16 AMP vs fp32, trials/hour at 0.25 vs 1.0 GPU per trial, s/epoch on the GPU.

One command on a machine with one CUDA GPU; prints one Markdown table (with the machine and the
command) and finishes in under 8 minutes on an H100-class GPU at the defaults. Three parts
(``--parts``, default all):

- **a: fp16 AMP vs fp32.** Our :class:`~trainables.loop.Trainer` on CUDA trains with fp16 autocast
  and a grad scaler (the loop's only CUDA mode). For mag_bert (MiniLM-L6) and tfn it runs
  ``--epochs`` epochs with AMP (seed 0) and in fp32 (AMP switched off on the trainer; seeds 0 and
  1), regulariser none. Verdict: AMP agrees with fp32 when the fp16-vs-fp32 gap at seed 0 (best
  validation MAE) is no larger than the fp32 seed-0-vs-seed-1 gap (the seed noise), with a floor
  of ``--noise-floor`` for a noise estimate of two seeds that happens to be tiny.
- **b: fractional packing.** Two searches through ``python -m tuner.search`` (subprocesses, each
  with its own local Ray, MLflow store and Ray storage in a temporary folder): ``--trials``
  mag_bert trials of ``--search-epochs`` epochs, random sampler, no pruner, ``--cpus-per-trial``
  CPUs, with ``--gpus-per-trial 0.25`` and then ``1.0``. Trials/hour is the finished trials over
  the time from the first trial's start to the last one's end, read from Ray's own per-trial
  ``result.json`` (``timestamp`` − ``time_total_s``); "at once" is the most trials whose Ray
  intervals overlap, and, where ``nvidia-smi`` is on the PATH, the most processes it listed on
  the GPU at one time (sampled every second): both show whether the trials shared the GPU.
- **d: MDM's cost**: the epoch of MDM (the paper's Algorithm 1, Unroll 10, regulariser defaults)
  ÷ the same backbone's ``none`` epoch, for tfn and mag_bert, AMP, ``--mdm-epochs`` epochs each
  (the first not timed); issue 26's target is ≤ 5×.
- **c: s/epoch on the GPU** of mag_bert (from part a's AMP run, or its own when a is skipped) and
  mmim (its regulariser, ``schedule: two_stage``, the paper's two passes), AMP, mean of the epochs
  after the first (train + validation, as ``bench/epoch_speed.py`` times them).

Data: the MOSI-sized synthetic set in ``--data-dir`` (``data/synthetic-mosi``, written first when
missing). Without a CUDA device it stops at once with one line on stderr and exit code 2.

    python bench/gpu_check.py                      # all four parts, ~6-9 min on one H100
    python bench/gpu_check.py --parts a c --epochs 3
    python bench/gpu_check.py --parts d            # MDM ÷ none epochs only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backbones import DEFAULT_MOSI_DIR, command_line, load_data, machine_line  # noqa: E402

PARTS = ("a", "b", "c", "d")
MDM_MODELS = ("tfn", "mag_bert")
AMP_MODELS = ("mag_bert", "tfn")
SEARCH_BACKBONE = "mag_bert"
GPU_FRACTIONS = (0.25, 1.0)

NO_CUDA = ("gpu_check: no CUDA device (torch {torch} sees none: torch.cuda.is_available() is "
           "False); run it on a machine with an NVIDIA GPU and a CUDA build of torch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="a: fp16 AMP vs fp32; b: trials/hour at 0.25 vs 1.0 GPU per trial; "
                        "c: s/epoch of mag_bert and mmim; d: MDM epoch ÷ none epoch of tfn and "
                        "mag_bert (default: all)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_MOSI_DIR,
                   help="the MOSI-sized synthetic Parquet folder (written when missing)")
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs of each part-a and part-c run (default 4; the first is not timed)")
    p.add_argument("--mdm-epochs", type=int, default=2,
                   help="epochs of each part-d run (default 2; the first is not timed)")
    p.add_argument("--noise-floor", type=float, default=0.005,
                   help="smallest seed noise (valid MAE) part a compares with (default 0.005)")
    p.add_argument("--trials", type=int, default=8, help="trials of each part-b search (default 8)")
    p.add_argument("--search-epochs", type=int, default=2,
                   help="epochs of each part-b trial (default 2)")
    p.add_argument("--cpus-per-trial", type=float, default=2.0,
                   help="CPUs per part-b trial (default 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    return p


# -- part a and c: the Trainer on the GPU ---------------------------------------------------------

def train_on_gpu(name: str, data, args, seed: int, amp: bool, regulariser: str | None = None,
                 epochs: int | None = None) -> dict:
    """``epochs`` (default ``args.epochs``) epochs of our Trainer on CUDA; fp32 when ``amp`` is
    False; ``regulariser`` (default: mmim for mmim, else none). Returns the per-epoch wall seconds
    (synchronised) and validation MAE."""
    import torch

    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    epochs = epochs or args.epochs
    regulariser = regulariser or ("mmim" if name == "mmim" else "none")
    flat = {"backbone": name, "regulariser": regulariser, "seed": seed,
            "batch_size": args.batch, "patience": 0, "max_epochs": epochs + 1}
    trainer = Trainer(TrialConfig.from_flat(flat), data, device="cuda")
    if not amp:  # the loop has no fp32 mode on CUDA: switch its autocast and grad scaler off
        trainer.amp_dtype, trainer.amp = None, False
        trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
    wall, maes = [], []
    for _ in range(epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = trainer.run_epoch()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        maes.append(float(metrics["valid_mae"]))
    del trainer
    torch.cuda.empty_cache()
    return {"wall": wall, "valid_mae": maes}


def s_per_epoch(run: dict) -> float:
    timed = run["wall"][1:] or run["wall"]
    return sum(timed) / len(timed)


def amp_rows(data, args, runs: dict) -> list[list[str]]:
    rows = []
    for name in AMP_MODELS:
        fp32 = [train_on_gpu(name, data, args, seed, amp=False) for seed in (0, 1)]
        fp16 = train_on_gpu(name, data, args, 0, amp=True)
        runs[(name, "amp")] = fp16
        noise = abs(min(fp32[0]["valid_mae"]) - min(fp32[1]["valid_mae"]))
        gap = abs(min(fp16["valid_mae"]) - min(fp32[0]["valid_mae"]))
        limit = max(noise, args.noise_floor)
        verdict = (f"{'agrees' if gap <= limit else 'DIFFERS'}: |AMP − fp32| {gap:.4f} vs seed "
                   f"noise {noise:.4f} (floor {args.noise_floor:g})")
        for label, run, result in (("fp32, seed 0", fp32[0], ""), ("fp32, seed 1", fp32[1], ""),
                                   ("fp16 AMP, seed 0", fp16, verdict)):
            rows.append(["a: AMP vs fp32", name, label, f"{s_per_epoch(run):.2f}",
                         curve(run["valid_mae"]), result])
    return rows


def curve(maes: list[float]) -> str:
    return " → ".join(f"{m:.3f}" for m in maes) + f" (best {min(maes):.3f})"


# -- part b: tuner.search at 0.25 vs 1.0 GPU per trial --------------------------------------------

SEARCH_YAML = """\
name: {name}
description: gpu_check part b, fractional GPU packing
backbones: [{backbone}]
regularisers: [none]
data: {data}
metric: valid_mae
mode: min
ranges:
  lr: {{low: 1.0e-4, high: 1.0e-3, log: true}}
fixed:
  batch_size: {batch}
  patience: 0
search:
  sampler: random
  pruner: none
  num_samples: {trials}
  max_epochs: {epochs}
  seed: 0
resources:
  cpu: {cpu}
  gpu: 1
seeds: [0]
"""


class GpuProcessSampler(threading.Thread):
    """The most processes ``nvidia-smi`` lists on the GPU at one time, sampled every second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.exe = shutil.which("nvidia-smi")
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.exe and not self.stop.is_set():
            try:
                out = subprocess.run([self.exe, "--query-compute-apps=pid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.most = max(self.most, len({ln.strip() for ln in out.splitlines() if ln.strip()}))
            except (OSError, subprocess.SubprocessError):
                pass
            self.stop.wait(1.0)


def trial_intervals(experiment: Path) -> list[tuple[float, float]]:
    """(start, end) of each trial of a Ray Tune experiment folder, from its ``result.json``:
    end = the last report's ``timestamp``, start = end − its ``time_total_s``."""
    intervals = []
    for path in sorted(experiment.glob("*/result.json")):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            end = float(reports[-1]["timestamp"])
            intervals.append((end - float(reports[-1]["time_total_s"]), end))
    return intervals


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))  # an end before a start at the same second
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def one_search(gpu: float, args, workdir: Path) -> dict:
    name = f"gpu-check-{str(gpu).replace('.', 'p')}"
    space = workdir / f"{name}.yaml"
    space.write_text(SEARCH_YAML.format(name=name, backbone=SEARCH_BACKBONE,
                                        data=args.data_dir.resolve(), batch=args.batch,
                                        trials=args.trials, epochs=args.search_epochs,
                                        cpu=args.cpus_per_trial))
    storage = workdir / f"ray-{name}"
    cmd = [sys.executable, "-m", "tuner.search", "--space", str(space), "--name", name,
           "--gpus-per-trial", str(gpu), "--cpus-per-trial", str(args.cpus_per_trial),
           "--max-concurrent", "0", "--storage", str(storage),
           "--mlflow-uri", f"sqlite:///{workdir / f'mlflow-{name}.db'}"]
    sampler = GpuProcessSampler()
    sampler.start()
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # cwd = workdir: its own optuna.db
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join(timeout=5)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[:300]
        raise RuntimeError(f"tuner.search --gpus-per-trial {gpu:g} failed (exit "
                           f"{proc.returncode}): {tail}")
    intervals = trial_intervals(storage / name)
    span = max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else float("nan")
    return {"trials": len(intervals), "span": span, "wall": wall,
            "at_once": most_at_once(intervals),
            "gpu_procs": sampler.most if sampler.exe else None}


def packing_rows(args) -> list[list[str]]:
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for gpu in GPU_FRACTIONS:
            print(f"# b: tuner.search, {gpu:g} GPU per trial ...", file=sys.stderr, flush=True)
            results[gpu] = r = one_search(gpu, args, Path(tmp))
            per_hour = 3600 * r["trials"] / r["span"] if r["span"] > 0 else float("nan")
            r["per_hour"] = per_hour
            procs = "nvidia-smi absent" if r["gpu_procs"] is None else f"{r['gpu_procs']} on the GPU (nvidia-smi)"
            rows.append(["b: packing", SEARCH_BACKBONE,
                         f"{gpu:g} GPU, {args.cpus_per_trial:g} CPU per trial", "",
                         f"{r['trials']} trials × {args.search_epochs} epochs in {r['span']:.0f} s "
                         f"(search {r['wall']:.0f} s with Ray's start)",
                         f"{per_hour:.0f} trials/hour; at once: {r['at_once']} (Ray), {procs}"])
    q, one = results[GPU_FRACTIONS[0]], results[GPU_FRACTIONS[1]]
    shared = q["at_once"] > 1 and (q["gpu_procs"] is None or q["gpu_procs"] > 1)
    rows[0][5] += (f"; {q['per_hour'] / one['per_hour']:.2f}× the trials/hour of 1.0 GPU; "
                   f"{'shared the GPU' if shared else 'did NOT share the GPU'}")
    return rows


# -- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__), file=sys.stderr)
        return 2
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name(0)
    data, source = load_data("mosi", args.data_dir)
    rows: list[list[str]] = []
    runs: dict = {}
    if "a" in args.parts:
        print("# a: AMP vs fp32 ...", file=sys.stderr, flush=True)
        rows += amp_rows(data, args, runs)
    if "c" in args.parts:
        print("# c: s/epoch ...", file=sys.stderr, flush=True)
        for name in ("mag_bert", "mmim"):
            run = runs.get((name, "amp")) or train_on_gpu(name, data, args, 0, amp=True)
            what = "regulariser mmim, two-stage" if name == "mmim" else "regulariser none"
            rows.append(["c: s/epoch", name, f"fp16 AMP, {what}", f"{s_per_epoch(run):.2f}",
                         curve(run["valid_mae"]), "train + validation, epochs 2+"])
    if "d" in args.parts:
        for name in MDM_MODELS:
            print(f"# d: {name}, none and mdm ...", file=sys.stderr, flush=True)
            base = train_on_gpu(name, data, args, 0, amp=True, regulariser="none",
                                epochs=args.mdm_epochs)
            mdm = train_on_gpu(name, data, args, 0, amp=True, regulariser="mdm",
                               epochs=args.mdm_epochs)
            ratio = s_per_epoch(mdm) / s_per_epoch(base)
            for label, run, result in (("fp16 AMP, regulariser none", base, ""),
                                       ("fp16 AMP, mdm (Algorithm 1, Unroll 10)", mdm,
                                        f"MDM ÷ none: {ratio:.2f}× (target ≤ 5×)")):
                rows.append(["d: MDM cost", name, label, f"{s_per_epoch(run):.2f}",
                             curve(run["valid_mae"]), result])
    if "b" in args.parts:
        rows += packing_rows(args)
    print(f"Command: `{command_line('bench/gpu_check.py', argv)}`")
    print(machine_line("GPU " + gpu) + f"; data {source}, batch {args.batch}")
    print()
    print("| check | model | setting | s/epoch | valid MAE per epoch | result |")
    print("|---|---|---|---:|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
