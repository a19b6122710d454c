"""``launch/train.py`` with one more model type registered: ``tripled_llama``, a Llama whose forward
triples its logits (a way of changing them that the fused loss does not reproduce). Run by
``test_train_cli.py`` under the DeepSpeed launcher."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from clsgen_dist.cli import train_main  # noqa: E402


class TripledConfig(LlamaConfig):
    model_type = "tripled_llama"


class Tripled(LlamaForCausalLM):
    config_class = TripledConfig

    def forward(self, *a, **k):
        out = super().forward(*a, **k)
        out.logits = out.logits * 3
        return out


AutoConfig.register("tripled_llama", TripledConfig)
AutoModelForCausalLM.register(TripledConfig, Tripled)

if __name__ == "__main__":
    sys.exit(train_main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
