"""`stratus up` and the CLI as a user runs them: real processes, real exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

STRATUS = [sys.executable, "-m", "stratus.cli.main"]
ADMIN_PASSWORD = "admin-pass-for-tests"
# Where `stratus login` saves its token in these tests (never the user's own).
CONFIG_HOME = {"value": "/nonexistent-stratus-config"}


def cli(
    url: str, *args: str, timeout: float = 30, token: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STRATUS_DATA_DIR": "/nonexistent-stratus",
        "XDG_CONFIG_HOME": CONFIG_HOME["value"],
    }
    env.pop("STRATUS_TOKEN", None)
    if token is not None:
        env["STRATUS_TOKEN"] = token
    return subprocess.run(
        [*STRATUS, "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def login(url: str, user: str = "admin", password: str = ADMIN_PASSWORD) -> None:
    r = cli(url, "login", "--user", user, "--password", password, "-o", "json")
    assert r.returncode == 0, r.stderr


class Up:
    """`stratus up` as a child process on a free port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra  # more `stratus up` options, e.g. --db
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        # Where its stderr goes (appended), for tests that read what it said.
        self.stderr_file: Path | None = None
        self.lines: list[str] = []  # what it printed before "ready"

    def start(self, timeout: float = 30) -> str:
        err = open(self.stderr_file, "ab") if self.stderr_file else subprocess.DEVNULL
        self.lines = []
        self.proc = subprocess.Popen(
            [
                *STRATUS,
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                "0",
                "--admin-password",
                ADMIN_PASSWORD,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        if self.stderr_file:
            err.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"stratus up exited with {self.proc.wait(5)}")
            self.lines.append(line)
            if "ready" in line:
                self.url = (self.data_dir / "url").read_text().strip()
                return self.url
        raise AssertionError("stratus up did not print ready in time")

    def broker_pid(self) -> int:
        ports = list((self.data_dir / "nats").glob("nats-server_*.ports"))
        assert len(ports) == 1
        return int(ports[0].stem.split("_")[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


@contextlib.contextmanager
def running_up(tmp_path: Path, *extra: str) -> Iterator[Up]:
    """A ``stratus up`` on tmp_path (started by the test), killed afterwards."""
    CONFIG_HOME["value"] = str(tmp_path / "config")
    u = Up(tmp_path / "data", *extra)
    try:
        yield u
    finally:
        u.kill()
        # A killed `up` cannot stop its broker: do it here so nothing leaks.
        # The broker, or every node of a cluster (`--cluster N`: nats-1...).
        for ports in (tmp_path / "data").glob("nats*/nats-server_*.ports"):
            pid = int(ports.stem.split("_")[1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def up(tmp_path):
    with running_up(tmp_path) as u:
        yield u


def wait_projected(url: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli(url, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        if status["projector_lag"] == 0:
            return status
        time.sleep(0.1)
    raise AssertionError("projector did not catch up")


def test_up_serves_the_cli_contract_and_a_restart_loses_nothing(up):
    url = up.start()
    login(url)
    base = wait_projected(url)["last_seq"]  # the bootstrap: key, tenant, user, role

    # Given a running control plane, when a user creates a tenant...
    r = cli(url, "tenant", "create", "acme", "-o", "json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["id"] == "acme" and created["name"] == "acme"

    r = cli(url, "tenant", "create", "globex", "--description", "second", "-o", "json")
    assert r.returncode == 0, r.stderr
    r = cli(url, "tenant", "rename", "globex", "globex-eu", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "globex-eu"

    before = wait_projected(url)
    assert before["last_seq"] == base + 3

    # ...then list, show and the event log agree.
    r = cli(url, "tenant", "list", "-o", "json")
    tenants = json.loads(r.stdout)
    assert [(t["id"], t["name"]) for t in tenants] == [
        ("acme", "acme"),
        ("admin", "admin"),
        ("globex", "globex-eu"),
    ]
    r = cli(url, "tenant", "show", "globex", "-o", "yaml")
    assert r.returncode == 0 and "globex-eu" in r.stdout

    r = cli(url, "events", "tail", "--from", str(base + 1), "-o", "json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["seq"] for x in lines] == [base + 1, base + 2, base + 3]
    assert [x["type"] for x in lines] == ["tenant.created", "tenant.created", "tenant.renamed"]
    for x in lines:
        assert {"seq", "type", "tenant", "actor", "at", "correlation_id"} <= x.keys()
        assert x["actor"] == "admin"
    r = cli(url, "events", "tail", "--tenant", "globex", "-o", "json")
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [base + 2, base + 3]

    # A refused command exits 1, names the kind on stderr and appends nothing.
    r = cli(url, "tenant", "create", "acme")
    assert r.returncode == 1
    assert r.stderr.startswith("error: already_exists:")
    r = cli(url, "tenant", "create", "Not-Valid")
    assert r.returncode == 1 and "error: invalid:" in r.stderr and "name" in r.stderr
    r = cli(url, "tenant", "delete", "nobody")
    assert r.returncode == 1 and "error: not_found:" in r.stderr
    assert wait_projected(url)["last_seq"] == base + 3

    # SIGTERM stops everything, the broker child included, within 10 s.
    broker = up.broker_pid()
    rc, took = up.stop()
    assert rc == 0 and took < 10
    assert not Path(f"/proc/{broker}").exists()
    assert not (up.data_dir / "url").exists()

    # Restarting on the same data dir keeps every event, the projection and
    # the signing key (the saved token still works).
    url = up.start()
    after = wait_projected(url)
    assert after["last_seq"] == base + 3
    assert after["projection_digest"] == before["projection_digest"]
    r = cli(url, "tenant", "list", "-o", "json")
    assert [t["id"] for t in json.loads(r.stdout)] == ["acme", "admin", "globex"]
    r = cli(url, "tenant", "delete", "acme", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "deleted"
    assert wait_projected(url)["last_seq"] == base + 4
    rc, _ = up.stop(signal.SIGINT)
    assert rc == 0


def test_second_up_on_the_same_data_dir_is_refused(up):
    up.start()
    r = subprocess.run(
        [*STRATUS, "up", "--data-dir", str(up.data_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "another stratus up is running" in r.stderr


def test_unreachable_control_plane_exits_3():
    r = cli("nats://127.0.0.1:1", "status")
    assert r.returncode == 3
    assert r.stderr.startswith("error: unavailable:")


def test_usage_error_exits_2():
    r = cli("nats://127.0.0.1:1", "tenant", "create")
    assert r.returncode == 2
    r = cli("nats://127.0.0.1:1", "status", "-o", "xml")
    assert r.returncode == 2


def test_events_schema_lists_every_event_type():
    r = subprocess.run([*STRATUS, "events", "schema"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert {"TenantCreated", "TenantRenamed", "TenantDeleted"} <= schema["$defs"].keys()
    created = schema["$defs"]["TenantCreated"]
    assert created["properties"]["type"] == {"const": "tenant.created"}
    assert {"id", "tenant", "aggregate", "actor", "at", "correlation_id"} <= set(
        created["required"]
    )


def test_a_tenant_is_renamed_to_free_text_and_control_characters_are_refused(up):
    """Issue 17: the README says ``rename`` changes the display name, and
    ``tenant rename acme "Acme Corp"`` was refused by the id's pattern."""
    url = up.start()
    login(url)
    assert cli(url, "tenant", "create", "acme").returncode == 0
    before = wait_projected(url)["last_seq"]
    for bad in ("Acme\x1b[2JCorp", "two\nlines", "   ", "x" * 129):
        r = cli(url, "tenant", "rename", "acme", bad)
        assert r.returncode == 1 and r.stderr.startswith("error: invalid: "), (bad, r.stderr)
    assert wait_projected(url)["last_seq"] == before, "a refused rename was appended"
    for name in ("Acme Corp", "Ünïcode & Söhne — Zürich"):
        r = cli(url, "tenant", "rename", "acme", name, "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["name"] == name
    wait_projected(url)
    shown = json.loads(cli(url, "tenant", "show", "acme", "-o", "json").stdout)
    assert (shown["id"], shown["name"]) == ("acme", "Ünïcode & Söhne — Zürich")
