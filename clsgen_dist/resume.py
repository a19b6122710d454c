"""Resumable training state: DeepSpeed checkpoints + our trainer state, preemption, fault injection.

Layout (``output_dir/checkpoints/step-00000010/``)::

    *_model_states.pt, *_optim_states.pt                     DeepSpeed engine state (trainable weights, optimizer,
                                                             LR scheduler; frozen weights are left out)
    rng_rank{r}.pt                                           every rank's RNG states
    trainer_state.json                                       step, world size, ZeRO stage, the run settings
    COMPLETE                                                 written last, after every rank finished

The newest folder *with* ``COMPLETE`` is the latest checkpoint, so a process killed in the middle of a
save never leaves a checkpoint that is picked up. The data position is the step itself (the row
schedule is a pure function of the step, see ``data/packing.py``), so nothing else needs saving.

Resuming on a different number of ranks converts the checkpoint once to DeepSpeed's universal format
(``deepspeed.checkpoint.ds_to_universal``) and loads that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError
from .distributed import barrier, is_main, rank, world_size
from .distributed.engine import EIGHT_BIT, optimizer_setting

log = logging.getLogger("clsgen_dist.resume")

MARKER = "COMPLETE"
STATE = "trainer_state.json"


# ----------------------------------------------------------------------------- fault injection


def fault_point(name: str, step: int | None = None) -> None:
    """Testing hook: ``CLSGEN_FAULT=name[:step]`` SIGKILLs this process (no cleanup, like the OOM
    killer or a node loss) when execution reaches the named point; ``name[:step]/TERM`` sends it
    SIGTERM instead (a preemption arriving right there)."""
    spec = os.environ.get("CLSGEN_FAULT")
    if not spec:
        return
    spec, _, sig = spec.partition("/")
    want, _, at = spec.partition(":")
    if want == name and (not at or step == int(at)):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)


# ----------------------------------------------------------------------------- preemption


# ``touch output_dir/STOP``: stop like SIGTERM, without a signal through the launchers (torchrun and
# the DeepSpeed launcher kill their workers 30 s after forwarding one; the SLURM scripts use it).
STOP = "STOP"


class StopFlag:
    """Set by SIGTERM (SLURM preemption, ``scancel``) or SIGUSR1, or by the file ``stop_file``
    (given on rank 0); the loop checks it once per step, agreed across ranks, saves a checkpoint and
    exits cleanly. Installed before the model is built, so a signal during startup stops the run
    after its first step instead of killing it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signalled = False
        self.signal: int | None = None
        self.stop_file = stop_file
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())  # a stat per step

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def consumed(self) -> None:
        """The stop was acted on (checkpoint saved): the request file must not stop the next attempt."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signalled = True
        self.signal = signum


# ----------------------------------------------------------------------------- save / load


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out/checkpoints`` (None if there is none)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / MARKER).is_file() and _step_of(p) >= 0]
    return max(done, key=_step_of) if done else None


def _rng_state() -> dict:
    import numpy as np

    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# Keys that may change between attempts of one run; every other config value is a training setting
# that a checkpoint must be resumed with (check_resume_settings). Free: where things go, evaluation,
# logging, checkpoint cadence, and how the same computation is carried out (gradient checkpointing
# after an out-of-memory error, the loss and attention kernels). The micro-batch size and gradient
# accumulation may change with the number of ranks as long as the rows per step stay the same.
_FREE_KEYS = {"output_dir", "resume", "overwrite", "ds_config", "train.eval_every", "train.save_every",
              "train.save_total_limit", "train.log_every", "train.peak_tflops", "train.micro_batch_size",
              "train.gradient_accumulation_steps", "model.gradient_checkpointing", "model.zero3_init",
              "model.loss_impl", "model.loss_chunk_size", "model.loss_grad_mode", "model.loss_accum_dtype",
              "model.attn_implementation",
              "data.teacher_batch_size", "data.dev_file", "data.test_file", "data.dev_limit", "data.test_limit"}


def training_settings(cfg, ranks: int | None = None, train_data_sha256: str | None = None,
                      ds: dict | None = None) -> dict:
    """The config flattened to ``{"train.learning_rate": 0.0002, ...}`` (JSON values), without
    evaluation and the keys in ``_FREE_KEYS``, plus ``rows_per_step`` (micro-batch × accumulation ×
    ranks) and, when given, ``train_data_sha256`` (:func:`examples_sha256` of the training split).
    ``train.optimizer`` is the optimizer the run steps with (``auto`` resolved, or the DeepSpeed JSON
    ``ds``'s own: :func:`optimizer_setting`)."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(json.loads(json.dumps(cfg.to_dict())), "")
    out = {k: v for k, v in flat.items() if k not in _FREE_KEYS and not k.startswith("eval.")}
    out["train.optimizer"] = optimizer_setting(cfg, ds)  # QLoRA's auto differs on CPU and GPU
    fingerprint = model_fingerprint(cfg.model.name_or_path)
    if fingerprint is not None:  # the base the checkpoints' frozen weights are rebuilt from
        out["model.fingerprint"] = fingerprint
    t = cfg.train
    out["rows_per_step"] = t.micro_batch_size * t.gradient_accumulation_steps * (ranks or world_size())
    if train_data_sha256 is not None:
        out["train_data_sha256"] = train_data_sha256
    return out


# Blocks of each weight file that model_fingerprint reads, and their size.
_FP_BLOCKS, _FP_BLOCK_BYTES = 64, 64 * 1024


def model_fingerprint(name_or_path: str) -> str | None:
    """A sampled identity of a local model folder (None for anything else): its config, tokenizer,
    chat-template and generation-defaults files in full, and of every weight file its name, size and
    64 blocks of 64 KiB spread evenly over it (4 MiB read per file, whatever the model's size).
    Another model put at the same path (a base swapped for its instruct version, a retrained or
    re-merged one) changes it; an edit confined to a few small tensors may not."""
    from .assets import model_folder_digest
    from .modeling.build import resolve_model_path

    folder = Path(resolve_model_path(name_or_path))
    return model_folder_digest(folder, _sampled_sha256)[:16] if folder.is_dir() else None


def _sampled_sha256(f: Path) -> str:
    st = f.stat()
    return _sampled_sha256_of(str(f), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sampled_sha256_of(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - mtime_ns keys the cache
    """sha256 of a file's size and :data:`_FP_BLOCKS` blocks spread over it; read once per process and
    file version (every checkpoint records the fingerprint, on every rank)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(_FP_BLOCKS):
            fh.seek(max(0, size - _FP_BLOCK_BYTES) * i // max(1, _FP_BLOCKS - 1))
            h.update(fh.read(_FP_BLOCK_BYTES))
    return h.hexdigest()


def examples_sha256(examples) -> str:
    """The training data's identity: sha256 over every example's id, text, label and explanation,
    in order (whatever file, path or format they were read from)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.text, ex.label, ex.explanation], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def check_resume_settings(ckpt: Path, cfg, ranks: int, zero_stage: int | None = None,
                          train_data_sha256: str | None = None, training_done: bool = False,
                          ds: dict | None = None) -> None:
    """ConfigError if ``ckpt`` (a checkpoint folder, or the ``DONE`` or ``TRAINED`` file of a run) was
    trained with other settings than ``cfg`` (learning rate, schedule, data, model, ...): resuming
    would silently continue the old run under the new config's name. A checkpoint also needs the
    ZeRO stage it was saved with (``zero_stage``: the run's ``ds_config``); DeepSpeed cannot load
    one stage's partitioned state into another. With ``train_data_sha256`` on both sides the training
    data must have the same content, wherever its file now is (a copy on node-local scratch).
    ``training_done`` (``DONE``, ``TRAINED``): no step is left, so the number of ranks is free.
    ``ds``: the run's DeepSpeed JSON, whose own optimizer block decides the optimizer."""
    state = json.loads((ckpt / STATE if ckpt.is_dir() else ckpt).read_text())
    saved_stage = state.get("zero_stage") if ckpt.is_dir() else None
    if zero_stage is not None and saved_stage is not None and saved_stage != zero_stage:
        raise ConfigError(f"resume: {ckpt} was saved under ZeRO stage {saved_stage}, but ds_config={cfg.ds_config} "
                          f"is stage {zero_stage}; resume with a stage-{saved_stage} ds_config (the run's "
                          f"{Path(cfg.output_dir) / 'ds_config.json'}), or start a new output_dir")
    old = state.get("settings")
    if old is None:  # written before the settings were recorded
        log.warning("%s records no run settings; resuming without checking them", ckpt)
        return
    new = training_settings(cfg, ranks, train_data_sha256, ds)
    if "train.optimizer" not in old:
        # written before train.optimizer existed: the optimizer was what auto picks now (as far as this
        # machine's kind, GPU or CPU, and this ds_config tell)
        old = {**old, "train.optimizer": optimizer_setting(cfg, ds, name="auto")}
    # the data's content decides when both sides know it; else (an older checkpoint) its path does
    ignore = {"data.train_file"} if "train_data_sha256" in old.keys() & new.keys() else {"train_data_sha256"}
    if "model.fingerprint" not in old:  # written before it was recorded (or not a local folder)
        ignore.add("model.fingerprint")
    if training_done:
        ignore |= {"rows_per_step", "train.optimizer"}  # no step is left
    diff = [k for k in sorted(old.keys() | new.keys()) if k not in ignore and old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:5])
        hint = (" (the step's rows are train.micro_batch_size x train.gradient_accumulation_steps x ranks: "
                "adjust the accumulation to the number of ranks)" if "rows_per_step" in diff else "")
        if "train_data_sha256" in diff:
            hint += " (the training data's content changed: rows added, removed, edited or reordered)"
        if "model.fingerprint" in diff:
            hint += (f" (the model files at {cfg.model.name_or_path} changed; the checkpoint's frozen weights are "
                     f"rebuilt from them)")
        raise ConfigError(f"resume: {ckpt} was trained with other settings ({shown}{'; …' if len(diff) > 5 else ''})"
                          f"{hint}. Resume with the run's own settings (its config.yaml), or start a new output_dir")
    saved_ranks = state.get("world_size") if ckpt.is_dir() else None
    if not training_done and saved_ranks not in (None, ranks) and saved_stage and new["train.optimizer"] in EIGHT_BIT:
        raise ConfigError(f"resume: {ckpt} was saved by {saved_ranks} ranks under ZeRO stage {saved_stage} with "
                          f"train.optimizer={new['train.optimizer']}, and this run has {ranks}: DeepSpeed's "
                          f"conversion to another number of ranks (the universal checkpoint) reads AdamW's fp32 "
                          f"moments, which the 8-bit optimizer does not have (it keeps blockwise-quantized ones of "
                          f"each rank's slice). Resume on {saved_ranks} ranks")


# Written last by a run that finished (final checkpoint saved, test split evaluated).
DONE = "DONE"

# Written once ``final/`` is saved: training is over and only the final evaluation is left, which a
# resumed attempt (one killed or stopped during that evaluation) runs on ``final/`` without training.
TRAINED = "TRAINED"

# What a run leaves in its output_dir, and what a fresh start there replaces.
RUN_ARTIFACTS = ("checkpoints", "final", "eval", "train_log.jsonl", "eval_log.jsonl", "tensorboard", "PREEMPTED",
                 STOP, TRAINED, DONE)


def earlier_run(out: Path) -> list[str]:
    """The artifacts of an earlier run present in ``out`` (none unless ``out`` holds a run's
    ``config.yaml`` or ``run_info.json``: a folder of the user's that happens to be called ``eval``
    is not ours to remove)."""
    out = Path(out)
    if not ((out / "config.yaml").is_file() or (out / "run_info.json").is_file()):
        return []
    return [name for name in RUN_ARTIFACTS if (out / name).exists()]


def clear_earlier_run(out: Path) -> None:
    for name in earlier_run(out):
        p = Path(out) / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def save_training_state(engine, out: Path, step: int, *, zero_stage: int, keep: int,
                        settings: dict | None = None) -> Path:
    """Collective: every rank writes its shard; rank 0 marks the folder complete last."""
    root = checkpoint_root(out)
    tag = f"step-{step:08d}"
    path = root / tag
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # an incomplete leftover of a killed save with the same step
            shutil.rmtree(path)
    barrier()
    # Frozen weights (a LoRA or QLoRA base) are left out, as HF Trainer does for peft models: the
    # resumed run builds them again from the base model, identically, and each checkpoint holds the
    # adapters, the head and the optimizer state instead of another copy of the backbone. DeepSpeed
    # drops a frozen parameter under its first name only; the hook drops its other names too (a tied
    # embedding, also saved as the LM head).
    frozen = _frozen_names(engine.module)

    def drop_frozen(module, sd, prefix, meta) -> None:
        for n in frozen:
            sd.pop(prefix + n, None)

    hook = engine.module.register_state_dict_post_hook(drop_frozen)
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    finally:
        hook.remove()
    torch.save(_rng_state(), path / f"rng_rank{rank()}.pt")
    fault_point("during_save", step)
    barrier()
    if is_main():
        state = {"step": step, "world_size": world_size(), "zero_stage": zero_stage, "settings": settings}
        (path / STATE).write_text(json.dumps(state, indent=2) + "\n")
        (path / MARKER).write_text("ok\n")
        _prune(root, keep)
        log.info("saved training state %s", path)
    barrier()
    return path


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted((p for p in root.glob("step-*") if (p / MARKER).is_file()), key=_step_of)
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step-*"):  # incomplete folders older than the newest complete one
        if not (p / MARKER).is_file() and done and _step_of(p) < _step_of(done[-1]):
            shutil.rmtree(p, ignore_errors=True)


def _to_universal(ckpt: Path, poll_s: float = 2.0) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0, once); returns its folder.
    The other ranks wait for the finished folder's marker on the file system, not in a collective:
    converting a large model's state can outlast the process group's timeout (10 minutes by
    default), and each requeued attempt would then time out the same way. (If rank 0 fails, the
    launcher stops the others.)"""
    uni = ckpt.parent / f"{ckpt.name}-universal"
    if is_main() and not (uni / MARKER).is_file():
        if uni.exists():
            shutil.rmtree(uni)
        tmp = ckpt.parent / f".{uni.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
               "--output_folder", str(tmp), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        for f in ckpt.iterdir():  # keep our own files next to the converted state
            if f.is_file() and (f.name == STATE or f.name.startswith("rng_rank")):
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, uni)
        (uni / MARKER).write_text("ok\n")
    while not (uni / MARKER).is_file():
        time.sleep(poll_s)
    barrier()
    return uni


def load_training_state(engine, ckpt: Path) -> int:
    """Restore engine, optimizer, scheduler and RNG states from ``ckpt``; returns the step to start at."""
    state = json.loads((ckpt / STATE).read_text())
    src = ckpt
    universal = False
    if state["world_size"] != world_size():
        if state["zero_stage"] == 0:
            pass  # stage-0 states are not partitioned
        else:
            log.info("checkpoint was written by %d ranks, resuming on %d: converting to a universal checkpoint",
                     state["world_size"], world_size())
            src = _to_universal(ckpt)
            engine._config.load_universal_checkpoint = True  # noqa: SLF001 - DeepSpeed reads this flag
            universal = True
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's wrapper
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr", "step")}
             for g in opt.param_groups] if universal else None  # before the load overwrites them
    try:
        load_path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, custom_load_fn=_load_module_state)
    except CheckpointMismatch as e:
        raise ConfigError(f"resume: {src}: {e}; was it written by another model or finetune setting? "
                          f"Start a new output_dir") from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {src}")
    if universal:
        _repair_universal_groups(opt, hyper, engine.lr_scheduler)
    rng = ckpt / f"rng_rank{rank()}.pt"
    if rng.is_file() and state["world_size"] == world_size():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """Every name of every frozen parameter (a tied weight under each of its names): what periodic
    checkpoints leave out and their loading does not expect."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _quant_state_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict entries that bitsandbytes' 4-bit layers write next to each packed weight (block
    scales, code book, packed metadata: ``...weight.absmax`` etc.) and that their loading does not
    take back."""
    keys = set()
    for name, m in model.named_modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and hasattr(qs, "as_dict"):
            keys |= {f"{name}.weight.{k}" if name else f"weight.{k}" for k in qs.as_dict(packed=True)}
    return keys


class CheckpointMismatch(RuntimeError):
    """A checkpoint's module state does not fit the model built for resuming it."""


def _load_module_state(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module load, strict except for what the model was built with already: frozen
    parameters (left out of the checkpoint, see :func:`save_training_state`) and the quantization
    state of 4-bit weights, which bitsandbytes writes into a state dict but does not load back (the
    frozen 4-bit weights are quantized again, identically, when the model is built from its base)."""
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - _frozen_names(dst))
    unexpected = sorted(set(result.unexpected_keys) - _quant_state_keys(dst))
    if missing or unexpected:
        raise CheckpointMismatch(f"its module state does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")


def _repair_universal_groups(opt, hyper: list[dict], scheduler) -> None:
    """DeepSpeed's ZeRO-3 universal loader (0.19) gives every parameter group group 0's
    hyperparameters and one shared Adam ``step`` tensor, which each optimizer step then advances once
    per group: the head would train at the backbone's rate, norms would be decayed, and the bias
    correction would drift. Restore each group's own hyperparameters (this run's, which the settings
    check held equal to the checkpoint's), the scheduler's learning rates, and one step per group."""
    for g, h in zip(opt.param_groups, hyper):
        g.update(h)
    if scheduler is not None:
        for g, lr in zip(opt.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr
    seen = set()
    for st in opt.state.values():
        s = st.get("step")
        if torch.is_tensor(s):
            if id(s) in seen:
                st["step"] = s.clone()
            seen.add(id(s))


def resolve_resume(resume, out: Path, *, overwrite: bool = False) -> Path | None:
    """``resume``: False → None; True → the latest checkpoint (error if none); "auto" → latest or None.
    None means a fresh start: with ``resume=false`` and an earlier run in ``out`` that is an error
    unless ``overwrite`` (the fresh start then replaces it, see ``clear_earlier_run``)."""
    ck = None if resume is False else latest_checkpoint(out)
    if ck is None and resume is True:
        raise ConfigError(f"resume=true but {checkpoint_root(out)} holds no complete checkpoint "
                          f"(use resume=auto to start fresh when there is none)")
    found = earlier_run(out)
    if ck is None and resume is False and found and not overwrite:
        raise ConfigError(f"output_dir {out} already holds a run ({', '.join(found)}): continue it with "
                          f"resume=auto, replace it with overwrite=true, or choose another output_dir")
    return ck
