"""The network benchmark's short form (ops/bench/network.py): both modes,
end to end, on a few simulated hosts. The full run (1,000 ports, 10 hosts,
50 networks) is `python -m stratus.ops.bench network`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def test_the_short_network_bench_wires_every_port_in_both_modes():
    r = subprocess.run(
        [
            *(sys.executable, "-m", "stratus.ops.bench", "network"),
            *("--ports", "24", "--hosts", "3", "--networks", "6", "--wave", "6", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["failures"] == []
    rows = {row["name"].split(" (")[0]: row for row in out["results"]}
    for mode in ("vxlan", "routed"):
        # every new port answered an echo across hosts (routed: its host's
        # block was claimed through the handlers' relay)
        traffic = rows[f"{mode}: binding to traffic"]
        assert traffic["count"] == 18 and traffic["errors"] == 0, traffic
        assert traffic["p99_ms"] is not None and traffic["p99_ms"] > 0
        # and a restart with nothing changed changed nothing
        restart = rows[f"{mode}: restart to converged"]
        assert restart["errors"] == 0 and restart["note"].startswith("0 changes"), restart
