"""bitsandbytes' 8-bit AdamW (``train.optimizer=adamw_8bit|paged_adamw_8bit``, QLoRA's choice on GPUs)
through the real launchers: DeepSpeed ZeRO-2 (one process) and ZeRO-3 (2 gloo ranks) step it, its
8-bit states go into the checkpoints, a killed run resumes exactly, and a resume that DeepSpeed could
not convert is refused with the reason. bitsandbytes 0.50 runs the 8-bit optimizers on CPU (paged
memory is a CUDA feature: there it warns and keeps the states unpaged)."""

import json

import pytest
import torch

from clsgen_dist.resume import latest_checkpoint
from tests.conftest import review_splits
from tests.integration._run import REPO, launch, read_jsonl

pytest.importorskip("bitsandbytes")

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return review_splits(tmp_path_factory.mktemp("opt-data"))


def _args(tiny_dir, data, out, *extra):
    return ["--config", "launch/configs/tiny_cpu.yaml", f"model.name_or_path={tiny_dir}", "model.quantization=nf4",
            f"data.train_file={data['train']}", f"data.dev_file={data['dev']}", "data.test_file=null",
            f"output_dir={out}", f"train.max_steps={STEPS}", "train.save_every=3", "train.eval_every=0",
            "train.learning_rate=3e-3", "eval.explain_limit=0", *extra]


def _log(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(out / "train_log.jsonl")]


def _optimizer_states(ckpt) -> list[dict]:
    """Every rank's inner optimizer state (per parameter group) from a ZeRO checkpoint folder."""
    states = []
    for f in sorted(ckpt.glob("*optim_states.pt")):
        osd = torch.load(f, weights_only=False, map_location="cpu")["optimizer_state_dict"]
        inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
        states += list(inner["state"].values())
    return states


def _quantized(state: dict) -> dict | None:
    return state.get("__bnb_optimizer_quant_state__")  # bitsandbytes' packed 8-bit state, when it has one


def _kind(q: dict) -> tuple:
    """(dtype, elements) of a bitsandbytes state's first moment; uint8 ones come with block scales."""
    assert q["state1"].dtype == q["state2"].dtype
    if q["state1"].dtype == torch.uint8:
        assert "absmax1" in q and "absmax2" in q
    return q["state1"].dtype, q["state1"].numel()


@pytest.fixture(scope="module")
def runs(tiny_dir, data, tmp_path_factory):
    """QLoRA, one process, the default ZeRO-2 JSON: paged 8-bit AdamW and torch AdamW."""
    out = {}
    for name in ("paged_adamw_8bit", "adamw_torch"):
        out[name] = tmp_path_factory.mktemp(name)
        launch("train.py", _args(tiny_dir, data, out[name], f"train.optimizer={name}"))
    return out


def test_8bit_states_train_like_adamw(runs):
    """The run steps bitsandbytes' PagedAdamW8bit, whose checkpointed states are 8-bit (uint8 moments
    plus block scales) for the LoRA matrices; the losses follow torch AdamW's to quantization error,
    and are not torch AdamW's (the first step, before any update, is the same)."""
    eight, fp32 = _log(runs["paged_adamw_8bit"]), _log(runs["adamw_torch"])
    assert json.loads((runs["paged_adamw_8bit"] / "run_info.json").read_text())["optimizer"] == "PagedAdamW8bit"
    assert json.loads((runs["adamw_torch"] / "run_info.json").read_text())["optimizer"] == "AdamW"
    assert [s for s, _, _ in eight] == list(range(1, STEPS + 1)) and eight[0] == fp32[0]
    for (s, a, ga), (_, b, gb) in zip(eight, fp32):
        assert a == pytest.approx(b, rel=2e-3) and ga == pytest.approx(gb, rel=5e-2), (s, a, b, ga, gb)
    assert any(a != b for (_, a, _), (_, b, _) in zip(eight, fp32))
    # ZeRO-2 hands the optimizer one flat fp32 partition per group: the LoRA matrices' gets 8-bit
    # moments, the head's (65 elements + alignment, under bitsandbytes' 4,096) fp32 ones
    kinds = [_kind(q) for q in map(_quantized, _optimizer_states(latest_checkpoint(runs["paged_adamw_8bit"])))]
    assert len(kinds) == 2 and kinds[0][0] == torch.uint8 and kinds[0][1] >= 4096, kinds
    assert kinds[1][0] == torch.float32 and 65 <= kinds[1][1] < 4096, kinds
    assert not any(map(_quantized, _optimizer_states(latest_checkpoint(runs["adamw_torch"]))))


def test_8bit_killed_run_resumes_exactly(runs, tiny_dir, data, tmp_path):
    """SIGKILL after step 5, resume from the step-3 checkpoint: the 8-bit states (and their block
    scales) come back through DeepSpeed's checkpoint, so steps 4-6 equal the uninterrupted run's. The
    checkpoint leaves the frozen 4-bit base out; the resumed run quantizes it again from the base model
    (and does not trip over the quantization state that bitsandbytes writes but does not load)."""
    proc = launch("train.py", _args(tiny_dir, data, tmp_path, "train.optimizer=paged_adamw_8bit"), check=False,
                  env={"CLSGEN_FAULT": "after_step:5"})
    assert proc.returncode != 0 and latest_checkpoint(tmp_path).name == "step-00000003", proc.stderr[-3000:]
    module = torch.load(tmp_path / "checkpoints/step-00000003/mp_rank_00_model_states.pt", weights_only=False,
                        map_location="cpu")["module"]
    # neither the frozen 4-bit base nor the tied embedding (under either of its names) is in it
    assert not [k for k in module if k.endswith(("base_layer.weight", "embed_tokens.weight", "lm_head.weight"))]
    launch("train.py", _args(tiny_dir, data, tmp_path, "train.optimizer=paged_adamw_8bit", "resume=true"))
    assert _log(tmp_path) == _log(runs["paged_adamw_8bit"])


@pytest.mark.slow  # 5 launches of 2 DeepSpeed processes: ~40 s on 2 cores
def test_8bit_zero3_two_ranks(runs, tiny_dir, data, tmp_path):
    """ZeRO-3 on 2 gloo ranks, every parameter partitioned, adamw_8bit over each rank's flat fp32
    partition: the losses follow the one-process 8-bit run (the quantization blocks are cut from other
    slices, so not bit for bit), a killed run resumes exactly on 2 ranks, and resuming it on 1 rank is
    one clear error (DeepSpeed's universal conversion would stop with a KeyError on 'exp_avg')."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    extra = ["train.optimizer=adamw_8bit", "train.gradient_accumulation_steps=1", f"ds_config={tmp_path / 'z3.json'}"]

    def two_ranks(out, *more, fault=None):
        return launch("train.py", _args(tiny_dir, data, out, *extra, *more), launcher="deepspeed", nproc=2,
                      check=False, env={"CLSGEN_FAULT": fault} if fault else None)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = two_ranks(straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _log(runs["paged_adamw_8bit"])
    two = _log(straight)
    assert two[0] == pytest.approx(one[0], rel=1e-6)
    for (s, a, _), (_, b, _) in zip(two, one, strict=True):
        assert a == pytest.approx(b, rel=2e-3), (s, a, b)
    kinds = [_kind(q) for q in map(_quantized, _optimizer_states(latest_checkpoint(straight)))]
    assert sum(k[0] == torch.uint8 for k in kinds) == 2, kinds  # each rank's slice of the LoRA matrices

    proc = two_ranks(killed, fault="after_step:5")
    assert proc.returncode != 0 and latest_checkpoint(killed).name == "step-00000003", proc.stderr[-3000:]
    proc = launch("train.py", _args(tiny_dir, data, killed, *extra, "train.gradient_accumulation_steps=2",
                                    "resume=true"), check=False)  # the same rows per step on 1 rank
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "saved by 2 ranks under ZeRO stage 3 with train.optimizer=adamw_8bit, and this run has 1" in proc.stderr
    assert not (killed / "checkpoints/step-00000003-universal").exists()
    proc = two_ranks(killed, "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log(killed) == _log(straight)
