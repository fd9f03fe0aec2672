"""A benchmark's ``--json`` is JSON alone on stdout: the services it starts
log to stderr (an unconfigured structlog prints to stdout)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

BENCH = [sys.executable, "-m", "stratus.ops.bench.connect"]


def test_connect_bench_json_is_clean_stdout():
    out = subprocess.run(
        [*BENCH, "--connects", "2", "--rounds", "1", "--storm", "0", "--load", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["benchmark"] == "connect"
    assert report["rows"], report
