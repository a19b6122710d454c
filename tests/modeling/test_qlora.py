"""QLoRA (model.quantization=nf4): a 4-bit NF4 base + LoRA + fp32 head, on the CPU (bitsandbytes
0.50 runs NF4 forward and backward there). Training steps, frozen 4-bit weights, save → reload,
merged 16-bit export, and the launch scripts end to end (1 process; ZeRO-3 on 2 ranks with -m slow)."""

import json

import pytest
import torch

from clsgen_dist.checkpoint import load_checkpoint, save_checkpoint
from clsgen_dist.config import ConfigError, load_config
from clsgen_dist.data.packing import PackedRows
from clsgen_dist.distributed.engine import param_groups
from clsgen_dist.export import export_merged
from clsgen_dist.modeling import build_model
from clsgen_dist.predict import CLSGen, make_encoder
from tests.conftest import REVIEWS, review_splits
from tests.helpers import assert_close
from tests.integration._run import REPO, launch, read_jsonl

bnb = pytest.importorskip("bitsandbytes")

TEXTS = ["A delight from start to finish.", "Boring and far too long, with a plot that goes nowhere at all.",
         "Smart, tender and often very funny."]


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.quantization=nf4", "model.dtype=float32",
                              "model.lora_r=4", "model.lora_alpha=8", "data.max_seq_len=128",
                              "data.label_names=[negative, positive]", "train.learning_rate=1e-2", *extra])


def _bits(p: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (the packed 4-bit weights hold NaN bit patterns as fp32 elements)."""
    return p.detach().reshape(-1).view(torch.uint8).clone()


def _loss(model, b) -> torch.Tensor:
    return model(**b.model_inputs(), num_lm_tokens=b.n_lm, num_cls_examples=len(b.cls_index)).loss


@pytest.fixture(scope="module")
def trained(tiny_dir, tokenizer):
    """The tiny model after a few QLoRA steps on one fixed batch (AdamW, as build_engine picks on CPU),
    with a dev-style evaluation forward in the middle (the moment bitsandbytes' CPU inference repack
    would strike). Returns what the tests below compare."""
    cfg = _cfg(tiny_dir)
    torch.manual_seed(0)
    model, tok = build_model(cfg.model)
    enc = make_encoder(cfg, tok)
    encoded = [enc.encode(t, y, "The review says so." if i % 2 else None, index=i) for i, (t, y) in enumerate(REVIEWS)]
    b = PackedRows(encoded, cfg.data.max_seq_len, seed=0).micro_batches(0, micro_batch_size=4, grad_accum=1)[0]
    before = {n: (_bits(p), p.requires_grad) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.learning_rate)
    model.train()
    losses = []
    for step in range(5):
        loss = _loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1:
            model.eval()
            with torch.no_grad():
                model.cls_logits(b.input_ids, b.position_ids, b.cls_index)
            model.train()
    model.eval()
    with torch.no_grad():
        losses.append(_loss(model, b).item())
    return {"cfg": cfg, "model": model, "tok": tok, "batch": b, "before": before, "losses": losses}


def test_nf4_layout(trained):
    """Every linear projection of the trunk is 4-bit with a LoRA adapter; the head is fp32; only LoRA
    and head parameters train."""
    model = trained["model"]
    quantized = [n for n, m in model.trunk.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain = [n for n, m in model.trunk.named_modules()
             if type(m) is torch.nn.Linear and not any(k in n for k in ("lora_A", "lora_B"))]
    assert len(quantized) == 7 * model.config.num_hidden_layers and not plain, plain
    assert all(n.endswith(".base_layer") for n in quantized)  # LoRA wraps each of them
    assert model.cls_head.weight.dtype == torch.float32 and model.cls_head.weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("cls_head.") for n in trainable), trainable
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.trunk.modules())


def test_qlora_steps_reduce_loss_and_change_only_lora_and_head(trained):
    losses = trained["losses"]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    changed, frozen_changed = [], []
    for n, p in trained["model"].named_parameters():
        bits, trainable = trained["before"][n]
        same = bits.shape == _bits(p).shape and torch.equal(bits, _bits(p))
        if trainable:
            changed.append(not same)
        elif not same:
            frozen_changed.append(n)
    assert not frozen_changed, f"frozen weights changed: {frozen_changed}"  # 4-bit weights bit-identical
    assert changed and all(changed)  # every LoRA matrix and the head moved


def test_eval_forward_does_not_break_training_gradients(trained):
    """On CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights for inference at the first eval-mode
    forward and then multiplies with a kernel that has no backward; build_model turns that off."""
    torch.manual_seed(1)
    model, _ = build_model(trained["cfg"].model)  # fresh: never run in eval mode
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = trained["batch"]

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        _loss(model, b).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g1 = grads()
    model.eval()
    with torch.no_grad():
        model.cls_logits(b.input_ids, b.position_ids, b.cls_index)
    g2 = grads()
    for n in g1:
        assert_close(g2[n], g1[n], atol=0, name=f"grad {n} after an eval forward")


def test_save_reload_and_merged_export(trained, tmp_path):
    model, tok, cfg = trained["model"], trained["tok"], trained["cfg"]
    model.eval()
    before = CLSGen(model, tok, cfg).predict(TEXTS, explain=True, max_new_tokens=5)
    save_checkpoint(model, tok, cfg, tmp_path / "ckpt")
    assert (tmp_path / "ckpt/adapter_model.safetensors").is_file() and not (tmp_path / "ckpt/model.safetensors").exists()
    m2, tok2, cfg2 = load_checkpoint(tmp_path / "ckpt")
    assert cfg2.model.quantization == "nf4" and any(isinstance(m, bnb.nn.Linear4bit) for m in m2.modules())
    after = CLSGen(m2, tok2, cfg2).predict(TEXTS, explain=True, max_new_tokens=5)
    for a, b in zip(before, after):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6) and a["explanation"] == b["explanation"]
    assert len({round(r["prob"], 4) for r in after}) == len(TEXTS)  # the head really reads the input

    out = export_merged(tmp_path / "ckpt", tmp_path / "merged")  # bf16, merged into the dequantized base
    assert {"model.safetensors", "config.json", "cls_head.safetensors", "clsgen_config.yaml", "COMPLETE"} <= {
        f.name for f in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    m3, tok3, cfg3 = load_checkpoint(out)
    assert (cfg3.model.finetune, cfg3.model.quantization) == ("full", "none")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in m3.modules())
    merged = CLSGen(m3, tok3, cfg3).predict(TEXTS, explain=False)
    assert_close(torch.tensor([r["prob"] for r in merged]), torch.tensor([r["prob"] for r in before]), atol=1e-3,
                 name="merged export vs 4-bit base + adapter")


def test_nf4_needs_lora():
    with pytest.raises(ConfigError, match="model.finetune=lora"):
        load_config(None, ["model.quantization=nf4", "model.finetune=full"])
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config(None, ["model.quantization=int4"])


# ----------------------------------------------------------------------------- launch scripts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_splits(tmp_path_factory.mktemp("qlora-data"))


def _args(tiny_dir, data, out, *extra):
    return ["--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={tiny_dir}", "model.quantization=nf4",
            f"data.train_file={data['train']}", f"data.dev_file={data['dev']}", f"data.test_file={data['test']}",
            f"output_dir={out}", "train.learning_rate=3e-3", "eval.explain_limit=1", *extra]


@pytest.fixture(scope="module")
def cli_run(tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora-run")
    launch("train.py", _args(tiny_dir, data, out, "train.gradient_accumulation_steps=4"))
    return out


def test_train_cli_nf4_then_export_cli(cli_run, data, tmp_path):
    """`python launch/train.py ... model.quantization=nf4` (the default ZeRO-2 JSON, one process) trains,
    saves the adapter and evaluates; `launch/export.py` turns it into a full model with the same
    probabilities, which CLSGen.from_pretrained loads."""
    log = read_jsonl(cli_run / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["lm_loss"] < log[0]["lm_loss"]
    assert json.loads((cli_run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    for f in ("final/COMPLETE", "final/adapter_model.safetensors", "final/cls_head.safetensors", "eval/metrics.json"):
        assert (cli_run / f).is_file(), f
    launch("export.py", ["--checkpoint", str(cli_run / "final"), "--output", str(tmp_path / "merged"),
                         "--dtype", "float32"])
    preds = read_jsonl(cli_run / "eval/predictions.jsonl")  # the trained model at the end of training
    texts = {r["id"]: r["text"] for r in read_jsonl(data["test"])}
    merged = CLSGen.from_pretrained(tmp_path / "merged", device="cpu").predict([texts[r["id"]] for r in preds],
                                                                             explain=False)
    assert_close(torch.tensor([r["prob"] for r in merged]), torch.tensor([r["prob"] for r in preds]), atol=1e-3,
                 name="merged export vs trained QLoRA model")


@pytest.mark.slow  # 2 DeepSpeed processes: +20-40 s on 2 cores
def test_qlora_zero3_two_ranks_match_one_process(cli_run, tiny_dir, data, tmp_path):
    """QLoRA x ZeRO-3 on 2 CPU ranks (gloo) with every parameter partitioned, the packed 4-bit weights
    included (stored as fp32 elements here, bf16 on GPU): same losses and gradient norms as one process,
    and the adapter it saves gives the same probabilities."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    launch("train.py", _args(tiny_dir, data, out, "train.gradient_accumulation_steps=2",
                             f"ds_config={tmp_path / 'z3.json'}"), launcher="deepspeed", nproc=2)
    for a, b in zip(read_jsonl(cli_run / "train_log.jsonl"), read_jsonl(out / "train_log.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
    p1, p3 = read_jsonl(cli_run / "eval/predictions.jsonl"), read_jsonl(out / "eval/predictions.jsonl")
    assert [r["prob"] for r in p1] == pytest.approx([r["prob"] for r in p3], abs=1e-5)


def test_qlora_zero3_two_rank_checkpoint_resumes_on_one_rank(cli_run, tiny_dir, data, tmp_path):
    """A QLoRA x ZeRO-3 run on 2 ranks, killed after step 3 with a checkpoint at step 2, resumes on one
    process through DeepSpeed's universal checkpoint: the checkpoint holds the adapters, the head and
    the optimizer state but not the frozen 4-bit base (built again from the base model), and the
    losses are those of the uninterrupted one-process run."""
    from clsgen_dist.resume import latest_checkpoint

    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    args = _args(tiny_dir, data, out, f"ds_config={tmp_path / 'z3.json'}", "train.save_every=2")
    proc = launch("train.py", [*args, "train.gradient_accumulation_steps=2"], launcher="deepspeed", nproc=2,
                  check=False, env={"CLSGEN_FAULT": "after_step:3"})
    assert proc.returncode != 0 and latest_checkpoint(out).name == "step-00000002", proc.stderr[-3000:]
    ckpt_bytes = sum(f.stat().st_size for f in latest_checkpoint(out).iterdir())
    assert ckpt_bytes < (tiny_dir / "model.safetensors").stat().st_size / 4, ckpt_bytes
    launch("train.py", [*args, "train.gradient_accumulation_steps=4", "resume=true"])
    for a, b in zip(read_jsonl(cli_run / "train_log.jsonl"), read_jsonl(out / "train_log.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
    p1, p3 = read_jsonl(cli_run / "eval/predictions.jsonl"), read_jsonl(out / "eval/predictions.jsonl")
    assert [r["prob"] for r in p1] == pytest.approx([r["prob"] for r in p3], abs=1e-5)


def test_qlora_bf16_storage_zero3_two_ranks_follow_one_process(tiny_dir, data, tmp_path):
    """QLoRA x ZeRO-3 as on GPUs: bf16 compute, the packed 4-bit weights stored as bf16 elements
    (bnb_4bit_quant_storage == compute dtype), DeepSpeed's bf16 engine, every parameter partitioned
    over 2 CPU ranks. Step 1 (same weights, same rows) gives the single-process loss (to 1e-6), which it
    would not if partitioning or the bf16 cast had touched the packed bytes; later steps agree to bf16
    rounding, and the gradient norms to 1% (a wrong gradient scale would show)."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    one, two = tmp_path / "one", tmp_path / "two"
    bf16 = ["model.dtype=bfloat16", "train.eval_every=0", "eval.explain_limit=0", "data.test_file=null"]
    launch("train.py", _args(tiny_dir, data, one, "train.gradient_accumulation_steps=4", *bf16))
    launch("train.py", _args(tiny_dir, data, two, "train.gradient_accumulation_steps=2", f"ds_config={tmp_path / 'z3.json'}",
                             *bf16), launcher="deepspeed", nproc=2)
    info = json.loads((two / "run_info.json").read_text())
    assert json.loads((two / "ds_config.json").read_text())["bf16"]["enabled"] is True and info["world_size"] == 2
    a, b = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert len(a) == len(b) == 4 and a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-4), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-2), (x["step"], x["grad_norm"], y["grad_norm"])
