"""The OpenStack API service: Keystone, Nova, Neutron and Glance on one port.

Layout (devstack's): identity at ``/`` and ``/v3``, compute at
``/compute/v2.1``, network at ``/network/v2.0``, image at ``/image/v2``;
the catalog in every token lists them. The service is stateless: run as
many as you like behind a load balancer (``--public-url`` names what the
catalog shows).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from stratus.api import compute, identity, image, network
from stratus.api.control import ControlPlane
from stratus.api.http import FACES, MAX_BODY_BYTES, PLANE, PUBLIC_URL, faults, request_ids

log = structlog.get_logger("stratus.api")

# Identity last: it answers at the root, so it is the fallback face.
FACES_IN_ORDER = [compute.FACE, network.FACE, image.FACE, identity.FACE]


def build_app(plane: ControlPlane, spool: Path, public_url: str = "") -> web.Application:
    app = web.Application(middlewares=[request_ids, faults], client_max_size=MAX_BODY_BYTES)
    app[PLANE] = plane
    app[PUBLIC_URL] = public_url.rstrip("/")
    app[FACES] = FACES_IN_ORDER
    app[image.SPOOL] = spool
    for module in (identity, compute, network, image):
        app.add_routes(module.routes())
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def bind(listen: str) -> socket.socket:
    """A socket bound to ``listen`` (HOST:PORT; port 0: any free one)."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """The API on one bound socket (see ``bind``)."""

    def __init__(
        self,
        url: str,
        sock: socket.socket,
        spool: Path,
        public_url: str = "",
        connect: dict[str, Any] | None = None,
    ) -> None:
        """``connect``: the connect options of its openstack-api credential."""
        self.nats_url = url
        self.connect = connect or {}
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.spool = spool
        self.public_url = public_url
        self.plane: ControlPlane | None = None
        self.runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return self.public_url.rstrip("/") or f"http://{host}:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/v3"

    async def start(self) -> str:
        try:
            self.plane = await ControlPlane.connect(self.nats_url, connect=self.connect)
            app = build_app(self.plane, self.spool, self.public_url)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.SockSite(self.runner, self.sock).start()
        except BaseException:
            await self.stop()
            raise
        log.info("openstack api ready", auth_url=self.auth_url)
        return self.auth_url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.plane is not None:
            await self.plane.close()
            self.plane = None
        self.sock.close()
