"""``launch/build_data.py``: teacher explanations for a labelled file, under any launcher.

    python launch/build_data.py --input train.jsonl --output train.explained.jsonl --teacher default
    python launch/build_data.py --input train.csv --output out.jsonl \\
        --teacher-url http://localhost:8000/v1 --teacher-model meta-llama/Llama-3.1-70B-Instruct --api-key-env VLLM_KEY
    torchrun --nproc_per_node 4 launch/build_data.py --input ... --teacher /models/teacher   # a shard per rank

Field names, label names, the task instruction and the verdict template come from the run config
(``--config``, default ``launch/configs/default.yaml``, plus ``data.*=...`` overrides), so the
output is read by a training run of the same config as ``data.train_file=OUT.jsonl`` with
``data.teacher=null`` (a config that names a teacher, as default.yaml does, would otherwise have
it replace these explanations, and training refuses that).
"""

from __future__ import annotations

import logging
import os

from .cli import DEFAULT_CONFIG, _parser, int_at_least, number, user_errors
from .fileio import check_output_path

log = logging.getLogger("clsgen_dist.data.construct")


def _parse(argv: list[str] | None):
    p = _parser("Write teacher explanations (+ verdict, consistency) for a labelled file: OUT.jsonl and "
                "OUT.stats.json. Resumable: a rerun asks the teacher only for items not yet cached.")
    p.add_argument("--input", required=True, help="labelled JSONL/JSON/CSV/Parquet file or saved dataset")
    p.add_argument("--output", required=True,
                   help="OUT.jsonl (stats go to OUT.stats.json); its rows hold the id, text, label and explanation "
                        "fields (data.*_field) and the teacher's raw_explanation, verdict and consistency: other "
                        "columns of --input are not copied")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--teacher", metavar="MODEL_DIR",
                   help="local HF causal-LM folder ('default' = SmolLM2-135M-Instruct)")
    t.add_argument("--teacher-url", metavar="URL", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--teacher-model", metavar="NAME", help="model name served at --teacher-url")
    p.add_argument("--api-key-env", metavar="VAR", default=None,
                   help="environment variable holding the endpoint's API key (never logged)")
    p.add_argument("--mode", choices=("conditioned", "unconditioned"), default="conditioned",
                   help="conditioned: told the gold label, writes the rationale (default); unconditioned: "
                        "predicts and explains")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N examples of --input")
    p.add_argument("--explain-limit", type=int_at_least(-1), default=None,
                   help="send only the first N examples to the teacher; the rest are written cls-only "
                        "(default and -1: all)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--temperature", type=number(lambda x: x >= 0, ">= 0"), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=number(lambda x: 0 < x <= 1, "in (0, 1]"), default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="local teacher: prompts decoded together")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="local teacher: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--concurrency", type=int_at_least(1), default=8, help="endpoint: requests in flight per rank")
    p.add_argument("--timeout", type=number(lambda x: x > 0, "> 0"), default=120.0,
                   help="endpoint: seconds per attempt")
    p.add_argument("--max-retries", type=int_at_least(0), default=5, help="endpoint: retries on 429/5xx/timeouts")
    p.add_argument("--backoff", type=number(lambda x: x >= 0, ">= 0"), default=1.0,
                   help="endpoint: first retry delay (doubles)")
    p.add_argument("--no-judge", action="store_true",
                   help="conditioned mode: trust every non-empty rationale instead of judging its stance")
    p.add_argument("--stance-threshold", type=number(lambda x: 0 <= x < 1, "in [0, 1)"), default=0.5,
                   help="conditioned mode: consistent when the judged P(gold label) exceeds this")
    p.add_argument("--templates", default=None, help="YAML overriding prompt templates (conditioned, "
                   "unconditioned, judge, judge_answer_prefix, system)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the teacher cache in DIR/teacher_cache.jsonl (default: OUT.cache.jsonl next to --output)")
    p.add_argument("--replace-existing", action="store_true",
                   help="--input already has explanations (data.explanation_field): replace them with the "
                        "teacher's (without this flag that is an error)")
    p.add_argument("--config", default=None, help="run config for data.* (default: launch/configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.text_field=review")
    return p.parse_args(argv)


def _teacher(args, settings):
    from .config import ConfigError
    from .data.teachers import HTTPTeacher, LocalTeacher

    if args.teacher is not None:
        if args.teacher_model or args.api_key_env:
            raise ConfigError("--teacher-model/--api-key-env go with --teacher-url, not with --teacher")
        from .logs import setup_logging

        setup_logging()  # mutes transformers
        return LocalTeacher(args.teacher, settings=settings, batch_size=args.batch_size, dtype=args.dtype)
    teacher = HTTPTeacher(args.teacher_url, args.teacher_model, settings=settings, api_key_env=args.api_key_env,
                          concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                          backoff=args.backoff)
    teacher.check_reachable()
    return teacher


def run_build(args) -> dict:
    from .config import load_config
    from .data.construct import (Fields, PromptSpec, Templates, build_explanations, default_cache_path,
                                  read_input, refuse_replacing)
    from .data.teachers import GenerationSettings

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    spec = PromptSpec.from_data(cfg.data, mode=args.mode,
                                templates=Templates.from_file(args.templates) if args.templates else None)
    examples = read_input(args.input, cfg.data, limit=args.limit)  # user errors before any model or process group
    if not args.replace_existing:
        refuse_replacing(args.input, examples, cfg.data.explanation_field,
                         "Train on the file as it is, with data.teacher=null (rows without one train the "
                         "classification head only), or pass --replace-existing")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from .distributed import init_distributed

        init_distributed()
    from .distributed import is_main

    logging.basicConfig(level=logging.INFO if is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teacher = _teacher(args, settings)
    stats = build_explanations(examples, teacher, spec, args.output,
                               cache_path=default_cache_path(args.output, args.cache), fields=Fields.from_data(cfg.data),
                               judge=not args.no_judge, stance_threshold=args.stance_threshold,
                               explain_limit=args.explain_limit, source=str(args.input))
    from .distributed import shutdown_distributed

    shutdown_distributed()
    return stats


def _summary(stats: dict) -> str:
    dup = f", {stats['duplicates']} repeated rows sharing an item" if stats.get("duplicates") else ""
    lines = [f"wrote {stats['output']}: {stats['examples']} examples, {stats['asked']} sent to {stats['teacher']} "
             f"({stats['generated']} generated now, {stats['from_cache']} from cache{dup})"]
    for name, c in stats["per_class"].items():
        lines.append(f"  {name}: total {c['total']}, explained {c['explained']}, consistent {c['consistent']}, "
                     f"cls-only {c['cls_only']}")
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    lines.append(f"  verdict rate {fmt(stats['verdict_rate'], '.3f')}, consistency rate "
                 f"{fmt(stats['consistency_rate'], '.3f')}, mean words {fmt(stats['mean_words'], '.1f')}, "
                 f"Flesch {fmt(stats['flesch_reading_ease'], '.1f')}")
    return "\n".join(lines)


def _check_paths(args) -> None:
    """The output is JSONL (whatever its name says) and must not overwrite the input."""
    from pathlib import Path

    from .config import ConfigError
    from .data.construct import default_cache_path, stats_path

    out = Path(args.output)
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"--output {out}: the output is JSON Lines; name it *.jsonl")
    derived = {out, stats_path(out), default_cache_path(out, args.cache)}
    inp = Path(args.input).resolve()
    if inp in {p.resolve() for p in derived}:
        raise ConfigError(f"--output {out}: it (or its stats or cache file) is the --input file {args.input}; "
                          f"write the explained data to another file")
    check_output_path(args.output, folder=False)
    if args.cache is not None:  # a folder (DIR/teacher_cache.jsonl), made only once the teacher has answered
        check_output_path(args.cache, folder=True, flag="--cache")


def build_data_main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with user_errors():
        _check_paths(args)
        stats = run_build(args)
        from .distributed.env import launched_rank

        if launched_rank() == 0:  # the process group is gone by now: the launcher's rank says who prints
            print(_summary(stats), flush=True)
    return 0
