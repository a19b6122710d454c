"""Teachers that write explanations: a local Hugging Face causal LM and an OpenAI-compatible endpoint.

Both expose the same small surface, used by :mod:`clsgen_dist.data.construct`::

    teacher.id            stable identity (model fingerprint / endpoint + model name): part of the cache key
    teacher.batch_size    prompts per call of generate()/judge()
    teacher.concurrency   calls that may run at once (threads)
    teacher.generate(batch_of_messages, prefixes) -> [Generation(text, truncated)]
    teacher.judge(batch_of_messages, names, answer_prefix, null) -> [P(names[1]) or None]

* :class:`LocalTeacher` — ``AutoModelForCausalLM`` on this rank's device (bf16 where the hardware
  has it); a batch is prefilled once — the prompts' common prefix as one row, the left-padded rest
  after it — and decoded together from that KV cache, greedy or sampled, finished rows leaving the
  batch. ``judge`` reads the teacher's own next-token probabilities of the two label names after
  the judge question (one prefill, no decoding).
* :class:`HTTPTeacher` — ``POST {url}/v1/chat/completions`` (vLLM, TGI, llama.cpp server, OpenAI);
  one request per prompt, ``concurrency`` requests in flight (threads), a socket timeout per
  attempt, retries with exponential backoff (and ``Retry-After``) on 429 / 5xx / timeouts /
  dropped connections. ``judge`` is a second, short, greedy request whose answer is searched for a
  label name (chat APIs do not portably expose next-token probabilities). The API key is read
  from an environment variable and never logged or put in an error message.

Only the standard library speaks HTTP here (``urllib.request``, ``concurrent.futures`` upstream).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..config import ConfigError

log = logging.getLogger("clsgen_dist.data.teachers")

Messages = list[dict[str, str]]


class TeacherError(ConfigError):
    """The teacher cannot be used: endpoint unreachable, keeps failing, refuses the request, or a
    model folder that does not load. A user error (one line, exit status 2 from the launchers)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How a teacher decodes. Part of the cache key: changing any of them regenerates."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy; > 0 samples at this temperature."""
    top_p: float = 1.0
    seed: int = 0
    """Seed of the sampler (local: per batch; HTTP: sent as ``seed`` when sampling)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    truncated: bool
    """Stopped by ``max_new_tokens`` rather than by the end-of-turn token."""
    error: str | None = None
    """Why the teacher refused this one item (e.g. HTTP 400: the prompt exceeds its context); the
    example then trains the classification head only."""


_NEGATION = re.compile(r"(?:\b(?:not|no|never|neither|nor)|n't)\s+(?:\w+\s+)?$", re.IGNORECASE)


def first_name(text: str, names: Sequence[str]) -> int | None:
    """Index of the label name that occurs first (as a word, any case) in ``text`` and is not negated
    ("not positive", "isn't really negative", "neither ... nor ..."); None if there is none."""
    from ..predict import name_alternation

    lower = [n.lower() for n in names]
    # one pass over every name, longest first at each position ("C++" is not read as "C")
    for m in re.finditer(name_alternation(names, hyphen=True), text, flags=re.IGNORECASE):
        if not _NEGATION.search(text[max(0, m.start() - 40):m.start()]):
            return lower.index(m.group(1).lower())
    return None


# ----------------------------------------------------------------------------- local HF teacher


def _file_sha256(f: Path) -> str:
    """sha256 of a file's bytes, remembered under the cache root by (path, size, mtime): a weight
    file is read in full once, and again only when it is rewritten."""
    from ..assets import cache_root, file_sha256
    from ..fileio import write_atomic

    st = f.stat()
    memo = cache_root() / "file_sha256" / hashlib.sha256(
        f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = file_sha256(f)
    try:
        write_atomic(memo, lambda out: out.write(digest + "\n"))
    except OSError:  # a read-only cache only costs the hashing again
        pass
    return digest


def _fingerprint(folder: Path) -> str:
    """Identity of a model folder: the config, tokenizer and chat-template files, and the sha256 of
    every weight file (remembered per file, see :func:`_file_sha256`). A retrained model saved into
    the same folder gets a new fingerprint, so a fresh cache key; a copy of a model keeps its own."""
    from ..assets import model_folder_digest

    return model_folder_digest(folder, _file_sha256)[:12]


def _resolve_folder(model_dir: str | os.PathLike) -> Path:
    if str(model_dir) == "default":
        from ..assets import default_model_dir

        return default_model_dir()
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise TeacherError(f"teacher {folder}: not a Hugging Face model folder (no config.json)")
    return folder


def resolve_teacher_device_dtype(device=None, dtype: str = "auto"):
    """(device, torch dtype). ``auto``: bf16 on CUDA, and on CPUs with native bf16 matmuls
    (AVX512-BF16 / AMX: about 3x faster prefill than fp32 for SmolLM2-135M), else fp32."""
    import torch

    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    device = torch.device(device)
    if dtype == "auto":
        cpu_bf16 = any(getattr(torch.cpu, f, lambda: False)()
                       for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        dtype = "bfloat16" if device.type == "cuda" or cpu_bf16 else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"teacher dtype: expected auto, float32 or bfloat16, got {dtype!r}")
    return device, getattr(torch, dtype)


def local_teacher_id(model_dir: str | os.PathLike, dtype: str = "auto") -> str:
    """The id a :class:`LocalTeacher` on ``model_dir`` will have, without loading the model (the
    weights' fingerprint and the compute dtype, which changes greedy outputs)."""
    folder = _resolve_folder(model_dir)
    _, dt = resolve_teacher_device_dtype(None, dtype)
    return f"hf:{folder.name}@{_fingerprint(folder)}/{str(dt).removeprefix('torch.')}"


class LocalTeacher:
    """A local causal LM (any ``AutoModelForCausalLM`` folder with a chat template) as teacher."""

    concurrency = 1

    def __init__(self, model_dir: str | os.PathLike, *, settings: GenerationSettings = GenerationSettings(),
                 batch_size: int = 16, device=None, dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _resolve_folder(model_dir)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        device, torch_dtype = resolve_teacher_device_dtype(device, dtype)
        self.settings = settings
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.tok.padding_side = "left"  # decoding appends on the right: every row's last token is real
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.tok.eos_token_id is None:
            raise TeacherError(f"teacher {folder}: the tokenizer has no eos token")
        self.eos_id = self.tok.eos_token_id  # ends a generation (the chat templates' end of turn)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise TeacherError(f"teacher {folder}: the model does not load: {str(e).splitlines()[0][:300]}") from None
        text_config = self.model.config.get_text_config()
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        self.id = local_teacher_id(folder, str(torch_dtype).removeprefix("torch."))
        self.name = folder.name
        self._has_template = bool(getattr(self.tok, "chat_template", None))
        log.info("teacher %s on %s, batch %d, %s, max_new_tokens=%d", self.id, self.device,
                 batch_size, "greedy" if settings.greedy else f"T={settings.temperature} top_p={settings.top_p}",
                 settings.max_new_tokens)

    def render(self, messages: Messages, *, answer_prefix: str = "") -> str:
        """The prompt text: the chat template with the assistant turn opened (+ a forced prefix)."""
        if self._has_template:
            s = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # plain LMs
            s = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return s + answer_prefix

    def prompt_length(self, messages: Messages) -> int:
        return len(self.tok(self.render(messages), add_special_tokens=False)["input_ids"])

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _prefill(self, prompts: list[list[int]]):
        """Prefill a batch: the prompts' longest common prefix once, as one row whose KV cache is
        then repeated over the batch, and the left-padded suffixes after it::

            row i:  [ shared prefix (P) | pad … pad | suffix_i ]      positions 0..P-1, P.., pads masked

        With the chat template and the instruction before the document, most of a prompt is the
        shared prefix, and on CPU prefill is compute-bound: this is most of batching's gain there.
        Returns (cache, attention mask [B, P+S], last positions [B, 1], last logits [B, V] fp32)."""
        import torch
        from transformers import DynamicCache

        from ..predict import _cache_kwarg

        B = len(prompts)
        P = 0
        shortest = min(len(p) for p in prompts)
        while P < shortest - 1 and all(p[P] == prompts[0][P] for p in prompts):
            P += 1  # every row keeps at least one suffix token (it yields the first logits)
        cache = DynamicCache()
        kw = {_cache_kwarg(self.model): cache, "use_cache": True}
        dev = self.device
        if P:
            self.model(input_ids=torch.tensor([prompts[0][:P]], device=dev), logits_to_keep=1, **kw)
            if B > 1:
                cache.batch_repeat_interleave(B)
        S = max(len(p) - P for p in prompts)
        ids = torch.full((B, S), self.tok.pad_token_id, dtype=torch.long)
        smask = torch.zeros((B, S), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, S - (len(p) - P):] = torch.tensor(p[P:])
            smask[i, S - (len(p) - P):] = 1
        ids, smask = ids.to(dev), smask.to(dev)
        mask = torch.cat([smask.new_ones(B, P), smask], dim=1)  # [B, P+S]
        pos = P + (smask.cumsum(-1) - 1).clamp(min=0)  # [B, S]: real tokens continue after the prefix
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **kw)
        return cache, mask, pos[:, -1:], out.logits[:, -1].float()

    def _refusal(self, prompt_tokens: int, new_tokens: int) -> str | None:
        """Why a prompt is refused, as an endpoint refuses one (HTTP 400): it and the tokens to
        generate do not fit in the model's context (``max_position_embeddings``). ``None``: it fits."""
        if self.context_length is None or prompt_tokens + new_tokens <= self.context_length:
            return None
        asked = f"the prompt of {prompt_tokens} tokens" + (f" and max_new_tokens={new_tokens} exceed" if new_tokens
                                                          else " exceeds")
        return f"{asked} the teacher's context of {self.context_length} tokens (max_position_embeddings)"

    def generate(self, batch: list[Messages], prefixes: Sequence[str] | None = None) -> list[Generation]:
        """One batch decoded together from one prefill and its KV cache; greedy or sampled
        (temperature, top-p; seeded per call). ``prefixes[i]`` is forced as the start of answer
        ``i`` and is part of its text (e.g. "The answer is positive because": a small teacher then
        writes a reason instead of restating the label). Finished rows leave the batch (and the
        cache), so the rest decode cheaper. ``model.generate`` does neither the shared prefix nor
        the shrinking: both matter on CPU (benchmarks/teacher.md). A prompt that does not fit in the
        context with ``max_new_tokens`` is not run: its Generation carries the refusal as ``error``."""
        prefixes = [p.strip() for p in prefixes] if prefixes else [""] * len(batch)
        prompts = self._ids([self.render(m, answer_prefix=p) for m, p in zip(batch, prefixes)])
        refusals = [self._refusal(len(p), self.settings.max_new_tokens) for p in prompts]
        run = [i for i, r in enumerate(refusals) if r is None]
        done = iter(self._decode([prompts[i] for i in run], [prefixes[i] for i in run]) if run else [])
        return [Generation("", truncated=False, error=r) if r else next(done) for r in refusals]

    def _decode(self, prompts: list[list[int]], prefixes: list[str]) -> list[Generation]:
        import torch

        from ..predict import _cache_kwarg

        s = self.settings
        eos = self.eos_id
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        gen = None
        if not s.greedy:
            from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

            warpers = [TemperatureLogitsWarper(s.temperature)] + ([TopPLogitsWarper(s.top_p)] if s.top_p < 1 else [])
            gen = torch.Generator(self.device).manual_seed(s.seed)
        with torch.inference_mode():
            cache, mask, pos, logits = self._prefill(prompts)
            rows = list(range(B))  # batch row -> example index
            for step in range(s.max_new_tokens):
                if gen is None:
                    nxt = logits.argmax(-1)  # [b]
                else:
                    for w in warpers:
                        logits = w(None, logits)
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
                toks = nxt.tolist()  # one host sync per step
                keep = []
                for j, (i, t) in enumerate(zip(rows, toks)):
                    if t == eos:
                        finished[i] = True
                    else:
                        out[i].append(t)
                        keep.append(j)
                if not keep or step == s.max_new_tokens - 1:
                    break
                if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
                    rows = [rows[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                pos = pos + 1
                logits = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                                    **{_cache_kwarg(self.model): cache}).logits[:, -1].float()
        texts = [self.tok.decode(o, skip_special_tokens=True) for o in out]
        return [Generation((p + t if p else t).strip(), truncated=not f) for p, t, f in zip(prefixes, texts, finished)]

    def _choice_ids(self, names: Sequence[str]) -> list[list[int]]:
        """First-token ids of each name's spellings (case, leading space); ids shared by both names
        are dropped (they say nothing about which one the teacher picks)."""
        sets = []
        for n in names:
            ids = set()
            for v in {n, n.lower(), n.capitalize(), n.upper()}:
                for sp in ("", " "):
                    t = self.tok(sp + v, add_special_tokens=False)["input_ids"]
                    if t:
                        ids.add(t[0])
            sets.append(ids)
        shared = sets[0] & sets[1]
        out = [sorted(s - shared) for s in sets]
        if not all(out):
            raise TeacherError(f"label names {list(names)} start with the same token for this tokenizer; the "
                               f"stance judge cannot tell them apart (rename the labels or disable the judge)")
        return out

    def judge(self, batch: list[Messages], names: Sequence[str], answer_prefix: str = "",
              null: Messages | None = None) -> list[float | None | ItemRejected]:
        """P(names[1]) vs P(names[0]) as the next token after the judge question, from the teacher's
        own distribution (one prefill of the batch, no decoding): ``sigmoid(log p1 - log p0)``, every
        spelling of a name summed. With ``null`` (the same question about an evidence-free
        explanation, one more row of the batch) the log-odds are taken relative to the judge's
        prior on it: ``sigmoid(lo - lo_null)`` (contextual calibration). A question that does not
        fit in the context is not run: an :class:`ItemRejected` takes its place, as an endpoint's
        refusal does."""
        import torch

        ids0, ids1 = self._choice_ids(names)
        rows = list(batch) + ([null] if null is not None else [])
        prompts = self._ids([self.render(m, answer_prefix=answer_prefix) for m in rows])
        refusals = [self._refusal(len(p), 0) for p in prompts]
        if null is not None and refusals[-1]:
            raise TeacherError(f"the judge's evidence-free question does not fit: {refusals[-1]}")
        run = [i for i, r in enumerate(refusals[:len(batch)]) if r is None]
        if not run:
            return [ItemRejected(r) for r in refusals[:len(batch)]]
        with torch.inference_mode():
            _, _, _, logits = self._prefill([prompts[i] for i in run] + prompts[len(batch):])
        lp = logits.log_softmax(-1)  # [b(+1), V] fp32
        lo = lp[:, ids1].logsumexp(-1) - lp[:, ids0].logsumexp(-1)  # [b(+1)] log-odds of names[1]
        if null is not None:
            lo = lo[:-1] - lo[-1]
        probs = iter(torch.sigmoid(lo).tolist())
        return [ItemRejected(r) if r else next(probs) for r in refusals[:len(batch)]]


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint


def _redact(url: str) -> str:
    """``url`` without any user:password part and with its query values hidden (keys travel there)."""
    u = urllib.parse.urlsplit(url)
    if u.username or u.password:
        u = u._replace(netloc=u.hostname + (f":{u.port}" if u.port else ""))
    if u.query:
        u = u._replace(query="&".join(f"{k}=***" for k, _ in urllib.parse.parse_qsl(u.query, keep_blank_values=True)))
    return urllib.parse.urlunsplit(u)


def chat_endpoint(url: str) -> str:
    """``.../chat/completions`` as given; ``.../v1`` gets ``/chat/completions``; a bare server
    address gets ``/v1/chat/completions``."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"--teacher-url must be an http(s) URL such as http://localhost:8000/v1, got {url!r}")
    path = u.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urllib.parse.urlunsplit(u._replace(path=path))


class ItemRejected(TeacherError):
    """The endpoint refused one request as invalid (HTTP 400, 413, 422: typically a prompt longer
    than its context window). Only that item goes without an explanation."""


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


def _retry_after(headers) -> float | None:
    """Seconds a 429/503 asks to wait: ``Retry-After`` as seconds (fractions too) or an HTTP date."""
    ra = (headers.get("Retry-After") or "").strip() if headers else ""
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        import email.utils

        when = email.utils.parsedate_to_datetime(ra)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class HTTPTeacher:
    """An OpenAI-compatible chat-completions endpoint as teacher."""

    batch_size = 1

    def __init__(self, url: str, model: str, *, settings: GenerationSettings = GenerationSettings(),
                 api_key_env: str | None = None, concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
                 judge_max_tokens: int = 8) -> None:
        if not model:
            raise ConfigError("--teacher-model is required with --teacher-url (the model name the server serves)")
        for flag, value, ok, expected in (("--concurrency", concurrency, concurrency >= 1, ">= 1"),
                                          ("--max-retries", max_retries, max_retries >= 0, ">= 0"),
                                          ("--timeout", timeout, timeout > 0, "> 0"),
                                          ("--backoff", backoff, backoff >= 0, ">= 0")):
            if not ok:
                raise ConfigError(f"{flag} must be {expected}, got {value}")
        self.endpoint = chat_endpoint(url)
        self.model = model
        self.settings = settings
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.judge_max_tokens = judge_max_tokens
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
            self._headers["Authorization"] = f"Bearer {key}"
        url = urllib.parse.urlsplit(self.endpoint)
        self._secrets = [s for s in (os.environ.get(api_key_env) if api_key_env else None, url.password) if s]
        self._secrets += [v for _, v in urllib.parse.parse_qsl(url.query) if v]
        self._stop = threading.Event()
        self._rng = random.Random(settings.seed)
        u = urllib.parse.urlsplit(_redact(self.endpoint))
        self.id = f"openai:{model}@{u.netloc}{u.path.removesuffix('/chat/completions')}"
        self.name = model
        self.requests = 0  # attempts made (for logs and tests)
        self.retries = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the headers (the key)
        return f"HTTPTeacher({_redact(self.endpoint)!r}, model={self.model!r})"

    def check_reachable(self) -> None:
        """Fail fast, with one clear message, when nothing listens at the endpoint's host:port.
        Skipped when a proxy is configured for the URL (then the proxy decides)."""
        u = urllib.parse.urlsplit(self.endpoint)
        if u.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(u.hostname):
            return
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            raise TeacherError(f"cannot reach the teacher endpoint {_redact(self.endpoint)}: "
                               f"{e.strerror or e.__class__.__name__}; is the server running and is "
                               f"--teacher-url right?") from None

    def cancel(self) -> None:
        """Make in-flight and queued requests give up (after a fatal error elsewhere)."""
        self._stop.set()

    # -- requests ----------------------------------------------------------------------------

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + self._rng.random() / 2)
        return min(self.max_backoff, max(d, retry_after or 0.0))

    def _attempt(self, body: bytes) -> dict:
        req = urllib.request.Request(self.endpoint, data=body, headers=self._headers, method="POST")
        with self._count_lock:
            self.requests += 1
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                # --timeout bounds the whole attempt, not each socket read: a server that trickles its
                # answer (or keeps a stuck connection alive) is timed out and retried like a hang
                parts = []
                while chunk := resp.read1(1 << 16):
                    parts.append(chunk)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no complete answer within {self.timeout:g}s")
                raw = b"".join(parts)
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()[:300].decode("utf-8", "replace").strip()
            except (http.client.HTTPException, OSError):  # an error body cut short (a proxy hanging up)
                detail = ""
            for secret in self._secrets:  # a server may echo the key back in its error
                detail = detail.replace(secret, "***")
            if e.code in (408, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}", _retry_after(e.headers)) from None
            error = ItemRejected if e.code in (400, 413, 422) else TeacherError
            raise error(f"the teacher endpoint {_redact(self.endpoint)} refused the request: HTTP {e.code} "
                        f"{e.reason}: {detail}") from None
        except urllib.error.URLError as e:
            raise _Retryable(f"{e.reason}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__) from None
        try:
            obj = json.loads(raw)
            choices = obj["choices"]
            if not isinstance(choices, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise _Retryable(f"malformed response {raw[:200]!r}") from None
        # A well-formed answer without text (a content filter, a refusal, a reasoning model that spent
        # max_tokens before answering) is this item's refusal: not retried, not cached, asked again
        # on a rerun.
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = message.get("content")
        if not isinstance(content, str):
            why = (f"finish_reason {choice.get('finish_reason')!r}" if choices else "no choices")
            refusal = message.get("refusal")
            raise ItemRejected(f"the teacher endpoint {_redact(self.endpoint)} answered without text ({why}"
                               f"{f', refusal {refusal!r:.100}' if refusal else ''})")
        return {"text": content, "finish_reason": choice.get("finish_reason")}

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._count_lock:
                    self.retries += 1
                time.sleep(self._delay(attempt, last.retry_after))
            if self._stop.is_set():
                raise TeacherError("cancelled after an earlier teacher error")
            try:
                return self._attempt(body)
            except _Retryable as e:
                last = e
                log.debug("teacher request failed (%s), attempt %d/%d", e, attempt + 1, self.max_retries + 1)
        raise TeacherError(f"the teacher endpoint {_redact(self.endpoint)} failed {self.max_retries + 1} attempts "
                           f"(timeout {self.timeout:g}s each); last error: {last}")

    def _payload(self, messages: Messages, *, max_tokens: int, greedy: bool) -> dict:
        s = self.settings
        p = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": False}
        if greedy:
            p["temperature"] = 0.0
        else:
            p.update(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        return p

    def generate(self, batch: list[Messages], prefixes: Sequence[str] | None = None) -> list[Generation]:
        """One request per prompt. ``prefixes`` are not sent (chat APIs do not portably continue a
        partial assistant turn, and a strong model does not need the push)."""
        out = []
        for m in batch:
            try:
                r = self._post(self._payload(m, max_tokens=self.settings.max_new_tokens, greedy=self.settings.greedy))
            except ItemRejected as e:
                out.append(Generation("", truncated=False, error=str(e)))
                continue
            out.append(Generation(r["text"].strip(), truncated=r["finish_reason"] == "length"))
        return out

    def judge(self, batch: list[Messages], names: Sequence[str], answer_prefix: str = "",
              null: Messages | None = None) -> list[float | ItemRejected | None]:
        """A second, greedy, short request per rationale; the first label name in the answer wins
        (1.0 = names[1], 0.0 = names[0], None = neither named; the request's ItemRejected if it was
        refused). ``answer_prefix`` is not sent (chat APIs do not portably continue a partial
        assistant turn) and ``null`` is not used (a one-word answer has no probability to calibrate)."""
        out = []
        for m in batch:
            try:
                r = self._post(self._payload(m, max_tokens=self.judge_max_tokens, greedy=True))
            except ItemRejected as e:
                out.append(e)  # a refusal, not a judgement: the item is not cached and is asked again
                continue
            i = first_name(r["text"], names)
            out.append(None if i is None else float(i))
        return out
