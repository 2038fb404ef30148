"""Trial configuration: strict dataclasses built from the flat dicts that Tune and Optuna use.

A trial's config is one flat dict (what Optuna samples, what MLflow logs as params):

    {"backbone": "tfn", "regulariser": "mdm", "lr": 1e-3, "batch_size": 32,
     "backbone.hidden": 64, "regulariser.weight": 0.1, "regulariser.estimator": "kl"}

Plain keys are :class:`TrialConfig` fields; ``backbone.X`` keys are fields of the chosen
backbone's config dataclass and ``regulariser.X`` keys of the chosen regulariser's. Any other
key is an error that lists the known ones, so a typo in a YAML fails before a trial starts
instead of silently training the default.

A *scoped* key ``regulariser.X@R`` is field ``X`` of regulariser ``R`` only: it sets
``regulariser.X`` in a trial whose regulariser is ``R`` and is left out of any other trial
(:func:`resolve_scoped`); ``unlabeled_rate@R`` likewise (the trial keys that a regulariser
reads, ``Regulariser.trial_keys``). A space that searches several regularisers whose fields share a name
(``alpha``: MMIM and MIRD; ``beta``: MMIM and Synergy; ``weight``: MDM and orthogonal) gives each
its own values, and Optuna its own parameter name, this way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

__all__ = ["ConfigError", "TrialConfig", "SCOPE", "build_dataclass", "dataclass_to_flat",
           "resolve_scoped", "split_scope"]

#: what separates a field from the regulariser it belongs to: ``regulariser.alpha@mird``
SCOPE = "@"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and what was expected."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml_repr(value: Any) -> str:
    """A value as a message shows it: strings quoted, booleans as YAML writes them."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        # by type too: 1 is not True, "1" is not 1
        if not any(type(value) is type(c) and value == c for c in choices):
            shown = ", ".join(_yaml_repr(c) for c in choices)
            raise ConfigError(f"{where}: expected one of {shown}, got {_yaml_repr(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def build_dataclass(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Build ``cls`` from ``values``, rejecting unknown keys and values of the wrong type.

    ``where`` prefixes error messages (e.g. ``"backbone 'tfn'"``) so the user can find the key.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{prefix}unknown key {unknown[0]!r}; known: {', '.join(sorted(known)) or '(none)'}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()
    }
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    return obj


def dataclass_to_flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of building: a flat ``{prefix + field: value}`` dict."""
    return {f"{prefix}{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)}


def split_scope(key: str) -> tuple[str, str | None]:
    """``regulariser.alpha@mird`` -> ``("regulariser.alpha", "mird")``; an unscoped key ->
    ``(key, None)``. Only the form is read here; :func:`check_scoped_key` checks the names."""
    base, at, scope = key.rpartition(SCOPE)
    return (base, scope) if at else (key, None)


def check_scoped_key(key: str) -> tuple[str, str]:
    """The key and regulariser of a scoped key, checked: ``regulariser.X@R`` where ``R`` is a
    registered regulariser and ``X`` a field of its config class, or ``K@R`` where ``K`` is a
    trial key that ``R`` reads (``unlabeled_rate``: ``Regulariser.trial_keys``). ConfigError
    naming the key otherwise."""
    from trainables.regularisers import get_regulariser
    from trainables.regularisers.base import REGULARISER_TRIAL_KEYS

    base, scope = split_scope(key)
    head, dot, name = base.partition(".")
    field_key = head == "regulariser" and dot and name
    if scope is None or SCOPE in base or not (field_key or base in REGULARISER_TRIAL_KEYS):
        raise ConfigError(f"{key!r}: only regulariser fields and "
                          f"{', '.join(REGULARISER_TRIAL_KEYS)} take a regulariser after "
                          f"'{SCOPE}', as in 'regulariser.alpha{SCOPE}mird'")
    try:
        cls = get_regulariser(scope)
    except ValueError as exc:
        raise ConfigError(f"{key!r}: unknown regulariser {scope!r} after '{SCOPE}' ({exc})") from None
    if not field_key:
        if base not in getattr(cls, "trial_keys", REGULARISER_TRIAL_KEYS):
            raise ConfigError(f"{key!r}: regulariser {scope!r} does not read {base} (it reads no "
                              "unlabeled row)")
        return base, scope
    fields = sorted(f.name for f in dataclasses.fields(cls.config_class))
    if name not in fields:
        raise ConfigError(f"{key!r}: regulariser {scope!r} has no field {name!r}; its fields: "
                          f"{', '.join(fields) or '(none)'}")
    return base, scope


def resolve_scoped(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` with each scoped key ``K@R`` (``regulariser.X@R``, ``unlabeled_rate@R``: see the
    module docstring) replaced by ``K`` when the trial's regulariser is ``R`` and dropped
    otherwise. A scoped key that ``R`` does not have, or a key given both ways, is a
    ConfigError."""
    reg = flat.get("regulariser", TrialConfig.regulariser)
    out = {k: v for k, v in flat.items() if SCOPE not in k}
    for key, value in flat.items():
        if SCOPE not in key:
            continue
        base, scope = check_scoped_key(key)
        if scope != reg:
            continue
        if base in out:
            raise ConfigError(f"{key!r} and {base!r} both set {base!r} of a {reg!r} trial; "
                              "give one")
        out[base] = value
    return out


@dataclass
class TrialConfig:
    """Everything one trial needs besides the data.

    ``backbone_cfg`` and ``regulariser_cfg`` hold the already-validated config dataclasses of the
    chosen backbone and regulariser (see :meth:`from_flat`).
    """

    backbone: str = "ef_lstm"
    regulariser: str = "none"
    seed: int = 0
    #: learning rate of the fusion model (and of regulariser parts trained with it)
    lr: float = 1e-3
    #: learning rate of a pretrained text encoder inside the backbone (own AdamW group)
    text_lr: float = 5e-5
    weight_decay: float = 0.0
    batch_size: int = 32
    #: training batches of rows of similar text length (shuffle, sort by length within chunks of
    #: 50 batches, shuffle the batches; Hugging Face's ``group_by_length``): less padding work;
    #: False = the papers' uniformly random batches (docs/fidelity.md, "Batching")
    group_by_length: bool = False
    max_epochs: int = 20
    #: early stopping: epochs without a validation improvement before the trial ends (0 = never)
    patience: int = 5
    #: task loss on labeled rows: L1 (MMSA's regression loss, MAE) or MSE (MIRD)
    task_loss: typing.Literal["l1", "mse"] = "l1"
    #: linear warm-up over this fraction of all training steps, then linear decay to 0
    #: (MAG-BERT's schedule); 0 = constant learning rate
    warmup: float = 0.0
    #: MIRD's split rate s (Qian et al. Fig. 6): the trial uses s x N_train unlabeled rows (the
    #: same rows for every trial), s x B of them appended to each batch, without replacement
    #: within an epoch (a per-epoch permutation), from the pool named by ``unlabeled_source``
    unlabeled_rate: float = 0.0
    #: where unlabeled rows come from: ``data`` (the paper: the data's ``unlabeled`` split, e.g.
    #: ``--unlabeled PATH``; a search without one stops before any trial) or ``train`` (a
    #: fallback that is not the paper's method: labeled training rows with their labels hidden)
    unlabeled_source: typing.Literal["data", "train"] = "data"
    #: gradient-norm clipping of the model step (0 = off)
    grad_clip: float = 5.0
    #: the validation metric that picks the best epoch (a key of the reported metrics)
    metric: str = "valid_mae"
    mode: typing.Literal["min", "max"] = "min"
    #: bf16 autocast of the forward pass on CPUs with native bf16 (``avx512_bf16`` / ``amx_bf16``
    #: in /proc/cpuinfo); ignored, with a warning, where the CPU lacks it. CUDA always uses AMP.
    cpu_bf16: bool = False
    #: on the CPU (glibc), keep freed memory in the process instead of returning it to the OS
    #: (``mallopt``: no mmap-ed blocks, a 1 GiB trim threshold): glibc serves blocks over 32 MiB
    #: (TFN's 36 MB post-fusion weight gradient, every step) with a fresh ``mmap`` whose pages
    #: fault in one by one; kept, they are reused. The process's peak memory is unchanged; it is
    #: not given back after the peak. Process-wide (a trial's worker); no effect on results.
    cpu_keep_freed_memory: bool = True
    #: ``torch.compile`` the model (CUDA only; ignored on the CPU)
    compile: bool = False
    #: under Tune, write the (resumable) checkpoint every this many epochs, and also on every
    #: validation improvement and at the trial's end; a worker lost mid-trial re-runs at most
    #: ``checkpoint_every`` epochs, exactly (a TFN checkpoint is ~146 MB: model, AdamW moments, best)
    checkpoint_every: int = 5
    #: the validated config dataclasses of the chosen backbone / regulariser (set by from_flat)
    backbone_cfg: Any = field(default=None, repr=True)
    regulariser_cfg: Any = field(default=None, repr=True)

    def validate(self) -> None:
        if self.lr <= 0 or self.text_lr <= 0:
            raise ConfigError(f"learning rates must be > 0, got lr={self.lr}, text_lr={self.text_lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs: expected an integer >= 1, got {self.max_epochs}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup: expected a fraction in [0, 1), got {self.warmup}")
        if self.unlabeled_rate < 0:
            raise ConfigError(f"unlabeled_rate: expected >= 0, got {self.unlabeled_rate}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every: expected an integer >= 1, got {self.checkpoint_every}")
        if self.patience < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("patience, grad_clip and weight_decay must be >= 0")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "TrialConfig":
        """Split a flat Tune config into the trial, backbone and regulariser dataclasses
        (scoped keys ``regulariser.X@R`` first resolved for the trial's regulariser:
        :func:`resolve_scoped`)."""
        from trainables.backbones import get_backbone
        from trainables.regularisers import get_regulariser

        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"backbone": {}, "regulariser": {}}
        for key, value in resolve_scoped(flat).items():
            head, dot, rest = key.partition(".")
            if dot and head in nested:
                nested[head][rest] = value
            elif dot:
                raise ConfigError(
                    f"unknown key {key!r}: dotted keys must start with 'backbone.' or 'regulariser.'"
                )
            else:
                top[key] = value
        for reserved in ("backbone_cfg", "regulariser_cfg"):
            if reserved in top:
                raise ConfigError(f"unknown key {reserved!r}; use 'backbone.X' / 'regulariser.X' keys")
        cfg = build_dataclass(cls, top, "trial config")
        backbone_cls = get_backbone(cfg.backbone)
        reg_cls = get_regulariser(cfg.regulariser)
        cfg.backbone_cfg = build_dataclass(
            backbone_cls.config_class, nested["backbone"], f"backbone {cfg.backbone!r}"
        )
        cfg.regulariser_cfg = build_dataclass(
            reg_cls.config_class, nested["regulariser"], f"regulariser {cfg.regulariser!r}"
        )
        # a regulariser that reads the fused representation needs one that is not the prediction
        # (LMF at output_dim 1: MDM's critic and Synergy's κ would act on the score itself)
        # (plugin classes may lack the hooks of Backbone / Regulariser: nothing to check then)
        reads_fused = getattr(reg_cls, "reads_fused", None)
        fused_problem = getattr(backbone_cls, "fused_problem", None)
        if reads_fused and fused_problem and reads_fused(cfg.regulariser_cfg):
            problem = fused_problem(cfg.backbone_cfg)
            if problem:
                raise ConfigError(f"backbone {cfg.backbone!r} with regulariser "
                                  f"{cfg.regulariser!r}: {problem}")
        return cfg

    def to_flat(self) -> dict[str, Any]:
        """The full flat config, defaults included (what MLflow logs as params)."""
        flat = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("backbone_cfg", "regulariser_cfg")
        }
        if self.backbone_cfg is not None:
            flat.update(dataclass_to_flat(self.backbone_cfg, "backbone."))
        if self.regulariser_cfg is not None:
            flat.update(dataclass_to_flat(self.regulariser_cfg, "regulariser."))
        return flat
