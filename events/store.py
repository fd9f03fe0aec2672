"""The event-store client: ``append``, ``read`` and ``subscribe`` on JetStream.

Everything that touches the ``EVENTS`` stream goes through here, and every
broker failure leaves as a Stratus error (``ConcurrencyConflict``,
``Unavailable``, ...), never as a nats-py exception.

Reads go through a ``LogReader`` (``events/reader.py``): the fast one of
``events/fastread.py`` on connections ``connect_nats`` made when its hooks
fit the installed nats-py, else nats-py's public ordered consumer. This
module itself uses nats-py's public API only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from stratus.events import heartbeat
from stratus.events.catalog import CODEC
from stratus.events.cluster import CLUSTER_REPLICAS, placement_refused, server_list
from stratus.events.commands import SERVICE_INBOX_PREFIX
from stratus.events.errors import (
    ConcurrencyConflict,
    Internal,
    Invalid,
    StratusError,
    Unavailable,
)
from stratus.events.model import Codec, Event
from stratus.events.natscreds import ServiceCreds
from stratus.events.reader import (
    SUBJECTS,
    ConsumerNames,
    LogReader,
    NamedReader,
    OrderedReader,
    Recorded,
    Until,
    broker_error,
)

STREAM = "EVENTS"
MAX_BATCH = 1000
# A retried command must land inside the window to be recognised as a retry.
DUPLICATE_WINDOW_S = 15 * 60

ERR_WRONG_LAST_SEQUENCE = 10071
# The same refusal without the subject's sequence: a replicated stream's
# leader says it while another write to the subject is still being proposed.
ERR_WRONG_LAST_SEQUENCE_CONST = 10164
WRONG_LAST_SEQUENCE = (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_CONST)
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
# ... and on a replicated stream, what it expects the subject's last
# sequence to be: beyond any stream's.
_NO_SEQ = str(2**62)
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


async def _quiet(exc: Exception) -> None:
    # nats-py reports every failed (re)connect attempt here; callers see the
    # outcome as Unavailable, so the noise is not printed.
    return None


def _new_connection(fast: bool) -> NATS:
    """The fast reader's connection when its hooks fit the installed
    nats-py, else nats-py's own client (read through ``OrderedReader``)."""
    if not fast:
        return NATS()
    try:
        from stratus.events import fastread
    except Exception as exc:  # a nats-py whose internals moved away
        reason: str | None = f"it cannot be loaded ({type(exc).__name__}: {exc})"
    else:
        reason = fastread.unsupported()
        if reason is None:
            return fastread.FastConnection()
    warnings.warn(
        f"the fast log reader is off, reads use nats-py's ordered consumer: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return NATS()


async def connect_nats(
    url: str | Sequence[str],
    *,
    persistent: bool = True,
    timeout: float = 10.0,
    fast: bool = True,
    **options: Any,
) -> NATS:
    """Connect to NATS, failing with ``Unavailable`` within ``timeout``.

    ``url`` names one server or several (``nats://a:4222,nats://b:4222``):
    the connection takes the whole list, and a persistent one (services)
    reconnects across it forever once up; a one-shot one (the CLI) tries
    each server and gives up when none answers. ``fast=False``
    asks for nats-py's own client even where the fast reader would work.
    """
    servers = server_list(url)
    nc = _new_connection(fast)
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
        await asyncio.wait_for(nc.connect(servers, **opts), timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise Unavailable(
            f"cannot reach NATS at {','.join(servers)}: {exc or type(exc).__name__}"
        ) from None
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
        reader: type[LogReader] | None = None,
        consumer_names: Sequence[str] | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=timeout)
        self.codec = codec
        self.stream = stream
        self.timeout = timeout
        # Reads through consumers of these names only (a host agent's
        # credential may use no others); None: any name.
        self.consumer_names = ConsumerNames(consumer_names) if consumer_names else None
        # The fast reader's connection names its reader; any other reads
        # through nats-py's public ordered consumer, or, where the consumers
        # must have given names, through the public named reader.
        self.reader: type[LogReader] = reader or getattr(nc, "log_reader", OrderedReader)
        if self.consumer_names is not None and self.reader is OrderedReader:
            self.reader = NamedReader

        # The stream's replica count (None: not learnt yet; ``ensure_stream``
        # or the first read that depends on it learns it). On a replicated
        # stream every replica answers a direct get, a follower with what it
        # has applied so far: a handler could then miss the event an append
        # just acknowledged (a tenant created a moment ago "not found"), so
        # reads that must be fresh ask the leader there. And the broker
        # checks a publish's expectations in another order (see
        # ``find_append``).
        self.replicas: int | None = None

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str],
        *,
        persistent: bool = True,
        fast: bool = True,
        creds: ServiceCreds | None = None,
        **options: Any,
    ) -> EventStore:
        """A store on a new connection; with ``creds``, as that service (the
        auth callout admits it by its token, ``events.natscreds``)."""
        names = None
        if creds is not None:
            options = {**creds.connect_options(), **options}
            names = creds.reader_names()
        # A service's inboxes (acks, event deliveries) live outside the
        # namespace clients may subscribe to.
        options.setdefault("inbox_prefix", SERVICE_INBOX_PREFIX)
        nc = await connect_nats(url, persistent=persistent, fast=fast, **options)
        return cls(nc, consumer_names=names)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    # -- stream ---------------------------------------------------------------

    def stream_config(self, replicas: int = 1) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            num_replicas=replicas,
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

    async def ensure_stream(self, replicas: int | None = None) -> int:
        """Create the stream, or bring an existing one to our settings; the
        replica count it has.

        A new stream gets ``replicas``, else as many as the cluster allows
        (``events.cluster``: R3 on three or more nodes, R1 on one); an
        existing one keeps its count unless ``replicas`` names another, so a
        service started with no opinion never shrinks a replicated log.

        The heartbeat bucket is made beside it: agents beat into it, and may
        not make it themselves.
        """
        try:
            try:
                info = await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                have = await self._create_stream(replicas)
            else:
                have = replicas or info.config.num_replicas or 1
                await self.js.update_stream(self.stream_config(have))
                self.replicas = have
            await heartbeat.bucket(self.js)
            return have
        except (TimeoutError, nats.errors.Error) as exc:
            raise _translate(exc) from None

    async def _create_stream(self, replicas: int | None) -> int:
        want = replicas or CLUSTER_REPLICAS
        try:
            await self.js.add_stream(self.stream_config(want))
            self.replicas = want
            return want
        except nats.js.errors.APIError as exc:
            why = placement_refused(exc)
            if replicas is None and why == "single":
                # One node, not a cluster: one copy is all there can be.
                await self.js.add_stream(self.stream_config(1))
                self.replicas = 1
                return 1
            if why == "peers":
                raise Unavailable(
                    f"cannot place {want} replicas of stream {self.stream}: fewer JetStream "
                    f"nodes are up ({exc.description}); start every node of the cluster, "
                    "or create the stream with 1 replica on a cluster of fewer than 3"
                ) from None
            raise

    async def last_seq(self, subject: str | None = None) -> int:
        """The stream's last sequence, or the last one matching ``subject``."""
        try:
            if subject is None or subject == SUBJECTS:
                info = await self.js.stream_info(self.stream)
                return info.state.last_seq
            direct = await self._single()
            msg = await self.js.get_last_msg(self.stream, subject, direct=direct)
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

    async def _single(self) -> bool:
        """Whether the stream keeps one copy (learnt once per connection)."""
        if self.replicas is None:
            try:
                info = await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                return True  # nothing to read yet; learnt again next time
            except (TimeoutError, nats.errors.Error) as exc:
                raise _translate(exc) from None
            self.replicas = info.config.num_replicas or 1
        return self.replicas == 1

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
        try:
            if await self._single():
                headers = {H_MSG_ID: msg_id, H_EXPECT_LAST_MSG_ID: _NO_MSG_ID}
            else:
                # A replicated stream's leader checks the id first and a
                # subject's last sequence before proposing, but leaves the
                # last message id to every replica at apply time, where a
                # mismatch is a critical write error that stalls the stream
                # (seen with nats-server 2.15). So there: expect a last
                # sequence no subject ever has. (A single server checks the
                # expectations before the id: there the last id it is.)
                headers = {H_MSG_ID: msg_id, H_EXPECT_SEQ: _NO_SEQ}
            ack = await self.js.publish(subject, b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in (ERR_WRONG_LAST_MSG_ID, *WRONG_LAST_SEQUENCE):
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
        direct = await self._single()
        for seq in range(first, first + MAX_BATCH):
            try:
                msg = await self.js.get_msg(self.stream, seq, direct=direct)
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
        return self.reader(self, after, until, subjects, batch=batch, headers=headers).batches()

    def subscribe(
        self,
        after: int = 0,
        subjects: Sequence[str] = (SUBJECTS,),
        *,
        batch: int = 1000,
    ) -> AsyncIterator[list[Recorded]]:
        """Like ``read`` but never ends: after the backlog, new events as they land."""
        return self.reader(self, after, None, subjects, batch=batch, follow=True).batches()

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
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code in WRONG_LAST_SEQUENCE:
        m = _LAST_SEQ_RE.search(exc.description or "")
        cond = next(iter(conds.values()), None) if conds else None
        return ConcurrencyConflict(
            f"expected last sequence {cond.last_seq if cond else '?'} on "
            f"{cond.subject if cond else '?'}: {exc.description}",
            expected=cond.last_seq if cond else -1,
            actual=int(m.group(1)) if m else None,
        )
    return broker_error(exc)
