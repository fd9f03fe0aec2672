"""Facts about the JetStream cluster Stratus runs on, decided in one place.

* ``server_list``: a ``--url`` / ``STRATUS_URL`` value names one server or
  several, comma-separated; every connection takes the whole list and
  reconnects across it.
* ``log_replicas``: how many copies the log and every bucket keep. The
  stream ``EVENTS`` records it when it is created (``choose_replicas``:
  3 on a cluster of three or more JetStream nodes, 1 on one node), and every
  bucket (heartbeats, images, webhook deliveries, and any added later:
  leases, credentials) takes the stream's count from here, so nothing else
  guesses the cluster's size.
* ``stream_cluster``: who leads a stream and how far each replica lags, for
  ``stratus status`` and for waiting until a cluster is whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from stratus.events.errors import Invalid, Unavailable

# The replica count of a cluster of three or more nodes: a majority (2 of 3)
# survives the loss of any one node. More copies would slow every append
# (each waits for a majority) without surviving more than R3 does here.
CLUSTER_REPLICAS = 3
# nats-server: "replicas > 1 not supported in non-clustered mode".
ERR_REPLICAS_NOT_SUPPORTED = 10074
# nats-server: no peers enough for the replicas asked ("insufficient
# resources", "no suitable peers for placement").
ERR_NO_PEERS = (10005, 10023)

_SCHEMES = ("nats", "tls", "ws", "wss")


def server_list(url: str | Sequence[str]) -> list[str]:
    """``nats://a:4222,nats://b:4222`` (or a list of such) as a list of URLs;
    ``Invalid`` for an empty or malformed one, before anything connects."""
    parts = [url] if isinstance(url, str) else list(url)
    out: list[str] = []
    for part in parts:
        for one in part.split(","):
            one = one.strip()
            if not one:
                continue
            if "://" not in one:
                one = f"nats://{one}"
            try:
                u = urlsplit(one)
                u.port  # noqa: B018 (raises on a port that is not a number)
            except ValueError as exc:
                raise Invalid(f"not a NATS URL: {one!r} ({exc})") from None
            if u.scheme not in _SCHEMES or not u.hostname:
                raise Invalid(f"not a NATS URL: {one!r} (want nats://HOST:PORT)")
            if one not in out:
                out.append(one)
    if not out:
        raise Invalid("no NATS URL given (want nats://HOST:PORT[,nats://HOST:PORT...])")
    return out


def replicas_for(nodes: int) -> int:
    """R3 on a cluster of three or more nodes, R1 on one (or two: two
    nodes cannot keep a majority when one dies, so a second copy gains no
    availability)."""
    return CLUSTER_REPLICAS if nodes >= CLUSTER_REPLICAS else 1


async def log_replicas(js: JetStreamContext, stream: str = "EVENTS") -> int:
    """The replica count the log was created with (1 before it exists):
    what every bucket must use."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return 1
    return info.config.num_replicas or 1


def placement_refused(exc: BaseException) -> str | None:
    """Why the server refused a stream's replicas: ``"single"`` when it is
    not clustered, ``"peers"`` when too few nodes are up; else None."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code == ERR_REPLICAS_NOT_SUPPORTED:
            return "single"
        if exc.err_code in ERR_NO_PEERS:
            return "peers"
    return None


async def stream_cluster(js: JetStreamContext, stream: str = "EVENTS") -> dict[str, Any]:
    """``{"name", "leader", "replicas": [{"name", "current", "lag",
    "active_s", "offline", "leader"}]}`` of ``stream``; the leader is listed
    too (current, lag 0) so every copy has a row."""
    try:
        info = await js.stream_info(stream)
    except (TimeoutError, nats.errors.Error) as exc:
        raise Unavailable(f"stream {stream}: {exc or type(exc).__name__}") from None
    c = info.cluster
    out: dict[str, Any] = {
        "name": c.name if c else None,
        "leader": c.leader if c else None,
        "replicas_configured": info.config.num_replicas or 1,
        "replicas": [],
    }
    if c is None:
        return out
    if c.leader:
        out["replicas"].append(
            {
                "name": c.leader,
                "leader": True,
                "current": True,
                "offline": False,
                "lag": 0,
                "active_s": 0.0,
            }
        )
    for p in c.replicas or []:
        out["replicas"].append(
            {
                "name": p.name,
                "leader": False,
                "current": bool(p.current),
                "offline": bool(p.offline),
                "lag": p.lag or 0,
                # nats-py passes the server's nanoseconds on.
                "active_s": round((p.active or 0) / 1e9, 3),
            }
        )
    return out


def whole(state: dict[str, Any]) -> bool:
    """A leader, and every configured copy present and current."""
    reps = state["replicas"]
    return (
        state["leader"] is not None
        and len(reps) >= state["replicas_configured"]
        and all(r["current"] and not r["offline"] for r in reps)
    )


async def wait_whole(
    js: JetStreamContext, streams: Sequence[str], timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Until each of ``streams`` has a leader and all its replicas are
    current; their states. ``Unavailable`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, Any]] = {}
    why = ""
    while True:
        try:
            for s in streams:
                last[s] = await stream_cluster(js, s)
            if all(whole(last[s]) for s in streams):
                return last
            why = ", ".join(f"{s}: {last[s]}" for s in streams if not whole(last[s]))
        except Unavailable as exc:
            why = exc.message
        if time.monotonic() >= deadline:
            raise Unavailable(f"the cluster did not become whole within {timeout:g}s: {why}")
        await asyncio.sleep(0.1)
