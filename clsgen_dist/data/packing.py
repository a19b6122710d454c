"""Padding-free packing: examples concatenated into rows of at most ``max_seq_len`` tokens.

A micro-batch is ``micro_batch_size`` rows flattened into one ``[1, T]`` sequence. Position ids
restart at 0 for every example and ``cu_seqlens`` marks the example boundaries: flash-attn's varlen
kernel uses them on GPU, and transformers' SDPA path (``attention_mask=None``, ``use_cache=False``)
derives a block-diagonal causal mask from the restarting position ids on CPU. Either way no token
attends across examples (tests/data/test_packing.py holds every path to the unpacked outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompts import Encoded


def pack_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: lists of indices into ``lengths``, each summing to at most
    ``capacity``. Items go, longest first (ties in input order), into the earliest-opened bin with
    room. O(n log n): a max segment tree over the bins' free space finds that bin."""
    n = len(lengths)
    for i, x in enumerate(lengths):
        if x > capacity:
            raise ValueError(f"example {i} has {x} tokens > capacity {capacity}")
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # free space; unopened bins are empty (full capacity)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


@dataclass
class PackedBatch:
    """One flattened micro-batch. ``cls_index`` are rows of the flattened sequence."""

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 per example
    targets: torch.Tensor  # [T] int64, -100 = no target
    cls_index: torch.Tensor  # [M] int64
    cls_labels: torch.Tensor  # [M] float32
    cu_seqlens: torch.Tensor  # [M + 1] int32
    max_seqlen: int
    example_index: torch.Tensor  # [M] int64, index of each example in its split
    n_lm: int  # answer tokens with a target (host int: known at collate time, no sync)
    n_tokens: int  # real tokens
    capacity: int  # rows * max_seq_len

    def to(self, device: torch.device | str) -> "PackedBatch":
        kw = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
              for k, v in self.__dict__.items()}
        return PackedBatch(**kw)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "targets": self.targets,
                "cls_index": self.cls_index, "cls_labels": self.cls_labels, "cu_seqlens": self.cu_seqlens,
                "max_seqlen": self.max_seqlen}


def collate(examples: list[Encoded], capacity: int) -> PackedBatch:
    """Flatten encoded examples (in the given order) into one packed micro-batch."""
    ids, pos, tgt, cls_idx, labels, seqlens, index = [], [], [], [], [], [0], []
    offset = 0
    for e in examples:
        n = len(e.input_ids)
        ids.extend(e.input_ids)
        pos.extend(range(n))
        tgt.extend(e.targets)
        cls_idx.append(offset + e.cls_pos)
        labels.append(float(e.label))
        index.append(e.index)
        offset += n
        seqlens.append(offset)
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
        cls_index=torch.tensor(cls_idx, dtype=torch.long),
        cls_labels=torch.tensor(labels, dtype=torch.float32),
        cu_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        max_seqlen=max((len(e) for e in examples), default=0),
        example_index=torch.tensor(index, dtype=torch.long),
        n_lm=sum(e.n_lm for e in examples),
        n_tokens=offset,
        capacity=capacity,
    )


class PackedRows:
    """Examples packed into rows, and the deterministic step → micro-batches schedule.

    The row stream is an endless concatenation of seeded permutations of the rows (one per epoch).
    Step ``s`` consumes ``G = micro_batch_size * grad_accum * world_size`` consecutive rows of the
    stream; rank ``r``'s micro-batch ``m`` takes rows ``[s*G + (r*grad_accum + m)*micro : +micro]``.
    So a step sees the same rows whatever the split into micro-batches, accumulation steps and
    ranks (the invariance tests rely on this), and the data position of a run is just its step.
    """

    def __init__(self, encoded: list[Encoded], max_seq_len: int, *, seed: int = 0) -> None:
        if not encoded:
            raise ValueError("no examples to pack")
        self.encoded = encoded
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.rows = pack_ffd([len(e) for e in encoded], max_seq_len)
        self._perms: dict[int, list[int]] = {}

    @property
    def efficiency(self) -> float:
        """Real tokens / (rows * max_seq_len) over the whole packed split."""
        return sum(len(e) for e in self.encoded) / (len(self.rows) * self.max_seq_len)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self._perms[epoch]

    def stream_rows(self, start: int, count: int) -> list[list[int]]:
        out = []
        n = len(self.rows)
        for k in range(start, start + count):
            out.append(self.rows[self._perm(k // n)[k % n]])
        return out

    def micro_batches(self, step: int, *, micro_batch_size: int, grad_accum: int, rank: int = 0,
                      world_size: int = 1) -> list[PackedBatch]:
        """The ``grad_accum`` micro-batches of ``rank`` at optimizer step ``step``."""
        G = micro_batch_size * grad_accum * world_size
        out = []
        for m in range(grad_accum):
            start = step * G + (rank * grad_accum + m) * micro_batch_size
            rows = self.stream_rows(start, micro_batch_size)
            exs = [self.encoded[i] for row in rows for i in row]
            out.append(collate(exs, capacity=micro_batch_size * self.max_seq_len))
        return out


def eval_batches(encoded: list[Encoded], max_tokens: int, *, rank: int = 0, world_size: int = 1) -> list[PackedBatch]:
    """Rank ``rank``'s share of an evaluation split (examples ``i % world_size == rank``), packed
    in order into micro-batches of at most ``max_tokens`` tokens. Every example appears on exactly
    one rank."""
    mine = [e for e in encoded if e.index % world_size == rank]
    batches, cur, used = [], [], 0
    for e in mine:
        if cur and used + len(e) > max_tokens:
            batches.append(collate(cur, capacity=max_tokens))
            cur, used = [], 0
        cur.append(e)
        used += len(e)
    if cur:
        batches.append(collate(cur, capacity=max_tokens))
    return batches
