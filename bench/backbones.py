"""What does each backbone cost? Parameters and CPU seconds per training epoch / validation pass.

Every backbone at its default config (transformer backbones with the packaged ``minilm`` text
model), regulariser ``none``, through the real :class:`trainables.loop.Trainer` on the
MOSI-sized synthetic set (1284/229/686 clips; ``data/synthetic-mosi`` when it exists, else it is
written there first: ``python -m tuner.data synth --out data/synthetic-mosi``, ~15 s). Prints a
Markdown table with the machine.

    python bench/backbones.py                                  # all backbones, 1 thread, 1 epoch
    python bench/backbones.py --backbones ef_lstm tfn --epochs 3
    python bench/backbones.py --size small                     # in memory, fast text features
    python bench/backbones.py --text-model /models/xlnet-base-cased   # also time mag_xlnet
    python bench/backbones.py --backbones mag_bert mmim mird --threads 2 --ab backbone.unpad=false
                                                  # A/B: the same backbones with the padded encoder

``mag_xlnet``'s default encoder (``xlnet-base-cased``) is a hub download, so without
``--text-model`` it is skipped with a note. CPU seconds are the process's CPU time
(``time.process_time``, all threads); wall seconds are given beside them (the machine may be
shared). A backbone whose training epoch is estimated (from a 2-batch probe) to take longer than
``--max-epoch-s`` is timed on ``--probe-batches`` batches and the epoch time extrapolated
linearly by the batch count; the table marks those rows with "~".
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged MiniLM loads from disk

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MOSI_DIR = REPO / "data" / "synthetic-mosi"
#: the registry default of mag_xlnet is a hub download; it runs only with --text-model
NEEDS_DOWNLOAD = {"mag_xlnet": "xlnet-base-cased"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: str, load_before: float | None = None) -> str:
    """The "Machine:" line of a bench's printout: CPU model and count, torch, ``threads`` (as the
    bench words them), Python; with ``load_before``, the load average at the start and now."""
    import torch

    line = (f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
            f"{threads}, Python {platform.python_version()}")
    if load_before is not None:
        line += (f"; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                 "the end")
    return line


def command_line(script: str, argv: list[str] | None) -> str:
    """How the bench was run, for its printout: ``python bench/X.py`` and its arguments."""
    return " ".join([f"python {script}",
                     shlex.join(sys.argv[1:] if argv is None else argv)]).strip()


def load_data(size: str, data_dir: Path):
    """The data set the bench times: the MOSI Parquet folder (written if missing), or a smaller
    synthetic size in memory with encoder-free text features."""
    from trainables.data import arrays_from_mmsa, load_dataset
    from trainables.data.synthetic import make_synthetic

    if size == "mosi":
        if not (data_dir / "train.parquet").exists():
            from tuner.data import main as data_main

            print(f"# writing {data_dir} (python -m tuner.data synth --out {data_dir})",
                  file=sys.stderr)
            if data_main(["synth", "--out", str(data_dir)]) != 0:
                raise SystemExit(f"could not write {data_dir}")
        return load_dataset(data_dir), f"{data_dir.relative_to(REPO) if data_dir.is_relative_to(REPO) else data_dir}"
    return arrays_from_mmsa(make_synthetic(size, seed=0), f"synthetic:{size}"), \
        f"synthetic:{size} (in memory, fast text)"


def _train_split(trainer, arrays):
    from trainables.data import TensorSplit

    return TensorSplit.from_arrays(trainer.model.prepare_split(arrays))


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a YAML value (``true``, ``1e-3``, ``bytes``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def bench_one(name: str, data, args, extra: dict | None = None) -> dict:
    """Build ``name``'s trainer (``--set`` keys, then ``extra``), probe, time ``--epochs`` epochs."""
    state = prepare(name, data, args, extra)
    for _ in range(max(args.epochs, 1)):
        time_epoch(state)
    return summarize(state)


def bench_ab(name: str, data, args) -> tuple[dict, dict]:
    """A (``--set`` keys) and B (A plus the ``--ab`` keys) in this process, on the same batches,
    their epochs alternated (A, B, A, B, ...) so that a change of load hits both alike."""
    a = prepare(name, data, args)
    b = prepare(name, data, args, dict(args.ab), timed_batches=a["timed_batches"])
    for _ in range(max(args.epochs, 1)):
        time_epoch(a)
        time_epoch(b)
    return summarize(a), summarize(b)


def prepare(name: str, data, args, extra: dict | None = None,
            timed_batches: int | None = None) -> dict:
    import numpy as np
    import torch

    from trainables.config import TrialConfig
    from trainables.loop import Trainer

    flat = {"backbone": name, "regulariser": "none", "seed": 0, "batch_size": args.batch,
            "max_epochs": max(args.epochs, 1), "patience": 0}
    if name in NEEDS_DOWNLOAD and args.text_model:
        flat["backbone.text_model"] = args.text_model
    flat.update(dict(args.set or []))
    flat.update(extra or {})
    cfg = TrialConfig.from_flat(flat)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data, device="cpu", num_threads=args.threads)
    build_s = time.perf_counter() - t0
    params = list(trainer.model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)

    full_train = trainer.splits["train"]
    n_rows = len(data.splits["train"])
    n_batches = math.ceil(n_rows / args.batch)

    def timed(fn):
        c, w = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - c, time.perf_counter() - w

    # probe: 2 batches (also warms up the allocator and lazy initialisations; not counted)
    probe_rows = np.arange(min(n_rows, 2 * args.batch))
    trainer.splits["train"] = _train_split(trainer, data.splits["train"].subset(probe_rows))
    _, probe_wall = timed(trainer.train_epoch)
    if timed_batches is None:
        estimate = probe_wall / math.ceil(len(probe_rows) / args.batch) * n_batches
        extrapolated = estimate > args.max_epoch_s and args.probe_batches < n_batches
        timed_batches = args.probe_batches if extrapolated else n_batches
    extrapolated = timed_batches < n_batches
    if extrapolated:
        rows = np.arange(timed_batches * args.batch)
        trainer.splits["train"] = _train_split(trainer, data.splits["train"].subset(rows))
    else:
        trainer.splits["train"] = full_train

    label = name + "".join(f" ({k}={str(v).lower() if isinstance(v, bool) else v})"
                           for k, v in (extra or {}).items())
    return {"backbone": label, "text_model": getattr(cfg.backbone_cfg, "text_model", "-"),
            "total": total, "trainable": trainable, "batches": n_batches,
            "timed_batches": timed_batches, "extrapolated": extrapolated,
            "trainer": trainer, "scale": n_batches / timed_batches, "timed": timed,
            "train_cpu": [], "train_wall": [], "valid_cpu": [], "valid_wall": [],
            "build_s": build_s, "threads": torch.get_num_threads()}


def time_epoch(state: dict) -> None:
    """One timed training epoch (scaled up to the full epoch when extrapolated), one valid pass."""
    trainer, timed, scale = state["trainer"], state["timed"], state["scale"]
    c, w = timed(trainer.train_epoch)
    state["train_cpu"].append(c * scale)
    state["train_wall"].append(w * scale)
    c, w = timed(lambda: trainer.evaluate("valid"))
    state["valid_cpu"].append(c)
    state["valid_wall"].append(w)


def summarize(state: dict) -> dict:
    """The row of the tables: means over the timed epochs; the trainer is let go."""
    row = {k: v for k, v in state.items() if k not in ("trainer", "timed", "scale")}
    for key in ("train_cpu", "train_wall", "valid_cpu", "valid_wall"):
        row[key] = sum(state[key]) / len(state[key])
    state.pop("trainer", None)
    return row


def _fmt_params(n: int) -> str:
    return f"{n:,}"


def main(argv: list[str] | None = None) -> int:
    from trainables.backbones import known_backbones

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", choices=("mosi", "medium", "small"), default="mosi",
                   help="mosi: the MOSI-sized set from --data-dir (default); medium/small: "
                        "generated in memory with fast text features")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_MOSI_DIR,
                   help=f"the MOSI-sized Parquet folder (written if missing; default {DEFAULT_MOSI_DIR})")
    p.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help="registry names (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs to average (default 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--text-model", default=None,
                   help="text model for mag_xlnet (its default xlnet-base-cased needs a download; "
                        "without this it is skipped), e.g. a local xlnet folder or tiny-xlnet")
    p.add_argument("--max-epoch-s", type=float, default=90.0,
                   help="a training epoch estimated longer than this (wall s) is timed on "
                        "--probe-batches batches and extrapolated (default 90)")
    p.add_argument("--probe-batches", type=int, default=8,
                   help="batches timed when extrapolating (default 8)")
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a trial key for every run (repeatable; YAML values), e.g. --set "
                        "group_by_length=true")
    p.add_argument("--ab", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="also time each backbone with this trial key (repeatable; B = A plus "
                        "these keys), in this process on the same batches, epochs alternated, "
                        "and print B / A; e.g. --ab backbone.unpad=false")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    names = args.backbones or known_backbones()
    unknown = [n for n in names if n not in known_backbones()]
    if unknown:
        p.error(f"unknown backbone {unknown[0]!r}; known: {', '.join(known_backbones())}")

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    data, source = load_data(args.size, args.data_dir)
    dims = data.dims
    rows, notes, pairs = [], [], []
    for name in names:
        if name in NEEDS_DOWNLOAD and not args.text_model:
            notes.append(f"{name}: skipped, its default text model {NEEDS_DOWNLOAD[name]!r} is a "
                         "hub download (pass --text-model to time it)")
            print(f"# {notes[-1]}", file=sys.stderr)
            continue
        print(f"# {name} ...", file=sys.stderr, flush=True)
        try:
            if args.ab:
                pair = bench_ab(name, data, args)
                rows.extend(pair)
                pairs.append(pair)
            else:
                rows.append(bench_one(name, data, args))
        except Exception as exc:  # one backbone failing (e.g. a text model missing) is a row note
            notes.append(f"{name}: not timed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
            print(f"# {notes[-1]}", file=sys.stderr)
    total_s = time.perf_counter() - start

    n = {k: len(v) for k, v in data.splits.items()}
    print(machine_line(f"{args.threads} thread(s)", load_before))
    print(f"Data: {source}, train/valid/test {n['train']}/{n['valid']}/{n['test']}, "
          f"text {dims.text_len}x{dims.text}, audio {dims.audio_len}x{dims.audio}, "
          f"vision {dims.vision_len}x{dims.vision}; batch {args.batch}, regulariser none, "
          f"{args.epochs} timed epoch(s)\n")
    # the table docs/performance.md shows ("Backbones"): CPU seconds, extrapolation said in the cell
    print("| backbone | text model | parameters | train CPU s/epoch | valid CPU s/pass |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        train = (f"~{r['train_cpu']:.1f} ({r['timed_batches']} of {r['batches']} batches, "
                 "extrapolated)" if r["extrapolated"] else f"{r['train_cpu']:.2f}")
        print(f"| {r['backbone']} | {r['text_model']} | {_fmt_params(r['total'])} | {train} "
              f"| {r['valid_cpu']:.2f} |")
    print("\nIn detail (wall seconds beside CPU seconds; trainable parameters):\n")
    print("| backbone | text model | params total | params trainable | train CPU s/epoch "
          "| train wall s/epoch | valid CPU s/pass | valid wall s/pass | timed batches |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = "~" if r["extrapolated"] else ""
        batches = (f"{r['timed_batches']} of {r['batches']} (extrapolated)" if r["extrapolated"]
                   else f"{r['batches']} (full epoch)")
        print(f"| {r['backbone']} | {r['text_model']} | {_fmt_params(r['total'])} "
              f"| {_fmt_params(r['trainable'])} | {mark}{r['train_cpu']:.2f} | {mark}{r['train_wall']:.2f} "
              f"| {r['valid_cpu']:.2f} | {r['valid_wall']:.2f} | {batches} |")
    if pairs:
        print("\nA/B in this process (same batches, epochs alternated; B = A with "
              + ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.ab)
              + "):\n")
        print("| backbone | A train CPU s/epoch | B train CPU s/epoch | B / A | A valid CPU s/pass "
              "| B valid CPU s/pass | B / A |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for a, b in pairs:
            print(f"| {a['backbone']} | {a['train_cpu']:.2f} | {b['train_cpu']:.2f} "
                  f"| {b['train_cpu'] / a['train_cpu']:.2f} | {a['valid_cpu']:.2f} "
                  f"| {b['valid_cpu']:.2f} | {b['valid_cpu'] / a['valid_cpu']:.2f} |")
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nTotal wall time: {total_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
