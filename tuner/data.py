"""``python -m tuner.data``: make a synthetic data set, validate a data set, convert a pickle.

Examples::

    python -m tuner.data synth --out data/synthetic-mosi               # Parquet folder, MOSI sizes
    python -m tuner.data synth --out /tmp/small.pkl --size small --fast-text
    python -m tuner.data validate ~/MOSI/unaligned_50.pkl --nonfinite zero
    python -m tuner.data convert ~/MOSI/unaligned_50.pkl data/mosi --nonfinite zero
    python -m tuner.data convert ~/MOSI/unaligned_50.pkl data/mosi --unlabeled ~/pool.pkl

A data set may carry a fourth split ``unlabeled`` (MIRD's unlabeled pool: the pickle's
``unlabeled`` key, or ``unlabeled.parquet``); validate and convert check it (widths as train) and
carry it, and ``--unlabeled PATH`` adds one from another file.

Errors (unusable data, a text model that cannot be loaded, a file system problem) are printed
as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from trainables.data import UNLABELED, DataError, MultimodalData, load_dataset, write_parquet
from trainables.text import DEFAULT_TEXT_MODEL, TextModelError

__all__ = ["build_parser", "main", "summary"]

_PICKLE_NOTE = (
    "Security: reading a .pkl file runs code stored in it (Python pickle). Only load pickles you "
    "trust; convert them once and use the Parquet folder, which is read without any pickle."
)


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m tuner.data",
        description="Data sets for the search: make a synthetic MOSI-like set, validate an MMSA "
                    "pickle or Parquet folder, convert a pickle to Parquet.",
        epilog="Examples:\n"
               "  python -m tuner.data synth --out data/synthetic-mosi\n"
               "  python -m tuner.data validate ~/MOSI/unaligned_50.pkl --nonfinite zero\n"
               "  python -m tuner.data convert ~/MOSI/unaligned_50.pkl data/mosi --nonfinite zero\n\n"
               + _PICKLE_NOTE,
        formatter_class=formatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser(
        "synth", formatter_class=formatter,
        help="write a synthetic MOSI-like data set (MMSA schema, planted multimodal signal)",
        description="Write a synthetic CMU-MOSI-like data set in the MMSA schema: real sentences "
                    "tokenised with the packaged MiniLM tokenizer, variable-length audio/vision, "
                    "and sentiment that is partly only in audio/vision (neutral wording, sarcasm).",
        epilog="Examples:\n"
               "  python -m tuner.data synth --out data/synthetic-mosi          # Parquet folder\n"
               "  python -m tuner.data synth --out small.pkl --size small --fast-text --seed 1\n\n"
               + _PICKLE_NOTE,
    )
    synth.add_argument("--out", required=True, metavar="PATH",
                       help="where to write: a path ending in .pkl writes an MMSA pickle, any "
                            "other path a Parquet folder (train/valid/test.parquet); "
                            "e.g. --out data/synthetic-mosi")
    synth.add_argument("--size", choices=("small", "medium", "mosi"), default="mosi",
                       help="mosi: CMU-MOSI's 1284/229/686 clips, text 50 tokens, audio 375x5, "
                            "vision 500x20 (default); medium: 600/200/200; small: 96/48/48 with "
                            "40-frame audio/vision, for tests. e.g. --size small")
    synth.add_argument("--seed", type=int, default=0,
                       help="random seed; the same seed gives identical arrays (default 0). "
                            "e.g. --seed 3")
    synth.add_argument("--aligned", action="store_true",
                       help="word-aligned audio/vision (one frame per token, padded to the text "
                            "length), like MMSA's aligned_50.pkl; default unaligned")
    synth.add_argument("--unlabeled-factor", type=int, default=5, metavar="K",
                       help="also write an 'unlabeled' split of K x train rows from the same "
                            "generator, without labels (MIRD's unlabeled pool; the paper's is 5x "
                            "the training set). Default 5; 0 writes none. e.g. --unlabeled-factor 2")
    synth.add_argument("--fast-text", action="store_true",
                       help="skip the text encoder: text features are fixed pseudo-random 64-d "
                            "vectors per token (seconds faster; token ids are still MiniLM's). "
                            f"Default: the '{DEFAULT_TEXT_MODEL}' encoder's 384-d hidden states")

    validate = sub.add_parser(
        "validate", formatter_class=formatter,
        help="check a data set and print a summary (splits, sizes, dims, digest)",
        description="Check an MMSA pickle or a Parquet folder the way a search does before any "
                    "trial starts, and print a one-paragraph summary.",
        epilog="Examples:\n"
               "  python -m tuner.data validate data/mosi\n"
               "  python -m tuner.data validate ~/MOSI/unaligned_50.pkl --nonfinite zero\n\n"
               + _PICKLE_NOTE,
    )
    validate.add_argument("path", metavar="PATH",
                          help="an MMSA pickle (e.g. unaligned_50.pkl) or a Parquet folder")
    _nonfinite_flag(validate)
    _unlabeled_flag(validate)

    convert = sub.add_parser(
        "convert", formatter_class=formatter,
        help="convert an MMSA pickle to a Parquet folder (read later without any pickle)",
        description="Validate an MMSA pickle and write it as OUTDIR/{train,valid,test}.parquet, "
                    "the safe and faster form that searches read without unpickling.",
        epilog="Example:\n"
               "  python -m tuner.data convert ~/MOSI/unaligned_50.pkl data/mosi --nonfinite zero\n"
               "  python -m tuner.search --space mdm --data data/mosi\n\n" + _PICKLE_NOTE,
    )
    convert.add_argument("input", metavar="IN.pkl", help="the MMSA pickle to convert (runs its code: "
                                                         "only convert files you trust)")
    convert.add_argument("outdir", metavar="OUTDIR", help="the folder to write the Parquet files into")
    _nonfinite_flag(convert)
    _unlabeled_flag(convert)
    return p


def _unlabeled_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unlabeled", metavar="PATH",
                        help="add (or replace) the 'unlabeled' split from another file: an MMSA "
                             "pickle (its 'unlabeled' split, else its 'train' split; labels "
                             "ignored), a .parquet file, or a Parquet folder (its "
                             "unlabeled.parquet, else train.parquet). Feature widths must equal "
                             "train's. e.g. --unlabeled ~/emovox/unaligned.pkl")


def _nonfinite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nonfinite", choices=("error", "zero"), default="error",
                        help="NaN/inf in features: stop with an error (default) or replace them "
                             "by 0, as MMSA's loader does for the -inf in MOSI's audio. "
                             "e.g. --nonfinite zero")


def summary(data: MultimodalData) -> str:
    """One paragraph: source, splits and sizes, dims, aligned, tokens, labels, digest."""
    d = data.dims
    sizes = ", ".join(f"{name} {len(split)}" + (" (no labels)" if name == UNLABELED else "")
                      for name, split in data.splits.items())
    labels = data.splits["train"].labels
    return (
        f"{data.source}: splits {sizes} examples; text {d.text_len}x{d.text} "
        f"({'with' if d.has_tokens else 'without'} token ids), audio {d.audio_len}x{d.audio}, "
        f"vision {d.vision_len}x{d.vision}; {'aligned' if d.aligned else 'unaligned'}; "
        f"train labels in [{float(labels.min()):.2f}, {float(labels.max()):.2f}], "
        f"{int((labels == 0).sum())} zero; digest {data.digest}"
    )


def _load(path: str, nonfinite: str, unlabeled: str | None = None) -> MultimodalData:
    # the pickle warning becomes one "warning:" line, printed before the pickle is read
    from tuner.preflight import warning_lines

    with warning_lines():
        return load_dataset(path, nonfinite=nonfinite, unlabeled=unlabeled)


def _synth(args: argparse.Namespace) -> int:
    from trainables.data.synthetic import write_synthetic
    from trainables.text import load_text_model, load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(DEFAULT_TEXT_MODEL)
    encoder = None if args.fast_text else load_text_model(DEFAULT_TEXT_MODEL)
    out = write_synthetic(args.out, size=args.size, seed=args.seed, tokenizer=tokenizer,
                          text_encoder=encoder, aligned=args.aligned,
                          unlabeled_factor=args.unlabeled_factor)
    print(f"wrote {out} (synthetic {args.size}, seed {args.seed}, "
          f"{'aligned' if args.aligned else 'unaligned'}, "
          f"unlabeled pool {args.unlabeled_factor}x train, "
          f"{'fast text' if args.fast_text else DEFAULT_TEXT_MODEL + ' text'}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _validate(args: argparse.Namespace) -> int:
    print(summary(_load(args.path, args.nonfinite, args.unlabeled)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    data = _load(args.input, args.nonfinite, args.unlabeled)
    out = write_parquet(data, args.outdir)
    pool = ", unlabeled.parquet" if UNLABELED in data.splits else ""
    print(f"wrote {out}/train.parquet, valid.parquet, test.parquet{pool}; digest {data.digest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exc.code or 0)
    command = {"synth": _synth, "validate": _validate, "convert": _convert}[args.command]
    try:
        return command(args)
    except (DataError, TextModelError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
