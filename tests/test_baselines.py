"""Zero-shot and gen-only probabilities: the packed teacher-forced scoring equals a direct float64
computation of the label tokens' softmax on each context run alone."""

import math

import pytest
import torch

from clsgen_dist.baselines import (explanation_body, load_base_model, resolve_mode, verdict_context,
                                   verdict_probs, verdict_tokens)
from clsgen_dist.config import load_config
from clsgen_dist.predict import make_encoder

TEXTS = ["A warm, funny film.", "Tedious and overlong, with a plot that goes nowhere at all.", "Gorgeous.",
         "The cast is superb and the script crackles with energy."]


@pytest.fixture(scope="module")
def setup(tiny_dir):
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.dtype=float32", "data.max_seq_len=128",
                             "data.label_names=[negative, positive]"])
    model, tok = load_base_model(cfg, "cpu")
    return cfg, model, tok, make_encoder(cfg, tok)


def direct_log_probs(model, ids: list[int], suffix: list[int]) -> float:
    """log P(suffix | ids), the context run alone through the HF causal LM, in float64."""
    lm = model.causal_lm.double()
    try:
        x = torch.tensor([ids + suffix[:-1]])
        logp = lm(input_ids=x, use_cache=False).logits[0].log_softmax(-1)  # [L, V]
        return sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(suffix))
    finally:
        lm.float()


def test_verdict_tokens_split_the_real_verdict_line(tokenizer):
    prefix, suffixes = verdict_tokens(tokenizer, ["negative", "positive"], "Verdict: {label}")
    assert tokenizer.decode(prefix) == "Verdict:"
    assert [tokenizer.decode(s) for s in suffixes] == [" negative", " positive"]
    prefix, suffixes = verdict_tokens(tokenizer, ["negative", "positive"], "Verdict: {label}.")
    assert [tokenizer.decode(s) for s in suffixes] == [" negative.", " positive."] and len(suffixes[0]) >= 2
    with pytest.raises(ValueError, match="prefix of the other"):
        verdict_tokens(tokenizer, ["no", "no way"], "Verdict: {label}")


def test_zero_shot_matches_direct_softmax_of_the_label_tokens(setup):
    cfg, model, tok, enc = setup
    probs = verdict_probs(model, tok, enc, dict(enumerate(TEXTS)), None, max_tokens=256)  # packs several
    prefix, (s0, s1) = verdict_tokens(tok, cfg.data.label_names, cfg.data.verdict_template)
    assert len(s0) == len(s1) == 1
    for i, t in enumerate(TEXTS):
        ctx = enc.encode_prompt(t)[0] + prefix
        with torch.no_grad():
            logits = model.causal_lm.double()(input_ids=torch.tensor([ctx]), use_cache=False).logits[0, -1]
        model.causal_lm.float()
        two = torch.stack([logits[s0[0]], logits[s1[0]]]).softmax(0)
        assert 0 < probs[i] < 1
        assert probs[i] == pytest.approx(two[1].item(), abs=2e-5), i


def test_gen_only_scores_after_the_explanation_and_multi_token_labels(setup, tokenizer):
    cfg, model, tok, _ = setup
    cfg2 = load_config(None, [f"model.name_or_path={cfg.model.name_or_path}", "data.max_seq_len=128",
                              "data.label_names=[negative, positive]", "data.verdict_template=Verdict: {label}."])
    enc = make_encoder(cfg2, tok)
    expl = {0: "The reviewer loves it.\nVerdict: positive.", 1: "Boring, says the reviewer.",  # no verdict
            2: "", 3: "verdict: negative"}
    probs = verdict_probs(model, tok, enc, dict(enumerate(TEXTS)), expl, max_tokens=200)
    prefix, (s0, s1) = verdict_tokens(tok, cfg2.data.label_names, cfg2.data.verdict_template)
    assert len(s0) > 1  # the multi-token path
    for i, t in enumerate(TEXTS):
        body = explanation_body(expl[i], cfg2.data.verdict_template)
        ids = tok(body + "\n", add_special_tokens=False)["input_ids"] if body else []
        ctx = enc.encode_prompt(t)[0] + ids + prefix
        assert ctx == verdict_context(tok, enc.encode_prompt(t)[0], prefix, expl[i], cfg2.data.verdict_template)
        with torch.no_grad():
            d = direct_log_probs(model, ctx, s1) - direct_log_probs(model, ctx, s0)
        assert 0 < probs[i] < 1
        assert probs[i] == pytest.approx(1 / (1 + math.exp(-d)), abs=2e-5), i
    assert explanation_body(expl[0], cfg2.data.verdict_template) == "The reviewer loves it."


def test_resolve_mode_from_loss_weights():
    assert resolve_mode("auto", load_config(None, ["train.cls_weight=0"])) == "gen_only"
    assert resolve_mode("auto", load_config(None, ["train.lm_weight=0"])) == "cls_only"
    assert resolve_mode("auto", load_config(None, [])) == "clsgen"
    assert resolve_mode("zero_shot", load_config(None, [])) == "zero_shot"
    with pytest.raises(ValueError, match="mode"):
        resolve_mode("bogus", load_config(None, []))


def test_decoding_runs_one_forward_per_generated_token(setup):
    """max_new_tokens tokens take the prefill and max_new_tokens - 1 decode forwards (the last
    token's forward would be thrown away: under ZeRO-3 a wasted collective gather per batch)."""
    from clsgen_dist.predict import prefill_and_decode

    _, model, tok, enc = setup
    calls = []
    hook = model.trunk.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, gen = prefill_and_decode(model, [enc.encode_prompt(t)[0] for t in TEXTS[:2]], max_new_tokens=5,
                                    eos_id=-1, pad_id=tok.pad_token_id)  # no EOS: every row runs to the limit
    finally:
        hook.remove()
    assert [len(g) for g in gen] == [5, 5] and len(calls) == 5


def test_zero_shot_prompts_the_base_model_without_the_training_cls_token(tiny_dir, tmp_path):
    """model.cls_position=token is a training setting: zero-shot evaluation of the base model gives
    the same probabilities with it as without (no untrained <|cls|> token in the prompt)."""
    import json

    from tests.conftest import REVIEWS, write_jsonl
    from tests.integration._run import launch

    data = write_jsonl(tmp_path / "test.jsonl", [{"id": str(i), "text": t, "label": y} for i, (t, y) in
                                                 enumerate(REVIEWS[:6])])
    probs = {}
    for pos in ("last_prompt", "token"):
        launch("eval.py", ["--mode", "zero_shot", "--config", "launch/configs/tiny_cpu.yaml", "--data", str(data),
                           "--output", str(tmp_path / pos), "--ppl-tokens", "0", "--bootstrap", "0",
                           "--explain-limit", "0", f"model.name_or_path={tiny_dir}", f"model.cls_position={pos}"])
        probs[pos] = [json.loads(x)["prob"] for x in (tmp_path / pos / "predictions.jsonl").read_text().splitlines()]
    assert probs["token"] == pytest.approx(probs["last_prompt"], abs=1e-6)
