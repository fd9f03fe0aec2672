"""The inventory's pure decisions, without NATS: address ranges, allocation,
the tenant world's usage and quota, and each decide_* function's refusals.

A decision is run on a World and its events folded back in, as the command
service does, so a sequence of commands here is a history in miniature.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus.events.catalog import EVENT_TYPES
from stratus.events.errors import (
    AlreadyExists,
    Conflict,
    Invalid,
    NotFound,
    QuotaExceeded,
    StratusError,
)
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    QUOTA_DEFAULTS,
    SYSTEM,
    AddressAllocated,
    AddressReleased,
    FlavorCreate,
    FlavorDelete,
    FloatingIpAssociate,
    FloatingIpAssociated,
    FloatingIpCreate,
    FloatingIpDisassociated,
    HostRegister,
    HostRegistered,
    HostSetEnabled,
    HostUpdated,
    ImageActivated,
    ImageCreate,
    NetworkCreate,
    PortCreate,
    PortCreated,
    PortDeleted,
    QosPolicyCreate,
    QuotaSet,
    QuotaSetCommand,
    RefCommand,
    ResourceEvent,
    RouterCreate,
    RouterInterface,
    RouterInterfaceAdded,
    RouterInterfaceRemoved,
    SecurityGroupCreate,
    SecurityGroupCreated,
    SecurityGroupRuleAdd,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemove,
    SecurityGroupRuleRemoved,
    ServerCreate,
    ServerGroupCreate,
    ServerRequested,
    ServerRunning,
    ServerScheduled,
    ServerSpec,
    ServerStopRequested,
    SubnetCreate,
    VolumeAttach,
    VolumeCreate,
    VolumeDetached,
)
from stratus.events.tenants import TenantCreated, TenantDeleted
from stratus.handlers import (
    addressing,
    images,
    networks,
    quota,
    routers,
    security_groups,
    servers,
    system,
    volumes,
)
from stratus.handlers.records import (
    RECORDS,
    Flavor,
    FloatingIp,
    Image,
    Network,
    Port,
    Router,
    Rule,
    Server,
    view,
)
from stratus.handlers.world import Aggregate, World, fold, fold_aggregate

CAUSE = Cause(actor="test", correlation_id="corr", causation_id="corr")
IMAGE = Image(name="img", id="img", status="active")


# -- a miniature command service -------------------------------------------------


def world(tenant: str = "acme", defaults: dict[str, int] | None = None) -> World:
    w = World(defaults)
    fold(w, CAUSE.make(TenantCreated, tenant, "tenant", tenant, name=tenant))
    return w


def apply(w: World, events: list[Event], pool: Aggregate | None = None) -> list[Event]:
    """Fold what a decision made into the states its subjects belong to."""
    for e in events:
        if e.tenant == w.tenant:
            fold(w, e)
        elif pool is not None and e.tenant == SYSTEM:
            fold_aggregate(pool, e)
    return events


def do(w: World, decide: Any, cmd: Any) -> list[Event]:
    return apply(w, decide(w, cmd, CAUSE))


def snapshot(w: World) -> bytes:
    return msgspec.json.encode([w.limits, *(t.by_id for t in w.tables.values())])


def refused(w: World, decide: Any, cmd: Any, error: type[StratusError], words: str) -> None:
    """The decision refuses with ``error`` naming ``words``; the world is untouched."""
    before = snapshot(w)
    with pytest.raises(error) as err:
        decide(w, cmd, CAUSE)
    assert words in err.value.message, err.value.message
    assert snapshot(w) == before


def network(w: World, name: str = "lan", cidr: str | None = "10.0.0.0/24", **sub: Any) -> str:
    segments = Aggregate()  # the VXLAN segment pool, for this network alone
    nid = apply(
        w,
        networks.decide_network_create(
            (w, segments), NetworkCreate(tenant=w.tenant, name=name), CAUSE
        ),
    )[0]
    if cidr is not None:
        cmd = SubnetCreate(tenant=w.tenant, name=f"{name}-sub", network=name, cidr=cidr, **sub)
        do(w, networks.decide_subnet_create, cmd)
    return nid.aggregate.id


def port(w: World, name: str, net: str = "lan", **kw: Any) -> Port:
    do(w, networks.decide_port_create, PortCreate(tenant=w.tenant, name=name, network=net, **kw))
    return w.ports.find(name)


def server(w: World, name: str, *, networks: list[str] | None = None, **kw: Any) -> Server:
    kw.setdefault("vcpus", 1)
    kw.setdefault("ram_mb", 128)
    cmd = ServerCreate(tenant=w.tenant, name=name, image="img", networks=networks or [], **kw)
    do(w, servers.decide_server_create, servers.ServerPlan(cmd, None, IMAGE))
    return w.servers.find(name)


def router(w: World, name: str) -> Router:
    cmd = RouterCreate(tenant=w.tenant, name=name)
    apply(w, routers.decide_router_create(w, routers.RouterPlan(cmd, None), CAUSE))
    return w.routers.find(name)


def public_pool(cidr: str = "203.0.113.0/29", **kw: Any) -> Aggregate:
    pool = Aggregate()
    cmd = NetworkCreate(name="public", external=True, cidr=cidr, **kw)
    for e in routers.decide_external_network_create(pool, cmd, CAUSE):
        fold_aggregate(pool, e)
    return pool


def fip(w: World, pool: Aggregate) -> FloatingIp:
    events = routers.decide_fip_create((w, pool), FloatingIpCreate(tenant=w.tenant), CAUSE)
    apply(w, events, pool)
    return w.floating_ips.by_id[events[0].aggregate.id]


def ref(w: World, what: str) -> RefCommand:
    return RefCommand(tenant=w.tenant, ref=what)


# -- address_range ---------------------------------------------------------------


def test_address_range_defaults_are_neutrons():
    assert addressing.address_range("10.0.0.0/24", None, None, None, "subnet") == addressing.Range(
        "10.0.0.1", "10.0.0.2", "10.0.0.254"
    )
    # the smallest usable prefix: one gateway, one address to hand out
    assert addressing.address_range("10.0.0.0/30", None, None, None, "subnet") == addressing.Range(
        "10.0.0.1", "10.0.0.2", "10.0.0.2"
    )


def test_address_range_custom_gateway_and_pool():
    got = addressing.address_range("192.168.5.0/24", "192.168.5.254", None, None, "subnet")
    # the gateway moved off the first host: the pool starts there
    assert (got.gateway, got.start) == ("192.168.5.254", "192.168.5.1")
    got = addressing.address_range(
        "192.168.5.0/24", None, "192.168.5.100", "192.168.5.199", "subnet"
    )
    assert got == addressing.Range("192.168.5.1", "192.168.5.100", "192.168.5.199")


@pytest.mark.parametrize(
    ("cidr", "gateway", "start", "end", "words"),
    [
        ("10.0.0.0/24", "10.0.1.1", None, None, "gateway 10.0.1.1 is not a host address"),
        ("10.0.0.0/24", "10.0.0.255", None, None, "gateway 10.0.0.255 is not a host address"),
        ("10.0.0.0/24", None, "10.0.0.0", None, "pool start 10.0.0.0 is not a host address"),
        ("10.0.0.0/24", None, None, "10.0.0.255", "pool end 10.0.0.255 is not a host address"),
        ("10.0.0.0/24", None, "10.0.0.9", "10.0.0.8", "pool start 10.0.0.9 is after its end"),
        ("10.0.0.0/31", None, None, None, "too small"),
        ("10.0.0.5/32", None, None, None, "too small"),
        ("2001:db8::/127", None, None, None, "too small"),
        ("10.0.0.1/24", None, None, None, "host bits set"),
        ("10.0.0.0/33", None, None, None, "subnet cidr"),
        ("nonsense", None, None, None, "subnet cidr"),
        ("10.0.0.0/24", "10.0.0.x", None, None, "subnet gateway"),
        ("10.0.0.0/24", "2001:db8::1", None, None, "is not a host address"),
    ],
)
def test_address_range_refuses_what_is_not_a_usable_range(cidr, gateway, start, end, words):
    with pytest.raises(Invalid) as err:
        addressing.address_range(cidr, gateway, start, end, "subnet")
    assert words in err.value.message


def test_address_range_ipv6():
    got = addressing.address_range("2001:db8:1::/64", None, None, None, "subnet")
    assert got.gateway == "2001:db8:1::1" and got.start == "2001:db8:1::2"
    assert ipaddress.ip_address(got.end) in ipaddress.ip_network("2001:db8:1::/64")
    got = addressing.address_range("2001:db8::/126", None, None, None, "subnet")
    assert got == addressing.Range("2001:db8::1", "2001:db8::2", "2001:db8::2")


# -- _first_free -----------------------------------------------------------------


def test_first_free_skips_taken_addresses_and_refuses_when_exhausted():
    assert addressing.first_free("10.0.0.2", "10.0.0.4", set(), "s") == "10.0.0.2"
    assert addressing.first_free("10.0.0.2", "10.0.0.4", {"10.0.0.2"}, "s") == "10.0.0.3"
    assert (
        addressing.first_free("2001:db8::2", "2001:db8::3", {"2001:db8::2"}, "s") == "2001:db8::3"
    )
    with pytest.raises(Conflict) as err:
        addressing.first_free(
            "10.0.0.2", "10.0.0.4", {"10.0.0.2", "10.0.0.3", "10.0.0.4"}, "subnet lan"
        )
    assert "subnet lan: no free address left (10.0.0.2 to 10.0.0.4" in err.value.message


# -- the world: fold, usage, quota -------------------------------------------------


def test_usage_is_counted_from_the_resources_folded():
    w = world()
    network(w)
    server(w, "a", networks=["lan"], vcpus=2, ram_mb=256)
    server(w, "b", vcpus=3, ram_mb=512)
    do(w, volumes.decide_volume_create, VolumeCreate(tenant="acme", name="v", size_gb=7))
    used = quota.usage(w)
    assert used["instances"] == 2 and used["vcpus"] == 5 and used["ram_mb"] == 768
    assert used["volumes"] == 1 and used["volume_gb"] == 7
    assert used["networks"] == 1 and used["subnets"] == 1 and used["ports"] == 1
    # the default security group was made on first use, once
    assert used["security_groups"] == 1
    # a deleted server frees what it held, its port too
    do(w, servers.decide_server_delete, ref(w, "a"))
    used = quota.usage(w)
    assert (used["instances"], used["vcpus"], used["ports"]) == (1, 3, 0)


def test_fold_ignores_changes_to_unknown_resources_and_follows_the_tenant():
    w = world()
    orphan = CAUSE.make(VolumeDetached, "acme", "volume", "nope", server="s")
    fold(w, orphan)
    assert len(w.volumes) == 0
    fold(w, CAUSE.make(TenantDeleted, "acme", "tenant", "acme"))
    assert w.deleted
    with pytest.raises(NotFound, match="tenant acme not found"):
        volumes.decide_volume_create(w, VolumeCreate(tenant="acme", name="v", size_gb=1), CAUSE)


# Events whose fields fold into a map of their resource, not into its own fields.
MAPPED = (SecurityGroupRuleRemoved, RouterInterfaceAdded, RouterInterfaceRemoved)


def test_records_hold_every_field_of_their_events():
    """An event field its kind's record does not keep would be lost to every
    decision and reply: a new field must be added to the record too."""
    checked = 0
    for cls in EVENT_TYPES:
        record = RECORDS.get(cls.type_name().split(".")[0])
        if record is None or not issubclass(cls, ResourceEvent) or cls in MAPPED:
            continue
        keeps = Rule if cls is SecurityGroupRuleAdded else record
        lost = set(cls.payload_fields()) - set(keeps.__struct_fields__)
        assert not lost, f"{cls.type_name()}: {keeps.__name__} does not keep {sorted(lost)}"
        if cls.begins:
            fields = msgspec.structs.fields(record)
            needed = {f.name for f in fields if f.required}
            assert needed <= set(cls.payload_fields()), cls.type_name()
        checked += 1
    assert checked >= 30


def test_a_reply_shows_what_the_log_said_of_the_resource_and_nothing_more():
    w = world()
    s = server(w, "a")
    # a new server: its request's fields, then id, tenant and status
    assert list(view(s)) == [*ServerSpec.__struct_fields__, "id", "tenant", "status"]
    fold(w, CAUSE.make(ServerScheduled, "acme", "server", s.id, host="h1"))
    shown = view(s)
    assert (shown["host"], shown["status"], shown["scheduling"]) == ("h1", "scheduled", {})
    assert "disk" not in shown and "reason" not in shown
    # nested maps become lists in a stable order
    do(w, security_groups.decide_sg_create, SecurityGroupCreate(tenant="acme", name="web"))
    assert "rules" not in view(w.security_groups.find("web"))
    add = SecurityGroupRuleAdd(tenant="acme", security_group="web", port_min=22)
    (added,) = do(w, security_groups.decide_sg_rule_add, add)
    assert view(w.security_groups.find("web"))["rules"] == [
        {
            "rule": added.rule,
            "direction": "ingress",
            "protocol": "tcp",
            "port_min": 22,
            "port_max": 22,
            "remote_cidr": "",
            "remote_group": "",
        }
    ]


def test_check_quota_names_the_resource_its_limit_and_usage():
    w = world(defaults={"vcpus": 4})
    server(w, "a", vcpus=3)
    with pytest.raises(QuotaExceeded) as err:
        quota.check(w, {"vcpus": 2})
    assert err.value.message == "vcpus 3 of 4 in use (asked for 2 more) in tenant acme"
    quota.check(w, {"vcpus": 1})  # exactly at the limit is fine
    quota.check(w, {"vcpus": 0, "instances": 0})
    # the decision itself refuses, and nothing is folded
    cmd = ServerCreate(tenant="acme", name="b", image="img", vcpus=2, ram_mb=1)
    plan = servers.ServerPlan(cmd, None, IMAGE)
    refused(w, servers.decide_server_create, plan, QuotaExceeded, "vcpus 3 of 4 in use")


def test_minus_one_is_unlimited_and_set_limits_override_defaults():
    w = world(defaults={"volumes": 1})
    do(w, quota.decide_quota_set, QuotaSetCommand(tenant="acme", limits={"volumes": -1}))
    assert quota.limit(w, "volumes") == -1 and quota.limit(w, "instances") == 10
    for i in range(25):
        do(w, volumes.decide_volume_create, VolumeCreate(tenant="acme", name=f"v{i}", size_gb=1))
    assert quota.usage(w)["volumes"] == 25


def test_lowering_a_limit_below_usage_blocks_only_new_allocations():
    w = world()
    for i in range(3):
        do(w, volumes.decide_volume_create, VolumeCreate(tenant="acme", name=f"v{i}", size_gb=1))
    events = do(w, quota.decide_quota_set, QuotaSetCommand(tenant="acme", limits={"volumes": 1}))
    assert isinstance(events[0], QuotaSet) and events[0].limits["volumes"] == 1
    # every limit is written down, so a later change of defaults moves nothing
    assert set(events[0].limits) == set(QUOTA_DEFAULTS)
    cmd = VolumeCreate(tenant="acme", name="v9", size_gb=1)
    refused(w, volumes.decide_volume_create, cmd, QuotaExceeded, "volumes 3 of 1 in use")
    do(w, volumes.decide_volume_delete, ref(w, "v0"))
    do(w, volumes.decide_volume_delete, ref(w, "v1"))
    refused(w, volumes.decide_volume_create, cmd, QuotaExceeded, "volumes 1 of 1 in use")
    do(w, volumes.decide_volume_delete, ref(w, "v2"))
    do(w, volumes.decide_volume_create, cmd)


def test_quota_set_refuses_unknown_resources_and_repeats_are_no_ops():
    w = world()
    cmd = QuotaSetCommand(tenant="acme", limits={"gpus": 1, "vcpus": 2})
    refused(w, quota.decide_quota_set, cmd, Invalid, "unknown quota gpus; known: floating_ips")
    do(w, quota.decide_quota_set, QuotaSetCommand(tenant="acme", limits={"vcpus": 2}))
    assert (
        quota.decide_quota_set(w, QuotaSetCommand(tenant="acme", limits={"vcpus": 2}), CAUSE) == []
    )
    gone = world("gone")
    fold(gone, CAUSE.make(TenantDeleted, "gone", "tenant", "gone"))
    cmd = QuotaSetCommand(tenant="gone", limits={"vcpus": 2})
    refused(gone, quota.decide_quota_set, cmd, NotFound, "tenant gone not found")


# -- not found and duplicate names -------------------------------------------------------


def test_references_to_missing_resources_are_not_found():
    w = world()
    refused(w, volumes.decide_volume_delete, ref(w, "nope"), NotFound, "volume nope not found")
    cmd = SubnetCreate(tenant="acme", name="s", network="nope", cidr="10.0.0.0/24")
    refused(
        w, networks.decide_subnet_create, cmd, NotFound, "network nope not found in tenant acme"
    )
    cmd = PortCreate(tenant="acme", name="p", network="nope")
    refused(w, networks.decide_port_create, cmd, NotFound, "network nope not found")
    refused(
        w, security_groups.decide_sg_delete, ref(w, "x"), NotFound, "security group x not found"
    )
    refused(w, routers.decide_fip_disassociate, ref(w, "1.2.3.4"), NotFound, "floating ip 1.2.3.4")
    cmd = ServerCreate(tenant="acme", name="s", image="nope", vcpus=1, ram_mb=1)
    refused(
        w, servers.decide_server_create, servers.ServerPlan(cmd, None, None), NotFound, "image nope"
    )


def test_names_are_unique_per_kind_within_a_tenant_only():
    w = world()
    do(w, volumes.decide_volume_create, VolumeCreate(tenant="acme", name="data", size_gb=1))
    cmd = VolumeCreate(tenant="acme", name="data", size_gb=2)
    refused(
        w, volumes.decide_volume_create, cmd, AlreadyExists, "a volume named data already exists"
    )
    # another kind, or another tenant, may use the name
    network(w, "data", cidr=None)
    other = world("globex")
    do(other, volumes.decide_volume_create, VolumeCreate(tenant="globex", name="data", size_gb=1))
    # and a name is free again once its owner is gone
    do(w, volumes.decide_volume_delete, ref(w, "data"))
    do(w, volumes.decide_volume_create, cmd)
    assert w.volumes.find("data").size_gb == 2


# -- networks, subnets, ports ------------------------------------------------------------


def test_tenant_networks_cannot_be_external():
    w = world()
    cmd = NetworkCreate(tenant="acme", name="pub", external=True, cidr="203.0.113.0/24")
    refused(
        w,
        lambda w, c, k: networks.decide_network_create((w, None), c, k),
        cmd,
        Invalid,
        "belong to external networks",
    )


def test_overlapping_subnets_are_refused_within_a_network_only():
    w = world()
    network(w, "lan", "10.0.0.0/24")
    cmd = SubnetCreate(tenant="acme", name="b", network="lan", cidr="10.0.0.128/25")
    refused(w, networks.decide_subnet_create, cmd, Invalid, "overlaps subnet lan-sub (10.0.0.0/24)")
    # the same prefix on another network, or in another tenant, is fine
    network(w, "lan2", "10.0.0.0/24")
    other = world("globex")
    network(other, "lan", "10.0.0.0/24")
    # and an IPv6 prefix beside the IPv4 one on the same network
    v6 = SubnetCreate(tenant="acme", name="v6", network="lan", cidr="2001:db8::/64")
    made = do(w, networks.decide_subnet_create, v6)
    assert made[0].ip_version == 6 and made[0].gateway == "2001:db8::1"
    bad_dns = SubnetCreate(
        tenant="acme", name="d", network="lan", cidr="10.9.0.0/24", dns=["8.8.8.8", "dns"]
    )
    refused(w, networks.decide_subnet_create, bad_dns, Invalid, "dns server")


def test_ports_get_free_addresses_and_refuse_used_or_foreign_ones():
    w = world()
    network(w, "lan", "10.0.0.0/24")
    a, b = port(w, "a"), port(w, "b")
    assert (a.ip, b.ip) == ("10.0.0.2", "10.0.0.3")
    assert a.mac.startswith("fa:16:3e:") and a.mac != b.mac
    used = PortCreate(tenant="acme", name="c", network="lan", ip="10.0.0.3")
    refused(w, networks.decide_port_create, used, Conflict, "ip 10.0.0.3 is already in use")
    outside = PortCreate(tenant="acme", name="c", network="lan", ip="10.1.0.3")
    refused(w, networks.decide_port_create, outside, Invalid, "ip 10.1.0.3 is not a usable address")
    gateway = PortCreate(tenant="acme", name="c", network="lan", ip="10.0.0.1")
    refused(w, networks.decide_port_create, gateway, Invalid, "ip 10.0.0.1 is not a usable address")
    # an address outside the pool but inside the subnet may be asked for
    assert port(w, "c", ip="10.0.0.254").ip == "10.0.0.254"
    # a freed address is handed out again
    do(w, networks.decide_port_delete, ref(w, "a"))
    assert port(w, "d").ip == "10.0.0.2"
    # a network without a subnet gives ports without an address, and no chosen one
    network(w, "bare", cidr=None)
    assert port(w, "e", net="bare").ip == ""
    cmd = PortCreate(tenant="acme", name="f", network="bare", ip="10.0.0.9")
    refused(w, networks.decide_port_create, cmd, Invalid, "network bare has no subnet")
    cmd = PortCreate(tenant="acme", name="f", network="bare", subnet="lan-sub")
    refused(w, networks.decide_port_create, cmd, Invalid, "subnet lan-sub is not on network bare")


def test_a_full_subnet_refuses_the_next_port():
    w = world()
    network(w, "lan", "10.0.0.0/29", pool_start="10.0.0.5", pool_end="10.0.0.6")
    assert [port(w, n).ip for n in ("a", "b")] == ["10.0.0.5", "10.0.0.6"]
    cmd = PortCreate(tenant="acme", name="c", network="lan")
    refused(w, networks.decide_port_create, cmd, Conflict, "subnet lan-sub: no free address left")


def test_a_gateway_inside_the_pool_is_never_handed_out():
    # given a gateway the caller put in the middle of the default pool
    w = world()
    network(w, "lan", "10.0.0.0/29", gateway="10.0.0.3")
    subnet = w.subnets.find("lan-sub")
    assert (subnet.pool_start, subnet.pool_end) == ("10.0.0.1", "10.0.0.6")
    # when the pool is drawn until it is empty
    ips = []
    for i in range(5):
        ips.append(port(w, f"p{i}").ip)
    # then every address but the gateway went out, and a router still gets the gateway
    assert sorted(ips) == ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    cmd = PortCreate(tenant="acme", name="p9", network="lan")
    refused(w, networks.decide_port_create, cmd, Conflict, "no free address left")
    router(w, "rt")
    do(
        w,
        routers.decide_router_add_subnet,
        RouterInterface(tenant="acme", router="rt", subnet="lan-sub"),
    )
    assert w.ports.find("rt-lan-sub").ip == "10.0.0.3"


def test_a_floating_ip_is_never_the_external_gateway():
    pool = public_pool("203.0.113.0/29", gateway="203.0.113.3")
    assert (pool.attrs.pool_start, pool.attrs.pool_end) == ("203.0.113.1", "203.0.113.6")
    w = world(defaults={"floating_ips": -1})
    got = sorted(fip(w, pool).address for _ in range(5))
    assert got == ["203.0.113.1", "203.0.113.2", "203.0.113.4", "203.0.113.5", "203.0.113.6"]
    with pytest.raises(Conflict, match="no free address left"):
        fip(w, pool)


def test_delete_of_what_is_in_use_is_a_conflict():
    w = world()
    network(w, "lan")
    refused(
        w,
        networks.decide_network_delete,
        ref(w, "lan"),
        Conflict,
        "network lan is in use by subnet lan-sub",
    )
    s = server(w, "web", networks=["lan"])
    refused(w, networks.decide_subnet_delete, ref(w, "lan-sub"), Conflict, "in use by port web-0")
    refused(w, networks.decide_port_delete, ref(w, "web-0"), Conflict, f"belongs to compute {s.id}")
    refused(
        w, security_groups.decide_sg_delete, ref(w, "default"), Conflict, "in use by port web-0"
    )
    do(
        w,
        servers.decide_server_group_create,
        ServerGroupCreate(tenant="acme", name="g", policy="affinity"),
    )
    server(w, "member", group="g")
    refused(w, servers.decide_server_group_delete, ref(w, "g"), Conflict, "in use by server member")
    do(w, networks.decide_qos_create, QosPolicyCreate(tenant="acme", name="slow", max_kbps=100))
    port(w, "limited", qos_policy="slow")
    refused(w, networks.decide_qos_delete, ref(w, "slow"), Conflict, "in use by port limited")
    # once the users are gone, each goes too
    for decide, what in (
        (servers.decide_server_delete, "web"),
        (networks.decide_port_delete, "limited"),
        (networks.decide_qos_delete, "slow"),
        (servers.decide_server_delete, "member"),
        (servers.decide_server_group_delete, "g"),
        (networks.decide_subnet_delete, "lan-sub"),
        (networks.decide_network_delete, "lan"),
        (security_groups.decide_sg_delete, "default"),
    ):
        assert do(w, decide, ref(w, what)), what
    assert not any(w.tables.values())


# -- routers -----------------------------------------------------------------------------


def test_router_interfaces_take_the_gateway_once_and_block_deletes():
    w = world()
    network(w, "lan")
    router(w, "rt")
    add = RouterInterface(tenant="acme", router="rt", subnet="lan-sub")
    events = do(w, routers.decide_router_add_subnet, add)
    assert isinstance(events[0], PortCreated) and events[0].ip == "10.0.0.1"
    assert isinstance(events[1], RouterInterfaceAdded) and events[1].port == events[0].aggregate.id
    assert routers.decide_router_add_subnet(w, add, CAUSE) == []  # already there
    router(w, "rt2")
    other = RouterInterface(tenant="acme", router="rt2", subnet="lan-sub")
    refused(w, routers.decide_router_add_subnet, other, Conflict, "already on router rt")
    refused(w, routers.decide_router_remove_subnet, other, Conflict, "lan-sub is not on router rt2")
    refused(
        w, routers.decide_router_delete, ref(w, "rt"), Conflict, "router rt is in use by subnet"
    )
    events = do(w, routers.decide_router_remove_subnet, add)
    assert [type(e) for e in events] == [RouterInterfaceRemoved, PortDeleted]
    assert len(w.ports) == 0
    do(w, routers.decide_router_delete, ref(w, "rt"))


def test_a_router_on_an_unknown_external_network_is_not_found():
    w = world()
    cmd = RouterCreate(tenant="acme", name="rt", external_network="public")
    with pytest.raises(NotFound, match="external network public not found"):
        routers.decide_router_create(w, routers.RouterPlan(cmd, None), CAUSE)
    with pytest.raises(NotFound, match="external network public not found"):
        routers.decide_router_create(
            w, routers.RouterPlan(cmd, Network(name="public", id="public")), CAUSE
        )
    made = routers.decide_router_create(w, routers.RouterPlan(cmd, public_pool().attrs), CAUSE)
    assert made[0].external_network == "public"


# -- volumes -----------------------------------------------------------------------------


def test_a_volume_attaches_to_one_server_at_a_time():
    w = world()
    server(w, "a")
    server(w, "b")
    do(w, volumes.decide_volume_create, VolumeCreate(tenant="acme", name="v", size_gb=1))
    to_a = VolumeAttach(tenant="acme", volume="v", server="a")
    to_b = VolumeAttach(tenant="acme", volume="v", server="b")
    assert len(do(w, volumes.decide_volume_attach, to_a)) == 1
    assert w.volumes.find("v").status == "in-use"
    assert volumes.decide_volume_attach(w, to_a, CAUSE) == []  # twice to the same: nothing new
    refused(w, volumes.decide_volume_attach, to_b, Conflict, "attached to another server")
    refused(w, volumes.decide_volume_detach, to_b, Conflict, "is not attached to server b")
    refused(w, volumes.decide_volume_delete, ref(w, "v"), Conflict, "detach it first")
    # deleting the server detaches it
    events = do(w, servers.decide_server_delete, ref(w, "a"))
    assert any(isinstance(e, VolumeDetached) for e in events)
    v = w.volumes.find("v")
    assert (v.status, v.server) == ("available", "")
    do(w, volumes.decide_volume_attach, to_b)
    do(w, volumes.decide_volume_detach, to_b)
    do(w, volumes.decide_volume_delete, ref(w, "v"))


# -- servers -----------------------------------------------------------------------------


def test_server_create_takes_a_flavor_or_sizes_not_both():
    w = world()
    flavor = Flavor(name="m1", id="m1", vcpus=2, ram_mb=2048, disk_gb=20)
    image = Image(name="img", id="img", min_disk_gb=30, status="active")

    def plan(flavor_obj: Flavor | None, **kw: Any) -> servers.ServerPlan:
        return servers.ServerPlan(
            ServerCreate(tenant="acme", name="s", image="img", **kw), flavor_obj, image
        )

    refused(
        w, servers.decide_server_create, plan(flavor, flavor="m1", vcpus=1), Invalid, "not both"
    )
    refused(
        w, servers.decide_server_create, plan(None, flavor="m9"), NotFound, "flavor m9 not found"
    )
    refused(w, servers.decide_server_create, plan(None), Invalid, "needs --flavor, or --vcpus")
    refused(w, servers.decide_server_create, plan(None, vcpus=1), Invalid, "needs --flavor")
    made = [e for e in servers.decide_server_create(w, plan(flavor, flavor="m1"), CAUSE)]
    s = next(e for e in made if isinstance(e, ServerRequested))
    # the flavor's sizes, the disk at least the image's minimum
    assert (s.spec.vcpus, s.spec.ram_mb, s.spec.disk_gb, s.spec.flavor) == (2, 2048, 30, "m1")
    s = next(
        e
        for e in servers.decide_server_create(w, plan(None, vcpus=3, ram_mb=64, disk_gb=40), CAUSE)
        if isinstance(e, ServerRequested)
    )
    assert (s.spec.vcpus, s.spec.ram_mb, s.spec.disk_gb, s.spec.flavor) == (3, 64, 40, "")
    network(w, "lan")
    cmd = plan(None, vcpus=1, ram_mb=1, networks=["lan", "lan"])
    refused(w, servers.decide_server_create, cmd, Invalid, "a network is named twice")


def test_the_default_security_group_is_made_once_and_counted():
    w = world()
    network(w, "lan")
    s = server(w, "a", networks=["lan"])
    groups = list(w.security_groups.values())
    assert [g.name for g in groups] == ["default"]
    assert s.spec.security_groups == [groups[0].id]
    rules = sorted(groups[0].rules.values(), key=lambda x: x.direction)
    assert [(x.direction, x.remote_group) for x in rules] == [
        ("egress", ""),
        ("ingress", groups[0].id),
    ]
    # the next server (and a port) reuse it
    cmd = ServerCreate(tenant="acme", name="b", image="img", vcpus=1, ram_mb=1, networks=["lan"])
    made = servers.decide_server_create(w, servers.ServerPlan(cmd, None, IMAGE), CAUSE)
    assert not any(isinstance(e, SecurityGroupCreated | SecurityGroupRuleAdded) for e in made)
    assert port(w, "p").security_groups == [groups[0].id]
    # a tenant with no room for a group cannot have it made on its behalf
    full = world("full", defaults={"security_groups": 0})
    network(full, "lan")
    cmd = ServerCreate(tenant="full", name="a", image="img", vcpus=1, ram_mb=1, networks=["lan"])
    plan = servers.ServerPlan(cmd, None, IMAGE)
    refused(full, servers.decide_server_create, plan, QuotaExceeded, "security_groups 0 of 0")


def test_power_verbs_need_the_right_status():
    w = world()
    server(w, "a")
    stop = servers.power(ServerStopRequested, {"running"}, "stop")
    refused(w, stop, ref(w, "a"), Conflict, "cannot stop server a while it is requested")


def test_a_stop_is_pending_until_the_agent_reports_it():
    """What ``server stop`` prints is the status the decision leads to."""
    w = world()
    s = server(w, "a")
    apply(w, [CAUSE.make(ServerRunning, w.tenant, "server", s.id, host="h1")])
    stop = servers.power(ServerStopRequested, {"running"}, "stop")
    do(w, stop, ref(w, "a"))
    assert w.servers.find("a").status == "stopping"
    refused(w, stop, ref(w, "a"), Conflict, "cannot stop server a while it is stopping")
    # ... and a server stopping on its host is torn down by that host.
    made = servers.decide_server_delete(w, ref(w, "a"), CAUSE)
    assert [e.type_name() for e in made] == ["server.deleting", "host.server-action"]


# -- floating IPs ------------------------------------------------------------------------


def test_floating_ips_come_from_the_pool_and_go_back_to_it():
    pool = public_pool("203.0.113.0/29")
    acme, globex = world(), world("globex")
    a = fip(acme, pool)
    b = fip(globex, pool)
    assert (a.address, b.address) == ("203.0.113.2", "203.0.113.3")
    assert pool.allocated == {
        "203.0.113.2": ("acme", a.id),
        "203.0.113.3": ("globex", b.id),
    }
    events = routers.decide_fip_delete(acme, ref(acme, "203.0.113.2"), CAUSE)
    assert isinstance(events[1], AddressReleased) and events[1].tenant == SYSTEM
    apply(acme, events, pool)
    assert set(pool.allocated) == {"203.0.113.3"} and len(acme.floating_ips) == 0
    assert fip(acme, pool).address == "203.0.113.2"
    # unknown or not external: not found
    with pytest.raises(NotFound, match="external network public not found"):
        routers.decide_fip_create((acme, None), FloatingIpCreate(tenant="acme"), CAUSE)


def test_floating_ip_associate_and_disassociate():
    pool = public_pool()
    w = world()
    network(w, "lan")
    f = fip(w, pool)
    s = server(w, "web", networks=["lan"])
    server(w, "portless")
    addr = f.address

    def assoc(**kw: Any) -> FloatingIpAssociate:
        return FloatingIpAssociate(tenant="acme", floating_ip=addr, **kw)

    refused(w, routers.decide_fip_associate, assoc(), Invalid, "give the server or the port")
    refused(w, routers.decide_fip_associate, assoc(server="web", port="x"), Invalid, "one of them")
    refused(w, routers.decide_fip_associate, assoc(server="portless"), Conflict, "has no port")
    events = do(w, routers.decide_fip_associate, assoc(server="web"))
    assert isinstance(events[0], FloatingIpAssociated)
    f = w.floating_ips.find(f.id)
    assert (f.server, f.fixed_ip, f.status) == (s.id, "10.0.0.2", "active")
    assert routers.decide_fip_associate(w, assoc(port="web-0"), CAUSE) == []  # already so
    port(w, "spare")
    refused(w, routers.decide_fip_associate, assoc(port="spare"), Conflict, "associated already")
    do(w, routers.decide_fip_disassociate, ref(w, addr))
    assert routers.decide_fip_disassociate(w, ref(w, addr), CAUSE) == []
    # a plain port: no server behind it
    do(w, routers.decide_fip_associate, assoc(port="spare"))
    assert w.floating_ips.find(f.id).server == ""
    # deleting the port takes the association with it
    events = do(w, networks.decide_port_delete, ref(w, "spare"))
    assert isinstance(events[1], FloatingIpDisassociated)
    f = w.floating_ips.find(f.id)
    assert (f.port, f.status) == ("", "down")
    # as does deleting the server
    do(w, routers.decide_fip_associate, assoc(server="web"))
    events = do(w, servers.decide_server_delete, ref(w, "web"))
    assert any(isinstance(e, FloatingIpDisassociated) for e in events)
    assert w.floating_ips.find(f.id).port == ""


def test_a_port_without_an_address_takes_no_floating_ip():
    pool = public_pool()
    w = world()
    network(w, "bare", cidr=None)
    f = fip(w, pool)
    port(w, "p", net="bare")
    cmd = FloatingIpAssociate(tenant="acme", floating_ip=f.address, port="p")
    refused(w, routers.decide_fip_associate, cmd, Conflict, "port p has no fixed address")


# -- security groups ---------------------------------------------------------------------


def test_security_group_rules_are_validated_and_unique():
    w = world()
    do(w, security_groups.decide_sg_create, SecurityGroupCreate(tenant="acme", name="web"))

    def rule(**kw: Any) -> SecurityGroupRuleAdd:
        return SecurityGroupRuleAdd(tenant="acme", security_group="web", **kw)

    refused(
        w,
        security_groups.decide_sg_rule_add,
        rule(remote_cidr="0.0.0.0/0", remote_group="web"),
        Invalid,
        "not both",
    )
    refused(
        w, security_groups.decide_sg_rule_add, rule(protocol="icmp", port_min=22), Invalid, "icmp"
    )
    refused(
        w,
        security_groups.decide_sg_rule_add,
        rule(port_min=90, port_max=80),
        Invalid,
        "90:80 is backwards",
    )
    refused(
        w,
        security_groups.decide_sg_rule_add,
        rule(remote_cidr="10.0.0.1/8"),
        Invalid,
        "remote cidr",
    )
    refused(
        w,
        security_groups.decide_sg_rule_add,
        rule(remote_group="nope"),
        NotFound,
        "security group nope",
    )
    missing = SecurityGroupRuleAdd(tenant="acme", security_group="nope")
    refused(
        w, security_groups.decide_sg_rule_add, missing, NotFound, "security group nope not found"
    )
    events = do(w, security_groups.decide_sg_rule_add, rule(port_min=443, remote_cidr="10.0.0.0/8"))
    added = events[0]
    # one port means a range of one
    assert (added.port_min, added.port_max, added.remote_cidr) == (443, 443, "10.0.0.0/8")
    dup = rule(port_min=443, port_max=443, remote_cidr="10.0.0.0/8")
    refused(w, security_groups.decide_sg_rule_add, dup, AlreadyExists, "has this rule already")
    do(w, security_groups.decide_sg_rule_add, rule(remote_group="web", protocol="any"))
    assert len(w.security_groups.find("web").rules) == 2
    gone = SecurityGroupRuleRemove(tenant="acme", security_group="web", rule="nope")
    refused(w, security_groups.decide_sg_rule_remove, gone, NotFound, "rule nope not found")
    do(w, security_groups.decide_sg_rule_remove, msgspec.structs.replace(gone, rule=added.rule))
    assert list(w.security_groups.find("web").rules) != [added.rule]
    assert len(w.security_groups.find("web").rules) == 1


# -- cloud-wide pools --------------------------------------------------------------------


def test_fold_aggregate_tracks_allocations_and_releases():
    pool = public_pool("198.51.100.0/24")
    assert pool.live and pool.attrs.external and pool.attrs.pool_end == "198.51.100.254"
    for i, holder in enumerate(("f1", "f2", "f3")):
        fold_aggregate(
            pool,
            CAUSE.make(
                AddressAllocated,
                SYSTEM,
                "network",
                "public",
                address=f"198.51.100.{i + 2}",
                holder_tenant="acme",
                holder=holder,
            ),
        )
    fold_aggregate(
        pool,
        CAUSE.make(
            AddressReleased,
            SYSTEM,
            "network",
            "public",
            address="198.51.100.3",
            holder_tenant="acme",
            holder="f2",
        ),
    )
    assert pool.allocated == {"198.51.100.2": ("acme", "f1"), "198.51.100.4": ("acme", "f3")}
    # a released address is the first one handed out again
    assert fip(world(), pool).address == "198.51.100.3"
    # names of external networks are never reused
    with pytest.raises(AlreadyExists):
        routers.decide_external_network_create(
            pool, NetworkCreate(name="public", external=True, cidr="10.0.0.0/24"), CAUSE
        )
    with pytest.raises(Invalid, match="needs --cidr"):
        routers.decide_external_network_create(Aggregate(), NetworkCreate(name="p2"), CAUSE)


# -- allocation never hands out an address twice -------------------------------------------

OPS = st.lists(st.tuples(st.booleans(), st.integers(0, 15)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, gateway=st.sampled_from([None, "10.0.0.1", "10.0.0.4", "10.0.0.14"]))
def test_ports_over_any_create_delete_sequence_stay_unique_and_in_the_pool(ops, gateway):
    w = world()
    network(w, "lan", "10.0.0.0/28", gateway=gateway)
    sub = w.subnets.find("lan-sub")
    lo, hi = ipaddress.ip_address(sub.pool_start), ipaddress.ip_address(sub.pool_end)
    room = {str(a) for a in ipaddress.ip_network("10.0.0.0/28").hosts()} - {sub.gateway}
    room = {a for a in room if lo <= ipaddress.ip_address(a) <= hi}
    for n, (create, slot) in enumerate(ops):
        live = sorted(w.ports)
        if create or not live:
            full = len(live) >= len(room)
            try:
                port(w, f"p{n}")
            except Conflict as exc:
                assert full and "no free address left" in exc.message
            else:
                assert not full
        else:
            do(w, networks.decide_port_delete, ref(w, live[slot % len(live)]))
        ips = [p.ip for p in w.ports.values()]
        assert len(ips) == len(set(ips)), "an address was handed out twice"
        assert set(ips) <= room, (ips, sub)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_floating_ips_over_any_create_delete_sequence_stay_unique_and_in_the_pool(ops):
    pool = public_pool("203.0.113.0/28", pool_start="203.0.113.4", pool_end="203.0.113.11")
    tenants = [world("acme"), world("globex")]
    for create, slot in ops:
        w = tenants[slot % 2]
        mine = sorted(w.floating_ips)
        if create or not mine:
            full = len(pool.allocated) == 8
            try:
                fip(w, pool)
            except Conflict as exc:
                assert full and "no free address left" in exc.message
            else:
                assert not full
        else:
            apply(w, routers.decide_fip_delete(w, ref(w, mine[slot % len(mine)]), CAUSE), pool)
        held = [f.address for t in tenants for f in t.floating_ips.values()]
        assert len(held) == len(set(held)), "an address was handed out twice"
        assert sorted(held) == sorted(pool.allocated)
        assert all(
            ipaddress.ip_address("203.0.113.4")
            <= ipaddress.ip_address(a)
            <= ipaddress.ip_address("203.0.113.11")
            for a in held
        )


# -- cloud-wide objects ---------------------------------------------------------------


def test_a_host_registers_once_and_updates_only_on_change():
    host = Aggregate()

    def register(**kw: Any) -> list[Event]:
        cmd = HostRegister(name="h1", vcpus=8, ram_mb=4096, disk_gb=100, **kw)
        events = system.decide_host_register(host, cmd, CAUSE)
        for e in events:
            fold_aggregate(host, e)
        return events

    (made,) = register(labels={"ssd": "yes"})
    assert isinstance(made, HostRegistered)
    assert (made.vcpus, made.ram_mb, made.labels, made.types) == (
        8,
        4096,
        {"ssd": "yes"},
        ["vm", "container"],
    )
    assert (host.attrs.name, host.attrs.status, host.attrs.labels) == (
        "h1",
        "enabled",
        {"ssd": "yes"},
    )
    assert register(labels={"ssd": "yes"}) == []  # an agent restarting with nothing changed
    (changed,) = register(labels={"ssd": "yes"}, cpu_ratio=2.0)
    assert isinstance(changed, HostUpdated) and changed.cpu_ratio == 2.0
    assert host.attrs.cpu_ratio == 2.0
    off = system.host_switch(False)
    (disabled,) = off(host, HostSetEnabled(name="h1", reason="maintenance"), CAUSE)
    fold_aggregate(host, disabled)
    assert (host.attrs.status, host.attrs.reason) == ("disabled", "maintenance")
    assert off(host, HostSetEnabled(name="h1"), CAUSE) == []


def test_flavors_and_public_images_record_what_was_asked_and_are_never_renamed():
    flavor = Aggregate()
    (made,) = system.decide_flavor_create(
        flavor, FlavorCreate(name="m1", vcpus=2, ram_mb=512, disk_gb=10), CAUSE
    )
    assert (made.tenant, made.aggregate.id, made.vcpus, made.ram_mb, made.disk_gb) == (
        SYSTEM,
        "m1",
        2,
        512,
        10,
    )
    fold_aggregate(flavor, made)
    fold_aggregate(flavor, system.decide_flavor_delete(flavor, FlavorDelete(name="m1"), CAUSE)[0])
    with pytest.raises(AlreadyExists, match="names are never reused"):
        system.decide_flavor_create(flavor, FlavorCreate(name="m1", vcpus=1, ram_mb=1), CAUSE)
    cmd = ImageCreate(name="cirros", format="raw", size_bytes=5, min_disk_gb=3, public=True)
    (image,) = images.decide_public_image_create(Aggregate(), cmd, CAUSE)
    assert (image.name, image.format, image.size_bytes, image.min_disk_gb) == (
        "cirros",
        "raw",
        5,
        3,
    )
    assert (image.visibility, image.tenant) == ("public", SYSTEM)


def test_an_image_with_a_checksum_is_queued_until_its_bytes_are_stored():
    # given a tenant
    w = world()
    # when an image is created with the size and SHA-256 of the file to come
    cmd = ImageCreate(tenant="acme", name="base", size_bytes=4096, checksum="ab" * 32)
    (queued,) = do(w, images.decide_image_create, cmd)
    # then it is queued, expecting exactly those bytes, and nothing boots it
    assert queued.type_name() == "image.queued"
    image = w.images.find("base")
    assert (image.status, image.size_bytes, image.checksum) == ("queued", 4096, "ab" * 32)
    plan = ServerCreate(tenant="acme", name="s", image="base", vcpus=1, ram_mb=64)
    refused(
        w, servers.decide_server_create, servers.ServerPlan(plan, None, None), Conflict, "queued"
    )
    # ... until the image service has stored them (image.activated)
    fold(
        w,
        CAUSE.make(ImageActivated, "acme", "image", image.id, size_bytes=4096, checksum="ab" * 32),
    )
    assert w.images.find("base").status == "active"
    do(w, servers.decide_server_create, servers.ServerPlan(plan, None, None))
    # a checksum without a size cannot be checked, and is refused
    refused(
        w,
        images.decide_image_create,
        ImageCreate(tenant="acme", name="other", checksum="cd" * 32),
        Invalid,
        "size_bytes",
    )
    # without a checksum the image is a record only, active at once
    (record,) = do(w, images.decide_image_create, ImageCreate(tenant="acme", name="cirros"))
    assert record.type_name() == "image.created" and w.images.find("cirros").status == "active"
