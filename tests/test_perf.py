"""The fast paths keep the behaviour: TFN's cheaper dropout mask has nn.Dropout's distribution,
the fused AdamW makes the same update, bf16 autocast only where the CPU has it, the trial's CPUs
set torch's threads, and checkpoints are written every k epochs and on improvement."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainables import loop
from trainables.backbones._layers import FastDropout
from trainables.config import TrialConfig
from trainables.loop import Trainer, make_adamw


def tfn_config(**overrides):
    flat = {"backbone": "tfn", "max_epochs": 2, "batch_size": 16, "patience": 0, "seed": 1,
            "backbone.text_hidden": 8, "backbone.text_out": 4, "backbone.audio_hidden": 4,
            "backbone.vision_hidden": 4, "backbone.post_fusion_dim": 8}
    flat.update(overrides)
    return TrialConfig.from_flat(flat)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.25, 0.75, 0.125, 0.25 + 2**-16, 0.1 + 2**-8])
def test_fast_dropout_has_the_distribution_of_nn_dropout(p):
    """The default mask ("bits": 32, 1, 2, 2, 4, 16 and 8 random bits per element for these p)."""
    x = torch.rand(400, 2500) + 0.5  # strictly positive: a zero output is a dropped element
    n = x.numel()
    tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of the dropped fraction
    torch.manual_seed(0)
    ours = FastDropout(p).train()(x)
    theirs = nn.Dropout(p).train()(x)
    for y in (ours, theirs):
        dropped = y == 0
        assert abs(dropped.float().mean().item() - p) < tol
        # kept elements are scaled by 1 / (1 - p), exactly as nn.Dropout scales them
        torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    # the mask is independent across elements: neighbouring columns are uncorrelated
    keep = (ours != 0).float()
    corr = torch.corrcoef(torch.stack([keep[:, :-1].flatten(), keep[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_fast_dropout_seeded_gradient_and_eval():
    x = torch.randn(8, 1000, requires_grad=True)
    drop = FastDropout(0.5)
    torch.manual_seed(3)
    y1 = drop(x)
    torch.manual_seed(3)
    y2 = drop(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # the default generator: seeded runs repeat
    y1.sum().backward()
    mask = (y1 != 0).float() * 2.0
    torch.testing.assert_close(x.grad, mask)  # d y / d x is the scaled mask
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert not FastDropout(1.0).train()(x).any()
    assert FastDropout(0.5).state_dict() == {}  # same (empty) state as nn.Dropout


def test_fused_adamw_makes_the_foreach_update():
    torch.manual_seed(0)
    w = torch.randn(50, 30)
    grads = [torch.randn(50, 30) for _ in range(3)]
    results = []
    for fused in (True, False):
        p = nn.Parameter(w.clone())
        groups = [{"params": [p], "lr": 1e-2, "weight_decay": 0.1}]
        opt = make_adamw(groups, 1e-2) if fused else torch.optim.AdamW(groups, lr=1e-2)
        assert bool(opt.defaults.get("fused")) is fused
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_trainer_uses_fused_adamw_and_threads(small_data):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer = Trainer(tfn_config(), small_data, device="cpu", num_threads=2)
        assert torch.get_num_threads() == 2  # not the default 1: the trial's count was applied
        assert trainer.optimizer.defaults["fused"] is True
        assert not trainer.amp  # float32 on the CPU unless cpu_bf16 asks
    finally:
        torch.set_num_threads(before)


def test_cpu_bf16_only_where_supported(small_data, monkeypatch):
    if loop.cpu_supports_bf16():
        trainer = Trainer(tfn_config(cpu_bf16=True, max_epochs=1), small_data, device="cpu")
        assert trainer.amp and trainer.amp_dtype == torch.bfloat16
        history = trainer.fit()
        assert math.isfinite(history[-1]["train_loss"]) and math.isfinite(history[-1]["valid_mae"])
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        trainer = Trainer(tfn_config(cpu_bf16=True), small_data, device="cpu")
    assert not trainer.amp and trainer.amp_dtype is None


def test_trial_threads_come_from_the_trial_cpus(ray_local, small_data):
    """train_fusion's path: trial_num_threads() in a Ray task, handed to the Trainer."""
    import ray

    from trainables.trainable import trial_num_threads

    cfg = tfn_config()  # built here: the worker cannot import this test module

    @ray.remote
    def threads(cfg, data):
        torch.set_num_threads(1)  # whatever the worker started with
        count = trial_num_threads()
        Trainer(cfg, data, device="cpu", num_threads=count)
        return count, torch.get_num_threads()

    # a trial given 2 CPUs runs 2 threads; 1 CPU, or a fraction of one, runs 1
    assert ray.get(threads.options(num_cpus=2).remote(cfg, small_data)) == (2, 2)
    assert ray.get(threads.options(num_cpus=1).remote(cfg, small_data)) == (1, 1)
    assert ray.get(threads.options(num_cpus=0.5).remote(cfg, small_data)) == (1, 1)


def test_checkpoints_every_k_epochs_on_improvement_and_at_the_end(small_data, tmp_path, ray_local):
    """Through real Tune: which epochs carry a checkpoint, and the last one holds the best weights."""
    from ray import tune
    from ray.tune import CheckpointConfig, RunConfig

    from trainables.loop import BEST_FILE, load_best
    from trainables.trainable import train_fusion

    # seed 3: epochs 1, 2, 3 and 5 improve, 4 does not (a seeded trajectory: a change of the
    # random draws, e.g. the dropout mask's, may need another seed; the asserts below say so)
    flat = tfn_config(max_epochs=7, checkpoint_every=3, lr=0.05, seed=3).to_flat()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_fusion, data=small_data), {"cpu": 1}),
        param_space=flat,
        run_config=RunConfig(storage_path=str(tmp_path), name="ckpt", verbose=0,
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    (result,) = tuner.fit()
    assert result.error is None
    history = result.metrics_dataframe.sort_values("epoch")
    improved = {int(e) for e, best in zip(history["epoch"], history["best_epoch"]) if e == best}
    with_checkpoint = sorted(int(m["epoch"]) for _, m in result.best_checkpoints)
    assert with_checkpoint == sorted(improved | {3, 6, 7})
    # the rule is exercised, not vacuous: some epoch neither improved nor fell on k or the end
    assert len(with_checkpoint) < 7, f"every epoch improved ({improved}): nothing was skipped"
    with result.checkpoint.as_directory() as directory:  # the last: the best epoch's weights
        assert load_best(f"{directory}/{BEST_FILE}")["epoch"] == int(history["best_epoch"].iloc[-1])


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_fast_dropout_bytes_mask_has_the_rounded_distribution(p):
    x = torch.rand(400, 2500) + 0.5
    n = x.numel()
    p_rounded = round(p * 65536) / 65536
    tol = 5 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(0)
    y = FastDropout(p, mask="bytes").train()(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - p_rounded) < tol
    # kept elements scaled by 1 / (1 - p_rounded): the expectation of the output is x exactly
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p_rounded))
    keep = (~dropped).float()
    corr = torch.corrcoef(torch.stack([keep[:, :-1].flatten(), keep[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01
    # seeded: the same draws again; a different draw than the uniform mask
    torch.manual_seed(0)
    torch.testing.assert_close(FastDropout(p, mask="bytes").train()(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mask"):
        FastDropout(p, mask="bogus")


def test_fast_dropout_bits_represent_p_exactly_or_to_2_to_the_minus_32():
    """``mask="bits"``: the fewest bits (1, 2, 4, 8, 16) that hold p exactly, else 32 bits, p to
    within 2^-33; the drop rate of an 8-bit mask is exactly p: every byte value appears, so over
    all 256 values of one byte exactly p · 256 of them are dropped."""
    assert FastDropout.bit_width(0.5) == (1, 1)
    assert FastDropout.bit_width(0.25) == (2, 1)
    assert FastDropout.bit_width(0.75) == (2, 3)
    assert FastDropout.bit_width(0.125) == (4, 2)
    assert FastDropout.bit_width(0.25 + 2**-8) == (8, 2**6 + 1)
    assert FastDropout.bit_width(0.25 + 2**-16) == (16, 2**14 + 1)
    w, t = FastDropout.bit_width(0.3)
    assert w == 32 and abs(t / 2**32 - 0.3) <= 2**-33
    # the threshold compare on every 8-bit value: P(drop) = 128 / 256 = 0.5 exactly
    u = torch.arange(-128, 128, dtype=torch.int8)
    assert int((u < 128 - 2**7).sum()) == 128


@pytest.mark.parametrize("p", [0.5, 0.25, 0.75, 0.125])
def test_fast_dropout_packed_bits_are_the_fields_of_the_random_bytes(p):
    """Below 8 bits per element (``mask="bits"``, p a multiple of 1/16), the table gather is the
    plain computation: element i drops when field i mod (8 / w) of random byte i div (8 / w),
    lowest bits first, is below t; drawn from the int64 words ``random_`` fills. The same flags
    drive ``forward``, ``masked`` in place (the AND of float32's bits) and ``masked`` with a graph."""
    w, t = FastDropout.bit_width(p)
    assert w < 8
    x = torch.rand(7, 333) + 0.5  # 2331 elements: not a multiple of a byte's or a word's fields
    n = x.numel()
    layer = FastDropout(p, inplace=True).train()
    torch.manual_seed(4)
    drop, scale = layer._drop(x)
    torch.manual_seed(4)
    words = torch.empty(-(-n * w // 64), dtype=torch.int64).random_(-2**63, None)
    after_plain = torch.get_rng_state()
    torch.manual_seed(4)
    layer._drop(x)
    assert torch.equal(torch.get_rng_state(), after_plain)  # the layer draws exactly those words
    data = words.view(torch.uint8).tolist()
    per_byte = 8 // w
    plain = [((data[i // per_byte] >> ((i % per_byte) * w)) & (2**w - 1)) < t for i in range(n)]
    assert drop.flatten().tolist() == plain
    assert scale == 2**w / (2**w - t)
    reference = x.masked_fill(drop, 0.0)
    with torch.no_grad():
        torch.manual_seed(4)
        y, y_scale = layer.masked(x.clone())
        torch.manual_seed(4)
        forward = layer(x.clone())
    assert y_scale == scale and torch.equal(y, reference)
    assert torch.equal(forward, reference * scale)
    torch.manual_seed(4)
    y, _ = layer.masked(x.clone().requires_grad_(True))
    assert torch.equal(y.detach(), reference)


@pytest.mark.parametrize("mask", ["bits", "uniform", "bytes"])
def test_fast_dropout_in_place_only_without_a_graph(mask):
    x = torch.randn(8, 1000)
    torch.manual_seed(5)
    reference = FastDropout(0.5, mask=mask).train()(x)
    drop = FastDropout(0.5, inplace=True, mask=mask).train()
    with torch.no_grad():
        x_copy = x.clone()
        torch.manual_seed(5)
        y = drop(x_copy)
    assert y is x_copy  # in place: no second tensor
    torch.testing.assert_close(y, reference, rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    y = drop(leaf)
    assert y is not leaf and torch.equal(leaf.detach(), x)  # with a graph: out of place
    torch.testing.assert_close(y.detach(), reference, rtol=0, atol=0)


def test_tfn_no_grad_train_mode_pass_matches_the_grad_pass(small_data):
    """MDM's critic batches (no gradients, train mode) see exactly what a pass with gradients
    would have computed from the same draws: the in-place mask changes no value."""
    from trainables.data.batches import iterate_batches

    trainer = Trainer(tfn_config(), small_data, device="cpu", num_threads=1)
    trainer.model.train()
    batch = next(iter(iterate_batches(trainer.splits["train"], 16, shuffle=False)))
    torch.manual_seed(11)
    with_grad = trainer.model(batch)
    torch.manual_seed(11)
    with torch.no_grad():
        without = trainer.model(batch)
    torch.testing.assert_close(without.prediction, with_grad.prediction.detach(), rtol=0, atol=0)
    torch.testing.assert_close(without.features["fused"], with_grad.features["fused"].detach(),
                               rtol=0, atol=0)


def test_tfn_dropout_mask_is_a_checked_config_key():
    from trainables.config import ConfigError

    assert tfn_config().backbone_cfg.dropout_mask == "bits"  # nn.Dropout's distribution, cheapest
    assert tfn_config(**{"backbone.dropout_mask": "uniform"}).backbone_cfg.dropout_mask == "uniform"
    with pytest.raises(ConfigError, match="dropout_mask"):
        tfn_config(**{"backbone.dropout_mask": "bogus"})


_KEEP_CHECK = """
import resource, sys
from pathlib import Path
import torch
from trainables.loop import keep_freed_memory

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

def given_back():  # what free of a touched 64 MB tensor gives back to the OS
    x = torch.ones(16 * 1024 * 1024)
    before = rss()
    del x
    return before - rss()

assert keep_freed_memory(sys.argv[1] == "keep")
given_back()  # where the first block lives now (the heap when kept)
print(given_back())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_a_large_block_for_reuse(mode):
    """glibc returns a block over its mmap threshold to the OS on free (its pages fault in again
    at the next step); with keep_freed_memory the freed 64 MB stay resident and are reused. Each
    case in a fresh process: this one's heap already holds what earlier tests freed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KEEP_CHECK, mode], capture_output=True,
                         text=True, check=True, timeout=120)
    given_back = int(out.stdout.split()[-1])
    if mode == "keep":
        assert given_back < 8 * 1024 * 1024
    else:
        assert given_back > 48 * 1024 * 1024


def test_the_trainer_keeps_freed_memory_unless_told_not_to(monkeypatch, small_data):
    from trainables import loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda keep=True: calls.append(keep) or True)
    for keep in (True, False):
        cfg = TrialConfig.from_flat({"backbone": "ef_lstm", "max_epochs": 1,
                                     "cpu_keep_freed_memory": keep})
        loop.Trainer(cfg, small_data, device="cpu")
    assert calls == [True, False]


@pytest.mark.parametrize("mask", ["bits", "uniform", "bytes"])
def test_fast_dropout_masked_multiplies_by_the_keep_mask(mask):
    """``masked`` zeroes by multiplying with the keep mask as bytes (cheaper than a bool
    ``masked_fill``): from the same draws, the values of ``masked_fill(drop, 0)`` (-0.0 where a
    negative element is dropped, equal to 0.0), in place without a graph and out of place with
    one, and the same gradient."""
    drop_layer = FastDropout(0.3, inplace=True, mask=mask).train()
    x = torch.randn(8, 1000)
    torch.manual_seed(3)
    drop, scale = drop_layer._drop(x)
    reference = x.masked_fill(drop, 0.0)
    assert 0 < int(drop.sum()) < drop.numel()
    with torch.no_grad():
        x_copy = x.clone()
        torch.manual_seed(3)
        y, y_scale = drop_layer.masked(x_copy)
    assert y is x_copy and y_scale == scale
    torch.testing.assert_close(y, reference, rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    y, _ = drop_layer.masked(leaf)
    assert y is not leaf
    torch.testing.assert_close(y.detach(), reference, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(leaf.grad, (~drop).float(), rtol=0, atol=0)


def test_tfn_mdm_trajectory_with_the_keep_mask_multiply_is_the_masked_fill_one(small_data, monkeypatch):
    """Seeded TFN + MDM training steps (the mask with gradients in the model step, in place in
    the critic blocks) with ``masked`` multiplying by the keep mask are bit for bit those with
    the earlier ``masked_fill(drop, 0)``."""
    def masked_fill_version(self, x):
        if not self.training or self.p == 0.0:
            return x, 1.0
        in_place = self.inplace and not (torch.is_grad_enabled() and x.requires_grad)
        drop, scale = self._drop(x)
        return (x.masked_fill_(drop, 0.0) if in_place else x.masked_fill(drop, 0.0)), scale

    trainer = Trainer(tfn_config(regulariser="mdm", **{"regulariser.unroll": 2}), small_data,
                      device="cpu", num_threads=1)
    train = trainer.splits["train"]
    trainer.splits["train"] = type(train)(**{  # two batches
        k: (None if v is None else v[:32]) for k, v in vars(train).items()})
    start = copy.deepcopy(trainer.state_dict())
    results = []
    for version in ("multiply", "masked_fill"):
        if version == "masked_fill":
            monkeypatch.setattr(FastDropout, "masked", masked_fill_version)
        trainer.load_state_dict(copy.deepcopy(start), None)
        stats = trainer.train_epoch()
        results.append((stats, {k: v.clone() for k, v in trainer.state_dict()["weights"]["model"].items()}))
    (stats_a, weights_a), (stats_b, weights_b) = results
    assert stats_a == stats_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], v) for k, v in start["weights"]["model"].items())
