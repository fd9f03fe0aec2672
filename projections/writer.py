"""A bulk load's SQLite writes in a second process, beside the replay.

A rebuild is one Python process reading the log, decoding and folding each
event, and then binding and writing the rows, while the machine has (at
least) two cores. Here the replay stays in the caller, which sends the SQL
and the rows it folded (``RowBatch.statements``, the append-only views'
INSERTs) as frames over a pipe; ``python -m stratus.projections.writer``
executes them on its own SQLite connection, commits where the caller says,
builds the deferred indexes at the end and checkpoints the WAL into the file.
The replay then costs about the larger of the two halves instead of their sum.

The frames are msgpack (one C call each way), length-prefixed, at most one
in flight while the next batch is folded: the pipe is the backpressure, so
neither side holds more than a frame or two in memory.

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
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from stratus.events.errors import Internal

# The same settings as the in-process bulk writer (``db._bulk_setup``).
CACHE_KIB = 64 * 1024
SORT_THREADS = 2
# A bigger pipe: a frame of 5,000 events' rows is a few hundred KiB, and the
# default 64 KiB pipe costs a context switch per 64 KiB.
PIPE_BYTES = 1 << 20
EXIT_TIMEOUT_S = 600.0
_STDERR_TAIL = 2000
_LEN = struct.Struct("<I")

Statement = tuple[str, list[Any]]


class Frame(msgspec.Struct, array_like=True):
    """Statements (SQL and its parameter rows) to run in the open transaction;
    then a commit, and with ``end`` the DDL to run after the last commit."""

    statements: list[tuple[str, list[Any]]]
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
    rss_mb: float


_enc = msgspec.msgpack.Encoder()


class WriterProcess:
    """The caller's side: start the writer, send it frames, wait for its end."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._sending: asyncio.Future[None] | None = None
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

    async def write(self, statements: list[Statement], commit: bool = False) -> None:
        """Queue one frame: encoded now (the rows may be reused when this
        returns), sent in a thread while the caller folds the next batch."""
        await self._send(_enc.encode(Frame(statements, commit)))

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
        if proc.returncode != 0:
            raise self._died(err)
        try:
            return msgspec.json.decode(out.splitlines()[-1], type=Written)
        except (msgspec.DecodeError, msgspec.ValidationError, IndexError):
            raise Internal(f"the rebuild's writer answered {out[-200:]!r}") from None

    def abort(self) -> None:
        """Stop the writer (its open transaction is lost) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)

    async def _send(self, blob: bytes) -> None:
        await self._drain()
        loop = asyncio.get_running_loop()
        self._sending = loop.run_in_executor(None, self._write_all, blob)

    async def _drain(self) -> None:
        sending, self._sending = self._sending, None
        if sending is None:
            return
        try:
            await sending
        except OSError:
            # EPIPE: the writer is gone. Its exit code and stderr say why.
            proc = self.proc
            assert proc is not None
            _, err = await asyncio.to_thread(proc.communicate, None, 10)
            raise self._died(err) from None

    def _write_all(self, blob: bytes) -> None:
        # Runs in a thread: os.write releases the GIL while the pipe is full.
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


def _peak_rss_mb() -> float:
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
    db = sqlite3.connect(path, isolation_level=None)
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
            for sql, params in frame.statements:
                cur.executemany(sql, params)
                statements += 1
                rows += len(params)
            if frame.commit:
                cur.execute("COMMIT")
                if frame.end is not None:
                    break
                cur.execute("BEGIN")
        t1 = time.perf_counter()
        for ddl in frame.end:
            cur.execute(ddl)
        # The whole store in the main file: the services open it next.
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        t2 = time.perf_counter()
        return Written(statements, rows, t2 - t0, idle, t2 - t1, _peak_rss_mb())
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
