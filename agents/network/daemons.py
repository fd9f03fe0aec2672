"""The daemons the agent starts (dnsmasq, BIRD): which process is ours, and
stopping it within a bound. A daemon writes its pid file; a pid is ours only
while the process lives and its command line names our own file (a pid is
reused by the system once the process has gone)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def pid_of(pidfile: Path, mark: str) -> int:
    """The pid in ``pidfile`` if that process runs with ``mark`` among its
    arguments (0: none of ours)."""
    try:
        pid = int(pidfile.read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return 0
    return pid if mark.encode() in cmdline and alive(pid) else 0


def terminate(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds (no-op for 0)."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
