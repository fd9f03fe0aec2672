"""The agent's own netlink clients against pyroute2 (the library they stand
in for on the hot path): what ``rtnl`` makes, pyroute2 reads back, and what
pyroute2 makes, ``rtnl`` reads; ``ipset``'s sets as iptables matches them.
All in namespaces of the test's own, removed at the end."""

from __future__ import annotations

import os
import secrets

import pytest
from pyroute2 import IPRoute, netns

from stratus.agents.network.ipset import IpSets
from stratus.agents.network.kernel import in_netns, run_in, sysctl
from stratus.agents.network.rtnl import Rtnl, RtnlError, netns_fd


@pytest.fixture
def two_ns():
    tag = "r" + secrets.token_hex(3)
    a, b = f"{tag}-a", f"{tag}-b"
    netns.create(a)
    netns.create(b)
    try:
        yield a, b
    finally:
        netns.remove(a)
        netns.remove(b)


def _ipr(ns: str) -> IPRoute:
    with in_netns(ns):
        return IPRoute()


def test_links_addresses_routes_and_fdb_made_here_read_by_pyroute2_and_back(two_ns):
    a, b = two_ns
    nl = Rtnl.open(a)
    ipr = _ipr(a)
    try:
        nl.add_bridge("br0")
        nl.add_vxlan("vx0", 4242, "198.18.0.1", 4789)
        with netns_fd(b) as fd:
            nl.add_veth("v0", "eth0", fd, mac="ee:ee:ee:ee:ee:ee", peer_mac="fa:16:3e:00:00:01")
        br, vx, v0 = nl.index("br0"), nl.index("vx0"), nl.index("v0")
        nl.set(vx, master=br, up=True)
        nl.set(v0, up=True)
        nl.fdb_append(vx, "198.18.0.2")
        nl.fdb_append(vx, "198.18.0.3")
        nl.replace_route("10.244.0.5/32", oif=v0)
        # pyroute2 sees what we made
        links = {ln.get_attr("IFLA_IFNAME"): ln for ln in ipr.get_links()}
        assert links["vx0"].get_attr("IFLA_MASTER") == br
        info = links["vx0"].get_attr("IFLA_LINKINFO")
        assert info.get_attr("IFLA_INFO_KIND") == "vxlan"
        assert info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VXLAN_ID") == 4242
        assert links["v0"].get_attr("IFLA_ADDRESS") == "ee:ee:ee:ee:ee:ee"
        fdb = {
            e.get_attr("NDA_DST")
            for e in ipr.fdb("dump")
            if e["ifindex"] == vx and e.get_attr("NDA_LLADDR") == "00:00:00:00:00:00"
        }
        assert fdb == {"198.18.0.2", "198.18.0.3"}
        routes = ipr.get_routes(family=2, table=254)
        assert any(
            r.get_attr("RTA_DST") == "10.244.0.5" and r.get_attr("RTA_OIF") == v0 for r in routes
        )
        # and we read what we made as pyroute2 does
        ours = {ln.name: ln for ln in nl.links()}
        assert ours["vx0"].kind == "vxlan" and ours["vx0"].vni == 4242
        assert ours["vx0"].master == br and ours["vx0"].up
        assert ours["v0"].kind == "veth" and ours["v0"].netnsid >= 0  # its peer is elsewhere
        assert nl.fdb()[vx] == fdb
        nl.fdb_delete(vx, "198.18.0.3")
        assert nl.fdb()[vx] == {"198.18.0.2"}
        # the peer was made straight inside the other namespace, with its MAC
        inner = Rtnl.open(b)
        peer = inner.link("eth0")
        assert peer is not None and peer.mac == "fa:16:3e:00:00:01"
        inner.set(peer.index, up=True)
        inner.permanent_neighbour(peer.index, "169.254.1.1", "ee:ee:ee:ee:ee:ee")
        inner.replace_route("169.254.1.1/32", oif=peer.index)
        inner.add_addr(peer.index, "10.244.0.5", 32)
        inner.replace_route("0.0.0.0/0", gateway="169.254.1.1", oif=peer.index, onlink=True)
        with _ipr(b) as bipr:
            addrs = {(x.get_attr("IFA_ADDRESS"), x["prefixlen"]) for x in bipr.get_addr()}
            assert ("10.244.0.5", 32) in addrs
            neigh = [n for n in bipr.get_neighbours() if n.get_attr("NDA_DST") == "169.254.1.1"]
            assert neigh and neigh[0].get_attr("NDA_LLADDR") == "ee:ee:ee:ee:ee:ee"
            assert neigh[0]["state"] == 0x80  # permanent
            default = [r for r in bipr.get_routes(family=2, table=254) if r["dst_len"] == 0]
            assert default and default[0].get_attr("RTA_GATEWAY") == "169.254.1.1"
        assert (peer.index, "10.244.0.5", 32) in inner.addrs(peer.index)
        assert inner.neighbours(peer.index) == {"169.254.1.1": ("ee:ee:ee:ee:ee:ee", 0x80)}
        assert any(r.dst == "0.0.0.0/0" and r.gateway == "169.254.1.1" for r in inner.routes())
        inner.close()
        # made by pyroute2, read here: a qdisc's rate too
        ipr.link("add", ifname="d0", kind="bridge")
        d0 = ipr.link_lookup(ifname="d0")[0]
        ipr.tc("add", "tbf", index=d0, handle="1:", rate="8000kbit", burst=16384, latency="50ms")
        assert nl.link("d0").kind == "bridge"
        kind, rate = nl.root_qdiscs()[d0]
        assert kind == "tbf" and rate * 8 // 1000 == 8000
        # refusals are errors with their errno; a missing link is None
        with pytest.raises(RtnlError) as err:
            nl.add_bridge("br0")
        assert err.value.errno == 17
        assert nl.link("nope") is None
        nl.delete(v0)
        assert nl.link("v0") is None
    finally:
        nl.close()
        ipr.close()


def test_an_ipset_made_here_is_what_iptables_matches(two_ns):
    a, _ = two_ns
    sets = IpSets.open(a)
    try:
        sets.create("grp")
        sets.create("grp")  # (there already: fine)
        sets.add("grp", "10.0.0.2")
        sets.add("grp", "10.0.0.3")
        sets.add("grp", "10.0.0.3")  # (a member already: fine)
        assert sets.listing("grp") == {"grp": {"10.0.0.2", "10.0.0.3"}}
        sets.delete("grp", "10.0.0.2")
        sets.delete("grp", "10.0.0.9")  # (not a member: fine)
        assert sets.listing() == {"grp": {"10.0.0.3"}}
        rules = "*filter\n:chk - [0:0]\n-A chk -m set --match-set grp src -j ACCEPT\nCOMMIT\n"
        assert run_in(a, ["iptables-restore", "--noflush"], stdin=rules).returncode == 0
        saved = run_in(a, ["iptables-save", "-t", "filter"]).stdout
        assert "-A chk -m set --match-set grp src -j ACCEPT" in saved
        # matched by a rule, the set cannot go; unhooked, it can
        with pytest.raises(OSError):
            sets.destroy("grp")
        run_in(a, ["iptables-restore", "--noflush"], stdin="*filter\n-F chk\n-X chk\nCOMMIT\n")
        sets.destroy("grp")
        assert sets.listing() == {}
        # sysctls through /proc, from inside the namespace only
        assert sysctl(a, "net.ipv4.ip_forward", "1") == "1"
        assert sysctl(None, "net.ipv4.ip_forward") in ("0", "1")
        with pytest.raises(Exception, match="sysctl key"):
            sysctl(a, "net/ipv4/../../x")
    finally:
        sets.close()


def test_ipset_members_changed_in_one_exchange_as_the_kernel_lists_them(two_ns):
    """``IpSets.change``: adds and deletes over several sets written at once, as
    the kernel lists them after. A refused one (a set that is not
    there) raises, and the others are applied all the same."""
    a, _ = two_ns
    sets = IpSets.open(a)
    try:
        sets.create("g1")
        sets.create("g2")
        sets.change([("g1", f"10.0.0.{i}") for i in range(1, 41)] + [("g2", "10.1.0.1")], [])
        sets.change(
            [("g2", "10.1.0.2"), ("g1", "10.0.0.1")], [("g1", f"10.0.0.{i}") for i in (2, 3)]
        )
        want = {"10.0.0.1"} | {f"10.0.0.{i}" for i in range(4, 41)}
        assert sets.listing("g1") == {"g1": want}
        assert sets.listing("g2") == {"g2": {"10.1.0.1", "10.1.0.2"}}
        with pytest.raises(OSError):
            sets.change([("nope", "10.2.0.1"), ("g2", "10.1.0.3")], [])
        assert sets.listing("g2") == {"g2": {"10.1.0.1", "10.1.0.2", "10.1.0.3"}}
        sets.change([], [])  # (nothing: no exchange)
    finally:
        for name in ("g1", "g2"):
            sets.destroy(name)
        sets.close()


def test_l2pop_entries_made_in_one_batch_read_by_pyroute2_and_back(two_ns):
    """A bridge's entries for a remote port (its MAC behind the VXLAN port,
    its VTEP, its address) sent as one batch: a refused request in it is
    reported with its errno and does not stop the others."""
    from stratus.agents.network import rtnl

    a, _ = two_ns
    nl = Rtnl.open(a)
    ipr = _ipr(a)
    try:
        nl.add_bridge("br0", "02:00:00:00:00:01")
        nl.add_vxlan("vx0", 4242, "198.18.0.1", 4789)
        br, vx = nl.index("br0"), nl.index("vx0")
        nl.set(br, up=True)
        nl.set(vx, master=br, up=True)
        nl.neigh_suppress(vx)
        mac = "fa:16:3e:00:00:09"
        errors = nl.do_many(
            [
                rtnl.fdb_unicast(vx, mac, "198.18.0.7"),
                rtnl.fdb_static(vx, mac),
                rtnl.neighbour_add(9999, "10.0.0.8", mac),  # no such link
                rtnl.neighbour_add(br, "10.0.0.9", mac),
            ]
        )
        assert [e is None for e in errors] == [True, True, False, True]
        assert errors[2].errno == 19  # ENODEV
        # pyroute2 sees what we made
        link = {ln.get_attr("IFLA_IFNAME"): ln for ln in ipr.get_links()}
        assert link["br0"].get_attr("IFLA_ADDRESS") == "02:00:00:00:00:01"
        port = link["vx0"].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_SLAVE_DATA")
        assert port.get_attr("IFLA_BRPORT_NEIGH_SUPPRESS") == 1
        fdb = [e for e in ipr.fdb("dump") if e.get_attr("NDA_LLADDR") == mac]
        assert {(e.get_attr("NDA_DST"), e["state"]) for e in fdb} == {
            ("198.18.0.7", 0xC0),  # the VXLAN device's: permanent, no ARP
            (None, 0x40),  # the bridge's: static
        }
        neigh = [n for n in ipr.get_neighbours(ifindex=br) if n.get_attr("NDA_DST") == "10.0.0.9"]
        assert neigh and neigh[0].get_attr("NDA_LLADDR") == mac and neigh[0]["state"] == 0x80
        # and we read it as pyroute2 does
        table = nl.fdb_table()
        assert table.unicast[vx] == {mac: "198.18.0.7"} and table.static[vx] == {mac}
        assert nl.permanent_neighbours()[br] == {"10.0.0.9": mac}
        assert nl.link("vx0").suppress and not nl.link("br0").suppress
        # removed in a batch too; one already gone is an error of its own
        errors = nl.do_many(
            [
                rtnl.neighbour_delete(br, "10.0.0.9"),
                rtnl.fdb_static_delete(vx, mac),
                rtnl.fdb_unicast_delete(vx, mac),
                rtnl.fdb_unicast_delete(vx, mac),
            ]
        )
        assert [e is None for e in errors] == [True, True, True, False]
        table = nl.fdb_table()
        assert mac not in table.unicast.get(vx, {}) and mac not in table.static.get(vx, set())
        assert br not in nl.permanent_neighbours()
    finally:
        nl.close()
        ipr.close()


def test_an_instance_side_plugged_in_one_batch_by_name_read_by_pyroute2(two_ns):
    """A new veth's instance side as the agent plugs it in: loopback (by the
    kernel's fixed index) and the peer (by name: no lookup first) up in one
    batch, then its address and routes in another; a link named but absent
    is refused with ENODEV and does not stop the others."""
    from stratus.agents.network import rtnl

    a, b = two_ns
    nl, inner = Rtnl.open(a), Rtnl.open(b)
    ipr = _ipr(b)
    try:
        with netns_fd(b) as fd:
            nl.add_veth("v0", "eth0", fd, peer_mac="fa:16:3e:00:00:01")
        errors = inner.do_many(
            [
                rtnl.link_set(rtnl.LOOPBACK_INDEX, up=True),
                rtnl.link_set(name="no-such", up=True),
                rtnl.link_set(name="eth0", up=True),
            ]
        )
        assert [e is None for e in errors] == [True, False, True]
        assert errors[1].errno == 19  # ENODEV
        idx = inner.index("eth0")
        assert (
            inner.do_many(
                [
                    rtnl.neighbour_add(idx, "169.254.1.1", "ee:ee:ee:ee:ee:ee"),
                    rtnl.route_replace("169.254.1.1/32", oif=idx),
                    rtnl.addr_add(idx, "10.244.0.5", 32),
                    rtnl.route_replace("0.0.0.0/0", gateway="169.254.1.1", oif=idx, onlink=True),
                ]
            )
            == [None] * 4
        )
        # the same address again: EEXIST, what the agent takes as done
        (again,) = inner.do_many([rtnl.addr_add(idx, "10.244.0.5", 32)])
        assert again is not None and again.errno == 17
        links = {ln.get_attr("IFLA_IFNAME"): ln for ln in ipr.get_links()}
        assert links["lo"]["flags"] & 1 and links["eth0"]["flags"] & 1  # IFF_UP
        assert links["lo"]["index"] == rtnl.LOOPBACK_INDEX
        addrs = {(x.get_attr("IFA_ADDRESS"), x["prefixlen"]) for x in ipr.get_addr(index=idx)}
        assert ("10.244.0.5", 32) in addrs
        routes = {
            (r.get_attr("RTA_DST"), r.get_attr("RTA_GATEWAY"), r["dst_len"])
            for r in ipr.get_routes(oif=idx)
        }
        assert (None, "169.254.1.1", 0) in routes and ("169.254.1.1", None, 32) in routes
    finally:
        ipr.close()
        inner.close()
        nl.close()


def test_veths_made_and_looked_up_in_one_exchange_read_by_pyroute2(two_ns):
    """New veths as a pass makes them: every pair (peers straight into the
    instance's namespace) and a lookup of each host side in one exchange;
    the indexes returned are pyroute2's. A name taken already is refused
    (EEXIST) and raises; the rest of that batch is made all the same."""
    from stratus.agents.network import rtnl

    a, b = two_ns
    nl = Rtnl.open(a)
    ipr, inner = _ipr(a), _ipr(b)
    try:
        with netns_fd(b) as fd:
            reqs = [
                rtnl.veth_add(f"v{i}", f"eth{i}", fd, mac="ee:ee:ee:ee:ee:ee", peer_mac=mac)
                for i, mac in enumerate(["fa:16:3e:00:00:01", "fa:16:3e:00:00:02"])
            ]
            made = nl.create(reqs, ["v0", "v1"])
        host = {ln.get_attr("IFLA_IFNAME"): ln for ln in ipr.get_links()}
        assert {n: ln.index for n, ln in made.items()} == {
            "v0": host["v0"]["index"],
            "v1": host["v1"]["index"],
        }
        assert made["v0"].kind == "veth" and not made["v0"].up
        assert host["v1"].get_attr("IFLA_ADDRESS") == "ee:ee:ee:ee:ee:ee"
        peers = {ln.get_attr("IFLA_IFNAME"): ln for ln in inner.get_links()}
        # each host side names its peer's index in the other namespace
        assert made["v1"].peer == peers["eth1"]["index"]
        assert peers["eth1"].get_attr("IFLA_ADDRESS") == "fa:16:3e:00:00:02"
        assert "eth0" in peers and "v0" not in peers
        with netns_fd(b) as fd, pytest.raises(RtnlError) as err:
            nl.create(
                [rtnl.veth_add("v0", "eth9", fd), rtnl.veth_add("v2", "eth2", fd)], ["v0", "v2"]
            )
        assert err.value.errno == 17  # EEXIST
        assert nl.link("v2") is not None and nl.link("v0").index == made["v0"].index
        # looked up by name in one exchange: an absent one is None, not an error
        named = nl.links_named(["v1", "nope", "v0"])
        assert named["nope"] is None
        assert (named["v0"].index, named["v1"].index) == (made["v0"].index, made["v1"].index)
    finally:
        inner.close()
        ipr.close()
        nl.close()


def test_veths_made_with_the_instance_side_up_and_the_host_side_down(two_ns):
    """``veth_inside``: the instance's side made inside its namespace and up
    by the create itself, the host's side here and down; pyroute2 reads it
    so. No carrier on either until the host's side comes up, so nothing
    the instance sends passes before then; after, both are operationally up."""
    import time

    from stratus.agents.network import rtnl

    a, b = two_ns
    nl = Rtnl.open(a)
    ipr, inner = _ipr(a), _ipr(b)
    try:
        with netns_fd(b) as fd:
            made = nl.create(
                [rtnl.veth_inside("v0", "eth0", fd, "ee:ee:ee:ee:ee:ee", "fa:16:3e:00:00:01")],
                ["v0"],
            )
        (peer,) = [ln for ln in inner.get_links() if ln.get_attr("IFLA_IFNAME") == "eth0"]
        (host,) = [ln for ln in ipr.get_links() if ln.get_attr("IFLA_IFNAME") == "v0"]
        assert made["v0"].index == host["index"] and made["v0"].peer == peer["index"]
        assert peer["flags"] & 1 and not host["flags"] & 1  # IFF_UP: inside only
        assert peer.get_attr("IFLA_ADDRESS") == "fa:16:3e:00:00:01"
        assert host.get_attr("IFLA_ADDRESS") == "ee:ee:ee:ee:ee:ee"
        assert peer.get_attr("IFLA_CARRIER") == 0 and not made["v0"].oper_up
        # the instance's side looked up from here, by the id this namespace
        # has for the instance's (``Link.netnsid``); a name only there is
        # not found here
        assert made["v0"].netnsid >= 0
        inside = rtnl.link_get("eth0", made["v0"].netnsid)
        (found, nothing) = nl.lookup([inside, rtnl.link_get("eth0")])
        assert found is not None and nothing is None
        assert found.index == peer["index"] and found.up and not found.oper_up
        nl.do_many([rtnl.link_set(made["v0"].index, up=True)])
        both = [inside, rtnl.link_get("v0")]
        deadline = time.monotonic() + 5
        while not all(ln.oper_up for ln in nl.lookup(both)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(ln.oper_up for ln in nl.lookup(both))
        with Rtnl.open(b) as nb:
            assert nb.link("eth0").oper_up
        # a name taken inside is refused, and nothing is made here
        with netns_fd(b) as fd, pytest.raises(RtnlError) as err:
            nl.create([rtnl.veth_inside("v1", "eth0", fd)], ["v1"])
        assert err.value.errno == 17  # EEXIST
        assert nl.link("v1") is None
    finally:
        inner.close()
        ipr.close()
        nl.close()


def test_a_batch_reports_each_refusal_at_its_place_with_one_acknowledgement(two_ns):
    """``do_many``/``exchange`` ask only the last request of a write for an
    acknowledgement: a refused one before it is still reported, at its own
    place, and the ones after it are applied; a lookup's reply is kept; a
    refused last request is reported too. Every request is done when the
    call returns."""
    from stratus.agents.network import rtnl

    a, _ = two_ns
    nl = Rtnl.open(a)
    ipr = _ipr(a)
    try:
        nl.add_bridge("br0")
        br = nl.index("br0")
        answers = nl.exchange(
            [
                rtnl.neighbour_add(br, "10.9.0.1", "fa:16:3e:00:00:01"),
                rtnl.link_set(9999, up=True),  # no such link: refused
                rtnl.link_get("br0"),
                rtnl.link_get("nope"),  # refused (ENODEV)
                rtnl.neighbour_add(br, "10.9.0.2", "fa:16:3e:00:00:02"),
            ]
        )
        errs = [e.errno if e is not None else None for e, _ in answers]
        assert errs == [None, 19, None, 19, None]  # ENODEV
        assert len(answers[2][1]) == 1 and not answers[0][1]
        neigh = {n.get_attr("NDA_DST") for n in ipr.get_neighbours(ifindex=br)}
        assert {"10.9.0.1", "10.9.0.2"} <= neigh
        # a refused last request is the write's acknowledgement: reported
        errs = nl.do_many([rtnl.link_set(br, up=True), rtnl.link_set(9998, up=True)])
        assert errs[0] is None and errs[1] is not None and errs[1].errno == 19
        # and the socket is in step after: the next exchange gets its own answers
        assert nl.links_named(["br0"])["br0"].index == br
        # a write of more than one chunk: each chunk's last is acknowledged
        many = [rtnl.neighbour_add(br, f"10.9.1.{i}", "fa:16:3e:00:01:00") for i in range(1, 40)]
        assert nl.do_many(many, chunk=16) == [None] * 39
        assert (
            len(
                [
                    n
                    for n in ipr.get_neighbours(ifindex=br)
                    if n.get_attr("NDA_DST").startswith("10.9.1.")
                ]
            )
            == 39
        )
    finally:
        ipr.close()
        nl.close()


def test_a_namespace_being_made_is_not_ready_and_a_link_into_it_is_refused(two_ns):
    """``ip netns add`` creates the namespace's file first and binds the
    namespace onto it after: in between, ``netns_ready`` says no, and the
    kernel refuses a link made into it (what failed a whole pass when the
    agent took the file for the namespace)."""
    from stratus.agents.network import rtnl
    from stratus.agents.network.rtnl import netns_fd, netns_ready

    a, b = two_ns
    half = "r" + secrets.token_hex(3) + "-half"
    path = f"/run/netns/{half}"
    with open(path, "x"):
        pass  # (the file as it is before the bind mount)
    try:
        assert netns_ready(b) and not netns_ready(half) and not netns_ready(half + "x")
        with Rtnl.open(a) as nl, netns_fd(half) as fd, pytest.raises(RtnlError) as err:
            nl.create([rtnl.veth_inside("v0", "eth0", fd)], ["v0"])
        assert err.value.errno == 22  # EINVAL
    finally:
        os.unlink(path)
