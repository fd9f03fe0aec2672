"""The published schemas (issue 8): JSON Schema and AsyncAPI, both generated."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import jsonschema
import msgspec
import msgspec.inspect as mi
import pytest

from stratus.events import cloudevents
from stratus.events.asyncapi import document
from stratus.events.catalog import CODEC
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event

STRATUS = [sys.executable, "-m", "stratus.cli.main"]


def sample_value(t: mi.Type) -> Any:
    """A value of type ``t`` that satisfies its constraints (enough for events)."""
    match t:
        case mi.StrType():
            return "x" * max(1, t.min_length or 1)
        case mi.BoolType():
            return True
        case mi.IntType():
            return max(1, t.ge or 0)
        case mi.FloatType():
            return 1.5
        case mi.DateTimeType():
            return datetime.now(UTC)
        case mi.BytesType():
            return b"\x01\x02"
        case mi.ListType() | mi.SetType() | mi.FrozenSetType():
            return [sample_value(t.item_type)]
        case mi.DictType():
            return {"k": sample_value(t.value_type)}
        case mi.LiteralType():
            return t.values[0]
        case mi.UnionType():
            return sample_value(next(x for x in t.types if not isinstance(x, mi.NoneType)))
        case mi.StructType():
            return msgspec.convert(
                {f.name: msgspec.to_builtins(sample_value(f.type)) for f in t.fields}, t.cls
            )
        case mi.NoneType():
            return None
        case mi.AnyType():
            return {"any": [1, "two"]}
    raise AssertionError(f"no sample for {t!r}")


def sample(cls: type[Event]) -> Event:
    info = mi.type_info(cls)
    fields = {
        f.name: sample_value(f.type)
        for f in info.fields
        if f.name not in ("id", "v", "tenant", "aggregate", "actor", "at")
        and f.name not in ("correlation_id", "causation_id")
    }
    cause = Cause(actor="tester", correlation_id=new_id(), causation_id=new_id())
    return cause.make(cls, "ta", cls.type_name().split(".")[0], new_id(), **fields)


def as_json(event: Event) -> Any:
    return json.loads(msgspec.json.encode(event))


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = CODEC.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_a_sample_of_every_event_type_validates_against_the_generated_schema(validator):
    assert len(CODEC.types) > 40
    for name, cls in CODEC.types.items():
        doc = as_json(sample(cls))
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, (name, errors[:3])
        # ... and decodes back to the same event: the schema describes the wire.
        assert CODEC.decode(msgspec.msgpack.encode(msgspec.json.decode(json.dumps(doc)))).id


def test_the_schema_refuses_what_the_decoder_refuses(validator):
    for cls in list(CODEC.types.values())[:: max(1, len(CODEC.types) // 12)]:
        doc = as_json(sample(cls))
        for broken in (
            {k: v for k, v in doc.items() if k != "tenant"},  # a missing envelope field
            {**doc, "type": "no.such-type"},
            {**doc, "at": 12},
        ):
            assert not validator.is_valid(broken), (cls.type_name(), broken)
            with pytest.raises(msgspec.ValidationError):
                msgspec.json.decode(json.dumps(broken), type=cls)


def test_cloudevents_validate_against_the_asyncapi_payload_schema():
    doc = document(CODEC)
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["components"]["messages"]) == {*CODEC.types, "cloudevent"}
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].removeprefix("#/channels/") in doc["channels"]
    ce_schema = {**doc["components"]["schemas"]["CloudEvent"], "components": doc["components"]}
    v = jsonschema.Draft202012Validator(ce_schema)
    for cls in list(CODEC.types.values())[:10]:
        ce = json.loads(cloudevents.encode(cloudevents.to_cloudevent(sample(cls), 7)))
        assert not [e.message for e in v.iter_errors(ce)]
        assert ce["id"] and ce["subject"] and ce["type"] == cls.type_name()
        bad = {**ce, "specversion": "0.3"}
        assert not v.is_valid(bad)


def test_signatures_verify_and_tampering_does_not():
    body = cloudevents.encode({"id": "1"})
    header = cloudevents.sign("whsec_k", body)
    assert cloudevents.verify("whsec_k", body, header)
    assert not cloudevents.verify("whsec_other", body, header)
    assert not cloudevents.verify("whsec_k", body + b" ", header)
    assert not cloudevents.verify("whsec_k", body, cloudevents.sign("whsec_k", body, t=1))


def test_the_cli_prints_both_documents():
    for verb, key in (("schema", "$defs"), ("asyncapi", "channels")):
        out = subprocess.run(
            [*STRATUS, "events", verb], capture_output=True, text=True, timeout=60, check=True
        )
        assert key in json.loads(out.stdout)
