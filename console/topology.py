"""The tenant's network drawn as a layered graph, laid out on the server.

Columns from left to right: external networks, routers, the tenant's
networks (their subnets listed inside), servers, floating IPs. Servers are
ordered by the first network they sit on, each network is centred on its
servers, each router on its networks and each external network on its
routers (barycentres), then every column is swept top-down so no two boxes
overlap. Nodes keep a fixed size whatever the count, so the drawing grows
taller rather than smaller: 50 servers are 50 readable rows.

Pure: rows of the views in, boxes and edges out (``layout``); the template
draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Column x positions and box widths (SVG user units = CSS pixels).
MARGIN = 16
COLUMNS = {"external": 16, "router": 236, "network": 446, "server": 706, "floating-ip": 956}
WIDTHS = {"external": 180, "router": 170, "network": 210, "server": 210, "floating-ip": 140}
WIDTH = COLUMNS["floating-ip"] + WIDTHS["floating-ip"] + MARGIN
NODE_H = 38
SUBNET_LINE_H = 15
MAX_SUBNET_LINES = 4
GAP = 10
TOP = 40  # below the column headings
LABEL_CHARS = 24


@dataclass
class Node:
    kind: str
    id: str
    label: str
    detail: str
    x: float
    y: float
    w: float
    h: float
    title: str = ""
    css: str = ""
    lines: list[str] = field(default_factory=list)  # a network's subnets

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def bottom(self) -> float:
        return self.y + self.h


@dataclass
class Edge:
    path: str
    css: str
    source: str
    target: str


@dataclass
class Layout:
    nodes: list[Node]
    edges: list[Edge]
    width: float
    height: float
    headings: list[tuple[float, str]]

    def node(self, kind: str, id_: str) -> Node | None:
        return next((n for n in self.nodes if n.kind == kind and n.id == id_), None)


def short(text: str, n: int = LABEL_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _sweep(nodes: list[Node], targets: dict[str, float]) -> None:
    """Place each node of a column at its target centre, in target order,
    pushing it down just enough to clear the one above."""
    nodes.sort(key=lambda n: targets.get(n.id, float("inf")))
    floor = TOP
    for n in nodes:
        want = targets.get(n.id)
        y = floor if want is None else max(floor, want - n.h / 2)
        n.y = y
        floor = y + n.h + GAP


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _curve(a: Node, b: Node) -> str:
    """A horizontal S-curve from ``a``'s right edge to ``b``'s left edge."""
    x1, y1 = a.x + a.w, a.cy
    x2, y2 = b.x, b.cy
    mx = (x1 + x2) / 2
    return f"M{x1:.0f},{y1:.0f} C{mx:.0f},{y1:.0f} {mx:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"


def layout(
    networks: list[dict[str, Any]],
    subnets: list[dict[str, Any]],
    routers: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    servers: list[dict[str, Any]],
    floating_ips: list[dict[str, Any]],
) -> Layout:
    """Boxes and edges for the rows of a tenant's views (``routers`` with
    their ``interfaces``, as ``router show`` gives them)."""
    net_by_ref = {n["id"]: n for n in networks} | {n.get("name", ""): n for n in networks}
    subnet_net = {s["id"]: s["network"] for s in subnets}

    # Which networks each server is on, in port order, with its addresses.
    server_nets: dict[str, list[str]] = {}
    server_ips: dict[str, list[str]] = {}
    for p in ports:
        dev = p.get("device") or ""
        if dev and p.get("network"):
            server_nets.setdefault(dev, [])
            if p["network"] not in server_nets[dev]:
                server_nets[dev].append(p["network"])
            server_ips.setdefault(dev, []).append(p.get("ip") or "")

    internal = [n for n in networks if not n.get("external")]
    order = {n["id"]: i for i, n in enumerate(internal)}
    nodes: list[Node] = []
    edges: list[tuple[Node, Node, str]] = []

    # Servers: grouped by their first network, named order within.
    def server_key(s: dict[str, Any]) -> tuple[int, str]:
        nets = [order[n] for n in server_nets.get(s["id"], []) if n in order]
        return (nets[0] if nets else len(order), s.get("name") or s["id"])

    server_nodes: dict[str, Node] = {}
    y = TOP
    for s in sorted(servers, key=server_key):
        status = s.get("status") or "unknown"
        ips = ", ".join(ip for ip in server_ips.get(s["id"], []) if ip)
        node = Node(
            "server",
            s["id"],
            short(s.get("name") or s["id"]),
            short(" · ".join(x for x in (status, ips) if x), 32),
            COLUMNS["server"],
            y,
            WIDTHS["server"],
            NODE_H,
            title=f"{s.get('name')} ({s['id']}): {status} {ips}".strip(),
            css=f"status-{status}",
        )
        server_nodes[s["id"]] = node
        nodes.append(node)
        y += NODE_H + GAP

    # Tenant networks, centred on their servers.
    net_nodes: dict[str, Node] = {}
    for n in internal:
        lines = [
            short(f"{s.get('name', '')} {s.get('cidr', '')}".strip(), 30)
            for s in subnets
            if s.get("network") == n["id"]
        ]
        if len(lines) > MAX_SUBNET_LINES:
            lines = [*lines[: MAX_SUBNET_LINES - 1], f"+{len(lines) - MAX_SUBNET_LINES + 1} more"]
        net_nodes[n["id"]] = Node(
            "network",
            n["id"],
            short(n.get("name") or n["id"]),
            f"VNI {n['vni']}" if n.get("vni") else "tenant network",
            COLUMNS["network"],
            0,
            WIDTHS["network"],
            NODE_H + SUBNET_LINE_H * len(lines),
            title=f"network {n.get('name')} ({n['id']})",
            css="network",
            lines=lines,
        )
    targets: dict[str, float] = {}
    for nid in net_nodes:
        centre = _mean(
            [
                server_nodes[sid].cy
                for sid, nets in server_nets.items()
                if nid in nets and sid in server_nodes
            ]
        )
        if centre is not None:
            targets[nid] = centre
    # Networks without servers keep their listing order, after the others.
    last = max(targets.values(), default=TOP)
    for i, nid in enumerate(n["id"] for n in internal):
        targets.setdefault(nid, last + 1 + i)
    _sweep(list(net_nodes.values()), targets)
    nodes.extend(net_nodes.values())
    for sid, nets in server_nets.items():
        for nid in nets:
            if nid in net_nodes and sid in server_nodes:
                edges.append((net_nodes[nid], server_nodes[sid], "link"))

    # Routers, centred on the networks their interfaces are on.
    router_nodes: dict[str, Node] = {}
    router_nets: dict[str, list[str]] = {}
    for r in routers:
        nets = []
        for itf in r.get("interfaces") or []:
            nid = subnet_net.get(itf.get("subnet", ""))
            if nid in net_nodes and nid not in nets:
                nets.append(nid)
        router_nets[r["id"]] = nets
        ext = net_by_ref.get(r.get("external_network") or "")
        router_nodes[r["id"]] = Node(
            "router",
            r["id"],
            short(r.get("name") or r["id"]),
            short(f"SNAT {r.get('external_ip')}", 30) if r.get("external_ip") else "router",
            COLUMNS["router"],
            0,
            WIDTHS["router"],
            NODE_H,
            title=f"router {r.get('name')} ({r['id']})"
            + (f", gateway on {ext.get('name')}" if ext else ""),
            css="router",
        )
    targets = {
        rid: c
        for rid, nets in router_nets.items()
        if (c := _mean([net_nodes[n].cy for n in nets])) is not None
    }
    _sweep(list(router_nodes.values()), targets)
    nodes.extend(router_nodes.values())
    for rid, nets in router_nets.items():
        for nid in nets:
            edges.append((router_nodes[rid], net_nodes[nid], "link"))

    # External networks: those this tenant's routers or floating IPs use.
    ext_nodes: dict[str, Node] = {}
    ext_routers: dict[str, list[str]] = {}
    for r in routers:
        ext = net_by_ref.get(r.get("external_network") or "")
        if ext is not None and ext.get("external"):
            ext_routers.setdefault(ext["id"], []).append(r["id"])
    for f in floating_ips:
        ext = net_by_ref.get(f.get("network") or "")
        if ext is not None and ext.get("external"):
            ext_routers.setdefault(ext["id"], [])
    for eid in ext_routers:
        n = net_by_ref[eid]
        ext_nodes[eid] = Node(
            "external",
            eid,
            short(n.get("name") or eid),
            short(f"external {n.get('cidr', '')}".strip(), 30),
            COLUMNS["external"],
            0,
            WIDTHS["external"],
            NODE_H,
            title=f"external network {n.get('name')} ({eid})",
            css="external",
        )
    targets = {
        eid: c
        for eid, rids in ext_routers.items()
        if (c := _mean([router_nodes[r].cy for r in rids])) is not None
    }
    _sweep(list(ext_nodes.values()), targets)
    nodes.extend(ext_nodes.values())
    for eid, rids in ext_routers.items():
        for rid in rids:
            edges.append((ext_nodes[eid], router_nodes[rid], "uplink"))

    # Floating IPs beside their servers; unassociated ones below.
    fip_nodes: list[Node] = []
    targets = {}
    for f in floating_ips:
        node = Node(
            "floating-ip",
            f["id"],
            f.get("address") or f["id"],
            f.get("status") or "",
            COLUMNS["floating-ip"],
            0,
            WIDTHS["floating-ip"],
            NODE_H,
            title=f"floating IP {f.get('address')}"
            + (f" -> {f.get('fixed_ip')}" if f.get("fixed_ip") else " (not associated)"),
            css="floating-ip",
        )
        fip_nodes.append(node)
        server = server_nodes.get(f.get("server") or "")
        if server is not None:
            targets[node.id] = server.cy
            edges.append((server, node, "nat"))
    _sweep(fip_nodes, targets)
    nodes.extend(fip_nodes)

    height = max((n.bottom for n in nodes), default=TOP) + MARGIN
    headings = [
        (COLUMNS["external"], "external"),
        (COLUMNS["router"], "routers"),
        (COLUMNS["network"], "networks"),
        (COLUMNS["server"], "servers"),
        (COLUMNS["floating-ip"], "floating IPs"),
    ]
    return Layout(
        nodes=nodes,
        edges=[Edge(_curve(a, b), css, a.id, b.id) for a, b, css in edges],
        width=WIDTH,
        height=height,
        headings=headings,
    )
