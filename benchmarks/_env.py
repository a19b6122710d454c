"""What every benchmark records next to its figures (the machine, package versions, the git SHA),
and the runner of one measurement in a fresh subprocess."""

from __future__ import annotations

import os
import platform
import json
import shlex
import subprocess
import sys
import threading
import time
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
    """Short HEAD SHA, ``+dirty`` with uncommitted changes other than the benchmarks' own results
    (``benchmarks/*.jsonl``, ``*.md``: a second run after a first one has written them is still the
    committed code); ``uncommitted`` outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/*.jsonl",
                                ":!benchmarks/*.md"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "uncommitted"
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"


def command_line() -> str:
    """This process's command line as it would be typed from the repo root (``python benchmarks/x.py --flag``)."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def command_note(rec: dict) -> str:
    """``Command: `…`.`` for a record that kept its command line (older records did not)."""
    return f" Command: `{rec['command']}`." if rec.get("command") else ""


def record(jsonl: Path, rec: dict) -> None:
    """Print one result record and append it to the results file ``jsonl``."""
    print(json.dumps(rec), flush=True)
    with jsonl.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def read_records(jsonl: Path) -> list[dict]:
    """Every record of the results file ``jsonl`` (none before the first run)."""
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() else []


def print_this_run(md: Path, date: str) -> None:
    """Print the sections of the rendered table ``md`` whose heading carries this run's ``date``."""
    sections = md.read_text().split("\n## ")
    print("\n".join("## " + s for s in sections[1:] if date in s.split("\n", 1)[0]))


def run_worker(cmd: list[str], *, timeout: float, env: dict | None = None) -> dict:
    """Run a worker process that prints its result as one ``RESULT {json}`` line; returns that dict
    (+ ``wall_s``), or ``{"status": ...}`` saying why there is none (timeout, crash: its last line)."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = round(time.time() - t0, 1)
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"error (rc={p.returncode}): {tail[0][:200]}"}


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``RssAnon``: anonymous resident memory); 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Peak of this process's anonymous resident memory (``RssAnon``, KiB) over a block, sampled in
    a thread every ``every_s`` seconds and at both ends."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(self.every_s)

    def __enter__(self):
        self.peak = status_kib("RssAnon")
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status_kib("RssAnon"))
