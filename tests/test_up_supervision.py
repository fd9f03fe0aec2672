"""`stratus up` supervises what it starts, seen from the outside: real
`stratus up` processes and their nats-server children, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stratus.cli.client import Client
from stratus.events.broker import EmbeddedNats, StoreInUse, nats_server_binary, pid_running
from stratus.events.errors import StratusError
from stratus.events.ids import new_id

from .load import create_tenants
from .test_cli import ADMIN_PASSWORD, cli, login, running_up, wait_projected

pytestmark = pytest.mark.timeout(180)


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_running(pid):
        time.sleep(0.05)
    assert not pid_running(pid), f"process {pid} still runs"


def processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd and pid_running(int(d.name)):
            out.append(f"{d.name}: {cmd}")
    return out


def wait_new_broker(up, old: int, timeout: float = 15) -> int | None:
    """The pid of the broker that replaced ``old`` (None: `up` exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.proc is None or up.proc.poll() is not None:
            return None
        ports = list((up.data_dir / "nats").glob("nats-server_*.ports"))
        pids = [int(p.stem.split("_")[1]) for p in ports]
        new = [p for p in pids if p != old and pid_running(p)]
        if new:
            return new[0]
        time.sleep(0.05)
    raise AssertionError("no new nats-server")


async def admin_token(url: str) -> str:
    c = await Client.connect(url, timeout=5)
    try:
        r = await c.command("auth.login", {"user": "admin", "password": ADMIN_PASSWORD})
    finally:
        await c.close()
    return r.data["token"]


def test_a_killed_broker_is_restarted_and_commands_succeed_again_within_10s(tmp_path):
    """Under load (four clients creating tenants), SIGKILL the broker child:
    `up` starts a new one on the same port and store, its services
    reconnect, and a new command (a fresh connection, as the CLI makes)
    succeeds within 10 s; every command acknowledged before or after is on
    the log, those whose outcome was unknown retried with their own id."""
    with running_up(tmp_path) as up:
        url = up.start()
        old = up.broker_pid()

        async def main() -> tuple[float, set[str]]:
            token = await admin_token(url)
            acked: set[str] = set()
            stop = asyncio.Event()

            def worker(w: int):
                return create_tenants(url, token, w, stop, lambda _cid, name: acked.add(name))

            async def probe(n: int) -> bool:
                try:
                    c = await Client.connect(url, token, timeout=3)
                except StratusError:
                    return False
                try:
                    await c.command("tenant.create", {"name": f"probe-{n}"}, new_id())
                    return True
                except StratusError:
                    return False
                finally:
                    await c.close()

            workers = [asyncio.create_task(worker(w)) for w in range(4)]
            await asyncio.sleep(1.5)
            assert acked, "no command succeeded before the kill"
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            took = None
            for n in range(200):
                if await probe(n):
                    took = time.monotonic() - killed
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # and some more load on the new broker
            stop.set()
            await asyncio.gather(*workers)
            assert took is not None, "no new command succeeded after the kill"
            return took, acked

        took, acked = asyncio.run(main())
        print(f"a new command succeeded {took:.2f} s after the broker was killed")
        assert took < 10
        assert up.proc is not None and up.proc.poll() is None  # `up` kept running
        new = wait_new_broker(up, old)
        assert new is not None
        assert (up.data_dir / "url").read_text().strip() == url  # same port
        assert not pid_running(old)
        login(url)
        wait_projected(url, timeout=30)
        r = cli(url, "tenant", "list", "-o", "json")
        assert r.returncode == 0, r.stderr
        listed = {t["id"] for t in json.loads(r.stdout)}
        assert acked <= listed, f"acknowledged but missing: {sorted(acked - listed)[:5]}"
        assert len(acked) > 20
        rc, _ = up.stop()
        assert rc == 0
        assert not pid_running(new)


def test_a_broker_that_keeps_dying_makes_up_give_up_loudly(tmp_path):
    with running_up(tmp_path) as up:
        up.stderr_file = tmp_path / "up.err"
        up.start()
        pid: int | None = up.broker_pid()
        last = pid
        killed = 0
        # Each new broker is killed as soon as it is there: MAX_RESTARTS
        # restarts, then `up` stops everything and exits non-zero.
        while pid is not None and killed < 10:
            os.kill(pid, signal.SIGKILL)
            killed += 1
            last = pid
            pid = wait_new_broker(up, pid, timeout=15)
        assert up.proc is not None
        rc = up.proc.wait(30)
        assert rc == 1
        assert killed == 6  # the first death and five restarts
        err = up.stderr_file.read_text()
        assert "error: BrokerError: giving up: nats-server failed 5 times in a row" in err
        assert str(up.data_dir / "nats.log") in err
        assert not pid_running(last)
        assert processes_naming(up.data_dir) == []


def test_killing_up_leaves_nothing_running_and_a_restart_works(tmp_path):
    with running_up(tmp_path) as up:
        url = up.start()
        login(url)
        assert cli(url, "tenant", "create", "acme").returncode == 0
        broker = up.broker_pid()
        assert up.proc is not None
        up.proc.kill()  # SIGKILL: no chance to stop anything
        up.proc.wait(5)
        wait_gone(broker, 10)  # the broker dies with its parent
        assert processes_naming(up.data_dir) == []
        # The same data dir starts again (--port 0: whatever port is free),
        # with what was there.
        url = up.start()
        r = cli(url, "tenant", "show", "acme", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == "acme"
        assert len(list((up.data_dir / "nats").glob("nats-server_*.ports"))) == 1
        up.stop()


@pytest.mark.parametrize("locked", [True, False], ids=["holding-the-lock", "without-lock"])
def test_a_leftover_broker_of_the_data_dir_is_stopped_before_up_starts(tmp_path, locked):
    """A nats-server still running on the data dir (its `up` died before it
    could stop it; or one started by hand, holding no lock) is stopped,
    and only then does `up` start its own on the same store."""
    with running_up(tmp_path) as up:
        url = up.start()
        login(url)
        assert cli(url, "tenant", "create", "acme").returncode == 0
        up.stop()
        nats_dir = up.data_dir / "nats"
        conf = nats_dir / "nats-server.conf"
        if locked:
            # As the broker of a killed `up` would be: holding the store's
            # lock, outliving whoever started it.
            leftover = EmbeddedNats(nats_dir, die_with_parent=False)
            leftover.start()
            assert leftover.proc is not None
            proc = leftover.proc
        else:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while not list(nats_dir.glob(f"nats-server_{proc.pid}.ports")):
                assert time.monotonic() < deadline, "the hand-started broker is not up"
                time.sleep(0.05)
        try:
            url = up.start()
            assert any(
                f"stopping a leftover nats-server (pid {proc.pid})" in line for line in up.lines
            ), up.lines
            assert proc.wait(5) is not None
            assert up.broker_pid() != proc.pid
            r = cli(url, "tenant", "show", "acme", "-o", "json")
            assert r.returncode == 0, r.stderr
            up.stop()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_two_brokers_never_share_a_store(tmp_path):
    first = EmbeddedNats(tmp_path / "nats")
    second = EmbeddedNats(tmp_path / "nats")
    url = first.start()
    try:
        with pytest.raises(StoreInUse) as exc:
            second.start()
        assert exc.value.pids == [first.pid]
        assert f"pid {first.pid}" in str(exc.value)
        assert second.proc is None  # nothing was started
        assert first.holders() == [first.pid]

        async def still_serves() -> None:
            c = await Client.connect(url, timeout=2)
            assert c.nc.is_connected
            await c.close()

        asyncio.run(still_serves())
    finally:
        first.stop()
    # Once the first is gone, the lock goes with it.
    second.start()
    try:
        assert second.holders() == [second.pid]
    finally:
        second.stop()


def test_two_stacks_on_one_machine_leave_each_others_containers_alone(tmp_path):
    """Two `stratus up --hosts 1` (two data dirs), each with a container on
    its `host-01`: one killed and started again reconciles its host on
    start, and the other's container runs on untouched."""
    from stratus.agents.compute.containers import ContainerDriver
    from stratus.cli.datadir import deployment_prefix

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    with running_up(a_dir, "--hosts", "1") as a, running_up(b_dir, "--hosts", "1") as b:
        tokens: dict[str, str] = {}
        boxes: dict[str, dict] = {}
        try:
            for key, up in (("a", a), ("b", b)):
                url = up.start(timeout=60)
                r = cli(url, "login", "--user", "admin", "--password", ADMIN_PASSWORD, "--print")
                assert r.returncode == 0, r.stderr
                tokens[key] = r.stdout.strip()
                assert cli(url, "image", "create", "base", token=tokens[key]).returncode == 0
                r = cli(
                    url,
                    *("server", "create", "box", "--image", "base", "--type", "container"),
                    *("--vcpus", "1", "--ram-mb", "64", "-o", "json"),
                    token=tokens[key],
                )
                assert r.returncode == 0, r.stderr
                boxes[key] = json.loads(r.stdout)
            for key, up in (("a", a), ("b", b)):
                wait_running(up.url, "box", tokens[key])
            groups = {
                key: Path("/sys/fs/cgroup/cpu/stratus", f"{deployment_prefix(d)}.host-01")
                for key, d in (("a", a.data_dir), ("b", b.data_dir))
            }
            assert groups["a"] != groups["b"]
            for key in ("a", "b"):
                assert (groups[key] / boxes[key]["id"]).is_dir()

            # A dies and comes back: its agent reconciles host-01 on start,
            # which removes every instance of that host it does not want.
            assert a.proc is not None
            a.proc.kill()
            a.proc.wait(5)
            a.start(timeout=60)
            for key, up in (("a", a), ("b", b)):
                r = cli(up.url, "server", "exec", "box", "--", "true", token=tokens[key])
                assert r.returncode == 0, f"{key}: {r.stderr}"
            assert not (groups["a"] / boxes["b"]["id"]).exists()
            assert not (groups["b"] / boxes["a"]["id"]).exists()
            for key, up in (("a", a), ("b", b)):
                r = cli(up.url, "server", "delete", "box", token=tokens[key])
                assert r.returncode == 0, r.stderr
            for key, up in (("a", a), ("b", b)):
                wait_deleted(up.url, "box", tokens[key])
        finally:
            # A clean stop takes the simulated hosts' namespaces down too
            # (after A's SIGKILL its restart found and kept them).
            for up in (a, b):
                if up.proc is not None:
                    up.stop()
            # Instances outlive their agents: whatever a failed run left.
            for up in (a, b):
                driver = ContainerDriver(
                    "host-01",
                    up.data_dir / "hosts" / "host-01" / "containers",
                    deployment=deployment_prefix(up.data_dir),
                )
                for server in driver.list_owned():
                    driver.remove(server)
                driver.cgroups.prune()
            prefixes = (deployment_prefix(a.data_dir), deployment_prefix(b.data_dir))
            left = [n.name for n in Path("/run/netns").iterdir() if n.name.startswith(prefixes)]
            for name in left:  # removed, so that a failure here leaves nothing either
                subprocess.run(["ip", "netns", "delete", name], check=False)
    assert left == [], "namespaces left behind by a clean stop"


def wait_running(url: str, ref: str, token: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli(url, "server", "show", ref, "-o", "json", token=token)
        if r.returncode == 0 and json.loads(r.stdout)["status"] == "running":
            return
        time.sleep(0.3)
    raise AssertionError(f"{ref} not running: {r.stdout} {r.stderr}")


def wait_deleted(url: str, ref: str, token: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cli(url, "server", "show", ref, "-o", "json", token=token)
        if r.returncode == 1 and "not_found" in r.stderr:
            return
        time.sleep(0.3)
    raise AssertionError(f"{ref} not deleted: {r.stdout} {r.stderr}")


def test_a_broker_on_any_port_gets_one_it_can_have_again(tmp_path):
    """`port=-1` takes a port below the kernel's ephemeral range, so an
    outgoing connection cannot take it while the broker is down, and the
    restart listens where clients knew it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    broker = EmbeddedNats(tmp_path / "nats", port=-1)
    try:
        url = broker.start()
        port = int(url.rsplit(":", 1)[1])
        assert port < low, (port, low)
        broker.stop()
        assert broker.start() == url
    finally:
        broker.stop()
