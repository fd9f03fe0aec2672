"""The console benchmark: how soon a live page shows a new server, and what
a page costs next to the queries behind it.

``python -m stratus.ops.bench console [--servers N] [--pages N] [--json]``

``stratus up --console-port 0`` as a child process in a temporary directory
(what an operator runs; no hosts, so servers stay unplaced). Rows:

* live: ``--servers`` ``server.create`` commands one after another; for
  each, the time from just before the command is sent until
  - a core NATS subscriber of the service user sees its first event (the
    baseline: the broker alone),
  - the servers page's event stream (a member's session, over HTTP) sends
    its row;
* pages: ``--pages`` requests of the servers page (HTTP, a member's session),
  next to the same queries sent straight to the control plane with the
  member's token (``Client``, concurrently, as the page does: the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats

from stratus.ops.bench.common import (
    Load,
    Report,
    compare,
    finish,
    machine_facts,
    positive,
    result,
    stop_process,
)

PASSWORD = "bench-admin-password"


@dataclass
class Options:
    servers: int = 100
    pages: int = 200
    # No phase waits longer than this for one answer.
    timeout_s: float = 30.0


def _start_up(data: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stratus.cli.main",
            "up",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--console-port",
            "0",
            "--admin-password",
            PASSWORD,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    console = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stratus up exited with {proc.wait(5)}")
        if line.startswith("console: "):
            console = line.split()[1]
        if "ready" in line:
            return proc, (data / "url").read_text().strip(), console
    proc.kill()
    raise RuntimeError("stratus up did not print ready in 60 s")


async def _member_session(console: str) -> aiohttp.ClientSession:
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    page = await (await s.get(console + "login")).text()
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    r = await s.post(
        console + "login",
        data={"user": "alice", "password": "alice-secret", "tenant": "acme", "csrf": csrf},
        allow_redirects=False,
    )
    if r.status != 303:
        raise RuntimeError(f"login: {r.status}")
    return s


async def _bench(opts: Options, report: Report, url: str, console: str, data: Path) -> None:
    from stratus.cli.client import Client
    from stratus.cli.creds import local_creds

    admin = await Client.connect(url, timeout=opts.timeout_s)
    admin.token = (await admin.command("auth.login", {"user": "admin", "password": PASSWORD})).data[
        "token"
    ]
    await admin.command("tenant.create", {"name": "acme"})
    await admin.command(
        "quota.set", {"tenant": "acme", "limits": {"instances": -1, "vcpus": -1, "ram_mb": -1}}
    )
    await admin.command("image.create", {"name": "cirros", "tenant": "acme"})
    await admin.command("user.create", {"name": "alice", "password": "alice-secret"})
    await admin.command("role.assign", {"user": "alice", "tenant": "acme", "role": "member"})
    alice = await Client.connect(url, timeout=opts.timeout_s)
    alice.token = (
        await alice.command(
            "auth.login", {"user": "alice", "password": "alice-secret", "tenant": "acme"}
        )
    ).data["token"]
    # the broker's own delivery, seen as the handlers see the log
    service = await nats.connect(url, **local_creds(data, "handlers").connect_options())
    session = await _member_session(console)
    try:
        # -- live: the broker's own delivery next to the page's stream ------------
        arrivals: asyncio.Queue[float] = asyncio.Queue()

        async def on_event(_msg: object) -> None:
            arrivals.put_nowait(time.perf_counter())

        sub = await service.subscribe("ev.acme.server.*", cb=on_event)
        last = (await admin.query("status", {"digest": False}))["last_seq"]
        stream = await session.get(console + f"t/acme/live?after={last}")
        rows: asyncio.Queue[tuple[float, dict]] = asyncio.Queue()

        async def read_stream() -> None:
            event = ""
            async for line in stream.content:
                text = line.decode().rstrip("\n")
                if text.startswith("event: "):
                    event = text[7:]
                elif text.startswith("data: ") and event == "server":
                    rows.put_nowait((time.perf_counter(), json.loads(text[6:])))

        reader = asyncio.create_task(read_stream())
        broker, page = Load(), Load()
        t_phase = time.perf_counter()
        for i in range(opts.servers):
            while not arrivals.empty():
                arrivals.get_nowait()
            t0 = time.perf_counter()
            made = await alice.command(
                "server.create",
                {"name": f"s-{i}", "image": "cirros", "vcpus": 1, "ram_mb": 64, "tenant": "acme"},
            )
            sid = made.data["id"]
            try:
                first = await asyncio.wait_for(arrivals.get(), opts.timeout_s)
                broker.latencies.append(first - t0)
                broker.done += 1
                while True:
                    at, row = await asyncio.wait_for(rows.get(), opts.timeout_s)
                    if row.get("id") == sid:
                        page.latencies.append(at - t0)
                        page.done += 1
                        break
            except TimeoutError:
                page.errors += 1
                page.first_error = page.first_error or f"no row for {sid} in {opts.timeout_s}s"
        broker.seconds = page.seconds = time.perf_counter() - t_phase
        reader.cancel()
        stream.close()
        await sub.unsubscribe()
        base = result("live: core NATS subscriber sees the event", broker)
        live = result("live: the servers page's stream sends the row", page)
        if base.p50_ms and live.p50_ms:
            live.note = f"p50 {live.p50_ms / base.p50_ms:.1f}x the broker's"
        report.results += [base, live]

        # -- pages: the servers page next to its queries -------------------------------
        async def queries() -> None:
            await alice.query("whoami")
            await alice.query("status", {"digest": False, "parts": False})
            await asyncio.gather(
                *(
                    alice.query(v, {"tenant": "acme"})
                    for v in ("servers", "ports", "floating-ips", "images", "networks")
                ),
                alice.query("flavors"),
            )

        async def http_page() -> None:
            r = await session.get(console + "t/acme/servers")
            if r.status != 200:
                raise RuntimeError(f"servers page: {r.status}")
            await r.read()

        loads = []
        for fn in (queries, http_page):
            load = Load()
            t = time.perf_counter()
            for _ in range(opts.pages):
                s0 = time.perf_counter()
                try:
                    await asyncio.wait_for(fn(), opts.timeout_s)
                    load.done += 1
                    load.latencies.append(time.perf_counter() - s0)
                except Exception as exc:
                    load.errors += 1
                    load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
            load.seconds = time.perf_counter() - t
            loads.append(load)
        base = result(f"pages: the page's queries ({opts.servers} servers)", loads[0])
        html = compare(
            result(f"pages: GET /t/acme/servers ({opts.servers} servers)", loads[1]),
            base,
            label="its queries",
        )
        report.results += [base, html]
    finally:
        await session.close()
        await service.close()
        await alice.close()
        await admin.close()


def run(opts: Options) -> Report:
    report = Report("console", opts, info=machine_facts())
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-console-"))
    proc = None
    try:
        proc, url, console = _start_up(tmp / "data")
        report.info.update({"nats_url": url, "console_url": console})
        asyncio.run(_bench(opts, report, url, console, tmp / "data"))
    except Exception as exc:
        report.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proc is not None:
            stop_process(proc)  # type: ignore[arg-type]
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report.failures += [f"{r.name}: {r.note}" for r in report.results if r.errors]
    return report


def main(argv: list[str] | None = None) -> int:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench console")
    p.add_argument("--servers", type=positive, default=d.servers, help="servers created, measured")
    p.add_argument(
        "--pages", type=positive, default=d.pages, help="page requests, and as many query rounds"
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    opts = Options(a.servers, a.pages)
    start = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    caption = (
        f"{report.info.get('cpus')} CPUs, load {report.info.get('loadavg')}, Python "
        f"{report.info.get('python')}; stratus up as a child process, one client "
        f"process; latency from just before each command; wall {report.info['wall_seconds']} s"
    )
    return finish(report, a.json, "Stratus console benchmark", caption)


if __name__ == "__main__":
    sys.exit(main())
