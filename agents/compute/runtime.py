"""Containers from OCI images, run by a real OCI runtime (runc).

Each instance has a bundle ``<bundles>/<server>/``: ``upper`` and ``work``
(its own writes), ``rootfs`` (an overlay mount: the image's unpacked layers
as read-only ``lowerdir``, shared with every container of those layers,
``upper`` on top) and ``config.json``, the runtime spec built here as data.
The runtime keeps its state under ``/run/stratus-runc/<group>`` and puts
the instance in the cgroup ``/stratus/<group>/<server>``, where ``<group>``
is ``<deployment>.<host>`` (``containers.Cgroups``): two stacks on one
machine never see each other's containers, state or mounts.

The container gets its own pid, ipc, uts (hostname: the server's name) and
mount namespaces and joins the network namespace the network agent wires
(``/run/netns/st-<server>``); the cgroup limits are the server's vCPUs and
RAM; the capabilities are runc's default set (``runc spec``: AUDIT_WRITE,
KILL, NET_BIND_SERVICE) plus NET_RAW, with no new privileges.

Why NET_RAW and not ``net.ipv4.ping_group_range``: the sysctl (ICMP
datagram sockets for a group) would be the narrower grant, but busybox's
``ping`` (1.35, Debian 12) only ever opens a raw socket and gives up on
EPERM; it never tries a datagram socket. A raw socket reaches only the
container's own network namespace (its veth, behind the host's security
group rules), so the grant stays inside what the container already owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from stratus.agents.compute.driver import ExecResult
from stratus.agents.compute.spec import SAFE_PATH_RE, InstanceSpec, check
from stratus.events.errors import HostError

RUNC = "/usr/sbin/runc"
STATE_ROOT = Path("/run/stratus-runc")
CPU_PERIOD_US = 100_000
RUNC_TIMEOUT_S = 30.0
EXEC_OUTPUT_MAX = 1 << 20
# runc's default capability set (``runc spec``), the narrowest that runs
# ordinary programs (docker's adds chown, setuid and others), plus NET_RAW
# for ping (see above).
CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# What may reach an overlay mount option or a path we build: no separators
# of the option string (",", ":"), no whitespace, no NUL.
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?!\n)$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=", re.ASCII)
USER_RE = re.compile(r"^(\d{1,10})(?::(\d{1,10}))?(?!\n)$")


def safe_path(p: str | Path) -> str:
    s = str(p)
    if not SAFE_PATH_RE.match(s) or "/../" in s + "/" or "/./" in s + "/":
        raise HostError(f"path {s!r} cannot be used for a container (only [A-Za-z0-9._/+-])")
    return s


def runc_version(runc: str = RUNC) -> str:
    """``runc 1.1.5+ds1`` (the first line of ``runc --version``)."""
    try:
        out = subprocess.run([runc, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"{runc}: {exc}") from None
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.replace(" version ", " ").strip() or "runc"


def parse_user(user: str) -> tuple[int, int]:
    """An image's ``User`` as uid and gid: numeric (``uid[:gid]``) or root.
    Names are refused: resolving one would read the image's /etc/passwd
    from the host, through whatever symlinks the image put there."""
    if user in ("", "root", "0"):
        return 0, 0
    m = USER_RE.match(user)
    if m is None:
        raise HostError(f"image user {user!r}: only uid[:gid] or root are supported")
    uid = int(m.group(1))
    return uid, int(m.group(2)) if m.group(2) is not None else uid


def bundle_config(spec: InstanceSpec, *, cgroup: str, netns: str) -> dict[str, Any]:
    """The runtime spec (``config.json``) of ``spec``'s container, as data."""
    if not HOSTNAME_RE.match(spec.requested.name):
        raise HostError(f"server name {spec.requested.name!r} is not a hostname")
    if not all(ENV_RE.match(e) and "\0" not in e for e in spec.env):
        raise HostError("image env: every entry must be NAME=value")
    args = list(spec.command)
    if not args:
        raise HostError("the image names no command (entrypoint or cmd); give --command")
    cwd = spec.cwd or "/"
    if not cwd.startswith("/") or "\0" in cwd:
        raise HostError(f"working dir {cwd!r} is not absolute")
    uid, gid = parse_user(spec.user)
    env = list(spec.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.append(f"HOSTNAME={spec.requested.name}")
    limit = spec.requested.ram_mb << 20
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.requested.name,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "cgroupsPath": cgroup,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": limit, "swap": limit},
                "cpu": {
                    "quota": max(1000, int(spec.cpus * CPU_PERIOD_US)),
                    "period": CPU_PERIOD_US,
                    "shares": max(2, int(1024 * spec.cpus)),
                },
            },
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns},
            ],
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }


class Runc:
    """runc under one state root (blocking calls; errors as ``HostError``)."""

    def __init__(self, root: Path, binary: str = RUNC) -> None:
        # Made by the first ``run`` (and removed by ``close`` once empty):
        # a host that never runs an OCI container leaves nothing here.
        self.root = Path(safe_path(root))
        self.binary = binary

    def _args(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def call(self, *args: str, timeout: float = RUNC_TIMEOUT_S) -> str:
        try:
            done = subprocess.run(
                self._args(*args), capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostError(f"runc {args[0]}: {exc}") from None
        if done.returncode != 0:
            raise HostError(f"runc {args[0]}: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def run(self, cid: str, bundle: Path, log: Path) -> None:
        """``runc run -d``: created and started; returns once PID 1 runs.
        The container's output goes to ``log`` (never a pipe of ours: the
        container would hold it open)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                done = subprocess.run(
                    self._args("run", "-d", "--bundle", str(bundle), cid),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    timeout=RUNC_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HostError(f"runc run: {exc}") from None
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-500:].strip()
            raise HostError(f"runc run exited {done.returncode}: {tail}")

    def state(self, cid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.call("state", cid))
        except HostError as exc:
            if "does not exist" in exc.message or "not exist" in exc.message:
                return None
            raise

    def list(self) -> dict[str, str]:
        """container id -> status of every container under this root."""
        out = self.call("list", "--format", "json").strip()
        return {c["id"]: c["status"] for c in json.loads(out or "null") or []}

    def delete(self, cid: str) -> None:
        with contextlib.suppress(HostError):
            self.call("delete", "--force", cid)
        if self.state(cid) is not None:
            raise HostError(f"runc could not delete container {cid}")

    def exec(self, cid: str, command: list[str], timeout: float) -> ExecResult:
        try:
            done = subprocess.run(
                self._args("exec", cid, *command),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ExecResult(124, "", f"timed out after {timeout}s")
        except OSError as exc:
            raise HostError(f"runc exec: {exc}") from None
        return ExecResult(
            done.returncode,
            done.stdout[:EXEC_OUTPUT_MAX].decode(errors="replace"),
            done.stderr[:EXEC_OUTPUT_MAX].decode(errors="replace"),
        )


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mount_overlay(layers: list[str], upper: Path, work: Path, target: Path) -> None:
    """``target`` as an overlay: ``layers`` (lowest first) read-only under
    ``upper``. Arguments as a list, every path checked first."""
    if not layers:
        raise HostError("an overlay needs at least one layer")
    lower = ":".join(safe_path(p) for p in reversed(layers))  # overlayfs: top first
    opts = f"lowerdir={lower},upperdir={safe_path(upper)},workdir={safe_path(work)}"
    if len(opts) > 4000:
        raise HostError(f"overlay options of {len(opts)} bytes exceed a page")
    try:
        done = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, safe_path(target)],
            capture_output=True,
            text=True,
            timeout=RUNC_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"mount overlay: {exc}") from None
    if done.returncode != 0:
        raise HostError(f"mount overlay: {done.stderr.strip()}")


def unmount(target: Path) -> None:
    if not mounted(target):
        return
    done = subprocess.run(
        ["umount", safe_path(target)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0 and mounted(target):
        # Busy (a process of the container still dying): detach it now.
        subprocess.run(["umount", "-l", safe_path(target)], capture_output=True, timeout=30)


class RuncContainers:
    """The OCI-runtime half of ``ContainerDriver``: instances with a bundle."""

    def __init__(self, bundles: Path, state_root: Path, cgroup_parent: str) -> None:
        self.bundles = Path(safe_path(bundles))
        self.runc = Runc(state_root)
        self.cgroup_parent = cgroup_parent
        self._version = ""

    @property
    def version(self) -> str:
        if not self._version:
            self._version = runc_version(self.runc.binary)
        return self._version

    def bundle(self, server: str) -> Path:
        return self.bundles / server

    def owns(self, server: str) -> bool:
        return self.bundle(server).is_dir()

    def servers(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return [p.name for p in self.bundles.iterdir() if p.is_dir()]
        return []

    def running(self, server: str) -> bool:
        st = self.runc.state(server)
        return st is not None and st.get("status") == "running"

    def config(self, spec: InstanceSpec, netns: Path) -> dict[str, Any]:
        """The bundle's ``config.json`` of ``spec``, every value checked
        (before anything of the container is made)."""
        check(spec)
        for p in spec.layers:
            if not Path(p).is_dir():
                raise HostError(f"layer directory {p} is missing")
        return bundle_config(
            spec, cgroup=f"{self.cgroup_parent}/{spec.server}", netns=safe_path(netns)
        )

    def ensure(self, spec: InstanceSpec, config: dict[str, Any], running: bool, log: Path) -> None:
        b = self.bundle(spec.server)
        upper, work, rootfs = b / "upper", b / "work", b / "rootfs"
        self.bundles.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (b, upper, work, rootfs):
            d.mkdir(mode=0o700 if d == b else 0o755, exist_ok=True)
        tmp = b / "config.json.part"
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, b / "config.json")
        if not mounted(rootfs):
            mount_overlay(list(spec.layers), upper, work, rootfs)
        if not running:
            return
        st = self.runc.state(spec.server)
        if st is not None and st.get("status") == "running":
            return
        if st is not None:
            self.runc.delete(spec.server)  # stopped: a new run of the same bundle
        self.runc.run(spec.server, b, log)

    def stop(self, server: str) -> None:
        st = self.runc.state(server)
        if st is None:
            return
        # Delete, not kill: ``--force`` kills every process of the
        # container and waits for them; the bundle and its upper remain.
        self.runc.delete(server)

    def remove(self, server: str) -> None:
        self.stop(server)
        b = self.bundle(server)
        unmount(b / "rootfs")
        if mounted(b / "rootfs"):
            raise HostError(f"the root of container {server} stays mounted")
        shutil.rmtree(b, ignore_errors=True)
        if b.exists():
            raise HostError(f"cannot remove the bundle of container {server}")

    def exec(self, server: str, command: list[str], timeout: float) -> ExecResult:
        if not self.running(server):
            raise HostError(f"container {server} is not running")
        return self.runc.exec(server, command, timeout)

    def upper(self, server: str) -> Path:
        return self.bundle(server) / "upper"

    def close(self) -> None:
        """Remove runc's state root and the bundles directory once empty."""
        for d in (self.runc.root, self.bundles):
            with contextlib.suppress(OSError):
                d.rmdir()
