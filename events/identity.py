"""Identity events and commands: users, role assignments, tokens, signing keys.

Users are system objects (``ev._system.user.<name>``); a user's role
assignments live on the user's subject too, so a login reads one aggregate.
A user's name is its id: immutable and never reused. Passwords reach events
only as memory-hard hashes; tokens never do (only their id).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from stratus.events.commands import Command
from stratus.events.ids import NAME_RE, TOKEN_RE
from stratus.events.model import Event

SYSTEM = "_system"
USER = "user"
TOKEN = "token"
KEY = "key"
LOGIN = "login"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern, max_length=63)]
TokenId = Annotated[str, msgspec.Meta(pattern=TOKEN_RE.pattern, max_length=64)]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]
ROLE = "role"
# Built-in (admin, member, reader) or a custom role defined with role.create.
Role = Name
Permission = Annotated[str, msgspec.Meta(pattern=r"^[a-z]+\.[a-z]+$", max_length=64)]


# -- events -------------------------------------------------------------------


class UserCreated(Event, frozen=True, tag="user.created"):
    name: str
    password_hash: str


class UserPasswordChanged(Event, frozen=True, tag="user.password_changed"):
    password_hash: str


class UserDisabled(Event, frozen=True, tag="user.disabled"):
    pass


class UserEnabled(Event, frozen=True, tag="user.enabled"):
    pass


class RoleAssigned(Event, frozen=True, tag="role.assigned"):
    user: str
    role_tenant: str
    role: str


class RoleRevoked(Event, frozen=True, tag="role.revoked"):
    user: str
    role_tenant: str
    role: str


class TokenIssued(Event, frozen=True, tag="token.issued"):
    token_id: str
    token_tenant: str
    roles: list[str]
    expires_at: int


class UserTokensRevoked(Event, frozen=True, tag="token.user_revoked"):
    """Every token of the user issued up to this event's time is void."""


class TokenRevoked(Event, frozen=True, tag="token.revoked"):
    user: str
    expires_at: int


class LoginFailed(Event, frozen=True, tag="login.failed"):
    user: str
    reason: str


class RoleDefined(Event, frozen=True, tag="role.defined"):
    """A custom role: the tenant-scoped permissions it grants."""

    name: str
    permissions: list[str]


class SigningKeyAdded(Event, frozen=True, tag="key.added"):
    kid: str
    public_key: bytes
    algorithm: str = "EdDSA"


EVENTS = (
    UserCreated,
    UserPasswordChanged,
    UserDisabled,
    UserEnabled,
    RoleAssigned,
    RoleRevoked,
    TokenIssued,
    UserTokensRevoked,
    TokenRevoked,
    LoginFailed,
    RoleDefined,
    SigningKeyAdded,
)


# -- commands -----------------------------------------------------------------


class Login(Command, frozen=True):
    user: Annotated[str, msgspec.Meta(max_length=63)]
    password: Annotated[str, msgspec.Meta(max_length=1024)]
    tenant: Name | None = None


class UserCreate(Command, frozen=True):
    name: Name
    password: Password


class UserSetPassword(Command, frozen=True):
    """A new password; every token the user holds becomes void."""

    name: Name
    password: Password


class UserDisable(Command, frozen=True):
    name: Name


class UserEnable(Command, frozen=True):
    name: Name


class RoleAssign(Command, frozen=True):
    user: Name
    tenant: Name
    role: Role


class RoleRevoke(Command, frozen=True):
    user: Name
    tenant: Name
    role: Role


class RoleCreate(Command, frozen=True):
    name: Name
    permissions: Annotated[list[Permission], msgspec.Meta(min_length=1, max_length=64)]


class TokenRevoke(Command, frozen=True):
    """Revoke ``token_id`` (default: the caller's own token), or with
    ``user`` every token of that user."""

    token_id: TokenId | None = None
    user: Name | None = None


class KeyRotate(Command, frozen=True):
    """Add a new signing key; tokens signed with older keys stay valid."""


COMMANDS = {
    "key.rotate": KeyRotate,
    "auth.login": Login,
    "user.create": UserCreate,
    "user.set-password": UserSetPassword,
    "user.disable": UserDisable,
    "user.enable": UserEnable,
    "role.create": RoleCreate,
    "role.assign": RoleAssign,
    "role.revoke": RoleRevoke,
    "token.revoke": TokenRevoke,
}
