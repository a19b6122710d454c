#!/usr/bin/env python
"""Teacher generation on CPU: batched (shared-prefix prefill, left padding, one KV cache) vs one
prompt at a time (the same ``LocalTeacher.generate`` with a batch of one).

    python benchmarks/teacher_bench.py                      # 32 RT training snippets, batch 16, 48 new tokens
    python benchmarks/teacher_bench.py --n 64 --batch-size 32 --max-new-tokens 64 --threads 1

The real default teacher (SmolLM2-135M-Instruct, ``clsgen_dist.assets.default_model_dir``) writes
label-conditioned rationales for the first ``--n`` examples of the default Rotten Tomatoes training
subset with the default run config's prompts (and forced rationale start), greedy, sorted by prompt
length as the pipeline does. Both variants run in one process on the same prompts, interleaved
chunk by chunk (a batch, then the same prompts one by one) so that load from other processes hits
both alike. Also timed: the stance judge (one batched forward), run as ``build_explanations`` runs
it; generation + judge is the pipeline's cost per item, and its rate, plus the model load, gives
the time for the default's 640 training examples. A markdown section is appended to ``--md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

from _env import command_line, git_sha, machine  # noqa: E402  (benchmarks/ is on sys.path as the script folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="examples (first N of the default training subset)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="teacher dtype (auto = bf16 where the CPU has native bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--target-examples", type=int, default=640, help="extrapolate the pipeline time to this many")
    ap.add_argument("--md", type=Path, default=HERE / "teacher.md", help="append the results here ('' = don't)")
    args = ap.parse_args(argv)
    load_avg = os.getloadavg()[0]

    import torch
    import transformers

    from clsgen_dist.assets import rotten_tomatoes_splits
    from clsgen_dist.cli import DEFAULT_CONFIG
    from clsgen_dist.config import load_config
    from clsgen_dist.data.construct import PromptSpec, clean_rationale, read_input, strip_verdict
    from clsgen_dist.data.teachers import GenerationSettings, LocalTeacher

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cfg = load_config(DEFAULT_CONFIG)
    d = cfg.data
    train = rotten_tomatoes_splits(seed=cfg.train.seed, train_size=d.default_train_size, dev_size=d.default_dev_size,
                                   test_size=d.default_test_size)["train"]
    exs = read_input(train, d, limit=args.n)
    spec = PromptSpec.from_data(d)
    t0 = time.perf_counter()
    teacher = LocalTeacher("default", settings=GenerationSettings(max_new_tokens=args.max_new_tokens),
                           batch_size=args.batch_size, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    # as build_explanations does: the forced rationale start, similar lengths in a batch
    items = sorted(((spec.messages(e.text, e.label), spec.rationale_prefix(e.label), e.label) for e in exs),
                   key=lambda it: -teacher.prompt_length(it[0]))
    msgs, prefixes, labels = (list(x) for x in zip(*items))
    teacher.generate(msgs[:2], prefixes[:2])  # warm-up (allocator, kernels), not timed
    tmpl, names = spec.templates, spec.label_names

    B = args.batch_size
    t_batch = t_single = t_judge = 0.0
    batched, single = [], []
    for s in range(0, len(msgs), B):
        chunk, pre = msgs[s:s + B], prefixes[s:s + B]
        t = time.perf_counter()
        batched += teacher.generate(chunk, pre)
        t_batch += time.perf_counter() - t
        t = time.perf_counter()  # the stance judge exactly as build_explanations runs it
        reads = [spec.judge_text(clean_rationale(strip_verdict(g.text, names, spec.verdict_template),
                                                 truncated=g.truncated), y) or "-"
                 for g, y in zip(batched[s:s + B], labels[s:s + B])]
        teacher.judge([spec.judge_messages(r) for r in reads], names, tmpl.judge_answer_prefix,
                      null=spec.judge_messages(tmpl.judge_null) if tmpl.judge_null else None)
        t_judge += time.perf_counter() - t
        t = time.perf_counter()
        single += [teacher.generate([m], [p])[0] for m, p in zip(chunk, pre)]
        t_single += time.perf_counter() - t

    def n_tokens(gens):
        return sum(len(teacher.tok(g.text, add_special_tokens=False)["input_ids"]) for g in gens)

    n = len(msgs)
    r_batch, r_single = n / t_batch, n / t_single
    r_pipe = n / (t_batch + t_judge)
    same = sum(a.text == b.text for a, b in zip(batched, single))
    target_min = (args.target_examples / r_pipe + load_s) / 60
    row = (f"| {B} | {n} | {args.max_new_tokens} | {r_single:.3f} | {r_batch:.3f} | **{r_batch / r_single:.1f}×** | "
           f"{n_tokens(single) / t_single:.1f} | {n_tokens(batched) / t_batch:.1f} | {same}/{n} | {r_pipe:.3f} | "
           f"{target_min:.1f} |")
    header = ("| batch | examples | max new tok | one-at-a-time ex/s | batched ex/s | ratio | one-at-a-time tok/s | "
              "batched tok/s | same text | gen+judge ex/s | est. min for "
              f"{args.target_examples} |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    section = (f"\n## {stamp} — {machine()}, torch threads {torch.get_num_threads()}\n\n"
               f"python {platform.python_version()}, torch {torch.__version__}, "
               f"transformers {transformers.__version__}; "
               f"git {git_sha()}; teacher {teacher.id}; model load {load_s:.1f}s; "
               f"load average at start {load_avg:.2f}. Command: `{command_line()}`.\n\n{header}\n{row}\n")
    print(section)
    if str(args.md):
        with open(args.md, "a") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
