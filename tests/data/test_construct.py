"""Data construction with a teacher: verdict parsing, prompts, cache, and a tiny local teacher end to end."""

from __future__ import annotations

import json
import math
import re

import pytest

from clsgen_dist.config import ConfigError, DataConfig
from clsgen_dist.construct_cli import build_data_main
from clsgen_dist.data import read_examples
from clsgen_dist.data.construct import (ItemCache, PromptSpec, Templates, build_explanations, clean_rationale,
                                        ensure_explanations, flesch_reading_ease, parse_teacher_verdict,
                                        read_input, strip_verdict)
from clsgen_dist.data.teachers import Generation, GenerationSettings, LocalTeacher, first_name
from clsgen_dist.predict import parse_verdict
from tests.conftest import write_jsonl

NAMES = ("negative", "positive")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine two OpenMP threads
    per op can wait on each other for far longer than the op takes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
DATA = DataConfig(label_names=list(NAMES), instruction="Is this movie review positive or negative?")


@pytest.mark.parametrize("text, expected", [
    ("The acting is superb.\nVerdict: positive", 1),
    ("Dull and long.\nverdict: NEGATIVE.", 0),
    ("**Verdict:** Positive", 1),
    ("Verdict: *negative*", 0),
    ("Great fun.\n\nFinal verdict - positive", 1),
    ("Answer: negative", 0),
    ("Overall, the sentiment is positive.", 1),
    ("Verdict: positive\nOn reflection...\nVerdict: negative", 0),  # the last verdict counts
    ("It says positive things. Verdict: negative", 0),
    ("Verdict: not positive", None),
    ("Verdict: <negative or positive>", None),  # the format echoed back, no choice made
    ("It has both positive and negative moments.", None),
    ("", None),
])
def test_parse_teacher_verdict_phrasings(text, expected):
    assert parse_teacher_verdict(text, NAMES) == expected


def test_exact_verdict_line_agrees_with_evaluation_parser():
    for text in ("Fine.\nVerdict: positive", "**Verdict:** Negative", "x\nVerdict: yes"):
        assert parse_teacher_verdict(text, NAMES) == parse_verdict(text, NAMES)
    assert parse_teacher_verdict("Label = yes", ("no", "yes")) == 1
    assert parse_teacher_verdict("Decision: c++", ("c", "c++")) == 1  # names are escaped
    assert parse_teacher_verdict("Ruling => positive", NAMES, "Ruling => {label}") == 1  # custom template


def test_strip_verdict_and_clean_rationale():
    assert strip_verdict("Warm and funny.\nVerdict: positive", NAMES) == "Warm and funny."
    assert strip_verdict("Warm and funny. **Verdict:** positive\n", NAMES) == "Warm and funny."
    assert strip_verdict("Warm.\nAnswer: positive\nVerdict: positive", NAMES) == "Warm."
    assert strip_verdict("Verdict: positive", NAMES) == ""
    assert strip_verdict("A positive review of a negative world.", NAMES) == "A positive review of a negative world."
    assert strip_verdict("Warm.\nFinal answer: positive", NAMES) == "Warm."  # not "Warm.\nFinal"
    assert strip_verdict("Warm.\n**My verdict - positive**", NAMES) == "Warm."
    mid = "A negative review about a movie, and the answer is negative."  # inside a sentence: kept whole
    assert strip_verdict(mid, NAMES) == mid
    assert clean_rationale("It is warm. It is funny and", truncated=True) == "It is warm."
    assert clean_rationale("It is warm. It is funny and", truncated=False) == "It is warm. It is funny and"
    assert clean_rationale("no sentence end at all", truncated=True) == "no sentence end at all"


def test_first_name_and_flesch():
    assert first_name("Positive, not negative.", NAMES) == 1
    assert first_name("I'd say negative", NAMES) == 0
    assert first_name("neither", NAMES) is None
    assert first_name("Not positive; negative.", NAMES) == 0  # a negated name is no stance
    assert first_name("It isn't really positive. Negative.", NAMES) == 0
    assert first_name("neither positive nor negative", NAMES) is None
    assert flesch_reading_ease("The cat sat on the mat.") == pytest.approx(206.835 - 1.015 * 6 - 84.6, abs=1e-9)
    assert flesch_reading_ease("...") is None


def test_templates_are_checked_and_versioned(tmp_path):
    with pytest.raises(ConfigError, match=r"template 'conditioned': unknown field\(s\) \['lable'\]"):
        Templates(conditioned="{text} {lable}")
    with pytest.raises(ConfigError, match=r"template 'judge': missing field\(s\) \['explanation'\]"):
        Templates(judge="is it {name1}?")
    a = PromptSpec.from_data(DATA)
    assert a.prompt_version == PromptSpec.from_data(DATA).prompt_version
    assert a.prompt_version != PromptSpec.from_data(DATA, mode="unconditioned").prompt_version
    f = tmp_path / "t.yaml"
    f.write_text("judge: 'Does this argue {name1} or {name0}? {explanation}'\n")
    b = PromptSpec.from_data(DATA, templates=Templates.from_file(f))
    assert b.prompt_version != a.prompt_version
    msgs = a.messages("Loved it.", 1)
    assert msgs[-1]["role"] == "user" and msgs[-1]["content"].endswith("Text:\nLoved it.\n\nCorrect answer: positive")
    uncond = PromptSpec.from_data(DATA, mode="unconditioned")
    assert "Verdict: <negative or positive>" in uncond.messages("x", 0)[0]["content"]
    assert a.rationale_prefix(1) == "The answer is positive because"
    assert a.judge_text("The answer is positive because the cast is superb.", 1) == "because the cast is superb."
    assert a.judge_text("The answer is positive because", 1) == ""
    assert a.judge_text("Superb cast.", 1) == "Superb cast."  # a teacher that ignored the prefix (HTTP)
    assert uncond.rationale_prefix(1) == ""


def test_item_cache_skips_a_line_cut_by_a_kill(tmp_path):
    c = ItemCache(tmp_path / "c.jsonl")
    c.append([{"key": "a", "v": 1}])
    c.close()
    with open(tmp_path / "c.jsonl", "a") as fh:
        fh.write('{"key": "b", "v"')  # killed mid-line
    c.append([{"key": "c", "v": 3}])
    c.close()
    assert set(c.load()) == {"a", "c"}


class StubTeacher:
    """Canned texts; counts calls (no model)."""

    id, batch_size, concurrency = "stub:1", 4, 1
    settings = GenerationSettings(max_new_tokens=16)

    def __init__(self, texts):
        self.texts, self.calls = texts, 0

    def generate(self, batch, prefixes=None):
        self.calls += len(batch)
        return [Generation(self.texts[m[-1]["content"].split("Text:\n")[1].split("\n")[0]], False) for m in batch]

    def judge(self, batch, names, prefix="", null=None):
        return [float(first_name(m[-1]["content"].split("Explanation:\n")[1], names) or 0) for m in batch]


def test_unconditioned_mode_parses_and_never_drops(tmp_path, toy_rows):
    f = write_jsonl(tmp_path / "in.jsonl", toy_rows)
    exs = read_input(f, DATA)
    phrasings = ["Warm. Verdict: positive", "Dull.\n**Verdict:** Negative", "Answer: positive", "No idea."]
    teacher = StubTeacher({ex.text: phrasings[i % 4] for i, ex in enumerate(exs)})
    spec = PromptSpec.from_data(DATA, mode="unconditioned")
    stats = build_explanations(exs, teacher, spec, tmp_path / "out.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in toy_rows]  # all kept, input order
    for i, r in enumerate(rows):
        verdict = [1, 0, 1, None][i % 4]
        has_rationale = i % 4 != 2  # "Answer: positive" alone: a verdict but nothing to learn from
        assert r["verdict"] == verdict and r["consistent"] == (verdict == r["label"] and has_rationale)
        assert r["raw_explanation"] == phrasings[i % 4]
        assert r["explanation"] == ({0: "Warm.", 1: "Dull."}.get(i % 4) if r["consistent"] else None)
    c = stats["per_class"]
    assert sum(v["total"] for v in c.values()) == 12
    assert all(v["consistent"] + v["cls_only"] == v["total"] for v in c.values())
    assert stats["verdict_rate"] == 9 / 12


@pytest.fixture
def tiny_teacher(tiny_dir):
    return LocalTeacher(tiny_dir, settings=GenerationSettings(max_new_tokens=6), batch_size=4, dtype="float32")


def test_local_teacher_batched_equals_one_at_a_time_and_hf_generate(tiny_teacher):
    import torch
    from transformers import GenerationConfig

    spec = PromptSpec.from_data(DATA)
    msgs = [spec.messages(t, i % 2) for i, t in enumerate(["Fine.", "A much longer review of a film that drags.",
                                                              "Loud.", "Smart, tender and often very funny."])]
    single = [tiny_teacher.generate([m])[0] for m in msgs]
    assert all(g.truncated for g in single)  # a random model never says <|im_end|> within 6 tokens
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=tiny_teacher.tok.pad_token_id,
                          eos_token_id=tiny_teacher.eos_id)
    for m, g in zip(msgs, single):  # our decode loop == transformers' generate, one prompt at a time
        ids = torch.tensor(tiny_teacher._ids([tiny_teacher.render(m)]))
        ref = tiny_teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        assert tiny_teacher.tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip() == g.text
    assert [g.text for g in tiny_teacher.generate(msgs)] == [g.text for g in single]
    # rows finishing early leave the batch: make the 3rd token of the 2nd prompt the end of turn
    ids = tiny_teacher.tok(single[1].text, add_special_tokens=False)["input_ids"]
    tiny_teacher.eos_id = ids[min(2, len(ids) - 1)]
    single = [tiny_teacher.generate([m])[0] for m in msgs]
    batched = tiny_teacher.generate(msgs)
    assert not single[1].truncated and [g.text for g in batched] == [g.text for g in single]
    assert [g.truncated for g in batched] == [g.truncated for g in single]
    reads = [spec.judge_messages(g.text or "x") for g in batched]
    jb = tiny_teacher.judge(reads, NAMES, "Answer:")
    js = [tiny_teacher.judge([m], NAMES, "Answer:")[0] for m in reads]
    assert jb == pytest.approx(js, abs=1e-5) and all(0 < p < 1 for p in jb)
    null = spec.judge_messages("because of the text.")  # calibrated: log-odds relative to the null's
    p0 = tiny_teacher.judge([null], NAMES, "Answer:")[0]
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    cal = tiny_teacher.judge(reads, NAMES, "Answer:", null=null)
    assert cal == pytest.approx([1 / (1 + math.exp(logit(p0) - logit(p))) for p in jb], abs=1e-5)


def test_local_teacher_refuses_a_prompt_longer_than_its_context(tiny_teacher, tiny_dir, tmp_path):
    """A prompt that does not fit in the teacher's context (max_position_embeddings) with
    max_new_tokens is not run, as an endpoint refuses it: an error in its place, for generation and
    for the judge; the prompts that fit give what they give without the limit."""
    import shutil

    from clsgen_dist.data.teachers import ItemRejected

    spec = PromptSpec.from_data(DATA)
    short, long = spec.messages("Fine.", 1), spec.messages("A long review. " * 40, 0)
    prefixes = [spec.rationale_prefix(1), spec.rationale_prefix(0)]
    lens = [len(p) for p in tiny_teacher._ids([tiny_teacher.render(m, answer_prefix=x)
                                                for m, x in zip((short, long), prefixes)])]
    reads = [spec.judge_messages("Warm and funny."), spec.judge_messages("Dull. " * 60)]
    read_lens = [len(p) for p in tiny_teacher._ids([tiny_teacher.render(m, answer_prefix="Answer:") for m in reads])]
    context = max(lens[0] + 6, read_lens[0] + 1)  # the short prompt and question fit exactly or nearly
    assert lens[1] + 6 > context and read_lens[1] > context
    folder = tmp_path / "short_context"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": context}))
    teacher = LocalTeacher(folder, settings=GenerationSettings(max_new_tokens=6), batch_size=4, dtype="float32")
    assert teacher.context_length == context

    got = teacher.generate([short, long], prefixes)
    assert got[0] == tiny_teacher.generate([short], prefixes[:1])[0] and got[0].error is None
    assert got[1].text == "" and got[1].error == (f"the prompt of {lens[1]} tokens and max_new_tokens=6 exceed the "
                                                  f"teacher's context of {context} tokens (max_position_embeddings)")
    assert [g.error is not None for g in teacher.generate([long, long])] == [True, True]
    probs = teacher.judge(reads, NAMES, "Answer:")
    assert probs[0] == pytest.approx(tiny_teacher.judge(reads[:1], NAMES, "Answer:")[0], abs=1e-6)
    assert isinstance(probs[1], ItemRejected) and f"the prompt of {read_lens[1]} tokens exceeds" in str(probs[1])


def test_local_teacher_sampling_is_seeded(tiny_teacher):
    spec = PromptSpec.from_data(DATA)
    msgs = [spec.messages("Fine.", 1), spec.messages("Loud and dull.", 0)]
    texts = []
    for seed in (0, 0, 1):
        tiny_teacher.settings = GenerationSettings(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=seed)
        texts.append([g.text for g in tiny_teacher.generate(msgs)])
    assert texts[0] == texts[1] != texts[2]


def test_local_teacher_end_to_end_cli_and_rerun_from_cache(tmp_path, tiny_dir, toy_rows, capsys, monkeypatch):
    f = write_jsonl(tmp_path / "in.jsonl", toy_rows)  # every third row has an explanation: replaced, as asked
    out = tmp_path / "out.jsonl"
    args = ["--input", str(f), "--output", str(out), "--teacher", str(tiny_dir), "--max-new-tokens", "6",
            "--batch-size", "5", "--dtype", "float32", "data.label_names=[negative,positive]", "--replace-existing"]
    assert build_data_main(args) == 0
    assert "negative: total 6" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in toy_rows] and len(rows) == 12
    for r in rows:
        assert set(r) >= {"id", "text", "label", "explanation", "raw_explanation", "verdict", "consistent", "teacher",
                          "prompt_version", "stance"}
        assert re.fullmatch(rf"hf:{tiny_dir.name}@[0-9a-f]{{12}}/float32", r["teacher"]) and 0 <= r["stance"] <= 1
        assert r["verdict"] == int(r["stance"] > 0.5)
        assert r["consistent"] == (r["verdict"] == r["label"])
        assert (r["explanation"] is not None) == r["consistent"]
        assert r["raw_explanation"]
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["generated"] == 12 and stats["from_cache"] == 0
    # the trainer's reader takes the output as it is; inconsistent rows are classification-only
    exs = read_examples(out, label_names=NAMES)
    assert sum(e.explanation is not None for e in exs) == sum(r["consistent"] for r in rows)
    before = out.read_bytes()
    (tmp_path / "out.stats.json").unlink()

    def boom(*a, **k):
        raise AssertionError("a cached item was regenerated")

    monkeypatch.setattr(LocalTeacher, "generate", boom)
    assert build_data_main(args) == 0
    assert out.read_bytes() == before
    assert json.loads((tmp_path / "out.stats.json").read_text())["from_cache"] == 12


def test_ensure_explanations_builds_once_and_keeps_every_example(tmp_path, tiny_dir, toy_rows, monkeypatch):
    f = write_jsonl(tmp_path / "train.jsonl", toy_rows)
    out = ensure_explanations(f, tmp_path / "train.explained.jsonl", teacher_dir=tiny_dir, data=DATA,
                              max_new_tokens=4, batch_size=8, explain_limit=5)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and [r["teacher"] is not None for r in rows] == [True] * 5 + [False] * 7
    assert all(r["explanation"] is None and not r["consistent"] for r in rows[5:])
    monkeypatch.setattr(LocalTeacher, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert ensure_explanations(f, out, teacher_dir=tiny_dir, data=DATA, max_new_tokens=4, explain_limit=5) == out
    # an edit past the explain limit (a relabelled row) is not in any teacher item, but the output changes
    monkeypatch.undo()
    edited = [dict(r) for r in toy_rows]
    edited[8] = {**edited[8], "text": "Edited after the first build.", "label": 1 - edited[8]["label"]}
    write_jsonl(f, edited)
    ensure_explanations(f, out, teacher_dir=tiny_dir, data=DATA, max_new_tokens=4, batch_size=8, explain_limit=5)
    row = json.loads(out.read_text().splitlines()[8])
    assert (row["text"], row["label"]) == (edited[8]["text"], edited[8]["label"])


def test_local_teacher_id_follows_the_weights(tmp_path, tiny_dir, monkeypatch):
    """A model retrained into the same folder (same file size, a change in the middle of the file)
    gets a new id, so the cache never serves the old model's explanations; a byte-identical copy
    elsewhere keeps the id; a rewrite with the same bytes (new mtime) too."""
    import shutil

    from safetensors.torch import load_file, save_file

    from clsgen_dist.data.teachers import local_teacher_id

    monkeypatch.setenv("CLSGEN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "teacher"
    shutil.copytree(tiny_dir, model)

    def fingerprint(folder):  # the id is hf:<folder name>@<fingerprint>/<dtype>
        return local_teacher_id(folder, "float32").split("@", 1)[1]

    before = fingerprint(model)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert fingerprint(copy) == before
    weights = model / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    assert fingerprint(model) == before  # same bytes, new mtime
    data = bytearray(weights.read_bytes())
    assert len(data) > 4 << 20  # the change below is neither in the first nor in the last MiB
    data[len(data) // 2] ^= 0x01  # one weight's lowest mantissa bit: "retrained", same size
    weights.write_bytes(bytes(data))
    assert fingerprint(model) != before


@pytest.mark.parametrize("text, names, expected", [
    ("Because of X.\nVerdict: toxic-free", ["toxic", "toxic-free"], 1),  # not read as "toxic"
    ("Because of X.\nVerdict: toxic", ["toxic", "toxic-free"], 0),
    ("It compiles.\nVerdict: C++", ["C", "C++"], 1),
    ("It compiles.\nVerdict: C", ["C", "C++"], 0),
    ("语气很积极。\nVerdict: 正面的", ["负面", "正面"], 1),  # no spaces between words: no word boundary
    ("Verdict: positively", list(NAMES), None),  # in spaced scripts a name is still a whole word
])
def test_verdict_names_longest_first_and_unspaced_scripts(text, names, expected):
    assert parse_verdict(text, names) == expected
    assert parse_teacher_verdict(text, names) == expected


def test_judge_answer_names_in_unspaced_scripts():
    assert first_name("这段文字是正面的。", ["负面", "正面"]) == 1
    assert first_name("It is non-toxic.", ["toxic", "fine"]) is None  # a hyphen joins words here
    assert first_name("The answer is C++.", ["C", "C++"]) == 1  # the longer name at the same place
    assert first_name("Not positive: negative.", list(NAMES)) == 0
