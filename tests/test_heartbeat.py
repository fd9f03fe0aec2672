"""Liveness through the heartbeat bucket: beats keep a host alive, silence
expires it (the server's own TTL), and none of it reaches the event log."""

from __future__ import annotations

import asyncio
import time

import pytest

from stratus.events.heartbeat import Liveness, beat
from stratus.events.store import SUBJECTS


async def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def test_beats_keep_alive_and_silence_expires(store):
    js = store.js
    await beat(js, "h-early", ttl=30)  # before the watcher: seen in its first picture
    changes: list[tuple[str, float]] = []
    live = Liveness(js, on_change=lambda h, t: changes.append((h, t)), ttl=30)
    await live.start()
    try:
        assert live.alive("h-early")
        assert not live.alive("h-never")
        await beat(js, "h-short", ttl=1)
        assert await _until(lambda: live.alive("h-short"), 5)
        # No more beats: dead once its TTL has passed, and the server expires
        # the beat and tells the watcher (its expiry sweep may lag under load).
        assert await _until(lambda: not live.alive("h-short"), 8)
        assert await _until(lambda: ("h-short", 0.0) in changes, 30)
        assert live.alive_hosts() == {"h-early"}
    finally:
        await live.stop()
    assert await store.last_seq() == 0, "heartbeats must never reach the event log"
    assert SUBJECTS.startswith("ev.")


async def test_bad_host_name_refused(store):
    with pytest.raises(ValueError):
        await beat(store.js, "h.1 >")
