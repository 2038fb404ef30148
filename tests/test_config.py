"""Strict configs: a typo or a wrong type fails before a trial starts, naming the key."""

import pytest

from trainables.backbones import get_backbone, known_backbones
from trainables.config import ConfigError, TrialConfig
from trainables.regularisers import get_regulariser, known_regularisers


def test_defaults_build_for_every_pair():
    """Every pair builds at its defaults, except LMF at MMSA's output_dim 1 (its fused vector is
    the score) with a regulariser that reads the fused Z: refused, naming backbone.output_dim."""
    for backbone in known_backbones():
        for reg in known_regularisers():
            flat = {"backbone": backbone, "regulariser": reg}
            if backbone == "lmf" and reg in ("mdm", "synergy"):
                with pytest.raises(ConfigError, match="backbone.output_dim: 1 makes LMF"):
                    TrialConfig.from_flat(flat)
                flat["backbone.output_dim"] = 32
            cfg = TrialConfig.from_flat(flat)
            assert isinstance(cfg.backbone_cfg, get_backbone(backbone).config_class)
            assert isinstance(cfg.regulariser_cfg, get_regulariser(reg).config_class)


def test_flat_round_trip():
    flat = {"backbone": "tfn", "regulariser": "mdm", "lr": 0.002, "regulariser.weight": 0.5,
            "regulariser.estimator": "w"}
    cfg = TrialConfig.from_flat(flat)
    assert cfg.lr == 0.002 and cfg.regulariser_cfg.weight == 0.5
    again = TrialConfig.from_flat(cfg.to_flat())
    assert again.to_flat() == cfg.to_flat()


@pytest.mark.parametrize(
    "flat, needle",
    [
        ({"lrr": 0.1}, "unknown key 'lrr'; known:"),
        ({"regulariser": "mdm", "regulariser.wieght": 1.0}, "regulariser 'mdm': unknown key 'wieght'"),
        ({"backbone.hiddden": 3}, "backbone 'ef_lstm': unknown key 'hiddden'"),
        ({"optimizer.lr": 3}, "dotted keys must start with"),
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"batch_size": 3.5}, "batch_size: expected an integer, got 3.5"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1"),
        ({"mode": "minimum"}, "mode: expected one of 'min', 'max'"),
        ({"regulariser": "mdm", "regulariser.estimator": "jsd"}, "estimator"),
    ],
)
def test_bad_values_name_the_key(flat, needle):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_flat(flat)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'tnf'; known: .*tfn"):
        TrialConfig.from_flat({"backbone": "tnf"})
    with pytest.raises(ValueError, match=r"unknown regulariser 'mmd'; known: .*mdm"):
        get_regulariser("mmd")


def test_aliases_reach_the_same_class():
    assert get_backbone("flstm") is get_backbone("ef_lstm")


def test_int_is_accepted_for_float_and_integral_float_for_int():
    cfg = TrialConfig.from_flat({"lr": 1, "batch_size": 64.0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
