"""Does ``group_by_length`` move validation MAE, and how much epoch time does it save?

MAG-BERT (the packaged MiniLM encoder, regulariser ``none``) trained through the real
:class:`trainables.loop.Trainer` on the synthetic set (MOSI's spread of sentence lengths), for
each seed with random batches (the papers') and with length-grouped batches; every batch is cut
to its longest row in both. Prints, per setting, the best validation MAE of every seed, their
mean and standard deviation, and the mean training-epoch seconds; then the epoch-time ratio.
The setting's default (``TrialConfig.group_by_length``) was chosen from this output
(docs/fidelity.md, "Batching"). Because each seed trains both settings, the per-seed differences
(option minus default) are printed too, with their mean, sd and a paired t-test's p-value.

``--option KEY=VALUE`` compares another trial key against its default the same way, e.g. the
CPU's bf16 autocast (docs/fidelity.md, "Speed options that touch the computation").

    python bench/group_by_length.py                       # medium size, seeds 0 1 2, 6 epochs
    python bench/group_by_length.py --size small --epochs 4 --seeds 0 1
    python bench/group_by_length.py --option cpu_bf16=true --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python bench/group_by_length.py --size small")
    parser.add_argument("--size", default="medium", choices=("small", "medium", "mosi"),
                        help="synthetic size (default medium: 600/200/200 clips)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="trial seeds (data seed 0 for all)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (no early stop)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--option", default="group_by_length=true", metavar="KEY=VALUE",
                        help="the trial key compared against its default (default "
                             "group_by_length=true; VALUE is read as YAML)")
    args = parser.parse_args(argv)
    import yaml

    key, sep, raw = args.option.partition("=")
    if not sep or not key:
        parser.error(f"--option {args.option}: expected KEY=VALUE")
    value = yaml.safe_load(raw)

    import torch
    from scipy import stats

    from trainables.config import TrialConfig
    from trainables.data import arrays_from_mmsa
    from trainables.data.synthetic import make_synthetic
    from trainables.loop import Trainer

    torch.set_num_threads(args.threads)
    data = arrays_from_mmsa(make_synthetic(args.size, seed=0, unlabeled_factor=0),
                            f"synthetic:{args.size}")
    base = {"backbone": "mag_bert", "regulariser": "none", "max_epochs": args.epochs,
            "patience": 0, "batch_size": args.batch_size, "lr": 1e-3, "text_lr": 5e-5,
            "warmup": 0.1}
    default = getattr(TrialConfig.from_flat(base), key, None)
    changed = TrialConfig.from_flat({**base, key: value})  # a bad key or value fails here
    label = {False: f"{key}={yaml.safe_dump(default).split(chr(10))[0]} (default)",
             True: f"{key}={raw}"}
    if getattr(changed, key, value) == default:
        parser.error(f"--option {args.option}: that is the default already")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}  # option on?
    for seed in args.seeds:
        for on in (False, True):  # interleaved: machine load hits both settings alike
            flat = {**base, "seed": seed, **({key: value} if on else {})}
            cfg = TrialConfig.from_flat(flat)
            trainer = Trainer(cfg, data, device="cpu")
            seconds: list[float] = []
            train_pass = trainer.train_epoch

            def timed(train_pass=train_pass, seconds=seconds):  # the training pass alone
                start = time.perf_counter()
                out = train_pass()
                seconds.append(time.perf_counter() - start)
                return out

            trainer.train_epoch = timed
            trainer.fit()
            best = trainer.best.value
            results[on].append((best, statistics.mean(seconds)))
            print(f"seed {seed} {label[on]:<32} best valid_mae "
                  f"{best:.4f}  train s/epoch {statistics.mean(seconds):.2f}", flush=True)
    print()
    print(f"| setting | best valid MAE per seed ({', '.join(map(str, args.seeds))}) | mean ± sd "
          "| train s/epoch |")
    print("|---|---|---|---:|")
    maes = {on: [m for m, _ in rows] for on, rows in results.items()}
    for on, rows in results.items():
        sd = statistics.stdev(maes[on]) if len(rows) > 1 else 0.0
        print(f"| {label[on]} | {', '.join(f'{m:.3f}' for m in maes[on])} | "
              f"{statistics.mean(maes[on]):.3f} ± {sd:.3f} | "
              f"{statistics.mean(s for _, s in rows):.2f} |")
    diffs = [b - a for a, b in zip(maes[False], maes[True])]
    line = (f"\nper seed, option minus default: {', '.join(f'{d:+.3f}' for d in diffs)}; mean "
            f"{statistics.mean(diffs):+.3f}")
    if len(diffs) > 1:
        line += (f" ± {statistics.stdev(diffs):.3f} (sd); paired t-test p = "
                 f"{stats.ttest_rel(maes[True], maes[False]).pvalue:.3f}")
    print(line)
    ratio = (statistics.mean(s for _, s in results[False])
             / statistics.mean(s for _, s in results[True]))
    print(f"epoch time, default ÷ option: {ratio:.2f}x ({args.size}, {args.threads} "
          f"threads, batch {args.batch_size}, {args.epochs} epochs; load average "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
