"""A host's addresses on a routed network (``agents.network.ipam``), as a
pure function of the log: blocks claimed when needed and ahead of need,
empty blocks given back, and the appends in the order they are made."""

from __future__ import annotations

from stratus.agents.network import ipam
from stratus.agents.network.desired import Topology
from stratus.events import network as nw
from stratus.events import resources as rs
from stratus.events.model import Cause

C = Cause(actor="t", correlation_id="c", causation_id="c")
NET = "pods"


class Log:
    """A topology and the sequence numbers its events get."""

    def __init__(self) -> None:
        self.t = Topology()
        self.seq = 0
        self.apply(
            C.make(
                rs.NetworkCreated,
                "_system",
                "network",
                NET,
                name=NET,
                cidr="10.244.0.0/16",
                mode=nw.ROUTED,
                block_prefix=26,
            )
        )

    def apply(self, *events) -> None:
        for ev in events:
            self.seq += 1
            self.t.apply(self.seq, ev)

    def place(self, n: int, host: str, first: int = 0) -> list[str]:
        """``n`` containers with a port on the routed network, on ``host``."""
        ports = []
        for i in range(first, first + n):
            sid, pid = f"s{i}", f"p{i}"
            spec = rs.ServerSpec(name=sid, image="i", vcpus=1, ram_mb=64, instance_type="container")
            self.apply(
                C.make(rs.ServerRequested, "acme", "server", sid, spec=spec),
                C.make(
                    rs.PortCreated,
                    "acme",
                    "port",
                    pid,
                    name=pid,
                    network=NET,
                    subnet="",
                    mac=f"fa:16:3e:00:{i // 256:02x}:{i % 256:02x}",
                    ip="",
                    device=sid,
                    device_owner="compute",
                    security_groups=[],
                ),
                C.make(rs.ServerScheduled, "acme", "server", sid, host=host),
            )
            ports.append(pid)
        return ports

    def delete(self, ports: list[str]) -> None:
        for pid in ports:
            self.apply(C.make(rs.PortDeleted, "acme", "port", pid))

    def store(self, host: str) -> list[list[tuple[str, object]]]:
        """``host``'s work appended as the agent appends it (step by step,
        each step's events folded before the next is asked for); what each
        step held: (event type, block), and each append's condition is the
        subject's last sequence number when it was made."""
        w = ipam.work(self.t, host)
        out = []
        for step in ipam.steps(self.t, host, w, "t"):
            held = []
            for a in step:
                (cond,) = a.conditions
                last = self._last(cond.subject)
                assert cond.last_seq == last, (cond, last)  # (it would not be refused)
                self.apply(*a.events)
                held += [(ev.type_name(), getattr(ev, "block", None)) for ev in a.events]
            out.append(held)
        return out

    def _last(self, subject: str) -> int:
        if subject.endswith(f".network.{NET}"):
            return self.t.routed[NET].seq
        return self.t.block_seq.get(subject, 0)

    def blocks(self, host: str) -> list[str]:
        return sorted(b for b, (_, h) in self.t.blocks.items() if h == host)


def test_a_block_running_low_gets_the_next_one_claimed_after_the_addresses():
    """The first port claims a block first (it needs it); a host whose block
    runs below the reserve (a quarter block) claims the next one after
    handing out its addresses, so its ports never wait on a claim that
    other hosts may win first."""
    log = Log()
    assert ipam.reserve(log.t, NET) == 16
    log.place(1, "h1")
    steps = log.store("h1")
    assert [[k for k, _ in s] for s in steps] == [["ipam.block-claimed"], ["ipam.addresses"]]
    assert log.blocks("h1") == ["10.244.0.0/26"]
    # 63 usable in the first block (the network's own first address is
    # not): 46 more leaves 16 free, not below the reserve
    log.place(46, "h1", first=1)
    assert [[k for k, _ in s] for s in log.store("h1")] == [["ipam.addresses"]]
    assert log.blocks("h1") == ["10.244.0.0/26"]
    # one more: 15 free, so the next block is claimed, after the addresses
    log.place(1, "h1", first=47)
    steps = log.store("h1")
    assert steps == [
        [("ipam.addresses", "10.244.0.0/26")],
        [("ipam.block-claimed", "10.244.0.64/26")],
    ]
    assert log.blocks("h1") == ["10.244.0.0/26", "10.244.0.64/26"]
    # and nothing more to do: the new block is kept (the first runs low)
    assert not ipam.work(log.t, "h1")


def test_a_claim_ahead_refused_leaves_the_addresses_stored_and_is_made_again():
    """Another host claims first: the claim ahead is refused by its
    condition (what the work was decided on), the addresses before it are
    stored; the next work, from the log with the other host's claim,
    claims another block ahead."""
    log = Log()
    log.place(47, "h1")
    log.store("h1")
    log.place(1, "h1", first=47)
    w = ipam.work(log.t, "h1")
    assert w.ahead == [(NET, "10.244.0.64/26")] and len(w.assigns) == 1 and not w.claims
    addresses, (ahead,) = ipam.steps(log.t, "h1", w, "t")
    for a in addresses:
        log.apply(*a.events)
    # h2 claims the block h1 would claim ahead, before h1's last step
    log.apply(C.make(nw.BlockClaimed, "_system", "network", NET, block="10.244.0.64/26", host="h2"))
    (cond,) = ahead.conditions
    assert cond.last_seq < log.t.routed[NET].seq  # (refused: the network moved on)
    again = ipam.work(log.t, "h1")
    assert not again.assigns and not again.claims
    assert again.ahead == [(NET, "10.244.0.128/26")]


def test_a_burst_beyond_a_block_claims_ahead_in_the_next_work():
    """A claim needed and one ahead in one work: the one ahead waits for the
    next work (its condition would be the network's before the first)."""
    log = Log()
    log.place(48, "h1")
    w = ipam.work(log.t, "h1")
    assert w.claims == [(NET, "10.244.0.0/26")] and w.ahead == [(NET, "10.244.0.64/26")]
    assert [[k for k, _ in s] for s in log.store("h1")] == [
        ["ipam.block-claimed"],
        ["ipam.addresses"],
    ]
    assert log.store("h1") == [[("ipam.block-claimed", "10.244.0.64/26")]]
    assert log.blocks("h1") == ["10.244.0.0/26", "10.244.0.64/26"]


def test_empty_blocks_go_back_but_one_while_the_rest_run_low():
    """A block emptied goes back once the host's other blocks have twice
    the reserve free; while they run lower one empty block is kept (the
    next ports'); when the host has nothing left on the network, every
    block goes back."""
    log = Log()
    ports = log.place(48, "h1")
    log.store("h1")
    log.store("h1")  # (the block ahead)
    assert log.blocks("h1") == ["10.244.0.0/26", "10.244.0.64/26"]
    # 15 free in the first: the empty second is kept
    assert not ipam.work(log.t, "h1")
    # 17 more free (32 in all, twice the reserve): it goes back
    log.delete(ports[:17])
    steps = log.store("h1")
    assert steps[-1] == [("ipam.block-released", "10.244.0.64/26")], steps
    assert log.blocks("h1") == ["10.244.0.0/26"]
    # every port gone: the last block goes back too
    log.delete(ports[17:])
    steps = log.store("h1")
    assert steps[-1] == [("ipam.block-released", "10.244.0.0/26")], steps
    assert log.blocks("h1") == []
