"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd started directly.

No systemd, no root-wide state: everything (munge key and socket, slurm.conf, gres.conf, state,
spool, logs) lives in one private temporary directory and the daemons listen on free ports, so
two test sessions on the same machine run two independent clusters.

Process tree and zombies. PID 1 on these machines does not reap orphans, and slurmd detaches
every slurmstepd (one per job step), so without care each finished job leaves zombies behind.
`start_cluster` therefore runs the daemons under a small supervisor (this file run as a script,
`supervise SPEC`) that marks itself a child subreaper: every orphan of the tree (slurmstepd,
job tasks) is re-parented to it and reaped; on SIGTERM it kills the whole tree and reaps it
before exiting. The daemons run in the foreground (`-D`, munged `-F`) so they are its children.

The cluster:
* NodeName = `hostname -s` (slurmd refuses other names without -N), RealMemory = 90% of
  MemTotal, 8 fake GPUs (GRES `gpu:8` over /dev/tty[0-7]) and CPUs = max(nproc, 8), i.e. at
  least one per fake GPU: the shape of a GPU node, so a one-task-per-GPU job (the 128K recipe's
  8 tasks per node) is schedulable. `--overcommit` is no way around it: cons_tres rejects
  --ntasks-per-node=8 or --gpus-per-node=8 beyond the CPU count even then. Tests keep the
  real load low themselves. SlurmdParameters=config_overrides makes slurmd accept the
  configured hardware instead of draining the node for "missing" CPUs and GPUs.
* select/cons_tres (needed for --gpus-per-node), proctrack/linuxproc + task/none (no cgroups
  here), no accounting (so no sacct: job states come from `scontrol show job`),
  EnforcePartLimits=ALL (an impossible request fails at submit instead of pending forever).
* SlurmUser=root (jobs run as root here), KillWait=2, short daemon timeouts, MinJobAge=600 so
  finished jobs stay visible to `scontrol show job` for a whole test session.
* Latency: batch_sched_delay=0 and sched_interval=2 start a job within ~1 s of submission
  (defaults: 3 s, and up to 60 s for a requeued job); cred_expire=5 lets a requeued job start
  again after ~6 s (default 120 s: a requeued job waits for its old credential to expire).

The module only uses the standard library; `tests/slurm/conftest.py` wraps it in a
session fixture. It can also be used by hand:

    python tests/slurm/cluster.py up     # prints SLURM_CONF=...; Ctrl-C tears it down
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
DAEMON_NAMES = {"munged", "slurmctld", "slurmd", "slurmstepd", "srun", "sbatch"}
# Job states after which a job (or array task) will not run again (squeue/scontrol names).
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}
PR_SET_CHILD_SUBREAPER = 36
MIN_CPUS = 8  # one per fake GPU (see the module docstring)


class ClusterError(RuntimeError):
    """The cluster could not be started (the message includes the daemon logs' tails)."""


class CommandError(subprocess.CalledProcessError):
    """A SLURM client command failed; unlike its base class, the message includes stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


def which(name: str) -> str | None:
    """Path of a SLURM/munge binary, also looking in sbin directories missing from PATH."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


def try_apt_install(timeout: float = 300) -> str:
    """apt-get install the SLURM packages when root with apt; returns a log line."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get: cannot install " + " ".join(APT_PACKAGES)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{shlex.join(cmd)} failed: {err}"
    if proc.returncode != 0:
        return f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    return f"{shlex.join(cmd)}: ok"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mem_total_mib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without SLURM variables of an enclosing job (they would steer sbatch and
    srun towards that job instead of our cluster)."""
    base = dict(os.environ if base is None else base)
    return {k: v for k, v in base.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}


def render_slurm_conf(root: Path, node: str, cpus: int, real_memory_mib: int, ctld_port: int,
                      slurmd_port: int, munge_socket: Path, first_job_id: int) -> str:
    """slurm.conf for the one-node cluster (see the module docstring for each choice)."""
    return f"""\
# Generated by tests/slurm/cluster.py: a private one-node test cluster.
ClusterName=longctx-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Job ids differ between concurrent test clusters (trainers derive ports from them).
FirstJobId={first_job_id}
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
# Schedule batch jobs at submission (default delay 3 s) and every 2 s (default 60 s: a
# requeued job becomes eligible without any event that triggers scheduling).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=2
WaitTime=0
MinJobAge=600
JobRequeue=1
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mib} Gres=gpu:8 \
State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


GRES_CONF = ("# 8 fake GPUs: device files that exist on any Linux machine.\n"
             "Name=gpu File=/dev/tty[0-7]\n")


@dataclass
class SlurmCluster:
    """A running cluster; `env` is the environment for SLURM clients (SLURM_CONF set)."""

    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    supervisor: subprocess.Popen | None = None
    zombies_before: set[int] = field(default_factory=set)

    # ---- clients ----------------------------------------------------------------------------
    def run(self, args: list[str], check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster, capturing text output."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run([which(args[0]) or args[0], *args[1:]], capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, args, proc.stdout, proc.stderr)
        return proc

    def sbatch(self, args: list[str], wait: bool = True, timeout: float = 300,
               cwd: str | Path | None = None, env: dict[str, str] | None = None,
               ) -> tuple[int, int]:
        """Submit a batch job; returns (job_id, returncode).

        wait=True: returncode is the job's exit code once it (and all its array tasks) reached
        a terminal state (the highest one over array tasks, as `sbatch --wait` reports), or
        1 for a failure without exit code. We poll `scontrol show job` every 0.3 s instead of
        using `sbatch --wait`, which polls at 2, 10, 42, 74... s and would make every test
        slower by tens of seconds. wait=False: returncode is sbatch's own (0 = submitted).
        A submission rejected by the controller raises CalledProcessError.
        """
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env,
                        timeout=60)
        job_id = int(proc.stdout.strip().split(";")[0])
        if not wait:
            return job_id, proc.returncode
        records = self.wait_job(job_id, timeout=timeout)
        return job_id, max(_exit_code(r) for r in records)

    def job_records(self, job_id: int | str) -> list[dict[str, str]]:
        """`scontrol show job -o ID` parsed: one dict per job (an array gives one per task)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return []
        return [_parse_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def job_state(self, job_id: int | str) -> str:
        """JobState of a job ('' if unknown); for an array, its tasks' states joined by ','
        (one value when all agree), e.g. 'COMPLETED' or 'COMPLETED,RUNNING'."""
        states = sorted({r.get("JobState", "") for r in self.job_records(job_id)})
        return ",".join(states)

    def wait_job(self, job_id: int | str, timeout: float = 300,
                 poll: float = 0.3) -> list[dict[str, str]]:
        """Wait until the job (every array task) is in a terminal state; returns the records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.job_records(job_id)
            if records and all(_terminal(r) for r in records):
                return records
            if time.monotonic() > deadline:
                states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
            time.sleep(poll)

    def wait_state(self, job_id: int | str, states: set[str], timeout: float = 120,
                   poll: float = 0.2) -> dict[str, str]:
        """Wait until a (non-array) job is in one of `states`; returns its record."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.job_records(job_id)
            if records and records[0].get("JobState") in states:
                return records[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: "
                                   f"{[r.get('JobState') for r in records]}")
            time.sleep(poll)

    def node_state(self) -> str:
        proc = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False)
        return proc.stdout.strip()

    # ---- lifecycle ----------------------------------------------------------------------------
    def new_zombies(self) -> list[str]:
        """Zombie SLURM/munge processes left to PID 1 since this cluster started."""
        return [f"{pid} {comm}" for pid, ppid, comm in _zombies()
                if ppid == 1 and pid not in self.zombies_before and comm in DAEMON_NAMES]

    def stop(self, timeout: float = 30) -> None:
        """Kill daemons and every job process, reap them (the supervisor does both)."""
        sup, self.supervisor = self.supervisor, None
        if sup is None:
            return
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)  # its own session: only our tree
                sup.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "supervisor.log"):
            path = self.root / "log" / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)


def _parse_record(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for match in re.finditer(r"(\w+(?::\w+)?)=(\S*)", line):
        out.setdefault(match.group(1), match.group(2))
    return out


def _terminal(record: dict[str, str]) -> bool:
    return record.get("JobState", "") in TERMINAL_STATES


def _exit_code(record: dict[str, str]) -> int:
    """The batch script's exit status from ExitCode=rc:signal; 128+signal when killed."""
    code, _, sig = record.get("ExitCode", "0:0").partition(":")
    if int(code or 0):
        return int(code)
    if int(sig or 0):
        return 128 + int(sig)
    return 0 if record.get("JobState") == "COMPLETED" else 1


def _zombies() -> list[tuple[int, int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            out.append((int(entry), int(fields[1]), comm))
    return out


# ---- start ---------------------------------------------------------------------------------------
def start_cluster(root: str | Path | None = None, start_timeout: float = 60,
                  cpus: int | None = None) -> SlurmCluster:
    """Write the configuration, start munged/slurmctld/slurmd under the supervisor and wait
    until the node is idle. Raises ClusterError (with log tails) on failure.

    Args:
        root: directory for everything (default: a new /tmp/longctx-slurm-* directory).
        start_timeout: seconds until the node must be idle.
        cpus: CPUs the node advertises (default max(nproc, MIN_CPUS)).
    """
    missing = missing_binaries()
    if missing:
        raise ClusterError(f"missing binaries: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (munged as user munge, SlurmUser=root)")
    try:
        munge_user = pwd.getpwnam("munge")
    except KeyError as err:
        raise ClusterError("no 'munge' user (is the munge package installed?)") from err

    root = Path(tempfile.mkdtemp(prefix="longctx-slurm-") if root is None else root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged (user munge) must traverse it to its own directory
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir(exist_ok=True)
    # munge: private key, socket, pid, seed and log, all owned by munge (munged checks that
    # nobody else can write there). The key is fresh random bytes (munge needs >= 32).
    munge_dir = root / "munge"
    munge_dir.mkdir(exist_ok=True)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    for path, mode in ((munge_dir, 0o755), (key, 0o400)):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(path, mode)
    munge_socket = munge_dir / "munge.socket.2"

    node = socket.gethostname().split(".")[0]
    cpus = cpus or max(os.cpu_count() or 1, MIN_CPUS)
    ctld_port, slurmd_port = free_port(), free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    conf = root / "slurm.conf"
    conf.write_text(render_slurm_conf(
        root, node, cpus, max(256, int(mem_total_mib() * 0.9)), ctld_port, slurmd_port,
        munge_socket, first_job_id=random.randrange(1, 900) * 1000))
    (root / "gres.conf").write_text(GRES_CONF)

    daemons = [
        {"name": "munged", "user": "munge",
         "argv": [which("munged"), "-F", "--socket", str(munge_socket),
                  "--key-file", str(key), "--pid-file", str(munge_dir / "munged.pid"),
                  "--seed-file", str(munge_dir / "munged.seed"),
                  "--log-file", str(munge_dir / "munged.log"), "--num-threads", "2"],
         "ready_path": str(munge_socket)},
        {"name": "slurmctld", "argv": [which("slurmctld"), "-D", "-i", "-f", str(conf)],
         "ready_port": ctld_port},
        {"name": "slurmd", "argv": [which("slurmd"), "-D", "-f", str(conf)],
         "ready_port": slurmd_port},
    ]
    spec = {"daemons": daemons, "log_dir": str(root / "log"), "ready_file": str(root / "ready"),
            "timeout": start_timeout}
    (root / "supervisor.json").write_text(json.dumps(spec, indent=1))
    env = clean_env()
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN_DIRS])
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env,
                           zombies_before={pid for pid, _, _ in _zombies()})
    with open(root / "log" / "supervisor.log", "ab") as log:
        cluster.supervisor = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "supervise",
             str(root / "supervisor.json")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env)
    deadline = time.monotonic() + start_timeout
    try:
        while not (root / "ready").exists():
            if cluster.supervisor.poll() is not None:
                raise ClusterError("daemons did not start")
            if time.monotonic() > deadline:
                raise ClusterError(f"daemons not ready after {start_timeout:.0f} s")
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            state = cluster.node_state()
            if state == "idle":
                return cluster
            time.sleep(0.2)
        raise ClusterError(f"node {node} is {state!r}, not idle after {start_timeout:.0f} s")
    except ClusterError as err:
        tail = cluster.log_tail()
        cluster.stop()
        raise ClusterError(f"{err}\n{tail}") from None


# ---- supervisor (runs as its own process) ------------------------------------------------------
def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def _reap() -> dict[int, int]:
    """Reap every exited child (ours and adopted orphans): {pid: wait status}."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def _ready(daemon: dict) -> bool:
    if "ready_path" in daemon:
        return os.path.exists(daemon["ready_path"])
    try:
        with socket.create_connection(("127.0.0.1", daemon["ready_port"]), timeout=0.5):
            return True
    except OSError:
        return False


def supervise(spec_path: str) -> int:
    """Start the daemons in order, reap the whole tree, tear it down on SIGTERM/SIGINT."""
    spec = json.loads(Path(spec_path).read_text())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    pids: dict[int, str] = {}
    deadline = time.monotonic() + spec["timeout"]
    for daemon in spec["daemons"]:
        user = daemon.get("user")
        log = open(Path(spec["log_dir"]) / f"{daemon['name']}.out", "ab")  # noqa: SIM115
        proc = subprocess.Popen(daemon["argv"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, user=user, group=user,
                                extra_groups=[] if user else None)
        log.close()
        pids[proc.pid] = daemon["name"]
        print(f"started {daemon['name']} pid {proc.pid}: {shlex.join(daemon['argv'])}",
              flush=True)
        while not _ready(daemon):
            exited = _reap()
            if proc.pid in exited or stopping or time.monotonic() > deadline:
                why = (f"exited with status {exited[proc.pid]}" if proc.pid in exited
                       else "stopped" if stopping else "not ready in time")
                print(f"{daemon['name']} {why}", flush=True)
                _teardown(pids)
                return 1
            time.sleep(0.05)
    Path(spec["ready_file"]).write_text(json.dumps({n: p for p, n in pids.items()}))
    print("ready", flush=True)
    parent = os.getppid()
    while not stopping:
        if os.getppid() != parent:  # the test process died without stopping us
            print("parent exited: tearing down", flush=True)
            break
        for pid, status in _reap().items():
            if pid in pids:
                print(f"{pids.pop(pid)} (pid {pid}) exited: status {status}", flush=True)
        time.sleep(0.2)
    _teardown(pids)
    return 0


def _teardown(pids: dict[int, str], grace: float = 5.0) -> None:
    """SIGTERM the daemons (slurmd first), then SIGKILL whatever of the tree is left (job
    steps, tasks: all re-parented to us) until nothing is left to reap."""
    order = ["slurmd", "slurmctld", "munged"]
    for pid in sorted(pids, key=lambda p: order.index(pids[p])):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    me = os.getpid()
    while True:
        _reap()
        children = _children_of(me)
        if not children:
            break
        if time.monotonic() > deadline:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    print("stopped; all children reaped", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "supervise":
        return supervise(argv[1])
    if argv == ["up"]:
        def interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        cluster = start_cluster()
        print(f"export SLURM_CONF={cluster.conf}\n(node {cluster.node} idle; Ctrl-C stops it)")
        try:
            while cluster.supervisor is not None and cluster.supervisor.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
