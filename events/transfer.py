"""The wire protocol of image bytes between a client and the image service.

Clients may only send requests on ``cmd.>`` and ``q.>`` and read replies
on their inbox; the JetStream API (and with it the object store) is the
services' alone. So a client never writes an object: it sends the bytes
to the image service as a run of requests, and the service, which checks
them, stores them. Downloads are the same run in the other direction.

- ``cmd.image.upload.open`` / ``cmd.image.download.open`` (queue group
  ``images``, so any replica of the service takes it): a ``TransferOpen``
  with the caller's bearer token; the reply (``Opened``) names a session
  subject ``cmd.image.upload.<session>`` served only by the replica that
  opened it. The session id is 128 random bits, and every request on it
  must carry a token of the user who opened it.
- Upload: each request carries ``Stratus-Offset`` and at most
  ``chunk_bytes`` of the file as its body; the client keeps at most
  ``window`` unanswered (flow control: the service answers once the chunk
  is written). A request with ``Stratus-Done: 1`` at the end offset asks
  the service to verify and store: it answers with the image, active, or
  a refusal (``invalid``: wrong size, checksum or format).
- Download: each request asks for ``Stratus-Offset``; the answer is a
  ``Chunk`` (msgpack) or a refusal (a JSON ``Reply``, whose first byte is
  ``{``, which no msgpack array starts with). ``Stratus-Done: 1`` closes.

Command subjects have three tokens (``cmd.<kind>.<verb>``); these have
four, so the command service never receives them.
"""

from __future__ import annotations

import msgspec

from stratus.events.blobs import CHUNK_BYTES
from stratus.events.resources import Ref, TenantScoped

UPLOAD_OPEN = "cmd.image.upload.open"
DOWNLOAD_OPEN = "cmd.image.download.open"
OPEN_SUBJECTS = "cmd.image.*.open"
QUEUE_GROUP = "images"

H_OFFSET = "Stratus-Offset"
H_DONE = "Stratus-Done"

# The largest body an upload request may carry, and the answer a download
# request gets: one object-store chunk (headers fit in the rest of 1 MB).
MAX_CHUNK = CHUNK_BYTES
# Requests a client keeps in flight in a session.
WINDOW = 8
# How an ``unavailable`` refusal to open begins when the service has as many
# transfers as it takes: a client waits and asks again.
BUSY = "the image service is busy"


def upload_subject(session: str) -> str:
    return f"cmd.image.upload.{session}"


def download_subject(session: str) -> str:
    return f"cmd.image.download.{session}"


class TransferOpen(TenantScoped, frozen=True):
    """Open an upload into (or a download of) image ``ref``: an id or a name
    in ``tenant``, or with ``public`` a public image's name."""

    ref: Ref
    public: bool = False


class Opened(msgspec.Struct, frozen=True):
    """A session: where to send its requests, and what it carries."""

    session: str
    subject: str
    size: int
    checksum: str
    format: str
    chunk_bytes: int
    window: int
    image: dict


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    """A download's answer: the bytes at ``offset``."""

    offset: int
    data: bytes


def is_refusal(body: bytes) -> bool:
    """Whether a download answer is a JSON ``Reply`` (a refusal)."""
    return body[:1] == b"{"
