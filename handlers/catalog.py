"""Every command handler, in one list: what ``stratus up`` and ``serve handlers`` run."""

from __future__ import annotations

from typing import Any

from stratus.handlers import (
    compute,
    credentials,
    frameworks,
    integrations,
    resources,
    routed,
    tenants,
)
from stratus.handlers.identity import DEFAULT_TTL_S
from stratus.handlers.identity import handlers as identity_handlers
from stratus.handlers.keyring import KeyRing
from stratus.handlers.targets import TargetPolicy


def all_handlers(
    keyring: KeyRing | None = None,
    token_ttl_s: int = DEFAULT_TTL_S,
    quota_defaults: dict[str, int] | None = None,
    webhook_policy: TargetPolicy | None = None,
    webhook_keys: integrations.WebhookKeys | None = None,
) -> list[Any]:
    """``webhook_keys``: where webhook secrets derive from (default: the
    master key beside a key ring's directory)."""
    if webhook_keys is None and keyring is not None and keyring.path is not None:
        webhook_keys = integrations.WebhookKeys.load_or_create(keyring.path)
    return [
        *tenants.HANDLERS,
        *identity_handlers(keyring, token_ttl_s),
        *credentials.handlers(keyring),
        *resources.handlers(quota_defaults),
        *routed.handlers(),
        *compute.handlers(quota_defaults),
        *frameworks.handlers(quota_defaults),
        *integrations.handlers(
            webhook_keys,
            quota_defaults,
            webhook_policy,
        ),
    ]
