"""`stratus serve KIND` as an operator types it: its help names the options
that kind reads (and the kind's own), and a service's --data-dir is made
when it does not exist yet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratus.cli.main import OWN_OPTIONS, SERVE_OPTIONS
from stratus.events.broker import EmbeddedNats

STRATUS = [sys.executable, "-m", "stratus.cli.main"]


def serve(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STRATUS, "serve", *args], capture_output=True, text=True, timeout=30, **kw
    )


def test_serve_help_lists_the_options_each_kind_reads():
    out = serve("--help")
    assert out.returncode == 0, out.stderr
    for kind, names in SERVE_OPTIONS.items():
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"  {kind:<14} "))
        for name in names:
            assert name in line, (kind, line)


@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [
        # the projector: --db and its lease options, not the scheduler's
        ("projector", ["--db", "--data-dir", "--lease-ttl", "--holder"], ["--seed", "--config"]),
        ("scheduler", ["--config", "--seed"], ["--db", "--admin-password", "--lease-ttl"]),
        ("compute-agent", ["--host", "--libvirt-uri", "--data-dir"], ["--db", "--seed"]),
        ("query", ["--db", "--quota-default"], ["--admin-password", "--config", "--host"]),
    ],
)
def test_serve_kind_help_shows_what_that_kind_reads(kind, present, absent):
    out = serve(kind, "--help")
    assert out.returncode == 0, out.stderr
    for name in present:
        assert name in out.stdout, (kind, name)
    for name in absent:
        assert name not in out.stdout, (kind, name)
    assert ("Its own options" in out.stdout) == (kind in OWN_OPTIONS)


def test_serve_without_a_kind_is_a_usage_error():
    out = serve()
    assert out.returncode == 2
    assert "give the SERVICE" in out.stderr


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


@pytest.fixture
def broker(tmp_path):
    srv = EmbeddedNats(tmp_path / "nats", log_file=str(tmp_path / "nats.log"))
    url = srv.start()
    yield url
    srv.stop()


@pytest.mark.parametrize("kind", ["projector", "query"])
def test_serve_makes_its_data_dir(broker, tmp_path, kind):
    data = tmp_path / "not" / "there" / kind
    log = tmp_path / f"{kind}.log"
    env = {**os.environ, "STRATUS_URL": broker}
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [*STRATUS, "serve", kind, "--insecure-no-auth", "--data-dir", str(data)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while "ready" not in Path(log).read_text(errors="replace"):
            assert p.poll() is None, Path(log).read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "not ready in 30 s"
            time.sleep(0.1)
        assert data.is_dir()
    finally:
        stop(p)


def test_a_projector_before_init_says_so_once_not_a_traceback_a_second(broker, tmp_path):
    """A projector served on a broker where `stratus init` has not made the
    stream yet retries every second: one line says why, not a traceback
    per retry (it was 780 lines of traceback in 6 s)."""
    log = tmp_path / "projector.log"
    env = {**os.environ, "STRATUS_URL": broker}
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [*STRATUS, "serve", "projector", "--insecure-no-auth", "--data-dir", str(tmp_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while "projector waiting" not in log.read_text(errors="replace"):
            assert p.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "no word on the missing stream in 30 s"
            time.sleep(0.1)
        time.sleep(3.5)  # three more retries
        text = log.read_text(errors="replace")
        assert p.poll() is None, text[-2000:]
        assert text.count("projector waiting") == 1, text[-2000:]
        assert "stream not found" in text
        assert "Traceback" not in text
        assert text.count("projector started") >= 3, text[-2000:]  # it did retry
    finally:
        stop(p)
