"""The fast log reader: nats-py's connection with the protocol read by us.

This is the one module of Stratus that relies on nats-py's private parts:
the connection's parser (``Client._ps``, ``Parser.buf``/``state``), its
per-message hook ``Client._process_msg``, the subscription id ``sub._id``
and the message counters ``Client.stats``. It pays: a catch-up read spends
most of its time in nats-py's per-message work (two regular expressions, a
header dict, a ``Msg``, a queue and a task hop per event), which this skips.

It must never misbehave on a nats-py it was not written for:
``unsupported()`` checks the installed version against ``WRITTEN_FOR`` and
runs a self-test of every hook on a synthetic byte stream (no network);
``events.store.connect_nats`` makes a ``FastConnection`` only when both
pass, and otherwise warns and reads through ``reader.OrderedReader``
(nats-py's public ordered consumer). Both readers pass the same contract
suite, ``tests/test_logreader.py``. To admit a new nats-py: run that suite
with it installed, then add its version here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine
from importlib import metadata
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

from stratus.events.reader import LogReader, PushReader

# nats-py releases whose private hooks this module was written against and
# that passed tests/test_logreader.py.
WRITTEN_FOR = ("2.16.0",)

_HEADER_NAME_SPACE = re.compile(rb"[\s\x1c-\x1f]")

RawHandler = Callable[[bytes, bytes, bytes, bytes | None], Awaitable[None]]
EventHandler = Callable[[bytes, bytes, bytes, bytes], None]


class FastConnection(NATS):
    """nats-py's client, with a reader's messages taken off its parser.

    Every stored event carries three headers (the command id and the append
    condition), and nats-py 2.16's parser tests each header name character
    by character in a generator; on a catch-up read that was a quarter of
    the reader's time. ``parse_header_lines`` gives the same dict (same
    skipping of malformed names, same decoding) with one regex search per
    name.
    """

    # ``EventStore`` reads through this on a connection of this class.
    log_reader: type[LogReader]

    def __init__(self) -> None:
        super().__init__()
        # sid -> handler of raw messages (the event reader's fast path)
        self.direct: dict[int, RawHandler] = {}
        # sid -> plain function for a reader's stored events (``FastParser``)
        self.fast: dict[int, EventHandler] = {}
        self._ps = FastParser(self)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        # Reading the log, nats-py's per-message work (parsing headers,
        # building a Msg, a queue and a task hop) cost more than ours; a
        # reader's subscription takes the raw fields straight from the parser.
        handler = self.direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        await handler(subject, reply, data, headers)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """The header lines after ``NATS/1.0\\r\\n`` as nats-py would give them."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip()
        if not name.isascii() or _HEADER_NAME_SPACE.search(name):
            continue
        out[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
    return out


class FastParser(Parser):
    """nats-py's protocol parser, with a shortcut for a reader's events.

    Reading the log, each stored event is one HMSG with headers, and the
    generic parser tries two regular expressions on it, keeps its fields in
    a dict and awaits a coroutine for it: most of a replay's reading time.
    Here the messages that are plain events for a subscription in ``fast``
    (a reply subject, headers without a status) are cut out with one
    ``find`` and one ``split`` each and handed to a plain function. Any other
    operation (a heartbeat, a flow-control request, a PING, another
    subscription's message) is given alone to the generic parser, in order;
    an incomplete message waits for the rest of its bytes.
    """

    async def parse(self, data: bytes = b"") -> None:
        fast = self.nc.fast
        if not fast or self.state != AWAITING_CONTROL_LINE:
            await super().parse(data)
            return
        buf = self.buf
        buf.extend(data)
        while buf:
            n, pos = _cut_events(buf, fast)
            if pos:
                del buf[:pos]
                self.nc.stats["in_msgs"] += n
            end = _op_end(buf)
            if end == 0:
                return  # an incomplete operation: wait for more bytes
            if end < 0:
                await super().parse()  # (it refuses an overlong line)
                return
            # The generic parser gets that one operation as its buffer (a
            # copy of it alone: dropping the head of a bytearray is cheap).
            head = buf[:end]
            del buf[:end]
            self.buf = head
            await super().parse()
            if self.buf is not head:
                return  # reset (an error, a reconnect): the rest is void
            if head or self.state != AWAITING_CONTROL_LINE:
                # (not expected: the operation was whole) the generic
                # parser carries on with everything, as it would have.
                head.extend(buf)
                return
            self.buf = buf


def _cut_events(buf: bytearray, fast: dict[int, EventHandler]) -> tuple[int, int]:
    """Hand the whole event messages at the head of ``buf`` to their
    handlers: (how many, the offset after the last)."""
    pos = count = 0
    size = len(buf)
    find = buf.find
    while buf.startswith(b"HMSG ", pos):
        eol = find(b"\r\n", pos)
        if eol < 0:
            break
        args = buf[pos + 5 : eol].split()
        # subject sid reply header-size total-size
        if len(args) != 5:
            break
        handler = fast.get(int(args[1]))
        if handler is None:
            break
        start = eol + 2
        head = start + int(args[3])
        end = start + int(args[4])
        # "NATS/1.0 100 ...": a status line, for the generic parser.
        if end + 2 > size or buf[start + 8 : start + 10] != b"\r\n":
            break
        handler(args[0], args[2], bytes(buf[head:end]), bytes(buf[start:head]))
        pos = end + 2
        count += 1
    return count, pos


def _op_end(buf: bytearray) -> int:
    """The length of the complete operation at the head of ``buf``; 0 if
    it is incomplete, -1 if its line is too long to ever be one."""
    eol = buf.find(b"\r\n")
    if eol < 0:
        return -1 if len(buf) >= MAX_CONTROL_LINE_SIZE else 0
    if buf.startswith(b"MSG ") or buf.startswith(b"HMSG "):
        try:
            end = eol + 2 + int(buf[:eol].rsplit(None, 1)[-1]) + 2
        except ValueError:
            return eol + 2  # malformed: the generic parser says so
        return end if end <= len(buf) else 0
    return eol + 2


class FastReader(PushReader):
    """A ``PushReader`` whose events come straight from the parser: the
    subscription's messages are taken off nats-py's per-message path
    (``FastConnection``), stored events by ``FastParser``'s shortcut."""

    @property
    def nc(self) -> FastConnection:
        nc = self.source.nc
        assert isinstance(nc, FastConnection), "FastReader needs a FastConnection"
        return nc

    async def _subscribe(self, inbox: str) -> Any:
        nc = self.nc
        sub = await nc.subscribe(inbox)
        nc.direct[sub._id] = self._on_raw
        nc.fast[sub._id] = self._on_data
        return sub

    async def _unsubscribe(self, sub: Any) -> None:
        nc = self.nc
        nc.direct.pop(sub._id, None)
        nc.fast.pop(sub._id, None)
        await super()._unsubscribe(sub)

    async def _on_raw(
        self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        # Through ``FastConnection._process_msg``: raw protocol fields,
        # headers parsed only when asked for.
        if headers and headers[8:9] == b" ":  # "NATS/1.0 100 ...": a status
            await self._on_status(headers[9:12], reply)
            return
        self._on_data(subject, reply, data, headers)

    def _on_data(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        # The shortest path (``FastParser``): a stored event, never a status.
        parsed = None
        if self.headers and headers:
            parsed = parse_header_lines(headers[10:])
        self._event(subject, reply, data, parsed)


FastConnection.log_reader = FastReader


# -- is this nats-py the one the hooks were written for? ----------------------


def installed_version() -> str:
    try:
        return metadata.version("nats-py")
    except metadata.PackageNotFoundError:
        return "unknown"


def unsupported(
    version: str | None = None,
    connection_cls: type[Any] = NATS,
    parser_cls: type[Any] = Parser,
) -> str | None:
    """Why the fast reader must not run on this nats-py; None if it may.

    The arguments stand for the installed nats-py (its version, client and
    parser classes) so the refusals can be tested.
    """
    version = version or installed_version()
    if version not in WRITTEN_FOR:
        return f"nats-py {version} is not one it was written for ({', '.join(WRITTEN_FOR)})"
    try:
        return _self_test(connection_cls, parser_cls)
    except Exception as exc:  # whatever a changed library does, it is a no
        return f"its self-test failed: {type(exc).__name__}: {exc}"


_MSG_HOOK = ["self", "sid", "subject", "reply", "data", "headers"]
_ACK = b"$JS.ACK.EVENTS.c1.1.%d.%d.1700000000000000000.%d"
_EVENT_HEADERS = b"NATS/1.0\r\nNats-Msg-Id: m%d\r\nNats-Expected-Last-Subject-Sequence: 3\r\n\r\n"
_HEARTBEAT = b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"


def _self_test(connection_cls: type[Any], parser_cls: type[Any]) -> str | None:
    hook = getattr(connection_cls, "_process_msg", None)
    if hook is None or not inspect.iscoroutinefunction(hook):
        return "Client._process_msg is gone or not a coroutine function"
    if list(inspect.signature(hook).parameters) != _MSG_HOOK:
        return f"Client._process_msg takes {inspect.signature(hook)}, not {_MSG_HOOK}"
    nc = connection_cls()
    if not isinstance(getattr(nc, "_ps", None), parser_cls):
        return "the client's parser is no longer Client._ps"
    if not {"in_msgs", "in_bytes"} <= set(getattr(nc, "stats", {})):
        return "Client.stats has no in_msgs/in_bytes"
    if getattr(Subscription(nc, id=7), "_id", None) != 7:
        return "a subscription's id is no longer Subscription._id"
    wire = _self_test_wire()
    expected = _self_test_expected()
    generic = _run_parser(parser_cls, wire, fast_sid=None, chunk=len(wire))
    if generic != expected:
        return f"the parser hands over {_first_difference(generic, expected)}"
    if FastParser.__mro__[1] is not parser_cls:
        return "the client's parser is not the one FastParser extends"
    for chunk in (1, 7, 64, len(wire)):
        if _run_parser(FastParser, wire, fast_sid=7, chunk=chunk) != expected:
            return f"the shortcut parser differs from the generic one (chunks of {chunk})"
    return None


def _first_difference(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> str:
    for i in range(max(len(got), len(want))):
        a = got[i] if i < len(got) else "nothing"
        b = want[i] if i < len(want) else "nothing"
        if a != b:
            return f"{a} where it should hand over {b}"
    return "the same"


def _hmsg(subject: bytes, sid: int, reply: bytes, headers: bytes, data: bytes) -> bytes:
    size = len(headers) + len(data)
    return b"HMSG %s %d %s %d %d\r\n%s%s\r\n" % (
        subject,
        sid,
        reply,
        len(headers),
        size,
        headers,
        data,
    )


def _self_test_wire() -> bytes:
    out = [b'INFO {"server_id": "x"}\r\n']
    for i in range(1, 5):
        # NUL and CRLF bytes inside payloads must not confuse the cut.
        data = b"\x00event\r\nHMSG %d\r\n" % i
        out.append(_hmsg(b"ev.t.tenant.t%d" % i, 7, _ACK % (i, i, 4 - i), _EVENT_HEADERS % i, data))
        if i == 2:
            out.append(_hmsg(b"_INBOX.x", 7, b"$JS.FC.EVENTS.c1.1", _HEARTBEAT, b""))
            out.append(b"PING\r\n")
            out.append(b"MSG _INBOX.other 9 5\r\nhello\r\n")
            out.append(_hmsg(b"other", 9, b"r.1", _EVENT_HEADERS % 0, b"not fast"))
            out.append(b"+OK\r\n")
    return b"".join(out)


def _self_test_expected() -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [("info", {"server_id": "x"})]
    for i in range(1, 5):
        data = b"\x00event\r\nHMSG %d\r\n" % i
        out.append(
            ("msg", 7, b"ev.t.tenant.t%d" % i, _ACK % (i, i, 4 - i), data, _EVENT_HEADERS % i)
        )
        if i == 2:
            out.append(("msg", 7, b"_INBOX.x", b"$JS.FC.EVENTS.c1.1", b"", _HEARTBEAT))
            out.append(("ping",))
            out.append(("msg", 9, b"_INBOX.other", b"", b"hello", None))
            out.append(("msg", 9, b"other", b"r.1", b"not fast", _EVENT_HEADERS % 0))
    return out


class _Recorder:
    """What a connection gets from its parser, in order (for the self-test)."""

    def __init__(self, fast_sid: int | None) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self.fast = {fast_sid: self._fast} if fast_sid is not None else {}

    def _fast(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        self.seen.append(("msg", 7, bytes(subject), bytes(reply), data, headers))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        raw = bytes(headers) if isinstance(headers, bytes | bytearray | memoryview) else headers
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), raw))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: Any) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: Any) -> None:
        self.seen.append(("err", err))


def _run_parser(
    parser_cls: type[Any], wire: bytes, fast_sid: int | None, chunk: int
) -> list[tuple[Any, ...]]:
    nc = _Recorder(fast_sid)
    parser = parser_cls(nc)
    for i in range(0, len(wire), chunk):
        _complete(parser.parse(wire[i : i + chunk]))
    if parser.buf:
        raise ValueError(f"{len(parser.buf)} bytes left in the parser")
    return nc.seen


def _complete(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (a parser feeding the recorder)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the parser waited for something")
