"""``stratus serve compute-agent``: one host's compute agent in its own process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stratus.cli.common import Service, own_options, parse_labels
from stratus.cli.datadir import deployment_prefix
from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

DEFAULT_LIBVIRT_URI = "test:///default"

agent_app = typer.Typer(add_completion=False, rich_markup_mode=None)


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
    reconcile_interval: Annotated[float, typer.Option(min=1)] = 60.0,
    deployment: Annotated[
        str | None,
        typer.Option(help="prefix of the host's container cgroups (default: the data dir's)"),
    ] = None,
) -> None:
    """Run the compute agent of HOST (called by ``stratus serve compute-agent``)."""
    if not NAME_RE.match(host):
        raise Invalid(f"--host {host!r}: names are [a-z0-9][a-z0-9-]{{0,62}}")
    data_dir: Path = ctx.obj["data_dir"]
    # As `stratus up` on the same data dir names its own hosts' groups.
    prefix = deployment_prefix(data_dir) if deployment is None else deployment

    async def start(store: Any, _engine: Any) -> list[Any]:
        from stratus.agents.compute.agent import build_agent

        agent = build_agent(
            store,
            host,
            libvirt_uri=libvirt_uri,
            data_dir=data_dir / "hosts" / host,
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=disk_gb,
            zone=zone,
            labels=parse_labels(label),
            types=[t.strip() for t in types.split(",") if t.strip()],
            reconcile_interval=reconcile_interval,
            deployment=prefix,
        )
        await agent.start()
        return [_Stopping(agent)]

    ctx.obj["service"] = Service(f"compute-agent {host}", start)


class _Stopping:
    """The agent as ``serve`` stops it: stop, then release the hypervisor."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    async def stop(self) -> None:
        await self.agent.stop()
        self.agent.close()


def compute_agent_service(args: list[str], data_dir: Path) -> Service:
    """The compute agent, from its own options in ``args``."""
    return own_options(agent_app, args, "stratus serve compute-agent", data_dir=data_dir)
