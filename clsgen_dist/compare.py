"""``launch/compare.py``: CLSGen and its baselines on the same data, seed and step budget, side by side.

    python launch/compare.py --output runs/cmp                                   # the embedded default
    python launch/compare.py --config my.yaml --steps 150 --lr 1e-4 --finetune full --output runs/stress
    python launch/compare.py --modes clsgen,zero_shot train.max_steps=20 data.test_limit=64 --output runs/q

Each trained mode is one ``launch/train.py`` run in a subprocess with the same config and overrides
plus its own loss weights (``cls_only``: ``train.lm_weight=0``; ``gen_only``:
``train.cls_weight=0``); ``zero_shot`` trains nothing. Each is then evaluated by ``launch/eval.py``
on the same test and dev files (the run config's, else the embedded Rotten Tomatoes splits), with
its own probability source (see :mod:`clsgen_dist.baselines`). Writes::

    OUT/<mode>/run/      the training run (config, logs, final/ checkpoint)
    OUT/<mode>/eval/     metrics.json, predictions.jsonl, report.md/.html, plots
    OUT/<mode>/*.log     the subprocesses' output
    OUT/compare.json     one record per mode: {"mode", ..., every metrics.json value}
    OUT/compare.md       the side-by-side table, the regime, the command, machine and versions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .baselines import MODES, TRAIN_OVERRIDES
from .fileio import check_output_path

REPO = Path(__file__).resolve().parent.parent
TABLE = [  # (key, label, digits)
    ("auroc", "AUROC", 4), ("auprc", "AUPRC", 4), ("f1", "F1 @0.5", 4), ("f1_tuned", "F1 @dev thr", 4),
    ("accuracy", "accuracy", 4), ("brier", "Brier", 4), ("ece", "ECE (15 bins)", 4),
    ("ece_calibrated", "ECE after T-scaling", 4), ("temperature", "temperature", 3),
    ("verdict_parse_rate", "verdict parse rate", 3), ("alignment_auroc", "alignment AUROC", 4),
    ("kappa", "Cohen's kappa", 4), ("flesch_reading_ease", "Flesch Reading Ease", 1),
    ("flesch_kincaid_grade", "Flesch-Kincaid grade", 1), ("perplexity", "general-text perplexity", 3),
    ("perplexity_ratio", "perplexity ratio (vs base)", 4), ("train_s", "train wall time (s)", 0),
    ("eval_s", "eval wall time (s)", 0),
]


def _parser() -> argparse.ArgumentParser:
    from .cli import int_at_least

    p = argparse.ArgumentParser(description="Train and evaluate CLSGen and the baselines (cls_only, gen_only, "
                                "zero_shot) with the same data, seed and step budget; write a side-by-side table.")
    p.add_argument("--config", default=None, help="YAML run config (default: launch/configs/default.yaml)")
    p.add_argument("--output", required=True, help="folder for the runs, compare.json and compare.md")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=None, help="regime: train.max_steps")
    p.add_argument("--lr", type=float, default=None, help="regime: train.learning_rate")
    p.add_argument("--finetune", choices=["lora", "full"], default=None, help="regime: model.finetune")
    p.add_argument("--explain-limit", type=int_at_least(-1), default=64, help="test examples explained per mode "
                   "(-1 = all; gen_only explains all)")
    p.add_argument("--ppl-tokens", type=int_at_least(0), default=4096,
                   help="general-text tokens for the perplexity ratio (0 = skip)")
    p.add_argument("--bootstrap", type=int_at_least(0), default=1000)
    p.add_argument("--launcher", default="python", help="how to start train/eval: python, or a prefix such as "
                   "'torchrun --nproc_per_node 2' or 'deepspeed --num_gpus 2'")
    p.add_argument("--reuse", action="store_true", help="skip modes whose OUT/<mode>/eval/metrics.json exists")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every mode")
    return p


def _regime(args) -> list[str]:
    out = list(args.overrides)
    if args.steps is not None:
        out.append(f"train.max_steps={args.steps}")
    if args.lr is not None:
        out.append(f"train.learning_rate={args.lr}")
    if args.finetune is not None:
        out.append(f"model.finetune={args.finetune}")
    return out


def plan(args) -> list[dict]:
    """The commands of every mode: [{"mode", "train": argv | None, "eval": argv, "dir"}]."""
    from .cli import DEFAULT_CONFIG
    from .config import load_config
    from .evaluate_cli import default_eval_files

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        from .config import ConfigError

        raise ConfigError(f"--modes: expected a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    config = str(args.config or DEFAULT_CONFIG)
    regime = _regime(args)
    cfg = load_config(config, regime)  # validates the overrides once, before any run
    files = default_eval_files(cfg)
    if files["test"] is None:
        from .config import ConfigError

        raise ConfigError(f"{config}: data.test_file is required to compare the modes (the config names its own "
                          f"data.train_file, so the embedded test split does not apply)")
    launcher = [sys.executable] if args.launcher == "python" else _launcher(args.launcher)
    check_output_path(args.output, folder=True)
    out = Path(args.output)
    common = ["--data", files["test"], "--explain-limit", str(args.explain_limit), "--ppl-tokens",
              str(args.ppl_tokens), "--bootstrap", str(args.bootstrap)]
    if files["dev"]:
        common += ["--dev", files["dev"]]
    if cfg.data.test_limit:
        common += ["--limit", str(cfg.data.test_limit)]
    if cfg.data.dev_limit:
        common += ["--dev-limit", str(cfg.data.dev_limit)]
    steps = []
    for m in modes:
        d = out / m
        ev = [*launcher, str(REPO / "launch" / "eval.py"), "--mode", m, "--output", str(d / "eval"), *common]
        if m == "zero_shot":
            steps.append({"mode": m, "dir": d, "train": None, "overrides": [],
                          "eval": [*ev, "--config", config, *regime]})
            continue
        # launch/eval.py evaluates the test split below: the trainer skips its own final evaluation
        tr = [*launcher, str(REPO / "launch" / "train.py"), "--config", config, *regime, *TRAIN_OVERRIDES[m],
              "eval.at_end=false", f"output_dir={d / 'run'}", "overwrite=true"]
        steps.append({"mode": m, "dir": d, "train": tr, "overrides": TRAIN_OVERRIDES[m],
                      "eval": [*ev, "--checkpoint", str(d / "run" / "final")]})
    return steps


def _launcher(text: str) -> list[str]:
    """``--launcher``'s command prefix; ConfigError unless its program is found on the PATH."""
    from .config import ConfigError

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"--launcher {text!r}: {e}") from None
    if not words or shutil.which(words[0]) is None:
        near = Path(sys.executable).parent / words[0] if words else None  # e.g. an environment not activated
        hint = f" ({near} is: activate its environment or give that path)" if near and near.is_file() else ""
        raise ConfigError(f"--launcher {text!r}: {words[0] if words else 'the command'} is not found on the PATH"
                          f"{hint}; expected python or a launcher prefix such as 'torchrun --nproc_per_node 2'")
    return words


def _run(argv: list[str], log_path: Path, what: str) -> float:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        # the caller's working folder: relative --config, --output and data paths mean the same there
        proc = subprocess.run(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        text = log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        if proc.returncode == 2 or errors:  # the step's user error (its one 'error:' line), not a crash
            from .config import ConfigError

            last = errors[-1][len("error: "):] if errors else (text.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"compare: {what} failed (exit {proc.returncode}): {last}; log: {log_path}")
        tail = text[-3000:]
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}; log {log_path}:\n{tail}")
    return dt


def _fmt(v, nd: int) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def claims(records: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The issue's checks on the paper's claims: (claim, holds or None if not measurable, figures)."""
    r = {x["mode"]: x for x in records}
    out = []

    def get(mode, key):
        return r.get(mode, {}).get(key)

    c, o, z = get("clsgen", "auroc"), get("cls_only", "auroc"), get("zero_shot", "auroc")
    out.append(("CLSGen AUROC >= cls_only AUROC - 0.01", None if c is None or o is None else c >= o - 0.01,
                f"{_fmt(c, 4)} vs {_fmt(o, 4)}"))
    out.append(("CLSGen AUROC > zero_shot AUROC", None if c is None or z is None else c > z,
                f"{_fmt(c, 4)} vs {_fmt(z, 4)}"))
    k = get("clsgen", "kappa")
    out.append(("CLSGen kappa (head vs verdict) >= 0.6", None if k is None else k >= 0.6, _fmt(k, 4)))
    pr = get("clsgen", "perplexity_ratio")
    out.append(("CLSGen perplexity ratio <= 1.10", None if pr is None else pr <= 1.10, _fmt(pr, 4)))
    po = get("cls_only", "perplexity_ratio")
    if po is not None:
        out.append(("(context) cls_only perplexity ratio", None, _fmt(po, 4)))
    return out


def _environment() -> dict:
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "git": sha}


def render(records: list[dict], *, command: str, regime: list[str], env: dict) -> str:
    modes = [r["mode"] for r in records]
    lines = ["# CLSGen vs baselines", "", f"Command: `{command}`", "",
             f"Regime (every mode): `{' '.join(regime) or '(config as is)'}`; per mode: "
             + "; ".join(f"{r['mode']}: `{' '.join(r['overrides']) or '-'}`" for r in records), "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items() if v), "",
             "| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key, label, nd in TABLE:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.get(key), nd) for r in records) + " |")
    ci = ["[" + ", ".join(f"{x:.3f}" for x in r["ci95"]["auroc"]) + "]" if r.get("ci95", {}).get("auroc") else "n/a"
          for r in records]
    lines.insert(len(lines) - len(TABLE) + 1, "| AUROC 95% CI | " + " | ".join(ci) + " |")
    lines += ["", "Probability source: clsgen/cls_only = classification head; gen_only = verdict tokens after the "
              "model's own explanation; zero_shot = base model's verdict tokens right after the prompt. "
              "Kappa/alignment compare each mode's probability with the verdict parsed from its own explanation.",
              "", "## The paper's claims, here", "", "| claim | holds | figures |", "|---|---|---|"]
    for claim, ok, fig in claims(records):
        lines.append(f"| {claim} | {'n/a' if ok is None else ('yes' if ok else 'no')} | {fig} |")
    notes = [f"- {r['mode']}: {r['note']}" for r in records if r.get("note")]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from .cli import user_errors

    args = _parser().parse_intermixed_args(argv)
    with user_errors():
        steps = plan(args)
    if args.dry_run:
        for s in steps:
            for k in ("train", "eval"):
                if s[k]:
                    print(shlex.join(s[k]))
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for s in steps:
        d, metrics_path = s["dir"], s["dir"] / "eval" / "metrics.json"
        timing = {}
        if not (args.reuse and metrics_path.is_file()):
            print(f"[compare] {s['mode']}: training" if s["train"] else f"[compare] {s['mode']}: no training",
                  flush=True)
            with user_errors():  # a step's user error: its one line, and where its log is
                timing["train_s"] = _run(s["train"], d / "train.log", f"{s['mode']} training") if s["train"] else 0.0
                print(f"[compare] {s['mode']}: evaluating", flush=True)
                timing["eval_s"] = _run(s["eval"], d / "eval.log", f"{s['mode']} evaluation")
            (d / "timing.json").write_text(json.dumps(timing))
        elif (d / "timing.json").is_file():
            timing = json.loads((d / "timing.json").read_text())
        m = json.loads(metrics_path.read_text())
        records.append({"mode": s["mode"], "overrides": s["overrides"], **timing, **m})
        (out / "compare.json").write_text(json.dumps(records, indent=2) + "\n")  # after every mode
    command = shlex.join(["python", "launch/compare.py", *(argv if argv is not None else sys.argv[1:])])
    (out / "compare.md").write_text(render(records, command=command, regime=_regime(args), env=_environment()))
    print((out / "compare.md").read_text(), flush=True)
    return 0
