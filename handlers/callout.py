"""The auth callout: every node of the broker asks it who may connect, and as what.

nats-server sends each connection attempt (but those of the two nkey users
in its configuration) as an authorization request JWT on
``$SYS.REQ.USER.AUTH``; this service answers with a user JWT that places
the connection in the Stratus account with the permissions
``handlers.natsauth`` gives its identity, or with a refusal. It verifies
tokens locally as every service does (``Verifier``: public keys and
revocations from the log) and integration passwords against their bcrypt
hash on the log. Run as many as you like (a queue group); every node of a
cluster reaches them through the account's subscription.

The callout is asked only when a connection opens, so it also keeps open
connections honest: when a revocation lands on the log (a token, a
credential, a user's tokens, a role, an integration) it lists every
server's connections through the system account
(``$SYS.REQ.SERVER.PING.CONNZ``) and cuts (``$SYS.REQ.SERVER.<id>.KICK``)
those whose identity is void now. Each connection's name (which the user
JWT sets and the server lists) carries what that takes: the token's id,
user, tenant and times, or the integration's id. A token's expiry needs
no kick: the user JWT expires with it, and the server cuts it then.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import threading
import time
from typing import Any

import bcrypt
import nats.errors
import structlog
from nats.aio.msg import Msg

from stratus.events import natsjwt
from stratus.events.credentials import CredentialRevoked
from stratus.events.errors import StratusError, Unauthenticated
from stratus.events.identity import RoleRevoked, TokenRevoked, UserDisabled, UserTokensRevoked
from stratus.events.model import Event
from stratus.events.natscreds import connect_options
from stratus.events.natsjwt import AUTH_CALLOUT_SUBJECT, AuthRequest, JWTError, Signer
from stratus.events.store import EventStore, connect_nats
from stratus.events.tasks import cancel
from stratus.handlers.auth import IdentityFeed
from stratus.handlers.natsauth import (
    ACCOUNT,
    CONNZ_SUBJECT,
    KICK_SUBJECT,
    BrokerKeys,
    IntegrationBook,
    client_permissions,
    integration_permissions,
    service_permissions,
)
from stratus.handlers.tokens import Principal, Verifier

log = structlog.get_logger("stratus.callout")

QUEUE_GROUP = "stratus-auth"
# How long a connection listing waits for more servers to answer after the last.
CONNZ_QUIET_S = 0.25
CONNZ_MAX_S = 3.0
# Events after which some open connection may have to go.
REVOKING = (TokenRevoked, CredentialRevoked, UserTokensRevoked, UserDisabled, RoleRevoked)
WAIT_FOR_LOG_S = 0.2


class Refused(Exception):
    """A connection attempt the callout turns down (the reason goes to the
    server's log; the client only learns it was not authorized)."""


def connection_name(p: Principal) -> str:
    """What the user JWT names a token's connection: enough to decide later,
    from a server's connection list, whether the token has been voided."""
    fields = (p.token_id, p.user, p.tenant, str(p.issued_at), str(p.expires_at), p.service, p.host)
    if any("|" in f for f in fields):
        raise Refused("a token with '|' in its claims")
    return "|".join(("tok", *fields))


def principal_of(name: str) -> Principal | None:
    """The token a connection name (``connection_name``) stands for; None if not one."""
    parts = name.split("|")
    if len(parts) != 8 or parts[0] != "tok":
        return None
    try:
        return Principal(
            token_id=parts[1],
            user=parts[2],
            tenant=parts[3],
            roles=(),
            issued_at=int(parts[4]),
            expires_at=int(parts[5]),
            service=parts[6],
            host=parts[7],
        )
    except ValueError:
        return None


class AuthCallout:
    """Answers the broker's authorization requests; cuts voided connections.

    ``keys``: the callout's user and the system account's (nkey seeds) and
    the issuer account key it signs with. ``trusted_keys``: public token
    keys (kid -> raw bytes) trusted before the log names them, so services
    can be admitted on a cloud whose log is still empty. ``consumers``:
    make the integrations' consumers too (one replica or all of them:
    making one is idempotent).
    """

    def __init__(
        self,
        url: str,
        keys: BrokerKeys,
        *,
        trusted_keys: dict[str, bytes] | None = None,
        consumers: bool = True,
        queue: str = QUEUE_GROUP,
    ) -> None:
        self.url = url
        self.keys = keys
        self.issuer = Signer(keys.issuer_seed)
        self.verifier = Verifier(trusted_keys)
        self.queue = queue
        self.manage_consumers = consumers
        self.store: EventStore | None = None
        self.sys: Any = None
        self.feed: IdentityFeed | None = None
        self.integrations: IntegrationBook | None = None
        self.admitted = 0
        self.refused = 0
        self.kicked = 0
        # Requests that had expired before they were answered (the server
        # had given up on them), and the last answers' handling times in
        # seconds, from the request's arrival to the answer sent.
        self.late = 0
        self.handled_s: collections.deque[float] = collections.deque(maxlen=10_000)
        # Set once the identity and integration events are folded.
        self.ready = asyncio.Event()
        self._sub: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follow: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_due = asyncio.Event()

    async def start(self) -> None:
        """Connect (as the two configured users) and answer at once; the log
        is followed in the background (``ready`` once caught up)."""
        self.store = await EventStore.connect(self.url, **connect_options(seed=self.keys.auth_seed))
        self.sys = await connect_nats(self.url, **connect_options(seed=self.keys.sys_seed))
        self._sub = await self.store.nc.subscribe(
            AUTH_CALLOUT_SUBJECT, queue=self.queue, cb=self._on_request
        )
        await self.store.nc.flush()
        self._follow = asyncio.create_task(self._follow_log())
        self._sweeper = asyncio.create_task(self._sweep_loop())
        log.info("auth callout answering", issuer=self.issuer.public)

    async def _follow_log(self) -> None:
        """Fold the identity and integration events once the stream exists."""
        assert self.store is not None
        while True:
            try:
                await self.store.js.stream_info(self.store.stream)
                break
            except (TimeoutError, nats.errors.Error):
                await asyncio.sleep(WAIT_FOR_LOG_S)  # a cloud not initialised yet
        self.feed = IdentityFeed(self.store, self.verifier, on_event=self._on_identity)
        await self.feed.start()
        self.integrations = IntegrationBook(
            self.store, consumers=self.manage_consumers, on_change=self._on_integrations
        )
        await self.integrations.start()
        self.ready.set()
        # Revocations made while no callout ran: their connections go now.
        self._sweep_due.set()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)

    # -- admitting ---------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg, time.perf_counter()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, arrived: float) -> None:
        try:
            req = natsjwt.auth_request(msg.data.decode())
        except natsjwt.Expired:
            self.late += 1
            log.warning("authorization request expired before it was answered")
            return
        except (JWTError, UnicodeDecodeError) as exc:
            log.warning("unreadable authorization request", error=str(exc))
            return
        try:
            user = await self.admit(req)
            answer = natsjwt.auth_response(req, self.issuer, jwt=user)
            self.admitted += 1
        except Refused as why:
            self.refused += 1
            log.info(
                "connection refused",
                reason=str(why),
                client=req.client_info.host,
                server=req.server_id.name,
            )
            answer = natsjwt.auth_response(req, self.issuer, error=str(why))
        with contextlib.suppress(Exception):
            await msg.respond(answer.encode())
        self.handled_s.append(time.perf_counter() - arrived)

    async def admit(self, req: AuthRequest) -> str:
        """The user JWT for one connection attempt; ``Refused`` saying why not."""
        co = req.connect_opts
        if co.user or co.password:
            return await self._integration(req)
        if not co.nkey or not natsjwt.verify_nonce(co.nkey, req.client_info.nonce, co.sig):
            raise Refused(
                "connect with an nkey of the connection's own that signs the server's nonce "
                "(the Stratus client does): it names the connection's private inbox"
            )
        if not co.auth_token:
            perms = client_permissions(None, co.nkey)
            return natsjwt.user_jwt(req.user_nkey, ACCOUNT, perms, self.issuer, name="anonymous")
        try:
            p = self.verifier.verify(co.auth_token)
        except Unauthenticated as err:
            raise Refused(err.message) from None
        try:
            perms = (
                service_permissions(p.service, p.host, co.nkey)
                if p.service
                else client_permissions(p, co.nkey)
            )
        except StratusError as err:
            raise Refused(err.message) from None
        return natsjwt.user_jwt(
            req.user_nkey,
            ACCOUNT,
            perms,
            self.issuer,
            name=connection_name(p),
            # As long as every verifier honours it: its expiry and the
            # clock leeway they all allow.
            expires=p.expires_at + math.ceil(self.verifier.leeway_s),
        )

    async def _integration(self, req: AuthRequest) -> str:
        co = req.connect_opts
        cred = self.integrations.by_user(co.user) if self.integrations else None
        if cred is None:
            raise Refused(f"no live integration user {co.user[:80]!r}")
        ok = await asyncio.to_thread(
            bcrypt.checkpw, co.password.encode(), cred.password_hash.encode()
        )
        if not ok:
            raise Refused(f"wrong password for integration user {co.user}")
        return natsjwt.user_jwt(
            req.user_nkey,
            ACCOUNT,
            integration_permissions(cred),
            self.issuer,
            name=f"int|{cred.id}",
        )

    # -- cutting voided connections ------------------------------------------------

    def _on_identity(self, event: Event) -> None:
        if isinstance(event, REVOKING) and self.ready.is_set():
            self._sweep_due.set()

    def _on_integrations(self, revoked: list[str]) -> None:
        if revoked:
            self._sweep_due.set()

    def void(self, name: str, now: float | None = None) -> bool:
        """Whether the connection named ``name`` may no longer be open."""
        if name.startswith("int|"):
            return self.integrations is not None and not self.integrations.live(name[4:])
        p = principal_of(name)
        if p is None:
            return False
        try:
            self.verifier.check(p, now)
        except Unauthenticated:
            return True
        return False

    async def _sweep_loop(self) -> None:
        while True:
            await self._sweep_due.wait()
            self._sweep_due.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeping voided connections failed")
                await asyncio.sleep(1.0)
                self._sweep_due.set()

    async def sweep(self) -> int:
        """Cut every open connection, on every server, whose identity is void
        now; how many were cut."""
        cut = 0
        for server, conn in await self.connections():
            name = conn.get("authorized_user") or ""
            if not self.void(name):
                continue
            try:
                await self.sys.request(
                    KICK_SUBJECT.format(server=server),
                    json.dumps({"cid": conn["cid"]}).encode(),
                    timeout=2,
                )
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("kick failed", server=server, cid=conn.get("cid"), error=str(exc))
                continue
            cut += 1
            log.info("connection cut", server=server, cid=conn.get("cid"), name=name)
        self.kicked += cut
        return cut

    async def connections(self) -> list[tuple[str, dict[str, Any]]]:
        """(server id, connection) of every open client connection of every
        server that answers within ``CONNZ_MAX_S``."""
        inbox = self.sys.new_inbox()
        sub = await self.sys.subscribe(inbox)
        out: list[tuple[str, dict[str, Any]]] = []
        try:
            body = {"auth": True, "limit": 1_000_000, "state": 0}
            await self.sys.publish(CONNZ_SUBJECT, json.dumps(body).encode(), reply=inbox)
            deadline = time.monotonic() + CONNZ_MAX_S
            wait = CONNZ_MAX_S
            while time.monotonic() < deadline:
                try:
                    msg = await sub.next_msg(timeout=wait)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                wait = CONNZ_QUIET_S
                try:
                    reply = json.loads(msg.data)
                    server = reply["server"]["id"]
                    conns = reply.get("data", {}).get("connections") or []
                except (ValueError, KeyError, TypeError):
                    continue
                out.extend((server, c) for c in conns)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    async def stop(self) -> None:
        for task in (self._follow, self._sweeper):
            if task is not None:
                await cancel(task)
        self._follow = self._sweeper = None
        for part in (self.integrations, self.feed):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.store is not None:
            await self.store.close()
        if self.sys is not None:
            with contextlib.suppress(Exception):
                await self.sys.drain()


class CalloutThread:
    """An ``AuthCallout`` answering on an event loop of its own, in a thread
    of its own: the form ``stratus up`` runs it in, beside every other
    service of its process. On their loop, a connect's authorization request
    waited behind whatever they were doing (folding a batch, answering
    commands), and under load expired before it was read; here it waits
    only for the interpreter's lock, which a busy thread hands over every
    few milliseconds. Its counters are read from any thread."""

    def __init__(self, url: str, keys: BrokerKeys, **kw: Any) -> None:
        self.callout = AuthCallout(url, keys, **kw)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            started.set_result(loop)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="auth-callout", daemon=True)
        self._thread.start()
        self._loop = await asyncio.wrap_future(started)
        try:
            await self._on_its_loop(self.callout.start())
        except BaseException:
            await self._end()
            raise

    async def _on_its_loop(self, coro: Any) -> Any:
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self._on_its_loop(self.callout.wait_ready(timeout))

    async def sweep(self) -> int:
        return await self._on_its_loop(self.callout.sweep())

    async def stop(self) -> None:
        try:
            if self._loop is not None:
                await self._on_its_loop(self.callout.stop())
        finally:
            await self._end()

    async def _end(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._loop = self._thread = None

    # What the callout has counted (tests and benchmarks read them).
    @property
    def admitted(self) -> int:
        return self.callout.admitted

    @property
    def refused(self) -> int:
        return self.callout.refused

    @property
    def kicked(self) -> int:
        return self.callout.kicked

    @property
    def late(self) -> int:
        return self.callout.late

    @property
    def handled_s(self) -> collections.deque[float]:
        return self.callout.handled_s
