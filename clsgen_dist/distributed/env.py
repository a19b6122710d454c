"""Process-group helpers that work the same under ``deepspeed``, ``torchrun``, SLURM and plain
``python`` (a world of one). CPU runs use gloo; CUDA runs use nccl."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The number of ranks the launcher started, readable before the process group exists
    (``WORLD_SIZE``; under srun without torchrun, ``SLURM_NTASKS``)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def launched_rank() -> int:
    """This process's rank, readable before the process group exists (``RANK`` or ``SLURM_PROCID``)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


SOLO_MARK = "CLSGEN_SOLO"  # "<pid>:<port>" beside the variables a plain `python` run makes up


def _inherited_solo_world() -> bool:
    """Whether RANK, WORLD_SIZE and MASTER_PORT are those another process made up for its own world
    of one (see :func:`init_distributed`), rather than this process's or a launcher's."""
    pid, _, port = os.environ.get(SOLO_MARK, "").partition(":")
    return (bool(pid) and pid != str(os.getpid()) and os.environ.get("MASTER_PORT") == port
            and os.environ.get("WORLD_SIZE") == "1")


def init_distributed() -> torch.device:
    """Initialise the default process group once (idempotent) and return this rank's device.

    A plain ``python`` run makes up the variables of a world of one (a free port included) and marks
    them with its pid and port. A process it starts (``compare`` running ``launch/eval.py``, a
    notebook or test runner that trained in-process, then starts a run) inherits them, but is no
    rank of that world and the port is still held: it drops them and makes up its own. A launcher's
    variables (its own port) are left alone."""
    if _inherited_solo_world():
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            os.environ.pop(k, None)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        # srun without torchrun: translate SLURM's variables.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ[SOLO_MARK] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        # every process (a rank waiting on a stale lock would otherwise go on to import an op that
        # another rank is still building); the first of each host reports
        with _watching_build_locks(report=local_rank == 0):
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       verbose=False)
        if device.type == "cpu":
            _unlink_shm_allreduce_buffer()
    return device


STALE_BUILD_LOCK_S = 600  # a JIT build of a DeepSpeed op takes 1-3 minutes; CLSGEN_STALE_BUILD_LOCK_S overrides
_QUIET_BUILD_LOCK_S = 60  # a younger lock is a build in progress, often a sibling rank's: not worth a warning


def _stale_after() -> float:
    return float(os.environ.get("CLSGEN_STALE_BUILD_LOCK_S") or STALE_BUILD_LOCK_S)


def clear_stale_build_locks(max_age_s: float | None = None, *, report: bool = True,
                            report_waiting: bool = True) -> list[Path]:
    """Remove the build locks of torch's JIT extensions (DeepSpeed's ops: the CPU shared-memory
    all-reduce that every CPU run loads, CPU Adam, FusedAdam) that an interrupted build left, and
    return them. A process killed while it builds (Ctrl-C, a time limit, an OOM kill on the first
    launch) leaves ``<extensions dir>/<op>/lock`` behind, and torch makes every later launch wait on
    it forever, silently.

    A lock counts as left over when neither it nor any file of its build folder (a live build
    writes its object files there) has changed for ``max_age_s`` (default 600 s, or
    ``$CLSGEN_STALE_BUILD_LOCK_S``). It is moved aside atomically and its age checked again, so a
    lock another process takes meanwhile is put back, never deleted. A younger lock is a build in
    progress: named in a warning (``report_waiting``) once it is a minute old, so that a run that
    seems to hang says why. ``report``: log at all (the first process of each host does). Any
    other error (a read-only shared folder) is a warning, not a failed launch."""
    log = logging.getLogger("clsgen_dist.distributed")
    max_age_s = _stale_after() if max_age_s is None else max_age_s
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    removed = []
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:  # (the default root has a py3X_ level)
        try:
            now = time.time()
            age = now - max([lock.stat().st_mtime] + [f.stat().st_mtime for f in lock.parent.iterdir()])
            if age <= max_age_s:
                if report and report_waiting and age > _QUIET_BUILD_LOCK_S:
                    log.warning("%s: a build of %s has been running for %.0f s, and this run waits for it (if no "
                                "process is building it, delete that file)", lock, lock.parent.name, age)
                continue
            aside = lock.with_name(f"lock.stale.{os.getpid()}.{time.monotonic_ns()}")
            os.rename(lock, aside)  # whichever lock file is there now: ours to judge
            if time.time() - aside.stat().st_mtime <= max_age_s:  # taken afresh since the check: give it back
                try:
                    os.link(aside, lock)
                except FileExistsError:  # (and yet another one was taken since: that one stays)
                    pass
                aside.unlink()
                continue
            aside.unlink()
            removed.append(lock)
            if report:
                log.warning("removed %s, left %.0f min ago by a build of %s that was interrupted (it would make "
                            "this run wait forever)", lock, age / 60, lock.parent.name)
        except FileNotFoundError:  # released, or moved aside by another process, meanwhile
            continue
        except OSError as e:
            if report:
                log.warning("could not check the build lock %s (%s); if this run waits forever, delete that file",
                            lock, e)
    return removed


@contextmanager
def _watching_build_locks(report: bool, every_s: float = 30.0):
    """:func:`clear_stale_build_locks` now and then every ``every_s`` seconds while the block runs
    (DeepSpeed loads its ops there): a lock that turns stale while this run waits on it is removed
    then, not only one found stale at the start. The run then goes on, or, where the interrupted
    build left no library to load, fails at its import (with the warning saying why) instead of
    waiting forever; the next launch builds it."""
    clear_stale_build_locks(report=report)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            clear_stale_build_locks(report=report, report_waiting=False)

    threading.Thread(target=watch, name="clsgen-build-lock-watch", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce segment.

    On CPU, with every rank on one host (the ``deepspeed`` launcher sets ``LOCAL_SIZE``), DeepSpeed
    creates a 66 MiB ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and
    maps every peer's during ``init_distributed``, but never unlinks it: each run leaks RAM until
    reboot (19 GB of this machine's 24 after a day of test runs), and a later run on the same port
    reopens a stale segment. Once every rank is past initialisation (the barrier), all mappings
    exist, so the names can go; the memory is released when the last process exits.
    """
    if world_size() > 1:
        dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(name)
    except (FileNotFoundError, AttributeError):  # no segment (one process, another launcher), or no getuid
        pass


def shutdown_distributed() -> None:
    """Leave the process group together, as the last step of a successful run: a rank that exits
    while gloo still carries another rank's last collective can abort in the communication
    thread's destructor ("terminate called without an active exception", exit -6; seen in about one
    run in five of a 2-rank ZeRO-3 script that ended on a collective)."""
    if dist.is_initialized():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a sync point); returns ``t``."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(n_local: int, device: torch.device | str) -> int:
    """The largest ``n_local`` over ranks: how many collective forwards every rank must run so that
    ZeRO-3's parameter gathers line up when ranks hold different amounts of work."""
    if not (dist.is_initialized() and world_size() > 1):
        return n_local
    t = torch.tensor([n_local], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_ranks_done(local_done: bool, device: torch.device | str) -> bool:
    """Whether every rank is done (``local_done`` on all of them): lock-stepped ranks (ZeRO-3, where
    every forward is collective) keep stepping until then. Collective: every rank calls it."""
    t = torch.tensor([0.0 if local_done else 1.0], device=device)
    return all_reduce_sum(t).item() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
