"""rbac.authorize as a table: who may do what, deny by default (pure, no services)."""

from __future__ import annotations

import pytest

from stratus.events.errors import Forbidden, NotFound
from stratus.handlers.rbac import (
    ANONYMOUS,
    CLOUD_ADMIN_ROLE,
    CLOUD_TENANT,
    PERMISSIONS,
    READ,
    TRUSTED,
    Caller,
    Scope,
    authorize,
    rule,
)

# The callers of the scenario, and a few edge cases of "who is the cloud admin".
CLOUD_ADMIN = Caller(user="admin", tenant=CLOUD_TENANT, roles=(CLOUD_ADMIN_ROLE,))
TA_ADMIN = Caller(user="ann", tenant="ta", roles=("admin",))
TA_MEMBER = Caller(user="alice", tenant="ta", roles=("member",))
TA_READER = Caller(user="rex", tenant="ta", roles=("reader",))
TB_MEMBER = Caller(user="bob", tenant="tb", roles=("member",))
TA_NO_ROLE = Caller(user="nobody", tenant="ta", roles=())
TA_CUSTOM_ROLE = Caller(user="cus", tenant="ta", roles=("auditor",))
# `member` in the admin tenant is not the cloud admin: only role admin there is.
ADMIN_TENANT_MEMBER = Caller(user="mem", tenant=CLOUD_TENANT, roles=("member",))
ADMIN_TENANT_READER = Caller(user="red", tenant=CLOUD_TENANT, roles=("reader",))

OK, FORBIDDEN, NOT_FOUND = "ok", "forbidden", "not_found"

# (caller, permission, resource tenant, outcome): written from the words,
# not derived from the code under test.
TABLE = [
    # the cloud admin may do everything, in any tenant
    *[(CLOUD_ADMIN, p, "ta", OK) for p in PERMISSIONS],
    *[(CLOUD_ADMIN, p, None, OK) for p in PERMISSIONS],
    *[(TRUSTED, p, "tb", OK) for p in PERMISSIONS],
    # tenants, users and hosts are the cloud admin's alone
    (TA_ADMIN, "tenant.create", None, FORBIDDEN),
    (TA_ADMIN, "tenant.rename", None, FORBIDDEN),
    (TA_ADMIN, "tenant.delete", None, FORBIDDEN),
    (TA_ADMIN, "user.create", None, FORBIDDEN),
    (TA_ADMIN, "user.disable", None, FORBIDDEN),
    (TA_ADMIN, "user.enable", None, FORBIDDEN),
    (TA_ADMIN, "user.list", None, FORBIDDEN),
    (TA_MEMBER, "tenant.create", None, FORBIDDEN),
    (TA_MEMBER, "user.create", None, FORBIDDEN),
    (TB_MEMBER, "tenant.delete", "ta", FORBIDDEN),
    (ADMIN_TENANT_MEMBER, "tenant.create", None, FORBIDDEN),
    (ADMIN_TENANT_READER, "user.list", None, FORBIDDEN),
    (ANONYMOUS, "tenant.create", None, FORBIDDEN),
    # a tenant admin manages role assignments in its own tenant only
    (TA_ADMIN, "role.assign", "ta", OK),
    (TA_ADMIN, "role.revoke", "ta", OK),
    (TA_ADMIN, "role.list", "ta", OK),
    (TA_ADMIN, "role.assign", "tb", NOT_FOUND),
    (TA_ADMIN, "role.assign", CLOUD_TENANT, NOT_FOUND),
    (TA_MEMBER, "role.assign", "ta", FORBIDDEN),
    (TA_MEMBER, "role.revoke", "ta", FORBIDDEN),
    (TA_MEMBER, "role.list", "ta", FORBIDDEN),
    (TA_READER, "role.assign", "ta", FORBIDDEN),
    (TB_MEMBER, "role.assign", "ta", NOT_FOUND),
    (ADMIN_TENANT_MEMBER, "role.assign", CLOUD_TENANT, FORBIDDEN),
    # reading a tenant: any of its roles; another tenant does not exist for you
    (TA_ADMIN, "tenant.show", "ta", OK),
    (TA_MEMBER, "tenant.show", "ta", OK),
    (TA_READER, "tenant.show", "ta", OK),
    (TA_READER, "events.read", "ta", OK),
    (TA_READER, "audit.read", "ta", OK),
    (TB_MEMBER, "tenant.show", "ta", NOT_FOUND),
    (TB_MEMBER, "events.read", "ta", NOT_FOUND),
    (TB_MEMBER, "audit.read", "ta", NOT_FOUND),
    (TA_MEMBER, "audit.read", "_system", NOT_FOUND),
    (ADMIN_TENANT_MEMBER, "tenant.show", "ta", NOT_FOUND),
    (ADMIN_TENANT_MEMBER, "tenant.show", CLOUD_TENANT, OK),
    # a tenant-scoped permission with no tenant named: nothing to find
    (TA_MEMBER, "tenant.show", None, NOT_FOUND),
    (TA_ADMIN, "role.assign", None, NOT_FOUND),
    # deny by default: no role, or a role no permission names
    (TA_NO_ROLE, "tenant.show", "ta", FORBIDDEN),
    (TA_NO_ROLE, "events.read", "ta", FORBIDDEN),
    (TA_CUSTOM_ROLE, "tenant.show", "ta", FORBIDDEN),
    (TA_CUSTOM_ROLE, "role.assign", "ta", FORBIDDEN),
    # one's own things, and logging in
    (TA_READER, "token.revoke", None, OK),
    (TB_MEMBER, "tenant.list", None, OK),
    (TB_MEMBER, "status.read", "ta", OK),
    (TA_NO_ROLE, "token.revoke", None, OK),
    (ANONYMOUS, "auth.login", None, OK),
    (TB_MEMBER, "auth.login", "ta", OK),
]


def _outcome(caller: Caller, permission: str, tenant: str | None) -> str:
    try:
        authorize(caller, permission, tenant)
    except Forbidden:
        return FORBIDDEN
    except NotFound:
        return NOT_FOUND
    return OK


@pytest.mark.parametrize(
    ("caller", "permission", "tenant", "expected"),
    TABLE,
    ids=[f"{c.user}@{c.tenant or '-'}:{p}:{t}" for c, p, t, _ in TABLE],
)
def test_authorize_table(caller, permission, tenant, expected):
    assert _outcome(caller, permission, tenant) == expected


CALLERS = [
    CLOUD_ADMIN,
    TA_ADMIN,
    TA_MEMBER,
    TA_READER,
    TB_MEMBER,
    TA_NO_ROLE,
    TA_CUSTOM_ROLE,
    ADMIN_TENANT_MEMBER,
    ADMIN_TENANT_READER,
]


def _spec(caller: Caller, permission: str, tenant: str) -> str:
    """The issue's rule in words: cloud admin everything; CLOUD only them; SELF
    and PUBLIC anyone; TENANT the listed roles in that tenant; another tenant
    is not found."""
    r = PERMISSIONS[permission]
    if r.scope is Scope.PUBLIC:
        return OK
    if caller.tenant == "admin" and "admin" in caller.roles:
        return OK
    if r.scope is Scope.CLOUD:
        return FORBIDDEN
    if r.scope is Scope.SELF:
        return OK
    if caller.tenant != tenant:
        return NOT_FOUND
    return OK if r.roles & set(caller.roles) else FORBIDDEN


@pytest.mark.parametrize("permission", sorted(PERMISSIONS))
def test_every_permission_for_every_kind_of_caller(permission):
    # every entry of the table, now and added later, against every kind of caller
    got = {(c.user, t): _outcome(c, permission, t) for c in CALLERS for t in ("ta", "tb", "admin")}
    want = {(c.user, t): _spec(c, permission, t) for c in CALLERS for t in ("ta", "tb", "admin")}
    assert got == want


def test_every_rule_is_well_formed():
    for name, r in PERMISSIONS.items():
        if r.scope is Scope.TENANT:
            assert r.roles, f"{name}: a tenant-scoped rule with no role allows nobody"
            assert r.roles <= {"admin", "member", "reader"}, name
        else:
            assert not r.roles, f"{name}: roles are ignored for scope {r.scope}"
    # read permissions include every built-in tenant role; none grants writes to reader
    assert {"admin", "member", "reader"} == READ
    for name, r in PERMISSIONS.items():
        if name.endswith((".create", ".delete", ".assign", ".revoke", ".rename")):
            assert "reader" not in r.roles, f"{name} would let a reader change things"


def test_unknown_permission_is_a_lookup_error_even_for_the_cloud_admin():
    with pytest.raises(LookupError, match=r"widget\.create"):
        rule("widget.create")
    with pytest.raises(LookupError):
        authorize(CLOUD_ADMIN, "widget.create", "ta")
    with pytest.raises(LookupError):
        authorize(TRUSTED, "widget.create")


def test_refusals_do_not_name_the_other_tenants_resources():
    # the not_found message names only the tenant the caller asked about
    with pytest.raises(NotFound) as exc:
        authorize(TB_MEMBER, "tenant.show", "ta")
    assert "ta" in exc.value.message and "forbidden" not in exc.value.message.lower()
    with pytest.raises(Forbidden) as exc:
        authorize(TA_READER, "role.assign", "ta")
    assert "admin" in exc.value.message and "reader" in exc.value.message


def test_cloud_admin_is_exactly_role_admin_in_tenant_admin():
    assert CLOUD_ADMIN.is_cloud_admin and TRUSTED.is_cloud_admin
    for c in (TA_ADMIN, ADMIN_TENANT_MEMBER, ADMIN_TENANT_READER, ANONYMOUS, TA_NO_ROLE):
        assert not c.is_cloud_admin, c
