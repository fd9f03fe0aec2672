"""A rebuild's writer process: a failure of either side leaves nothing behind,
and a stopped load keeps exactly what it committed. (The reader's protocol
shortcut is tested in test_fastread.py.)"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from stratus.events.errors import Internal
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.projector import Projector
from stratus.projections.rebuild import build_store

from .test_rebuild import (
    _append_workload,
    _indexes,
    caught_up_digest,
    fresh_digest,
)

pytestmark = pytest.mark.timeout(180)

WRITER_MODULE = b"stratus.projections.writer"


def _writers() -> list[int]:
    """This process's writer children (their pids), from /proc."""
    me = os.getpid()
    found = []
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if WRITER_MODULE in cmd:
                found.append(int(pid))
    return found


def _files(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name)]


async def test_a_killed_writer_fails_the_rebuild_and_leaves_no_file(store, tmp_path):
    await _append_workload(store, 3000)
    path = tmp_path / "projections.killed.db"
    killed: list[int] = []

    def kill_the_writer(_n: int, seq: int) -> None:
        if not killed:
            pids = _writers()
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            # Until it is gone for sure: the next frames must meet a dead pipe.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pids[0] in _writers():
                time.sleep(0.01)

    with pytest.raises(Internal, match=r"writer process failed \(exit code -9\)"):
        await build_store(store, path, kill_the_writer, helper=True)
    assert killed
    assert _files(path) == []
    assert _writers() == []


async def test_a_failing_replay_stops_the_writer_and_leaves_no_file(store, tmp_path):
    await _append_workload(store, 3000)
    path = tmp_path / "projections.failed.db"

    class Boom(Exception):
        pass

    seen: list[int] = []

    def fail_midway(_n: int, seq: int) -> None:
        seen.append(seq)
        assert _writers(), "the writer runs beside the replay"
        raise Boom

    with pytest.raises(Boom):
        await build_store(store, path, fail_midway, helper=True)
    assert seen
    assert _files(path) == []
    assert _writers() == []


async def test_a_stopped_helper_load_keeps_what_it_committed_and_resumes(store, tmp_path):
    last = await _append_workload(store, 3000)
    path = tmp_path / "stopped.db"
    engine = make_engine(sqlite_url(path))
    try:
        bulk = Projector(store, engine, batch=250, bulk=True, helper=True)
        bulk.commit_every = 500

        class Stop(Exception):
            pass

        def stop_at(_n: int, seq: int) -> None:
            if seq >= 2500:
                raise Stop

        with pytest.raises(Stop):
            await bulk.catch_up(progress=stop_at)
        bulk.close()
        assert _writers() == []
        db = sqlite3.connect(path)
        try:
            checkpoint = db.execute("SELECT last_seq FROM checkpoints").fetchall()
            count, top = db.execute("SELECT count(*), max(seq) FROM audit").fetchone()
        finally:
            db.close()
        # Whatever the writer had committed when it was stopped, and not a
        # row more: rows and checkpoint commit together.
        upto = checkpoint[0][0] if checkpoint else 0
        assert upto % 500 == 0 and upto <= 2500
        assert (count, top or 0) == (upto, upto)
        assert not any(name.startswith("audit_") for name in _indexes(path))
        got = await caught_up_digest(store, engine, last)
    finally:
        await engine.dispose()
    assert got == await fresh_digest(store, tmp_path / "plain.db", last)


@pytest.mark.parametrize("helper", [False, True], ids=["one-process", "helpers"])
async def test_a_bulk_rebuild_gives_the_rows_an_independent_fold_gives(store, tmp_path, helper):
    # The digest tests compare the projector with itself (live and rebuilt
    # fold alike); this compares a rebuild with rows folded without it.
    from .test_projector import (
        append_all,
        expected_rows,
        make_history,
        view_rows,
    )

    events = make_history(300, seed=11)
    await append_all(store, events)
    path = tmp_path / "projections.rows.db"
    built = await build_store(store, path, helper=helper)
    assert built.seq == len(events)
    engine = make_engine(sqlite_url(path))
    try:
        assert await view_rows(engine) == expected_rows(events)
    finally:
        await engine.dispose()
