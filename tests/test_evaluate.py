"""Tests of attnmem.evaluate against hand-computed cases and the pairwise AUROC definition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnmem.evaluate import auroc, roc_curve, summarize, tpr_at_fpr

FPRS = (0.01, 0.03, 0.05, 0.10)


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """O(n_pos * n_neg) definition: P(pos > neg) + 0.5 P(pos == neg), in exact integers."""
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    twice_u = 2 * int((pos > neg).sum()) + int((pos == neg).sum())
    return twice_u / (2 * pos.size * neg.size)


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule area (np.trapezoid needs numpy >= 2)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


# --- perfect, inverted and constant detectors -------------------------------------------------


def perfect() -> tuple[np.ndarray, np.ndarray]:
    """5 positives scored 200..196 above 100 negatives scored 100..1."""
    scores = np.r_[np.arange(200, 195, -1), np.arange(100, 0, -1)].astype(float)
    labels = np.r_[np.ones(5, int), np.zeros(100, int)]
    return scores, labels


def test_perfect_separation() -> None:
    scores, labels = perfect()
    assert auroc(scores, labels) == 1.0
    # Full curve: up the FPR = 0 axis to (0, 1), then along TPR = 1.
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    assert fpr.size == 106 and thr[0] == np.inf
    assert np.all(tpr[fpr > 0] == 1.0)
    for f in FPRS:
        assert tpr_at_fpr(scores, labels, f, "below") == 1.0
        assert tpr_at_fpr(scores, labels, f, "below", drop_intermediate=False) == 1.0
        # k/100 hits each target exactly, so "nearest" on the full curve finds TPR 1.
        assert tpr_at_fpr(scores, labels, f, "nearest", drop_intermediate=False) == 1.0


def test_perfect_separation_nearest_on_sklearn_curve_is_zero() -> None:
    # Documented artifact of the official code: the default (scikit-learn) curve keeps only
    # the corners (0,0), (0,1/5), (0,1), (1,1); every target below 0.5 is nearest FPR 0, whose
    # first point is the (0, 0) start, so "nearest" reports TPR 0 for a perfect detector.
    scores, labels = perfect()
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.2, 1.0, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, 200.0, 196.0, 1.0])
    for f in FPRS:
        assert tpr_at_fpr(scores, labels, f, "nearest") == 0.0


def test_perfectly_inverted() -> None:
    scores, labels = perfect()
    scores = -scores
    assert auroc(scores, labels) == 0.0
    for drop in (True, False):
        for f in FPRS:
            for convention in ("nearest", "below"):
                assert tpr_at_fpr(scores, labels, f, convention, drop_intermediate=drop) == 0.0


@pytest.mark.parametrize("drop", [True, False], ids=["sklearn-curve", "full-curve"])
def test_all_equal_scores(drop: bool) -> None:
    scores = np.full(5, 2.0)
    labels = np.array([1, 0, 1, 0, 0])
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop)
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, 2.0])
    assert auroc(scores, labels) == 0.5
    for f in FPRS:
        assert tpr_at_fpr(scores, labels, f, "nearest", drop_intermediate=drop) == 0.0
        assert tpr_at_fpr(scores, labels, f, "below", drop_intermediate=drop) == 0.0
    # At target 1 "nearest" reaches the (1, 1) end; "below" still needs FPR < 1.
    assert tpr_at_fpr(scores, labels, 1.0, "nearest", drop_intermediate=drop) == 1.0
    assert tpr_at_fpr(scores, labels, 1.0, "below", drop_intermediate=drop) == 0.0


# --- ties across classes ------------------------------------------------------------------------


def test_ties_across_classes_count_half() -> None:
    # Positives {3, 2, 1}, negatives {2, 1, 0}. Pairs (pos, neg):
    #   pos 3: beats 2, 1, 0                -> 3
    #   pos 2: ties 2 (0.5), beats 1, 0     -> 2.5
    #   pos 1: loses to 2, ties 1, beats 0  -> 1.5
    # U = 7, AUROC = 7 / 9.
    # One point per distinct score (counts fp, tp): t=3 -> (0,1), t=2 -> (1,2), t=1 -> (2,3),
    # t=0 -> (3,3); full curve (0,0) (0,1/3) (1/3,2/3) (2/3,1) (1,1). Trapezoids:
    #   1/3 * (1/3 + 2/3)/2 + 1/3 * (2/3 + 1)/2 + 1/3 * 1 = 3/18 + 5/18 + 6/18 = 7/9.
    # scikit-learn's curve drops (1/3, 2/3): the steps into and out of it are both (+1, +1).
    scores = np.array([3, 2, 1, 2, 1, 0])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert auroc(scores, labels) == 7 / 9
    assert pairwise_auroc(scores.astype(float), labels) == 7 / 9

    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 3, 2, 1, 0])
    assert trapezoid(tpr, fpr) == pytest.approx(7 / 9, abs=1e-15)

    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 3, 1, 0])
    assert trapezoid(tpr, fpr) == pytest.approx(7 / 9, abs=1e-15)


# --- the two TPR@FPR conventions ----------------------------------------------------------------


def conventions_example() -> tuple[np.ndarray, np.ndarray]:
    """4 positives, 10 negatives, scores 14..1 with labels (highest first)
    P N P N N P N N N N N N N P.

    Counts (fp, tp) after each score: (0,1) (1,1) (1,2) (2,2) (3,2) (3,3) (4,3) ... (10,3) (10,4).
    Full curve (fpr = fp/10, tpr = tp/4), with the (0,0) start:
      (0,0) (0,.25) (.1,.25) (.1,.5) (.2,.5) (.3,.5) (.3,.75) (.4,.75) ... (1,.75) (1,1).
    scikit-learn's curve drops the points inside straight runs of equal steps,
    (.2,.5) and (.4,.75) ... (.9,.75):
      (0,0) (0,.25) (.1,.25) (.1,.5) (.3,.5) (.3,.75) (1,.75) (1,1).
    AUROC: the positives beat 10, 9, 7 and 0 negatives -> 26 / 40 = 0.65.
    """
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1])
    scores = np.arange(14, 0, -1).astype(float)
    return scores, labels


# (target, nearest on sklearn curve, nearest on full curve, below on either curve)
CONVENTION_CASES = [
    # FPR 0 and 0.1 are equally near 0.05 (exactly, in floats): the first point, (0, 0), wins.
    # Below 0.05: last point with FPR 0 is (0, .25).
    (0.05, 0.0, 0.0, 0.25),
    # Nearest FPR is 0.1, reached by (.1,.25) and (.1,.5): the first, .25. Below: (.1,.5).
    (0.12, 0.25, 0.25, 0.5),
    # Nearest FPR is 0.3: (.3,.5) before (.3,.75) -> .5. Below 0.31: (.3,.75).
    (0.31, 0.5, 0.5, 0.75),
    # Full curve has (.5,.75) exactly. The sklearn curve jumps from FPR .3 to 1, so the
    # nearest is FPR .3 and its first point (.3,.5). Below 0.5: (.4,.75) or (.3,.75).
    (0.5, 0.5, 0.75, 0.75),
]


@pytest.mark.parametrize(
    ("target", "nearest_sk", "nearest_full", "below"),
    CONVENTION_CASES,
    ids=[f"fpr={c[0]}" for c in CONVENTION_CASES],
)
def test_nearest_vs_below(
    target: float, nearest_sk: float, nearest_full: float, below: float
) -> None:
    scores, labels = conventions_example()
    assert tpr_at_fpr(scores, labels, target, "nearest") == nearest_sk
    assert tpr_at_fpr(scores, labels, target, "nearest", drop_intermediate=False) == nearest_full
    assert tpr_at_fpr(scores, labels, target, "below") == below
    assert tpr_at_fpr(scores, labels, target, "below", drop_intermediate=False) == below


def test_conventions_example_curves() -> None:
    scores, labels = conventions_example()
    assert auroc(scores, labels) == 0.65
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.3, 0.3, 1, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1])
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    assert fpr.size == 15 and thr.size == 15
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.2, 0.3, 0.3, *np.arange(4, 11) / 10, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, *[0.75] * 7, 1])


# --- random data: pairwise definition and curve invariants ---------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    # Few distinct values, so ties within and across classes are common.
    scores = rng.integers(0, 1 + seed * 3, size=n).astype(float) / 7
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    expected = pairwise_auroc(scores, labels)
    assert auroc(scores, labels) == expected
    for drop in (True, False):
        fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop)
        assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
        assert trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)
    # The sklearn curve is a subset of the full curve (same thresholds, fewer of them).
    full_thr = roc_curve(scores, labels, drop_intermediate=False)[2]
    assert np.isin(roc_curve(scores, labels)[2], full_thr).all()
    assert full_thr.size == np.unique(scores).size + 1


def test_bool_labels_and_int_scores_accepted() -> None:
    scores, labels = conventions_example()
    assert auroc(scores.astype(int), labels.astype(bool)) == 0.65
    assert auroc(scores.tolist(), labels.astype(float).tolist()) == 0.65


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_is_json_and_consistent() -> None:
    scores, labels = conventions_example()
    out = summarize(scores, labels)
    assert json.loads(json.dumps(out)) == out
    assert out["auroc"] == 0.65 and out["n_pos"] == 4 and out["n_neg"] == 10
    table = out["tpr_at_fpr"]
    assert set(table) == {"nearest", "below"}
    for convention in ("nearest", "below"):
        assert list(table[convention]) == ["0.01", "0.03", "0.05", "0.1"]
        for f in FPRS:
            value = table[convention][f"{f:g}"]
            assert type(value) is float
            assert value == tpr_at_fpr(scores, labels, f, convention)
    # Hand values: FPR grid 0, .1, ...; below 0.1 only FPR 0, whose last point is (0, .25);
    # nearest to 0.01..0.05 is FPR 0 -> (0,0); nearest to 0.1 is (.1,.25).
    assert table["below"] == {"0.01": 0.25, "0.03": 0.25, "0.05": 0.25, "0.1": 0.25}
    assert table["nearest"] == {"0.01": 0.0, "0.03": 0.0, "0.05": 0.0, "0.1": 0.25}


def test_summarize_custom_fprs() -> None:
    scores, labels = conventions_example()
    out = summarize(scores, labels, fprs=(0.31,))
    assert out["tpr_at_fpr"] == {"nearest": {"0.31": 0.5}, "below": {"0.31": 0.75}}


# --- errors ------------------------------------------------------------------------------------

ERROR_CASES = [
    ([0.1, 0.2], [1, 1], "single class"),
    ([0.1, 0.2], [0, 0], "single class"),
    ([0.1, 0.2, 0.3], [0, 1], "different lengths"),
    ([], [], "empty"),
    ([0.1, np.nan, 0.3], [0, 1, 0], "NaN"),
    ([0.1, np.inf, 0.3], [0, 1, 0], "inf"),
    ([0.1, 0.2, 0.3], [0, 1, 2], "0/1 or bool"),
    ([0.1, 0.2, 0.3], [0, 1, -1], "0/1 or bool"),
    ([0.1, 0.2, 0.3], [0, 1, 0.5], "0/1 or bool"),
    ([0.1, 0.2, 0.3], ["a", "b", "a"], "0/1 or bool"),
    (["x", "y"], [0, 1], "real numbers"),
    ([[0.1, 0.2]], [[0, 1]], "1-D"),
]


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    ERROR_CASES,
    ids=[
        "all-pos",
        "all-neg",
        "length",
        "empty",
        "nan",
        "inf",
        "label-2",
        "label-neg",
        "label-half",
        "label-str",
        "score-str",
        "2d",
    ],
)
def test_errors(scores: list, labels: list, message: str) -> None:
    for call in (
        lambda: roc_curve(scores, labels),
        lambda: auroc(scores, labels),
        lambda: tpr_at_fpr(scores, labels, 0.1),
        lambda: summarize(scores, labels),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5, float("nan")])
def test_bad_target_fpr(target: float) -> None:
    scores, labels = conventions_example()
    with pytest.raises(ValueError, match="target_fpr"):
        tpr_at_fpr(scores, labels, target)


def test_bad_convention() -> None:
    scores, labels = conventions_example()
    with pytest.raises(ValueError, match="convention"):
        tpr_at_fpr(scores, labels, 0.1, "closest")  # type: ignore[arg-type]


# --- optional cross-check ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed")
    rng = np.random.default_rng(100 + seed)
    n = 200
    scores = rng.integers(0, 20, size=n).astype(float) if seed % 2 else rng.normal(size=n)
    labels = (rng.random(n) < 0.4).astype(int)
    for drop in (True, False):
        ours = roc_curve(scores, labels, drop_intermediate=drop)
        theirs = metrics.roc_curve(labels, scores, drop_intermediate=drop)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    for f in FPRS:
        assert tpr_at_fpr(scores, labels, f, "nearest") == tpr[np.argmin(np.abs(fpr - f))]
        assert tpr_at_fpr(scores, labels, f, "below") == tpr[np.where(fpr < f)[0][-1]]
