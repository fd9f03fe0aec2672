"""What every ``stratus`` subcommand shares: settings, exit codes, output and ``run``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import typer

from stratus.cli.client import Client
from stratus.cli.output import Format
from stratus.events.errors import StratusError, Unauthenticated, Unavailable

T = TypeVar("T")

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4

OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table, json or yaml")]
AtOpt = Annotated[
    str | None,
    typer.Option(
        "--at",
        help="SEQ or ISO-8601 UTC TIME: the answer as it was then, rebuilt from the log",
    ),
]


class Settings:
    url: str | None = None
    token: str | None = None


settings = Settings()


def resolve_url() -> str:
    if settings.url:
        return settings.url
    from stratus.cli.runtime import URL_FILE, default_data_dir

    f = default_data_dir() / URL_FILE
    if f.exists():
        return f.read_text().strip()
    return "nats://127.0.0.1:4222"


def token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "stratus" / "token"


def resolve_token() -> str | None:
    """--token / STRATUS_TOKEN first, else the one `stratus login` saved."""
    if settings.token:
        return settings.token
    f = token_file()
    if f.exists():
        return f.read_text().strip() or None
    return None


def save_token(token: str) -> Path:
    f = token_file()
    f.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(f, 0o600)
    return f


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
        client = await Client.connect(resolve_url(), resolve_token())
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    """``--label K=V`` options as a map; a malformed one is a usage error."""
    out: dict[str, str] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            typer.echo(f"error: --label wants KEY=VALUE, got {p!r}", err=True)
            raise typer.Exit(EXIT_USAGE)
        out[k] = v
    return out


class Service(NamedTuple):
    """What ``stratus serve`` runs: ``start(store, engine)`` starts it on a
    connected event store (and the projection store) and returns what to
    stop when a signal comes, in order; ``name`` is shown in its ready line."""

    name: str
    start: Callable[[Any, Any], Awaitable[list[Any]]]


def own_options(app: typer.Typer, args: list[str], prog: str, **obj: Any) -> Service:
    """Run the one command of ``app`` on ``args`` (a service's own options,
    after its name); it leaves the ``Service`` in ``ctx.obj["service"]``.
    Usage errors exit 2 and ``--help`` exits 0 there, as everywhere else."""
    holder: dict[str, Any] = dict(obj)
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name=prog, obj=holder)
    except SystemExit as done:  # standalone mode always ends so
        if done.code == 0 and "service" in holder:
            return holder["service"]
        raise
    raise AssertionError(f"{prog} did not exit")
