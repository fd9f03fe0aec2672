"""The scheduler service: places requested servers on hosts, event-driven.

Host state is the fold of the hosts' subjects (``HostTable``), read at start
and kept current by an ordered subscription; liveness comes from the
heartbeat bucket. Work arrives on a durable pull consumer of
``ev.*.server.*`` that every replica shares, so each server event goes to
one replica.

A placement is claimed by one atomic batch: ``host.claimed`` on the host's
subject, on the condition that nothing was appended there since the host
state the decision used, plus ``server.scheduled`` on the server's subject,
on the condition that the server is still as it was requested. If another
replica claimed that host first, the batch is refused; this replica waits
until its table has folded what it missed and decides again (bounded).
Concurrent decisions go to the log together (one batch, one disk sync).

Work is taken as it is ready (``events.pull.Puller``: never waiting to
fill a batch) and up to ``PIPELINE`` rounds are in flight, so a batch is
decided while the previous one's append is on its way; the hosts a round
claims are held until the claims are in the table. A sampled round walks
from this replica's lane (``lanes``), away from other replicas' latest
claims, so concurrent replicas rarely refuse each other's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import nats.errors
import numpy as np
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.events.catalog import CODEC
from stratus.events.errors import ConcurrencyConflict, StratusError
from stratus.events.heartbeat import Liveness
from stratus.events.model import Cause, Event, UnknownEvent
from stratus.events.pull import Puller
from stratus.events.resources import (
    SYSTEM,
    ServerBuilding,
    ServerDeleted,
    ServerFailed,
    ServerRequested,
    ServerScheduled,
)
from stratus.events.scheduling import (
    HostClaimed,
    HostReleased,
    ServerBuildFailed,
    ServerBuildTimeout,
)
from stratus.events.store import AppendRequest, AppendResult, Condition, EventStore
from stratus.handlers.scheduler.decide import (
    Busy,
    Decider,
    NoValidHost,
    Outcome,
    Placed,
    SchedulerConfig,
    feasible_to_find,
)
from stratus.handlers.scheduler.filters import Request
from stratus.handlers.scheduler.lanes import Lane
from stratus.handlers.scheduler.phases import Phases
from stratus.handlers.scheduler.table import SUBJECTS, HostTable

log = structlog.get_logger("stratus.scheduler")

ACTOR = "scheduler"
DURABLE = "scheduler"
WORK_SUBJECT = "ev.*.server.*"
# A claim in flight has no sequence yet: its host waits until it lands.
IN_FLIGHT = 1 << 62
MAX_ROUNDS = 16
FETCH = 256
# Allocations between young garbage collections in a serving replica.
GC_YOUNG = 20_000
# Rounds in flight at once per replica: deciding the next batch overlaps the
# last one's append.
PIPELINE = 3


async def fold_log(
    store: EventStore, subjects: Sequence[str], fold: Callable[[int, Any], None]
) -> int:
    """Fold every record on ``subjects`` now on the log (``fold(seq,
    record)``); returns the sequence it read to, where following starts."""
    end = await store.last_seq()
    async for batch in store.read(0, end, subjects=subjects):
        for rec in batch:
            fold(rec.seq, rec)
    return end


async def follow_log(
    store: EventStore,
    after: int,
    subjects: Sequence[str],
    fold: Callable[[int, Any], None],
    folded: Callable[[], None] | None = None,
) -> None:
    """Fold what comes on ``subjects`` after ``after``, for ever; ``folded``
    after each batch."""
    async for batch in store.subscribe(after, subjects=subjects):
        for rec in batch:
            fold(rec.seq, rec)
        if folded is not None:
            folded()


def host_subject(host: str) -> str:
    return f"ev.{SYSTEM}.host.{host}"


def request_of(e: ServerRequested, exclude: tuple[str, ...] = (), attempt: int = 1) -> Request:
    """The placement ``e`` asks for (``exclude``: hosts its build failed on)."""
    return Request(
        server=e.aggregate.id, tenant=e.tenant, spec=e.spec, exclude=exclude, attempt=attempt
    )


def claim_event(cause: Cause, host: str, r: Request) -> HostClaimed:
    """The claim of ``r`` on ``host``: its spec, whole, for the host's agent."""
    return cause.make(
        HostClaimed,
        SYSTEM,
        "host",
        host,
        server=r.server,
        server_tenant=r.tenant,
        spec=r.spec,
        attempt=r.attempt,
    )


class Job(msgspec.Struct):
    """One server to place: the work message, what it asks, what it waits on."""

    msg: Any
    request: Request
    cause: Cause
    # The server subject's last sequence the decision is conditioned on.
    server_seq: int
    # A retry gives back the failed host's claim in the same batch.
    release: str = ""
    # Retries exhausted: fail with this reason instead of placing.
    give_up: str = ""


class Sent(msgspec.Struct):
    job: Job
    out: Any
    req: AppendRequest
    # The claimed host's row and the host sequence the claim is conditioned on.
    row: int
    expected: int


class HostMoved(ConcurrencyConflict):
    """Another replica claimed the chosen host first: decide again."""


class SchedulerService:
    def __init__(
        self,
        store: EventStore,
        config: SchedulerConfig | None = None,
        *,
        durable: str = DURABLE,
        liveness: bool | None = None,
    ) -> None:
        self.store = store
        self.decider = Decider(config)
        self.config = self.decider.config
        self.durable = durable
        self.use_liveness = "HostAlive" in self.config.filters if liveness is None else liveness
        self.table = HostTable()
        self.liveness: Liveness | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Rounds of fetched work under way (see ``_work``).
        self._rounds: set[asyncio.Task[None]] = set()
        # What each of them holds: its fetched messages, then its jobs.
        self._holding: dict[asyncio.Task[None], int] = {}
        self._puller: Puller | None = None
        self._folded = asyncio.Event()
        self._closing = False
        # The build timer: since when each host row has been seen dead, and
        # the claim (by sequence) of each server its host got to.
        self._dead_since: dict[int, float] = {}
        self._built: dict[str, int] = {}
        # Counters for ``status`` and the benchmark.
        self.placed = self.failed = self.conflicts = self.rounds = 0
        self.phases = Phases()
        self.lane = Lane()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        end = await fold_log(self.store, SUBJECTS, self._fold)
        # What the process holds by now (about 100,000 objects, nearly all
        # from its imports; the host table adds few) lives as long as it
        # does: out of the collector's sight, a full collection walks only
        # what came after. Measured: each full collection a 50-150 ms stall
        # of every decision behind it, under 10 ms after. Once a process:
        # freezing again would pin whatever else lives by then (tests start
        # many replicas in one process).
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        # A young collection every 700 allocations (Python's default) was
        # about 170 collections and 30 ms of a replica's 3,000 placements;
        # the objects a placement makes die young or live on (claims), so
        # it frees little. One every GC_YOUNG: none in that run, 8-9 % less
        # CPU a placement.
        if gc.get_threshold()[0] < GC_YOUNG:
            gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        self.phases.watch_gc()
        self._tasks.append(
            asyncio.create_task(follow_log(self.store, end, SUBJECTS, self._fold, self._folded.set))
        )
        if self.use_liveness:
            self.liveness = Liveness(self.store.js, on_change=self.table.set_alive)
            await self.liveness.start()
        self._puller = Puller(self.store.js, self.store.nc, self.store.stream, self.durable)
        await self._puller.start(
            ConsumerConfig(
                durable_name=self.durable,
                filter_subject=WORK_SUBJECT,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
                max_ack_pending=20_000,
            )
        )
        await self._resume()
        # Costs from here on are the serving replica's: not the start's fold
        # of every host, nor the watch of every host's heartbeat (at 10,000
        # hosts about 0.35 s of CPU, which the benchmark's 1,500 placements a
        # replica used to carry as 200 us each).
        self.phases.serving()
        self._tasks.append(asyncio.create_task(self._work()))
        if self.liveness is not None and self.config.build_timeout_s > 0:
            self._tasks.append(asyncio.create_task(self._timer()))
        log.info("scheduler started", hosts=len(self.table), folded=self.table.last_applied)

    async def stop(self) -> None:
        log.info("scheduler stopping", **self.stats(), phases=self.phases.report(self.placed))
        self.phases.unwatch_gc()
        self._closing = True
        tasks = [*self._tasks, *self._rounds]
        for t in tasks:
            t.cancel()
        # nats-py may turn a cancellation inside a request into its own
        # error; the loops then see ``_closing`` on their next turn.
        _, late = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        if late:
            log.warning("scheduler tasks still running at stop", tasks=len(late))
        self._tasks.clear()
        if self.liveness is not None:
            await self.liveness.stop()
        if self._puller is not None:
            await self._puller.stop()

    # -- host state ----------------------------------------------------------

    def _fold(self, seq: int, rec: Any) -> None:
        t0 = self.phases.mark()
        try:
            event = rec.decode()
        except UnknownEvent:
            log.warning("event not understood; host table skips it", seq=seq)
            return
        t = self.table
        t.apply(seq, event)
        row = t.index.get(event.aggregate.id) if isinstance(event, HostClaimed) else None
        if row is not None and t.hold[row] not in (IN_FLIGHT, seq):
            self.lane.foreign(row)  # another replica's claim (see ``lanes``)
        self.phases.add("fold", t0)

    async def _caught_up(self, timeout: float = 5.0) -> None:
        """Wait until the table holds everything now on the hosts' subjects."""
        target = await self.store.last_seq(SUBJECTS[0])
        deadline = time.monotonic() + timeout
        while self.table.last_applied < target and time.monotonic() < deadline:
            self._folded.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._folded.wait(), 0.05)

    # -- work ------------------------------------------------------------------

    async def _work(self) -> None:
        """Fetch, and hand each batch to a round of its own: up to
        ``PIPELINE`` rounds at once, so the next batch is decided while the
        last one's claims are on their way to the log (a host with a claim
        of ours in flight is held, so rounds never claim one host twice).

        The rounds in flight hold at most ``FETCH`` pieces of work together,
        as one unpipelined round did: one replica's thread decides no
        faster for holding more, and work it holds is work another replica,
        idle, cannot take. A message that is no work (a ``server.scheduled``
        the consumer brings along: as many as the requests) is settled as
        soon as the round has read it and holds nothing after (``_handle``):
        counted until its round ended, it took half the bound."""
        running = self._rounds
        holding = self._holding
        puller = self._puller
        assert puller is not None
        while not self._closing:
            room = FETCH - sum(holding.values())
            if len(running) >= PIPELINE or room <= 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            t0 = self.phases.mark()
            try:
                msgs = await puller.fetch(room, timeout=1)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("fetch failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            # (Only fetches that brought work: an idle wait is not a cost.)
            self.phases.add("fetch", t0)
            task = asyncio.create_task(self._settle(msgs))
            running.add(task)
            holding[task] = len(msgs)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda done: holding.pop(done, None))

    async def _settle(self, msgs: list[Any]) -> None:
        try:
            await self.handle(msgs)
        except Exception:
            # A bug, not a refusal: leave the messages to be redelivered.
            log.exception("scheduler round failed")

    async def handle(self, msgs: list[Any]) -> None:
        """One fetched batch of work messages."""
        await self._handle([(m.metadata.sequence.stream, m.data, m) for m in msgs])

    async def _handle(self, items: list[tuple[int, bytes, Any]]) -> None:
        """Work events (sequence, bytes, and the message to settle, or None
        for one read from the log rather than delivered)."""
        jobs: list[Job] = []
        for seq, data, m in items:
            t0 = self.phases.mark()
            try:
                event = CODEC.decode(data)
            except UnknownEvent:
                log.warning("work event not understood; skipped", seq=seq)
                await _ack(m)
                continue
            job: Job | None = None
            if isinstance(event, ServerRequested):
                if event.spec.framework or event.aggregate.id in self.table.claims:
                    # (A framework's task is placed by accepting an offer.)
                    await _ack(m)  # placed long ago (a consumer starting over the log)
                    continue
                job = Job(m, request_of(event), _cause(event), seq)
                self.phases.add("decode", t0)
            elif isinstance(event, ServerBuildFailed):
                job = await self._retry(m, seq, event)
            elif isinstance(event, ServerDeleted):
                await self._release_deleted(event)
            if job is None:
                await _ack(m)
            else:
                jobs.append(job)
        task = asyncio.current_task()
        if task in self._holding:
            self._holding[task] = len(jobs)  # the rest is settled
        if jobs:
            await self.place(jobs)

    async def _resume(self) -> None:
        """Work a replica fetched and never acknowledged (it was killed, say)
        is redelivered only after the consumer's ack_wait. A starting
        replica reads that span of the log itself and decides it now: a
        decision that another replica already made is refused by its
        condition on the server's subject, so nothing is placed twice."""
        info = await self.store.js.consumer_info(self.store.stream, self.durable)
        if not info.num_ack_pending:
            return
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        last = info.delivered.stream_seq if info.delivered else 0
        if last <= floor:
            return
        recs = await self.store.read_all(floor, last, subjects=[WORK_SUBJECT])
        log.info("resuming unacknowledged work", events=len(recs), after=floor, upto=last)
        await self._handle([(r.seq, r.data, None) for r in recs])

    async def place(self, jobs: list[Job]) -> None:
        pending = jobs
        for _ in range(MAX_ROUNDS):
            if not pending:
                return
            self.rounds += 1
            pending = await self._round(pending)
        for job in pending:
            # Still contended after every round: let the consumer bring it back.
            if job.msg is not None:
                with contextlib.suppress(Exception):
                    await job.msg.nak(delay=1)

    async def _round(self, jobs: list[Job]) -> list[Job]:
        t = self.table
        later: list[Job] = []
        sent: list[Sent] = []
        t0 = self.phases.mark()
        # One start for the round, in this replica's lane (see ``lanes``);
        # a decision that scores every host walks them all from row 0.
        n = len(t)
        total = int(np.count_nonzero(t.col("exists")))
        want = feasible_to_find(total, self.config.hosts_to_score_pct)
        salt = jobs[0].request.server if jobs else ""
        start = (
            self.lane.start(
                n, min(n // 2, 2 * want + len(jobs)), lambda: self.decider.first_row(t, salt)
            )
            if want < total
            else 0
        )
        placed_rows: list[int] = []
        # Nothing is folded until the round's appends are sent: its
        # decisions share their filtering and weighing by request key.
        memo: dict = {}
        for job in jobs:
            out: Outcome
            if job.give_up:
                out = NoValidHost(job.give_up, {"attempt": job.request.attempt})
            else:
                out = self.decider.decide(t, job.request, start=start, memo=memo)
            if isinstance(out, Busy):
                later.append(job)
                continue
            row, expected = -1, 0
            if isinstance(out, Placed):
                row, expected = out.row, int(t.last_seq[out.row])
                t.hold[row] = IN_FLIGHT
                placed_rows.append(row)
            sent.append(Sent(job, out, self._append_request(job, out, expected), row, expected))
        self.lane.placed(start, placed_rows, n)
        self.phases.add("decide", t0)
        results = await self._append(sent)
        t0 = self.phases.mark()
        unsure: list[Job] = []
        for s, res in zip(sent, results, strict=True):
            job = s.job
            if isinstance(res, AppendResult):
                if s.row >= 0:
                    # Free again once the table has folded our own claim.
                    t.hold[s.row] = res.seqs[1 if job.release else 0]
                    self.placed += 1
                else:
                    self.failed += 1
                await _ack(job.msg)
                continue
            if s.row >= 0:
                t.hold[s.row] = 0
            if isinstance(res, HostMoved) or (
                isinstance(res, ConcurrencyConflict)
                and s.row >= 0
                and t.last_seq[s.row] != s.expected
            ):
                self.conflicts += 1
                later.append(job)
            elif isinstance(res, ConcurrencyConflict):
                self.conflicts += 1
                unsure.append(job)
            else:
                log.warning("placement not appended", server=job.request.server, error=str(res))
                later.append(job)
        if unsure:
            # Refused, and not (as far as the table knows yet) for its host:
            # has the server moved on? Asked all at once, not one after
            # another (a batch sent one by one after three refusals once had
            # 105 of these, 0.4 s asked in turn).
            lasts = await asyncio.gather(
                *(
                    self.store.last_seq(f"ev.{j.request.tenant}.server.{j.request.server}")
                    for j in unsure
                ),
                return_exceptions=True,
            )
            for job, last in zip(unsure, lasts, strict=True):
                if isinstance(last, int) and last != job.server_seq:
                    # The server moved on (deleted, or placed by another replica).
                    await _ack(job.msg)
                else:
                    later.append(job)
        self.phases.add("ack", t0)
        if later and len(later) == len(jobs):
            # Nothing landed: give claims in flight (ours or a replica's) a
            # moment to reach the table before deciding again.
            with self.phases.timed("conflict"):
                self._folded.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._folded.wait(), 0.05)
        return later

    async def _append(self, sent: list[Sent]) -> list[AppendResult | Exception]:
        """The round's appends as one atomic batch. If a replica claimed one
        of its hosts first, the whole batch is refused: the table, once it
        has folded that claim, tells which members were stale, and the rest
        go again as one batch (one disk sync) rather than one by one."""
        results: list[AppendResult | Exception | None] = [None] * len(sent)
        todo = list(range(len(sent)))
        for _ in range(3):
            if not todo:
                break
            self.phases.count("batches")
            with self.phases.timed("append"):
                got = await self.store.append_group([sent[i].req for i in todo], one_by_one=False)
            if not any(isinstance(r, Exception) for r in got):
                for i, r in zip(todo, got, strict=True):
                    results[i] = r
                todo = []
                break
            err = next(r for r in got if isinstance(r, Exception))
            self.phases.count("refused")
            if not isinstance(err, ConcurrencyConflict):
                log.warning("placement batch refused", error=str(err))
                break
            with self.phases.timed("conflict"):
                await self._caught_up()
            stale = {
                i
                for i in todo
                if sent[i].row >= 0 and self.table.last_seq[sent[i].row] != sent[i].expected
            }
            if not stale:
                # A server subject moved: only one by one can tell which.
                log.info("placement batch refused, no host moved", error=str(err))
                break
            for i in stale:
                results[i] = HostMoved(str(err), sent[i].expected, None)
            todo = [i for i in todo if i not in stale]
        if todo:
            self.phases.count("one_by_one")
            with self.phases.timed("conflict"):
                got = await self.store.append_group([sent[i].req for i in todo])
            for i, r in zip(todo, got, strict=True):
                results[i] = r
        return [r if r is not None else HostMoved("not sent", 0, None) for r in results]

    def _append_request(self, job: Job, out: Outcome, expected: int) -> AppendRequest:
        r, cause = job.request, job.cause
        events: list[Event] = []
        conds: list[Condition] = []
        if job.release:
            events.append(
                cause.make(
                    HostReleased,
                    SYSTEM,
                    "host",
                    job.release,
                    server=r.server,
                    server_tenant=r.tenant,
                    reason="build failed",
                )
            )
        if isinstance(out, Placed):
            subject = host_subject(out.host)
            conds.append(Condition(subject, expected, len(events)))
            events.append(claim_event(cause, out.host, r))
            server_event: Event = cause.make(
                ServerScheduled,
                r.tenant,
                "server",
                r.server,
                host=out.host,
                scheduling=out.scheduling,
            )
        else:
            assert isinstance(out, NoValidHost)
            server_event = cause.make(
                ServerFailed,
                r.tenant,
                "server",
                r.server,
                reason=out.reason,
                scheduling=out.scheduling,
            )
        conds.append(Condition(server_event.subject, job.server_seq, len(events)))
        events.append(server_event)
        # No command id: the condition on the server subject already refuses a
        # second placement, and a message id would make every refusal look up
        # whether it was a duplicate.
        return AppendRequest(events, conds)

    # -- the build timer ---------------------------------------------------------

    async def _timer(self) -> None:
        period = min(5.0, max(0.2, self.config.build_timeout_s / 4))
        while not self._closing:
            await asyncio.sleep(period)
            try:
                await self.check_builds()
            except Exception:
                log.exception("build timer failed")

    async def check_builds(self, now: float | None = None) -> int:
        """``server.build-timeout`` for each server still scheduled or building
        on a host that has not beaten for ``build_timeout_s`` (as this
        replica saw it), that long after its last event. A live host's agent
        finishes or reports its own claims; a dead one's are placed elsewhere
        by the retry that follows. Returns how many timed out."""
        now = time.time() if now is None else now
        limit = self.config.build_timeout_s
        t = self.table
        alive = t.col("alive_until") > now
        for row in range(len(t)):
            if alive[row]:
                self._dead_since.pop(row, None)
            else:
                self._dead_since.setdefault(row, now)
        timed_out = 0
        for server, claim in list(t.claims.items()):
            since = self._dead_since.get(claim.host)
            if since is None or now - since < limit or self._built.get(server) == claim.seq:
                continue
            host = t.names[claim.host]
            subject = f"ev.{claim.tenant}.server.{server}"
            try:
                msg = await self.store.js.get_last_msg(self.store.stream, subject, direct=True)
                last = CODEC.decode(msg.data)
            except (nats.errors.Error, TimeoutError, UnknownEvent) as exc:
                log.warning("build timer cannot read server", server=server, error=str(exc))
                continue
            waiting = isinstance(last, ServerScheduled | ServerBuilding)
            if not waiting or last.host != host:
                self._built[server] = claim.seq  # the host got to it: no timer
                continue
            if now - last.at.timestamp() < limit:
                continue
            cause = Cause(actor=ACTOR, correlation_id=last.correlation_id, causation_id=last.id)
            event = cause.make(
                ServerBuildTimeout,
                claim.tenant,
                "server",
                server,
                host=host,
                reason=f"host {host} stopped beating and built nothing for {limit:g}s",
                attempt=claim.attempt,
            )
            try:
                await self.store.append([event], Condition(subject, msg.seq or 0))
            except ConcurrencyConflict:
                continue  # the agent (or another replica) moved first
            timed_out += 1
            log.warning("build timed out", server=server, host=host)
        return timed_out

    # -- retries and releases --------------------------------------------------

    async def _history(self, tenant: str, server: str) -> list[Event]:
        recs = await self.store.read_all(subjects=[f"ev.{tenant}.server.{server}"])
        return [r.decode() for r in recs]

    async def _retry(self, msg: Any, seq: int, failed: ServerBuildFailed) -> Job | None:
        """After a build failure: a job that places the server elsewhere, or
        gives up once its attempts are spent (the failed host's claim is
        released in the same batch either way)."""
        history = await self._history(failed.tenant, failed.aggregate.id)
        requested = next((e for e in history if isinstance(e, ServerRequested)), None)
        if requested is None or any(isinstance(e, ServerDeleted) for e in history):
            return None
        failures = [e for e in history if isinstance(e, ServerBuildFailed)]
        if requested.spec.framework:
            # A framework's task is not placed again by the scheduler: its
            # claim is given back and the framework sees it failed.
            await self._caught_up()
            release = failed.host if self.table.host_of(failed.aggregate.id) == failed.host else ""
            job = Job(msg, request_of(requested), _cause(failed), seq, release=release)
            job.give_up = f"task build failed on {failed.host}: {failed.reason}"
            return job
        exclude = tuple(dict.fromkeys(e.host for e in failures))
        await self._caught_up()
        release = failed.host if self.table.host_of(failed.aggregate.id) == failed.host else ""
        job = Job(
            msg,
            request_of(requested, exclude, attempt=len(failures) + 1),
            _cause(failed),
            seq,
            release=release,
        )
        if len(failures) >= self.config.max_attempts:
            tried = "; ".join(f"{e.host}: {e.reason}" for e in failures)
            job.give_up = f"build failed {len(failures)} times ({tried})"
        return job

    async def _release_deleted(self, deleted: ServerDeleted) -> None:
        server = deleted.aggregate.id
        if server not in self.table.claims:
            # The claim precedes the deletion on the log: fold up to now first.
            await self._caught_up()
        claim = self.table.claims.get(server)
        if claim is None:
            return
        host = self.table.names[claim.host]
        event = _cause(deleted).make(
            HostReleased,
            SYSTEM,
            "host",
            host,
            server=server,
            server_tenant=deleted.tenant,
            reason="server deleted",
        )
        try:
            await self.store.append([event], msg_id=f"release-{server}-{claim.seq}")
        except StratusError as err:
            log.warning("release not appended", server=server, error=str(err))
            raise

    def stats(self) -> dict[str, int]:
        return {
            "hosts": int(self.table.col("exists").sum()),
            "placed": self.placed,
            "no_valid_host": self.failed,
            "conflicts": self.conflicts,
            "rounds": self.rounds,
            "lane_jumps": self.lane.jumps,
        }


def _cause(event: Event) -> Cause:
    return Cause(actor=ACTOR, correlation_id=event.correlation_id, causation_id=event.id)


async def _ack(msg: Any) -> None:
    """Settle a delivered work message (None: the event was read from the log)."""
    if msg is not None:
        await msg.ack()
