"""Contract tests for every backbone × regulariser pair in the registries.

One test body per property, parametrised over ``known_backbones()`` × ``known_regularisers()``:
a new model is covered by adding its registry name (and, if its defaults are slow, a tiny
config below). Batches are built here from random tensors (unaligned, ragged lengths) so the
tests do not depend on the data layer.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from trainables.backbones import get_backbone, known_backbones
from trainables.backbones.base import MODALITIES, InputMismatchError
from trainables.config import ConfigError, build_dataclass
from trainables.data.batches import Batch, ModalityDims, concat_batches
from trainables.regularisers import get_regulariser, known_regularisers
from trainables.regularisers.base import Encoder, float_detached

#: small hyper-parameters so the contract tests stay fast; names not listed use their defaults
TINY_BACKBONE: dict[str, dict] = {
    "ef_lstm": {"hidden": 16, "num_layers": 2, "proj_dim": 8},
    "mird": {"text_model": "tiny-bert", "z_dim": 8, "recon_steps": 4},
    "tfn": {"text_hidden": 16, "text_out": 6, "audio_hidden": 5, "vision_hidden": 7, "post_fusion_dim": 12},
    "mmim": {"text_model": "tiny-bert", "d_prjh": 16},
    "lmf": {"text_hidden": 16, "text_out": 6, "audio_hidden": 5, "vision_hidden": 7, "rank": 2, "output_dim": 3},
    "mfn": {"text_hidden": 12, "audio_hidden": 5, "vision_hidden": 7, "mem_dim": 10, "attention_hidden": 8,
            "proposal_hidden": 8, "gamma1_hidden": 8, "gamma2_hidden": 6, "out_hidden": 8},
    "mag_bert": {"text_model": "tiny-bert"},
    "mag_xlnet": {"text_model": "tiny-xlnet"},
}
TINY_REGULARISER: dict[str, dict] = {
    "mdm": {"unroll": 2},
    "mird": {"inner_steps": 2, "hidden": 8},
    "mmim": {"hidden": 8, "inner_steps": 2},
    "synergy": {"hidden": 8, "proj_dim": 4, "coupling_layers": 2, "kurtosis_dim": 4},
}

PAIRS = list(itertools.product(known_backbones(), known_regularisers()))
UNALIGNED = dict(text=16, audio=5, vision=7, text_len=12, audio_len=20, vision_len=15)
ALIGNED = dict(text=16, audio=5, vision=7, text_len=12, audio_len=12, vision_len=12)


def make_dims(text=16, audio=5, vision=7, text_len=12, audio_len=20, vision_len=15) -> ModalityDims:
    return ModalityDims(
        text=text, audio=audio, vision=vision, text_len=text_len, audio_len=audio_len,
        vision_len=vision_len, aligned=text_len == audio_len == vision_len, has_tokens=True,
    )


def make_batch(dims: ModalityDims, b: int = 8, seed: int = 0) -> Batch:
    """Random features with ragged lengths: the first row is full, the second has one step."""
    g = torch.Generator().manual_seed(seed)

    def lengths(max_len: int) -> torch.Tensor:
        n = torch.randint(1, max_len + 1, (b,), generator=g)
        n[0] = max_len
        if b > 1:
            n[1] = 1
        return n

    text_lengths = lengths(dims.text_len)
    if dims.aligned:
        # word-aligned data shares the text's steps; audio/vision may still end earlier
        audio_lengths = torch.minimum(text_lengths, lengths(dims.audio_len))
        vision_lengths = text_lengths.clone()
    else:
        audio_lengths, vision_lengths = lengths(dims.audio_len), lengths(dims.vision_len)
    steps = torch.arange(dims.text_len)
    ids = torch.randint(1, 100, (b, dims.text_len), generator=g)
    mask = (steps[None, :] < text_lengths[:, None]).long()
    text_bert = torch.stack([ids * mask, mask, torch.zeros_like(mask)], dim=1)  # (B, 3, L)
    return Batch(
        text=torch.randn(b, dims.text_len, dims.text, generator=g),
        text_bert=text_bert,
        audio=torch.randn(b, dims.audio_len, dims.audio, generator=g),
        vision=torch.randn(b, dims.vision_len, dims.vision, generator=g),
        text_lengths=text_lengths,
        audio_lengths=audio_lengths,
        vision_lengths=vision_lengths,
        labels=torch.empty(b).uniform_(-3, 3, generator=g),
        index=torch.arange(b),
    )


def build(backbone: str, regulariser: str = "none", dims: ModalityDims | None = None, seed: int = 0,
          tiny: bool = True):
    dims = dims or make_dims(**UNALIGNED)
    torch.manual_seed(seed)
    bcls = get_backbone(backbone)
    try:
        bcls.check_inputs(dims)
    except InputMismatchError as exc:
        pytest.skip(str(exc))
    bcfg = build_dataclass(bcls.config_class, TINY_BACKBONE.get(backbone, {}) if tiny else {})
    model = bcls(bcfg, dims)
    rcls = get_regulariser(regulariser)
    reg = rcls(build_dataclass(rcls.config_class, TINY_REGULARISER.get(regulariser, {})), model.feature_dims)
    reg.build_optimizer(getattr(reg.config, "estimator_lr", 1e-3))
    return model, reg


def main_optimizer(model, reg) -> torch.optim.Optimizer:
    groups = model.param_groups(lr=1e-2, text_lr=1e-3, weight_decay=0.0)
    extra = reg.main_parameters()
    if extra:
        groups.append({"params": extra, "lr": 1e-2, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def make_encoder(model, batch: Batch, seed: int = 100) -> Encoder:
    """The loop's :class:`Encoder` in miniature: ``sample(k)`` gives k fresh random batches of
    ``len(batch)`` rows (other seeds than ``batch``)."""
    counter = itertools.count(seed)

    def sample(k: int) -> Batch:
        return concat_batches([make_batch(model.dims, b=len(batch), seed=next(counter)) for _ in range(k)])

    def no_grad(b: Batch):
        with torch.no_grad():
            return float_detached(model(b))

    return Encoder(forward=model, forward_no_grad=no_grad, sample=sample, batch_size=len(batch))


def train_step(model, reg, batch, opt) -> torch.Tensor:
    """The loop's per-batch call order (see ``Regulariser``), in miniature."""
    model.train()
    reg.train()
    out = model(batch)
    enc = make_encoder(model, batch)
    reg.estimator_update(out, batch, enc)
    loss = reg.combine(F.l1_loss(out.prediction, batch.labels), reg.step_penalty(out, batch, enc))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def predict(model, batch) -> torch.Tensor:
    model.eval()
    return model(batch).prediction


@pytest.mark.parametrize("backbone", known_backbones())
def test_default_config_forward_contract(backbone):
    from trainables.text import TextModelError

    try:
        model, _ = build(backbone, tiny=False)
    except TextModelError as exc:  # a default that is a hub download (mag_xlnet: xlnet-base-cased)
        pytest.skip(str(exc))
    batch = make_batch(model.dims)
    out = model(batch)
    assert out.prediction.shape == (8,)
    assert set(MODALITIES) | {"fused"} <= set(out.features)
    assert set(out.features) == set(model.feature_dims)
    for name, value in out.features.items():
        assert value.shape == (8, model.feature_dims[name]), name


@pytest.mark.parametrize("backbone,regulariser", PAIRS)
def test_forward_shapes_and_penalty(backbone, regulariser):
    model, reg = build(backbone, regulariser)
    batch = make_batch(model.dims)
    out = model(batch)
    assert out.prediction.shape == (8,) and out.prediction.dtype == torch.float32
    assert set(out.features) == set(model.feature_dims)
    for name, value in out.features.items():
        assert value.shape == (8, model.feature_dims[name]), name
        assert torch.isfinite(value).all(), name
    pen = reg.step_penalty(out, batch, make_encoder(model, batch))
    assert pen.shape == () and torch.isfinite(pen)


@pytest.mark.parametrize("backbone,regulariser", PAIRS)
def test_training_step_updates_backbone_only_through_the_main_loss(backbone, regulariser):
    model, reg = build(backbone, regulariser)
    batch = make_batch(model.dims)
    opt = main_optimizer(model, reg)
    before = copy.deepcopy(model.state_dict())

    model.train()
    reg.train()
    out = model(batch)
    enc = make_encoder(model, batch)
    logged = reg.estimator_update(out, batch, enc)
    assert all(isinstance(v, float) for v in logged.values())
    assert all(p.grad is None for p in model.parameters()), "estimator steps reached the backbone"
    est_grads = {id(p): None if p.grad is None else p.grad.clone() for p in reg.estimator_parameters()}

    loss = reg.combine(F.l1_loss(out.prediction, batch.labels), reg.step_penalty(out, batch, enc))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    # the model loss sends nothing into the estimator networks
    for p in reg.estimator_parameters():
        old = est_grads[id(p)]
        assert (p.grad is None) if old is None else torch.equal(p.grad, old)
    opt.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "one AdamW step changed no backbone parameter"


#: each regulariser's weight fields; the penalty is a weight times a term plus terms free of it
PENALTY_WEIGHTS: dict[str, tuple[str, ...]] = {
    "none": (), "mdm": ("weight",), "mird": ("alpha",), "mmim": ("alpha", "beta"),
    "orthogonal": ("weight",), "synergy": ("beta",),
}


def backbone_gradients(model, reg, batch, **weights) -> dict[str, torch.Tensor]:
    """d/dθ (backbone) of the task loss, the penalty and the loop's combined loss, in one model
    step after an estimator update, with ``weights`` set on the regulariser's config. Each call
    works on copies and reseeds torch, so every call draws the same dropout and permutations."""
    model, reg = copy.deepcopy((model, reg))
    if weights:
        reg.config = dataclasses.replace(reg.config, **weights)
    model.train()
    reg.train()
    torch.manual_seed(7)
    out = model(batch)
    enc = make_encoder(model, batch)
    reg.estimator_update(out, batch, enc)
    task = F.l1_loss(out.prediction, batch.labels)
    pen = reg.step_penalty(out, batch, enc)
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(loss: torch.Tensor) -> torch.Tensor:
        if not loss.requires_grad:  # a constant (no penalty): no gradient anywhere
            return torch.cat([torch.zeros_like(p).flatten() for p in params])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                          for p, g in zip(params, grads)])

    return {"task": flat_grad(task), "penalty": flat_grad(pen),
            "combined": flat_grad(reg.combine(task, pen)),
            "task_combined": flat_grad(reg.combine(task, torch.zeros_like(pen)))}


@pytest.mark.parametrize("backbone,regulariser", PAIRS)
def test_the_penalty_changes_the_backbone_gradients_in_proportion_to_its_weight(backbone,
                                                                                 regulariser):
    """The regulariser is not a no-op: its penalty moves the backbone's gradients away from the
    task loss's alone, and the weighted term's contribution doubles when its weight doubles."""
    model, reg = build(backbone, regulariser)
    batch = make_batch(model.dims)
    base = backbone_gradients(model, reg, batch)
    assert torch.isfinite(base["combined"]).all()
    assert base["task"].abs().sum() > 0
    if regulariser == "none":  # no penalty: the loss and its gradients are the task loss's
        assert not base["penalty"].any()
        torch.testing.assert_close(base["combined"], base["task"], rtol=0, atol=0)
        return
    assert base["penalty"].abs().sum() > 0, "the penalty sends no gradient into the backbone"
    # the loop's loss is (a function of) the task loss plus the penalty: the gradients differ
    # from the task loss's alone by exactly the penalty's
    assert not torch.equal(base["combined"], base["task_combined"]), \
        "the penalty does not change the backbone's gradients"
    torch.testing.assert_close(base["combined"] - base["task_combined"], base["penalty"],
                               rtol=1e-3, atol=1e-5 * float(base["combined"].abs().max()))
    assert PENALTY_WEIGHTS[regulariser], f"{regulariser}: name its weight in PENALTY_WEIGHTS"
    for name in PENALTY_WEIGHTS[regulariser]:
        zero, w, two_w = (backbone_gradients(model, reg, batch, **{name: v})["penalty"]
                          for v in (0.0, 0.5, 1.0))
        once, twice = w - zero, two_w - zero
        assert once.abs().max() > 0, f"{regulariser}.{name} does not reach the backbone"
        scale = float(twice.abs().max())
        torch.testing.assert_close(twice, 2 * once, rtol=1e-3, atol=1e-4 * scale,
                                   msg=f"{regulariser}.{name}: twice the weight is not twice the"
                                       " contribution")


@pytest.mark.parametrize("backbone,regulariser", PAIRS)
def test_deterministic_on_cpu(backbone, regulariser):
    results = []
    for _ in range(2):
        model, reg = build(backbone, regulariser, seed=123)
        batch = make_batch(model.dims)
        first = predict(model, batch)
        torch.manual_seed(7)  # the trial seed also drives dropout and the regulariser's sampling
        loss = train_step(model, reg, batch, main_optimizer(model, reg))
        results.append((first, loss, predict(model, batch)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", known_backbones())
def test_state_dict_round_trip(backbone):
    model, reg = build(backbone, "none", seed=1)
    batch = make_batch(model.dims)
    train_step(model, reg, batch, main_optimizer(model, reg))  # moves batch-norm statistics too
    clone, _ = build(backbone, "none", seed=2)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(predict(clone, batch), predict(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", known_backbones())
@pytest.mark.parametrize("layout", ["unaligned", "aligned"])
def test_padding_does_not_change_outputs(backbone, layout):
    dims = make_dims(**(UNALIGNED if layout == "unaligned" else ALIGNED))
    model, reg = build(backbone, "none", dims=dims)
    batch = make_batch(dims)
    train_step(model, reg, batch, main_optimizer(model, reg))  # non-trivial batch-norm statistics
    model.eval()
    with torch.no_grad():
        ref = model(batch)
        noisy = copy.copy(batch)
        for name in MODALITIES:
            x = getattr(batch, name).clone()
            lengths = getattr(batch, f"{name}_lengths")
            pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]  # (B, L)
            x[pad] = 1e3 * torch.randn(int(pad.sum()), x.shape[2])
            setattr(noisy, name, x)
        out = model(noisy)
    torch.testing.assert_close(out.prediction, ref.prediction, rtol=1e-5, atol=1e-6)
    for name in ref.features:
        torch.testing.assert_close(out.features[name], ref.features[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", known_backbones())
@pytest.mark.parametrize(
    "widths", [(300, 74, 35), (768, 5, 20)], ids=["glove-mosei", "bert-mosi"]
)
def test_widths_are_read_from_dims(backbone, widths):
    text, audio, vision = widths
    dims = make_dims(text=text, audio=audio, vision=vision, text_len=10, audio_len=30, vision_len=25)
    model, reg = build(backbone, "none", dims=dims)
    batch = make_batch(dims, b=4)
    out = model(batch)
    assert out.prediction.shape == (4,)
    for name, value in out.features.items():
        assert value.shape == (4, model.feature_dims[name])
    # a model built for other widths cannot silently accept these inputs
    other, _ = build(backbone, "none", dims=make_dims(**UNALIGNED))
    with pytest.raises(RuntimeError):
        other(batch)


@pytest.mark.parametrize("backbone,regulariser", PAIRS)
def test_batch_of_one_trains(backbone, regulariser):
    model, reg = build(backbone, regulariser)
    batch = make_batch(model.dims, b=1)
    loss = train_step(model, reg, batch, main_optimizer(model, reg))
    assert torch.isfinite(loss)
    assert torch.isfinite(predict(model, batch)).all()


def _final_linear(model) -> torch.nn.Linear:
    """The backbone's last linear layer (A_θp of MDM's Fig. 3): the one that outputs the score."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1]


@pytest.mark.parametrize("backbone", known_backbones())
def test_fused_is_the_input_of_the_final_linear_head(backbone):
    """``features["fused"]`` is Z_avl of MDM (Colombo et al. 2021, Fig. 3 / Table 4): in eval
    mode the prediction is the final linear layer applied to it. (LMF with ``output_dim`` 1 has no
    head: there ``fused`` is the score itself.)"""
    model, _ = build(backbone)
    batch = make_batch(model.dims)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        head = _final_linear(model)
        assert head.in_features == model.feature_dims["fused"]
        torch.testing.assert_close(head(out.features["fused"]).squeeze(-1), out.prediction)


#: parameters between the unimodal encoders and the head, by backbone (name prefixes)
FUSION_LAYERS = {
    "ef_lstm": ("lstm.", "linear."),
    "tfn": ("post_fusion_1.", "post_fusion_2."),
    "lmf": ("audio_factor", "vision_factor", "text_factor", "fusion_weights"),
    "mfn": ("attention.", "proposal.", "gamma1_in.", "out.0."),
    "mag_bert": ("gate.", "text_encoder.encoder.layer.1."),
    "mag_xlnet": ("gate.", "text_encoder.layer.1."),
    "mmim": ("fusion_1.", "fusion_2."),
    "mird": ("head.0.",),
}


@pytest.mark.parametrize("backbone", known_backbones())
def test_mdm_penalty_gradient_reaches_the_fusion_layers(backbone):
    """The paper's MDM reads Z_avl = f_θe(X_a, X_v, X_l): its penalty alone (task loss left out)
    sends a non-zero gradient into the layers between the unimodal encoders and the head
    (TFN's post-fusion layers, EF-LSTM's LSTM, MAG's gate and transformer layers, ...)."""
    model, reg = build(backbone, "mdm")
    batch = make_batch(model.dims)
    model.train()
    out = model(batch)
    enc = make_encoder(model, batch)
    reg.estimator_update(out, batch, enc)
    torch.manual_seed(0)
    pen = reg.step_penalty(out, batch, enc)
    model.zero_grad(set_to_none=True)
    pen.backward()
    names = [n for n, _ in model.named_parameters()]
    fusion = [(n, p) for n, p in model.named_parameters() if n.startswith(FUSION_LAYERS[backbone])]
    assert fusion, f"no parameter of {backbone} starts with {FUSION_LAYERS[backbone]}: {names[:20]}"
    for n, p in fusion:
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{backbone}: no MDM gradient in {n}"
    # the head itself is not what T reads: it gets no MDM gradient
    head = _final_linear(model)
    assert head.weight.grad is None or head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("layout", ["unaligned", "aligned"])
def test_ef_lstm_runs_on_both_layouts(layout):
    dims = make_dims(**(UNALIGNED if layout == "unaligned" else ALIGNED))
    model, reg = build("ef_lstm", "mdm", dims=dims)
    batch = make_batch(dims)
    assert torch.isfinite(train_step(model, reg, batch, main_optimizer(model, reg)))
    assert predict(model, batch).shape == (8,)


def test_ef_lstm_resampling_is_the_identity_on_word_aligned_steps():
    """Audio/vision with one frame per word take the unaligned (resampling) path to the same
    result as the aligned path: the resampling only ever changes the time grid."""
    dims = make_dims(**ALIGNED)
    model, _ = build("ef_lstm", "none", dims=dims)
    batch = make_batch(dims)
    batch.audio_lengths = batch.text_lengths.clone()
    aligned = predict(model, batch)
    model.dims = dataclasses.replace(dims, aligned=False)  # forces the resampling path
    torch.testing.assert_close(predict(model, batch), aligned, rtol=1e-5, atol=1e-6)


def test_tfn_fusion_is_the_outer_product_of_padded_embeddings():
    from trainables.backbones.tfn import TFN

    g = torch.Generator().manual_seed(0)
    h_a, h_v, h_t = (torch.randn(3, n, generator=g) for n in (2, 3, 4))
    z = TFN.tensor_fusion(h_a, h_v, h_t)
    assert z.shape == (3, 3 * 4 * 5)
    for i in range(3):
        pad = lambda h: torch.cat([h[i], torch.ones(1)])  # noqa: E731
        ref = torch.einsum("a,v,t->avt", pad(h_a), pad(h_v), pad(h_t)).reshape(-1)
        torch.testing.assert_close(z[i], ref)
    # the slices against the appended 1s hold the unimodal embeddings themselves (Eq. 3)
    cube = z.reshape(3, 3, 4, 5)
    torch.testing.assert_close(cube[:, :2, -1, -1], h_a)
    torch.testing.assert_close(cube[:, -1, -1, :4], h_t)


def test_tfn_in_major_post_fusion_layer_is_nn_linear():
    """TFN stores its wide post-fusion weight transposed (a speed layout): the same predictions,
    gradients and AdamW steps as nn.Linear with the same initial values, bit for bit on the CPU;
    a state dict written with nn.Linear's ``weight`` (out, in) loads into it."""
    from trainables.backbones.tfn import InMajorLinear

    model, reg = build("tfn", "none", seed=1)
    layer = model.post_fusion_1
    assert isinstance(layer, InMajorLinear) and layer.weight_t.is_contiguous()
    assert layer.weight.shape == (layer.out_features, layer.in_features)
    class ScaledLinear(torch.nn.Linear):
        """nn.Linear's own product (addmm on W^T), with the dropout scale TFN folds in (alpha)."""

        def forward(self, x, alpha=1.0):
            return torch.addmm(self.bias, x, self.weight.t(), alpha=alpha)

    plain = copy.deepcopy(model)
    linear = ScaledLinear(layer.in_features, layer.out_features)
    linear.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    plain.post_fusion_1 = linear
    batch = make_batch(model.dims)
    for m in (model, plain):
        torch.manual_seed(0)  # the same dropout masks
        train_step(m, reg, batch, main_optimizer(m, reg))
    torch.manual_seed(1)
    out = predict(model, batch)
    torch.manual_seed(1)
    assert torch.equal(out, predict(plain, batch))
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.weight_t.grad.t(), linear.weight.grad)
    # an nn.Linear-shaped state dict (checkpoints from before) loads, and its own round-trips
    clone, _ = build("tfn", "none", seed=2)
    clone.load_state_dict(plain.state_dict())
    assert torch.equal(clone.post_fusion_1.weight, linear.weight)
    clone, _ = build("tfn", "none", seed=2)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.post_fusion_1.weight_t, layer.weight_t)


@pytest.mark.parametrize("backbone", known_backbones())
def test_config_rejects_unknown_keys(backbone):
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(get_backbone(backbone).config_class, {"no_such_key": 1})


@pytest.mark.parametrize("backbone", ["ef_lstm", "tfn"])
def test_config_rejects_bad_values(backbone):
    key = "dropout" if backbone == "ef_lstm" else "post_fusion_dropout"
    with pytest.raises(ConfigError, match=key):
        build_dataclass(get_backbone(backbone).config_class, {key: 1.5})
