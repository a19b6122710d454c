"""The evaluation report: ``report.md`` + ``report.html``, PNG plots and the extra ``metrics.json``
keys, from the per-example predictions of a split (plus dev probabilities for calibration).

    OUT/report.md  report.html     every metric with its 95% bootstrap interval, calibration raw vs
                                   temperature-scaled, explanation metrics, language retention, examples
    OUT/roc.png                    ROC curve
    OUT/reliability.png            reliability diagram before / after temperature scaling (15 bins)
    OUT/prob_hist.png              P(y=1) histogram per class

Only numpy, scikit-learn and matplotlib (Agg) here: no model, no process group. ``launch/eval.py``
calls :func:`finalize_metrics` and :func:`write_report` on rank 0.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import (N_BINS, ONE_CLASS_DEV, add_note, apply_temperature, bootstrap_ci, expected_calibration_error,
                      fit_temperature, logits_from_probs, nll, reliability_bins)

log = logging.getLogger("clsgen_dist.report")

CONTRACT_KEYS = ("auroc", "auprc", "f1", "f1_tuned", "accuracy", "brier", "ece", "ece_calibrated", "alignment_auroc",
                 "kappa", "verdict_parse_rate", "flesch_reading_ease", "perplexity_ratio")
"""Keys every ``metrics.json`` from ``launch/eval.py`` has (``None`` where not computable, with a note)."""
PLOTS = ("roc.png", "reliability.png", "prob_hist.png")


def finalize_metrics(metrics: dict, preds: list[dict], *, dev_labels: Sequence[int] | None = None,
                     dev_probs: Sequence[float] | None = None, retention: dict | None = None,
                     n_resamples: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """Adds temperature scaling (fitted on dev), calibrated ECE/Brier/NLL, bootstrap ``ci95`` and
    the retention figures to ``metrics`` (a copy). Returns (metrics, arrays for the plots)."""
    m = dict(metrics)
    y = np.asarray([r["label"] for r in preds], dtype=np.int64)
    p = np.asarray([r["prob"] for r in preds], dtype=np.float64)
    arrays = {"labels": y, "probs": p, "probs_calibrated": None}
    m.update(temperature=None, ece_calibrated=None, brier_calibrated=None, nll_calibrated=None)
    if dev_labels is not None and dev_probs is not None and len(dev_labels):
        fit = fit_temperature(dev_labels, logits_from_probs(dev_probs))
        pc = apply_temperature(logits_from_probs(p), fit["temperature"])
        arrays["probs_calibrated"] = pc
        m.update(temperature=fit["temperature"], dev_nll_before=fit["nll_before"], dev_nll_after=fit["nll_after"],
                 ece_calibrated=expected_calibration_error(y, pc), brier_calibrated=float(np.mean((pc - y) ** 2)),
                 nll_calibrated=nll(y, pc))
        if fit.get("note"):
            add_note(m, fit["note"])
        if m.get("threshold_tuned") is None:
            add_note(m, ONE_CLASS_DEV)
    else:
        add_note(m, "no dev split: the F1 threshold and the temperature were not tuned")
    if n_resamples > 0:
        ci = bootstrap_ci(y, p, tuned_threshold=m.get("threshold_tuned"), n_resamples=n_resamples, seed=seed)
    else:  # --bootstrap 0: no intervals (every ci95 entry reads "n/a")
        ci = {"n_resamples": 0, "level": None, "seed": None}
    if ci.get("note"):
        add_note(m, "bootstrap: " + ci.pop("note"))
    m["ci95"] = ci
    if retention:
        m.update(retention)
    for k in CONTRACT_KEYS:
        m.setdefault(k, None)
    return m, arrays


# ----------------------------------------------------------------------------- plots


def _plots(out: Path, arrays: dict, metrics: dict, label_names: Sequence[str]) -> tuple[list[str], str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots"
    from sklearn.metrics import roc_curve

    y, p, pc = arrays["labels"], arrays["probs"], arrays["probs_calibrated"]
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics['auroc']:.3f}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    written.append("roc.png")

    panels = [("raw", p, metrics["ece"])]
    if pc is not None:
        panels.append((f"temperature-scaled (T={metrics['temperature']:.3f})", pc, metrics["ece_calibrated"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, q, e) in zip(axes[0], panels):
        b = reliability_bins(y, q, n_bins=N_BINS)
        centers = (np.asarray(b["edges"][:-1]) + np.asarray(b["edges"][1:])) / 2
        ax.bar(centers, np.nan_to_num(b["frac_pos"]), width=1 / N_BINS, edgecolor="k", alpha=0.7,
               label="observed P(y=1)")
        ax.plot(b["mean_prob"], b["frac_pos"], "o", color="C1", ms=4, label="bin mean prob.")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlabel="predicted P(y=1)", ylabel="observed fraction positive", xlim=(0, 1), ylim=(0, 1),
               title=f"{name}\nECE {e:.3f} ({N_BINS} equal-width bins)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    written.append("reliability.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    bins = np.linspace(0, 1, 21)
    for k in (0, 1):
        ax.hist(p[y == k], bins=bins, alpha=0.6, label=f"label {k} ({label_names[k]}), n={(y == k).sum()}")
    ax.set(xlabel="predicted P(y=1)", ylabel="examples", title="probability by true class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prob_hist.png", dpi=110)
    plt.close(fig)
    written.append("prob_hist.png")
    return written, None


# ----------------------------------------------------------------------------- document


def _f(x, nd: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ci(m: dict, k: str) -> str:
    c = m.get("ci95", {}).get(k)
    return f"[{c[0]:.4f}, {c[1]:.4f}]" if c else "n/a"


def _blocks(m: dict, preds: list[dict], plots: list[str], meta: dict, label_names: Sequence[str],
            examples: int) -> list[tuple]:
    """The report as ("h", text) / ("p", text) / ("table", header, rows) / ("img", file, alt) blocks,
    rendered to markdown and HTML alike."""
    thr = m.get("threshold_tuned")
    ci = m.get("ci95", {})
    b: list[tuple] = [("h1", "CLSGen evaluation report")]
    b.append(("table", ["", ""], [[k, _f(v)] for k, v in meta.items()]
              + [["examples (positives)", f"{m['n']} ({m['positives']})"],
                 ["probability from", m.get("prob_source", "head")]]))
    b.append(("h2", "Classification"))
    b.append(("p", f"95% intervals: percentile bootstrap, {ci.get('n_resamples')} resamples (seed {ci.get('seed')}), "
                   f"thresholds held fixed." if ci.get("n_resamples") else "No intervals (--bootstrap 0)."))
    b.append(("table", ["metric", "value", "95% CI"], [
        ["AUROC", _f(m["auroc"]), _ci(m, "auroc")],
        ["AUPRC (average precision)", _f(m["auprc"]), _ci(m, "auprc")],
        [f"F1 @ {m.get('threshold', 0.5):g}", _f(m["f1"]), _ci(m, "f1")],
        [f"F1 @ dev-tuned {_f(thr, 3)}", _f(m.get("f1_tuned")), _ci(m, "f1_tuned")],
        [f"accuracy @ {m.get('threshold', 0.5):g}", _f(m["accuracy"]), _ci(m, "accuracy")],
        ["Brier", _f(m["brier"]), _ci(m, "brier")],
        [f"ECE ({N_BINS} equal-width bins)", _f(m["ece"]), _ci(m, "ece")],
    ]))
    b.append(("h2", "Calibration: temperature scaling fitted on dev"))
    b.append(("p", "One parameter T, P = sigmoid(logit / T), T minimising the dev NLL; AUROC is unchanged by it."))
    b.append(("table", ["", "raw", f"calibrated (T = {_f(m.get('temperature'), 3)})"], [
        ["ECE", _f(m["ece"]), _f(m.get("ece_calibrated"))],
        ["Brier", _f(m["brier"]), _f(m.get("brier_calibrated"))],
        ["NLL", _f(m.get("nll")), _f(m.get("nll_calibrated"))],
    ]))
    if "reliability.png" in plots:
        b.append(("img", "reliability.png", "reliability diagram, raw and temperature-scaled"))
    b.append(("h2", "Explanations"))
    b.append(("p", "Verdict parsed from each generated explanation; alignment = the probability scored against "
                   "the parsed verdict (AUROC) and the thresholded (0.5) label against it (Cohen's kappa). "
                   "Readability (textstat) of the explanation text before its verdict line, averaged."))
    b.append(("table", ["metric", "value"], [
        ["explained examples", _f(m.get("explained"))],
        ["verdict parse rate", _f(m.get("verdict_parse_rate"))],
        ["alignment AUROC", _f(m.get("alignment_auroc"))],
        ["Cohen's kappa (head label vs verdict)", _f(m.get("kappa"))],
        ["raw agreement", _f(m.get("agreement"))],
        ["Flesch Reading Ease", _f(m.get("flesch_reading_ease"), 1)],
        ["Flesch–Kincaid grade", _f(m.get("flesch_kincaid_grade"), 1)],
    ]))
    b.append(("h2", "Language retention"))
    if m.get("perplexity_ratio") is not None:
        b.append(("p", f"Perplexity on general English text that no model here trains on: {m['perplexity_text']}; "
                       f"{m['perplexity_tokens']} tokens in windows of {m['perplexity_window']}."))
        b.append(("table", ["", "value"], [["perplexity (this model)", _f(m["perplexity"], 3)],
                                           ["perplexity (base model)", _f(m["perplexity_base"], 3)],
                                           ["ratio (this / base)", _f(m["perplexity_ratio"], 4)]]))
    else:
        b.append(("p", "Not measured (--ppl-tokens 0)."))
    if plots:
        b.append(("h2", "Plots"))
        for f in plots:
            if f != "reliability.png":
                b.append(("img", f, f[:-4]))
    shown = [r for r in preds if r.get("explanation")][:examples]
    if shown:
        b.append(("h2", "Examples"))
        rows = [[str(r["id"]), label_names[r["label"]], f"{r['prob']:.3f}",
                 "n/a" if r["verdict"] is None else label_names[r["verdict"]],
                 r["explanation"].replace("\n", " ")] for r in shown]
        b.append(("table", ["id", "label", "P(y=1)", "verdict", "explanation"], rows))
    if m.get("note"):
        b.append(("h2", "Notes"))
        b.append(("p", m["note"]))
    return b


def _md(blocks: list[tuple]) -> str:
    out = []
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}\n")
        elif kind == "h2":
            out.append(f"## {blk[1]}\n")
        elif kind == "p":
            out.append(f"{blk[1]}\n")
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(blk[1])}</p>")
        elif kind == "img":
            body.append(f'<p><img src="{e(blk[1])}" alt="{e(blk[2])}"></p>')
        elif kind == "table":
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            head = "".join(f"<th>{e(str(c))}</th>" for c in blk[1])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir: str | Path, metrics: dict, preds: list[dict], arrays: dict, *,
                 label_names: Sequence[str] = ("0", "1"), meta: dict | None = None, examples: int = 5) -> list[Path]:
    """Writes the PNGs, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, why = _plots(out, arrays, metrics, label_names)
    if why:
        log.warning(why)
    meta = {**(meta or {}), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    blocks = _blocks(metrics, preds, plots, meta, label_names, examples)
    (out / "report.md").write_text(_md(blocks), encoding="utf-8")
    (out / "report.html").write_text(_html(blocks, "CLSGen evaluation report"), encoding="utf-8")
    return [out / "report.md", out / "report.html", *(out / f for f in plots)]
