"""The CLI's start-up: what ``stratus`` costs before it does anything.

Budgets are CPU seconds of a fresh Python process (CPU, not wall: other
work on the machine slows the clock, much less the CPU a process uses),
the best of a few runs (noise only ever adds). The issue's target: ``stratus
--help`` and a read command such as ``stratus server list`` start in at most
0.25 s of CPU before their first network call (about 0.2 s measured here;
1.2 s before the imports were made lazy). Which modules load is checked
too: that part does not depend on the machine at all.
"""

import json
import os
import resource
import subprocess
import sys

# CPU seconds.
# `import stratus.cli.main`: about 0.10-0.125 measured here once warm; a
# fresh clone's first imports (no bytecode yet) measured 0.151 in CI. The
# issue's own target (0.25 s to the first network call) is the next budget.
IMPORT_BUDGET = 0.2
FIRST_CALL_BUDGET = 0.25  # `stratus server list`, up to its first network call
HELP_BUDGET = 0.25  # `stratus --help`, the whole process
RUNS = 3

# Never loaded just to parse a command line; most of them not even to send
# one (see SENDING).
HEAVY = [
    "aiohttp",  # nats-py's websocket transport, 0.15 s alone
    "pydantic",
    "structlog",
    "sqlalchemy",
    "stratus.events.catalog",  # every event and command Struct
    "stratus.events.store",  # the JetStream log client
    "stratus.handlers",
    "stratus.projections",
    "stratus.cli.runtime",
]
NOT_AT_IMPORT = [*HEAVY, "nats", "rich", "yaml"]

_IMPORT = """
import json, sys, time
import stratus.cli.main
print(json.dumps({"cpu": time.process_time(),
                  "loaded": [m for m in NAMES if m in sys.modules]}))
"""

# Runs the CLI and stops it at its first network call (a name lookup or a
# connect: audit events), reporting the CPU used so far and what is loaded.
_UNTIL_FIRST_CALL = """
import json, os, sys, time
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        sys.__stdout__.write(json.dumps({"cpu": time.process_time(), "event": event,
                              "loaded": [m for m in NAMES if m in sys.modules]}) + "\\n")
        sys.__stdout__.flush()
        os._exit(0)
sys.addaudithook(hook)
sys.argv = ["stratus", *ARGV]
from stratus.cli.main import main
main()
"""


def _env() -> dict[str, str]:
    # Nothing from the user's environment steers the command elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATUS_")}
    env["XDG_CONFIG_HOME"] = "/nonexistent-stratus-config"
    env["STRATUS_DATA_DIR"] = "/nonexistent-stratus"
    return env


def _python(code: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _best(code: str) -> dict:
    runs = [_python(code) for _ in range(RUNS)]
    return min(runs, key=lambda r: r["cpu"])


def test_importing_the_cli_is_cheap_and_loads_nothing_heavy():
    got = _best(_IMPORT.replace("NAMES", repr(NOT_AT_IMPORT)))
    assert got["loaded"] == []
    assert got["cpu"] <= IMPORT_BUDGET, f"import stratus.cli.main took {got['cpu']:.3f} s CPU"


def test_a_read_command_reaches_the_network_within_budget():
    # Port 1 on loopback: nothing listens, so the first call is all there is.
    argv = ["--url", "nats://127.0.0.1:1", "server", "list"]
    code = _UNTIL_FIRST_CALL.replace("NAMES", repr(HEAVY)).replace("ARGV", repr(argv))
    got = _best(code)
    assert got["loaded"] == []
    assert got["cpu"] <= FIRST_CALL_BUDGET, f"server list: {got['cpu']:.3f} s CPU before {got}"


def test_help_is_answered_within_budget():
    cpu = []
    for _ in range(RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(
            [sys.executable, "-m", "stratus.cli.main", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert r.returncode == 0 and "server" in r.stdout, r.stderr
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    assert min(cpu) <= HELP_BUDGET, f"stratus --help took {min(cpu):.3f} s CPU"


def test_nats_is_imported_without_aiohttp_only_where_it_is_not_needed():
    # A nats:// URL: nats-py as where aiohttp is not installed, and aiohttp
    # still importable afterwards (the webhook service in the same process).
    got = _python(
        "import json, sys\n"
        "from stratus.cli.common import _import_nats\n"
        "_import_nats('nats://127.0.0.1:4222')\n"
        "import nats.aio.transport as t\n"
        "print(json.dumps({'during': t.aiohttp is None, 'after': 'aiohttp' in sys.modules,\n"
        "                  'importable': __import__('aiohttp').__name__}))\n"
    )
    assert got == {"during": True, "after": False, "importable": "aiohttp"}
    # A websocket URL needs aiohttp, and nats-py gets it.
    got = _python(
        "import json\n"
        "from stratus.cli.common import _import_nats\n"
        "_import_nats('nats://a:4222,wss://b:443')\n"
        "import nats.aio.transport as t\n"
        "print(json.dumps({'aiohttp': t.aiohttp is not None}))\n"
    )
    assert got == {"aiohttp": True}
