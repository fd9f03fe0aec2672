"""Metering: instance-hours per server and per flavor size, from one tenant's events.

An example integration. It needs only nats-py and msgspec, and the JSON that
``stratus integration create NAME -o json`` printed:

    stratus integration create billing --tenant acme -o json > billing.json
    python ops/examples/metering.py --creds billing.json --state metering.db

It consumes the tenant's events through the durable consumer Stratus made
for the integration, so a restart resumes where the last run stopped; if
the last run died holding unacknowledged events, the consumer sends them
again once its ack wait (``integration create --ack-wait``) has passed, and
this waits for them. Counting nothing twice needs one more thing, because an
event can be applied and then redelivered (killed after saving, before
acknowledging): the state file keeps the last applied stream sequence in
the same SQLite transaction as the totals, and anything at or below it is
acknowledged without being counted.

A server is billed from ``server.running`` until ``server.stopped``,
``server.failed``, ``server.deleting`` or ``server.deleted``; a server still
running is counted up to the time of the latest event seen, so the table is
a pure function of the log (two runs over the same events agree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from datetime import datetime
from typing import Any

import msgspec
import nats
import nats.errors

ENDS = {"server.stopped", "server.failed", "server.deleting", "server.deleted"}

SCHEMA = """
create table if not exists meta (k text primary key, v text not null);
create table if not exists servers (
    id text primary key, name text not null, size text not null,
    running_since text, seconds real not null default 0
);
"""


def spec_of(e: dict[str, Any]) -> dict[str, Any]:
    """A ``server.requested``'s spec: nested since version 2, the event's own
    fields before (the log keeps old events as they were written)."""
    return e.get("spec") or e


def size_of(spec: dict[str, Any]) -> str:
    """The flavor's name, else its shape (servers may be sized ad hoc)."""
    return spec.get("flavor") or f"{spec.get('vcpus')}vcpu-{spec.get('ram_mb')}MB"


def _iso(t: Any) -> str:
    return t.isoformat() if isinstance(t, datetime) else str(t)


class Meter:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript(SCHEMA)

    def last_seq(self) -> int:
        row = self.db.execute("select v from meta where k = 'last_seq'").fetchone()
        return int(row[0]) if row else 0

    def apply(self, batch: list[tuple[int, dict[str, Any]]]) -> int:
        """Fold the events past the saved position in one transaction; how many counted."""
        done = self.last_seq()
        todo = [(s, e) for s, e in batch if s > done]
        if not todo:
            return 0
        db = self.db
        db.execute("begin")
        try:
            for _seq, e in todo:
                self._fold(e)
            db.execute(
                "insert into meta values ('last_seq', ?) on conflict(k) do update set v = ?",
                (str(todo[-1][0]), str(todo[-1][0])),
            )
            last_at = _iso(todo[-1][1]["at"])
            db.execute(
                "insert into meta values ('as_of', ?) on conflict(k) do update set v = ?",
                (last_at, last_at),
            )
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
        return len(todo)

    def _fold(self, e: dict[str, Any]) -> None:
        t, sid, at = e.get("type", ""), e["aggregate"]["id"], e["at"]
        if t == "server.requested":
            spec = spec_of(e)
            self.db.execute(
                "insert or ignore into servers (id, name, size) values (?, ?, ?)",
                (sid, spec.get("name", ""), size_of(spec)),
            )
        elif t == "server.running":
            self.db.execute(
                "update servers set running_since = coalesce(running_since, ?) where id = ?",
                (_iso(at), sid),
            )
        elif t in ENDS:
            row = self.db.execute(
                "select running_since from servers where id = ?", (sid,)
            ).fetchone()
            if row and row[0]:
                secs = (at - datetime.fromisoformat(row[0])).total_seconds()
                self.db.execute(
                    "update servers set seconds = seconds + ?, running_since = null where id = ?",
                    (max(0.0, secs), sid),
                )

    def table(self) -> dict[str, Any]:
        row = self.db.execute("select v from meta where k = 'as_of'").fetchone()
        as_of = datetime.fromisoformat(row[0]) if row else None
        servers = []
        for sid, name, size, since, secs in self.db.execute(
            "select id, name, size, running_since, seconds from servers order by id"
        ):
            if since and as_of is not None:
                secs += max(0.0, (as_of - datetime.fromisoformat(since)).total_seconds())
            servers.append({"id": sid, "name": name, "size": size, "hours": round(secs / 3600, 6)})
        sizes: dict[str, float] = {}
        for s in servers:
            sizes[s["size"]] = round(sizes.get(s["size"], 0.0) + s["hours"], 6)
        return {
            "last_seq": self.last_seq(),
            "as_of": as_of.isoformat() if as_of else None,
            "servers": servers,
            "sizes": sizes,
        }


def print_table(t: dict[str, Any]) -> None:
    print(f"instance-hours as of {t['as_of']} (stream sequence {t['last_seq']})")
    print(f"{'server':<38} {'name':<16} {'size':<16} {'hours':>12}")
    for s in t["servers"]:
        print(f"{s['id']:<38} {s['name']:<16} {s['size']:<16} {s['hours']:>12.4f}")
    print(f"{'size':<16} {'hours':>12}")
    for size, hours in sorted(t["sizes"].items()):
        print(f"{size:<16} {hours:>12.4f}")


async def run(args: argparse.Namespace, creds: dict[str, Any]) -> dict[str, Any]:
    meter = Meter(args.state)
    # One server or several (a cluster: comma-separated), reconnecting across them.
    nc = await nats.connect((args.url or creds["url"]).split(","), **creds["connect"])
    try:
        js = nc.jetstream()
        stream, durable = creds["stream"], creds["durable"]
        # The consumer Stratus made delivers into this credential's inbox.
        consumer = await js.consumer_info(stream, durable)
        sub = await js.subscribe_bind(stream, consumer.config, durable, manual_ack=True)
        batches = 0
        idle = 0.0
        while args.idle_exit is None or idle < args.idle_exit:
            try:
                msgs = [await sub.next_msg(timeout=0.5)]
            except nats.errors.TimeoutError:
                # Idle only when nothing is owed: events a dead run held
                # come again once their ack wait has passed.
                info = await js.consumer_info(stream, durable)
                idle = 0.0 if info.num_ack_pending or info.num_pending else idle + 0.5
                continue
            idle = 0.0
            while len(msgs) < args.batch and sub.pending_msgs:
                msgs.append(await sub.next_msg(timeout=1))
            batch = [(m.metadata.sequence.stream, msgspec.msgpack.decode(m.data)) for m in msgs]
            meter.apply(batch)
            batches += 1
            if args.crash_after is not None and batches >= args.crash_after:
                os._exit(17)  # saved, not acknowledged: the worst moment to die
            for m in msgs:
                await m.ack()
            if args.delay:
                await asyncio.sleep(args.delay)
    finally:
        await nc.close()
    return meter.table()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--creds", required=True, help="stratus integration create -o json output")
    p.add_argument("--state", default="metering.db", help="SQLite file of totals and position")
    p.add_argument("--url", help="override the creds' url")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--crash-after", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        with open(args.creds) as f:
            creds = json.load(f)
        table = asyncio.run(run(args, creds))
    except KeyboardInterrupt:
        sys.exit(130)
    if args.json:
        print(json.dumps(table))
    else:
        print_table(table)


if __name__ == "__main__":
    main()
