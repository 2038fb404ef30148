"""trainables.metrics against hand-computed cases and a restatement of MMSA's metricsTop.

The MMSA restatement (``_mmsa_regression``) is ours, written from reading
``src/MMSA/utils/metricsTop.py`` (``MetricsTop.__eval_mosei_regression``, thuiar/MMSA a94e65d):
it keeps MMSA's steps and their order (np.corrcoef, list-comprehension of non-zero indices,
``round(x, 4)`` on whatever type each step returns) so that a change of convention in
``trainables.metrics`` shows up here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from trainables.metrics import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    base_metric,
    compute_metrics,
    is_better,
    mode_for,
    weighted_f1,
)


# ---------------------------------------------------------------------------------------------
# independent references, written here


def _f1_from_confusion(y_true, y_pred) -> float:
    """Weighted F1 of two boolean vectors from the 2x2 confusion matrix (no sklearn).

    Negative class first, then positive (the order of sklearn's sorted labels), each F1 =
    2 tp / (2 tp + fp + fn), 0 when the class appears nowhere; weights = true counts.
    """
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    tp = int(np.sum(t & p))
    tn = int(np.sum(~t & ~p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    f1_pos = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if (2 * tn + fn + fp) else 0.0
    return (f1_neg * (tn + fp) + f1_pos * (tp + fn)) / t.size


def _sk_or_local():
    """(accuracy_score, f1_weighted) from sklearn when installed, else local restatements.

    The local accuracy returns a Python float, as the sklearn installed here does.
    """
    try:
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        return (lambda a, b: float(np.mean(np.asarray(a) == np.asarray(b))),
                _f1_from_confusion)
    return accuracy_score, lambda t, p: f1_score(t, p, average="weighted")


def _mmsa_regression(y_pred: np.ndarray, y_true: np.ndarray) -> dict:
    """Our restatement of MMSA's __eval_mosei_regression, mapped to our key names."""
    accuracy_score, f1_weighted = _sk_or_local()
    test_preds, test_truth = y_pred.reshape(-1), y_true.reshape(-1)

    def multiclass_acc(p, t):
        return np.sum(np.round(p) == np.round(t)) / float(len(t))

    mae = np.mean(np.absolute(test_preds - test_truth)).astype(np.float64)
    corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = multiclass_acc(np.clip(test_preds, -3.0, 3.0), np.clip(test_truth, -3.0, 3.0))
    mult_a5 = multiclass_acc(np.clip(test_preds, -2.0, 2.0), np.clip(test_truth, -2.0, 2.0))
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    nz_truth = test_truth[non_zeros] > 0
    nz_preds = test_preds[non_zeros] > 0
    nz_acc2 = accuracy_score(nz_preds, nz_truth)
    nz_f1 = f1_weighted(nz_truth, nz_preds)
    binary_truth = test_truth >= 0
    binary_preds = test_preds >= 0
    acc2 = accuracy_score(binary_preds, binary_truth)
    f_score = f1_weighted(binary_truth, binary_preds)
    return {
        "mae": round(mae, 4), "corr": round(corr, 4),
        "acc2_has0": round(acc2, 4), "f1_has0": round(f_score, 4),
        "acc2_non0": round(nz_acc2, 4), "f1_non0": round(nz_f1, 4),
        "acc5": round(mult_a5, 4), "acc7": round(mult_a7, 4),
    }


def _random_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """MOSI-like labels (thirds in [-3, 3], many exact zeros) and awkward predictions."""
    labels = rng.integers(-9, 10, size=n) / 3.0
    labels[rng.random(n) < 0.15] = 0.0
    if not np.any(labels != 0):
        labels[0] = 1.0  # MMSA's restatement cannot run without a non-zero label
    preds = rng.normal(0.0, 1.6, size=n)
    pick = rng.random(n)
    preds[pick < 0.10] = 0.0                                                  # ties at 0
    half = (pick >= 0.10) & (pick < 0.25)
    preds[half] = rng.integers(-4, 4, size=int(half.sum())) + 0.5             # round-half cases
    far = (pick >= 0.25) & (pick < 0.30)
    preds[far] = rng.choice([-1.0, 1.0], size=int(far.sum())) * rng.uniform(3, 6, int(far.sum()))
    return preds, labels


# ---------------------------------------------------------------------------------------------
# hand-computed cases


def test_keys_and_order():
    out = compute_metrics([0.1, -0.2], [0.3, -1.0])
    assert tuple(out) == METRIC_NAMES == (
        "mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7")
    assert all(type(v) is float for v in out.values())


def test_ties_at_zero_has0_vs_non0():
    preds = [0.0, -0.5, 0.0, 1.2, -2.0, 0.3]
    labels = [0.0, 0.0, 1.0, 0.8, -1.5, -0.4]
    out = compute_metrics(preds, labels)
    # Has0 (>= 0 on both sides): truth T T T T F F, pred T F T T F T
    #   correct 1 0 1 1 1 0 -> 4/6 = 0.66667 -> 0.6667
    #   class T: tp 3 (rows 0,2,3), #true 4, #pred 4 -> F1 = 6/8 = 0.75
    #   class F: tp 1 (row 4), #true 2, #pred 2 -> F1 = 2/4 = 0.5
    #   weighted (4*0.75 + 2*0.5)/6 = 4/6 -> 0.6667
    assert out["acc2_has0"] == 0.6667
    assert out["f1_has0"] == 0.6667
    # Non0: rows 0, 1 (label exactly 0) dropped; preds 0.0 1.2 -2.0 0.3 vs labels 1 .8 -1.5 -.4
    #   truth > 0: T T F F; pred > 0: F T F T (the 0.0 prediction is NEGATIVE here)
    #   correct 0 1 1 0 -> 0.5 ; F1_T = 2*1/(2+2) = 0.5, F1_F = 2*1/(2+2) = 0.5 -> 0.5
    #   (with pred >= 0 it would be T T F T -> 0.75: the strict > matters)
    assert out["acc2_non0"] == 0.5
    assert out["f1_non0"] == 0.5
    # MAE: (0 + 0.5 + 1 + 0.4 + 0.5 + 0.7)/6 = 3.1/6 = 0.51667 -> 0.5167
    assert out["mae"] == 0.5167
    # Pearson: Sxy = 3.84 - 6*(-1/6)*(-0.1/6) = 1147/300, Sxx = 5.78 - 1/6 = 421/75,
    #   Syy = 4.05 - 0.01/6 = 2429/600 -> 3.82333 / sqrt(5.61333 * 4.04833) = 0.80204 -> 0.8020
    assert out["corr"] == 0.802
    # Acc-7: round(clip) preds 0 -0 0 1 -2 0 vs labels 0 0 1 1 -2 -0 -> 5/6 -> 0.8333
    #   (-0.5 -> -0.0 and -0.4 -> -0.0 both equal 0); Acc-5 identical inside [-2, 2]
    assert out["acc7"] == 0.8333
    assert out["acc5"] == 0.8333


def test_pearson_hand_value():
    # x = 1 2 3, y = 1 2 4: centred x = -1 0 1, y = -4/3 -1/3 5/3
    # Sxy = 4/3 + 5/3 = 3, Sxx = 2, Syy = 42/9 -> 3 / sqrt(28/3) = 0.98198 -> 0.982
    out = compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert out["corr"] == 0.982
    # MAE = (0 + 0 + 1)/3 = 0.33333 -> 0.3333
    assert out["mae"] == 0.3333


def test_round_half_to_even_acc7_acc5():
    preds = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    # numpy rounds half to even: 0, 2, 2, -0, -2, -2
    out = compute_metrics(preds, [0.0, 2.0, 2.0, 0.0, -2.0, -2.0])
    assert out["acc7"] == 1.0  # 6/6
    assert out["acc5"] == 1.0  # 2.5 clipped to 2 first: same classes
    # half away from zero would give 1, 2, 3, -1, -2, -3: these labels catch it
    out = compute_metrics(preds, [1.0, 1.0, 3.0, -1.0, -1.0, -3.0])
    assert out["acc7"] == 0.0  # 0!=1, 2!=1, 2!=3, -0!=-1, -2!=-1, -2!=-3
    # Acc-5: preds clip -> .5 1.5 2 -.5 -1.5 -2 -> 0 2 2 -0 -2 -2; labels -> 1 1 2 -1 -1 -2
    #   equal at rows 2 and 5 -> 2/6 = 0.3333
    assert out["acc5"] == 0.3333


def test_clipping_beyond_three():
    preds = [4.0, -7.0, 3.4, 2.6, -2.9, 3.0]
    labels = [3.0, -3.0, 2.0, 3.0, -3.2, 3.7]
    out = compute_metrics(preds, labels)
    # Acc-7: clip preds 3 -3 3 2.6 -2.9 3 -> 3 -3 3 3 -3 3
    #   labels are clipped too: 3 -3 2 3 -3.2->-3 3.7->3 (unclipped, 3.7 would round to 4)
    #   equal 1 1 0 1 1 1 -> 5/6 = 0.83333 -> 0.8333
    assert out["acc7"] == 0.8333
    # Acc-5: everything clips to +-2: 2 -2 2 2 -2 2 vs 2 -2 2 2 -2 2 -> 1.0
    assert out["acc5"] == 1.0
    # MAE is unclipped: (1 + 4 + 1.4 + 0.4 + 0.3 + 0.7)/6 = 7.8/6 = 1.3
    assert out["mae"] == 1.3


def test_constant_prediction_corr_zero_without_warning():
    preds, labels = [0.5] * 4, [1.0, -1.0, 2.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the test
        out = compute_metrics(preds, labels)
    assert out["corr"] == 0.0  # ours: np.corrcoef (MMSA) gives nan here
    # MAE: (0.5 + 1.5 + 1.5 + 0.5)/4 = 1.0
    assert out["mae"] == 1.0
    # Has0: pred all T; truth T F T T -> 3/4 = 0.75
    #   F1_T = 2*3/(3+4) = 6/7, support 3; F1_F = 0 (never predicted), support 1
    #   weighted 3*(6/7)/4 = 18/28 = 0.642857 -> 0.6429
    assert out["acc2_has0"] == 0.75
    assert out["f1_has0"] == 0.6429
    # Non0: label 0 dropped -> truth T F T, pred T T T -> 2/3 -> 0.6667
    #   F1_T = 2*2/(2+3) = 0.8, support 2; F1_F = 0, support 1 -> 1.6/3 = 0.5333
    assert out["acc2_non0"] == 0.6667
    assert out["f1_non0"] == 0.5333
    # Acc-7/5: round(0.5) = 0 vs 1 -1 2 0 -> 1/4
    assert out["acc7"] == 0.25
    assert out["acc5"] == 0.25
    # constant labels are undefined too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics([0.1, 0.9, -0.3], [1.0, 1.0, 1.0])["corr"] == 0.0


def test_mmsa_corrcoef_is_nan_on_constant_input():
    # documents why corr needs our definition: MMSA's np.corrcoef returns nan (and warns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(np.corrcoef([0.5] * 4, [1.0, -1.0, 2.0, 0.0])[0][1])


def test_single_example():
    out = compute_metrics([0.3], [-0.2])
    # MAE 0.5; corr undefined -> 0.0
    # Has0: pred T, truth F -> acc 0; F1_F = 0 (support 1), class T has support 0 -> 0.0
    # Non0: label kept; pred > 0 T vs truth F -> 0, F1 0
    # Acc-7/5: round(0.3) = 0, round(-0.2) = -0 -> equal -> 1.0
    assert out == {"mae": 0.5, "corr": 0.0, "acc2_has0": 0.0, "f1_has0": 0.0,
                   "acc2_non0": 0.0, "f1_non0": 0.0, "acc5": 1.0, "acc7": 1.0}


def test_all_labels_zero_non0_is_defined():
    # nothing left after dropping zero labels: ours 0.0 (MMSA raises IndexError)
    out = compute_metrics([0.0], [0.0])
    # Has0: 0 >= 0 on both sides -> correct; F1_T = 2/(1+1) = 1
    assert out == {"mae": 0.0, "corr": 0.0, "acc2_has0": 1.0, "f1_has0": 1.0,
                   "acc2_non0": 0.0, "f1_non0": 0.0, "acc5": 1.0, "acc7": 1.0}
    out = compute_metrics([0.4, -1.0, 2.0], [0.0, -0.0, 0.0])  # -0.0 is a zero label too
    assert out["acc2_non0"] == 0.0 and out["f1_non0"] == 0.0
    assert all(math.isfinite(v) for v in out.values())


def test_class_never_predicted_has_f1_zero():
    # truth T T F F, pred T T T T: F1_T = 2*2/(2+4) = 2/3 (support 2), F1_F = 0 (support 2)
    #   weighted = (2*(2/3) + 0)/4 = 1/3 -> 0.3333
    out = compute_metrics([1.0, 2.0, 0.5, 0.1], [1.0, 2.0, -1.0, -2.0])
    assert out["f1_has0"] == 0.3333 and out["acc2_has0"] == 0.5
    t = np.array([True, True, False, False])
    assert weighted_f1(t, np.ones(4, bool)) == pytest.approx(1 / 3)
    # a class only predicted has weight 0: truth T T, pred T F -> F1_T = 2/(2+1), weight 2/2
    assert weighted_f1(np.array([True, True]), np.array([True, False])) == pytest.approx(2 / 3)


def test_rounding_follows_mmsa_types():
    # 160 positive labels, one prediction right: every accuracy is 1/160 = 0.00625, which binary
    # stores as 0.0062500000000000003. MMSA rounds Acc-7 / Acc-5 (numpy floats) with numpy's
    # scale-and-rint (62.5 -> 62, half even) -> 0.0062, and the sklearn accuracies (Python
    # floats) with Python's correct rounding of the stored value -> 0.0063.
    labels = np.ones(160)
    preds = -np.ones(160)
    preds[0] = 1.0
    out = compute_metrics(preds, labels)
    assert out["acc7"] == 0.0062 and out["acc5"] == 0.0062
    assert out["acc2_has0"] == 0.0063 and out["acc2_non0"] == 0.0063


# ---------------------------------------------------------------------------------------------
# inputs


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p, t = _random_case(rng, 50)
    p32 = torch.tensor(p, dtype=torch.float32, requires_grad=True)
    t32 = torch.tensor(t, dtype=torch.float32)
    expected = compute_metrics(p32.detach().double().numpy(), t32.double().numpy())
    assert compute_metrics(p32, t32) == expected
    assert compute_metrics(p32.reshape(-1, 1), t32) == expected  # a (N, 1) head output
    assert compute_metrics(p32.detach().numpy(), t32.tolist()) == expected  # dtype-independent
    bf = torch.tensor([0.5, -1.0, 2.0]).to(torch.bfloat16)
    assert compute_metrics(bf, bf)["acc7"] == 1.0


@pytest.mark.parametrize(
    "preds, labels, needle",
    [
        ([0.1, 0.2], [0.1], "differ in length"),
        ([], [], "empty"),
        ([0.1, float("nan")], [0.1, 0.2], "finite"),
        ([0.1, 0.2], [0.1, float("inf")], "finite"),
        (np.zeros((2, 3)), np.zeros(2), "1-D"),
        (["a", "b"], [0.1, 0.2], "expected numbers"),
    ],
)
def test_bad_inputs(preds, labels, needle):
    with pytest.raises(ValueError, match=needle):
        compute_metrics(preds, labels)


# ---------------------------------------------------------------------------------------------
# direction


def test_mode_and_is_better():
    assert LOWER_IS_BETTER == {"mae"}
    for name in ("mae", "valid_mae", "test_mae"):
        assert mode_for(name) == "min"
    for name in METRIC_NAMES[1:]:
        assert mode_for(name) == "max" and mode_for(f"valid_{name}") == "max"
    assert base_metric("valid_f1_non0") == "f1_non0"
    with pytest.raises(ValueError, match="unknown metric 'valid_los'; known: mae, corr"):
        mode_for("valid_los")
    assert is_better("valid_mae", 0.70, 0.71) and not is_better("valid_mae", 0.71, 0.70)
    assert is_better("acc7", 0.45, 0.44) and not is_better("valid_acc7", 0.44, 0.45)
    assert not is_better("mae", 0.7, 0.7) and not is_better("corr", 0.7, 0.7)  # ties
    assert not is_better("mae", math.nan, 0.7) and is_better("mae", 0.7, math.nan)
    assert is_better("corr", -0.5, math.nan)


# ---------------------------------------------------------------------------------------------
# references


def test_weighted_f1_against_confusion_counts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        t = rng.random(n) < rng.random()
        p = rng.random(n) < rng.random()
        assert weighted_f1(t, p) == pytest.approx(_f1_from_confusion(t, p), abs=1e-12)
    # degenerate: one class everywhere
    assert weighted_f1(np.ones(5, bool), np.ones(5, bool)) == 1.0
    assert weighted_f1(np.ones(5, bool), np.zeros(5, bool)) == 0.0


def test_weighted_f1_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's UndefinedMetricWarning on unpredicted classes
        for _ in range(120):
            n = int(rng.integers(1, 40))
            t = rng.random(n) < rng.random()
            p = rng.random(n) < rng.random()
            assert weighted_f1(t, p) == pytest.approx(
                metrics.f1_score(t, p, average="weighted"), abs=1e-12)
            preds = np.where(p, 1.0, -1.0) * rng.uniform(0.1, 3, n)
            labels = np.where(t, 1.0, -1.0) * rng.uniform(0.1, 3, n)
            out = compute_metrics(preds, labels)
            assert out["f1_has0"] == round(metrics.f1_score(t, p, average="weighted"), 4)
            assert out["f1_non0"] == out["f1_has0"]  # no zeros anywhere: the same split


@pytest.mark.parametrize("n", [1, 2, 7, 50, 160, 229, 320, 686])
def test_matches_mmsa_restatement(n):
    rng = np.random.default_rng(1000 + n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn / corrcoef warnings inside the reference
        compared = 0
        for _ in range(25):
            preds, labels = _random_case(rng, n)
            ours, ref = compute_metrics(preds, labels), _mmsa_regression(preds, labels)
            if np.ptp(preds) == 0 or np.ptp(labels) == 0:
                # corr undefined (always for n = 1): MMSA nan, ours 0.0; every other key equal
                assert math.isnan(ref.pop("corr")) and ours.pop("corr") == 0.0
            assert ours == ref
            compared += 1
        assert compared == 25


def test_matches_mmsa_restatement_float32():
    # MMSA sees float32 tensors and takes their MAE in float32; we work in float64: only the
    # MAE may differ, by float32 summation error, i.e. at most one unit of the 4th decimal
    rng = np.random.default_rng(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(50):
            preds, labels = _random_case(rng, 686)
            p32, t32 = preds.astype(np.float32), labels.astype(np.float32)
            ours, ref = compute_metrics(p32, t32), _mmsa_regression(p32, t32)
            assert abs(ours.pop("mae") - ref.pop("mae")) <= 1e-4 + 1e-12
            assert ours == ref
