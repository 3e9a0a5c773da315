"""Detection metrics (docs/method.md §4, "Evaluation"): ROC curve, AUROC and TPR at a fixed
FPR, numpy only.

Conventions used throughout:

* ``labels``: 1 (or True) = positive = memorized prompt, 0 (or False) = negative.
* ``scores``: higher = more likely memorized. A prompt is called positive at threshold ``t``
  when ``score >= t``.
* Tied scores form **one** ROC point (one threshold per distinct score), so a tie between a
  positive and a negative is a diagonal segment of the curve and counts half in the AUROC.
* The curve starts at (0, 0) with threshold ``+inf`` (scikit-learn >= 1.3 does the same).
* ``drop_intermediate=True`` (the default, as in scikit-learn) removes the points that
  scikit-learn's ``roc_curve`` removes: a point is dropped when the step into it equals the
  step out of it in both (false-positive, true-positive) counts. This never changes the
  AUROC, but it changes which points exist and therefore the "nearest" TPR@FPR. The official
  detection code of Ren et al. (and of Wen et al.) calls ``sklearn.metrics.roc_curve`` with its
  defaults, so the defaults here reproduce their numbers exactly; pass
  ``drop_intermediate=False`` for one point per distinct score.

Two ways of reading "TPR at x % FPR" exist in this literature and both are reported:

* ``"nearest"`` (Ren et al.'s official code): ``tpr[np.argmin(np.abs(fpr - target))]``, i.e. the
  ROC point whose FPR is nearest to the target; on a tie in distance the **first** point wins,
  which is the one with the lowest FPR and, among points sharing that FPR, the lowest TPR.
  Consequences worth knowing: it may report a point *above* the target FPR, and when the
  nearest FPR is 0 it reports the (0, 0) start point, i.e. TPR 0. With the default curve a
  perfectly separating detector therefore gets TPR 0 at every target below 0.5 (its curve is
  reduced to (0, 0), (0, 1/n_pos), (0, 1), (1, 1)).
* ``"below"`` (Wen et al.'s code): ``tpr[np.where(fpr < target)[0][-1]]``, the TPR of the last
  ROC point whose FPR is strictly below the target; never optimistic about the FPR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["roc_curve", "auroc", "tpr_at_fpr", "summarize", "CONVENTIONS"]

Convention = Literal["nearest", "below"]
CONVENTIONS: tuple[Convention, ...] = ("nearest", "below")


def _validate(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Check and convert inputs; return (float64 scores, int64 labels in {0, 1})."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels have different lengths: {s.shape[0]} and {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("empty input: scores and labels have no elements")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN ({int(np.isnan(s).sum())} of {s.size})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain +/-inf; only finite scores can be ranked reliably")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be 0/1 or bool, got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        found = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"labels must be 0/1 or bool, found other values such as {found}")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"labels contain a single class (n_pos={n_pos}, n_neg={n_neg}); "
            "ROC metrics need both memorized (1) and non-memorized (0) examples"
        )
    return s, y


def _counts(
    s: NDArray[np.float64], y: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """(fps, tps, thresholds) at each distinct score, highest first, without the (0, 0) start."""
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    # Last index of each run of equal scores: one ROC point per distinct score.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[ends]
    fps = ends + 1 - tps
    return fps, tps, s_sorted[ends]


def roc_curve(
    scores: ArrayLike, labels: ArrayLike, *, drop_intermediate: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve of ``scores`` for ``labels`` (1 = memorized; higher score = more memorized).

    Returns ``(fpr, tpr, thresholds)``, three float64 arrays of the same length, FPR and TPR
    non-decreasing. Point ``i`` is the rate of calling ``score >= thresholds[i]`` positive;
    ``thresholds[0] = +inf`` gives the (0, 0) start point and the last point is (1, 1).
    Tied scores give one point. ``drop_intermediate`` as in scikit-learn (see the module
    docstring); the defaults give the same arrays as ``sklearn.metrics.roc_curve(labels,
    scores)`` (scikit-learn >= 1.3).

    Raises ValueError on empty or mismatched inputs, non-finite scores, labels outside
    {0, 1}, or a single class.
    """
    s, y = _validate(scores, labels)
    fps, tps, thresholds = _counts(s, y)
    if drop_intermediate and fps.size > 2:
        # Keep a point when the step into it differs from the step out of it (a corner).
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, ties between a positive and a negative counted half.

    Equals the Mann-Whitney statistic ``U / (n_pos * n_neg)`` where ``U`` counts the
    (positive, negative) pairs with the positive scored higher, plus 0.5 per tied pair.
    Computed exactly in integers (twice the trapezoid area in count units), then divided once.
    """
    s, y = _validate(scores, labels)
    fps, tps, _ = _counts(s, y)
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    twice_u = int(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])))
    return twice_u / (2 * int(fps[-1]) * int(tps[-1]))


def tpr_at_fpr(
    scores: ArrayLike,
    labels: ArrayLike,
    target_fpr: float,
    convention: Convention = "nearest",
    *,
    drop_intermediate: bool = True,
) -> float:
    """TPR of the detector at a target false-positive rate, under one of two conventions.

    ``convention="nearest"`` (Ren et al.'s official code): the TPR of the ROC point whose FPR
    is nearest to ``target_fpr`` (``np.argmin(np.abs(fpr - target_fpr))``). On a tie in
    distance the first point wins: the lowest FPR, and at that FPR the lowest TPR. The chosen
    point may lie above the target FPR; when it is the (0, 0) start point the result is 0.

    ``convention="below"`` (Wen et al.'s code): the TPR of the last ROC point whose FPR is
    strictly below ``target_fpr``; the (0, 0) start point guarantees one exists.

    The curve is :func:`roc_curve` with the same ``drop_intermediate``; the default matches
    ``sklearn.metrics.roc_curve`` as called by both official codes. ``target_fpr`` must be in
    (0, 1].
    """
    target = float(target_fpr)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_fpr must be in (0, 1], got {target_fpr!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    if convention == "nearest":
        return float(tpr[np.argmin(np.abs(fpr - target))])
    return float(tpr[np.flatnonzero(fpr < target)[-1]])


def summarize(
    scores: ArrayLike,
    labels: ArrayLike,
    fprs: Sequence[float] = (0.01, 0.03, 0.05, 0.10),
) -> dict[str, object]:
    """AUROC and TPR at each FPR in ``fprs`` under both conventions, as plain JSON types.

    Returns ``{"auroc": float, "n_pos": int, "n_neg": int,
    "tpr_at_fpr": {"nearest": {"0.01": float, ...}, "below": {"0.01": float, ...}}}``,
    the FPR keys formatted with ``f"{fpr:g}"`` (0.10 -> ``"0.1"``). Uses the default curve
    (scikit-learn's, as the official codes do); see :func:`tpr_at_fpr` for the conventions.
    """
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    table: dict[str, dict[str, float]] = {
        convention: {f"{f:g}": tpr_at_fpr(s, y, f, convention) for f in fprs}
        for convention in CONVENTIONS
    }
    return {
        "auroc": auroc(s, y),
        "n_pos": n_pos,
        "n_neg": int(y.size) - n_pos,
        "tpr_at_fpr": table,
    }
