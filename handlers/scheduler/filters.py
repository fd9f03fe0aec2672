"""Filters: which hosts can take a server at all.

A filter has a ``name`` (what configuration and reasons use) and answers
with checks: each a short reason and a boolean mask over every host (True:
passes). Masks are computed for all hosts at once; the decision applies
them in order and counts how many hosts each one removed, which is what the
user reads: "0/5000 hosts: 3120 insufficient RAM, 1880 label zone=b not
matched".

Masks cover the hosts a filter is given: the whole table, or a window of
its rows when the decision samples (see ``decide``), so a filter never
assumes it sees every host.

The pure cores (``fits``) are plain functions on arrays, tested on their own.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from typing import ClassVar

import msgspec
import numpy as np

from stratus.events.resources import ServerSpec
from stratus.handlers.scheduler.table import HostTable, Window

# What a filter reads: the whole table, or a window of its rows.
Hosts = HostTable | Window
Check = tuple[str, np.ndarray]


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One placement: the server's spec as ``server.requested`` carries it
    (what the filters and weighers read, and what the claim carries on to
    the host), and where this attempt stands."""

    server: str
    tenant: str
    spec: ServerSpec
    # Hosts this server's build already failed on (retries go elsewhere).
    exclude: tuple[str, ...] = ()
    attempt: int = 1


def fits(capacity: np.ndarray, used: np.ndarray, requested: float) -> np.ndarray:
    """Hosts with room for ``requested`` more: used + requested <= capacity.

    ``capacity`` is after the allocation ratio (4 vCPUs at ratio 4.0 hold
    16), as in Nova's CoreFilter and kube's PodFitsResources.
    """
    return used + requested <= capacity


class Filter:
    name: ClassVar[str]

    def applies(self, r: Request) -> bool:
        """False when the request cannot be refused by this filter (skipped)."""
        return True

    def key(self, r: Request) -> Hashable:
        """Everything of ``r`` that ``applies`` and ``checks`` read: two
        requests with equal keys get the same masks from the same table
        (``Decider.decide`` reuses one for the other within a round). A
        filter that does not say is never shared."""
        return object()

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        raise NotImplementedError


class HostAlive(Filter):
    """Hosts whose agent heartbeat has not expired."""

    name = "HostAlive"

    def key(self, r: Request) -> Hashable:
        return ()

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        yield "not alive (no heartbeat)", t.col("alive_until") > time.time()


class HostEnabled(Filter):
    name = "HostEnabled"

    def key(self, r: Request) -> Hashable:
        return ()

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        yield "disabled", t.col("enabled")


class InstanceType(Filter):
    """Hosts that run this instance type (``vm`` through libvirt, ``container``)."""

    name = "InstanceType"

    def key(self, r: Request) -> Hashable:
        return r.spec.instance_type

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        col = "container" if r.spec.instance_type == "container" else "vm"
        yield f"no {col} support", t.col(col)


class ResourceFit(Filter):
    """vCPU, RAM and disk, each against capacity x allocation ratio."""

    name = "ResourceFit"

    def key(self, r: Request) -> Hashable:
        return (r.spec.vcpus, r.spec.ram_mb, r.spec.disk_gb)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        yield "insufficient vCPU", fits(t.col("cap_vcpus"), t.col("used_vcpus"), r.spec.vcpus)
        yield "insufficient RAM", fits(t.col("cap_ram"), t.col("used_ram"), r.spec.ram_mb)
        if r.spec.disk_gb:
            yield "insufficient disk", fits(t.col("cap_disk"), t.col("used_disk"), r.spec.disk_gb)


class Labels(Filter):
    """Every ``--label k=v`` of the server must be a label of the host."""

    name = "Labels"

    def key(self, r: Request) -> Hashable:
        return tuple(sorted(r.spec.labels.items()))

    def applies(self, r: Request) -> bool:
        return bool(r.spec.labels)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        for k, v in sorted(r.spec.labels.items()):
            yield f"label {k}={v} not matched", t.label_mask(k, v)


class HostName(Filter):
    """``--host``: that host and no other."""

    name = "HostName"

    def key(self, r: Request) -> Hashable:
        return r.spec.requested_host

    def applies(self, r: Request) -> bool:
        return bool(r.spec.requested_host)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        host = r.spec.requested_host
        m = np.zeros(len(t), np.bool_)
        i = t.row_of(host)
        if i is not None:
            m[i] = True
        yield f"not host {host}", m


class AvailabilityZone(Filter):
    name = "AvailabilityZone"

    def key(self, r: Request) -> Hashable:
        return r.spec.zone

    def applies(self, r: Request) -> bool:
        return bool(r.spec.zone)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        zone = r.spec.zone
        code = t.zones.get(zone, -1)
        yield f"not in zone {zone}", t.col("zone") == code


class ServerGroupAffinity(Filter):
    """Members of an affinity group share a host (any host for the first)."""

    name = "ServerGroupAffinity"

    def key(self, r: Request) -> Hashable:
        return r.spec.group

    def applies(self, r: Request) -> bool:
        return bool(r.spec.group)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        group = r.spec.group
        if t.policies.get(group) != "affinity" or not t.group_hosts.get(group):
            return
        yield "affinity: not the group's host", t.group_mask(group)


class ServerGroupAntiAffinity(Filter):
    """Members of an anti-affinity group never share a host."""

    name = "ServerGroupAntiAffinity"

    def key(self, r: Request) -> Hashable:
        return r.spec.group

    def applies(self, r: Request) -> bool:
        return bool(r.spec.group)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        group = r.spec.group
        if t.policies.get(group) != "anti-affinity" or not t.group_hosts.get(group):
            return
        yield "anti-affinity: group member there", ~t.group_mask(group)


class Retry(Filter):
    """Hosts this server's build already failed on."""

    name = "Retry"

    def key(self, r: Request) -> Hashable:
        return r.exclude

    def applies(self, r: Request) -> bool:
        return bool(r.exclude)

    def checks(self, t: Hosts, r: Request) -> Iterator[Check]:
        m = np.ones(len(t), np.bool_)
        for h in r.exclude:
            i = t.row_of(h)
            if i is not None:
                m[i] = False
        yield "build failed there before", m


FILTERS: dict[str, type[Filter]] = {
    f.name: f
    for f in (
        HostAlive,
        HostEnabled,
        InstanceType,
        HostName,
        AvailabilityZone,
        Labels,
        ServerGroupAffinity,
        ServerGroupAntiAffinity,
        Retry,
        ResourceFit,
    )
}
DEFAULT_FILTERS = tuple(FILTERS)
