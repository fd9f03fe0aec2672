"""``stratus credentials ...``: each service's own identity on the broker.

A credentials file (``events.natscreds.ServiceCreds``, JSON, mode 0600) is
all a ``stratus serve KIND --creds FILE`` process gets: a token that the
auth callout admits with the permissions of KIND (for one host: agents),
and for the few kinds that need them their own secrets. It is issued

* where the cloud was initialised (``--data-dir``, the directory with the
  key ring ``keys/`` and the broker's nkeys ``broker/``): signed there and
  recorded on the log over a connection with a credential minted there.
  The kinds that carry secrets (``handlers``: the private signing keys and
  the webhook master key; ``webhooks``: that master key; ``auth-callout``:
  the broker's nkeys) are issued only this way;
* or by the cloud admin anywhere (``credential.issue``), for every other kind.

Revoking one (``credentials revoke ID``) voids its token everywhere and
cuts its connections.
"""

# No ``from __future__ import annotations`` here: typer reads every command's
# signature at each start (see cli/main.py).

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stratus.cli.common import (
    EXIT_USAGE,
    OutputOpt,
    fail,
    group,
    resolve_token,
    resolve_url,
    send,
)
from stratus.cli.output import Format, emit

credentials_app = group("Service credentials: each service's own identity on the broker.")

DAY_S = 24 * 3600


def _usage(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def key_ring_dir(data_dir: Path | None) -> Path | None:
    """The data dir holding a key ring (``keys/``): the one given, else the
    default one if it has a ring; None if there is none."""
    from stratus.cli.datadir import default_data_dir

    d = data_dir or default_data_dir()
    return d if (d / "keys" / "order").exists() else None


def local_creds(data_dir: Path, kind: str, host: str = "", ttl_s: int = 365 * DAY_S) -> Any:
    """A credential signed with the data dir's key ring, with the secrets
    its kind carries (not recorded on the log: ``issue`` does that)."""
    import msgspec

    from stratus.cli.datadir import BROKER_DIR
    from stratus.events.natscreds import ServiceCreds, SigningKeys
    from stratus.handlers.credentials import mint
    from stratus.handlers.integrations import WebhookKeys
    from stratus.handlers.keyring import KeyRing
    from stratus.handlers.natsauth import BrokerKeys

    keyring = KeyRing.load_or_create(data_dir / "keys")
    if kind == "auth-callout":
        keys = BrokerKeys.load_or_create(data_dir / BROKER_DIR)
        return ServiceCreds(
            kind=kind,
            auth_seed=keys.auth_seed,
            sys_seed=keys.sys_seed,
            issuer_seed=keys.issuer_seed,
            public_keys={kid: raw.hex() for kid, raw in keyring.public_keys().items()},
        )
    creds, _ = mint(keyring, kind, host, ttl_s)
    extra: dict[str, Any] = {}
    if kind in ("handlers", "webhooks"):
        master = WebhookKeys.load_or_create(data_dir / "keys")
        extra["webhook_master"] = master.master.decode()
    if kind == "handlers":
        order, pem = keyring.to_pem()
        extra["signing_keys"] = SigningKeys(order, pem)
    return msgspec.structs.replace(creds, **extra)


async def record(url: str, data_dir: Path, creds: Any) -> None:
    """Put a locally issued credential on the log (``credential.issued``),
    over a connection admitted by a handlers credential minted here; the
    stream and the signing keys are made on the way if this is a new cloud."""
    from stratus.cli.runtime import publish_signing_keys
    from stratus.events.ids import new_id
    from stratus.events.model import Cause
    from stratus.events.store import Condition, EventStore
    from stratus.handlers.credentials import issued
    from stratus.handlers.keyring import KeyRing

    writer = local_creds(data_dir, "handlers", ttl_s=600)
    store = await EventStore.connect(url, persistent=False, creds=writer)
    try:
        await store.ensure_stream()
        await publish_signing_keys(store, KeyRing.load_or_create(data_dir / "keys"))
        cid = new_id()
        event = issued(creds, Cause(actor="system", correlation_id=cid, causation_id=cid))
        await store.append([event], Condition(event.subject, 0))
    finally:
        await store.close()


@credentials_app.command("issue")
def credentials_issue(
    service: Annotated[str, typer.Option("--service", help="the service kind")],
    host: Annotated[
        str | None, typer.Option(help="the host (compute-agent, network-agent)")
    ] = None,
    ttl_days: Annotated[int, typer.Option(min=1, max=3660, help="valid for this long")] = 365,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="where the cloud was initialised (its key ring): issue here"),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="write here (mode 0600), not to stdout")
    ] = None,
) -> None:
    """Write a credentials file for one service: `stratus serve KIND --creds FILE`."""
    from stratus.events.errors import StratusError
    from stratus.events.natscreds import SECRET_KINDS, ServiceCreds, dumps, write_private
    from stratus.handlers.credentials import check_kind

    try:
        kind, host_name = check_kind(service, host)
    except StratusError as err:
        raise _usage(err.message) from None
    ring = key_ring_dir(data_dir)
    local = ring is not None and (
        data_dir is not None or kind in SECRET_KINDS or resolve_token() is None
    )
    if kind in SECRET_KINDS and ring is None:
        raise _usage(
            f"{kind} credentials carry secrets kept where the cloud was initialised: "
            "run this there, or pass --data-dir"
        )
    try:
        if local:
            assert ring is not None
            creds = local_creds(ring, kind, host_name, ttl_days * DAY_S)
            if creds.token:
                asyncio.run(record(resolve_url(), ring, creds))
        else:
            import msgspec

            data = send("credential.issue", kind=kind, host=host_name or None, ttl_days=ttl_days)
            creds = msgspec.convert(data.data, ServiceCreds)
    except StratusError as err:
        raise fail(err) from None
    text = dumps(creds)
    if file is None:
        sys.stdout.buffer.write(text)
    else:
        write_private(file, text)
    label = creds.id or "(the broker's own nkeys)"
    typer.echo(f"issued {creds.label} credentials {label}", err=True)


@credentials_app.command("revoke")
def credentials_revoke(
    credential_id: Annotated[str, typer.Argument(help="the credential's id (its file's `id`)")],
    output: OutputOpt = Format.table,
) -> None:
    """Void a service credential everywhere; its connections are cut."""
    emit(send("credential.revoke", id=credential_id).data, output)


def load_for_serve(path: Path) -> Any:
    """The credentials a ``serve`` process was given; a usage error (exit 2) if unreadable."""
    import os
    import stat

    from stratus.events.errors import StratusError
    from stratus.events.natscreds import load

    try:
        creds = load(path)
    except StratusError as err:
        raise _usage(err.message) from None
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        typer.echo(
            f"warning: {path} may be read by other users (mode {mode & 0o777:04o}): "
            f"chmod 600 {path}",
            err=True,
        )
    return creds


def register(app: typer.Typer) -> None:
    app.add_typer(credentials_app, name="credentials")
