"""Evaluation metrics: classification (scikit-learn underneath), calibration, bootstrap confidence
intervals, temperature scaling, and how well explanations agree with the classification head.

Conventions used everywhere in this module:

* ``probs`` are P(y=1), ``labels`` are 0/1.
* **ECE** is binary, on P(y=1), with **15 equal-width bins** over [0, 1] (bin ``b`` holds
  ``b/15 <= p < (b+1)/15``; the last bin also holds ``p == 1``):
  ``ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|``.
* A quantity that is undefined for the data (AUROC with one class, Cohen's kappa of two constant and
  identical ratings, a bootstrap where most resamples hold one class) is ``None`` and a sentence in
  the result's ``note`` says why. Malformed input (shapes, no examples) raises :class:`MetricError`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

N_BINS = 15


class MetricError(ValueError):
    pass


def _as_arrays(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if raw.shape != p.shape or raw.ndim != 1:
        raise MetricError(f"labels and probs must be 1-D of equal length, got {raw.shape} and {p.shape}")
    if len(raw) == 0:
        raise MetricError("no examples to evaluate")
    # checked before any cast: int64 would turn a label of 0.9 into 0 and True into 1 silently
    if raw.dtype == bool or not np.isin(raw, (0, 1)).all():
        bad = sorted({repr(v) for v in raw.tolist() if isinstance(v, bool) or v not in (0, 1)})[:5]
        raise MetricError(f"labels must be 0 or 1, got {', '.join(bad)}")
    y = raw.astype(np.int64)
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise MetricError("probabilities must be finite and in [0, 1]")
    return y, p


def add_note(out: dict, text: str) -> None:
    """Append ``text`` to ``out["note"]`` (why some value is null), "; "-separated."""
    out["note"] = f"{out['note']}; {text}" if out.get("note") else text


ONE_CLASS_DEV = "the dev split holds one class: the F1 threshold was not tuned"


# ----------------------------------------------------------------------------- point metrics


def tune_threshold(labels, probs) -> float | None:
    """The probability threshold maximising F1 (on dev); ties → the smallest such threshold.
    None when the labels hold one class (no threshold is better than another)."""
    from sklearn.metrics import precision_recall_curve

    y, p = _as_arrays(labels, probs)
    if len(np.unique(y)) < 2:
        return None
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
    return float(thr[int(np.argmax(f1))])


def expected_calibration_error(labels, probs, *, n_bins: int = N_BINS) -> float:
    """Binary ECE on P(y=1) with ``n_bins`` equal-width bins (see the module docstring)."""
    y, p = _as_arrays(labels, probs)
    b = _bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    gap = np.bincount(b, weights=y - p, minlength=n_bins)  # sum over the bin of (y - p)
    return float(np.abs(gap).sum() / len(y)) if count.sum() else 0.0


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def reliability_bins(labels, probs, *, n_bins: int = N_BINS) -> dict:
    """Per-bin count, mean predicted probability and observed positive rate (NaN for empty bins),
    for reliability diagrams."""
    y, p = _as_arrays(labels, probs)
    b = _bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=n_bins) / count
        frac = np.bincount(b, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(), "mean_prob": mean_p.tolist(),
            "frac_pos": frac.tolist()}


def nll(labels, probs, *, eps: float = 1e-12) -> float:
    """Mean binary negative log-likelihood (log loss)."""
    y, p = _as_arrays(labels, probs)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def classification_metrics(labels, probs, *, threshold: float = 0.5, tuned_threshold: float | None = None,
                           n_bins: int = N_BINS) -> dict:
    """AUROC, AUPRC, F1 (at ``threshold`` and, if given, at a dev-tuned threshold), accuracy, Brier,
    ECE, log loss, n. Undefined values are ``None`` with a ``note``."""
    from sklearn.metrics import accuracy_score, average_precision_score, brier_score_loss, f1_score, roc_auc_score

    y, p = _as_arrays(labels, probs)
    both = len(np.unique(y)) == 2
    pos = int(y.sum())
    out = {
        "n": int(len(y)),
        "positives": pos,
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "auprc": float(average_precision_score(y, p)) if pos else None,
        "f1": float(f1_score(y, (p >= threshold).astype(int), zero_division=0)),
        "accuracy": float(accuracy_score(y, (p >= threshold).astype(int))),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
        "ece_bins": int(n_bins),
        "nll": nll(y, p),
        "threshold": float(threshold),
    }
    if not both:
        add_note(out, f"only one class present (label {int(y[0])}): AUROC is undefined"
                      + ("" if pos else " and AUPRC is undefined (no positives)"))
    if tuned_threshold is not None:
        out["threshold_tuned"] = float(tuned_threshold)
        out["f1_tuned"] = float(f1_score(y, (p >= tuned_threshold).astype(int), zero_division=0))
    return out


# ----------------------------------------------------------------------------- temperature scaling


def logits_from_probs(probs, *, eps: float = 1e-15) -> np.ndarray:
    """log(p / (1 - p)) in float64; saturated probabilities are clipped to ±34.5."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """sigmoid(logit / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), overflow-free


def fit_temperature(labels, logits, *, bounds: tuple[float, float] = (1e-2, 1e2)) -> dict:
    """One-parameter temperature scaling: the ``T`` in ``bounds`` minimising the mean NLL of
    ``sigmoid(logit / T)`` on (dev) ``labels``. The NLL is convex in ``1/T``, so a bounded scalar
    search on ``log T`` finds the optimum. Returns ``{"temperature", "nll_before", "nll_after"}``
    (+ ``note`` when the fit is not meaningful: one class → T=1)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y, _ = _as_arrays(labels, np.full(z.shape, 0.5))
    if not np.isfinite(z).all():
        raise MetricError("logits must be finite")

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        # mean of softplus(s) - y * s, written stably
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    out = {"nll_before": loss(0.0)}
    if len(np.unique(y)) < 2:
        out.update(temperature=1.0, nll_after=out["nll_before"],
                   note="the fitting split has one class: temperature scaling is not identifiable, T=1 kept")
        return out
    res = minimize_scalar(loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-7})
    t = float(math.exp(res.x))
    out.update(temperature=t, nll_after=loss(res.x))
    if out["nll_after"] > out["nll_before"]:  # never worse than no scaling
        out.update(temperature=1.0, nll_after=out["nll_before"])
    elif min(abs(res.x - math.log(b)) for b in bounds) < 1e-3:
        out["note"] = (f"the temperature reached its bound {t:.3g}: the logits carry (almost) no information "
                       f"on the fitting split, or rank it perfectly")
    return out


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_auroc(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """AUROC of each row (ties count 1/2) via average ranks (Mann–Whitney U). NaN for one-class rows."""
    from scipy.stats import rankdata

    ranks = rankdata(P, axis=1, method="average")
    n1 = Y.sum(1).astype(np.float64)
    n0 = Y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * Y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _bootstrap_auprc(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Average precision of each row, as sklearn computes it (tied scores form one threshold)."""
    order = np.argsort(-P, axis=1, kind="stable")
    Ps = np.take_along_axis(P, order, 1)
    Ys = np.take_along_axis(Y, order, 1)
    tp = np.cumsum(Ys, axis=1)
    k = np.arange(1, Y.shape[1] + 1)
    last_of_tie = np.concatenate([Ps[:, :-1] != Ps[:, 1:], np.ones((len(P), 1), bool)], axis=1)
    tp_at = np.where(last_of_tie, tp, 0)
    tp_prev = np.concatenate([np.zeros((len(P), 1), tp.dtype), np.maximum.accumulate(tp_at, axis=1)[:, :-1]], 1)
    n1 = Y.sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(last_of_tie, (tp - tp_prev) * (tp / k), 0.0).sum(1) / n1
    return np.where(n1 > 0, ap, np.nan)


def _bootstrap_f1(Y: np.ndarray, P: np.ndarray, thr: float) -> np.ndarray:
    pred = P >= thr
    tp = (pred & (Y == 1)).sum(1)
    denom = pred.sum(1) + Y.sum(1)  # 2tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 0.0)


def bootstrap_ci(labels, probs, *, threshold: float = 0.5, tuned_threshold: float | None = None,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95, n_bins: int = N_BINS,
                 block_elems: int = 2_000_000) -> dict:
    """Percentile bootstrap confidence intervals (``level``, default 95%) of AUROC, AUPRC, F1 (and
    F1 at ``tuned_threshold``), accuracy, Brier and ECE: ``n_resamples`` seeded resamples of the
    examples with replacement, computed as ``[resamples, n]`` arrays (in blocks of at most
    ``block_elems`` elements). Returns ``{metric: [lo, hi] or None}`` (+ ``note``); thresholds are
    held fixed. Resamples where a metric is undefined (one class) are left out of its interval, and
    the interval is None when more than half are."""
    y, p = _as_arrays(labels, probs)
    n = len(y)
    rng = np.random.default_rng(seed)
    names = ["auroc", "auprc", "f1", "accuracy", "brier", "ece"] + (["f1_tuned"] if tuned_threshold is not None else [])
    values = {k: [] for k in names}
    bins = _bin_index(p, n_bins)
    per_block = max(1, block_elems // n)
    for start in range(0, n_resamples, per_block):
        r = min(per_block, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))  # [r, n]
        Y, P = y[idx], p[idx]
        values["auroc"].append(_bootstrap_auroc(Y, P))
        values["auprc"].append(_bootstrap_auprc(Y, P))
        values["f1"].append(_bootstrap_f1(Y, P, threshold))
        values["accuracy"].append(((P >= threshold) == (Y == 1)).mean(1))
        values["brier"].append(((P - Y) ** 2).mean(1))
        flat = (np.arange(r)[:, None] * n_bins + bins[idx]).ravel()  # one bin range per resample
        gap = np.bincount(flat, weights=(Y - P).ravel(), minlength=r * n_bins).reshape(r, n_bins)
        values["ece"].append(np.abs(gap).sum(1) / n)
        if tuned_threshold is not None:
            values["f1_tuned"].append(_bootstrap_f1(Y, P, tuned_threshold))
    alpha = (1 - level) / 2
    out: dict = {}
    for k, parts in values.items():
        v = np.concatenate(parts)
        ok = v[np.isfinite(v)]
        if len(ok) * 2 < len(v):
            out[k] = None
            add_note(out, f"{k}: undefined in {len(v) - len(ok)}/{len(v)} resamples (one class), no interval")
            continue
        lo, hi = np.quantile(ok, [alpha, 1 - alpha])
        out[k] = [float(lo), float(hi)]
    out["n_resamples"] = int(n_resamples)
    out["level"] = float(level)
    out["seed"] = int(seed)
    return out


# ----------------------------------------------------------------------------- explanations


def cohen_kappa(a, b) -> tuple[float | None, str | None]:
    """Cohen's kappa of two binary ratings (sklearn), or (None, reason) when it is undefined: both
    raters constant and identical (expected agreement 1)."""
    from sklearn.metrics import cohen_kappa_score

    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if len(a) == 0:
        return None, "no ratings"
    if len(np.unique(a)) == 1 and len(np.unique(b)) == 1 and a[0] == b[0]:
        return None, f"both ratings are constant ({int(a[0])}): kappa is undefined (0/0)"
    return float(cohen_kappa_score(a, b, labels=[0, 1])), None


def readability(texts: Sequence[str]) -> dict:
    """Mean Flesch Reading Ease and Flesch–Kincaid grade (textstat) over the non-empty ``texts``."""
    texts = [t for t in texts if t and t.strip()]
    out = {"flesch_reading_ease": None, "flesch_kincaid_grade": None, "readability_n": len(texts)}
    if not texts:
        return out
    try:
        import textstat
    except ImportError:
        out["note"] = "textstat is not installed: readability not computed (pip install 'textstat>=0.7.5,<0.7.9')"
        return out
    out["flesch_reading_ease"] = float(np.mean([textstat.flesch_reading_ease(t) for t in texts]))
    out["flesch_kincaid_grade"] = float(np.mean([textstat.flesch_kincaid_grade(t) for t in texts]))
    return out


def explanation_metrics(probs, verdicts: Sequence[int | None], texts: Sequence[str | None] | None = None, *,
                        threshold: float = 0.5) -> dict:
    """Agreement of explanations with the classification head, over examples that have one.

    ``probs[i]`` is the head's P(y=1), ``verdicts[i]`` the label parsed from explanation ``i``
    (None: unparsable), ``texts[i]`` the explanation without its verdict line (for readability;
    None: not explained). Returns ``explained``, ``verdict_parse_rate``, ``alignment_auroc``
    (head probability scored against the parsed verdict), ``kappa`` and ``agreement`` (head label at
    ``threshold`` vs verdict), readability, and a ``note`` for whatever is undefined."""
    from sklearn.metrics import roc_auc_score

    p = np.asarray(probs, dtype=np.float64)
    if len(p) != len(verdicts) or (texts is not None and len(texts) != len(p)):
        raise MetricError(f"probs, verdicts and texts must have equal lengths, got {len(p)}, {len(verdicts)}, "
                          f"{None if texts is None else len(texts)}")
    explained = len(p) if texts is None else sum(t is not None for t in texts)
    keep = [i for i, v in enumerate(verdicts) if v is not None]
    bad = [i for i in keep if verdicts[i] not in (0, 1) or isinstance(verdicts[i], bool)
           or (texts is not None and texts[i] is None)]
    if bad:
        raise MetricError(f"verdict {verdicts[bad[0]]!r} at index {bad[0]}: verdicts are 0, 1 or None, and None "
                          f"where there is no explanation")
    out: dict = {"explained": int(explained), "verdicts_parsed": len(keep),
                 "verdict_parse_rate": len(keep) / explained if explained else None,
                 "alignment_auroc": None, "kappa": None, "agreement": None}
    if explained == 0:
        add_note(out, "no explanations: explanation metrics not computed")
    elif not keep:
        add_note(out, "no verdict could be parsed: alignment not computed")
    else:
        v = np.asarray([verdicts[i] for i in keep], dtype=np.int64)
        pk = p[keep]
        head = (pk >= threshold).astype(np.int64)
        out["agreement"] = float((head == v).mean())
        if len(np.unique(v)) == 2:
            out["alignment_auroc"] = float(roc_auc_score(v, pk))
        else:
            add_note(out, f"every parsed verdict is {int(v[0])}: alignment AUROC is undefined")
        out["kappa"], why = cohen_kappa(head, v)
        if why:
            add_note(out, why)
    r = readability([t for t in (texts or []) if t is not None])
    if r.pop("note", None):
        add_note(out, "textstat is not installed: readability not computed")
    out.update(r)
    return out
