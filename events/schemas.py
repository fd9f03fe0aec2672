"""JSON Schemas (2020-12) of the three forms in which integrators meet an event.

* ``message``: the NATS message on ``ev.<tenant>.<kind>.<id>`` (what an
  integration's consumer delivers). Its body is msgpack; the schema
  describes the decoded map, with the two msgpack types JSON lacks written
  as JSON writes them: the timestamp extension (type -1; ``at`` and any
  other time) as an RFC 3339 string, and bin (``key.added``'s
  ``public_key``) as base64. Fields carry ``x-msgpack`` saying which.
* ``envelope``: one line of ``stratus events tail -o json``: ``seq`` and
  ``subject`` beside the envelope fields, the payload under ``data``; a
  stored message no codec reads is ``{seq, subject, type: null, error}``.
* ``cloudevent``: a webhook delivery's body, a CloudEvent 1.0 whose
  ``data`` is the event as in ``message``.

All three are generated from the Structs (``msgspec.inspect``) and strict:
no property the code does not write, ids ``format: uuid``, times
``format: date-time``, and every bound a Struct's types declare. A schema
is ``oneOf`` per event type, told apart by ``type``.
"""

from __future__ import annotations

from typing import Any

import msgspec.inspect as mi

from stratus.events.model import ENVELOPE, SECRET_FIELDS, Codec, Event

DIALECT = "https://json-schema.org/draft/2020-12/schema"
FORMS = ("message", "envelope", "cloudevent")
CE_SPEC_VERSION = "1.0"
TIMESTAMP = "timestamp (extension type -1)"
# A subject token: what NATS allows between dots, less wildcards.
_TOKEN = r"[^.\s*>]+"
SUBJECT_PATTERN = rf"^ev\.{_TOKEN}\.{_TOKEN}\.{_TOKEN}$"
UNDECODABLE = "Undecodable"


class _Builder:
    """JSON Schema of msgspec types; Structs become ``$defs`` entries."""

    def __init__(self, wire: bool) -> None:
        self.wire = wire  # annotate msgpack-only types (the message form)
        self.defs: dict[str, Any] = {}

    def of(self, t: mi.Type) -> dict[str, Any]:
        match t:
            case mi.StrType():
                return _bounded({"type": "string"}, t, "minLength", "maxLength", "pattern")
            case mi.BoolType():
                return {"type": "boolean"}
            case mi.IntType():
                return _numeric({"type": "integer"}, t)
            case mi.FloatType():
                return _numeric({"type": "number"}, t)
            case mi.DateTimeType():
                out = {"type": "string", "format": "date-time"}
                return {**out, "x-msgpack": TIMESTAMP} if self.wire else out
            case mi.UUIDType():
                return {"type": "string", "format": "uuid"}
            case mi.BytesType() | mi.ByteArrayType() | mi.MemoryViewType():
                out = {"type": "string", "contentEncoding": "base64"}
                return {**out, "x-msgpack": "bin"} if self.wire else out
            case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
                out = {"type": "array", "items": self.of(t.item_type)}
                if isinstance(t, mi.SetType | mi.FrozenSetType):
                    out["uniqueItems"] = True
                return _bounded(out, t, "minItems", "maxItems")
            case mi.DictType():
                out = {"type": "object", "additionalProperties": self.of(t.value_type)}
                return _bounded(out, t, "minProperties", "maxProperties")
            case mi.LiteralType():
                return {"enum": list(t.values)}
            case mi.NoneType():
                return {"type": "null"}
            case mi.UnionType():
                return {"anyOf": [self.of(x) for x in t.types]}
            case mi.StructType():
                return self.struct(t)
            case mi.AnyType():
                return {}
        raise TypeError(f"no JSON Schema for {t!r}")

    def struct(self, t: mi.StructType, name: str | None = None) -> dict[str, Any]:
        name = name or t.cls.__name__
        if name not in self.defs:
            self.defs[name] = {}  # a placeholder: recursive types end here
            self.defs[name] = self.object(t, t.fields)
        return {"$ref": f"#/$defs/{name}"}

    def object(self, t: mi.StructType, fields: Any) -> dict[str, Any]:
        props = {f.encode_name: self.of(f.type) for f in fields}
        out: dict[str, Any] = {"type": "object", "properties": props}
        doc = (t.cls.__doc__ or "").strip()
        if doc and not issubclass(t.cls, Event):
            out["description"] = doc
        required = [f.encode_name for f in fields if f.required]
        if t.tag_field is not None:
            props[t.tag_field] = {"const": t.tag}
            required.insert(0, t.tag_field)
        out["required"] = required
        out["additionalProperties"] = False
        return out

    def event(self, cls: type[Event]) -> dict[str, Any]:
        """The flat event (what msgpack carries); its ref."""
        t = mi.type_info(cls)
        assert isinstance(t, mi.StructType)
        ref = self.struct(t)
        props = self.defs[cls.__name__]["properties"]
        props["id"] = {"type": "string", "format": "uuid"}
        props["v"] = {"type": "integer", "minimum": 1, "maximum": cls.version}
        for k in SECRET_FIELDS & props.keys():
            props[k] = {
                "type": "string",
                "description": "on the log only: <redacted> in events tail and webhooks",
            }
        self.defs[cls.__name__]["title"] = cls.type_name()
        return ref

    def payload(self, cls: type[Event]) -> dict[str, Any]:
        """The type's own fields alone (``data`` of a tail line); its ref."""
        name = f"{cls.__name__}Data"
        if name not in self.defs:
            self.event(cls)
            whole = self.defs[cls.__name__]
            self.defs[name] = {
                "type": "object",
                "properties": {k: v for k, v in whole["properties"].items() if k not in ENVELOPE},
                "required": [k for k in whole["required"] if k not in ENVELOPE],
                "additionalProperties": False,
            }
        return {"$ref": f"#/$defs/{name}"}


def _bounded(out: dict[str, Any], t: Any, *keys: str) -> dict[str, Any]:
    attrs = {
        "minLength": "min_length",
        "maxLength": "max_length",
        "pattern": "pattern",
        "minItems": "min_length",
        "maxItems": "max_length",
        "minProperties": "min_length",
        "maxProperties": "max_length",
    }
    for key in keys:
        value = getattr(t, attrs[key], None)
        if value is not None:
            out[key] = value
    return out


def _numeric(out: dict[str, Any], t: Any) -> dict[str, Any]:
    for key, attr in (
        ("minimum", "ge"),
        ("maximum", "le"),
        ("exclusiveMinimum", "gt"),
        ("exclusiveMaximum", "lt"),
        ("multipleOf", "multiple_of"),
    ):
        value = getattr(t, attr, None)
        if value is not None:
            out[key] = value
    return out


def _types(codec: Codec) -> list[type[Event]]:
    return [codec.types[name] for name in sorted(codec.types)]


def message_variants(codec: Codec, b: _Builder) -> list[dict[str, Any]]:
    return [b.event(cls) for cls in _types(codec)]


def envelope_variants(codec: Codec, b: _Builder) -> list[dict[str, Any]]:
    refs = []
    for cls in _types(codec):
        b.event(cls)
        whole = b.defs[cls.__name__]
        envelope = {k: v for k, v in whole["properties"].items() if k in ENVELOPE}
        name = f"{cls.__name__}Envelope"
        b.defs[name] = {
            "title": cls.type_name(),
            "type": "object",
            "properties": {
                "seq": {"type": "integer", "minimum": 1, "description": "stream sequence"},
                "subject": {"type": "string", "pattern": SUBJECT_PATTERN},
                **envelope,
                "data": b.payload(cls),
            },
            "required": ["seq", "subject", *sorted(ENVELOPE), "data"],
            "additionalProperties": False,
        }
        refs.append({"$ref": f"#/$defs/{name}"})
    b.defs[UNDECODABLE] = {
        "description": "a stored message that no known event type decodes",
        "type": "object",
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "subject": {"type": "string"},
            "type": {"type": "null"},
            "error": {"type": "string"},
        },
        "required": ["seq", "subject", "type", "error"],
        "additionalProperties": False,
    }
    refs.append({"$ref": f"#/$defs/{UNDECODABLE}"})
    return refs


def cloudevent_variants(codec: Codec, b: _Builder) -> list[dict[str, Any]]:
    refs = []
    for cls in _types(codec):
        name = f"{cls.__name__}CloudEvent"
        b.defs[name] = {
            "title": cls.type_name(),
            "type": "object",
            "properties": {
                "specversion": {"const": CE_SPEC_VERSION},
                "id": {"type": "string", "format": "uuid", "description": "dedupe on it"},
                "source": {
                    "type": "string",
                    "format": "uri-reference",
                    "pattern": rf"^/stratus/tenants/{_TOKEN}$",
                },
                "type": {"const": cls.type_name()},
                "time": {"type": "string", "format": "date-time"},
                "subject": {"type": "string", "minLength": 1, "description": "the resource's id"},
                "datacontenttype": {"const": "application/json"},
                "stratusseq": {"type": "integer", "minimum": 1, "description": "stream sequence"},
                "stratustenant": {"type": "string", "minLength": 1},
                "data": b.event(cls),
            },
            "required": [
                "specversion",
                "id",
                "source",
                "type",
                "time",
                "subject",
                "datacontenttype",
                "stratusseq",
                "stratustenant",
                "data",
            ],
            "additionalProperties": False,
        }
        refs.append({"$ref": f"#/$defs/{name}"})
    return refs


_DESCRIPTIONS = {
    "message": (
        "The body of a message on ev.<tenant>.<kind>.<id> is msgpack. Decoded, it is this "
        "map, with msgpack's timestamp extension (type -1) written as an RFC 3339 string "
        "and bin as base64 (each such field says so in x-msgpack)."
    ),
    "envelope": (
        "One line of stratus events tail -o json: seq and subject beside the envelope, "
        "the event's own fields under data."
    ),
    "cloudevent": (
        "The body of a webhook POST (application/cloudevents+json); data is the event as "
        "a NATS message carries it, in JSON. Verify Stratus-Signature before parsing."
    ),
}
_TITLES = {
    "message": "A Stratus event as a NATS message (msgpack, decoded)",
    "envelope": "A Stratus event as `stratus events tail -o json` prints it",
    "cloudevent": "A Stratus event as a webhook delivers it (CloudEvent 1.0, structured)",
}


def variants(codec: Codec, form: str, b: _Builder) -> list[dict[str, Any]]:
    if form == "message":
        return message_variants(codec, b)
    if form == "envelope":
        return envelope_variants(codec, b)
    if form == "cloudevent":
        return cloudevent_variants(codec, b)
    raise ValueError(f"form must be one of {', '.join(FORMS)}, not {form!r}")


def document(codec: Codec, form: str = "message") -> dict[str, Any]:
    """The JSON Schema of one form, every event type in it."""
    b = _Builder(wire=form == "message")
    refs = variants(codec, form, b)
    return {
        "$schema": DIALECT,
        "title": _TITLES[form],
        "description": _DESCRIPTIONS[form],
        "oneOf": refs,
        "$defs": _reachable(b.defs, refs),
    }


def _reachable(defs: dict[str, Any], roots: list[dict[str, Any]]) -> dict[str, Any]:
    """The definitions the schema refers to (a form derived from another
    leaves the other's behind)."""
    seen: set[str] = set()
    todo: list[Any] = list(roots)
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name not in seen:
                    seen.add(name)
                    todo.append(defs[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return {k: v for k, v in defs.items() if k in seen}


def components(codec: Codec) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Definitions shared by the message and CloudEvent forms (AsyncAPI's
    components): ``(defs, message refs, cloudevent refs)``. The message form's
    definitions carry the ``x-msgpack`` notes; a CloudEvent's ``data`` is the
    same shape in JSON."""
    b = _Builder(wire=True)
    messages = message_variants(codec, b)
    events = cloudevent_variants(codec, b)
    return b.defs, messages, events
