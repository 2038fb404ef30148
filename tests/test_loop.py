"""The loop: selection on validation only, test once, resume, determinism, divergence."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from trainables.config import TrialConfig
from trainables.data.batches import MultimodalData
from trainables.loop import BEST_FILE, STATE_FILE, Trainer, TrialStatus
from trainables.trainable import evaluate_checkpoint


def config(**overrides):
    flat = {"backbone": "ef_lstm", "regulariser": "mdm", "max_epochs": 3, "batch_size": 16,
            "patience": 0, "regulariser.unroll": 2, "seed": 3,
            "backbone.hidden": 32, "backbone.num_layers": 1}  # small: CI time
    flat.update(overrides)
    if flat["regulariser"] == "none":
        flat = {k: v for k, v in flat.items() if not k.startswith("regulariser.")}
    return TrialConfig.from_flat(flat)


def with_split(data: MultimodalData, name: str, **changes) -> MultimodalData:
    splits = dict(data.splits)
    splits[name] = dataclasses.replace(splits[name], **changes)
    return MultimodalData(splits, data.source, data.digest + "-changed")


def valid_history(history):
    return [{k: v for k, v in h.items() if k.startswith("valid_")} for h in history]


def test_fit_reports_every_epoch_and_tests_once(small_data):
    trainer = Trainer(config(), small_data)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert trainer.status == TrialStatus.COMPLETED
    # test metrics appear only in the last report, for the best-validation epoch
    assert not any(k.startswith("test_") for h in history[:-1] for k in h)
    last = history[-1]
    best_epoch = min(history, key=lambda h: h["valid_mae"])["epoch"]
    assert last["best_epoch"] == best_epoch
    assert last["best_valid_mae"] == min(h["valid_mae"] for h in history)
    assert set(k for k in last if k.startswith("test_")) >= {"test_mae", "test_acc2_has0",
                                                             "test_acc7", "test_corr"}
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert "train_mdm_dependency" in last


def test_test_split_never_steers_selection(small_data):
    """Scrambling the test labels changes test metrics, and nothing else."""
    rng = np.random.default_rng(0)
    test = small_data.splits["test"]
    scrambled = with_split(small_data, "test", labels=rng.uniform(-3, 3, len(test)).astype(np.float32))
    a = Trainer(config(), small_data).fit()
    b = Trainer(config(), scrambled).fit()
    assert valid_history(a) == valid_history(b)
    assert a[-1]["best_epoch"] == b[-1]["best_epoch"]
    assert a[-1]["test_mae"] != b[-1]["test_mae"]


def test_seeded_runs_are_identical_on_cpu(small_data):
    a = Trainer(config(), small_data).fit()
    b = Trainer(config(), small_data).fit()
    strip = lambda hs: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in hs]  # noqa: E731
    assert strip(a) == strip(b)
    c = Trainer(config(seed=4), small_data).fit()
    assert strip(a) != strip(c)


def assert_resumes_exactly(cfg: dict, data, directory) -> list[dict]:
    """4 epochs in one go equal 2 epochs, a checkpoint, a fresh Trainer loading it and 2 more
    (timings aside); returns the uninterrupted history."""
    full = Trainer(config(**cfg, max_epochs=4), data).fit()
    first = Trainer(config(**cfg, max_epochs=4), data)
    first.run_epoch()
    first.run_epoch()
    first.save(directory)
    assert (directory / STATE_FILE).exists() and (directory / BEST_FILE).exists()
    second = Trainer(config(**cfg, max_epochs=4), data)
    second.load(directory)
    rest = [second.run_epoch(), second.run_epoch()]
    for h in (full[2:], rest):
        for r in h:
            r.pop("epoch_seconds")
    assert full[2:] == rest
    return full


def test_resume_from_checkpoint_continues_exactly(small_data, tmp_path):
    assert_resumes_exactly({}, small_data, tmp_path)


def test_best_checkpoint_reproduces_its_metrics(small_data, tmp_path):
    trainer = Trainer(config(), small_data)
    history = trainer.fit()
    trainer.save(tmp_path)
    again = evaluate_checkpoint(tmp_path / BEST_FILE, small_data, "valid")
    assert again["valid_mae"] == pytest.approx(history[-1]["best_valid_mae"], abs=1e-6)
    test = evaluate_checkpoint(tmp_path / BEST_FILE, small_data, "test")
    assert test["test_mae"] == pytest.approx(history[-1]["test_mae"], abs=1e-6)


def test_nan_loss_ends_the_trial_as_diverged(small_data):
    train = small_data.splits["train"]
    broken = with_split(small_data, "train", labels=np.full(len(train), np.nan, np.float32))
    trainer = Trainer(config(), broken)
    history = trainer.fit()  # no exception
    assert len(history) == 1
    assert history[-1]["trial_status"] == TrialStatus.DIVERGED and history[-1]["diverged"]
    assert math.isnan(history[-1]["best_valid_mae"])


def test_early_stopping_on_validation(small_data, monkeypatch):
    trainer = Trainer(config(max_epochs=10, patience=2), small_data)
    values = iter([1.0, 0.8, 0.9, 0.85, 0.5])

    def fake_evaluate(split, state=None):
        return {f"{split}_mae": next(values)}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert trainer.status == TrialStatus.EARLY_STOPPED
    assert history[-1]["best_epoch"] == 2 and history[-1]["best_valid_mae"] == 0.8


def test_early_stopping_on_a_higher_is_better_metric(small_data, monkeypatch):
    """mode max (valid_corr): a higher value is the improvement, a lower one a bad epoch."""
    trainer = Trainer(config(regulariser="none", max_epochs=10, patience=2, metric="valid_corr",
                             mode="max"), small_data)
    values = iter([0.1, 0.3, 0.2, 0.25, 0.9])

    def fake_evaluate(split, state=None):
        return {f"{split}_corr": next(values)}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert trainer.status == TrialStatus.EARLY_STOPPED
    assert history[-1]["best_epoch"] == 2 and history[-1]["best_valid_corr"] == 0.3


def test_estimator_steps_never_touch_the_backbone(small_data):
    trainer = Trainer(config(max_epochs=1), small_data)
    model_ids = {id(p) for p in trainer.model.parameters()}
    reg_ids = {id(p) for g in trainer.reg.optimizer.param_groups for p in g["params"]}
    main_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not model_ids & reg_ids
    assert not reg_ids & main_ids
    assert model_ids <= main_ids


def test_threads_follow_the_trial_resources(small_data):
    """The trial's CPU count sets torch's threads: from 1 (the suite's default) to 2 and back;
    outside Ray (no count) the threads are left as they are."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Trainer(config(), small_data, num_threads=2)
        assert torch.get_num_threads() == 2
        Trainer(config(), small_data, num_threads=None)
        assert torch.get_num_threads() == 2  # untouched
        Trainer(config(), small_data, num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unlabeled_rows_are_mixed_in_but_never_labelled(small_data):
    trainer = Trainer(config(unlabeled_rate=2.0, max_epochs=1), small_data)
    seen = []
    original = trainer.model.forward

    def spy(batch):
        seen.append(batch)
        return original(batch)

    trainer.model.forward = spy
    trainer.train_epoch()
    first = seen[0]
    n_labeled = int(first.labeled.sum())
    assert len(first) == 3 * n_labeled  # 2 unlabeled rows per labeled row
    assert torch.all(first.labels[~first.labeled] == 0) and torch.all(first.index[~first.labeled] == -1)
    # the task loss ignores the unlabeled rows: changing their (hidden) labels changes nothing
    from trainables.loop import _task_loss

    pred = torch.randn(len(first))
    base = _task_loss("l1", pred, first.labels, first.labeled)
    shifted = first.labels.clone()
    shifted[~first.labeled] = 3.0
    assert _task_loss("l1", pred, shifted, first.labeled) == base


def test_warmup_schedule_rises_then_decays_per_step(small_data):
    """The LR at every optimiser step: a linear warm-up over the first ``warmup`` fraction of all
    steps up to ``lr``, then a linear decay towards 0 at the last step (the BERT schedule)."""
    lr, epochs = 1e-3, 4
    trainer = Trainer(config(regulariser="none", warmup=0.25, max_epochs=epochs, lr=lr),
                      small_data)
    lrs = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    total = math.ceil(len(small_data.splits["train"]) / 16) * epochs
    warm = int(0.25 * total)
    assert len(lrs) == total and warm >= 3
    expected = [lr * (k + 1) / warm for k in range(warm)]  # rises to lr ...
    expected += [lr * (total - k) / (total - warm) for k in range(warm, total)]  # ... then decays
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[0] < lrs[warm - 1] == pytest.approx(lr) and lrs[-1] < lrs[warm + 1] < lrs[warm]


def test_resume_with_warmup_and_patience_after_a_non_improving_epoch(small_data, tmp_path):
    """Checkpointed after an epoch that did not improve (one bad epoch counted, the warm-up over
    and the LR decaying): the resumed trainer goes on with the LR schedule where it stood and the
    patience count it had, so it stops early at the same epoch with the same reports. The epoch
    is found on the uninterrupted run itself (a checkpoint after every epoch), so the test does
    not hang on one trajectory of the seeded model."""
    cfg = dict(regulariser="none", warmup=0.25, patience=2, lr=0.1, max_epochs=10)
    first = Trainer(config(**cfg), small_data)
    full, counts = [], {}
    while not first.finished:
        full.append(first.run_epoch())
        epoch = full[-1]["epoch"]
        first.save(tmp_path / str(epoch))
        counts[epoch] = (first.bad_epochs, first.optimizer.param_groups[0]["lr"])
    # patience 2 stopped it: its last two epochs did not improve
    assert full[-1]["trial_status"] == TrialStatus.EARLY_STOPPED
    stop = full[-1]["epoch"]
    saved = stop - 1  # one bad epoch counted there, the next one ends the trial
    assert counts[saved][0] == 1 and saved > 10 * 0.25, counts
    lr_at_save = counts[saved][1]
    second = Trainer(config(**cfg), small_data)
    second.load(tmp_path / str(saved))
    assert second.bad_epochs == 1
    assert second.optimizer.param_groups[0]["lr"] == lr_at_save < 0.1
    rest = second.fit()
    for h in (full, rest):
        for r in h:
            r.pop("epoch_seconds")
    assert rest == full[saved:]


def test_evaluating_other_weights_restores_the_current_ones(small_data):
    trainer = Trainer(config(max_epochs=3), small_data)
    trainer.run_epoch()
    best = trainer.best.state
    trainer.run_epoch()
    before = trainer.evaluate("valid")
    trainer.evaluate("valid", best)  # mid-training evaluation of the best weights
    assert trainer.evaluate("valid") == before


# ------------------------------------------------------------------ padding: trimming, grouping


@pytest.fixture(scope="module")
def aligned_small():
    from trainables.data import arrays_from_mmsa
    from trainables.data.synthetic import make_synthetic

    return arrays_from_mmsa(make_synthetic("small", seed=0, aligned=True, unlabeled_factor=0),
                            "synthetic:small:aligned")


def _tiny_trainer(backbone: str, data: MultimodalData) -> Trainer:
    from tests.test_backbones import TINY_BACKBONE

    flat = {"backbone": backbone, "regulariser": "none", "max_epochs": 1, "batch_size": 16,
            "seed": 0, **{f"backbone.{k}": v for k, v in TINY_BACKBONE.get(backbone, {}).items()}}
    return Trainer(TrialConfig.from_flat(flat), data, device="cpu")


@pytest.mark.parametrize("layout", ["unaligned", "aligned"])
@pytest.mark.parametrize("backbone", ["mag_bert", "mag_xlnet", "mmim", "mird", "ef_lstm", "tfn",
                                      "lmf", "mfn"])
def test_trimming_changes_no_prediction(backbone, layout, small_data, aligned_small):
    """Every batch cut to its longest row (the loop's default for these backbones) gives the
    predictions and features of the full padded batch, in eval mode, after a training epoch (so
    batch-norm statistics and weights are not at their initial values). The batches are
    length-sorted slices, so most are cut far below the padded length."""
    from trainables.backbones import known_backbones
    from trainables.data.batches import row_lengths, trim_batch

    assert backbone in known_backbones()
    data = small_data if layout == "unaligned" else aligned_small
    trainer = _tiny_trainer(backbone, data)
    assert trainer.trim  # every backbone reads its sequences by lengths / attention mask
    trainer.train_epoch()
    trainer.model.eval()
    split = trainer.splits["valid"]
    order = torch.sort(row_lengths(split)).indices
    cut = 0
    with torch.no_grad():
        for start in range(0, len(split), 12):
            full = split.batch(order[start:start + 12])
            trimmed = trim_batch(full)
            cut += full.text.shape[1] - trimmed.text.shape[1]
            if layout == "aligned":
                assert trimmed.text.shape[1] == trimmed.audio.shape[1] == trimmed.vision.shape[1]
            ref, out = trainer.model(full), trainer.model(trimmed)
            torch.testing.assert_close(out.prediction, ref.prediction, rtol=1e-5, atol=1e-6)
            for name in ref.features:
                torch.testing.assert_close(out.features[name], ref.features[name], rtol=1e-5,
                                           atol=1e-6, msg=f"{backbone} feature {name!r}")
    assert cut > 20 * (len(split) // 12)  # the text really was cut (mean ~22 of 50 tokens)
    # the loop's predict (length-ordered, trimmed batches) returns the rows in their order
    preds, labels = trainer.predict("valid")
    trainer.trim = False
    untrimmed, labels_again = trainer.predict("valid")
    np.testing.assert_allclose(preds, untrimmed, rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, labels_again)
    assert np.array_equal(labels, data.splits["valid"].labels)


def test_training_batches_are_trimmed(small_data):
    trainer = Trainer(config(max_epochs=1, unlabeled_rate=1.0, unlabeled_source="train"), small_data)
    widths = [(b.text.shape[1], b.text_bert.shape[2], b.audio.shape[1], int(b.audio_lengths.max()),
               int(b.text_bert[:, 1].sum(dim=1).max())) for b in trainer._train_batches()]
    for text, tokens, audio, longest_audio, longest_text in widths:
        assert text == tokens == longest_text and audio == longest_audio
    assert min(w[0] for w in widths) < 50
    fresh = trainer._sample_batches(3)  # MDM's fresh batches: cut to their longest row too
    assert fresh.text.shape[1] == int(fresh.text_bert[:, 1].sum(dim=1).max())


def test_group_by_length_keeps_every_row_once_in_homogeneous_batches(small_data):
    from trainables.data.batches import row_lengths

    trainer = Trainer(config(group_by_length=True, batch_size=8), small_data)
    lengths = row_lengths(trainer.splits["train"])
    epochs = []
    for _ in range(2):
        batches = [b.index for b in trainer._train_batches()]
        rows = torch.cat(batches)
        assert sorted(rows.tolist()) == list(range(len(trainer.splits["train"])))  # once each
        epochs.append(rows)
        # length-homogeneous: far less spread within a batch than in random batches
        spread = np.mean([float(lengths[b].max() - lengths[b].min()) for b in batches])
        random_spread = np.mean([float(lengths[b].max() - lengths[b].min())
                                 for b in torch.randperm(len(lengths)).split(8)])
        assert spread < 0.25 * random_spread, (spread, random_spread)
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    again = Trainer(config(group_by_length=True, batch_size=8), small_data)
    assert torch.equal(torch.cat([b.index for b in again._train_batches()]), epochs[0])  # seeded
    other = Trainer(config(group_by_length=True, batch_size=8, seed=4), small_data)
    assert not torch.equal(torch.cat([b.index for b in other._train_batches()]), epochs[0])


def test_group_by_length_resumes_exactly(small_data, tmp_path):
    # no regulariser: the grouped sampler's state is what this resumes (MDM's own state: above)
    grouped = {"batch_size": 8, "regulariser": "none"}
    full = assert_resumes_exactly({**grouped, "group_by_length": True}, small_data, tmp_path)
    plain = Trainer(config(**grouped, max_epochs=4), small_data).fit()
    assert plain[0]["valid_mae"] != full[0]["valid_mae"]  # the option changes the batches
