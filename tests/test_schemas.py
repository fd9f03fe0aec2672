"""The published schemas (issues 8 and 17): every event, in each of the three
forms an integrator meets, validates against its JSON Schema with format
checking on; broken ones do not; the official AsyncAPI parser accepts the
AsyncAPI document."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import msgspec.inspect as mi
import pytest

from stratus.cli.integrations import connect_info, wait_usable
from stratus.events import cloudevents
from stratus.events.catalog import CODEC
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event, record
from stratus.events.schemas import FORMS

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
STRATUS = [sys.executable, "-m", "stratus.cli.main"]
SAMPLE_KIND = "sample"  # a kind no reactor follows: the samples change nothing


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


def sample(cls: type[Event], tenant: str = "ta") -> Event:
    info = mi.type_info(cls)
    fields = {
        f.name: sample_value(f.type)
        for f in info.fields
        if f.name not in ("id", "v", "tenant", "aggregate", "actor", "at")
        and f.name not in ("correlation_id", "causation_id")
    }
    cause = Cause(actor="tester", correlation_id=new_id(), causation_id=new_id())
    return cause.make(cls, tenant, SAMPLE_KIND, new_id(), **fields)


def readme_decode() -> Any:
    """The README's Python decoder of NATS messages, run as written."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def decode(body: bytes)" in b)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["decode"]


def validator(form: str) -> jsonschema.Draft202012Validator:
    schema = CODEC.json_schema(form)
    jsonschema.Draft202012Validator.check_schema(schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    # Without the format extra these would pass unchecked.
    assert {"uuid", "date-time", "uri-reference"} <= checker.checkers.keys()
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


VALIDATORS = {form: validator(form) for form in FORMS}


def errors(form: str, doc: Any) -> list[str]:
    """Why ``doc`` is not valid (the best match of a failed ``oneOf`` first)."""
    v = VALIDATORS[form]
    best = jsonschema.exceptions.best_match(v.iter_errors(doc))
    return [] if best is None else [f"{list(best.absolute_path)}: {best.message}"]


# -- every event type, as integrators receive it --------------------------------------


async def test_every_event_type_validates_in_all_three_forms_as_delivered(tmp_path):
    """A sample of every event type goes on the log of a running stack; each
    is read back as ``events tail -o json`` prints it, as an integration's
    consumer delivers it (decoded by the README's code with the ``msgpack``
    package), and as a webhook POSTs it to a receiver on loopback."""
    from .test_cli import CONFIG_HOME, cli
    from .test_identity import ADMIN_PASSWORD, Stacks, connect
    from .test_integrations import Watch, bound
    from .test_webhooks import Receiver

    assert len(CODEC.types) > 40
    decode = readme_decode()
    rx = await Receiver().start()
    stacks = Stacks(tmp_path, webhook_allow=("127.0.0.1/32",))
    try:
        stack = await stacks.start()
        c = await connect(stack)
        token = (await c.login("admin", ADMIN_PASSWORD))["token"]
        await c.ok("cmd.tenant.create", {"name": "ta"}, token)
        secret = secrets.token_urlsafe(32)
        created = await c.ok(
            "cmd.integration.create", {"tenant": "ta", "name": "all", "secret": secret}, token
        )
        info = connect_info(stack.url, created, secret)
        assert await wait_usable(info) is not None
        hook = {"tenant": "ta", "name": "all", "url": rx.url, "types": ["*"]}
        await c.ok("cmd.webhook.create", hook, token)

        samples = [sample(cls) for cls in CODEC.types.values()]
        for e in samples:
            await stack.store.append([e])
        ids = {e.id for e in samples}

        # 1. `events tail -o json`, through the CLI.
        CONFIG_HOME["value"] = str(tmp_path / "config")
        out = await asyncio.to_thread(
            cli, stack.url, "events", "tail", "--tenant", "ta", "-o", "json", token=token
        )
        assert out.returncode == 0, out.stderr
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        tail = [x for x in lines if x.get("id") in ids]
        assert len(tail) == len(ids)
        assert all(x["subject"].startswith("ev.ta.") for x in lines)
        for doc in lines:  # the integration's and webhook's own events too
            assert not errors("envelope", doc), (doc.get("type"), errors("envelope", doc))

        # 2. The NATS message, as the integration's consumer delivers it.
        nc = await Watch().connect(info)
        try:
            sub = await bound(nc, info)
            messages: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while not ids <= messages.keys():
                assert time.monotonic() < deadline, "the consumer did not deliver every sample"
                m = await sub.next_msg(timeout=5)
                doc = decode(m.data)
                messages[doc["id"]] = doc
                await m.ack()
        finally:
            await nc.close()
        for doc in messages.values():
            assert not errors("message", doc), (doc["type"], errors("message", doc))
        assert isinstance(messages[samples[0].id]["at"], str)

        # 3. The webhook's body, as the receiver got it.
        deadline = time.monotonic() + 30
        while not ids <= {ce["id"] for ce, *_ in rx.posts}:
            assert time.monotonic() < deadline, "the webhook did not deliver every sample"
            await asyncio.sleep(0.05)
        for ce, _body, headers, _ in rx.posts:
            assert not errors("cloudevent", ce), (ce["type"], errors("cloudevent", ce))
            assert headers["Content-Type"] == cloudevents.CONTENT_TYPE
        await c.close()
    finally:
        await stacks.close()
        await rx.stop()


# -- broken ones fail ------------------------------------------------------------------


def three_forms(e: Event, seq: int = 7) -> dict[str, Any]:
    """The event in each form, made by the code that makes them for real."""
    return {
        "envelope": json.loads(json.dumps(record(seq, e.subject, e), default=str)),
        "message": readme_decode()(CODEC.encode(e)),
        "cloudevent": json.loads(cloudevents.encode(cloudevents.to_cloudevent(e, seq))),
    }


def breakages(form: str, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what is wrong, the broken copy): each must fail."""
    out: list[tuple[str, dict[str, Any]]] = []

    def broken(what: str, change: Any) -> None:
        d = copy.deepcopy(doc)
        change(d)
        out.append((what, d))

    at = "time" if form == "cloudevent" else "at"
    broken("a required field missing", lambda d: d.pop("id"))
    broken("an unknown property", lambda d: d.__setitem__("extra", 1))
    broken("an id that is no UUID", lambda d: d.__setitem__("id", "not-a-uuid"))
    broken("a time that is no date-time", lambda d: d.__setitem__(at, "yesterday"))
    broken("an unknown type", lambda d: d.__setitem__("type", "no.such-type"))
    if form in ("envelope", "cloudevent"):
        broken("an unknown field under data", lambda d: d["data"].__setitem__("surplus", True))
    if form == "cloudevent":
        broken("an event inside without its envelope", lambda d: d["data"].pop("tenant"))
        other = "quota.set" if doc["type"] != "quota.set" else "tenant.created"
        broken("data of another type", lambda d: d["data"].__setitem__("type", other))
        broken("an old spec version", lambda d: d.__setitem__("specversion", "0.3"))
        broken("a sequence below 1", lambda d: d.__setitem__("stratusseq", 0))
        broken("a source elsewhere", lambda d: d.__setitem__("source", "https://evil/x"))
    else:
        broken("a version below 1", lambda d: d.__setitem__("v", 0))
        broken("a version above the code's", lambda d: d.__setitem__("v", 99))
        broken("an aggregate with more", lambda d: d["aggregate"].__setitem__("x", 1))
    if form == "envelope":
        broken("a sequence below 1", lambda d: d.__setitem__("seq", 0))
        broken("a subject outside ev.", lambda d: d.__setitem__("subject", "q.tenants"))
        broken("an envelope field under data", lambda d: d["data"].__setitem__("tenant", "ta"))
    return out


@pytest.mark.parametrize("form", FORMS)
def test_broken_events_fail_their_schema(form: str) -> None:
    step = max(1, len(CODEC.types) // 16)
    checked = 0
    for cls in list(CODEC.types.values())[::step]:
        doc = three_forms(sample(cls))[form]
        assert not errors(form, doc), (cls.type_name(), errors(form, doc))
        for what, bad in breakages(form, doc):
            assert errors(form, bad), (cls.type_name(), form, what)
            checked += 1
    assert checked > 100


def test_a_wrong_payload_type_fails_and_the_schema_matches_the_decoder() -> None:
    """Where a payload field has a type, the schema and msgspec agree on it."""
    e = sample(CODEC.types["server.requested"])
    doc = three_forms(e)["message"]
    for field, wrong in (("vcpus", "four"), ("name", 5), ("nics", {"not": "a list"})):
        bad = {**doc, "spec": {**doc["spec"], field: wrong}}  # the server's spec, nested
        assert errors("message", bad), field
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(json.dumps(bad), type=type(e))


def test_undecodable_lines_have_their_own_shape() -> None:
    line = json.loads(json.dumps(record(9, "ev.x.tenant.x", None, "not msgpack")))
    assert not errors("envelope", line)
    assert errors("envelope", {**line, "error": 3})


def test_signatures_verify_and_tampering_does_not():
    body = cloudevents.encode({"id": "1"})
    header = cloudevents.sign("whsec_k", body)
    assert cloudevents.verify("whsec_k", body, header)
    assert not cloudevents.verify("whsec_other", body, header)
    assert not cloudevents.verify("whsec_k", body + b" ", header)
    assert not cloudevents.verify("whsec_k", body, cloudevents.sign("whsec_k", body, t=1))


# -- AsyncAPI, checked by the official parser ------------------------------------------


@pytest.fixture(scope="module")
def asyncapi_parser() -> Path:
    """@asyncapi/parser in the tests' npm cache (``ops/asyncapi/install``;
    ``ops/bootstrap`` pre-installs it). Skipped only when npm cannot reach
    its registry to install it."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is missing: ops/bootstrap installs it"
    done = subprocess.run(
        [str(ROOT / "ops" / "asyncapi" / "install")], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=120)
        if ping.returncode != 0:
            pytest.skip(f"npm cannot reach its registry to install @asyncapi/parser: {ping.stderr}")
        pytest.fail(f"installing @asyncapi/parser failed:\n{done.stderr}")
    return Path(done.stdout.strip())


def test_the_official_parser_accepts_the_asyncapi_document(asyncapi_parser, tmp_path):
    url = "nats://10.20.30.40:4333"  # no server needed: the document names it
    out = subprocess.run(
        [*STRATUS, "--url", url, "events", "asyncapi"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STRATUS_DATA_DIR": "/nonexistent-stratus"},
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["asyncapi"].startswith("3.0")
    assert [s["host"] for s in doc["servers"].values()] == ["10.20.30.40:4333"]
    assert set(doc["components"]["messages"]) == {*CODEC.types, "cloudevent"}
    path = tmp_path / "asyncapi.json"
    path.write_text(out.stdout)
    check = subprocess.run(
        ["node", str(ROOT / "ops" / "asyncapi" / "validate.cjs"), str(asyncapi_parser), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    diagnostics = [json.loads(x) for x in check.stdout.splitlines()]
    assert check.returncode == 0, (check.stderr, diagnostics[:5])
    assert not [d for d in diagnostics if d["severity"] == 0]
    # ... and refuses what the issue found: an OpenAPI-style discriminator.
    doc["components"]["schemas"]["StratusEvent"]["discriminator"] = {"propertyName": "type"}
    path.write_text(json.dumps(doc))
    check = subprocess.run(
        ["node", str(ROOT / "ops" / "asyncapi" / "validate.cjs"), str(asyncapi_parser), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 1
    assert any('"severity":0' in x and "discriminator" in x for x in check.stdout.splitlines())


def test_the_cli_prints_each_form():
    for args, key in (
        (["schema"], "$defs"),
        (["schema", "--form", "envelope"], "$defs"),
        (["schema", "--form", "cloudevent"], "$defs"),
        (["asyncapi"], "channels"),
    ):
        out = subprocess.run(
            [*STRATUS, "events", *args], capture_output=True, text=True, timeout=60, check=True
        )
        assert key in json.loads(out.stdout)
    bad = subprocess.run(
        [*STRATUS, "events", "schema", "--form", "xml"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--form" in bad.stderr
