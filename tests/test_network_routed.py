"""Routed networks on real namespaces and a real BGP daemon: three simulated
hosts each running BIRD 2, containers of one routed network spread over
them, no bridge, no overlay, no NAT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time

import pytest

from stratus.agents.network.bird import BgpConfig
from stratus.agents.network.kernel import in_netns, run_in
from stratus.events import network as nw
from stratus.events.network import RoutedNetworkCreate
from stratus.events.resources import PortAddressAssigned, ServerCreate, ServerScheduled
from stratus.handlers import servers
from stratus.handlers.records import Image, Network
from stratus.handlers.routed import SystemNetworks, decide_routed_network_create
from stratus.handlers.world import fold
from stratus.ops.bench.netlab import CAUSE, Lab, echo, running_lab

pytestmark = pytest.mark.timeout(240)

HOLD = 3  # seconds: BGP's hold time here (short, for the test)
PODS = Network(name="pods", id="pods", mode=nw.ROUTED, cidr="10.244.0.0/16")


@pytest.fixture
async def lab(store):
    async with running_lab(store, hosts=3) as lab:
        yield lab


async def container(lab: Lab, tenant: str, name: str, host: str) -> tuple[str, str]:
    """A container of ``tenant`` on the routed network, placed on ``host``:
    (its server id, its namespace)."""
    c = lab.cloud
    cmd = ServerCreate(
        tenant=tenant,
        name=name,
        image="img",
        vcpus=1,
        ram_mb=64,
        instance_type="container",
        networks=["pods"],
    )
    plan = servers.ServerPlan(
        cmd, None, Image(name="img", id="img", status="active"), {"pods": PODS}
    )
    events = await c.do(tenant, servers.decide_server_create, plan)
    sid = next(e.aggregate.id for e in events if e.aggregate.kind == "server")
    ns = await lab.instance(sid)
    ev = CAUSE.make(ServerScheduled, tenant, "server", sid, host=host)
    fold(c.worlds[tenant], ev)
    await c.append([ev])
    return sid, ns


async def start(lab: Lab, host: str, bgp: BgpConfig | None = None, **kw) -> None:
    await lab.agent(host, bgp=bgp or BgpConfig(hold=HOLD), bgp_poll=0.2, **kw).start()


async def routed_cloud(lab: Lab, bgp: BgpConfig | None = None) -> dict[str, tuple[str, str, str]]:
    """pods (10.244.0.0/16) with acme's c1, c2, ... on host-1, -2, ...; every
    agent running and every host routing to every other's block. Returns
    name -> (server id, namespace, address)."""
    c = lab.cloud
    (ev,) = decide_routed_network_create(
        SystemNetworks(), RoutedNetworkCreate(name="pods", cidr="10.244.0.0/16"), CAUSE
    )
    await c.append([ev])
    await c.tenant("acme")
    placed = {}
    for i, host in enumerate(lab.sim.names, 1):
        placed[f"c{i}"] = await container(lab, "acme", f"c{i}", host)
    for h in lab.sim.names:
        await start(lab, h, bgp)
    await lab.converge()
    await routes_spread(lab, timeout=30)
    out = {}
    for name, (sid, ns) in placed.items():
        ip = next(p.ip for p in lab.agents["host-1"].topology.ports.values() if p.device == sid)
        out[name] = (sid, ns, ip)
    return out


def blocks_of(lab: Lab, host: str) -> set[str]:
    t = lab.agents["host-1"].topology
    return {b for b, (_, h) in t.blocks.items() if h == host}


async def learned(lab: Lab, host: str) -> dict[str, str]:
    return await asyncio.to_thread(lab.agents[host].kernel.bird_routes)


async def routes_spread(lab: Lab, timeout: float) -> float:
    """Seconds until every host routes to every other host's blocks."""
    t0 = time.monotonic()
    while True:
        missing = []
        for h in lab.agents:
            have = await learned(lab, h)
            missing += [b for o in lab.agents if o != h for b in blocks_of(lab, o) if b not in have]
        if not missing:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"routes never learned: {missing}")
        await asyncio.sleep(0.1)


async def until(check, timeout: float, step: float = 0.1) -> float:
    """Seconds until ``check()`` (a coroutine function) holds; fails after ``timeout``."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


def capture(ns: str, ifname: str, seconds: float) -> list[tuple[int, str, str, int]]:
    """IPv4 packets seen on link ``ifname`` in namespace ``ns`` for
    ``seconds`` (a raw packet socket there): (protocol, source, destination,
    UDP destination port or 0)."""
    with in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        s.bind((ifname, 0))
        s.settimeout(0.1)
        out = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame = s.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            proto, ihl = ip[9], (ip[0] & 0x0F) * 4
            dport = struct.unpack("!H", ip[ihl + 2 : ihl + 4])[0] if proto == 17 else 0
            out.append((proto, socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), dport))
        return out
    finally:
        s.close()


async def test_containers_on_three_hosts_reach_each_other_over_bgp_routes_without_overlay_or_nat(
    lab,
):
    c = await routed_cloud(lab)
    # each host took a block of its own and gave its container an address from it
    for i, host in enumerate(lab.sim.names, 1):
        (block,) = blocks_of(lab, host)
        ip = c[f"c{i}"][2]
        assert block.endswith("/26") and ip.rsplit(".", 1)[0] == block.rsplit(".", 1)[0]
    # the ports say so on their own subjects (the tenant's record)
    assigned = [
        rec.decode() for rec in await lab.store.read_all(subjects=["ev.acme.port.>"])
    ]  # fmt: skip
    hosts = {e.host for e in assigned if isinstance(e, PortAddressAssigned)}
    assert hosts == set(lab.sim.names)
    # routes learned over BGP are BIRD's in each host's table, via the owner's address
    table = run_in(lab.sim.netns("host-1"), ["ip", "route"]).stdout.splitlines()
    for host in ("host-2", "host-3"):
        (block,) = blocks_of(lab, host)
        line = next(ln for ln in table if ln.startswith(block))
        assert "proto bird" in line and f"via {lab.sim.vtep(host)} " in line, line
    # every container reaches the others
    for a in c:
        for b in c:
            if a != b:
                assert await echo(c[a][1], c[b][2]), (a, b)
    # on the wire between hosts: plain IP from the sender's own address, no VXLAN
    uplink = nw.kernel_name(lab.prefix, "uplink", "host-2")
    seen_task = asyncio.create_task(
        asyncio.to_thread(capture, lab.sim.netns("host-2"), uplink, 1.5)
    )
    await asyncio.sleep(0.2)
    assert await echo(c["c1"][1], c["c2"][2])
    seen = await seen_task
    icmp = [(src, dst) for proto, src, dst, _ in seen if proto == 1]
    assert (c["c1"][2], c["c2"][2]) in icmp and (c["c2"][2], c["c1"][2]) in icmp
    assert not [p for p in seen if p[0] == 17 and p[3] == nw.VXLAN_PORT]
    # a host reaches a container on another host, without NAT: the container
    # sees the host's own address
    uplink = nw.kernel_name(lab.prefix, "uplink", "host-3")
    seen_task = asyncio.create_task(
        asyncio.to_thread(capture, lab.sim.netns("host-3"), uplink, 1.5)
    )
    await asyncio.sleep(0.2)
    assert await echo(lab.sim.netns("host-1"), c["c3"][2])
    seen = await seen_task
    assert (1, lab.sim.vtep("host-1"), c["c3"][2], 0) in seen
    # no bridge, no VXLAN device anywhere: a veth per container and a /32 route
    for h in lab.sim.names:
        links = await asyncio.to_thread(lab.agents[h].kernel.links)
        assert {v["kind"] for v in links.values()} == {"veth"}, links
    host3 = run_in(lab.sim.netns("host-3"), ["ip", "route"]).stdout
    veth = nw.kernel_name(lab.prefix, "port", port_of(lab, c["c3"][0]))
    assert f"{c['c3'][2]} dev {veth}" in host3
    # and the host knows the container's MAC for good: no ARP, no entry to age
    neigh = run_in(lab.sim.netns("host-3"), ["ip", "neigh", "show", "dev", veth]).stdout
    mac = next(p.mac for p in lab.agents["host-3"].topology.ports.values() if p.ip == c["c3"][2])
    assert f"{c['c3'][2]} lladdr {mac} PERMANENT" in neigh, neigh


def port_of(lab: Lab, server: str) -> str:
    return next(p.id for p in lab.agents["host-1"].topology.ports.values() if p.device == server)


async def test_a_host_that_dies_is_withdrawn_within_the_hold_time_and_comes_back(lab):
    c = await routed_cloud(lab)
    (b3,) = blocks_of(lab, "host-3")
    (b2,) = blocks_of(lab, "host-2")
    seq = await lab.store.last_seq()

    async def seen_up() -> bool:  # (what an agent never saw up, it cannot see go)
        return all(lab.agents[h].bgp_sessions.get("host-3") for h in ("host-1", "host-2"))

    await until(seen_up, 5)

    # host-3 dies: its agent with it, its BIRD killed outright
    dead = lab.agents["host-3"]
    await dead.stop()
    pid = dead.kernel.bird.pid()
    assert pid
    os.kill(pid, signal.SIGKILL)

    async def withdrawn() -> bool:
        return not [h for h in ("host-1", "host-2") if b3 in await learned(lab, h)]

    took = await until(withdrawn, HOLD + 1)
    assert took <= HOLD, took
    assert not await echo(c["c1"][1], c["c3"][2], seconds=0.5)
    assert await echo(c["c1"][1], c["c2"][2])  # the others are unaffected

    # the survivors say what they saw: the session lost, host-3's block withdrawn
    async def recorded(kind: type, after: int) -> dict[str, object]:
        evs = [rec.decode() for rec in await lab.store.read_all(after=after)]
        return {e.host: e for e in evs if isinstance(e, kind) and e.peer == "host-3"}

    async def both_lost() -> bool:
        return set(await recorded(nw.PeerLost, seq)) == {"host-1", "host-2"}

    await until(both_lost, 5)
    lost = await recorded(nw.PeerLost, seq)
    assert all(e.withdrawn == [b3] for e in lost.values()), lost

    # it comes back: a new agent starts its BIRD again, the routes return
    seq = await lab.store.last_seq()
    await start(lab, "host-3")

    async def back() -> bool:
        return not [h for h in ("host-1", "host-2") if b3 not in await learned(lab, h)]

    await until(back, 20)
    assert await echo(c["c1"][1], c["c3"][2])

    async def both_restored() -> bool:
        return set(await recorded(nw.PeerRestored, seq)) == {"host-1", "host-2"}

    await until(both_restored, 10)
    assert all(e.learned == [b3] for e in (await recorded(nw.PeerRestored, seq)).values())
    # (and host-3 recorded restarting what had died as a correction)
    evs = [rec.decode() for rec in await lab.store.read_all(after=seq)]
    fixes = [e for e in evs if isinstance(e, nw.NetworkAgentCorrected) and e.host == "host-3"]
    assert fixes and "bird" in fixes[0].created

    # a host that stops answering (BIRD frozen: no FIN, no keepalive) is
    # withdrawn by the hold timer alone
    frozen = lab.agents["host-2"].kernel.bird.pid()
    os.kill(frozen, signal.SIGSTOP)
    try:
        took = await until(
            lambda: _absent(lab, "host-1", b2), HOLD + 2, step=0.1
        )  # fmt: skip
        assert 0.5 <= took <= HOLD + 1, took
    finally:
        os.kill(frozen, signal.SIGCONT)
    await until(lambda: _present(lab, "host-1", b2), 20)
    assert await echo(c["c1"][1], c["c2"][2])


async def _absent(lab: Lab, host: str, block: str) -> bool:
    return block not in await learned(lab, host)


async def _present(lab: Lab, host: str, block: str) -> bool:
    return block in await learned(lab, host)


async def test_a_restarted_agent_changes_nothing_and_teardown_leaves_no_bird(lab, connect_store):
    c = await routed_cloud(lab)
    host2 = lab.agents["host-2"]
    pid = host2.kernel.bird.pid()
    before = await asyncio.to_thread(host2.kernel.links)
    routes = await learned(lab, "host-2")
    await host2.stop()
    again = lab.agent("host-2", store=await connect_store(), bgp=BgpConfig(hold=HOLD))
    await again.start()
    assert not again.last_changes, again.last_changes
    assert again.kernel.bird.pid() == pid  # the same BIRD, its sessions untouched
    assert await asyncio.to_thread(again.kernel.links) == before
    assert await learned(lab, "host-2") == routes
    assert await echo(c["c2"][1], c["c1"][2])
    # the container goes: its address and then its host's empty block go back
    sid = c["c2"][0]
    block = next(iter(blocks_of(lab, "host-2")))
    await lab.cloud.append(
        [CAUSE.make(cls, "acme", kind, ident) for cls, kind, ident in _deleted(lab, sid)]
    )
    await lab.converge()

    async def returned() -> bool:
        return block not in lab.agents["host-1"].topology.blocks

    await until(returned, 10)
    await until(lambda: _absent(lab, "host-1", block), HOLD + 2)
    # a teardown stops BIRD and leaves none of its files (Lab.close checks the files)
    for a in lab.agents.values():
        await a.stop()
        await a.teardown()
        assert a.kernel.bird.pid() == 0
    assert not _birds_of(lab)


def _deleted(lab: Lab, server: str) -> list:
    from stratus.events.resources import PortDeleted, ServerDeleted

    return [(ServerDeleted, "server", server), (PortDeleted, "port", port_of(lab, server))]


def _birds_of(lab: Lab) -> list[int]:
    """Processes whose command line names the lab's files (BIRD's)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if str(lab.state).encode() in f.read():
                        found.append(int(d))
            except OSError:
                pass
    return found


async def test_beyond_the_mesh_size_routes_go_through_a_route_reflector(store):
    """Four hosts, a mesh of at most two: host-1 reflects, the others peer
    with it alone, and still reach each other directly (the next hop is the
    block's own host, not the reflector)."""
    async with running_lab(store, hosts=4) as lab:
        c = await routed_cloud(lab, BgpConfig(hold=HOLD, mesh_max=2, reflectors=1))
        sessions = await asyncio.to_thread(lab.agents["host-3"].kernel.sessions)
        assert sessions == {"host-1": True}
        (b2,) = blocks_of(lab, "host-2")
        assert (await learned(lab, "host-3"))[b2] == lab.sim.vtep("host-2")
        assert await echo(c["c3"][1], c["c2"][2])
        assert await echo(c["c4"][1], c["c2"][2])


def test_the_readme_routed_example_on_stratus_up_with_three_hosts(tmp_path):
    """``stratus up --hosts 3`` (as root): a routed network made with the
    CLI, containers on two hosts that reach each other by the addresses
    ``server show`` gives, BIRD on every host; stopped, no BIRD, no file,
    no namespace of its own is left. (Reached from the containers'
    namespaces rather than through ``server exec``: the container's process
    is the compute agent's business, its namespace the network's.)"""
    import hashlib

    from stratus.agents.network.sim import leftovers

    from .test_cli import cli, login, running_up

    with running_up(tmp_path, "--hosts", "3") as up:
        url = up.start(timeout=90)
        data = tmp_path / "data"
        prefix = "s" + hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:3]
        login(url)
        for args in (
            ("tenant", "create", "acme"),
            ("image", "create", "box", "--tenant", "acme"),
            ("network", "create", "pods", "--mode", "routed", "--cidr", "10.244.0.0/16"),
        ):
            r = cli(url, *args)
            assert r.returncode == 0, (args, r.stderr)
        for name, host in (("a", "host-01"), ("b", "host-02")):
            r = cli(
                url, "server", "create", name, "--image", "box", "--type", "container",
                "--vcpus", "1", "--ram-mb", "64", "--network", "pods", "--host", host,
                "--tenant", "acme",
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        made = _until_servers(url, lambda rows: all(r["status"] == "running" for r in rows))
        a, b = made["a"], made["b"]
        assert a["addresses"][0]["network"] == "pods"
        ip_a, ip_b = a["addresses"][0]["ip"], b["addresses"][0]["ip"]
        assert (ip_a, ip_b) == ("10.244.0.1", "10.244.0.64")  # host-01's and host-02's blocks
        # refused with a usage error: routed needs a prefix
        r = cli(url, "network", "create", "nope", "--mode", "routed")
        assert r.returncode == 2
        ns_a, ns_b = nw.instance_netns(a["id"]), nw.instance_netns(b["id"])
        assert asyncio.run(_reach(ns_a, ip_b)) and asyncio.run(_reach(ns_b, ip_a))
        # host-03 holds no instance: its sessions came up on their own
        # schedule (BIRD's start delay, then a retry every second and an
        # error wait of at most 5 s), not necessarily before 01 and 02 met.
        route = "10.244.0.0/26 via 198.18.0.1"
        deadline = time.monotonic() + 20
        while True:
            table = run_in(nw.kernel_name(prefix, "host", "host-03"), ["ip", "route"]).stdout
            if route in table or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert route in table and "proto bird" in table, table
        birds = _birds_naming(data)
        assert len(birds) == 3, birds
        # the containers go before the stack does (instances outlive their agents)
        for name in ("a", "b"):
            assert cli(url, "server", "delete", name, "--tenant", "acme").returncode == 0
        _until_servers(url, lambda rows: not rows)
        rc, _ = up.stop(timeout=60)
        assert rc == 0
        assert _birds_naming(data) == []
        assert not (data / "network").exists()
        assert leftovers(prefix) == []
        assert not {ns_a, ns_b} & set(os.listdir("/run/netns"))


def _until_servers(url: str, done, timeout: float = 90) -> dict:
    """acme's servers by name (with their addresses) once ``done(rows)`` holds."""
    import json

    from .test_cli import cli

    deadline = time.monotonic() + timeout
    while True:
        r = cli(url, "server", "list", "--tenant", "acme", "-o", "json")
        rows = json.loads(r.stdout) if r.returncode == 0 else None
        if rows is not None and done(rows):
            out = {}
            for row in rows:
                shown = cli(url, "server", "show", row["id"], "--tenant", "acme", "-o", "json")
                out[row["name"]] = json.loads(shown.stdout)
            return out
        assert time.monotonic() < deadline, rows
        time.sleep(0.3)


async def _reach(ns: str, address: str) -> bool:
    return await echo(ns, address, seconds=10)


def _birds_naming(path) -> list[int]:
    """BIRD processes whose command line names a file under ``path``."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"bird") and any(str(path).encode() in a for a in argv):
                found.append(int(d))
    return found
