import json
import math

import pytest
import torch

from clsgen_dist.config import ConfigError, load_config
from clsgen_dist.distributed.engine import fill_ds_config, lr_lambda, make_optimizer, resolve_optimizer
from clsgen_dist.resume import STATE, check_resume_settings, training_settings
from tests.integration._run import REPO


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\n  learning_rate: 1e-3\ndata:\n  label_names: [bad, good]\n")
    cfg = load_config(f, ["train.max_steps=9", "model.finetune=full", "data.train_limit=null", "resume=auto",
                          "model.lora_target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 9 and cfg.train.learning_rate == 1e-3 and cfg.model.finetune == "full"
    assert cfg.data.label_names == ["bad", "good"] and cfg.data.train_limit is None and cfg.resume == "auto"


@pytest.mark.parametrize("override, needle", [
    ("nope=1", "unknown config key 'nope'"),
    ("train.lr=1", "valid keys under train:"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("data.label_names=[a]", "expected two non-empty names"),
    ("data.verdict_template=Answer", "must contain '{label}'"),
    ("resume=maybe", "resume: expected true, false or auto"),
    ("train", "expected key=value"),
    ("model.loss_grad_mode=lazy", "model.loss_grad_mode: expected one of"),
    ("train.optimizer=adamw_4bit", "train.optimizer: expected one of"),
    # 0 and 1 equal False and True: refused rather than taken for the other one
    ("resume=0", "resume: expected true, false or auto, got 0"),
    ("resume=1", "resume: expected true, false or auto, got 1"),
    ("train.max_steps=.inf", "train.max_steps: expected an integer, got inf"),
    ("train.learning_rate=.nan", "train.learning_rate: expected a finite number"),
    ("train.learning_rate=true", "train.learning_rate: expected a number, got True"),
    ("train.learning_rate=-1e-4", "train.learning_rate must be a finite number > 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be a finite number >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a finite number >= 0"),
    ("model.lora_dropout=1.5", "model.lora_dropout must be a finite number >= 0 and < 1"),
    ("model.lora_alpha=-8", "model.lora_alpha must be a finite number > 0"),
    ("eval.batch_size=0", "eval.batch_size must be a positive integer"),
    ("eval.max_new_tokens=-3", "eval.max_new_tokens must be a positive integer"),
    ("eval.explain_limit=-2", "eval.explain_limit must be -1 (all), 0 (none) or a count"),
    ("data.teacher_batch_size=0", "data.teacher_batch_size must be a positive integer"),
    ("model.lora_target_modules=5", "model.lora_target_modules: expected 'all-linear', a non-empty list"),
    ("model.lora_target_modules=[]", "model.lora_target_modules: expected"),
    ("model.lora_target_modules=[q_proj,1]", "model.lora_target_modules: expected"),
    # an empty value (`data.train_file=` in a script whose variable was unset) is no path
    ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ("data.train_file=", "data.train_file is empty; expected a path, or null for none"),
    ("data.teacher= ", "data.teacher is empty"),
    ("ds_config=", "ds_config is empty; expected a path"),
    ("output_dir=", "output_dir is empty; expected a path"),
])
def test_bad_config_messages(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_config_files_that_are_no_yaml_mapping_name_the_problem(tmp_path):
    """A key given twice (YAML would keep the last silently), a file saved as Latin-1, a folder."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  learning_rate: 1.0e-3\n  max_steps: 3\n  learning_rate: 2.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(dup)
    assert str(e.value) == f"{dup}: not valid YAML (line 4, column 3: key 'learning_rate' appears twice in one mapping)"
    load_config(None, ["train.max_steps=3", "train.max_steps=4"])  # overrides: the last one wins, as on a command line
    odd = tmp_path / "odd.yaml"  # a list as a key: PyYAML's own one-line error, not a TypeError
    odd.write_text("model:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match=r"odd.yaml: not valid YAML \(line 2, column 5: found unhashable key\)"):
        load_config(odd)
    merged = tmp_path / "merge.yaml"  # a YAML merge key's values may be overridden: no duplicate
    merged.write_text("train:\n  <<: {max_steps: 2, seed: 1}\n  max_steps: 5\n")
    cfg = load_config(merged)
    assert (cfg.train.max_steps, cfg.train.seed) == (5, 1)
    import yaml

    from clsgen_dist.config import _UniqueKeyLoader

    doc = "a: &a {lr: 1, steps: 2}\nb:\n  <<: *a\n  steps: 3\n"
    assert yaml.load(doc, Loader=_UniqueKeyLoader) == yaml.safe_load(doc) == {"a": {"lr": 1, "steps": 2},
                                                                            "b": {"lr": 1, "steps": 3}}
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  instruction: Caf\u00e9 review?\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not valid UTF-8 \(byte 24\); save the file as UTF-8"):
        load_config(latin)
    with pytest.raises(ConfigError, match="is a folder; expected a YAML config file"):
        load_config(tmp_path)


def test_text_overrides_are_taken_as_typed(tmp_path):
    """A string field gets the override's text, not a YAML reading of it (which made a mapping of
    'Classify: ...', cut '#…' as a comment and turned no/yes into 'False'/'True')."""
    cfg = load_config(None, ["data.instruction=Classify: is it positive?", "data.label_names=[no, yes]",
                             "data.verdict_template=Verdict: {label}", "data.system_prompt=Rate it #1 or #2",
                             "data.id_field='quoted'", "data.dev_file=null", "data.test_file=None",
                             "train.learning_rate=1e-4",
                             "model.lora_target_modules=[q_proj, v_proj]", "resume=auto"])
    d = cfg.data
    assert d.instruction == "Classify: is it positive?" and d.label_names == ["no", "yes"]
    assert d.verdict_template == "Verdict: {label}" and d.system_prompt == "Rate it #1 or #2"
    assert d.id_field == "quoted" and d.dev_file is None and d.test_file is None and cfg.train.learning_rate == 1e-4
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.resume == "auto"
    # in a YAML file, unquoted no/yes are booleans: refused with the fix, never turned into 'False'
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  label_names: [no, yes]\n")
    with pytest.raises(ConfigError, match="data.label_names: expected a string, got the boolean False.*quote it"):
        load_config(f)
    f.write_text("data:\n  label_names: ['no', 'yes']\n  instruction: 'Classify: is it positive?'\n")
    assert load_config(f).data.label_names == ["no", "yes"]


def test_recompute_tiles_grad_mode_needs_the_triton_loss():
    from clsgen_dist.train import check_device_options

    with pytest.raises(ConfigError, match="needs model.loss_impl=auto or triton, got model.loss_impl=torch"):
        load_config(None, ["model.loss_impl=torch", "model.loss_grad_mode=recompute_tiles"])
    cfg = load_config(None, ["model.loss_grad_mode=recompute_tiles"])  # auto: fine until the device is known
    with pytest.raises(ConfigError, match="on cpu model.loss_impl=auto resolves to torch"):
        check_device_options(cfg.model, torch.device("cpu"), torch.float32)
    check_device_options(load_config(None, []).model, torch.device("cpu"), torch.float32)  # the default: eager
    # recompute runs on either implementation; the reference loss has no gradient modes
    for impl in ("auto", "torch"):
        cfg = load_config(None, [f"model.loss_impl={impl}", "model.loss_grad_mode=recompute"])
        check_device_options(cfg.model, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="model.loss_impl=reference materialises the logits"):
        load_config(None, ["model.loss_impl=reference", "model.loss_grad_mode=recompute"])


def test_head_learning_rate_zero_freezes_the_head_not_defaults_it():
    from clsgen_dist.distributed.engine import param_groups

    model = torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2), "cls_head": torch.nn.Linear(2, 1)})
    lrs = lambda *ov: [g["lr"] for g in param_groups(model, load_config(None, ["train.learning_rate=0.1", *ov]))]  # noqa: E731
    assert lrs() == [0.1, 0.1, 0.1] and lrs("train.head_learning_rate=0.5") == [0.1, 0.1, 0.5]
    assert lrs("train.head_learning_rate=0") == [0.1, 0.1, 0.0]


def test_weight_decay_skips_vectors_and_the_head():
    """Norm gains and biases are not decayed (HF Trainer's rule), nor is the classification head."""
    from clsgen_dist.distributed.engine import param_groups

    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 3), "norm": torch.nn.LayerNorm(3),
                                 "cls_head": torch.nn.Linear(3, 1)})
    groups = param_groups(model, load_config(None, ["train.weight_decay=0.1"]))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model["proj"].weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_overrides_may_sit_among_the_flags(capsys):
    """launch/quickstart.sh puts overwrite=true before the user's --config and overrides."""
    from clsgen_dist.cli import train_main

    assert train_main(["overwrite=true", "--config", str(REPO / "launch/configs/tiny_cpu.yaml"),
                       "train.max_steps=5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "overwrite: true" in out


def test_earlier_run_needs_run_metadata(tmp_path):
    """A user's folder that happens to hold 'eval/' is not an earlier run (nor removed as one); a
    torn log line left by a killed process is dropped on resume."""
    from clsgen_dist.resume import earlier_run, resolve_resume
    from clsgen_dist.train import _logged_step

    (tmp_path / "eval").mkdir()
    assert earlier_run(tmp_path) == [] and resolve_resume(False, tmp_path) is None
    (tmp_path / "config.yaml").write_text("{}\n")
    assert earlier_run(tmp_path) == ["eval"]
    with pytest.raises(ConfigError, match="already holds a run \\(eval\\)"):
        resolve_resume(False, tmp_path)
    assert _logged_step('{"step": 3, "loss": 1.0}') == 3 and _logged_step('{"step": 4, "lo') == float("inf")


def test_every_shipped_yaml_loads():
    for f in (REPO / "launch/configs").glob("*.yaml"):
        load_config(f)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_ds_auto_values_filled(name):
    cfg = load_config(None, ["train.micro_batch_size=2", "train.gradient_accumulation_steps=3",
                             "train.max_grad_norm=0.5", "train.learning_rate=1e-4"])
    ds = json.loads((REPO / "ds_configs" / name).read_text())
    out = fill_ds_config(ds, cfg, world_size=4, dtype=torch.bfloat16)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 24 and out["gradient_clipping"] == 0.5 and out["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(out)
    if "optimizer" in out:
        assert out["optimizer"]["params"]["lr"] == 1e-4


def test_ds_conflicting_value_is_an_error():
    cfg = load_config(None, ["train.gradient_accumulation_steps=3"])
    ds = json.loads((REPO / "ds_configs/zero2.json").read_text()) | {"gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4 conflicts with the run config"):
        fill_ds_config(ds, cfg, world_size=1, dtype=torch.float32)


def test_optimizer_auto_is_paged_8bit_only_for_qlora_on_cuda():
    def resolved(*over, cuda):
        return resolve_optimizer(load_config(None, list(over)), cuda)

    assert resolved("model.quantization=nf4", cuda=True) == "paged_adamw_8bit"
    assert resolved("model.quantization=nf4", cuda=False) == "adamw_torch"
    assert resolved(cuda=True) == "adamw_torch"
    assert resolved("train.optimizer=adamw_8bit", cuda=False) == "adamw_8bit"
    assert resolved("model.quantization=nf4", "train.optimizer=adamw_torch", cuda=True) == "adamw_torch"


def test_make_optimizer_passes_the_groups_and_hyperparameters():
    """The bitsandbytes optimizers get each group's own lr and weight decay: with 8-bit states (tensors
    of >= 4,096 elements) three steps move the weights as torch AdamW's do, group by group, up to the
    quantization error (about 1% on average; single elements with a tiny second moment stray more).
    A lost lr (10x apart) or weight decay (half the step of group 0) would be far outside."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = [torch.randn(64, 128), torch.randn(128, 64)]
    grads = [torch.randn_like(x) for x in w]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    out = {}
    for name in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit"):
        ps = [torch.nn.Parameter(x.clone()) for x in w]
        opt = make_optimizer(name, [{"params": [ps[0]], "lr": 1e-2, "weight_decay": 0.5},
                                    {"params": [ps[1]], "lr": 1e-3, "weight_decay": 0.0}], **kw)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        out[name] = [p.detach() for p in ps]
        if name != "adamw_torch":
            assert opt.state[ps[0]]["state1"].dtype == torch.uint8  # 8-bit moments
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        for i, (a, b, x) in enumerate(zip(out[name], out["adamw_torch"], w)):
            moved = (b - x).abs().mean()  # 3 steps of ~lr each (+ decay on group 0)
            assert (a - b).abs().mean() < 0.03 * moved, (name, i, (a - b).abs().mean() / moved)
            assert not torch.equal(a, b)


def test_ds_optimizer_choices_are_checked_before_the_model_is_built():
    ds_off = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())
    with pytest.raises(ConfigError, match="names its own optimizer \\('AdamW'\\) and train.optimizer=adamw_8bit"):
        fill_ds_config(ds_off, load_config(None, ["train.optimizer=adamw_8bit"]), world_size=1, dtype=torch.float32)
    fill_ds_config(ds_off, load_config(None, []), world_size=1, dtype=torch.float32)  # auto: the JSON's CPU Adam
    no_block = {k: v for k, v in ds_off.items() if k != "optimizer"}
    with pytest.raises(ConfigError, match="offloads the optimizer .* but has no 'optimizer' block"):
        fill_ds_config(no_block, load_config(None, []), world_size=1, dtype=torch.float32)
    fill_ds_config(no_block | {"zero_force_ds_cpu_optimizer": False}, load_config(None, []), world_size=1,
                   dtype=torch.float32)  # the user's explicit choice


def test_resume_compares_the_optimizer_and_the_base_model(tmp_path):
    """What a checkpoint records and a resume must match: the optimizer it stepped with (auto resolved,
    since a QLoRA run's differs between a GPU and a CPU; a DeepSpeed JSON's own optimizer block) and
    a fingerprint of the base model files (frozen weights are rebuilt from them). A checkpoint older
    than these keys compares its optimizer with what auto picks now, and skips the fingerprint. A
    checkpoint of 8-bit states saved by 2 ZeRO ranks is refused on 1 with the reason (the universal
    conversion needs fp32 Adam moments)."""
    cfg = load_config(None, ["train.optimizer=adamw_8bit"])
    plain = load_config(None, [])
    ckpt = tmp_path / "step-00000003"
    ckpt.mkdir()

    def save(settings, ranks=1, stage=2):
        (ckpt / STATE).write_text(json.dumps({"step": 3, "world_size": ranks, "zero_stage": stage,
                                              "settings": settings}))

    settings = training_settings(cfg, 1)
    assert settings["train.optimizer"] == "adamw_8bit" and len(settings["model.fingerprint"]) == 16
    save(settings)
    check_resume_settings(ckpt, cfg, 1, 2)
    with pytest.raises(ConfigError, match="train.optimizer='adamw_8bit' there, 'adamw_torch' now"):
        check_resume_settings(ckpt, plain, 1, 2)
    old = {k: v for k, v in training_settings(plain, 1).items() if k not in ("train.optimizer", "model.fingerprint")}
    save(old)  # written before the keys existed: torch AdamW (auto, no JSON optimizer)
    check_resume_settings(ckpt, plain, 1, 2)
    with pytest.raises(ConfigError, match="train.optimizer='adamw_torch' there, 'adamw_8bit' now"):
        check_resume_settings(ckpt, load_config(None, ["train.optimizer=adamw_8bit"]), 1, 2)
    ds_adamw = {"optimizer": {"type": "AdamW", "params": {}}}
    with pytest.raises(ConfigError, match="train.optimizer='ds_config:AdamW' there, 'adamw_torch' now"):
        save(training_settings(plain, 1, ds=ds_adamw))
        check_resume_settings(ckpt, plain, 1, 2)

    save(training_settings(cfg, 2), ranks=2)
    two = load_config(None, ["train.optimizer=adamw_8bit", "train.gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="saved by 2 ranks under ZeRO stage 2 with train.optimizer=adamw_8bit, "
                                          "and this run has 1.*Resume on 2 ranks"):
        check_resume_settings(ckpt, two, 1, 2)
    save(training_settings(cfg, 2), ranks=2, stage=0)
    check_resume_settings(ckpt, two, 1, 0)  # stage 0: every rank holds the whole state
    save(training_settings(plain, 2, ds=ds_adamw), ranks=2)  # DeepSpeed's own fp32 Adam converts fine
    check_resume_settings(ckpt, load_config(None, ["train.gradient_accumulation_steps=2"]), 1, 2, ds=ds_adamw)


def test_resume_refuses_a_changed_base_model(tmp_path, tokenizer):
    """The base model folder rewritten between the checkpoint and the resume with a model of the same
    shapes and other values (a re-seeded or retrained one, an instruct version) is a settings error
    naming it; the same files copied elsewhere are the same model."""
    import shutil

    from tests.conftest import make_tiny_llama

    base = make_tiny_llama(tokenizer, tmp_path / "base", seed=0)
    cfg = load_config(None, [f"model.name_or_path={base}"])
    ckpt = tmp_path / "step-00000003"
    ckpt.mkdir()
    (ckpt / STATE).write_text(json.dumps({"step": 3, "world_size": 1, "zero_stage": 2,
                                          "settings": training_settings(cfg, 1)}))
    check_resume_settings(ckpt, cfg, 1, 2)
    copy = shutil.copytree(base, tmp_path / "copy")
    assert training_settings(load_config(None, [f"model.name_or_path={copy}"]), 1)["model.fingerprint"] == \
        training_settings(cfg, 1)["model.fingerprint"]
    make_tiny_llama(tokenizer, base, seed=1)
    with pytest.raises(ConfigError, match=f"model.fingerprint=.*the model files at {base} changed"):
        check_resume_settings(ckpt, cfg, 1, 2)


def test_lr_schedule_shapes():
    cfg = load_config(None, ["train.max_steps=10", "train.warmup_steps=2", "train.lr_scheduler=linear"])
    f = lr_lambda(cfg)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    f = lr_lambda(load_config(None, ["train.max_steps=10", "train.warmup_steps=2", "train.lr_scheduler=cosine"]))
    assert [round(f(s), 6) for s in (0, 2, 4, 6, 10)] == [0.5, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6),
                                                          0.5, 0.0]
    f = lr_lambda(load_config(None, ["train.max_steps=10", "train.warmup_steps=2", "train.lr_scheduler=constant"]))
    assert [f(s) for s in (0, 5, 10)] == [0.5, 1.0, 1.0]


def test_checkpoint_module_load_is_strict_but_for_frozen_weights():
    """A periodic checkpoint leaves frozen parameters out (the resumed run builds them again), so their
    absence is fine; a trainable parameter missing, or a key the model does not have, is a mismatch."""
    from clsgen_dist.resume import CheckpointMismatch, _load_module_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    saved = {k: v.clone() + 1 for k, v in model.state_dict().items() if k.startswith("1.")}
    _load_module_state(saved, model)
    assert torch.equal(model[1].weight, saved["1.weight"])
    with pytest.raises(CheckpointMismatch, match="missing \\['1.bias'\\]"):
        _load_module_state({"1.weight": saved["1.weight"]}, model)
    with pytest.raises(CheckpointMismatch, match="unexpected \\['2.weight'\\]"):
        _load_module_state({**saved, "2.weight": torch.zeros(1)}, model)


def test_loss_accum_dtype_reaches_the_fused_loss_and_is_for_bf16_models(monkeypatch):
    """model.loss_accum_dtype: checked, refused for a float32 model (it would only round the
    gradients), and passed by the model to dual_head_loss as a torch dtype."""
    from clsgen_dist import loss as loss_mod
    from clsgen_dist.modeling.dual_head import DualHeadModel
    from clsgen_dist.train import check_device_options

    with pytest.raises(ConfigError, match="model.loss_accum_dtype: expected one of"):
        load_config(None, ["model.loss_accum_dtype=float16"])
    cfg = load_config(None, ["model.loss_accum_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="for bf16 models; this model computes in float32"):
        check_device_options(cfg.model, torch.device("cpu"), torch.float32)
    check_device_options(cfg.model, torch.device("cpu"), torch.bfloat16)
    seen = {}
    real = loss_mod.dual_head_loss

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(loss_mod, "dual_head_loss", spy)
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    model = DualHeadModel(lm, **cfg.model.loss_options())
    ids = torch.randint(0, 64, (1, 6))
    model(input_ids=ids, position_ids=torch.arange(6)[None], targets=torch.randint(0, 64, (6,)),
          cls_index=torch.tensor([2]), cls_labels=torch.tensor([1.0]), num_lm_tokens=6.0, num_cls_examples=1.0)
    assert seen["accum_dtype"] is torch.bfloat16 and seen["grad_mode"] == "eager"
