"""What the compute agent needs of one kind of instance: the ``Driver`` protocol.

Two implementations: ``LibvirtDriver`` (``vm``, domain.py) and
``ContainerDriver`` (``container``, containers.py). The agent holds one per
instance type it runs and never looks past this interface, so its single
apply path (``ComputeAgent.converge``) is the same for both.

Every call blocks (the agent runs it in a thread), is idempotent where the
name says a state (``ensure``, ``stop``, ``remove``), and fails with
``HostError`` (events/errors.py) carrying the host's own words; anything
else escaping a driver is a bug.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from stratus.agents.compute.spec import InstanceSpec

# What a driver says an instance of this host is doing.
PowerState = Literal["running", "stopped"]


class ExecResult(msgspec.Struct, frozen=True):
    exit_code: int
    stdout: str
    stderr: str


class Driver(Protocol):
    def list_owned(self) -> dict[str, PowerState]:
        """server id -> power state of every instance this host's Stratus owns."""
        ...

    def state(self, server: str) -> PowerState | None:
        """The power state of ``server``'s instance here; None if there is none."""
        ...

    def ensure(self, spec: InstanceSpec, running: bool = True) -> None:
        """Defined (and running if ``running``), whatever state it was in."""
        ...

    def start(self, spec: InstanceSpec) -> None: ...

    def stop(self, server: str) -> None: ...

    def reboot(self, spec: InstanceSpec) -> None: ...

    def remove(self, server: str) -> None:
        """Gone, with everything of it on the host but its disk files."""
        ...

    def volumes(self, server: str) -> list[str]:
        """The paths of the volumes attached to ``server`` (its root disk excluded)."""
        ...

    def attach(self, spec: InstanceSpec, volume: str, path: str) -> None: ...

    def detach(self, spec: InstanceSpec, path: str) -> None: ...

    def paused(self, server: str) -> AbstractContextManager[None]:
        """The instance held still meanwhile (its disk is not written under us)."""
        ...

    def exec(self, server: str, command: list[str], timeout: float) -> ExecResult: ...

    @property
    def runtime_version(self) -> str:
        """The runtime that runs instances (``runc 1.1.5+ds1``), for
        ``server.running``; "" where there is none to name."""
        ...

    def commit(self, server: str, out: Path) -> tuple[str, int]:
        """An OCI container's writes as a layer tar at ``out``: its digest
        and size (a snapshot); ``HostError`` where instances have no layers."""
        ...

    def close(self) -> None:
        """Release what the driver holds (after the agent stopped)."""
        ...
