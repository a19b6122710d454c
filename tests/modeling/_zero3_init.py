"""Building the model partitioned (``model.zero3_init``) vs whole, under ZeRO-3 on two CPU ranks.

Run by ``test_zero3_init.py`` as ``deepspeed --num_gpus 2 tests/modeling/_zero3_init.py TIED PADDED LFM2``
(two tiny Llama folders, PADDED untied with spare vocabulary rows, and a tiny LFM2 folder).
Every parameter is partitioned (``stage3_param_persistence_threshold: 0``). For each variant (full
fine-tuning fp32; LoRA with an added cls token, fp32 and bf16; an added cls token on a spare row of
an untied, padded vocabulary), the model is built twice with the
project's ``build_model``: whole on every rank (partitioned only by ``deepspeed.initialize``) and
partitioned while loading. The partitioned build holds half of every weight right after the build;
after the engine is built both hold the same values (gathered, compared exactly: the same weights,
the same cls-token rows, the same adapter init), and one training step gives the same loss and the
same parameters. The build-time backbone checks run on the engine instead, before that step, and
still refuse a model whose forward changes its logits or lets packed examples see each other, and
a model that does not run partitioned is one ConfigError. The zero-shot baseline's base model,
partitioned under an inference engine, is checked and refused the same way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clsgen_dist.config import ConfigError, load_config  # noqa: E402
from clsgen_dist.distributed import init_distributed, rank, world_size  # noqa: E402
from clsgen_dist.distributed.engine import build_engine, fill_ds_config, full_state_dict  # noqa: E402
from clsgen_dist.modeling import build_model  # noqa: E402
from clsgen_dist.distributed.engine import full_numel, is_partitioned  # noqa: E402
from clsgen_dist.modeling.build import check_backbone, check_lm_logits, check_packing, zero3_loading  # noqa: E402
from clsgen_dist.modeling.dual_head import DualHeadModel  # noqa: E402

# name: (model, overrides); "padded" is untied with spare vocabulary rows: the cls token takes one
# of them, so no embedding is resized and its rows are written into the partitioned weights
VARIANTS = {
    "full_fp32": ("tied", ["model.finetune=full", "model.dtype=float32"]),
    "lora_token_fp32": ("tied", ["model.finetune=lora", "model.cls_position=token", "model.dtype=float32"]),
    "lora_token_bf16": ("tied", ["model.finetune=lora", "model.cls_position=token", "model.dtype=bfloat16"]),
    "full_token_padded_fp32": ("padded", ["model.finetune=full", "model.cls_position=token", "model.dtype=float32"]),
}


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(7 + rank())
    t = 24
    targets = torch.randint(0, vocab, (t,), generator=g)
    targets[: t // 2] = -100
    return dict(input_ids=torch.randint(0, vocab, (1, t), generator=g), position_ids=torch.arange(t)[None],
                targets=targets, cls_index=torch.tensor([t // 2 - 1]), cls_labels=torch.tensor([float(rank() % 2)]))


def build(cfg, ds, device, *, partitioned: bool):
    model, tok = build_model(cfg.model, device=device, seed=cfg.train.seed, zero3=ds if partitioned else None)
    assert is_partitioned(model) == partitioned
    held = sum((p.ds_tensor if hasattr(p, "ds_id") else p).numel() for p in model.parameters())
    full = sum(full_numel(p) for p in model.parameters())
    engine = build_engine(model, cfg, ds)
    return engine, tok, held, full


def step(engine, vocab: int) -> float:
    out = engine(**batch(vocab), num_lm_tokens=24.0, num_cls_examples=2.0)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss)


def refused(action, needle: str, passed: str, accepted: str) -> None:
    """``action()`` must raise a ConfigError containing ``needle``; rank 0 then prints ``PASS
    <passed>``, else the AssertionError says the check ``accepted``."""
    try:
        action()
    except ConfigError as e:
        assert needle in str(e), e
        if rank() == 0:
            print(f"PASS {passed}", flush=True)
    else:
        raise AssertionError(accepted)


def refused_on_engine(lm, cfg, ds, check, needle: str, what: str) -> None:
    """``check`` (a backbone check) run on the ZeRO-3 engine of the partitioned ``lm`` must raise a
    ConfigError containing ``needle``; rank 0 prints ``PASS refuses <what>``."""
    assert is_partitioned(lm)
    engine = build_engine(DualHeadModel(lm), cfg, ds)
    refused(lambda: check(engine.module.causal_lm), needle, f"refuses {what}",
            f"the check accepted {what} on a partitioned model")


def main(models: dict[str, str]) -> int:
    device = init_distributed()
    assert world_size() == 2
    model_dir = models["tied"]
    for name, (which, overrides) in VARIANTS.items():
        cfg = load_config(None, [f"model.name_or_path={models[which]}", "train.learning_rate=1e-2",
                                 "train.head_learning_rate=1e-2", "train.warmup_steps=0", "train.max_steps=10",
                                 "train.gradient_accumulation_steps=1", "train.micro_batch_size=1", *overrides])
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        ds = fill_ds_config(json.loads((ROOT / "ds_configs/zero3.json").read_text()), cfg, world_size=2, dtype=dtype)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        results = {}
        for partitioned in (False, True):
            engine, tok, held, full = build(cfg, ds, device, partitioned=partitioned)
            if partitioned:
                # each rank holds its half (+ at most one element of padding per parameter)
                n_params = sum(1 for _ in engine.module.parameters())
                assert held <= full / 2 + n_params, f"{name}: {held} of {full} elements held after a partitioned build"
            else:
                assert held == full, (name, held, full)
            if partitioned:  # as training does: the backbone checks on the engine, before the first step (which
                # must then equal the whole build's: the checks leave no gradient or state behind)
                check_backbone(engine.module.causal_lm, models[which], partitioned=True)  # a plain Llama passes
            before = full_state_dict(engine.module)
            vocab = len(tok)
            loss = step(engine, vocab)
            after = full_state_dict(engine.module)
            results[partitioned] = (before, loss, after, len(tok))
            del engine
        (b0, l0, a0, v0), (b1, l1, a1, v1) = results[False], results[True]
        assert v0 == v1 and b0.keys() == b1.keys(), name
        for k in b0:
            assert torch.equal(b0[k], b1[k]), f"{name}: {k} differs after the engine is built"
        assert l0 == l1, f"{name}: loss {l0} whole vs {l1} partitioned"
        for k in a0:
            assert torch.equal(a0[k], a1[k]), f"{name}: {k} differs after one step"
        if rank() == 0:
            print(f"PASS {name} loss={l0:.6f} tensors={len(b0)}", flush=True)

    # The LM-logit check on a partitioned model (run on the engine) still refuses a forward that
    # changes the logits.
    from transformers import LlamaForCausalLM

    class Tripled(LlamaForCausalLM):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 3
            return out

    cfg = load_config(None, [f"model.name_or_path={model_dir}", "model.finetune=full", "model.dtype=float32",
                             "train.gradient_accumulation_steps=1", "train.micro_batch_size=1"])
    ds = fill_ds_config(json.loads((ROOT / "ds_configs/zero3.json").read_text()), cfg, world_size=2,
                        dtype=torch.float32)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    with zero3_loading(ds):
        lm = Tripled.from_pretrained(model_dir, dtype=torch.float32)
    refused_on_engine(lm, cfg, ds, lambda m: check_lm_logits(m, "tripled"),
                      "computes its LM logits in a way the fused", "changed logits")

    # The packing check on a partitioned model (on the engine, through the embeddings' gradient only)
    # still refuses an attention that lets one example of a packed row see the one before it.
    from transformers import AttentionInterface

    from tests.modeling.test_packing_check import _row_causal_attention

    AttentionInterface.register("row_causal_test", _row_causal_attention)
    with zero3_loading(ds):
        lm = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="row_causal_test")
    refused_on_engine(lm, cfg, ds, lambda m: check_packing(m, "row-causal"),
                      "lets one example of a packed row change the next", "attention across packed examples")

    # A hybrid model whose short convolution reads its weight outside the module owning it (LFM2)
    # gets an empty shard under ZeRO-3: one ConfigError saying so, not a traceback on every rank.
    from transformers import AutoModelForCausalLM

    with zero3_loading(ds):
        lm = AutoModelForCausalLM.from_pretrained(models["lfm2"], dtype=torch.float32)
    assert lm.config.model_type == "lfm2"
    refused_on_engine(lm, cfg, ds, lambda m: check_backbone(m, "lfm2", partitioned=True),
                      "(lfm2) fails its first forward with its weights partitioned under ZeRO-3",
                      "a model that does not run partitioned")

    # The zero-shot baseline's base model, partitioned under a DeepSpeed inference engine (no
    # optimizer): the same checks run there, through the engine's gathers, before any scoring.
    from clsgen_dist.baselines import load_base_model, zero_shot_config

    def zero_shot(path: str, attn: str = "sdpa"):
        zcfg = zero_shot_config(load_config(None, [f"model.name_or_path={path}", "model.dtype=float32"]))
        zcfg.model.attn_implementation = attn  # (set after the config's validation: the test registered it)
        return load_base_model(zcfg, device, ds_config=ds)[0]

    assert is_partitioned(zero_shot(model_dir))  # a plain Llama passes
    for what, path, attn, needle in (
            ("attention across packed examples", model_dir, "row_causal_test",
             "lets one example of a packed row change the next"),
            ("a model that does not run partitioned", models["lfm2"], "sdpa",
             "(lfm2) fails its first forward with its weights partitioned under ZeRO-3")):
        refused(lambda: zero_shot(path, attn), needle, f"zero-shot refuses {what}",
                f"the zero-shot base model's checks accepted {what} on a partitioned model")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    tied, padded, lfm2 = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main({"tied": tied, "padded": padded, "lfm2": lfm2})
    # Every check has run and the results are printed. Skip the interpreter's teardown: on CPU ranks
    # a native destructor aborts now and then after all of the above (see tests/ops/_recompute_zero3.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
