"""A realistic event log for the projection benchmark: a cloud's history.

Cloud-wide objects come first (hosts, flavors, public images, the external
network ``public`` whose pool backs floating IPs), then every tenant is
created and given a quota, then tenants act at random (seeded, so two runs
write the same shapes): networks before their subnets before their ports,
servers through their lifecycle (requested, scheduled, building, running,
stopped, started, deleting, deleted), volumes attached and detached,
floating IPs drawn from the shared pool (the pool's own allocation record on
its subject, as the handler writes it), security groups with rules, images,
renames, quota changes and deletions. Every event is a real event type that
the codec decodes, on the subject its handler would write it to.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    SYSTEM,
    AddressAllocated,
    AddressReleased,
    FlavorCreated,
    FloatingIpAssociated,
    FloatingIpCreated,
    FloatingIpDeleted,
    FloatingIpDisassociated,
    HostRegistered,
    ImageCreated,
    NetworkCreated,
    PortBound,
    PortCreated,
    PortDeleted,
    QuotaSet,
    SecurityGroupCreated,
    SecurityGroupDeleted,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemoved,
    ServerBuilding,
    ServerDeleted,
    ServerDeleting,
    ServerRebootRequested,
    ServerRequested,
    ServerRunning,
    ServerScheduled,
    ServerSpec,
    ServerStartRequested,
    ServerStopped,
    ServerStopRequested,
    SubnetCreated,
    VolumeAttached,
    VolumeCreated,
    VolumeDeleted,
    VolumeDetached,
)
from stratus.events.tenants import KIND as TENANT
from stratus.events.tenants import TenantCreated, TenantRenamed

HOSTS = 20
FLAVORS = {"m1.small": (1, 2048, 20), "m1.medium": (2, 4096, 40), "m1.large": (4, 8192, 80)}
POOL_CIDR = "198.18.0.0/15"
# Per-tenant caps: past them a tenant deletes before it creates again, so
# the live world (and this generator's memory) stays bounded.
MAX_SERVERS = 12
MAX_NETWORKS = 3
MAX_VOLUMES = 6
MAX_FIPS = 3
MAX_SGS = 3
QUOTA = {
    "instances": 100,
    "vcpus": 400,
    "ram_mb": 819200,
    "volumes": 50,
    "volume_gb": 5000,
    "networks": 10,
    "subnets": 10,
    "ports": 200,
    "floating_ips": 10,
    "security_groups": 10,
}


@dataclass
class _Tenant:
    id: str
    name: str
    renames: int = 0
    images: list[str] = field(default_factory=list)
    # network id -> (subnet id, subnet cidr, next host number)
    networks: dict[str, list[Any]] = field(default_factory=dict)
    # server id -> [status, host, port id or ""]
    servers: dict[str, list[str]] = field(default_factory=dict)
    # volume id -> attached server or ""
    volumes: dict[str, str] = field(default_factory=dict)
    # floating ip id -> [address, port or ""]
    fips: dict[str, list[str]] = field(default_factory=dict)
    # security group id -> rule ids
    sgs: dict[str, list[str]] = field(default_factory=dict)
    made: int = 0


class Workload:
    """Yields actions (the events one command or agent report would append,
    at most a few) of a cloud with ``tenants`` tenants."""

    def __init__(
        self, tenants: int = 1000, *, seed: int = 4, start: datetime | None = None
    ) -> None:
        self.rng = random.Random(seed)
        self.tenant_count = tenants
        self.tenants: list[_Tenant] = []
        self.at = start or datetime.now(UTC) - timedelta(days=30)
        self.pool = ipaddress.ip_network(POOL_CIDR)
        self.free_addresses: list[str] = []
        self.next_address = 10
        self.counts: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------

    def _cause(self, actor: str) -> Cause:
        # Every action a little later than the last: the log's times rise.
        self.at += timedelta(milliseconds=self.rng.randint(1, 40))
        cid = new_id()
        return Cause(actor=actor, correlation_id=cid, causation_id=cid, at=self.at)

    def _address(self) -> str:
        if self.free_addresses and self.rng.random() < 0.5:
            return self.free_addresses.pop(self.rng.randrange(len(self.free_addresses)))
        a = str(self.pool[self.next_address])
        self.next_address += 1
        return a

    @staticmethod
    def _mac(pid: str) -> str:
        h = pid.replace("-", "")[-10:]
        return "fa:16:3e:" + ":".join(h[i : i + 2] for i in range(0, 6, 2))

    # -- the log -----------------------------------------------------------------

    def actions(self) -> Iterator[list[Event]]:
        """Endless: system setup, tenants, then their activity."""
        yield from self._system()
        for i in range(self.tenant_count):
            tid = f"t{i:04d}"
            t = _Tenant(tid, tid)
            self.tenants.append(t)
            c = self._cause("admin")
            yield [c.make(TenantCreated, tid, TENANT, tid, name=tid, description="bench tenant")]
            c = self._cause("admin")
            yield [c.make(QuotaSet, tid, "quota", tid, limits=dict(QUOTA))]
        while True:
            yield self._act(self.rng.choice(self.tenants))

    def filler(self) -> list[Event]:
        """One single-event action (a rename), to end on an exact count."""
        return self._rename(self.rng.choice(self.tenants))

    def _system(self) -> Iterator[list[Event]]:
        for i in range(HOSTS):
            name = f"host{i:03d}"
            c = self._cause("agent")
            yield [
                c.make(
                    HostRegistered,
                    SYSTEM,
                    "host",
                    name,
                    name=name,
                    vcpus=64,
                    ram_mb=262144,
                    disk_gb=4000,
                    zone=f"zone{i % 2}",
                )
            ]
        for name, (vcpus, ram, disk) in FLAVORS.items():
            c = self._cause("admin")
            yield [
                c.make(
                    FlavorCreated,
                    SYSTEM,
                    "flavor",
                    name,
                    name=name,
                    vcpus=vcpus,
                    ram_mb=ram,
                    disk_gb=disk,
                )
            ]
        for name in ("debian-12", "ubuntu-24.04"):
            c = self._cause("admin")
            yield [
                c.make(
                    ImageCreated,
                    SYSTEM,
                    "image",
                    name,
                    name=name,
                    size_bytes=512 << 20,
                    visibility="public",
                )
            ]
        c = self._cause("admin")
        yield [
            c.make(
                NetworkCreated,
                SYSTEM,
                "network",
                "public",
                name="public",
                external=True,
                cidr=POOL_CIDR,
                gateway=str(self.pool[1]),
                pool_start=str(self.pool[10]),
                pool_end=str(self.pool[-2]),
            )
        ]

    def _act(self, t: _Tenant) -> list[Event]:
        r = self.rng.random()
        if r < 0.45:
            return self._server_step(t)
        if r < 0.53:
            return self._network(t)
        if r < 0.63:
            return self._volume(t)
        if r < 0.73:
            return self._fip(t)
        if r < 0.85:
            return self._sg(t)
        if r < 0.88:
            return self._image(t)
        if r < 0.90:
            return self._rename(t)
        if r < 0.91:
            c = self._cause("admin")
            limits = dict(QUOTA, instances=self.rng.choice((50, 100, 200)))
            return [c.make(QuotaSet, t.id, "quota", t.id, limits=limits)]
        return self._server_step(t)

    def _rename(self, t: _Tenant) -> list[Event]:
        t.renames += 1
        name = f"{t.id}-r{t.renames}"
        c = self._cause("admin")
        ev = c.make(TenantRenamed, t.id, TENANT, t.id, name=name, previous=t.name)
        t.name = name
        return [ev]

    def _image(self, t: _Tenant) -> list[Event]:
        t.made += 1
        iid = new_id()
        t.images.append(iid)
        c = self._cause(f"user-{t.id}")
        return [
            c.make(
                ImageCreated,
                t.id,
                "image",
                iid,
                name=f"img{t.made}",
                size_bytes=self.rng.randint(1, 4096) << 20,
                checksum=f"{self.rng.getrandbits(256):064x}",
            )
        ]

    def _network(self, t: _Tenant) -> list[Event]:
        if len(t.networks) >= MAX_NETWORKS:
            # A network with no ports left: leave it, others are still busy.
            return self._server_step(t)
        t.made += 1
        nid, sid = new_id(), new_id()
        n = len(t.networks)
        cidr = f"10.{n}.0.0/24"
        c = self._cause(f"user-{t.id}")
        t.networks[nid] = [sid, cidr, 10]
        return [
            c.make(NetworkCreated, t.id, "network", nid, name=f"net{t.made}", cidr=cidr),
            c.make(
                SubnetCreated,
                t.id,
                "subnet",
                sid,
                name=f"sub{t.made}",
                network=nid,
                cidr=cidr,
                gateway=f"10.{n}.0.1",
                pool_start=f"10.{n}.0.10",
                pool_end=f"10.{n}.0.250",
                dns=["198.51.100.53"],
            ),
        ]

    def _port(self, t: _Tenant, c: Cause, server: str, sgs: list[str]) -> PortCreated | None:
        if not t.networks:
            return None
        nid = self.rng.choice(list(t.networks))
        sub = t.networks[nid]
        host = sub[2]
        sub[2] = 10 + (host - 9) % 240
        pid = new_id()
        prefix = sub[1].rsplit(".", 1)[0]
        return c.make(
            PortCreated,
            t.id,
            "port",
            pid,
            name=f"port-{pid[-6:]}",
            network=nid,
            subnet=sub[0],
            mac=self._mac(pid),
            ip=f"{prefix}.{host}",
            device=server,
            device_owner="compute",
            security_groups=sgs,
        )

    def _server_step(self, t: _Tenant) -> list[Event]:
        if not t.servers or (len(t.servers) < MAX_SERVERS and self.rng.random() < 0.2):
            return self._server_create(t)
        sid = self.rng.choice(list(t.servers))
        s = t.servers[sid]
        status, host, port = s
        agent = self._cause(f"agent-{host}" if host else "scheduler")
        user = self._cause(f"user-{t.id}")
        if status == "requested":
            host = f"host{self.rng.randrange(HOSTS):03d}"
            s[:2] = ["scheduled", host]
            return [
                agent.make(
                    ServerScheduled,
                    t.id,
                    "server",
                    sid,
                    host=host,
                    scheduling={"weighed": HOSTS, "chosen": host},
                )
            ]
        if status == "scheduled":
            s[0] = "building"
            return [agent.make(ServerBuilding, t.id, "server", sid, host=host)]
        if status == "building":
            s[0] = "running"
            out: list[Event] = [
                agent.make(ServerRunning, t.id, "server", sid, host=host, disk=f"/srv/{sid}.qcow2")
            ]
            if port:
                out.append(agent.make(PortBound, t.id, "port", port, host=host))
            return out
        if status == "stop-requested":
            s[0] = "stopped"
            return [agent.make(ServerStopped, t.id, "server", sid)]
        if status == "start-requested":
            s[0] = "running"
            return [agent.make(ServerRunning, t.id, "server", sid, host=host)]
        if status == "deleting":
            return self._server_gone(t, sid, agent)
        r = self.rng.random()
        if status == "running":
            if r < 0.4:
                s[0] = "stop-requested"
                return [user.make(ServerStopRequested, t.id, "server", sid)]
            if r < 0.6:
                return [user.make(ServerRebootRequested, t.id, "server", sid)]
            return self._server_delete(t, sid, user)
        # stopped
        if r < 0.6:
            s[0] = "start-requested"
            return [user.make(ServerStartRequested, t.id, "server", sid)]
        return self._server_delete(t, sid, user)

    def _server_create(self, t: _Tenant) -> list[Event]:
        if len(t.servers) >= MAX_SERVERS:
            return self._server_delete(t, self.rng.choice(list(t.servers)), self._cause("user"))
        t.made += 1
        flavor = self.rng.choice(list(FLAVORS))
        vcpus, ram, disk = FLAVORS[flavor]
        sid = new_id()
        c = self._cause(f"user-{t.id}")
        sgs = list(t.sgs)[:1]
        port = self._port(t, c, sid, sgs)
        image = self.rng.choice(t.images) if t.images else "debian-12"
        spec = ServerSpec(
            name=f"vm{t.made}",
            image=image,
            flavor=flavor,
            vcpus=vcpus,
            ram_mb=ram,
            disk_gb=disk,
            networks=[port.network] if port else [],
            security_groups=sgs,
            labels={"app": self.rng.choice(("web", "db", "cache", "batch"))},
        )
        ev = c.make(ServerRequested, t.id, "server", sid, spec=spec)
        t.servers[sid] = ["requested", "", port.aggregate.id if port else ""]
        return [ev, port] if port else [ev]

    def _server_delete(self, t: _Tenant, sid: str, c: Cause) -> list[Event]:
        s = t.servers[sid]
        if s[0] in ("requested", "deleting"):
            return self._server_gone(t, sid, c)
        s[0] = "deleting"
        return [c.make(ServerDeleting, t.id, "server", sid)]

    def _server_gone(self, t: _Tenant, sid: str, c: Cause) -> list[Event]:
        _status, _host, port = t.servers.pop(sid)
        out: list[Event] = []
        for vid, on in t.volumes.items():
            if on == sid:
                t.volumes[vid] = ""
                out.append(c.make(VolumeDetached, t.id, "volume", vid, server=sid))
        for f in t.fips.values():
            if port and f[1] == port:
                f[1] = ""
        out.append(c.make(ServerDeleted, t.id, "server", sid))
        if port:
            out.append(c.make(PortDeleted, t.id, "port", port))
        return out

    def _volume(self, t: _Tenant) -> list[Event]:
        c = self._cause(f"user-{t.id}")
        r = self.rng.random()
        if not t.volumes or (len(t.volumes) < MAX_VOLUMES and r < 0.35):
            t.made += 1
            vid = new_id()
            t.volumes[vid] = ""
            size = self.rng.choice((10, 20, 50, 100))
            return [c.make(VolumeCreated, t.id, "volume", vid, name=f"vol{t.made}", size_gb=size)]
        vid = self.rng.choice(list(t.volumes))
        on = t.volumes[vid]
        if on:
            t.volumes[vid] = ""
            return [c.make(VolumeDetached, t.id, "volume", vid, server=on)]
        running = [s for s, v in t.servers.items() if v[0] == "running"]
        if running and r < 0.8:
            sid = self.rng.choice(running)
            t.volumes[vid] = sid
            return [c.make(VolumeAttached, t.id, "volume", vid, server=sid)]
        del t.volumes[vid]
        return [c.make(VolumeDeleted, t.id, "volume", vid)]

    def _fip(self, t: _Tenant) -> list[Event]:
        c = self._cause(f"user-{t.id}")
        if not t.fips or (len(t.fips) < MAX_FIPS and self.rng.random() < 0.4):
            fid = new_id()
            address = self._address()
            t.fips[fid] = [address, ""]
            return [
                c.make(
                    FloatingIpCreated, t.id, "floating-ip", fid, address=address, network="public"
                ),
                c.make(
                    AddressAllocated,
                    SYSTEM,
                    "network",
                    "public",
                    address=address,
                    holder_tenant=t.id,
                    holder=fid,
                ),
            ]
        fid = self.rng.choice(list(t.fips))
        address, port = t.fips[fid]
        if port:
            t.fips[fid][1] = ""
            return [c.make(FloatingIpDisassociated, t.id, "floating-ip", fid, port=port)]
        bound = [(s, v[2]) for s, v in t.servers.items() if v[2] and v[0] == "running"]
        if bound and self.rng.random() < 0.7:
            sid, pid = self.rng.choice(bound)
            t.fips[fid][1] = pid
            prefix = "10.0.0"
            return [
                c.make(
                    FloatingIpAssociated,
                    t.id,
                    "floating-ip",
                    fid,
                    port=pid,
                    server=sid,
                    fixed_ip=f"{prefix}.{self.rng.randint(10, 250)}",
                )
            ]
        del t.fips[fid]
        self.free_addresses.append(address)
        return [
            c.make(FloatingIpDeleted, t.id, "floating-ip", fid),
            c.make(
                AddressReleased,
                SYSTEM,
                "network",
                "public",
                address=address,
                holder_tenant=t.id,
                holder=fid,
            ),
        ]

    def _sg(self, t: _Tenant) -> list[Event]:
        c = self._cause(f"user-{t.id}")
        r = self.rng.random()
        if not t.sgs or (len(t.sgs) < MAX_SGS and r < 0.2):
            t.made += 1
            gid = new_id()
            t.sgs[gid] = []
            return [
                c.make(
                    SecurityGroupCreated,
                    t.id,
                    "security-group",
                    gid,
                    name=f"sg{t.made}",
                    description="bench group",
                )
            ]
        gid = self.rng.choice(list(t.sgs))
        rules = t.sgs[gid]
        if len(rules) < 6 and r < 0.7:
            rid = new_id()
            rules.append(rid)
            port = self.rng.choice((22, 80, 443, 5432, 6379))
            return [
                c.make(
                    SecurityGroupRuleAdded,
                    t.id,
                    "security-group",
                    gid,
                    rule=rid,
                    direction="ingress",
                    protocol="tcp",
                    port_min=port,
                    port_max=port,
                    remote_cidr="0.0.0.0/0",
                )
            ]
        if rules and r < 0.9:
            rid = rules.pop(self.rng.randrange(len(rules)))
            return [c.make(SecurityGroupRuleRemoved, t.id, "security-group", gid, rule=rid)]
        # Servers are created in the first group: it is never deleted.
        if gid == next(iter(t.sgs)):
            rid = new_id()
            rules.append(rid)
            return [
                c.make(
                    SecurityGroupRuleAdded,
                    t.id,
                    "security-group",
                    gid,
                    rule=rid,
                    direction="egress",
                    protocol="any",
                )
            ]
        del t.sgs[gid]
        return [c.make(SecurityGroupDeleted, t.id, "security-group", gid)]


def batches(w: Workload, n: int, size: int) -> Iterator[list[Event]]:
    """Exactly ``n`` events of ``w`` in batches of at most ``size``; an
    action's events never straddle two batches (each is one atomic append)."""
    it = w.actions()
    left = n
    batch: list[Event] = []
    while left > 0:
        action = next(it)
        if len(action) > left:
            action = w.filler()
        if len(batch) + len(action) > size:
            yield batch
            batch = []
        batch.extend(action)
        left -= len(action)
        for e in action:
            k = e.type_name()
            w.counts[k] = w.counts.get(k, 0) + 1
    if batch:
        yield batch
