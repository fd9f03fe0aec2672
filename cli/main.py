"""The ``stratus`` command (see shared/CLI.md for the contract)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer

from stratus.cli.client import Client
from stratus.cli.output import Format, emit
from stratus.events.errors import StratusError, Unauthenticated, Unavailable
from stratus.events.model import Event

T = TypeVar("T")

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants (projects).")
events_app = typer.Typer(no_args_is_help=True, help="The event log.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(events_app, name="events")

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table, json or yaml")]


class Settings:
    url: str | None = None
    token: str | None = None


settings = Settings()


@app.callback()
def _global(
    url: Annotated[
        str | None, typer.Option(envvar="STRATUS_URL", help="NATS URL of the control plane")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="STRATUS_TOKEN", help="bearer token")] = None,
) -> None:
    settings.url = url
    settings.token = token


def resolve_url() -> str:
    if settings.url:
        return settings.url
    from stratus.cli.runtime import URL_FILE, default_data_dir

    f = default_data_dir() / URL_FILE
    if f.exists():
        return f.read_text().strip()
    return "nats://127.0.0.1:4222"


def fail(err: StratusError) -> typer.Exit:
    typer.echo(f"error: {err.kind}: {err.message}", err=True)
    if isinstance(err, Unavailable):
        return typer.Exit(EXIT_UNREACHABLE)
    if isinstance(err, Unauthenticated):
        return typer.Exit(EXIT_AUTH)
    return typer.Exit(EXIT_REFUSED)


def run(fn: Callable[[Client], Awaitable[T]]) -> T:
    """Connect, run ``fn``, and turn refusals into CLI.md's exit codes."""

    async def main() -> T:
        client = await Client.connect(resolve_url(), settings.token)
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None


# -- running it ---------------------------------------------------------------


@app.command()
def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="where the log, projections and logs live")
    ] = None,
    port: Annotated[int, typer.Option(help="NATS client port on 127.0.0.1 (0: any free)")] = 4222,
    hosts: Annotated[int, typer.Option(help="simulated hosts (agents come later)")] = 0,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the projection store")] = None,
) -> None:
    """Start nats-server, the projection store and every service; Ctrl-C stops."""
    from stratus.cli import logs
    from stratus.cli.runtime import DataDirBusy, Stack, default_data_dir

    data_dir = data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs.configure("INFO", json_file=data_dir / "stratus.log")

    async def main() -> None:
        stack = Stack(data_dir, port=port, db_url=db, hosts=hosts)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await stack.start()
        print(f"stratus ready: {url} (data dir {data_dir})", flush=True)
        try:
            await stop.wait()
        finally:
            print("stratus stopping", flush=True)
            await stack.stop()

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


@app.command()
def status(output: OutputOpt = Format.table) -> None:
    """Exit 0 when the control plane answers; show the log and projector state."""
    data = run(lambda c: c.query("status"))
    emit(data, output)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="handlers, projector or query")],
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the projection store")] = None,
) -> None:
    """Run one service alone against an existing NATS (multi-process deployments)."""
    from stratus.cli import logs
    from stratus.events.store import EventStore
    from stratus.projections.db import make_engine, sqlite_url

    if service not in ("handlers", "projector", "query"):
        typer.echo("error: SERVICE must be handlers, projector or query", err=True)
        raise typer.Exit(EXIT_USAGE)
    logs.configure("INFO")

    async def main() -> None:
        store = await EventStore.connect(resolve_url())
        await store.ensure_stream()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        engine = make_engine(db or sqlite_url(Path.cwd() / "projections.db"))
        task: asyncio.Task[Any] | None = None
        svc: Any = None
        if service == "handlers":
            from stratus.handlers.service import CommandService
            from stratus.handlers.tenants import HANDLERS

            svc = CommandService(store, HANDLERS)
        elif service == "query":
            from stratus.projections.query import QueryService

            svc = QueryService(store, engine)
        else:
            from stratus.projections.projector import Projector

            projector = Projector(store, engine)
            task = asyncio.create_task(projector.run())
        if svc is not None:
            await svc.start()
        print(f"stratus {service} ready", flush=True)
        await stop.wait()
        if svc is not None:
            await svc.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            projector.close()
        await store.close()
        await engine.dispose()

    try:
        asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None


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
    reply = run(lambda c: c.command("tenant.create", {"name": name, "description": description}))
    emit(reply.data, output)


@tenant_app.command("list")
def tenant_list(
    all_: Annotated[bool, typer.Option("--all", help="include deleted tenants")] = False,
    output: OutputOpt = Format.table,
) -> None:
    data = run(lambda c: c.query("tenants", {"include_deleted": all_}))
    emit(data, output, ["id", "name", "status", "description", "created_at"])


@tenant_app.command("show")
def tenant_show(tenant: str, output: OutputOpt = Format.table) -> None:
    emit(run(lambda c: c.query("tenant", {"tenant": tenant})), output)


@tenant_app.command("rename")
def tenant_rename(tenant: str, name: str, output: OutputOpt = Format.table) -> None:
    reply = run(lambda c: c.command("tenant.rename", {"tenant": tenant, "name": name}))
    emit(reply.data, output)


@tenant_app.command("delete")
def tenant_delete(tenant: str, output: OutputOpt = Format.table) -> None:
    reply = run(lambda c: c.command("tenant.delete", {"tenant": tenant}))
    emit(reply.data, output)


# -- events -------------------------------------------------------------------

ENVELOPE = {"id", "type", "v", "tenant", "aggregate", "actor", "at"}
ENVELOPE |= {"correlation_id", "causation_id"}


def event_record(seq: int, subject: str, event: Event | None, error: str | None = None) -> dict:
    if event is None:
        return {"seq": seq, "subject": subject, "type": None, "error": error}
    raw = msgspec.to_builtins(event)
    out: dict[str, Any] = {"seq": seq, "subject": subject}
    out.update({k: raw[k] for k in ("type", "v", "tenant", "aggregate", "actor", "at")})
    out.update({k: raw[k] for k in ("correlation_id", "causation_id", "id")})
    out["data"] = {k: v for k, v in raw.items() if k not in ENVELOPE}
    return out


@events_app.command("tail")
def events_tail(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's events")] = None,
    from_: Annotated[int, typer.Option("--from", help="first sequence to show")] = 1,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Events in log order; with -o json one object a line."""
    from stratus.events.ids import is_name
    from stratus.events.store import EventStore

    if tenant is not None and not (is_name(tenant) or tenant == "_system"):
        typer.echo(f"error: invalid: tenant {tenant!r} is not a tenant id", err=True)
        raise typer.Exit(EXIT_USAGE)
    subjects = [f"ev.{tenant}.>"] if tenant else ["ev.>"]

    async def main() -> None:
        store = await EventStore.connect(resolve_url(), persistent=False)
        rows: list[dict] = []
        try:
            it = (
                store.subscribe(after=max(0, from_ - 1), subjects=subjects)
                if follow
                else store.read(after=max(0, from_ - 1), subjects=subjects)
            )
            async for batch in it:
                for rec in batch:
                    try:
                        row = event_record(rec.seq, rec.subject, rec.decode(store.codec))
                    except Exception as exc:
                        row = event_record(rec.seq, rec.subject, None, str(exc))
                    if output is Format.json:
                        sys.stdout.write(json.dumps(row, default=str) + "\n")
                    elif follow:
                        typer.echo(_line(row))
                    else:
                        rows.append(row)
                if follow:
                    sys.stdout.flush()
        finally:
            await store.close()
        if output is Format.yaml:
            emit(rows, output)
        elif output is Format.table:
            emit(
                [_flat(r) for r in rows],
                output,
                ["seq", "at", "type", "tenant", "resource", "actor", "correlation_id"],
            )

    try:
        asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None
    except KeyboardInterrupt:
        pass


def _flat(row: dict) -> dict:
    agg = row.get("aggregate") or {}
    return {**row, "resource": f"{agg.get('kind', '?')}/{agg.get('id', '?')}"}


def _line(row: dict) -> str:
    f = _flat(row)
    return f"{f['seq']:>8}  {f.get('at', '')}  {f.get('type')}  {f.get('tenant')}  {f['resource']}"


@events_app.command("schema")
def events_schema() -> None:
    """The JSON Schema of every event type, generated from the code."""
    from stratus.events.catalog import CODEC

    sys.stdout.write(json.dumps(CODEC.json_schema(), indent=2) + "\n")


def main() -> None:
    # Usage errors from click already exit 2, as CLI.md asks.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
