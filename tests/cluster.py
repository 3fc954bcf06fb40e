"""A real two-node SLURM cluster and a real sshd on this machine, for the launcher tests (run as root, as CI does).

SLURM: Debian's slurm-wlm (22.05) with munge. One slurmctld and two ``slurmd -N``: nodes n1 and n2 on 127.0.0.1,
each on its own port, in a configuration of their own under a temporary directory (no cgroups, no systemd;
the configuration is written below). ssh: an ``sshd`` on a free port with a host key and a user key made
for the test, and an ssh client configuration that points pdsh's ssh at it.

``.ci/run`` installs the packages (``slurm-wlm munge openssh-server pdsh``). Where they are missing and ``CI`` is
not set, the tests that need them are skipped with the command that installs them; under CI they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sacct", "munged")
SSH_BINARIES = ("sshd", "ssh", "ssh-keygen", "pdsh")
NODES = ("n1", "n2")


def require(binaries: tuple[str, ...], packages: str) -> None:
    missing = [b for b in binaries if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if not missing and os.geteuid() == 0:
        return
    why = f"missing {', '.join(missing)}" if missing else "not root"
    message = f"{why}: as root, `apt-get install -y {packages}` (as .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        if s.getsockname()[1] < 40000 or s.getsockname()[1] > 60000:
            continue
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not after {timeout} s\n{tail}")
        time.sleep(0.2)


def ensure_hosts(names: tuple[str, ...]) -> None:
    """The node names must resolve (slurmd -N looks its own name up); append them to /etc/hosts once."""
    text = Path("/etc/hosts").read_text()
    known = {n for line in text.splitlines() if not line.lstrip().startswith("#") for n in line.split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}\n")


def ensure_munge() -> None:
    ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, check=False).returncode == 0
    if ok:
        return
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([sbin("mungekey"), "--create"], check=True)  # Debian's postinst usually made one
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", f"{sbin('munged')} --force"], check=True)
    wait_for("munged answering", lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True,
                                                        check=False).returncode == 0, 20)


SLURM_CONF = """\
ClusterName=loop
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2,batch_sched_delay=0
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class Slurm:
    """slurmctld and two slurmd, started in ``root``; ``env`` is what a user's shell on the cluster has."""

    def __init__(self, root: Path):
        self.root = root
        for d in ("state", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, n1_port, n2_port = free_ports(3)
        self.conf = root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()

    def start(self) -> "Slurm":
        ensure_hosts(NODES)
        ensure_munge()
        self._daemon([sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        wait_for("slurmctld answering", lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30,
                 self.root / "log" / "slurmctld.log")
        for node in NODES:
            self._daemon([sbin("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}")
        wait_for("both nodes idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
                 == ["n1", "idle", "n2", "idle"], 60, self.root / "log" / "slurmctld.log")
        return self

    def _daemon(self, cmd: list[str], name: str) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as out:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def release_requeued(self, after: float = 5.0) -> None:
        """SLURM holds a requeued job for 120 s (its BeginTime) before it may start again. From now on, a thread
        lets each one start ``after`` seconds into that hold, as an administrator may (``scontrol update JobId=N
        StartTime=now``). Not at once: a job started in the second of its requeue finds its new credential revoked
        with the old one ("Killing non-startable batch job: Job credential revoked") and fails."""
        def loop():
            held_since: dict[str, float] = {}
            while not self._stopping.wait(0.5):
                pending = self.run("squeue", "-h", "-t", "PD", "-o", "%i %r", check=False).stdout.split("\n")
                for job_id, _, reason in (line.partition(" ") for line in pending if line.strip()):
                    if reason.strip() != "BeginTime":
                        continue
                    since = held_since.setdefault(job_id, time.monotonic())
                    if time.monotonic() - since >= after:
                        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                        del held_since[job_id]

        threading.Thread(target=loop, name="slurm-release", daemon=True).start()

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once SLURM has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            key, eq, value = token.partition("=")
            if eq:
                fields[key] = value
        return fields

    def stop(self) -> None:
        self._stopping.set()
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class Sshd:
    """An sshd on a free port of 127.0.0.1 that lets root in with a key made for the test, and two host names for
    this machine (``HOSTS``, as two nodes of a hostfile) that ssh, pdsh's ssh and DeepSpeed's ssh check reach it
    by: a file in /etc/ssh/ssh_config.d (which Debian's ssh_config includes) that names only them, removed again by
    ``stop``. The user's own ~/.ssh is never touched."""

    HOSTS = ("lp-node1", "lp-node2")

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
        keys = root / "authorized_keys"
        shutil.copy(root / "user_key.pub", keys)
        keys.chmod(0o600)
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {keys}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        self.client_conf = Path(f"/etc/ssh/ssh_config.d/loraplus-tests-{self.port}.conf")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sshd":
        self.client_conf.write_text(
            f"Host {' '.join(self.HOSTS)}\n  HostName 127.0.0.1\n  Port {self.port}\n"
            f"  IdentityFile {self.root / 'user_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        with open(self.root / "sshd.log", "w") as out:
            self.proc = subprocess.Popen([sbin("sshd"), "-D", "-e", "-f", str(self.root / "sshd_config")],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for("sshd letting the test key in", lambda: subprocess.run(
            ["ssh", self.HOSTS[1], "true"], capture_output=True, check=False, timeout=20).returncode == 0,
            30, self.root / "sshd.log")
        return self

    def stop(self) -> None:
        self.client_conf.unlink(missing_ok=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
