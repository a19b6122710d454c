"""QLoRA end to end through the real launchers, for a lent GPU (runs on CPU too, slowly).

    python benchmarks/qlora_gpu_check.py prepare                 # here: outputs/gpu_assets (carried)
    python benchmarks/qlora_gpu_check.py run --out outputs/gpu_qlora [--steps 30]

``prepare`` (on a machine with the embedded default cached) writes ``outputs/gpu_assets/``:
``smol/`` -- SmolLM2-135M-Instruct's config, tokenizer and chat template, *no weights* (the real
weights are 540 MB, over what a device call can carry) -- and ``data/{train,dev,test}.jsonl``, the
default Rotten Tomatoes splits with the teacher rationales the default trains on.

``run`` builds a random-weight model of that config (``--seed``) and drives the commands users run:

  1. ``python launch/train.py model.quantization=nf4 ...`` -- one process, DeepSpeed ZeRO-2 (the
     default ``ds_config``), bf16 compute on CUDA, paged 8-bit AdamW;
  2. ``deepspeed --num_gpus 1 launch/train.py ... ds_config=ds_configs/zero3.json`` -- QLoRA x
     ZeRO-3 under the DeepSpeed launcher (the 4-bit weights stored as bf16 elements);
  2b. run 1 again, SIGKILLed after the step following its mid-run checkpoint (``train.save_every``),
     then ``resume=true``: the resumed losses are compared with run 1's (periodic checkpoints hold
     the adapter, head and 8-bit optimizer states, not the 4-bit base);
  3. ``launch/export.py`` on run 1's checkpoint (LoRA merged into the dequantized 16-bit base);
  4. ``launch/eval.py`` on run 1's adapter checkpoint and on the merged export: the per-example
     probabilities of the two are compared.

Checked: every command exits 0; the loss falls over the run (mean of the last 5 steps < mean of
the first 5); the checkpoint holds the adapter and head only; the optimizer and device recorded in
``run_info.json``; the largest |p_adapter - p_merged| over the test split. Writes ``summary.json``
and ``summary.md`` under ``--out`` and exits 1 if a check fails. Random weights: the figures say
the path works on the device, not how well QLoRA learns (tests/modeling/test_qlora.py and
benchmarks/compare.md cover that on the real model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "outputs" / "gpu_assets"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def prepare(args) -> int:
    sys.path.insert(0, str(ROOT))
    from clsgen_dist.assets import default_model_dir
    from clsgen_dist.config import load_config
    from clsgen_dist.train import load_splits

    cfg = load_config(ROOT / "launch/configs/default.yaml", [])
    src = default_model_dir()
    dst = Path(args.assets)
    (dst / "smol").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / "smol" / name)
    splits = load_splits(cfg)  # the cached default splits, train with the teacher rationales
    (dst / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(dst / "data" / f"{split}.jsonl", "w") as f:
            for ex in rows:
                rec = {"id": ex.id, "text": ex.text, "label": ex.label}
                if ex.explanation:
                    rec["explanation"] = ex.explanation
                f.write(json.dumps(rec) + "\n")
        print(f"{split}: {len(rows)} rows")
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"wrote {dst} ({total / 2**20:.1f} MiB)")
    return 0


def _random_model(assets: Path, out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dst = out / "model"
    if (dst / "model.safetensors").exists():
        return dst
    config = AutoConfig.from_pretrained(assets / "smol")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True)
    for name in MODEL_FILES[1:]:
        if (assets / "smol" / name).exists():
            shutil.copy2(assets / "smol" / name, dst / name)
    return dst


def _run(name: str, cmd: list[str], out: Path, env: dict, *, killed: bool = False) -> dict:
    """Run one command; ``killed``: it is meant to die (a fault injected), so a non-zero exit is
    recorded as rc 0 and a clean exit as a failure."""
    t0 = time.time()
    log = out / f"{name}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if killed:
        rc = 0 if rc != 0 else 1
    rec = {"step": name, "cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t0, 1)}
    print(f"[{name}] rc={rc} {rec['wall_s']} s  (log: {log})", flush=True)
    if rc:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), flush=True)
    return rec


def _train_facts(run_dir: Path) -> dict:
    facts: dict = {}
    log = run_dir / "train_log.jsonl"
    if log.exists():
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [s["loss"] for s in steps if "loss" in s]
        if len(losses) >= 10:
            facts["loss_first5"] = sum(losses[:5]) / 5
            facts["loss_last5"] = sum(losses[-5:]) / 5
            facts["loss_falls"] = facts["loss_last5"] < facts["loss_first5"]
        facts["steps"] = len(losses)
        facts["median_step_s"] = sorted(s["step_time_s"] for s in steps)[len(steps) // 2] if steps else None
    info = run_dir / "run_info.json"
    if info.exists():
        ri = json.loads(info.read_text())
        facts.update({k: ri.get(k) for k in ("device", "gpu", "optimizer", "world_size", "torch", "deepspeed")})
    final = run_dir / "final"
    if final.exists():
        facts["checkpoint_files"] = sorted(p.name for p in final.iterdir())
        facts["adapter_only"] = (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        facts["test"] = {k: m.get(k) for k in ("auroc", "f1", "accuracy", "brier") if k in m}
    return facts


def _probs(path: Path) -> dict:
    return {r["id"]: r["prob"] for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def run(args) -> int:
    import torch

    assets, out = Path(args.assets).resolve(), Path(args.out).resolve()  # the commands run in the repo root
    if not (assets / "smol" / "config.json").exists():
        sys.exit(f"{assets}: no smol/config.json -- run `python benchmarks/qlora_gpu_check.py prepare` first")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cuda = torch.cuda.is_available()
    model = _random_model(assets, out, args.seed)
    data = assets / "data"
    common = [
        f"model.name_or_path={model}", "model.quantization=nf4", "data.teacher=null",
        f"data.train_file={data / 'train.jsonl'}", f"data.dev_file={data / 'dev.jsonl'}",
        f"data.test_file={data / 'test.jsonl'}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
        f"eval.explain_limit={args.explain}", f"data.train_limit={args.train_limit}",
        f"data.dev_limit={args.eval_limit}", f"data.test_limit={args.eval_limit}", "overwrite=true",
        f"train.save_every={max(1, args.steps // 2)}", *args.set,
    ]  # fmt: skip
    py = sys.executable
    results = []
    runs = {
        "zero2": [py, "launch/train.py", *common, f"output_dir={out / 'zero2'}"],
        # the `deepspeed` command (its console script may not be on PATH where wheels were unpacked)
        "zero3": [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(args.port),
                  "launch/train.py", *common, "ds_config=ds_configs/zero3.json", f"output_dir={out / 'zero3'}"],
    }  # fmt: skip
    if args.no_zero3:
        del runs["zero3"]
    info = {"cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "steps": args.steps, "seed": args.seed}

    def add(rec: dict) -> None:  # and the summary so far: a run cut off by a time limit keeps it
        results.append(rec)
        _summarize(out, info, results, final=False)

    for name, cmd in runs.items():
        rec = _run(name, cmd, out, env)
        rec.update(_train_facts(out / name))
        add(rec)
    # 2b: killed after the step that follows the mid-run checkpoint, then resumed
    half = max(1, args.steps // 2)
    resumed = [py, "launch/train.py", *common, f"output_dir={out / 'resumed'}"]
    add(_run("zero2_killed", resumed, out, env | {"CLSGEN_FAULT": f"after_step:{half + 1}"}, killed=True))
    rec = _run("zero2_resumed", [*resumed, "resume=true"], out, env)
    rec.update(_train_facts(out / "resumed"))
    a, b = (out / "zero2" / "train_log.jsonl"), (out / "resumed" / "train_log.jsonl")
    if a.exists() and b.exists():
        la = [json.loads(x)["loss"] for x in a.read_text().splitlines() if x.strip()]
        lb = [json.loads(x)["loss"] for x in b.read_text().splitlines() if x.strip()]
        rec["resumed_steps_match"] = len(la) == len(lb)
        rec["resumed_max_rel_loss_diff"] = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)), default=None)
    add(rec)
    ckpt = out / "zero2" / "final"
    add(_run("export", [py, "launch/export.py", "--checkpoint", str(ckpt), "--output", str(out / "merged")], out, env))
    test = str(data / "test.jsonl")
    lim = ["--limit", str(args.eval_limit), "--explain-limit", "0", "--bootstrap", "0"]
    add(_run("eval_adapter", [py, "launch/eval.py", "--checkpoint", str(ckpt), "--data", test,
                              "--output", str(out / "eval_adapter"), *lim], out, env))
    results.append(_run("eval_merged", [py, "launch/eval.py", "--checkpoint", str(out / "merged"), "--data", test,
                                        "--output", str(out / "eval_merged"), *lim], out, env))
    failures = _summarize(out, info, results, final=True)
    print((out / "summary.md").read_text())
    return 1 if failures else 0


def _summarize(out: Path, info: dict, results: list[dict], *, final: bool) -> list[str]:
    """Write summary.json and summary.md from the steps so far (``final``: all of them ran; else
    the summary says it is incomplete) and return the failures."""
    summary = {**info, "complete": final, "results": results}
    pa, pm = out / "eval_adapter" / "predictions.jsonl", out / "eval_merged" / "predictions.jsonl"
    if pa.exists() and pm.exists():
        a, m = _probs(pa), _probs(pm)
        common_ids = sorted(set(a) & set(m))
        summary["merged_vs_adapter_max_abs_prob_diff"] = max(abs(a[i] - m[i]) for i in common_ids) if common_ids else None
        summary["n_compared"] = len(common_ids)
    failures = [r["step"] for r in results if r["rc"] != 0]
    failures += [f"{r['step']}: loss did not fall" for r in results if r.get("loss_falls") is False]
    failures += [f"{r['step']}: checkpoint not adapter-only" for r in results if r.get("adapter_only") is False]
    failures += [f"{r['step']}: resumed run's steps differ" for r in results if r.get("resumed_steps_match") is False]
    failures += [f"{r['step']}: resumed losses differ by {r['resumed_max_rel_loss_diff']:.2e} (> 1e-2)"
                 for r in results if (r.get("resumed_max_rel_loss_diff") or 0) > 1e-2]
    if not final:
        failures.append("incomplete: stopped after " + (results[-1]["step"] if results else "no step"))
    summary["failures"] = failures
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# QLoRA check — {summary['gpu'] or 'CPU'}, torch {summary['torch']}, {summary['steps']} steps", "",
             "| step | rc | wall s | loss first5 → last5 | median step s | optimizer | test AUROC |",
             "|---|---:|---:|---|---:|---|---:|"]
    for r in results:
        loss = f"{r['loss_first5']:.3f} → {r['loss_last5']:.3f}" if "loss_first5" in r else "–"
        step_s = f"{r['median_step_s']:.2f}" if r.get("median_step_s") else "–"
        auroc = f"{r['test']['auroc']:.3f}" if r.get("test", {}).get("auroc") is not None else "–"
        lines.append(f"| {r['step']} | {r['rc']} | {r['wall_s']} | {loss} | {step_s} | {r.get('optimizer') or '–'} | {auroc} |")
    res = next((r for r in results if r["step"] == "zero2_resumed"), {})
    lines += ["", f"killed + resumed vs uninterrupted zero2, max relative loss difference over the steps: "
              f"{res.get('resumed_max_rel_loss_diff')}"]
    lines += ["", f"merged export vs adapter, max |Δp| over {summary.get('n_compared')} test examples: "
              f"{summary.get('merged_vs_adapter_max_abs_prob_diff')}", f"failures: {failures or 'none'}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write outputs/gpu_assets from the cached embedded default")
    p.add_argument("--assets", default=str(ASSETS))
    r = sub.add_parser("run", help="train / export / evaluate a random-weight SmolLM2 with nf4")
    r.add_argument("--assets", default=str(ASSETS))
    r.add_argument("--out", default=str(ROOT / "outputs" / "gpu_qlora"))
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--explain", type=int, default=2, help="test examples explained by the trainer's evaluation")
    r.add_argument("--train-limit", type=int, default=640)
    r.add_argument("--eval-limit", type=int, default=128)
    r.add_argument("--port", type=int, default=29533)
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for both runs")
    r.add_argument("--no-zero3", action="store_true",
                   help="skip the ZeRO-3 training run (to leave a short device call time for resume, export, eval)")
    args = ap.parse_args(argv)
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
