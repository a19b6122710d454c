"""The report builds from a tiny real run (launch/train.py, then launch/eval.py) and contains every
listed metric and plot; it also builds from hand-made predictions, one-class ones included."""

import json

import numpy as np
import pytest

from clsgen_dist.report import CONTRACT_KEYS, PLOTS, finalize_metrics, write_report
from tests.conftest import review_splits
from tests.integration._run import REPO, launch, read_jsonl

PNG = b"\x89PNG\r\n\x1a\n"
REPORT_LABELS = ["AUROC", "AUPRC", "F1 @ 0.5", "F1 @ dev-tuned", "accuracy", "Brier", "ECE (15 equal-width bins)",
                 "calibrated (T =", "verdict parse rate", "alignment AUROC", "Cohen's kappa", "Flesch Reading Ease",
                 "Flesch–Kincaid grade", "ratio (this / base)", "95% CI", "reliability.png", "roc.png", "prob_hist.png"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_splits(tmp_path_factory.mktemp("report-data"), repeats=3, dev=slice(0, 12), test=slice(12, 24))


def _check_report(out, *, mode):
    for f in ("report.md", "report.html", "metrics.json", "predictions.jsonl"):
        assert (out / f).is_file(), f
    for f in PLOTS:
        assert (out / f).read_bytes()[:8] == PNG, f
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == mode
    assert set(CONTRACT_KEYS) <= m.keys()
    for k in ("auroc", "auprc", "f1", "f1_tuned", "accuracy", "brier", "ece"):
        lo, hi = m["ci95"][k]
        assert lo <= hi, k
    assert m["ci95"]["n_resamples"] == 200
    md = (out / "report.md").read_text()
    for label in REPORT_LABELS:
        assert label in md, label
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="roc.png"' in html
    return m


def test_report_from_a_tiny_run(tiny_dir, data, tmp_path):
    run = tmp_path / "run"
    launch("train.py", ["--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={tiny_dir}",
                        f"data.train_file={data['train']}", f"data.dev_file={data['dev']}",
                        f"data.test_file={data['test']}", f"output_dir={run}", "train.eval_every=0",
                        "eval.at_end=false"])
    assert (run / "final/COMPLETE").is_file() and not (run / "eval").exists()  # eval.py below does it
    out = tmp_path / "eval"
    launch("eval.py", ["--checkpoint", str(run / "final"), "--data", str(data["test"]), "--dev", str(data["dev"]),
                       "--output", str(out), "--explain-limit", "3", "--ppl-tokens", "300", "--bootstrap", "200"])
    m = _check_report(out, mode="clsgen")
    assert m["n"] == 12 and m["explained"] == 3 and 0 <= m["verdict_parse_rate"] <= 1
    assert m["temperature"] > 0 and m["ece_calibrated"] is not None
    assert m["perplexity_ratio"] == pytest.approx(m["perplexity"] / m["perplexity_base"])
    assert m["perplexity_tokens"] == 299 and "convention speeches" in m["perplexity_text"]
    assert m["flesch_reading_ease"] is not None
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 12 and preds[0]["explanation"] is not None and preds[3]["explanation"] is None
    from sklearn.metrics import roc_auc_score

    assert m["auroc"] == pytest.approx(roc_auc_score([r["label"] for r in preds], [r["prob"] for r in preds]))

    # a failed rerun into the same folder removes metrics.json: the old one must not vouch for it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 7}\n')
    proc = launch("eval.py", ["--checkpoint", str(run / "final"), "--data", str(bad), "--output", str(out),
                              "--ppl-tokens", "0"], check=False)
    assert proc.returncode == 2 and f"{bad}: line 1: field 'label' = 7 is not a label" in proc.stderr
    assert not (out / "metrics.json").exists()

    # zero-shot: the base model of the same config, no checkpoint; its perplexity ratio is 1
    zs = tmp_path / "zs"
    launch("eval.py", ["--mode", "zero_shot", "--config", "launch/configs/tiny_cpu.yaml",
                       f"model.name_or_path={tiny_dir}", "--data", str(data["test"]), "--dev", str(data["dev"]),
                       "--output", str(zs), "--explain-limit", "2", "--ppl-tokens", "200", "--bootstrap", "200"])
    mz = _check_report(zs, mode="zero_shot")
    assert mz["prob_source"] == "prompt" and mz["perplexity_ratio"] == 1.0
    assert all(0 < r["prob"] < 1 for r in read_jsonl(zs / "predictions.jsonl"))


def test_report_from_predictions_with_one_class(tmp_path):
    preds = [{"id": str(i), "label": 1, "prob": p, "explanation": "Good film.\nVerdict: positive", "verdict": 1}
             for i, p in enumerate([0.2, 0.7, 0.9, 0.6])]
    base = {"n": 4, "positives": 4, "auroc": None, "auprc": 1.0, "f1": 0.85, "accuracy": 0.75, "brier": 0.1,
            "ece": 0.4, "threshold": 0.5, "note": "only one class present"}
    m, arrays = finalize_metrics(base, preds, dev_labels=[1, 1], dev_probs=[0.6, 0.8], n_resamples=50)
    assert m["ci95"]["auroc"] is None and "one class" in m["note"] and m["temperature"] == 1.0
    assert set(CONTRACT_KEYS) <= m.keys() and m["perplexity_ratio"] is None
    files = write_report(tmp_path, m, preds, arrays, label_names=["negative", "positive"])
    assert all(f.is_file() for f in files)
    assert "one class only" not in (tmp_path / "report.md").read_text()  # that text is inside the ROC image
    assert "only one class present" in (tmp_path / "report.md").read_text()
    assert np.array_equal(arrays["labels"], [1, 1, 1, 1])


def test_no_bootstrap_gives_a_report_without_intervals(tmp_path, capsys):
    """``--bootstrap 0`` (no intervals) used to crash inside the bootstrap; a negative count is a
    user error."""
    rng = np.random.default_rng(0)
    preds = [{"id": str(i), "label": int(i % 2), "prob": float(p), "explanation": None, "verdict": None}
             for i, p in enumerate(rng.uniform(size=20))]
    base = {"n": 20, "positives": 10, "auroc": 0.5, "auprc": 0.5, "f1": 0.5, "accuracy": 0.5, "brier": 0.3,
            "ece": 0.2, "threshold": 0.5}
    m, arrays = finalize_metrics(base, preds, n_resamples=0)
    assert m["ci95"]["n_resamples"] == 0 and m["ci95"].get("auroc") is None
    write_report(tmp_path, m, preds, arrays, label_names=["negative", "positive"])
    md = (tmp_path / "report.md").read_text()
    assert "No intervals (--bootstrap 0)." in md and "| AUROC | 0.5000 | n/a |" in md

    from clsgen_dist.cli import eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--bootstrap", "-5"])
    assert e.value.code == 2 and "--bootstrap: expected an integer >= 0, got '-5'" in capsys.readouterr().err


def test_compare_with_relative_paths_from_another_folder(tiny_dir, data, tmp_path, monkeypatch):
    """Relative --config, --output and data paths, from a folder other than the repository: the
    mode runs read and write where the caller's paths point (they ran in the repository before)."""
    import shutil

    from clsgen_dist.compare import main

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "launch/configs/tiny_cpu.yaml", "my.yaml")
    shutil.copy(data["test"], "test.jsonl")
    assert main(["--config", "my.yaml", "--modes", "zero_shot", "--output", "cmp", f"model.name_or_path={tiny_dir}",
                 f"data.train_file={data['train']}", "data.test_file=test.jsonl", "data.dev_file=null",
                 "--ppl-tokens", "0", "--bootstrap", "0", "--explain-limit", "0"]) == 0
    records = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["mode"] for r in records] == ["zero_shot"] and records[0]["n"] > 0
    assert not (REPO / "cmp").exists()


def test_compare_dry_run_plans_every_mode(tiny_dir, data, capsys):
    from clsgen_dist.compare import main

    assert main(["--dry-run", "--output", "/tmp/never-written", "--config", "launch/configs/tiny_cpu.yaml",
                 f"model.name_or_path={tiny_dir}", f"data.train_file={data['train']}", f"data.dev_file={data['dev']}",
                 f"data.test_file={data['test']}", "--steps", "3", "--lr", "1e-3", "--finetune", "full"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7  # 3 trainings + 4 evaluations
    train = [x for x in lines if "launch/train.py" in x]
    assert all("train.max_steps=3" in x and "model.finetune=full" in x and "train.learning_rate=0.001" in x
               and "eval.at_end=false" in x for x in train)
    assert "train.lm_weight=0" in train[1] and "train.cls_weight=0" in train[2]
    assert "--mode zero_shot" in lines[-1] and "--checkpoint" not in lines[-1]
    assert all(f"--data {data['test']}" in x and f"--dev {data['dev']}" in x for x in lines if "eval.py" in x)
    # its own train file and no test file: nothing to evaluate on, one line before any run
    with pytest.raises(SystemExit) as e:
        main(["--dry-run", "--output", "/tmp/never-written", "--config", "launch/configs/tiny_cpu.yaml",
              f"model.name_or_path={tiny_dir}", f"data.train_file={data['train']}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "launch/configs/tiny_cpu.yaml: data.test_file is required to compare the modes" in err


def test_temperature_is_fitted_on_dev_and_applied_to_test():
    """T minimises the dev NLL (a grid search agrees), does not depend on the test labels, and the
    calibrated test figures are sigmoid(logit(p) / T) scored by hand."""
    rng = np.random.default_rng(0)

    def split(n, sharpen):  # over-confident probabilities: logits 3x too large
        y = rng.integers(0, 2, n)
        z = sharpen * (rng.normal(0, 1, n) + (2 * y - 1) * 0.8)
        return y, 1 / (1 + np.exp(-z))

    dev_y, dev_p = split(400, 3.0)
    y, p = split(300, 3.0)
    preds = [{"label": int(a), "prob": float(b)} for a, b in zip(y, p)]
    m, arrays = finalize_metrics({}, preds, dev_labels=dev_y.tolist(), dev_probs=dev_p.tolist(), n_resamples=0)
    dz = np.log(dev_p) - np.log1p(-dev_p)
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 4001))
    nll = [np.mean(np.logaddexp(0, dz / t) - dev_y * dz / t) for t in grid]
    assert m["temperature"] == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    assert m["temperature"] > 1.5  # over-confidence is softened, not sharpened
    flipped = [{"label": 1 - r["label"], "prob": r["prob"]} for r in preds]
    assert finalize_metrics({}, flipped, dev_labels=dev_y.tolist(), dev_probs=dev_p.tolist(),
                            n_resamples=0)[0]["temperature"] == m["temperature"]
    z = np.log(p) - np.log1p(-p)
    pc = 1 / (1 + np.exp(-z / m["temperature"]))
    np.testing.assert_allclose(arrays["probs_calibrated"], pc, rtol=1e-12)
    assert m["brier_calibrated"] == pytest.approx(np.mean((pc - y) ** 2), rel=1e-12)
    bins = np.minimum((pc * 15).astype(int), 14)
    ece = sum(abs(pc[bins == b].mean() - y[bins == b].mean()) * (bins == b).mean() for b in range(15) if (bins == b).any())
    assert m["ece_calibrated"] == pytest.approx(ece, rel=1e-9)


def test_perplexity_equals_the_models_own_language_modeling_loss(tiny_dir, tokenizer):
    """Summed next-token NLL over the windows, against transformers' own shifted loss
    (``labels=input_ids``) window by window."""
    import torch
    from transformers import AutoModelForCausalLM

    from clsgen_dist.retention import _windows, perplexity

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    windows = _windows(tokenizer, 300, 128)
    nll, n = perplexity(lm, windows)
    assert n == sum(len(w) - 1 for w in windows) == 300 - len(windows)  # every window's first token has no target
    with torch.no_grad():
        ref = sum(lm(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.double().item() * (len(w) - 1)
                  for w in windows)
    assert nll == pytest.approx(ref, rel=1e-6)
