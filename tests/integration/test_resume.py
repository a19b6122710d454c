"""Checkpoint / resume: killed runs continue exactly; killed saves are never picked up; SIGTERM saves
and exits cleanly; a 2-rank checkpoint resumes on 1 rank."""

import json
import signal
import subprocess
import time

import pytest

from clsgen_dist.resume import latest_checkpoint
from tests.conftest import REVIEWS, write_jsonl
from tests.integration._run import PY, REPO, clean_env, launch, read_jsonl

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"text": f"{t} ({i})", "label": y, **({"explanation": "Because of the tone."} if i % 2 else {})}
            for i, (t, y) in enumerate(REVIEWS * 4)]
    return write_jsonl(d / "train.jsonl", rows)


def _args(tiny_dir, data, out, *extra):
    return ["--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={tiny_dir}", f"data.train_file={data}",
            f"output_dir={out}", "model.finetune=full", f"train.max_steps={STEPS}", "train.save_every=5",
            "train.eval_every=0", "train.learning_rate=3e-3", "model.lora_dropout=0.0", *extra]


def _losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(out / "train_log.jsonl")]


@pytest.fixture(scope="module")
def straight(tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    launch("train.py", _args(tiny_dir, data, out))
    return out


def _fault(script_args, fault, **kw):
    """launch/train.py with a fault injected (``CLSGEN_FAULT``); its exit status is the caller's to check."""
    return launch("train.py", script_args, env={"CLSGEN_FAULT": fault}, check=False, **kw)


def test_sigkill_then_resume_equals_uninterrupted(straight, tiny_dir, data, tmp_path):
    proc = _fault(_args(tiny_dir, data, tmp_path), "after_step:7")
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _, _ in _losses(tmp_path)] == list(range(1, 8))
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    launch("train.py", _args(tiny_dir, data, tmp_path, "resume=true"))
    assert _losses(tmp_path) == _losses(straight)  # exact on CPU fp32: steps 6-7 rerun from the checkpoint
    assert (tmp_path / "final/COMPLETE").is_file()


def test_kill_during_save_is_never_picked_as_latest(straight, tiny_dir, data, tmp_path):
    proc = _fault(_args(tiny_dir, data, tmp_path), "during_save:10")
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints/step-00000010").is_dir()  # half-written …
    assert not (tmp_path / "checkpoints/step-00000010/COMPLETE").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000005"  # … and ignored
    launch("train.py", _args(tiny_dir, data, tmp_path, "resume=true"))
    assert _losses(tmp_path) == _losses(straight)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_dir, data, tmp_path):
    args = _args(tiny_dir, data, tmp_path, "train.max_steps=150", "train.save_every=0")
    p = subprocess.Popen([PY, str(REPO / "launch/train.py"), *args], cwd=REPO, env=clean_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        assert p.poll() is None, p.stdout.read()[-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    ck = latest_checkpoint(tmp_path)
    stopped = json.loads((ck / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 150 and (tmp_path / "PREEMPTED").is_file() and not (tmp_path / "final").exists()
    assert read_jsonl(log)[-1]["step"] == stopped
    launch("train.py", args[:-1] + ["train.max_steps=150", "resume=auto"])
    steps = [r["step"] for r in read_jsonl(log)]
    assert steps == list(range(1, 151)) and not (tmp_path / "PREEMPTED").exists()


def test_resume_true_without_checkpoint_is_a_clear_error(tiny_dir, data, tmp_path):
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, "resume=true"), check=False)
    assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_two_rank_checkpoint_resumes_on_one_rank(straight, tiny_dir, data, tmp_path):
    """ZeRO-2 state partitioned over 2 ranks → DeepSpeed universal checkpoint → 1 rank. Same rows per
    step (2 ranks × GA 1 = 1 rank × GA 2), so the resumed losses equal the uninterrupted 1-rank run."""
    proc = _fault(_args(tiny_dir, data, tmp_path, "train.gradient_accumulation_steps=1"), "after_step:6",
                  launcher="deepspeed", nproc=2)
    assert proc.returncode != 0
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    launch("train.py", _args(tiny_dir, data, tmp_path, "resume=true"))
    a, b = _losses(tmp_path), _losses(straight)
    assert [s for s, _, _ in a] == list(range(1, STEPS + 1))
    for (s, la, ga), (_, lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ga == pytest.approx(gb, rel=1e-4), s


def test_zero3_two_rank_checkpoint_resumes_on_one_rank(tiny_dir, data, tmp_path):
    """The same with ZeRO-3, whose universal loader gives every parameter group one shared Adam
    step and group 0's hyperparameters: with weight decay (three groups: matrices, vectors, head)
    and a head learning rate of its own, the resumed losses still equal an uninterrupted run."""
    extra = ["ds_config=ds_configs/zero3.json", "train.weight_decay=0.1", "train.head_learning_rate=1e-2"]
    straight = tmp_path / "straight"
    launch("train.py", _args(tiny_dir, data, straight, *extra))
    out = tmp_path / "resumed"
    proc = _fault(_args(tiny_dir, data, out, *extra, "train.gradient_accumulation_steps=1"), "after_step:6",
                  launcher="deepspeed", nproc=2)
    assert proc.returncode != 0 and latest_checkpoint(out).name == "step-00000005", proc.stderr[-3000:]
    launch("train.py", _args(tiny_dir, data, out, *extra, "resume=true"))
    a, b = _losses(out), _losses(straight)
    assert [s for s, _, _ in a] == list(range(1, STEPS + 1))
    for (s, la, ga), (_, lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ga == pytest.approx(gb, rel=1e-4), s


def test_resume_under_another_zero_stage_is_a_clear_error(straight, tiny_dir, data, tmp_path):
    """A ZeRO-2 checkpoint resumed with a ZeRO-3 ds_config (say, a run started with launch/train.py
    continued under train.sbatch): one line naming the stages, before anything is rewritten."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "DONE").unlink()
    before = (out / "run_info.json").read_text()
    proc = launch("train.py", _args(tiny_dir, data, out, "resume=true", "ds_config=ds_configs/zero3.json"),
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "was saved under ZeRO stage 2, but ds_config=ds_configs/zero3.json is stage 3" in proc.stderr
    assert (out / "run_info.json").read_text() == before


def test_output_dir_of_an_earlier_run(tiny_dir, data, tmp_path):
    """A fresh start never mixes with an earlier run in the same folder: an error by default,
    replaced with overwrite=true. A resume must use the checkpoint's settings, keeps the dev log up to
    the checkpoint and the earlier attempt's run_info; resuming a finished run does nothing."""
    fast = ["train.max_steps=6", "train.save_every=2", "train.eval_every=2", "eval.at_end=false",
            "data.dev_file=" + str(data), "data.dev_limit=8"]
    launch("train.py", _args(tiny_dir, data, tmp_path, *fast))
    assert (tmp_path / "final/COMPLETE").is_file() and (tmp_path / "DONE").is_file()
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *fast), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output_dir {tmp_path} already holds a run (checkpoints, final, train_log.jsonl, eval_log.jsonl" \
        in proc.stderr and "overwrite=true" in proc.stderr
    # a fresh start with overwrite=true replaces everything the first run left (checkpoints included)
    proc = _fault(_args(tiny_dir, data, tmp_path, *fast, "overwrite=true", "train.save_every=3"), "after_step:4")
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-00000003"]
    assert not (tmp_path / "final").exists() and not (tmp_path / "DONE").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_log.jsonl")] == [2, 4]
    # resuming with another learning rate would continue the old schedule under the new config's name
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *fast, "train.save_every=3", "resume=true",
                                    "train.learning_rate=1e-3"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "step-00000003 was trained with other settings (train.learning_rate=0.003 there, 0.001 now)" in proc.stderr
    launch("train.py", _args(tiny_dir, data, tmp_path, *fast, "train.save_every=3", "resume=auto"))
    assert [r["step"] for r in read_jsonl(tmp_path / "eval_log.jsonl")] == [2, 4, 6]  # 4 re-run once, not twice
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert len(info["attempts"]) == 1 and "overwrite=true" in info["attempts"][0]["argv"]
    assert "resume=auto" in info["argv"] and isinstance(info["git_dirty"], (bool, type(None)))
    # a requeue of the finished run: nothing retrains, nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *fast, "train.save_every=3", "resume=auto"))
    assert "holds a finished run" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


FINAL = ["train.max_steps=6", "train.save_every=0", "eval.explain_limit=2", "eval.max_new_tokens=6"]


@pytest.fixture(scope="module")
def evaluated(tiny_dir, data, tmp_path_factory):
    """An uninterrupted short run with dev and test splits: its final evaluation is the reference."""
    d = tmp_path_factory.mktemp("eval_data")
    split = write_jsonl(d / "split.jsonl", [{"text": f"{t} [{i}]", "label": y} for i, (t, y) in enumerate(REVIEWS)])
    extra = [*FINAL, f"data.dev_file={split}", f"data.test_file={split}"]
    out = tmp_path_factory.mktemp("evaluated")
    launch("train.py", _args(tiny_dir, data, out, *extra))
    return out, extra


def _same_evaluation(a, b):
    pa, pb = read_jsonl(a / "eval/predictions.jsonl"), read_jsonl(b / "eval/predictions.jsonl")
    assert [(r["id"], r["explanation"]) for r in pa] == [(r["id"], r["explanation"]) for r in pb]
    assert [r["prob"] for r in pa] == pytest.approx([r["prob"] for r in pb], abs=1e-6)
    ma, mb = (json.loads((x / "eval/metrics.json").read_text()) for x in (a, b))
    for k in ("auroc", "f1", "brier", "threshold_tuned"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k


def test_killed_during_final_evaluation_resumes_without_training(evaluated, tiny_dir, data, tmp_path):
    """Killed after final/ is saved (a time limit, a node loss during the test split's generation):
    resume=auto evaluates final/ and finishes the run, without going back to a checkpoint and
    training the steps after it again."""
    ref, extra = evaluated
    proc = _fault(_args(tiny_dir, data, tmp_path, *extra), "final_eval")
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "final/COMPLETE").is_file() and (tmp_path / "TRAINED").is_file()
    assert not (tmp_path / "DONE").exists() and not (tmp_path / "eval").exists()
    kept = [tmp_path / "train_log.jsonl", *(tmp_path / "final").iterdir()]
    before = {f: f.stat().st_mtime_ns for f in kept}
    # another learning rate is another run: refused, as for a checkpoint
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *extra, "resume=auto", "train.learning_rate=1e-3"),
                  check=False)
    assert proc.returncode == 2 and "TRAINED was trained with other settings" in proc.stderr, proc.stderr[-2000:]
    # requeued with the data copied to node-local scratch and on another number of ranks' worth of
    # rows per step: no step is left to train, and the data's content is the same
    import shutil

    scratch = tmp_path / "scratch" / "train.jsonl"
    scratch.parent.mkdir()
    shutil.copy(data, scratch)
    proc = launch("train.py", _args(tiny_dir, scratch, tmp_path, *extra, "resume=auto",
                                    "train.gradient_accumulation_steps=4"))
    assert "evaluating" in proc.stderr and "without training" in proc.stderr
    assert {f: f.stat().st_mtime_ns for f in kept} == before  # no step ran again, final/ is the one saved
    assert (tmp_path / "DONE").is_file() and not (tmp_path / "TRAINED").exists()
    _same_evaluation(tmp_path, ref)


def test_stop_during_final_evaluation_is_preempted_then_evaluated(evaluated, tiny_dir, data, tmp_path):
    """SIGTERM (SLURM's time-limit warning, a preemption) during the final evaluation: the attempt
    stops between batches and exits 0 with PREEMPTED (so the SLURM script requeues it) and no
    DONE; the requeued attempt evaluates final/ and gives the uninterrupted run's results."""
    ref, extra = evaluated
    proc = _fault(_args(tiny_dir, data, tmp_path, *extra), "final_eval/TERM")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stop requested during the final evaluation" in proc.stderr
    assert (tmp_path / "PREEMPTED").read_text().strip() == str(tmp_path / "final")
    assert not (tmp_path / "DONE").exists() and not (tmp_path / "eval/metrics.json").exists()
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *extra, "resume=auto"))
    assert not (tmp_path / "PREEMPTED").exists() and (tmp_path / "DONE").is_file()
    assert [r["step"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == list(range(1, 7))
    _same_evaluation(tmp_path, ref)


def test_resume_follows_the_training_data_content_not_its_path(straight, tiny_dir, data, tmp_path):
    """Checkpoints record the training data's content hash: the same rows copied elsewhere (node-local
    scratch) resume exactly; the file edited in place is refused (it was accepted before: same path)."""
    import shutil

    own = tmp_path / "train.jsonl"
    shutil.copy(data, own)
    proc = _fault(_args(tiny_dir, own, tmp_path / "run"), "after_step:7")
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "run/checkpoints/step-00000005/trainer_state.json").read_text())
    assert len(state["settings"]["train_data_sha256"]) == 64
    own.write_text("".join(data.read_text().splitlines(keepends=True)[:-2]))  # edited in place: two rows fewer
    proc = launch("train.py", _args(tiny_dir, own, tmp_path / "run", "resume=true"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the training data's content changed" in proc.stderr
    moved = tmp_path / "scratch" / "train-copy.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    launch("train.py", _args(tiny_dir, moved, tmp_path / "run", "resume=true"))
    assert _losses(tmp_path / "run") == _losses(straight)


def test_zero3_killed_during_final_evaluation_evaluates_partitioned(evaluated, tiny_dir, data, tmp_path):
    """The same on 2 ZeRO-3 ranks: the requeued attempt builds final/ partitioned over the ranks,
    as training built the model (model.zero3_init), evaluates it lock-stepped and gives the
    uninterrupted single-process run's results."""
    ref, extra = evaluated
    extra = [*extra, "ds_config=ds_configs/zero3.json"]
    two = ["train.gradient_accumulation_steps=1"]  # 2 ranks x 1 = the reference's 1 x 2 rows per step
    proc = _fault(_args(tiny_dir, data, tmp_path, *extra, *two), "final_eval", launcher="deepspeed", nproc=2)
    assert proc.returncode != 0 and (tmp_path / "TRAINED").is_file(), proc.stderr[-3000:]
    assert not (tmp_path / "DONE").exists()
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, *extra, *two, "resume=auto"), launcher="deepspeed",
                  nproc=2)
    out = proc.stdout + proc.stderr
    assert "without training" in out and "partitioned over 2 ranks (ZeRO-3 inference)" in out
    assert (tmp_path / "DONE").is_file() and not (tmp_path / "TRAINED").exists()
    _same_evaluation(tmp_path, ref)
