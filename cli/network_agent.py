"""``stratus serve network-agent``: one host's network agent in its own process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

agent_app = typer.Typer(add_completion=False)


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
    from stratus.events.store import EventStore

    opts = ctx.obj
    if not NAME_RE.match(host):
        raise Invalid(f"--host {host!r}: names are [a-z0-9][a-z0-9-]{{0,62}}")
    why = network_capable()
    if why is not None:
        raise Invalid(why)

    async def main() -> None:
        store = await EventStore.connect(opts["url"], **opts["creds"])
        await store.ensure_stream()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        agent = await serve_agent(
            store,
            host,
            vtep,
            routers=routers,
            host_ns=netns,
            prefix=prefix,
            interval=interval,
            # BIRD's files, per host: several agents may share a data dir.
            state_dir=Path(opts["data_dir"]) / "network" / host,
            bgp=BgpConfig(hold=bgp_hold, mesh_max=bgp_mesh_max),
        )
        print(f"stratus network-agent {host} ready", flush=True)
        try:
            await stop.wait()
        finally:
            await agent.stop()
            await store.close()

    asyncio.run(main())


def serve_network_agent(args: list[str], *, url: str, creds: dict, data_dir: Path) -> None:
    """Parse the agent's own options from ``args`` and run it until a signal."""
    command = typer.main.get_command(agent_app)
    command.main(
        args=args,
        prog_name="stratus serve network-agent",
        obj={"url": url, "creds": creds, "data_dir": data_dir},
    )
