"""What the scheduler and the compute agents say to each other about hosts.

A placement is claimed on the host's own subject, ``ev._system.host.<name>``:
``host.claimed`` reserves the server's vCPUs, RAM and disk there and
``host.released`` gives them back. A host's capacity in use is therefore the
fold of its subject alone, and a claim appended on the condition "nothing
new on this host since the state I decided on" can never double-book it.
The compute agent of the host consumes the same subject to learn its work.

Liveness is not history: agents heartbeat into the KV bucket ``HEARTBEATS``
(one key per host, a per-key TTL), never into the event log.
"""

from __future__ import annotations

import msgspec

from stratus.events.model import Event
from stratus.events.resources import ServerSpec, nest_spec

# The KV bucket agents heartbeat into (key: host name) and how long a beat
# keeps its host alive. Agents beat every HEARTBEAT_INTERVAL seconds, so a
# host survives two lost beats before the scheduler stops choosing it.
HEARTBEATS = "stratus-heartbeats"
HEARTBEAT_TTL = 15.0
HEARTBEAT_INTERVAL = 5.0


class HostClaimed(Event, frozen=True, tag="host.claimed"):
    """Capacity on the host reserved for one server: its whole spec, as
    requested, is what the host's agent builds."""

    # 2: the spec nested whole (1 had some of its fields at the top level).
    version = 2
    server: str
    server_tenant: str
    spec: ServerSpec
    attempt: int = 1


class HostReleased(Event, frozen=True, tag="host.released"):
    """The server's claim on the host given back (deleted, or its build failed)."""

    server: str
    server_tenant: str
    reason: str = ""


class ServerBuildFailed(Event, frozen=True, tag="server.build-failed"):
    """The compute agent could not build the server on ``host``; the
    scheduler tries another host, or gives up with ``server.failed``."""

    host: str
    reason: str
    attempt: int = 1


class ServerBuildTimeout(ServerBuildFailed, frozen=True, tag="server.build-timeout"):
    """The scheduler's timer: the server stayed ``scheduled`` or ``building``
    on ``host`` while that host was not beating, for longer than the
    configured build timeout. Appended on the condition that nothing came on
    the server's subject since, so it and the agent's own report exclude each
    other; the scheduler then tries another host, as after a build failure."""


class HostHeartbeat(msgspec.Struct, frozen=True):
    """One beat in the KV bucket (not an event: it never reaches the log)."""

    host: str
    at: float
    # How long this beat keeps the host alive (the watcher's clock, not the sender's).
    ttl: float = HEARTBEAT_TTL
    # The agent's own view, shown by ``host show``; the scheduler trusts claims.
    instances: int = 0


EVENTS = (HostClaimed, HostReleased, ServerBuildFailed, ServerBuildTimeout)
UPCASTERS = {("host.claimed", 1): nest_spec}
