"""The decisions the OpenStack API added, without NATS: OpenStack-style
names, a queued image's upload, renames, Neutron's default egress rules,
server metadata and access IPs, and the command-id channel marker.

Given a tenant's history, when a command is decided, then these events or
this refusal."""

from __future__ import annotations

import msgspec
import pytest

from stratus.events.commands import command_id_via, explain, via_of
from stratus.events.errors import AlreadyExists, Conflict, Invalid
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    ExternalNetworkCreate,
    ImageActivated,
    ImageCreate,
    ImageUpload,
    ImageUploading,
    NetworkCreate,
    PublicImageCreate,
    Rename,
    RouterCreate,
    RouterSet,
    SecurityGroupCreate,
    SecurityGroupRenamed,
    SecurityGroupRuleAdded,
    ServerCreate,
    SubnetCreate,
    TenantScoped,
)
from stratus.events.tenants import TenantCreated
from stratus.handlers import networks, security_groups, servers
from stratus.handlers.images import decide_image_create, decide_image_upload
from stratus.handlers.inventory import decide_rename
from stratus.handlers.records import view
from stratus.handlers.routers import RouterPlan, decide_router_create, decide_router_set
from stratus.handlers.world import Aggregate, World, fold

CAUSE = Cause(actor="alice", correlation_id="openstack-api-x", causation_id="x")
SHA = "a" * 64


def world() -> World:
    w = World()
    fold(w, CAUSE.make(TenantCreated, "acme", "tenant", "acme", name="acme"))
    return w


def apply(w: World, events: list[Event]) -> list[Event]:
    for e in events:
        if e.tenant == w.tenant:  # not a cloud-wide pool's
            fold(w, e)
    return events


def test_openstack_names_are_tenant_resource_names() -> None:
    w = world()
    name = "tempest-NetworksTest-network-1234567.v2_x"
    cmd = NetworkCreate(name=name, tenant="acme")
    net = apply(w, networks.decide_network_create((w, Aggregate()), cmd, CAUSE))[0]
    assert w.networks.find(name).id == net.aggregate.id
    # Unnamed subnets (Neutron's) do not hold a name: two of them are fine.
    nid = net.aggregate.id
    for cidr in ("10.0.0.0/24", "10.0.1.0/24"):
        apply(
            w,
            networks.decide_subnet_create(
                w, SubnetCreate(name="", network=nid, cidr=cidr, tenant="acme"), CAUSE
            ),
        )
    assert [s.name for s in w.subnets.values()] == ["", ""]
    # What could break a reference or a display stays out.
    for bad in ("a b", "-x", "x\n", "é", "x" * 64, "a/b"):
        with pytest.raises(msgspec.ValidationError) as exc:
            msgspec.convert({"name": bad}, NetworkCreate)
        assert "name" in explain(exc.value)


def test_cloud_wide_names_stay_ids() -> None:
    # A public image or an external network is named by its subject: the
    # command itself refuses what a tenant's resource could be called.
    for cls, body in (
        (PublicImageCreate, {"name": "Public.Img"}),
        (ExternalNetworkCreate, {"name": "Ext.Net", "external": True, "cidr": "203.0.113.0/24"}),
    ):
        with pytest.raises(msgspec.ValidationError) as exc:
            msgspec.convert(body, cls)
        assert "lowercase" in explain(exc.value)
        msgspec.convert({**body, "name": "ext-1"}, cls)  # an id-like name is fine


def test_an_image_without_bytes_is_queued_for_the_announced_ones() -> None:
    w = world()
    (img,) = apply(
        w,
        decide_image_create(
            w,
            ImageCreate(
                name="img",
                format="raw",
                tenant="acme",
                properties={"owner_specified.openstack.object": "images/img"},
            ),
            CAUSE,
        ),
    )
    assert w.images.find("img").properties == {"owner_specified.openstack.object": "images/img"}
    up = ImageUpload(
        ref=img.aggregate.id, format="raw", size_bytes=1024, checksum=SHA, md5="b" * 32,
        tenant="acme",
    )  # fmt: skip
    (done,) = apply(w, decide_image_upload(w, up, CAUSE))
    assert isinstance(done, ImageUploading)
    shown = w.images.find("img")
    # queued for exactly these bytes: the image service takes no others
    assert (shown.status, shown.checksum, shown.md5, shown.size_bytes) == (
        "queued", SHA, "b" * 32, 1024
    )  # fmt: skip
    # The same bytes again (a retry) change nothing; other bytes replace
    # the announcement while the image waits for its bytes...
    assert decide_image_upload(w, up, CAUSE) == []
    other = msgspec.structs.replace(up, checksum="c" * 64)
    assert len(decide_image_upload(w, other, CAUSE)) == 1
    # ...and are refused once the image service has stored these.
    fold(w, CAUSE.make(ImageActivated, "acme", "image", img.aggregate.id, size_bytes=1024,
                       checksum=SHA))  # fmt: skip
    assert view(w.images.find("img"))["status"] == "active"
    assert decide_image_upload(w, up, CAUSE) == []
    with pytest.raises(Conflict, match="has its data already"):
        decide_image_upload(w, other, CAUSE)


def test_renames_keep_names_unique_and_change_nothing_else() -> None:
    w = world()
    for name in ("web", "db"):
        cmd = SecurityGroupCreate(name=name, tenant="acme")
        apply(w, security_groups.decide_sg_create(w, cmd, CAUSE))
    web = w.security_groups.find("web").id
    decide = decide_rename("security-group")
    (ev,) = apply(
        w, decide(w, Rename(ref=web, name="Web-2", description="new", tenant="acme"), CAUSE)
    )
    assert isinstance(ev, SecurityGroupRenamed)
    group = w.security_groups.find(web)
    assert (group.name, group.description) == ("Web-2", "new")
    assert decide(w, Rename(ref=web, name="Web-2", tenant="acme"), CAUSE) == []
    with pytest.raises(AlreadyExists):
        decide(w, Rename(ref=web, name="db", tenant="acme"), CAUSE)
    with pytest.raises(Invalid, match="no description"):
        decide_rename("network")(w, Rename(ref=web, description="d", tenant="acme"), CAUSE)


def test_neutron_default_egress_rules_come_in_the_same_batch() -> None:
    w = world()
    events = security_groups.decide_sg_create(
        w, SecurityGroupCreate(name="g", default_egress=True, tenant="acme"), CAUSE
    )
    rules = [e for e in events if isinstance(e, SecurityGroupRuleAdded)]
    assert [(x.direction, x.protocol, x.remote_cidr) for x in rules] == [
        ("egress", "any", ""),
        ("egress", "any", "::/0"),
    ]
    assert (
        security_groups.decide_sg_create(
            world(), SecurityGroupCreate(name="g", tenant="acme"), CAUSE
        )[1:]
        == []
    )


def test_server_metadata_and_access_ips_are_recorded_not_scheduled() -> None:
    w = world()
    apply(w, decide_image_create(w, ImageCreate(name="img", tenant="acme"), CAUSE))
    cmd = ServerCreate(
        name="Srv.1", image="img", vcpus=1, ram_mb=64, tenant="acme",
        metadata={"hello": "world"}, access_ipv4="1.1.1.1",
        access_ipv6="0000:0000:0000:0000:0000:babe:220.12.22.2",
    )  # fmt: skip
    events = servers.decide_server_create(w, servers.ServerPlan(cmd, None, None), CAUSE)
    server = next(e for e in events if e.type_name() == "server.requested")
    spec = server.spec  # carried whole to the scheduler, the host and the views
    assert spec.metadata == {"hello": "world"} and spec.labels == {}
    assert (spec.access_ipv4, spec.access_ipv6) == ("1.1.1.1", "::babe:dc0c:1602")
    with pytest.raises(Invalid, match="not an IPv4"):
        servers.decide_server_create(
            w,
            servers.ServerPlan(msgspec.structs.replace(cmd, access_ipv4="::1"), None, None),
            CAUSE,
        )


def test_command_ids_name_their_channel() -> None:
    cid = command_id_via("openstack-api")
    assert via_of(cid) == "openstack-api" and len(cid) <= 64
    assert via_of("01a24333-c5fa-7000-ace0-cc304cb64643") == ""
    assert via_of("openstack-api-not-a-uuid") == ""
    with pytest.raises(ValueError):
        command_id_via("Not A Channel")


def test_a_router_goes_down_and_up_once_each() -> None:
    w = world()
    plan = RouterPlan(RouterCreate(name="edge", admin_up=False, tenant="acme"), None)
    (router,) = apply(w, decide_router_create(w, plan, CAUSE))
    assert router.admin_up is False
    rid = router.aggregate.id
    assert decide_router_set(w, RouterSet(ref=rid, admin_up=False, tenant="acme"), CAUSE) == []
    (up,) = apply(
        w, decide_router_set(w, RouterSet(ref="edge", admin_up=True, tenant="acme"), CAUSE)
    )
    assert up.admin_up is True and w.routers.find(rid).admin_up is True


def test_the_default_group_is_made_once_with_stratus_rules() -> None:
    decide_ensure_default = security_groups.decide_ensure_default
    w = world()
    made = apply(w, decide_ensure_default(w, TenantScoped(tenant="acme"), CAUSE))
    group = w.security_groups.find("default")
    assert group.rules
    rules = sorted((x.direction, x.remote_group) for x in group.rules.values())
    assert rules == [("egress", ""), ("ingress", group.id)]  # as on first use by a server
    assert len(made) == 3 and decide_ensure_default(w, TenantScoped(tenant="acme"), CAUSE) == []
