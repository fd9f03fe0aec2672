"""Two-level scheduling verbs: ``stratus framework register``, ``stratus offer
accept|decline``, ``stratus framework task-update`` (``list``/``show`` of
frameworks and offers come with the other kinds, in ``cli.resources``)."""

# No ``from __future__ import annotations``: typer reads the signatures.

from typing import Annotated

import typer

from stratus.cli.common import EXIT_USAGE, OutputOpt, run
from stratus.cli.output import Format
from stratus.cli.resources import TenantOpt, do


def _lookup(kind: str, ref: str, tenant: str | None) -> str:
    """The host an offer or a task is on, from the query service."""
    body = {"ref": ref, **({"tenant": tenant} if tenant else {})}
    row = run(lambda c: c.query(kind, body))
    return str(row.get("host") or "")


def register(framework_app: typer.Typer, offer_app: typer.Typer) -> None:
    @framework_app.command("register")
    def framework_register(
        name: str,
        role: Annotated[str, typer.Option(help="the role its resources are counted under")] = "*",
        weight: Annotated[
            float, typer.Option(help="DRF weight: its dominant share counts 1/weight")
        ] = 1.0,
        failover_timeout: Annotated[
            float,
            typer.Option(help="seconds without a beat before its tasks are killed"),
        ] = 60.0,
        id_: Annotated[
            str | None, typer.Option("--id", help="re-register this framework (failover)")
        ] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Register a framework: prints its id and the subjects it uses."""
        do(
            "framework.register",
            output,
            name=name,
            role=role,
            weight=weight,
            failover_timeout_s=failover_timeout,
            id=id_,
            tenant=tenant,
        )

    @framework_app.command("beat")
    def framework_beat(
        framework: Annotated[str, typer.Argument(help="the framework's id")],
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Say the framework is alive (for its failover timeout)."""
        do("framework.beat", output, framework=framework, tenant=tenant)

    @framework_app.command("task-update")
    def task_update(
        task: Annotated[str, typer.Argument(help="the task (a server): id or name")],
        state: Annotated[str, typer.Option(help="running, finished or failed")],
        host: Annotated[str | None, typer.Option(help="its host (default: looked up)")] = None,
        reason: Annotated[str, typer.Option(help="why it failed")] = "",
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """A task's executor reports it: finished or failed frees its resources."""
        if state == "running":
            do("task.running", output, task=task, tenant=tenant)
            return
        if host is None:
            host = _lookup("server", task, tenant)
        do(
            "task.update",
            output,
            task=task,
            host=host,
            state=state,
            reason=reason or None,
            tenant=tenant,
        )

    @offer_app.command("accept")
    def offer_accept(
        offer: Annotated[str, typer.Argument(help="the offer's id")],
        task: Annotated[list[str], typer.Option(help="task name (repeat for several)")],
        vcpus: Annotated[list[int], typer.Option(help="vCPUs of each --task, in order")],
        ram_mb: Annotated[list[int], typer.Option(help="RAM (MB) of each --task, in order")],
        image: Annotated[
            list[str] | None, typer.Option(help="image of each --task, in order")
        ] = None,
        host: Annotated[
            str | None, typer.Option(help="the offer's host (default: looked up)")
        ] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Launch tasks on the offer's host (all of them or none)."""
        if host is None:
            host = _lookup("offer", offer, tenant)
        images = image or []
        if len(vcpus) != len(task) or len(ram_mb) != len(task) or len(images) > len(task):
            typer.echo(
                "error: give --vcpus and --ram-mb (and --image, if any) once per --task",
                err=True,
            )
            raise typer.Exit(EXIT_USAGE)
        tasks = []
        for i, name in enumerate(task):
            t = {"name": name, "vcpus": vcpus[i], "ram_mb": ram_mb[i]}
            if i < len(images):
                t["image"] = images[i]
            tasks.append(t)
        import msgspec

        from stratus.events.frameworks import TaskLaunch

        do(
            "offer.accept",
            output,
            offer=offer,
            host=host,
            tasks=[msgspec.convert(t, TaskLaunch) for t in tasks],
            tenant=tenant,
        )

    @offer_app.command("decline")
    def offer_decline(
        offer: Annotated[str, typer.Argument(help="the offer's id")],
        refuse_seconds: Annotated[
            float, typer.Option(help="the allocator leaves that host to others this long")
        ] = 5.0,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Decline an offer."""
        do("offer.decline", output, offer=offer, refuse_seconds=refuse_seconds, tenant=tenant)
