"""MMSA's own TFN and trainer, timed per epoch (run by bench/epoch_speed.py in MMSA's venv).

Runs in a separate virtual environment with ``pip install mmsa`` (and a CPU torch); imports
nothing from this repository. It builds the run the way ``MMSA.run._run`` does:
``get_config_regression("tfn", "mosi")`` (MMSA's MOSI hyper-parameters), ``MMDataLoader`` on our
data written as an MMSA pickle, ``AMIO`` (MMSA's TFN) and ``ATIO().getTrain`` (its
``trains/singleTask/TFN.py`` trainer), then calls the trainer's own ``do_train``. Its loop runs
until early stopping; to time a fixed number of epochs, ``do_test`` is wrapped: each validation
pass records the time, and after ``--epochs`` of them the run stops. An epoch's time is the time
between two validation ends, i.e. MMSA's training pass, its train metrics, its validation pass
and its best-model ``torch.save``. Prints one JSON line.

    /tmp/mmsa-venv/bin/python bench/_mmsa_tfn.py --pickle /tmp/mosi.pkl --epochs 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


class _Done(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pickle", required=True, help="the data as an MMSA pickle")
    p.add_argument("--epochs", type=int, default=4, help="epochs to run (the first is warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1111, help="MMSA's first default seed")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    import MMSA
    from MMSA.config import get_config_regression
    from MMSA.data_loader import MMDataLoader
    from MMSA.models import AMIO
    from MMSA.trains import ATIO
    from MMSA.utils import setup_seed

    cfg = get_config_regression("tfn", "mosi")
    workdir = tempfile.mkdtemp(prefix="mmsa-bench-")
    cfg.update({
        "featurePath": args.pickle, "custom_feature": None, "feature_T": None, "feature_A": None,
        "feature_V": None, "device": torch.device("cpu"), "train_mode": "regression",
        "model_save_path": os.path.join(workdir, "tfn-mosi.pth"), "cur_seed": 1,
        # never stop early: the wrapper below stops after --epochs
        "early_stop": 10**6,
    })
    setup_seed(args.seed)
    dataloader = MMDataLoader(cfg, num_workers=0)  # MMSA_run's default is 4 workers; 0 = same threads
    model = AMIO(cfg).to(cfg["device"])
    trainer = ATIO().getTrain(cfg)

    marks: list[tuple[float, float]] = []
    valid_mae: list[float] = []
    original = trainer.do_test

    def timed_do_test(model, loader, mode="VAL", **kwargs):
        results = original(model, loader, mode=mode, **kwargs)
        if mode == "VAL":
            marks.append((time.perf_counter(), time.process_time()))
            valid_mae.append(float(results["MAE"]) if "MAE" in results else float(results["Loss"]))
            if len(marks) >= args.epochs:
                raise _Done
        return results

    trainer.do_test = timed_do_test
    start = (time.perf_counter(), time.process_time())
    marks_all = [start]
    try:
        trainer.do_train(model, dataloader)
    except _Done:
        pass
    marks_all += marks
    wall = [b[0] - a[0] for a, b in zip(marks_all, marks_all[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks_all, marks_all[1:])]
    print(json.dumps({"wall": wall, "cpu": cpu, "valid_mae": valid_mae,
                      "params": sum(p.numel() for p in model.parameters()),
                      "mmsa": getattr(MMSA, "__version__", "?"), "torch": torch.__version__,
                      "threads": torch.get_num_threads(),
                      "batch_size": cfg["batch_size"], "lr": cfg["learning_rate"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
