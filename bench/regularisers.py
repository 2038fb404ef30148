"""What does each regulariser cost? Seconds per training epoch on one backbone, and the ratio to none.

Every regulariser (none, mdm, mmim, mird, orthogonal, synergy) at its default config, on the same
backbone at its default config, through the real :class:`trainables.loop.Trainer` (``train_epoch``:
forward, the regulariser's ``inner_steps`` estimator updates, penalty, model step). Defaults that
drive the cost: MDM runs ``unroll`` = 10 critic steps per batch, each on a fresh batch and its
modality-shuffled copy (encoded without gradients block by block; TFN, LMF and MMIM encode each
block's modalities once and fuse B and B̄ together), and encodes the model step's B̄ with gradients (Algorithm 1 of Colombo et al. 2021); MIRD 5 CLUB steps; MMIM one q-only pass
over the epoch before the model pass (its Algorithm 1); synergy 1 estimator step; orthogonal and
none have no estimator.

Data: ``--size mosi`` is the MOSI-sized synthetic set (1284/229/686 clips), read from
``data/synthetic-mosi`` when that folder exists (``python -m tuner.data synth --out
data/synthetic-mosi`` writes it), else generated in memory with the encoder-free ("fast") text
features; ``--size medium|small`` is generated in memory with fast text. Prints a Markdown table
with the machine.

    python bench/regularisers.py                                  # ef_lstm tfn lmf, mosi, 1 thread
    python bench/regularisers.py --backbones tfn --epochs 3 --threads 2
    python bench/regularisers.py --size small                     # seconds, for a quick look
    # MDM as Algorithm 1 (the default) against the cheaper named departures, in one run:
    python bench/regularisers.py --backbones tfn --regularisers mdm \
        mdm:input=unimodal,critic_batches=same mdm:critic_batches=same

A regulariser may carry config overrides after a colon (``NAME:key=value,key=value``, the keys of
its config without the ``regulariser.`` prefix); ``--set KEY=VALUE`` sets a trial key for every
run (e.g. ``--set backbone.text_model=minilm``). LMF runs at ``backbone.output_dim`` 32, as in
the mdm and synergy spaces (at MMSA's 1 its fused vector is the score itself, and MDM and Synergy,
which read it, are refused).

Times: CPU seconds are the process's (``time.process_time``, all threads), wall seconds beside
them. The ratio to ``none`` uses CPU seconds, which a second user of the machine disturbs less
than wall time. A 2-batch warm-up run precedes the timed epochs (not counted). ``--max-batches N``
times only the first N batches of each epoch and scales the time by the epoch's batch count
(marked "~").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MOSI_DIR = REPO / "data" / "synthetic-mosi"
REGULARISERS = ("none", "mdm", "mmim", "mird", "orthogonal", "synergy")

sys.path.insert(0, str(REPO))  # run as a script
from bench.backbones import load_data, machine_line  # noqa: E402  (one machine line, one data set)


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"mdm:input=unimodal,unroll=3"`` -> ("mdm", {"regulariser.input": "unimodal", ...})."""
    import yaml

    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: expected NAME:key=value,key=value")
        overrides[f"regulariser.{key.strip()}"] = yaml.safe_load(value)
    return name, overrides


def flat_config(backbone: str, spec: str, args) -> dict:
    name, overrides = parse_spec(spec)
    # LMF as the mdm and synergy spaces run it: at MMSA's output_dim 1 its fused vector is the
    # score, and a regulariser that reads it is refused (TrialConfig.from_flat)
    lmf = {"backbone.output_dim": 32} if backbone == "lmf" else {}
    return {"backbone": backbone, "regulariser": name, "seed": 0, "batch_size": args.batch,
            "max_epochs": max(args.epochs, 1), "patience": 0, **lmf, **args.set, **overrides}


def inner_steps_of(spec: str) -> int:
    from trainables.config import TrialConfig

    name, overrides = parse_spec(spec)
    cfg = TrialConfig.from_flat({"regulariser": name, **overrides})
    return int(getattr(cfg.regulariser_cfg, "unroll", getattr(cfg.regulariser_cfg, "inner_steps", 0)))


def bench_one(backbone: str, reg_spec: str, data, args) -> dict:
    import numpy as np

    from trainables.data import TensorSplit
    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    flat = flat_config(backbone, reg_spec, args)
    cfg = TrialConfig.from_flat(flat)
    trainer = Trainer(cfg, data, device="cpu", num_threads=args.threads)
    train_arrays = data.splits["train"]
    n_rows = len(train_arrays)
    n_batches = math.ceil(n_rows / args.batch)

    def split_of(rows: int):
        return TensorSplit.from_arrays(trainer.model.prepare_split(train_arrays.subset(np.arange(rows))))

    # warm-up on 2 batches (allocator, lazy initialisation), not counted
    full = trainer.splits["train"]
    trainer.splits["train"] = split_of(min(n_rows, 2 * args.batch))
    trainer.train_epoch()
    timed_batches = n_batches
    if args.max_batches and args.max_batches < n_batches:
        timed_batches = args.max_batches
        trainer.splits["train"] = split_of(timed_batches * args.batch)
    else:
        trainer.splits["train"] = full
    scale = n_batches / timed_batches

    cpu, wall = [], []
    for _ in range(max(args.epochs, 1)):
        c, w = time.process_time(), time.perf_counter()
        stats = trainer.train_epoch()
        cpu.append((time.process_time() - c) * scale)
        wall.append((time.perf_counter() - w) * scale)
    if not math.isfinite(stats.get("train_loss", math.nan)):
        raise FloatingPointError(f"non-finite train loss {stats.get('train_loss')}")
    return {"cpu": sum(cpu) / len(cpu), "wall": sum(wall) / len(wall), "batches": n_batches,
            "timed_batches": timed_batches, "extrapolated": timed_batches < n_batches,
            "reg_params": sum(p.numel() for p in trainer.reg.parameters())}


def main(argv: list[str] | None = None) -> int:
    from trainables.backbones import known_backbones

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", choices=("mosi", "medium", "small"), default="mosi",
                   help="mosi: data/synthetic-mosi if it exists, else generated (default); "
                        "medium/small: generated in memory with fast text")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_MOSI_DIR,
                   help=f"the MOSI-sized Parquet folder (default {DEFAULT_MOSI_DIR})")
    p.add_argument("--backbones", nargs="+", default=["ef_lstm", "tfn", "lmf"], metavar="NAME",
                   help="backbones (default ef_lstm tfn lmf)")
    p.add_argument("--regularisers", nargs="+", default=list(REGULARISERS), metavar="NAME",
                   help=f"regularisers (default {' '.join(REGULARISERS)}; none is always run)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs to average (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--max-batches", type=int, default=0,
                   help="time only this many batches per epoch and extrapolate (default 0: full epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trial key for every run, e.g. backbone.text_model=minilm (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    import yaml

    sets = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        sets[key] = yaml.safe_load(value)
    args.set = sets

    from trainables.regularisers import known_regularisers

    for name in args.backbones:
        if name not in known_backbones():
            p.error(f"unknown backbone {name!r}; known: {', '.join(known_backbones())}")
    regs = ["none"] + [r for r in args.regularisers if r != "none"]
    for spec in regs:
        try:
            name, _ = parse_spec(spec)
        except ValueError as exc:
            p.error(str(exc))
        if name not in known_regularisers():
            p.error(f"unknown regulariser {name!r}; known: {', '.join(known_regularisers())}")

    import torch

    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    data, source = load_data(args.size, args.data_dir)
    results: dict[tuple[str, str], dict | str] = {}
    for backbone in args.backbones:
        for reg in regs:
            print(f"# {backbone} + {reg} ...", file=sys.stderr, flush=True)
            try:
                results[backbone, reg] = bench_one(backbone, reg, data, args)
            except Exception as exc:  # a pair that cannot run is a cell note, not a crash
                results[backbone, reg] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
                print(f"# {backbone} + {reg}: {results[backbone, reg]}", file=sys.stderr)
    total_s = time.perf_counter() - start

    dims, n = data.dims, {k: len(v) for k, v in data.splits.items()}
    lines = [
        machine_line(f"{args.threads} thread(s)"),
        f"Data: {source}, train {n['train']} rows, text {dims.text_len}x{dims.text}, audio "
        f"{dims.audio_len}x{dims.audio}, vision {dims.vision_len}x{dims.vision}; batch {args.batch}, "
        f"{args.epochs} timed epoch(s), default configs; total wall {total_s:.0f} s",
        "",
        "| backbone | regulariser | inner steps/batch | regulariser params | train CPU s/epoch "
        "| train wall s/epoch | CPU × none | wall × none |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for backbone in args.backbones:
        base = results.get((backbone, "none"))
        for reg in regs:
            r = results[backbone, reg]
            if isinstance(r, str):
                lines.append(f"| {backbone} | {reg} | {inner_steps_of(reg)} | - | - | - | - | - |")
                notes.append(f"{backbone} + {reg}: not timed ({r})")
                continue
            mark = "~" if r["extrapolated"] else ""
            ratio_c = ratio_w = "-"
            if isinstance(base, dict):
                ratio_c, ratio_w = f"{r['cpu'] / base['cpu']:.2f}", f"{r['wall'] / base['wall']:.2f}"
            lines.append(f"| {backbone} | {reg} | {inner_steps_of(reg)} | {r['reg_params']:,} "
                         f"| {mark}{r['cpu']:.2f} | {mark}{r['wall']:.2f} | {ratio_c} | {ratio_w} |")
    if any(isinstance(r, dict) and r["extrapolated"] for r in results.values()):
        notes.append(f"~: {args.max_batches} batches timed per epoch, scaled to the epoch's batch count")
    lines += [f"\nNote: {note}" for note in notes]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
