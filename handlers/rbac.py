"""Who may do what: one permission table, deny by default.

Roles are granted per tenant. ``admin`` in the tenant ``admin`` is the cloud
administrator: it manages tenants, users, role assignments and hosts, and may
act in any tenant. Within a tenant, ``admin`` and ``member`` create, change
and delete the tenant's resources and ``reader`` only reads them.

Every command and query names one permission from ``PERMISSIONS``; the
services refuse to register a verb without one, so none can skip the check.
A caller outside the resource's tenant is told ``not_found``, never
``forbidden``: that another tenant's resource exists is not theirs to know.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import msgspec

from stratus.events.errors import Forbidden, NotFound

CLOUD_TENANT = "admin"
CLOUD_ADMIN_ROLE = "admin"


class Scope(Enum):
    PUBLIC = "public"  # no token needed (logging in)
    CLOUD = "cloud"  # the cloud administrator only
    TENANT = "tenant"  # roles within the resource's tenant (or the cloud admin)
    SELF = "self"  # any valid token; the handler limits it to the caller's own


class Rule(msgspec.Struct, frozen=True):
    scope: Scope
    roles: frozenset[str] = frozenset()


READ = frozenset({"admin", "member", "reader"})
WRITE = frozenset({"admin", "member"})
MANAGE = frozenset({"admin"})

PERMISSIONS: dict[str, Rule] = {
    "auth.login": Rule(Scope.PUBLIC),
    "tenant.create": Rule(Scope.CLOUD),
    "tenant.rename": Rule(Scope.CLOUD),
    "tenant.delete": Rule(Scope.CLOUD),
    "tenant.list": Rule(Scope.SELF),
    "tenant.show": Rule(Scope.TENANT, READ),
    "user.create": Rule(Scope.CLOUD),
    "user.set-password": Rule(Scope.SELF),
    "user.disable": Rule(Scope.CLOUD),
    "user.enable": Rule(Scope.CLOUD),
    "user.list": Rule(Scope.CLOUD),
    "role.assign": Rule(Scope.TENANT, MANAGE),
    "role.revoke": Rule(Scope.TENANT, MANAGE),
    "role.list": Rule(Scope.TENANT, MANAGE),
    "token.revoke": Rule(Scope.SELF),
    "key.rotate": Rule(Scope.CLOUD),
    # Service credentials (their tokens admit services to the broker).
    "credential.issue": Rule(Scope.CLOUD),
    "credential.revoke": Rule(Scope.CLOUD),
    "role.create": Rule(Scope.CLOUD),
    "status.read": Rule(Scope.SELF),
    "events.read": Rule(Scope.TENANT, READ),
    "audit.read": Rule(Scope.TENANT, READ),
    # Cloud-wide inventory: the cloud admin (and the agents, acting as it).
    "host.register": Rule(Scope.CLOUD),
    "host.enable": Rule(Scope.CLOUD),
    "host.disable": Rule(Scope.CLOUD),
    "host.remove": Rule(Scope.CLOUD),
    "host.list": Rule(Scope.CLOUD),
    "flavor.create": Rule(Scope.CLOUD),
    "flavor.delete": Rule(Scope.CLOUD),
    "flavor.list": Rule(Scope.SELF),
    "image.create-public": Rule(Scope.CLOUD),
    "network.create-external": Rule(Scope.CLOUD),
    "network.create-routed": Rule(Scope.CLOUD),
    "quota.set": Rule(Scope.CLOUD),
    "quota.show": Rule(Scope.TENANT, READ),
    # Integrations hand out a reader of the whole tenant's log: admins only.
    "integration.create": Rule(Scope.TENANT, MANAGE),
    "integration.revoke": Rule(Scope.TENANT, MANAGE),
    "integration.reset": Rule(Scope.TENANT, MANAGE),
    "integration.read": Rule(Scope.TENANT, MANAGE),
    "webhook.create": Rule(Scope.TENANT, MANAGE),
    "webhook.delete": Rule(Scope.TENANT, MANAGE),
    "webhook.read": Rule(Scope.TENANT, MANAGE),
    **{
        f"{kind}.{verb}": Rule(Scope.TENANT, WRITE)
        for kind, verbs in {
            "image": ("create", "delete", "upload", "rename"),
            "server": ("create", "delete", "stop", "start", "reboot", "exec", "snapshot"),
            "server-group": ("create", "delete"),
            "volume": ("create", "delete", "attach", "detach"),
            "network": ("create", "delete", "rename"),
            "subnet": ("create", "delete", "rename"),
            "port": ("create", "delete", "set"),
            "router": ("create", "delete", "add-subnet", "remove-subnet", "rename", "set"),
            "floating-ip": ("create", "delete", "associate", "disassociate"),
            "security-group": (
                "create",
                "delete",
                "rule-add",
                "rule-remove",
                "rename",
                "ensure-default",
            ),
            "qos-policy": ("create", "delete"),
            # Two-level scheduling: a framework and its answers to offers.
            "framework": ("register", "beat"),
            "offer": ("accept", "decline"),
            "task": ("update", "running"),
        }.items()
        for verb in verbs
    },
    # Reading a tenant's inventory (one permission a kind, list and show).
    **{
        f"{kind}.read": Rule(Scope.TENANT, READ)
        for kind in (
            "image",
            "server",
            "server-group",
            "volume",
            "network",
            "subnet",
            "port",
            "router",
            "floating-ip",
            "security-group",
            "qos-policy",
            "framework",
            "offer",
        )
    },
}


class Caller(msgspec.Struct, frozen=True):
    """What RBAC needs to know about whoever sent a request."""

    user: str
    tenant: str
    roles: tuple[str, ...]
    token_id: str = ""
    expires_at: int = 0

    @property
    def is_cloud_admin(self) -> bool:
        return self.tenant == CLOUD_TENANT and CLOUD_ADMIN_ROLE in self.roles


# The caller of services run without authentication (tests, benchmarks,
# in-process bootstrap): trusted as the cloud administrator.
TRUSTED = Caller(user="system", tenant=CLOUD_TENANT, roles=(CLOUD_ADMIN_ROLE,))
# The caller of a public verb (logging in): no rights at all.
ANONYMOUS = Caller(user="anonymous", tenant="", roles=())


def rule(permission: str) -> Rule:
    try:
        return PERMISSIONS[permission]
    except KeyError:
        raise LookupError(f"no permission entry for {permission!r}") from None


BUILT_IN_ROLES = frozenset({"admin", "member", "reader"})


def grantable() -> frozenset[str]:
    """Permissions a custom role may carry: those decided within a tenant."""
    return frozenset(p for p, r in PERMISSIONS.items() if r.scope is Scope.TENANT)


class RoleBook:
    """Custom roles (name -> permissions), folded from ``role.defined`` events.

    A custom role grants its permissions within the tenant it is assigned
    in, never cloud-wide ones. The services share one book per process,
    kept current by the identity feed.
    """

    def __init__(self) -> None:
        self.custom: dict[str, frozenset[str]] = {}

    def define(self, name: str, permissions: Iterable[str]) -> None:
        self.custom[name] = frozenset(permissions) & grantable()

    def allows(self, roles: Iterable[str], permission: str) -> bool:
        return any(permission in self.custom.get(r, ()) for r in roles)

    def authorize(self, caller: Caller, permission: str, tenant: str | None = None) -> None:
        authorize(caller, permission, tenant, self)


def authorize(
    caller: Caller, permission: str, tenant: str | None = None, book: RoleBook | None = None
) -> None:
    """Allow or raise. ``tenant``: the tenant whose resource is touched."""
    r = rule(permission)
    if r.scope is Scope.PUBLIC or caller.is_cloud_admin:
        return
    if r.scope is Scope.CLOUD:
        raise Forbidden(f"{permission} needs the cloud admin role")
    if r.scope is Scope.SELF:
        return
    if tenant is None or tenant != caller.tenant:
        raise NotFound(f"tenant {tenant or '(none)'} not found")
    if r.roles.intersection(caller.roles):
        return
    if book is not None and book.allows(caller.roles, permission):
        return
    need = " or ".join(sorted(r.roles))
    have = ", ".join(caller.roles) or "no role"
    raise Forbidden(
        f"{permission} in tenant {tenant} needs role {need} or a custom role granting it; "
        f"you have {have}"
    )
