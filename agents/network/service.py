"""Running network agents: one for a real host (``stratus serve
network-agent``), or one per simulated host (``stratus up --hosts N``, as
root: each host a namespace on an underlay bridge, agents inside them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from stratus.agents.network.agent import NetworkAgent
from stratus.agents.network.bird import BgpConfig
from stratus.agents.network.sim import SimulatedHosts
from stratus.events import network as nw
from stratus.events.errors import Invalid
from stratus.events.store import EventStore

# The name prefix of a deployment's kernel objects unless configured.
DEFAULT_PREFIX = "st"


def network_capable() -> str | None:
    """None if this process may build networks, else why it may not."""
    if os.geteuid() != 0:
        return "network agents need root (CAP_NET_ADMIN): they are disabled"
    if not Path("/proc/sys/net/bridge").exists():
        return "the kernel has no bridge netfilter (br_netfilter): network agents are disabled"
    return None


def host_names(n: int) -> list[str]:
    """The simulated hosts' names: the compute agents' (``host-01`` ...)."""
    return [f"host-{i:02d}" for i in range(1, n + 1)]


class SimulatedPlane:
    """Simulated hosts and their network agents (the first hosts routers).
    Each agent keeps its files (BIRD's, once a routed network exists) under
    ``state_dir/<host>``; a teardown removes them."""

    def __init__(
        self,
        store: EventStore,
        hosts: int,
        prefix: str = DEFAULT_PREFIX,
        state_dir: Path | None = None,
        bgp: BgpConfig | None = None,
        *,
        store_for: Callable[[str], Awaitable[EventStore]] | None = None,
    ) -> None:
        """``store_for(host)``: each host agent's own connection (with its
        host's credentials), else all use ``store``."""
        self.sim = SimulatedHosts(prefix, host_names(hosts))
        self.store = store
        self.store_for = store_for
        self.prefix = prefix
        self.state_dir = state_dir
        self.bgp = bgp
        self.agents: list[NetworkAgent] = []

    async def start(self) -> None:
        await asyncio.to_thread(self.sim.start)
        for i, h in enumerate(self.sim.names):
            agent = NetworkAgent(
                await self.store_for(h) if self.store_for else self.store,
                h,
                vtep=self.sim.vtep(h),
                prefix=self.prefix,
                host_ns=self.sim.netns(h),
                routers=i == 0,
                state_dir=self.state_dir / h if self.state_dir is not None else None,
                bgp=self.bgp,
            )
            await agent.start()
            self.agents.append(agent)

    async def stop(self, teardown: bool = False) -> None:
        """Stop the agents; the hosts stay (a restart reconciles them) unless
        ``teardown`` removes every namespace and link of the simulation."""
        for a in self.agents:
            await a.stop()
        if teardown:
            for a in self.agents:
                await a.teardown()
            await asyncio.to_thread(self.sim.stop)
            if self.state_dir is not None:
                with contextlib.suppress(OSError):  # (empty once the agents' files are gone)
                    self.state_dir.rmdir()


async def serve_agent(
    store: EventStore,
    host: str,
    vtep: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    host_ns: str | None = None,
    routers: bool = False,
    interval: float = 10.0,
    state_dir: Path | None = None,
    bgp: BgpConfig | None = None,
) -> NetworkAgent:
    """Start the agent of one (real) host; ``state_dir`` holds its files
    (BIRD's configuration, control socket, pid file and log)."""
    if host_ns:
        nw.check_netns_name(host_ns)
    nw.kernel_name(prefix, "bridge", host)  # a bad prefix is refused here, not mid-way
    try:
        ipaddress.ip_address(vtep)
    except ValueError:
        raise Invalid(f"--vtep {vtep!r} is not an IP address") from None
    agent = NetworkAgent(
        store,
        host,
        vtep=vtep,
        prefix=prefix,
        host_ns=host_ns,
        routers=routers,
        interval=interval,
        state_dir=state_dir,
        bgp=bgp,
    )
    await agent.start()
    return agent
