"""Seconds per epoch (train + validation): our Trainer vs a plain DataLoader loop vs MMSA's trainer.

On the MOSI-sized synthetic set (1284/229/686 clips; ``data/synthetic-mosi``, written first when
missing) for EF-LSTM, TFN, LMF and MFN at their defaults, regulariser ``none``, lr 1e-3, batch 32:

- **ours**: :class:`trainables.loop.Trainer` (``run_epoch``: pre-stacked tensors, index-slice
  batches, fused AdamW, TFN's cheaper dropout mask, validation, best-epoch bookkeeping);
- **plain**: the same model (same seed, same initial weights) in the loop most research code
  has: a per-example ``Dataset`` (like MMSA's ``MMDataset``), ``DataLoader`` with the default
  collate, ``torch.optim.AdamW`` (for-each), L1 loss, the same gradient clipping,
  ``loss.item()`` per batch, validation through a ``DataLoader`` at the same batch size;
- **MMSA** (TFN only): ``pip install mmsa``'s own TFN model and trainer (``trains/singleTask/
  TFN.py``, Adam, MMSA's MOSI hyper-parameters: batch 32, lr 1e-3, dropouts 0.3/0.3/0.3/0.5) on the
  same data written as an MMSA pickle, run in MMSA's own virtual environment
  (``--mmsa-python``, see ``bench/_mmsa_tfn.py``). Make it once (CPU torch first, so that pip
  does not pull a CUDA build)::

      python -m venv /tmp/mmsa-venv
      /tmp/mmsa-venv/bin/pip install torch==2.13.0 && /tmp/mmsa-venv/bin/pip install mmsa

All three use the same torch threads (``--threads``, default 1) and batch size. The first epoch of
each is warm-up and not timed (its validation MAE is in the curve). Speed-ups are ratios of
the mean seconds per timed epoch; wall and CPU seconds (``time.process_time``) are both shown,
since a shared machine inflates wall time. Prints ready-to-paste Markdown.

    python bench/epoch_speed.py                          # ~3 min on a quiet 2-core machine
    python bench/epoch_speed.py --models tfn --epochs 8  # a longer TFN validation curve
    python bench/epoch_speed.py --cpu-bf16               # ours with bf16 autocast (avx512_bf16)
    python bench/epoch_speed.py --models tfn --profile 12   # torch.profiler: where a step goes

``--profile N`` times nothing else: for each of ``--models`` it runs N training batches of our
Trainer once untimed (warm-up), then N more under ``torch.profiler`` (CPU activities), and prints
the CPU seconds per batch and the top ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backbones import (  # noqa: E402
    DEFAULT_MOSI_DIR, command_line, load_data, machine_line,
)

MODELS = ("ef_lstm", "tfn", "lmf", "mfn")
DEFAULT_MMSA_PYTHON = "/tmp/mmsa-venv/bin/python"


def write_mmsa_pickle(data, path: Path) -> Path:
    """``data`` (a MultimodalData) as an MMSA pickle: the keys MMSA's ``MMDataset`` reads."""
    raw = {}
    for name, a in data.splits.items():
        part = {"id": a.ids, "raw_text": a.raw_text, "text": a.text, "audio": a.audio,
                "vision": a.vision, "audio_lengths": a.audio_lengths,
                "vision_lengths": a.vision_lengths, "regression_labels": a.labels}
        if a.text_bert is not None:
            part["text_bert"] = a.text_bert
        raw[name] = part
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_ours(name: str, data, args) -> dict:
    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    cfg = TrialConfig.from_flat({"backbone": name, "regulariser": "none", "seed": args.seed,
                                 "lr": 1e-3, "batch_size": args.batch, "patience": 0,
                                 "max_epochs": args.epochs, "cpu_bf16": args.cpu_bf16})
    trainer = Trainer(cfg, data, device="cpu", num_threads=args.threads)
    wall, cpu, curve = [], [], []
    while not trainer.finished:
        metrics, w, c = _timed(trainer.run_epoch)
        wall.append(w)
        cpu.append(c)
        curve.append(metrics["valid_mae"])
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"wall": wall, "cpu": cpu, "valid_mae": curve, "params": params}


def run_plain(name: str, data, args) -> dict:
    """The same model in a plain per-example Dataset + DataLoader loop."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from trainables.backbones import get_backbone
    from trainables.config import TrialConfig
    from trainables.data.batches import Batch
    from trainables.loop import seed_everything

    class ExampleDataset(Dataset):
        def __init__(self, a):
            self.a = a

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            a = self.a
            item = {"text": torch.tensor(a.text[i]), "audio": torch.tensor(a.audio[i]),
                    "vision": torch.tensor(a.vision[i]),
                    "text_lengths": torch.tensor(a.text_lengths[i]),
                    "audio_lengths": torch.tensor(a.audio_lengths[i]),
                    "vision_lengths": torch.tensor(a.vision_lengths[i]),
                    "labels": torch.tensor(a.labels[i]), "index": torch.tensor(i)}
            if a.text_bert is not None:
                item["text_bert"] = torch.tensor(a.text_bert[i])
            return item

    def to_batch(d):
        return Batch(text=d["text"], text_bert=d.get("text_bert"), audio=d["audio"],
                     vision=d["vision"], text_lengths=d["text_lengths"],
                     audio_lengths=d["audio_lengths"], vision_lengths=d["vision_lengths"],
                     labels=d["labels"], index=d["index"])

    torch.set_num_threads(max(1, args.threads))
    cfg = TrialConfig.from_flat({"backbone": name, "seed": args.seed})
    seed_everything(args.seed)  # as the Trainer does: the same initial weights
    backbone_cls = get_backbone(name)
    model = backbone_cls(cfg.backbone_cfg, data.dims)
    splits = {k: model.prepare_split(v) for k, v in data.splits.items()}
    train = DataLoader(ExampleDataset(splits["train"]), batch_size=args.batch, shuffle=True)
    valid = DataLoader(ExampleDataset(splits["valid"]), batch_size=args.batch, shuffle=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def epoch():
        model.train()
        total = 0.0
        for d in train:
            batch = to_batch(d)
            loss = F.l1_loss(model(batch).prediction, batch.labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            total += loss.item()
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for d in valid:
                batch = to_batch(d)
                preds.append(model(batch).prediction)
                labels.append(batch.labels)
        return float(np.mean(np.abs(torch.cat(preds).numpy() - torch.cat(labels).numpy())))

    wall, cpu, curve = [], [], []
    for _ in range(args.epochs):
        mae, w, c = _timed(epoch)
        wall.append(w)
        cpu.append(c)
        curve.append(mae)
    return {"wall": wall, "cpu": cpu, "valid_mae": curve,
            "params": sum(p.numel() for p in model.parameters())}


def run_mmsa(data, args, workdir: Path) -> dict:
    """MMSA's TFN + trainer in its own venv (a subprocess); raises RuntimeError with the reason."""
    python = Path(args.mmsa_python)
    if not python.exists():
        raise RuntimeError(f"no MMSA venv at {python} (make it as the module doc says, or pass "
                           "--mmsa-python)")
    pkl = write_mmsa_pickle(data, workdir / "mosi.pkl")
    cmd = [str(python), str(REPO / "bench" / "_mmsa_tfn.py"), "--pickle", str(pkl),
           "--epochs", str(args.epochs), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[:300]
        raise RuntimeError(f"MMSA run failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def profile_training(name: str, data, args, top: int = 12) -> list[str]:
    """``--profile``: ``args.profile`` training batches of our Trainer (regulariser none, lr 1e-3,
    ``args.batch``) under ``torch.profiler``, after as many untimed ones; Markdown lines: the CPU
    seconds per batch (``time.process_time``, the profiler's own cost included) and the ``top``
    ops by self CPU time with their share of the profiled self CPU time."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainables.config import TrialConfig
    from trainables.data import TensorSplit
    from trainables.loop import Trainer

    cfg = TrialConfig.from_flat({"backbone": name, "regulariser": "none", "seed": args.seed,
                                 "lr": 1e-3, "batch_size": args.batch, "patience": 0,
                                 "max_epochs": 1, "cpu_bf16": args.cpu_bf16})
    trainer = Trainer(cfg, data, device="cpu", num_threads=args.threads)
    train = data.splits["train"]
    rows = np.arange(min(len(train), args.profile * args.batch))
    trainer.splits["train"] = TensorSplit.from_arrays(trainer.model.prepare_split(
        train.subset(rows)))
    batches = -(-len(rows) // args.batch)
    trainer.train_epoch()  # warm-up: allocator, lazy initialisations, optimizer state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, wall, cpu = _timed(trainer.train_epoch)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    lines = [f"Profile of {name}'s training step ({batches} batches of {args.batch}, "
             f"{args.threads} thread(s){', bf16 autocast' if args.cpu_bf16 else ''}): "
             f"{cpu / batches:.3f} CPU s/batch, {wall / batches:.3f} wall s/batch under the "
             f"profiler; {total_us / 1e6 / batches:.3f} s/batch in ops (torch.profiler's self "
             "CPU time: the op's time on this thread, which a loaded machine inflates)", "",
             "| op | calls/batch | self CPU ms/batch | share of self CPU |",
             "|---|---:|---:|---:|"]
    for e in events[:top]:
        lines.append(f"| `{e.key}` | {e.count / batches:.1f} | "
                     f"{e.self_cpu_time_total / 1e3 / batches:.2f} | "
                     f"{100 * e.self_cpu_time_total / total_us:.1f}% |")
    rest = total_us - sum(e.self_cpu_time_total for e in events[:top])
    lines.append(f"| {len(events) - min(top, len(events))} other ops | – | "
                 f"{rest / 1e3 / batches:.2f} | {100 * rest / max(total_us, 1):.1f}% |")
    return lines


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _timed_part(r: dict) -> tuple[float, float]:
    """Mean wall and CPU seconds over the timed epochs (all but the first, warm-up, epoch)."""
    k = 1 if len(r["wall"]) > 1 else 0
    return _mean(r["wall"][k:]), _mean(r["cpu"][k:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", choices=("mosi", "medium", "small"), default="mosi",
                   help="mosi: the MOSI-sized Parquet set in --data-dir (default)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_MOSI_DIR)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="NAME",
                   help=f"backbones (default: {' '.join(MODELS)})")
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs per loop; the first is warm-up, the rest are timed (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32, MMSA's for TFN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-bf16", action="store_true",
                   help="ours with bf16 autocast (used only where the CPU has avx512_bf16)")
    p.add_argument("--mmsa-python", default=DEFAULT_MMSA_PYTHON,
                   help=f"python of the venv with mmsa installed (default {DEFAULT_MMSA_PYTHON})")
    p.add_argument("--no-mmsa", action="store_true", help="skip MMSA's trainer")
    p.add_argument("--profile", type=int, metavar="N",
                   help="only profile N training batches of ours per model (torch.profiler, "
                        "top ops by self CPU time) after N untimed ones; times nothing else")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs: at least 2 (the first is warm-up)")
    if args.profile is not None and args.profile < 1:
        p.error("--profile: at least 1 batch")

    import torch

    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    data, source = load_data(args.size, args.data_dir)
    if args.profile:
        print(f"Command: `{command_line('bench/epoch_speed.py', argv)}`")
        print(machine_line(f"{args.threads} thread(s)", load_before) + f"; data {source}\n")
        for name in args.models:
            print("\n".join(profile_training(name, data, args)) + "\n")
        return 0
    rows, curves, notes = [], {}, []
    for name in args.models:
        print(f"# {name}: ours ...", file=sys.stderr, flush=True)
        ours = run_ours(name, data, args)
        print(f"# {name}: plain DataLoader loop ...", file=sys.stderr, flush=True)
        plain = run_plain(name, data, args)
        mmsa = None
        if name == "tfn" and not args.no_mmsa:
            print("# tfn: MMSA's trainer ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="epoch-speed-") as tmp:
                try:
                    mmsa = run_mmsa(data, args, Path(tmp))
                except RuntimeError as exc:
                    notes.append(f"MMSA not timed: {exc}")
                    print(f"# {notes[-1]}", file=sys.stderr)
        rows.append((name, ours, plain, mmsa))
        curves[name] = (ours, plain, mmsa)
    total_s = time.perf_counter() - start

    n = {k: len(v) for k, v in data.splits.items()}
    print(f"Command: `{command_line('bench/epoch_speed.py', argv)}`")
    print(machine_line(f"{args.threads} thread(s)", load_before))
    print(f"Data: {source}, train/valid/test {n['train']}/{n['valid']}/{n['test']}; batch "
          f"{args.batch}, lr 1e-3, regulariser none; {args.epochs} epochs per loop, the first "
          f"not timed{'; ours with bf16 autocast' if args.cpu_bf16 else ''}\n")
    print("| model | params | ours s/epoch (wall / CPU) | plain DataLoader loop | MMSA trainer "
          "| ours vs plain (wall / CPU) | ours vs MMSA (wall / CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ours, plain, mmsa in rows:
        ow, oc = _timed_part(ours)
        pw, pc = _timed_part(plain)
        cells = [f"{ow:.2f} / {oc:.2f}", f"{pw:.2f} / {pc:.2f}"]
        if mmsa is not None:
            mw, mc = _timed_part(mmsa)
            cells += [f"{mw:.2f} / {mc:.2f}", f"{pw / ow:.2f}× / {pc / oc:.2f}×",
                      f"{mw / ow:.2f}× / {mc / oc:.2f}×"]
        else:
            cells += ["–", f"{pw / ow:.2f}× / {pc / oc:.2f}×", "–"]
        print(f"| {name} | {ours['params']:,} | " + " | ".join(cells) + " |")

    print("\nValidation MAE per epoch (one seed each; the same model in ours and plain, MMSA's "
          "own TFN in MMSA):\n")
    print("| model | loop | " + " | ".join(f"ep {i + 1}" for i in range(args.epochs)) + " | best |")
    print("|---|---|" + "---:|" * (args.epochs + 1))
    for name, (ours, plain, mmsa) in curves.items():
        for loop, r in (("ours", ours), ("plain", plain), ("MMSA", mmsa)):
            if r is None:
                continue
            maes = r["valid_mae"]
            print(f"| {name} | {loop} | " + " | ".join(f"{m:.3f}" for m in maes)
                  + f" | {min(maes):.3f} |")
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nTotal wall time: {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
