"""The kinds of the inventory, apart from their schemas.

A read command needs only a kind's plural (its query ``q.<plural>``); it
should not have to load every event and command Struct to find it.
"""

from __future__ import annotations

# Every kind of the inventory and the name its list query (``q.<plural>``)
# and its table (with ``_``) go by.
PLURALS: dict[str, str] = {
    "host": "hosts",
    "flavor": "flavors",
    "image": "images",
    "server": "servers",
    "server-group": "server-groups",
    "volume": "volumes",
    "network": "networks",
    "subnet": "subnets",
    "port": "ports",
    "router": "routers",
    "floating-ip": "floating-ips",
    "security-group": "security-groups",
    "qos-policy": "qos-policies",
    # Defined in events/integrations.py; listed here so they get views too.
    "integration": "integrations",
    "webhook": "webhooks",
    # Defined in events/frameworks.py (two-level scheduling).
    "framework": "frameworks",
    "offer": "offers",
}
