"""TCP probes run inside a namespace by the network tests (``netlab``).

``listen PORT SECONDS``: accept connections for SECONDS, read each to its
end; ``connect HOST PORT``: exit 0 if a connection is made within 2 s;
``send HOST PORT BYTES``: send BYTES and print the seconds it took until the
peer had them all (it closes when it has read everything).
"""

from __future__ import annotations

import socket
import sys
import time


def listen(port: int, seconds: float) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(8)
    srv.settimeout(0.5)
    print("listening", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        conn.close()


def connect(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=2):
            return 0
    except OSError:
        return 1


def send(host: str, port: int, size: int) -> int:
    chunk = b"x" * 65536
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(60)
        started = time.monotonic()
        left = size
        while left > 0:
            s.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        # The peer closes once it has read everything: then the data arrived.
        s.recv(1)
        print(f"{time.monotonic() - started:.3f}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    verb = argv[0]
    if verb == "listen":
        listen(int(argv[1]), float(argv[2]))
        return 0
    if verb == "connect":
        return connect(argv[1], int(argv[2]))
    if verb == "send":
        return send(argv[1], int(argv[2]), int(argv[3]))
    raise SystemExit(f"unknown verb {verb}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
