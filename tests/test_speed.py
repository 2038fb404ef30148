"""The exact speed-ups compute what the plain computation does (issue 26).

- MDM's critic batches: the loop encodes them block by block (B_1, B̄_1, B_2, ...) on every device,
  so BatchNorm normalises each block with its own statistics, as the sequential Algorithm 1; a
  backbone with an encode/fuse split encodes each block's modalities once and fuses twice, with
  the same Z, Z̄ and BatchNorm running statistics; TFN and LMF share only the stem, and B̄ draws
  its own dropout masks.
- MDM's model step: B̄ from B's stem with gradients is the two-pass step (losses, gradients,
  weights, BatchNorm statistics), dropout on, on TFN, LMF and MMIM.
- The encode/fuse and stem contracts of every backbone that declares them.
- MMIM's stage 1 in inference mode: the same q updates as with ``torch.no_grad``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_backbones import TINY_BACKBONE, make_batch, make_dims
from trainables.backbones import get_backbone
from trainables.backbones.base import Backbone
from trainables.config import TrialConfig, build_dataclass
from trainables.data.batches import modality_permutations, shuffle_modalities, split_batch
from trainables.loop import Trainer

#: TFN at toy widths with its BatchNorm subnets and every dropout off (values comparable exactly)
TINY_TFN = {"backbone": "tfn", "regulariser": "mdm", "max_epochs": 1, "batch_size": 16, "seed": 0,
            "patience": 0, "regulariser.unroll": 3,
            **{f"backbone.{k}": v for k, v in TINY_BACKBONE["tfn"].items()},
            **{f"backbone.{m}_dropout": 0.0 for m in ("audio", "vision", "text", "post_fusion")}}


def _running_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def test_critic_pairs_are_the_sequential_algorithm_with_batchnorm(small_data):
    """The critic blocks, as the CPU path (which every device now takes) encodes them, equal the
    sequential Algorithm 1: per step, B_k then B̄_k through the backbone in training mode,
    BatchNorm on each block's own 16 rows (not on the 96 rows of all blocks at once), and its
    running statistics updated in that order. Both the encode/fuse path (TFN's) and the plain
    path give the same Z, Z̄ and running statistics."""
    trainer = Trainer(TrialConfig.from_flat(TINY_TFN), small_data, device="cpu", num_threads=1)
    assert trainer.separable
    model = trainer.model.train()
    fresh = trainer.encoder.sample(3)
    perms = modality_permutations(len(fresh), block_size=16)
    start = copy.deepcopy(model.state_dict())

    results = {}
    for separable in (True, False):
        model.load_state_dict(start)
        trainer.separable = separable
        out, out_bar = trainer.encoder.pairs_no_grad(fresh, perms)
        results[separable] = (out.features["fused"], out_bar.features["fused"], _running_stats(model))
        assert not out.features["fused"].requires_grad and not out.features["fused"].is_inference()

    model.load_state_dict(start)
    z, z_bar = [], []
    with torch.no_grad():
        for k, block in enumerate(split_batch(fresh, 16)):
            z.append(model(block).features["fused"])
            block_perms = {m: p[16 * k:16 * (k + 1)] - 16 * k for m, p in perms.items()}
            z_bar.append(model(shuffle_modalities(block, perms=block_perms)).features["fused"])
    sequential = (torch.cat(z), torch.cat(z_bar), _running_stats(model))
    with torch.no_grad():
        model.load_state_dict(start)
        one_pass = model(fresh).features["fused"]  # BatchNorm over all 48 rows at once
    assert not torch.allclose(one_pass, sequential[0], atol=1e-4)  # the test can tell them apart

    for separable, (z_p, z_q, stats) in results.items():
        torch.testing.assert_close(z_p, sequential[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_q, sequential[1], rtol=1e-5, atol=1e-5)
        assert stats.keys() == sequential[2].keys()
        for key, value in stats.items():
            torch.testing.assert_close(value, sequential[2][key], rtol=1e-5, atol=1e-6, msg=key)

    # the no-grad encoding of a large batch (MDM with input="unimodal") also runs block by block
    model.load_state_dict(start)
    chunked = trainer.encoder.forward_no_grad(fresh).features["fused"]
    torch.testing.assert_close(chunked, sequential[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tfn", "lmf", "mmim"])
def test_encode_fuse_split_is_the_forward_pass(name):
    """``fuse(encode(B)) == forward(B)``, and the encoding of B with its modalities permuted is
    B's encoding with its rows permuted (training mode: BatchNorm on batch statistics), which is
    what the loop's B̄ shortcut relies on."""
    cls = get_backbone(name)
    assert cls.modality_separable
    dims = make_dims()
    torch.manual_seed(0)
    model = cls(build_dataclass(cls.config_class, TINY_BACKBONE[name]), dims)
    for module in model.modules():  # values comparable exactly: no dropout draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    batch = make_batch(dims, b=8, seed=1)
    with torch.no_grad():
        full = model(batch)
        unimodal = model.encode(batch)
        fused = model.fuse(unimodal)
        perms = modality_permutations(len(batch))
        shuffled = model.encode(shuffle_modalities(batch, perms=perms))
    torch.testing.assert_close(fused.prediction, full.prediction)
    for key in full.features:
        torch.testing.assert_close(fused.features[key], full.features[key])
    for m, u in unimodal.items():
        torch.testing.assert_close(shuffled[m], u[perms[m]], rtol=1e-5, atol=1e-6)

    # the stem split (Backbone.has_stem), with dropout on: the stem draws nothing, is row-wise,
    # and encode_stem draws encode's masks in encode's order
    assert cls.has_stem
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    with torch.no_grad():
        before = torch.get_rng_state()
        stem = model.stem(batch)
        assert torch.equal(torch.get_rng_state(), before)
        stem_shuffled = model.stem(shuffle_modalities(batch, perms=perms))
        torch.manual_seed(5)
        plain = model.encode(batch)
        torch.manual_seed(5)
        split = model.encode_stem(stem)
    for m, value in stem.items():
        torch.testing.assert_close(stem_shuffled[m], value[perms[m]], rtol=1e-5, atol=1e-6)
    for m, value in plain.items():
        torch.testing.assert_close(split[m], value, rtol=1e-6, atol=1e-7)


def test_separable_flag_is_declared_only_where_the_split_exists():
    """The flag a backbone declares matches what it implements (a backbone without the split
    keeps the base class's refusal)."""
    for name in ("ef_lstm", "mfn", "mag_bert"):
        cls = get_backbone(name)
        assert not cls.modality_separable and not cls.has_stem
        assert cls.encode is Backbone.encode


def test_mmim_stage_one_in_inference_mode_is_the_no_grad_pass(small_data, monkeypatch):
    """MMIM's stage 1 (the loop's estimator pass) in inference mode makes bit for bit the q
    updates, and leaves the model and the random state, as the same pass under torch.no_grad."""
    from trainables import loop

    flat = {"backbone": "mmim", "regulariser": "mmim", "backbone.text_model": "tiny-bert",
            "backbone.d_prjh": 16, "regulariser.hidden": 8, "max_epochs": 1, "batch_size": 32,
            "seed": 3, "patience": 0}
    trainer = Trainer(TrialConfig.from_flat(flat), small_data, device="cpu", num_threads=1)
    train = trainer.splits["train"]
    trainer.splits["train"] = type(train)(**{  # two batches are enough
        k: (None if v is None else v[:64]) for k, v in vars(train).items()})
    start = copy.deepcopy(trainer.state_dict())  # weights, optimisers, generators, RNG
    results = []
    for mode in ("inference", "no_grad"):
        if mode == "no_grad":
            monkeypatch.setattr(loop.torch, "inference_mode", torch.no_grad)
        trainer.load_state_dict(copy.deepcopy(start), None)
        trainer.model.train()
        trainer.reg.train()
        stats = trainer._estimator_pass()
        results.append((stats, copy.deepcopy(trainer.reg.state_dict()), torch.rand(3)))
    (stats_a, q_a, rng_a), (stats_b, q_b, rng_b) = results
    assert stats_a == stats_b and torch.equal(rng_a, rng_b)
    for key in q_a:
        torch.testing.assert_close(q_a[key], q_b[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(q_a[k], v) for k, v in start["weights"]["regulariser"].items()), \
        "stage 1 changed nothing: the test would not see a difference"


@pytest.mark.parametrize("name", ["tfn", "lmf", "mmim"])
def test_model_step_from_the_stem_is_the_two_pass_step(small_data, name):
    """MDM's model step with B̄ built from B's stem (the loop's shortcut) against the plain two
    passes (``forward(B)``, then ``forward(shuffle_modalities(B))`` after the critic unroll), from
    the same state and seed, dropout on (every backbone default): two training steps give the
    same losses, penalties, last-step gradients of every parameter, weights, AdamW state and
    BatchNorm running statistics within float rounding. The shortcut draws B̄'s dropout masks
    afresh, in the plain pass's order, so the draws agree; reusing B's masks permuted, a wrong
    permutation, a missing gradient through B̄ or a missing running-statistics update all
    fail here. It also checks that the shortcut ran (no full pass on B̄)."""
    flat = {"backbone": name, "regulariser": "mdm", "max_epochs": 1, "batch_size": 16, "seed": 0,
            "patience": 0, "regulariser.unroll": 1,
            **{f"backbone.{k}": v for k, v in TINY_BACKBONE[name].items()}}
    if name == "lmf":  # a fused Z wide enough for T to read (at 3 its widths fall to 1)
        flat["backbone.output_dim"] = 16
    trainer = Trainer(TrialConfig.from_flat(flat), small_data, device="cpu", num_threads=1)
    assert trainer.stemmed and trainer.reg.encodes_shuffled_batch
    train = trainer.splits["train"]
    trainer.splits["train"] = type(train)(**{  # two batches
        k: (None if v is None else v[:32]) for k, v in vars(train).items()})
    start = copy.deepcopy(trainer.state_dict())
    passes = []  # the loop's own full passes on B̄ (the plain path's)
    encode = trainer._encode
    trainer._encode = lambda batch: passes.append(len(batch)) or encode(batch)

    results = {}
    for stemmed in (True, False):
        trainer.load_state_dict(copy.deepcopy(start), None)
        trainer.stemmed = stemmed
        passes.clear()
        stats = trainer.train_epoch()
        results[stemmed] = (stats, {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                    if p.grad is not None},
                            copy.deepcopy(trainer.state_dict()), torch.rand(2))
        assert len(passes) == (0 if stemmed else 2)
    (stats_s, grads_s, state_s, rng_s), (stats_p, grads_p, state_p, rng_p) = results[True], results[False]
    assert torch.equal(rng_s, rng_p)  # the same random draws, in the same order
    assert stats_s.keys() == stats_p.keys()
    for key, value in stats_s.items():
        assert value == pytest.approx(stats_p[key], rel=1e-4, abs=1e-6), key
    assert stats_p["train_penalty"] != 0.0
    assert grads_s.keys() == grads_p.keys() and grads_p
    for key, value in grads_s.items():
        torch.testing.assert_close(value, grads_p[key], rtol=1e-5, atol=1e-9, msg=key)
    weights_s, weights_p = state_s["weights"]["model"], state_p["weights"]["model"]
    for key, value in weights_p.items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(weights_s[key], value, rtol=1e-4, atol=1e-6, msg=key)
    moments_s, moments_p = state_s["optimizer"]["state"], state_p["optimizer"]["state"]
    for key, value in moments_p.items():
        for part in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments_s[key][part], value[part], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["tfn", "lmf"])
def test_critic_pairs_from_the_stem_draw_their_own_masks(small_data, name):
    """With dropout on, the critic pairs of a backbone with ``critic_pairs_from_stem`` are, for
    the same seed, B and B̄ each encoded by a full pass of their own (B's masks, then B̄'s) and
    fused together: Z̄ does not reuse B's unimodal dropout masks, so (Z, Z̄) has the sequential
    algorithm's joint distribution. Sharing B's unimodal encodings instead fails here."""
    flat = {"backbone": name, "regulariser": "mdm", "max_epochs": 1, "batch_size": 16, "seed": 0,
            "patience": 0, "regulariser.unroll": 2,
            **{f"backbone.{k}": v for k, v in TINY_BACKBONE[name].items()}}
    trainer = Trainer(TrialConfig.from_flat(flat), small_data, device="cpu", num_threads=1)
    assert trainer.separable and trainer.model.critic_pairs_from_stem
    model = trainer.model.train()
    fresh = trainer.encoder.sample(2)
    perms = modality_permutations(len(fresh), block_size=16)
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    out, out_bar = trainer.encoder.pairs_no_grad(fresh, perms)
    stats = _running_stats(model)

    model.load_state_dict(start)
    torch.manual_seed(7)
    z, z_bar = [], []
    with torch.no_grad():
        for k, block in enumerate(split_batch(fresh, 16)):
            block_perms = {m: p[16 * k:16 * (k + 1)] - 16 * k for m, p in perms.items()}
            unimodal = model.encode(block)
            unimodal_bar = model.encode(shuffle_modalities(block, perms=block_perms))
            both = model.fuse({m: torch.cat([u, unimodal_bar[m]]) for m, u in unimodal.items()})
            z.append(both.features["fused"][:16])
            z_bar.append(both.features["fused"][16:])
    torch.testing.assert_close(out.features["fused"], torch.cat(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_bar.features["fused"], torch.cat(z_bar), rtol=1e-5, atol=1e-5)
    for key, value in _running_stats(model).items():
        torch.testing.assert_close(stats[key], value, rtol=1e-5, atol=1e-6, msg=key)
