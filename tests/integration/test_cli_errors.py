"""User errors: one clear line, exit status 2, no traceback, no output that looks complete."""

import pytest

from clsgen_dist.cli import train_main
from tests.conftest import write_jsonl
from tests.integration._run import launch, main_error




def _train(capsys, *args):
    return main_error(capsys, train_main, *args)


def test_unknown_config_key_lists_valid_ones(capsys):
    err = _train(capsys, "train.max_step=3")
    assert "unknown config key 'train.max_step'" in err and "did you mean train.max_steps" in err
    assert "gradient_accumulation_steps" in err


def test_bad_values(capsys, tmp_path):
    assert "train.max_steps must be a positive integer" in _train(capsys, "train.max_steps=0")
    (tmp_path / "f").write_text("x")
    assert f"output_dir {tmp_path / 'f'}: is a file; expected a folder" in _train(capsys, f"output_dir={tmp_path / 'f'}")
    assert "model.finetune: expected one of" in _train(capsys, "model.finetune=qlora")
    assert "config file not found" in _train(capsys, "--config", "/nonexistent.yaml")


@pytest.mark.parametrize("rows, needle", [
    ([{"text": "a", "label": 1}, {"text": "b", "label": 5}], "line 2: field 'label' = 5 is not a label"),
    ([{"body": "a", "label": 1}], "missing field 'text'"),
])
def test_bad_data_in_process(capsys, tmp_path, rows, needle):
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    err = _train(capsys, f"data.train_file={f}", f"output_dir={tmp_path / 'out'}")
    assert needle in err and str(f) in err
    assert not (tmp_path / "out").exists()


def test_bad_data_subprocess_exit_code_and_no_traceback(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "ok", "label": 1}\n{"text": "broken", "label": \n')
    proc = launch("train.py", [f"data.train_file={f}", f"output_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{f}: line 2: malformed JSON" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_file_and_checkpoint(tmp_path):
    proc = launch("eval.py", ["--checkpoint", str(tmp_path / "nope"), "--data", "x.jsonl", "--output",
                              str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such checkpoint folder" in proc.stderr


# ----------------------------------------------------------------------------- outputs, checkpoints, flags


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    """A real (untrained) LoRA checkpoint of the tiny model, and one of its full fine-tuning twin."""
    from clsgen_dist.checkpoint import save_checkpoint
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling import build_model

    out = {}
    for finetune in ("lora", "full"):
        cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32", f"model.finetune={finetune}",
                                 "data.label_names=[negative, positive]"])
        model, tok = build_model(cfg.model)
        out[finetune] = save_checkpoint(model, tok, cfg, tmp_path_factory.mktemp("ckpt") / finetune)
    return out


def test_unusable_output_paths_fail_before_any_work(capsys, tmp_path, ckpt):
    from clsgen_dist.cli import eval_main, predict_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    # predict: --output must be a file path, creatable
    err = main_error(capsys, predict_main, "--checkpoint", str(ckpt["lora"]), "--text", "ok", "--output", str(a_dir))
    assert f"--output {a_dir}: is a folder; expected a file path" in err
    err = main_error(capsys, predict_main, "--checkpoint", str(ckpt["lora"]), "--text", "ok",
                      "--output", str(a_file / "out.jsonl"))
    assert f"{a_file} is a file, so {a_file / 'out.jsonl'} cannot be created" in err
    # eval: --output is a folder; checked before the checkpoint is even read
    err = main_error(capsys, eval_main, "--checkpoint", str(tmp_path / "nope"), "--output", str(a_file))
    assert f"--output {a_file}: is a file; expected a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"] and not list(a_dir.iterdir())


def test_out_of_range_flags_and_blank_texts(capsys, ckpt):
    from clsgen_dist.cli import eval_main, predict_main

    c = str(ckpt["lora"])
    assert "--limit: expected an integer >= 1, got '0'" in main_error(
        capsys, eval_main, "--checkpoint", c, "--output", "/tmp/never", "--limit", "0")
    assert "--dev-limit: expected an integer >= 1, got '-1'" in main_error(
        capsys, eval_main, "--checkpoint", c, "--output", "/tmp/never", "--dev-limit", "-1")
    assert "--max-new-tokens: expected an integer >= 1, got '-1'" in main_error(
        capsys, predict_main, "--checkpoint", c, "--text", "ok", "--max-new-tokens", "-1")
    assert "--text number 2 is empty" in main_error(capsys, predict_main, "--checkpoint", c, "--text", "ok",
                                                     "--text", "   ")
    assert "data.test_limit must be a positive integer, got 0" in main_error(capsys, train_main, "data.test_limit=0")


def test_eval_ds_config_must_be_a_zero3_json(capsys, tmp_path, ckpt):
    """--ds-config names a ZeRO-3 JSON that exists (a relative path is also looked up in the
    repository): else one line, before any process group or model."""
    from clsgen_dist.cli import eval_main

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": 1}])
    common = ["--checkpoint", str(ckpt["lora"]), "--data", str(data), "--output", str(tmp_path / "o")]
    err = main_error(capsys, eval_main, *common, "--ds-config", "ds_configs/zero2.json")
    assert "--ds-config ds_configs/zero2.json: evaluating a partitioned model needs a ZeRO-3 config" in err
    err = main_error(capsys, eval_main, *common, "--ds-config", "ds_configs/nope.json")
    assert "ds_config: ds_configs/nope.json not found" in err
    (tmp_path / "auto.json").write_text('{"zero_optimization": {"stage": "auto"}}')
    err = main_error(capsys, eval_main, *common, "--ds-config", str(tmp_path / "auto.json"))
    assert "zero_optimization.stage must be set explicitly (0-3), got 'auto'" in err
    (tmp_path / "list.json").write_text("[1, 2]")
    err = main_error(capsys, eval_main, *common, "--ds-config", str(tmp_path / "list.json"))
    assert "holds a JSON list; expected an object of DeepSpeed settings" in err
    assert not (tmp_path / "o").exists()


def test_incomplete_checkpoints_say_what_is_missing(capsys, tmp_path, ckpt):
    import shutil

    from clsgen_dist.checkpoint import CheckpointError, check_checkpoint
    from clsgen_dist.cli import predict_main

    def broken(kind, *remove):
        d = tmp_path / f"{kind}-{'-'.join(remove)}"
        shutil.copytree(ckpt[kind], d)
        for name in remove:
            (d / name).unlink()
        return d

    for c in ckpt.values():
        check_checkpoint(c)  # complete ones pass
    d = broken("lora", "cls_head.safetensors")
    err = main_error(capsys, predict_main, "--checkpoint", str(d), "--text", "ok")
    assert f"{d}: incomplete clsgen checkpoint, missing cls_head.safetensors" in err
    with pytest.raises(CheckpointError, match="missing adapter_model.safetensors$"):
        check_checkpoint(broken("lora", "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing model.safetensors or model.safetensors.index.json"):
        check_checkpoint(broken("full", "model.safetensors"))
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoint folder"):
        check_checkpoint(ckpt["lora"] / "cls_head.safetensors")
    with pytest.raises(CheckpointError, match="not a complete clsgen checkpoint, missing COMPLETE$"):
        check_checkpoint(broken("lora", "COMPLETE"))
    # the folders a user is likely to point at instead: a training-state checkpoint, the run folder
    state = tmp_path / "run" / "checkpoints" / "step-00000004"
    state.mkdir(parents=True)
    (state / "COMPLETE").write_text("ok\n")
    (state / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing clsgen_config.yaml; it is a training-state checkpoint"):
        check_checkpoint(state)
    shutil.copytree(ckpt["lora"], tmp_path / "run" / "final")
    with pytest.raises(CheckpointError, match=f"it is a run's output folder: the checkpoint is {tmp_path}/run/final"):
        check_checkpoint(tmp_path / "run")
    moved = broken("lora")
    cfg_file = moved / "clsgen_config.yaml"
    cfg_file.write_text(_with_base(cfg_file.read_text(), "/nonexistent/base"))
    with pytest.raises(CheckpointError, match="the LoRA adapter's base model /nonexistent/base .*--base-model"):
        check_checkpoint(moved)


def test_moved_base_model_loads_with_base_model_flag(capsys, tmp_path, ckpt, tiny_dir):
    """The base a LoRA checkpoint names is gone (moved, another machine): predict, eval and export
    say to pass --base-model, and with it load the same model."""
    import json
    import shutil

    from clsgen_dist.cli import predict_main
    from clsgen_dist.export import main as export_main

    moved = tmp_path / "moved"
    shutil.copytree(ckpt["lora"], moved)
    cfg_file = moved / "clsgen_config.yaml"
    cfg_file.write_text(_with_base(cfg_file.read_text(), str(tmp_path / "gone")))
    err = main_error(capsys, predict_main, "--checkpoint", str(moved), "--text", "ok", "--no-explain")
    assert f"base model {tmp_path / 'gone'} (model.name_or_path in clsgen_config.yaml) does not exist" in err
    assert "--base-model" in err
    assert "--base-model" in main_error(capsys, export_main, "--checkpoint", str(moved), "--output",
                                         str(tmp_path / "x"))
    assert "(--base-model) does not exist" in main_error(capsys, predict_main, "--checkpoint", str(moved),
                                                          "--text", "ok", "--base-model", str(tmp_path / "nope"))

    def prob(c, *extra):
        assert predict_main(["--checkpoint", str(c), "--text", "A fine film.", "--no-explain", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prob"]

    assert prob(moved, "--base-model", str(tiny_dir)) == prob(ckpt["lora"])
    assert export_main(["--checkpoint", str(moved), "--output", str(tmp_path / "merged"), "--dtype", "float32",
                        "--base-model", str(tiny_dir)]) == 0
    assert prob(tmp_path / "merged") == pytest.approx(prob(ckpt["lora"]), abs=1e-5)


def test_relative_base_model_is_saved_absolute(tmp_path, tiny_dir, monkeypatch):
    """A run started with a relative model.name_or_path writes an absolute one into its checkpoint,
    which then loads from any working directory."""
    import shutil

    from clsgen_dist.checkpoint import check_checkpoint, save_checkpoint
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling import build_model

    shutil.copytree(tiny_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path / "models")
    cfg = load_config(None, ["model.name_or_path=tiny", "model.dtype=float32"])
    model, tok = build_model(cfg.model)
    out = save_checkpoint(model, tok, cfg, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert check_checkpoint(out).model.name_or_path == str(tmp_path / "models" / "tiny")


def _with_base(yaml_text: str, base: str) -> str:
    import yaml

    cfg = yaml.safe_load(yaml_text)
    cfg["model"]["name_or_path"] = base
    return yaml.safe_dump(cfg)


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    import os
    import stat

    from clsgen_dist.fileio import write_json_atomic, write_jsonl_atomic

    out = tmp_path / "preds.jsonl"
    write_jsonl_atomic(out, [{"id": 1}])
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(TypeError):
        write_jsonl_atomic(out, [{"id": 2}, {"id": object()}])  # fails half-way through
    assert out.read_text() == '{"id": 1}\n'  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "preds.jsonl"]  # no temporary file left


def test_export_never_replaces_the_checkpoint_or_a_folder_holding_it(tmp_path, ckpt):
    from clsgen_dist.checkpoint import CheckpointError, check_checkpoint
    from clsgen_dist.export import export_merged

    src = ckpt["lora"]
    before = sorted(p.name for p in src.parent.iterdir())
    for out, needle in [(src, "is the checkpoint"), (src.parent, "a folder holding the checkpoint"),
                        (src.parent.parent, "a folder holding the checkpoint")]:
        with pytest.raises(CheckpointError, match=needle):
            export_merged(src, out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine\n")
    with pytest.raises(CheckpointError, match="notes: a non-empty folder; the export replaces"):
        export_merged(src, tmp_path / "notes")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        export_merged(src, tmp_path / "f")
    with pytest.raises(CheckpointError, match="a clsgen checkpoint, not an earlier export"):
        export_merged(src, ckpt["full"])  # another run's checkpoint
    assert sorted(p.name for p in src.parent.iterdir()) == before and (tmp_path / "notes" / "keep.txt").is_file()
    check_checkpoint(src)
    out = export_merged(src, tmp_path / "merged", dtype="float32")  # a new folder, then replacing that export
    assert export_merged(src, out, dtype="float32") == out and check_checkpoint(out).model.finetune == "full"


def test_training_in_process_leaves_the_callers_signal_handlers(capsys, tmp_path):
    """run() takes SIGTERM/SIGUSR1 while it trains and gives them back, also when it fails: a
    test runner or notebook that called it can still be stopped."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 7}])
    _train(capsys, f"data.train_file={f}", f"output_dir={tmp_path / 'out'}")
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_model_that_leaks_across_packed_examples_is_refused_before_output(capsys, tmp_path, tokenizer):
    """An LFM2 (its short convolution carries the end of one example into the next) is refused at
    the build with one line saying why; nothing is written to output_dir. Its zero-shot baseline,
    which packs several prompts per forward too, is refused the same way, with no metrics.json."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from clsgen_dist.cli import eval_main
    from tests.conftest import review_splits

    model = tmp_path / "lfm2"
    Lfm2ForCausalLM(Lfm2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = review_splits(tmp_path / "data")
    err = _train(capsys, "--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={model}",
                 f"data.train_file={data['train']}", f"data.dev_file={data['dev']}", f"data.test_file={data['test']}",
                 f"output_dir={tmp_path / 'out'}")
    needle = f"{model} (lfm2, attn_implementation=sdpa) lets one example of a packed row change the next"
    assert needle in err, err
    assert not (tmp_path / "out").exists()
    err = main_error(capsys, eval_main, "--mode", "zero_shot", "--config", "launch/configs/tiny_cpu.yaml",
                      f"model.name_or_path={model}", "--data", str(data["test"]), "--dev", str(data["dev"]),
                      "--output", str(tmp_path / "zs"), "--ppl-tokens", "0", "--bootstrap", "0")
    assert needle in err, err
    assert not (tmp_path / "zs" / "metrics.json").exists()


def test_a_teacher_never_silently_replaces_the_files_explanations(capsys, tmp_path):
    """A train file that already has explanations (say, from launch/build_data.py with a strong
    teacher), trained without --config: default.yaml names the embedded teacher, which would
    rewrite them. One line says so and how to train on them, before any model or output."""
    from tests.conftest import review_splits

    import json

    from clsgen_dist.data.reading import DataError

    data = review_splits(tmp_path / "data")  # every other row explained
    n = sum("explanation" in json.loads(x) for x in data["train"].read_text().splitlines())
    err = _train(capsys, f"data.train_file={data['train']}", f"output_dir={tmp_path / 'out'}")
    total = len(data["train"].read_text().splitlines())
    assert f"{data['train']}: {n} of {total} rows already have an explanation ('explanation', e.g. id r1)" in err, err
    assert "the teacher's would replace them" in err and "set data.teacher=null (it is default;" in err, err
    assert not (tmp_path / "out").exists()
    # a resumed run goes on with the teacher's version it trained on (the teacher is not run here: the
    # refusal would come before it, and reading the file is all that differs)
    from clsgen_dist.config import load_config
    from clsgen_dist.data import construct
    from clsgen_dist.train import load_splits

    cfg = load_config(None, [f"data.train_file={data['train']}", "data.teacher=default",
                             "data.label_names=[negative, positive]", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="would replace them"):
        load_splits(cfg)
    built = []

    def fake_build(*a, **k):  # stands in for the teacher model: records that the build was reached
        built.append(k)
        raise RuntimeError("teacher reached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(construct, "build_explanations", fake_build)
        mp.setattr(construct, "LocalTeacher", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="teacher reached"):
            load_splits(cfg, resuming=True)
        # explanations only past data.train_limit (rows training never reads) are not refused
        with pytest.raises(RuntimeError, match="teacher reached"):
            load_splits(load_config(None, [f"data.train_file={data['train']}", "data.teacher=default",
                                           "data.train_limit=1", "data.label_names=[negative, positive]",
                                           f"output_dir={tmp_path / 'out3'}"]))
        # a file without explanations is the teacher's to explain
        plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "ok", "label": 1}, {"text": "bad", "label": 0}])
        with pytest.raises(RuntimeError, match="teacher reached"):
            load_splits(load_config(None, [f"data.train_file={plain}", "data.teacher=default",
                                           f"output_dir={tmp_path / 'out2'}"]))
    assert len(built) == 3


def test_eval_without_data_needs_a_test_split(capsys, tmp_path):
    """launch/eval.py with no --data evaluates the run's own test split; a run config that names
    none (its own train file, no data.test_file) gets one line asking for --data."""
    from clsgen_dist.cli import eval_main

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok", "label": 1}, {"text": "bad", "label": 0}])
    (tmp_path / "my.yaml").write_text(f"data:\n  train_file: {train}\n")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.json").write_text("{}")  # an earlier evaluation's
    err = main_error(capsys, eval_main, "--mode", "zero_shot", "--config", str(tmp_path / "my.yaml"),
                      "--output", str(tmp_path / "o"))
    assert f"--data is required: the config {tmp_path / 'my.yaml'} names no test split (data.test_file)" in err, err
    assert not (tmp_path / "o" / "metrics.json").exists()  # as after any failed evaluation: no complete-looking folder
