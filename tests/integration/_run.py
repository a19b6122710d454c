"""Running the launch scripts as users do: in fresh processes, under python / deepspeed / torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = Path(PY).parent


def main_error(capsys, main, *args) -> str:
    """Run a CLI entry point in this process that must fail as a user error (exit 2, no
    traceback); its stderr."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "clsgen_dist" / "torch_extensions"))
    return env


def launch(script: str, args: list[str], *, launcher: str = "python", nproc: int = 1, timeout: int = 600,
           check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``launch/<script>`` as users do; ``env``: variables added to :func:`clean_env` (e.g. a
    ``CLSGEN_FAULT``); ``check``: fail with the output unless it exits 0."""
    path = str(REPO / "launch" / script)
    if launcher == "python":
        cmd = [PY, path]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), path]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), path]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd + args, cwd=REPO, env=clean_env() | (env or {}), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
