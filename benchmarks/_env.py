"""What every benchmark records next to its figures: the machine, package versions, the git SHA."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def versions(*dists: str) -> dict:
    """Python's version and each distribution's installed version (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for d in dists:
        try:
            out[d.replace("-", "_")] = version(d)
        except PackageNotFoundError:
            out[d.replace("-", "_")] = None
    return out


def machine(device: str = "cpu") -> str:
    """The GPU's name on CUDA, else the CPU model and core count."""
    if device == "cuda":
        import torch

        try:
            return f"{torch.cuda.get_device_name(0)} ({platform.machine()})"
        except (RuntimeError, AssertionError) as e:
            return f"no usable CUDA device ({type(e).__name__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def git_sha() -> str:
    """Short HEAD SHA, ``+dirty`` with uncommitted changes; ``uncommitted`` outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "uncommitted"
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
