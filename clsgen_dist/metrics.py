"""Classification metrics (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np


class MetricError(ValueError):
    pass


def tune_threshold(labels, probs) -> float:
    """The probability threshold maximising F1 (on dev); ties → the smallest such threshold."""
    from sklearn.metrics import precision_recall_curve

    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
    return float(thr[int(np.argmax(f1))])


def classification_metrics(labels, probs, *, threshold: float = 0.5, tuned_threshold: float | None = None) -> dict:
    """AUROC, F1 (at ``threshold`` and, if given, at a dev-tuned threshold), accuracy, Brier, n."""
    from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise MetricError(f"labels and probs must be 1-D of equal length, got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise MetricError("no examples to evaluate")
    both = len(np.unique(y)) == 2
    out = {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "f1": float(f1_score(y, (p >= threshold).astype(int), zero_division=0)),
        "accuracy": float(accuracy_score(y, (p >= threshold).astype(int))),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "threshold": float(threshold),
    }
    if not both:
        out["note"] = "only one class present: AUROC is undefined"
    if tuned_threshold is not None:
        out["threshold_tuned"] = float(tuned_threshold)
        out["f1_tuned"] = float(f1_score(y, (p >= tuned_threshold).astype(int), zero_division=0))
    return out
