"""Running the console: inside ``stratus up``, or alone as ``stratus serve
console [--listen HOST:PORT]`` against any control plane (``--url``)."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from typing import Annotated, Any

import typer
from aiohttp import web

from stratus.cli.client import Drops
from stratus.console.app import make_app
from stratus.events.errors import Invalid
from stratus.events.store import connect_nats

DEFAULT_LISTEN = "127.0.0.1:8400"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``), HOST an IP address or ``localhost``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise Invalid(f"--listen {text!r}: want HOST:PORT, e.g. 127.0.0.1:8400 (port 0: any free)")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise Invalid(f"--listen {text!r}: HOST must be an IP address or localhost") from None
    return host, int(port)


class ConsoleServer:
    """The console's HTTP server and its NATS connection: ``connect``, the
    connect options of its console credential (``events.natscreds``), which
    may send requests and read its own inbox, nothing else; each request
    carries its browser's token."""

    def __init__(
        self,
        nats_url: str,
        host: str = "127.0.0.1",
        port: int = 0,
        connect: dict[str, Any] | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.connect = connect or {}
        self.host = host
        self.port = port
        self.url: str | None = None
        self._nc = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        drops = Drops()
        self._nc = await connect_nats(
            self.nats_url, disconnected_cb=drops.dropped, closed_cb=drops.dropped, **self.connect
        )
        try:
            app = make_app(self._nc, drops=drops)
            # Live pages are ended by the app's shutdown hook; nothing else
            # runs long.
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        port = self._runner.addresses[0][1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{port}/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
            self._nc = None


console_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@console_app.command()
def console(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to serve on (port 0: any free port)")
    ] = DEFAULT_LISTEN,
) -> None:
    """Serve the web console (called by ``stratus serve console``)."""
    try:
        host, port = parse_listen(listen)
    except Invalid as err:
        raise typer.BadParameter(err.message, param_hint="--listen") from None
    url: str = ctx.obj["url"]

    async def main() -> None:
        server = ConsoleServer(url, host, port, ctx.obj.get("connect"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        shown = await server.start()
        print(f"stratus console ready: {shown}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())


def serve_console(args: list[str], *, url: str, connect: dict[str, Any] | None = None) -> None:
    """Parse the console's own options from ``args`` and serve until a signal
    (``connect``: the connect options of its credential)."""
    command = typer.main.get_command(console_app)
    command.main(args=args, prog_name="stratus serve console", obj={"url": url, "connect": connect})
