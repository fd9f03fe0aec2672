"""Container instances: a network namespace plus a cgroup, the isolation the
seed describes for Docker and pods, with the command as PID 1 of its own PID
namespace.

A container of an OCI image (its spec names ``layers``) is a real one: its
own root on an overlay of the image's layers, run by runc from a generated
bundle (``runtime.RuncContainers``). A container of an image that is not
OCI (a record without bytes, a disk image) runs its command on the host's
own file system, in the namespaces below: the older process mode, kept for
what still creates such containers.

Names derive from the server id (``st-<id>`` namespaces, cgroups under
``stratus/<host>/<id>``), so a redelivered event finds what it already made,
and reconcile lists this host's instances from the cgroup tree alone. With a
deployment prefix (``stratus up`` derives one from its data dir) the host's
group is ``stratus/<prefix>.<host>``: two stacks on one machine with hosts
of the same name never list, or remove, each other's instances.
cgroup v1 (``cpu`` and ``memory`` hierarchies) is used where it is mounted,
else the unified v2 hierarchy (``cpu.max``, ``memory.max``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from stratus.agents.compute.driver import ExecResult, PowerState
from stratus.agents.compute.layers import commit
from stratus.agents.compute.runtime import STATE_ROOT, RuncContainers
from stratus.agents.compute.spec import InstanceSpec, check
from stratus.events.errors import HostError
from stratus.events.ids import NAME_RE

DEPLOYMENT_RE = re.compile(r"^[a-z0-9]{0,16}$")

CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
DEFAULT_COMMAND = ["sleep", "infinity"]
CPU_PERIOD_US = 100_000
STOP_TIMEOUT_S = 5.0
EXEC_TIMEOUT_S = 60.0
EXEC_OUTPUT_MAX = 1 << 20


def netns_name(server: str) -> str:
    return f"st-{server}"


def _run(args: list[str], timeout: float = 10) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{args[0]}: {exc}") from None
    if done.returncode != 0:
        raise HostError(f"{' '.join(args[:3])}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _exec_done(pid: int) -> bool:
    """Whether the forked child of unshare has exec'd its command (its
    executable is no longer its parent's)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")
        )
        return os.readlink(f"/proc/{pid}/exe") != os.readlink(f"/proc/{ppid}/exe")
    except (OSError, StopIteration, ValueError):
        return False


class Cgroups:
    """The cgroup directories of one host's instances, v1 or v2."""

    def __init__(self, host: str, root: Path = CGROUP_ROOT, deployment: str = "") -> None:
        if not NAME_RE.match(host):
            raise HostError(f"host name {host!r} is not a valid name")
        if not DEPLOYMENT_RE.match(deployment):
            raise HostError(f"deployment prefix {deployment!r} is not [a-z0-9]{{0,16}}")
        # "." is in no host name: "<prefix>.<host>" is never another host's group.
        group = f"{deployment}.{host}" if deployment else host
        self.group = group
        self.root = root
        self.v1 = (root / "cpu" / "cpu.cfs_quota_us").exists() and (
            root / "memory" / "memory.limit_in_bytes"
        ).exists()
        if self.v1:
            self.bases = [root / "cpu" / "stratus" / group, root / "memory" / "stratus" / group]
        else:
            self.bases = [root / "stratus" / group]
            self._enable_v2(root, group)
        for b in self.bases:
            b.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _enable_v2(root: Path, host: str) -> None:
        # v2 hands controllers down one level at a time.
        d = root
        for part in ("stratus", host):
            with contextlib.suppress(OSError):
                (d / "cgroup.subtree_control").write_text("+cpu +memory")
            d = d / part
            d.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            (d / "cgroup.subtree_control").write_text("+cpu +memory")

    def dirs(self, server: str) -> list[Path]:
        return [b / server for b in self.bases]

    def servers(self) -> set[str]:
        try:
            return {p.name for p in self.bases[0].iterdir() if p.is_dir()}
        except FileNotFoundError:
            return set()  # pruned when it last emptied: nothing of ours here

    def create(self, spec: InstanceSpec) -> list[Path]:
        dirs = self.dirs(spec.server)
        for d in dirs:
            # The host's own group may have been removed when it last emptied.
            d.mkdir(parents=True, exist_ok=True)
        quota = max(1000, int(spec.cpus * CPU_PERIOD_US))
        limit = spec.requested.ram_mb << 20
        if self.v1:
            cpu, mem = dirs
            (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))
            (cpu / "cpu.shares").write_text(str(max(2, int(1024 * spec.cpus))))
            (mem / "memory.limit_in_bytes").write_text(str(limit))
            # With swap on the host, RAM plus swap is capped too, or a hog
            # would page out instead of being stopped at its limit.
            with contextlib.suppress(OSError):
                (mem / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            d = dirs[0]
            (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            (d / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):
                (d / "memory.swap.max").write_text("0")
        return dirs

    def pids(self, server: str) -> list[int]:
        try:
            text = (self.dirs(server)[0] / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def oom_kills(self, server: str) -> int:
        """How many times the memory limit killed a process of the instance."""
        d = self.dirs(server)[-1]
        name = "memory.oom_control" if self.v1 else "memory.events"
        with contextlib.suppress(FileNotFoundError):
            for line in (d / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self, server: str) -> None:
        for d in self.dirs(server):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()

    def prune(self) -> None:
        """Remove this host's (empty) cgroup directories and the shared parent
        if no other host uses it: what an agent leaves when it goes for good."""
        bases = list(self.bases)
        if self.v1:
            # runc makes the group in every hierarchy (pids, freezer, ...).
            with contextlib.suppress(OSError):
                bases += [h / "stratus" / self.group for h in self.root.iterdir()]
        for b in bases:
            for d in (b, b.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()


class ContainerDriver:
    """Container instances of one host (blocking: the agent runs it in a thread)."""

    def __init__(
        self,
        host: str,
        log_dir: Path,
        cgroup_root: Path = CGROUP_ROOT,
        deployment: str = "",
        state_root: Path = STATE_ROOT,
    ) -> None:
        self.host = host
        self.cgroups = Cgroups(host, cgroup_root, deployment)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # One empty file per instance namespace, made before the namespace
        # and removed after it: an agent killed between `ip netns add` and
        # the cgroup (or bundle) would otherwise leave a namespace that no
        # listing shows, so no pass or teardown would ever remove it.
        self.netns_marks = log_dir / "netns"
        self.netns_marks.mkdir(exist_ok=True)
        # Bundles in the host's data dir, runc's state and cgroups under the
        # deployment's group: nothing shared with another stack.
        self.oci = RuncContainers(
            log_dir / "bundles", state_root / self.cgroups.group, f"/stratus/{self.cgroups.group}"
        )

    @property
    def runtime_version(self) -> str:
        return self.oci.version

    def list_owned(self) -> dict[str, PowerState]:
        self._reap()
        owned: dict[str, PowerState] = {
            s: "running" if self.cgroups.pids(s) else "stopped" for s in self.cgroups.servers()
        }
        for s in self.oci.servers():
            owned[s] = "running" if self.oci.running(s) else "stopped"
        for s in self._marked():
            owned.setdefault(s, "stopped")  # a namespace and nothing else yet
        return owned

    def _marked(self) -> list[str]:
        return [p.name for p in self.netns_marks.iterdir() if NAME_RE.match(p.name)]

    def state(self, server: str) -> PowerState | None:
        self._reap()
        if self.oci.owns(server):
            return "running" if self.oci.running(server) else "stopped"
        if not self.cgroups.dirs(server)[0].is_dir():
            return "stopped" if (self.netns_marks / server).exists() else None
        return "running" if self.cgroups.pids(server) else "stopped"

    def _reap(self) -> None:
        for server, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[server]

    def ensure(self, spec: InstanceSpec, running: bool = True) -> None:
        check(spec)
        ns = netns_name(spec.server)
        # An OCI container's bundle config first: a bad spec makes nothing.
        config = self.oci.config(spec, NETNS_DIR / ns) if spec.layers else None
        if not (NETNS_DIR / ns).exists():
            (self.netns_marks / spec.server).touch()
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if config is not None:
            self.oci.ensure(spec, config, running, self.log_dir / f"{spec.server}.log")
            return
        dirs = self.cgroups.create(spec)
        if not running or self.cgroups.pids(spec.server):
            return
        command = list(spec.command) or DEFAULT_COMMAND
        enter = [sys.executable, "-m", "stratus.agents.compute.enter"]
        for d in dirs:
            enter += ["--cgroup", str(d)]
        args = [
            *enter,
            "--",
            "nsenter",
            f"--net={NETNS_DIR / ns}",
            "--",
            # PID 1 of a new PID namespace, with its own /proc; --kill-child:
            # the instance dies with its unshare parent, never orphaned.
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
            *command,
        ]
        log = open(self.log_dir / f"{spec.server}.log", "ab")
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the agent's signals are not the instance's
            )
        except OSError as exc:
            raise HostError(f"cannot start the container: {exc}") from None
        finally:
            log.close()
        self._procs[spec.server] = proc
        # Running means its PID 1 runs the command: until that exec, the
        # child of unshare is still mounting the namespace's own /proc, and
        # an exec entering it then would see the host's.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid = self.init_pid(spec.server)
            if pid is not None and _exec_done(pid):
                return
            if proc.poll() is not None:
                tail = self.console(spec.server)[-500:]
                raise HostError(f"container exited at start ({proc.returncode}): {tail}")
            time.sleep(0.01)
        raise HostError("container did not start within 5s")

    def console(self, server: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.log_dir / f"{server}.log").read_text(errors="replace")
        return ""

    def init_pid(self, server: str) -> int | None:
        """The host PID of the instance's PID 1 (its own namespace's init)."""
        for pid in self.cgroups.pids(server):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if len(ids) > 1 and ids[-1] == "1":
                        return pid
        return None

    def stop(self, server: str) -> None:
        if self.oci.owns(server):
            self.oci.stop(server)
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            pids = self.cgroups.pids(server)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        else:
            raise HostError(f"processes of {server} survived SIGKILL for {STOP_TIMEOUT_S}s")
        proc = self._procs.pop(server, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)

    def start(self, spec: InstanceSpec) -> None:
        self.ensure(spec, running=True)

    def reboot(self, spec: InstanceSpec) -> None:
        self.stop(spec.server)
        self.ensure(spec, running=True)

    def remove(self, server: str) -> None:
        if self.oci.owns(server):
            self.oci.remove(server)
        self.stop(server)
        self.cgroups.remove(server)
        ns = netns_name(server)
        if (NETNS_DIR / ns).exists():
            _run(["ip", "netns", "delete", ns])
        (self.netns_marks / server).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.log_dir / f"{server}.log").unlink()

    def exec(self, server: str, command: list[str], timeout: float = EXEC_TIMEOUT_S) -> ExecResult:
        """Run ``command`` inside the instance (its namespaces and cgroup)."""
        if not command or any("\0" in a for a in command):
            raise HostError("exec needs a command without NUL bytes")
        if self.oci.owns(server):
            return self.oci.exec(server, command, timeout)
        pid = self.init_pid(server)
        if pid is None:
            raise HostError(f"server {server} is not running on {self.host}")
        args = [sys.executable, "-m", "stratus.agents.compute.enter"]
        for d in self.cgroups.dirs(server):
            args += ["--cgroup", str(d)]
        args += ["--", "nsenter", "-t", str(pid), "-n", "-p", "-m", "--", *command]
        try:
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return ExecResult(124, "", f"timed out after {timeout}s")
        return ExecResult(
            done.returncode,
            done.stdout[:EXEC_OUTPUT_MAX].decode(errors="replace"),
            done.stderr[:EXEC_OUTPUT_MAX].decode(errors="replace"),
        )

    def volumes(self, server: str) -> list[str]:
        return []

    def attach(self, spec: InstanceSpec, volume: str, path: str) -> None:
        raise HostError("volumes attach to VM instances only")

    def detach(self, spec: InstanceSpec, path: str) -> None:
        return None

    @contextlib.contextmanager
    def paused(self, server: str) -> Iterator[None]:
        """An OCI container frozen (its upper dir still while it is read)."""
        if not self.oci.owns(server):
            raise HostError("only containers of OCI images can be snapshotted")
        frozen = self.oci.running(server)
        if frozen:
            self.oci.runc.call("pause", server)
        try:
            yield
        finally:
            if frozen:
                self.oci.runc.call("resume", server)

    def commit(self, server: str, out: Path) -> tuple[str, int]:
        """An OCI container's writes (its upper directory) as a layer tar at
        ``out``, taken while it is frozen; the layer's digest and size."""
        if not self.oci.owns(server):
            raise HostError(f"{server} is not a container of an OCI image")
        with self.paused(server):
            return commit(self.oci.upper(server), out)

    def close(self) -> None:
        if not self.list_owned():
            # Nothing left running here: leave no empty cgroup directories.
            self.cgroups.prune()
            self.oci.close()
