"""Scenario helpers for the compute agent tests: the scheduler's part played
by appending ``host.claimed`` + ``server.scheduled`` ourselves."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stratus.agents.compute.agent import ComputeAgent, HostSpec
from stratus.agents.compute.containers import ContainerDriver
from stratus.agents.compute.domain import LibvirtDriver
from stratus.events.compute import HostServerAction
from stratus.events.ids import new_id
from stratus.events.model import Cause, Event
from stratus.events.resources import SYSTEM, ServerRequested, ServerScheduled, ServerSpec
from stratus.events.store import EventStore
from stratus.handlers.scheduler.service import claim_event, request_of

TENANT = "acme"


def unique_host() -> str:
    # The test driver's state is shared by every connection in the process:
    # a host name per test keeps tests from seeing each other's domains.
    return f"h-{uuid.uuid4().hex[:10]}"


def cause() -> Cause:
    cid = new_id()
    return Cause(actor="scheduler", correlation_id=cid, causation_id=cid)


def host_action(host: str, sid: str, what: str, **kw: Any) -> HostServerAction:
    """A verb on a placed server as its host's agent receives it."""
    return cause().make(
        HostServerAction,
        SYSTEM,
        "host",
        host,
        server=sid,
        server_tenant=TENANT,
        action=what,
        **kw,
    )


async def place(
    store: EventStore,
    host: str,
    *,
    vcpus: int = 1,
    ram_mb: int = 64,
    disk_gb: int = 0,
    image: str = "img",
    instance_type: str = "vm",
    server: str | None = None,
    tenant: str = TENANT,
) -> str:
    """Request a server and claim it on ``host`` the way the scheduler does."""
    sid = server or new_id()
    c = cause()
    requested = c.make(
        ServerRequested,
        tenant,
        "server",
        sid,
        spec=ServerSpec(
            name=f"s-{sid[-6:]}",
            image=image,
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=disk_gb,
            instance_type=instance_type,
        ),
    )
    # The scheduler's own claim, so the agent is tested on what it will get.
    claim = claim_event(c, host, request_of(requested))
    scheduled = c.make(ServerScheduled, tenant, "server", sid, host=host)
    await store.append([requested])
    await store.append([claim, scheduled])
    return sid


async def server_events(store: EventStore, sid: str, tenant: str = TENANT) -> list[Event]:
    recs = await store.read_all(subjects=[f"ev.{tenant}.server.{sid}"])
    return [r.decode() for r in recs]


async def wait_for(
    store: EventStore, sid: str, type_name: str, timeout: float = 20.0, tenant: str = TENANT
) -> list[Event]:
    """The server's events once one of ``type_name`` is among them (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = await server_events(store, sid, tenant)
        if any(e.type_name() == type_name for e in evs):
            return evs
        await asyncio.sleep(0.05)
    evs = await server_events(store, sid, tenant)
    seen = [(e.type_name(), getattr(e, "reason", "")) for e in evs]
    raise AssertionError(f"no {type_name} for {sid} in {timeout}s: {seen}")


def make_agent(
    store: EventStore,
    host: str,
    tmp: Path,
    *,
    vm: bool = True,
    containers: bool = False,
    reconcile_interval: float = 3600,
    spec: HostSpec | None = None,
) -> ComputeAgent:
    data = tmp / host
    return ComputeAgent(
        store,
        host,
        data_dir=data,
        spec=spec or HostSpec(vcpus=16, ram_mb=32768, disk_gb=500),
        vm=LibvirtDriver("test:///default", host) if vm else None,
        containers=ContainerDriver(host, data / "containers") if containers else None,
        reconcile_interval=reconcile_interval,
    )


async def cleanup(agent: ComputeAgent) -> None:
    """Stop the agent and remove every instance it owns (domains, cgroups, netns)."""
    await agent.stop()
    for driver in agent.drivers.values():
        for server in list(driver.list_owned()):
            with contextlib.suppress(Exception):
                driver.remove(server)
        if hasattr(driver, "cgroups"):
            driver.cgroups.prune()
        if hasattr(driver, "close"):
            driver.close()


@contextlib.asynccontextmanager
async def running_agent(store: EventStore, tmp: Path, **kw: Any) -> AsyncIterator[ComputeAgent]:
    """A started agent on a host of its own, cleaned up (instances and all) after."""
    agent = make_agent(store, unique_host(), tmp, **kw)
    await agent.start()
    try:
        yield agent
    finally:
        await cleanup(agent)


def owned(agent: ComputeAgent) -> dict[str, str]:
    out: dict[str, str] = {}
    for driver in agent.drivers.values():
        out.update(driver.list_owned())
    return out


def types(evs: list[Any]) -> list[str]:
    return [e.type_name() for e in evs]
