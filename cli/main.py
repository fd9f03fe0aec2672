"""The ``stratus`` command (see shared/CLI.md for the contract)."""

# No ``from __future__ import annotations`` here: typer reads every command's
# signature at each start, and string annotations would be evaluated anew
# each time (twice per command), a third of the CLI's start-up.

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from stratus.cli.common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    AtOpt,
    OutputOpt,
    Service,
    fail,
    group,
    resolve_url,
    run,
    save_token,
    send,
    settings,
)
from stratus.cli.output import Format, emit
from stratus.events.errors import StratusError

if TYPE_CHECKING:
    from stratus.cli.client import Client

app = group("Stratus, an event-sourced cloud control plane.")
tenant_app = group("Tenants (projects).")
events_app = group("The event log.")
user_app = group("Users.")
role_app = group("Role assignments (user, tenant, role).")
token_app = group("Tokens.")
projections_app = group("The projection store (read models).")
scheduler_app = group("The scheduler's placement decisions.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(events_app, name="events")
app.add_typer(user_app, name="user")
app.add_typer(role_app, name="role")
app.add_typer(token_app, name="token")
app.add_typer(projections_app, name="projections")
app.add_typer(scheduler_app, name="scheduler")


@app.callback()
def _global(
    url: Annotated[
        str | None, typer.Option(envvar="STRATUS_URL", help="NATS URL of the control plane")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="STRATUS_TOKEN", help="bearer token")] = None,
) -> None:
    settings.url = url
    settings.token = token


QuotaDefaultOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--quota-default",
        help="RESOURCE=N, repeat: the limit of tenants no `quota set` touched "
        "(give every handler and query process the same)",
    ),
]


def parse_quota_defaults(pairs: list[str] | None) -> dict[str, int] | None:
    from stratus.events.resources import QUOTA_DEFAULTS

    if not pairs:
        return None
    out: dict[str, int] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        try:
            n = int(v)
        except ValueError:
            n = -2
        if not sep or k not in QUOTA_DEFAULTS or n < -1:
            typer.echo(
                f"error: --quota-default wants RESOURCE=N (N >= -1), RESOURCE one of "
                f"{', '.join(QUOTA_DEFAULTS)}; got {p!r}",
                err=True,
            )
            raise typer.Exit(EXIT_USAGE)
        out[k] = n
    return out


# -- running it ---------------------------------------------------------------

SchedulerConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="scheduler: TOML file with filters, weighers (name = multiplier), "
        "host_subset_size, max_attempts",
    ),
]
SeedOpt = Annotated[
    int | None, typer.Option(help="scheduler: seed of the top-k pick (reproducible runs)")
]


WebhookAllowOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="CIDR that webhooks may reach although internal (repeatable; cloud admin); "
        "give handlers and the webhook service the same",
    ),
]


def webhook_policy_from(networks: list[str] | None) -> Any:
    """Where webhooks may point, or a usage error naming a bad network."""
    from stratus.handlers.targets import TargetPolicy

    try:
        return TargetPolicy(networks or ())
    except StratusError as err:
        typer.echo(f"error: --webhook-allow-network: {err.message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def scheduler_config_from(path: Path | None, seed: int | None = None) -> Any:
    """The scheduler's configuration, or a usage error naming what is wrong."""
    from stratus.handlers.scheduler import load_config

    try:
        return load_config(path, seed=seed)
    except StratusError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


@app.command()
def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="where the log, projections and logs live")
    ] = None,
    port: Annotated[int, typer.Option(help="NATS client port on 127.0.0.1 (0: any free)")] = 4222,
    hosts: Annotated[int, typer.Option(help="simulated hosts, one compute agent each")] = 0,
    libvirt_uri: Annotated[
        str, typer.Option(help="the simulated hosts' hypervisor")
    ] = "test:///default",
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the projection store")] = None,
    admin_password: Annotated[
        str | None,
        typer.Option(
            envvar="STRATUS_ADMIN_PASSWORD",
            help="password of the bootstrap user admin (first start; else one is generated)",
        ),
    ] = None,
    token_ttl: Annotated[
        int, typer.Option(min=60, max=24 * 3600, help="lifetime of login tokens, seconds")
    ] = 8 * 3600,
    quota_default: QuotaDefaultOpt = None,
    scheduler_replicas: Annotated[
        int, typer.Option(min=0, max=16, help="scheduler replicas sharing the placements")
    ] = 1,
    scheduler_config: SchedulerConfigOpt = None,
    webhook_allow_network: WebhookAllowOpt = None,
    console_port: Annotated[
        int,
        typer.Option(
            min=-1, max=65535, help="web console port on 127.0.0.1 (0: any free, -1: none)"
        ),
    ] = 0,
    openstack_port: Annotated[
        int | None,
        typer.Option(
            help="the OpenStack API's port on 127.0.0.1 (default 5000; with --port 0 any "
            "free port; -1: no API)"
        ),
    ] = None,
    cluster: Annotated[
        int,
        typer.Option(
            min=1,
            max=7,
            help="nats-server nodes on loopback forming one JetStream cluster (odd: 1, 3, 5)",
        ),
    ] = 1,
) -> None:
    """Start nats-server, the projection store and every service; Ctrl-C stops."""
    from stratus.cli import logs
    from stratus.cli.runtime import DataDirBusy, Stack, check_cluster_size, default_data_dir
    from stratus.events.broker import BrokerError

    try:
        check_cluster_size(cluster)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None

    defaults = parse_quota_defaults(quota_default)
    sched_config = scheduler_config_from(scheduler_config)
    webhook_policy_from(webhook_allow_network)  # a bad network is a usage error
    api_port = _openstack_port(openstack_port, port)
    data_dir = data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs.configure("INFO", json_file=data_dir / "stratus.log")

    async def main() -> None:
        stack = Stack(
            data_dir,
            port=port,
            db_url=db,
            hosts=hosts,
            libvirt_uri=libvirt_uri,
            admin_password=admin_password,
            token_ttl_s=token_ttl,
            quota_defaults=defaults,
            scheduler_replicas=scheduler_replicas,
            scheduler_config=sched_config,
            webhook_allow=webhook_allow_network,
            openstack_port=api_port,
            console_port=None if console_port < 0 else console_port,
            cluster=cluster,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await stack.start()
        if stack.admin_password and not admin_password:
            # Shown once: it is stored nowhere but as a hash on the log.
            print(f"bootstrap user admin, password: {stack.admin_password}", flush=True)
        if stack.console_url:
            print(f"console: {stack.console_url}", flush=True)
        if stack.openstack_api is not None:
            print(f"openstack api: {stack.openstack_api.auth_url}", flush=True)
        print(f"stratus ready: {url} (data dir {data_dir})", flush=True)
        try:
            # Until a signal, or until the broker cannot be kept running.
            waits = [asyncio.create_task(e.wait()) for e in (stop, stack.failed)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            print("stratus stopping", flush=True)
            await stack.stop()
        if stack.failed.is_set():
            raise BrokerError(f"giving up: {stack.failure}")

    try:
        asyncio.run(main())
    except DataDirBusy as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except StratusError as err:
        raise fail(err) from None
    except Exception as exc:  # the broker would not start, say
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None


def _openstack_port(asked: int | None, nats_port: int) -> int | None:
    """The API's port for `up`: as asked (-1: none), else 5000, or any free
    one when the broker's port is chosen freely too (tests, parallel stacks)."""
    if asked is not None:
        if asked < -1 or asked > 65535:
            typer.echo("error: --openstack-port wants 0-65535, or -1 for none", err=True)
            raise typer.Exit(EXIT_USAGE)
        return None if asked == -1 else asked
    return 0 if nats_port == 0 else 5000


@app.command()
def status(output: OutputOpt = Format.table, at: AtOpt = None) -> None:
    """Exit 0 when the control plane answers; show the log and projector state."""
    data = run(lambda c: c.query("status", at=at))
    emit(data, output)


@app.command()
def init(
    url: Annotated[
        str | None,
        typer.Option(envvar="STRATUS_URL", help="the cluster's nodes: nats://a:4222,nats://b:4222"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the broker keys and token signing keys are kept")
    ] = None,
    admin_password: Annotated[
        str | None,
        typer.Option(envvar="STRATUS_ADMIN_PASSWORD", help="password of the first admin"),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, max=5, help="copies of the log (default: 3 on >= 3 nodes, else 1)"),
    ] = None,
    auth_file: Annotated[
        Path | None,
        typer.Option(help="write the nodes' authorization block here (0600), for `include`"),
    ] = None,
    config_only: Annotated[
        bool, typer.Option("--config-only", help="print the node configuration; touch no server")
    ] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Prepare an existing JetStream cluster: stream, buckets, first admin,
    signing key (idempotent); print what each node's configuration holds."""

    from stratus.cli.datadir import default_data_dir
    from stratus.cli.runtime import auth_block, init_cloud
    from stratus.events.broker import AUTH_INCLUDE, node_configs
    from stratus.events.cluster import server_list

    data_dir = data_dir or default_data_dir()
    try:
        servers = server_list(url or resolve_url())
    except StratusError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    block = auth_block(data_dir)
    if auth_file is not None:
        fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(block)
    from urllib.parse import urlsplit

    parsed = [urlsplit(u) for u in servers]
    configs = node_configs(
        [(u.hostname or "", str(u.port or 4222)) for u in parsed],
        [(u.hostname or "", "6222") for u in parsed],
        store_dir="/var/lib/stratus/nats",
        include=str(auth_file.name) if auth_file else AUTH_INCLUDE,
    )
    # The node configuration on stderr: stdout stays the result (-o json).
    err = sys.stderr
    for i, text in enumerate(configs, start=1):
        err.write(f"# --- node {i} ({servers[i - 1]}): nats-server.conf ---\n{text}")
    err.write(f"# --- {auth_file or AUTH_INCLUDE} (beside each node's config, mode 0600) ---\n")
    err.write(block if auth_file is None else f"# written to {auth_file}\n")
    if config_only:
        return
    from stratus.cli import logs

    # Its services' logs (the callout's) go to stderr: stdout is the result.
    logs.configure("WARNING")
    try:
        result = asyncio.run(
            init_cloud(
                ",".join(servers), data_dir, admin_password=admin_password, replicas=replicas
            )
        )
    except StratusError as err_:
        raise fail(err_) from None
    if result["admin_password"]:
        print(f"first admin: user admin, password: {result['admin_password']}", file=sys.stderr)
    emit({k: v for k, v in result.items() if k != "admin_password"}, output)


# -- serve: one service alone, from one table ----------------------------------


class ServeOptions(NamedTuple):
    data_dir: Path
    quota_defaults: dict[str, int] | None
    insecure: bool
    config: Path | None
    seed: int | None
    # What followed the service's name: the agents' own options.
    args: list[str]
    # Networks webhooks may reach although internal (handlers and webhooks).
    webhook_allow: list[str]
    # The service's credentials file (``--creds``), None without one.
    creds: Any = None
    url: str = ""
    admin_password: str | None = None


def _alone(factory: Callable[[ServeOptions], Service]) -> Callable[[ServeOptions], Service]:
    """A service whose options are all ``serve``'s: anything more is a usage error."""

    def checked(o: ServeOptions) -> Service:
        if o.args:
            typer.echo(f"error: unexpected arguments {' '.join(o.args)}", err=True)
            raise typer.Exit(EXIT_USAGE)
        return factory(o)

    return checked


def _one(name: str, make: Callable[[Any, Any], Any]) -> Service:
    """A service that is one object with ``start`` and ``stop``, made from
    the event store and the projection store."""

    async def start(store: Any, engine: Any) -> list[Any]:
        svc = make(store, engine)
        await svc.start()
        return [svc]

    return Service(name, start)


def _webhook_keys(o: ServeOptions) -> Any:
    """The webhook master key a handlers or webhooks credentials file carries."""
    from stratus.handlers.integrations import WebhookKeys

    master = getattr(o.creds, "webhook_master", "")
    return WebhookKeys(master.encode()) if master else None


def _requests(o: ServeOptions, *, commands: bool) -> Service:
    """The command service (``commands``) or the query service, behind the
    identity feed that authenticates their callers (or trusting every
    caller: ``--insecure-no-auth``)."""
    from stratus.cli.runtime import start_services
    from stratus.handlers.catalog import all_handlers
    from stratus.handlers.identity import bootstrap_admin
    from stratus.handlers.image_service import ImageService
    from stratus.handlers.keyring import KeyRing
    from stratus.handlers.service import CommandService
    from stratus.projections.query import QueryService

    name, defaults = ("handlers" if commands else "query"), o.quota_defaults
    spool = o.data_dir / "image-spool"
    policy = webhook_policy_from(o.webhook_allow)  # a bad network stops us before connecting
    if o.insecure:
        if commands:

            async def start_insecure(store: Any, _engine: Any) -> list[Any]:
                # Image bytes are written through the handlers too.
                handlers = all_handlers(quota_defaults=defaults, webhook_policy=policy)
                cmd = CommandService(store, handlers)
                images = ImageService(store, spool=spool)
                await cmd.start()
                await images.start()
                return [images, cmd]

            return Service(name, start_insecure)
        return _one(
            name, lambda store, engine: QueryService(store, engine, quota_defaults=defaults)
        )

    async def start(store: Any, engine: Any) -> list[Any]:
        # Logging in needs the private signing keys (a handlers credentials
        # file carries them); verifying needs none.
        ring = getattr(o.creds, "signing_keys", None)
        keyring = KeyRing.from_pem(ring.order, ring.pem) if commands and ring else None
        services = await start_services(
            store,
            engine,
            keyring,
            commands=commands,
            queries=not commands,
            quota_defaults=defaults,
            webhook_policy=policy,
            webhook_keys=_webhook_keys(o),
        )
        if services.commands is not None and o.admin_password:
            await bootstrap_admin(services.commands, o.admin_password)
        cmd = services.commands
        if cmd is None:
            return services.parts
        # Image bytes are written through the handlers too.
        images = ImageService(store, spool=spool, authenticate=cmd.authenticate, roles=cmd.roles)
        await images.start()
        return [images, *services.parts]

    return Service(name, start)


def _projector(o: ServeOptions) -> Service:
    from stratus.cli.projector import projector_service

    return projector_service(o.args)


@_alone
def _scheduler(o: ServeOptions) -> Service:
    from stratus.handlers.scheduler import SchedulerService

    config = scheduler_config_from(o.config, o.seed)  # a bad file stops us before connecting
    return _one("scheduler", lambda store, _: SchedulerService(store, config))


@_alone
def _allocator(o: ServeOptions) -> Service:
    from stratus.handlers.allocator import AllocatorService

    return _one("allocator", lambda store, _: AllocatorService(store))


@_alone
def _webhooks(o: ServeOptions) -> Service:
    from stratus.handlers.webhooks import WebhookService

    keys = _webhook_keys(o)
    if keys is None:
        typer.echo("error: the webhook service needs webhooks credentials (--creds)", err=True)
        raise typer.Exit(EXIT_USAGE)
    policy = webhook_policy_from(o.webhook_allow)
    return _one("webhooks", lambda store, _: WebhookService(store, keys, policy=policy))


@_alone
def _auth_callout(o: ServeOptions) -> Service:
    from stratus.handlers.callout import AuthCallout
    from stratus.handlers.natsauth import BrokerKeys

    c = o.creds
    if c is None or c.kind != "auth-callout":
        typer.echo("error: the auth callout needs auth-callout credentials (--creds)", err=True)
        raise typer.Exit(EXIT_USAGE)
    keys = BrokerKeys(c.auth_seed, c.sys_seed, c.issuer_seed)
    trusted = {kid: bytes.fromhex(raw) for kid, raw in c.public_keys.items()}

    async def start(_store: Any, _engine: Any) -> list[Any]:
        callout = AuthCallout(o.url, keys, trusted_keys=trusted)
        await callout.start()
        return [callout]

    # Its connections are its own (the broker's configured users).
    return Service("auth-callout", start, own_connection=True)


def _compute_agent(o: ServeOptions) -> Service:
    from stratus.cli.agents import compute_agent_service

    return compute_agent_service(o.args, o.data_dir)


def _network_agent(o: ServeOptions) -> Service:
    from stratus.cli.network_agent import network_agent_service

    return network_agent_service(o.args, o.data_dir)


def _openstack_api(o: ServeOptions) -> Service:
    from stratus.cli.openstack_api import openstack_api_service

    # A gateway: each request carries its caller's token; its own credential
    # (kind openstack-api) only lets it send requests and read its inbox.
    c = o.creds
    if c is not None and c.kind != "openstack-api":
        typer.echo(f"error: --creds holds {c.label} credentials, not openstack-api ones", err=True)
        raise typer.Exit(EXIT_USAGE)
    connect = c.connect_options() if c is not None else None
    return openstack_api_service(o.args, o.url, o.data_dir, connect)


# Which of `serve`'s own options each kind reads (besides --creds,
# --insecure-no-auth and --url, which all do); the kinds in OWN_OPTIONS
# take more options of their own after the name (`serve KIND --help`).
SERVE_OPTIONS: dict[str, tuple[str, ...]] = {
    "handlers": ("--data-dir", "--admin-password", "--quota-default", "--webhook-allow-network"),
    "projector": ("--db", "--data-dir"),
    "query": ("--db", "--data-dir", "--quota-default"),
    "scheduler": ("--config", "--seed"),
    "allocator": (),
    "webhooks": ("--webhook-allow-network",),
    "auth-callout": (),
    "compute-agent": ("--data-dir",),
    "network-agent": ("--data-dir",),
    "openstack-api": ("--data-dir",),
    "console": (),
}
OWN_OPTIONS = ("projector", "compute-agent", "network-agent", "openstack-api", "console")
COMMON_OPTIONS = ("--creds", "--insecure-no-auth", "--help")


def _serve_help(ctx: typer.Context, service: str | None) -> None:
    """``serve --help``: every option, then which kinds read which; ``serve
    KIND --help``: the options that kind reads, then its own options."""
    if service not in SERVE_OPTIONS:
        typer.echo(ctx.get_help())
        typer.echo("\nOptions by kind (all: --creds, --insecure-no-auth):")
        for kind, names in SERVE_OPTIONS.items():
            own = " (and its own options: stratus serve KIND --help)" if kind in OWN_OPTIONS else ""
            typer.echo(f"  {kind:<14} {', '.join(names) or '-'}{own}")
        return
    fmt = ctx.make_formatter()
    wanted = {*COMMON_OPTIONS, *SERVE_OPTIONS[service]}
    records = [
        rec
        for param in ctx.command.get_params(ctx)
        if wanted & set(param.opts) and (rec := param.get_help_record(ctx)) is not None
    ]
    fmt.write_usage(
        f"{ctx.command_path} {service}",
        "[OPTIONS]" + (" [OWN OPTIONS]" if service in OWN_OPTIONS else ""),
    )
    with fmt.section(f"Options of serve that {service} reads"):
        fmt.write_dl(records)
    typer.echo(fmt.getvalue(), nl=False)
    if service not in OWN_OPTIONS:
        return
    typer.echo("\nIts own options (after the name):\n")
    # The kind's own command prints them and exits (0) on --help, before
    # anything is read or connected.
    if service == "console":
        from stratus.console.server import serve_console

        serve_console(["--help"], url="")
    else:
        SERVICES[service](ServeOptions(Path(), None, True, None, None, ["--help"], []))


# `stratus serve NAME`: each factory checks its options (a mistake stops it
# before anything connects) and says how to start the service.
SERVICES: dict[str, Callable[[ServeOptions], Service]] = {
    "handlers": _alone(lambda o: _requests(o, commands=True)),
    "projector": _projector,  # (options of its own: --lease-ttl)
    "query": _alone(lambda o: _requests(o, commands=False)),
    "scheduler": _scheduler,
    "allocator": _allocator,
    "webhooks": _webhooks,
    "auth-callout": _auth_callout,
    # These take options of their own (--host, ...) after the name.
    "compute-agent": _compute_agent,
    "network-agent": _network_agent,
    "openstack-api": _openstack_api,
}


# The broker's refusal of a reply (to a requester's inbox) this connection
# may no longer send.
LOST_REPLY = re.compile(r'permissions violation for publish to "_INBOX[._]', re.IGNORECASE)


class BrokerRefusal:
    """Watches a service's connection for the broker's refusals: a
    permissions violation (its credentials are of another kind or host)
    stops the service at once, said in one line (a refused reply only is
    logged: see ``LOST_REPLY``); authorization ones
    (revoked, expired, not this cloud's) once reconnecting has been refused
    for ``AUTH_GRACE_S`` without a break: while the broker restarts, its
    auth callout may not be back yet, and a refusal then means nothing."""

    AUTH_GRACE_S = 30.0

    def __init__(self, label: str) -> None:
        self.label = label
        self.line = ""
        self.refused = asyncio.Event()
        self._refused_since: float | None = None

    async def on_reconnect(self) -> None:
        """nats-py's ``reconnected_cb``: admitted again."""
        self._refused_since = None

    async def on_error(self, exc: Exception) -> None:
        """nats-py's ``error_cb`` (which must be a coroutine function)."""
        import nats.errors

        text = str(exc).removeprefix("nats: ").strip("'")
        if LOST_REPLY.match(text):
            # A reply the broker would not pass on: the request came through
            # a node that died since, and this connection, now on another
            # node, holds no permission to answer it (nor could the answer
            # reach the asker there). The asker sends it again; nothing is
            # wrong with these credentials.
            import structlog

            structlog.get_logger("stratus.serve").warning("a reply was lost", refused=text)
        elif "permissions violation" in text.lower():
            self._refuse(f"the broker refused {text[len('permissions violation for ') :]}")
        elif isinstance(exc, nats.errors.AuthorizationError) or (
            "authorization violation" in text.lower()
        ):
            now = time.monotonic()
            if self._refused_since is None:
                self._refused_since = now
            elif now - self._refused_since >= self.AUTH_GRACE_S:
                self._refuse(
                    "the broker no longer admits them (revoked, expired, or another cloud's)"
                )

    def _refuse(self, why: str) -> None:
        if not self.refused.is_set():
            self.line = f"error: forbidden: {why}: {self.label} credentials do not allow it"
            self.refused.set()


async def _serve_until_signal(
    svc: Service, url: str, creds: Any, db_url: str, handlers: bool
) -> int:
    """Run ``svc`` until a signal (0) or until the broker refuses it (1)."""
    from stratus.events.store import EventStore
    from stratus.projections.db import make_engine

    refusal = BrokerRefusal(creds.label if creds is not None else "no")
    store = None
    if not svc.own_connection:
        store = await EventStore.connect(
            url, creds=creds, error_cb=refusal.on_error, reconnected_cb=refusal.on_reconnect
        )
    engine = None if svc.own_connection else make_engine(db_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running: list[Any] = []

    async def start() -> None:
        nonlocal running
        if store is not None and handlers:
            await store.ensure_stream()  # the handlers make the stream
        running = await svc.start(store, engine)
        where = f": {svc.url}" if svc.url else ""
        print(f"stratus {svc.name} ready{where}", flush=True)
        await stop.wait()

    main = asyncio.create_task(start())
    refused = asyncio.create_task(refusal.refused.wait())
    try:
        await asyncio.wait([main, refused], return_when=asyncio.FIRST_COMPLETED)
        if refusal.refused.is_set():
            main.cancel()
            with contextlib.suppress(BaseException):
                await main
            print(refusal.line, file=sys.stderr, flush=True)
            return 1
        main.result()
        return 0
    finally:
        refused.cancel()
        for part in running:
            with contextlib.suppress(Exception):
                await part.stop()
        if store is not None:
            await store.close()
        if engine is not None:
            await engine.dispose()


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(
    ctx: typer.Context,
    service: Annotated[
        str | None, typer.Argument(help=", ".join([*SERVICES, "console"]), show_default=False)
    ] = None,
    creds: Annotated[
        Path | None,
        typer.Option(
            "--creds",
            envvar="STRATUS_CREDS",
            help="this service's credentials file (stratus credentials issue)",
        ),
    ] = None,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the projection store")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="this service's own files (projections, host state)")
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="no credentials, and trust every request as the cloud admin: benchmarks "
            "on a broker without authentication only",
        ),
    ] = False,
    admin_password: Annotated[
        str | None,
        typer.Option(
            envvar="STRATUS_ADMIN_PASSWORD",
            help="handlers: make the user admin with this password on a log without one",
        ),
    ] = None,
    quota_default: QuotaDefaultOpt = None,
    config: SchedulerConfigOpt = None,
    seed: SeedOpt = None,
    webhook_allow_network: WebhookAllowOpt = None,
    help_: Annotated[
        bool, typer.Option("--help", help="this help; after a KIND: that kind's options")
    ] = False,
) -> None:
    """Run one service alone against an existing NATS (multi-process deployments)."""
    if help_ or service is None:
        _serve_help(ctx, service)
        if not help_:
            typer.echo("error: give the SERVICE to run", err=True)
            raise typer.Exit(EXIT_USAGE)
        raise typer.Exit(0)
    from stratus.cli import logs
    from stratus.cli.creds import load_for_serve
    from stratus.cli.datadir import default_data_dir
    from stratus.projections.db import sqlite_url
    from stratus.projections.rebuild import live_store_path

    if service == "console":
        # A client of the control plane rather than a service: each request
        # carries its browser's token; its own credential (kind console) only
        # lets it send requests and read its inbox.
        from stratus.console.server import serve_console

        if creds is None and not insecure_no_auth:
            typer.echo(
                "error: give --creds FILE (stratus credentials issue --service console)", err=True
            )
            raise typer.Exit(EXIT_USAGE)
        console_creds = load_for_serve(creds) if creds is not None else None
        if console_creds is not None and console_creds.kind != "console":
            typer.echo(
                f"error: {creds} holds {console_creds.label} credentials, not console ones",
                err=True,
            )
            raise typer.Exit(EXIT_USAGE)
        logs.configure("INFO")
        try:
            serve_console(
                ctx.args,
                url=resolve_url(),
                connect=console_creds.connect_options() if console_creds else None,
            )
        except StratusError as err:
            raise fail(err) from None
        return
    factory = SERVICES.get(service)
    if factory is None:
        typer.echo(f"error: SERVICE must be one of {', '.join(SERVICES)}, console", err=True)
        raise typer.Exit(EXIT_USAGE)
    if creds is None and not insecure_no_auth:
        typer.echo(
            f"error: give --creds FILE (stratus credentials issue --service {service} ...)",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    data_dir = data_dir or default_data_dir()
    url = resolve_url()
    opts = ServeOptions(
        data_dir=data_dir,
        quota_defaults=parse_quota_defaults(quota_default),
        insecure=insecure_no_auth,
        config=config,
        seed=seed,
        args=ctx.args,
        webhook_allow=webhook_allow_network or [],
        creds=load_for_serve(creds) if creds is not None else None,
        url=url,
        admin_password=admin_password,
    )
    try:
        svc = factory(opts)
        logs.configure("INFO")
        data_dir.mkdir(parents=True, exist_ok=True)
        db_url = db or sqlite_url(live_store_path(data_dir))
        code = asyncio.run(
            _serve_until_signal(svc, url, opts.creds, db_url, handlers=service == "handlers")
        )
    except StratusError as err:
        raise fail(err) from None
    if code:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def demo() -> None:
    """Run `up` in a temporary directory and a scripted scenario; exit 0 on success."""
    from stratus.cli.demo import run_demo

    try:
        asyncio.run(run_demo())
    except StratusError as err:
        raise fail(err) from None


# -- tenants ------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="[a-z0-9][a-z0-9-]{0,62}; becomes the id")],
    description: Annotated[str, typer.Option(help="free text")] = "",
    output: OutputOpt = Format.table,
) -> None:
    emit(send("tenant.create", name=name, description=description).data, output)


@tenant_app.command("list")
def tenant_list(
    all_: Annotated[bool, typer.Option("--all", help="include deleted tenants")] = False,
    output: OutputOpt = Format.table,
    at: AtOpt = None,
) -> None:
    data = run(lambda c: c.query("tenants", {"include_deleted": all_}, at=at))
    emit(data, output, ["id", "name", "status", "description", "created_at"])


@tenant_app.command("show")
def tenant_show(tenant: str, output: OutputOpt = Format.table, at: AtOpt = None) -> None:
    emit(run(lambda c: c.query("tenant", {"tenant": tenant}, at=at)), output)


@tenant_app.command("rename")
def tenant_rename(tenant: str, name: str, output: OutputOpt = Format.table) -> None:
    emit(send("tenant.rename", tenant=tenant, name=name).data, output)


@tenant_app.command("delete")
def tenant_delete(tenant: str, output: OutputOpt = Format.table) -> None:
    emit(send("tenant.delete", tenant=tenant).data, output)


# -- events -------------------------------------------------------------------


@events_app.command("tail")
def events_tail(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's events")] = None,
    from_: Annotated[int, typer.Option("--from", help="first sequence to show")] = 1,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="print new events too")] = False,
    output: OutputOpt = Format.table,
    at: AtOpt = None,
) -> None:
    """Events in log order (your tenant's, or any for the cloud admin); -o json: one a line."""
    if follow and at is not None:
        typer.echo("error: --follow and --at exclude each other", err=True)
        raise typer.Exit(EXIT_USAGE)

    async def main(c: "Client") -> list[dict]:
        rows: list[dict] = []
        after = max(0, from_ - 1)
        while True:
            body = {"after": after, "limit": 500, "tenant": tenant}
            page = await c.query("events", body, at=at)
            for row in page:
                if output is Format.json:
                    sys.stdout.write(json.dumps(row, default=str) + "\n")
                elif follow:
                    typer.echo(_line(row))
                else:
                    rows.append(row)
                after = row["seq"]
            if follow:
                sys.stdout.flush()
            if len(page) < 500:
                if not follow:
                    return rows
                await asyncio.sleep(0.5)

    try:
        rows = run(main)
    except KeyboardInterrupt:
        return
    if output is Format.yaml:
        emit(rows, output)
    elif output is Format.table:
        emit(
            [_flat(r) for r in rows],
            output,
            ["seq", "at", "type", "tenant", "resource", "actor", "correlation_id"],
        )


@app.command()
def audit(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    actor: Annotated[str | None, typer.Option(help="only what this user did")] = None,
    resource: Annotated[str | None, typer.Option(help="only this resource id")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="event type, * wildcards")] = None,
    since: Annotated[str | None, typer.Option(help="ISO-8601 time (UTC if no offset)")] = None,
    until: Annotated[str | None, typer.Option(help="ISO-8601 time (UTC if no offset)")] = None,
    command: Annotated[
        str | None, typer.Option(help="a command's correlation id: everything it caused")
    ] = None,
    after: Annotated[
        int | None, typer.Option(min=0, help="page forward: rows after this sequence")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 500,
    at: AtOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Who did what, when, through which command, with what result (newest last)."""
    params: dict[str, Any] = {"limit": limit}
    for k, v in (
        ("tenant", tenant),
        ("actor", actor),
        ("resource", resource),
        ("type", type_),
        ("command", command),
        ("after", after),
    ):
        if v is not None:
            params[k] = v
    for k, text in (("since", since), ("until", until)):
        if text is not None:
            params[k] = _utc_time(k, text)
    rows = run(lambda c: c.query("audit", params, at=at))
    if output is Format.table:
        rows = [
            {
                "time": r["at"],
                "actor": r["actor"],
                "action": r["type"],
                "resource": _flat(r)["resource"],
                "command": r["correlation_id"],
                "via": r.get("via", ""),
                "result": r["result"],
            }
            for r in rows
        ]
        emit(rows, output, ["time", "actor", "action", "resource", "command", "via", "result"])
    else:
        emit(rows, output)


@app.command()
def why(
    resource_id: Annotated[str, typer.Argument(help="a server, port, volume, ... id")],
    tenant: Annotated[str | None, typer.Option(help="the resource's tenant")] = None,
    at: AtOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """The causal chain from each command that touched RESOURCE_ID to every
    event it caused (the scheduler's decisions and the agents' reports
    included), with the scheduler's reasons."""
    from stratus.cli.history import because, causal_chain, causal_depths

    rows = run(lambda c: causal_chain(c, resource_id, tenant=tenant, at=at))
    depth = causal_depths(rows)
    if output is not Format.table:
        for r in rows:
            r["depth"] = depth[r["id"]]
            r["why"] = because(r)
        emit(rows, output)
        return
    emit(
        [
            {
                "seq": r["seq"],
                "time": r["at"],
                "actor": r["actor"],
                "event": "  " * depth[r["id"]] + r["type"],
                "resource": _flat(r)["resource"],
                "why": because(r) or r["result"],
            }
            for r in rows
        ],
        output,
        ["seq", "time", "actor", "event", "resource", "why"],
    )


def _utc_time(option: str, text: str) -> str:
    """An ISO-8601 time as UTC; a usage error (exit 2) if it is not one."""
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO-8601 time", param_hint=f"--{option}"
        ) from None
    return (t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


# -- identity -----------------------------------------------------------------


@app.command()
def login(
    user: Annotated[str, typer.Option(help="user name")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    tenant: Annotated[str | None, typer.Option(help="tenant to act in")] = None,
    print_: Annotated[
        bool, typer.Option("--print", help="print the token, do not save it")
    ] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Get a signed token; saved for later commands (mode 0600) unless --print."""
    reply = send("auth.login", user=user, password=password, tenant=tenant or None)
    data = dict(reply.data or {})
    if print_:
        sys.stdout.write(data["token"] + "\n")
        return
    path = save_token(data.pop("token"))
    data["saved_to"] = str(path)
    emit(data, output)


@user_app.command("create")
def user_create(
    name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    output: OutputOpt = Format.table,
) -> None:
    emit(send("user.create", name=name, password=password).data, output)


@user_app.command("list")
def user_list(output: OutputOpt = Format.table, at: AtOpt = None) -> None:
    emit(run(lambda c: c.query("users", at=at)), output, ["id", "enabled", "roles", "created_at"])


@user_app.command("set-password")
def user_set_password(
    name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
    output: OutputOpt = Format.table,
) -> None:
    """Change a password (your own, or anyone's as cloud admin); old tokens become void."""
    emit(send("user.set-password", name=name, password=password).data, output)


@user_app.command("disable")
def user_disable(name: str, output: OutputOpt = Format.table) -> None:
    emit(send("user.disable", name=name).data, output)


@user_app.command("enable")
def user_enable(name: str, output: OutputOpt = Format.table) -> None:
    emit(send("user.enable", name=name).data, output)


RoleOpt = Annotated[str, typer.Option(help="admin, member, reader or a custom role")]


@role_app.command("create")
def role_create(
    name: str,
    permission: Annotated[
        list[str], typer.Option("--permission", help="repeat: e.g. events.read, audit.read")
    ],
    output: OutputOpt = Format.table,
) -> None:
    """Define a custom role granting tenant-scoped permissions (cloud admin)."""
    emit(send("role.create", name=name, permissions=permission).data, output)


UserOpt = Annotated[str, typer.Option()]
TenantOpt = Annotated[str, typer.Option()]


def _grant(verb: str, user: str, tenant: str, role: str, output: Format) -> None:
    emit(send(verb, user=user, tenant=tenant, role=role).data, output)


@role_app.command("assign")
def role_assign(
    user: UserOpt, tenant: TenantOpt, role: RoleOpt, output: OutputOpt = Format.table
) -> None:
    _grant("role.assign", user, tenant, role, output)


@role_app.command("revoke")
def role_revoke(
    user: UserOpt, tenant: TenantOpt, role: RoleOpt, output: OutputOpt = Format.table
) -> None:
    _grant("role.revoke", user, tenant, role, output)


@role_app.command("list")
def role_list(
    user: Annotated[str | None, typer.Option()] = None,
    tenant: Annotated[str | None, typer.Option()] = None,
    output: OutputOpt = Format.table,
    at: AtOpt = None,
) -> None:
    body = {k: v for k, v in (("user", user), ("tenant", tenant)) if v is not None}
    emit(run(lambda c: c.query("roles", body, at=at)), output)


@app.command("key-rotate")
def key_rotate(output: OutputOpt = Format.table) -> None:
    """Add a new token signing key (cloud admin); older tokens stay valid until they expire."""
    emit(send("key.rotate").data, output)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str | None, typer.Argument(help="default: your own token")] = None,
    user: Annotated[str | None, typer.Option(help="revoke every token of this user")] = None,
    output: OutputOpt = Format.table,
) -> None:
    reply = send("token.revoke", token_id=token_id, user=user)
    emit({"revoked": token_id or user or "your token", "seqs": reply.seqs}, output)


def _flat(row: dict) -> dict:
    agg = row.get("aggregate") or {}
    return {**row, "resource": f"{agg.get('kind', '?')}/{agg.get('id', '?')}"}


def _line(row: dict) -> str:
    f = _flat(row)
    return f"{f['seq']:>8}  {f.get('at', '')}  {f.get('type')}  {f.get('tenant')}  {f['resource']}"


@events_app.command("schema")
def events_schema(
    form: Annotated[
        str,
        typer.Option(
            help="message (a NATS message, msgpack decoded), envelope (a line of "
            "events tail -o json) or cloudevent (a webhook's body)"
        ),
    ] = "message",
) -> None:
    """The JSON Schema of every event type in one form, generated from the code."""
    from stratus.events.catalog import CODEC
    from stratus.events.schemas import FORMS

    if form not in FORMS:
        typer.echo(f"error: --form must be one of {', '.join(FORMS)}", err=True)
        raise typer.Exit(EXIT_USAGE)
    sys.stdout.write(json.dumps(CODEC.json_schema(form), indent=2) + "\n")


@events_app.command("asyncapi")
def events_asyncapi() -> None:
    """An AsyncAPI 3.0 document: the subjects, every event type, the webhook CloudEvents."""
    from stratus.events.asyncapi import dumps
    from stratus.events.catalog import CODEC

    # The server this CLI talks to (--url, STRATUS_URL or stratus up's).
    sys.stdout.write(dumps(CODEC, resolve_url()) + "\n")


def service_access(data_dir: Path) -> tuple[str, Any]:
    """The NATS URL of the `stratus up` in ``data_dir`` and a short-lived
    credential to read its log, signed with its key ring: what reading the
    log directly needs (a usage error where there is no key ring)."""
    from stratus.cli.creds import key_ring_dir, local_creds
    from stratus.cli.datadir import URL_FILE

    ring = key_ring_dir(data_dir)
    if ring is None:
        typer.echo(
            f"error: no stratus key ring in {data_dir} (a credential to read the log is "
            "signed with it): run this where `stratus up` runs, or pass --data-dir",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    url = settings.url or (
        (data_dir / URL_FILE).read_text().strip()
        if (data_dir / URL_FILE).exists()
        else resolve_url()
    )
    return url, local_creds(ring, "projector", ttl_s=3600)


@scheduler_app.command("replay")
def scheduler_replay(
    from_seq: Annotated[int, typer.Option("--from", min=1, help="first sequence replayed")],
    to_seq: Annotated[
        int | None, typer.Option("--to", min=1, help="last sequence replayed (default: the end)")
    ] = None,
    config: SchedulerConfigOpt = None,
    seed: Annotated[int, typer.Option(help="seed of the top-k pick")] = 0,
    output: OutputOpt = Format.table,
    data_dir: Annotated[
        Path | None, typer.Option(help="the data dir of the running `stratus up`")
    ] = None,
) -> None:
    """Decide the recorded placements of --from..--to again with another
    configuration; report how many change and how the load would spread."""
    from stratus.cli.datadir import default_data_dir as default_dir
    from stratus.events.store import EventStore
    from stratus.handlers.scheduler.replay import replay

    cfg = scheduler_config_from(config, seed)
    url, creds = service_access(data_dir or default_dir())

    async def main() -> dict[str, Any]:
        store = await EventStore.connect(url, persistent=False, creds=creds)
        try:
            return await replay(store, cfg, from_seq, to_seq)
        finally:
            await store.close()

    try:
        result = asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None
    if output is not Format.table:
        emit(result, output)
        return
    rec, alt = result["recorded"], result["alternative"]
    emit(
        [
            {"": "decisions", "recorded": result["decisions"], "alternative": result["decisions"]},
            {"": "changed", "recorded": "", "alternative": result["changed"]},
            {"": "hosts", "recorded": rec["hosts"], "alternative": alt["hosts"]},
            {"": "mean utilisation", "recorded": rec["mean"], "alternative": alt["mean"]},
            {"": "stddev utilisation", "recorded": rec["stddev"], "alternative": alt["stddev"]},
            {"": "hosts left empty", "recorded": rec["empty"], "alternative": alt["empty"]},
        ],
        output,
        title=f"scheduler replay of {result['from']}..{result['to']} (seed {result['seed']})",
    )


@projections_app.command("rebuild")
def projections_rebuild(
    output: OutputOpt = Format.table,
    data_dir: Annotated[
        Path | None, typer.Option(help="the data dir of the running `stratus up`")
    ] = None,
) -> None:
    """Replay the whole log into a fresh store and swap it in while queries go on.

    Runs on the machine of `stratus up` (it reads the data dir); the swap is
    done by the running services, for the cloud admin's token only.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from stratus.cli.client import Client
    from stratus.cli.common import resolve_token
    from stratus.cli.datadir import default_data_dir as default_dir
    from stratus.events.store import EventStore
    from stratus.projections.rebuild import (
        SWAP_SUBJECT,
        build_store,
        new_store_path,
        remove_store,
    )

    data_dir = data_dir or default_dir()
    url, creds = service_access(data_dir)
    path = new_store_path(data_dir)

    async def main() -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        # The swap is asked as the cloud admin, on a connection of its token.
        swap = await Client.connect(url, resolve_token(), timeout=600)
        try:
            store = await EventStore.connect(url, persistent=False, creds=creds)
        except BaseException:
            await swap.close()
            raise
        try:
            await swap.control(SWAP_SUBJECT, {})  # refused callers learn it before the replay
            head = await store.last_seq()
            bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            with bar:
                job = bar.add_task("replaying the log", total=max(head, 1))
                built = await build_store(
                    store, path, lambda _n, seq: bar.update(job, completed=seq)
                )
            swapped = await swap.control(SWAP_SUBJECT, {"store": path.name})
        except BaseException:
            remove_store(path)
            raise
        finally:
            await store.close()
            await swap.close()
        return {
            "digest": swapped["digest"],
            "events": built.events + swapped["caught_up"],
            "seconds": round(time.perf_counter() - t0, 3),
            "replay_seconds": round(built.seconds, 3),
            "seq": swapped["seq"],
            "store": swapped["store"],
            "caught_up": swapped["caught_up"],
            "paused_seconds": swapped["paused_seconds"],
            "old_store_removed": swapped["old_store_removed"],
        }

    try:
        result = asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None
    emit(result, output)


from stratus.cli import resources as _resources  # noqa: E402

_resources.register(app)

from stratus.cli import integrations as _integrations  # noqa: E402

_integrations.register(app)

from stratus.cli import creds as _creds  # noqa: E402

_creds.register(app)


def main() -> None:
    # Usage errors from click already exit 2, as CLI.md asks.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
