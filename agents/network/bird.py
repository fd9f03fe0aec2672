"""BIRD 2 for a host of a routed network: its configuration, rendered from a
``BgpPlan``, and the daemon, run in the host's namespace with its own files.

Each host announces the blocks it holds over iBGP (one private AS for the
cloud) and installs what its peers announce into its kernel table (``proto
bird``). Up to ``mesh_max`` hosts every host peers with every other (a full
mesh); beyond, every host peers with one or two route reflectors only (the
first hosts by name), which peer with everyone and reflect.

Nothing reaches the configuration unchecked: addresses and prefixes go
through ``ipaddress``, protocol names are made from host names that match
``NAME_RE`` (``-`` becomes ``_``), numbers are ints. BIRD is started with an
argument list (no shell), and spoken to over its control socket (BIRD's
line protocol: a 4-digit code, ``-`` on continued lines, a space on the last).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from stratus.agents.network.daemons import pid_of, terminate
from stratus.events.errors import Invalid
from stratus.events.ids import NAME_RE

RTPROT_BIRD = 12


@dataclass(frozen=True)
class BgpConfig:
    """How the hosts' BGP sessions are set up (the same on every host)."""

    asn: int = 64512
    hold: int = 9  # seconds; keepalives every third of it
    mesh_max: int = 50  # hosts in a full mesh; beyond, route reflectors
    reflectors: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.asn <= 4294967295:
            raise Invalid(f"BGP AS {self.asn} is not 1..4294967295")
        if not 3 <= self.hold <= 65535:
            raise Invalid(f"BGP hold time {self.hold} is not 3..65535 seconds")
        if self.mesh_max < 2 or self.reflectors not in (1, 2):
            raise Invalid("a full mesh needs at least 2 hosts; 1 or 2 route reflectors")


@dataclass(frozen=True)
class Peer:
    host: str
    address: str
    client: bool = False  # this host reflects the peer's routes (it is a reflector)


@dataclass(frozen=True)
class BgpPlan:
    """One host's BIRD: its address (router id and session source), the
    blocks it announces, and its peers."""

    host: str
    address: str
    blocks: tuple[str, ...]
    peers: tuple[Peer, ...]
    asn: int
    hold: int
    reflector: bool = False


def bgp_plan(host: str, vteps: dict[str, str], blocks: list[str], cfg: BgpConfig) -> BgpPlan:
    """Who ``host`` peers with: every other host (full mesh) up to
    ``cfg.mesh_max`` hosts, else the reflectors (the first hosts by name),
    which peer with everyone."""
    others = sorted(h for h in vteps if h != host)
    everyone = sorted(vteps)
    reflector = False
    if len(everyone) <= cfg.mesh_max:
        peers = [Peer(h, vteps[h]) for h in others]
    else:
        rrs = everyone[: cfg.reflectors]
        reflector = host in rrs
        if reflector:
            peers = [Peer(h, vteps[h], client=h not in rrs) for h in others]
        else:
            peers = [Peer(h, vteps[h]) for h in rrs]
    return BgpPlan(
        host,
        vteps[host],
        tuple(sorted((_prefix(b) for b in blocks), key=ipaddress.IPv4Network)),
        tuple(peers),
        cfg.asn,
        cfg.hold,
        reflector,
    )


def protocol_name(host: str) -> str:
    """BIRD's name for the session to ``host`` (a symbol: ``[A-Za-z_][A-Za-z0-9_]*``)."""
    if not NAME_RE.match(host):
        raise Invalid(f"host name {host!r} cannot name a BGP session")
    return "h_" + host.replace("-", "_")


def host_of(protocol: str) -> str | None:
    """The host a session protocol (``protocol_name``) is to; None if not one of ours."""
    if not protocol.startswith("h_"):
        return None
    host = protocol[2:].replace("_", "-")
    return host if NAME_RE.match(host) else None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise Invalid(f"{value!r} is not an IPv4 address") from None


def _prefix(value: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value))
    except ValueError:
        raise Invalid(f"{value!r} is not an IPv4 prefix") from None


def render(bp: BgpPlan, log_file: Path) -> str:
    """The host's ``bird.conf``."""
    me = _ip(bp.address)
    keepalive = max(1, bp.hold // 3)
    lines = [
        "# the Stratus network agent's: rewritten from the log on every change",
        f"router id {me};",
        f'log "{_path(log_file)}" {{ warning, error, fatal, bug }};',
        "protocol device { scan time 10; }",
        "",
        "# this host's blocks, announced to the peers; not installed here (the",
        "# instances' /32 routes are the agent's)",
        "protocol static blocks {",
        "  ipv4;",
        *(f"  route {_prefix(b)} blackhole;" for b in bp.blocks),
        "}",
        "",
        "# what the peers announce goes into the kernel table as proto bird",
        "protocol kernel {",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "  merge paths on;",
        "}",
        "",
        "template bgp peer {",
        f"  local {me} as {int(bp.asn)};",
        "  direct;",
        f"  hold time {int(bp.hold)};",
        f"  keepalive time {keepalive};",
        "  connect retry time 1;",
        "  error wait time 1, 5;",
        "  ipv4 {",
        "    import all;",
        # A reflector passes on what it learned; others only their own blocks.
        '    export where proto = "blocks"' + (" || source = RTS_BGP;" if bp.reflector else ";"),
        "    next hop self;" if not bp.reflector else "    next hop keep;",
        "  };",
        "}",
    ]
    for p in bp.peers:
        lines.append(f"protocol bgp {protocol_name(p.host)} from peer {{")
        lines.append(f"  neighbor {_ip(p.address)} as {int(bp.asn)};")
        if p.client:
            lines.append("  rr client;")
        lines.append("}")
    return "\n".join([*lines, ""])


def _path(p: Path) -> str:
    text = str(p)
    if not text.startswith("/") or any(c in text for c in '"\\\n'):
        raise Invalid(f"path {text!r} cannot go into a BIRD configuration")
    return text


# -- the daemon ------------------------------------------------------------------------


class BirdError(RuntimeError):
    """BIRD refused a command or could not be reached."""


def bird_binary() -> str:
    found = shutil.which("bird") or ("/usr/sbin/bird" if Path("/usr/sbin/bird").exists() else "")
    if not found:
        raise BirdError("BIRD 2 is not installed (Debian: bird2): no routed networks")
    return found


class Bird:
    """One host's BIRD: configuration, control socket, pid file and log in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory).absolute()
        self.conf = self.dir / "bird.conf"
        self.socket = self.dir / "bird.ctl"
        self.pidfile = self.dir / "bird.pid"
        self.log = self.dir / "bird.log"

    def pid(self) -> int:
        """The pid of our BIRD (0: none running): ours names its own configuration."""
        return pid_of(self.pidfile, str(self.conf))

    def running_config(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.conf.read_text()
        return ""

    def start(self, config: str, run_in_ns) -> None:
        """Write ``config`` and start BIRD through ``run_in_ns(argv, cwd)``
        (in the host's namespace). BIRD checks its configuration and forks
        off; its first process reports a bad start. Its control socket is
        named relative to its directory (a socket's path has 107 bytes at
        most, a data directory's may be longer)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write(config)
        conf, pid = str(self.conf), str(self.pidfile)
        argv = [bird_binary(), "-c", conf, "-s", self.socket.name, "-P", pid]
        res = run_in_ns(argv, self.dir)
        if res.returncode != 0:
            self.stop()
            raise BirdError(f"bird did not start: {res.stderr.strip()}")
        # The control socket is up once BIRD has forked; bounded wait.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, BirdError):
                self.command("show status")
                return
            time.sleep(0.01)
        raise BirdError(f"bird's control socket {self.socket} did not answer")

    def reconfigure(self, config: str) -> None:
        """Write ``config`` and have BIRD load it (sessions whose settings
        did not change stay up)."""
        self._write(config)
        reply = self.command("configure")
        if not any(code in ("0003", "0004", "0019") for code, _ in reply):
            raise BirdError(f"bird refused its configuration: {_text(reply)}")

    def _write(self, config: str) -> None:
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(config)
        tmp.replace(self.conf)

    def command(self, line: str, timeout: float = 5.0) -> list[tuple[str, str]]:
        """One command over the control socket: its reply as (code, text) lines."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            # (through a descriptor of the directory: a short path, however
            # long the directory's own)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                s.connect(f"/proc/self/fd/{fd}/{self.socket.name}")
            finally:
                os.close(fd)
            f = s.makefile("rwb")
            _reply(f)  # the greeting
            f.write(line.encode() + b"\n")
            f.flush()
            reply = _reply(f)
        for code, text in reply:
            if code[0] in "89":
                raise BirdError(f"bird: {line}: {text}")
        return reply

    def sessions(self) -> dict[str, bool]:
        """Our BGP sessions: peer host -> established."""
        out: dict[str, bool] = {}
        for _, text in self.command("show protocols"):
            cols = text.split()
            if len(cols) >= 4 and cols[1] == "BGP":
                host = host_of(cols[0])
                if host is not None:
                    out[host] = "Established" in cols[5:]
        return out

    def stop(self, timeout: float = 5.0) -> None:
        """End BIRD (bounded: SIGTERM, then SIGKILL) and remove its files."""
        terminate(self.pid(), timeout)
        for f in (self.conf, self.socket, self.pidfile, self.log, self.conf.with_suffix(".tmp")):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _reply(f) -> list[tuple[str, str]]:
    """Lines up to the last of one reply: ``CODE text`` ends it, ``CODE-``
    and `` `` (a continuation of the previous code) do not."""
    out: list[tuple[str, str]] = []
    code = ""
    for _ in range(100_000):
        raw = f.readline()
        if not raw:
            raise BirdError("bird closed its control socket mid-reply")
        line = raw.decode(errors="replace").rstrip("\n")
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            code = line[:4]
            out.append((code, line[5:]))
            if line[4] == " ":
                return out
        else:
            out.append((code, line[1:] if line.startswith(" ") else line))
    raise BirdError("bird's reply did not end")


def _text(reply: list[tuple[str, str]]) -> str:
    return "; ".join(t for _, t in reply if t)
