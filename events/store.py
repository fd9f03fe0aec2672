"""The event-store client: ``append``, ``read`` and ``subscribe`` on JetStream.

Everything that touches the ``EVENTS`` stream goes through here, and every
broker failure leaves as a Stratus error (``ConcurrencyConflict``,
``Unavailable``, ...), never as a nats-py exception.

Reads use an ephemeral push consumer driven directly over core NATS rather
than nats-py's ordered consumer: we need the stream sequence, timestamp and
pending count of every message (they are in the reply subject), a clean
stop at a sequence or time, and backpressure (flow-control replies are held
back until the reader has drained what it buffered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

from stratus.events.catalog import CODEC
from stratus.events.commands import SERVICE_INBOX_PREFIX
from stratus.events.errors import (
    ConcurrencyConflict,
    Internal,
    Invalid,
    StratusError,
    Unavailable,
)
from stratus.events.model import Codec, Event

STREAM = "EVENTS"
SUBJECTS = "ev.>"
MAX_BATCH = 1000
# A retried command must land inside the window to be recognised as a retry.
DUPLICATE_WINDOW_S = 15 * 60

ERR_WRONG_LAST_SEQUENCE = 10071
ERR_WRONG_LAST_MSG_ID = 10070
ERR_BATCH_DUPLICATE_MSG_ID = 10201
_LAST_SEQ_RE = re.compile(r"wrong last sequence: (\d+)")

H_MSG_ID = "Nats-Msg-Id"
H_EXPECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_EXPECT_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQ = "Nats-Batch-Sequence"
H_BATCH_COMMIT = "Nats-Batch-Commit"
H_EXPECT_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
# What a lookup expects the stream's last message id to be: nothing that
# appends carries (ids are tokens), so the lookup never stores anything.
_NO_MSG_ID = "stratus lookup: never a message id"
# Where a lookup is sent when the caller names no subject of its own.
LOOKUP_SUBJECT = "ev._system.lookup.command"


class Condition(msgspec.Struct, frozen=True):
    """Append only if the last event matching ``subject`` is still ``last_seq``.

    ``subject`` is an aggregate subject (per-aggregate check) or a filter such
    as ``ev.<tenant>.>`` (tenant-wide check); ``last_seq`` 0 means nothing may
    match yet. ``index`` names the event of the append that carries the check:
    in an atomic batch each member may carry its own.
    """

    subject: str
    last_seq: int
    index: int = 0


class AppendResult(msgspec.Struct, frozen=True):
    seqs: list[int]
    duplicate: bool = False


class AppendRequest(msgspec.Struct, frozen=True):
    """One caller's ``append`` arguments, for ``append_group``."""

    events: Sequence[Event]
    condition: Condition | Sequence[Condition] | None = None
    msg_id: str | None = None


class Recorded:
    """One stored event as read from the stream, decoded on demand."""

    __slots__ = ("_event", "data", "headers", "seq", "subject", "ts_ns")

    def __init__(
        self,
        seq: int,
        subject: str,
        ts_ns: int,
        data: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.seq = seq
        self.subject = subject
        self.ts_ns = ts_ns
        self.data = data
        self.headers = headers
        self._event: Event | None = None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.ts_ns / 1e9, UTC)

    def decode(self, codec: Codec = CODEC) -> Event:
        if self._event is None:
            self._event = codec.decode(self.data)
        return self._event

    def __repr__(self) -> str:
        return f"Recorded(seq={self.seq}, subject={self.subject!r})"


Until = int | datetime | None


_HEADER_NAME_SPACE = re.compile(rb"[\s\x1c-\x1f]")


class _Connection(NATS):
    """nats-py's client with a faster parser for message headers.

    Every stored event carries three headers (the command id and the append
    condition), and nats-py 2.16's parser tests each header name character
    by character in a generator; on a catch-up read that was a quarter of
    the reader's time. This gives the same dict (same skipping of malformed
    names, same decoding) with one regex search per name. nats-py is pinned
    exactly, and the store's tests read headers back, so a change of the
    private hook shows up there.
    """

    def __init__(self) -> None:
        super().__init__()
        # sid -> handler of raw messages (the event reader's fast path)
        self.direct: dict[int, Callable[[bytes, bytes, bytes, bytes | None], Awaitable[None]]] = {}
        # sid -> plain function for a reader's stored events (``_FastParser``)
        self.fast: dict[int, Callable[[bytes, bytes, bytes, bytes], None]] = {}
        self._ps = _FastParser(self)

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

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
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


class _FastParser(Parser):
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


def _cut_events(buf: bytearray, fast: dict[int, Callable[..., None]]) -> tuple[int, int]:
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


async def _quiet(exc: Exception) -> None:
    # nats-py reports every failed (re)connect attempt here; callers see the
    # outcome as Unavailable, so the noise is not printed.
    return None


async def connect_nats(
    url: str, *, persistent: bool = True, timeout: float = 10.0, **options: Any
) -> NATS:
    """Connect to NATS, failing with ``Unavailable`` within ``timeout``.

    A persistent connection (services) reconnects forever once up; a
    one-shot one (the CLI) gives up at the first failure.
    """
    nc = _Connection()
    opts: dict[str, Any] = {
        "connect_timeout": 2,
        "reconnect_time_wait": 0.5,
        "error_cb": _quiet,
        "allow_reconnect": persistent,
        # nats-py treats 0 as "no limit"; 1 is the smallest real bound.
        "max_reconnect_attempts": -1 if persistent else 1,
    }
    opts.update(options)
    try:
        await asyncio.wait_for(nc.connect(url, **opts), timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise Unavailable(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
    return nc


class EventStore:
    """Append, read and subscribe over one NATS connection."""

    def __init__(
        self,
        nc: NATS,
        *,
        codec: Codec = CODEC,
        stream: str = STREAM,
        timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout)
        self.codec = codec
        self.stream = stream
        self.timeout = timeout

    @classmethod
    async def connect(cls, url: str, *, persistent: bool = True, **options: Any) -> EventStore:
        # A service's inboxes (acks, event deliveries) live outside the
        # namespace clients may subscribe to.
        options.setdefault("inbox_prefix", SERVICE_INBOX_PREFIX)
        return cls(await connect_nats(url, persistent=persistent, **options))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    # -- stream ---------------------------------------------------------------

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[SUBJECTS],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=0,
            max_msgs=-1,
            max_bytes=-1,
            duplicate_window=DUPLICATE_WINDOW_S,
            allow_direct=True,
            allow_atomic=True,
            # The log is kept forever: an operator may archive, never edit.
            deny_delete=True,
            deny_purge=True,
        )

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to our settings."""
        cfg = self.stream_config()
        try:
            try:
                await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(cfg)
                return
            await self.js.update_stream(cfg)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _translate(exc) from None

    async def last_seq(self, subject: str | None = None) -> int:
        """The stream's last sequence, or the last one matching ``subject``."""
        try:
            if subject is None or subject == SUBJECTS:
                info = await self.js.stream_info(self.stream)
                return info.state.last_seq
            msg = await self.js.get_last_msg(self.stream, subject, direct=True)
            return msg.seq or 0
        except nats.js.errors.NotFoundError:
            return 0
        except (TimeoutError, nats.errors.Error) as exc:
            raise _translate(exc) from None

    async def first_seq_after(self, when: datetime) -> int:
        """The sequence of the first event stored at or after ``when`` (0: none)."""
        req = {"start_time": when.astimezone(UTC).isoformat().replace("+00:00", "Z")}
        try:
            resp = await self.nc.request(
                f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(req).encode(), timeout=self.timeout
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise _translate(exc) from None
        if resp.headers and resp.headers.get("Status") == "404":
            return 0
        if resp.headers and resp.headers.get("Status"):
            raise Internal(f"direct get by time failed: {resp.headers}")
        return int((resp.headers or {}).get("Nats-Sequence", 0))

    async def get(self, seqs: Sequence[int], in_flight: int = 64) -> list[Recorded]:
        """The events at ``seqs`` (in that order), by JetStream direct get.

        For a handful of events scattered over the log (a page of the audit
        trail): one request each, pipelined, instead of a consumer reading
        everything between them.
        """
        slots = asyncio.Semaphore(in_flight)
        subject = f"$JS.API.DIRECT.GET.{self.stream}"

        async def one(seq: int) -> Recorded:
            async with slots:
                try:
                    resp = await self.nc.request(
                        subject, json.dumps({"seq": seq}).encode(), timeout=self.timeout
                    )
                except (TimeoutError, nats.errors.Error) as exc:
                    raise _translate(exc) from None
            h = resp.headers or {}
            if h.get("Status"):
                raise Internal(f"no event at sequence {seq}: {h.get('Description', h)}")
            return Recorded(seq, h.get("Nats-Subject", ""), 0, resp.data)

        return list(await asyncio.gather(*(one(s) for s in seqs)))

    # -- append ---------------------------------------------------------------

    def _prepare(
        self, events: Sequence[Event], condition: Condition | Sequence[Condition] | None
    ) -> tuple[list[tuple[str, bytes]], dict[int, Condition]]:
        if len(events) > MAX_BATCH:
            raise Invalid(f"at most {MAX_BATCH} events can be appended together, got {len(events)}")
        conds: dict[int, Condition] = {}
        for c in [condition] if isinstance(condition, Condition) else (condition or []):
            if not 0 <= c.index < len(events):
                raise Invalid(f"condition index {c.index} is outside the {len(events)} events")
            conds[c.index] = c
        return [(e.subject, self.codec.encode(e)) for e in events], conds

    async def append(
        self,
        events: Sequence[Event],
        condition: Condition | Sequence[Condition] | None = None,
        *,
        msg_id: str | None = None,
    ) -> AppendResult:
        """Append ``events`` atomically, if ``condition`` holds.

        One event is one publish; several are one atomic batch (all land or
        none). ``msg_id`` is the command id: appending again with the same id
        within the duplicate window appends nothing and returns the original
        sequence numbers with ``duplicate=True``.
        """
        if not events:
            return AppendResult([])
        payloads, conds = self._prepare(events, condition)
        try:
            if len(events) == 1:
                return await self._publish_one(payloads[0], conds.get(0), msg_id)
            seqs = await self._publish_batch(payloads, conds, {0: msg_id} if msg_id else {})
            return AppendResult(seqs)
        except (TimeoutError, nats.errors.Error) as exc:
            err = _translate(exc, conds)
            dup_batch = (
                isinstance(exc, nats.js.errors.APIError)
                and exc.err_code == ERR_BATCH_DUPLICATE_MSG_ID
            )
        if msg_id and (dup_batch or isinstance(err, ConcurrencyConflict)):
            # A batch whose id the broker knows is refused whole; a stale
            # condition is checked before the id, so a retry of an append
            # that landed is refused as stale. Either may be a retry.
            first = await self.find_append(msg_id, payloads[0][0])
            if first:
                return AppendResult([r.seq for r in first], True)
        raise err

    async def append_group(
        self, requests: Sequence[AppendRequest], *, one_by_one: bool = True
    ) -> list[AppendResult | Exception]:
        """Append several independent requests, as one atomic batch if possible.

        Concurrent commands pay one broker round trip and one disk sync per
        batch instead of one each. A batch is all or nothing, so if any
        member is refused (a stale condition, a retried command id) the
        requests are appended one by one instead, each getting its own
        result or error. Each request's result is what ``append`` would give.

        With ``one_by_one=False`` a refused batch is not retried: every
        request gets the batch's error, for a caller that can tell by itself
        which members were stale and send the rest again as one batch.
        """
        if sum(len(r.events) for r in requests) > MAX_BATCH:
            return await self._each(requests)
        if len(requests) == 1 and one_by_one:
            return await self._each(requests)
        payloads: list[tuple[str, bytes]] = []
        conds: dict[int, Condition] = {}
        msg_ids: dict[int, str] = {}
        spans: list[tuple[int, int]] = []
        try:
            for r in requests:
                p, c = self._prepare(r.events, r.condition)
                base = len(payloads)
                conds.update({base + i: cond for i, cond in c.items()})
                if r.msg_id:
                    msg_ids[base] = r.msg_id
                payloads.extend(p)
                spans.append((base, len(p)))
            seqs = await self._publish_batch(payloads, conds, msg_ids)
        except (StratusError, TimeoutError, nats.errors.Error) as exc:
            if not one_by_one:
                err = exc if isinstance(exc, StratusError) else _translate(exc, conds)
                return [err] * len(requests)
            # Including a timeout: if the batch did land, each retry below
            # finds its own command id and reports a duplicate.
            return await self._each(requests)
        return [AppendResult(seqs[b : b + n]) for b, n in spans]

    async def _each(self, requests: Sequence[AppendRequest]) -> list[AppendResult | Exception]:
        async def one(r: AppendRequest) -> AppendResult | Exception:
            try:
                return await self.append(r.events, r.condition, msg_id=r.msg_id)
            except StratusError as err:
                return err

        return list(await asyncio.gather(*(one(r) for r in requests)))

    @staticmethod
    def _headers(cond: Condition | None, subject: str) -> dict[str, str]:
        if cond is None:
            return {}
        h = {H_EXPECT_SEQ: str(cond.last_seq)}
        if cond.subject != subject:
            h[H_EXPECT_SUBJECT] = cond.subject
        return h

    async def _publish_one(
        self, payload: tuple[str, bytes], cond: Condition | None, msg_id: str | None
    ) -> AppendResult:
        subject, data = payload
        headers = self._headers(cond, subject)
        if msg_id:
            headers[H_MSG_ID] = msg_id
        ack = await self.js.publish(subject, data, headers=headers or None)
        if ack.duplicate:
            # The original append may have been a batch: all of its seqs.
            return AppendResult([r.seq for r in await self._append_at(ack.seq)], True)
        return AppendResult([ack.seq])

    async def _publish_batch(
        self,
        payloads: list[tuple[str, bytes]],
        conds: dict[int, Condition],
        msg_ids: dict[int, str],
    ) -> list[int]:
        """One atomic batch; returns its (contiguous) sequence numbers."""
        batch_id = uuid.uuid4().hex
        n = len(payloads)
        for i, (subject, data) in enumerate(payloads[:-1]):
            headers = self._headers(conds.get(i), subject)
            headers[H_BATCH_ID] = batch_id
            headers[H_BATCH_SEQ] = str(i + 1)
            if i in msg_ids:
                headers[H_MSG_ID] = msg_ids[i]
            await self.nc.publish(subject, data, headers=headers)
        subject, data = payloads[-1]
        headers = self._headers(conds.get(n - 1), subject)
        headers[H_BATCH_ID] = batch_id
        headers[H_BATCH_SEQ] = str(n)
        headers[H_BATCH_COMMIT] = "1"
        if n - 1 in msg_ids:
            headers[H_MSG_ID] = msg_ids[n - 1]
        ack = await self.js.publish(subject, data, headers=headers)
        return list(range(ack.seq - n + 1, ack.seq + 1))

    async def find_append(self, msg_id: str, subject: str = LOOKUP_SUBJECT) -> list[Recorded]:
        """The events of the append that carried ``msg_id`` (a command id),
        with their headers, or [] if the broker does not know it.

        The broker's own memory answers, the one that deduplicates: every
        id stored within the duplicate window (``DUPLICATE_WINDOW_S``),
        across restarts of the broker and of every client, and nothing
        older. It is asked with a publish that can never be stored (it
        expects the stream's last message to carry an id no append uses):
        a known id is answered as a duplicate with the sequence of the
        message that carried it, an unknown one is refused. ``subject`` is
        where that publish goes (the caller must be allowed to publish
        there; nothing lands).
        """
        headers = {H_MSG_ID: msg_id, H_EXPECT_LAST_MSG_ID: _NO_MSG_ID}
        try:
            ack = await self.js.publish(subject, b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == ERR_WRONG_LAST_MSG_ID:
                return []
            raise _translate(exc) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise _translate(exc) from None
        if not ack.duplicate:
            raise Internal(f"a lookup of command {msg_id} was stored at {ack.seq}")
        return await self._append_at(ack.seq)

    async def _append_at(self, first: int) -> list[Recorded]:
        """The events of the append whose first message is at ``first``.

        One event, or the members of one atomic batch (stored contiguously)
        from ``first`` up to the next member that starts another request's
        append (it carries its own id: ``append_group``) or the batch's end.
        """
        out: list[Recorded] = []
        batch = None
        for seq in range(first, first + MAX_BATCH):
            try:
                msg = await self.js.get_msg(self.stream, seq, direct=True)
            except (TimeoutError, nats.errors.Error) as exc:
                raise _translate(exc) from None
            h = msg.headers or {}
            if seq == first:
                batch = h.get(H_BATCH_ID)
            elif h.get(H_BATCH_ID) != batch or H_MSG_ID in h:
                break
            out.append(Recorded(seq, msg.subject or "", 0, msg.data or b"", h))
            if batch is None or h.get(H_BATCH_COMMIT):
                break
        return out

    # -- read -----------------------------------------------------------------

    def read(
        self,
        after: int = 0,
        until: Until = None,
        subjects: Sequence[str] = (SUBJECTS,),
        *,
        batch: int = 1000,
        headers: bool = False,
    ) -> AsyncIterator[list[Recorded]]:
        """Stored events after ``after``, in order, as lists of at most ``batch``.

        Stops at ``until`` (a sequence, or a time: events stored after it are
        not returned), or at the end of the stream as it was when called.
        """
        return _Reader(self, after, until, subjects, batch, headers, follow=False).batches()

    def subscribe(
        self,
        after: int = 0,
        subjects: Sequence[str] = (SUBJECTS,),
        *,
        batch: int = 1000,
    ) -> AsyncIterator[list[Recorded]]:
        """Like ``read`` but never ends: after the backlog, new events as they land."""
        return _Reader(self, after, None, subjects, batch, False, follow=True).batches()

    async def read_all(self, after: int = 0, until: Until = None, **kw: Any) -> list[Recorded]:
        out: list[Recorded] = []
        async for b in self.read(after, until, **kw):
            out.extend(b)
        return out


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p = pattern.split(".")
    t = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(t) == len(p)


def _translate(exc: BaseException, conds: dict[int, Condition] | None = None) -> Exception:
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == ERR_WRONG_LAST_SEQUENCE:
        m = _LAST_SEQ_RE.search(exc.description or "")
        cond = next(iter(conds.values()), None) if conds else None
        return ConcurrencyConflict(
            f"expected last sequence {cond.last_seq if cond else '?'} on "
            f"{cond.subject if cond else '?'}: {exc.description}",
            expected=cond.last_seq if cond else -1,
            actual=int(m.group(1)) if m else None,
        )
    if isinstance(
        exc,
        nats.errors.TimeoutError
        | asyncio.TimeoutError
        | nats.errors.NoRespondersError
        | nats.js.errors.NoStreamResponseError
        | nats.errors.ConnectionClosedError
        | nats.errors.ConnectionDrainingError
        | nats.errors.StaleConnectionError
        | nats.js.errors.ServiceUnavailableError,
    ):
        return Unavailable(f"event store unavailable: {type(exc).__name__} {exc}".strip())
    if isinstance(exc, nats.js.errors.APIError):
        return Internal(f"event store refused: {exc.err_code} {exc.description}")
    return Unavailable(f"event store error: {type(exc).__name__}: {exc}")


class _Reader:
    """One ephemeral push consumer, read as batches of ``Recorded``."""

    HEARTBEAT_S = 2.0
    # Hold back flow-control replies while this many events wait unread.
    HIGH_WATER = 20_000

    def __init__(
        self,
        store: EventStore,
        after: int,
        until: Until,
        subjects: Sequence[str],
        batch: int,
        headers: bool,
        follow: bool,
    ) -> None:
        self.store = store
        self.next_seq = after + 1
        self.until_seq = until if isinstance(until, int) else None
        self.until_ns = int(until.timestamp() * 1e9) if isinstance(until, datetime) else None
        self.subjects = list(subjects)
        self.batch = batch
        self.headers = headers
        self.follow = follow
        self.buf: list[Recorded] = []
        self.fc_reply: str | None = None
        self.wake = asyncio.Event()
        self.expect_dseq = 1
        self.caught_up = False
        self.broken = False
        self.beat = False
        self.sub: Any = None
        self.consumer: str | None = None

    async def batches(self) -> AsyncIterator[list[Recorded]]:
        try:
            if not self.follow:
                end = await self.store.last_seq()
                if self.until_seq is None or self.until_seq > end:
                    self.until_seq = end
                if self.next_seq > self.until_seq:
                    return
            await self._start()
            while True:
                if self.broken:
                    await self._start()
                if not self.buf:
                    if self.caught_up and not self.follow:
                        return
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), self.HEARTBEAT_S * 3)
                    except TimeoutError:
                        if not self.beat:
                            self.broken = True  # consumer or connection lost
                        self.beat = False
                    continue
                out, self.buf = self.buf[: self.batch], self.buf[self.batch :]
                if len(self.buf) < self.HIGH_WATER and self.fc_reply:
                    await self.store.nc.publish(self.fc_reply)
                    self.fc_reply = None
                done = False
                if self.until_seq is not None and out[-1].seq >= self.until_seq:
                    out = [r for r in out if r.seq <= self.until_seq]
                    done = True
                if self.until_ns is not None and out[-1].ts_ns > self.until_ns:
                    out = [r for r in out if r.ts_ns <= self.until_ns]
                    done = True
                if out:
                    yield out
                if done:
                    return
        finally:
            await self._stop()

    async def _start(self) -> None:
        await self._stop()
        self.broken = False
        self.caught_up = False
        self.expect_dseq = 1
        nc = self.store.nc
        inbox = nc.new_inbox()
        if isinstance(nc, _Connection):
            self.sub = await nc.subscribe(inbox)
            nc.direct[self.sub._id] = self._on_raw
            nc.fast[self.sub._id] = self._on_data
        else:
            self.sub = await nc.subscribe(
                inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
        cfg: dict[str, Any] = {
            "ack_policy": "none",
            "deliver_subject": inbox,
            "flow_control": True,
            "idle_heartbeat": int(self.HEARTBEAT_S * 1e9),
            "inactive_threshold": int(30 * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "replay_policy": "instant",
            "headers_only": False,
        }
        if self.next_seq <= 1:
            cfg["deliver_policy"] = "all"
        else:
            cfg["deliver_policy"] = "by_start_sequence"
            cfg["opt_start_seq"] = self.next_seq
        if len(self.subjects) == 1:
            cfg["filter_subject"] = self.subjects[0]
        else:
            cfg["filter_subjects"] = self.subjects
        req = json.dumps({"stream_name": self.store.stream, "config": cfg}).encode()
        try:
            resp = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{self.store.stream}", req, timeout=self.store.timeout
            )
        except (TimeoutError, nats.errors.Error) as exc:
            await self._stop()
            raise _translate(exc) from None
        info = json.loads(resp.data)
        if "error" in info:
            await self._stop()
            err = info["error"]
            raise _translate(
                nats.js.errors.APIError(
                    code=err.get("code"),
                    err_code=err.get("err_code"),
                    description=err.get("description"),
                )
            )
        self.consumer = info["name"]
        # Messages may arrive before this reply: never undo what they said.
        if info.get("num_pending", 0) == 0:
            self.caught_up = True

    async def _stop(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            if isinstance(self.store.nc, _Connection):
                self.store.nc.direct.pop(sub._id, None)
                self.store.nc.fast.pop(sub._id, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        name, self.consumer = self.consumer, None
        if name is not None and self.store.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.store.nc.publish(
                    f"$JS.API.CONSUMER.DELETE.{self.store.stream}.{name}", b""
                )

    async def _on_msg(self, msg: Msg) -> None:
        # The portable path, for connections not made by ``connect_nats``.
        hdr = msg.headers or {}
        status = hdr.get("Status")
        if status:
            await self._on_status(status.encode(), msg.reply.encode() if msg.reply else b"")
            return
        await self._on_event(
            msg.subject.encode(), msg.reply.encode(), msg.data, hdr if self.headers else None
        )

    async def _on_raw(
        self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        # The fast path (see ``_Connection``): raw protocol fields, headers
        # parsed only when asked for.
        if headers and headers[8:9] == b" ":  # "NATS/1.0 100 ...": a status
            await self._on_status(headers[9:12], reply)
            return
        parsed = None
        if self.headers and headers:
            parsed = _Connection._parse_header_lines(headers[10:])
        await self._on_event(subject, reply, data, parsed)

    def _on_data(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        # The shortest path (``_FastParser``): a stored event, never a status.
        parsed = None
        if self.headers and headers:
            parsed = _Connection._parse_header_lines(headers[10:])
        self._event(subject, reply, data, parsed)

    async def _on_status(self, status: bytes, reply: bytes) -> None:
        if status == b"100":
            self.beat = True
            if reply:  # a flow-control request: answer once drained
                if len(self.buf) < self.HIGH_WATER:
                    await self.store.nc.publish(reply.decode())
                else:
                    self.fc_reply = reply.decode()
        elif status in (b"409", b"404", b"408"):
            self.broken = True  # consumer deleted or gone: start a new one
        self.wake.set()

    async def _on_event(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        self._event(subject, reply, data, headers)

    def _event(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        if self.broken or not reply.startswith(b"$JS.ACK."):
            return
        t = reply.split(b".")
        if len(t) == 9:
            sseq, dseq, ts, pending = t[5], t[6], t[7], t[8]
        else:
            # with a domain and account hash (and maybe a final random token)
            sseq, dseq, ts, pending = t[7], t[8], t[9], t[10]
        d = int(dseq)
        if d != self.expect_dseq:
            # A gap: the server dropped something for us. Restart after the
            # last event we hold so nothing is skipped or doubled.
            self.broken = True
            self.wake.set()
            return
        self.expect_dseq = d + 1
        seq = int(sseq)
        self.next_seq = seq + 1
        self.buf.append(Recorded(seq, subject.decode(), int(ts), data, headers))
        if pending == b"0":
            self.caught_up = True
        self.beat = True
        self.wake.set()
