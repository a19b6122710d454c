"""``model.zero3_init``: under ZeRO-3 the backbone is built partitioned while it loads, and trains
the same numbers as a model loaded whole on every rank (see _zero3_init.py)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_partitioned_build_equals_whole_build_two_ranks(tiny_dir, tokenizer, tmp_path):
    """On 2 CPU ranks, for full fine-tuning, LoRA with an added cls token (fp32 and bf16) and a cls
    token on a spare row of an untied padded vocabulary: a partitioned build holds half of every
    weight, and after the engine is built and after one step its weights equal the whole build's
    exactly. The backbone checks, run on the engine for a partitioned model before that step, still
    refuse a model whose forward changes its logits, and one whose attention crosses packed examples;
    a model that does not run partitioned (LFM2) is one ConfigError. The zero-shot baseline's base
    model, partitioned under an inference engine, is checked and refused the same way."""
    from tests.integration._run import clean_env, free_port

    from transformers import Lfm2Config, Lfm2ForCausalLM

    padded = make_tiny_llama(tokenizer, tmp_path / "padded", seed=1, tie=False, vocab_pad=64)
    lfm2 = tmp_path / "lfm2"
    Lfm2ForCausalLM(Lfm2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               layer_types=["conv", "full_attention"])).save_pretrained(lfm2)
    tokenizer.save_pretrained(lfm2)  # (for its zero-shot base model)
    env = {**clean_env(), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks, on a GPU machine too
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("_zero3_init.py")), str(tiny_dir), str(padded), str(lfm2)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    passed = [x.split("PASS ", 1)[1] for x in out.splitlines() if "PASS " in x]
    assert [x.split()[0] for x in passed] == ["full_fp32", "lora_token_fp32", "lora_token_bf16",
                                               "full_token_padded_fp32", "refuses", "refuses", "refuses",
                                               "zero-shot", "zero-shot"], out[-4000:]
    assert "PASS refuses attention across packed examples" in out
    assert "PASS refuses a model that does not run partitioned" in out
    assert "PASS zero-shot refuses attention across packed examples" in out
    assert "PASS zero-shot refuses a model that does not run partitioned" in out
    print("\n".join(passed))


def test_zero3_loading_puts_back_the_callers_deepspeed_config():
    """transformers keeps one global DeepSpeed config: inside the block it is ours (ZeRO-3), after
    it whatever the caller had set (HF Trainer's, say), or none."""
    import json

    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from clsgen_dist.modeling.build import zero3_loading

    z3 = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    z2 = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    with zero3_loading(z3):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled() and deepspeed_config() is None
    caller = HfDeepSpeedConfig(z2)
    try:
        with zero3_loading(z3):
            assert is_deepspeed_zero3_enabled()
        assert deepspeed_config() is caller.config and not is_deepspeed_zero3_enabled()
        with zero3_loading(None):
            assert deepspeed_config() is caller.config
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
