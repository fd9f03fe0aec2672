"""A network lab for the network agent's tests and benchmark: simulated
hosts in namespaces, tenant histories made by the real decisions and
appended to a real store, and probes (ping, TCP) run inside namespaces.

Every name carries a prefix unique to the run, and ``Lab.close`` removes
every namespace, link and rule it or its agents made, even after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pyroute2 import netns

from stratus.agents.network.agent import NetworkAgent
from stratus.agents.network.kernel import DHCP_DIR, Host, in_netns, run_in
from stratus.agents.network.sim import SimulatedHosts, leftovers
from stratus.events import network as nw
from stratus.events.model import Cause, Event
from stratus.events.resources import ServerCreate, ServerRequested, ServerScheduled
from stratus.events.store import EventStore
from stratus.events.tenants import TenantCreated
from stratus.handlers import networks, routers, servers
from stratus.handlers.records import Image, Port
from stratus.handlers.reports import ReportRelay
from stratus.handlers.scheduler.service import claim_event, request_of
from stratus.handlers.world import Aggregate, World, fold, fold_aggregate

CAUSE = Cause(actor="lab", correlation_id="lab", causation_id="lab")


class Cloud:
    """Tenants' worlds decided on with the inventory's decisions and logged."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.worlds: dict[str, World] = {}
        self.segments = Aggregate()
        self.pools: dict[str, Aggregate] = {}

    async def append(self, events: list[Event]) -> int:
        res = await self.store.append(events)
        return res.seqs[-1]

    async def tenant(self, name: str) -> World:
        w = World()
        ev = CAUSE.make(TenantCreated, name, "tenant", name, name=name)
        fold(w, ev)
        self.worlds[name] = w
        await self.append([ev])
        return w

    async def do(self, tenant: str, decide: Any, cmd: Any, state: Any = None) -> list[Event]:
        w = self.worlds[tenant]
        events = decide(state if state is not None else w, cmd, CAUSE)
        for e in events:
            if e.tenant == tenant:
                fold(w, e)
            elif e.aggregate.kind == "segment-pool":
                fold_aggregate(self.segments, e)
        if events:
            await self.append(events)
        return events

    async def network(self, tenant: str, name: str, cidr: str) -> None:
        from stratus.events.resources import NetworkCreate, SubnetCreate

        w = self.worlds[tenant]
        await self.do(
            tenant,
            networks.decide_network_create,
            NetworkCreate(tenant=tenant, name=name),
            (w, self.segments),
        )
        await self.do(
            tenant,
            networks.decide_subnet_create,
            SubnetCreate(tenant=tenant, name=f"{name}-sub", network=name, cidr=cidr),
        )

    async def server(
        self,
        tenant: str,
        name: str,
        host: str,
        networks: list[str],
        instance_type: str = "container",
        claim: bool = False,
        ram_mb: int = 64,
    ) -> str:
        """A server placed on ``host``; with ``claim``, claimed there as the
        scheduler does (what a compute agent builds from)."""
        cmd = ServerCreate(
            tenant=tenant,
            name=name,
            image="img",
            vcpus=1,
            ram_mb=ram_mb,
            instance_type=instance_type,
            networks=networks,
        )
        plan = servers.ServerPlan(cmd, None, Image(name="img", id="img", status="active"))
        events = await self.do(tenant, servers.decide_server_create, plan)
        requested = next(e for e in events if isinstance(e, ServerRequested))
        sid = requested.aggregate.id
        ev = CAUSE.make(ServerScheduled, tenant, "server", sid, host=host)
        fold(self.worlds[tenant], ev)
        claims = [claim_event(CAUSE, host, request_of(requested))] if claim else []
        await self.append([*claims, ev])
        return sid

    async def external(self, name: str, cidr: str, gateway: str) -> Aggregate:
        """An admin's external network: its subject's state is its address pool."""
        from stratus.events.resources import NetworkCreate

        pool = self.pools.setdefault(name, Aggregate())
        cmd = NetworkCreate(name=name, external=True, cidr=cidr, gateway=gateway)
        events = routers.decide_external_network_create(pool, cmd, CAUSE)
        for e in events:
            fold_aggregate(pool, e)
        await self.append(events)
        return pool

    async def on_pool(self, tenant: str, pool: str, decide: Any, cmd: Any) -> list[Event]:
        """A decision on the tenant and an external network's pool together."""
        w, agg = self.worlds[tenant], self.pools[pool]
        events = decide((w, agg), cmd, CAUSE)
        for e in events:
            if e.tenant == tenant:
                fold(w, e)
            else:
                fold_aggregate(agg, e)
        await self.append(events)
        return events

    def port_of(self, tenant: str, server: str) -> Port:
        ports = [p for p in self.worlds[tenant].ports.values() if p.device == server]
        return sorted(ports, key=lambda p: p.id)[0]


class Lab:
    def __init__(self, store: EventStore, hosts: int, names: list[str] | None = None) -> None:
        self.prefix = "t" + secrets.token_hex(2)
        self.sim = SimulatedHosts(self.prefix, names or [f"host-{i + 1}" for i in range(hosts)])
        self.store = store
        self.cloud = Cloud(store)
        self.agents: dict[str, NetworkAgent] = {}
        self.instances: list[str] = []
        self.relay: ReportRelay | None = None
        # The agents' files (BIRD's): a short path, for BIRD's control socket.
        self.state = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))

    async def start(self) -> None:
        # The agents' port.bound reports go through the handlers' relay.
        self.relay = ReportRelay(self.store)
        await self.relay.start()
        # pyroute2's synchronous API runs its own event loop: off ours.
        await asyncio.to_thread(self.sim.start)

    def agent(self, host: str, store: EventStore | None = None, **kw: Any) -> NetworkAgent:
        a = NetworkAgent(
            store or self.store,
            host,
            vtep=self.sim.vtep(host),
            prefix=self.prefix,
            host_ns=self.sim.netns(host),
            interval=kw.pop("interval", 3600.0),
            state_dir=self.state / host,
            **kw,
        )
        self.agents[host] = a
        return a

    async def start_agents(self, routers: str = "") -> None:
        for h in self.sim.names:
            await self.agent(h, routers=h == routers).start()

    async def instance(self, server: str) -> str:
        """The container instance's namespace, as the compute agent makes it."""
        ns = nw.instance_netns(server)
        self.instances.append(ns)
        await asyncio.to_thread(netns.create, ns)
        return ns

    async def converge(self, timeout: float = 20.0) -> None:
        """Until every agent matches the log and none appended more meanwhile
        (a routed port's address comes from its host's agent)."""
        deadline = time.monotonic() + timeout
        seq = await self.store.last_seq()
        while True:
            left = max(0.1, deadline - time.monotonic())
            await asyncio.gather(*(a.converged(seq, left) for a in self.agents.values()))
            now = await self.store.last_seq()
            if now == seq:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the log kept moving: {seq} -> {now}")
            seq = now

    async def close(self) -> None:
        try:
            for a in self.agents.values():
                await asyncio.wait_for(a.stop(), 20)
            if self.relay is not None:
                await self.relay.stop()
        finally:
            await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        for h in self.sim.names:
            try:
                Host(
                    self.prefix,
                    self.sim.vtep(h),
                    self.sim.netns(h),
                    routers=True,
                    state_dir=self.state / h,
                ).teardown()
            except Exception:
                pass  # the namespace goes below with whatever is left in it
        have = set(netns.listnetns())
        for ns in self.instances:
            if ns in have:
                netns.remove(ns)
        self.sim.stop()
        # BIRD is gone with its files (a teardown stops it and removes them)
        left = [str(f) for f in self.state.rglob("*") if f.is_file()]
        shutil.rmtree(self.state, ignore_errors=True)
        assert left == [], left
        assert leftovers(self.prefix) == []
        assert not [f for f in dhcp_files() if nw.owned(self.prefix, f.stem)]
        assert not set(self.instances) & set(netns.listnetns())


@contextlib.asynccontextmanager
async def running_lab(
    store: EventStore, hosts: int, names: list[str] | None = None
) -> AsyncIterator[Lab]:
    """A started lab, closed (everything it made removed) on the way out."""
    lab = Lab(store, hosts, names)
    try:
        await lab.start()
        yield lab
    finally:
        await lab.close()


def dhcp_files() -> list[Path]:
    return sorted(DHCP_DIR.iterdir()) if DHCP_DIR.is_dir() else []


def ping(ns: str, address: str, tries: int = 3) -> bool:
    """Whether ``address`` answers from inside ``ns`` (bounded: ``tries`` pings of 1 s)."""
    for _ in range(tries):
        res = run_in(ns, ["ping", "-n", "-c", "1", "-W", "1", address], timeout=5)
        if res.returncode == 0:
            return True
    return False


def probe(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return run_in(ns, [sys.executable, "-m", "stratus.ops.bench.netprobe", *args], timeout=timeout)


def serve(ns: str, *args: str) -> subprocess.Popen:
    """A netprobe server in ``ns``; it prints ``listening`` once bound."""
    nw.check_netns_name(ns)

    def enter() -> None:
        netns.setns(ns, flags=0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "stratus.ops.bench.netprobe", *args],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=enter,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Echo:
    """ICMP echo from inside a namespace on a raw socket opened there: one
    request every ``interval`` until the first reply, without a process per
    try (``ping -W 1`` waits a whole second after a lost request, and
    forking a large process costs more than the wiring being timed).

    Make it with ``await Echo.open(ns)`` (the socket is opened by a worker
    thread that enters the namespace: a socket stays in the namespace it
    was made in); ``close()`` it after."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = 0

    @classmethod
    async def open(cls, ns: str) -> Echo:
        def make() -> socket.socket:
            with in_netns(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            s.setblocking(False)
            return s

        return cls(await asyncio.to_thread(make))

    def close(self) -> None:
        self.sock.close()

    def _request(self) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFF
        head = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
        body = b"stratus-echo"
        csum = _checksum(head + body)
        return struct.pack("!BBHHH", 8, 0, csum, self.ident, self.seq) + body

    def _is_reply(self, packet: bytes, address: bytes) -> bool:
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) < ihl + 8 or packet[12:16] != address:
            return False
        kind, _, _, ident, _ = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
        return kind == 0 and ident == self.ident

    async def first_reply(
        self, address: str, deadline: float, interval: float = 0.01
    ) -> float | None:
        """``time.monotonic()`` when ``address`` first answered, None if not by ``deadline``."""
        loop = asyncio.get_running_loop()
        want = socket.inet_aton(address)
        while time.monotonic() < deadline:
            try:
                self.sock.sendto(self._request(), (address, 0))
            except OSError:
                pass  # no address or route yet: the port is not wired
            until = min(deadline, time.monotonic() + interval)
            while (left := until - time.monotonic()) > 0:
                try:
                    packet = await asyncio.wait_for(loop.sock_recv(self.sock, 2048), left)
                except TimeoutError:
                    break
                if self._is_reply(packet, want):
                    return time.monotonic()
        return None


class Echoes:
    """Many probes' first echo replies, from one thread: each probe's
    socket (an ``Echo``'s, opened in its namespace) sends a request every
    ``interval`` until its address answers or its deadline passes, and
    one ``poll`` over all of them waits in between. A coroutine per probe
    (``Echo.first_reply``) wakes the event loop 100 times a second each:
    a wave of 50 cost a fifth of a core there, on the loop the benchmark's
    agents share (thread mode), taken from what is measured.

    ``start()`` it, ``await first_reply(...)`` per probe, ``close()`` after."""

    def __init__(self, interval: float = 0.01) -> None:
        import select
        import threading

        self.interval = interval
        self._poll = select.poll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poll.register(self._wake_r, select.POLLIN)
        self._lock = threading.Lock()
        # fd -> [echo, wanted address (packed), deadline, future, next send]
        self._probes: dict[int, list[Any]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="echoes", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; probes still waiting get None. (Twice is once.)"""
        if self._stop:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in list(self._probes):
            self._end(fd, None)
        os.close(self._wake_r)
        os.close(self._wake_w)

    async def first_reply(self, probe: Echo, address: str, deadline: float) -> float | None:
        """``time.monotonic()`` when ``address`` first answered ``probe``'s
        requests, None if not by ``deadline``."""
        import select

        assert self._loop is not None, "start() first"
        fut: asyncio.Future[float | None] = self._loop.create_future()
        fd = probe.sock.fileno()
        with self._lock:
            self._probes[fd] = [probe, socket.inet_aton(address), deadline, fut, 0.0]
            self._poll.register(fd, select.POLLIN)
        os.write(self._wake_w, b"x")  # (its first request goes now)
        return await fut

    def _end(self, fd: int, when: float | None) -> None:
        with self._lock:
            entry = self._probes.pop(fd, None)
            if entry is not None:
                self._poll.unregister(fd)
        if entry is not None and self._loop is not None:
            fut = entry[3]
            self._loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(when))

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            with self._lock:
                probes = list(self._probes.items())
            wait = 0.1  # (nothing to probe: woken by the next one)
            for fd, entry in probes:
                echo, want, deadline, _, due = entry
                if now >= deadline:
                    self._end(fd, None)
                    continue
                if now >= due:
                    with contextlib.suppress(OSError):  # (not wired yet: no route)
                        echo.sock.sendto(echo._request(), (socket.inet_ntoa(want), 0))
                    entry[4] = due = now + self.interval
                wait = min(wait, due - now, deadline - now)
            for fd, _ in self._poll.poll(max(0.0, wait) * 1000):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    entry = self._probes.get(fd)
                if entry is None:
                    continue
                echo, want = entry[0], entry[1]
                while True:  # (every packet waiting on it)
                    try:
                        packet = echo.sock.recv(2048)
                    except OSError:
                        break
                    if echo._is_reply(packet, want):
                        self._end(fd, time.monotonic())
                        break


async def echo(ns: str, address: str, seconds: float = 3.0) -> bool:
    """Whether ``address`` answers from inside ``ns`` within ``seconds``."""
    e = await Echo.open(ns)
    try:
        return await e.first_reply(address, time.monotonic() + seconds) is not None
    finally:
        e.close()
