"""``stratus serve projector``: the projector in its own process.

On SQLite it projects into the data dir's store, as ``stratus up`` does
(each query node keeps its own). On PostgreSQL (``--db
postgresql+asyncpg://...``) any number of these may run against one
database: one holds the lease and writes, the others stand by and one takes
over within about ``--lease-ttl`` seconds after it dies
(``projections.leased``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stratus.cli.common import Service, own_options
from stratus.events.lease import DEFAULT_TTL_S

projector_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@projector_app.command()
def projector(
    ctx: typer.Context,
    lease_ttl: Annotated[
        int,
        typer.Option(
            min=1,
            help="seconds a dead holder keeps the PostgreSQL projector lease; renewed every third",
        ),
    ] = int(DEFAULT_TTL_S),
    holder: Annotated[
        str | None, typer.Option(help="this process's name in the lease (default: host:pid)")
    ] = None,
) -> None:
    """Run the projector (called by ``stratus serve projector``)."""

    async def start(store: Any, engine: Any) -> list[Any]:
        from stratus.projections.rebuild import LiveProjection

        live = LiveProjection(store, engine, lease_ttl=lease_ttl, holder=holder)
        await live.start()
        return [live]

    ctx.obj["service"] = Service("projector", start)


def projector_service(args: list[str]) -> Service:
    """The projector, from its own options in ``args``."""
    return own_options(projector_app, args, "stratus serve projector")
