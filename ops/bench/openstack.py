"""The OpenStack API against the native path, and Tempest against the API.

``python -m stratus.ops.bench openstack [--servers 500] [--creates 640]
[--clients 64] [--no-tempest] [--json]`` runs `stratus up` (its own
process, no OpenStack API inside) and `stratus serve openstack-api` (a
second process, as deployed), then measures in the same run:

1. ``server.create`` with 64 clients: native commands over NATS (the
   baseline) against ``POST /compute/v2.1/servers`` with as many HTTP
   clients (goal: at least 0.7x);
2. listing N servers: ``GET /servers/detail`` against the native
   ``q.servers`` query, and the ``openstack server list`` command against
   ``stratus server list`` (both whole processes, start-up included);
3. Tempest 47 (installed into its own venv under ``--cache-dir`` if
   missing, never into the project's: its pins clash), configured for
   pre-provisioned accounts and ``run_validation = False``, on the classes
   issue 15 lists; passed, failed and skipped per class.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stratus.ops.bench.common import (
    Load,
    Report,
    Result,
    compare,
    drive,
    percentile,
    positive,
    print_table,
    result,
    stop_process,
)

PASSWORD = "bench-admin-password"
USER_PASSWORD = "tempest-password"
TEMPEST = "tempest>=47,<48"
TENANT = "bench"

TEMPEST_CLASSES = (
    "tempest.api.identity.v3.test_api_discovery.TestApiDiscovery",
    "tempest.api.identity.v3.test_tokens.TokensV3Test",
    "tempest.api.compute.test_versions.TestVersions",
    "tempest.api.compute.flavors.test_flavors.FlavorsV2TestJSON",
    "tempest.api.compute.test_quotas.QuotasTestJSON",
    "tempest.api.network.test_versions.NetworksApiDiscovery",
    "tempest.api.network.test_networks.NetworksTest",
    "tempest.api.network.test_security_groups.SecGroupTest",
    "tempest.api.network.test_routers.RoutersTest",
    "tempest.api.network.test_floating_ips.FloatingIPTestJSON",
    "tempest.api.image.v2.test_images.BasicOperationsImagesTest",
    "tempest.api.compute.servers.test_create_server.ServersTestJSON",
)
# Tempest's accounts (pre-provisioned, no dynamic credentials): a member
# (primary, alt) and a reader (project_reader, taken from the primary's own
# project) in each of four projects, and the cloud admin.
ACCOUNTS = (
    *((f"tempest-m{i}", f"tempest-p{i}", "member") for i in range(1, 5)),
    *((f"tempest-r{i}", f"tempest-p{i}", "reader") for i in range(1, 5)),
)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stratus" / "tempest-venv"


@dataclass
class Options:
    servers: int = 500
    creates: int = 640
    clients: int = 64
    list_runs: int = 3
    tempest: bool = True
    cache_dir: str = ""
    tempest_timeout: float = 1800.0
    phase_seconds: float = 120.0
    # Keep the run's directory (logs, tempest.conf, Tempest's results).
    keep: bool = False


STRATUS = [sys.executable, "-m", "stratus.cli.main"]


def _start(args: list[str], ready: str, log: Path, env: dict[str, str]) -> tuple[Any, str]:
    """A child process and the line it printed containing ``ready``."""
    out = open(log, "w")
    p = subprocess.Popen([*STRATUS, *args], stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    deadline = time.monotonic() + 90
    assert p.stdout is not None
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{' '.join(args[:2])} exited ({p.wait(5)}); see {log}")
        if ready in line:
            return p, line
    stop_process(p)
    raise RuntimeError(f"{' '.join(args[:2])} did not get ready")


def run(opts: Options) -> Report:
    report = Report("openstack", opts)
    tmp = Path(tempfile.mkdtemp(prefix="stratus-bench-openstack-"))
    env = {**os.environ, "STRATUS_DATA_DIR": str(tmp / "data"), "XDG_CONFIG_HOME": str(tmp / "cfg")}
    procs: list[Any] = []
    try:
        up, _ = _start(
            [
                "up",
                "--port",
                "0",
                "--hosts",
                "1",
                "--openstack-port",
                "-1",
                "--admin-password",
                PASSWORD,
            ],
            "stratus ready",
            tmp / "up.log",
            env,
        )
        procs.append(up)
        url = (tmp / "data" / "url").read_text().strip()
        env["STRATUS_URL"] = url
        # Its own credential, issued from the data dir `up` initialised.
        from stratus.cli.creds import local_creds
        from stratus.events.natscreds import dumps, write_private

        creds = tmp / "openstack-api.creds"
        write_private(creds, dumps(local_creds(tmp / "data", "openstack-api")))
        api, line = _start(
            ["serve", "openstack-api", "--creds", str(creds), "--listen", "127.0.0.1:0"],
            "openstack-api ready",
            tmp / "api.log",
            env,
        )
        procs.append(api)
        auth_url = line.rsplit(" ", 1)[1].strip()
        report.info.update(
            {"nats_url": url, "auth_url": auth_url, "cpus": os.cpu_count(), "tmp": str(tmp)}
        )
        asyncio.run(_measure(url, auth_url, tmp, env, opts, report))
        if opts.tempest:
            _tempest(url, auth_url, tmp, env, opts, report)
    except Exception as exc:
        report.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        for p in reversed(procs):
            stop_process(p)
        if opts.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return report


async def _admin(url: str) -> Any:
    from stratus.cli.client import Client

    c = await Client.connect(url, timeout=60)
    login = {"user": "admin", "password": PASSWORD}
    c.token = (await c.command("auth.login", login)).data["token"]
    return c


async def _measure(
    url: str, auth_url: str, tmp: Path, env: dict[str, str], opts: Options, report: Report
) -> None:
    import aiohttp

    from stratus.cli.client import Client

    admin = await _admin(url)
    base = auth_url.rsplit("/v3", 1)[0]
    unlimited = {"instances": -1, "vcpus": -1, "ram_mb": -1, "ports": -1}
    for verb, body in (
        ("tenant.create", {"name": TENANT}),
        ("quota.set", {"tenant": TENANT, "limits": unlimited}),
        ("user.create", {"name": "bencher", "password": USER_PASSWORD}),
        ("role.assign", {"user": "bencher", "tenant": TENANT, "role": "member"}),
        ("flavor.create", {"name": "m1-tiny", "vcpus": 1, "ram_mb": 64}),
        # What the creates ask for fits no host: the scheduler refuses each
        # at once and the host stays free (for Tempest's servers).
        ("flavor.create", {"name": "bench-xl", "vcpus": 4096, "ram_mb": 64}),
        ("image.create", {"tenant": TENANT, "name": "img"}),
    ):
        await admin.command(verb, body)
    image = (await admin.query("image", {"ref": "img", "tenant": TENANT}))["id"]
    token = (
        await admin.command("auth.login", {"user": "bencher", "password": USER_PASSWORD})
    ).data["token"]
    clients = [Client(admin.nc, token, 60) for _ in range(opts.clients)]
    # The first server makes the default security group: not measured.
    await clients[0].command(
        "server.create", {"name": "warm", "image": "img", "flavor": "bench-xl"}
    )

    async def native(w: int, i: int) -> None:
        body = {"name": f"n{i:06d}", "image": "img", "flavor": "bench-xl"}
        await clients[w].command("server.create", body)

    headers = {"X-Auth-Token": token, "Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=opts.clients)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as http:

        async def via_api(w: int, i: int) -> None:
            server = {"name": f"a{i:06d}", "imageRef": image, "flavorRef": "bench-xl"}
            body = {"server": {**server, "networks": "none"}}
            async with http.post(f"{base}/compute/v2.1/servers", json=body) as r:
                if r.status != 202:
                    raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")

        # Alternating rounds, so neither path has the machine to itself.
        half = opts.creates // 2
        n1 = await drive(native, half, opts.clients, opts.phase_seconds, latencies=True)
        a1 = await drive(via_api, half, opts.clients, opts.phase_seconds, latencies=True)
        n2 = await drive(
            lambda w, i: native(w, i + half), half, opts.clients, opts.phase_seconds, latencies=True
        )
        a2 = await drive(
            lambda w, i: via_api(w, i + half),
            half,
            opts.clients,
            opts.phase_seconds,
            latencies=True,
        )
        base_r = result(f"server.create native, {opts.clients} clients", _sum(n1, n2))
        api_r = compare(
            result(f"POST /servers, {opts.clients} HTTP clients", _sum(a1, a2)),
            base_r,
            target=0.7,
            label="native",
        )
        base_r.note = "quota-checked command over NATS (the CLI's path)"
        api_r.note = "through stratus serve openstack-api (its own process)"
        report.results += [base_r, api_r]

        # Top the tenant up to N servers for the listings.
        have = len(await clients[0].query("servers", {}))
        more = max(0, opts.servers - have)
        await drive(lambda w, i: native(w, 10_000_000 + i), more, opts.clients, opts.phase_seconds)
        count = len(await clients[0].query("servers", {}))
        report.info["servers_listed"] = count

        async def q_list(_w: int, _i: int) -> None:
            await clients[0].query("servers", {})

        async def api_list(_w: int, _i: int) -> None:
            async with http.get(f"{base}/compute/v2.1/servers/detail") as r:
                if r.status != 200 or len((await r.json())["servers"]) != count:
                    raise RuntimeError(f"GET /servers/detail: {r.status}")

        q = await drive(q_list, 20, 1, opts.phase_seconds, latencies=True)
        g = await drive(api_list, 20, 1, opts.phase_seconds, latencies=True)
        rq = result(f"q.servers ({count} servers), one at a time", q)
        rg = compare(result(f"GET /servers/detail ({count} servers)", g), rq, label="q.servers")
        rg.note = "adds ports, networks, floating IPs, groups: 5 queries"
        report.results += [rq, rg]
    await admin.close()
    report.results += _cli_lists(tmp, env, auth_url, opts, count)


def _sum(a: Load, b: Load) -> Load:
    return Load(
        done=a.done + b.done,
        errors=a.errors + b.errors,
        seconds=a.seconds + b.seconds,
        latencies=a.latencies + b.latencies,
        first_error=a.first_error or b.first_error,
    )


def _cli_lists(
    tmp: Path, env: dict[str, str], auth_url: str, opts: Options, count: int
) -> list[Result]:
    clouds = tmp / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  bench:\n    auth:\n"
        f"      auth_url: {auth_url}\n      username: bencher\n      password: {USER_PASSWORD}\n"
        f"      project_name: {TENANT}\n      user_domain_name: Default\n"
        "      project_domain_name: Default\n    region_name: RegionOne\n"
    )
    osc_env = {**env, "OS_CLIENT_CONFIG_FILE": str(clouds), "OS_CLOUD": "bench"}
    openstack = str(Path(sys.executable).with_name("openstack"))
    token = subprocess.run(
        [*STRATUS, "login", "--user", "bencher", "--password", USER_PASSWORD, "--print"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    native_env = {**env, "STRATUS_TOKEN": token}
    out: list[Result] = []
    for name, argv, e in (
        ("stratus server list", [*STRATUS, "server", "list", "-o", "json"], native_env),
        ("openstack server list", [openstack, "server", "list", "-f", "json"], osc_env),
    ):
        load = Load()
        for _ in range(opts.list_runs):
            t0 = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=300)
            took = time.perf_counter() - t0
            load.seconds += took
            if done.returncode != 0 or len(json.loads(done.stdout)) != count:
                load.errors += 1
                load.first_error = load.first_error or done.stderr[-200:]
            else:
                load.done += 1
                load.latencies.append(took)
        out.append(result(f"{name} ({count} servers), whole command", load))
    compare(out[1], out[0], label="stratus server list")
    out[1].note = (
        "start-up included; the API's part is GET /servers/detail (above), the rest is "
        "the client's own work"
    )
    return out


# -- Tempest -------------------------------------------------------------------------


def ensure_tempest(cache: Path) -> Path:
    """The tempest command of a venv of its own, installed on first use."""
    tempest = cache / "bin" / "tempest"
    if not tempest.exists():
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True)
        subprocess.run(
            [str(cache / "bin" / "python"), "-m", "pip", "install", "-q", TEMPEST], check=True
        )
    return tempest


def tempest_conf(auth_url: str, images: tuple[str, str], work: Path) -> str:
    exts = "external-net,router,security-group,quotas,project-id"
    return f"""[DEFAULT]
log_dir = {work}/logs
log_file = tempest.log

[auth]
use_dynamic_credentials = False
test_accounts_file = {work}/etc/accounts.yaml
default_credentials_domain_name = Default
create_isolated_networks = False

[identity]
uri_v3 = {auth_url}
auth_version = v3
region = RegionOne
disable_ssl_certificate_validation = True

[identity-feature-enabled]
api_v2 = False
api_v3 = True

[compute]
image_ref = {images[0]}
image_ref_alt = {images[1]}
flavor_ref = m1-tiny
flavor_ref_alt = m1-small
min_compute_nodes = 1
build_timeout = 120

[compute-feature-enabled]
disk_config = False
resize = False
snapshot = False
console_output = False
interface_attach = False
change_password = False
rescue = False
suspend = False
pause = False
shelve = False
live_migration = False
cold_migration = False
vnc_console = False
serial_console = False
spice_console = False
metadata_service = False
config_drive = False
personality = False

[network]
build_timeout = 60
public_network_id = public
floating_network_name = public
project_networks_reachable = False
project_network_cidr = 10.100.0.0/16
project_network_mask_bits = 28
shared_physical_network = False

[network-feature-enabled]
ipv6 = False
api_extensions = {exts}
floating_ips = True

[image]
container_formats = bare
disk_formats = raw
build_timeout = 120

[image-feature-enabled]
import_image = False

[service_available]
nova = True
neutron = True
glance = True
cinder = False
swift = False
heat = False
placement = False

[validation]
run_validation = False
"""


def _tempest(
    url: str, auth_url: str, tmp: Path, env: dict[str, str], opts: Options, report: Report
) -> None:
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache()
    t0 = time.perf_counter()
    tempest = ensure_tempest(cache)
    report.info["tempest_install_seconds"] = round(time.perf_counter() - t0, 1)
    images = asyncio.run(_tempest_world(url))
    work = tmp / "tempest"
    # Its own workspace registry: nothing lands in ~/.tempest.
    init = [str(tempest), "init", "--workspace-path", str(tmp / "workspaces.yaml")]
    subprocess.run([*init, "--name", tmp.name, str(work)], check=True, capture_output=True)
    (work / "etc" / "accounts.yaml").write_text(
        json.dumps(
            [
                {
                    "username": user,
                    "project_name": project,
                    "password": USER_PASSWORD,
                    "roles": [role],
                    "domain_name": "Default",
                }
                for user, project, role in ACCOUNTS
            ]
            + [
                {
                    "username": "admin",
                    "project_name": "admin",
                    "password": PASSWORD,
                    "roles": ["admin"],
                    "types": ["admin"],
                    "domain_name": "Default",
                }
            ]
        )
    )
    (work / "etc" / "tempest.conf").write_text(tempest_conf(auth_url, images, work))
    regex = "^(" + "|".join(re.escape(c) + r"\." for c in TEMPEST_CLASSES) + ")"
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(tempest), "run", "--regex", regex, "--concurrency", "2", "--subunit"],
        cwd=work,
        capture_output=True,
        timeout=opts.tempest_timeout,
    )
    report.info["tempest_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "results.subunit").write_bytes(done.stdout)
    (work / "run.stderr").write_bytes(done.stderr)
    parsed = subprocess.run(
        [str(cache / "bin" / "subunit2csv"), "--no-passthrough"],
        input=done.stdout,
        capture_output=True,
    )
    if parsed.returncode != 0 and not parsed.stdout:
        tail = done.stderr.decode(errors="replace")[-600:]
        raise RuntimeError(f"tempest run gave no results (exit {done.returncode}): {tail}")
    rows = parsed.stdout.decode()
    per_class: dict[str, dict[str, Any]] = {
        c: {"passed": 0, "failed": 0, "skipped": 0, "failures": []} for c in TEMPEST_CLASSES
    }
    for row in csv.DictReader(io.StringIO(rows)):
        test, status = row["test"], row["status"]
        name = re.sub(r"\[.*\]$", "", test)
        m = re.match(r"^setUpClass \((.+)\)$", name)
        cls = m.group(1) if m else name.rsplit(".", 1)[0]
        if cls not in per_class:
            continue
        entry = per_class[cls]
        key = {"success": "passed", "skip": "skipped"}.get(status, "failed")
        entry[key] += 1
        if key == "failed":
            entry["failures"].append(name.rsplit(".", 1)[-1] if not m else "setUpClass")
    report.info["tempest"] = per_class
    totals = {k: sum(v[k] for v in per_class.values()) for k in ("passed", "failed", "skipped")}
    report.info["tempest_totals"] = totals


async def _tempest_world(url: str) -> tuple[str, str]:
    """Tempest's projects, users, flavors, images and external network."""
    admin = await _admin(url)
    cmds: list[tuple[str, dict[str, Any]]] = [
        ("flavor.create", {"name": "m1-small", "vcpus": 1, "ram_mb": 128, "disk_gb": 1}),
        (
            "network.create-external",
            {"name": "public", "external": True, "cidr": "198.51.100.0/24"},
        ),
    ]
    for project in sorted({p for _, p, _ in ACCOUNTS}):
        # Default quotas: Tempest compares a project's with the defaults.
        cmds.append(("tenant.create", {"name": project}))
    for user, project, role in ACCOUNTS:
        cmds += [
            ("user.create", {"name": user, "password": USER_PASSWORD}),
            ("role.assign", {"user": user, "tenant": project, "role": role}),
        ]
    cmds += [
        ("image.create-public", {"name": "tempest-img", "format": "raw", "public": True}),
        ("image.create-public", {"name": "tempest-img-alt", "format": "raw", "public": True}),
    ]
    for verb, body in cmds:
        await admin.command(verb, body)
    await admin.close()
    return ("tempest-img", "tempest-img-alt")


# -- output --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m stratus.ops.bench openstack", description=__doc__)
    p.add_argument("--servers", type=positive, default=d.servers, help="servers listed")
    p.add_argument("--creates", type=positive, default=d.creates, help="creates per path")
    p.add_argument("--clients", type=positive, default=d.clients)
    p.add_argument("--list-runs", type=positive, default=d.list_runs)
    p.add_argument("--no-tempest", action="store_true", help="skip the Tempest run")
    p.add_argument("--cache-dir", default="", help=f"Tempest's venv (default {default_cache()})")
    p.add_argument("--keep", action="store_true", help="keep the run's directory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return p.parse_args(argv)


def print_tempest(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tempest 47 against the OpenStack API (pre-provisioned accounts)")
    for col in ("class", "passed", "failed", "skipped", "failed tests"):
        table.add_column(col, justify="right" if col in ("passed", "failed", "skipped") else "left")
    for cls, e in info["tempest"].items():
        table.add_row(
            cls.replace("tempest.api.", ""),
            str(e["passed"]),
            str(e["failed"]),
            str(e["skipped"]),
            ", ".join(e["failures"]),
        )
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(
        servers=args.servers,
        creates=args.creates,
        clients=args.clients,
        list_runs=args.list_runs,
        tempest=not args.no_tempest,
        cache_dir=args.cache_dir,
        keep=args.keep,
    )
    start = time.perf_counter()
    report = run(opts)
    report.info["wall_seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        caption = (
            f"stratus up (1 simulated host) and stratus serve openstack-api as separate "
            f"processes; {report.info.get('cpus')} CPUs; wall {report.info['wall_seconds']} s"
        )
        print_table("Stratus OpenStack API benchmark", report.results, caption)
        if "tempest" in report.info:
            print_tempest(report.info)
            print(f"tempest totals: {report.info['tempest_totals']}")
        for f in report.failures:
            print(f"FAILED: {f}", file=sys.stderr)
    if report.failures:
        return 1
    if args.strict and any(r.met is False for r in report.results):
        return 2
    return 0


__all__ = ["Options", "asdict", "main", "percentile", "run"]
