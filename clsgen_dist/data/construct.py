"""Data construction: teacher explanations for ``(text, label)`` examples; no example is dropped.

::

    example ─▶ teacher ─▶ rationale ─┬─ label-conditioned: stance judged by the teacher ─┐
                                     └─ unconditioned: the verdict line parsed ───────────┴─▶ consistent?
    consistent → ``explanation`` = the rationale: an LM target. The trainer appends the fixed verdict
                 line ``data.verdict_template.format(label=label_names[label])`` itself
                 (``PromptEncoder.answer_text``), so the rationale is stored without one.
    otherwise  → ``explanation`` = null: the example trains the classification head only; the
                 teacher's text stays in ``raw_explanation``.

* **Label-conditioned** (default): the teacher is told the gold label and asked for the rationale
  only (small teachers rarely write a parsable verdict line; ours is appended by code). Its stance
  is judged by asking the teacher "based on this explanation, is it <name1> or <name0>?":
  a local teacher's next-token probabilities of the two names give P(name1) (``stance``); an
  HTTP teacher answers a second short greedy request and the first name in its answer counts.
  Consistent = P(gold) > ``stance_threshold`` (0.5).
* **Unconditioned**: the teacher predicts and explains, ending with a verdict line; the verdict is
  parsed (:func:`parse_teacher_verdict`); consistent = verdict == gold.

**Resumable.** Each completed item is appended (one ``os.write`` per line, so flushed) to a JSONL
cache keyed by sha256(text, label) + teacher id + ``prompt_version`` + generation settings; a
rerun asks the teacher only for missing items, so a kill loses at most the items in flight.
``OUT.jsonl`` and then ``OUT.stats.json`` are written to temporary names and renamed: a stats file
whose ``build_key`` matches says the output next to it is complete.

**Distributed.** With an initialised process group (torchrun / deepspeed), rank 0 lists the
missing items, rank ``r`` generates those with ``i % world == r`` (appending to the shared cache),
and rank 0 gathers them and writes the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields as dc_fields
from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError
from ..fileio import write_json_atomic, write_jsonl_atomic
from .reading import Example, read_examples
from .teachers import (Generation, GenerationSettings, LocalTeacher, Messages, TeacherError,  # noqa: F401
                       local_teacher_id)

log = logging.getLogger("clsgen_dist.data.construct")

MODES = ("conditioned", "unconditioned")

# The document comes last: the instruction is then part of the prefix every prompt of a batch
# shares, which the local teacher prefills once per batch (LocalTeacher._prefill).
DEFAULT_CONDITIONED = (
    "{task}\n\n"
    "Below are a text and its correct answer. In one to three sentences, explain why the answer is correct, "
    "pointing to words in the text. Write only the explanation.\n\n"
    "Text:\n{text}\n\nCorrect answer: {label}"
)
DEFAULT_UNCONDITIONED = (
    "{task}\n\n"
    "In one to three sentences, explain which answer is right for the text below, \"{name0}\" or \"{name1}\", "
    "pointing to words in the text. Then end with one line of the form: {verdict_format}\n\n"
    "Text:\n{text}"
)
# Measured on 64 RT training snippets with SmolLM2-135M as teacher and judge (rationales written for
# the gold label): this wording, without the task and without a forced answer start, ranks the
# rationales' stances best (AUROC 0.94 vs the gold label; 0.69-0.83 for variants naming the task or
# "the answer"); calibrated on `judge_null` it agrees with the gold label on 78% of them.
DEFAULT_JUDGE = "Explanation:\n{explanation}\n\nBased on this explanation, is the text {name1} or {name0}?"

_PLACEHOLDERS = {
    "conditioned": ({"text", "label"}, {"task", "text", "label", "name0", "name1"}),
    "unconditioned": ({"text"}, {"task", "text", "name0", "name1", "verdict_format"}),
    "judge": ({"explanation"}, {"task", "explanation", "name0", "name1"}),
    "rationale_prefix": (set(), {"label", "name0", "name1"}),
}


@dataclass(frozen=True)
class Templates:
    """Prompt templates (``str.format`` fields listed in ``_PLACEHOLDERS``). All of them are
    hashed into ``prompt_version``; changing one regenerates instead of reusing the cache."""

    conditioned: str = DEFAULT_CONDITIONED
    unconditioned: str = DEFAULT_UNCONDITIONED
    judge: str = DEFAULT_JUDGE
    rationale_prefix: str = "The answer is {label} because"
    """Label-conditioned mode, local teacher: forced start of the rationale, part of it. Without it
    SmolLM2-135M mostly restates the label ("The answer is negative."); with it, it gives a reason.
    Not sent to HTTP teachers. "" = none."""
    judge_answer_prefix: str = ""
    """Forced start of the local teacher's judge answer (e.g. "Answer:"); the next token is the one
    scored. "" = the first token of the answer."""
    judge_null: str = "because of the text."
    """An explanation without evidence. A small judge is biased towards one name whatever it reads;
    the local teacher subtracts its log-odds on this text from those on each rationale (contextual
    calibration, Zhao et al. 2021). "" = no calibration."""
    system: str | None = None
    """System message (``None`` = the chat template's default)."""

    def __post_init__(self) -> None:
        for name, (required, allowed) in _PLACEHOLDERS.items():
            tmpl = getattr(self, name)
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None}
            except ValueError as e:
                raise ConfigError(f"template {name!r}: {e}") from None
            bad, missing = used - allowed, required - used
            if bad or missing:
                raise ConfigError(f"template {name!r}: " + (f"unknown field(s) {sorted(bad)}; " if bad else "")
                                  + (f"missing field(s) {sorted(missing)}; " if missing else "")
                                  + f"allowed: {sorted(allowed)}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Templates":
        """A YAML mapping with any of the keys conditioned, unconditioned, judge, rationale_prefix,
        judge_answer_prefix, judge_null, system; the rest keep their defaults."""
        from ..config import load_yaml_file

        p = Path(path)
        obj = load_yaml_file(p, what="templates file") or {}
        known = {f.name for f in dc_fields(cls)}
        if not isinstance(obj, dict) or set(obj) - known:
            raise ConfigError(f"{p}: expected a mapping with keys among {sorted(known)}, got "
                              f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
        return cls(**obj)


@dataclass(frozen=True)
class PromptSpec:
    """Everything that shapes the teacher's prompts; its hash is ``prompt_version``."""

    label_names: tuple[str, str]
    task: str = ""
    """The task question (``data.instruction``): tells the teacher what the label names mean."""
    verdict_template: str = "Verdict: {label}"
    mode: str = "conditioned"
    templates: Templates = field(default_factory=Templates)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode: expected one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "label_names", tuple(self.label_names))

    @classmethod
    def from_data(cls, data, *, mode: str = "conditioned", templates: Templates | None = None) -> "PromptSpec":
        """From a run config's ``data`` section (label names, instruction, verdict template)."""
        return cls(label_names=tuple(data.label_names), task=data.instruction,
                   verdict_template=data.verdict_template, mode=mode, templates=templates or Templates())

    @property
    def prompt_version(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return "p1-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def _fmt(self, tmpl: str, **kw) -> str:
        n0, n1 = self.label_names
        verdict_format = self.verdict_template.format(label=f"<{n0} or {n1}>")
        return tmpl.format(task=self.task, name0=n0, name1=n1, verdict_format=verdict_format, **kw).strip()

    def _messages(self, content: str) -> Messages:
        sys = [{"role": "system", "content": self.templates.system}] if self.templates.system else []
        return sys + [{"role": "user", "content": content}]

    def messages(self, text: str, label: int) -> Messages:
        if self.mode == "conditioned":
            body = self._fmt(self.templates.conditioned, text=text.strip(), label=self.label_names[label])
        else:
            body = self._fmt(self.templates.unconditioned, text=text.strip())
        return self._messages(body)

    def rationale_prefix(self, label: int) -> str:
        """The forced start of a label-conditioned rationale ("" in unconditioned mode)."""
        if self.mode != "conditioned" or not self.templates.rationale_prefix:
            return ""
        n0, n1 = self.label_names
        return self.templates.rationale_prefix.format(label=self.label_names[label], name0=n0, name1=n1)

    def judge_text(self, rationale: str, label: int) -> str:
        """What the judge reads: the rationale without the words its forced prefix put there (in
        particular the gold label's name), e.g. "because the acting is superb." — so the stance is
        that of what the teacher wrote, not of the label we told it."""
        tmpl = self.templates.rationale_prefix
        prefix = self.rationale_prefix(label)
        if not prefix or "{label}" not in tmpl or not rationale.startswith(prefix):
            return rationale
        tail = tmpl.split("{label}", 1)[1].strip()  # e.g. "because"
        rest = rationale[len(prefix):].strip()
        return f"{tail} {rest}".strip() if rest else ""

    def judge_messages(self, explanation: str) -> Messages:
        return self._messages(self._fmt(self.templates.judge, explanation=explanation))


# ----------------------------------------------------------------------------- verdicts and rationales

_FALLBACK_HEADS = r"verdict|answer|label|prediction|classification|sentiment|decision"


def _verdict_spans(text: str, label_names: Sequence[str], verdict_template: str) -> list[tuple[int, int, int]]:
    """(start, end, label index) of every verdict statement: first the exact verdict line
    (the template's head, optional markdown, a name — as ``predict.parse_verdict``), else looser
    forms such as "Answer: yes", "Final verdict - negative", "The sentiment is positive"."""
    from ..predict import name_alternation

    names = name_alternation(label_names)  # longest first, whole words
    lower = [n.lower() for n in label_names]
    head = re.escape(verdict_template.split("{label}")[0].strip())
    exact = rf"{head}\s*\**\s*{names}" if head else names
    loose = rf"\b(?:{_FALLBACK_HEADS})\b\s*\**\s*(?:is\b|[:=\-–—]+>?)\s*[\"'`*]*\s*{names}"
    for pat in (exact, loose):
        found = [(m.start(), m.end(), lower.index(m.group(1).lower()))
                 for m in re.finditer(pat, text, flags=re.IGNORECASE)]
        if found:
            return found
    return []


def parse_teacher_verdict(text: str, label_names: Sequence[str],
                          verdict_template: str = "Verdict: {label}") -> int | None:
    """The label of the last verdict statement in a teacher's text (None if there is none).
    The exact verdict line is read with :func:`clsgen_dist.predict.parse_verdict`, which is also
    what evaluation uses; looser phrasings are a fallback for teachers that paraphrase it."""
    from ..predict import parse_verdict

    v = parse_verdict(text, label_names, verdict_template)
    if v is not None:
        return v
    spans = _verdict_spans(text, label_names, verdict_template)
    return spans[-1][2] if spans else None


# What may precede a verdict statement on its line for the line to be that statement alone:
# markdown and a short lead-in ("**Final answer: positive**", "My verdict - negative").
_LEAD_IN = re.compile(r"[\s*#>_\-–—]*(?:(?:final|my|the|overall|predicted)\s+)*", re.IGNORECASE)


def strip_verdict(text: str, label_names: Sequence[str], verdict_template: str = "Verdict: {label}") -> str:
    """``text`` without the verdict statement(s) that end it ("... Verdict: positive"): the training
    target gets exactly one verdict line, the one the trainer appends. A statement is removed with
    its line when nothing but a lead-in precedes it there ("Final answer: positive"), or from where it
    starts when it follows a finished sentence; one inside a sentence ("..., and the answer is
    negative.") or followed by more words ("The answer is positive because ...") is part of the
    rationale and stays. (Verdict lines elsewhere in the text are removed when the example is
    encoded, see ``PromptEncoder.strip_verdict_lines``.)"""
    t = text.strip()
    while t:
        line_start = t.rfind("\n") + 1
        line = t[line_start:]
        ends = [(s, e) for s, e, _ in _verdict_spans(line, label_names, verdict_template)
                if re.fullmatch(r"[\s.!*\"'`)\]]*", line[e:])]
        if not ends:
            break
        start = ends[-1][0]
        before = line[:start]
        if _LEAD_IN.fullmatch(before):
            cut = line_start
        elif re.search(r"[.!?:][\s*\"')\]]*$", before):
            cut = line_start + start
        else:  # mid-sentence: the statement is part of the rationale
            break
        t = t[:cut].rstrip(" \t*-–—:>\n")
    return t.strip()


def only_label_names(text: str, label_names: Sequence[str]) -> bool:
    """Whether ``text`` holds nothing but label names, punctuation and markdown ("**Positive.**")."""
    from ..predict import name_alternation

    rest = re.sub(name_alternation(label_names), " ", text, flags=re.IGNORECASE)
    return bool(text.strip()) and not re.search(r"\w", rest)


def clean_rationale(text: str, *, truncated: bool) -> str:
    """Whitespace-normalised rationale; one cut off by ``max_new_tokens`` loses its broken last
    sentence when it has a complete one."""
    t = re.sub(r"\n{3,}", "\n\n", text.strip())
    if truncated:
        ends = [m.end() for m in re.finditer(r"[.!?](?=[\s\"')\]]|$)", t)]
        if ends:
            t = t[: ends[-1]]
    return t.strip()


# ----------------------------------------------------------------------------- readability


def _syllables(word: str) -> int:
    w = word.lower()
    n = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(1, n)


def flesch_reading_ease(text: str) -> float | None:
    """Flesch reading ease (206.835 − 1.015·words/sentence − 84.6·syllables/word), with a
    vowel-group syllable count: close to ``textstat`` for ordinary English prose. Higher is easier
    (60–70 plain English)."""
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
    if not words:
        return None
    sentences = max(1, len(re.findall(r"[.!?]+(?=\s|$)", text.strip())))
    syllables = sum(_syllables(w) for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


# ----------------------------------------------------------------------------- cache


def example_hash(text: str, label: int) -> str:
    return hashlib.sha256(json.dumps([text, int(label)], ensure_ascii=False).encode()).hexdigest()


def item_key(ex_hash: str, teacher_id: str, prompt_version: str, gen: dict) -> str:
    """Cache key of one item: the example, the teacher, the prompts and how it decodes."""
    blob = json.dumps([ex_hash, teacher_id, prompt_version, gen], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ItemCache:
    """Append-only JSONL of completed items. Every line goes out in one ``os.write`` on an
    ``O_APPEND`` descriptor, so lines from several threads or ranks never interleave (on a local
    file system) and a killed process leaves at most one cut last line, which :meth:`load` skips."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(obj, dict) and "key" in obj:
                    out[obj["key"]] = obj
        return out

    def append(self, entries: Sequence[dict]) -> None:
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                size = os.fstat(self._fd).st_size
                if size:  # start on a fresh line after a cut last line
                    with open(self.path, "rb") as fh:
                        fh.seek(size - 1)
                        if fh.read(1) != b"\n":
                            os.write(self._fd, b"\n")
            for e in entries:
                os.write(self._fd, (json.dumps(e, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def default_cache_path(output: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache DIR`` → ``DIR/teacher_cache.jsonl``; else ``OUT.cache.jsonl`` next to the output."""
    if cache_dir is not None:
        return Path(cache_dir) / "teacher_cache.jsonl"
    out = Path(output)
    return out.with_name(out.stem + ".cache.jsonl")


def stats_path(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.with_name(out.stem + ".stats.json")


# ----------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Fields:
    """Column names of the output, the run config's ``data.*_field`` (so ``data.train_file=OUT``
    reads it directly)."""

    text: str = "text"
    label: str = "label"
    id: str = "id"
    explanation: str = "explanation"

    @classmethod
    def from_data(cls, data) -> "Fields":
        return cls(text=data.text_field, label=data.label_field, id=data.id_field, explanation=data.explanation_field)


@dataclass
class _Job:
    key: str
    text: str
    label: int


def _explain_chunk(teacher, spec: PromptSpec, jobs: list[_Job], *, judge: bool) -> list[dict]:
    """Ask the teacher for one chunk of items; returns their cache entries."""
    names, tmpl = spec.label_names, spec.verdict_template
    gens: list[Generation] = teacher.generate([spec.messages(j.text, j.label) for j in jobs],
                                              [spec.rationale_prefix(j.label) for j in jobs])
    rationales = [clean_rationale(strip_verdict(g.text, names, tmpl), truncated=g.truncated) for g in gens]
    # the forced start alone (the teacher ended its turn at once) is no rationale, nor a bare label
    # name ("Positive."): an endpoint that only restates the label it was told gives no reason
    rationales = ["" if r == spec.rationale_prefix(j.label) or only_label_names(r, names) else r
                  for r, j in zip(rationales, jobs)]
    stances: list[float | None] = [None] * len(jobs)
    verdicts: list[int | None] = [None] * len(jobs)
    errors = [g.error for g in gens]
    if spec.mode == "unconditioned":
        verdicts = [parse_teacher_verdict(g.text, names, tmpl) for g in gens]
    elif judge:
        reads = [spec.judge_text(r, j.label) for r, j in zip(rationales, jobs)]
        todo = [i for i, r in enumerate(reads) if r]
        if todo:
            t = spec.templates
            probs = teacher.judge([spec.judge_messages(reads[i]) for i in todo], names, t.judge_answer_prefix,
                                  null=spec.judge_messages(t.judge_null) if t.judge_null else None)
            for i, p in zip(todo, probs):
                if isinstance(p, Exception):  # the judge request was refused: not a judgement
                    errors[i] = f"judge: {p}"
                    continue
                stances[i] = p
                verdicts[i] = None if p is None or p == 0.5 else int(p > 0.5)
    else:  # conditioned without a judge: the teacher's rationale is trusted to argue the gold label
        verdicts = [j.label if r else None for j, r in zip(jobs, rationales)]
    return [{"key": j.key, "raw": g.text, "rationale": r, "truncated": g.truncated, "verdict": v, "stance": s,
             **({"error": err} if err else {})}
            for j, g, r, v, s, err in zip(jobs, gens, rationales, verdicts, stances, errors)]


def _run_jobs(teacher, spec: PromptSpec, jobs: list[_Job], *, judge: bool, sink: Callable[[list[dict]], None]) -> None:
    """Chunks of ``teacher.batch_size`` items, ``teacher.concurrency`` of them at once; ``sink``
    receives each chunk's entries as soon as it completes (in this thread)."""
    bs = max(1, teacher.batch_size)
    chunks = [jobs[s:s + bs] for s in range(0, len(jobs), bs)]
    if teacher.concurrency <= 1:
        for c in chunks:
            sink(_explain_chunk(teacher, spec, c, judge=judge))
        return
    pool = ThreadPoolExecutor(max_workers=teacher.concurrency, thread_name_prefix="teacher")
    pending = {pool.submit(_explain_chunk, teacher, spec, c, judge=judge) for c in chunks}
    error: BaseException | None = None
    try:
        while pending and error is None:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:  # every finished chunk reaches the sink (the cache), even after a failure
                if f.exception() is None:
                    sink(f.result())
                elif error is None:
                    error = f.exception()
    except BaseException as e:  # KeyboardInterrupt while waiting
        error = e
    if error is not None:
        if hasattr(teacher, "cancel"):
            teacher.cancel()  # in-flight requests give up at their next attempt
        running = sum(f.running() for f in pending)
        if isinstance(error, KeyboardInterrupt) and running:
            log.warning("interrupted: waiting for the %d chunk(s) with a request in flight (each request up to "
                        "--timeout %gs); a chunk that completes reaches the cache. Ctrl-C again quits now",
                        running, getattr(teacher, "timeout", 0))
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:  # the worker threads would still be joined at exit: leave without them
            log.warning("quitting without the requests in flight (the cache keeps every completed item)")
            logging.shutdown()
            os._exit(130)
        for f in pending:  # chunks that completed while the others were giving up
            if f.done() and not f.cancelled() and f.exception() is None:
                sink(f.result())
        raise error
    pool.shutdown(wait=True)


class _Progress:
    def __init__(self, total: int, every_s: float = 15.0) -> None:
        self.total, self.done, self.every_s = total, 0, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("teacher: %d/%d items (%.2f items/s, ~%.0fs left)", self.done, self.total, rate, eta)


def _consistent(ex: Example, e: dict, spec: PromptSpec, threshold: float) -> bool:
    if not e["rationale"]:
        return False
    if spec.mode == "conditioned" and e["stance"] is not None:
        p_gold = e["stance"] if ex.label == 1 else 1.0 - e["stance"]
        return p_gold > threshold
    return e["verdict"] == ex.label


def _record(ex: Example, e: dict | None, ok: bool, fields: Fields, teacher_id: str, version: str) -> dict:
    base = {fields.id: ex.id, fields.text: ex.text, fields.label: ex.label}
    if e is None:  # beyond explain_limit: never sent to the teacher
        return {**base, fields.explanation: None, "raw_explanation": None, "verdict": None, "consistent": False,
                "stance": None, "truncated": False, "teacher": None, "prompt_version": None}
    return {**base, fields.explanation: e["rationale"] if ok else None, "raw_explanation": e["raw"],
            "verdict": e["verdict"], "consistent": ok, "stance": e["stance"], "truncated": e["truncated"],
            "teacher": teacher_id, "prompt_version": version}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute_stats(examples: list[Example], entries: list[dict | None], ok: list[bool], spec: PromptSpec) -> dict:
    """Per class: total, asked (sent to the teacher), explained (a non-empty rationale), consistent
    (an LM target), cls_only (classification loss only); overall rates, lengths, readability."""
    per_class = {}
    for y, name in enumerate(spec.label_names):
        idx = [i for i, ex in enumerate(examples) if ex.label == y]
        per_class[name] = {
            "label": y, "total": len(idx), "asked": sum(entries[i] is not None for i in idx),
            "explained": sum(bool(entries[i] and entries[i]["rationale"]) for i in idx),
            "consistent": sum(ok[i] for i in idx), "cls_only": sum(not ok[i] for i in idx)}
    asked = [e for e in entries if e is not None]
    rationales = [e["rationale"] for e in asked if e["rationale"]]
    kept = [e["rationale"] for e, k in zip(entries, ok) if k]
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    flesch = [f for f in map(flesch_reading_ease, rationales) if f is not None]
    n_asked = len(asked)
    return {
        "examples": len(examples), "asked": n_asked, "per_class": per_class,
        "verdict_rate": sum(e["verdict"] is not None for e in asked) / n_asked if n_asked else None,
        "explained_rate": len(rationales) / n_asked if n_asked else None,
        "consistency_rate": sum(ok) / n_asked if n_asked else None,
        "truncated": sum(bool(e["truncated"]) for e in asked),
        "mean_words": _mean(words(rationales)), "mean_words_consistent": _mean(words(kept)),
        "flesch_reading_ease": _mean(flesch),
        "flesch_reading_ease_consistent": _mean([f for f in map(flesch_reading_ease, kept) if f is not None]),
    }


def _gen_key(teacher, judge: bool) -> dict:
    return {**teacher.settings.as_dict(), "judge": judge}


def _build_key(keys: list[str | None], examples: list[Example], fields: Fields, threshold: float) -> str:
    """What the output was built from: the teacher items, and every example's id, text and label
    (those past ``explain_limit`` have no item key but are written to the output too)."""
    rows = [[ex.id, example_hash(ex.text, ex.label)] for ex in examples]
    blob = json.dumps([keys, rows, asdict(fields), threshold], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _keys(examples: list[Example], teacher_id: str, version: str, gen: dict, explain_limit: int | None) -> list:
    n = len(examples) if explain_limit is None or explain_limit < 0 else min(explain_limit, len(examples))
    return [item_key(example_hash(ex.text, ex.label), teacher_id, version, gen) if i < n else None
            for i, ex in enumerate(examples)]


def build_explanations(
    examples: list[Example],
    teacher,
    spec: PromptSpec,
    output: str | os.PathLike,
    *,
    cache_path: str | os.PathLike | None = None,
    fields: Fields = Fields(),
    judge: bool = True,
    stance_threshold: float = 0.5,
    explain_limit: int | None = None,
    source: str | None = None,
) -> dict:
    """Explain ``examples`` with ``teacher`` and write ``output`` (JSONL, input order, one line per
    example) and ``<output stem>.stats.json``; returns the stats (on every rank).

    ``explain_limit``: only the first N examples go to the teacher; the others are written too,
    classification-only. Every rank of an initialised process group must call this.
    """
    from ..distributed import all_gather_objects, barrier, broadcast_object, is_main, rank, world_size

    if any(ex.label not in (0, 1) for ex in examples):
        raise ConfigError("every example needs a label 0/1 to build explanations")
    if not 0 <= stance_threshold < 1:
        raise ConfigError(f"stance_threshold must be in [0, 1), got {stance_threshold}")
    output = Path(output)
    t0 = time.perf_counter()
    version = spec.prompt_version
    keys = _keys(examples, teacher.id, version, _gen_key(teacher, judge), explain_limit)
    cache = ItemCache(cache_path or default_cache_path(output))

    cached = cache.load() if is_main() else {}
    todo: list[int] = []  # index of the first example of every missing key, in input order
    seen = set(cached)
    for i, k in enumerate(keys):
        if k is not None and k not in seen:
            seen.add(k)
            todo.append(i)
    todo = broadcast_object(todo)
    jobs = [_Job(keys[i], examples[i].text, examples[i].label) for i in todo]
    if hasattr(teacher, "prompt_length") and teacher.batch_size > 1:  # similar lengths share a batch
        jobs.sort(key=lambda j: -teacher.prompt_length(spec.messages(j.text, j.label)))
    mine = jobs[rank()::world_size()]
    if is_main():
        log.info("teacher %s, prompts %s (%s): %d examples, %d items cached, %d to generate over %d rank(s)",
                 teacher.id, version, spec.mode, len(examples), sum(k is not None for k in keys) - len(todo),
                 len(todo), world_size())

    new: dict[str, dict] = {}
    progress = _Progress(len(mine))

    def sink(entries: list[dict]) -> None:
        meta = {"teacher": teacher.id, "prompt_version": version}
        entries = [{**e, **meta} for e in entries]
        cache.append([e for e in entries if "error" not in e])  # a refused item is asked again next time
        for e in entries:
            new[e["key"]] = e
        progress.update(len(entries))

    try:
        _run_jobs(teacher, spec, mine, judge=judge, sink=sink)
    finally:
        cache.close()

    stats = None
    for part in all_gather_objects(new):
        cached.update(part)
    # refused items are never cached, so every rank holds all of them after the gather
    asked = {k for k in keys if k is not None}
    refused_keys = [k for k in asked if "error" in cached.get(k, {})]
    if asked and len(refused_keys) == len(asked):  # on every rank: a fault of the setup, not of the items
        raise TeacherError(f"the teacher refused every item; the first refusal: {cached[refused_keys[0]]['error']}")
    if is_main():
        entries = [cached[k] if k is not None else None for k in keys]
        refused = [e["error"] for e in entries if e is not None and "error" in e]
        if refused:
            log.warning("the teacher refused %d of %d items (classification only; asked again on a rerun); "
                        "the first refusal: %s", len(refused), len(entries), refused[0])
        ok = [e is not None and _consistent(ex, e, spec, stance_threshold) for ex, e in zip(examples, entries)]
        records = [_record(ex, e, k, fields, teacher.id, version) for ex, e, k in zip(examples, entries, ok)]
        dt = time.perf_counter() - t0
        stats = {
            "build_key": _build_key(keys, examples, fields, stance_threshold), "complete": True,
            "input": source, "output": str(output), "teacher": teacher.id, "prompt_version": version,
            "mode": spec.mode, "generation": _gen_key(teacher, judge), "stance_threshold": stance_threshold,
            **compute_stats(examples, entries, ok, spec),
            # items: distinct examples sent to the teacher; an input row repeated shares its item
            "generated": len(todo), "from_cache": len(asked) - len(todo),
            "duplicates": sum(k is not None for k in keys) - len(asked),
            "refused": len(refused),
            "elapsed_s": round(dt, 3), "generated_per_s": round(len(todo) / dt, 3) if todo else None,
        }
        sp = stats_path(output)
        sp.unlink(missing_ok=True)  # an old stats file must not vouch for the new output
        write_jsonl_atomic(output, records)
        write_json_atomic(sp, stats)
        _warn_if_weak(stats)
    barrier()
    return broadcast_object(stats)


def _warn_if_weak(stats: dict) -> None:
    rate = stats["consistency_rate"]
    if rate is not None and rate < 0.5:
        log.warning("teacher %s: only %.0f%% of explanations are consistent with the gold label, so most "
                    "examples train the classification head only; a stronger teacher (--teacher-url) would "
                    "give more LM targets", stats["teacher"], 100 * rate)


def refuse_replacing(path: str | os.PathLike, examples: list[Example], field: str, remedy: str) -> None:
    """A DataError when rows of ``path`` already have an explanation that a teacher's would replace
    (``remedy``: how to keep them, or to replace them on purpose)."""
    given = [ex for ex in examples if ex.explanation is not None]
    if given:
        from .reading import DataError

        raise DataError(f"{path}: {len(given)} of {len(examples)} rows already have an explanation ({field!r}, "
                        f"e.g. id {given[0].id}); the teacher's would replace them. {remedy}")


def read_input(path: str | os.PathLike, data, *, limit: int | None = None) -> list[Example]:
    """Labelled examples of ``path`` read with the run config's ``data`` field and label names (with
    any explanations the file already has, which the build replaces: see ``launch/build_data.py``)."""
    return read_examples(path, text_field=data.text_field, label_field=data.label_field,
                         explanation_field=data.explanation_field, id_field=data.id_field,
                         label_names=data.label_names, require_label=True, limit=limit)


# ----------------------------------------------------------------------------- the default run


def ensure_explanations(
    train_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    teacher_dir: str | os.PathLike = "default",
    data=None,
    mode: str = "conditioned",
    max_new_tokens: int = 48,
    batch_size: int = 16,
    dtype: str = "auto",
    explain_limit: int | None = None,
    templates: Templates | None = None,
    stance_threshold: float = 0.5,
    cache_path: str | os.PathLike | None = None,
    replace_existing: bool = True,
) -> Path:
    """``out_path``: ``train_path`` with teacher explanations from a local model, built once and
    then reused (resumable through the item cache, reused outright when its stats match).

    ``data`` is the run config's ``data`` section (field names, label names, instruction, verdict
    template; defaults of :class:`~clsgen_dist.config.DataConfig` when None). ``explain_limit``:
    only the first N training examples are sent to the teacher (the rest stay cls-only).
    ``replace_existing=False``: a DataError (before any model loads) when the file already has
    explanations, which the teacher's would replace.

    Ranks: inside an initialised process group every rank must call this (work is sharded);
    otherwise (e.g. before ``init_distributed``) the first process builds under a file lock and the
    others wait and reuse its output.
    """
    from ..distributed import world_size

    if data is None:
        from ..config import DataConfig

        data = DataConfig()
    out = Path(out_path)
    examples = read_input(train_path, data)
    if not replace_existing:  # the rows training reads (data.train_limit)
        refuse_replacing(train_path, examples[:data.train_limit] if data.train_limit else examples,
                         data.explanation_field,
                         f"To train on them, set data.teacher=null (it is {data.teacher}; "
                         f"launch/configs/default.yaml, used when no --config is given, sets data.teacher: "
                         f"default); to replace them on purpose, use launch/build_data.py --replace-existing")
    spec = PromptSpec.from_data(data, mode=mode, templates=templates)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    fields = Fields.from_data(data)
    judge = True
    gen = {**settings.as_dict(), "judge": judge}

    def complete() -> bool:
        keys = _keys(examples, local_teacher_id(teacher_dir, dtype), spec.prompt_version, gen, explain_limit)
        try:
            st = json.loads(stats_path(out).read_text())
        except (OSError, ValueError):
            return False
        return st.get("build_key") == _build_key(keys, examples, fields, stance_threshold) and out.is_file()

    def build() -> None:
        teacher = LocalTeacher(teacher_dir, settings=settings, batch_size=batch_size, dtype=dtype)
        build_explanations(examples, teacher, spec, out, cache_path=cache_path, fields=fields, judge=judge,
                           stance_threshold=stance_threshold, explain_limit=explain_limit, source=str(train_path))

    if complete():
        return out
    if world_size() > 1:  # an initialised process group: shard the work over the ranks
        build()
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not complete():  # another process may have built it while this one waited
            build()
    return out
