"""Container instances with real namespaces and cgroups: the CPU limit holds,
the memory limit kills a hog, the command is PID 1 of its own PID namespace,
and the agent runs them from claims and answers exec."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import pytest

from stratus.agents.compute.agent import ExecReply, ExecRequest
from stratus.agents.compute.containers import NETNS_DIR, ContainerDriver, netns_name
from stratus.agents.compute.spec import InstanceSpec
from stratus.events.errors import HostError
from stratus.events.ids import new_id
from stratus.events.resources import ServerSpec

from .compute_helpers import (
    cleanup,
    make_agent,
    owned,
    place,
    server_events,
    types,
    unique_host,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@pytest.fixture
def driver(tmp_path):
    d = ContainerDriver(unique_host(), tmp_path / "containers")
    yield d
    for server in list(d.list_owned()):
        d.remove(server)
    d.cgroups.prune()
    assert not d.cgroups.bases[0].exists()


def spec(**kw) -> InstanceSpec:
    asked = ServerSpec(name="c", image="", vcpus=1, ram_mb=kw.pop("ram_mb", 64))
    return InstanceSpec(server=new_id(), tenant="acme", requested=asked, **kw)


def test_cpu_limit_holds_a_busy_loop_to_its_share(driver):
    s = spec(cpu=0.2, command=["python3", "-c", "while True: pass"])
    driver.ensure(s)
    pid = driver.init_pid(s.server)
    assert pid is not None
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(2.0)
    used = (cpu_seconds(pid) - before) / (time.monotonic() - t0)
    # 0.2 of a core asked; an unlimited busy loop would use a whole one.
    assert 0.05 < used <= 0.30, used


def test_memory_hog_is_killed_at_its_limit(driver):
    s = spec(ram_mb=32)
    driver.ensure(s)
    hog = ["python3", "-c", "b = bytearray(200 * 1024 * 1024); print('survived')"]
    result = driver.exec(s.server, hog, timeout=30)
    assert result.exit_code != 0
    assert "survived" not in result.stdout
    assert driver.cgroups.oom_kills(s.server) >= 1
    # The instance itself (its PID 1) lives on; only the hog went.
    assert driver.list_owned() == {s.server: "running"}


def test_pid_one_own_network_namespace_and_clean_removal(driver):
    s = spec()
    driver.ensure(s)
    pid1 = driver.exec(s.server, ["cat", "/proc/1/cmdline"])
    assert pid1.exit_code == 0 and pid1.stdout.startswith("sleep")
    links = driver.exec(s.server, ["ip", "-o", "link"])
    # A fresh network namespace: loopback only, and it is up.
    assert links.exit_code == 0 and len(links.stdout.strip().splitlines()) == 1
    assert "lo:" in links.stdout and "UP" in links.stdout
    assert (NETNS_DIR / netns_name(s.server)).exists()
    # Ensuring again (a redelivered claim) starts nothing new.
    driver.ensure(s)
    assert len(driver.cgroups.pids(s.server)) == 2  # unshare and its PID 1
    driver.remove(s.server)
    assert driver.list_owned() == {}
    assert not (NETNS_DIR / netns_name(s.server)).exists()
    assert not any(d.exists() for d in driver.cgroups.dirs(s.server))


class _Killed(BaseException):
    """The agent dying between two steps of a build."""


def test_a_namespace_left_by_a_build_cut_short_is_listed_and_removed(tmp_path, monkeypatch):
    """An agent killed after `ip netns add` and before the cgroup: the
    namespace alone is the instance's only trace. A new agent's listing
    must show it (as stopped) so its pass, or a teardown, removes it."""
    host = unique_host()
    first = ContainerDriver(host, tmp_path / "containers")
    s = spec()
    ns = NETNS_DIR / netns_name(s.server)

    def die(_spec):
        raise _Killed

    monkeypatch.setattr(first.cgroups, "create", die)
    try:
        with pytest.raises(_Killed):
            first.ensure(s)
        assert ns.exists() and not first.cgroups.dirs(s.server)[0].exists()
        restarted = ContainerDriver(host, tmp_path / "containers")
        assert restarted.list_owned() == {s.server: "stopped"}
        assert restarted.state(s.server) == "stopped"
        restarted.remove(s.server)
        assert not ns.exists()
        assert restarted.list_owned() == {} and restarted.state(s.server) is None
    finally:
        first.remove(s.server)  # whatever the test left
        first.cgroups.prune()


async def test_a_restarted_agent_removes_a_namespace_no_claim_wants(store, tmp_path, monkeypatch):
    host = unique_host()
    data = tmp_path / host / "containers"
    s = spec()
    ns = NETNS_DIR / netns_name(s.server)
    cut = ContainerDriver(host, data)

    def die(_spec):
        raise _Killed

    monkeypatch.setattr(cut.cgroups, "create", die)
    with pytest.raises(_Killed):
        cut.ensure(s)
    assert ns.exists()
    agent = make_agent(store, host, tmp_path, vm=False, containers=True)
    await agent.start()
    try:
        assert not ns.exists()
        recs = await store.read_all(subjects=[f"ev._system.host.{host}"])
        fixes = [r.decode() for r in recs if r.decode().type_name() == "host.reconciled"]
        assert [f.removed for f in fixes] == [[s.server]]
        assert owned(agent) == {}
    finally:
        await cleanup(agent)
        cut.remove(s.server)


def test_same_host_name_in_two_deployments_sees_only_its_own_instances(tmp_path):
    """Two stacks on one machine both have a host of this name: each
    driver lists (so reconciles) only its own deployment's containers."""
    host = unique_host()
    mine = ContainerDriver(host, tmp_path / "a", deployment="sa01")
    theirs = ContainerDriver(host, tmp_path / "b", deployment="sb02")
    plain = ContainerDriver(host, tmp_path / "c")
    drivers = (mine, theirs, plain)
    try:
        a, b = spec(), spec()
        mine.ensure(a)
        theirs.ensure(b)
        assert mine.list_owned() == {a.server: "running"}
        assert theirs.list_owned() == {b.server: "running"}
        assert plain.list_owned() == {}
        assert mine.cgroups.bases[0].name == f"sa01.{host}"
        assert plain.cgroups.bases[0].name == host
        # What a reconcile of the first does with instances it does not want.
        for server in mine.list_owned():
            mine.remove(server)
        assert theirs.list_owned() == {b.server: "running"}
        assert theirs.exec(b.server, ["true"]).exit_code == 0
        with pytest.raises(HostError):
            ContainerDriver(host, tmp_path / "d", deployment="Not/Valid")
    finally:
        for d in drivers:
            for server in list(d.list_owned()):
                d.remove(server)
            d.cgroups.prune()


async def test_agent_runs_a_container_from_a_claim_and_serves_exec(store, tmp_path):
    host = unique_host()
    agent = make_agent(store, host, tmp_path, vm=False, containers=True)
    await agent.start()
    try:
        sid = await place(store, host, instance_type="container", ram_mb=64)
        evs = await wait_for(store, sid, "server.running")
        assert types(evs)[-2:] == ["server.building", "server.running"]
        assert owned(agent) == {sid: "running"}
        req = ExecRequest(server=sid, command=["sh", "-c", "echo $$; hostname -I; exit 3"])
        msg = await store.nc.request(f"agent.{host}.exec", msgspec.json.encode(req), timeout=20)
        reply = msgspec.json.decode(msg.data, type=ExecReply)
        assert reply.ok and reply.result is not None
        assert reply.result.exit_code == 3
        # A PID inside the instance's own namespace (its PID 1 is the sleep).
        assert 1 < int(reply.result.stdout.split()[0]) < 100
        unknown = ExecRequest(server=new_id(), command=["true"])
        msg = await store.nc.request(f"agent.{host}.exec", msgspec.json.encode(unknown), timeout=20)
        refused = msgspec.json.decode(msg.data, type=ExecReply)
        assert not refused.ok and "no container instance" in refused.error
        # Stop kills its processes; start runs the command again.
        from .test_compute_agent import action

        await action(store, host, sid, "stop")
        await wait_for(store, sid, "server.stopped")
        assert owned(agent) == {sid: "stopped"}
        await action(store, host, sid, "delete")
        await wait_for(store, sid, "server.deleted")
        for _ in range(100):
            if not owned(agent):
                break
            await asyncio.sleep(0.05)
        assert owned(agent) == {}
    finally:
        await cleanup(agent)


async def test_periodic_reconcile_restarts_a_container_killed_by_hand(store, tmp_path):
    host = unique_host()
    agent = make_agent(store, host, tmp_path, vm=False, containers=True, reconcile_interval=1)
    await agent.start()
    try:
        sid = await place(store, host, instance_type="container")
        await wait_for(store, sid, "server.running")
        driver = agent.drivers["container"]
        old = driver.init_pid(sid)
        # What an OOM or a stray kill does; done without yielding to the
        # loop, so the agent's reconcile cannot run halfway through it.
        driver.stop(sid)
        assert owned(agent) == {sid: "stopped"}
        # The pass records the restart once its start has returned, i.e. once
        # the new PID 1 runs the command: wait (bounded) for that record. Not
        # for the cgroup to hold a process: it does from the first instant
        # of the start, before unshare has made PID 1.
        fixes: list = []
        for _ in range(100):
            recs = await store.read_all(subjects=[f"ev._system.host.{host}"])
            fixes = [r.decode() for r in recs if r.decode().type_name() == "host.reconciled"]
            if fixes:
                break
            await asyncio.sleep(0.1)
        assert [f.started for f in fixes] == [[sid]]
        assert owned(agent) == {sid: "running"}
        assert driver.init_pid(sid) not in (None, old)
        assert types(await server_events(store, sid))[-1] == "server.running"
    finally:
        await cleanup(agent)
