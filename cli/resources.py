"""Resource verbs, in the OpenStack client's shape: ``stratus server create ...``."""

# No ``from __future__ import annotations`` here: typer reads every command's
# signature at each start, and string annotations would be evaluated anew
# each time (twice per command), a third of the CLI's start-up.

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from stratus.cli.common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    AtOpt,
    OutputOpt,
    command,
    fail,
    group,
    parse_labels,
    run,
    send,
)
from stratus.cli.output import Format, emit

TenantOpt = Annotated[
    str | None, typer.Option(help="tenant to act in (default: your token's; cloud admin: any)")
]

# kind -> (list columns, help)
KINDS: dict[str, tuple[list[str], str]] = {
    "host": (["id", "status", "zone", "vcpus", "ram_mb", "disk_gb", "labels"], "Hosts."),
    "flavor": (["id", "vcpus", "ram_mb", "disk_gb"], "Flavors (cloud-wide sizes)."),
    "image": (["id", "name", "tenant", "status", "format", "visibility"], "Images."),
    "server": (
        ["id", "name", "status", "host", "vcpus", "ram_mb", "instance_type", "tenant"],
        "Servers (instances).",
    ),
    "server-group": (["id", "name", "policy", "tenant"], "Server groups."),
    "volume": (["id", "name", "status", "size_gb", "server", "tenant"], "Volumes."),
    "network": (["id", "name", "status", "mode", "external", "cidr", "tenant"], "Networks."),
    "subnet": (["id", "name", "network", "cidr", "gateway", "tenant"], "Subnets."),
    "port": (["id", "name", "network", "ip", "mac", "device", "status", "tenant"], "Ports."),
    "router": (["id", "name", "status", "external_network", "tenant"], "Routers."),
    "floating-ip": (["id", "address", "status", "fixed_ip", "server", "tenant"], "Floating IPs."),
    "security-group": (["id", "name", "description", "tenant"], "Security groups."),
    "qos-policy": (["id", "name", "max_kbps", "burst_kb", "tenant"], "QoS policies."),
    # Two-level scheduling (cli.frameworks adds their verbs).
    "framework": (
        ["id", "name", "role", "weight", "tasks", "allocation", "dominant_share", "tenant"],
        "Frameworks (two-level scheduling: they receive offers).",
    ),
    "offer": (
        ["id", "framework", "host", "vcpus", "ram_mb", "disk_gb", "expires_at"],
        "Open resource offers to the tenant's frameworks.",
    ),
}


def _body(tenant: str | None, **fields: Any) -> dict[str, Any]:
    """A query's parameters: those given (not None)."""
    body = {k: v for k, v in fields.items() if v is not None}
    if tenant is not None:
        body["tenant"] = tenant
    return body


def do(verb: str, output: Format, **fields: Any) -> None:
    """Send command ``verb`` made of ``fields`` (checked first, see
    ``common.command``) and show what it answers."""
    emit(send(verb, **fields).data, output)


# Where a new server's lifecycle stops moving on its own.
SETTLED = ("running", "error", "stopped")


async def _create_and_wait(c: Any, cmd: Any, timeout: float) -> dict[str, Any]:
    """Create the server, then follow its status (on stderr) until it settles."""
    import asyncio

    from rich.console import Console
    from rich.status import Status

    from stratus.events.errors import NotFound

    created = (await c.command("server.create", cmd)).data
    ask = {"ref": created["id"], "tenant": cmd.tenant}
    deadline = time.monotonic() + timeout
    row = created
    with Status(f"server {created['name']}: requested", console=Console(stderr=True)) as shown:
        while time.monotonic() < deadline:
            with contextlib.suppress(NotFound):  # the view may not have it yet
                row = await c.query("server", ask)
                if row["status"] in SETTLED:
                    return row
                shown.update(f"server {row['name']}: {row['status']}")
            await asyncio.sleep(0.2)
    return {**row, "reason": row.get("reason") or f"still {row['status']} after {timeout:g}s"}


def _reads(app: typer.Typer, kind: str) -> None:
    columns, _ = KINDS[kind]
    cloud = kind in ("host", "flavor")

    @app.command("list")
    def list_(
        tenant: TenantOpt = None,
        name: Annotated[str | None, typer.Option(help="only this name")] = None,
        at: AtOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        from stratus.events.kinds import PLURALS

        body = {} if cloud else _body(tenant, name=name)
        emit(run(lambda c: c.query(PLURALS[kind], body, at=at)), output, columns)

    @app.command("show")
    def show(
        ref: Annotated[str, typer.Argument(help="id or name")],
        tenant: TenantOpt = None,
        at: AtOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        body = {"ref": ref} if cloud else _body(tenant, ref=ref)
        emit(run(lambda c: c.query(kind, body, at=at)), output)


def _delete(app: typer.Typer, kind: str, verb: str = "delete") -> None:
    @app.command(verb)
    def delete(
        ref: Annotated[str, typer.Argument(help="id or name")],
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(f"{kind}.{verb}", output, tenant=tenant, ref=ref)


def _linking(app: typer.Typer, kind: str, verbs: tuple[str, str], first: str, second: str) -> None:
    """A pair of verbs joining two resources and parting them again."""
    for verb in verbs:
        app.command(verb)(_link(f"{kind}.{verb}", first, second))


def _link(verb: str, first: str, second: str) -> Any:
    # A function per verb: a loop variable as a default argument would
    # become an option of the command.
    def link(
        a: Annotated[str, typer.Argument(metavar=first.upper())],
        b: Annotated[str, typer.Argument(metavar=second.upper())],
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(verb, output, tenant=tenant, **{first: a, second: b})

    return link


def _switch(verb: str) -> Any:
    def switch(
        name: str,
        reason: Annotated[str, typer.Option()] = "",
        output: OutputOpt = Format.table,
    ) -> None:
        do(verb, output, name=name, reason=reason)

    return switch


def _split(line: str | None) -> list[str]:
    import shlex

    from stratus.events.errors import Invalid

    try:
        return shlex.split(line) if line else []
    except ValueError as exc:
        raise fail(Invalid(f"--command: {exc}")) from None


def _hashed(file: Path) -> tuple[str, int]:
    """The file's SHA-256 and size (with a progress bar on a terminal)."""
    from stratus.cli.transfer import Bar, hash_file
    from stratus.events.errors import Invalid

    if not file.is_file():
        raise fail(Invalid(f"{file} is not a file"))
    with Bar(f"checksumming {file.name}", file.stat().st_size) as bar:
        return hash_file(file, bar.advance)


async def _create_and_upload(
    c: Any, verb: str, cmd: Any, file: Path, checksum: str, public: bool
) -> dict[str, Any]:
    """Record the image (queued), then send its bytes. If the image service
    refuses them (``invalid``), the record goes too, so a refused upload
    leaves nothing; if the upload breaks off, the image stays queued."""
    from stratus.cli.transfer import Bar, upload
    from stratus.events.errors import Invalid, StratusError

    created = (await c.command(verb, cmd)).data
    ref = created["id"]
    owner = None if public else cmd.tenant
    try:
        with Bar(f"uploading {file.name}", cmd.size_bytes) as bar:
            return await upload(
                c, ref, file, tenant=owner, public=public, progress=bar.advance, checksum=checksum
            )
    except Invalid:
        if not public:
            with contextlib.suppress(StratusError):
                await c.command("image.delete", {"ref": ref, "tenant": owner})
        raise
    except StratusError as err:
        hint = f"{'--public ' if public else ''}{cmd.name} --file {file}"
        raise type(err)(
            f"{err.message}; image {cmd.name} stays queued: `stratus image upload {hint}` "
            "sends it again"
        ) from None


def _emit_quota(data: dict[str, Any], output: Format) -> None:
    if output is Format.table:
        emit(data["quota"], output, ["resource", "limit", "in_use"], title=data["tenant"])
    else:
        emit(data, output)


def register(root: typer.Typer) -> None:
    apps = {k: group(h) for k, (_, h) in KINDS.items()}
    for kind, sub in apps.items():
        root.add_typer(sub, name=kind)
        _reads(sub, kind)
    for kind in KINDS:
        if kind not in ("host", "flavor", "image", "network", "framework", "offer"):
            _delete(apps[kind], kind)
    from stratus.cli import frameworks

    frameworks.register(apps["framework"], apps["offer"])
    for verb in ("stop", "start", "reboot"):
        _delete(apps["server"], "server", verb)
    _delete(apps["image"], "image")
    _delete(apps["network"], "network")
    _delete(apps["floating-ip"], "floating-ip", "disassociate")

    @apps["host"].command("register")
    def host_register(
        name: str,
        vcpus: Annotated[int, typer.Option()],
        ram_mb: Annotated[int, typer.Option()],
        disk_gb: Annotated[int, typer.Option()],
        zone: Annotated[str, typer.Option()] = "nova",
        label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeat")] = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Register a host (what its agent does at start); cloud admin."""
        do(
            "host.register",
            output,
            name=name,
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=disk_gb,
            zone=zone,
            labels=parse_labels(label),
        )

    for verb in ("enable", "disable"):
        apps["host"].command(verb)(_switch(f"host.{verb}"))

    @apps["host"].command("remove")
    def host_remove(name: str, output: OutputOpt = Format.table) -> None:
        do("host.remove", output, name=name)

    @apps["flavor"].command("delete")
    def flavor_delete(name: str, output: OutputOpt = Format.table) -> None:
        do("flavor.delete", output, name=name)

    @apps["flavor"].command("create")
    def flavor_create(
        name: str,
        vcpus: Annotated[int, typer.Option()],
        ram_mb: Annotated[int, typer.Option()],
        disk_gb: Annotated[int, typer.Option()] = 0,
        output: OutputOpt = Format.table,
    ) -> None:
        do("flavor.create", output, name=name, vcpus=vcpus, ram_mb=ram_mb, disk_gb=disk_gb)

    @apps["image"].command("create")
    def image_create(
        name: str,
        format_: Annotated[str, typer.Option("--format", help="qcow2 or raw")] = "qcow2",
        file: Annotated[
            Path | None,
            typer.Option(help="the image file: sent to the image service, checked, stored"),
        ] = None,
        public: Annotated[
            bool, typer.Option("--public", help="for every tenant (cloud admin)")
        ] = False,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Create an image. With --file its bytes are uploaded over --url (no
        shared disk) and it becomes active once the image service has checked
        their size, SHA-256 and format and stored them; without, it is a
        record only (its instances get a blank disk)."""
        verb = "image.create-public" if public else "image.create"
        owner = None if public else tenant
        # Checked before the file is read: a bad name reads nothing.
        command(verb, name=name, format=format_, tenant=owner)
        if file is None:
            do(verb, output, name=name, format=format_, tenant=owner)
            return
        checksum, size = _hashed(file)
        cmd = command(
            verb, name=name, format=format_, size_bytes=size, checksum=checksum, tenant=owner
        )
        emit(run(lambda c: _create_and_upload(c, verb, cmd, file, checksum, public)), output)

    @apps["image"].command("upload")
    def image_upload(
        ref: Annotated[str, typer.Argument(help="id or name of a queued image")],
        file: Annotated[Path, typer.Option(help="the image file")],
        public: Annotated[bool, typer.Option("--public", help="a public image")] = False,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Upload the bytes of a queued image again (after an interrupted
        upload); the file must be the one the image was created for."""
        from stratus.cli.transfer import Bar, upload

        checksum, size = _hashed(file)

        async def go(c: Any) -> Any:
            with Bar(f"uploading {file.name}", size) as bar:
                return await upload(
                    c,
                    ref,
                    file,
                    tenant=tenant,
                    public=public,
                    progress=bar.advance,
                    checksum=checksum,
                )

        emit(run(go), output)

    @apps["image"].command("download")
    def image_download(
        ref: Annotated[str, typer.Argument(help="id or name (or a public image's name)")],
        file: Annotated[
            Path | None, typer.Option(help="where to write it (default: NAME.FORMAT here)")
        ] = None,
        public: Annotated[bool, typer.Option("--public", help="a public image")] = False,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Write an image's bytes to a file, checked against its SHA-256."""
        from stratus.cli.transfer import Bar, download

        async def go(c: Any) -> dict[str, Any]:
            with Bar(f"downloading {ref}") as bar:
                opened, path = await download(
                    c,
                    ref,
                    file,
                    tenant=tenant,
                    public=public,
                    progress=bar.advance,
                    on_open=lambda o: bar.sized(o.size),
                )
            return {
                "id": opened.image["id"],
                "name": opened.image["name"],
                "file": str(path),
                "size_bytes": opened.size,
                "checksum": opened.checksum,
                "format": opened.format,
            }

        emit(run(go), output)

    @apps["server"].command("create")
    def server_create(
        name: str,
        image: Annotated[str, typer.Option()],
        flavor: Annotated[str | None, typer.Option()] = None,
        vcpus: Annotated[int | None, typer.Option()] = None,
        ram_mb: Annotated[int | None, typer.Option()] = None,
        disk_gb: Annotated[int | None, typer.Option()] = None,
        type_: Annotated[str, typer.Option("--type", help="vm or container")] = "vm",
        network: Annotated[list[str] | None, typer.Option(help="repeat")] = None,
        security_group: Annotated[list[str] | None, typer.Option(help="repeat")] = None,
        label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeat")] = None,
        host: Annotated[str | None, typer.Option()] = None,
        group: Annotated[str | None, typer.Option()] = None,
        zone: Annotated[str | None, typer.Option()] = None,
        command_: Annotated[
            str | None,
            typer.Option(
                "--command",
                help="a container's process, split as a shell would (none is run), "
                "in place of its image's entrypoint and cmd",
            ),
        ] = None,
        wait: Annotated[
            bool, typer.Option("--wait", help="until it runs or fails (exit 1 if it fails)")
        ] = False,
        wait_timeout: Annotated[float, typer.Option(min=1, help="seconds --wait waits")] = 300,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Request a server; it is `requested` until the scheduler places it."""
        cmd = command(
            "server.create",
            tenant=tenant,
            name=name,
            image=image,
            flavor=flavor,
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=disk_gb,
            instance_type=type_,
            networks=network or [],
            security_groups=security_group or [],
            labels=parse_labels(label),
            host=host,
            group=group,
            zone=zone,
            command=_split(command_),
        )
        if not wait:
            emit(run(lambda c: c.command("server.create", cmd)).data, output)
            return
        row = run(lambda c: _create_and_wait(c, cmd, wait_timeout))
        emit(row, output)
        if row["status"] != "running":
            typer.echo(
                f"error: server {row['name']} is {row['status']}: {row.get('reason') or ''}",
                err=True,
            )
            raise typer.Exit(EXIT_REFUSED)

    @apps["server"].command("exec")
    def server_exec(
        server: str,
        argv: Annotated[
            list[str], typer.Argument(metavar="COMMAND...", help="the command, after --")
        ],
        timeout: Annotated[float, typer.Option(min=1, max=600)] = 60.0,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Run a command inside a container instance; exits with its exit code.

        Put ``--`` before the command so its options are not taken as ours."""
        data = send("server.exec", tenant=tenant, ref=server, command=argv, timeout=timeout).data
        if output is not Format.table:
            emit(data, output)
        else:
            sys.stdout.write(data["stdout"])
            sys.stderr.write(data["stderr"])
        raise typer.Exit(data["exit_code"])

    @apps["server"].command("snapshot")
    def server_snapshot(
        server: str,
        name: str,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Make image NAME from the server's disk (layered on its image);
        the image appears once its host has stored it."""
        do("server.snapshot", output, tenant=tenant, ref=server, name=name)

    @apps["server-group"].command("create")
    def server_group_create(
        name: str,
        policy: Annotated[str, typer.Option(help="affinity or anti-affinity")],
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do("server-group.create", output, tenant=tenant, name=name, policy=policy)

    @apps["volume"].command("create")
    def volume_create(
        name: str,
        size_gb: Annotated[int, typer.Option()],
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do("volume.create", output, tenant=tenant, name=name, size_gb=size_gb)

    _linking(apps["volume"], "volume", ("attach", "detach"), "server", "volume")

    @apps["network"].command("create")
    def network_create(
        name: str,
        external: Annotated[bool, typer.Option("--external", help="cloud admin")] = False,
        mode: Annotated[
            str, typer.Option(help="vxlan (a tenant's overlay) or routed (cloud admin: BGP)")
        ] = "vxlan",
        cidr: Annotated[
            str | None, typer.Option(help="external: floating IP range; routed: its prefix")
        ] = None,
        block_prefix: Annotated[
            int | None, typer.Option(help="routed: length of the blocks hosts claim (26)")
        ] = None,
        gateway: Annotated[str | None, typer.Option()] = None,
        pool_start: Annotated[str | None, typer.Option()] = None,
        pool_end: Annotated[str | None, typer.Option()] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        if mode not in ("vxlan", "routed"):
            typer.echo(f"error: --mode must be vxlan or routed, not {mode!r}", err=True)
            raise typer.Exit(EXIT_USAGE)
        if mode == "routed":
            if external or not cidr:
                typer.echo("error: --mode routed needs --cidr and no --external", err=True)
                raise typer.Exit(EXIT_USAGE)
            do("network.create-routed", output, name=name, cidr=cidr, block_prefix=block_prefix)
        elif external:
            do(
                "network.create-external",
                output,
                name=name,
                external=True,
                cidr=cidr,
                gateway=gateway,
                pool_start=pool_start,
                pool_end=pool_end,
            )
        else:
            do("network.create", output, tenant=tenant, name=name)

    @apps["subnet"].command("create")
    def subnet_create(
        name: str,
        network: Annotated[str, typer.Option()],
        cidr: Annotated[str, typer.Option()],
        gateway: Annotated[str | None, typer.Option()] = None,
        pool_start: Annotated[str | None, typer.Option()] = None,
        pool_end: Annotated[str | None, typer.Option()] = None,
        dns: Annotated[list[str] | None, typer.Option(help="repeat")] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(
            "subnet.create",
            output,
            tenant=tenant,
            name=name,
            network=network,
            cidr=cidr,
            gateway=gateway,
            pool_start=pool_start,
            pool_end=pool_end,
            dns=dns or [],
        )

    @apps["port"].command("create")
    def port_create(
        name: str,
        network: Annotated[str, typer.Option()],
        subnet: Annotated[str | None, typer.Option()] = None,
        ip: Annotated[str | None, typer.Option()] = None,
        security_group: Annotated[list[str] | None, typer.Option(help="repeat")] = None,
        qos_policy: Annotated[str | None, typer.Option()] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(
            "port.create",
            output,
            tenant=tenant,
            name=name,
            network=network,
            subnet=subnet,
            ip=ip,
            security_groups=security_group or [],
            qos_policy=qos_policy,
        )

    @apps["port"].command("set")
    def port_set(
        port: str,
        security_group: Annotated[list[str] | None, typer.Option(help="repeat")] = None,
        qos_policy: Annotated[str | None, typer.Option(help='"" removes it')] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Change a port's security groups or QoS policy."""
        do(
            "port.set",
            output,
            tenant=tenant,
            ref=port,
            security_groups=security_group,
            qos_policy=qos_policy,
        )

    @apps["router"].command("create")
    def router_create(
        name: str,
        external: Annotated[
            str | None, typer.Option("--external", help="external network for the gateway")
        ] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do("router.create", output, tenant=tenant, name=name, external_network=external)

    _linking(apps["router"], "router", ("add-subnet", "remove-subnet"), "router", "subnet")

    @apps["floating-ip"].command("create")
    def fip_create(
        network: Annotated[str, typer.Option(help="external network")] = "public",
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do("floating-ip.create", output, tenant=tenant, network=network)

    @apps["floating-ip"].command("associate")
    def fip_associate(
        floating_ip: Annotated[str, typer.Argument(help="address or id")],
        server: Annotated[str | None, typer.Argument()] = None,
        port: Annotated[str | None, typer.Option()] = None,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(
            "floating-ip.associate",
            output,
            tenant=tenant,
            floating_ip=floating_ip,
            server=server,
            port=port,
        )

    sg = apps["security-group"]

    @sg.command("create")
    def sg_create(
        name: str,
        description: Annotated[str, typer.Option()] = "",
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do("security-group.create", output, tenant=tenant, name=name, description=description)

    rule_app = group("Security group rules.")
    sg.add_typer(rule_app, name="rule")

    @rule_app.command("add")
    def rule_add(
        security_group: str,
        protocol: Annotated[str, typer.Option(help="tcp, udp, icmp or any")] = "tcp",
        port: Annotated[str | None, typer.Option(help="N or N:M")] = None,
        remote_cidr: Annotated[str | None, typer.Option()] = None,
        remote_group: Annotated[str | None, typer.Option()] = None,
        direction: Annotated[str, typer.Option(help="ingress or egress")] = "ingress",
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        lo = hi = 0
        if port:
            a, _, b = port.partition(":")
            try:
                lo, hi = int(a), int(b or a)
            except ValueError:
                typer.echo(f"error: --port wants N or N:M, got {port!r}", err=True)
                raise typer.Exit(EXIT_USAGE) from None
        do(
            "security-group.rule-add",
            output,
            tenant=tenant,
            security_group=security_group,
            protocol=protocol,
            port_min=lo,
            port_max=hi,
            remote_cidr=remote_cidr,
            remote_group=remote_group,
            direction=direction,
        )

    @rule_app.command("remove")
    def rule_remove(
        security_group: str, rule: str, tenant: TenantOpt = None, output: OutputOpt = Format.table
    ) -> None:
        do(
            "security-group.rule-remove",
            output,
            tenant=tenant,
            security_group=security_group,
            rule=rule,
        )

    @apps["qos-policy"].command("create")
    def qos_create(
        name: str,
        max_kbps: Annotated[int, typer.Option()],
        burst_kb: Annotated[int, typer.Option()] = 0,
        tenant: TenantOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        do(
            "qos-policy.create",
            output,
            tenant=tenant,
            name=name,
            max_kbps=max_kbps,
            burst_kb=burst_kb,
        )

    quota = group("Quotas: limits and usage per tenant.")
    root.add_typer(quota, name="quota")

    @quota.command("show")
    def quota_show(
        tenant: Annotated[str | None, typer.Argument()] = None,
        at: AtOpt = None,
        output: OutputOpt = Format.table,
    ) -> None:
        data = run(lambda c: c.query("quota", _body(tenant), at=at))
        _emit_quota(data, output)

    @quota.command("set")
    def quota_set(
        tenant: str,
        instances: Annotated[int | None, typer.Option()] = None,
        vcpus: Annotated[int | None, typer.Option()] = None,
        ram_mb: Annotated[int | None, typer.Option()] = None,
        volumes: Annotated[int | None, typer.Option()] = None,
        volume_gb: Annotated[int | None, typer.Option()] = None,
        networks: Annotated[int | None, typer.Option()] = None,
        subnets: Annotated[int | None, typer.Option()] = None,
        ports: Annotated[int | None, typer.Option()] = None,
        routers: Annotated[int | None, typer.Option()] = None,
        floating_ips: Annotated[int | None, typer.Option()] = None,
        security_groups: Annotated[int | None, typer.Option()] = None,
        output: OutputOpt = Format.table,
    ) -> None:
        """Set limits (-1: unlimited); below usage only blocks new allocations."""
        limits = {
            k: v
            for k, v in {
                "instances": instances,
                "vcpus": vcpus,
                "ram_mb": ram_mb,
                "volumes": volumes,
                "volume_gb": volume_gb,
                "networks": networks,
                "subnets": subnets,
                "ports": ports,
                "routers": routers,
                "floating_ips": floating_ips,
                "security_groups": security_groups,
            }.items()
            if v is not None
        }
        _emit_quota(send("quota.set", tenant=tenant, limits=limits).data, output)
