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
    s = await EventStore.connect(nats_server.url)
    await s.ensure_stream()
    yield s
    await s.close()
