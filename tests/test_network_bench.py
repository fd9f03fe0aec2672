"""The network benchmark's short form (ops/bench/network.py): both modes,
end to end, on a few simulated hosts. The full run (1,000 ports, 10 hosts,
50 networks) is `python -m stratus.ops.bench network`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stratus.ops.bench.network import (
    NEIGH_TABLE,
    neigh_entries_needed,
    neigh_table_size,
    neigh_table_warning,
)

pytestmark = pytest.mark.timeout(240)


def _bench(*args: str) -> dict:
    """``python -m stratus.ops.bench network ARGS --json``: its report."""
    r = subprocess.run(
        [sys.executable, "-m", "stratus.ops.bench", "network", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_the_short_network_bench_wires_every_port_in_both_modes():
    out = _bench("--ports", "24", "--hosts", "3", "--networks", "6", "--wave", "6")
    assert out["failures"] == []
    # the neighbour table it ran with, as the machine has it (read, not changed)
    assert out["info"]["gc_thresh3"] == int(NEIGH_TABLE.read_text())
    rows = {row["name"].split(" (")[0]: row for row in out["results"]}
    for mode in ("vxlan", "routed"):
        # every new port answered an echo across hosts (routed: its host's
        # block was claimed through the handlers' relay)
        traffic = rows[f"{mode}: binding to traffic"]
        assert traffic["count"] == 18 and traffic["errors"] == 0, traffic
        assert traffic["p99_ms"] is not None and traffic["p99_ms"] > 0
        # the passes that wired them, broken down by step (every port of
        # the waves came through one of them)
        wiring = out["info"][f"{mode}_wiring_passes"]
        assert 1 <= wiring["count"] <= 18 and wiring["ports_p50"] >= 1, wiring
        for step in ("ports", "firewall", "plug"):
            p50, p90 = wiring[f"{step}_ms_p50_p90"]
            assert 0 <= p50 <= p90, (step, wiring)
        assert wiring["plug_ms_p50_p90"][1] > 0, wiring  # plugging in is never free
        # what the waves cost in CPU (the machine's busy share, ours per port)
        cpu = out["info"][f"{mode}_wave_cpu"]
        assert 0 < cpu["machine_busy"] <= 1.0, cpu
        assert cpu["this_process_user_s_per_port"] > 0, cpu
        # where each port's wait went: to its pass, the pass, then to the echo
        split = out["info"][f"{mode}_binding_split_ms_p50_p90"]
        assert set(split) == {"binding_to_pass", "pass_to_wired", "wired_to_echo"}
        assert all(0 <= p50 <= p90 for p50, p90 in split.values()), split
        assert split["pass_to_wired"][0] > 0, split
        # and a restart with nothing changed changed nothing
        restart = rows[f"{mode}: restart to converged"]
        assert restart["errors"] == 0 and restart["note"].startswith("0 changes"), restart


def test_the_short_network_bench_with_an_agent_process_per_host():
    """``--agents process``: each host's agent is its own ``stratus serve
    network-agent`` (as deployed), started against the bench's broker."""
    out = _bench(
        *("--agents", "process", "--ports", "12", "--hosts", "2", "--networks", "4"),
        *("--wave", "4", "--modes", "vxlan"),
    )
    assert out["failures"] == []  # (nothing left behind: the agents' logs neither)
    rows = {row["name"].split(" (")[0]: row for row in out["results"]}
    traffic = rows["vxlan: binding to traffic"]
    assert traffic["count"] == 8 and traffic["errors"] == 0, traffic
    restart = rows["vxlan: restart to converged"]
    assert restart["errors"] == 0 and restart["note"].startswith("0 corrections"), restart


@pytest.mark.parametrize(
    ("size", "ports", "hosts", "warned"),
    [
        # 1,000 ports on 10 hosts: 2 * 1000 + 10 * 9 = 2,090 entries
        (1024, 1000, 10, True),  # Linux's default: the full run overflows it
        (2089, 1000, 10, True),
        (2090, 1000, 10, False),
        (32768, 1000, 10, False),  # what ops/bootstrap sets
        (1024, 24, 3, False),  # the short form fits the default
        (None, 1000, 10, False),  # not readable: nothing to say
    ],
)
def test_the_bench_warns_when_the_neighbour_table_is_smaller_than_its_workload(
    size, ports, hosts, warned
):
    assert neigh_entries_needed(1000, 10) == 2090
    warning = neigh_table_warning(size, ports, hosts)
    assert (warning is not None) == warned
    if warned:
        assert f"gc_thresh3 = {size}" in warning and "ops/bootstrap" in warning


def test_the_neighbour_table_size_is_read_from_proc():
    size = neigh_table_size()
    assert size is not None and size == int(NEIGH_TABLE.read_text())
