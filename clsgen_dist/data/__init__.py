"""Data: reading, prompts, packing. Construction of teacher explanations lives in ``construct``."""

from .packing import PackedBatch, PackedRows, collate, eval_batches, pack_ffd
from .prompts import IGNORE, Encoded, PromptEncoder
from .reading import DataError, Example, read_examples

__all__ = ["PackedBatch", "PackedRows", "collate", "eval_batches", "pack_ffd", "IGNORE", "Encoded",
           "PromptEncoder", "DataError", "Example", "read_examples"]
