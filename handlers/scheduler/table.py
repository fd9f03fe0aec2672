"""Every host the scheduler knows, as a struct of arrays.

One row per host ever registered (a removed host keeps its row, marked
gone), one numpy array per attribute, so a filter is one vectorised
comparison over all hosts and a weigher one arithmetic expression. The
table is a fold of the hosts' own subjects (``ev._system.host.<name>``):
registration, capacity, enable/disable, and the claims placed there.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from stratus.events.model import Event
from stratus.events.resources import (
    HostDisabled,
    HostEnabled,
    HostRegistered,
    HostRemoved,
    HostUpdated,
    ServerGroupCreated,
    ServerGroupDeleted,
)
from stratus.events.scheduling import HostClaimed, HostReleased

# Events the table folds: the hosts' subjects and the server groups (whose
# policy the affinity filters need).
SUBJECTS = ("ev._system.host.>", "ev.*.server-group.*")


class Claim(msgspec.Struct, frozen=True, gc=False):
    """(``gc=False``: ints and strings only, never part of a cycle, so the
    collector need not walk the hundreds of thousands a big cloud's table
    holds.)"""

    host: int
    vcpus: int
    ram_mb: int
    disk_gb: int
    group: str
    seq: int
    tenant: str = ""
    attempt: int = 1


_FLOAT = ("vcpus", "ram_mb", "disk_gb", "cpu_ratio", "ram_ratio", "disk_ratio")
_FLOAT_ALL = (
    *_FLOAT,
    "cap_vcpus",
    "cap_ram",
    "cap_disk",
    "used_vcpus",
    "used_ram",
    "used_disk",
    "alive_until",
)
_BOOL = ("exists", "enabled", "vm", "container")
_INT = ("last_seq", "hold", "zone")


class HostTable:
    """Mutable on purpose: it is folded one event at a time at high rate."""

    def __init__(self, capacity: int = 256) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.labels: list[dict[str, str]] = []
        self.zones: dict[str, int] = {}
        self._size = capacity
        for a in _FLOAT_ALL:
            setattr(self, a, np.zeros(capacity, np.float64))
        for a in _BOOL:
            setattr(self, a, np.zeros(capacity, np.bool_))
        for a in _INT:
            setattr(self, a, np.zeros(capacity, np.int64))
        # server id -> its claim; group id -> host row -> members there
        self.claims: dict[str, Claim] = {}
        self.group_hosts: dict[str, dict[int, int]] = {}
        self.policies: dict[str, str] = {}
        # Beats heard before their host registered.
        self._early_beats: dict[str, float] = {}
        self._label_masks: dict[tuple[str, str], np.ndarray] = {}
        self.last_applied = 0

    # -- shape -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def col(self, name: str) -> np.ndarray:
        """The live part (one entry per known host) of one column."""
        return getattr(self, name)[: len(self.names)]

    def _row(self, name: str) -> int:
        i = self.index.get(name)
        if i is not None:
            return i
        i = len(self.names)
        if i == self._size:
            self._size *= 2
            for a in (*_FLOAT_ALL, *_BOOL, *_INT):
                old = getattr(self, a)
                new = np.zeros(self._size, old.dtype)
                new[:i] = old
                setattr(self, a, new)
        self.names.append(name)
        self.labels.append({})
        self.index[name] = i
        self.alive_until[i] = self._early_beats.pop(name, 0.0)
        return i

    def zone_code(self, zone: str) -> int:
        code = self.zones.get(zone)
        if code is None:
            code = self.zones[zone] = len(self.zones) + 1
        return code

    def label_mask(self, key: str, value: str) -> np.ndarray:
        """Hosts whose label ``key`` is ``value`` (cached until labels change)."""
        m = self._label_masks.get((key, value))
        if m is None or len(m) != len(self.names):
            m = np.fromiter((lb.get(key) == value for lb in self.labels), np.bool_, len(self.names))
            self._label_masks[(key, value)] = m
        return m

    # -- folding -----------------------------------------------------------

    def apply(self, seq: int, event: Event) -> None:
        """Fold one event of a host's subject (or a server group's)."""
        if seq <= self.last_applied:
            return  # a redelivery: already folded
        self.last_applied = seq
        if isinstance(event, ServerGroupCreated):
            self.policies[event.aggregate.id] = event.policy
            return
        if isinstance(event, ServerGroupDeleted):
            self.policies.pop(event.aggregate.id, None)
            return
        if event.aggregate.kind != "host":
            return
        i = self._row(event.aggregate.id)
        self.last_seq[i] = seq
        if isinstance(event, HostClaimed):
            self._claim(i, event, seq)
        elif isinstance(event, HostReleased):
            self._release(event.server)
        elif isinstance(event, (HostRegistered, HostUpdated)):
            self._capacity(i, event)
            if isinstance(event, HostRegistered):
                self.exists[i] = self.enabled[i] = True
        elif isinstance(event, HostEnabled):
            self.enabled[i] = True
        elif isinstance(event, HostDisabled):
            self.enabled[i] = False
        elif isinstance(event, HostRemoved):
            self.exists[i] = self.enabled[i] = False

    def _capacity(self, i: int, e: HostRegistered | HostUpdated) -> None:
        for a in _FLOAT:
            getattr(self, a)[i] = getattr(e, a)
        self.cap_vcpus[i] = e.vcpus * e.cpu_ratio
        self.cap_ram[i] = e.ram_mb * e.ram_ratio
        self.cap_disk[i] = e.disk_gb * e.disk_ratio
        self.zone[i] = self.zone_code(e.zone)
        self.vm[i] = "vm" in e.types
        self.container[i] = "container" in e.types
        if self.labels[i] != e.labels:
            self.labels[i] = dict(e.labels)
            self._label_masks.clear()

    def _claim(self, i: int, e: HostClaimed, seq: int) -> None:
        if e.server in self.claims:
            self._release(e.server)
        s = e.spec
        self.claims[e.server] = Claim(
            i, s.vcpus, s.ram_mb, s.disk_gb, s.group, seq, e.server_tenant, e.attempt
        )
        self.used_vcpus[i] += s.vcpus
        self.used_ram[i] += s.ram_mb
        self.used_disk[i] += s.disk_gb
        if s.group:
            g = self.group_hosts.setdefault(s.group, {})
            g[i] = g.get(i, 0) + 1

    def _release(self, server: str) -> None:
        c = self.claims.pop(server, None)
        if c is None:
            return
        self.used_vcpus[c.host] -= c.vcpus
        self.used_ram[c.host] -= c.ram_mb
        self.used_disk[c.host] -= c.disk_gb
        if c.group:
            g = self.group_hosts.get(c.group, {})
            g[c.host] = g.get(c.host, 1) - 1
            if g[c.host] <= 0:
                g.pop(c.host, None)

    def set_alive(self, host: str, until: float) -> None:
        i = self.index.get(host)
        if i is None:
            self._early_beats[host] = until
        else:
            self.alive_until[i] = until

    def group_mask(self, group: str) -> np.ndarray:
        """Hosts where a member of ``group`` holds a claim."""
        m = np.zeros(len(self.names), np.bool_)
        rows = self.group_hosts.get(group)
        if rows:
            m[list(rows)] = True
        return m

    def row_of(self, name: str) -> int | None:
        return self.index.get(name)

    def window(self, lo: int, hi: int) -> Window:
        """Rows ``lo`` to ``hi`` (exclusive), as the filters read them."""
        return Window(self, lo, hi)

    def host_of(self, server: str) -> str | None:
        c = self.claims.get(server)
        return self.names[c.host] if c else None

    def usage(self) -> list[dict[str, Any]]:
        """Per live host: capacity (after ratios) and what is claimed of it."""
        out = []
        for i, name in enumerate(self.names):
            if not self.exists[i]:
                continue
            out.append(
                {
                    "host": name,
                    "vcpus": float(self.cap_vcpus[i]),
                    "ram_mb": float(self.cap_ram[i]),
                    "used_vcpus": float(self.used_vcpus[i]),
                    "used_ram_mb": float(self.used_ram[i]),
                    "servers": sum(1 for c in self.claims.values() if c.host == i),
                }
            )
        return out


class Window:
    """Rows ``lo..hi`` of a table through the interface filters read (``col``,
    ``label_mask``, ``group_mask``, ``row_of``, ``zones``, ``policies``,
    ``group_hosts``): columns are numpy views (no copy), so filtering a
    window costs what the window holds, not the whole table. Row numbers a
    window answers are relative to ``lo``."""

    def __init__(self, t: HostTable, lo: int, hi: int) -> None:
        self.table, self.lo, self.hi = t, lo, hi
        self.zones = t.zones
        self.policies = t.policies
        self.group_hosts = t.group_hosts

    def __len__(self) -> int:
        return self.hi - self.lo

    def col(self, name: str) -> np.ndarray:
        return getattr(self.table, name)[self.lo : self.hi]

    def label_mask(self, key: str, value: str) -> np.ndarray:
        return self.table.label_mask(key, value)[self.lo : self.hi]

    def group_mask(self, group: str) -> np.ndarray:
        m = np.zeros(self.hi - self.lo, np.bool_)
        for row in self.group_hosts.get(group, ()):
            if self.lo <= row < self.hi:
                m[row - self.lo] = True
        return m

    def row_of(self, name: str) -> int | None:
        i = self.table.index.get(name)
        return i - self.lo if i is not None and self.lo <= i < self.hi else None
