"""The embedded control plane: nats-server child plus every service, one process.

``stratus up`` and ``stratus demo`` run this; tests and benchmarks use it
too, so they exercise exactly what an operator runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

import structlog

from stratus.events.broker import EmbeddedNats
from stratus.events.store import EventStore
from stratus.handlers.service import CommandService
from stratus.handlers.tenants import HANDLERS
from stratus.projections.db import make_engine, sqlite_url
from stratus.projections.projector import Projector
from stratus.projections.query import QueryService

log = structlog.get_logger("stratus.up")

URL_FILE = "url"


def default_data_dir() -> Path:
    env = os.environ.get("STRATUS_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stratus"


class DataDirBusy(RuntimeError):
    pass


class Stack:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 4222,
        db_url: str | None = None,
        hosts: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.db_url = db_url or sqlite_url(self.data_dir / "projections.db")
        self.hosts = hosts
        self.broker: EmbeddedNats | None = None
        self.store: EventStore | None = None
        self.commands: CommandService | None = None
        self.queries: QueryService | None = None
        self.projector_task: asyncio.Task[None] | None = None
        self._lock_file: IO[str] | None = None
        self.url: str | None = None

    def _lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / "lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DataDirBusy(f"another stratus up is running on {self.data_dir}") from None
        self._lock_file = f

    async def start(self) -> str:
        self._lock()
        try:
            self.broker = EmbeddedNats(
                self.data_dir / "nats",
                port=-1 if self.port == 0 else self.port,
                log_file=str(self.data_dir / "nats.log"),
            )
            url = await asyncio.to_thread(self.broker.start)
            self.store = await EventStore.connect(url)
            await self.store.ensure_stream()
            engine = make_engine(self.db_url)
            self.engine = engine
            projector = self.projector = Projector(self.store, engine)
            await projector.start_position()
            self.projector_task = asyncio.create_task(self._run_projector(projector))
            self.commands = CommandService(self.store, HANDLERS)
            await self.commands.start()
            self.queries = QueryService(self.store, engine)
            await self.queries.start()
            (self.data_dir / URL_FILE).write_text(url + "\n")
            self.url = url
            if self.hosts:
                log.warning(
                    "simulated hosts requested; host agents are not part of this build yet",
                    hosts=self.hosts,
                )
            log.info("stratus ready", url=url, data_dir=str(self.data_dir))
            return url
        except BaseException:
            await self.stop()
            raise

    async def _run_projector(self, projector: Projector) -> None:
        while True:
            try:
                await projector.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A broken connection or database hiccup: resume from the
                # checkpoint, which is exactly where the failed batch began.
                log.exception("projector failed; restarting from its checkpoint")
                await asyncio.sleep(1)

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / URL_FILE).unlink()
        for svc in (self.commands, self.queries):
            if svc is not None:
                with contextlib.suppress(Exception):
                    await svc.stop()
        if self.projector_task is not None:
            self.projector_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.projector_task
        if self.store is not None:
            await self.store.close()
        if getattr(self, "projector", None) is not None:
            self.projector.close()
        if getattr(self, "engine", None) is not None:
            await self.engine.dispose()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
