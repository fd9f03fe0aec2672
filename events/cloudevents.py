"""Events as CloudEvents 1.0 (structured JSON mode), and their signature.

A webhook delivery is one POST whose body is the CloudEvent and whose
``Stratus-Signature`` header is ``t=<unix seconds>,v1=<hex HMAC-SHA256>``
over ``<t>.<body>`` with the subscription's secret: the timestamp is signed
so a receiver can refuse replays older than a few minutes. Delivery is
at least once: receivers dedupe on ``id`` (the event's own id).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import msgspec

from stratus.events.model import SECRET_FIELDS, Event

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
H_SIGNATURE = "Stratus-Signature"
H_WEBHOOK = "Stratus-Webhook-Id"
H_ATTEMPT = "Stratus-Delivery-Attempt"
# How old a signed timestamp a receiver should still accept.
TOLERANCE_S = 300

_enc = msgspec.json.Encoder()


def source_of(event: Event) -> str:
    return f"/stratus/tenants/{event.tenant}"


def to_cloudevent(event: Event, seq: int) -> dict[str, Any]:
    raw = msgspec.to_builtins(event)
    data = {k: ("<redacted>" if k in SECRET_FIELDS else v) for k, v in raw.items()}
    return {
        "specversion": SPEC_VERSION,
        "id": event.id,
        "source": source_of(event),
        "type": event.type_name(),
        "time": raw["at"],
        "subject": event.aggregate.id,
        "datacontenttype": "application/json",
        # extension attributes (lower-case alphanumerics, as the spec asks)
        "stratusseq": seq,
        "stratustenant": event.tenant,
        "data": data,
    }


def encode(cloudevent: dict[str, Any]) -> bytes:
    return _enc.encode(cloudevent)


class Signer:
    """The ``Stratus-Signature`` of bodies under one secret; the HMAC's key
    schedule is done once, not per delivery."""

    def __init__(self, secret: str) -> None:
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def __call__(self, body: bytes, t: int | None = None) -> str:
        t = int(time.time()) if t is None else t
        mac = self._mac.copy()
        mac.update(f"{t}.".encode())
        mac.update(body)
        return f"t={t},v1={mac.hexdigest()}"


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    return Signer(secret)(body, t)


def verify(secret: str, body: bytes, header: str, tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does: recompute, compare in constant time, check the age."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    want = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(want, parts.get("v1", ""))
