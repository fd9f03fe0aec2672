"""A framework of two-level scheduling, in Python: register, receive offers,
accept some with tasks or decline them, report the tasks' ends.

    client = await Client.connect(url, token)
    fw = Framework(client, "batch")
    await fw.register()
    fw.submit(TaskSpec("t-1", vcpus=1, ram_mb=4096))
    launched = await fw.run_until_placed(timeout=30)

Offers are read from the query service (``q.offers``, the tenant's open
offers) and answered with ``cmd.offer.accept`` / ``cmd.offer.decline``:
only what the tenant's users may do. By default a framework launches one
task per offer and lets the allocator come back with the rest of the host:
that is what lets Dominant Resource Fairness share a host between
frameworks task by task (``tasks_per_offer`` > 1 takes more at once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import msgspec

from stratus.cli.client import Client
from stratus.events.errors import Conflict, StratusError


class TaskSpec(msgspec.Struct, frozen=True):
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int = 0
    image: str | None = None


class Launched(msgspec.Struct, frozen=True):
    id: str
    name: str
    host: str
    offer: str


class Framework:
    def __init__(
        self,
        client: Client,
        name: str,
        *,
        role: str = "*",
        weight: float = 1.0,
        tasks_per_offer: int = 1,
        refuse_seconds: float = 1.0,
        failover_timeout_s: float = 60.0,
    ) -> None:
        self.client = client
        self.name = name
        self.role = role
        self.weight = weight
        self.tasks_per_offer = tasks_per_offer
        self.refuse_seconds = refuse_seconds
        self.failover_timeout_s = failover_timeout_s
        self._beaten = 0.0
        self.id = ""
        self.subjects: dict[str, str] = {}
        self.pending: deque[TaskSpec] = deque()
        self.launched: list[Launched] = []
        self.answered: set[str] = set()
        self.declined = 0
        self.stale = 0

    async def register(self, framework_id: str | None = None) -> dict[str, Any]:
        """Register; with ``framework_id``, come back as that framework after
        a failover (within its timeout its tasks are still its own)."""
        body: dict[str, Any] = {
            "name": self.name,
            "role": self.role,
            "weight": self.weight,
            "failover_timeout_s": self.failover_timeout_s,
        }
        if framework_id:
            body["id"] = framework_id
        reply = await self.client.command("framework.register", body)
        data = reply.data or {}
        self.id, self.subjects = data["id"], data.get("subjects", {})
        self._beaten = time.monotonic()
        return data

    async def beat(self) -> None:
        """Alive for another failover timeout; ``step`` beats on its own
        every third of it."""
        await self.client.command("framework.beat", {"framework": self.id})
        self._beaten = time.monotonic()

    def submit(self, *tasks: TaskSpec) -> None:
        self.pending.extend(tasks)

    async def offers(self) -> list[dict[str, Any]]:
        """This framework's open offers, oldest first."""
        rows = await self.client.query("offers") or []
        return [o for o in rows if o.get("framework") == self.id]

    async def accept(self, offer: dict[str, Any], tasks: list[TaskSpec]) -> list[Launched]:
        body = {
            "offer": offer["id"],
            "host": offer["host"],
            "tasks": [msgspec.to_builtins(t) for t in tasks],
        }
        reply = await self.client.command("offer.accept", body)
        got = [
            Launched(t["id"], t["name"], t["host"], offer["id"])
            for t in (reply.data or {}).get("tasks", [])
        ]
        self.launched.extend(got)
        return got

    async def decline(self, offer: dict[str, Any], refuse_seconds: float | None = None) -> None:
        s = self.refuse_seconds if refuse_seconds is None else refuse_seconds
        await self.client.command("offer.decline", {"offer": offer["id"], "refuse_seconds": s})
        self.declined += 1

    async def update(self, task: Launched, state: str, reason: str = "") -> None:
        """``running``, or ``finished`` / ``failed`` (which frees its resources)."""
        if state == "running":
            await self.client.command("task.running", {"task": task.id})
            return
        body = {"task": task.id, "host": task.host, "state": state}
        if reason:
            body["reason"] = reason
        await self.client.command("task.update", body)

    def _fitting(self, offer: dict[str, Any]) -> list[TaskSpec]:
        """Pending tasks that fit the offer together, in order, at most
        ``tasks_per_offer`` of them."""
        room = [offer["vcpus"], offer["ram_mb"], offer["disk_gb"]]
        out: list[TaskSpec] = []
        for t in list(self.pending):
            if len(out) >= self.tasks_per_offer:
                break
            need = (t.vcpus, t.ram_mb, t.disk_gb)
            if all(n <= r + 1e-9 for n, r in zip(need, room, strict=True)):
                out.append(t)
                room = [r - n for r, n in zip(room, need, strict=True)]
        return out

    async def answer(self, offer: dict[str, Any]) -> list[Launched]:
        """Accept the offer with what fits of the pending tasks, else decline it."""
        self.answered.add(offer["id"])
        tasks = self._fitting(offer)
        if not tasks:
            await self.decline(offer)
            return []
        try:
            got = await self.accept(offer, tasks)
        except Conflict:
            self.stale += 1  # rescinded, or the host moved: a new offer comes
            return []
        for t in tasks:
            self.pending.remove(t)
        return got

    async def step(self) -> list[Launched]:
        """Answer every open offer not answered yet; what was launched."""
        out: list[Launched] = []
        if time.monotonic() - self._beaten > self.failover_timeout_s / 3:
            await self.beat()
        for offer in await self.offers():
            if offer["id"] in self.answered:
                continue
            try:
                out.extend(await self.answer(offer))
            except StratusError as err:
                if err.kind != "conflict":
                    raise
                self.stale += 1
        return out

    async def run_until_placed(self, timeout: float, poll: float = 0.05) -> list[Launched]:
        """Answer offers until no task is pending or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            if not await self.step():
                await asyncio.sleep(poll)
        return self.launched
