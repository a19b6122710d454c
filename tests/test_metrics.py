"""Metrics against independent computations on fixed small inputs (ties and one-class inputs
included), temperature scaling, the bootstrap, and the verdict parser."""

import itertools
import math

import numpy as np
import pytest

from clsgen_dist import metrics as M
from clsgen_dist.baselines import explanation_body
from clsgen_dist.predict import parse_verdict

# ties inside a class and across classes; 1.0 and bin edges for ECE
Y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 1.0, 0.2, 0.9, 1 / 15, 0.65, 0.8])


def pairwise_auroc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


def naive_ece(y, p, n_bins=15):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inb = [i for i in range(len(p)) if lo <= p[i] < hi or (b == n_bins - 1 and p[i] == 1.0)]
        if inb:
            total += len(inb) / len(p) * abs(np.mean(y[inb]) - np.mean(p[inb]))
    return total


def naive_ap(y, p):
    """Average precision by its definition: sum over distinct thresholds of (R_k - R_{k-1}) P_k."""
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(p), reverse=True):
        pred = p >= t
        tp = (pred & (y == 1)).sum()
        r, prec = tp / (y == 1).sum(), tp / pred.sum()
        ap += (r - prev_r) * prec
        prev_r = r
    return ap


def manual_kappa(a, b):
    a, b = np.asarray(a), np.asarray(b)
    po = (a == b).mean()
    pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    return (po - pe) / (1 - pe)


def test_classification_metrics_match_independent_computations():
    m = M.classification_metrics(Y, P, tuned_threshold=0.4)
    assert m["auroc"] == pytest.approx(pairwise_auroc(Y, P), abs=1e-12)
    assert m["auprc"] == pytest.approx(naive_ap(Y, P), abs=1e-12)
    assert m["ece"] == pytest.approx(naive_ece(Y, P), abs=1e-12)
    assert m["ece_bins"] == 15
    assert m["brier"] == pytest.approx(np.mean((P - Y) ** 2), abs=1e-12)
    pred = P >= 0.5
    tp, fp, fn = (pred & (Y == 1)).sum(), (pred & (Y == 0)).sum(), (~pred & (Y == 1)).sum()
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["accuracy"] == pytest.approx((pred == Y).mean())
    pred = P >= 0.4  # the tuned threshold includes the tied 0.4s
    tp, fp, fn = (pred & (Y == 1)).sum(), (pred & (Y == 0)).sum(), (~pred & (Y == 1)).sum()
    assert m["f1_tuned"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["nll"] == pytest.approx(-np.mean(Y * np.log(np.clip(P, 1e-12, 1)) + (1 - Y) * np.log(np.clip(1 - P, 1e-12, 1))))


def test_reliability_bins_and_ece_agree():
    b = M.reliability_bins(Y, P)
    assert sum(b["count"]) == len(Y) and len(b["count"]) == 15
    ece = sum(c / len(Y) * abs(f - q) for c, f, q in zip(b["count"], b["frac_pos"], b["mean_prob"]) if c)
    assert ece == pytest.approx(naive_ece(Y, P))


def test_one_class_inputs_give_notes_not_crashes():
    m = M.classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert m["auroc"] is None and "one class" in m["note"] and m["auprc"] == pytest.approx(1.0)
    m = M.classification_metrics([0, 0], [0.2, 0.7])
    assert m["auroc"] is None and m["auprc"] is None and "no positives" in m["note"]
    ci = M.bootstrap_ci([1, 1, 1, 1], [0.2, 0.7, 0.9, 0.5], n_resamples=50)
    assert ci["auroc"] is None and ci["auprc"] is not None and "auroc" in ci["note"]
    fit = M.fit_temperature([1, 1, 1], [0.5, 2.0, 1.0])
    assert fit["temperature"] == 1.0 and "one class" in fit["note"]
    e = M.explanation_metrics([0.9, 0.8, 0.7], [1, 1, 1], ["Good.", "Fine.", "Nice."])
    assert e["alignment_auroc"] is None and e["kappa"] is None and "every parsed verdict is 1" in e["note"]
    assert e["agreement"] == 1.0


def test_malformed_inputs_raise_metric_error():
    with pytest.raises(M.MetricError, match="equal length"):
        M.classification_metrics([0, 1], [0.5])
    with pytest.raises(M.MetricError, match="no examples"):
        M.classification_metrics([], [])
    with pytest.raises(M.MetricError, match="in \\[0, 1\\]"):
        M.classification_metrics([0, 1], [0.5, 1.5])
    # checked before any cast to int: 0.9 must not become 0, nor 2 pass as a class
    with pytest.raises(M.MetricError, match="labels must be 0 or 1, got 0.2, 0.9"):
        M.classification_metrics([0.9, 0.2, 1], [0.1, 0.2, 0.8])
    with pytest.raises(M.MetricError, match="labels must be 0 or 1, got 2"):
        M.tune_threshold([0, 2], [0.1, 0.2])
    # a verdict needs an explanation to come from (the parse rate reached 3.0 this way)
    with pytest.raises(M.MetricError, match="verdict 1 at index 1"):
        M.explanation_metrics([0.2, 0.9], [0, 1], ["No.", None])
    with pytest.raises(M.MetricError, match="verdict 2 at index 0"):
        M.explanation_metrics([0.2], [2], ["Hm."])
    assert M.classification_metrics([0.0, 1.0], [0.1, 0.8])["auroc"] == 1.0  # float 0/1 labels are fine


def test_tuned_threshold_is_the_smallest_f1_best_one():
    """Against a brute force over every distinct probability, ties included (0.32 and 0.39 tie)."""
    from sklearn.metrics import f1_score

    assert M.tune_threshold([0, 0, 1, 1, 0, 1], [0.36, 0.57, 0.32, 0.59, 0.34, 0.39]) == pytest.approx(0.32)
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(4, 30))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = rng.integers(0, 8, n) / 8  # coarse: many ties
        f1 = {t: f1_score(y, p >= t) for t in sorted(set(p))}
        best = max(f1.values())
        assert M.tune_threshold(y, p) == pytest.approx(min(t for t, v in f1.items() if v == best))


def test_dev_tuned_threshold_is_none_for_one_class_dev():
    from clsgen_dist.report import finalize_metrics

    assert M.tune_threshold([1, 1], [0.3, 0.8]) is None
    assert M.tune_threshold([0, 1, 1], [0.3, 0.2, 0.8]) == pytest.approx(0.2)
    preds = [{"label": i % 2, "prob": p} for i, p in enumerate([0.2, 0.7, 0.4, 0.9])]
    metrics = M.classification_metrics([r["label"] for r in preds], [r["prob"] for r in preds], tuned_threshold=None)
    m, _ = finalize_metrics(metrics, preds, dev_labels=[1, 1], dev_probs=[0.3, 0.8], n_resamples=0)
    assert m.get("threshold_tuned") is None and m["f1_tuned"] is None
    assert "the dev split holds one class: the F1 threshold was not tuned" in m["note"]


def test_bootstrap_vectorised_equals_a_loop_over_the_same_resamples():
    """The vectorised AUROC/AUPRC/ECE/F1 per resample (ties included) equal sklearn + the naive
    ECE on the very same resampled indices; the interval is their percentile."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    R = 200
    ci = M.bootstrap_ci(Y, P, tuned_threshold=0.4, n_resamples=R, seed=3)
    idx = np.random.default_rng(3).integers(0, len(Y), size=(R, len(Y)))
    ref = {k: [] for k in ("auroc", "auprc", "ece", "f1", "f1_tuned", "brier", "accuracy")}
    for row in idx:
        y, p = Y[row], P[row]
        if len(set(y)) == 2:
            ref["auroc"].append(roc_auc_score(y, p))
        if y.sum():
            ref["auprc"].append(average_precision_score(y, p))
        ref["ece"].append(naive_ece(y, p))
        ref["f1"].append(f1_score(y, p >= 0.5, zero_division=0))
        ref["f1_tuned"].append(f1_score(y, p >= 0.4, zero_division=0))
        ref["brier"].append(np.mean((p - y) ** 2))
        ref["accuracy"].append(np.mean((p >= 0.5) == y))
    for k, v in ref.items():
        assert ci[k] == pytest.approx(list(np.quantile(v, [0.025, 0.975])), abs=1e-12), k
    # row-level agreement of the two ranking metrics, ties and all
    Yr, Pr = Y[idx[:20]], P[idx[:20]]
    auc = M._bootstrap_auroc(Yr, Pr)
    ap = M._bootstrap_auprc(Yr, Pr)
    for i in range(20):
        if len(set(Yr[i])) == 2:
            assert auc[i] == pytest.approx(pairwise_auroc(Yr[i], Pr[i]), abs=1e-12)
            assert ap[i] == pytest.approx(naive_ap(Yr[i], Pr[i]), abs=1e-12)
    assert M.bootstrap_ci(Y, P, n_resamples=R, seed=3) == M.bootstrap_ci(Y, P, n_resamples=R, seed=3, block_elems=100)


def test_temperature_scaling_minimises_nll_against_a_grid():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    z = (2 * y - 1) * 3.0 + rng.normal(0, 2.5, 300)  # over-confident logits: T > 1 expected
    fit = M.fit_temperature(y, z)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    nlls = [np.mean(np.logaddexp(0, z / t) - y * z / t) for t in grid]
    t_grid = grid[int(np.argmin(nlls))]
    assert fit["temperature"] == pytest.approx(t_grid, rel=5e-3)
    assert fit["temperature"] > 1 and fit["nll_after"] <= fit["nll_before"]
    assert fit["nll_after"] == pytest.approx(min(nlls), abs=1e-7)
    p = M.apply_temperature(z, fit["temperature"])
    assert p == pytest.approx(1 / (1 + np.exp(-z / fit["temperature"])))
    assert M.logits_from_probs(1 / (1 + np.exp(-z))) == pytest.approx(z, abs=1e-6)
    noise = M.fit_temperature([0, 0, 1, 1], [1.0, -1.0, 1.0, -1.0])  # no information: T -> the upper bound
    assert noise["temperature"] == pytest.approx(100, rel=1e-2) and "bound" in noise["note"]


def test_kappa_and_alignment_match_manual_computations():
    head = [1, 1, 0, 0, 1, 0, 1, 1]
    verd = [1, 0, 0, 0, 1, 1, 1, 1]
    k, why = M.cohen_kappa(head, verd)
    assert why is None and k == pytest.approx(manual_kappa(head, verd), abs=1e-12)
    assert M.cohen_kappa([1, 1], [1, 1]) == (None, "both ratings are constant (1): kappa is undefined (0/0)")
    assert M.cohen_kappa([1, 1], [0, 0])[0] == pytest.approx(0.0)
    probs = [0.9, 0.6, 0.4, 0.2, 0.7, 0.3, 0.8, 0.6]
    verdicts = [1, 0, 0, None, 1, 1, 1, None]  # two unparsable
    texts = ["A fine film."] * 8
    e = M.explanation_metrics(probs, verdicts, texts)
    keep = [i for i, v in enumerate(verdicts) if v is not None]
    pv, vv = np.array(probs)[keep], np.array(verdicts)[keep]
    assert e["explained"] == 8 and e["verdict_parse_rate"] == pytest.approx(6 / 8)
    assert e["alignment_auroc"] == pytest.approx(pairwise_auroc(vv, pv))
    assert e["kappa"] == pytest.approx(manual_kappa((pv >= 0.5).astype(int), vv))
    # unexplained examples (None text) do not count towards the parse rate
    e = M.explanation_metrics([0.9, 0.1, 0.5], [1, None, None], ["Good.", "Meh.", None])
    assert e["explained"] == 2 and e["verdict_parse_rate"] == 0.5


def test_readability_is_textstats():
    textstat = pytest.importorskip("textstat")
    texts = ["The acting is warm and the script is sharp. It is a joy to watch.",
             "Notwithstanding considerable cinematographic ambition, the narrative disintegrates."]
    r = M.readability(texts + ["", "  "])
    assert r["readability_n"] == 2
    assert r["flesch_reading_ease"] == pytest.approx(np.mean([textstat.flesch_reading_ease(t) for t in texts]))
    assert r["flesch_kincaid_grade"] == pytest.approx(np.mean([textstat.flesch_kincaid_grade(t) for t in texts]))
    assert M.readability([])["flesch_reading_ease"] is None


@pytest.mark.parametrize("text,expected", [
    ("The review praises the cast.\nVerdict: positive", 1),
    ("Dull.\nverdict: **Negative**", 0),
    ("Verdict: positive ... on reflection.\nVerdict: negative", 0),  # the last verdict line wins
    ("A positive start, a negative end, no verdict line.", None),
    ("Verdict: maybe", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text, ["negative", "positive"], "Verdict: {label}") == expected


def test_explanation_body_drops_the_last_verdict():
    t = "Good acting.\nVerdict: positive"
    assert explanation_body(t, "Verdict: {label}") == "Good acting."
    assert explanation_body("No verdict here.", "Verdict: {label}") == "No verdict here."
    assert explanation_body("verdict: positive", "Verdict: {label}") == ""
    assert math.isclose(M.expected_calibration_error([1], [1.0]), 0.0)


def test_logit_to_probability_is_stable_at_both_ends():
    """Evaluation and prediction turn head logits into P(y=1) with this; a very confident logit
    must give 0 or 1, not an OverflowError from math.exp."""
    from scipy.special import expit

    from clsgen_dist.predict import sigmoid

    xs = [-800.0, -40.0, -3.5, -1e-9, 0.0, 2.25, 40.0, 800.0]
    assert [sigmoid(x) for x in xs] == pytest.approx(expit(np.array(xs)).tolist(), rel=1e-15, abs=0)
