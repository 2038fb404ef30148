"""MMSA's own models and trainers (TFN, MAG-BERT, MMIM), timed per epoch; run by bench/epoch_speed.py
in MMSA's virtual environment.

Runs in a separate virtual environment with ``pip install mmsa`` (and a CPU torch); imports
nothing from this repository. It builds the run the way ``MMSA.run._run`` does:
``get_config_regression(model, "mosi")`` (MMSA's MOSI hyper-parameters), ``MMDataLoader`` on our
data written as an MMSA pickle (``num_workers=0``: the loading runs on the timed threads, as ours
does), ``AMIO`` (MMSA's model) and ``ATIO().getTrain`` (its ``trains/singleTask/<MODEL>.py``
trainer), then calls the trainer's own ``do_train``.

Its loop runs until early stopping; to time a fixed number of epochs, ``do_test`` is wrapped:
each validation pass records its start and end, and after ``--epochs`` of them the run stops. An
epoch's time is the time between two validation ends: MMSA's training pass (MMIM: its stage-1
``train_mmilb`` pass and its stage-2 ``train_others`` pass, as the paper's Algorithm 1), its train
metrics, its validation pass, and the previous epoch's best-model ``torch.save`` when the
validation loss improved. The validation pass and MMIM's stage-1 pass are also reported on their
own.

Runtime patches (applied here, never in site-packages), for MMSA 2.2.1 with transformers 5 and a
384-d text encoder (``--text-model``, a local BERT-architecture folder: the packaged MiniLM-L6):

- ``BERT_MAG`` loads ``bert-base-uncased`` by a hard-coded name: it loads ``--text-model``;
- ``MAG_BertModel`` and its classifier call ``init_weights()`` in ``__init__``, where transformers 5
  needs ``post_init()`` (which initialises the same weights and registers what ``from_pretrained``
  reads): ``post_init``;
- ``MAG_BertModel.forward`` calls ``get_extended_attention_mask`` / ``get_head_mask`` and passes
  ``head_mask`` to ``BertEncoder``, all gone in transformers 5: the same computation (embeddings,
  MAG, encoder, pooler) with transformers 5's own mask builder;
- ``MMDataset`` sets the text width to 768 for every BERT model: it is set to the encoder's width
  after loading (MAG's gate and MMIM's ``d_tout`` read it);
- MMIM's trainer passes ``verbose=True`` to ``ReduceLROnPlateau``, removed from torch: dropped;
- MMIM's ``pretrained`` (the encoder and tokenizer names) is ``--text-model``.

Prints one JSON line.

    /tmp/mmsa-venv/bin/python bench/_mmsa_run.py --model tfn --pickle /tmp/mosi.pkl --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

#: our names -> MMSA's
MMSA_NAMES = {"tfn": "tfn", "mag_bert": "bert_mag", "mmim": "mmim"}


class _Done(Exception):
    pass


def _patch_mag_bert(text_model: str) -> None:
    import importlib

    import torch.nn as nn
    from transformers import PreTrainedModel
    from transformers.masking_utils import create_bidirectional_mask

    # the package's __init__ shadows the module by its class: import the module by path
    mag_module = importlib.import_module("MMSA.models.singleTask.BERT_MAG")

    def bert_mag_init(self, args):
        nn.Module.__init__(self)
        self.pretrainedBertPath = text_model
        self.model = mag_module.MAG_BertForSequenceClassification.from_pretrained(
            text_model, args=args, num_labels=1)

    def mag_bert_forward(self, input_ids, visual, acoustic, attention_mask=None,
                         token_type_ids=None, position_ids=None, **_unused):
        # MMSA's computation: embeddings -> MAG (early fusion) -> encoder -> pooler
        embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                           token_type_ids=token_type_ids)
        fused = self.MAG(embedding_output, visual, acoustic)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=fused,
                                         attention_mask=attention_mask)
        sequence_output = self.encoder(fused, attention_mask=mask).last_hidden_state
        return sequence_output, self.pooler(sequence_output)

    base_init_weights = PreTrainedModel.init_weights

    def post_init(self):
        # transformers 5 registers in post_init() what from_pretrained reads; post_init() itself
        # ends by calling init_weights(), which then initialises as before
        if self.__dict__.get("_bench_post_init"):
            return base_init_weights(self)
        self.__dict__["_bench_post_init"] = True
        self.post_init()

    mag_module.BERT_MAG.__init__ = bert_mag_init
    mag_module.MAG_BertModel.init_weights = post_init
    mag_module.MAG_BertForSequenceClassification.init_weights = post_init
    mag_module.MAG_BertModel.forward = mag_bert_forward


def _patch_mmim() -> None:
    import importlib

    from torch.optim.lr_scheduler import ReduceLROnPlateau

    mmim_trainer = importlib.import_module("MMSA.trains.singleTask.MMIM")

    class Plateau(ReduceLROnPlateau):
        def __init__(self, *args, verbose=None, **kwargs):  # ``verbose`` is gone from torch
            super().__init__(*args, **kwargs)

    mmim_trainer.ReduceLROnPlateau = Plateau


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MMSA_NAMES), default="tfn", help="our name of the model")
    p.add_argument("--pickle", required=True, help="the data as an MMSA pickle")
    p.add_argument("--epochs", type=int, default=4, help="epochs to run (the first is warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: MMSA's config)")
    p.add_argument("--text-model", default=None,
                   help="local BERT-architecture folder for mag_bert and mmim (e.g. MiniLM-L6)")
    p.add_argument("--seed", type=int, default=1111, help="MMSA's first default seed")
    args = p.parse_args(argv)
    if args.model != "tfn" and not args.text_model:
        p.error(f"--model {args.model}: --text-model is required (a local folder)")

    import torch

    torch.set_num_threads(max(1, args.threads))
    import MMSA
    from MMSA.config import get_config_regression
    from MMSA.data_loader import MMDataLoader
    from MMSA.models import AMIO
    from MMSA.trains import ATIO
    from MMSA.utils import setup_seed

    name = MMSA_NAMES[args.model]
    if name == "bert_mag":
        _patch_mag_bert(args.text_model)
    if name == "mmim":
        _patch_mmim()

    cfg = get_config_regression(name, "mosi")
    workdir = tempfile.mkdtemp(prefix="mmsa-bench-")
    cfg.update({
        "featurePath": args.pickle, "custom_feature": None, "feature_T": None, "feature_A": None,
        "feature_V": None, "device": torch.device("cpu"), "train_mode": "regression",
        "model_save_path": os.path.join(workdir, f"{name}-mosi.pth"), "cur_seed": 1,
        # never stop early: the wrapper below stops after --epochs
        "early_stop": 10**6,
    })
    if args.batch:
        cfg["batch_size"] = args.batch
    if name == "mmim":
        cfg["pretrained"] = args.text_model
    setup_seed(args.seed)
    dataloader = MMDataLoader(cfg, num_workers=0)  # MMSA_run's default is 4 workers; 0 = same threads
    cfg["train_samples"] = len(dataloader["train"].dataset)
    if cfg.get("use_bert"):
        from transformers import AutoConfig

        cfg["feature_dims"][0] = int(AutoConfig.from_pretrained(args.text_model).hidden_size)
    model = AMIO(cfg).to(cfg["device"])
    trainer = ATIO().getTrain(cfg)

    marks: list[tuple[float, float]] = []
    valid_wall: list[float] = []
    valid_cpu: list[float] = []
    valid_mae: list[float] = []
    original = trainer.do_test

    def timed_do_test(model, loader, mode="VAL", **kwargs):
        w, c = time.perf_counter(), time.process_time()
        results = original(model, loader, mode=mode, **kwargs)
        if mode == "VAL":
            marks.append((time.perf_counter(), time.process_time()))
            valid_wall.append(marks[-1][0] - w)
            valid_cpu.append(marks[-1][1] - c)
            valid_mae.append(float(results["MAE"]) if "MAE" in results else float(results["Loss"]))
            if len(marks) >= args.epochs:
                raise _Done
        return results

    trainer.do_test = timed_do_test
    stage1_wall: list[float] = []
    if hasattr(trainer, "train_mmilb"):  # MMIM's stage 1 (Algorithm 1), timed on its own
        stage1 = trainer.train_mmilb

        def timed_stage1(loader):
            w = time.perf_counter()
            out = stage1(loader)
            stage1_wall.append(time.perf_counter() - w)
            return out

        trainer.train_mmilb = timed_stage1
    start = (time.perf_counter(), time.process_time())
    marks_all = [start]
    try:
        trainer.do_train(model, dataloader)
    except _Done:
        pass
    marks_all += marks
    wall = [b[0] - a[0] for a, b in zip(marks_all, marks_all[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks_all, marks_all[1:])]
    print(json.dumps({"wall": wall, "cpu": cpu, "valid_wall": valid_wall, "valid_cpu": valid_cpu,
                      "stage1_wall": stage1_wall, "valid_mae": valid_mae,
                      "params": sum(p.numel() for p in model.parameters()),
                      "mmsa": getattr(MMSA, "__version__", "?"), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "model": name,
                      "batch_size": cfg["batch_size"],
                      "lr": cfg.get("learning_rate", cfg.get("lr_main"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
