"""Every command handler, in one list: what ``stratus up`` and ``serve handlers`` run."""

from __future__ import annotations

from typing import Any

from stratus.handlers import compute, integrations, resources, routed, tenants
from stratus.handlers.identity import DEFAULT_TTL_S
from stratus.handlers.identity import handlers as identity_handlers
from stratus.handlers.keyring import KeyRing
from stratus.handlers.targets import TargetPolicy


def all_handlers(
    keyring: KeyRing | None = None,
    token_ttl_s: int = DEFAULT_TTL_S,
    quota_defaults: dict[str, int] | None = None,
    webhook_policy: TargetPolicy | None = None,
) -> list[Any]:
    return [
        *tenants.HANDLERS,
        *identity_handlers(keyring, token_ttl_s),
        *resources.handlers(quota_defaults),
        *routed.handlers(),
        *compute.handlers(quota_defaults),
        *integrations.handlers(
            integrations.WebhookKeys.load_or_create(keyring.path) if keyring else None,
            quota_defaults,
            webhook_policy,
        ),
    ]
