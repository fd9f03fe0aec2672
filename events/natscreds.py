"""Who a connection is to the broker: connect options and service credentials.

Every connection except the auth callout's own is admitted by nats-server's
auth callout (``handlers/callout.py``), which decides its permissions:

* It presents a Stratus token in CONNECT (``auth_token``): a user's token
  (the CLI), a service credential's (``stratus serve KIND --creds FILE``),
  or none (good for logging in and nothing else).
* It signs the server's nonce with an nkey made for that connection alone.
  The key's public half names the connection's inbox prefix
  (``_INBOX.<nkey>``), and the callout lets it subscribe there and nowhere
  else: no other connection can prove that key, so no other connection may
  read its replies. The server checks that, not the client.

A service's credentials file (``stratus credentials issue --service KIND``)
is the JSON form of ``ServiceCreds``: its kind and host, the token the
broker admits it by, and for the few services that need them the secrets
of their own (the token signing keys of the handlers, the webhook master
key, the auth callout's nkeys). Nothing else reaches a service.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE
from stratus.events.natsjwt import JWTError, Signer, new_seed

# Every callout-admitted connection receives replies under this prefix
# followed by its nkey: ``reply_allowed`` (events.commands) keeps it.
INBOX = "_INBOX"

# Service kinds and what ``--host`` means for them.
HOST_KINDS = ("compute-agent", "network-agent")
SERVICE_KINDS = (
    "handlers",
    "query",
    "projector",
    "scheduler",
    "allocator",
    "webhooks",
    *HOST_KINDS,
    # Gateways acting for users: they forward each user's own token.
    "openstack-api",
    "console",
    # The callout itself: a user in the broker's configuration, not a token.
    "auth-callout",
)
# Credentials that carry secrets beyond the token: issued only where those
# secrets are (the data dir the cloud was initialised in).
SECRET_KINDS = ("handlers", "webhooks", "auth-callout")

# Agents read the log through consumers of these names only (``reader_names``):
# a name in the API subject is what the broker's permissions can see, so an
# agent's credential cannot create, change or remove anyone else's consumer.
AGENT_READERS = 8


def inbox_prefix(nkey: str) -> str:
    return f"{INBOX}.{nkey}"


def connect_options(token: str | None = None, seed: str | None = None) -> dict[str, Any]:
    """nats-py ``connect`` options for a connection admitted by the callout:
    a fresh nkey (or ``seed``'s) signs the nonce and names the inbox, and
    ``token`` says who it is. On a broker without authentication (tests,
    benchmarks) the same options connect as well."""
    seed = seed or new_seed("user")
    opts: dict[str, Any] = {
        "nkeys_seed_str": seed,
        "inbox_prefix": inbox_prefix(Signer(seed).public),
    }
    if token:
        opts["token"] = token
    return opts


def durable_name(kind: str, host: str) -> str:
    """The durable consumer of an agent's host (compute agents)."""
    if kind != "compute-agent":
        raise Invalid(f"{kind} has no durable consumer of its host")
    return f"compute-{host}"


def reader_names(kind: str, host: str) -> tuple[str, ...]:
    """The consumer names an agent reads the log through (one per read at once)."""
    short = {"compute-agent": "ca", "network-agent": "na"}[kind]
    # '_' cannot occur in a host name: no two hosts' names meet.
    return tuple(f"rd_{short}_{host}_{i}" for i in range(AGENT_READERS))


class SigningKeys(msgspec.Struct, frozen=True):
    """Private token signing keys (PKCS#8 PEM by kid), oldest first."""

    order: list[str]
    pem: dict[str, str]


class ServiceCreds(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A credentials file: one service's identity and the secrets it needs."""

    kind: str
    host: str = ""
    # The credential's id (its token's ``jti``): what `credentials revoke` takes.
    id: str = ""
    token: str = ""
    expires_at: int = 0
    # handlers: the private keys tokens are signed with.
    signing_keys: SigningKeys | None = None
    # handlers and webhooks: the key webhook secrets derive from (hex).
    webhook_master: str = ""
    # auth-callout: its user and the system account's (nkey seeds), the
    # account key it signs users with, and the public token keys it trusts
    # before the log names them (kid -> raw key, hex).
    auth_seed: str = ""
    sys_seed: str = ""
    issuer_seed: str = ""
    public_keys: dict[str, str] = {}

    def check(self) -> ServiceCreds:
        """Itself if it is well formed; ``Invalid`` naming what is not."""
        if self.kind not in SERVICE_KINDS:
            raise Invalid(f"credentials of an unknown kind {self.kind!r}")
        if (self.kind in HOST_KINDS) != bool(self.host):
            raise Invalid(
                f"{self.kind} credentials {'need' if self.kind in HOST_KINDS else 'take no'} a host"
            )
        if self.host and not NAME_RE.match(self.host):
            raise Invalid(f"host {self.host!r} is not a valid name")
        if self.kind == "auth-callout":
            for field in ("auth_seed", "sys_seed", "issuer_seed"):
                try:
                    Signer(getattr(self, field))
                except JWTError as exc:
                    raise Invalid(f"auth-callout credentials: {field}: {exc}") from None
        elif not self.token:
            raise Invalid(f"{self.kind} credentials carry no token")
        return self

    @property
    def label(self) -> str:
        return f"{self.kind} for host {self.host}" if self.host else self.kind

    def connect_options(self) -> dict[str, Any]:
        if self.kind == "auth-callout":
            # A user of the broker's own configuration: its nkey is the login.
            return connect_options(seed=self.auth_seed)
        return connect_options(self.token)

    def reader_names(self) -> tuple[str, ...] | None:
        """The consumer names its reads must use (agents); None: any."""
        return reader_names(self.kind, self.host) if self.kind in HOST_KINDS else None


_encoder = msgspec.json.Encoder()


def dumps(creds: ServiceCreds) -> bytes:
    return msgspec.json.format(_encoder.encode(creds), indent=2) + b"\n"


def load(path: str | os.PathLike[str]) -> ServiceCreds:
    """The credentials in ``path``; ``Invalid`` saying why not."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise Invalid(f"cannot read credentials {p}: {exc.strerror or exc}") from None
    try:
        creds = msgspec.json.decode(raw, type=ServiceCreds)
    except msgspec.DecodeError as exc:
        raise Invalid(f"{p} is not a Stratus credentials file: {exc}") from None
    return creds.check()


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file only its owner may read (created 0600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
