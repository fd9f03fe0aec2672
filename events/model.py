"""The event envelope, the one decoder for the whole union, and upcasting.

Every event type is a frozen msgspec Struct tagged by ``type`` and carrying
the envelope of DESIGN.md. Old versions stay on the log as they were written;
they are upcast to the current shape when read (``register_upcaster``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from stratus.events.ids import new_id


class Aggregate(msgspec.Struct, frozen=True):
    kind: str
    id: str


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Envelope shared by every event. Subclasses add their payload fields."""

    version: ClassVar[int] = 1

    id: str
    v: int
    tenant: str
    aggregate: Aggregate
    actor: str
    at: datetime
    correlation_id: str
    causation_id: str

    @classmethod
    def type_name(cls) -> str:
        return cls.__struct_config__.tag  # type: ignore[return-value]

    @classmethod
    def payload_fields(cls) -> tuple[str, ...]:
        """The type's own fields: everything but the envelope."""
        names = _PAYLOAD.get(cls)
        if names is None:
            names = _PAYLOAD[cls] = tuple(f for f in cls.__struct_fields__ if f not in ENVELOPE)
        return names

    @property
    def subject(self) -> str:
        return f"ev.{self.tenant}.{self.aggregate.kind}.{self.aggregate.id}"


E = TypeVar("E", bound=Event)


class Cause(msgspec.Struct, frozen=True):
    """Who and what caused the events a decision produces."""

    actor: str
    correlation_id: str
    causation_id: str
    at: datetime | None = None

    def make(self, cls: type[E], tenant: str, kind: str, agg_id: str, **fields: Any) -> E:
        return cls(
            id=new_id(),
            v=cls.version,
            tenant=tenant,
            aggregate=Aggregate(kind, agg_id),
            actor=self.actor,
            at=self.at or datetime.now(UTC),
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            **fields,
        )


_PAYLOAD: dict[type, tuple[str, ...]] = {}

ENVELOPE = frozenset(
    {"id", "type", "v", "tenant", "aggregate", "actor", "at", "correlation_id", "causation_id"}
)


# Payload fields shown to nobody through the API (they stay on the log).
SECRET_FIELDS = frozenset({"password_hash"})


def record(seq: int, subject: str, event: Event | None, error: str | None = None) -> dict:
    """One stored event as plain data: envelope fields, then ``data`` (the payload)."""
    if event is None:
        return {"seq": seq, "subject": subject, "type": None, "error": error}
    raw = msgspec.to_builtins(event)
    out: dict[str, Any] = {"seq": seq, "subject": subject}
    for k in ("type", "v", "tenant", "aggregate", "actor", "at", "correlation_id"):
        out[k] = raw[k]
    out["causation_id"] = raw["causation_id"]
    out["id"] = raw["id"]
    out["data"] = {
        k: ("<redacted>" if k in SECRET_FIELDS else v) for k, v in raw.items() if k not in ENVELOPE
    }
    return out


class UnknownEvent(ValueError):
    """The bytes are not an event this code knows (a foreign or newer writer)."""


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Codec:
    """Encodes events to msgpack and decodes any known event type in one call."""

    def __init__(self, types: Iterable[type[Event]]) -> None:
        self.types: dict[str, type[Event]] = {}
        for cls in types:
            name = cls.type_name()
            if name in self.types:
                raise ValueError(f"duplicate event type {name}")
            self.types[name] = cls
        union = tuple(self.types.values())
        self._decoder = msgspec.msgpack.Decoder(union[0] if len(union) == 1 else _union(union))
        self._raw = msgspec.msgpack.Decoder(dict)
        self._encoder = msgspec.msgpack.Encoder()
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register_upcaster(self, type_name: str, from_version: int, fn: Upcaster) -> None:
        """``fn`` turns a raw event of ``from_version`` into one of the next version."""
        self._upcasters[(type_name, from_version)] = fn

    def encode(self, event: Event) -> bytes:
        return self._encoder.encode(event)

    def decode(self, data: bytes) -> Event:
        try:
            event = self._decoder.decode(data)
        except msgspec.ValidationError:
            # Possibly an older version whose shape no longer validates.
            return self._upcast(data)
        except msgspec.DecodeError as exc:
            raise UnknownEvent(f"not msgpack: {exc}") from None
        if event.v != type(event).version:
            return self._upcast(data)
        return event

    def _upcast(self, data: bytes) -> Event:
        try:
            raw = self._raw.decode(data)
        except msgspec.DecodeError as exc:
            raise UnknownEvent(f"not msgpack: {exc}") from None
        name = raw.get("type")
        cls = self.types.get(name) if isinstance(name, str) else None
        if cls is None:
            raise UnknownEvent(f"unknown event type {name!r}")
        v = raw.get("v")
        if not isinstance(v, int) or v < 1 or v > cls.version:
            raise UnknownEvent(f"{name}: unsupported version {v!r} (this code knows {cls.version})")
        while v < cls.version:
            fn = self._upcasters.get((name, v))
            if fn is None:
                raise UnknownEvent(f"{name}: no upcaster from version {v}")
            raw = fn(dict(raw))
            v += 1
            raw["v"] = v
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise UnknownEvent(f"{name} v{v}: {exc}") from None

    def json_schema(self, form: str = "message") -> dict[str, Any]:
        """JSON Schema (2020-12) of every event type in one of the forms
        integrators meet (``events.schemas``: message, envelope, cloudevent)."""
        from stratus.events import schemas  # it builds on this module

        return schemas.document(self, form)


def _union(types: tuple[type[Event], ...]) -> Any:
    # typing.Union over a runtime tuple; msgspec dispatches on the tag.
    from typing import Union

    return Union[types]  # noqa: UP007
