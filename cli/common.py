"""What every ``stratus`` subcommand shares: settings, exit codes, output and ``run``.

Start-up time matters here: every command imports this, and ``--help`` or a
usage error should not pay for NATS, asyncio or the event schemas. What
only some commands need is imported where it is used.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeVar

import typer

from stratus.cli.output import Format

if TYPE_CHECKING:
    from stratus.cli.client import Client
    from stratus.events.commands import Command, Reply
    from stratus.events.errors import StratusError

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


def group(help: str) -> typer.Typer:
    """A group of commands (``stratus server ...``); alone, it shows its help.

    Help is plain text: rich's help rendering costs about 0.07 s of CPU at
    each ``--help`` or usage error, half of what the command costs otherwise.
    """
    return typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=help)


class Settings:
    url: str | None = None
    token: str | None = None


settings = Settings()


def resolve_url() -> str:
    if settings.url:
        return settings.url
    from stratus.cli.datadir import URL_FILE, default_data_dir

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
    from stratus.events.errors import Unauthenticated, Unavailable

    typer.echo(f"error: {err.kind}: {err.message}", err=True)
    if isinstance(err, Unavailable):
        return typer.Exit(EXIT_UNREACHABLE)
    if isinstance(err, Unauthenticated):
        return typer.Exit(EXIT_AUTH)
    return typer.Exit(EXIT_REFUSED)


def _import_nats(url: str) -> None:
    """Import nats-py for a connection to ``url``: without aiohttp unless
    the URL is a websocket one.

    nats-py imports aiohttp whenever it is installed (Stratus installs it for
    the webhook service) but uses it only for ws:// and wss:// URLs. That
    import alone costs about 0.15 s of CPU, more than everything else a read
    command does before it connects. While nats-py is first imported,
    aiohttp is marked absent (``sys.modules[name] = None`` is how the import
    system says "not installed"), so nats-py sets itself up exactly as on a
    machine without aiohttp, which it supports; nothing of it is touched,
    and aiohttp imports normally afterwards.
    """
    import sys

    websocket = "ws://" in url.lower() or "wss://" in url.lower()
    if websocket or "nats" in sys.modules or "aiohttp" in sys.modules:
        return  # imported as usual where it is used
    sys.modules["aiohttp"] = None  # type: ignore[assignment]
    try:
        import nats  # noqa: F401
    finally:
        del sys.modules["aiohttp"]


# Sent without a token, so an expired or revoked one cannot get in the way.
ANONYMOUS_VERBS = ("auth.login",)


def run(fn: Callable[[Client], Awaitable[T]], *, anonymous: bool = False) -> T:
    """Connect (as the token's holder, or ``anonymous``ly), run ``fn``, and
    turn refusals into CLI.md's exit codes."""
    import asyncio

    url = resolve_url()
    _import_nats(url)
    from stratus.cli.client import Client
    from stratus.events.errors import StratusError

    async def main() -> T:
        client = await Client.connect(url, None if anonymous else resolve_token())
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except StratusError as err:
        raise fail(err) from None


def command(verb: str, **fields: Any) -> Command:
    """Command ``verb`` as its Struct (``events.catalog``), from ``fields``
    (None: not given, the default applies), checked here exactly as the
    command service will check it: a bad value is refused before anything
    is sent, in the service's own words (``error: invalid: ...``, exit 1).
    A field the command does not have is a bug of ours and raises TypeError.
    """
    import msgspec

    from stratus.events.catalog import COMMAND_TYPES
    from stratus.events.commands import explain
    from stratus.events.errors import Invalid

    cls = COMMAND_TYPES[verb]
    cmd = cls(**{k: v for k, v in fields.items() if v is not None})
    try:
        # A Struct's constructor checks no constraint; decoding does.
        msgspec.json.decode(msgspec.json.encode(cmd), type=cls)
    except msgspec.ValidationError as exc:
        raise fail(Invalid(f"{verb}: {explain(exc)}")) from None
    return cmd


def send(verb: str, **fields: Any) -> Reply:
    """Build and check command ``verb`` (see ``command``), then send it."""
    cmd = command(verb, **fields)
    return run(lambda c: c.command(verb, cmd), anonymous=verb in ANONYMOUS_VERBS)


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
    stop when a signal comes, in order; ``name`` is shown in its ready line,
    with ``url`` (where it answers) if it has one.

    An ``own_connection`` service connects by itself with its credentials
    (the auth callout as a broker user; the OpenStack API forwarding its
    callers' tokens): it is started with neither store."""

    name: str
    start: Callable[[Any, Any], Awaitable[list[Any]]]
    # It makes its own connections (the auth callout, the gateways): it is
    # started with neither store.
    own_connection: bool = False
    url: str = ""


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
