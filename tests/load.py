"""Load for the kill tests: clients creating tenants until told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from stratus.cli.client import Client
from stratus.events.errors import StratusError
from stratus.events.ids import new_id


async def create_tenants(
    url: str, token: str, w: int, stop: asyncio.Event, on_ack: Callable[[str, str], None]
) -> None:
    """Worker ``w``: tenants ``w<w>-<n>`` one after another, each acknowledged
    one reported as ``on_ack(command id, name)``. One-shot connections, as
    the CLI makes: a dropped broker or node means a new connection to the
    URL list, and an unknown outcome the same command again, same id."""
    client: Client | None = None
    n, cid = 0, new_id()
    while not stop.is_set():
        try:
            if client is None:
                client = await Client.connect(url, token, timeout=3)
            name = f"w{w}-{n}"
            await client.command("tenant.create", {"name": name}, cid)
            on_ack(cid, name)
            n, cid = n + 1, new_id()
        except StratusError:
            if client is not None:
                await client.close()
            client = None
            await asyncio.sleep(0.05)
    if client is not None:
        await client.close()
