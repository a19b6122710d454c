"""Model folders and checkpoints that cannot load: one ``error:`` line naming the path (or flag),
what is wrong and what to do, exit status 2, before any process group or model load."""

import json
import os
import shutil
from pathlib import Path

import pytest

from clsgen_dist.cli import eval_main, predict_main, train_main
from tests.conftest import make_tiny_llama, review_splits
from tests.integration._run import main_error

TINY_CPU = str(Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny_cpu.yaml")


def _main_error(capsys, main, *args) -> str:
    """:func:`main_error`, and the error line is the last line of stderr."""
    err = main_error(capsys, main, *args)
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == err.strip().splitlines()[-1:], err
    return err


@pytest.fixture
def no_process_group(monkeypatch):
    """Fails the test if the command reaches init_distributed (its first launch can take 45 s)."""
    from clsgen_dist import evaluate_cli, train

    def reached(*a, **k):
        raise AssertionError("init_distributed reached before the user error was found")

    monkeypatch.setattr(train, "init_distributed", reached)
    monkeypatch.setattr(evaluate_cli, "init_distributed", reached)
    monkeypatch.setattr("clsgen_dist.distributed.init_distributed", reached)  # predict imports it late


@pytest.fixture(scope="module")
def not_models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("not-models")
    (d / "a_file").write_text("x\n")
    (d / "empty").mkdir()
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text('{"model_type": "llama"}')
    return {"missing": (d / "nope", "does not exist"), "file": (d / "a_file", "is a file, not a model folder"),
            "empty": (d / "empty", "is not a Hugging Face model folder (no config.json)"),
            "no weights": (d / "no_weights", "holds no weights")}


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no weights"])
def test_model_name_or_path_that_is_no_model_folder(capsys, tmp_path, not_models, no_process_group, kind):
    """train and zero-shot eval: a ConfigError naming model.name_or_path, before any process group
    (it used to be FileNotFoundError, OSError or ValueError tracebacks, or HF's 'Repo id must be in
    the form' after several of them)."""
    path, needle = not_models[kind]
    data = review_splits(tmp_path / "data")
    err = _main_error(capsys, train_main, "--config", TINY_CPU, f"model.name_or_path={path}",
                      f"data.train_file={data['train']}", f"output_dir={tmp_path / 'out'}")
    assert f"model.name_or_path: {path} {needle}" in err and "point it at a local Hugging Face model folder" in err, err
    assert not (tmp_path / "out").exists()
    err = _main_error(capsys, eval_main, "--mode", "zero_shot", "--config", TINY_CPU, f"model.name_or_path={path}",
                      "--data", str(data["test"]), "--output", str(tmp_path / "zs"))
    assert f"model.name_or_path: {path} {needle}" in err, err


def test_default_and_real_model_folders_pass(tiny_dir):
    from clsgen_dist.modeling.build import check_model_folder

    from clsgen_dist.modeling.build import resolve_model_path

    check_model_folder("default")  # the embedded SmolLM2, resolved (and converted once) where it loads:
    check_model_folder(resolve_model_path("default"))  # its folder passes too
    check_model_folder(str(tiny_dir))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ckpts(tiny_dir, tokenizer, tmp_path_factory) -> dict:
    """LoRA checkpoints of the tiny model and of a one-layer-deeper twin, and a full one."""
    from clsgen_dist.checkpoint import save_checkpoint
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling import build_model

    root = tmp_path_factory.mktemp("model-errors")
    deep = make_tiny_llama(tokenizer, root / "deep-model", layers=3)
    out = {}
    for name, base, finetune in (("lora", tiny_dir, "lora"), ("full", tiny_dir, "full"), ("deep", deep, "lora")):
        cfg = load_config(None, [f"model.name_or_path={base}", "model.dtype=float32", f"model.finetune={finetune}",
                                 "data.label_names=[negative, positive]"])
        model, tok = build_model(cfg.model)
        out[name] = save_checkpoint(model, tok, cfg, root / name)
    return out


@pytest.fixture(scope="module")
def other_bases(tiny_dir, tokenizer, tmp_path_factory) -> dict:
    """Model folders that are not the tiny model: another hidden size, another architecture of the
    same sizes, another MLP width of the same hidden size."""
    root = tmp_path_factory.mktemp("other-bases")
    out = {"wide": make_tiny_llama(tokenizer, root / "wide", hidden=96)}
    cfg = json.loads((tiny_dir / "config.json").read_text())
    for name, changed in (("qwen", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
                          ("mlp", {"intermediate_size": 96})):
        shutil.copytree(tiny_dir, root / name)
        (root / name / "config.json").write_text(json.dumps({**cfg, **changed}))
        out[name] = root / name
    return out


@pytest.mark.parametrize("ckpt, base, needle", [
    ("lora", "wide", "its hidden size is 96 (config.json), the adapter's is 64 (the input size of cls_head"),
    ("lora", "qwen", "its config.json makes a Qwen2ForCausalLM (qwen2), the adapter was trained on a LlamaForCausalLM"),
    ("lora", "mlp", "6 of the adapter's LoRA matrices do not fit its layers (e.g. model.layers.0.mlp.down_proj has "
                    "in features 96 there, 128 in the adapter)"),
    # fewer layers: peft would load the adapter without its last layer, and say nothing
    ("deep", "tiny", "it lacks 7 of the modules the adapter adapts (fewer layers, or other module names; "
                     "e.g. model.layers.2."),
])
def test_base_model_of_another_size_or_architecture(capsys, tmp_path, ckpts, other_bases, tiny_dir, ckpt, base,
                                                     needle):
    """--base-model that is not the adapter's base: a CheckpointError saying what differs, before
    any model loads (it used to be a RuntimeError 'size mismatch' traceback, or a silent load)."""
    path = tiny_dir if base == "tiny" else other_bases[base]
    err = _main_error(capsys, predict_main, "--checkpoint", str(ckpts[ckpt]), "--base-model", str(path),
                      "--text", "x")
    assert f"{ckpts[ckpt]}: the base model {path} (--base-model) is not the one this LoRA adapter was trained on: " \
           f"{needle}" in err, err
    assert "(the run trained on " in err and err.rstrip().endswith("with --base-model"), err


def test_a_renamed_class_of_the_same_model_is_not_refused(tmp_path, ckpts, tiny_dir):
    """transformers may map a model type to another class in a later version (gemma3: ...ForCausalLM,
    then ...ForConditionalGeneration): the adapter's recorded class of the same family still loads."""
    from clsgen_dist.checkpoint import check_checkpoint

    ck = tmp_path / "renamed"
    shutil.copytree(ckpts["lora"], ck)
    adapter = json.loads((ck / "adapter_config.json").read_text())
    assert adapter["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    adapter["auto_mapping"]["base_model_class"] = "LlamaForConditionalGeneration"
    (ck / "adapter_config.json").write_text(json.dumps(adapter))
    assert check_checkpoint(ck, base_model=str(tiny_dir)).model.name_or_path == str(tiny_dir)
    adapter["auto_mapping"]["base_model_class"] = "MistralForCausalLM"  # another family: refused
    (ck / "adapter_config.json").write_text(json.dumps(adapter))
    from clsgen_dist.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="the adapter was trained on a MistralForCausalLM"):
        check_checkpoint(ck, base_model=str(tiny_dir))


def test_checkpoint_checked_once_per_command(capsys, tmp_path, ckpts, tiny_dir, monkeypatch):
    """predict and eval check the checkpoint (safetensors headers, the meta-device build of
    --base-model) once, before any process group, and hand the result to the loader."""
    import torch

    from clsgen_dist import checkpoint, evaluate_cli

    calls = {"check": 0, "misfits": 0}
    check, misfits = checkpoint.check_checkpoint, checkpoint._adapter_misfits

    def counted_check(*a, **k):
        calls["check"] += 1
        return check(*a, **k)

    def counted_misfits(*a, **k):
        calls["misfits"] += 1
        return misfits(*a, **k)

    monkeypatch.setattr(checkpoint, "check_checkpoint", counted_check)
    monkeypatch.setattr(checkpoint, "_adapter_misfits", counted_misfits)
    monkeypatch.setattr(evaluate_cli, "check_checkpoint", counted_check)
    predict_main(["--checkpoint", str(ckpts["lora"]), "--base-model", str(tiny_dir), "--text", "x", "--no-explain"])
    assert calls == {"check": 1, "misfits": 1}, calls
    calls.update(check=0, misfits=0)
    monkeypatch.setattr(evaluate_cli, "init_distributed", lambda: torch.device("cpu"))  # a world of one, no group
    data = review_splits(tmp_path / "data")
    eval_main(["--checkpoint", str(ckpts["lora"]), "--base-model", str(tiny_dir), "--data", str(data["test"]),
               "--limit", "2", "--explain-limit", "0", "--ppl-tokens", "0", "--bootstrap", "0",
               "--output", str(tmp_path / "o")])
    assert calls == {"check": 1, "misfits": 1}, calls
    capsys.readouterr()


def test_base_model_mismatch_in_export(capsys, tmp_path, ckpts, other_bases):
    from clsgen_dist.export import main as export_main

    err = _main_error(capsys, export_main, "--checkpoint", str(ckpts["lora"]), "--base-model",
                      str(other_bases["wide"]), "--output", str(tmp_path / "merged"))
    assert "its hidden size is 96 (config.json), the adapter's is 64" in err, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("kind", ["file", "empty", "no weights"])
def test_base_model_that_is_no_model_folder(capsys, ckpts, not_models, kind):
    path, needle = not_models[kind]
    err = _main_error(capsys, predict_main, "--checkpoint", str(ckpts["lora"]), "--base-model", str(path),
                      "--text", "x")
    assert f"the LoRA adapter's base model {path} (--base-model) {needle}" in err, err
    assert "it is needed to load the adapter: pass the base's folder on this machine with --base-model" in err, err


def _broken(tmp_path: Path, src: Path, name: str, how: str) -> Path:
    d = tmp_path / f"{src.name}-{name}-{how if how in ('truncate', 'header', 'remove') else 'edited'}"
    shutil.copytree(src, d)
    f = d / name
    if how == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif how == "header":
        os.truncate(f, 100)
    elif how == "remove":
        f.unlink()
    else:
        f.write_text(how)
    return d


@pytest.mark.parametrize("kind, name, how, needle", [
    ("lora", "cls_head.safetensors", "header", "invalid header length"),
    ("lora", "adapter_model.safetensors", "truncate", "file not fully covered"),
    ("full", "model.safetensors", "truncate", "file not fully covered"),
    ("lora", "adapter_config.json", '{"r": 8, "lora_alpha"', "Expecting"),
    ("full", "config.json", "", "Expecting value"),
    ("lora", "tokenizer_config.json", "[1, 2]", "expected a JSON object, got a list"),
])
def test_corrupt_checkpoint_files(capsys, tmp_path, ckpts, kind, name, how, needle):
    """A truncated or corrupt file: one line naming it, found from headers and the small JSON files
    (it used to be SafetensorError or JSONDecodeError tracebacks while loading)."""
    from clsgen_dist.checkpoint import CheckpointError, check_checkpoint

    d = _broken(tmp_path, ckpts[kind], name, how)
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(d)
    assert str(e.value).startswith(f"{d / name}: unreadable (truncated or corrupt: ") and needle in str(e.value)
    assert str(e.value).endswith("re-copy the checkpoint")
    if name.endswith(".safetensors"):  # and in one line from the commands
        err = _main_error(capsys, predict_main, "--checkpoint", str(d), "--text", "x", "--no-explain")
        assert f"{d / name}: unreadable (truncated or corrupt" in err, err


def test_corrupt_checkpoint_in_eval_before_any_process_group(capsys, tmp_path, ckpts, no_process_group):
    d = _broken(tmp_path, ckpts["lora"], "cls_head.safetensors", "truncate")
    data = review_splits(tmp_path / "data")
    err = _main_error(capsys, eval_main, "--checkpoint", str(d), "--data", str(data["test"]),
                      "--output", str(tmp_path / "o"))
    assert f"{d / 'cls_head.safetensors'}: unreadable (truncated or corrupt" in err, err


def test_corrupt_checkpoint_in_predict_under_a_launcher_before_any_process_group(capsys, tmp_path, ckpts,
                                                                                  no_process_group, monkeypatch):
    d = _broken(tmp_path, ckpts["lora"], "cls_head.safetensors", "truncate")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: predict shards, after the checks
    err = _main_error(capsys, predict_main, "--checkpoint", str(d), "--text", "ok")
    assert f"{d / 'cls_head.safetensors'}: unreadable (truncated or corrupt" in err, err


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_tokenizer_files(capsys, tmp_path, ckpts, name):
    d = _broken(tmp_path, ckpts["lora"], name, "remove")
    err = _main_error(capsys, predict_main, "--checkpoint", str(d), "--text", "x", "--no-explain")
    assert f"{d}: incomplete clsgen checkpoint, missing tokenizer files ({name})" in err, err


def test_unknown_key_in_the_checkpoints_config_names_that_file(capsys, tmp_path, ckpts):
    """The checkpoint's clsgen_config.yaml, not the user's config: the message says whose it is."""
    d = _broken(tmp_path, ckpts["lora"], "clsgen_config.yaml", "remove")
    (d / "clsgen_config.yaml").write_text((ckpts["lora"] / "clsgen_config.yaml").read_text() + "future_key: 1\n")
    err = _main_error(capsys, predict_main, "--checkpoint", str(d), "--text", "x")
    assert (f"error: {d / 'clsgen_config.yaml'} (the checkpoint's saved run config): unknown config key "
            f"'future_key'") in err, err
    assert "another version of clsgen-dist" in err


def test_full_checkpoint_eval_needs_its_base_for_the_perplexity_ratio(capsys, tmp_path, ckpts, no_process_group):
    """A fully fine-tuned checkpoint loads the base only for the perplexity ratio: a moved base is
    one line before any process group (it used to fail after the whole evaluation)."""
    import yaml

    d = _broken(tmp_path, ckpts["full"], "clsgen_config.yaml", "remove")
    cfg = yaml.safe_load((ckpts["full"] / "clsgen_config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tmp_path / "gone")
    (d / "clsgen_config.yaml").write_text(yaml.safe_dump(cfg))
    data = review_splits(tmp_path / "data")
    err = _main_error(capsys, eval_main, "--checkpoint", str(d), "--data", str(data["test"]),
                      "--output", str(tmp_path / "o"))
    assert (f"model.name_or_path in {d / 'clsgen_config.yaml'}: {tmp_path / 'gone'} does not exist" in err
            and "--ppl-tokens 0" in err), err
