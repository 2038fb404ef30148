"""Does ``group_by_length`` move validation MAE, and how much epoch time does it save?

MAG-BERT (the packaged MiniLM encoder, regulariser ``none``) trained through the real
:class:`trainables.loop.Trainer` on the synthetic set (MOSI's spread of sentence lengths), for
each seed with random batches (the papers') and with length-grouped batches; every batch is cut
to its longest row in both. Prints, per setting, the best validation MAE of every seed, their
mean and standard deviation, and the mean training-epoch seconds; then the epoch-time ratio.
The setting's default (``TrialConfig.group_by_length``) was chosen from this output
(docs/fidelity.md, "Batching").

    python bench/group_by_length.py                       # medium size, seeds 0 1 2, 6 epochs
    python bench/group_by_length.py --size small --epochs 4 --seeds 0 1
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
    args = parser.parse_args(argv)

    import torch

    from trainables.config import TrialConfig
    from trainables.data import arrays_from_mmsa
    from trainables.data.synthetic import make_synthetic
    from trainables.loop import Trainer

    torch.set_num_threads(args.threads)
    data = arrays_from_mmsa(make_synthetic(args.size, seed=0, unlabeled_factor=0),
                            f"synthetic:{args.size}")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for seed in args.seeds:
        for grouped in (False, True):  # interleaved: machine load hits both settings alike
            cfg = TrialConfig.from_flat({
                "backbone": "mag_bert", "regulariser": "none", "seed": seed,
                "max_epochs": args.epochs, "patience": 0, "batch_size": args.batch_size,
                "lr": 1e-3, "text_lr": 5e-5, "warmup": 0.1, "group_by_length": grouped})
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
            results[grouped].append((best, statistics.mean(seconds)))
            print(f"seed {seed} group_by_length={str(grouped).lower():5} best valid_mae "
                  f"{best:.4f}  train s/epoch {statistics.mean(seconds):.2f}", flush=True)
    print()
    print("| group_by_length | best valid MAE per seed | mean ± sd | train s/epoch |")
    print("|---|---|---|---:|")
    for grouped, rows in results.items():
        maes = [m for m, _ in rows]
        sd = statistics.stdev(maes) if len(maes) > 1 else 0.0
        print(f"| {str(grouped).lower()} | {', '.join(f'{m:.3f}' for m in maes)} | "
              f"{statistics.mean(maes):.3f} ± {sd:.3f} | "
              f"{statistics.mean(s for _, s in rows):.2f} |")
    ratio = (statistics.mean(s for _, s in results[False])
             / statistics.mean(s for _, s in results[True]))
    print(f"\nepoch time, random ÷ grouped batches: {ratio:.2f}x ({args.size}, {args.threads} "
          f"threads, batch {args.batch_size}, {args.epochs} epochs; load average "
          f"{os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
