"""The AsyncAPI 3.0 document of Stratus' events, generated from the Structs.

Two channels: the event stream on NATS (``ev.<tenant>.<kind>.<id>``, msgpack)
and webhook deliveries (CloudEvents JSON over HTTP POST). Each message's
payload is the schema ``stratus events schema --form message`` (resp.
``--form cloudevent``) prints for its type. The official parser
(``@asyncapi/parser``, ``ops/asyncapi``) accepts it; AsyncAPI wants
``discriminator`` as the property's name, not OpenAPI's object.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from stratus.events import cloudevents, schemas
from stratus.events.model import Codec

VERSION = "3.0.0"


def _rebase(node: Any) -> Any:
    """$defs references, as AsyncAPI components want them."""
    if isinstance(node, dict):
        return {
            k: (
                v.replace("#/$defs/", "#/components/schemas/")
                if k == "$ref" and isinstance(v, str)
                else _rebase(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list | tuple):
        return [_rebase(v) for v in node]
    return node


def servers(url: str) -> dict[str, Any]:
    """One AsyncAPI server per NATS URL (``--url`` may list several)."""
    out: dict[str, Any] = {}
    for i, u in enumerate(x.strip() for x in url.split(",") if x.strip()):
        parts = urlsplit(u if "://" in u else f"nats://{u}")
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        out["stratus" if i == 0 else f"stratus-{i + 1}"] = {
            "host": f"{host}:{parts.port or 4222}",
            "protocol": "nats",
            "description": "the NATS server of the Stratus control plane",
        }
    return out


def document(
    codec: Codec,
    url: str = "nats://127.0.0.1:4222",
    title: str = "Stratus events",
    version: str = "1",
) -> dict[str, Any]:
    defs, message_refs, cloudevent_refs = schemas.components(codec)
    components: dict[str, Any] = _rebase(defs)
    messages: dict[str, Any] = {}
    kinds: set[str] = set()
    for type_name, cls in sorted(codec.types.items()):
        kinds.add(type_name.split(".")[0])
        messages[type_name] = {
            "name": type_name,
            "title": cls.__name__,
            "summary": (cls.__doc__ or "").strip().split("\n")[0] or type_name,
            "contentType": "application/msgpack",
            "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
        }
    components["StratusEvent"] = {"oneOf": _rebase(message_refs), "discriminator": "type"}
    components["CloudEvent"] = {"oneOf": _rebase(cloudevent_refs), "discriminator": "type"}
    messages["cloudevent"] = {
        "name": "cloudevent",
        "title": "A Stratus event as a CloudEvent 1.0 (structured mode)",
        "contentType": cloudevents.CONTENT_TYPE,
        "headers": {
            "type": "object",
            "required": [cloudevents.H_SIGNATURE],
            "properties": {
                cloudevents.H_SIGNATURE: {
                    "type": "string",
                    "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>",
                },
                cloudevents.H_WEBHOOK: {"type": "string"},
                cloudevents.H_ATTEMPT: {"type": "integer"},
            },
        },
        "payload": {"$ref": "#/components/schemas/CloudEvent"},
    }
    event_refs = {t: {"$ref": f"#/components/messages/{t}"} for t in sorted(codec.types)}
    return {
        "asyncapi": VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Every change in Stratus is an immutable event. Integrations consume "
                "their tenant's events from JetStream (stream EVENTS) or receive them "
                "as signed CloudEvents webhooks (at least once: dedupe on id)."
            ),
        },
        "defaultContentType": "application/msgpack",
        "servers": servers(url),
        "channels": {
            "events": {
                "address": "ev.{tenant}.{kind}.{id}",
                "title": "The event log (JetStream stream EVENTS)",
                "parameters": {
                    "tenant": {"description": "tenant id; _system for cloud-wide objects"},
                    "kind": {"enum": sorted(kinds), "description": "the aggregate's kind"},
                    "id": {"description": "the aggregate's id"},
                },
                "messages": event_refs,
            },
            "webhook": {
                "address": None,
                "title": "Webhook deliveries: HTTP POST to the subscription's URL",
                "messages": {"cloudevent": {"$ref": "#/components/messages/cloudevent"}},
            },
        },
        "operations": {
            "consumeEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/events"},
                "summary": "a durable JetStream consumer filtered to ev.<tenant>.>",
                "messages": [
                    {"$ref": f"#/channels/events/messages/{t}"} for t in sorted(codec.types)
                ],
            },
            "receiveWebhook": {
                "action": "receive",
                "channel": {"$ref": "#/channels/webhook"},
                "messages": [{"$ref": "#/channels/webhook/messages/cloudevent"}],
            },
        },
        "components": {"schemas": components, "messages": messages},
    }


def dumps(codec: Codec, url: str = "nats://127.0.0.1:4222") -> str:
    return json.dumps(document(codec, url), indent=2)
