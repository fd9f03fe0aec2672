"""Security groups and their rules, and the tenant's ``default`` group that
a server or port without groups is put in (made on first use, as Neutron
does, or when the OpenStack API first lists a tenant's groups: Neutron
makes it then too). Decided on the tenant's world (see ``handlers.world``).
"""

from __future__ import annotations

import msgspec

from stratus.events.errors import AlreadyExists, Invalid, NotFound
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import (
    RefCommand,
    SecurityGroupCreate,
    SecurityGroupCreated,
    SecurityGroupDeleted,
    SecurityGroupRuleAdd,
    SecurityGroupRuleAdded,
    SecurityGroupRuleRemove,
    SecurityGroupRuleRemoved,
    TenantScoped,
)
from stratus.handlers import quota
from stratus.handlers.addressing import parse_network
from stratus.handlers.inventory import create, delete_unused, ports_where
from stratus.handlers.records import Rule, SecurityGroup
from stratus.handlers.world import World, live_tenant


def _allow(
    cause: Cause,
    tenant: str,
    group: str,
    direction: str,
    *,
    remote_cidr: str = "",
    remote_group: str = "",
) -> Event:
    """A rule letting through every protocol in ``direction`` (from or to
    ``remote_cidr`` or the members of ``remote_group``; neither: anywhere)."""
    return cause.make(
        SecurityGroupRuleAdded,
        tenant,
        "security-group",
        group,
        rule=new_id(),
        direction=direction,
        protocol="any",
        remote_cidr=remote_cidr,
        remote_group=remote_group,
    )


def _default_group(w: World, cause: Cause, tenant: str) -> tuple[str, list[Event]]:
    """The tenant's ``default`` security group, and the events making it if
    it is not there yet: all egress, ingress only from members of the same group."""
    sg = w.security_groups.named("default")
    if sg is not None:
        return sg.id, []
    sg_ev = cause.make(
        SecurityGroupCreated,
        tenant,
        "security-group",
        new_id(),
        name="default",
        description="default: all egress, ingress from members of this group",
    )
    sid = sg_ev.aggregate.id
    egress = _allow(cause, tenant, sid, "egress")
    return sid, [sg_ev, egress, _allow(cause, tenant, sid, "ingress", remote_group=sid)]


def resolve_groups(
    w: World, refs: list[str], cause: Cause, tenant: str
) -> tuple[list[str], list[Event], int]:
    """Resolved group ids, events creating ``default`` if needed, and how many
    groups those events add (for the quota)."""
    if refs:
        return [w.security_groups.find(r).id for r in refs], [], 0
    sid, made = _default_group(w, cause, tenant)
    return [sid], made, 1 if made else 0


def decide_ensure_default(w: World, cmd: TenantScoped, cause: Cause) -> list[Event]:
    """The tenant's ``default`` group, made now if it has none yet."""
    t = cmd.tenant or ""
    live_tenant(w, t)
    _, made = _default_group(w, cause, t)
    if made:
        quota.check(w, {"security_groups": 1})
    return made


def decide_sg_create(w: World, cmd: SecurityGroupCreate, cause: Cause) -> list[Event]:
    made = create(
        w.security_groups,
        cmd,
        cause,
        SecurityGroupCreated,
        {"security_groups": 1},
        description=cmd.description,
    )
    if not cmd.default_egress:
        return made
    # Neutron's two default rules, in the same batch: all egress, IPv4 and IPv6.
    t, sid = cmd.tenant or "", made[0].aggregate.id
    return [*made, *(_allow(cause, t, sid, "egress", remote_cidr=c) for c in ("", "::/0"))]


def decide_sg_delete(w: World, cmd: RefCommand, cause: Cause) -> list[Event]:
    def users(g: SecurityGroup) -> list[str]:
        return ports_where(w, lambda p: g.id in p.security_groups)

    return delete_unused(w.security_groups, cmd, cause, SecurityGroupDeleted, users)


def decide_sg_rule_add(w: World, cmd: SecurityGroupRuleAdd, cause: Cause) -> list[Event]:
    g = w.security_groups.find(cmd.security_group)
    if cmd.remote_cidr is not None and cmd.remote_group is not None:
        raise Invalid("give --remote-cidr or --remote-group, not both")
    cidr = str(parse_network(cmd.remote_cidr, "remote cidr")) if cmd.remote_cidr else ""
    remote = w.security_groups.find(cmd.remote_group).id if cmd.remote_group else ""
    lo, hi = cmd.port_min, cmd.port_max or cmd.port_min
    if cmd.protocol in ("icmp", "any") and (lo or hi):
        raise Invalid(f"--port does not apply to protocol {cmd.protocol}")
    if lo > hi:
        raise Invalid(f"port range {lo}:{hi} is backwards")
    rule = Rule(new_id(), cmd.direction, cmd.protocol, lo, hi, cidr, remote)
    for existing in (g.rules or {}).values():
        # The same traffic let through, whatever the rule's id.
        if msgspec.structs.replace(existing, rule=rule.rule) == rule:
            raise AlreadyExists(f"security group {g.name} has this rule already")
    return [
        cause.make(
            SecurityGroupRuleAdded,
            cmd.tenant or "",
            "security-group",
            g.id,
            **msgspec.structs.asdict(rule),
        )
    ]


def decide_sg_rule_remove(w: World, cmd: SecurityGroupRuleRemove, cause: Cause) -> list[Event]:
    g = w.security_groups.find(cmd.security_group)
    if cmd.rule not in (g.rules or {}):
        raise NotFound(f"rule {cmd.rule} not found in security group {g.name}")
    return [
        cause.make(
            SecurityGroupRuleRemoved, cmd.tenant or "", "security-group", g.id, rule=cmd.rule
        )
    ]
