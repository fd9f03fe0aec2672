"""A bulk load's SQLite writes in a second process, beside the replay.

A rebuild is one Python process reading the log, decoding and folding each
event, and then binding and writing the rows, while the machine has (at
least) two cores. Here the replay stays in the caller, which sends the SQL
and the rows it folded (``RowBatch.statements``, the append-only views'
INSERTs) as frames over a pipe; ``python -m stratus.projections.writer``
executes them on its own SQLite connection, commits where the caller says,
builds the deferred indexes at the end and checkpoints the WAL into the file.
The replay then costs about the larger of the two halves instead of their sum.

The frames are msgpack (one C call each way), length-prefixed, of at most
``FRAME_ROWS`` rows, queued to a sending thread up to ``MAX_QUEUED_BYTES``:
the replay goes on while the writer works through a commit, and waits only
when the writer is that far behind.

Failure: a writer that dies makes the next send (or the end) raise
``Internal`` with its exit code and stderr; the caller removes the file. A
writer whose input ends before the end frame (its caller died) exits without
committing the open transaction, so no process is left behind replaying.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import struct
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from stratus.events.errors import Internal
from stratus.projections.sqlitefile import connect_existing

# As the in-process bulk writer (``db._bulk_setup``), with a quarter of its
# page cache: the rebuild's memory is now two processes' (their peaks
# summed must stay under 300 MB at 1M events), the cache also bounds what
# CREATE INDEX sorts in memory, and building the indexes of 1M events took
# no longer with 16 MiB than with 64.
CACHE_KIB = 16 * 1024
INDEX_CACHE_KIB = 2 * 1024
SORT_THREADS = 2
# A bigger pipe: a frame of 5,000 events' rows is a few hundred KiB, and the
# default 64 KiB pipe costs a context switch per 64 KiB.
PIPE_BYTES = 1 << 20
EXIT_TIMEOUT_S = 600.0
# Encoded frames waiting for the pipe, at most (the replay waits beyond).
MAX_QUEUED_BYTES = 4 << 20
# Parameter rows per frame, at most.
FRAME_ROWS = 5000
_STDERR_TAIL = 2000
_LEN = struct.Struct("<I")

Statement = tuple[str, list[Any], tuple[int, ...]]


def sqlite_datetime(value: datetime) -> str:
    """What SQLAlchemy's SQLite DATETIME stores ("2026-01-02 03:04:05.000006",
    offset ignored), by one C call instead of a Python format per value."""
    return value.isoformat(" ", "microseconds")[:26]


class Frame(msgspec.Struct, array_like=True):
    """Statements (SQL and its parameter rows) to run in the open transaction;
    then a commit, and with ``end`` the DDL to run after the last commit."""

    statements: list[tuple[str, list[list[Any]], list[int]]]
    commit: bool = False
    end: list[str] | None = None


class Written(msgspec.Struct, frozen=True):
    """What the writer answers when it is done."""

    statements: int
    rows: int
    seconds: float
    # Of ``seconds``: waiting for the next frame (the replay was slower), and
    # building the deferred indexes at the end.
    idle_seconds: float
    index_seconds: float
    cpu_seconds: float
    rss_mb: float


_enc = msgspec.msgpack.Encoder()


class WriterProcess:
    """The caller's side: start the writer, send it frames, wait for its end.

    Frames are queued to one sending thread, up to ``max_queued`` bytes: a
    frame that commits (the folded rows of ``commit_every`` events) keeps the
    writer busy for a while, and with a single frame in flight the replay
    stood still meanwhile, and the writer then waited for the replay.
    """

    def __init__(self, path: Path, *, max_queued: int = MAX_QUEUED_BYTES) -> None:
        self.path = Path(path)
        self.max_queued = max_queued
        self.proc: subprocess.Popen[bytes] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[asyncio.Future[None], int]] = deque()
        self._queued = 0
        self._fd = -1

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stratus.projections.writer", str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stratus-writer-pipe")

    async def write(self, statements: list[Statement], commit: bool = False) -> None:
        """Queue ``statements`` and, if ``commit``, a commit after them.

        Encoded now (the caller may reuse the rows when this returns), in
        frames of at most ``FRAME_ROWS`` rows, so that neither process
        holds a whole commit's rows decoded at once."""
        frame: list[Any] = []
        size = 0
        for sql, rows, dates in statements:
            for i in range(0, len(rows), FRAME_ROWS):
                part = rows[i : i + FRAME_ROWS]
                if size + len(part) > FRAME_ROWS and frame:
                    await self._send(_enc.encode(Frame(frame)))
                    frame, size = [], 0
                frame.append((sql, part, dates))
                size += len(part)
        await self._send(_enc.encode(Frame(frame, commit)))

    async def finish(self, ddl: list[str]) -> Written:
        """Commit, run ``ddl`` (the deferred indexes), and wait for the writer."""
        await self._send(_enc.encode(Frame([], True, ddl)))
        await self._drain()
        proc = self.proc
        assert proc is not None
        try:
            # (communicate closes the writer's input: its end of file.)
            out, err = await asyncio.to_thread(proc.communicate, None, EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Internal(f"the rebuild's writer took over {EXIT_TIMEOUT_S:.0f}s") from None
        finally:
            self._stop_pool()
        if proc.returncode != 0:
            raise self._died(err)
        try:
            return msgspec.json.decode(out.splitlines()[-1], type=Written)
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError):
            raise Internal(f"the rebuild's writer answered {out[-200:]!r}") from None

    def abort(self) -> None:
        """Stop the writer (what it has not committed is lost) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.returncode is None:
                proc.kill()  # a blocked send then fails with EPIPE and ends
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        self._stop_pool()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._queued = 0

    async def _send(self, blob: bytes) -> None:
        # Settle what was sent meanwhile, and wait while too much is queued.
        pending = self._pending
        while pending and (pending[0][0].done() or self._queued + len(blob) > self.max_queued):
            fut, n = pending.popleft()
            self._queued -= n
            await self._settle(fut)
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        pending.append((loop.run_in_executor(self._pool, self._write_all, blob), len(blob)))
        self._queued += len(blob)

    async def _drain(self) -> None:
        while self._pending:
            fut, n = self._pending.popleft()
            self._queued -= n
            await self._settle(fut)

    async def _settle(self, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except OSError:
            # EPIPE: the writer is gone. Its exit code and stderr say why.
            proc = self.proc
            assert proc is not None
            _, err = await asyncio.to_thread(proc.communicate, None, 10)
            raise self._died(err) from None

    def _write_all(self, blob: bytes) -> None:
        # In the sending thread: os.write releases the GIL while the pipe is full.
        view = memoryview(_LEN.pack(len(blob)) + blob)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _died(self, err: bytes) -> Internal:
        code = self.proc.returncode if self.proc is not None else None
        tail = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
        return Internal(
            f"the rebuild's writer process failed (exit code {code})"
            + (f": {tail}" if tail else "")
        )


# -- the writer process ----------------------------------------------------------


def _read_exact(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    if len(data) < n:
        return None  # end of input
    return bytes(data)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(path: str, stream: Any) -> Written | None:
    """Execute the frames read from ``stream`` on ``path``; None if the input
    ended before the end frame (nothing after the last commit is kept)."""
    t0 = time.perf_counter()
    dec = msgspec.msgpack.Decoder(Frame)
    db = connect_existing(path, isolation_level=None)
    statements = rows = 0
    idle = 0.0
    clock = time.perf_counter
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        db.execute(f"PRAGMA threads={SORT_THREADS}")
        cur = db.cursor()
        cur.execute("BEGIN")
        while True:
            t = clock()
            head = _read_exact(stream, _LEN.size)
            idle += clock() - t
            if head is None:
                return None
            body = _read_exact(stream, _LEN.unpack(head)[0])
            if body is None:
                return None
            frame = dec.decode(body)
            for sql, params, dates in frame.statements:
                for i in dates:
                    for r in params:
                        v = r[i]
                        if type(v) is datetime:
                            r[i] = sqlite_datetime(v)
                cur.executemany(sql, params)
                statements += 1
                rows += len(params)
            if frame.commit:
                cur.execute("COMMIT")
                if frame.end is not None:
                    break
                cur.execute("BEGIN")
        t1 = time.perf_counter()
        # A small cache for CREATE INDEX: its sorter spills sorted runs of
        # about the cache's size and merges them on SORT_THREADS threads;
        # one big run is sorted on one. 1M events' audit indexes: 1.6 s with
        # 2 MiB, 2.3 s with 16 MiB, 3.0 s with 64 MiB (same file, same run).
        cur.execute(f"PRAGMA cache_size=-{INDEX_CACHE_KIB}")
        for ddl in frame.end:
            cur.execute(ddl)
        # The whole store in the main file: the services open it next.
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        t2 = time.perf_counter()
        return Written(statements, rows, t2 - t0, idle, t2 - t1, time.process_time(), peak_rss_mb())
    finally:
        db.close()


def main(argv: list[str]) -> int:
    # Nothing the writer allocates is cyclic, and every frame is thousands of
    # lists: the collector would only rescan them.
    gc.disable()
    done = run(argv[0], sys.stdin.buffer)
    if done is None:
        print("writer: input ended before the end frame; nothing more committed", file=sys.stderr)
        return 3
    sys.stdout.write(json.dumps(msgspec.to_builtins(done)) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
