"""The inventory's verbs: which decision serves each, on which boundary,
and what its reply shows.

A tenant's resources are decided on ``ev.<tenant>.>`` (see
``handlers.world``), so quota, name uniqueness, address allocation within a
subnet and references between the tenant's resources all hold under any
number of racing handlers. Cloud-wide objects (hosts, flavors, public
images, external networks) are decided on their own subject. A decision
that also takes from a shared pool (a VNI, an external address) names the
pool's subject as ``also``: both conditions go into one atomic batch.

The decisions live by resource kind: ``servers``, ``volumes``, ``images``,
``networks`` (with subnets, ports, QoS), ``routers`` (with floating IPs and
external networks), ``security_groups``, ``system`` (hosts, flavors) and
``quota``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stratus.events.model import Event
from stratus.events.resources import (
    COMMANDS,
    QUOTA_DEFAULTS,
    RENAMED,
    ServerRebootRequested,
    ServerStartRequested,
    ServerStopRequested,
)
from stratus.handlers import (
    images,
    networks,
    quota,
    routers,
    security_groups,
    servers,
    system,
    volumes,
)
from stratus.handlers.inventory import decide_rename
from stratus.handlers.lookup import with_lookup
from stratus.handlers.records import view
from stratus.handlers.registry import Handler
from stratus.handlers.world import (
    Aggregate,
    World,
    fold,
    fold_aggregate,
    system_subject,
    tenant_boundary,
)

# -- replies ------------------------------------------------------------------------


def touched(kind: str) -> Callable[[World, list[Event]], Any]:
    """The reply of a tenant verb: the ``kind`` resource its events are about."""

    def result(w: World, events: list[Event]) -> Any:
        for ev in events:
            if ev.aggregate.kind == kind and ev.tenant == w.tenant:
                r = w.tables[kind].get(ev.aggregate.id)
                if r is None:
                    return {"id": ev.aggregate.id, "status": "deleted"}
                return view(r)
        return None

    return result


def _aggregate_view(a: Aggregate[Any]) -> Any:
    return view(a.attrs) if a.attrs is not None else {"status": "deleted"}


# -- the handler table ----------------------------------------------------------------


def _tenant(cmd: Any) -> str | None:
    return cmd.tenant


def tenant_handler(
    verb: str, command: type, decide: Any, initial: Callable[[], World], **kw: Any
) -> Handler:
    """A verb decided on the tenant's world; its reply is the resource it
    touched (the limits and usage, for ``quota``)."""
    kind = verb.split(".")[0]
    if kind == "quota":
        kw.setdefault("view", quota.quota_view)
    else:
        kw.setdefault("result", touched(kind))
    return Handler(
        verb=verb,
        command=command,
        permission=verb,
        boundary=lambda c: tenant_boundary(c.tenant),
        initial=initial,
        fold=fold,
        decide=decide,
        tenant_of=_tenant,
        **kw,
    )


def _on_system(verb: str, decide: Any, **kw: Any) -> Handler:
    """A verb decided on one cloud-wide object, ``ev._system.<kind>.<name>``."""
    kind = verb.split(".")[0]
    return Handler(
        verb=verb,
        command=COMMANDS[verb],
        permission=verb,
        boundary=lambda c: system_subject(kind, c.name),
        initial=Aggregate,
        fold=fold_aggregate,
        decide=decide,
        view=_aggregate_view,
        **kw,
    )


def handlers(quota_defaults: dict[str, int] | None = None) -> list[Handler]:
    """Every inventory verb; ``quota_defaults`` are the limits of tenants no
    ``quota set`` has touched (over the built-in ``QUOTA_DEFAULTS``)."""
    unknown = set(quota_defaults or {}) - set(QUOTA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown quota {', '.join(sorted(unknown))}")

    def world() -> World:
        return World(quota_defaults)

    def _in_tenant(verb: str, decide: Any, **kw: Any) -> Handler:
        if "also" in kw:
            # ``also`` names the subject of a cloud-wide pool the decision
            # takes from (a VNI, an address): its state is an aggregate.
            kw.update(also_initial=Aggregate, also_fold=fold_aggregate)
        return tenant_handler(verb, COMMANDS[verb], decide, world, **kw)

    return [
        _on_system("host.register", system.decide_host_register),
        _on_system("host.enable", system.host_switch(True)),
        _on_system("host.disable", system.host_switch(False)),
        _on_system("host.remove", system.decide_host_remove),
        _on_system("flavor.create", system.decide_flavor_create),
        _on_system("flavor.delete", system.decide_flavor_delete),
        _on_system("image.create-public", images.decide_public_image_create),
        _on_system("network.create-external", routers.decide_external_network_create),
        _in_tenant("image.create", images.decide_image_create),
        _in_tenant("image.delete", images.decide_image_delete),
        _in_tenant("image.upload", images.decide_image_upload),
        _in_tenant(
            "server.create",
            servers.decide_server_create,
            prepare=with_lookup(servers.prepare_server),
        ),
        _in_tenant("server.delete", servers.decide_server_delete),
        _in_tenant("server.stop", servers.power(ServerStopRequested, {"running"}, "stop")),
        _in_tenant("server.start", servers.power(ServerStartRequested, {"stopped"}, "start")),
        _in_tenant("server.reboot", servers.power(ServerRebootRequested, {"running"}, "reboot")),
        _in_tenant("server-group.create", servers.decide_server_group_create),
        _in_tenant("server-group.delete", servers.decide_server_group_delete),
        _in_tenant("volume.create", volumes.decide_volume_create),
        _in_tenant("volume.delete", volumes.decide_volume_delete),
        _in_tenant("volume.attach", volumes.decide_volume_attach),
        _in_tenant("volume.detach", volumes.decide_volume_detach),
        _in_tenant("network.create", networks.decide_network_create, also=networks.segment_pool),
        _in_tenant("network.delete", networks.decide_network_delete),
        _in_tenant("subnet.create", networks.decide_subnet_create),
        _in_tenant("subnet.delete", networks.decide_subnet_delete),
        _in_tenant("port.create", networks.decide_port_create),
        _in_tenant("port.delete", networks.decide_port_delete),
        _in_tenant("port.set", networks.decide_port_set),
        _in_tenant("qos-policy.create", networks.decide_qos_create),
        _in_tenant("qos-policy.delete", networks.decide_qos_delete),
        _in_tenant(
            "router.create",
            routers.decide_router_create,
            prepare=with_lookup(routers.prepare_router),
            also=routers.gateway_pool,
        ),
        _in_tenant("router.delete", routers.decide_router_delete),
        _in_tenant("router.add-subnet", routers.decide_router_add_subnet),
        _in_tenant("router.remove-subnet", routers.decide_router_remove_subnet),
        _in_tenant("router.set", routers.decide_router_set),
        _in_tenant("floating-ip.create", routers.decide_fip_create, also=routers.address_pool),
        _in_tenant("floating-ip.delete", routers.decide_fip_delete),
        _in_tenant("floating-ip.associate", routers.decide_fip_associate),
        _in_tenant("floating-ip.disassociate", routers.decide_fip_disassociate),
        _in_tenant("security-group.create", security_groups.decide_sg_create),
        _in_tenant("security-group.delete", security_groups.decide_sg_delete),
        _in_tenant("security-group.rule-add", security_groups.decide_sg_rule_add),
        _in_tenant("security-group.rule-remove", security_groups.decide_sg_rule_remove),
        _in_tenant("security-group.ensure-default", security_groups.decide_ensure_default),
        *(_in_tenant(f"{kind}.rename", decide_rename(kind)) for kind in RENAMED),
        _in_tenant("quota.set", quota.decide_quota_set),
    ]
