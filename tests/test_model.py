"""Pure unit tests of the event model: codec, upcasting, ids and subject matching."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar

import msgspec
import pytest

from stratus.events.catalog import CODEC
from stratus.events.ids import is_name, is_token, new_id, uuid7
from stratus.events.model import Aggregate, Cause, Codec, Event, UnknownEvent
from stratus.events.store import subject_matches
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed

CAUSE = Cause(actor="alice", correlation_id="cmd-1", causation_id="cmd-1")


# -- a test-only event type with three versions ------------------------------


class Widget(Event, frozen=True, tag="test.widget"):
    """Version 3: ``label`` (renamed from v1's ``title``) and ``size`` (new in v3)."""

    version: ClassVar[int] = 3

    label: str
    size: int


class Gadget(Event, frozen=True, tag="test.gadget"):
    colour: str


def _widget_v1_to_v2(raw: dict) -> dict:
    raw["label"] = raw.pop("title")
    return raw


def _widget_v2_to_v3(raw: dict) -> dict:
    raw["size"] = len(raw["label"])
    return raw


def widget_codec(*, upcasters: bool = True) -> Codec:
    codec = Codec([Widget, Gadget])
    if upcasters:
        codec.register_upcaster("test.widget", 1, _widget_v1_to_v2)
        codec.register_upcaster("test.widget", 2, _widget_v2_to_v3)
    return codec


def raw_event(type_name: str, v: int, **payload) -> bytes:
    """An event as an older (or foreign) writer put it on the log."""
    envelope = {
        "type": type_name,
        "id": new_id(),
        "v": v,
        "tenant": "acme",
        "aggregate": {"kind": "widget", "id": "w-1"},
        "actor": "alice",
        "at": "2024-05-01T12:00:00Z",
        "correlation_id": "cmd-1",
        "causation_id": "cmd-1",
    }
    return msgspec.msgpack.encode({**envelope, **payload})


# -- codec round trip --------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        CAUSE.make(TenantCreated, "acme", "tenant", "acme", name="acme", description="Acme Inc"),
        CAUSE.make(TenantRenamed, "acme", "tenant", "acme", name="acme-2", previous="acme"),
        CAUSE.make(TenantDeleted, "acme", "tenant", "acme"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_tenant_event_survives_a_codec_round_trip(event):
    # given an event as a handler makes it
    # when it is encoded for the wire and decoded again
    data = CODEC.encode(event)
    back = CODEC.decode(data)
    # then it is the same event, of the same type, on the same subject
    assert back == event
    assert type(back) is type(event)
    assert back.subject == "ev.acme.tenant.acme"
    assert back.v == type(event).version


def test_cause_make_fills_the_envelope():
    at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    cause = Cause(actor="svc", correlation_id="corr", causation_id="caus", at=at)
    e = cause.make(TenantCreated, "t1", "tenant", "t1", name="t1")
    assert (e.actor, e.correlation_id, e.causation_id, e.at) == ("svc", "corr", "caus", at)
    assert e.aggregate == Aggregate("tenant", "t1")
    assert e.type_name() == "tenant.created"
    assert uuid.UUID(e.id).version == 7


def test_encoded_events_carry_their_type_tag_and_version():
    e = CAUSE.make(TenantRenamed, "acme", "tenant", "acme", name="b", previous="a")
    raw = msgspec.msgpack.decode(CODEC.encode(e))
    assert raw["type"] == "tenant.renamed"
    assert raw["v"] == 1


def test_a_codec_refuses_two_types_with_one_tag():
    class Twin(Event, frozen=True, tag="test.gadget"):
        other: str

    with pytest.raises(ValueError, match="duplicate"):
        Codec([Gadget, Twin])


# -- upcasting ---------------------------------------------------------------


def test_current_version_decodes_without_upcasters():
    codec = widget_codec(upcasters=False)
    data = raw_event("test.widget", 3, label="box", size=7)
    w = codec.decode(data)
    assert isinstance(w, Widget)
    assert (w.label, w.size, w.v) == ("box", 7, 3)


def test_a_v1_event_is_upcast_through_the_whole_chain():
    # given a v1 widget on the log (it had a "title", no "size")
    codec = widget_codec()
    data = raw_event("test.widget", 1, title="crate")
    # when it is read by v3 code
    w = codec.decode(data)
    # then both upcasters ran, in order, and the result is a current Widget
    assert isinstance(w, Widget)
    assert w.v == 3
    assert w.label == "crate"
    assert w.size == len("crate")


def test_a_v2_event_runs_only_the_last_upcaster():
    codec = widget_codec()
    calls = []
    codec.register_upcaster("test.widget", 1, lambda raw: calls.append(1) or raw)
    codec.register_upcaster("test.widget", 2, lambda raw: calls.append(2) or {**raw, "size": 0})
    w = codec.decode(raw_event("test.widget", 2, label="crate"))
    assert calls == [2]
    assert (w.label, w.size, w.v) == ("crate", 0, 3)


def test_an_old_version_that_still_validates_is_upcast_too():
    # v2 payload that happens to have every v3 field: the version decides.
    codec = widget_codec()
    codec.register_upcaster("test.widget", 2, lambda raw: {**raw, "size": 99})
    w = codec.decode(raw_event("test.widget", 2, label="x", size=1))
    assert w.v == 3
    assert w.size == 99


def test_a_missing_upcaster_is_an_unknown_event():
    codec = widget_codec(upcasters=False)
    with pytest.raises(UnknownEvent, match="no upcaster from version 1"):
        codec.decode(raw_event("test.widget", 1, title="crate"))


def test_a_newer_version_than_this_code_knows_is_an_unknown_event():
    codec = widget_codec()
    with pytest.raises(UnknownEvent, match="unsupported version 4"):
        codec.decode(raw_event("test.widget", 4, label="x", size=1))


@pytest.mark.parametrize("bad_v", [0, -1, "1", None])
def test_a_nonsense_version_is_an_unknown_event(bad_v):
    codec = widget_codec()
    with pytest.raises(UnknownEvent):
        codec.decode(raw_event("test.widget", bad_v, label="x", size=1))


def test_an_upcaster_producing_the_wrong_shape_is_an_unknown_event():
    codec = widget_codec(upcasters=False)
    codec.register_upcaster("test.widget", 1, lambda raw: raw)  # forgets to rename
    codec.register_upcaster("test.widget", 2, lambda raw: raw)
    with pytest.raises(UnknownEvent, match=r"test\.widget v3"):
        codec.decode(raw_event("test.widget", 1, title="crate"))


# -- unknown bytes -----------------------------------------------------------


def test_an_unknown_type_raises_unknown_event():
    with pytest.raises(UnknownEvent, match=r"unknown event type 'nope\.nothing'"):
        CODEC.decode(raw_event("nope.nothing", 1, name="x"))


def test_a_type_of_another_codec_is_unknown_here():
    data = widget_codec().encode(
        CAUSE.make(Gadget, "acme", "gadget", "g1", colour="red"),
    )
    with pytest.raises(UnknownEvent):
        CODEC.decode(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all", b"{}", msgspec.msgpack.encode([1, 2, 3])],
    ids=["empty", "reserved-byte", "text", "json-ish", "msgpack-array"],
)
def test_bytes_that_are_not_an_event_raise_unknown_event(data):
    with pytest.raises(UnknownEvent):
        CODEC.decode(data)


def test_a_known_type_with_a_missing_field_raises_unknown_event():
    with pytest.raises(UnknownEvent):
        CODEC.decode(raw_event("tenant.renamed", 1, name="x"))  # no "previous"


# -- ids ---------------------------------------------------------------------


def test_uuid7_ids_sort_in_creation_order():
    # given many ids minted back to back (thousands per millisecond)
    ids = [uuid7() for _ in range(20_000)]
    # then they are all distinct and already sorted, as uuids and as strings
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    as_text = [str(u) for u in ids]
    assert as_text == sorted(as_text)


def test_uuid7_has_the_rfc_9562_layout_and_the_current_time():
    before_ms = int(datetime.now(UTC).timestamp() * 1000)
    u = uuid7()
    after_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert u.version == 7
    assert u.variant == uuid.RFC_4122
    ms = u.int >> 80
    # the counter may borrow a few milliseconds from the future after a burst
    assert before_ms - 1 <= ms <= after_ms + 50


def test_new_id_is_a_uuid7_string():
    assert uuid.UUID(new_id()).version == 7


@pytest.mark.parametrize("value", ["a", "acme", "0", "a-b-c", "a" * 63, "9lives"])
def test_valid_names(value):
    assert is_name(value)


@pytest.mark.parametrize(
    "value",
    ["", "-a", "A", "a_b", "a.b", "a b", "a" * 64, "acme\n", "é", "a*", "a>"],
)
def test_invalid_names(value):
    assert not is_name(value)


@pytest.mark.parametrize("value", ["abc", "A_b-9", "x" * 64])
def test_valid_tokens(value):
    assert is_token(value)


@pytest.mark.parametrize("value", ["", "a.b", "a b", "x" * 65, "abc\n", "a*"])
def test_invalid_tokens(value):
    assert not is_token(value)


# -- subject matching --------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("ev.acme.tenant.acme", "ev.acme.tenant.acme", True),
        ("ev.acme.tenant.acme", "ev.acme.tenant.other", False),
        ("ev.acme.>", "ev.acme.tenant.acme", True),
        ("ev.acme.>", "ev.acme.x", True),
        ("ev.acme.>", "ev.acme", False),
        ("ev.acme.>", "ev.acmex.tenant.acme", False),
        ("ev.>", "ev.a.b.c.d", True),
        ("ev.*.tenant.*", "ev.a.tenant.b", True),
        ("ev.*.tenant.*", "ev.a.host.b", False),
        ("ev.*", "ev.a.b", False),
        ("ev.*.b", "ev.a", False),
        ("ev.a", "ev.a.b", False),
        ("ev.a.b", "ev.a", False),
        (">", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
    ],
)
def test_subject_matches_follows_nats_wildcards(pattern, subject, expected):
    assert subject_matches(pattern, subject) is expected


def test_validation_messages_say_our_patterns_in_words():
    import msgspec

    from stratus.events.commands import explain
    from stratus.events.tenants import TenantCreate

    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"name": "Not Valid!"}', type=TenantCreate)
    text = explain(info.value)
    assert "regex" not in text
    assert "lowercase letters" in text and "$.name" in text


def test_new_id_text_is_the_uuid_text_and_ids_stay_distinct_past_the_random_page():
    ids = [new_id() for _ in range(2_000)]  # more than one page of random bits
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    # the random part differs from id to id, not only the counter
    assert len({i[-12:] for i in ids}) == len(ids)


def test_a_forked_child_does_not_reuse_its_parents_random_bits():
    import os

    new_id()  # the parent holds a page of random bits
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id back through the pipe, then gone
        os.write(w, new_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    mine = new_id()
    assert child[-12:] != mine[-12:]
