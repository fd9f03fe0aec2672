"""The console's pure parts: the topology layout, the timeline entries, the
session helpers and the templates' own rules (no inline script or style,
nothing marked safe)."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import pytest

from stratus.console import session, timeline, topology
from stratus.console.live import touched_servers
from stratus.console.server import parse_listen
from stratus.events.errors import Invalid

TEMPLATES = Path(topology.__file__).parent / "templates"


def _world(servers: int, networks: int = 5, routers: int = 2, fips: int = 10):
    nets = [{"id": f"n{i}", "name": f"net-{i}", "external": False} for i in range(networks)]
    nets.append({"id": "pub", "name": "public", "external": True, "cidr": "203.0.113.0/24"})
    subnets = [
        {"id": f"s{i}-{j}", "name": f"sub-{i}-{j}", "network": f"n{i}", "cidr": f"10.{i}.{j}.0/24"}
        for i in range(networks)
        for j in range(1 + i % 3)
    ]
    rts = [
        {
            "id": f"r{k}",
            "name": f"edge-{k}",
            "external_network": "pub",
            "external_ip": f"203.0.113.{k + 2}",
            # Each router serves every other network.
            "interfaces": [{"subnet": f"s{i}-0"} for i in range(k, networks, routers)],
        }
        for k in range(routers)
    ]
    srv = [
        {"id": f"v{i:03d}", "name": f"web-{i}", "status": ("running", "error")[i % 7 == 0]}
        for i in range(servers)
    ]
    # Every server on one network, every fifth on a second one too.
    ports = [
        {"device": f"v{i:03d}", "network": f"n{i % networks}", "ip": "10.0.0.9"}
        for i in range(servers)
    ]
    ports += [
        {"device": f"v{i:03d}", "network": f"n{(i + 1) % networks}", "ip": "10.0.1.9"}
        for i in range(0, servers, 5)
    ]
    fl = [
        {
            "id": f"f{i}",
            "address": f"203.0.113.{50 + i}",
            "network": "pub",
            "server": f"v{i * 3:03d}",
        }
        for i in range(fips)
    ]
    fl.append({"id": "f-free", "address": "203.0.113.99", "network": "pub", "server": ""})
    return nets, subnets, rts, ports, srv, fl


def _overlap(a: topology.Node, b: topology.Node) -> bool:
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h


@pytest.mark.parametrize("servers", [0, 1, 12, 50])
def test_topology_boxes_never_overlap_and_stay_on_the_canvas(servers):
    drawn = topology.layout(*_world(servers))
    kinds = [n.kind for n in drawn.nodes]
    assert kinds.count("server") == servers
    assert kinds.count("network") == 5 and kinds.count("router") == 2
    assert kinds.count("external") == 1  # the one the routers and floating IPs use
    assert kinds.count("floating-ip") == 11
    for a, b in combinations(drawn.nodes, 2):
        assert not _overlap(a, b), (a, b)
    for n in drawn.nodes:
        assert 0 <= n.x and n.x + n.w <= drawn.width
        assert topology.TOP <= n.y and n.bottom <= drawn.height
        # Readable at any count: boxes keep their size, labels their length.
        assert n.h >= topology.NODE_H and len(n.label) <= topology.LABEL_CHARS


def test_topology_edges_join_what_the_views_join():
    drawn = topology.layout(*_world(50))
    pairs = {(e.source, e.target) for e in drawn.edges}
    assert ("n0", "v000") in pairs and ("n1", "v000") in pairs  # two NICs
    assert ("n1", "v001") in pairs and ("n0", "v001") not in pairs
    assert ("pub", "r0") in pairs and ("r0", "n0") in pairs and ("r1", "n1") in pairs
    assert ("v003", "f1") in pairs  # a floating IP beside its server
    assert not any(t == "f-free" for _, t in pairs)
    # Servers sit grouped by their first network, so edges mostly run flat.
    order = [n.id for n in sorted(drawn.nodes, key=lambda n: n.y) if n.kind == "server"]
    firsts = [int(sid[1:]) % 5 for sid in order]
    assert firsts == sorted(firsts)
    # Each network is centred among its servers, within the drawing.
    net0 = drawn.node("network", "n0")
    mine = [n for n in drawn.nodes if n.kind == "server" and int(n.id[1:]) % 5 == 0]
    assert min(n.y for n in mine) <= net0.cy <= max(n.bottom for n in mine)


def test_topology_of_nothing_is_empty():
    drawn = topology.layout([], [], [], [], [], [])
    assert drawn.nodes == [] and drawn.edges == []


def _row(seq, type_, *, id_, cause="", agg=("server", "s1"), data=None, result="ok"):
    return {
        "seq": seq,
        "id": id_,
        "type": type_,
        "actor": "alice",
        "at": "2026-01-02T03:04:05Z",
        "aggregate": {"kind": agg[0], "id": agg[1]},
        "correlation_id": "cmd-1",
        "causation_id": cause or "cmd-1",
        "result": result,
        "data": data or {},
    }


def test_timeline_carries_the_schedulers_reasons_and_the_failures():
    sched = {
        "hosts": 5,
        "passed": 2,
        "removed": {"insufficient vCPU": 1, "label tier=gold not matched": 2},
        "top": [{"host": "h2", "weight": 0.75}, {"host": "h4", "weight": 0.5}],
        "attempt": 2,
    }
    rows = [
        _row(10, "server.requested", id_="e1"),
        _row(
            11,
            "host.claimed",
            id_="e2",
            cause="e1",
            agg=("host", "h2"),
            data={"vcpus": 2, "ram_mb": 512, "server": "s1"},
        ),
        _row(
            12, "server.scheduled", id_="e3", cause="e1", data={"host": "h2", "scheduling": sched}
        ),
        _row(
            13,
            "server.build-failed",
            id_="e4",
            cause="e2",
            data={"host": "h2", "reason": "no disk", "attempt": 1},
        ),
        _row(14, "server.running", id_="e5", cause="e2", data={"host": "h4"}),
        # Caused by an event the caller may not read (a claim on a host).
        _row(15, "server.stopped", id_="e6", cause="hidden-claim-0123"),
    ]
    out = timeline.entries(rows, "s1")
    by = {e.type: e for e in out}
    s = by["server.scheduled"]
    assert (s.hosts, s.passed) == (5, 2)
    assert s.removed == [("label tier=gold not matched", 2), ("insufficient vCPU", 1)]
    assert s.top == [("h2", 0.75), ("h4", 0.5)] and s.attempt == 2
    assert s.reason.startswith("on h2: 2/5 hosts passed")
    assert s.caused_by == "server.requested (#10)" and s.depth == 1
    failed = by["server.build-failed"]
    assert failed.css == "failed" and failed.reason == "no disk" and failed.depth == 2
    assert by["server.running"].css == "ok"
    assert not by["host.claimed"].own and by["server.requested"].own
    assert by["server.requested"].caused_by == "" and by["server.requested"].depth == 0
    hidden = by["server.stopped"]
    assert hidden.caused_by == "event …n-claim-0123, outside what you may read"
    assert hidden.depth == 1


def test_touched_servers_are_the_tenants_own():
    events = [
        {"tenant": "acme", "aggregate": {"kind": "server", "id": "s1"}, "data": {}},
        {"tenant": "acme", "aggregate": {"kind": "port", "id": "p1"}, "data": {"device": "s2"}},
        {
            "tenant": "acme",
            "aggregate": {"kind": "floating-ip", "id": "f1"},
            "data": {"server": "s3"},
        },
        {"tenant": "acme", "aggregate": {"kind": "network", "id": "n1"}, "data": {}},
        {"tenant": "globex", "aggregate": {"kind": "server", "id": "s9"}, "data": {}},
        {"tenant": "acme", "aggregate": {"kind": "server", "id": "s1"}, "data": {}},
        {"tenant": "acme", "aggregate": {"kind": "port", "id": "p2"}, "data": {"device": "a.b"}},
    ]
    assert touched_servers("acme", events) == ["s1", "s2", "s3"]


def test_csrf_tokens_bind_to_the_session_secret():
    a, b = session.csrf_token("token-a"), session.csrf_token("token-b")
    assert a == session.csrf_token("token-a") and a != b and len(a) == 64


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/t/acme/servers?at=5", "/t/acme/servers?at=5"),
        ("//evil.example/x", "/home"),
        ("/\\evil.example", "/home"),
        ("https://evil.example/", "/home"),
        ("/ok\r\nSet-Cookie: x=1", "/home"),
        ("", "/home"),
        (None, "/home"),
    ],
)
def test_after_login_only_paths_of_the_console(target, expected):
    assert session.safe_next(target, "/home") == expected


@pytest.mark.parametrize("at", ["12", "2026-01-02T03:04:05Z", "2026-01-02T03:04:05+00:00"])
def test_at_values_that_may_become_a_header(at):
    assert session.AT_RE.match(at)


@pytest.mark.parametrize("at", ["5\r\nAuthorization: Bearer x", "5\n", "a b", "x" * 41])
def test_at_values_that_may_not(at):
    assert not session.AT_RE.match(at)


def test_listen_addresses():
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8400") == ("::1", 8400)
    assert parse_listen("localhost:80") == ("localhost", 80)
    for bad in ("8400", "127.0.0.1:http", "evil.example:80", "127.0.0.1:70000"):
        with pytest.raises(Invalid):
            parse_listen(bad)


def test_templates_have_no_inline_script_style_or_unescaped_values():
    """What the Content-Security-Policy would refuse anyway, and the one
    way around autoescaping, appear in no template."""
    files = sorted(TEMPLATES.glob("*.html"))
    assert len(files) >= 10
    for f in files:
        text = f.read_text()
        assert not re.search(r"\sstyle\s*=", text), f
        assert not re.search(r"\son[a-z]+\s*=", text), f
        assert not re.search(r"\|\s*safe\b|Markup\(|autoescape\s+false", text), f
        for m in re.finditer(r"<script\b([^>]*)>(.*?)</script>", text, re.S):
            assert 'src="/static/' in m.group(1) and not m.group(2).strip(), f
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f
