"""A throwaway PostgreSQL server from Debian's binaries, for tests and benchmarks.

``LocalPostgres`` runs ``initdb`` and ``postgres`` (``/usr/lib/postgresql/<v>/bin``,
Debian's ``postgresql`` package, which ``ops/bootstrap`` installs) in a
temporary directory, listening on 127.0.0.1 only with its unix socket in that
directory, trusting local connections. As root it runs as the ``postgres``
user, because the server refuses to run as root. It is what
``EmbeddedNats`` is for the broker: the same server for the tests and
``make bench``; production PostgreSQL is the operator's own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresError(RuntimeError):
    pass


def postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL server's bin directory."""
    found = [
        d
        for d in PG_ROOT.glob("*/bin")
        if (d / "initdb").is_file() and (d / "postgres").is_file() and d.parent.name.isdigit()
    ]
    if not found:
        raise PostgresError(
            f"PostgreSQL server binaries (initdb, postgres) not found under"
            f" {PG_ROOT}/<version>/bin: install Debian's postgresql package"
            " (ops/bootstrap does: apt-get install postgresql)"
        )
    return max(found, key=lambda d: int(d.parent.name))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """A PostgreSQL server child in a temporary directory, on loopback only.

    ``durable=False`` turns off fsync and synchronous commit: tests throw the
    data away, so waiting for the disk would only slow them down.
    """

    def __init__(self, *, durable: bool = True, host: str = "127.0.0.1") -> None:
        self.durable = durable
        self.host = host
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- running ----------------------------------------------------------

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that drop root to the postgres user (initdb and
        postgres both refuse to run as root); nothing when we are not root."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise PostgresError(
                f"running as root needs a {SUPERUSER!r} OS user to own the server"
                " (Debian's postgresql package creates it)"
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> str:
        """Initialise and start the server; returns its ``postgresql+asyncpg`` URL base."""
        bin_dir = postgres_bin_dir()
        owner = self._as_owner()
        # Under /tmp itself: pytest's own temp dirs are 0700 root, which the
        # postgres user could not enter.
        self.dir = Path(tempfile.mkdtemp(prefix="stratus-pg-"))
        try:
            if owner:
                os.chown(self.dir, owner["user"], owner["group"])
            data = self.dir / "data"
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)}
            init = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
                cwd=self.dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                **owner,
            )
            if init.returncode != 0:
                raise PostgresError(f"initdb failed: {init.stderr.strip()[-800:]}")
            # Closed in stop(): the server writes to it for its whole life.
            self._log = open(self.dir / "postgres.log", "ab")
            # A port picked free may be taken before the server binds it:
            # try a few, each bounded by the ready timeout.
            for _ in range(3):
                self.port = _free_port(self.host)
                self.proc = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(data), *self._settings()],
                    cwd=self.dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=self._log,
                    **owner,
                )
                if self._wait_ready(bin_dir):
                    return self.url("postgres")
            raise PostgresError(f"postgres did not start: {self._tail()}")
        except BaseException:
            self.stop()
            raise

    def _settings(self) -> list[str]:
        s = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": "100",
        }
        if not self.durable:
            s.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        return [arg for k, v in s.items() for arg in ("-c", f"{k}={v}")]

    def _wait_ready(self, bin_dir: Path) -> bool:
        """True when the server accepts connections; False when it exited."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            probe = subprocess.run(
                [
                    str(bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-t",
                    "2",
                ],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if probe.returncode == 0:
                return True
            time.sleep(0.1)
        raise PostgresError(f"postgres not ready in {READY_TIMEOUT_S:.0f} s: {self._tail()}")

    def _tail(self, chars: int = 800) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.dir / "postgres.log").read_text(errors="replace")[-chars:].strip()
        return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: abort sessions, no waiting for clients), then remove it all."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- databases --------------------------------------------------------

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    async def _admin(self) -> Any:
        import asyncpg

        return await asyncpg.connect(
            host=self.host, port=self.port, user=SUPERUSER, database="postgres", timeout=10
        )

    async def create_database(self, name: str, icu_locale: str | None = None) -> str:
        """Create database ``name`` and return its URL. ``icu_locale`` (say
        ``en-US``) gives it that linguistic collation instead of the server's C."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r}: lowercase letters, digits and _ only")
        sql = f'CREATE DATABASE "{name}" TEMPLATE template0'
        if icu_locale is not None:
            if not re.match(r"^[A-Za-z0-9_-]{1,32}$", icu_locale):
                raise ValueError(f"ICU locale {icu_locale!r} is not a locale name")
            sql += f" LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
        conn = await self._admin()
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return self.url(name)

    async def drop_database(self, name: str) -> None:
        """Drop it, ending any session still connected (a test's leftover pool)."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r}: lowercase letters, digits and _ only")
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
