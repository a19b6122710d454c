import random

import pytest

from clsgen_dist.data.packing import PackedRows, eval_batches, pack_ffd
from clsgen_dist.data.prompts import IGNORE, PromptEncoder


def naive_ffd(lengths, cap):
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= cap:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_ffd_matches_naive_first_fit_decreasing(seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 120) for _ in range(rnd.randint(1, 400))]
    assert pack_ffd(lengths, 128) == naive_ffd(lengths, 128)


def test_ffd_rejects_oversized():
    with pytest.raises(ValueError, match="> capacity"):
        pack_ffd([5, 300], 128)


@pytest.fixture
def encoded(tokenizer, toy_rows):
    enc = PromptEncoder(tokenizer, instruction="Positive?", label_names=["no", "yes"], max_seq_len=160)
    return [enc.encode(r["text"], r["label"], r.get("explanation"), index=i) for i, r in enumerate(toy_rows)]


def test_packed_batch_layout(encoded):
    rows = PackedRows(encoded, 160, seed=3)
    for step in range(3):
        for b in rows.micro_batches(step, micro_batch_size=2, grad_accum=1):
            T = b.input_ids.shape[1]
            assert b.position_ids.shape == (1, T) and b.targets.shape == (T,)
            assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == T == b.n_tokens <= b.capacity
            ids, pos, tgt = b.input_ids[0].tolist(), b.position_ids[0].tolist(), b.targets.tolist()
            for k, idx in enumerate(b.example_index.tolist()):
                e = encoded[idx]
                s, t = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
                assert ids[s:t] == e.input_ids and pos[s:t] == list(range(t - s))
                # the cls position lands on the intended token of every example
                assert int(b.cls_index[k]) == s + e.cls_pos
                assert ids[int(b.cls_index[k])] == e.input_ids[e.cls_pos]
                assert b.cls_labels[k] == e.label
                # no target crosses an example boundary: the last row of each example has none
                assert tgt[t - 1] == IGNORE
                assert tgt[s:t] == e.targets
            assert b.n_lm == sum(x != IGNORE for x in tgt)


def test_step_rows_do_not_depend_on_split(encoded):
    """The same rows make a step whatever the micro-batch / accumulation / rank split."""
    rows = PackedRows(encoded, 96, seed=0)

    def ids(step, micro, ga, world):
        got = []
        for r in range(world):
            for b in rows.micro_batches(step, micro_batch_size=micro, grad_accum=ga, rank=r, world_size=world):
                got += b.example_index.tolist()
        return sorted(got)

    for step in range(4):
        ref = ids(step, 4, 1, 1)
        assert ids(step, 1, 4, 1) == ref == ids(step, 2, 1, 2) == ids(step, 1, 2, 2)
    # over an epoch every row is seen once, and the next epoch is another permutation of them
    n = len(rows.rows)
    seen = [tuple(r) for r in rows.stream_rows(0, n)]
    assert sorted(seen) == sorted(tuple(r) for r in rows.rows)
    again = [tuple(r) for r in rows.stream_rows(n, n)]
    assert sorted(again) == sorted(seen) and again != seen


def test_packing_efficiency(encoded):
    rows = PackedRows(encoded, 256)
    total = sum(len(e) for e in encoded)
    assert rows.efficiency == pytest.approx(total / (len(rows.rows) * 256))
    assert rows.efficiency > 0.5


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_shards_cover_every_example_once(encoded, world):
    seen = []
    for r in range(world):
        for b in eval_batches(encoded, 200, rank=r, world_size=world):
            assert b.n_tokens <= 200
            seen += b.example_index.tolist()
    assert sorted(seen) == list(range(len(encoded)))
