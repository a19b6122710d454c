"""Warnings about training data that is most likely a mistake, from the real encoder and packer."""

from clsgen_dist.config import Config
from clsgen_dist.data.reading import Example
from clsgen_dist.predict import make_encoder
from clsgen_dist.train import data_warnings, encode_train


def _warnings(tokenizer, examples, **data):
    cfg = Config()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    _, stats = encode_train(examples, make_encoder(cfg, tokenizer), cfg.data.max_seq_len, seed=0)
    return data_warnings(examples, stats, cfg)


def test_data_warnings(tokenizer):
    good = [Example(str(i), f"Review number {i} of a film.", i % 2, "Because of the acting." if i % 3 else None)
            for i in range(6)]
    assert _warnings(tokenizer, good) == []
    one_class = [Example(e.id, e.text, 1, e.explanation) for e in good]
    (w,) = _warnings(tokenizer, one_class, label_names=["routine", "urgent"])
    assert w.startswith("every training example is 'urgent' (6)")
    bare = [Example(e.id, e.text, e.label, None) for e in good]
    (w,) = _warnings(tokenizer, bare, explanation_field="rationales")
    assert w.startswith("no training example has an explanation (data.explanation_field='rationales')")
    long = [Example(e.id, e.text, e.label, "Because " + "the acting is wonderful and " * 40 if e.explanation else None)
            for e in good]
    (w,) = _warnings(tokenizer, long, max_seq_len=96)
    assert w.startswith("4 of the 4 explanations were cut short or dropped to fit data.max_seq_len=96")
