"""``stratus demo``: the embedded control plane and a scripted scenario.

The scenario grows with the control plane: tenants, identity, a tenant's
network, router, servers and floating IP under a quota, time travel and the
audit trail; two simulated hosts whose compute agents boot servers on qcow2
overlays of a stored image, a snapshot that boots, and a container instance
answering ``server exec``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from stratus.cli import logs, transfer
from stratus.cli.client import Client
from stratus.cli.output import Format, emit
from stratus.cli.runtime import Stack
from stratus.events.errors import (
    AlreadyExists,
    Forbidden,
    Invalid,
    NotFound,
    QuotaExceeded,
    StratusError,
    Unauthenticated,
)


async def run_demo() -> None:
    console = Console(width=None if sys.stdout.isatty() else 120)
    with tempfile.TemporaryDirectory(prefix="stratus-demo-") as tmp:
        data = Path(tmp)
        logs.configure("WARNING", json_file=data / "stratus.log")
        stack = Stack(data, port=0, hosts=2)
        url = await stack.start()
        console.print(f"[bold]stratus ready[/] on {url} (data dir {data})")
        anonymous = await Client.connect(url)
        try:
            r = await anonymous.command(
                "auth.login", {"user": "admin", "password": stack.admin_password}
            )
        finally:
            await anonymous.close()
        console.print(f"logged in as admin (token {r.data['token_id']}, tenant admin)")
        client = await Client.connect(url, r.data["token"])
        try:
            console.rule("tenants")
            r = await client.command("tenant.create", {"name": "acme", "description": "demo"})
            console.print(f"created tenant [bold]acme[/] at seq {r.seqs}")
            r = await client.command("tenant.create", {"name": "globex"})
            console.print(f"created tenant [bold]globex[/] at seq {r.seqs}")
            r = await client.command("tenant.rename", {"tenant": "globex", "name": "globex-eu"})
            console.print(f"renamed globex to globex-eu at seq {r.seqs}")
            await _refused(
                console,
                "a second tenant acme",
                AlreadyExists,
                client.command("tenant.create", {"name": "acme"}),
            )
            await _refused(
                console,
                "the name 'Not Valid!'",
                Invalid,
                client.command("tenant.create", {"name": "Not Valid!"}),
            )
            await _identity(console, client, url)
            await _inventory(console, client)
            await _compute(console, client, data)
            if stack.network is not None:
                await _network(console, client, stack.network)
            else:
                console.print("network agents need root: the private-network ping is skipped")
            status = await _wait_projected(client)
            emit(await client.query("tenants"), Format.table, ["id", "name", "status"])
            console.rule("audit trail (the event log)")
            rows = [
                {
                    "seq": r["seq"],
                    "at": r["at"][:19],
                    "actor": r["actor"],
                    "action": r["type"],
                    "resource": f"{r['aggregate']['kind']}/{r['aggregate']['id']}",
                    "command": r["correlation_id"],
                    "result": r.get("result", ""),
                }
                for r in await client.query("audit", {"limit": 40})
            ]
            emit(rows, Format.table)
            console.print(
                f"last_seq={status['last_seq']} projector_lag={status['projector_lag']} "
                f"digest={status['projection_digest'][:16]}…"
            )
            console.print("[bold green]demo finished[/]")
        finally:
            await client.close()
            await stack.stop()


async def _identity(console: Console, admin: Client, url: str) -> None:
    """alice is a member of acme: she sees acme only and cannot act as admin."""
    console.rule("identity")
    await admin.command("user.create", {"name": "alice", "password": "alice-demo-pw"})
    await admin.command("role.assign", {"user": "alice", "tenant": "acme", "role": "member"})
    console.print("created user [bold]alice[/], member of acme")
    anon = await Client.connect(url)
    try:
        r = await anon.command("auth.login", {"user": "alice", "password": "alice-demo-pw"})
        await _refused(
            console,
            "alice with a wrong password",
            Unauthenticated,
            anon.command("auth.login", {"user": "alice", "password": "wrong"}),
        )
    finally:
        await anon.close()
    alice = await Client.connect(url, r.data["token"])
    try:
        seen = [t["id"] for t in await alice.query("tenants")]
        console.print(f"alice lists tenants: {seen}")
        if seen != ["acme"]:
            raise AssertionError(f"alice should see only acme, saw {seen}")
        await _refused(
            console, "alice asks for globex", NotFound, alice.query("tenant", {"tenant": "globex"})
        )
        await _refused(
            console,
            "alice creates a tenant",
            Forbidden,
            alice.command("tenant.create", {"name": "alices-own"}),
        )
        await alice.command("token.revoke", {})
        await asyncio.sleep(0.2)
        await _refused(
            console, "alice, after revoking her token", Unauthenticated, alice.query("tenants")
        )
    finally:
        await alice.close()


async def _inventory(console: Console, admin: Client) -> None:
    """acme's network, router, two servers under a quota of 2, a floating IP."""
    console.rule("inventory and quota")
    acme = {"tenant": "acme"}

    async def do(verb: str, body: dict[str, Any]) -> Any:
        return (await admin.command(verb, {**acme, **body})).data

    await do("quota.set", {"limits": {"instances": 2, "floating_ips": 1}})
    console.print("quota of acme: 2 instances, 1 floating IP")
    await admin.command("network.create-external", {"name": "public", "cidr": "203.0.113.0/24"})
    console.print("external network [bold]public[/] 203.0.113.0/24 (floating IP pool)")
    await do("image.create", {"name": "cirros"})
    await do("network.create", {"name": "lan"})
    subnet = await do("subnet.create", {"name": "lan-v4", "network": "lan", "cidr": "10.0.0.0/24"})
    console.print(f"network lan, subnet lan-v4 {subnet['cidr']} gateway {subnet['gateway']}")
    await do("router.create", {"name": "edge", "external_network": "public"})
    await do("router.add-subnet", {"router": "edge", "subnet": "lan-v4"})
    console.print("router edge: gateway on public, interface on lan-v4")
    before = (await _wait_projected(admin))["last_seq"]
    for name in ("web-1", "web-2"):
        s = await do(
            "server.create",
            {"name": name, "image": "cirros", "vcpus": 1, "ram_mb": 256, "networks": ["lan"]},
        )
        console.print(f"server [bold]{name}[/] recorded: {s['status']}")
    await _refused(
        console,
        "a third server",
        QuotaExceeded,
        do("server.create", {"name": "web-3", "image": "cirros", "vcpus": 1, "ram_mb": 256}),
    )
    fip = await do("floating-ip.create", {"network": "public"})
    await do("floating-ip.associate", {"floating_ip": fip["address"], "server": "web-1"})
    console.print(f"floating IP {fip['address']} associated with web-1")
    await _wait_projected(admin)
    emit(
        await admin.query("servers", acme),
        Format.table,
        ["name", "status", "vcpus", "ram_mb"],
        title="servers of acme",
    )
    web1 = await admin.query("server", {**acme, "ref": "web-1"})
    console.print(f"web-1 addresses: {web1['addresses'][0]['ip']}, {web1['floating_ips']}")
    quota = await admin.query("quota", acme)
    emit(quota["quota"], Format.table, ["resource", "limit", "in_use"], title="quota of acme")
    past = await admin.query("servers", acme, at=before)
    console.print(f"time travel: servers of acme --at {before}: {len(past)} (before they existed)")
    if past:
        raise AssertionError(f"--at {before} should show no servers, got {past}")


async def _compute(console: Console, admin: Client, data: Path) -> None:
    """globex's servers on the simulated hosts: a VM on an overlay of a
    stored image, a snapshot of it that boots, a container answering exec."""
    from stratus.agents.compute import images

    console.rule("compute")
    globex = {"tenant": "globex"}

    async def do(verb: str, body: dict[str, Any]) -> Any:
        return (await admin.command(verb, {**globex, **body})).data

    async def running(name: str) -> dict[str, Any]:
        return await _wait_for(admin, "server", {**globex, "ref": name}, "running")

    src = data / "base.qcow2"
    await asyncio.to_thread(images.qemu_img, "create", "-q", "-f", "qcow2", str(src), "64M")
    checksum, size = await asyncio.to_thread(transfer.hash_file, src)
    queued = await do("image.create", {"name": "base", "size_bytes": size, "checksum": checksum})
    console.print(f"image [bold]base[/] {queued['status']}: {size:,} bytes, {checksum[:16]}…")
    await transfer.upload(admin, "base", src, tenant="globex")
    console.print(
        "uploaded over NATS: the image service checked size, SHA-256 and format "
        "(qemu-img) and stored it in the object store; image base active"
    )
    await do("server.create", {"name": "vm-1", "image": "base", "vcpus": 1, "ram_mb": 128})
    vm1 = await running("vm-1")
    chain = await asyncio.to_thread(images.info, Path(vm1["disk"]), None, True)
    console.print(
        f"vm-1 running on {vm1['host']}; disk {len(chain)} layers, "
        f"{chain[0]['actual-size']:,} bytes of its own over the cached base"
    )
    await do("server.snapshot", {"ref": "vm-1", "name": "vm-1-snap"})
    snap = await _wait_for(admin, "image", {**globex, "ref": "vm-1-snap"}, "active")
    console.print(
        f"snapshot vm-1-snap stored by {vm1['host']} in the object store, parent image "
        f"{snap['parent']}"
    )
    # On the other host: it fetches the snapshot and its parent from the store.
    other = "host-02" if vm1["host"] == "host-01" else "host-01"
    await do(
        "server.create",
        {"name": "vm-2", "image": "vm-1-snap", "vcpus": 1, "ram_mb": 128, "host": other},
    )
    vm2 = await running("vm-2")
    chain = await asyncio.to_thread(images.info, Path(vm2["disk"]), None, True)
    console.print(f"vm-2 booted from the snapshot on {vm2['host']}: {len(chain)} layers")
    await do(
        "server.create",
        {"name": "box", "image": "base", "vcpus": 1, "ram_mb": 64, "instance_type": "container"},
    )
    box = await running("box")
    out = await do("server.exec", {"ref": "box", "command": ["sh", "-c", "echo pid $$ in box"]})
    console.print(f"container box on {box['host']}: exec said {out['stdout'].strip()!r}")
    # Instances outlive their agents: the container goes before the demo does.
    await do("server.delete", {"ref": "box"})
    await _wait_for(admin, "servers", globex, None, gone="box")
    console.print("container box deleted")


async def _network(console: Console, admin: Client, plane: Any) -> None:
    """Two of globex's containers on different hosts ping each other over
    globex's own 10.0.0.0/24, the range acme's network uses too, and a
    floating IP of one answers from outside."""
    console.rule("private networks")
    globex = {"tenant": "globex"}

    async def do(verb: str, body: dict[str, Any]) -> Any:
        return (await admin.command(verb, {**globex, **body})).data

    await do("network.create", {"name": "lan"})
    await do("subnet.create", {"name": "lan-v4", "network": "lan", "cidr": "10.0.0.0/24"})
    servers = {}
    for name, host in (("c1", "host-01"), ("c2", "host-02")):
        await do(
            "server.create",
            {
                "name": name,
                "image": "base",
                "vcpus": 1,
                "ram_mb": 64,
                "instance_type": "container",
                "networks": ["lan"],
                "host": host,
            },
        )
    try:
        for name in ("c1", "c2"):
            s = await _wait_for(admin, "server", {**globex, "ref": name}, "running")
            port = s["addresses"][0]
            await _wait_for(admin, "port", {**globex, "ref": port["port"]}, "active")
            servers[name] = (s["host"], port["ip"])
            console.print(f"{name} running on {s['host']} with {port['ip']} on globex's lan")
        acme = await admin.query("subnets", {"tenant": "acme"})
        console.print(
            "acme's subnet uses the same range: "
            + ", ".join(f"{x['name']} {x['cidr']}" for x in acme)
        )
        target = servers["c2"][1]
        # Bound means the port is plugged; the other host's forwarding entry
        # may follow a moment later (its agent's next pass): bounded retries.
        for _ in range(30):
            out = await do(
                "server.exec", {"ref": "c1", "command": ["ping", "-c", "2", "-W", "1", target]}
            )
            if out["exit_code"] == 0:
                break
        last = [line for line in out["stdout"].splitlines() if "packets transmitted" in line]
        console.print(
            f"c1 ({servers['c1'][0]}) pings c2 ({servers['c2'][0]}) at {target}: "
            f"{last[0] if last else out['stdout'].strip()} (exit {out['exit_code']})"
        )
        if out["exit_code"] != 0:
            raise StratusError(f"c1 could not reach c2: {out['stdout']}{out['stderr']}")
        await do("router.create", {"name": "edge", "external_network": "public"})
        await do("router.add-subnet", {"router": "edge", "subnet": "lan-v4"})
        fip = await do("floating-ip.create", {})
        await do("floating-ip.associate", {"floating_ip": fip["address"], "server": "c2"})
        await do("security-group.rule-add", {"security_group": "default", "protocol": "icmp"})
        answered = await asyncio.to_thread(_ping_from_outside, plane, fip["address"])
        console.print(
            f"floating IP {fip['address']} of c2 answers a ping from outside "
            f"(a namespace on the external network): {answered}"
        )
        if not answered:
            raise StratusError(f"floating IP {fip['address']} did not answer from outside")
    finally:
        for name in ("c1", "c2"):
            await do("server.delete", {"ref": name})
        for name in ("c1", "c2"):
            await _wait_for(admin, "servers", globex, None, gone=name)


def _ping_from_outside(plane: Any, address: str, tries: int = 20) -> bool:
    """Plug a namespace (the internet, for the demo) into the router host's
    external bridge and ping ``address`` from there; remove it afterwards."""
    from pyroute2 import IPRoute, netns

    from stratus.agents.network.kernel import run_in
    from stratus.events import network as nw

    outside = nw.check_netns_name(nw.kernel_name(plane.prefix, "instance", "outside"))
    leg = nw.kernel_name(plane.prefix, "uplink", "outside")
    bridge = nw.kernel_name(plane.prefix, "ext", "public")
    host_ns = plane.sim.netns(plane.sim.names[0])
    netns.create(outside)
    try:
        with IPRoute(netns=host_ns) as ipr:
            ipr.link("add", ifname=leg, kind="veth", peer={"ifname": "eth0", "net_ns_fd": outside})
            idx = ipr.link_lookup(ifname=leg)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0], state="up")
        with IPRoute(netns=outside) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=idx, address="203.0.113.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        # The agents wire the router and the NAT on their next pass: bounded wait.
        for _ in range(tries):
            ping = ["ping", "-n", "-c", "1", "-W", "1", address]
            if run_in(outside, ping, timeout=5).returncode == 0:
                return True
        return False
    finally:
        netns.remove(outside)  # its veth goes with it


async def _wait_for(
    client: Client,
    view: str,
    body: dict[str, Any],
    status: str | None,
    gone: str | None = None,
    timeout: float = 30.0,
) -> Any:
    """Poll a query until the resource has ``status`` (or ``gone`` left the list)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        try:
            last = await client.query(view, body)
        except NotFound:
            last = None
        if gone is not None and not any(r["name"] == gone for r in last or []):
            return last
        if status is not None and last is not None and last.get("status") == status:
            return last
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{view} {body} not {status or 'gone'} in {timeout}s: {last}")


async def _refused(
    console: Console, what: str, kind: type[StratusError], call: Awaitable[Any]
) -> None:
    """``call`` must be refused with ``kind``; the refusal is shown."""
    try:
        await call
    except kind as err:
        console.print(f"{what}: refused, {err.kind}: {escape(err.message)}")
        return
    raise AssertionError(f"{what} was not refused with {kind.kind}")


async def _wait_projected(client: Client, timeout: float = 10.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await client.query("status")
        if status["projector_lag"] == 0:
            return status
        if loop.time() > deadline:
            raise TimeoutError(f"projector still {status['projector_lag']} events behind")
        await asyncio.sleep(0.05)
