"""``stratus serve compute-agent``: one host's compute agent in its own process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from stratus.cli.common import parse_labels
from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

DEFAULT_LIBVIRT_URI = "test:///default"

agent_app = typer.Typer(add_completion=False)


@agent_app.command()
def compute_agent(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="this host's name ([a-z0-9-], its id)")],
    libvirt_uri: Annotated[
        str, typer.Option(help="test:///default (simulated) or qemu:///system")
    ] = DEFAULT_LIBVIRT_URI,
    vcpus: Annotated[int | None, typer.Option(help="default: what libvirt reports")] = None,
    ram_mb: Annotated[int | None, typer.Option(help="default: what libvirt reports")] = None,
    disk_gb: Annotated[int | None, typer.Option(help="default: the data directory's disk")] = None,
    zone: Annotated[str, typer.Option()] = "nova",
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeat")] = None,
    types: Annotated[str, typer.Option(help="instance types: vm,container")] = "vm,container",
    image_store: Annotated[
        Path | None, typer.Option(help="the image store (default DATA_DIR/images)")
    ] = None,
    reconcile_interval: Annotated[float, typer.Option(min=1)] = 60.0,
    deployment: Annotated[
        str | None,
        typer.Option(help="prefix of the host's container cgroups (default: the data dir's)"),
    ] = None,
) -> None:
    """Run the compute agent of HOST (called by ``stratus serve compute-agent``)."""
    opts = ctx.obj
    if not NAME_RE.match(host):
        raise Invalid(f"--host {host!r}: names are [a-z0-9][a-z0-9-]{{0,62}}")
    from stratus.agents.compute.agent import build_agent
    from stratus.cli.runtime import deployment_prefix
    from stratus.events.store import EventStore

    data_dir: Path = opts["data_dir"]
    # As `stratus up` on the same data dir names its own hosts' groups.
    prefix = deployment_prefix(data_dir) if deployment is None else deployment

    async def main() -> None:
        store = await EventStore.connect(opts["url"], **opts["creds"])
        await store.ensure_stream()
        agent = build_agent(
            store,
            host,
            libvirt_uri=libvirt_uri,
            data_dir=data_dir / "hosts" / host,
            image_store=image_store or data_dir / "images",
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=disk_gb,
            zone=zone,
            labels=parse_labels(label),
            types=[t.strip() for t in types.split(",") if t.strip()],
            reconcile_interval=reconcile_interval,
            deployment=prefix,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.start()
        print(f"stratus compute-agent {host} ready", flush=True)
        try:
            await stop.wait()
        finally:
            await agent.stop()
            agent.close()
            await store.close()

    asyncio.run(main())


def serve_compute_agent(args: list[str], *, url: str, creds: dict, data_dir: Path) -> None:
    """Parse the agent's own options from ``args`` and run it until a signal."""
    command = typer.main.get_command(agent_app)
    command.main(
        args=args,
        prog_name="stratus serve compute-agent",
        obj={"url": url, "creds": creds, "data_dir": data_dir},
    )
