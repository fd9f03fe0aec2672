"""``stratus serve openstack-api``: the OpenStack-compatible HTTP API in its own process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

api_app = typer.Typer(add_completion=False)

DEFAULT_LISTEN = "127.0.0.1:5000"


@api_app.command()
def openstack_api(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0: any free port)")
    ] = DEFAULT_LISTEN,
    public_url: Annotated[
        str, typer.Option(help="the URL clients reach it at, for the catalog (default: as asked)")
    ] = "",
    image_store: Annotated[
        Path | None, typer.Option(help="where uploaded images go (default DATA_DIR/images)")
    ] = None,
) -> None:
    """Serve Keystone v3, Nova v2.1, Neutron v2.0 and Glance v2 (called by
    ``stratus serve openstack-api``); it holds no credentials of its own."""
    from stratus.api.app import ApiServer, parse_listen

    opts = ctx.obj
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    data_dir: Path = opts["data_dir"]

    async def main() -> None:
        server = ApiServer(opts["url"], listen, image_store or data_dir / "images", public_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        auth_url = await server.start()
        print(f"stratus openstack-api ready: {auth_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())


def serve_openstack_api(args: list[str], *, url: str, data_dir: Path) -> None:
    """Parse the API's own options from ``args`` and run it until a signal."""
    command = typer.main.get_command(api_app)
    command.main(
        args=args,
        prog_name="stratus serve openstack-api",
        obj={"url": url, "data_dir": data_dir},
    )
