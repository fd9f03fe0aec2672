"""The embedded control plane: nats-server child plus every service, one process.

``stratus up`` and ``stratus demo`` run this; tests and benchmarks use it
too, so they exercise exactly what an operator runs.

The broker is configured as every node of a deployment is
(``handlers.natsauth.broker_auth_config``): two nkey users (the auth
callout's and the system account's, seeds in ``DATA_DIR/broker``) and the
auth callout, which runs here and admits everything else. Each service in
this process connects as a separate service would, with a credential of its
own kind (signed here with the key ring, held in memory only), so the
permissions tested here are the ones a multi-machine deployment gets.

The stack supervises its broker: a nats-server that dies is started again
on the same port and store (at once, then with back-off), while the
services' connections reconnect by themselves; after ``MAX_RESTARTS``
failures in a row it gives up and says why (``failed``). The broker dies
with the process that started it (see ``events.broker``), and a broker left
running on this data dir by an older process is stopped before a new one
starts, so two never share the JetStream store.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from pathlib import Path
from typing import IO, Any, NamedTuple

import nats.errors
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from stratus.cli.datadir import (  # noqa: F401 (the names runtime has always offered)
    BROKER_DIR,
    URL_FILE,
    default_data_dir,
    deployment_prefix,
)
from stratus.events.broker import (
    BrokerError,
    EmbeddedNats,
    StoreInUse,
    cluster_nodes,
    start_nodes,
    stop_pid,
)
from stratus.events.cluster import replicas_for, stream_cluster, wait_whole
from stratus.events.errors import ConcurrencyConflict, StratusError, Unavailable
from stratus.events.ids import new_id
from stratus.events.model import Cause
from stratus.events.reader import broker_error
from stratus.events.store import Condition, EventStore
from stratus.events.tasks import cancel
from stratus.handlers.auth import Authenticator, IdentityFeed
from stratus.handlers.callout import AuthCallout, CalloutThread
from stratus.handlers.catalog import all_handlers
from stratus.handlers.credentials import mint
from stratus.handlers.identity import DEFAULT_TTL_S, bootstrap_admin, signing_key_event
from stratus.handlers.image_service import ImageService
from stratus.handlers.integrations import WebhookKeys
from stratus.handlers.keyring import SERVICE_TTL_S, KeyRing
from stratus.handlers.natsauth import BrokerKeys, broker_auth_config
from stratus.handlers.rbac import RoleBook
from stratus.handlers.reports import ReportRelay
from stratus.handlers.scheduler import SchedulerConfig, SchedulerService
from stratus.handlers.service import CommandService
from stratus.handlers.targets import TargetPolicy
from stratus.handlers.tokens import Verifier
from stratus.handlers.webhooks import WebhookService
from stratus.handlers.webhooks import register_query as register_webhook_query
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.query import QueryService
from stratus.projections.rebuild import LiveProjection, SwapService, live_store_path

log = structlog.get_logger("stratus.up")


def broker_config(keys: BrokerKeys) -> str:
    """The auth part of this stack's nats-server configuration (the same
    function renders every node's: ``broker_auth_config``)."""
    return broker_auth_config(keys.auth_user, keys.sys_user, keys.issuer)


def check_cluster_size(nodes: int) -> None:
    """1 (one node) or an odd number of nodes: an even one adds a node
    that must agree without letting one more fail (4 nodes survive one
    loss, as 3 do), so it is refused."""
    if nodes < 1 or nodes % 2 == 0:
        raise ValueError(
            f"--cluster {nodes}: a cluster needs an odd number of nodes (1, 3, 5): "
            f"{nodes} nodes tolerate no more failures than {nodes - 1}, since a majority "
            "must stay up (no quorum gain)"
        )


async def ensure_log(
    store: EventStore, replicas: int | None = None, *, wait: bool = False, timeout: float = 60.0
) -> int:
    """The stream and every bucket, created (or kept) with the log's replica
    count; with ``wait``, until each has a leader and every replica is
    current. Idempotent: ``up``, ``init`` and a restart all call it."""
    from stratus.events import heartbeat
    from stratus.events.blobs import BlobStore
    from stratus.handlers import webhooks

    deadline = time.monotonic() + timeout
    while True:
        # A cluster that is just forming has no JetStream leader yet: its
        # API calls time out until one is elected. And one whose node is
        # slow to report refuses to place replicas ("no suitable peers
        # for placement, peer offline") for a moment, the buckets' as
        # well as the stream's: every step is made again (each keeps what
        # is there already) until all are made.
        try:
            have = await store.ensure_stream(replicas)  # (and the heartbeat bucket)
            blobs = await BlobStore.open(store.js, like_stream=store.stream)
            await webhooks.deliveries_bucket(store)
            break
        except (StratusError, TimeoutError, nats.errors.Error) as exc:
            err = exc if isinstance(exc, StratusError) else broker_error(exc)
            if not isinstance(err, Unavailable) or not wait or time.monotonic() >= deadline:
                raise err from None
            await asyncio.sleep(0.2)
    if wait:
        streams = [
            store.stream,
            f"KV_{heartbeat.HEARTBEATS}",
            blobs.stream,
            f"KV_{webhooks.BUCKET}",
        ]
        await wait_whole(store.js, streams, max(1.0, deadline - time.monotonic()))
    return have


async def init_cloud(
    url: str,
    data_dir: Path,
    *,
    admin_password: str | None = None,
    replicas: int | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``stratus init`` on an existing JetStream cluster, idempotently: the
    stream and every bucket (waiting until each has a leader and current
    replicas), the public signing keys on the log, and the first admin.
    The broker and signing keys are those of ``data_dir``; an auth callout
    of its own admits this process's connection (the nodes may have no
    other running yet), beside any already running (a queue group)."""
    from stratus.cli.creds import local_creds

    keyring = KeyRing.load_or_create(data_dir / "keys")
    keys = BrokerKeys.load_or_create(data_dir / BROKER_DIR)
    callout = AuthCallout(url, keys, trusted_keys=keyring.public_keys())
    # One budget for the whole of init: each wait below gets what is left.
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    while True:
        # A cluster that is just forming may not route the callout's
        # subscription to every node yet.
        try:
            await callout.start()
            break
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)
    store: EventStore | None = None
    services: list[Any] = []
    # The command handlers need no projection store (only queries read one).
    engine = make_engine("sqlite+aiosqlite://")
    try:
        store = await EventStore.connect(
            url, persistent=False, creds=local_creds(data_dir, "handlers", ttl_s=600)
        )
        have = await ensure_log(store, replicas, wait=True, timeout=left())
        await publish_signing_keys(store, keyring)
        try:
            await callout.wait_ready(left())
        except TimeoutError:
            raise Unavailable(
                f"init: the auth callout did not catch up with the log within {timeout:g}s"
            ) from None
        started = await start_services(store, engine, keyring, queries=False)
        services = list(started.parts)
        assert started.commands is not None
        created = await bootstrap_admin(started.commands, admin_password)
        state = await stream_cluster(store.js, store.stream)
    finally:
        for svc in services:
            with contextlib.suppress(Exception):
                await svc.stop()
        if store is not None:
            await store.close()
        await engine.dispose()
        with contextlib.suppress(Exception):
            await callout.stop()
    return {
        "replicas": have,
        "stream_leader": state["leader"],
        "cluster": state["name"],
        "admin_created": created is not None,
        "admin_password": created if created and not admin_password else None,
        "signing_keys": sorted(keyring.public_keys()),
    }


def auth_block(data_dir: Path) -> str:
    """The authorization block every node's configuration must hold for
    this cloud: the auth callout's and the system account's users and the
    callout itself, by their public keys only (``data_dir``'s broker keys),
    so it is the same on every node and may be printed."""
    return broker_config(BrokerKeys.load_or_create(data_dir / BROKER_DIR))


async def publish_signing_keys(store: EventStore, keyring: KeyRing) -> None:
    """Put every public key on the log once, so any verifier can learn it."""
    cause = Cause(actor="system", correlation_id=new_id(), causation_id="bootstrap")
    for kid, public in keyring.public_keys().items():
        event = signing_key_event(kid, public, cause)
        with contextlib.suppress(ConcurrencyConflict):
            await store.append([event], Condition(event.subject, 0))


class Services(NamedTuple):
    """What ``start_services`` started; ``parts`` in the order to stop them."""

    feed: IdentityFeed
    commands: CommandService | None
    queries: QueryService | None
    relay: ReportRelay | None

    @property
    def parts(self) -> list[Any]:
        return [p for p in (self.relay, self.commands, self.queries, self.feed) if p is not None]


async def start_services(
    store: EventStore,
    engine: AsyncEngine | None,
    keyring: KeyRing | None,
    *,
    commands: bool = True,
    queries: bool = True,
    token_ttl_s: int = DEFAULT_TTL_S,
    quota_defaults: dict[str, int] | None = None,
    webhook_policy: TargetPolicy | None = None,
    webhook_keys: WebhookKeys | None = None,
) -> Services:
    """The identity feed first (keys, revocations), then the services asked
    for; with the command service, the relay of the agents' reports."""
    verifier = Verifier()
    book = RoleBook()
    feed = IdentityFeed(store, verifier, book)
    await feed.start()
    authenticate = Authenticator(verifier)
    cmd_svc = q_svc = relay = None
    if commands:
        cmd_svc = CommandService(
            store,
            all_handlers(keyring, token_ttl_s, quota_defaults, webhook_policy, webhook_keys),
            authenticate=authenticate,
            roles=book,
        )
        await cmd_svc.start()
        relay = ReportRelay(store)
        await relay.start()
    if queries:
        assert engine is not None, "the query service reads a projection store"
        q_svc = QueryService(
            store,
            engine,
            authenticate=authenticate,
            authorize=book.authorize,
            quota_defaults=quota_defaults,
        )
        register_webhook_query(q_svc, store)
        await q_svc.start()
    return Services(feed, cmd_svc, q_svc, relay)


class DataDirBusy(RuntimeError):
    pass


# Broker supervision: restarts in a row before giving up, the back-off
# before each (the first at once), and how long a broker must have run for
# its death to start a new count.
MAX_RESTARTS = 5
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)
STABLE_AFTER_S = 60.0


class Stack:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 4222,
        db_url: str | None = None,
        hosts: int = 0,
        libvirt_uri: str = "test:///default",
        admin_password: str | None = None,
        token_ttl_s: int = DEFAULT_TTL_S,
        quota_defaults: dict[str, int] | None = None,
        scheduler_replicas: int = 1,
        scheduler_config: SchedulerConfig | None = None,
        webhook_allow: list[str] | None = None,
        console_port: int | None = None,
        openstack_port: int | None = None,
        cluster: int = 1,
        callout_thread: bool = True,
    ) -> None:
        # The auth callout on a loop of its own (``CalloutThread``), or (the
        # connect benchmark's comparison) on this one.
        self.callout_thread = callout_thread
        # Brokers: 1 is the single node; an odd N > 1 is N nodes on
        # loopback forming one JetStream cluster (the log and buckets R3).
        check_cluster_size(cluster)
        self.cluster = cluster
        # The web console on 127.0.0.1 (0: any free port; None: none).
        self.console_port = console_port
        self.console: Any = None
        self.console_url: str | None = None
        self.token_ttl_s = token_ttl_s
        # Where webhooks may point: the command handlers check it when one is
        # created, the delivery service at every POST.
        self.webhook_policy = TargetPolicy(webhook_allow or ())
        # None: no OpenStack API; 0: on any free port.
        self.openstack_port = openstack_port
        self.openstack_api: Any = None
        self.scheduler_replicas = scheduler_replicas
        self.scheduler_config = scheduler_config
        self.schedulers: list[SchedulerService] = []
        # The allocator of two-level scheduling (offers to frameworks).
        self.allocator: Any = None
        self.quota_defaults = quota_defaults
        self.data_dir = Path(data_dir)
        # None: generate one on first start (returned by start(), printed once).
        self.admin_password = admin_password
        self.feed: IdentityFeed | None = None
        self.port = port
        self.db_url = db_url or sqlite_url(live_store_path(self.data_dir))
        self.hosts = hosts
        self.libvirt_uri = libvirt_uri
        self.agents: list[Any] = []
        self.network: Any = None  # simulated hosts and their network agents
        self.brokers: list[EmbeddedNats] = []
        self.store: EventStore | None = None
        self.commands: CommandService | None = None
        self.images: ImageService | None = None
        self.queries: QueryService | None = None
        self.live: LiveProjection | None = None
        self.swapper: SwapService | None = None
        self._lock_file: IO[str] | None = None
        self.url: str | None = None
        self.callout: CalloutThread | AuthCallout | None = None
        self.keyring: KeyRing | None = None
        self.relay: ReportRelay | None = None
        # Every connection of the services (each with its own credential).
        self.stores: list[EventStore] = []
        self._service_parts: list[Any] = []
        self.prefix = deployment_prefix(self.data_dir)
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        # Set when the broker could not be kept running; ``failure`` says why.
        self.failed = asyncio.Event()
        self.failure = ""
        self.broker_restarts = 0
        self.webhooks: WebhookService | None = None
        # WebhookService keyword arguments (retries, backoff, timeout).
        self.webhook_options: dict[str, Any] = {}

    def _lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / "lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DataDirBusy(f"another stratus up is running on {self.data_dir}") from None
        self._lock_file = f

    async def start(self) -> str:
        self._lock()
        try:
            keyring = self.keyring = KeyRing.load_or_create(self.data_dir / "keys")
            keys = BrokerKeys.load_or_create(self.data_dir / BROKER_DIR)
            auth = broker_config(keys)
            self.brokers = self._make_brokers(auth)
            await self._stop_leftover_broker()
            self.brokers, urls = await start_nodes(self.brokers, lambda: self._make_brokers(auth))
            url = self.url = ",".join(urls)
            self._supervisors = [
                asyncio.create_task(self._supervise_broker(b)) for b in self.brokers
            ]
            # The callout first: it admits every other connection, services'
            # too, by the key ring's public keys until the log has them.
            # (on a loop of its own: admitting waits for none of the services)
            kind = CalloutThread if self.callout_thread else AuthCallout
            self.callout = kind(url, keys, trusted_keys=keyring.public_keys())
            await self.callout.start()
            self.store = await self.connect("handlers")
            await ensure_log(self.store, replicas_for(self.cluster), wait=self.cluster > 1)
            await publish_signing_keys(self.store, keyring)
            await self.callout.wait_ready()
            engine = make_engine(self.db_url)
            reader = await self.connect("query")
            # The projector's own credential: it may take the projector lease.
            self.live = LiveProjection(await self.connect("projector"), engine)
            await self.live.start()
            webhook_keys = WebhookKeys.load_or_create(self.data_dir / "keys")
            services = await start_services(
                self.store,
                None,
                keyring,
                queries=False,
                token_ttl_s=self.token_ttl_s,
                quota_defaults=self.quota_defaults,
                webhook_policy=self.webhook_policy,
                webhook_keys=webhook_keys,
            )
            self.feed, self.commands, self.relay = services.feed, services.commands, services.relay
            queries = await start_services(
                reader, engine, None, commands=False, quota_defaults=self.quota_defaults
            )
            self.queries = queries.queries
            self._service_parts = [*services.parts, *queries.parts]
            assert self.commands is not None and self.queries is not None
            if self.cluster > 1:
                self.queries.cluster_nodes = self.node_states
            self.images = ImageService(
                self.store,
                spool=self.data_dir / "image-spool",
                authenticate=self.commands.authenticate,
                roles=self.commands.roles,
            )
            await self.images.start()
            self.swapper = SwapService(
                reader,
                self.live,
                self.queries,
                self.data_dir,
                authenticate=self.queries.authenticate,
            )
            await self.swapper.start()
            for _ in range(self.scheduler_replicas):
                # Replicas share the work consumer; each keeps its own host table.
                sched = SchedulerService(await self.connect("scheduler"), self.scheduler_config)
                await sched.start()
                self.schedulers.append(sched)
            from stratus.handlers.allocator import AllocatorService

            self.allocator = AllocatorService(await self.connect("allocator"))
            await self.allocator.start()
            self.webhooks = WebhookService(
                await self.connect("webhooks"),
                webhook_keys,
                policy=self.webhook_policy,
                **self.webhook_options,
            )
            await self.webhooks.start()
            self.admin_password = await bootstrap_admin(self.commands, self.admin_password)
            (self.data_dir / URL_FILE).write_text(url + "\n")
            if self.openstack_port is not None:
                await self._start_openstack_api(url)
            await self._start_agents()
            if self.hosts:
                await self._start_network()
            if self.console_port is not None:
                await self._start_console(url)
            log.info("stratus ready", url=url, data_dir=str(self.data_dir))
            return url
        except BaseException:
            await self.stop()
            raise

    async def connect(self, kind: str, host: str = "") -> EventStore:
        """A connection of its own for a service of ``kind`` (for ``host``),
        admitted by a credential signed here and kept in memory only."""
        assert self.keyring is not None and self.url is not None
        creds, _ = mint(self.keyring, kind, host, SERVICE_TTL_S)
        store = await EventStore.connect(self.url, creds=creds)
        self.stores.append(store)
        return store

    async def _start_openstack_api(self, url: str) -> None:
        """The OpenStack API: a gateway like the console (with an openstack-api
        credential: requests and its own inbox only)."""
        from stratus.api.app import ApiServer, bind

        sock = bind(f"127.0.0.1:{self.openstack_port}")
        from stratus.cli.openstack_api import SPOOL_DIR

        assert self.keyring is not None and self.queries is not None
        creds, _ = mint(self.keyring, "openstack-api", "", SERVICE_TTL_S)
        self.openstack_api = ApiServer(
            url, sock, self.data_dir / SPOOL_DIR, connect=creds.connect_options()
        )
        auth_url = await self.openstack_api.start()
        self.queries.endpoints["openstack_auth_url"] = auth_url

    def node_states(self) -> list[dict[str, Any]]:
        """Each broker node: its name, client URL and whether it runs."""
        return [{"name": b.server_name, "url": b.url, "alive": b.running()} for b in self.brokers]

    @property
    def broker(self) -> EmbeddedNats | None:
        """The (first) broker."""
        return self.brokers[0] if self.brokers else None

    def _make_brokers(self, auth: str) -> list[EmbeddedNats]:
        """One broker in ``DIR/nats``, or the cluster's nodes in
        ``DIR/nats-1``... A data dir keeps the form its log was made in:
        a single node's store cannot become a cluster's, nor the reverse."""
        single, first = self.data_dir / "nats" / "jetstream", self.data_dir / "nats-1"
        if self.cluster == 1:
            if first.exists() and not single.exists():
                raise BrokerError(
                    f"{self.data_dir} holds the log of a cluster: start it with --cluster "
                    f"{len(list(self.data_dir.glob('nats-*[0-9]')))}, or use another data dir"
                )
            return [
                EmbeddedNats(
                    self.data_dir / "nats",
                    port=-1 if self.port == 0 else self.port,
                    log_file=str(self.data_dir / "nats.log"),
                    extra_config=auth,
                )
            ]
        if single.exists():
            raise BrokerError(
                f"{self.data_dir} holds the log of a single node: start it without --cluster, "
                "or use another data dir for the cluster"
            )
        have = len(list(self.data_dir.glob("nats-*[0-9]")))
        if have and have != self.cluster:
            raise BrokerError(
                f"{self.data_dir} holds the log of a {have}-node cluster: start it with "
                f"--cluster {have}, or use another data dir"
            )
        return cluster_nodes(
            self.data_dir,
            self.cluster,
            name=self.prefix,
            port=self.port,
            extra_config=auth,
            log_dir=self.data_dir,
        )

    async def _stop_leftover_broker(self) -> None:
        """A nats-server still running on this data dir (its ``up`` was
        killed before it could stop it) is stopped: this process holds the
        data dir's lock, so no live ``up`` owns it."""
        pids = [pid for b in self.brokers for pid in b.holders()]
        for pid in pids:
            log.warning("stopping a leftover nats-server of this data dir", pid=pid)
            print(f"stratus: stopping a leftover nats-server (pid {pid}) of {self.data_dir}")
            if not await asyncio.to_thread(stop_pid, pid):
                raise StoreInUse(
                    f"a leftover nats-server (pid {pid}) of {self.data_dir} survived SIGKILL: "
                    f"make sure it is gone (kill -9 {pid}) and run stratus up again",
                    [pid],
                )

    async def _supervise_broker(self, broker: EmbeddedNats) -> None:
        """Start ``broker`` again whenever it dies; give up after
        ``MAX_RESTARTS`` failures in a row (``failed`` is then set)."""
        failures = 0
        started = time.monotonic()
        while True:
            code = await broker.wait_exit()
            if self._stopping:
                return
            if time.monotonic() - started >= STABLE_AFTER_S:
                failures = 0
            log.error("nats-server exited; restarting it", code=code, log=broker.log_file)
            last = f"it exited with {code}"
            while True:
                if failures >= MAX_RESTARTS:
                    self.failure = (
                        f"nats-server failed {MAX_RESTARTS} times in a row (last: {last}); "
                        f"see {broker.log_file}"
                    )
                    log.error("giving up on the broker", reason=self.failure)
                    self.failed.set()
                    return
                await asyncio.sleep(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])
                failures += 1
                if self._stopping:
                    return
                try:
                    await broker.restart_async()
                except Exception as exc:  # the port taken, the store locked...
                    last = str(exc)
                    log.error("nats-server restart failed", attempt=failures, error=last)
                    continue
                self.broker_restarts += 1
                started = time.monotonic()
                log.warning("nats-server restarted", pid=broker.pid, attempt=failures)
                break

    async def _start_console(self, url: str) -> None:
        """The web console: a client of this stack like any browser's CLI
        (with a console credential: requests and its own inbox only)."""
        from stratus.console.server import ConsoleServer

        assert self.queries is not None
        assert self.keyring is not None
        creds, _ = mint(self.keyring, "console", "", SERVICE_TTL_S)
        self.console = ConsoleServer(
            url, "127.0.0.1", self.console_port or 0, creds.connect_options()
        )
        self.console_url = await self.console.start()
        self.queries.endpoints["console_url"] = self.console_url

    async def _start_network(self) -> None:
        """Simulated hosts in namespaces and their network agents, when allowed."""
        from stratus.agents.network.service import SimulatedPlane, network_capable

        why = network_capable()
        if why is not None:
            log.warning(why, hosts=self.hosts)
            print(f"stratus: {why}", flush=True)
            return
        assert self.store is not None
        # Kernel names carry a prefix of this data directory's own, so two
        # stacks on one machine never touch each other's namespaces.
        self.network = SimulatedPlane(
            self.store,
            self.hosts,
            prefix=self.prefix,
            state_dir=self.data_dir / "network",
            store_for=lambda host: self.connect("network-agent", host),
        )
        await self.network.start()

    async def _start_agents(self) -> None:
        """One compute agent per simulated host, ``host-01`` ... (same names
        on every start, so a restart finds its hosts and instances again)."""
        from stratus.agents.compute.agent import build_agent

        assert self.store is not None
        for i in range(1, self.hosts + 1):
            name = f"host-{i:02d}"
            agent = build_agent(
                await self.connect("compute-agent", name),
                name,
                libvirt_uri=self.libvirt_uri,
                data_dir=self.data_dir / "hosts" / name,
                # Container cgroups carry the prefix: another stack's agent
                # of a host with the same name never sees them.
                deployment=self.prefix,
                # Simulated hosts all share this machine: a fixed, modest size.
                vcpus=16,
                ram_mb=65536,
                disk_gb=500,
            )
            self.agents.append(agent)
            await agent.start()

    async def stop(self) -> None:
        self._stopping = True
        for sup in self._supervisors:
            await cancel(sup)
        self._supervisors = []
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / URL_FILE).unlink()
        if self.openstack_api is not None:
            with contextlib.suppress(Exception):
                await self.openstack_api.stop()
            self.openstack_api = None
        if self.console is not None:
            with contextlib.suppress(Exception):
                await self.console.stop()
            self.console = None
        if self.network is not None:
            # The hosts' namespaces go too: a restart rebuilds them from the log.
            with contextlib.suppress(Exception):
                await self.network.stop(teardown=True)
            self.network = None
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.stop()
                agent.close()
        self.agents = []
        for svc in (
            self.webhooks,
            *self.schedulers,
            self.allocator,
            self.swapper,
            self.images,
            *self._service_parts,
        ):
            if svc is not None:
                with contextlib.suppress(Exception):
                    await svc.stop()
        self.schedulers, self._service_parts = [], []
        if self.live is not None:
            await self.live.stop()
        for store in self.stores:
            await store.close()
        self.stores = []
        if self.callout is not None:
            with contextlib.suppress(Exception):
                await self.callout.stop()
            self.callout = None
        if self.live is not None:
            await self.live.engine.dispose()
        await asyncio.gather(*(asyncio.to_thread(b.stop) for b in self.brokers))
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
