"""Architectures that transform their LM head's output: Granite divides the logits by
``logits_scaling``, Gemma 2 soft-caps them. Training, verdict probabilities and decoding must use
the model's own distribution (its HF forward is the reference), or refuse the model."""

import pytest
import torch
import torch.nn.functional as F

from clsgen_dist.baselines import verdict_logits
from clsgen_dist.modeling.dual_head import DualHeadModel

V = 96


def _granite(scaling=4.0):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, logits_scaling=scaling, embedding_multiplier=2.0,
                        residual_multiplier=0.5, attention_multiplier=0.25, tie_word_embeddings=False)
    lm = GraniteForCausalLM(cfg).float()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return lm


def test_training_loss_and_gradients_follow_the_scaled_logits():
    """The fused loss of a Granite model equals its own HF cross-entropy (logits / logits_scaling),
    the classification logit is unscaled, and every gradient equals plain autograd's."""
    lm = _granite()
    model = DualHeadModel(lm, loss_impl="torch")
    with torch.no_grad():
        model.cls_head.weight.normal_(0, 0.5)
        model.cls_head.bias.fill_(0.1)
    ids = torch.randint(0, V, (1, 12))
    pos = torch.arange(12)[None]
    targets = torch.full((12,), -100)
    targets[5:11] = ids[0, 6:12]
    cls_index, cls_labels = torch.tensor([4]), torch.tensor([1.0])
    out = model(ids, pos, targets, cls_index, cls_labels, num_lm_tokens=6.0, num_cls_examples=1.0)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # reference: the HF forward's logits (scaled by the model) and the head on the unscaled hidden state
    hf = lm(input_ids=ids, position_ids=pos, output_hidden_states=True, use_cache=False)
    lm_ref = F.cross_entropy(hf.logits[0, 5:11].double(), ids[0, 6:12], reduction="sum") / 6
    h = hf.hidden_states[-1][0, 4]
    cls_ref = F.binary_cross_entropy_with_logits((h @ model.cls_head.weight[0] + model.cls_head.bias[0]).double(),
                                                 cls_labels[0].double())
    assert out.lm_loss_sum.item() / 6 == pytest.approx(lm_ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((lm_ref + cls_ref).item(), rel=1e-5)
    (lm_ref + cls_ref).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_verdict_probabilities_use_the_models_logits():
    model = DualHeadModel(_granite(scaling=8.0)).eval()
    contexts = [[3, 5, 7, 9, 11], [2, 4, 6]]
    got = verdict_logits(model, contexts, [[10], [20]])
    for c, g in zip(contexts, got):
        with torch.no_grad():
            logp = model.causal_lm(input_ids=torch.tensor([c])).logits[0, -1].log_softmax(-1)
        assert g == pytest.approx((logp[20] - logp[10]).item(), abs=1e-5)


def test_a_soft_capped_model_is_refused_for_training(tmp_path):
    from transformers import Gemma2Config

    from clsgen_dist.config import ConfigError
    from clsgen_dist.modeling.build import check_trainable_architecture

    Gemma2Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, final_logit_softcapping=30.0).save_pretrained(
        tmp_path)
    with pytest.raises(ConfigError, match=r"soft-caps its LM logits \(final_logit_softcapping=30.0\)"):
        check_trainable_architecture(str(tmp_path))


def test_an_unknown_logit_transform_is_refused_and_known_ones_pass(tiny_dir):
    """The build checks the dual-head model's LM logits against the HF forward on a short input:
    an architecture that changes its logits in a way the fused loss does not know is refused."""
    from transformers import LlamaForCausalLM

    from clsgen_dist.config import ConfigError
    from clsgen_dist.modeling.build import check_lm_logits

    class Tripled(LlamaForCausalLM):  # stands for any model that scales its logits in its own forward
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3
            return out

    check_lm_logits(LlamaForCausalLM.from_pretrained(tiny_dir), "plain")
    check_lm_logits(_granite(), "granite")  # logits_scaling is known: applied, so it matches
    with pytest.raises(ConfigError, match=r"tripled \(llama\) computes its LM logits in a way the fused"):
        check_lm_logits(Tripled.from_pretrained(tiny_dir), "tripled")
