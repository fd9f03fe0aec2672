"""Where a ``stratus up`` keeps its state, and the names of what is in it.

Kept apart from ``cli.runtime`` (which imports every service) so that a
read command finds its URL without loading the control plane.
"""

from __future__ import annotations

import os
from pathlib import Path

# The NATS URL of the running `stratus up`, for the CLI to find.
URL_FILE = "url"
# The auth URL of the OpenStack API that `stratus up` runs (for `status`).
OPENSTACK_API_FILE = "openstack-api"
NATS_SERVICE_USER = "stratus"
NATS_SERVICE_SECRET = "nats-service-password"


def default_data_dir() -> Path:
    env = os.environ.get("STRATUS_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stratus"
