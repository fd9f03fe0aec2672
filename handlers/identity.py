"""Identity commands: users, role assignments, logging in, revoking tokens."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from typing import Any

import msgspec

from stratus.events.commands import Reply
from stratus.events.errors import (
    AlreadyExists,
    ConcurrencyConflict,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Unauthenticated,
)
from stratus.events.identity import (
    KEY,
    LOGIN,
    ROLE,
    SYSTEM,
    TOKEN,
    USER,
    KeyRotate,
    Login,
    LoginFailed,
    RoleAssign,
    RoleAssigned,
    RoleCreate,
    RoleDefined,
    RoleRevoke,
    RoleRevoked,
    SigningKeyAdded,
    TokenIssued,
    TokenRevoke,
    TokenRevoked,
    UserCreate,
    UserCreated,
    UserDisable,
    UserDisabled,
    UserEnable,
    UserEnabled,
    UserPasswordChanged,
    UserSetPassword,
    UserTokensRevoked,
)
from stratus.events.ids import is_name, new_id
from stratus.events.model import Cause, Event
from stratus.events.store import Condition
from stratus.events.tenants import TenantCreate
from stratus.handlers import tenants
from stratus.handlers.keyring import DEFAULT_TTL_S, KeyRing
from stratus.handlers.passwords import hash_password, verify_password
from stratus.handlers.rbac import BUILT_IN_ROLES, TRUSTED, Caller, grantable
from stratus.handlers.registry import Handler, Special, on_aggregate

# No token lives longer: a revocation whose token's expiry is unknown (an
# admin revoking another user's token by id) is kept this long.
MAX_TTL_S = 24 * 3600


class UserState(msgspec.Struct, frozen=True):
    name: str = ""
    password_hash: str = ""
    created: bool = False
    enabled: bool = True
    assignments: frozenset[tuple[str, str]] = frozenset()  # (tenant, role)
    # When the user's tokens, or those for one tenant, were last made void.
    revoked_at: float = 0.0
    tenant_revoked_at: tuple[tuple[str, float], ...] = ()

    def void_before(self, tenant: str) -> float:
        """Tokens for ``tenant`` issued at or before this time are refused."""
        per_tenant = dict(self.tenant_revoked_at).get(tenant, 0.0)
        return max(self.revoked_at, per_tenant)

    def roles_in(self, tenant: str) -> list[str]:
        return sorted(r for t, r in self.assignments if t == tenant)


def user_subject(name: str) -> str:
    return f"ev.{SYSTEM}.{USER}.{name}"


def fold_user(state: UserState, event: Event) -> UserState:
    match event:
        case UserCreated():
            return UserState(name=event.name, password_hash=event.password_hash, created=True)
        case UserPasswordChanged():
            return msgspec.structs.replace(state, password_hash=event.password_hash)
        case UserDisabled():
            return msgspec.structs.replace(state, enabled=False, revoked_at=event.at.timestamp())
        case UserTokensRevoked():
            return msgspec.structs.replace(state, revoked_at=event.at.timestamp())
        case UserEnabled():
            return msgspec.structs.replace(state, enabled=True)
        case RoleAssigned():
            return msgspec.structs.replace(
                state, assignments=state.assignments | {(event.role_tenant, event.role)}
            )
        case RoleRevoked():
            times = dict(state.tenant_revoked_at)
            times[event.role_tenant] = event.at.timestamp()
            return msgspec.structs.replace(
                state,
                assignments=state.assignments - {(event.role_tenant, event.role)},
                tenant_revoked_at=tuple(sorted(times.items())),
            )
    return state


def user_view(state: UserState) -> dict[str, Any]:
    return {
        "id": state.name,
        "name": state.name,
        "enabled": state.enabled,
        "roles": [{"tenant": t, "role": r} for t, r in sorted(state.assignments)],
    }


def _user(state: UserState, name: str) -> UserState:
    if not state.created:
        raise NotFound(f"user {name} not found")
    return state


class _HashedUserCreate(msgspec.Struct, frozen=True):
    name: str
    password_hash: str


async def prepare_user_create(cmd: UserCreate, _caller: Caller, _svc: Any) -> _HashedUserCreate:
    # Memory-hard on purpose: tens of milliseconds, kept off the event loop.
    digest = await asyncio.to_thread(hash_password, cmd.password)
    return _HashedUserCreate(cmd.name, digest)


def decide_user_create(state: UserState, cmd: _HashedUserCreate, cause: Cause) -> list[Event]:
    if state.created:
        raise AlreadyExists(f"user {cmd.name} already exists (user names are never reused)")
    return [
        cause.make(
            UserCreated, SYSTEM, USER, cmd.name, name=cmd.name, password_hash=cmd.password_hash
        )
    ]


class _HashedPassword(msgspec.Struct, frozen=True):
    name: str
    password_hash: str


async def prepare_set_password(cmd: UserSetPassword, caller: Caller, _svc: Any) -> _HashedPassword:
    if cmd.name != caller.user and not caller.is_cloud_admin:
        raise Forbidden("you may change your own password only")
    return _HashedPassword(cmd.name, await asyncio.to_thread(hash_password, cmd.password))


def decide_set_password(state: UserState, cmd: _HashedPassword, cause: Cause) -> list[Event]:
    _user(state, cmd.name)
    return [
        cause.make(UserPasswordChanged, SYSTEM, USER, cmd.name, password_hash=cmd.password_hash),
        # Whoever held the old password may hold a token too.
        cause.make(UserTokensRevoked, SYSTEM, USER, cmd.name),
    ]


def decide_user_disable(state: UserState, cmd: UserDisable, cause: Cause) -> list[Event]:
    u = _user(state, cmd.name)
    return [] if not u.enabled else [cause.make(UserDisabled, SYSTEM, USER, cmd.name)]


def decide_user_enable(state: UserState, cmd: UserEnable, cause: Cause) -> list[Event]:
    u = _user(state, cmd.name)
    return [] if u.enabled else [cause.make(UserEnabled, SYSTEM, USER, cmd.name)]


class RoleState(msgspec.Struct, frozen=True):
    defined: bool = False
    permissions: tuple[str, ...] = ()


def role_subject(name: str) -> str:
    return f"ev.{SYSTEM}.{ROLE}.{name}"


def fold_role(state: RoleState, event: Event) -> RoleState:
    if isinstance(event, RoleDefined):
        return RoleState(True, tuple(event.permissions))
    return state


def role_view(state: RoleState) -> dict[str, Any]:
    return {"defined": state.defined, "permissions": list(state.permissions)}


def decide_role_create(state: RoleState, cmd: RoleCreate, cause: Cause) -> list[Event]:
    if cmd.name in BUILT_IN_ROLES:
        raise AlreadyExists(f"role {cmd.name} is built in")
    if state.defined:
        raise AlreadyExists(f"role {cmd.name} already exists")
    unknown = sorted(set(cmd.permissions) - grantable())
    if unknown:
        raise Invalid(
            f"role.create: {', '.join(unknown)} cannot be granted by a role; "
            f"grantable: {', '.join(sorted(grantable()))}"
        )
    perms = sorted(set(cmd.permissions))
    return [cause.make(RoleDefined, SYSTEM, ROLE, cmd.name, name=cmd.name, permissions=perms)]


async def prepare_role(cmd: RoleAssign | RoleRevoke, _caller: Caller, svc: Any) -> Any:
    if isinstance(cmd, RoleAssign) and cmd.role not in BUILT_IN_ROLES:
        r = svc.cache.get(role_subject(cmd.role), RoleState, fold_role)
        await svc.cache.refresh(role_subject(cmd.role), r, fold_role)
        if not r.state.defined:
            raise NotFound(f"role {cmd.role} not found (create it with role.create)")
    if isinstance(cmd, RoleAssign):
        # A grant in a tenant that does not exist would be a dangling right.
        t = svc.cache.get(tenants.subject(cmd.tenant), tenants.TenantState, tenants.fold)
        await svc.cache.refresh(tenants.subject(cmd.tenant), t, tenants.fold)
        if not t.state.live:
            raise NotFound(f"tenant {cmd.tenant} not found")
    return cmd


def _grant_event(cls: type[Event], cmd: RoleAssign | RoleRevoke, cause: Cause) -> Event:
    return cause.make(
        cls, SYSTEM, USER, cmd.user, user=cmd.user, role_tenant=cmd.tenant, role=cmd.role
    )


def decide_role_assign(state: UserState, cmd: RoleAssign, cause: Cause) -> list[Event]:
    u = _user(state, cmd.user)
    if (cmd.tenant, cmd.role) in u.assignments:
        return []
    return [_grant_event(RoleAssigned, cmd, cause)]


def decide_role_revoke(state: UserState, cmd: RoleRevoke, cause: Cause) -> list[Event]:
    u = _user(state, cmd.user)
    if (cmd.tenant, cmd.role) not in u.assignments:
        raise NotFound(f"user {cmd.user} has no role {cmd.role} in tenant {cmd.tenant}")
    return [_grant_event(RoleRevoked, cmd, cause)]


# -- tokens -------------------------------------------------------------------


class TokenState(msgspec.Struct, frozen=True):
    revoked: bool = False


def fold_token(state: TokenState, event: Event) -> TokenState:
    return TokenState(revoked=True) if isinstance(event, TokenRevoked) else state


class _RevokeOne(msgspec.Struct, frozen=True):
    token_id: str
    user: str
    expires_at: int


class _RevokeAll(msgspec.Struct, frozen=True):
    user: str


async def prepare_revoke(cmd: TokenRevoke, caller: Caller, _svc: Any) -> Any:
    if cmd.user is not None:
        if cmd.user != caller.user and not caller.is_cloud_admin:
            raise Forbidden("only the cloud admin may revoke another user's tokens")
        return _RevokeAll(cmd.user)
    token_id = cmd.token_id or caller.token_id
    if not token_id:
        raise Invalid("no token to revoke: name one, or call with a token")
    if token_id == caller.token_id:
        return _RevokeOne(token_id, caller.user, caller.expires_at or _expiry_bound())
    if not caller.is_cloud_admin:
        raise Forbidden("you may revoke your own token or all your tokens (--user yourself)")
    return _RevokeOne(token_id, "", _expiry_bound())


def _expiry_bound() -> int:
    # How long a revocation must be remembered: at most a token's lifetime.
    return int(time.time()) + MAX_TTL_S


def decide_revoke_one(state: TokenState, cmd: _RevokeOne, cause: Cause) -> list[Event]:
    if state.revoked:
        return []
    return [
        cause.make(
            TokenRevoked, SYSTEM, TOKEN, cmd.token_id, user=cmd.user, expires_at=cmd.expires_at
        )
    ]


def decide_revoke_all(state: UserState, cmd: _RevokeAll, cause: Cause) -> list[Event]:
    _user(state, cmd.user)
    return [cause.make(UserTokensRevoked, SYSTEM, USER, cmd.user)]


def _revoke_boundary(cmd: Any) -> str:
    if isinstance(cmd, _RevokeAll):
        return user_subject(cmd.user)
    return f"ev.{SYSTEM}.{TOKEN}.{cmd.token_id}"


def _revoke_decide(state: Any, cmd: Any, cause: Cause) -> list[Event]:
    if isinstance(cmd, _RevokeAll):
        return decide_revoke_all(state, cmd, cause)
    return decide_revoke_one(state, cmd, cause)


def _revoke_initial_for(boundary: str) -> Any:
    return UserState() if boundary.startswith(f"ev.{SYSTEM}.{USER}.") else TokenState()


def _revoke_fold(state: Any, event: Event) -> Any:
    if isinstance(state, UserState):
        return fold_user(state, event)
    return fold_token(state, event)


# -- logging in ---------------------------------------------------------------


class LoginFlow:
    """``auth.login``: check the password, sign a token, record both outcomes."""

    def __init__(self, keyring: KeyRing, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.keyring = keyring
        self.ttl_s = min(ttl_s, MAX_TTL_S)

    async def run(self, svc: Any, cmd: Login, cause: Cause) -> Reply:
        name = cmd.user
        # Who tried is the user named, whether or not the password was right.
        cause = msgspec.structs.replace(cause, actor=name[:63] if is_name(name) else "anonymous")
        subject = user_subject(name) if is_name(name) else None
        for _ in range(svc.max_attempts):
            tracked = svc.cache.get(subject, UserState, fold_user) if subject else None
            if tracked is not None:
                # Always from the log: a disabled user must not get in on a
                # cached state. The conditional append below closes the gap.
                await svc.cache.refresh(subject, tracked, fold_user)
            state = tracked.state if tracked is not None else UserState()
            ok = state.created and state.enabled and bool(cmd.password)
            if ok:
                ok = await asyncio.to_thread(verify_password, cmd.password, state.password_hash)
            if not ok:
                reason = "disabled" if state.created and not state.enabled else "bad credentials"
                await self._failed(svc, name, reason, cause)
                raise Unauthenticated("wrong user name or password")
            tenant = cmd.tenant or _home_tenant(state)
            roles = state.roles_in(tenant) if tenant else []
            if not roles:
                raise Forbidden(f"user {name} has no role in tenant {tenant or '(none)'}")
            # Token times are whole seconds and a revocation voids tokens
            # issued up to its instant: a token signed in that same second
            # would be born void. Wait for the next second (at most one).
            wait = math.floor(state.void_before(tenant)) + 1 - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            token, principal = self.keyring.sign(name, tenant, roles, ttl_s=self.ttl_s)
            event = cause.make(
                TokenIssued,
                SYSTEM,
                USER,
                name,
                token_id=principal.token_id,
                token_tenant=tenant,
                roles=list(roles),
                expires_at=principal.expires_at,
            )
            try:
                result = await svc.appender.append(
                    [event], Condition(subject, tracked.seq), msg_id=cause.correlation_id
                )
            except ConcurrencyConflict:
                continue
            return Reply(
                ok=True,
                seqs=result.seqs,
                data={
                    "token": token,
                    "token_id": principal.token_id,
                    "user": name,
                    "tenant": tenant,
                    "roles": list(roles),
                    "expires_at": principal.expires_at,
                },
            )
        raise Conflict("the user kept changing while logging in; retry")

    async def _failed(self, svc: Any, name: str, reason: str, cause: Cause) -> None:
        # The attempt is part of the audit trail; the password never is.
        agg = name if is_name(name) else "invalid-name"
        event = cause.make(LoginFailed, SYSTEM, LOGIN, agg, user=name[:63], reason=reason)
        await svc.appender.append([event], msg_id=cause.correlation_id)


def _home_tenant(state: UserState) -> str | None:
    tenants_ = sorted({t for t, _ in state.assignments})
    return tenants_[0] if len(tenants_) == 1 else ("admin" if "admin" in tenants_ else None)


class KeyRotation:
    """``key.rotate``: a new signing key, announced on the log before first use."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    async def run(self, svc: Any, cmd: KeyRotate, cause: Cause) -> Reply:
        kid = await asyncio.to_thread(self.keyring.add_key)
        public = self.keyring.public_keys()[kid]
        event = signing_key_event(kid, public, cause)
        result = await svc.appender.append([event], Condition(event.subject, 0))
        return Reply(ok=True, seqs=result.seqs, data={"kid": kid, "keys": list(self.keyring.kids)})


def signing_key_event(kid: str, public_key: bytes, cause: Cause) -> Event:
    return cause.make(SigningKeyAdded, SYSTEM, KEY, kid, kid=kid, public_key=public_key)


# A verb deciding on one user's aggregate (named by ``command.<field>``);
# its permission is the verb itself.
_on_user = on_aggregate(user_subject, UserState, fold_user, user_view)


def handlers(keyring: KeyRing | None = None, ttl_s: int = DEFAULT_TTL_S) -> list[Any]:
    """The identity verbs; logging in needs the private signing keys."""
    in_tenant = {"tenant_of": lambda c: c.tenant, "prepare": prepare_role}
    out: list[Any] = [
        _on_user(
            "user.create", UserCreate, "name", decide_user_create, prepare=prepare_user_create
        ),
        _on_user(
            "user.set-password",
            UserSetPassword,
            "name",
            decide_set_password,
            prepare=prepare_set_password,
        ),
        _on_user("user.disable", UserDisable, "name", decide_user_disable),
        _on_user("user.enable", UserEnable, "name", decide_user_enable),
        Handler(
            verb="role.create",
            command=RoleCreate,
            permission="role.create",
            boundary=lambda c: role_subject(c.name),
            initial=RoleState,
            fold=fold_role,
            decide=decide_role_create,
            view=role_view,
        ),
        _on_user("role.assign", RoleAssign, "user", decide_role_assign, **in_tenant),
        _on_user("role.revoke", RoleRevoke, "user", decide_role_revoke, **in_tenant),
        Handler(
            verb="token.revoke",
            command=TokenRevoke,
            permission="token.revoke",
            prepare=prepare_revoke,
            boundary=_revoke_boundary,
            initial=TokenState,
            initial_for=_revoke_initial_for,
            fold=_revoke_fold,
            decide=_revoke_decide,
            view=None,
        ),
    ]
    if keyring is not None:
        out.append(Special("auth.login", Login, "auth.login", LoginFlow(keyring, ttl_s).run))
        out.append(Special("key.rotate", KeyRotate, "key.rotate", KeyRotation(keyring).run))
    return out


BOOTSTRAP_ADMIN = "admin"


async def bootstrap_admin(svc: Any, password: str | None) -> str | None:
    """On a log without the user ``admin``: tenant ``admin``, user ``admin``
    with the cloud admin role. Returns the password it set (generated when
    none was given), or None when the admin already existed."""
    subject = user_subject(BOOTSTRAP_ADMIN)
    tracked = svc.cache.get(subject, UserState, fold_user)
    await svc.cache.refresh(subject, tracked, fold_user)
    if tracked.state.created:
        return None
    password = password or secrets.token_urlsafe(12)
    by_verb = {h.verb: h for h in svc.handlers.values() if isinstance(h, Handler)}
    name = BOOTSTRAP_ADMIN
    steps: list[tuple[Handler, Any]] = [
        (by_verb["tenant.create"], TenantCreate(name=name, description="cloud administration")),
        (by_verb["user.create"], UserCreate(name=name, password=password)),
        (by_verb["role.assign"], RoleAssign(user=name, tenant=name, role="admin")),
    ]
    for handler, cmd in steps:
        command_id = new_id()
        cause = Cause(actor="system", correlation_id=command_id, causation_id=command_id)
        if handler.prepare is not None:
            cmd = await handler.prepare(cmd, TRUSTED, svc)
        with contextlib.suppress(AlreadyExists):
            await svc.execute(handler, cmd, cause)
    return password
