"""The command envelope shared by the CLI, integrations and the handlers.

A command travels as a NATS request on ``cmd.<verb>``: the JSON body is the
command's fields, and the headers carry what is about the request rather
than the command (its id for idempotency, later the bearer token). Keeping
the token in a header means callers do not change when identity lands.
"""

from __future__ import annotations

import re

import msgspec

from stratus.events.errors import ErrorBody
from stratus.events.ids import DISPLAY_NAME_RE, NAME_RE, RESOURCE_NAME_RE, TOKEN_RE, new_id

# Headers of a command request.
H_COMMAND_ID = "Stratus-Command-Id"
H_AUTHORIZATION = "Authorization"
# Of a query: answer as of this stream sequence or ISO-8601 UTC time.
H_AT = "Stratus-At"

# Clients receive replies in this namespace, and it is the only one the
# broker lets them subscribe to; the services' own inboxes use another one.
CLIENT_INBOX = "_INBOX."
SERVICE_INBOX_PREFIX = "_STRATUS_INBOX"


def reply_allowed(reply: str | None) -> bool:
    """A request's reply subject a service may publish to.

    The requester chooses it, and the services may publish on the log: a
    reply to ``ev.<tenant>...`` would be an event no handler decided. Only
    inboxes qualify (a service calling another service has its own prefix).
    """
    if not reply or " " in reply:
        return False
    return reply.startswith(CLIENT_INBOX) or reply.startswith(SERVICE_INBOX_PREFIX + ".")


# A client may say which channel a command came through as a prefix of its
# id (``openstack-api-<uuid>``): the command id is the events' correlation
# id, so the audit trail shows the channel (``via``) with nothing added to
# the envelope. It is informational: any client chooses its own ids.
_VIA_RE = re.compile(r"^([a-z][a-z0-9-]{0,26})-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}(?!\n)$")


def command_id_via(via: str) -> str:
    """A fresh command id that names ``via`` (see ``via_of``)."""
    cid = f"{via}-{new_id()}"
    if via_of(cid) != via:
        raise ValueError(f"not a channel name: {via!r}")
    return cid


def via_of(command_id: str) -> str:
    """The channel a command id names ("" for a plain id)."""
    m = _VIA_RE.match(command_id)
    return m.group(1) if m else ""


# Larger bodies are refused before decoding; no command needs more.
MAX_COMMAND_BYTES = 64 * 1024


class Command(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Base of every command. Unknown fields are typos and are refused.

    Encoded (by a client), a command carries only the fields that differ
    from their defaults: what its sender chose, nothing a service of an
    older version would refuse as unknown only because it was defaulted.
    """


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """A service's answer: ``seqs`` of appended events and ``data``, or ``error``."""

    ok: bool
    seqs: list[int] = []
    data: dict | list | None = None
    error: ErrorBody | None = None
    duplicate: bool = False


_PATTERN_HELP = {
    NAME_RE.pattern: "a name: 1-63 lowercase letters, digits and '-', not starting with '-'",
    TOKEN_RE.pattern: "an id: 1-64 letters, digits, '_' and '-'",
    r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$": "a name, an id or an address (1-64 characters)",
    RESOURCE_NAME_RE.pattern: (
        "a name: up to 63 letters, digits, '_', '.' and '-', not starting with one of '_.-'"
    ),
    DISPLAY_NAME_RE.pattern: "free text: 1-128 characters, not only spaces, no control characters",
}


def explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with our regular expressions said in words."""
    text = str(exc)
    for pattern, words in _PATTERN_HELP.items():
        # msgspec quotes the pattern with its backslashes doubled.
        for shown in (pattern, pattern.replace("\\", "\\\\")):
            text = text.replace(f"`str` matching regex '{shown}'", words)
    return text
