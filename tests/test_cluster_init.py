"""An operator's own cluster: three nats-servers started from the example
configuration in ops/cluster, `stratus init` on them, then each service as
its own `stratus serve` process against the URL list, and the quick start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratus.events.broker import nats_server_binary, node_configs, stable_ports
from stratus.events.cluster import server_list

from .test_cli import ADMIN_PASSWORD, CONFIG_HOME, STRATUS, cli, login, wait_projected

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parent.parent / "ops" / "cluster"
NODES = 3


def test_the_example_configs_are_what_the_one_renderer_makes():
    want = node_configs(
        [("127.0.0.1", f"@CLIENT_PORT_{i}@") for i in range(1, NODES + 1)],
        [("127.0.0.1", f"@ROUTE_PORT_{i}@") for i in range(1, NODES + 1)],
        store_dir="@STORE_DIR@",
    )
    for i, text in enumerate(want, start=1):
        have = (EXAMPLE / f"node-{i}.conf").read_text()
        body = "".join(line for line in have.splitlines(True) if not line.startswith("#"))
        assert body == text, f"ops/cluster/node-{i}.conf differs from node_configs()"


def fill(tmp: Path) -> tuple[list[Path], list[str]]:
    """The example files with free ports and ``tmp`` filled in; their URLs."""
    picked = stable_ports(2 * NODES)
    ports = {f"@CLIENT_PORT_{i}@": str(picked[i - 1]) for i in range(1, NODES + 1)}
    ports |= {f"@ROUTE_PORT_{i}@": str(picked[NODES + i - 1]) for i in range(1, NODES + 1)}
    ports["@STORE_DIR@"] = str(tmp / "store")
    confs = []
    for i in range(1, NODES + 1):
        text = (EXAMPLE / f"node-{i}.conf").read_text()
        for k, v in ports.items():
            text = text.replace(k, v)
        body = [line for line in text.splitlines() if not line.startswith("#")]
        assert not [line for line in body if "@" in line]  # every placeholder filled
        path = tmp / f"node-{i}.conf"
        path.write_text(text)
        confs.append(path)
    urls = [f"nats://127.0.0.1:{ports[f'@CLIENT_PORT_{i}@']}" for i in range(1, NODES + 1)]
    return confs, urls


def stratus(*args: str, env: dict | None = None, timeout: float = 90):
    return subprocess.run(
        [*STRATUS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XDG_CONFIG_HOME": CONFIG_HOME["value"], **(env or {})},
    )


def wait_line(proc: subprocess.Popen, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"{proc.args} exited with {proc.wait(5)}")
        if text in line:
            return
    raise AssertionError(f"{proc.args} did not print {text!r}")


def test_init_then_separate_services_serve_the_quick_start(tmp_path):
    CONFIG_HOME["value"] = str(tmp_path / "config")
    confs, urls = fill(tmp_path)
    url = ",".join(urls)
    ctl = tmp_path / "control"  # where credentials are issued: the broker and token keys
    procs: list[subprocess.Popen] = []
    try:
        # The authorization block the example configs include, then the nodes.
        r = stratus(
            "init",
            *("--url", url, "--data-dir", str(ctl)),
            *("--auth-file", str(tmp_path / "stratus-auth.conf"), "--config-only"),
        )
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("nats-server.conf ---") == NODES
        assert (tmp_path / "stratus-auth.conf").stat().st_mode & 0o077 == 0
        for c in confs:
            procs.append(
                subprocess.Popen(
                    [nats_server_binary(), "-c", str(c)],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"{c.stem}.log", "wb"),
                )
            )

        r = stratus(
            "init", "--url", url, "--data-dir", str(ctl), "--admin-password", ADMIN_PASSWORD,
            "-o", "json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        first = json.loads(r.stdout)
        assert first["replicas"] == 3 and first["admin_created"] is True
        assert first["stream_leader"] in {f"stratus-{i}" for i in range(1, NODES + 1)}
        # Idempotent: again, nothing new.
        r = stratus("init", "--url", url, "--data-dir", str(ctl), "-o", "json")
        assert r.returncode == 0, r.stderr
        again = json.loads(r.stdout)
        assert again["admin_created"] is False and again["replicas"] == 3

        # Each service its own process on the URL list, with nothing but its
        # own credentials file; the auth callout first (it admits the others,
        # and the issuing of their credentials, which records each on the log).
        def issue(kind: str, host: str = "") -> Path:
            path = tmp_path / f"{kind}{'-' + host if host else ''}.creds"
            more = ("--host", host) if host else ()
            r = stratus(
                "--url", url, "credentials", "issue", "--service", kind, *more,
                "--data-dir", str(ctl), "-f", str(path),
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert path.stat().st_mode & 0o077 == 0
            return path

        def serve(kind: str, where: Path, *args: str, host: str = "") -> None:
            creds = ("--creds", str(issue(kind, host)))
            p = subprocess.Popen(
                [*STRATUS, "--url", url, "serve", kind, *creds, "--data-dir", str(where), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            procs.append(p)
            wait_line(p, "ready")

        serve("auth-callout", tmp_path / "callout")
        serve("handlers", ctl)
        serve("projector", ctl)
        serve("query", ctl)
        serve("scheduler", tmp_path / "sched")
        h1 = ("--host", "h1", "--vcpus", "8", "--ram-mb", "8192")
        serve("compute-agent", tmp_path / "h1", *h1, host="h1")

        login(url)
        for args in (
            ("tenant", "create", "acme", "-o", "json"),
            ("image", "create", "cirros", "--tenant", "acme"),
            ("network", "create", "lan", "--tenant", "acme"),
            ("subnet", "create", "lan-v4", "--network", "lan", "--cidr", "10.0.0.0/24",
             "--tenant", "acme"),
        ):  # fmt: skip
            r = cli(url, *args)
            assert r.returncode == 0, (args, r.stderr)
        r = cli(
            url,
            *("server", "create", "web-1", "--image", "cirros", "--vcpus", "1"),
            *("--ram-mb", "256", "--network", "lan", "--tenant", "acme", "--wait", "-o", "json"),
            timeout=90,
        )
        assert r.returncode == 0, r.stderr
        server = json.loads(r.stdout)
        assert server["status"] == "running" and server["host"] == "h1"
        status = wait_projected(url)
        c = status["cluster"]
        assert c["replicas_configured"] == 3 and len(c["replicas"]) == 3
        assert sorted(n["name"] for n in c["nodes"]) == [f"stratus-{i}" for i in (1, 2, 3)]
        assert len(server_list(url)) == 3
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stdout:
                p.stdout.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
