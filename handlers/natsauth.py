"""What each identity may do on the broker, and the broker's auth configuration.

nats-server enforces every limit here itself (subject permissions), on
every node of a cluster: a credential that tries more is refused by the
server with a permissions violation, whatever the code running it does.

Who connects (``handlers/callout.py`` admits all but the first two):

* The auth callout's own user and the system account's user: nkey users
  in the broker's configuration (``broker_auth_config``), the only ones.
* A client with a user's token (the CLI): it sends commands and queries
  (``cmd.>``, ``q.>``; the cloud admin also ``ctl.>``, the projection
  store swap) and subscribes to its own inbox prefix alone
  (``_INBOX.<its connection's nkey>``, see ``events.natscreds``).
* A client without a token: it may log in (the public verbs), nothing else.
* An integration (user and password): its consumer and its inbox (below).
* A service with its credential's token: the subjects of its kind
  (``service_permissions``), and for an agent its own host's only.

Services answer requests through response permissions (one reply to each
request they received), never through a publish right on anyone's inbox.

Integrations: Stratus makes each integration's durable consumer itself
(named by the integration's id, filter ``ev.<tenant>.>``), delivering into
the credential's own inbox prefix (``_INBOX_<id>.events``), which only it
may subscribe to. The credential may not create, change, fetch from or
delete any consumer (a create request's body can name any
``deliver_subject``, and a fetch names the subject its events go to;
permissions see neither): it may only subscribe to its inbox, acknowledge
(``$JS.ACK.EVENTS.<id>.>``) and read its consumer's info.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from stratus.events import natscreds
from stratus.events.blobs import BUCKET as IMAGE_BUCKET
from stratus.events.blobs import upload_bucket
from stratus.events.errors import Invalid
from stratus.events.frameworks import FRAMEWORK_BEATS
from stratus.events.integrations import (
    ACK_WAIT_S,
    IntegrationConsumerReset,
    IntegrationCreated,
    IntegrationCredential,
    IntegrationRevoked,
)
from stratus.events.lease import LEASES
from stratus.events.natsjwt import AUTH_CALLOUT_SUBJECT, Permissions, Signer, new_seed
from stratus.events.reports import REPORT_SUBJECT
from stratus.events.resources import SYSTEM
from stratus.events.scheduling import HEARTBEATS
from stratus.events.store import STREAM, EventStore
from stratus.events.tasks import cancel
from stratus.handlers.rbac import PERMISSIONS, Scope
from stratus.handlers.tokens import Principal

log = structlog.get_logger("stratus.natsauth")

SUBJECTS = ("ev.*.integration.>",)
# Events delivered and not yet acknowledged, at most (the push consumer's window).
MAX_ACK_PENDING = 1000
# Consumer metadata: the event that last (re)made it, so a restart re-makes
# nothing and a reset re-makes it exactly once.
GENERATION = "stratus_generation"
RETRY_S = 2.0

# The account every Stratus connection lives in (config mode: the global one,
# where the stream has always been), and the system account's name.
ACCOUNT = "$G"
SYSTEM_ACCOUNT = "SYS"
# Subjects of other services (kept here, where their permissions are).
EXEC_SUBJECT = "agent.{host}.exec"
SWAP_SUBJECT = "ctl.projections.swap"
WEBHOOK_BUCKET = "WEBHOOK_DELIVERIES"
KICK_SUBJECT = "$SYS.REQ.SERVER.{server}.KICK"
CONNZ_SUBJECT = "$SYS.REQ.SERVER.PING.CONNZ"


# -- the broker's configuration ----------------------------------------------------


class BrokerKeys(msgspec.Struct, frozen=True):
    """The nkey seeds the broker's auth configuration names (their public
    halves): the callout's user, the system account's user, and the account
    key the callout signs the users it admits with."""

    auth_seed: str
    sys_seed: str
    issuer_seed: str

    @classmethod
    def generate(cls) -> BrokerKeys:
        return cls(new_seed("user"), new_seed("user"), new_seed("account"))

    @classmethod
    def load_or_create(cls, directory: Path) -> BrokerKeys:
        """The keys kept in ``directory/broker-keys.json`` (mode 0600), made
        on first use."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / "broker-keys.json"
        if not path.exists():
            natscreds.write_private(path, msgspec.json.encode(cls.generate()))
        try:
            return msgspec.json.decode(path.read_bytes(), type=cls)
        except msgspec.DecodeError as exc:
            raise Invalid(f"{path} is not a broker key file: {exc}") from None

    @property
    def auth_user(self) -> str:
        return Signer(self.auth_seed).public

    @property
    def sys_user(self) -> str:
        return Signer(self.sys_seed).public

    @property
    def issuer(self) -> str:
        return Signer(self.issuer_seed).public


def broker_auth_config(auth_user: str, sys_user: str, issuer: str) -> str:
    """The authorization part of every node's nats-server configuration
    (single node and cluster alike): the two nkey users and the auth callout
    that admits everyone else. Public keys only: it may be printed and
    copied to each node."""
    auth = {"nkey": auth_user, "permissions": config_permissions(callout_permissions(auth_user))}
    system = {"nkey": sys_user, "permissions": config_permissions(system_permissions(sys_user))}
    callout = {"issuer": issuer, "auth_users": [auth_user, sys_user]}
    # The configuration format reads JSON values.
    return (
        f"accounts {{ {SYSTEM_ACCOUNT}: {{ users: [{json.dumps(system)}] }} }}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
        f"authorization {{\n"
        f"  users: [{json.dumps(auth)}]\n"
        f"  auth_callout: {json.dumps(callout)}\n"
        f"}}\n"
    )


def config_permissions(p: Permissions) -> dict[str, Any]:
    """``p`` as a configuration file's ``permissions`` block."""
    out: dict[str, Any] = {
        "publish": {"allow": list(p.pub_allow)} if p.pub_allow else {"deny": [">"]},
        "subscribe": {"allow": list(p.sub_allow)} if p.sub_allow else {"deny": [">"]},
    }
    if p.responses:
        out["allow_responses"] = True
    return out


# -- permissions -------------------------------------------------------------------


def _js_read() -> list[str]:
    """Reading the log without a consumer: the stream's state, single events."""
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{STREAM}",
        f"$JS.API.STREAM.MSG.GET.{STREAM}",
        f"$JS.API.DIRECT.GET.{STREAM}",
        f"$JS.API.DIRECT.GET.{STREAM}.>",
    ]


def _consumers(stream: str = STREAM) -> list[str]:
    """Consumers of any name: the trusted services' reads (a create request
    names its consumer in its body, which permissions cannot see, so this
    is all or nothing)."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.LIST.{stream}",
        f"$JS.API.CONSUMER.NAMES.{stream}",
        f"$JS.FC.{stream}.>",
    ]


def _named_consumer(name: str, stream: str = STREAM, *, pull: bool = False) -> list[str]:
    """One consumer, named in every API subject: only it may be made,
    changed, read or removed."""
    out = [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{name}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.FC.{stream}.{name}.>",
    ]
    return out + _pull(name, stream) if pull else out


def _pull(name: str, stream: str = STREAM) -> list[str]:
    """Fetching from (and acknowledging) one durable pull consumer."""
    return [f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", f"$JS.ACK.{stream}.{name}.>"]


def _kv_read(bucket: str) -> list[str]:
    """Reading a KV bucket: its stream's info, gets, and watchers (consumers)."""
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        *_consumers(stream),
    ]


def _objects(bucket: str, *, write: bool) -> list[str]:
    """An object store bucket: reading its objects (info, chunks through
    ordered consumers), and with ``write`` putting, deleting and purging
    them and making the bucket. ``bucket`` "*": reading every stream (a
    stream's name is one token: ``OBJ_`` cannot be matched apart)."""
    stream = "*" if bucket == "*" else f"OBJ_{bucket}"
    out = [
        # nats-py finds a subscription's stream by its subject
        "$JS.API.STREAM.NAMES",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        *_consumers(stream),
    ]
    if write:
        out += [
            f"$O.{bucket}.>",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.MSG.DELETE.{stream}",
        ]
    return out


def _kv_make(bucket: str) -> list[str]:
    return [f"$JS.API.STREAM.CREATE.KV_{bucket}"]


def _public_verbs() -> tuple[str, ...]:
    return tuple(f"cmd.{verb}" for verb, rule in PERMISSIONS.items() if rule.scope is Scope.PUBLIC)


def client_permissions(principal: Principal | None, nkey: str) -> Permissions:
    """A CLI (or any client) connection: its token's ``principal``, None
    without one; ``nkey`` names its inbox."""
    inbox = (f"{natscreds.inbox_prefix(nkey)}.>",)
    if principal is None:
        return Permissions(pub_allow=_public_verbs(), sub_allow=inbox)
    pub = ("cmd.>", "q.>", "ctl.>") if principal.is_cloud_admin else ("cmd.>", "q.>")
    return Permissions(pub_allow=pub, sub_allow=inbox)


def service_permissions(kind: str, host: str, nkey: str) -> Permissions:
    """A service credential's connection: what its kind needs and no more."""
    inbox = f"{natscreds.inbox_prefix(nkey)}.>"
    pub: list[str]
    sub: list[str] = [inbox]
    responds = False
    if kind == "handlers":
        # Decide and append anything on the log; make the stream and the
        # heartbeat bucket; forward container exec to the host's agent.
        pub = [
            "ev.>",
            *_js_read(),
            *_consumers(),
            f"$JS.API.STREAM.CREATE.{STREAM}",
            f"$JS.API.STREAM.UPDATE.{STREAM}",
            f"$JS.API.STREAM.INFO.KV_{HEARTBEATS}",
            *_kv_make(HEARTBEATS),
            # the webhook deliveries bucket is made with the log (``ensure_log``)
            f"$JS.API.STREAM.INFO.KV_{WEBHOOK_BUCKET}",
            *_kv_make(WEBHOOK_BUCKET),
            # frameworks' beats (``framework.beat``): the handlers beat for them
            f"$KV.{FRAMEWORK_BEATS}.*",
            f"$JS.API.STREAM.INFO.KV_{FRAMEWORK_BEATS}",
            *_kv_make(FRAMEWORK_BEATS),
            EXEC_SUBJECT.format(host="*"),
            # the image service (run with the handlers) writes image files
            *_objects(IMAGE_BUCKET, write=True),
            # the relay reads snapshots from the hosts' upload buckets
            *_objects("*", write=False),
        ]
        sub += ["cmd.>", REPORT_SUBJECT.format(host="*"), "ev.>"]
        responds = True
    elif kind == "query":
        pub = [*_js_read(), *_consumers(), *_kv_read(HEARTBEATS), *_kv_read(WEBHOOK_BUCKET)]
        sub += ["q.>", SWAP_SUBJECT]
        responds = True
    elif kind == "projector":
        # With a shared database, the projector lease (``events.lease``):
        # its bucket, made on first use, and the projectors' keys in it.
        stream = f"KV_{LEASES}"
        pub = [
            *_js_read(),
            *_consumers(),
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$KV.{LEASES}.projector.*",
        ]
    elif kind == "scheduler":
        # Claims on hosts' subjects and placements on servers': no tenant,
        # quota or identity event.
        pub = [
            f"ev.{SYSTEM}.host.*",
            "ev.*.server.*",
            *_js_read(),
            *_consumers(),
            *_pull("scheduler"),
            *_kv_read(HEARTBEATS),
            *_kv_make(HEARTBEATS),
        ]
    elif kind == "allocator":
        # Offers (on offers' and hosts' subjects), and a silent framework's
        # removal with its tasks failed and their claims released: no tenant,
        # quota, identity or network event. It watches hosts' and frameworks'
        # beats, and makes their buckets if it comes first.
        pub = [
            f"ev.{SYSTEM}.host.*",
            "ev.*.offer.*",
            "ev.*.framework.*",
            "ev.*.server.*",
            *_js_read(),
            *_consumers(),
            *_kv_read(HEARTBEATS),
            *_kv_make(HEARTBEATS),
            *_kv_read(FRAMEWORK_BEATS),
            *_kv_make(FRAMEWORK_BEATS),
        ]
    elif kind == "webhooks":
        # Its consumers are named by webhook ids (any), pushed to its inbox.
        pub = [
            *_js_read(),
            *_consumers(),
            f"$JS.ACK.{STREAM}.>",
            f"$KV.{WEBHOOK_BUCKET}.>",
            *_kv_read(WEBHOOK_BUCKET),
            *_kv_make(WEBHOOK_BUCKET),
        ]
    elif kind in ("openstack-api", "console"):
        # Gateways: they forward each user's own token with each request.
        pub = ["cmd.>", "q.>"]
    elif kind in natscreds.HOST_KINDS:
        pub, sub, responds = _agent_permissions(kind, host, inbox)
    else:
        raise Invalid(f"no broker permissions for a service of kind {kind!r}")
    return Permissions(pub_allow=tuple(pub), sub_allow=tuple(sub), responses=responds)


def _agent_permissions(kind: str, host: str, inbox: str) -> tuple[list[str], list[str], bool]:
    """A host agent: its host's subject, its own consumers, its own
    heartbeat key; its reports on servers and ports go through the relay
    (``report.<host>``), which checks they are placed on it."""
    system = SYSTEM
    readers = [s for name in natscreds.reader_names(kind, host) for s in _named_consumer(name)]
    pub = [*_js_read(), *readers, REPORT_SUBJECT.format(host=host)]
    sub = [inbox]
    if kind == "compute-agent":
        pub += [
            # Images are fetched from the image bucket into the host's cache;
            # it may not write there (an object store's subjects name an
            # object in one token: no permission tells a snapshot's object
            # from a user's). A snapshot's bytes go into its host's own
            # bucket, whence the relay copies them, checked
            # (``handlers.snapshots``).
            *_objects(IMAGE_BUCKET, write=False),
            *_objects(upload_bucket(host), write=True),
            f"ev.{system}.host.{host}",
            *_named_consumer(natscreds.durable_name(kind, host), pull=True),
            f"$KV.{HEARTBEATS}.{host}",
            f"$JS.API.STREAM.INFO.KV_{HEARTBEATS}",
        ]
        sub.append(EXEC_SUBJECT.format(host=host))
        return pub, sub, True  # it answers container exec
    # Its registration, corrections and BGP observations: its own subject.
    # A routed network's blocks (claims, releases, addresses) are on
    # subjects without the host: through the relay, which checks them
    # (``handlers.blocks``), as every other report.
    pub.append(f"ev.{system}.network-agent.{host}")
    return pub, sub, False


def callout_permissions(auth_user: str) -> Permissions:
    """The auth callout's own user (in the broker's configuration): answer
    the servers' authorization requests, read the identity events, and make
    the integrations' consumers."""
    return Permissions(
        pub_allow=(*_js_read(), *_consumers()),
        sub_allow=(AUTH_CALLOUT_SUBJECT, f"{natscreds.inbox_prefix(auth_user)}.>"),
        responses=True,
    )


def system_permissions(sys_user: str) -> Permissions:
    """The system account's user: list connections and cut one, nothing more
    (no reload, no account or server changes)."""
    return Permissions(
        pub_allow=(CONNZ_SUBJECT, KICK_SUBJECT.format(server="*")),
        sub_allow=(f"{natscreds.inbox_prefix(sys_user)}.>",),
    )


# -- integrations --------------------------------------------------------------------


class Credential(msgspec.Struct):
    id: str
    user: str
    filter_subject: str
    password_hash: str = ""
    live: bool = True
    start_seq: int = 1
    ack_wait_s: int = ACK_WAIT_S
    generation: str = ""


def inbox_prefix(integration_id: str) -> str:
    return f"_INBOX_{integration_id}"


def deliver_subject(integration_id: str) -> str:
    """Where its consumer delivers: under the inbox prefix only it may read."""
    return f"{inbox_prefix(integration_id)}.events"


def integration_permissions(c: Credential) -> Permissions:
    return Permissions(
        pub_allow=(
            f"$JS.API.CONSUMER.INFO.{STREAM}.{c.id}",
            f"$JS.ACK.{STREAM}.{c.id}.>",
        ),
        sub_allow=(f"{inbox_prefix(c.id)}.>",),
    )


def fold(creds: dict[str, Credential], event: Any) -> bool:
    """Apply one event; True when a credential or a consumer must change."""
    iid = event.aggregate.id
    if isinstance(event, IntegrationCreated):
        creds[iid] = Credential(
            iid,
            event.user,
            event.filter_subject,
            start_seq=event.start_seq,
            ack_wait_s=event.ack_wait_s,
            generation=event.id,
        )
        return False  # usable once its credential lands (same batch)
    c = creds.get(iid)
    if c is None:
        return False
    if isinstance(event, IntegrationCredential):
        c.password_hash = event.password_hash
        return c.live
    if isinstance(event, IntegrationConsumerReset) and c.live:
        c.start_seq, c.generation = event.start_seq, event.id
        return True
    if isinstance(event, IntegrationRevoked) and c.live:
        c.live = False
        return True
    return False


def consumer_config(c: Credential, start_seq: int) -> ConsumerConfig:
    return ConsumerConfig(
        name=c.id,
        durable_name=c.id,
        filter_subject=c.filter_subject,
        deliver_subject=deliver_subject(c.id),
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=c.ack_wait_s,
        max_ack_pending=MAX_ACK_PENDING,
        metadata={GENERATION: c.generation},
    )


async def ensure_consumer(js: Any, c: Credential) -> bool:
    """Make ``c``'s consumer unless the one there is of its generation;
    True when it made one."""
    info: Any = None
    with contextlib.suppress(nats.js.errors.NotFoundError):
        info = await js.consumer_info(STREAM, c.id)
    start = c.start_seq
    if info is not None:
        meta = info.config.metadata or {}
        if meta.get(GENERATION) == c.generation and info.config.deliver_subject == deliver_subject(
            c.id
        ):
            return False
        if GENERATION not in meta:
            # Made by the credential itself (before Stratus made them): keep
            # its position, drop whatever it was configured to do (a push
            # consumer delivering anywhere, say).
            start = max(start, info.ack_floor.stream_seq + 1)
        await js.delete_consumer(STREAM, c.id)
    await js.add_consumer(STREAM, consumer_config(c, start))
    log.info("integration consumer made", integration=c.id, start_seq=start)
    return True


async def delete_consumer(js: Any, integration_id: str) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(STREAM, integration_id)


class IntegrationBook:
    """Follows the integration events: the credentials the callout admits
    (``by_user``), and each live integration's consumer, made or deleted
    as they change (``consumers``; off for a callout replica that only
    admits).

    ``on_change(revoked)`` runs after every change, with the ids of the
    integrations revoked by it (their connections are cut).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        consumers: bool = True,
        on_change: Any = None,
    ) -> None:
        self.store = store
        self.manage_consumers = consumers
        self.on_change = on_change
        self.creds: dict[str, Credential] = {}
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        # integration id -> the generation its consumer has ("" once deleted)
        self._consumers: dict[str, str] = {}

    def by_user(self, user: str) -> Credential | None:
        for c in self.creds.values():
            if c.user == user and c.live and c.password_hash:
                return c
        return None

    def live(self, integration_id: str) -> bool:
        c = self.creds.get(integration_id)
        return c is not None and c.live

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _sync_consumers(self, live: bool) -> bool:
        """Make (``live``) or delete (not) the consumers that differ; False if one failed."""
        ok = True
        for c in list(self.creds.values()):
            if c.live != live or (live and not c.password_hash):
                continue
            want = c.generation if live else ""
            if self._consumers.get(c.id) == want:
                continue
            try:
                if live:
                    await ensure_consumer(self.store.js, c)
                else:
                    await delete_consumer(self.store.js, c.id)
            except Exception as exc:
                ok = False
                log.warning("integration consumer not synced", integration=c.id, error=str(exc))
                continue
            self._consumers[c.id] = want
        return ok

    async def _push(self, revoked: Iterable[str] = ()) -> None:
        async with self._lock:
            ok = True
            if self.manage_consumers:
                ok = await self._sync_consumers(live=True)
            if self.on_change is not None:
                result = self.on_change(list(revoked))
                if asyncio.iscoroutine(result):
                    await result
            if self.manage_consumers:
                # A revoked integration's consumer goes after its connections.
                ok = await self._sync_consumers(live=False) and ok
        if not ok and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._again())

    async def _again(self) -> None:
        await asyncio.sleep(RETRY_S)
        await self._push()

    async def _run(self) -> None:
        target = await self.store.last_seq(SUBJECTS[0])
        if target == 0:
            await self._push()
            self._ready.set()
        changed: list[str] | None = None
        async with contextlib.aclosing(self.store.subscribe(self.seq, SUBJECTS)) as batches:
            async for batch in batches:
                changed = await self._apply(batch, target, changed)

    async def _apply(self, batch: list[Any], target: int, changed: list[str] | None) -> Any:
        for r in batch:
            self.seq = r.seq
            try:
                event = r.decode()
                was_live = self.live(event.aggregate.id)
                if fold(self.creds, event):
                    changed = changed or []
                    if was_live and not self.live(event.aggregate.id):
                        changed.append(event.aggregate.id)
            except Exception:
                log.warning("undecodable integration event", seq=r.seq)
        if not self._ready.is_set() and self.seq < target:
            return changed
        if changed is not None or not self._ready.is_set():
            await self._push(changed or ())
            self._ready.set()
        return None

    async def stop(self) -> None:
        for task in (self._retry, self._task):
            if task is not None:
                await cancel(task)
        self._task = self._retry = None
