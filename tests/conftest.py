"""Shared fixtures: a real nats-server per test on a free loopback port."""

from __future__ import annotations

import pytest

from stratus.events.broker import EmbeddedNats
from stratus.events.store import EventStore


@pytest.fixture
def nats_server(tmp_path):
    srv = EmbeddedNats(tmp_path / "nats", log_file=str(tmp_path / "nats.log"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def store(nats_server):
    """A connection to the test's broker with the stream made, and the relay
    that appends host agents' reports on servers' subjects (the handlers
    run it in a deployment; an agent under test needs it all the same)."""
    from stratus.handlers.reports import ReportRelay

    s = await EventStore.connect(nats_server.url)
    await s.ensure_stream()
    relay = ReportRelay(s)
    await relay.start()
    yield s
    await relay.stop()
    await s.close()


@pytest.fixture
async def connect_store(nats_server):
    """Open more EventStore connections to the same server (closed at teardown)."""
    opened = []

    async def _open():
        s = await EventStore.connect(nats_server.url)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        await s.close()


@pytest.fixture
async def sqlite_engine(tmp_path):
    """Make SQLite projection stores (files in tmp_path), disposed at teardown."""
    from stratus.projections.db import make_engine, sqlite_url

    engines = []

    def _make(name: str = "projections.db"):
        engine = make_engine(sqlite_url(tmp_path / name))
        engines.append(engine)
        return engine

    yield _make
    for engine in engines:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server (Debian's binaries) for the session, on loopback.

    Missing binaries fail the tests that need it, with what to install: the
    PostgreSQL store is part of the contract, so it is never skipped.
    """
    from stratus.projections.pgserver import LocalPostgres, PostgresError

    server = LocalPostgres(durable=False)
    try:
        server.start()
    except PostgresError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
async def pg_url(postgres_server):
    """A throwaway database (ICU en-US collation, like a typical production
    database) on the session's server, dropped afterwards: its URL."""
    import uuid

    name = f"t_{uuid.uuid4().hex[:16]}"
    url = await postgres_server.create_database(name, icu_locale="en-US")
    yield url
    await postgres_server.drop_database(name)
