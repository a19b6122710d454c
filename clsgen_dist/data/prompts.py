"""Turning an example into token ids: prompt (chat template) + answer (explanation + verdict).

    [ prompt: system + instruction + document | answer: explanation \\n verdict <eos> ]
                                            ^ classification position (last prompt token, or an
                                              appended special token when cls_position="token")

Targets are aligned to rows (``targets[i]`` is the token at ``i+1``) and are -100 everywhere except
the rows that predict answer tokens, so no target ever crosses an example boundary once packed.
Over-long examples lose document tokens (from the end), never the answer's verdict line.

Text from the data (documents, explanations) is tokenized with ``split_special_tokens=True``: a
literal ``<|im_end|>`` in a review is text, not the control token that ends a turn. An
explanation's own verdict lines are removed (the trainer appends the one verdict line); one that
names another label than the gold one makes the example classification-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

IGNORE = -100
_DOC = "\x00CLSGEN_DOCUMENT\x00"


@dataclass
class Encoded:
    input_ids: list[int]
    targets: list[int]
    cls_pos: int  # index into input_ids
    label: int
    index: int  # position of the example in its split
    n_lm: int  # answer tokens with a target
    truncated: bool  # document tokens were dropped
    answer_truncated: bool = False  # explanation tokens were dropped to fit (or all of them: n_lm == 0)
    verdict_conflict: bool = False  # the explanation stated another label: classification only

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptEncoder:
    """Formats and tokenizes examples identically for training, evaluation and inference."""

    def __init__(
        self,
        tokenizer,
        *,
        instruction: str,
        label_names: Sequence[str],
        verdict_template: str = "Verdict: {label}",
        system_prompt: str | None = None,
        max_seq_len: int = 512,
        cls_token: str | None = None,
        min_doc_tokens: int = 16,
        min_explanation_tokens: int = 8,
    ) -> None:
        self.tok = tokenizer
        self.instruction = instruction
        self.label_names = list(label_names)
        self.verdict_template = verdict_template
        self.system_prompt = system_prompt
        self.max_seq_len = max_seq_len
        self.min_doc_tokens = min_doc_tokens
        self.min_explanation_tokens = min_explanation_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the answer needs an end-of-turn token")
        self.eos_id = tokenizer.eos_token_id
        self.cls_ids: list[int] = []
        if cls_token is not None:
            ids = tokenizer.convert_tokens_to_ids([cls_token])
            if ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"cls token {cls_token!r} is not in the tokenizer's vocabulary")
            self.cls_ids = ids
        self._prefix, self._suffix = self._template_parts()
        head, _, tail = verdict_template.partition("{label}")
        names = "|".join(re.escape(n) for n in sorted(self.label_names, key=len, reverse=True))
        # a whole line stating a verdict in the template's form, markdown allowed: "**Verdict: no**."
        self._verdict_line_re = re.compile(
            rf"^[\s*#>_\-]*{re.escape(head.strip())}\s*[*_]*\s*({names})\s*[*_]*\s*{re.escape(tail.strip())}"
            rf"[\s.!*_]*$", re.IGNORECASE)
        fixed = len(self._prefix) + len(self._suffix) + len(self.cls_ids)
        if max_seq_len < fixed + min_doc_tokens:
            raise ValueError(f"data.max_seq_len={max_seq_len} is too short: the prompt template takes {fixed} "
                             f"tokens, and at least {min_doc_tokens} are kept for the document "
                             f"(use data.max_seq_len >= {fixed + min_doc_tokens})")

    def _ids(self, text: str) -> list[int]:
        """Token ids of text from the data: special-token strings in it stay plain text."""
        # verbose=False: a document longer than the model's context is cut by encode_prompt, which
        # reports it; the tokenizer's own "sequence length is longer than" warning only misleads
        return self.tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

    def strip_verdict_lines(self, explanation: str) -> tuple[str, set[int]]:
        """``explanation`` without its lines that state a verdict in the template's form, and the
        labels those lines named."""
        lower = [n.lower() for n in self.label_names]
        keep, stated = [], set()
        for line in explanation.splitlines():
            m = self._verdict_line_re.match(line)
            if m:
                stated.add(lower.index(m.group(1).lower()))
            else:
                keep.append(line)
        return "\n".join(keep).strip(), stated

    # -- prompt ---------------------------------------------------------------------------

    def _template_parts(self) -> tuple[list[int], list[int]]:
        """Token ids before and after the document inside the rendered chat prompt."""
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": f"{self.instruction}\n\n{_DOC}"})
        chat = bool(getattr(self.tok, "chat_template", None))
        if chat:  # the template writes any BOS itself
            rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # plain LMs: a minimal instruction format; the answer starts on its own line
            sys = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            rendered = f"{sys}{self.instruction}\n\n{_DOC}\n\nAnswer:\n"
        if rendered.count(_DOC) != 1:
            raise ValueError("the chat template dropped or repeated the user message")
        before, after = rendered.split(_DOC)
        enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        prefix = enc(before)
        bos = self.tok.bos_token_id
        if not chat and bos is not None and self.tok("a")["input_ids"][:1] == [bos]:
            prefix = [bos] + prefix  # a tokenizer that starts every sequence with BOS: so does each example
        return prefix, enc(after)

    def verdict_line(self, label: int) -> str:
        return self.verdict_template.format(label=self.label_names[label])

    def answer_text(self, explanation: str | None, label: int) -> str:
        body = (explanation or "").strip()
        verdict = self.verdict_line(label)
        return f"{body}\n{verdict}" if body else verdict

    def encode_prompt(self, text: str, *, max_len: int | None = None) -> tuple[list[int], bool]:
        """Prompt ids (ending at the classification position) and whether the document was cut."""
        max_len = self.max_seq_len if max_len is None else max_len
        doc = self._ids(text.strip())
        budget = max_len - len(self._prefix) - len(self._suffix) - len(self.cls_ids)
        if budget < 1:
            raise ValueError(f"max_seq_len={max_len} leaves no room for the document "
                             f"(the prompt template alone takes {max_len - budget} tokens)")
        truncated = len(doc) > budget
        doc = doc[:budget]
        return self._prefix + doc + self._suffix + self.cls_ids, truncated

    # -- training example -----------------------------------------------------------------

    def encode(self, text: str, label: int, explanation: str | None, index: int = 0) -> Encoded:
        """Tokenize one training example. Without an explanation the sequence is the prompt alone
        (classification term only); so it is when the explanation states another label than
        ``label``, or when fewer than ``min_explanation_tokens`` of it would fit."""
        answer: list[int] = []
        answer_truncated = conflict = False
        if explanation:
            explanation, stated = self.strip_verdict_lines(explanation)
            if stated - {int(label)}:
                explanation, conflict = None, True
        if explanation:
            body = self._ids(explanation + "\n")
            verdict = self.tok(self.verdict_line(label), add_special_tokens=False)["input_ids"]
            # the document keeps at least min_doc_tokens (or all of it, if shorter)
            doc_min = min(self.min_doc_tokens, len(self._ids(text.strip())))
            fixed = len(self._prefix) + len(self._suffix) + len(self.cls_ids) + doc_min
            room = self.max_seq_len - fixed - len(verdict) - 1
            if len(body) > room:  # too long even with a minimal document: cut its end, keep the newline
                newline = self.tok("\n", add_special_tokens=False)["input_ids"]
                keep = room - len(newline)
                body = self._ids(explanation)[:keep] + newline if keep >= self.min_explanation_tokens else []
                answer_truncated = True
            answer = body + verdict + [self.eos_id] if body else []
        prompt, truncated = self.encode_prompt(text, max_len=self.max_seq_len - len(answer))
        ids = prompt + answer
        p = len(prompt)
        # row i predicts ids[i+1]; only rows predicting answer tokens carry a target
        targets = [IGNORE] * len(ids)
        for i in range(p - 1, len(ids) - 1):
            targets[i] = ids[i + 1]
        return Encoded(input_ids=ids, targets=targets, cls_pos=p - 1, label=int(label), index=index,
                       n_lm=len(answer), truncated=truncated, answer_truncated=answer_truncated,
                       verdict_conflict=conflict)
