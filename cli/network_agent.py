"""``stratus serve network-agent``: one host's network agent in its own process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stratus.cli.common import Service, own_options
from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

agent_app = typer.Typer(add_completion=False, rich_markup_mode=None)


@agent_app.command()
def network_agent(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="this host's name ([a-z0-9-], its id)")],
    vtep: Annotated[str, typer.Option(help="this host's VXLAN endpoint (underlay address)")],
    routers: Annotated[bool, typer.Option("--routers", help="this host runs the routers")] = False,
    netns: Annotated[
        str | None, typer.Option(help="the host's namespace (simulated hosts; default: this one)")
    ] = None,
    prefix: Annotated[str, typer.Option(help="the deployment's kernel name prefix")] = "st",
    interval: Annotated[float, typer.Option(min=1, help="seconds between deep passes")] = 10.0,
    bgp_hold: Annotated[
        int, typer.Option(min=3, max=65535, help="routed networks: BGP hold time (seconds)")
    ] = 9,
    bgp_mesh_max: Annotated[
        int, typer.Option(min=2, help="routed networks: hosts in a full mesh; beyond, reflectors")
    ] = 50,
) -> None:
    """Run the network agent of HOST (called by ``stratus serve network-agent``)."""
    from stratus.agents.network.bird import BgpConfig
    from stratus.agents.network.service import network_capable, serve_agent

    if not NAME_RE.match(host):
        raise Invalid(f"--host {host!r}: names are [a-z0-9][a-z0-9-]{{0,62}}")
    why = network_capable()
    if why is not None:
        raise Invalid(why)

    data_dir: Path = ctx.obj["data_dir"]

    async def start(store: Any, _engine: Any) -> list[Any]:
        agent = await serve_agent(
            store,
            host,
            vtep,
            routers=routers,
            host_ns=netns,
            prefix=prefix,
            interval=interval,
            # BIRD's files, per host: several agents may share a data dir.
            state_dir=data_dir / "network" / host,
            bgp=BgpConfig(hold=bgp_hold, mesh_max=bgp_mesh_max),
        )
        return [agent]

    ctx.obj["service"] = Service(f"network-agent {host}", start)


def network_agent_service(args: list[str], data_dir: Path) -> Service:
    """The network agent, from its own options in ``args``; its files (BIRD's)
    go under ``data_dir``."""
    return own_options(agent_app, args, "stratus serve network-agent", data_dir=data_dir)
