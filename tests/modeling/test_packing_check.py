"""The build refuses a model that does not keep the examples of a packed row apart.

Training and evaluation pack several examples per row and rely on attention stopping at each
example's end (restarting ``position_ids``; ``cu_seqlens`` for the varlen kernels). A layer that
carries state along the sequence (Falcon-H1's Mamba mixer, LFM2's short convolution, Qwen3-Next's
linear attention) or an attention implementation that ignores the boundaries would let one example
change the next: ``check_packing`` refuses such a model, and lets attention-only models through in
fp32 and bf16 (mixture-of-experts included). Tiny random models built in code.
"""

from __future__ import annotations

import pytest
import torch

from clsgen_dist.config import ConfigError
from clsgen_dist.modeling.build import check_lm_logits, check_packing

V = 128
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                              num_experts_per_tok=2))


def _mistral_sliding():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4))


def _falcon_h1(lm_head_multiplier: float = 1.0):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return FalconH1ForCausalLM(FalconH1Config(
        **{**SMALL, "hidden_size": 64, "intermediate_size": 128}, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
        lm_head_multiplier=lm_head_multiplier))


def _lfm2():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    return Lfm2ForCausalLM(Lfm2Config(**SMALL, layer_types=["conv", "full_attention"]))


def _qwen3_next():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    return Qwen3NextForCausalLM(Qwen3NextConfig(
        **SMALL, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=2,
        num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"]))


def _row_causal_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over the whole packed row: ignores the per-example mask it is given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def _build(make, dtype, attn="sdpa"):
    torch.manual_seed(0)
    model = make().to(dtype)
    model.set_attn_implementation(attn)
    return model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make,attn", [(_llama, "sdpa"), (_llama, "eager"), (_qwen3_moe, "sdpa"),
                                       (_mistral_sliding, "sdpa")], ids=["llama-sdpa", "llama-eager", "qwen3-moe",
                                                                          "mistral-sliding"])
def test_attention_models_keep_packed_examples_apart(make, attn, dtype):
    model = _build(make, dtype, attn)
    check_packing(model, "m")
    assert model.training, "the check must leave the model in the mode it found it"
    assert all(p.grad is None for p in model.parameters()), "the check must not make parameter gradients"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make,kind", [(_falcon_h1, "falcon_h1"), (_lfm2, "lfm2"), (_qwen3_next, "qwen3_next")])
def test_layers_that_carry_state_along_the_row_are_refused(make, kind, dtype):
    model = _build(make, dtype)
    with pytest.raises(ConfigError, match=rf"m \({kind}, attn_implementation=sdpa\) lets one example of a packed "
                                          rf"row change the next one's hidden states"):
        check_packing(model, "m")
    assert all(p.grad is None for p in model.parameters())


def test_the_criterion_is_exact():
    """A leak a million times weaker (LFM2's convolution weights scaled by 1e-6, so example 2's hidden
    states move by ~1e-9) is refused all the same: the criterion is a gradient of exactly 0."""
    model = _build(_lfm2, torch.float32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv1d):
                m.weight.mul_(1e-6)
    with pytest.raises(ConfigError, match="lets one example of a packed row change the next"):
        check_packing(model, "m")


def test_loading_under_inference_mode_says_what_to_do_instead(tiny_dir):
    """A model loaded inside torch.inference_mode() has tensors no gradient can go through: the
    check says to load it outside that block, where torch.no_grad() around the load is fine."""
    from clsgen_dist.baselines import load_base_model, zero_shot_config
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling.build import check_backbone

    cfg = zero_shot_config(load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32"]))
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside that block \(torch.no_grad\(\) is fine"):
        load_base_model(cfg, "cpu")
    with torch.no_grad():
        model, _ = load_base_model(cfg, "cpu")
    with torch.inference_mode():
        assert model.causal_lm(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
        # the same message under ZeRO-3, not taken for a forward that fails partitioned
        with pytest.raises(RuntimeError, match=r"outside that block \(torch.no_grad\(\) is fine"):
            check_backbone(model.causal_lm, "m", partitioned=True)


def test_every_module_keeps_its_mode():
    """peft leaves its dropout modules in train mode under a base loaded in eval mode: the checks
    put every module back as it was (a dropout left in eval mode would change training)."""
    from peft import LoraConfig, get_peft_model

    from clsgen_dist.modeling.build import check_backbone

    torch.manual_seed(0)
    model = get_peft_model(_llama().eval(), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    lm = model.get_base_model()
    before = {n: m.training for n, m in lm.named_modules()}
    assert len(set(before.values())) == 2  # both modes present
    check_backbone(lm, "m")
    assert {n: m.training for n, m in lm.named_modules()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device-only attention kernels)")
def test_a_whole_build_is_checked_on_its_device(tiny_dir):
    """On a GPU, attn_implementation=auto picks a kernel that exists there only (torch_varlen or
    flash-attn): the build moves the backbone to the device before its checks run it."""
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling import build_model

    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=bfloat16"]).model
    model, _ = build_model(cfg, device="cuda")
    assert model.config._attn_implementation in ("torch_varlen", "flash_attention_2")
    assert next(model.parameters()).is_cuda


def test_an_attention_that_ignores_the_boundaries_is_refused():
    from transformers import AttentionInterface

    AttentionInterface.register("row_causal_test", _row_causal_attention)
    with pytest.raises(ConfigError, match=r"attn_implementation=row_causal_test\) lets one example"):
        check_packing(_build(_llama, torch.float32, "row_causal_test"), "m")


def test_falcon_h1_lm_head_multiplier_is_applied():
    """Falcon-H1 multiplies its LM head's output by ``lm_head_multiplier``; the dual-head logits do
    the same, so the LM-logit check passes (it refuses a model whose logits differ)."""
    from clsgen_dist.modeling.dual_head import logit_transform

    model = _falcon_h1(lm_head_multiplier=0.25).eval()
    assert logit_transform(model.config) == (0.25, None)
    check_lm_logits(model, "falcon")


def test_a_lora_target_peft_refuses_is_a_config_error():
    """peft refuses LoRA on a Mamba mixer's ``out_proj`` (as ``all-linear`` picks it on Falcon-H1) and
    a module name the model does not have: one ConfigError naming the setting, not a traceback."""
    from clsgen_dist.config import load_config
    from clsgen_dist.modeling.build import apply_lora

    cfg = load_config(None, ["model.finetune=lora"]).model
    with pytest.raises(ConfigError, match=r"model.lora_target_modules='all-linear': peft cannot apply it to "
                                          r"falcon_h1: .*out_proj"):
        apply_lora(_falcon_h1(), cfg)
    cfg = load_config(None, ["model.finetune=lora", "model.lora_target_modules=[no_such_proj]"]).model
    with pytest.raises(ConfigError, match=r"peft cannot apply it to llama"):
        apply_lora(_llama(), cfg)
