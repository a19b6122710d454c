"""Rank helpers and DeepSpeed engine setup."""

from .env import (all_gather_objects, all_ranks_done, all_reduce_sum, barrier, broadcast_object, init_distributed,
                  is_main, max_over_ranks, rank, shutdown_distributed, world_size)

__all__ = ["all_gather_objects", "all_ranks_done", "all_reduce_sum", "barrier", "broadcast_object", "init_distributed",
           "is_main", "max_over_ranks", "rank", "shutdown_distributed", "world_size"]
