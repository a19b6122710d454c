"""End to end through the launch scripts: train (1 process and 2 DeepSpeed ranks), evaluate
(sharded under torchrun), predict."""

import json
from pathlib import Path

import pytest

from tests.conftest import review_splits
from tests.integration._run import REPO, launch, read_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_splits(tmp_path_factory.mktemp("data"))  # test: 11 examples, odd for 2 ranks


def _args(tiny_dir, data, out, *extra):
    return ["--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={tiny_dir}",
            f"data.train_file={data['train']}", f"data.dev_file={data['dev']}", f"data.test_file={data['test']}",
            f"output_dir={out}", "model.finetune=full", "train.learning_rate=3e-3", "train.max_steps=10",
            "train.eval_every=5", *extra]


@pytest.fixture(scope="module")
def single_run(tiny_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch("train.py", _args(tiny_dir, data, out, "train.gradient_accumulation_steps=4"))
    return out


def test_single_process_run_writes_everything(single_run):
    out = single_run
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 11))
    for r in log:
        assert {"step", "loss", "lm_loss", "cls_loss", "tokens_per_s", "packing_efficiency"} <= r.keys()
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["lm_loss"], rel=1e-5)
        assert 0 < r["packing_efficiency"] <= 1 and r["tokens_per_s"] > 0
    assert log[-1]["lm_loss"] < log[0]["lm_loss"]  # it learns
    from clsgen_dist.config import load_config
    from clsgen_dist.distributed.engine import lr_lambda

    f = lr_lambda(load_config(out / "config.yaml"))  # the logged lr is the one each step trained with
    assert [r["lr"] for r in log] == pytest.approx([3e-3 * f(s) for s in range(10)], rel=1e-9)
    for f in ("config.yaml", "ds_config.json", "run_info.json", "final/COMPLETE", "final/cls_head.safetensors",
              "final/model.safetensors", "eval/metrics.json", "eval/predictions.jsonl"):
        assert (out / f).is_file(), f
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 2
    m = json.loads((out / "eval/metrics.json").read_text())
    assert m["n"] == 11 and {"auroc", "f1", "f1_tuned", "accuracy", "brier"} <= m.keys()
    preds = read_jsonl(out / "eval/predictions.jsonl")
    assert len(preds) == 11 and preds[0]["explanation"] is not None and preds[-1]["explanation"] is None
    assert list((out / "tensorboard").iterdir())
    # the fine-tuned model holds what the base model's own file holds (no non-persistent buffers)
    from safetensors import safe_open

    with safe_open(str(out / "final/model.safetensors"), "pt") as a, \
            safe_open(str(Path(load_config(out / "config.yaml").model.name_or_path) / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())


def test_two_deepspeed_ranks_match_one_process(single_run, tiny_dir, data, tmp_path):
    """ZeRO-2 on 2 CPU ranks (gloo), grad-accum 2, sees the same 4 rows per step as 1 process with
    grad-accum 4: over 10 fp32 steps the per-step losses agree within 1e-5 (measured: <= 1e-6)."""
    launch("train.py", _args(tiny_dir, data, tmp_path, "train.gradient_accumulation_steps=2"),
           launcher="deepspeed", nproc=2)
    one = read_jsonl(single_run / "train_log.jsonl")
    two = read_jsonl(tmp_path / "train_log.jsonl")
    assert len(one) == len(two) == 10
    for a, b in zip(one, two):
        for k in ("loss", "lm_loss", "cls_loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k, a[k], b[k])
        # Adam hides a constant gradient scale from the losses; the reduced gradient's norm does not
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["lm_tokens"] == b["lm_tokens"] and a["examples"] == b["examples"]
    assert json.loads((tmp_path / "run_info.json").read_text())["world_size"] == 2


def test_zero3_two_ranks_partitioned_match_one_process(single_run, tiny_dir, data, tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0): the fused loss sees the full
    LM weight, gradients reach the partitioned parameters (same losses within 1e-5 over 10 fp32 steps,
    and the same gradient norms as one
    process), and the consolidated checkpoint loads in a plain process with the same probabilities.
    The model was built partitioned: each rank held half of it from the start."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    launch("train.py", _args(tiny_dir, data, out, "train.gradient_accumulation_steps=2", f"ds_config={tmp_path / 'z3.json'}"),
           launcher="deepspeed", nproc=2)
    one, three = read_jsonl(single_run / "train_log.jsonl"), read_jsonl(out / "train_log.jsonl")
    for a, b in zip(one, three):
        for k in ("loss", "lm_loss", "cls_loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k, a[k], b[k])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (a["step"], a["grad_norm"], b["grad_norm"])
    p1 = read_jsonl(single_run / "eval/predictions.jsonl")
    p3 = read_jsonl(out / "eval/predictions.jsonl")
    assert [r["prob"] for r in p1] == pytest.approx([r["prob"] for r in p3], abs=1e-5)
    from clsgen_dist import CLSGen

    texts = ["Great fun.", "Awful."]
    a = CLSGen.from_pretrained(single_run / "final", device="cpu").predict(texts, explain=False)
    b = CLSGen.from_pretrained(out / "final", device="cpu").predict(texts, explain=False)
    assert [r["prob"] for r in a] == pytest.approx([r["prob"] for r in b], abs=1e-5)
    # The model state really is partitioned: the same ZeRO-3 run on one rank holds ~2x per rank.
    one_rank = tmp_path / "one"
    launch("train.py", _args(tiny_dir, data, one_rank, "train.gradient_accumulation_steps=4", "train.max_steps=1",
                             f"ds_config={tmp_path / 'z3.json'}", "data.test_file=null"))
    b1 = json.loads((one_rank / "run_info.json").read_text())["model_state_bytes_per_rank"]
    b2 = json.loads((out / "run_info.json").read_text())["model_state_bytes_per_rank"]
    ratio = max(b2) / b1[0]
    print(f"ZeRO-3 model state per rank: 1 rank {b1[0] / 2**20:.2f} MiB, 2 ranks {[x / 2**20 for x in b2]} MiB, "
          f"ratio {ratio:.3f}")
    assert len(b1) == 1 and len(b2) == 2 and ratio <= 0.55
    # ... from the start: the model was built partitioned (model.zero3_init), not loaded whole per rank
    l1 = json.loads((one_rank / "run_info.json").read_text())["load_param_bytes_per_rank"]
    l2 = json.loads((out / "run_info.json").read_text())["load_param_bytes_per_rank"]
    assert len(l2) == 2 and max(l2) / l1[0] <= 0.51, (l1, l2)


def test_zero3_offload_two_ranks_match_one_process(single_run, tiny_dir, data, tmp_path):
    """ds_configs/zero3_offload.json as shipped (parameters and optimizer offloaded to the host,
    DeepSpeed's own CPU Adam, JIT-built on first use) with every parameter partitioned: 10 fp32 steps
    on 2 ranks follow the single-process run. The tolerance is 2e-5 rather than 1e-5 because
    DeepSpeedCPUAdam's vectorised update rounds differently from torch AdamW (measured: <= 5e-6)."""
    ds = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3off.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    launch("train.py", _args(tiny_dir, data, out, "train.gradient_accumulation_steps=2",
                             f"ds_config={tmp_path / 'z3off.json'}", "data.test_file=null"),
           launcher="deepspeed", nproc=2, timeout=900)
    info = json.loads((out / "run_info.json").read_text())
    assert info["optimizer"] == "DeepSpeedCPUAdam" and info["world_size"] == 2
    one, off = read_jsonl(single_run / "train_log.jsonl"), read_jsonl(out / "train_log.jsonl")
    assert len(one) == len(off) == 10
    for a, b in zip(one, off):
        for k in ("loss", "lm_loss", "cls_loss"):
            assert a[k] == pytest.approx(b[k], abs=2e-5), (a["step"], k, a[k], b[k])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-5), (a["step"], a["grad_norm"], b["grad_norm"])
    from clsgen_dist import CLSGen

    texts = ["Great fun.", "Awful."]
    p1 = CLSGen.from_pretrained(single_run / "final", device="cpu").predict(texts, explain=False)
    p2 = CLSGen.from_pretrained(out / "final", device="cpu").predict(texts, explain=False)
    assert [r["prob"] for r in p1] == pytest.approx([r["prob"] for r in p2], abs=1e-4)


def test_gen_only_evaluation_under_partitioned_zero3(tiny_dir, data, tmp_path):
    """A gen-only run (cls_weight=0) reads P(y=1) off the verdict tokens after its own explanation.
    Under ZeRO-3 every forward is a collective gather, and the 11 test examples split 6/5 over 2 ranks:
    the end-of-run evaluation must lock-step its forwards (else it hangs) and give the probabilities
    that the consolidated checkpoint gives in one plain process from the same explanations."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    launch("train.py", _args(tiny_dir, data, out, "train.max_steps=2", "train.eval_every=0", "train.cls_weight=0",
                             "data.dev_file=null", f"ds_config={tmp_path / 'z3.json'}"),
           launcher="deepspeed", nproc=2, timeout=600)
    m = json.loads((out / "eval/metrics.json").read_text())
    preds = read_jsonl(out / "eval/predictions.jsonl")
    assert m["prob_source"] == "explanation" and m["n"] == 11 and len(preds) == 11
    assert all(isinstance(r["explanation"], str) for r in preds)  # gen-only explains every example
    from clsgen_dist import CLSGen
    from clsgen_dist.baselines import verdict_probs

    g = CLSGen.from_pretrained(out / "final", device="cpu")
    texts = {i: t for i, t in enumerate(json.loads(x)["text"] for x in data["test"].read_text().splitlines())}
    ref = verdict_probs(g.model, g.tokenizer, g.encoder, texts, {i: r["explanation"] for i, r in enumerate(preds)},
                        max_tokens=64)  # packed differently from the run's: the result must not depend on it
    assert [r["prob"] for r in preds] == pytest.approx([ref[i] for i in range(11)], abs=1e-5)


def test_bf16_run_keeps_the_head_fp32(tiny_dir, data, tmp_path):
    """bf16, what model.dtype=auto picks on CUDA: DeepSpeed's bf16 engine stores every parameter in
    bf16, the head included. The head still computes in fp32 (the mid-run dev evaluation and the final
    one run), the checkpoint's head is fp32, and the reloaded model gives the run's test probabilities."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    launch("train.py", _args(tiny_dir, data, out, "model.dtype=bfloat16", "train.max_steps=4", "train.eval_every=2",
                             "eval.explain_limit=0"))
    assert json.loads((out / "ds_config.json").read_text())["bf16"]["enabled"] is True
    assert [r["step"] for r in read_jsonl(out / "eval_log.jsonl")] == [2, 4]
    head = load_file(str(out / "final/cls_head.safetensors"))
    assert {k: v.dtype for k, v in head.items()} == {"weight": torch.float32, "bias": torch.float32}
    assert head["weight"].abs().sum() > 0  # trained away from its zero init
    preds = read_jsonl(out / "eval/predictions.jsonl")
    texts = {r["id"]: r["text"] for r in read_jsonl(data["test"])}
    from clsgen_dist import CLSGen

    g = CLSGen.from_pretrained(out / "final", device="cpu")
    assert next(g.model.causal_lm.parameters()).dtype == torch.bfloat16 and g.model.cls_head.weight.dtype == torch.float32
    again = g.predict([texts[r["id"]] for r in preds], explain=False)
    # packed (run) vs left-padded prefill (predict) in bf16: the same model up to bf16 rounding
    assert [r["prob"] for r in again] == pytest.approx([r["prob"] for r in preds], abs=1e-2)


def test_eval_sharded_over_two_ranks_equals_one_process(single_run, data, tmp_path):
    ck = single_run / "final"
    common = ["--checkpoint", str(ck), "--data", str(data["test"]), "--dev", str(data["dev"]), "--explain-limit", "3"]
    launch("eval.py", common + ["--output", str(tmp_path / "one")])
    # no --data/--dev: the run's own test and dev splits (data.test_file / data.dev_file of its config)
    launch("eval.py", ["--checkpoint", str(ck), "--explain-limit", "3", "--output", str(tmp_path / "two")],
           launcher="torchrun", nproc=2)
    p1, p2 = read_jsonl(tmp_path / "one/predictions.jsonl"), read_jsonl(tmp_path / "two/predictions.jsonl")
    assert [r["id"] for r in p1] == [r["id"] for r in p2] == [f"r{i}" for i in range(10, 21)]
    for a, b in zip(p1, p2):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6) and a["explanation"] == b["explanation"]
    m1 = json.loads((tmp_path / "one/metrics.json").read_text())
    m2 = json.loads((tmp_path / "two/metrics.json").read_text())
    for k in ("n", "auroc", "f1", "f1_tuned", "threshold_tuned", "temperature", "accuracy", "brier"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-6), k  # batches differ in grouping: float rounding
    # and the metrics are those of the predictions (independent recomputation)
    from sklearn.metrics import roc_auc_score

    assert m1["auroc"] == pytest.approx(roc_auc_score([r["label"] for r in p1], [r["prob"] for r in p1]))


def _z3_all_partitioned(tmp_path) -> str:
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    return str(tmp_path / "z3.json")


def _same_eval(one, two, *, ppl: bool) -> None:
    p1, p2 = read_jsonl(one / "predictions.jsonl"), read_jsonl(two / "predictions.jsonl")
    assert [r["id"] for r in p1] == [r["id"] for r in p2]
    for a, b in zip(p1, p2):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6) and a["explanation"] == b["explanation"]
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    for k in ("n", "auroc", "f1", "accuracy", "brier") + (("perplexity", "perplexity_base", "perplexity_tokens")
                                                          if ppl else ()):
        assert m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-6), k


def test_eval_partitioned_under_zero3_equals_one_process(single_run, data, tmp_path):
    """launch/eval.py --ds-config (ZeRO-3, every parameter partitioned) on 2 ranks: the fully
    fine-tuned checkpoint and, for the perplexity ratio, its base are built partitioned (each rank
    holds half) and give the single process's probabilities, explanations and perplexities. 1,500
    tokens make 3 perplexity windows, 2 on one rank and 1 on the other: the forwards lock-step."""
    common = ["--checkpoint", str(single_run / "final"), "--data", str(data["test"]), "--explain-limit", "3",
              "--ppl-tokens", "1500", "--bootstrap", "0"]
    launch("eval.py", common + ["--output", str(tmp_path / "one")])
    proc = launch("eval.py", common + ["--output", str(tmp_path / "two"), "--ds-config", _z3_all_partitioned(tmp_path)],
                  launcher="deepspeed", nproc=2)
    assert (proc.stdout + proc.stderr).count("partitioned over 2 ranks (ZeRO-3 inference)") == 2  # model + base
    _same_eval(tmp_path / "one", tmp_path / "two", ppl=True)
    assert json.loads((tmp_path / "two/metrics.json").read_text())["perplexity_tokens"] == 1497


def test_eval_perplexity_of_a_checkpoint_trained_with_a_cuda_only_kernel(single_run, data, tmp_path):
    """A fully fine-tuned checkpoint trained with flash-attn loads with sdpa on a CPU, and so does its
    base for the perplexity ratio: the same perplexities as the checkpoint saying sdpa."""
    import shutil

    ck = tmp_path / "final"
    shutil.copytree(single_run / "final", ck)
    conf = ck / "clsgen_config.yaml"
    text = conf.read_text()
    assert "attn_implementation: auto" in text
    conf.write_text(text.replace("attn_implementation: auto", "attn_implementation: flash_attention_2"))
    common = ["--data", str(data["test"]), "--explain-limit", "0", "--ppl-tokens", "600", "--bootstrap", "0"]
    launch("eval.py", ["--checkpoint", str(ck), "--output", str(tmp_path / "fa"), *common])
    launch("eval.py", ["--checkpoint", str(single_run / "final"), "--output", str(tmp_path / "plain"), *common])
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("fa", "plain"))
    for k in ("perplexity", "perplexity_base", "auroc"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k


@pytest.mark.slow  # 4 launches, 3 of 2 DeepSpeed processes: ~55 s on 2 cores; the partitioned build with a cls
# token is also checked in the default suite by tests/modeling/test_zero3_init.py
def test_zero3_lora_cls_token_run_then_partitioned_eval(tiny_dir, data, tmp_path):
    """LoRA with an added cls token, trained on 2 ZeRO-3 ranks (built partitioned) and on 2 ranks
    with model.zero3_init=false: the same losses and test predictions. Its checkpoint evaluated
    partitioned (the cls token's rows rebuilt through gathers, the adapter loaded onto the
    partitioned base) gives the single process's results."""
    z3 = _z3_all_partitioned(tmp_path)
    extra = ["model.finetune=lora", "model.cls_position=token", "train.max_steps=4", "train.eval_every=4",
             "train.gradient_accumulation_steps=2", "eval.explain_limit=2", f"ds_config={z3}"]
    runs = {}
    for name, more in (("partitioned", []), ("whole", ["model.zero3_init=false"])):
        out = tmp_path / name
        args = _args(tiny_dir, data, out, *extra, *more)
        launch("train.py", args, launcher="deepspeed", nproc=2)
        runs[name] = out
    a, b = read_jsonl(runs["partitioned"] / "train_log.jsonl"), read_jsonl(runs["whole"] / "train_log.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    _same_eval(runs["partitioned"] / "eval", runs["whole"] / "eval", ppl=False)
    common = ["--checkpoint", str(runs["partitioned"] / "final"), "--explain-limit", "2", "--ppl-tokens", "0",
              "--bootstrap", "0"]
    launch("eval.py", common + ["--output", str(tmp_path / "one")])
    proc = launch("eval.py", common + ["--output", str(tmp_path / "two"), "--ds-config", z3], launcher="deepspeed",
                  nproc=2)
    assert "partitioned over 2 ranks (ZeRO-3 inference)" in proc.stdout + proc.stderr
    _same_eval(tmp_path / "one", tmp_path / "two", ppl=False)


def test_partitioned_model_refused_before_output_dir_is_touched(tiny_dir, data, tmp_path):
    """A model built partitioned has its LM logits checked on the engine; a refused one (its forward
    triples the logits) is refused before anything is written: with overwrite=true an earlier run
    in output_dir is left as it was."""
    import shutil
    import subprocess

    from tests.integration._run import BIN, clean_env, free_port

    model = tmp_path / "tripled"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "tripled_llama"}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    (out / "DONE").write_text("{}\n")
    before = {p.name: p.read_text() for p in out.iterdir()}
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests/integration/_tripled_train.py"),
           *_args(model, data, out, f"ds_config={_z3_all_partitioned(tmp_path)}", "overwrite=true")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "computes its LM logits in a way the fused" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-4000:]
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_predict_cli_and_python_api(single_run):
    proc = launch("predict.py", ["--checkpoint", str(single_run / "final"), "--text", "Great fun.",
                                 "--text", "Awful.", "--max-new-tokens", "5"])
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 2 and all(0 < r["prob"] < 1 and isinstance(r["explanation"], str) for r in rows)
    from clsgen_dist import CLSGen

    m = CLSGen.from_pretrained(single_run / "final", device="cpu")
    res = m.predict(["Great fun.", "Awful."], explain=False)
    assert [r["prob"] for r in res] == pytest.approx([r["prob"] for r in rows], abs=1e-6)
    assert res[0]["explanation"] is None and res[0]["label"] in (0, 1)
    with pytest.raises(ValueError, match=r"texts\[1\] is ' '; expected a non-empty string"):
        m.predict(["Fine.", " "], explain=False)  # as the CLI refuses an empty --text
    from clsgen_dist.config import ConfigError

    with pytest.raises(ConfigError, match="needs a ZeRO-3 config"):  # a JSON's path is loaded, as --ds-config's
        CLSGen.from_pretrained(single_run / "final", device="cpu", ds_config="ds_configs/zero2.json")


def test_predict_sharded_under_launchers_equals_one_process(single_run, data, tmp_path):
    """launch/predict.py under torchrun (a whole model per rank) and under deepspeed --ds-config
    (ZeRO-3, every parameter partitioned) on 2 ranks: each rank predicts half of the texts, rank 0
    alone prints or writes them, and they are the single process's. 9 texts in batches of 4 split
    2 batches / 1 over the ranks: the partitioned forwards must lock-step (else it hangs). The
    partitioned run is on a gen-only copy, whose P(y=1) comes from the verdict tokens after the
    explanation (a second sharded, lock-stepped pass)."""
    import shutil

    import yaml

    from clsgen_dist import CLSGen

    texts = [r["text"] for r in read_jsonl(data["test"])][:9]
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    ck = single_run / "final"
    assert yaml.safe_load((ck / "clsgen_config.yaml").read_text())["eval"]["batch_size"] == 4
    proc = launch("predict.py", ["--checkpoint", str(ck), "--data", str(f), "--max-new-tokens", "5"],
                  launcher="torchrun", nproc=2)
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    ref = CLSGen.from_pretrained(ck, device="cpu").predict(texts, max_new_tokens=5)
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(9)]  # printed once, by rank 0, in input order
    assert [r["prob"] for r in rows] == pytest.approx([r["prob"] for r in ref], abs=1e-6)
    assert [r["explanation"] for r in rows] == [r["explanation"] for r in ref]

    gen_only = tmp_path / "gen_only"
    shutil.copytree(ck, gen_only)
    cfg = yaml.safe_load((gen_only / "clsgen_config.yaml").read_text())
    cfg["train"]["cls_weight"] = 0.0
    (gen_only / "clsgen_config.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch("predict.py", ["--checkpoint", str(gen_only), "--data", str(f), "--max-new-tokens", "5",
                                 "--output", str(tmp_path / "p.jsonl"), "--ds-config", _z3_all_partitioned(tmp_path)],
                  launcher="deepspeed", nproc=2)
    assert (proc.stdout + proc.stderr).count("partitioned over 2 ranks (ZeRO-3 inference)") == 1  # rank 0 logs
    rows = read_jsonl(tmp_path / "p.jsonl")
    ref = CLSGen.from_pretrained(gen_only, device="cpu").predict(texts, max_new_tokens=5)
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(9)]
    assert [r["prob"] for r in rows] == pytest.approx([r["prob"] for r in ref], abs=1e-5)
    assert [r["explanation"] for r in rows] == [r["explanation"] for r in ref]
    assert len({round(r["prob"], 6) for r in rows}) > 1  # the verdict tokens', not the untrained head's 0.5


def test_predict_and_eval_on_files_with_other_columns(single_run, data, tmp_path):
    """A file with its own column names (--text-field/--label-field/--id-field), labels predict does
    not need (any junk there is ignored), and a document longer than data.max_seq_len: flagged as
    truncated, without the tokenizer's misleading 'sequence length' warning."""
    rows = read_jsonl(data["test"])
    long_note = "The film is long. " * 2000  # ~10,000 tokens: past data.max_seq_len and the tokenizer's 8,192
    mine = tmp_path / "notes.jsonl"
    mine.write_text("".join(json.dumps({"note_id": r["id"], "note": r["text"], "urgent": r["label"],
                                        "triage": "maybe"}) + "\n" for r in rows)
                    + json.dumps({"note_id": "long", "note": long_note, "urgent": 1, "triage": 2}) + "\n")
    proc = launch("predict.py", ["--checkpoint", str(single_run / "final"), "--data", str(mine), "--no-explain",
                                 "--text-field", "note", "--id-field", "note_id"])
    out = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["id"] for r in out] == [r["id"] for r in rows] + ["long"]
    assert [r["truncated"] for r in out] == [False] * len(rows) + [True]
    assert "sequence length is longer" not in proc.stderr
    launch("eval.py", ["--checkpoint", str(single_run / "final"), "--data", str(mine), "--text-field", "note",
                       "--label-field", "urgent", "--id-field", "note_id", "--explain-limit", "0", "--ppl-tokens", "0",
                       "--bootstrap", "0", "--output", str(tmp_path / "mine")])
    launch("eval.py", ["--checkpoint", str(single_run / "final"), "--data", str(data["test"]), "--explain-limit", "0",
                       "--ppl-tokens", "0", "--bootstrap", "0", "--output", str(tmp_path / "ref")])
    pm, pr = read_jsonl(tmp_path / "mine/predictions.jsonl"), read_jsonl(tmp_path / "ref/predictions.jsonl")
    assert [(r["id"], r["label"]) for r in pm[:-1]] == [(r["id"], r["label"]) for r in pr]
    assert [r["prob"] for r in pm[:-1]] == pytest.approx([r["prob"] for r in pr], abs=1e-6)
    assert [r["prob"] for r in pm[:-1]] == pytest.approx([r["prob"] for r in out[:-1]], abs=1e-5)
    assert pm[-1]["truncated"] and json.loads((tmp_path / "mine/metrics.json").read_text())["truncated"] == 1


def test_predict_on_a_gen_only_checkpoint_reads_the_verdict(single_run, data, tmp_path):
    """A checkpoint trained with train.cls_weight=0 has an untrained head (P = 0.5 for every text):
    predict takes P(y=1) from the verdict tokens after its own explanation, as eval does."""
    import shutil

    import yaml

    ck = tmp_path / "gen_only"
    shutil.copytree(single_run / "final", ck)
    cfg = yaml.safe_load((ck / "clsgen_config.yaml").read_text())
    cfg["train"]["cls_weight"] = 0.0  # what a gen-only run records (the weights here serve as any model's)
    (ck / "clsgen_config.yaml").write_text(yaml.safe_dump(cfg))
    launch("eval.py", ["--checkpoint", str(ck), "--data", str(data["test"]), "--ppl-tokens", "0", "--bootstrap", "0",
                       "--output", str(tmp_path / "eval")])
    ev = read_jsonl(tmp_path / "eval/predictions.jsonl")
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["mode"] == "gen_only"
    texts = {r["id"]: r["text"] for r in read_jsonl(data["test"])}
    from clsgen_dist import CLSGen

    res = CLSGen.from_pretrained(ck, device="cpu").predict([texts[r["id"]] for r in ev], explain=False)
    assert [r["prob"] for r in res] == pytest.approx([r["prob"] for r in ev], abs=1e-5)
    assert [r["explanation"] for r in res] == [r["explanation"] for r in ev]
    assert len({round(r["prob"], 6) for r in res}) > 1  # not the untrained head's 0.5 everywhere
