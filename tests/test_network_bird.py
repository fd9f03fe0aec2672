"""BIRD's configuration as the agent renders it: who peers with whom (a full
mesh, or route reflectors beyond ``mesh_max`` hosts), what is announced,
and that BIRD 2 itself accepts it (``bird -p``, parse only); nothing
unchecked reaches it."""

from __future__ import annotations

import subprocess

import pytest

from stratus.agents.network.bird import (
    BgpConfig,
    Peer,
    _reply,
    bgp_plan,
    bird_binary,
    host_of,
    protocol_name,
    render,
)
from stratus.events.errors import Invalid

VTEPS = {f"host-{i}": f"198.18.0.{i}" for i in range(1, 6)}


def parses(config: str, tmp_path) -> subprocess.CompletedProcess:
    conf = tmp_path / "bird.conf"
    conf.write_text(config)
    return subprocess.run(
        [bird_binary(), "-p", "-c", str(conf)], capture_output=True, text=True, timeout=10
    )


def test_up_to_mesh_max_hosts_every_host_peers_with_every_other(tmp_path):
    bp = bgp_plan("host-2", VTEPS, ["10.244.0.64/26"], BgpConfig(hold=3))
    assert bp.address == "198.18.0.2" and not bp.reflector
    assert [p.host for p in bp.peers] == ["host-1", "host-3", "host-4", "host-5"]
    text = render(bp, tmp_path / "bird.log")
    assert "route 10.244.0.64/26 blackhole;" in text
    assert "hold time 3;" in text and "keepalive time 1;" in text
    assert "neighbor 198.18.0.5 as 64512;" in text and "rr client" not in text
    assert 'export where proto = "blocks";' in text  # its own blocks only
    res = parses(text, tmp_path)
    assert res.returncode == 0, res.stderr


def test_beyond_mesh_max_hosts_peer_with_two_route_reflectors_only(tmp_path):
    cfg = BgpConfig(mesh_max=3)
    rr = bgp_plan("host-1", VTEPS, [], cfg)
    client = bgp_plan("host-4", VTEPS, ["10.244.0.192/26"], cfg)
    assert rr.reflector and not client.reflector
    # a reflector peers with everyone, the other reflector not as its client
    assert rr.peers == (
        Peer("host-2", "198.18.0.2", client=False),
        Peer("host-3", "198.18.0.3", client=True),
        Peer("host-4", "198.18.0.4", client=True),
        Peer("host-5", "198.18.0.5", client=True),
    )
    assert [p.host for p in client.peers] == ["host-1", "host-2"]
    rr_text = render(rr, tmp_path / "bird.log")
    assert rr_text.count("rr client;") == 3 and "source = RTS_BGP" in rr_text
    assert parses(rr_text, tmp_path).returncode == 0
    assert parses(render(client, tmp_path / "bird.log"), tmp_path).returncode == 0
    one = bgp_plan("host-3", VTEPS, [], BgpConfig(mesh_max=3, reflectors=1))
    assert [p.host for p in one.peers] == ["host-1"]


def test_nothing_unchecked_reaches_the_configuration(tmp_path):
    bad = dict(VTEPS, **{"host-6": "198.18.0.6; protocol evil {}"})
    with pytest.raises(Invalid):
        render(bgp_plan("host-1", bad, [], BgpConfig()), tmp_path / "bird.log")
    with pytest.raises(Invalid):
        render(bgp_plan("host-1", VTEPS, ["10.0.0.0/8 blackhole; }"], BgpConfig()), tmp_path)
    with pytest.raises(Invalid):
        render(bgp_plan("host-1", VTEPS, [], BgpConfig()), tmp_path / 'x";')
    with pytest.raises(Invalid):
        protocol_name("Host_1")
    for bad_cfg in ({"hold": 2}, {"asn": 0}, {"mesh_max": 1}, {"reflectors": 3}):
        with pytest.raises(Invalid):
            BgpConfig(**bad_cfg)
    # session names go both ways, and only ours are read back
    assert host_of(protocol_name("host-01")) == "host-01"
    assert host_of("device1") is None and host_of("kernel1") is None


def test_the_control_protocol_reply_ends_at_its_last_line():
    import io

    raw = (
        b"2002-Name       Proto      Table      State  Since         Info\n"
        b"1002-device1    Device     ---        up     21:44:11.931  \n"
        b" h_host_2   BGP        ---        up     21:44:15.810  Established   \n"
        b"0000 \n"
        b"never read\n"
    )
    reply = _reply(io.BytesIO(raw))
    assert [code for code, _ in reply] == ["2002", "1002", "1002", "0000"]
    assert reply[2][1].split()[0] == "h_host_2"
