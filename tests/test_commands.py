"""The command service: validation, decisions, idempotency and races, on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
import uuid

import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus.events.commands import H_COMMAND_ID, MAX_COMMAND_BYTES
from stratus.events.errors import AlreadyExists, Invalid, NotFound, StratusError
from stratus.events.tenants import TenantCreated, TenantDeleted, TenantRenamed
from stratus.handlers.service import CommandService
from stratus.handlers.tenants import HANDLERS

pytestmark = pytest.mark.timeout(60)

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


async def call(svc: CommandService, verb: str, payload: bytes, command_id: str | None = None):
    """Send one command straight to ``handle``; the decoded JSON reply."""
    headers = {H_COMMAND_ID: command_id} if command_id is not None else {}
    return json.loads(await asyncio.wait_for(svc.handle(f"cmd.{verb}", payload, headers), 10))


async def request(nc, verb: str, payload: bytes, command_id: str | None = None) -> dict:
    """Send one command as a NATS request, as the CLI does; the decoded JSON reply."""
    headers = {H_COMMAND_ID: command_id} if command_id is not None else None
    msg = await nc.request(f"cmd.{verb}", payload, timeout=10, headers=headers)
    return json.loads(msg.data)


@pytest.fixture
async def service(store):
    svc = CommandService(store, HANDLERS)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def client(connect_store):
    """A separate connection, as a caller has."""
    return (await connect_store()).nc


# -- refusals ----------------------------------------------------------------

BAD_NAMES = ["", "-acme", "Acme", "ac_me", "ac.me", "ac me", "a" * 64, "acme\n", "äcme", "ac*", ">"]
# A display name is free text ("Acme Corp"), but not empty, blank, too long
# or holding control characters.
BAD_DISPLAY_NAMES = ["", "   ", "acme\n", "a\x1b[2Jb", "tab\there", "x" * 129, "line\u2028break"]

INVALID_CASES = [
    # (verb, body, headers, what the message must name)
    ("tenant.create", b'{"name": "acme"', {}, "JSON"),
    ("tenant.create", b"\xff\xfe", {}, "JSON"),
    ("tenant.create", b"[]", {}, "object"),
    ("tenant.create", b"null", {}, "object"),
    ("tenant.create", b'"acme"', {}, "object"),
    ("tenant.create", b"{}", {}, "name"),
    ("tenant.create", b"", {}, "name"),
    ("tenant.create", body(name=5), {}, "$.name"),
    ("tenant.create", body(name=None), {}, "$.name"),
    ("tenant.create", body(name=["acme"]), {}, "$.name"),
    ("tenant.create", body(name="fresh", description=7), {}, "$.description"),
    ("tenant.create", body(name="fresh", description="x" * 256), {}, "$.description"),
    ("tenant.create", body(name="fresh", colour="red"), {}, "colour"),
    ("tenant.create", body(name="fresh", description="x" * (MAX_COMMAND_BYTES + 1)), {}, "limit"),
    ("tenant.rename", body(tenant="acme"), {}, "name"),
    ("tenant.rename", body(tenant="acme", name=1.5), {}, "$.name"),
    ("tenant.rename", body(tenant="acme", name="x", previous="acme"), {}, "previous"),
    ("tenant.delete", body(tenant=42), {}, "$.tenant"),
    ("tenant.delete", body(tenant="acme", force=True), {}, "force"),
    ("tenant.explode", body(tenant="acme"), {}, "unknown command"),
    ("tenant", body(tenant="acme"), {}, "unknown command"),
    *(("tenant.create", body(name=n), {}, "$.name") for n in BAD_NAMES),
    *(("tenant.rename", body(tenant=n, name="fine"), {}, "$.tenant") for n in BAD_NAMES),
    *(("tenant.rename", body(tenant="acme", name=n), {}, "$.name") for n in BAD_DISPLAY_NAMES),
    *(("tenant.delete", body(tenant=n), {}, "$.tenant") for n in BAD_NAMES),
    *(
        ("tenant.create", body(name="fresh"), {H_COMMAND_ID: bad}, H_COMMAND_ID)
        for bad in ["a.b", "x" * 65, "with space", "star*", "abc\n", "é"]
    ),
]


def _case_id(case) -> str:
    verb, payload, headers, _ = case
    shown = payload.decode("utf-8", "backslashreplace")[:44]
    if headers:
        shown += f" id={next(iter(headers.values()))[:12]!r}"
    return f"{verb} {shown}"


@pytest.mark.parametrize("case", INVALID_CASES, ids=[_case_id(c) for c in INVALID_CASES])
async def test_a_malformed_command_is_invalid_names_the_problem_and_appends_nothing(store, case):
    # given an existing tenant "acme" (so a valid rename or delete would append)
    svc = CommandService(store, HANDLERS)
    await call(svc, "tenant.create", body(name="acme"))
    before = await store.last_seq()
    assert before == 1
    verb, payload, headers, names = case

    # when the malformed command is handled
    with pytest.raises(StratusError) as info:
        await svc.handle(f"cmd.{verb}", payload, headers)

    # then it is refused as invalid, the message says what is wrong, nothing lands
    assert isinstance(info.value, Invalid), info.value
    assert info.value.kind == "invalid"
    assert names in info.value.message
    assert await store.last_seq() == before


NATS_INVALID_CASES = [
    ("tenant.create", b"{not json", None, "JSON"),
    ("tenant.create", body(name=5), None, "$.name"),
    ("tenant.create", body(name="fresh", extra=1), None, "extra"),
    ("tenant.create", body(name="Not-Valid"), None, "$.name"),
    ("tenant.create", body(name="x" * 64), None, "$.name"),
    (
        "tenant.create",
        body(name="fresh", description="d" * (MAX_COMMAND_BYTES + 10)),
        None,
        "limit",
    ),
    ("tenant.rename", body(tenant="acme", name="a\x07b"), None, "$.name"),
    ("tenant.delete", body(), None, "tenant"),
    ("tenant.create", body(name="fresh"), "bad.id", H_COMMAND_ID),
    ("tenant.create", body(name="fresh"), "y" * 65, H_COMMAND_ID),
    ("tenant.frobnicate", body(name="fresh"), None, "unknown command"),
]


async def test_malformed_commands_over_nats_get_typed_invalid_replies(store, service, client):
    # given a running command service and an existing tenant
    created = await request(client, "tenant.create", body(name="acme"))
    assert created["ok"] is True
    before = await store.last_seq()

    for verb, payload, command_id, names in NATS_INVALID_CASES:
        # when a client sends a malformed command
        reply = await request(client, verb, payload, command_id)
        # then the reply is a typed refusal naming the problem, and nothing lands
        assert reply["ok"] is False, (verb, payload)
        assert reply["error"]["kind"] == "invalid", reply
        assert names in reply["error"]["message"], reply
        assert "seqs" not in reply
        assert await store.last_seq() == before


async def test_subjects_of_four_tokens_are_not_the_command_services(service, client):
    # Verbs are <kind>.<verb>; the image service's sessions
    # (cmd.image.upload.<session>) must reach it alone, never this service.
    with pytest.raises(nats.errors.NoRespondersError):
        await client.request("cmd.image.upload.0123abcd", b"chunk", timeout=5)
    reply = await request(client, "tenant.create", body(name="acme"))
    assert reply["ok"] is True


# -- decisions ---------------------------------------------------------------


async def event_at(store, seq: int):
    recs = await store.read_all(after=seq - 1, until=seq)
    assert [r.seq for r in recs] == [seq]
    return recs[0].decode()


async def test_create_rename_delete_over_nats(store, service, client):
    # when a tenant is created
    reply = await request(
        client, "tenant.create", body(name="acme", description="Acme Inc"), "create-1"
    )
    # then the reply carries the new event's sequence and the tenant
    assert reply["ok"] is True
    assert reply["seqs"] == [1]
    assert reply["data"] == {
        "id": "acme",
        "name": "acme",
        "description": "Acme Inc",
        "status": "active",
    }
    ev = await event_at(store, 1)
    assert isinstance(ev, TenantCreated)
    assert (ev.tenant, ev.name, ev.description) == ("acme", "acme", "Acme Inc")
    assert ev.subject == "ev.acme.tenant.acme"
    assert ev.correlation_id == ev.causation_id == "create-1"

    # when it is renamed
    reply = await request(client, "tenant.rename", body(tenant="acme", name="roadrunner"))
    assert reply["ok"] is True
    assert reply["seqs"] == [2]
    assert reply["data"]["name"] == "roadrunner"
    assert reply["data"]["id"] == "acme"
    ev = await event_at(store, 2)
    assert isinstance(ev, TenantRenamed)
    assert (ev.name, ev.previous) == ("roadrunner", "acme")

    # when renamed to the name it already has: nothing to do, nothing appended
    reply = await request(client, "tenant.rename", body(tenant="acme", name="roadrunner"))
    assert reply["ok"] is True
    assert reply.get("seqs", []) == []
    assert await store.last_seq() == 2

    # when it is deleted
    reply = await request(client, "tenant.delete", body(tenant="acme"))
    assert reply["ok"] is True
    assert reply["seqs"] == [3]
    assert reply["data"]["status"] == "deleted"
    assert isinstance(await event_at(store, 3), TenantDeleted)
    assert await store.last_seq() == 3


async def test_not_found_and_already_exists(store):
    svc = CommandService(store, HANDLERS)
    await call(svc, "tenant.create", body(name="acme"))
    before = await store.last_seq()

    # a second tenant with the same id
    with pytest.raises(AlreadyExists, match="acme already exists"):
        await svc.handle("cmd.tenant.create", body(name="acme"), {})
    # renaming or deleting one that never existed
    with pytest.raises(NotFound, match="ghost"):
        await svc.handle("cmd.tenant.rename", body(tenant="ghost", name="boo"), {})
    with pytest.raises(NotFound, match="ghost"):
        await svc.handle("cmd.tenant.delete", body(tenant="ghost"), {})

    assert await store.last_seq() == before


async def test_refusals_over_nats_are_typed(store, service, client):
    await request(client, "tenant.create", body(name="acme"))
    dup = await request(client, "tenant.create", body(name="acme"))
    missing = await request(client, "tenant.delete", body(tenant="ghost"))
    assert (dup["ok"], dup["error"]["kind"]) == (False, "already_exists")
    assert (missing["ok"], missing["error"]["kind"]) == (False, "not_found")
    assert "ghost" in missing["error"]["message"]
    assert await store.last_seq() == 1


async def test_a_deleted_tenants_id_is_never_reused(store, connect_store):
    # given a tenant created then deleted
    svc = CommandService(store, HANDLERS)
    await call(svc, "tenant.create", body(name="acme"))
    await call(svc, "tenant.delete", body(tenant="acme"))
    before = await store.last_seq()

    # when someone creates it again, through this service or a fresh one
    fresh = CommandService(await connect_store(), HANDLERS)
    for s in (svc, fresh):
        with pytest.raises(AlreadyExists, match="never reused"):
            await s.handle("cmd.tenant.create", body(name="acme"), {})
        # and it cannot be renamed or deleted again either
        with pytest.raises(NotFound):
            await s.handle("cmd.tenant.rename", body(tenant="acme", name="x"), {})
        with pytest.raises(NotFound):
            await s.handle("cmd.tenant.delete", body(tenant="acme"), {})

    # then nothing was appended
    assert await store.last_seq() == before


async def test_a_stale_cache_is_corrected_by_the_conditional_append(store, connect_store):
    # given two services that both saw tenant acme created
    a = CommandService(store, HANDLERS)
    b = CommandService(await connect_store(), HANDLERS)
    await call(a, "tenant.create", body(name="acme"))
    with pytest.raises(AlreadyExists):
        await b.handle("cmd.tenant.create", body(name="acme"), {})

    # when a deletes it and b, which has not seen that, is asked to rename it
    await call(a, "tenant.delete", body(tenant="acme"))
    with pytest.raises(NotFound):
        await b.handle("cmd.tenant.rename", body(tenant="acme", name="late"), {})

    # then b refused on the fresh state and nothing was appended
    assert await store.last_seq() == 2


# -- retries -----------------------------------------------------------------


async def test_a_retried_command_returns_the_same_seqs_from_any_handler(store, connect_store):
    # given a tenant created by command "cmd-create" on handler a
    a = CommandService(store, HANDLERS)
    first = await call(a, "tenant.create", body(name="acme"), "cmd-create")
    assert first["seqs"] == [1]
    assert first.get("duplicate", False) is False

    # when the command is retried on a (whose cache saw it applied)
    again_a = await call(a, "tenant.create", body(name="acme"), "cmd-create")
    # and on a fresh handler b (a new process: empty cache)
    b = CommandService(await connect_store(), HANDLERS)
    again_b = await call(b, "tenant.create", body(name="acme"), "cmd-create")

    # then both answer with the original seqs, flagged duplicate, and nothing lands
    for again in (again_a, again_b):
        assert again["ok"] is True
        assert again["seqs"] == [1]
        assert again["duplicate"] is True
        assert again["data"]["id"] == "acme"
    assert await store.last_seq() == 1


async def test_a_retry_is_recognised_after_the_aggregate_moved_on(store, connect_store):
    # given tenant acme created (cmd-1), renamed (cmd-2), renamed again (cmd-3) on handler a
    a = CommandService(store, HANDLERS)
    await call(a, "tenant.create", body(name="acme"), "cmd-1")
    b = CommandService(await connect_store(), HANDLERS)
    # b caches acme as of seq 1, before the renames
    with pytest.raises(AlreadyExists):
        await b.handle("cmd.tenant.create", body(name="acme"), {H_COMMAND_ID: "probe"})
    r2 = await call(a, "tenant.rename", body(tenant="acme", name="two"), "cmd-2")
    r3 = await call(a, "tenant.rename", body(tenant="acme", name="three"), "cmd-3")
    assert (r2["seqs"], r3["seqs"]) == ([2], [3])

    # when cmd-2 is retried on b (stale cache), on a fresh handler c, and on a itself
    c = CommandService(await connect_store(), HANDLERS)
    replies = [
        await call(svc, "tenant.rename", body(tenant="acme", name="two"), "cmd-2")
        for svc in (b, c, a)
    ]
    # and cmd-1, the create, is retried on a fresh handler d
    d = CommandService(await connect_store(), HANDLERS)
    create_again = await call(d, "tenant.create", body(name="acme"), "cmd-1")

    # then each is the original answer, not a second rename back to "two"
    for reply in replies:
        assert reply["ok"] is True
        assert reply["seqs"] == [2]
        assert reply["duplicate"] is True
    assert create_again["seqs"] == [1]
    assert create_again["duplicate"] is True
    assert await store.last_seq() == 3


async def test_a_retried_delete_on_a_fresh_handler_is_a_duplicate_not_a_not_found(
    store, connect_store
):
    a = CommandService(store, HANDLERS)
    await call(a, "tenant.create", body(name="acme"))
    first = await call(a, "tenant.delete", body(tenant="acme"), "del-1")
    fresh = CommandService(await connect_store(), HANDLERS)
    again = await call(fresh, "tenant.delete", body(tenant="acme"), "del-1")
    assert again["ok"] is True
    assert again["seqs"] == first["seqs"] == [2]
    assert again["duplicate"] is True
    assert await store.last_seq() == 2


async def test_a_retried_command_over_nats_hits_either_queue_member(store, connect_store):
    # given two command services in the same queue group
    services = [CommandService(store, HANDLERS), CommandService(await connect_store(), HANDLERS)]
    for svc in services:
        await svc.start()
    try:
        nc = (await connect_store()).nc
        first = await request(nc, "tenant.create", body(name="acme"), "the-command")
        # when the same command is sent ten more times (each lands on either member)
        retries = [
            await request(nc, "tenant.create", body(name="acme"), "the-command") for _ in range(10)
        ]
    finally:
        for svc in services:
            await svc.stop()
    # then every answer is the original one
    assert first["seqs"] == [1]
    assert all(r["ok"] and r["seqs"] == [1] and r["duplicate"] for r in retries), retries
    assert await store.last_seq() == 1


# -- races -------------------------------------------------------------------


async def test_two_queue_members_racing_thirty_creates_make_exactly_one_tenant(
    store, connect_store
):
    # given two command services in one queue group, on their own connections
    services = [
        CommandService(await connect_store(), HANDLERS),
        CommandService(await connect_store(), HANDLERS),
    ]
    for svc in services:
        await svc.start()
    try:
        nc = (await connect_store()).nc
        # when 30 clients create the same tenant at once, each with its own command id
        replies = await asyncio.gather(
            *(request(nc, "tenant.create", body(name="contested"), f"c-{i}") for i in range(30))
        )
    finally:
        for svc in services:
            await svc.stop()

    # then exactly one succeeds and every other is told it already exists
    ok = [r for r in replies if r["ok"]]
    refused = [r for r in replies if not r["ok"]]
    assert len(ok) == 1, replies
    assert ok[0]["seqs"] == [1]
    assert [r["error"]["kind"] for r in refused] == ["already_exists"] * 29
    assert await store.last_seq() == 1
    # and the race really crossed both members (each cached the tenant's boundary)
    assert all(s.cache._entries for s in services)


async def test_racing_renames_on_two_handlers_land_once_each_as_a_chain(store, connect_store):
    # given a tenant and two handlers
    a = CommandService(store, HANDLERS)
    b = CommandService(await connect_store(), HANDLERS)
    await call(a, "tenant.create", body(name="acme"))

    # when 20 different renames race across both
    async def rename(i):
        svc = (a, b)[i % 2]
        try:
            return await call(svc, "tenant.rename", body(tenant="acme", name=f"n{i}"), f"r-{i}")
        except StratusError as err:
            return {"ok": False, "error": {"kind": err.kind}, "id": f"r-{i}"}

    replies = await asyncio.gather(*(rename(i) for i in range(20)))

    # then each either landed exactly once or (after bounded retries) gave up
    # with a conflict and appended nothing
    ok = [r for r in replies if r["ok"]]
    assert all(r["error"]["kind"] == "conflict" for r in replies if not r["ok"]), replies
    assert len(ok) >= 10, replies
    seqs = sorted(s for r in ok for s in r["seqs"])
    assert seqs == list(range(2, 2 + len(ok)))
    events = [r.decode() for r in await store.read_all(after=1)]
    assert len(events) == len(ok)
    assert sorted(e.name for e in events) == sorted(r["data"]["name"] for r in ok)
    # and each records the name it replaced, so the renames form one chain
    assert all(isinstance(e, TenantRenamed) for e in events)
    chain = ["acme"] + [e.name for e in events]
    assert [e.previous for e in events] == chain[:-1]


# -- property: applied exactly as decided, or refused with nothing appended ---


def _valid_field(value, *, pattern=NAME, max_len: int | None = None) -> bool:
    if not isinstance(value, str):
        return False
    if max_len is not None:
        return len(value) <= max_len
    return pattern.fullmatch(value) is not None


def _display_name(value) -> bool:
    """The README's display name: free text, 1-128 characters, not only
    spaces, no control characters (nor line or paragraph separators)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 128
        and not value.isspace()
        and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)
    )


SPEC = {
    "tenant.create": ({"name"}, {"description"}),
    "tenant.rename": ({"tenant", "name"}, set()),
    "tenant.delete": ({"tenant"}, set()),
}
# Fields holding a display name rather than an id.
DISPLAY_FIELDS = {("tenant.rename", "name")}


def decode_command(verb: str, payload: bytes) -> dict | None:
    """The command's fields if the contract says it is well formed, else None."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        obj = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    required, optional = SPEC[verb]
    if not required <= obj.keys() <= required | optional:
        return None
    for key in required:
        ok = _display_name if (verb, key) in DISPLAY_FIELDS else _valid_field
        if not ok(obj[key]):
            return None
    if "description" in obj and not _valid_field(obj["description"], max_len=255):
        return None
    return obj


# Tenant ids the examples share, so creates collide and renames and deletes find
# something; the model below tracks what the log holds across examples.
POOL = [*"abcdefghijklmnop", "d-1", "e-2", "f3", "0", "zz-top", "k8s"]

good_names = st.sampled_from(POOL) | st.from_regex(NAME, fullmatch=True)
names = st.one_of(
    good_names,
    # near misses: a trailing newline, upper case, a dot, one character too many
    st.sampled_from(POOL).map(lambda n: n + "\n"),
    st.sampled_from(POOL).map(str.upper),
    st.sampled_from(POOL).map(lambda n: n + ".x"),
    st.just("a" * 64),
    st.text(max_size=70),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=4,
)
field_values = st.one_of(names, names, json_values)
extra_keys = st.dictionaries(
    st.sampled_from(["name", "tenant", "description", "previous", "x"]) | st.text(max_size=5),
    field_values,
    max_size=2,
)


@st.composite
def command_payloads(draw, verb: str) -> bytes | tuple[int, str | None]:
    required, optional = SPEC[verb]
    kind = draw(st.sampled_from(["known", "known", "valid", "valid", "fields", "json", "bytes"]))
    if kind == "known":
        # the test makes a well-formed command on a tenant the log holds
        return (draw(st.integers(0, 10_000)), draw(good_names | st.none()))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "valid":
        obj = {k: draw(good_names) for k in sorted(required)}
        if "tenant" in obj and draw(st.integers(0, 4)):
            obj["tenant"] = draw(st.sampled_from(POOL))
        if verb == "tenant.rename" and draw(st.booleans()):
            obj["name"] = obj["tenant"]  # the name it was created with
        if "description" in optional and draw(st.booleans()):
            obj["description"] = draw(st.text(max_size=255))
        return json.dumps(obj).encode()
    obj = {k: draw(field_values) for k in sorted(required)}
    if "description" in optional and draw(st.booleans()):
        obj["description"] = draw(st.text(max_size=300) | json_values)
    if draw(st.integers(0, 5)) == 0:
        obj.update(draw(extra_keys))
    if draw(st.integers(0, 7)) == 0:
        required_key = sorted(required)[0]
        obj.pop(required_key, None)
    return json.dumps(obj).encode()


def known_tenant_payload(verb: str, model: Model, pick: int, new_name: str | None) -> bytes:
    """A well-formed command about a tenant the log holds (live or deleted).

    The choice is made from drawn numbers, not by drawing from the model, so
    hypothesis sees the same draws whatever the stream holds when it replays.
    """
    if not model.tenants:
        return body(name=POOL[pick % len(POOL)])
    tenant = sorted(model.tenants)[pick % len(model.tenants)]
    if verb == "tenant.create":
        return body(name=tenant)
    if verb == "tenant.delete":
        return body(tenant=tenant)
    return body(tenant=tenant, name=new_name or model.tenants[tenant][1])


@st.composite
def commands(draw):
    verb = draw(st.sampled_from(["tenant.create"] * 2 + ["tenant.rename"] * 3 + ["tenant.delete"]))
    payload = draw(command_payloads(verb))
    id_kind = draw(st.sampled_from(["none", "fresh", "fresh", "fresh", "fresh", "bad"]))
    if id_kind == "bad":
        good = st.text(alphabet="abcXYZ09_-", max_size=10)
        bad = draw(st.sampled_from(list(".*>/:@!é")) | st.just("x" * 65))
        command_id = draw(good) + bad + draw(good)
    else:
        command_id = id_kind
    return verb, payload, command_id


class Model:
    """What the log says about tenants: id -> (live, current name)."""

    def __init__(self) -> None:
        self.tenants: dict[str, tuple[bool, str]] = {}

    def expect(self, verb: str, cmd: dict | None):
        """(error kind, None) or (None, [(event type, fields)])."""
        if cmd is None:
            return "invalid", None
        if verb == "tenant.create":
            if cmd["name"] in self.tenants:
                return "already_exists", None
            fields = {"name": cmd["name"], "description": cmd.get("description", "")}
            return None, [(TenantCreated, fields)]
        live, current = self.tenants.get(cmd["tenant"], (False, ""))
        if not live:
            return "not_found", None
        if verb == "tenant.delete":
            return None, [(TenantDeleted, {})]
        if current == cmd["name"]:
            return None, []
        return None, [(TenantRenamed, {"name": cmd["name"], "previous": current})]

    def fold(self, event) -> None:
        tid = event.aggregate.id
        if isinstance(event, TenantCreated):
            self.tenants[tid] = (True, event.name)
        elif isinstance(event, TenantRenamed):
            self.tenants[tid] = (self.tenants[tid][0], event.name)
        elif isinstance(event, TenantDeleted):
            self.tenants[tid] = (False, self.tenants[tid][1])


@pytest.fixture
def model():
    """One model per test function: it outlives the examples, as the stream does."""
    return Model()


@pytest.mark.timeout(120)
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cmd=commands())
async def test_any_command_is_applied_exactly_as_decided_or_refused_with_nothing_appended(
    store, service, client, model, cmd
):
    # given the stream as the model knows it (one nats-server for all examples)
    verb, payload, id_kind = cmd
    if isinstance(payload, tuple):
        payload = known_tenant_payload(verb, model, *payload)
    command_id = {"none": None, "fresh": uuid.uuid4().hex}.get(id_kind, id_kind)
    before = await store.last_seq()
    expected_error, expected_events = model.expect(verb, decode_command(verb, payload))
    if command_id is not None and not TOKEN.fullmatch(command_id):
        expected_error, expected_events = "invalid", None

    # when the command is sent
    reply = await request(client, verb, payload, command_id)

    # then it was refused with nothing appended, or applied exactly as the model decided
    appended = await store.read_all(after=before)
    for rec in appended:  # the model follows the log, so later examples stay right
        model.fold(rec.decode())
    if expected_error is not None:
        assert reply["ok"] is False, (verb, payload, reply)
        assert reply["error"]["kind"] == expected_error, (verb, payload, reply)
        assert appended == [], (verb, payload, reply)
        assert await store.last_seq() == before
        return
    assert reply["ok"] is True, (verb, payload, reply)
    seqs = reply.get("seqs", [])
    assert reply.get("duplicate", False) is False
    assert seqs == [r.seq for r in appended] == list(range(before + 1, before + 1 + len(seqs)))
    assert await store.last_seq() == before + len(seqs)
    assert len(seqs) == len(expected_events)
    for rec, (etype, fields) in zip(appended, expected_events, strict=True):
        event = rec.decode()
        assert type(event) is etype
        assert {k: getattr(event, k) for k in fields} == fields
        if command_id is not None:
            assert event.correlation_id == command_id


async def test_the_stream_tells_a_handler_its_tenant_moved_so_it_reads_before_deciding(
    store, connect_store
):
    """Two handler processes taking turns on one tenant: each learns from the
    stream that the other wrote, and decides on what it read, not on a
    refused append. Without the feed every turn would cost a conflict."""
    import time

    from stratus.handlers.catalog import all_handlers

    a = CommandService(store, all_handlers())
    b = CommandService(await connect_store(), all_handlers())
    await a.start()
    await b.start()
    try:
        ok = await call(a, "tenant.create", b'{"name": "turns"}')
        assert ok["ok"], ok

        async def create(svc: CommandService, i: int) -> None:
            body = json.dumps({"tenant": "turns", "name": f"v{i}", "size_gb": 1}).encode()
            reply = await call(svc, "volume.create", body)
            assert reply["ok"], reply

        async def marked(svc: CommandService) -> None:
            # bounded wait for the other's event to reach this handler
            deadline = time.monotonic() + 5
            while not svc.cache.get("ev.turns.>", dict, svc.handlers["volume.create"].fold).stale:
                assert time.monotonic() < deadline, "the stream never marked the boundary"
                await asyncio.sleep(0.005)

        await create(a, 0)
        await create(b, 1)  # b's first look: it reads the tenant, nothing cached yet
        for i in range(2, 10):
            svc = a if i % 2 == 0 else b
            await marked(svc)
            await create(svc, i)
            # its own events, coming back on the stream, do not mark it
            await asyncio.sleep(0.05)
            assert not svc.cache.get("ev.turns.>", dict, svc.handlers["volume.create"].fold).stale
        assert a.conflicts == 0 and b.conflicts == 0, (a.conflicts, b.conflicts)
        names = {r.decode().name for r in await store.read_all(subjects=["ev.turns.volume.*"])}
        assert names == {f"v{i}" for i in range(10)}
    finally:
        await a.stop()
        await b.stop()
