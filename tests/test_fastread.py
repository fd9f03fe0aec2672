"""The fast reader's guard: it runs only on a nats-py its hooks were written
for and that passes its self-test; otherwise the store warns and reads
through nats-py's public ordered consumer, with the same results."""

from __future__ import annotations

import sys
import warnings

import pytest
from nats.aio.client import Client as NATS
from nats.protocol.parser import Parser

import stratus.events
from stratus.events import fastread
from stratus.events.fastread import FastConnection, FastParser, FastReader
from stratus.events.reader import OrderedReader
from stratus.events.store import EventStore

from .test_store import bounded, created

pytestmark = pytest.mark.timeout(60)


# -- the checks ------------------------------------------------------------------


def test_the_installed_nats_py_passes_the_self_test():
    # (run with another nats-py installed, this says what the fast reader
    # would find wrong with it)
    assert fastread._self_test(NATS, Parser) is None
    assert (fastread.installed_version() in fastread.WRITTEN_FOR) == (
        fastread.unsupported() is None
    )


@pytest.mark.parametrize("version", ["2.15.0", "2.16.1", "2.17.0", "3.0.0", "unknown"])
def test_a_version_it_was_not_written_for_is_refused(version):
    reason = fastread.unsupported(version=version)
    assert reason is not None
    assert version in reason and "2.16.0" in reason


class _HeadersParsedParser:
    """A parser as a later nats-py might have it: headers handed over parsed."""

    def __init__(self, nc):
        self.nc = nc
        self.inner = Parser(self)
        self.buf = self.inner.buf

    async def parse(self, data=b""):
        await self.inner.parse(data)
        self.buf = self.inner.buf

    async def _process_msg(self, sid, subject, reply, data, headers):
        parsed = None
        if headers:
            parsed = dict(
                line.split(": ", 1) for line in headers.decode().split("\r\n")[1:] if ": " in line
            )
        await self.nc._process_msg(sid, subject, reply, data, parsed)

    def __getattr__(self, name):
        return getattr(self.nc, name)


class _ClientWithParser:
    """A stand-in client (no nats-py internals overridden) whose parser is ``parser_cls``."""

    parser_cls: type = Parser

    def __init__(self):
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self._ps = self.parser_cls(self)

    async def _process_msg(self, sid, subject, reply, data, headers):
        return None


class _ClientWithNewHook(_ClientWithParser):
    async def _process_msg(self, sid, subject, reply, data, headers, *, trace=None):
        return None


class _ClientWithoutStats(_ClientWithParser):
    def __init__(self):
        super().__init__()
        self.stats = {}


class _ClientWithChangedParser(_ClientWithParser):
    parser_cls = _HeadersParsedParser


class _ParserThatWaits(Parser):
    async def parse(self, data=b""):
        import asyncio

        await asyncio.sleep(0)
        await super().parse(data)


class _ClientWithWaitingParser(_ClientWithParser):
    parser_cls = _ParserThatWaits


@pytest.mark.parametrize(
    ("client", "parser", "why"),
    [
        (_ClientWithNewHook, Parser, "_process_msg takes"),
        (_ClientWithoutStats, Parser, "stats"),
        (_ClientWithChangedParser, _HeadersParsedParser, "hands over"),
        (_ClientWithWaitingParser, _ParserThatWaits, "waited"),
        (_ClientWithParser, _HeadersParsedParser, "no longer Client._ps"),
    ],
)
def test_a_changed_private_hook_fails_the_self_test(client, parser, why):
    reason = fastread.unsupported(version="2.16.0", connection_cls=client, parser_cls=parser)
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 64, 100, 4096])
def test_the_shortcut_hands_over_what_the_generic_parser_does_in_order(chunk):
    wire = fastread._self_test_wire()
    expected = fastread._self_test_expected()
    assert fastread._run_parser(Parser, wire, fast_sid=None, chunk=chunk) == expected
    recorder_seen = fastread._run_parser(FastParser, wire, fast_sid=7, chunk=chunk)
    assert recorder_seen == expected


def test_events_take_the_shortcut_and_everything_else_does_not():
    wire = fastread._self_test_wire()
    nc = fastread._Recorder(fast_sid=7)
    parser = FastParser(nc)
    fastread._complete(parser.parse(wire))
    # four events counted by the shortcut; the heartbeat, the other
    # subscription's messages, PING and INFO went through the generic parser
    assert nc.stats["in_msgs"] == 4
    assert parser.buf == bytearray()


# -- the fallback, end to end --------------------------------------------------


async def _read_back(store: EventStore) -> None:
    events = [created(f"t{i}") for i in range(30)]
    await store.ensure_stream()
    await store.append(events[:20])
    await store.append(events[20:])
    recs = await bounded(store.read_all(headers=True, batch=7))
    assert [r.decode().id for r in recs] == [e.id for e in events]
    assert [r.seq for r in recs] == list(range(1, 31))


async def _falls_back(url: str, why: str) -> None:
    """Connecting warns ``why``, and the store reads through the public reader."""
    with pytest.warns(RuntimeWarning, match=f"fast log reader is off.*{why}"):
        store = await EventStore.connect(url)
    try:
        assert type(store.nc) is NATS
        assert store.reader is OrderedReader
        await _read_back(store)
    finally:
        await store.close()


async def test_an_unknown_nats_py_falls_back_to_the_public_reader_with_a_warning(
    nats_server, monkeypatch
):
    monkeypatch.setattr(fastread, "WRITTEN_FOR", ("0.0.1",))
    await _falls_back(nats_server.url, "not one it was written for")


async def test_a_fast_reader_that_cannot_load_falls_back_too(nats_server, monkeypatch):
    # as if nats-py had moved the parser module: the import fails
    monkeypatch.setitem(sys.modules, "stratus.events.fastread", None)
    monkeypatch.delattr(stratus.events, "fastread")
    await _falls_back(nats_server.url, "cannot be loaded")


async def test_the_written_for_nats_py_gets_the_fast_reader_without_a_warning(nats_server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = await EventStore.connect(nats_server.url)
    try:
        assert isinstance(store.nc, FastConnection)
        assert store.reader is FastReader
        await _read_back(store)
    finally:
        await store.close()
