"""``stratus serve openstack-api``: the OpenStack-compatible HTTP API in its own process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stratus.cli.common import Service, own_options

DEFAULT_LISTEN = "127.0.0.1:5000"
# Under the data dir: image files on their way through the API.
SPOOL_DIR = "openstack-api-spool"

api_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@api_app.command()
def openstack_api(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0: any free port)")
    ] = DEFAULT_LISTEN,
    public_url: Annotated[
        str, typer.Option(help="the URL clients reach it at, for the catalog (default: as asked)")
    ] = "",
    spool_dir: Annotated[
        Path | None,
        typer.Option(
            help="where image files wait on their way to or from the image service "
            "(default DATA_DIR/openstack-api-spool)"
        ),
    ] = None,
) -> None:
    """Serve Keystone v3, Nova v2.1, Neutron v2.0 and Glance v2 (called by
    ``stratus serve openstack-api``); its openstack-api credential only lets
    it forward its callers' requests, each with the caller's own token."""
    from stratus.api.app import ApiServer, bind

    try:
        # Bound now: a taken port stops it before anything connects.
        sock = bind(listen)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    url, data_dir = ctx.obj["url"], ctx.obj["data_dir"]
    server = ApiServer(
        url, sock, spool_dir or data_dir / SPOOL_DIR, public_url, ctx.obj.get("connect")
    )

    async def start(_store: Any, _engine: Any) -> list[Any]:
        await server.start()
        return [server]

    ctx.obj["service"] = Service("openstack-api", start, own_connection=True, url=server.auth_url)


def openstack_api_service(
    args: list[str], url: str, data_dir: Path, connect: dict[str, Any] | None = None
) -> Service:
    """The OpenStack API, from its own options in ``args`` (``connect``: the
    connect options of its credential)."""
    return own_options(
        api_app, args, "stratus serve openstack-api", url=url, data_dir=data_dir, connect=connect
    )
