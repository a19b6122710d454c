"""grad_mode="recompute" under ZeRO-3, two CPU ranks (gloo), the Triton kernels in the interpreter.

Run by ``test_recompute_zero3.py`` as ``TRITON_INTERPRET=1 deepspeed --num_gpus 2 tests/ops/_recompute_zero3.py``.
Every parameter is partitioned (``stage3_param_persistence_threshold: 0``), so the LM head weight
(tied to the embedding) is an empty shard outside the module's forward and backward: the recompute
backward only sees the full weight because ZeRO-3 gathers it again for the backward. Each rank
trains on its own packed sequence with the trainer's global normalisers and loss scaling; the full
gradient of every parameter (``safe_get_full_grad``) must equal a single-process float32 computation
of the summed loss with the materialised reference loss, and one optimizer step later the
consolidated parameters must equal the single-process AdamW step (where the gradient is not tiny).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clsgen_dist.config import load_config  # noqa: E402
from clsgen_dist.distributed import all_reduce_sum, init_distributed, rank, world_size  # noqa: E402
from clsgen_dist.distributed.engine import build_engine, fill_ds_config, param_groups  # noqa: E402
from clsgen_dist.modeling.dual_head import DualHeadModel  # noqa: E402

V, T, SEED = 301, 40, 1234


def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        attn_implementation="eager"))


def batch(r: int) -> dict:
    g = torch.Generator().manual_seed(SEED + 1 + r)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[: T // 2 + r] = -100  # prompt rows; a different count per rank
    return dict(input_ids=torch.randint(0, V, (1, T), generator=g), position_ids=torch.arange(T)[None],
                targets=targets, cls_index=torch.tensor([T // 2 - 1]), cls_labels=torch.tensor([float(r % 2)]))


def main() -> int:
    device = init_distributed()
    W, me = world_size(), rank()
    cfg = load_config(None, ["model.finetune=full", "model.dtype=float32", "train.learning_rate=1e-2",
                             "train.head_learning_rate=1e-2", "train.warmup_steps=0", "train.max_steps=10",
                             "train.max_grad_norm=1e6"])  # no clipping: the reference below does not clip
    ds = fill_ds_config(json.loads((ROOT / "ds_configs/zero3.json").read_text()), cfg, world_size=W,
                        dtype=torch.float32)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    model = DualHeadModel(tiny_lm(), loss_impl="triton", loss_grad_mode="recompute")
    torch.nn.init.normal_(model.cls_head.weight, std=0.1)
    ref = copy.deepcopy(model).to(device)
    ref.loss_impl, ref.loss_grad_mode = "reference", "eager"
    engine = build_engine(model, cfg, ds)

    batches = [batch(r) for r in range(W)]
    n_lm = float(sum(int((b["targets"] != -100).sum()) for b in batches))
    n_cls = float(W)
    kw = dict(num_lm_tokens=n_lm, num_cls_examples=n_cls, lm_coef=0.7, cls_coef=1.3)
    out = engine(**batches[me], **kw)
    engine.backward(out.loss * W, scale_wrt_gas=False)  # as the trainer does: DeepSpeed averages over ranks

    # single-process truth: the summed loss of every rank's batch, materialised logits
    total = sum(ref(**b, **kw).loss for b in batches)
    total.backward()
    loss_all = all_reduce_sum(out.loss.detach().double().reshape(1)).item()
    assert abs(loss_all - total.item()) <= 1e-5 * max(1.0, abs(total.item())), (loss_all, total.item())

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    worst = 0.0
    for (name, p), (_, q) in zip(engine.module.named_parameters(), ref.named_parameters()):
        assert p.ds_numel == q.numel() and p.numel() == 0, f"{name}: not partitioned ({p.numel()} local elements)"
        g = safe_get_full_grad(p)
        assert g is not None, f"{name}: no gradient reached the partitioned parameter"
        err = float((g - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12))
        worst = max(worst, err)
        assert err <= 1e-5, f"{name}: full gradient differs from the single-process one by {err:.3g} (relative)"
    engine.step()

    opt = torch.optim.AdamW(param_groups(ref, cfg), lr=cfg.train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.train.weight_decay)
    opt.step()
    for (name, p), (_, q) in zip(engine.module.named_parameters(), ref.named_parameters()):
        full = safe_get_full_fp32_param(p)
        # Adam's first step moves each element by ~lr * g / (|g| + eps): compared where |g| is not tiny
        # (there, 1e-5 relative gradient noise flips nothing); elsewhere the update is ill-conditioned.
        sure = q.grad.abs() > 1e-3 * q.grad.abs().max()
        assert sure.any() and torch.allclose(full[sure], q.detach()[sure], rtol=0, atol=1e-6), \
            f"{name}: parameters differ after the step"
    if me == 0:
        print(f"RECOMPUTE_ZERO3_OK ranks={W} loss={loss_all:.6f} worst_rel_grad_err={worst:.2e}", flush=True)
    # leave together: a rank exiting while gloo still has the other's last collective in flight
    # aborts in the communication thread's destructor
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Every check has run and the result is printed. Skip the interpreter's teardown: on CPU ranks a
    # native destructor still aborts now and then after all of the above ("terminate called without
    # an active exception", exit -6), which would fail a run whose checks all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
