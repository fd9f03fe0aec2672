"""Service credentials: issued (a token that admits one service), recorded, revoked.

``credential.issue`` (the cloud admin) signs a service token with the
handlers' key ring and records it (``credential.issued``, its id and
expiry, never the token); ``credential.revoke`` records the revocation that
every verifier, and so the auth callout, honours until the token expires.
Credentials that carry secrets beyond their token (the handlers' signing
keys, the webhook master key, the callout's nkeys) are issued only where
those secrets are: ``stratus credentials issue --data-dir`` (``cli/creds.py``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from stratus.events.commands import Reply
from stratus.events.credentials import (
    CREDENTIAL,
    CredentialIssue,
    CredentialIssued,
    CredentialRevoke,
    CredentialRevoked,
)
from stratus.events.errors import Conflict, Invalid, NotFound
from stratus.events.ids import NAME_RE
from stratus.events.model import Cause, Event
from stratus.events.natscreds import HOST_KINDS, SECRET_KINDS, SERVICE_KINDS, ServiceCreds
from stratus.events.resources import SYSTEM
from stratus.events.store import Condition
from stratus.handlers.keyring import KeyRing
from stratus.handlers.registry import Handler, Special
from stratus.handlers.tokens import Principal

DAY_S = 24 * 3600


def credential_subject(credential_id: str) -> str:
    return f"ev.{SYSTEM}.{CREDENTIAL}.{credential_id}"


def check_kind(kind: str, host: str | None) -> tuple[str, str]:
    """``kind`` and ``host`` if a credential may be issued for them; ``Invalid`` if not."""
    if kind not in SERVICE_KINDS:
        raise Invalid(f"no service kind {kind!r}: one of {', '.join(SERVICE_KINDS)}")
    if kind in HOST_KINDS:
        if not host or not NAME_RE.match(host):
            raise Invalid(f"{kind} credentials are for one host: give --host NAME")
    elif host:
        raise Invalid(f"{kind} credentials are for no particular host: leave out --host")
    return kind, host or ""


def mint(keyring: KeyRing, kind: str, host: str, ttl_s: int) -> tuple[ServiceCreds, Principal]:
    """A credential's token, signed now: the file's identity part and its principal."""
    token, p = keyring.sign_service(kind, host, ttl_s=ttl_s)
    creds = ServiceCreds(kind=kind, host=host, id=p.token_id, token=token, expires_at=p.expires_at)
    return creds, p


def issued(creds: ServiceCreds, cause: Cause) -> Event:
    """The record of a credential (its id and expiry, not its token)."""
    return cause.make(
        CredentialIssued,
        SYSTEM,
        CREDENTIAL,
        creds.id,
        service=creds.kind,
        host=creds.host,
        expires_at=creds.expires_at,
    )


class Issuance:
    """``credential.issue``: sign and record one; the token is in the reply only."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    async def run(self, svc: Any, cmd: CredentialIssue, cause: Cause) -> Reply:
        kind, host = check_kind(cmd.kind, cmd.host)
        if kind in SECRET_KINDS:
            raise Invalid(
                f"{kind} credentials carry secrets that never travel through the broker: "
                "issue them where the cloud was initialised "
                f"(stratus credentials issue --service {kind} --data-dir DIR)"
            )
        creds, _ = mint(self.keyring, kind, host, cmd.ttl_days * DAY_S)
        event = issued(creds, cause)
        result = await svc.appender.append(
            [event], Condition(event.subject, 0), msg_id=cause.correlation_id
        )
        if result.duplicate:
            # The first attempt's token was in its reply; this one is not on the log.
            raise Conflict("this command was applied before: issue a new credential")
        return Reply(ok=True, seqs=result.seqs, data=msgspec.to_builtins(creds))


class CredentialState(msgspec.Struct, frozen=True):
    issued: bool = False
    expires_at: int = 0
    revoked: bool = False


def fold_credential(state: CredentialState, event: Event) -> CredentialState:
    if isinstance(event, CredentialIssued):
        return CredentialState(True, event.expires_at, state.revoked)
    if isinstance(event, CredentialRevoked):
        return msgspec.structs.replace(state, revoked=True)
    return state


def decide_revoke(state: CredentialState, cmd: CredentialRevoke, cause: Cause) -> list[Event]:
    if not state.issued:
        raise NotFound(f"no service credential {cmd.id}")
    if state.revoked:
        return []
    return [cause.make(CredentialRevoked, SYSTEM, CREDENTIAL, cmd.id, expires_at=state.expires_at)]


def handlers(keyring: KeyRing | None) -> list[Any]:
    out: list[Any] = [
        Handler(
            verb="credential.revoke",
            command=CredentialRevoke,
            permission="credential.revoke",
            boundary=lambda c: credential_subject(c.id),
            initial=CredentialState,
            fold=fold_credential,
            decide=decide_revoke,
            view=lambda s: {"revoked": s.revoked, "expires_at": s.expires_at},
        )
    ]
    if keyring is not None:
        out.append(
            Special("credential.issue", CredentialIssue, "credential.issue", Issuance(keyring).run)
        )
    return out
