"""``stratus integration ...`` and ``stratus webhook ...``."""

# No ``from __future__ import annotations`` here: typer reads every command's
# signature at each start, and string annotations would be evaluated anew
# each time (twice per command), a third of the CLI's start-up.

import secrets
import time
from typing import Annotated, Any

import typer

from stratus.cli.common import EXIT_USAGE, AtOpt, OutputOpt, group, resolve_url, run, send
from stratus.cli.output import Format, emit

TenantOpt = Annotated[
    str | None, typer.Option(help="tenant (default: your token's; cloud admin: any)")
]

integration_app = group(
    "NATS credentials that may only consume one tenant's events (or, cloud admin, all)."
)
webhook_app = group("Signed CloudEvents POSTed to a URL for matching events.")

INTEGRATION_COLUMNS = ["id", "name", "status", "filter_subject", "start_seq", "user", "tenant"]
# How long ``integration create`` waits for the broker to load the credential.
USABLE_WITHIN_S = 10.0

WEBHOOK_COLUMNS = ["id", "name", "status", "url", "types", "tenant"]
DELIVERY_COLUMNS = ["seq", "type", "status", "attempts", "last_status", "last_error", "at"]


def _body(tenant: str | None, **fields: Any) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if tenant is not None:
        body["tenant"] = tenant
    return body


def connect_info(url: str, created: dict[str, Any], password: str) -> dict[str, Any]:
    """What a nats-py client needs: ``nats.connect(url, **connect)``, then the
    consumer ``durable`` on ``stream`` that Stratus made, which delivers to
    ``deliver_subject`` (``js.subscribe_bind``, or a plain subscription)."""
    from stratus.events.store import STREAM
    from stratus.handlers.natsauth import deliver_subject, inbox_prefix

    return {
        **created,
        "url": url,
        "connect": {
            "user": created["user"],
            "password": password,
            # Replies arrive under a prefix only this credential may read.
            "inbox_prefix": inbox_prefix(created["id"]),
        },
        "stream": STREAM,
        "filter_subject": created["filter_subject"],
        "durable": created["id"],
        "deliver_subject": deliver_subject(created["id"]),
    }


async def wait_usable(info: dict[str, Any], timeout: float = USABLE_WITHIN_S) -> Any:
    """The consumer's info as the credential sees it, once the broker has
    loaded the credential and Stratus made its consumer (both follow the
    log, a moment after the command's reply); None if not within ``timeout``."""
    import asyncio
    import contextlib

    import nats
    import nats.errors
    import nats.js.errors

    from stratus.events.cluster import server_list

    deadline = time.monotonic() + timeout
    for attempt in range(10_000):
        nc = None
        try:
            nc = await nats.connect(
                server_list(info["url"]),
                **info["connect"],
                allow_reconnect=False,
                connect_timeout=2,
            )
            js = nc.jetstream(timeout=2)
            return await js.consumer_info(info["stream"], info["durable"])
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError):
            if time.monotonic() > deadline:
                return None
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
        await asyncio.sleep(min(0.5, 0.02 * 2**attempt))
    return None


@integration_app.command("create")
def integration_create(
    name: Annotated[str, typer.Argument(help="a name unique in the tenant")],
    tenant: TenantOpt = None,
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="every tenant's events (cloud admin; a SIEM)")
    ] = False,
    start: Annotated[
        int | None,
        typer.Option("--from", min=1, help="stream sequence its consumer starts at [default: 1]"),
    ] = None,
    ack_wait: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=3600,
            help="seconds before an unacknowledged event comes again [default: 30]",
        ),
    ] = None,
    output: OutputOpt = Format.table,
) -> None:
    """Issue credentials; the password is shown once (only its bcrypt hash is kept).
    Waits until the broker accepts them."""
    import asyncio

    from rich.console import Console

    if all_tenants and tenant is not None:
        typer.echo("error: --all-tenants and --tenant exclude each other", err=True)
        raise typer.Exit(EXIT_USAGE)
    password = secrets.token_urlsafe(32)
    created = send(
        "integration.create",
        tenant=tenant,
        name=name,
        secret=password,
        all_tenants=all_tenants,
        start_seq=start,
        ack_wait_s=ack_wait,
    ).data
    info = connect_info(resolve_url(), created, password)
    with Console(stderr=True).status(f"integration {name}: waiting for the broker to load it"):
        usable = asyncio.run(wait_usable(info))
    if usable is None:
        typer.echo(
            f"warning: the credential did not work within {USABLE_WITHIN_S:g}s; "
            "is the broker's stratus up running?",
            err=True,
        )
    if output is Format.table:
        typer.echo("the password is shown once; keep it (as -o json) now", err=True)
        info = {**info, "connect": ", ".join(f"{k}={v}" for k, v in info["connect"].items())}
    emit(info, output)


@integration_app.command("list")
def integration_list(
    tenant: TenantOpt = None, at: AtOpt = None, output: OutputOpt = Format.table
) -> None:
    emit(run(lambda c: c.query("integrations", _body(tenant), at=at)), output, INTEGRATION_COLUMNS)


@integration_app.command("revoke")
def integration_revoke(
    ref: Annotated[str, typer.Argument(help="id or name")],
    tenant: TenantOpt = None,
    all_tenants: Annotated[bool, typer.Option("--all-tenants")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Revoke: the server disconnects the credential within seconds."""
    reply = send("integration.revoke", tenant=tenant, ref=ref, all_tenants=all_tenants)
    emit(reply.data, output)


@integration_app.command("reset")
def integration_reset(
    ref: Annotated[str, typer.Argument(help="id or name")],
    start: Annotated[int, typer.Option("--from", min=1, help="stream sequence to start at")],
    tenant: TenantOpt = None,
    all_tenants: Annotated[bool, typer.Option("--all-tenants")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Re-make the integration's consumer at a stream sequence (Stratus deletes
    and creates it; events from SEQ on come again)."""
    reply = send(
        "integration.reset", tenant=tenant, ref=ref, start_seq=start, all_tenants=all_tenants
    )
    emit(reply.data, output)


@webhook_app.command("create")
def webhook_create(
    url: Annotated[str, typer.Option(help="http:// or https:// URL that receives the POSTs")],
    types: Annotated[str, typer.Option(help="event types, comma-separated globs: 'server.*'")],
    name: Annotated[str | None, typer.Option(help="default: hook-<random>")] = None,
    tenant: TenantOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Subscribe a URL; the signing secret is shown once."""
    patterns = [t.strip() for t in types.split(",") if t.strip()]
    name = name or f"hook-{secrets.token_hex(4)}"
    data = send("webhook.create", tenant=tenant, name=name, url=url, types=patterns).data
    if output is Format.table:
        typer.echo("the secret is shown once; receivers verify Stratus-Signature with it", err=True)
    emit(data, output)


@webhook_app.command("list")
def webhook_list(tenant: TenantOpt = None, at: AtOpt = None, output: OutputOpt = Format.table):
    emit(run(lambda c: c.query("webhooks", _body(tenant), at=at)), output, WEBHOOK_COLUMNS)


@webhook_app.command("delete")
def webhook_delete(
    ref: Annotated[str, typer.Argument(help="id or name")],
    tenant: TenantOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    emit(send("webhook.delete", tenant=tenant, ref=ref).data, output)


@webhook_app.command("deliveries")
def webhook_deliveries(
    ref: Annotated[str, typer.Argument(help="id or name")],
    tenant: TenantOpt = None,
    status: Annotated[
        str | None, typer.Option(help="delivered, retrying or dead (the dead letters)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    output: OutputOpt = Format.table,
) -> None:
    """Each event's delivery: attempts, last HTTP status or error, outcome."""
    body = _body(tenant, ref=ref, status=status, limit=limit)
    emit(run(lambda c: c.query("webhook-deliveries", body)), output, DELIVERY_COLUMNS)


def register(root: typer.Typer) -> None:
    root.add_typer(integration_app, name="integration")
    root.add_typer(webhook_app, name="webhook")
