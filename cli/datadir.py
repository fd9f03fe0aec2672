"""Where a ``stratus up`` keeps its state, and the names of what is in it.

Kept apart from ``cli.runtime`` (which imports every service) so that a
read command finds its URL without loading the control plane.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The NATS URL of the running `stratus up`, for the CLI to find.
URL_FILE = "url"
# The broker's own nkeys (the auth callout's user, the system account's user,
# the key the callout signs users with): the broker's and the callout's alone.
BROKER_DIR = "broker"


def default_data_dir() -> Path:
    env = os.environ.get("STRATUS_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stratus"


def deployment_prefix(data_dir: Path) -> str:
    """The prefix of every host-level name (namespaces, links, cgroups) a
    stack makes, derived from its data dir: two stacks on one machine never
    touch each other's. Short, since it must fit in 15-byte link names."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()
    return "s" + digest[:3]
