"""The request/reply skeleton the command, query and swap services share,
against a real nats-server: typed refusals, hidden internals, a bound on the
answers in flight, and a stop that lets them finish."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import nats.errors
import pytest
import structlog

from stratus.events.commands import Reply
from stratus.events.errors import Invalid
from stratus.events.responder import Responder

_reply = msgspec.json.Decoder(Reply)


class Echo(Responder):
    """Answers ``t.ok``, refuses ``t.bad``, breaks on ``t.boom``; ``t.slow``
    waits for ``release``."""

    internal_message = "internal error; see the echo log"

    def __init__(self, nc: nats.NATS, **kw) -> None:
        super().__init__(nc, "t.>", log=structlog.get_logger("test.echo"), **kw)
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0

    async def answer(self, msg):
        what = msg.subject[2:]
        if what == "bad":
            raise Invalid("bad: that will not do")
        if what == "boom":
            raise RuntimeError("secret detail")
        if what == "slow":
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await self.release.wait()
            finally:
                self.running -= 1
        if what == "raw":
            return b'{"ok":true,"data":{"raw":1}}'
        return Reply(ok=True, data={"echo": msg.data.decode()})


async def ask(nc: nats.NATS, subject: str, data: bytes = b"", timeout: float = 5) -> Reply:
    return _reply.decode((await nc.request(subject, data, timeout=timeout)).data)


@pytest.fixture
async def nc(nats_server):
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def test_answers_refusals_and_internal_errors_are_replies(nc):
    svc = Echo(nc)
    await svc.start()
    try:
        ok = await ask(nc, "t.ok", b"hi")
        assert ok.ok and ok.data == {"echo": "hi"}
        assert (await ask(nc, "t.raw")).data == {"raw": 1}
        bad = await ask(nc, "t.bad")
        assert not bad.ok and bad.error is not None
        assert (bad.error.kind, bad.error.message) == ("invalid", "bad: that will not do")
        boom = await ask(nc, "t.boom")
        assert boom.error is not None and boom.error.kind == "internal"
        # The caller reads the service's message, never the exception's text.
        assert boom.error.message == "internal error; see the echo log"
        assert "secret" not in boom.error.message
    finally:
        await svc.stop()


async def test_answers_in_flight_are_bounded(nc):
    svc = Echo(nc, max_in_flight=2)
    await svc.start()
    try:
        asks = [asyncio.create_task(ask(nc, "t.slow", timeout=10)) for _ in range(5)]
        for _ in range(200):  # bounded wait for the first two to arrive
            if svc.running == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # room for a third, were there no bound
        assert svc.running == 2
        svc.release.set()
        replies = await asyncio.gather(*asks)
        assert all(r.ok for r in replies)
        assert svc.most == 2
    finally:
        await svc.stop()


async def test_stop_lets_answers_in_flight_finish_and_takes_no_more(nc):
    svc = Echo(nc)
    await svc.start()
    pending = asyncio.create_task(ask(nc, "t.slow", b"late", timeout=10))
    for _ in range(200):
        if svc.running:
            break
        await asyncio.sleep(0.01)
    assert svc.running == 1
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()  # waiting for the request in flight
    svc.release.set()
    await stopping
    assert (await pending).data == {"echo": "late"}
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("t.ok", b"", timeout=2)


async def test_a_queue_group_answers_each_request_once(nc):
    a, b = Echo(nc, queue="echoes"), Echo(nc, queue="echoes")
    await a.start()
    await b.start()
    inbox = nc.new_inbox()
    got: list[bytes] = []

    async def collect(msg) -> None:
        got.append(msg.data)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        for i in range(20):
            await nc.publish("t.ok", str(i).encode(), reply=inbox)
        await nc.flush()
        for _ in range(200):
            if len(got) >= 20:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room for a duplicate, were there one
        assert sorted(_reply.decode(d).data["echo"] for d in got) == sorted(
            str(i) for i in range(20)
        )
    finally:
        await sub.unsubscribe()
        await a.stop()
        await b.stop()
